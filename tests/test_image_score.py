"""The image score over the map's local background (scorer.image_score.background_sigma)."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from splatpose.config_checks import ConfigError, check_scorer_values
from splatpose.metrics import evaluate
from splatpose.scoring.anomaly_maps import AnomalyScorer, build_scorer
from splatpose.scoring.image_score import image_scores

SIZE = 96


def bump(centre: tuple[float, float], sigma: float, height: float) -> np.ndarray:
    """[SIZE, SIZE] Gaussian bump of ``height`` at ``centre`` (row, column)."""
    rows, cols = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    return height * np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * sigma**2))


def test_a_small_defect_outscores_a_good_view_whose_whole_part_differs_a_little():
    """A good view with a broad raised floor (height 1.0) has the larger maximum; a defective view with a low
    floor and a small peak (0.8 over 0.3) wins once the score is the excess over the local background."""
    good = 0.05 + bump((48, 48), 20, 1.0)
    defective = 0.05 + bump((48, 48), 20, 0.3) + bump((30, 60), 2, 0.5)
    maps = np.stack([good, defective]).astype(np.float32)
    by_max = image_scores(maps, None)
    by_excess = image_scores(maps, 8.0)
    assert by_max[0] > by_max[1]
    assert by_excess[1] > 2 * by_excess[0]
    labels = np.array([0, 1])
    metrics = evaluate(maps, np.zeros(maps.shape, bool), labels, ["good", "Burrs"], scores=by_excess)
    assert metrics["image_auroc"] == 1.0
    assert metrics["image_auroc_by_top_fraction"]["0.0"] == 0.0  # the maximum's, recorded beside it


def test_the_edge_of_a_zeroed_object_region_is_not_a_peak():
    """A map the scorer zeroed outside the object region, flat inside it: no excess anywhere (a blur that
    averaged the zeros in would read half the flat level at the region's edge)."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    inside = (rows - 48) ** 2 + (cols - 48) ** 2 < 30**2
    flat = np.where(inside, 0.6, 0.0).astype(np.float32)
    assert image_scores(flat[None], 8.0)[0] == pytest.approx(0.0, abs=1e-5)
    dented = flat + bump((48, 70), 2, 0.3).astype(np.float32) * inside
    assert image_scores(dented[None], 8.0)[0] > 0.2


def test_the_score_scales_with_the_map_and_torch_and_numpy_agree():
    """A class's normalisation scales every map alike, so it must scale every score alike."""
    maps = np.stack([0.1 + bump((40, 50), 3, 0.7), 0.2 + bump((20, 20), 6, 0.4)]).astype(np.float32)
    scores = image_scores(maps, 8.0)
    np.testing.assert_allclose(image_scores(3 * maps, 8.0), 3 * scores, rtol=1e-5)
    np.testing.assert_allclose(image_scores(torch.from_numpy(maps), 8.0).numpy(), scores, rtol=1e-6)
    np.testing.assert_allclose(image_scores(maps, None), maps.reshape(2, -1).max(1))


def test_the_scorer_reads_its_image_score_from_the_config_and_checks_it():
    cfg = OmegaConf.create({"timm_model": None, "size": 32, "batch_size": 1, "mean": [0.5] * 3, "std": [0.5] * 3,
                            "image_score": {"background_sigma": 8.0}})
    assert build_scorer(cfg).background_sigma == 8.0
    check_scorer_values(cfg)
    cfg.image_score.background_sigma = None
    assert build_scorer(cfg).background_sigma is None  # the map's maximum
    check_scorer_values(cfg)
    del cfg["image_score"]  # a run made before the setting: the maximum, as it was scored
    assert build_scorer(cfg).background_sigma is None
    cfg.image_score = {"background_sigma": 0}
    with pytest.raises(ConfigError, match="scorer.image_score.background_sigma=0 must be a positive"):
        check_scorer_values(cfg)
    scorer = AnomalyScorer(backbone=None, size=32, blur_kernel_size=0, background_sigma=4.0)
    maps = torch.rand(3, 32, 32)
    torch.testing.assert_close(scorer.image_scores(maps), image_scores(maps, 4.0))
