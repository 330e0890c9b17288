"""A small generated class run end to end by ``python run.py``, with splats trained well enough to render a
usable object: 128 px, 32 train views, 4 good and 2 per defect test images, 300 splat steps (a few minutes
on 2 cores). Used by the slow tests that need a trained scene rather than the tiny run's 30-step one."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SMALL_TRAINED_OVERRIDES = ["logger=none", "device=cpu", "dataset.generator.width=128", "dataset.generator.height=128",
                           "dataset.generator.n_train=32", "dataset.generator.n_test_good=4",
                           "dataset.generator.n_test_per_defect=2", "splat.steps=300", "splat.checkpoint_every=300",
                           "splat.sh_degree_interval=75", "splat.strategy.refine_start_iter=50",
                           "splat.strategy.refine_stop_iter=250", "splat.strategy.refine_every=50",
                           "splat.eval.every_n_steps=300"]


def run_small_class(class_name: str, tmp_path: Path) -> dict:
    """Run ``class_name`` of the built-in family at the sizes above, its stage cache under ``tmp_path``;
    returns its results.json (the run folder is ``tmp_path / "run"``)."""
    out_dir = tmp_path / "run"
    env = {**os.environ, "SPLATPOSE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "run.py", f"class={class_name}", *SMALL_TRAINED_OVERRIDES,
                           f"hydra.run.dir={out_dir}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((out_dir / "results.json").read_text())
