"""Render-uncertainty-aware maps: what the scorer shows on the splats' own reference views is expected at
a query too, and taken off its map (``scorer.uncertainty``).

Where the splats do not reproduce the part (thin legs, fine texture, shine, a badly covered side) the
scorer fires on good images as well as on defective ones. Each Gaussian carries the mean of the scorer's
map over the reference-view pixels it paints, weighted by how much it paints them; rendered at a query's
pose, these means give the map a good image is expected to have there, and the query's map keeps only
what exceeds ``weight`` times it (``anomaly_maps.discount_expected``).

The weighted means come from one backward pass of the rasterizer per view: a render of per-Gaussian
values ``v`` is ``I(p) = sum_i w_i(p) v_i`` (``w_i(p)``: Gaussian i's opacity times the transmittance in
front of it), so the gradient of ``sum_p r(p) I(p)`` with respect to ``v_i`` is ``sum_p r(p) w_i(p)`` and
with ``r = 1`` it is the Gaussian's total weight ``sum_p w_i(p)``; two channels give both at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from splatpose.splat.gaussians import Gaussians
from splatpose.splat.rendering import activated, rasterize

# Pixels the splats cover less than this carry no expectation (their ratio of two small sums is noise).
MIN_COVERAGE = 0.05


def render_values(gaussians: Gaussians, values: Tensor, w2c: Tensor, K: Tensor, width: int, height: int,
                  backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-Gaussian values [N, D] composited like colours, on a zero background, from one camera
    (w2c [4, 4], OpenCV axes; K [3, 3]). Returns image [H, W, D] and alpha [H, W] (differentiable in
    ``values``)."""
    image, alpha, _ = rasterize(*activated(gaussians), values, w2c[None], K[None], width, height, backend=backend,
                                backgrounds=values.new_zeros(1, values.shape[1]))
    return image[0], alpha[0, ..., 0]


def gaussian_expected_scores(gaussians: Gaussians, w2c: Tensor, K: Tensor, maps: Tensor,
                             backend: str = "auto") -> Tensor:
    """Each Gaussian's weighted mean of ``maps`` over the views it is seen in.

    Args:
        gaussians: the splats; w2c [V, 4, 4] the views' poses; K [3, 3];
        maps [V, H, W]: the scorer's maps of those views (at the image size H x W).
    Returns:
        [N] float32, 0 for a Gaussian no view sees.
    """
    n, (height, width) = len(gaussians), maps.shape[-2:]
    gaussians = gaussians.detach()
    weighted, total = torch.zeros(n, device=maps.device), torch.zeros(n, device=maps.device)
    for view in range(len(w2c)):
        values = torch.zeros(n, 2, device=gaussians.means.device, dtype=gaussians.means.dtype, requires_grad=True)
        image, _ = render_values(gaussians, values, w2c[view], K, width, height, backend)
        r = maps[view].to(image)
        (grad,) = torch.autograd.grad((image[..., 0] * r + image[..., 1]).sum(), values)
        weighted += grad[:, 0].float()
        total += grad[:, 1].float()
    return torch.where(total > 1e-6, weighted / total.clamp(min=1e-6), torch.zeros_like(total))


def expected_maps(gaussians: Gaussians, expected: Tensor, w2c: Tensor, K: Tensor, width: int, height: int,
                  backend: str = "auto") -> Tensor:
    """[B, H, W]: at each pose (w2c [B, 4, 4]) the coverage-weighted mean of the Gaussians' expected
    scores (``gaussian_expected_scores``) at every pixel; 0 where the splats cover less than MIN_COVERAGE."""
    values = expected.to(gaussians.means)[:, None]
    out = []
    with torch.no_grad():
        for pose in w2c:
            image, alpha = render_values(gaussians, values, pose.to(gaussians.means), K.to(gaussians.means),
                                         width, height, backend)
            out.append(torch.where(alpha > MIN_COVERAGE, image[..., 0] / alpha.clamp(min=MIN_COVERAGE), 0.0))
    return torch.stack(out).float()


def upsampled(maps: Tensor, height: int, width: int) -> Tensor:
    """Scorer maps [V, S, S] -> [V, H, W] (bilinear), for ``gaussian_expected_scores``."""
    return F.interpolate(maps[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
