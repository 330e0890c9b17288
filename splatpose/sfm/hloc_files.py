"""Reading and writing the files that SfM steps exchange, in hloc's layout.

The layout (Hierarchical-Localization, cvg) is what makes the files interoperable with hloc and with
any tool that reads it:

features.h5
    one group per image, named by the image name (``train/good/0.png``; the slashes make nested
    groups, as in hloc), holding
      keypoints    float32 [N, 2]  (x, y) pixel coordinates in the *original* image, hloc convention:
                                   the centre of the top-left pixel is (0, 0). COLMAP puts it at
                                   (0.5, 0.5): add 0.5 before handing keypoints to pycolmap.
      descriptors  float32 [D, N]  (note: descriptor-major, as hloc stores them)
      scores       float32 [N]     detection scores (absent for extractors without them)
      image_size   int64   [2]     (width, height) of the original image
    SIFT groups also carry ``scales`` and ``oris`` [N] (pixels, radians), which hloc's SIFT has too.

matches.h5
    one group per image pair, named ``<name0>/<name1>`` with every '/' inside a name replaced by '-'
    (hloc's ``names_to_pair``), holding
      matches0          int32   [N0]  index into image1's keypoints for each keypoint of image0, -1 if none
      matching_scores0  float32 [N0]  confidence of that match (0 where unmatched)

pairs.txt
    one pair per line: ``name0 name1`` (image names as in features.h5).

Every writer writes to a temporary file and renames it into place, so a run that is interrupted never
leaves a half-written file that a later run would trust.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from splatpose.atomic_files import atomic_path, write_text_atomic


def pair_key(name0: str, name1: str) -> str:
    """The matches.h5 group of a pair: '/'-joined names whose own '/' became '-' (hloc's names_to_pair)."""
    return f"{name0.replace('/', '-')}/{name1.replace('/', '-')}"


@contextlib.contextmanager
def atomic_h5(path: Path) -> Iterator[h5py.File]:
    """Open an h5 file for writing, seeded with the current content of ``path``; rename into place on success.

    Appending to a copy keeps what is already on disk valid until the new version is complete.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.exists():
            tmp.write_bytes(path.read_bytes())
        with h5py.File(tmp, "a") as handle:
            yield handle


# --------------------------------------------------------------------------------------------------
# features.h5


def write_image_features(handle: h5py.File, name: str, features: dict[str, np.ndarray]) -> None:
    """Store one image's features (internal layout: descriptors [N, D]) as an hloc group.

    Args:
        handle: an open features.h5 (see :func:`atomic_h5`).
        name: image name, e.g. "train/good/0.png".
        features: keypoints [N, 2] (hloc convention), descriptors [N, D], image_size (W, H), and
            optionally scores, scales, oris [N].
    """
    if name in handle:
        del handle[name]
    group = handle.create_group(name)
    group.create_dataset("keypoints", data=np.asarray(features["keypoints"], dtype=np.float32))
    group.create_dataset("descriptors", data=np.asarray(features["descriptors"], dtype=np.float32).T)
    group.create_dataset("image_size", data=np.asarray(features["image_size"], dtype=np.int64))
    for key in ("scores", "scales", "oris"):
        if key in features:
            group.create_dataset(key, data=np.asarray(features[key], dtype=np.float32))


def read_image_features(path: Path, name: str) -> dict[str, np.ndarray]:
    """One image's features back in the internal layout: keypoints [N, 2], descriptors [N, D], ..."""
    with h5py.File(path, "r") as handle:
        if name not in handle:
            raise KeyError(f"{path}: no features for image {name!r}; re-run the extraction step")
        return _group_features(handle[name])


def read_all_features(path: Path, names: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Features of many images in one pass over the file (name -> dict as in :func:`read_image_features`)."""
    with h5py.File(path, "r") as handle:
        missing = [n for n in names if n not in handle]
        if missing:
            raise KeyError(f"{path}: no features for {len(missing)} images (first: {missing[0]!r}); "
                           "re-run the extraction step")
        return {name: _group_features(handle[name]) for name in names}


def _group_features(group: h5py.Group) -> dict[str, np.ndarray]:
    out = {key: group[key][()] for key in group.keys()}
    out["descriptors"] = out["descriptors"].T
    return out


def names_in_features(path: Path) -> set[str]:
    """Image names that have a complete features group in ``path`` (empty when the file is absent)."""
    if not Path(path).exists():
        return set()
    names = set()
    with h5py.File(path, "r") as handle:
        def visit(name: str, obj) -> None:
            if isinstance(obj, h5py.Group) and "keypoints" in obj and "descriptors" in obj:
                names.add(name)
        handle.visititems(visit)
    return names


# --------------------------------------------------------------------------------------------------
# matches.h5


def write_pair_matches(handle: h5py.File, name0: str, name1: str, matches0: np.ndarray,
                       scores0: np.ndarray) -> None:
    """Store the matches of a pair: matches0 [N0] (index into image1, -1 none), matching_scores0 [N0]."""
    key = pair_key(name0, name1)
    if key in handle:
        del handle[key]
    group = handle.create_group(key)
    group.create_dataset("matches0", data=np.asarray(matches0, dtype=np.int32))
    group.create_dataset("matching_scores0", data=np.asarray(scores0, dtype=np.float32))


def read_pair_matches(path_or_handle, name0: str, name1: str) -> tuple[np.ndarray, np.ndarray]:
    """Matched keypoint indices of a pair, stored in either order.

    Returns:
        idx: int64 [M, 2]: (keypoint index in image0, keypoint index in image1)
        scores: float32 [M]
    """
    if isinstance(path_or_handle, (str, Path)):
        with h5py.File(path_or_handle, "r") as handle:
            return read_pair_matches(handle, name0, name1)
    handle = path_or_handle
    for a, b, reverse in ((name0, name1, False), (name1, name0, True)):
        key = pair_key(a, b)
        if key in handle:
            matches0 = handle[key]["matches0"][()]
            scores0 = handle[key]["matching_scores0"][()]
            valid = matches0 > -1
            idx = np.stack([np.flatnonzero(valid), matches0[valid]], axis=1).astype(np.int64)
            return (idx[:, ::-1].copy() if reverse else idx), scores0[valid]
    raise KeyError(f"{handle.filename}: no matches for the pair {name0!r} - {name1!r}; re-run the matching step")


def pairs_in_matches(path: Path) -> set[tuple[str, str]]:
    """Pair keys (as stored) present in a matches.h5; empty when the file is absent."""
    if not Path(path).exists():
        return set()
    with h5py.File(path, "r") as handle:
        return {(a, b) for a in handle for b in handle[a]}


# --------------------------------------------------------------------------------------------------
# pairs.txt


def write_pairs(path: Path, pairs: list[tuple[str, str]]) -> None:
    """Write ``name0 name1`` lines (names must not contain spaces, as in hloc)."""
    for pair in pairs:
        if any(" " in name for name in pair):
            raise ValueError(f"{path}: image name with a space {pair!r} cannot be written to a pairs file; "
                             "rename the image")
    write_text_atomic(path, "".join(f"{a} {b}\n" for a, b in pairs))


def read_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'name0 name1', got {line!r}")
        pairs.append((parts[0], parts[1]))
    return pairs
