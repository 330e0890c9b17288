"""Image losses and metrics of 3DGS training: L1 + D-SSIM, and PSNR.

SSIM here is the standard one (Wang et al. 2004: 11-tap Gaussian window, sigma 1.5, K1 = 0.01,
K2 = 0.03, mean over the valid region, as pytorch-msssim computes it) with the five local moments
filtered in one batched pair of separable depthwise convolutions. That is what makes it usable as
a training loss on a CPU: torchmetrics' and kornia's SSIM (and pytorch-msssim's ten small
convolutions) cost 5-50x more per 200x200 step there, more than the rasterizer itself. Reported
validation SSIM uses this same function, checked against torchmetrics in the tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype=torch.float32,
                    device=None) -> Tensor:
    """Normalised 1-D Gaussian, [size]."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    window = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return window / window.sum()


def ssim(images: Tensor, targets: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean SSIM per image over the valid region.

    Args:
        images, targets: [B, C, H, W] (H, W >= 11)

    Returns: [B]
    """
    n_channels = images.shape[1]
    moments = torch.cat([images, targets, images * images, targets * targets, images * targets], dim=1)
    window = gaussian_window(dtype=images.dtype, device=images.device)
    groups = moments.shape[1]
    moments = F.conv2d(moments, window.view(1, 1, 1, -1).expand(groups, 1, 1, -1), groups=groups)
    moments = F.conv2d(moments, window.view(1, 1, -1, 1).expand(groups, 1, -1, 1), groups=groups)
    mu_x, mu_y, xx, yy, xy = moments.split(n_channels, dim=1)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_xy, mu_xx, mu_yy = mu_x * mu_y, mu_x * mu_x, mu_y * mu_y
    ssim_map = ((2 * mu_xy + c1) * (2 * (xy - mu_xy) + c2)) / ((mu_xx + mu_yy + c1) * (xx - mu_xx + yy - mu_yy + c2))
    return ssim_map.flatten(1).mean(dim=1)


def psnr(images: Tensor, targets: Tensor) -> Tensor:
    """PSNR in dB per image for values in [0, 1]; images are clamped to [0, 1] first. Returns [B]."""
    mse = (images.clamp(0, 1) - targets).pow(2).flatten(1).mean(dim=1)
    return -10.0 * torch.log10(mse.clamp(min=1e-12))


def l1_dssim_loss(images: Tensor, targets: Tensor, ssim_weight: float = 0.2) -> tuple[Tensor, dict]:
    """The 3DGS photometric loss (1 - w) * L1 + w * (1 - SSIM) for [B, H, W, 3] images.

    Returns: (loss, parts for logging: l1, ssim)
    """
    l1 = (images - targets).abs().mean()
    similarity = ssim(images.permute(0, 3, 1, 2), targets.permute(0, 3, 1, 2)).mean()
    loss = (1 - ssim_weight) * l1 + ssim_weight * (1 - similarity)
    return loss, {"l1": l1.detach(), "ssim": similarity.detach()}


def exponential_decay_gamma(initial: float, final: float, steps: int) -> float:
    """Per-step factor that takes a learning rate from ``initial`` to ``final`` in ``steps``."""
    return math.exp(math.log(final / initial) / max(steps, 1))
