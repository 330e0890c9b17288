"""A stage's cache key holds one result: the splat stage rebuilt in a process where SfM and localization
were reused from the cache (so they drew nothing from the random generators) writes the same bytes as
the build in a process that computed them first. Tiny settings (64 px, 6 views, 6 steps, SIFT) keep
both runs of the real pipeline short."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY = ["debug=fast", "dataset.preset=tiny", "dataset.generator.n_train=6", "dataset.generator.n_test_good=1",
        "dataset.generator.n_test_per_defect=1", "dataset.generator.width=64", "dataset.generator.height=64",
        "sfm/feature=sift", "sfm/matcher=nn_mutual", "sfm.max_keypoints=128", "splat.steps=6",
        "splat.checkpoint_every=3", "splat.sh_degree_interval=3", "splat.strategy.refine_start_iter=2",
        "splat.strategy.refine_stop_iter=5", "splat.strategy.refine_every=2", "splat.eval.every_n_steps=6",
        "splat.init.num_points=2000", "scorer=pixel", "refine=off", "logger=none", "callbacks=none"]


def run_tiny(tmp_path: Path, name: str) -> dict:
    env = {**os.environ, "SPLATPOSE_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "run.py", *TINY, f"hydra.run.dir={tmp_path / name}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / name / "results.json").read_text())


def splat_files(stage_dir: Path) -> dict[str, bytes]:
    metrics = json.loads((stage_dir / "splat_metrics.json").read_text())
    metrics.pop("train_seconds")
    return {"point_cloud.ply": (stage_dir / "point_cloud.ply").read_bytes(),
            "splat_metrics.json": json.dumps(metrics, sort_keys=True).encode()}


def test_splat_stage_gives_the_same_bytes_with_or_without_upstream_stages_in_the_process(tmp_path):
    first = run_tiny(tmp_path, "first")
    assert not first["timings"]["sfm"]["reused"]
    splat_dir = Path(first["stage_dirs"]["splat"])
    built_after_sfm = splat_files(splat_dir)
    shutil.rmtree(splat_dir)

    second = run_tiny(tmp_path, "second")
    assert second["timings"]["sfm"]["reused"] and second["timings"]["localize"]["reused"]
    assert not second["timings"]["splat"]["reused"] and second["stage_dirs"]["splat"] == str(splat_dir)
    assert splat_files(splat_dir) == built_after_sfm
    assert second["splat"]["resumed"] is False
