"""The SfM reference model of one class: db features, db pairs, matches, then triangulation with the
known poses (``sfm.reference_poses=known``) or SfM from scratch (``estimate``:
:mod:`splatpose.sfm.estimated_poses`).

    build_reference(data, cfg.sfm, out_dir, device) -> Reference

writes into ``out_dir`` (hloc's file names and layouts, see :mod:`splatpose.sfm.hloc_files`)::

    features.h5      local features of every train image
    pairs-db.txt     db pairs: from the known poses (k nearest viewing directions), or from retrieval
                     (or every pair) when the poses are estimated
    matches.h5       matches of those pairs
    database.db      the COLMAP database handed to the triangulator (or the mapper)
    mapping/         estimate only: every model pycolmap's incremental mapper found
    sfm/             the COLMAP reconstruction (one camera, the reference images at their known or
                     estimated poses, points3D), binary; image ids 1..M in ``data.train`` order
    points.npz       xyz [N, 3] and rgb [N, 3] float32 of the points (what initialises the 3DGS model)
    reference.json   summary (with ``cameras``: how the poses were found, and for estimated ones the
                     registered and unregistered views and the focal length); written last, so its
                     presence means the folder is complete

Each step skips what is already on disk, so an interrupted run resumes where it stopped and a rerun
with a complete folder only reads ``points.npz``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycolmap
from omegaconf import DictConfig

from splatpose.atomic_files import atomic_path, write_text_atomic
from splatpose.data.mad_sim import ClassData
from splatpose.errors import UserError
from splatpose.sfm import hloc_files
from splatpose.sfm.config import check_sfm_config
from splatpose.sfm.estimated_poses import MAPPING_DIR, estimate_reconstruction, image_pairs
from splatpose.sfm.features import FeatureSize, build_extractor, extract_features
from splatpose.sfm.matchers import build_matcher, match_pairs, read_matches_of_pairs
from splatpose.sfm.pairs import pairs_from_poses
from splatpose.sfm.triangulation import (point_colors, posed_reconstruction, triangulate, triangulation_options,
                                         verify_with_poses, write_database)

log = logging.getLogger(__name__)

FEATURES_FILE = "features.h5"
PAIRS_FILE = "pairs-db.txt"
MATCHES_FILE = "matches.h5"
DATABASE_FILE = "database.db"
RECONSTRUCTION_DIR = "sfm"
POINTS_FILE = "points.npz"
SUMMARY_FILE = "reference.json"


@dataclass
class Reference:
    """A finished reference model.

    points_xyz: float32 [N, 3] world coordinates of the triangulated points.
    points_rgb: float32 [N, 3] their colours in [0, 1].
    reconstruction_dir: COLMAP reconstruction (binary); image names are the train names.
    db_names: the reference images' names, in ``data.train`` order (COLMAP image id = index + 1): every
        train view with known poses, the registered ones with estimated poses.
    image_root: the folder the db names are relative to (the class folder).
    """

    points_xyz: np.ndarray
    points_rgb: np.ndarray
    reconstruction_dir: Path
    features_path: Path
    pairs_path: Path
    matches_path: Path
    db_names: list[str]
    image_root: Path
    summary: dict = field(default_factory=dict)

    def load_reconstruction(self) -> pycolmap.Reconstruction:
        return pycolmap.Reconstruction(str(self.reconstruction_dir))


def build_reference(data: ClassData, cfg: DictConfig, out_dir: Path, device: str) -> Reference:
    """Build (or reuse) the reference model of ``data`` in ``out_dir``.

    Args:
        data: the class (its train views, at their known poses unless estimated; test images are not used).
        cfg: the ``sfm`` config node (feature, matcher, db_pairs, triangulation, max_keypoints,
            reference_poses, estimate, ...), as :func:`~splatpose.sfm.estimated_poses.resolve_reference_poses`
            returns it.
        out_dir: the stage folder; files as listed in the module docstring.
        device: "cpu" or "cuda[:i]" for the networks.
    Raises:
        EstimationError: (estimate) too few views registered.
    """
    check_sfm_config(cfg)
    estimate = cfg.get("reference_poses", "known") == "estimate"
    if not estimate and not data.poses_known:
        raise UserError(f"{data.root}: sfm.reference_poses=known but the class has no transforms.json (no poses); "
                        "use sfm.reference_poses=estimate")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"features": out_dir / FEATURES_FILE, "pairs": out_dir / PAIRS_FILE,
             "matches": out_dir / MATCHES_FILE, "sfm": out_dir / RECONSTRUCTION_DIR}
    db_names = [view.name for view in data.train]
    if (out_dir / SUMMARY_FILE).exists() and (out_dir / POINTS_FILE).exists():
        log.info("SfM reference: reusing %s", out_dir)
        return _load_reference(out_dir, paths, data.root)

    times: dict[str, float] = {}
    start = time.perf_counter()
    extractor = build_extractor(cfg.feature, cfg.max_keypoints, device)
    # With reference masks the model holds points of the object only, not of the bench behind it.
    masks = {view.name: view.mask_path for view in data.train} \
        if cfg.get("object_masks", False) and data.has_reference_masks else None
    extract_features(extractor, {view.name: view.path for view in data.train}, paths["features"],
                     FeatureSize.from_config(cfg), device, batch_size=int(cfg.batch_size), masks=masks)
    del extractor
    times["extract"] = time.perf_counter() - start

    start = time.perf_counter()
    features = hloc_files.read_all_features(paths["features"], db_names)
    if estimate:
        pairs = image_pairs(db_names, features, cfg.estimate.pairs)
    else:
        pairs = pairs_from_poses(db_names, data.train_w2c, int(cfg.db_pairs.num_neighbors))
    hloc_files.write_pairs(paths["pairs"], pairs)
    matcher = build_matcher(cfg.matcher, cfg.feature.name, device)
    match_pairs(matcher, pairs, features, paths["matches"], progress="match db pairs")
    del matcher
    times["match"] = time.perf_counter() - start

    start = time.perf_counter()
    if estimate:
        raw = read_matches_of_pairs(paths["matches"], pairs)
        reconstruction, cameras = estimate_reconstruction(data, cfg, features, pairs, raw, out_dir / DATABASE_FILE,
                                                          paths["pairs"], out_dir / MAPPING_DIR)
        _write_model(reconstruction, paths["sfm"])
        times["map"] = time.perf_counter() - start
    else:
        reconstruction = _triangulate(data, cfg.triangulation, features, pairs, paths, out_dir)
        cameras = {"reference_poses": "known", "num_views": len(db_names), "num_registered": len(db_names),
                   "registration_rate": 1.0, "unregistered": []}
        times["triangulate"] = time.perf_counter() - start
    db_names = _image_names(reconstruction)

    ids = sorted(reconstruction.points3D)
    xyz = np.array([reconstruction.points3D[i].xyz for i in ids], dtype=np.float32).reshape(-1, 3)
    colours = point_colors(reconstruction, data.root)
    rgb = np.array([colours[i] for i in ids], dtype=np.float32).reshape(-1, 3)
    if len(xyz) == 0:
        # A uniformly coloured object gives no matches to verify: a legitimate outcome with known poses.
        # The splats then start from random points inside the visual hull, and every query's pose comes
        # from the recovery through the splats (refine.recovery).
        log.warning("SfM reference for %s: triangulation produced no 3D points from %d db pairs (an object "
                    "without texture, or train images that do not overlap, or wrong poses in transforms.json); "
                    "queries cannot be localized by PnP and rely on refine.recovery", data.root, len(pairs))
    _save_points(out_dir / POINTS_FILE, xyz, rgb)
    summary = {"num_points": len(xyz), "num_db_images": len(db_names), "num_db_pairs": len(pairs),
               "mean_track_length": float(reconstruction.compute_mean_track_length()) if len(xyz) else 0.0,
               "mean_reprojection_error_px": float(reconstruction.compute_mean_reprojection_error()) if len(xyz)
               else 0.0,
               "seconds": {k: round(v, 3) for k, v in times.items()}, "cameras": cameras}
    write_text_atomic(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    log.info("SfM reference: %d points, track length %.1f, reprojection error %.2f px", len(xyz),
             summary["mean_track_length"], summary["mean_reprojection_error_px"])
    return Reference(xyz, rgb, paths["sfm"], paths["features"], paths["pairs"], paths["matches"], db_names,
                     data.root, summary)


def _triangulate(data: ClassData, cfg: DictConfig, features: dict, pairs: list[tuple[str, str]],
                 paths: dict[str, Path], out_dir: Path) -> pycolmap.Reconstruction:
    """Verify the db matches against the known poses, then triangulate through a COLMAP database."""
    w2c = {view.name: view.w2c for view in data.train}
    raw = read_matches_of_pairs(paths["matches"], pairs)
    verified = {}
    for (a, b), matches in raw.items():
        verified[(a, b)] = verify_with_poses(data.K, w2c[a], w2c[b], features[a]["keypoints"] + 0.5,
                                             features[b]["keypoints"] + 0.5, matches,
                                             float(cfg.max_epipolar_error))
    kept = sum(len(m) for m in verified.values())
    log.info("db matches: %d of %d agree with the known poses", kept, sum(len(m) for m in raw.values()))
    reconstruction = posed_reconstruction(data)
    database = out_dir / DATABASE_FILE
    write_database(database, reconstruction, {n: f["keypoints"] for n, f in features.items()}, verified)
    options = triangulation_options(float(cfg.max_reproj_error), float(cfg.min_angle_deg),
                                    bool(cfg.keep_two_view_tracks))
    tmp_dir = out_dir / f".{RECONSTRUCTION_DIR}.tmp"
    result = triangulate(reconstruction, database, data.root, tmp_dir, options, float(cfg.max_reproj_error))
    _write_model(result, paths["sfm"], tmp_dir)
    return result


def _write_model(reconstruction: pycolmap.Reconstruction, model_dir: Path, tmp_dir: Path | None = None) -> None:
    """Write a COLMAP model (binary) to ``model_dir`` through a temporary folder renamed into place."""
    tmp_dir = tmp_dir or model_dir.with_name(f".{model_dir.name}.tmp")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    reconstruction.write(str(tmp_dir))
    if model_dir.exists():
        for child in model_dir.iterdir():
            child.unlink()
        model_dir.rmdir()
    tmp_dir.rename(model_dir)


def _image_names(reconstruction: pycolmap.Reconstruction) -> list[str]:
    """The names of a reference model's images in image-id order (``data.train`` order)."""
    return [image.name for image in sorted(reconstruction.images.values(), key=lambda image: image.image_id)]


def _save_points(path: Path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, xyz=xyz, rgb=rgb)


def _load_reference(out_dir: Path, paths: dict[str, Path], image_root: Path) -> Reference:
    points = np.load(out_dir / POINTS_FILE)
    summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    db_names = _image_names(pycolmap.Reconstruction(str(paths["sfm"])))
    return Reference(points["xyz"].astype(np.float32), points["rgb"].astype(np.float32), paths["sfm"],
                     paths["features"], paths["pairs"], paths["matches"], db_names, image_root, summary)
