"""Watch-folder mode: each image dropped into the folder is scored once, also across a restart.

On tests/conftest.py's tiny run (made once per session); the watcher runs with ``once`` (process what is
pending, then return), the way a restarted process sees the folder.
"""

import json
import os
import shutil
import time

import pytest

from splatpose.detect.detector import Detector
from splatpose.watch import LEDGER_NAME, watch_folder


def drop(image, folder, name):
    """Copy ``image`` into ``folder`` as a camera would, finished a while ago (past watch.settle_s)."""
    target = folder / name
    shutil.copyfile(image, target)
    old = time.time() - 60
    os.utime(target, (old, old))
    return target


@pytest.fixture(scope="module")
def watch_detector(tiny_run):
    run_dir, _ = tiny_run
    detector = Detector.from_run(run_dir, {"matching": "sequential", "warm_up": False}, device="cpu")
    yield detector
    detector.close()


def test_each_image_is_processed_once_across_a_restart(watch_detector, tiny_run_images, tmp_path):
    first = drop(tiny_run_images["good"], tmp_path, "a.png")
    drop(tiny_run_images["defect"], tmp_path, "b.png")
    (tmp_path / "fresh.png").write_bytes(first.read_bytes())  # still being written: left for later

    assert watch_folder(watch_detector, tmp_path, settle_s=30, once=True) == 2
    record = json.loads((tmp_path / "a.detection.json").read_text())
    assert record["ok"] and record["name"] == "a.png"
    assert record["score"] == pytest.approx(watch_detector.detect(first).score, abs=1e-6)
    assert (tmp_path / "b.overlay.png").is_file()
    ledger = json.loads((tmp_path / LEDGER_NAME).read_text())
    assert set(ledger) == {"a.png", "b.png"}
    written = (tmp_path / "a.detection.json").stat().st_mtime_ns

    # A restart: a new watcher reads the ledger; only the images new to it are processed.
    drop(tiny_run_images["good"], tmp_path, "c.png")
    assert watch_folder(watch_detector, tmp_path, settle_s=0, once=True) == 2  # c.png and the settled fresh.png
    assert watch_folder(watch_detector, tmp_path, settle_s=0, once=True) == 0
    assert (tmp_path / "a.detection.json").stat().st_mtime_ns == written
    assert set(json.loads((tmp_path / LEDGER_NAME).read_text())) == {"a.png", "b.png", "c.png", "fresh.png"}
    assert not list(tmp_path.glob("*.overlay.detection.json")), "the watcher scored its own overlays"
