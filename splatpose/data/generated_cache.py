"""The cache of generated datasets: what every generated family (``synthetic``, ``parts``) shares.

A family's generator writes classes in the MAD-Sim layout into ``root/<family>-<settings key>/``,
where the key hashes the generator version and every setting that determines the files. Each class is
generated in a child process into a hidden ``.tmp-<class>-<pid>`` folder and renamed into place when
complete, under a per-class file lock: an interrupted or concurrent generation never leaves a half class
that a later run would trust, and two sweep jobs that start together generate a class once.

Only the machinery lives here; scenes, meshes, cameras and rendering belong to each family.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from splatpose.atomic_files import write_text_atomic
from splatpose.data.mad_sim import TRANSFORMS_FILE

log = logging.getLogger(__name__)


def settings_key(generator_version: int, settings, left_out_at_default: tuple[str, ...] = ()) -> str:
    """12 hex digits hashing a generator version and a settings dataclass, or the dict of the settings
    that enter the key (the cache folder's key). Fields of the dataclass named in ``left_out_at_default``
    enter only when they differ from their defaults: settings added later keep the folders of the presets
    that do not use them."""
    if isinstance(settings, dict):
        fields = settings
    else:
        defaults = {f.name: f.default for f in dataclasses.fields(settings)}
        fields = {k: v for k, v in dataclasses.asdict(settings).items()
                  if k not in left_out_at_default or v != defaults[k]}
    blob = json.dumps({"version": generator_version, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def class_rng(seed: int, class_name: str) -> np.random.Generator:
    """A generator seeded by (seed, class name): classes are independent of which others are generated."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(class_name.encode())]))


def ensure_generated_classes(dataset_root: Path, classes: Iterable[str], generator_module: str,
                             settings_json: str, family: str) -> None:
    """Generate each missing class of ``dataset_root`` by running ``python -m <generator_module>
    OUT_DIR CLASS SETTINGS_JSON`` (which must write the whole class into OUT_DIR), one class at a time.

    A class counts as present when its transforms.json exists (written by the generator, renamed into
    place with the rest of the class).
    """
    for class_name in classes:
        with class_lock(dataset_root, class_name):
            if (dataset_root / class_name / TRANSFORMS_FILE).is_file():
                continue
            tmp = dataset_root / f".tmp-{class_name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            start = time.perf_counter()
            generate_in_child_process(generator_module, tmp, class_name, settings_json, family)
            os.rename(tmp, dataset_root / class_name)
            log.info("generated %s class %s in %.1f s into %s", family, class_name,
                     time.perf_counter() - start, dataset_root / class_name)


def generate_in_child_process(generator_module: str, out_dir: Path, class_name: str, settings_json: str,
                              family: str) -> None:
    """Run a family's generator for one class in a fresh Python process.

    Renderers load their own LLVM (Mesa's software OpenGL, Dr.Jit's LLVM backend); a library with an
    LLVM of its own loaded later (triton, which torch imports lazily) then crashes the process. The
    pipeline goes on to run torch after generating, so the rendering stays out of its process.
    """
    command = [sys.executable, "-m", generator_module, str(out_dir), class_name, settings_json]
    result = subprocess.run(command)
    if result.returncode != 0:
        raise RuntimeError(f"generating {family} class {class_name} into {out_dir} failed (exit code "
                           f"{result.returncode}; its error is printed above). Command: {' '.join(command)}")


@contextlib.contextmanager
def class_lock(dataset_root: Path, class_name: str) -> Iterator[None]:
    """Serialise generation of one class across processes (sweep jobs may start together)."""
    with open(dataset_root / f".{class_name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            # Leftovers of an interrupted run of ours are never trusted: start that class afresh.
            for stale in dataset_root.glob(f".tmp-{class_name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_if_changed(path: Path, text: str) -> None:
    """Write a text file atomically, and only when its content differs (keeps mtimes of equal files)."""
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)


def save_png(path: Path, pixels: np.ndarray) -> None:
    """Write uint8 [H, W] or [H, W, 3] pixels as PNG, creating folders; same pixels -> same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fixed encoder settings and no metadata: same pixels -> same bytes.
    Image.fromarray(pixels).save(path, format="PNG", compress_level=6)


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
