"""Metrics: AUPRO against a slow implementation written from the definition and hand-derived toy
cases; AUROC against scikit-learn; undefined metrics reported as None."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from splatpose.metrics import aupro, evaluate, image_auroc, image_scores, normalise_maps, pixel_auroc


def slow_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """AUPRO straight from the definition: one pass over all pixels per distinct threshold."""
    regions = []  # (image index, region mask)
    for i, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labels == r) for r in range(1, count + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        fprs.append(predicted[normal].sum() / normal.sum())
        pros.append(np.mean([predicted[i][region].mean() for i, region in regions]))
    # Area of the part of each segment that lies in [0, limit].
    area = 0.0
    for f0, f1, p0, p1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:]):
        if f0 >= limit:
            break
        if f1 <= limit:
            area += (f1 - f0) * (p0 + p1) / 2
        else:
            p_limit = p0 + (p1 - p0) * (limit - f0) / (f1 - f0)
            area += (limit - f0) * (p0 + p_limit) / 2
    return area / limit


def random_masks(rng: np.random.Generator, n: int, size: int, num_good: int) -> np.ndarray:
    """Masks with several regions each: rectangles plus scattered pixels (many touch only diagonally)."""
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(num_good, n):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 4, 2)
            h, w = rng.integers(1, 8, 2)
            masks[i, y:y + h, x:x + w] = True
        masks[i] |= rng.random((size, size)) < 0.03
    return masks


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_slow_definition_with_ties(seed, limit):
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, n=6, size=24, num_good=2)
    # Quantised scores: many ties, also between defect and normal pixels.
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 2).astype(np.float32)
    assert len(np.unique(maps)) < maps.size / 10
    assert aupro(maps, masks, limit) == pytest.approx(slow_aupro(maps, masks, limit), abs=1e-6)


def test_aupro_matches_slow_definition_without_ties():
    rng = np.random.default_rng(7)
    masks = random_masks(rng, n=4, size=20, num_good=1)
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    assert aupro(maps, masks) == pytest.approx(slow_aupro(maps, masks, 0.3), abs=1e-6)


def test_aupro_toy_eight_connectivity_and_ties():
    # One 3x4 image. Region A = the diagonal pair (0,0),(1,1): one region under 8-connectivity.
    # Region B = (0,3). 9 normal pixels, so FPR moves in steps of 1/9.
    mask = np.zeros((3, 4), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[0, 3] = True
    scores = np.full((3, 4), 0.1)
    scores[0, 0], scores[1, 1], scores[0, 3] = 0.9, 0.5, 0.7  # A: 0.9 and 0.5, B: 0.7
    scores[2, 0], scores[2, 1], scores[2, 2] = 0.8, 0.7, 0.6  # normal pixels; 0.7 ties with B
    # Thresholds (score >= t):
    #   t=0.9: FPR 0,   PRO mean(1/2, 0) = 0.25
    #   t=0.8: FPR 1/9, PRO 0.25
    #   t=0.7: FPR 2/9, PRO mean(1/2, 1) = 0.75   (B and the tied normal pixel enter together)
    #   t=0.6: FPR 3/9 > 0.3, PRO 0.75
    # Area to 0.3: 0.25*(1/9) + (0.25+0.75)/2*(1/9) + 0.75*(0.3-2/9) = 5.1/36; / 0.3 = 17/36.
    assert aupro(scores[None], mask[None], 0.3) == pytest.approx(17 / 36, abs=1e-12)


def test_aupro_toy_interpolation_at_the_limit():
    # Five pixels, scores 5,3,3,2,1; the second (score 3) is the only defect, tied with a normal pixel.
    # 4 normal pixels: t=5 -> (FPR 0.25, PRO 0); t=3 -> (0.5, 1).
    # PRO at FPR 0.3 on the segment (0.25,0)-(0.5,1): 0.2. Area: 0.05 * (0 + 0.2) / 2 = 0.005.
    # AUPRO = 0.005 / 0.3 = 1/60.
    scores = np.array([[[5.0, 3.0, 3.0, 2.0, 1.0]]])
    mask = np.array([[[False, True, False, False, False]]])
    assert aupro(scores, mask, 0.3) == pytest.approx(1 / 60, abs=1e-12)
    # Pixel AUROC: the defect beats 2 and 1, ties 3, loses to 5: (2 + 0.5) / 4.
    assert pixel_auroc(scores, mask) == pytest.approx(0.625)


def test_aupro_of_constant_and_perfect_maps():
    rng = np.random.default_rng(3)
    masks = random_masks(rng, n=4, size=16, num_good=1)
    # Constant map: a single curve point (1, 1); PRO(0.3) = 0.3, area 0.3*0.3/2, normalised 0.15.
    assert aupro(np.ones(masks.shape), masks) == pytest.approx(0.15)
    # Defects strictly above all normal pixels: PRO reaches 1 at FPR 0.
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0)


def test_aupro_undefined_without_defects():
    maps = np.random.default_rng(0).random((3, 8, 8))
    assert aupro(maps, np.zeros(maps.shape, dtype=bool)) is None
    assert pixel_auroc(maps, np.zeros(maps.shape, dtype=bool)) is None


def test_aupro_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="resize the masks"):
        aupro(np.zeros((2, 8, 8)), np.zeros((2, 16, 16), dtype=bool))


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, n=10, size=32, num_good=3)
    maps = np.round(rng.random(masks.shape) + 0.3 * masks, 2).astype(np.float32)  # with ties
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


def test_image_auroc_matches_sklearn_and_is_none_with_one_label():
    rng = np.random.default_rng(4)
    scores = np.round(rng.random(40), 1)
    labels = rng.integers(0, 2, 40)
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(scores, np.zeros(40)) is None
    assert image_auroc(scores, np.ones(40)) is None


def test_evaluate_per_defect_type():
    rng = np.random.default_rng(5)
    defects = ["good"] * 4 + ["Burrs"] * 3 + ["Missing"] * 3 + ["Stains"] * 2
    masks = random_masks(rng, n=len(defects), size=24, num_good=4)
    maps = rng.random(masks.shape) + 0.8 * masks
    maps[np.array(defects) == "Stains"] = rng.random((2, 24, 24))  # Stains missed entirely
    labels = np.array([d != "good" for d in defects])
    result = evaluate(maps, masks, labels, defects)

    assert set(result["per_defect"]) == {"Burrs", "Missing", "Stains"}
    for key in ("pixel_auroc", "aupro", "image_auroc"):
        assert type(result[key]) is float
    burrs = np.array([d in ("good", "Burrs") for d in defects])
    assert result["per_defect"]["Burrs"]["aupro"] == pytest.approx(aupro(maps[burrs], masks[burrs]))
    assert result["per_defect"]["Burrs"]["pixel_auroc"] > 0.9
    assert result["per_defect"]["Stains"]["pixel_auroc"] < 0.8


def test_evaluate_without_defective_images_reports_undefined():
    maps = np.random.default_rng(6).random((3, 16, 16))
    result = evaluate(maps, np.zeros(maps.shape, dtype=bool), np.zeros(3), ["good"] * 3)
    assert result == {"pixel_auroc": None, "aupro": None, "image_auroc": None, "per_defect": {},
                      "image_auroc_by_top_fraction": {"0.0": None, "0.001": None, "0.01": None, "0.05": None}}


def test_evaluate_rejects_labels_that_contradict_defects():
    with pytest.raises(ValueError, match="labels disagree"):
        evaluate(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool), np.array([0, 0]), ["good", "Burrs"])


def test_normalise_maps_is_class_min_max():
    maps = np.array([[[2.0, 4.0]], [[6.0, 10.0]]], dtype=np.float32)
    assert np.allclose(normalise_maps(maps), [[[0.0, 0.25]], [[0.5, 1.0]]])
    assert normalise_maps(maps).dtype == np.float32
    # A detector reuses the class range on new maps.
    assert np.allclose(normalise_maps(np.array([12.0]), lo=2.0, hi=10.0), [1.25])
    assert torch.allclose(normalise_maps(torch.tensor([2.0, 10.0])), torch.tensor([0.0, 1.0]))
    assert not normalise_maps(np.full((2, 3, 3), 5.0)).any()


def test_image_score_is_the_maximum_or_the_mean_of_the_top_fraction():
    """A map with one hot pixel scores high by its maximum; by the top-1 % mean (4 of 400 pixels) a
    map with a 2x2 hot region outranks it, which is what the top-fraction score is for."""
    lone = np.zeros((20, 20))
    lone[3, 3] = 1.0
    region = np.zeros((20, 20))
    region[10:12, 10:12] = 0.6
    maps = np.stack([lone, region])
    np.testing.assert_allclose(image_scores(maps), [1.0, 0.6])
    np.testing.assert_allclose(image_scores(maps, top_fraction=0.01), [0.25, 0.6])
    metrics = evaluate(maps, np.zeros((2, 20, 20), bool) | (region > 0), np.array([0, 1]), ["good", "Burrs"])
    assert metrics["image_auroc"] == 0.0 and metrics["image_auroc_by_top_fraction"]["0.01"] == 1.0
