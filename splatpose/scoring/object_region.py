"""The object, not the scene: what the scorer does with the render's alpha before and after comparing.

Real captures put a bench behind the part and change the light between the reference capture and the
line; the splats (trained on the object alone, on white) know neither. Three steps, each switchable in
``scorer`` (conf/scorer/*.yaml, ``object_region`` and ``photometric_fit``):

- ``fit_query_to_render``: a per-channel gain and offset, fitted by least squares inside the object
  (render alpha >= ``fit_alpha``), maps the query's colours onto the render's, so a dimmer lamp or a
  warmer white does not fire.
- ``render_on_query_background``: the render (object on white) is put onto the query's own
  background, filled into the band around the silhouette from the query pixels just outside it, so that
  the bench behind the part is not compared against white.
- ``silhouette_region``: the render's silhouette, dilated by ``dilation_px`` so that a burr sticking
  out of it is still inside; the anomaly map is zero outside it.

Tensors are [B, C, H, W] float32; alphas [B, 1, H, W] in [0, 1] (1 = object).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur


def fit_query_to_render(query: torch.Tensor, render: torch.Tensor, weight: torch.Tensor,
                        min_pixels: int = 32, gain_range: tuple[float, float] = (0.2, 5.0),
                        trim_quantile: float = 0.9) -> torch.Tensor:
    """The query with each channel mapped by ``gain * q + offset``, fitted to the render.

    Least squares of ``render ~ gain * query + offset`` per image and channel over the pixels where
    ``weight`` > 0, then fitted again without the pixels whose residual is above ``trim_quantile`` (a
    defect inside the region must not bend the fit). Images with fewer than ``min_pixels`` region
    pixels are left as they are.

    Args:
        query, render: [B, 3, H, W] in [0, 1]; weight: [B, 1, H, W] (0/1 or soft) region weights.
    Returns: [B, 3, H, W], not clamped (a brighter-than-white fit stays comparable to the render).
    """
    out = query.clone()
    for b in range(query.shape[0]):
        w = weight[b, 0].reshape(-1)
        inside = w > 0
        if int(inside.sum()) < min_pixels:
            continue
        q, r, wi = query[b].reshape(3, -1)[:, inside], render[b].reshape(3, -1)[:, inside], w[inside]
        gain, offset = _weighted_affine(q, r, wi.expand_as(q))
        residual = (gain[:, None] * q + offset[:, None] - r).abs()
        cut = torch.quantile(residual, trim_quantile, dim=1, keepdim=True)
        kept = (residual <= cut).float() * wi
        gain, offset = _weighted_affine(q, r, kept)
        gain = gain.clamp(*gain_range)
        out[b] = gain.view(3, 1, 1) * query[b] + offset.view(3, 1, 1)
    return out


def _weighted_affine(q: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (channel) weighted least squares of r ~ gain * q + offset: q, r, w [3, N] -> ([3], [3])."""
    total = w.sum(1).clamp_min(1e-8)
    mq, mr = (w * q).sum(1) / total, (w * r).sum(1) / total
    var = (w * (q - mq[:, None]).square()).sum(1) / total
    cov = (w * (q - mq[:, None]) * (r - mr[:, None])).sum(1) / total
    gain = torch.where(var > 1e-6, cov / var.clamp_min(1e-6), torch.ones_like(var))
    return gain, mr - gain * mq


def silhouette_region(alpha: torch.Tensor, threshold: float, dilation_px: int) -> torch.Tensor:
    """[B, 1, H, W] 0/1: pixels with ``alpha >= threshold``, dilated by ``dilation_px`` pixels (a square)."""
    region = (alpha >= threshold).float()
    if dilation_px > 0:
        region = F.max_pool2d(region, 2 * dilation_px + 1, stride=1, padding=dilation_px)
    return region


def background_likeness(query: torch.Tensor, region: torch.Tensor, tau: float, compared: torch.Tensor | None = None,
                        ring_px: int = 8, patch: int = 5, max_samples: int = 2048) -> torch.Tensor:
    """[B, 1, H, W] in [0, 1]: how much each query pixel inside ``region`` looks like the background around it.

    The background is sampled in a ring of ``ring_px`` pixels just outside the region (where the query
    shows the bench, not the part). A pixel's ``patch`` x ``patch`` colour patch is compared with every
    sampled ring patch (at most ``max_samples``, evenly strided); with ``d`` the smallest mean squared
    difference, the likeness is ``exp(-d / tau)``: about 1 on the bench's own texture, about 0 on
    material the bench does not have nearby (a burr, the part itself). Outside the region, and where
    ``compared`` is 0 (pixels whose answer the caller does not use): 1.

    Args:
        query: [B, 3, H, W]; region: [B, 1, H, W] 0/1 (the dilated silhouette); tau: > 0, in squared
            colour units (the noise level of a capture is about 1e-3); compared: [B, 1, H, W] bool or
            None (every region pixel).
    """
    batch, _, height, width = query.shape
    patches = F.unfold(F.pad(query, [patch // 2] * 4, mode="replicate"), patch)  # [B, 3*p*p, H*W]
    ring = (F.max_pool2d(region, 2 * ring_px + 1, stride=1, padding=ring_px) - region).flatten(1) > 0
    inside = region.flatten(1) > 0
    if compared is not None:
        inside &= compared.flatten(1)
    likeness = torch.ones(batch, height * width, dtype=query.dtype, device=query.device)
    for b in range(batch):
        samples = patches[b][:, ring[b]]
        if samples.shape[1] == 0 or not inside[b].any():
            continue  # nothing outside to learn the background from: every region pixel stays unknown
        samples = samples[:, :: max(1, samples.shape[1] // max_samples)]
        wanted = patches[b][:, inside[b]]
        nearest = torch.cdist(wanted.T, samples.T).amin(1).square() / patches.shape[1]
        likeness[b, inside[b]] = torch.exp(-nearest / tau)
    return likeness.view(batch, 1, height, width)


def bench_whitened_by_border(query: torch.Tensor, tau: float, border_px: int = 8) -> torch.Tensor:
    """``query`` [3, H, W] with white wherever it looks like the bench seen along the image's border
    (``border_px`` wide; :func:`background_likeness` at ``tau``), for a query without a pose to take a
    silhouette from: the part (and any clutter unlike the bench) stays. A part that runs off the image
    lends its colours to the bench sample, so whatever uses this must survive a part left partly white."""
    image = query[None].to(torch.float32)
    interior = torch.zeros_like(image[:, :1])
    interior[..., border_px:-border_px, border_px:-border_px] = 1.0
    bench = background_likeness(image, interior, tau, ring_px=border_px) >= 0.5
    return torch.where(bench, torch.ones_like(image), image)[0].to(query.dtype)


def render_on_query_background(render: torch.Tensor, alpha: torch.Tensor, query: torch.Tensor,
                               region: torch.Tensor, sigma: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The render moved from white onto the query's background.

    The background is the query itself outside ``region`` and, inside it, a smooth fill from the query
    pixels around it (normalised Gaussian convolution with ``sigma`` pixels, repeated until the region
    is covered): a part that sticks out of the silhouette in the query is compared against the bench
    around it, not against itself. A render over white is ``a * C + (1 - a)``, so over a background
    ``B`` it becomes ``render + (1 - a) * (B - 1)``.

    With ``keep`` (:func:`background_likeness`), a region pixel that looks like the bench around it
    keeps the query's own pixel as its background (weight ``keep``; the smooth fill for the rest): the
    bench's texture is then compared against itself, while a burr, unlike the bench, still meets the fill.

    Args:
        render, query: [B, 3, H, W]; alpha, region: [B, 1, H, W] (region: 1 where the background is
            unknown, i.e. the dilated silhouette); keep: [B, 1, H, W] in [0, 1] or None.
    Returns: [B, 3, H, W].
    """
    known = 1.0 - region
    kernel = 2 * int(round(3 * sigma)) + 1
    background, weight = query * known, known
    filled = query * known
    have = known.clone()
    for _ in range(6):
        num = gaussian_blur(background, [kernel, kernel], [sigma, sigma])
        den = gaussian_blur(weight, [kernel, kernel], [sigma, sigma])
        estimate = num / den.clamp_min(1e-6)
        new = (den > 1e-3).float() * (1.0 - have)
        filled = filled + new * estimate
        have = have + new
        if bool((have > 0).all()):
            break
        background, weight = filled, have
    # Pixels no fill reached (a region covering the whole image) stay white, as the render has them.
    filled = filled + (1.0 - have)
    if keep is not None:
        filled = keep * query + (1.0 - keep) * filled
    return render + (1.0 - alpha) * (filled - 1.0)
