"""Mistakes are caught first, and said once: ``python run.py`` with a bad setting, missing weights or a
damaged image fails within its first 10 s, exits 1 and prints one message naming the setting or file
and the fix, with no traceback (HYDRA_FULL_ERROR=1 shows one). And every run gets its own folder."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASS = "widget"
FIRST_SECONDS = 10.0


@pytest.fixture
def dataset_root(tmp_path) -> Path:
    """A small class folder in the MAD-Sim layout (dataset=custom): 4 posed 32x32 views, 2 test images."""
    root, rng = tmp_path / "objects", np.random.default_rng(0)
    class_dir = root / CLASS
    for folder in ("train/good", "test/good", "test/Burrs", "ground_truth/Burrs"):
        (class_dir / folder).mkdir(parents=True)
    frames = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(class_dir / f"train/good/{i}.png")
        c2w = np.eye(4)
        c2w[2, 3] = 3.0 + i
        frames.append({"file_path": f"./train/good/{i}", "transform_matrix": c2w.tolist()})
    (class_dir / "transforms.json").write_text(json.dumps({"camera_angle_x": 0.8, "frames": frames}))
    for name in ("test/good/0.png", "test/Burrs/0.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(class_dir / name)
    Image.fromarray(np.eye(32, dtype=np.uint8) * 255).save(class_dir / "ground_truth/Burrs/0_mask.png")
    return root


def run_cli(tmp_path: Path, *overrides: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    base = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env = {**base, "SPLATPOSE_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline", **(env or {})}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "run.py", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc, time.perf_counter() - start


def assert_one_clean_message(proc: subprocess.CompletedProcess, seconds: float, *expected: str) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert seconds < FIRST_SECONDS, f"failed after {seconds:.1f} s, not in the first {FIRST_SECONDS:.0f}"
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, output[-3000:]  # said once, on one line
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def custom(root: Path, tmp_path: Path, *overrides: str) -> list[str]:
    return ["dataset=custom", f"dataset.root={root}", f"class={CLASS}", f"hydra.run.dir={tmp_path / 'run'}",
            *overrides]


def test_zero_splat_steps_fail_in_the_first_seconds(dataset_root, tmp_path):
    proc, seconds = run_cli(tmp_path, *custom(dataset_root, tmp_path, "splat.steps=0"))
    assert_one_clean_message(proc, seconds, "splat.steps=0 must be at least 1")
    assert json.loads((tmp_path / "run" / "failure.json").read_text())["traceback"], "the traceback is kept on file"


def test_missing_efficientnet_b4_weights_fail_in_the_first_seconds(dataset_root, tmp_path):
    proc, seconds = run_cli(tmp_path, *custom(dataset_root, tmp_path, "scorer=efficientnet_b4"))
    assert_one_clean_message(proc, seconds, "scorer=efficientnet_b4 needs its weights", "scorer.weights_path=")
    proc, seconds = run_cli(tmp_path, *custom(dataset_root, tmp_path, "scorer=efficientnet_b4",
                                              f"scorer.weights_path={tmp_path / 'b4.pth'}"))
    assert_one_clean_message(proc, seconds, f"scorer.weights_path={tmp_path / 'b4.pth'}: no such file")


def test_image_damaged_in_the_middle_fails_in_the_first_seconds(dataset_root, tmp_path):
    path = dataset_root / CLASS / "train" / "good" / "2.png"
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 16] = bytes(16)  # the end chunk stays intact
    path.write_bytes(bytes(data))
    proc, seconds = run_cli(tmp_path, *custom(dataset_root, tmp_path))
    assert_one_clean_message(proc, seconds, f"{path}: corrupt PNG", "re-export or re-copy this file")


def test_full_error_shows_the_traceback(dataset_root, tmp_path):
    proc, _ = run_cli(tmp_path, *custom(dataset_root, tmp_path, "splat.steps=0"), env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_two_runs_started_in_the_same_second_write_two_folders(dataset_root, tmp_path):
    """The real folder template (conf/hydra/default.yaml), moved from outputs/ into tmp_path and with its
    time stamp fixed, so that both runs start "in the same second" for certain. Each run fails fast
    (splat.steps=0) but has made its folder, its run.log and its failure.json by then."""
    template = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "hydra" / "default.yaml"))["run"]["dir"]
    assert template.startswith("outputs/") and "${now:%Y-%m-%d_%H-%M-%S}" in template
    run_dir = str(tmp_path / template.replace("${now:%Y-%m-%d_%H-%M-%S}", "2026-12-05_01-00-00"))
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "SLURM_JOB_ID")}
    env["SPLATPOSE_CACHE"] = str(tmp_path / "cache")
    command = [sys.executable, "run.py", "dataset=custom", f"dataset.root={dataset_root}", f"class={CLASS}",
               "splat.steps=0", f"hydra.run.dir={run_dir}"]
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    folders = sorted((tmp_path / "outputs" / "runs" / "custom" / CLASS).iterdir())
    assert len(folders) == 2, outputs
    for folder in folders:
        assert folder.name.startswith("2026-12-05_01-00-00_")
        assert (folder / "failure.json").is_file() and (folder / "run.log").read_text().count("[ERROR]") == 1
    assert len({line for out in outputs for line in out.splitlines() if line.startswith("Outputs:")}) == 2


def test_a_live_run_folder_is_not_shared(dataset_root, tmp_path):
    from splatpose.run_dirs import claim_run_dir

    (tmp_path / "run").mkdir()
    claim_run_dir(tmp_path / "run")  # as a live run holds it
    proc, seconds = run_cli(tmp_path, *custom(dataset_root, tmp_path))
    assert_one_clean_message(proc, seconds, "another run is writing into this folder")
