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

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

UNIT_WHITE_CHANNEL = 3 ** -0.5     # each channel of unit white
EDGE_GRADIENT = 0.1   # Sobel magnitude of the render's grey (unnormalised 3x3 Sobel) that counts as an edge
EDGE_MARGIN_PX = 3    # pixels kept off each edge when measuring the allowance
NOT_WHITE = 0.98      # a pixel is on the part when image and render are both below this in some channel


@dataclass(frozen=True)
class SheenSettings:
    """``scorer.sheen`` (the defaults are here; conf/scorer/*.yaml repeats them for reading).

    enabled: measure the class's allowance and take the sheen off (a scorer takes it off only while it
        has an allowance); eps: regularises |w_perp|^2 (surfaces closer to grey lose nothing);
    opening_px: side of the grey opening (1: none); hue_weight: how much a change of hue counts against
        a highlight; percentile: of the held-out views' excess, the allowance (0-100).
    """

    enabled: bool = True
    eps: float = 0.003
    opening_px: int = 3
    hue_weight: float = 1.0
    percentile: float = 99.0

    def __post_init__(self):
        if self.eps <= 0 or self.opening_px < 1 or self.hue_weight < 0 or not 0 <= self.percentile <= 100:
            raise ValueError(f"scorer.sheen: eps must be > 0, opening_px >= 1, hue_weight >= 0 and percentile "
                             f"in [0, 100]; got {self.eps}, {self.opening_px}, {self.hue_weight}, {self.percentile}")

    @classmethod
    def from_config(cls, node: DictConfig | dict | None) -> "SheenSettings":
        """From a ``scorer.sheen`` node; absent keys take the defaults, unknown keys are an error."""
        values = OmegaConf.to_container(node) if isinstance(node, DictConfig) else dict(node or {})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"scorer.sheen: unknown keys {sorted(unknown)}; known: "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**values)


def unit_white(like: torch.Tensor) -> torch.Tensor:
    """[1, 3, 1, 1] unit white on ``like``'s device and dtype, made there (no host copy: a CUDA graph
    captures it)."""
    return like.new_full((1, 3, 1, 1), UNIT_WHITE_CHANNEL)


def white_excess(query: torch.Tensor, render: torch.Tensor, settings: SheenSettings) -> torch.Tensor:
    """[B, 3, H, W] query and render in [0, 1] -> [B, H, W] white light the query shows over the render, >= 0."""
    opening_px = settings.opening_px
    white = unit_white(query)
    colour = render / (render.norm(dim=1, keepdim=True) + 1e-6)
    white_perp = white - (colour * white).sum(1, keepdim=True) * colour
    diff = query - render
    hue_change = (diff * torch.linalg.cross(colour, white.expand_as(colour), dim=1)).sum(1, keepdim=True)
    if opening_px > 1:  # averaged over the opening's window: pixel noise is not a change of hue
        hue_change = F.avg_pool2d(hue_change, opening_px, stride=1, padding=opening_px // 2,
                                  count_include_pad=False)
    hue_change = hue_change.abs()
    along_white = (diff * white_perp).sum(1, keepdim=True) - settings.hue_weight * hue_change
    excess = along_white / (white_perp.square().sum(1, keepdim=True) + settings.eps)
    if opening_px > 1:
        pad = opening_px // 2
        excess = -F.max_pool2d(-excess, opening_px, stride=1, padding=pad)   # erode
        excess = F.max_pool2d(excess, opening_px, stride=1, padding=pad)     # then dilate
    return excess.clamp_min(0.0)[:, 0]


def take_off_sheen(query: torch.Tensor, render: torch.Tensor, allowance: float,
                   settings: SheenSettings) -> torch.Tensor:
    """[B, 3, H, W] the query less the white light its highlights add over the render, at most ``allowance``."""
    excess = white_excess(query, render, settings).clamp_max(allowance)
    return query - excess[:, None] * unit_white(query)


def sheen_allowance(images: torch.Tensor, renders: torch.Tensor, settings: SheenSettings) -> float:
    """The class's allowance from defect-free views and their renders ([V, 3, H, W] in [0, 1]): the
    settings' percentile of their white excess inside the part, ``EDGE_MARGIN_PX`` away from edges."""
    excess = white_excess(images, renders, settings)
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
    # numpy: torch.quantile refuses inputs of more than 16M values
    return float(np.percentile(excess[inside].float().cpu().numpy(), settings.percentile))
