"""AUPRO: area under the per-region-overlap curve up to a false-positive-rate limit (MVTec AD definition).

Definition (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021):

* Defect regions are the 8-connected components of each ground-truth mask.
* For a threshold t, a pixel is predicted defective when its score is >= t.
  FPR(t) = predicted pixels among all non-defect pixels of all images (good images included);
  PRO(t) = mean over all regions of the fraction of the region predicted (every region weighs the
  same, whatever its size).
* Every distinct score is a threshold; pixels of equal score enter the prediction together. From
  t = +inf (the point (0, 0)) down, this traces PRO as a function of FPR.
* AUPRO = (area under PRO(FPR) for FPR in [0, limit], trapezoidal, PRO at the limit interpolated
  linearly between the neighbouring curve points) / limit, so it lies in [0, 1]; a constant map
  scores limit / 2.

Exact and fast: all pixels are sorted by score once (only those that can matter: scores at or above
the highest threshold whose FPR exceeds the limit), and FPR and PRO are cumulative sums over that
order, read off at the last pixel of each group of equal scores.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# 8-connectivity inside each image and none across images of the stack.
_EIGHT_CONNECTED_2D = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_2D[1] = True


def label_defect_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected defect regions of each mask.

    Args:
        masks: [N, H, W] bool.
    Returns:
        labels: [N, H, W] int32, 0 outside defects, 1..R a region id unique over the whole stack;
        R: the number of regions.
    """
    labels, count = ndimage.label(np.asarray(masks, dtype=bool), structure=_EIGHT_CONNECTED_2D)
    return labels, int(count)


def pro_curve(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 1.0
              ) -> tuple[np.ndarray, np.ndarray] | None:
    """The PRO curve from (0, 0) to the first point whose FPR exceeds ``fpr_limit``.

    Args:
        maps: [N, H, W] anomaly scores; masks: [N, H, W] bool ground truth.
        fpr_limit: the curve is cut after its first point beyond this FPR (1.0: the whole curve).
    Returns:
        (fpr [M], pro [M]) in order of decreasing threshold (fpr non-decreasing), starting at (0, 0);
        None when the curve is undefined (no defect region, or no defect-free pixel).
    """
    maps, masks = np.asarray(maps), np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"aupro: maps {maps.shape} and masks {masks.shape} must both be [N, H, W]; "
                         "resize the masks to the map resolution (nearest) first")
    if np.isnan(maps).any():
        raise ValueError("aupro: maps contain NaN (check the anomaly maps)")
    regions, num_regions = label_defect_regions(masks)
    normal = ~masks.ravel()
    num_normal = int(normal.sum())
    if num_regions == 0 or num_normal == 0:
        return None

    scores = maps.ravel()
    cut = _lowest_needed_threshold(scores[normal], fpr_limit)
    if cut is not None:
        keep = scores >= cut
        scores, normal, region_ids = scores[keep], normal[keep], regions.ravel()[keep]
    else:
        region_ids = regions.ravel()

    # Each pixel of region r adds 1 / (R * |r|) to PRO once it is predicted; normal pixels add to FPR.
    region_sizes = np.bincount(regions.ravel(), minlength=num_regions + 1)
    pro_weight = np.zeros(num_regions + 1)
    pro_weight[1:] = 1.0 / (num_regions * region_sizes[1:])

    order = np.argsort(scores)[::-1]  # decreasing score; order inside ties does not matter
    sorted_scores = scores[order]
    false_positives = np.cumsum(normal[order], dtype=np.int64)
    overlap = np.cumsum(pro_weight[region_ids[order]])
    # Last pixel of each group of equal scores: the curve only has points between groups.
    group_ends = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    fpr = np.concatenate([[0.0], false_positives[group_ends] / num_normal])
    pro = np.concatenate([[0.0], overlap[group_ends]])
    return fpr, pro


def _lowest_needed_threshold(normal_scores: np.ndarray, fpr_limit: float) -> float | None:
    """The highest threshold whose FPR exceeds ``fpr_limit``: the curve below it is never integrated.

    With n normal pixels and k the largest count with k / n <= limit, that threshold is the
    (k+1)-th largest normal score. None when no threshold exceeds the limit (limit >= 1).
    """
    n = normal_scores.size
    k = int(np.floor(fpr_limit * n))
    # Make k / n <= limit < (k + 1) / n hold in the same floating-point arithmetic used for the FPRs.
    while k > 0 and k / n > fpr_limit:
        k -= 1
    while k < n and (k + 1) / n <= fpr_limit:
        k += 1
    if k >= n:
        return None
    return np.partition(normal_scores, n - k - 1)[n - k - 1]


def area_up_to(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoidal area under pro(fpr) for fpr in [0, limit], pro at the limit interpolated.

    ``fpr`` must be non-decreasing and start at 0. When the curve ends before the limit, the area
    stops where the curve does.
    """
    inside = int(np.searchsorted(fpr, limit, side="right"))  # points with fpr <= limit
    area = float(np.sum(np.diff(fpr[:inside]) * (pro[1:inside] + pro[:inside - 1]) / 2.0))
    if inside < len(fpr):
        f0, f1, p0, p1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        pro_at_limit = p0 + (limit - f0) * (p1 - p0) / (f1 - f0)
        area += float((limit - f0) * (p0 + pro_at_limit) / 2.0)
    return area


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float | None:
    """Normalised area under the PRO curve up to ``fpr_limit`` (see the module docstring).

    Args:
        maps: [N, H, W] anomaly maps (raw or normalised: only the order of scores matters).
        masks: [N, H, W] bool ground truth at map resolution (all False for good images).
        fpr_limit: integration limit in (0, 1] (0.3 in the MVTec and MAD benchmarks).
    Returns:
        AUPRO in [0, 1], or None when undefined (no defect region, or no defect-free pixel).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"aupro: fpr_limit must lie in (0, 1]; got {fpr_limit}")
    curve = pro_curve(maps, masks, fpr_limit)
    if curve is None:
        return None
    fpr, pro = curve
    return float(area_up_to(fpr, pro, fpr_limit) / fpr_limit)
