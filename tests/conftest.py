"""Shared fixtures: a finished tiny run made once per session by ``python run.py`` itself.

Its stage cache lives in pytest's cache folder (.pytest_cache/d/splatpose-service-run): the first session
trains it (a few minutes on a busy 2-core CPU: SfM, 30 splat steps), later sessions reuse every stage but
scoring (seconds). debug=fast sizes, refine=off (the detector's fastest path).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CLASS = "03Nut"  # compact and textured: plenty of keypoints at 128 px
TINY_RUN_OVERRIDES = ["debug=fast", "logger=csv", "device=cpu", f"class={TINY_CLASS}", "refine=off",
                      "dataset.generator.n_train=16", "dataset.generator.n_test_good=2",
                      "dataset.generator.n_test_per_defect=1", "sfm.max_keypoints=512", "sfm.resize_max=256",
                      "sfm.resize_force=true", "sfm.db_pairs.num_neighbors=4", "sfm.localization.top_k=3",
                      "splat.steps=30"]


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (modules of tiny tensors use it: two OpenMP threads on a shared
    CPU stall more than they gain)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(request, tmp_path_factory):
    """(run folder, console output) of ``python run.py`` on a tiny generated class."""
    cache = request.config.cache.mkdir("splatpose-service-run")
    out_dir = tmp_path_factory.mktemp("tiny") / "run"
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "run.py", *TINY_RUN_OVERRIDES, f"paths.cache_dir={cache}",
                           f"hydra.run.dir={out_dir}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return out_dir, output


# The detector settings of the tests that share ``tiny_detector`` (sequential matching: no warm-up).
TINY_DETECT = {"matching": "sequential", "warm_up": False, "threshold": 0.5}


@pytest.fixture(scope="session")
def tiny_detector(tiny_run):
    """The tiny run's Detector on CPU (TINY_DETECT), loaded once per session."""
    from splatpose.detect.detector import Detector

    run_dir, _ = tiny_run
    return Detector.from_run(run_dir, TINY_DETECT, device="cpu")


@pytest.fixture(scope="session")
def tiny_run_images(tiny_run):
    """{"good": path, "defect": path, "all": [paths]} of the tiny run's generated test set."""
    run_dir, _ = tiny_run
    root = Path(json.loads((run_dir / "results.json").read_text())["config"]["dataset"]["root"])
    tests = sorted(root.glob(f"*/{TINY_CLASS}/test/*/*.png"))
    good = [p for p in tests if p.parent.name == "good"]
    defects = [p for p in tests if p.parent.name != "good"]
    assert good and defects, f"no generated test images under {root}"
    return {"good": good[0], "defect": defects[0], "all": good + defects}
