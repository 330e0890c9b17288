"""Watch-folder mode (task=watch): score every new image dropped into a folder, once.

    python run.py task=watch run_dir=outputs/runs/synthetic/01Ant/<time> watch.dir=/line/camera1

For each new image ``part.png`` in ``watch.dir`` (not its subfolders) it writes, beside the image,
``part.detection.json`` (the detection's record: score, decision, pose, times) and
``part.overlay.png`` (query | render | map over the query). A ledger, ``watch.dir/.splatpose_ledger.json``,
lists the files done (name, size, modification time, ok); it is rewritten atomically after each image,
so a restarted watcher skips every file it finished. An image is taken only once its size and
modification time have not changed for ``watch.settle_s`` (a camera still writing it is left for the
next poll). A crash between writing an image's outputs and its ledger entry redoes that one image on
restart (the same outputs, overwritten).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from splatpose.detect.inputs import IMAGE_SUFFIXES
from splatpose.detect.overlays import write_overlay
from splatpose.atomic_files import write_json_atomic

log = logging.getLogger(__name__)

LEDGER_NAME = ".splatpose_ledger.json"
OUTPUT_SUFFIXES = (".overlay.png",)  # our own outputs are images too: never score them


def read_ledger(folder: Path) -> dict[str, dict]:
    """{file name: {size, mtime_ns, ok}} of the files already processed in ``folder``."""
    path = folder / LEDGER_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:  # written atomically, so only a hand edit breaks it
        raise ValueError(f"{path} is not valid JSON ({error}); fix or delete it (deleting rescans every "
                         f"image in {folder})") from error


def pending_images(folder: Path, ledger: dict, settle_s: float, now: float | None = None) -> list[Path]:
    """Images in ``folder`` not in the ledger whose last change is at least ``settle_s`` old, oldest first."""
    now = time.time() if now is None else now
    found = []
    for path in folder.iterdir():
        name = path.name
        if (not path.is_file() or name.startswith(".") or name in ledger
                or path.suffix.lower() not in IMAGE_SUFFIXES or name.endswith(OUTPUT_SUFFIXES)):
            continue
        stat = path.stat()
        if now - stat.st_mtime >= settle_s:
            found.append((stat.st_mtime_ns, name, path))
    return [path for _, _, path in sorted(found)]


def process_image(detector, path: Path, ledger: dict, write_overlays: bool = True) -> dict:
    """Detect ``path``, write its JSON and overlay beside it, then record it in the ledger (atomically).
    Returns the detection's record."""
    detection = detector.detect(path, path.name, keep_images=write_overlays)
    record = {**detection.record(), "threshold": detector.cfg.threshold}
    write_json_atomic(path.with_name(f"{path.stem}.detection.json"), record)
    if write_overlays and detection.ok:
        caption = (f"{path.name}  score {detection.score:.3f}" + ("" if detection.localized else "  NOT LOCALIZED"))
        write_overlay(path.with_name(f"{path.stem}.overlay.png"), detection.query, detection.render,
                      detection.anomaly_map, caption)
    stat = path.stat()
    ledger[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ok": detection.ok,
                         "score": detection.score}
    write_json_atomic(path.parent / LEDGER_NAME, ledger)
    log.info("%s: %s", path.name, f"score {detection.score:.4f}" if detection.ok else f"error: {detection.error}")
    return record


def watch_folder(detector, folder: Path, poll_s: float = 1.0, settle_s: float = 1.0, once: bool = False,
                 write_overlays: bool = True) -> int:
    """Process new images in ``folder`` until interrupted (or, with ``once``, until none is pending).
    Returns how many images were processed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"watch.dir={folder} is not a folder; create it or point watch.dir at the camera's folder")
    ledger = read_ledger(folder)
    done = 0
    while True:
        batch = pending_images(folder, ledger, settle_s)
        for path in batch:
            process_image(detector, path, ledger, write_overlays)
            done += 1
        if once and not batch:
            return done
        if not batch:
            time.sleep(poll_s)


def watch_task(cfg: DictConfig) -> int:
    """``python run.py task=watch run_dir=... watch.dir=...``."""
    from splatpose.detect.detector import Detector

    if not cfg.get("run_dir"):
        raise ValueError("run_dir is not set; pass run_dir=<folder of a finished evaluation run>")
    if not cfg.watch.get("dir"):
        raise ValueError("watch.dir is not set; pass watch.dir=<folder the images arrive in>")
    detector = Detector.from_run(cfg.run_dir, cfg.get("detect"), device=cfg.get("device", "auto"))
    print(f"Watching {cfg.watch.dir} (ledger {LEDGER_NAME}; Ctrl-C stops)", flush=True)
    try:
        done = watch_folder(detector, Path(cfg.watch.dir), float(cfg.watch.poll_s), float(cfg.watch.settle_s),
                            bool(cfg.watch.once), bool(detector.cfg.write_overlays))
    except KeyboardInterrupt:
        done = -1
    finally:
        detector.close()
    return done
