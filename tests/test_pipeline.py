"""The end-to-end run as a user starts it: `python run.py`, then a rerun with another scorer.

Both runs use debug=fast (128 px generated images, few views and steps) so the chain is real but
short; the second run must reuse every stage but scoring from the stage cache.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run_cli(tmp_path: Path, name: str, *overrides: str) -> tuple[Path, str]:
    out_dir = tmp_path / name
    env = {**os.environ, "SPLATPOSE_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "run.py", "debug=fast", f"hydra.run.dir={out_dir}", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out_dir, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    return run_cli(tmp_path_factory.mktemp("pipeline"), "first")


def test_run_writes_results_panels_and_wandb(first_run):
    out_dir, log = first_run
    results = json.loads((out_dir / "results.json").read_text())
    for key in ("pixel_auroc", "aupro", "image_auroc"):
        assert key in results["metrics"]
    assert set(results["timings"]) >= {"data", "sfm", "localize", "splat", "refine", "render", "score", "total"}
    assert results["localization"]["num_queries"] == len(list((out_dir / "panels").rglob("*.png")))
    assert (out_dir / "per_image.csv").read_text().count("\n") == results["localization"]["num_queries"] + 1
    assert f"Outputs: {out_dir.resolve()}" in log
    offline_runs = list((out_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("*.wandb")), "the offline run holds no logged data"
    assert list(offline_runs[0].rglob("media/images/*.png")), "no panels were logged to W&B"


def test_scorer_change_reuses_sfm_and_splats(first_run):
    out_dir, _ = first_run
    second, log = run_cli(out_dir.parent, "second", "scorer=pixel", "logger=csv")
    timings = json.loads((second / "results.json").read_text())["timings"]
    for stage in ("sfm", "localize", "splat", "refine", "render"):
        assert timings[stage]["reused"], f"{stage} was recomputed although only the scorer changed"
        assert f"[{stage}] reusing cached result" in log
    first_total = json.loads((out_dir / "results.json").read_text())["timings"]["total"]["seconds"]
    assert timings["total"]["seconds"] < 0.5 * first_total


def test_console_is_quiet_and_results_hold_the_splats_quality(first_run):
    out_dir, log = first_run
    # glog's own format: severity letter, date (YYYYMMDD in pycolmap 4), time
    assert not re.search(r"^[IWEF]\d{8} ", log, re.MULTILINE), "COLMAP/glog lines reached the console"
    assert "💡 Tip" not in log and "LeafSpec" not in log
    assert "findfont" not in log, "matplotlib's font-cache warnings printed (they bite on a machine's first run)"
    assert "TPU available" not in log and "limit_val_batches" not in log, "Lightning's unactionable lines printed"
    assert "anonymous setting" not in log, "wandb's warning about an argument Lightning passes printed"
    assert "wandb: Run summary" not in log and "wandb: Tracking run" not in log, "W&B's banner and summary printed"
    info_lines = [line.split("] - ", 1)[1] for line in log.splitlines() if "][INFO] - " in line]
    bare_info = [line.removeprefix("INFO: ") for line in log.splitlines() if line.startswith("INFO: ")]
    assert not set(info_lines) & set(bare_info), "Lightning's lines came twice (its handler and Hydra's)"
    splat = json.loads((out_dir / "results.json").read_text())["splat"]
    assert splat["psnr"] > 10 and 0 < splat["ssim"] <= 1 and splat["num_gaussians"] > 0


def test_the_detector_asks_second_opinions_against_the_runs_usual_colour_difference(first_run, tmp_path):
    """The refine stage records the class's usual colour difference (None when fewer than five queries line
    up, as with this run's rough splats); a detector loaded from a run asks its second opinions against the
    value the run recorded (without it, a doubtful PnP pose would go unchecked online)."""
    import shutil

    from splatpose.detect.detector import Detector

    out_dir, _ = first_run
    results = json.loads((out_dir / "results.json").read_text())
    assert "typical_l1" in results["final_poses"]
    assert set(results["final_poses"]["second_opinions"]) == {"asked", "replaced"}
    # the same run as a class whose queries lined up would have recorded it
    run_dir = tmp_path / "run"
    shutil.copytree(out_dir, run_dir, symlinks=True, ignore=shutil.ignore_patterns("wandb", "panels"))
    results["final_poses"]["typical_l1"] = 0.0123
    (run_dir / "results.json").write_text(json.dumps(results))
    detector = Detector.from_run(run_dir, {"matching": "sequential", "warm_up": False}, device="cpu")
    assert detector.settler is not None and detector.settler.typical_l1 == pytest.approx(0.0123)
