"""All benchmark metrics of one class, overall and per defect type, as plain floats (None = undefined)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from splatpose.metrics.aupro import aupro
from splatpose.metrics.auroc import image_auroc, image_scores, pixel_auroc

GOOD = "good"


def normalise_maps(maps, lo: float | None = None, hi: float | None = None):
    """Class-level min-max normalisation: (maps - lo) / (hi - lo).

    Args:
        maps: [N, H, W] raw maps (numpy array or torch tensor; the type is kept).
        lo, hi: the range to map onto [0, 1]; None takes the min / max of ``maps``. A detector scoring
            new images passes the (lo, hi) of its class's test maps, so values may leave [0, 1].
    Returns: the normalised maps; all zeros when hi <= lo (constant maps carry no ranking anyway).
    The mapping is monotone, so AUROC and AUPRO are the same before and after it (up to float32
    rounding merging nearly equal scores).
    """
    lo = float(maps.min()) if lo is None else float(lo)
    hi = float(maps.max()) if hi is None else float(hi)
    if hi <= lo:
        return maps * 0
    return (maps - lo) / (hi - lo)


# image-score variants evaluate() records beside the configured score: each map's maximum (0) and the mean
# of its top 0.1 %, 1 %, 5 % of pixels
IMAGE_SCORE_TOP_FRACTIONS = (0.0, 0.001, 0.01, 0.05)


def evaluate(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, defects: Sequence[str],
             fpr_limit: float = 0.3, scores: np.ndarray | None = None) -> dict:
    """Pixel AUROC, AUPRO and image AUROC of one class, overall and for each defect type against good.

    Args:
        maps: [N, H, W] anomaly maps (normalised or raw).
        masks: [N, H, W] bool ground truth at map resolution.
        labels: [N] 1 for a defective image, 0 for a good one (must agree with ``defects``).
        defects: [N] defect type per image: "good" or a defect folder name ("Burrs", "Missing", ...).
        fpr_limit: AUPRO integration limit.
        scores: [N] image scores (the scorer's, :meth:`AnomalyScorer.image_scores`); None: each map's maximum.
    Returns:
        {"pixel_auroc": float | None, "aupro": float | None, "image_auroc": float | None (of ``scores``),
         "image_auroc_by_top_fraction": {"0.0": ..., "0.001": ..., "0.01": ..., "0.05": ...} (image AUROC of
         each map's maximum and of the mean of its top fraction of pixels, to compare with ``scores``'),
         "per_defect": {"Burrs": {"pixel_auroc": ..., "aupro": ..., "image_auroc": ...}, ...}}
        with one per_defect entry per defect type present (sorted by name); each compares the images
        of that type with all good images. None marks an undefined metric (e.g. image AUROC of a
        test set without defective images).
    """
    maps, masks = np.asarray(maps), np.asarray(masks, dtype=bool)
    labels = np.asarray(labels).astype(np.int64).ravel()
    defects = np.asarray(list(defects), dtype=object)
    if not (len(maps) == len(masks) == len(labels) == len(defects)):
        raise ValueError(f"evaluate: {len(maps)} maps, {len(masks)} masks, {len(labels)} labels and "
                         f"{len(defects)} defect names: need one of each per image")
    if not np.array_equal(labels, (defects != GOOD).astype(np.int64)):
        raise ValueError("evaluate: labels disagree with defect names (label must be 1 exactly when "
                         f"the defect is not '{GOOD}')")
    scores = image_scores(maps) if scores is None else np.asarray(scores, dtype=np.float64).ravel()
    if len(scores) != len(maps):
        raise ValueError(f"evaluate: {len(scores)} image scores for {len(maps)} maps")

    def metrics_of(subset: np.ndarray) -> dict:
        return {"pixel_auroc": pixel_auroc(maps[subset], masks[subset]),
                "aupro": aupro(maps[subset], masks[subset], fpr_limit),
                "image_auroc": image_auroc(scores[subset], labels[subset])}

    results = metrics_of(np.ones(len(maps), dtype=bool))
    # the image score's alternatives, recorded to compare
    results["image_auroc_by_top_fraction"] = {str(q): image_auroc(image_scores(maps, q), labels)
                                              for q in IMAGE_SCORE_TOP_FRACTIONS}
    good = defects == GOOD
    results["per_defect"] = {str(d): metrics_of(good | (defects == d))
                             for d in sorted(set(defects.tolist()) - {GOOD})}
    return results
