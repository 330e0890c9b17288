"""The image score: one number per anomaly map, the higher the more likely the image is defective.

Two definitions, chosen by ``scorer.image_score.background_sigma``:

- ``null``: the map's maximum (the PAD / SplatPose recipe);
- ``sigma`` > 0: the map's largest excess over its local background, ``max(map - G * map)``, with ``G`` a
  Gaussian of ``sigma`` map pixels. A good view whose whole part differs a little from its render (a
  close view, a glossy rim) raises a map's floor smoothly; a small defect raises it locally. The maximum
  reads both; the excess reads the second, and also less of a broad defect (a stain, a colour shift, a
  dent). Measured (experiments/PROTOCOL.md, twenty-eighth decision; results/image_score_cpu_2026-12-07_s32.md):
  better on the tuning family, worse on the held-out one, so the default stays the maximum.

The background is a blur normalised over the map's region: pixels at or below 0 (zeroed by the scorer
outside the object region, or where query and render agree exactly; a class's normalisation keeps them
there) are not averaged in, so the edge of the region does not read as a peak. The score scales with the
map, so a class's min-max normalisation scales every image's score alike and keeps their order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms.v2.functional import gaussian_blur


def image_scores(maps: torch.Tensor | np.ndarray, background_sigma: float | None = None) -> torch.Tensor | np.ndarray:
    """[N, S, S] anomaly maps -> [N] image scores (the input's type: torch tensor or numpy array).

    ``background_sigma`` None: each map's maximum; > 0: each map's largest excess over its local
    background (module docstring), ``sigma`` in map pixels.
    """
    if isinstance(maps, np.ndarray):
        return image_scores(torch.from_numpy(maps), background_sigma).numpy()
    if maps.ndim != 3:
        raise ValueError(f"image_scores: maps must be [N, S, S], got {tuple(maps.shape)}")
    if background_sigma is None:
        return maps.flatten(1).amax(1)
    excess = maps - local_background(maps.float(), float(background_sigma)).to(maps.dtype)
    return excess.flatten(1).amax(1)


def local_background(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """[N, S, S] maps -> [N, S, S] Gaussian average (``sigma`` px) of each map over its positive pixels;
    the map itself where no positive pixel is near (no excess there)."""
    if sigma <= 0:
        raise ValueError(f"image score: background_sigma must be > 0, got {sigma}")
    # kernel of +-3 sigma, odd, and small enough for reflect padding on the map
    half = min(math.ceil(3 * sigma), min(maps.shape[-2:]) - 1)
    kernel = [2 * half + 1] * 2
    region = (maps > 0).to(maps.dtype)[:, None]
    weight = gaussian_blur(region, kernel, [sigma, sigma])
    blurred = gaussian_blur(maps[:, None] * region, kernel, [sigma, sigma])
    background = torch.where(weight > 1e-6, blurred / weight.clamp(min=1e-6), maps[:, None])
    return background[:, 0]
