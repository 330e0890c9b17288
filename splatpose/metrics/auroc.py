"""Exact ROC AUC for pixel and image anomaly scores (numpy, CPU).

The AUC is the Mann-Whitney statistic: the probability that a random positive scores above a random
negative, ties counting one half. That is exactly the trapezoidal area under the ROC curve with every
distinct score as a threshold (what ``sklearn.metrics.roc_auc_score`` returns), but needs only one
sort of the negatives and a binary search per positive, so 15 M pixels take about a second. Scores
are used as they are: no sigmoid, no binning.
"""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (any shape, same size).

    Returns None when the AUC is undefined (no positive or no negative sample).
    """
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"auroc: {scores.size} scores but {labels.size} labels")
    if scores.size and np.isnan(scores).any():
        raise ValueError("auroc: scores contain NaN (check the anomaly maps)")
    labels = labels.astype(bool)
    positives, negatives = scores[labels], scores[~labels]
    if positives.size == 0 or negatives.size == 0:
        return None
    negatives = np.sort(negatives)
    below = np.searchsorted(negatives, positives, side="left").sum(dtype=np.int64)
    below_or_tied = np.searchsorted(negatives, positives, side="right").sum(dtype=np.int64)
    # below + tied / 2 = (below + below_or_tied) / 2, kept in integers until the final division.
    return float((below + below_or_tied) / (2.0 * positives.size * negatives.size))


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float | None:
    """Pixel AUROC over every pixel of every image.

    Args:
        maps: [N, H, W] anomaly maps (any real scale; only the order matters).
        masks: [N, H, W] bool ground truth (True = defect).
    Returns: the AUC, or None when no pixel (or every pixel) is a defect.
    """
    maps, masks = np.asarray(maps), np.asarray(masks)
    if maps.shape != masks.shape:
        raise ValueError(f"pixel_auroc: maps {maps.shape} and masks {masks.shape} differ in shape; "
                         "resize the masks to the map resolution (nearest) first")
    return auroc(maps, masks)


def image_scores(maps: np.ndarray, top_fraction: float = 0.0) -> np.ndarray:
    """[N, H, W] maps -> [N] image anomaly scores: the maximum of each map (``top_fraction`` 0), or the
    mean of its highest ``top_fraction`` of pixels (at least one), which a single hot pixel moves less."""
    flat = np.asarray(maps).reshape(len(maps), -1)
    if top_fraction <= 0:
        return flat.max(axis=1)
    k = max(1, round(top_fraction * flat.shape[1]))
    return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(axis=1)


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Image AUROC of [N] scores (e.g. :func:`image_scores`) for [N] labels (1 = defective).

    Returns None when only one label is present (e.g. a test set without defective images).
    """
    return auroc(scores, labels)
