"""Render-uncertainty-aware maps (``scorer.uncertainty``): each Gaussian's expected score is the mean of
the reference views' maps where it paints, it renders back at a new pose, and the scorer keeps only what
exceeds it."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from splatpose.config_checks import ConfigError, check_scorer_values

from splatpose.scoring.anomaly_maps import AnomalyScorer, discount_expected
from splatpose.scoring.uncertainty import expected_maps, gaussian_expected_scores
from splatpose.splat.gaussians import Gaussians

WIDTH = HEIGHT = 48
K = torch.tensor([[60.0, 0.0, 24.0], [0.0, 60.0, 24.0], [0.0, 0.0, 1.0]])


def two_blobs() -> Gaussians:
    """Two opaque Gaussians side by side (x = -0.4 and +0.4) in front of the cameras."""
    means = torch.tensor([[-0.4, 0.0, 0.0], [0.4, 0.0, 0.0]])
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2)
    return Gaussians(means=means, quats=quats, scales=torch.full((2, 3), math.log(0.15)),
                     opacities=torch.full((2,), 4.0), sh0=torch.zeros(2, 1, 3), shN=torch.zeros(2, 0, 3))


def camera(x: float, z: float = -3.0) -> torch.Tensor:
    """w2c [4, 4] of a camera at (x, 0, z) looking along +z (OpenCV axes)."""
    w2c = torch.eye(4)
    w2c[:3, 3] = -torch.tensor([x, 0.0, z])
    return w2c


def test_each_gaussian_gets_the_mean_map_where_it_paints_and_renders_it_back():
    gaussians = two_blobs()
    w2c = torch.stack([camera(0.0), camera(0.1)])
    # the reference views' maps: 2 on the left half of the image (the left blob), 0.5 on the right
    maps = torch.full((2, HEIGHT, WIDTH), 0.5)
    maps[:, :, : WIDTH // 2] = 2.0
    scores = gaussian_expected_scores(gaussians, w2c, K, maps, backend="torch")
    np.testing.assert_allclose(scores.numpy(), [2.0, 0.5], atol=0.05)

    at_new_pose = expected_maps(gaussians, scores, camera(-0.05)[None], K, WIDTH, HEIGHT, backend="torch")[0]
    left_blob, right_blob = at_new_pose[HEIGHT // 2, 10], at_new_pose[HEIGHT // 2, 38]
    assert abs(float(left_blob) - 2.0) < 0.1 and abs(float(right_blob) - 0.5) < 0.1
    assert float(at_new_pose[0, 0]) == 0.0, "nothing is expected where no splat covers the pixel"


def test_the_scorer_keeps_only_what_exceeds_the_expected_map():
    maps = torch.tensor([[[1.0, 3.0], [0.2, 5.0]]])
    expected = torch.tensor([[[2.0, 2.0], [0.0, 1.0]]])
    np.testing.assert_allclose(discount_expected(maps, expected, 1.0).numpy(), [[[0.0, 1.0], [0.2, 4.0]]], atol=1e-6)

    scorer = AnomalyScorer(backbone=None, size=16, blur_kernel_size=0, uncertainty_weight=1.0)
    query, render = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    plain = scorer(query, render)
    flat = torch.full((1, 16, 16), float(plain.mean()))
    discounted = scorer(query, render, expected=flat)
    torch.testing.assert_close(discounted, (plain - flat).clamp(min=0))
    scorer.uncertainty_weight = 0.0
    torch.testing.assert_close(scorer(query, render, expected=flat), plain, msg="weight 0: off")


def test_a_weight_that_is_not_positive_stops_the_run_first():
    scorer = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/scorer/efficientnet_lite0.yaml")
    check_scorer_values(scorer)
    scorer.uncertainty.enabled = True
    check_scorer_values(scorer)
    scorer.uncertainty.weight = 0
    with pytest.raises(ConfigError, match=r"scorer\.uncertainty\.weight=0 must be a positive"):
        check_scorer_values(scorer)


def test_a_run_scored_with_uncertainty_is_scored_the_same_way_by_the_detector(tiny_run, tmp_path):
    """The tiny run rescored with ``scorer.uncertainty`` (every stage reused): its image scores move, the
    detector gives the evaluation's scores image by image, and without its expected scores the run folder
    is refused by name."""
    import csv
    import shutil
    import subprocess
    import sys

    from conftest import ROOT, TINY_RUN_OVERRIDES
    from splatpose.detect.detector import Detector
    from splatpose.detect.finished_run import RunFolderError, load_finished_run

    plain_dir, _ = tiny_run
    plain = json.loads((plain_dir / "results.json").read_text())
    out_dir = tmp_path / "uncertain"
    proc = subprocess.run([sys.executable, "run.py", *TINY_RUN_OVERRIDES, "logger=none", "scorer.uncertainty.enabled=true",
                           f"paths.cache_dir={plain['config']['paths']['cache_dir']}", f"hydra.run.dir={out_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out_dir / "results.json").read_text())
    assert results["timings"]["splat"]["reused"] and "expected_scores" in results["artifacts"]

    def scores(run_dir):
        with open(run_dir / "per_image.csv") as handle:
            return {row["name"]: float(row["score"]) for row in csv.DictReader(handle)}

    rescored, before = scores(out_dir), scores(plain_dir)
    assert any(abs(rescored[name] - before[name]) > 1e-3 for name in before), "the expected maps change nothing"
    detector = Detector.from_run(out_dir, {"matching": "sequential", "warm_up": False}, device="cpu")
    data_root = Path(results["config"]["dataset"]["root"])
    for name, score in rescored.items():
        image = next(data_root.glob(f"*/{results['class']}/{name}"))
        assert detector.detect(image, name).score == pytest.approx(score, abs=1e-4), name

    shutil.copytree(out_dir, tmp_path / "copy")
    (tmp_path / "copy" / results["artifacts"]["expected_scores"]).unlink()
    with pytest.raises(RunFolderError, match="scorer.uncertainty.*expected scores"):
        load_finished_run(tmp_path / "copy")
