"""The sheen a glossy part shows and its splats do not carry, taken off the query before comparing.

A highlight on a dielectric (plastic, paint, a satin coat) adds the light's colour, white, on top of the
surface's own colour, and it moves with the view; splats fitted to a few dozen views reproduce it poorly
(their low-order view-dependent colour), so a good query's highlights light up its anomaly map. In the
dichromatic reflection model, shading scales the surface's colour ``c`` (unit) and a highlight adds white
``w`` (unit); so per pixel, with ``d = query - render``,

    excess = max(0, d . w_perp - hue_weight * |d . (c x w)|) / (|w_perp|^2 + eps),   w_perp = w - (w . c) c,

is light the render lacks that shading cannot explain (the part of ``d`` along white made orthogonal to
``c``) and that no change of hue explains better (``c x w`` is normal to the plane of shading and white:
a stain of another colour moves along it, a highlight does not; averaged over the opening's window so
that pixel noise does not read as hue). It is opened (a grey opening over ``opening_px`` pixels: broad
highlights stay, pixel-sized excess such as sensor noise goes), capped by the class's **allowance**, and
``excess * w`` is taken off the query. A dent (shading: along ``c``), a stain of another hue or a thin
scratch is left; a stain whose change is mostly whitening reads as sheen up to the allowance (on a
glossy part the two cannot be told apart by colour). On a grey surface ``w_perp`` vanishes: nothing is
taken off there.

The allowance is what the class's own defect-free views show: a percentile of the excess of its
held-out reference views over their renders, inside the part and away from edges (where misplaced
edges would read as light). A matte class gets an allowance near 0 (a white stain on it stays
whole); a glossy one an allowance near its highlights' strength. Chosen on the tuning family
(experiments/PROTOCOL.md, eleventh decision; experiments/results/sheen_cpu_2026-12-06.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

WHITE = torch.full((3,), 3 ** -0.5)
EDGE_GRADIENT = 0.1   # Sobel magnitude of the render's grey (unnormalised 3x3 Sobel) that counts as an edge
EDGE_MARGIN_PX = 3    # pixels kept off each edge when measuring the allowance
NOT_WHITE = 0.98      # a pixel is on the part when image and render are both below this in some channel


def white_excess(query: torch.Tensor, render: torch.Tensor, eps: float, opening_px: int,
                 hue_weight: float) -> torch.Tensor:
    """[B, 3, H, W] query and render in [0, 1] -> [B, H, W] white light the query shows over the render, >= 0."""
    white = WHITE.to(query.device, query.dtype).view(1, 3, 1, 1)
    colour = render / (render.norm(dim=1, keepdim=True) + 1e-6)
    white_perp = white - (colour * white).sum(1, keepdim=True) * colour
    diff = query - render
    hue_change = (diff * torch.linalg.cross(colour, white.expand_as(colour), dim=1)).sum(1, keepdim=True)
    if opening_px > 1:  # averaged over the opening's window: pixel noise is not a change of hue
        hue_change = F.avg_pool2d(hue_change, opening_px, stride=1, padding=opening_px // 2,
                                  count_include_pad=False)
    hue_change = hue_change.abs()
    along_white = (diff * white_perp).sum(1, keepdim=True) - hue_weight * hue_change
    excess = along_white / (white_perp.square().sum(1, keepdim=True) + eps)
    if opening_px > 1:
        pad = opening_px // 2
        excess = -F.max_pool2d(-excess, opening_px, stride=1, padding=pad)   # erode
        excess = F.max_pool2d(excess, opening_px, stride=1, padding=pad)     # then dilate
    return excess.clamp_min(0.0)[:, 0]


def take_off_sheen(query: torch.Tensor, render: torch.Tensor, allowance: float, eps: float,
                   opening_px: int, hue_weight: float) -> torch.Tensor:
    """[B, 3, H, W] the query less the white light its highlights add over the render, at most ``allowance``."""
    excess = white_excess(query, render, eps, opening_px, hue_weight).clamp_max(allowance)
    return query - excess[:, None] * WHITE.to(query.device, query.dtype).view(1, 3, 1, 1)


def sheen_allowance(images: torch.Tensor, renders: torch.Tensor, eps: float, opening_px: int,
                    hue_weight: float, percentile: float) -> float:
    """The class's allowance from defect-free views and their renders ([V, 3, H, W] in [0, 1]): the
    ``percentile`` (0-100) of their white excess inside the part, ``EDGE_MARGIN_PX`` away from edges."""
    excess = white_excess(images, renders, eps, opening_px, hue_weight)
    grey = renders.mean(1, keepdim=True)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=grey.device)
    padded = F.pad(grey, (1, 1, 1, 1), mode="reflect")
    gx = F.conv2d(padded, sobel.view(1, 1, 3, 3))
    gy = F.conv2d(padded, sobel.t().reshape(1, 1, 3, 3))
    edges = (gx.square() + gy.square()).sqrt() > EDGE_GRADIENT
    near_edge = F.max_pool2d(edges.float(), 2 * EDGE_MARGIN_PX + 1, stride=1, padding=EDGE_MARGIN_PX)[:, 0] > 0
    inside = (torch.maximum(images, renders) < NOT_WHITE).any(1) & ~near_edge
    if not inside.any():
        return 0.0
    return float(np.percentile(excess[inside].float().cpu().numpy(), percentile))  # torch.quantile caps its input size
