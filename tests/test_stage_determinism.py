"""Runs of the real pipeline at tiny settings (64 px, 6 views, 6 steps, SIFT), through ``python run.py``:

- a stage's cache key holds one result: the splat stage rebuilt in a process where SfM and localization
  were reused from the cache (so they drew nothing from the random generators) writes the same bytes
  as the build in a process that computed them first;
- a finished run folder serves ``task=detect`` after the stage cache is deleted, and says which file
  is missing when its own copy is incomplete.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = ["debug=fast", "dataset.preset=tiny", "dataset.generator.n_train=6", "dataset.generator.n_test_good=1",
        "dataset.generator.n_test_per_defect=1", "dataset.generator.width=64", "dataset.generator.height=64",
        "sfm/feature=sift", "sfm/matcher=nn_mutual", "sfm.max_keypoints=128", "splat.steps=6",
        "splat.checkpoint_every=3", "splat.sh_degree_interval=3", "splat.strategy.refine_start_iter=2",
        "splat.strategy.refine_stop_iter=5", "splat.strategy.refine_every=2", "splat.eval.every_n_steps=6",
        "splat.init.num_points=2000", "scorer=pixel", "refine=off", "logger=none", "callbacks=none"]


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPLATPOSE_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "run.py", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def run_tiny(tmp_path: Path, name: str) -> dict:
    proc = run_cli(tmp_path, *TINY, f"hydra.run.dir={tmp_path / name}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / name / "results.json").read_text())


def splat_files(stage_dir: Path) -> dict[str, bytes]:
    metrics = json.loads((stage_dir / "splat_metrics.json").read_text())
    metrics.pop("train_seconds")
    return {"point_cloud.ply": (stage_dir / "point_cloud.ply").read_bytes(),
            "splat_metrics.json": json.dumps(metrics, sort_keys=True).encode()}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two runs sharing one cache: the first computes every stage; before the second, the splat stage
    folder is deleted, so the second reuses SfM and localization and rebuilds only the splats (and
    what depends on them). Returns (tmp folder, first results, splat files of the first, second results)."""
    tmp_path = tmp_path_factory.mktemp("tiny_runs")
    first = run_tiny(tmp_path, "first")
    assert not first["timings"]["sfm"]["reused"]
    splat_dir = Path(first["stage_dirs"]["splat"])
    built_after_sfm = splat_files(splat_dir)
    shutil.rmtree(splat_dir)
    return tmp_path, first, built_after_sfm, run_tiny(tmp_path, "second")


def test_splat_stage_gives_the_same_bytes_with_or_without_upstream_stages_in_the_process(tiny_runs):
    _, first, built_after_sfm, second = tiny_runs
    splat_dir = Path(first["stage_dirs"]["splat"])
    assert second["timings"]["sfm"]["reused"] and second["timings"]["localize"]["reused"]
    assert not second["timings"]["splat"]["reused"] and second["stage_dirs"]["splat"] == str(splat_dir)
    assert splat_files(splat_dir) == built_after_sfm
    assert second["splat"]["resumed"] is False


def test_stage_settings_name_the_machine_that_computed_them(tiny_runs):
    """What decides a stage's bits beyond its settings is in its key: the device kind, torch's thread
    count and the CPU instruction set its kernels dispatch to."""
    import torch

    _, first, _, _ = tiny_runs
    recorded = json.loads((Path(first["stage_dirs"]["splat"]) / "settings.json").read_text())["settings"]
    assert recorded["device"] == "cpu" and recorded["threads"] == torch.get_num_threads()
    assert recorded["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_run_folder_serves_detect_after_the_stage_cache_is_deleted(tiny_runs):
    tmp_path, _, _, second = tiny_runs
    run_dir = tmp_path / "second"
    query = tmp_path / "query.png"
    shutil.copy(sorted((tmp_path / "cache" / "synthetic").glob("*/01Ant/test/good/*.png"))[0], query)
    shutil.rmtree(tmp_path / "cache")

    proc = run_cli(tmp_path, "task=detect", f"run_dir={run_dir}", f"inputs={query}", "device=cpu", "logger=none",
                   "detect.lightglue_compile=false", "detect.warm_up=false", f"hydra.run.dir={tmp_path / 'detect'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((tmp_path / "detect" / "detections.json").read_text())
    assert len(records) == 1 and records[0]["ok"], records

    (run_dir / "artifacts" / "sfm" / "features.h5").unlink()
    proc = run_cli(tmp_path, "task=detect", f"run_dir={run_dir}", f"inputs={query}", "device=cpu", "logger=none",
                   f"hydra.run.dir={tmp_path / 'detect_again'}")
    assert proc.returncode == 1
    assert "artifacts/sfm/features.h5: missing from the run folder" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_dataset_identity_ignores_where_the_data_lives_and_which_classes_are_listed():
    """The same files in another checkout or cache must get the same stage keys (hence seeds and
    results); the dataset's own settings still count."""
    from omegaconf import OmegaConf

    from splatpose.pipeline import dataset_identity

    here = OmegaConf.create({"name": "synthetic", "root": "/work/main/.cache/synthetic", "preset": "small",
                             "classes": ["01Ant"], "default_class": "01Ant"})
    elsewhere = OmegaConf.merge(here, {"root": "/tmp/clone/.cache/synthetic", "classes": ["01Ant", "03Nut"]})
    assert dataset_identity(here) == dataset_identity(elsewhere)
    assert dataset_identity(here) != dataset_identity(OmegaConf.merge(here, {"preset": "mad_sim_like"}))
