"""The torch rasterizer's compositing step as fused CPU kernels (numba), tile by tile as gsplat does it.

:func:`composite` takes and returns what :func:`splatpose.splat.torch_rasterizer.composite` does and
follows the same gsplat 1.5.3 semantics (alpha = min(0.999, o exp(-sigma)), pairs under 1/255 or with
sigma < 0 skipped, front to back, a pixel stops before the Gaussian that would bring its
transmittance to 1e-4); the projection stays in torch, so autograd reaches the 3D parameters as before.

Why: the torch compositor moves every (Gaussian, pixel) pair through memory in a few dozen array ops;
a fused kernel keeps a pixel's state in registers and reads each Gaussian once per tile
(experiments/results/raster_cpu_floor_2026-12-05.md counts the floor). Layout:

1. binning (serial): the visible Gaussians of each camera in depth order, each appended to the list of
   every 16x16 tile its alpha = 1/255 ellipse's bounding box touches, so every tile's list is in depth order;
2. forward (parallel over tiles): per pixel, a walk down its tile's list; the image, the accumulated
   alpha and, per pixel, the end of its walk (for the backward) are written;
3. backward (parallel over tiles): per pixel, the walk again (its alphas and transmittances kept), then
   back to front with S = sum of h_j w_j behind (the torch compositor's formula, see ``_CompositePairs``);
   the gradient moments of a Gaussian are summed per (tile, list entry), so no two threads write the
   same place, then added up per Gaussian in a fixed order: the result does not depend on the threads.
"""

from __future__ import annotations

import math
import os

import torch

# numba sizes its thread pool once, when it is imported, from the cores it sees; a process told to use fewer
# threads (OMP_NUM_THREADS, torch.set_num_threads) would keep an extra worker spinning beside torch's.
os.environ.setdefault("NUMBA_NUM_THREADS", str(torch.get_num_threads()))

import numba  # noqa: E402 (after the thread count is set)
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402

from splatpose.splat.torch_rasterizer import ALPHA_THRESHOLD, MAX_ALPHA, MIN_TRANSMITTANCE
from splatpose.splat.torch_rasterizer import composite as torch_composite

TILE = 16


@numba.njit(cache=True)
def _bin(order: np.ndarray, camera_of: np.ndarray, mean_x: np.ndarray, mean_y: np.ndarray, half_x: np.ndarray,
         half_y: np.ndarray, tiles_x: int, tiles_y: int, n_cameras: int):
    """Tile lists. order: visible flat ids, depth-sorted within each camera (cameras in order).

    Returns (offsets [n_tiles + 1], ids [entries]): tile t's Gaussians are ids[offsets[t]:offsets[t+1]]."""
    n_tiles = n_cameras * tiles_x * tiles_y
    counts = np.zeros(n_tiles + 1, np.int64)
    lo = np.empty((len(order), 4), np.int64)  # tile x0, x1, y0, y1 (inclusive; x1 < x0 when none)
    for k in range(len(order)):
        g = order[k]
        x0 = max(int(math.floor((mean_x[g] - half_x[g]) / TILE)), 0)
        x1 = min(int(math.floor((mean_x[g] + half_x[g]) / TILE)), tiles_x - 1)
        y0 = max(int(math.floor((mean_y[g] - half_y[g]) / TILE)), 0)
        y1 = min(int(math.floor((mean_y[g] + half_y[g]) / TILE)), tiles_y - 1)
        lo[k, 0], lo[k, 1], lo[k, 2], lo[k, 3] = x0, x1, y0, y1
        base = camera_of[g] * tiles_x * tiles_y
        for ty in range(y0, y1 + 1):
            for tx in range(x0, x1 + 1):
                counts[base + ty * tiles_x + tx + 1] += 1
    offsets = np.cumsum(counts)
    fill = offsets[:-1].copy()
    ids = np.empty(offsets[-1], np.int64)
    for k in range(len(order)):
        g = order[k]
        base = camera_of[g] * tiles_x * tiles_y
        for ty in range(lo[k, 2], lo[k, 3] + 1):
            for tx in range(lo[k, 0], lo[k, 1] + 1):
                t = base + ty * tiles_x + tx
                ids[fill[t]] = g
                fill[t] += 1
    return offsets, ids


@numba.njit(cache=True)
def _tile_table(ids, start: int, stop: int, table):
    """The tile's Gaussians' parameters, contiguous per entry (read 256 times per tile): [n, 7] = mean x,
    mean y, conic a, b, c, opacity and the sigma beyond which alpha < 1/255 (ln(255 opacity), a hair over)."""
    local = np.empty((stop - start, 7), np.float64)
    for k in range(stop - start):
        g = ids[start + k]
        for j in range(6):
            local[k, j] = table[j, g]
        local[k, 6] = math.log(max(table[5, g], ALPHA_THRESHOLD) / ALPHA_THRESHOLD) + 1e-5
    return local


@numba.njit(cache=True, inline="always")
def _alpha(local, k: int, px: float, py: float):
    """(alpha, dx, dy) of the tile's entry k at pixel centre (px, py); alpha 0 where gsplat skips the pair."""
    dx = local[k, 0] - px
    dy = local[k, 1] - py
    sigma = 0.5 * (local[k, 2] * dx * dx + local[k, 4] * dy * dy) + local[k, 3] * dx * dy
    if sigma < 0.0 or sigma > local[k, 6]:  # beyond: o exp(-sigma) < 1/255, no need for the exp
        return 0.0, dx, dy
    alpha = min(MAX_ALPHA, local[k, 5] * math.exp(-sigma))
    if alpha < ALPHA_THRESHOLD:
        return 0.0, dx, dy
    return alpha, dx, dy


@numba.njit(cache=True, parallel=True)
def _forward(offsets, ids, table, colors, width: int, height: int, tiles_x: int, tiles_y: int):
    """Per pixel (flat c*H*W + y*W + x): image [P, D], accumulated alpha [P], walk end [P] (one past the
    last list entry it blended, relative to its tile's list), kept pairs per tile."""
    n_tiles = len(offsets) - 1
    n_channels = colors.shape[1]
    per_camera = tiles_x * tiles_y
    n_pixels = (n_tiles // per_camera) * height * width
    image = np.zeros((n_pixels, n_channels), np.float64)
    accumulated = np.zeros(n_pixels, np.float64)
    ends = np.zeros(n_pixels, np.int32)
    kept = np.zeros(n_tiles, np.int64)
    for t in numba.prange(n_tiles):
        camera, tile = t // per_camera, t % per_camera
        ty, tx = tile // tiles_x, tile % tiles_x
        start, stop = offsets[t], offsets[t + 1]
        local = _tile_table(ids, start, stop, table)
        for y in range(ty * TILE, min((ty + 1) * TILE, height)):
            for x in range(tx * TILE, min((tx + 1) * TILE, width)):
                p = camera * height * width + y * width + x
                transmittance = 1.0
                end = 0
                for k in range(stop - start):
                    alpha, dx, dy = _alpha(local, k, x + 0.5, y + 0.5)
                    if alpha == 0.0:
                        continue
                    after = transmittance * (1.0 - alpha)
                    if after <= MIN_TRANSMITTANCE:
                        break
                    weight = alpha * transmittance
                    for d in range(n_channels):
                        image[p, d] += weight * colors[ids[start + k], d]
                    accumulated[p] += weight
                    transmittance = after
                    end = k + 1
                    kept[t] += 1
                ends[p] = end
    return image, accumulated, ends, kept


@numba.njit(cache=True, parallel=True)
def _backward(offsets, ids, table, colors, ends, grad_image, grad_accumulated, width: int, height: int,
              tiles_x: int, with_absgrad: bool):
    """Per (tile, list entry): the sums g dx, g dy, g dx dx, g dx dy, g dy dy, g (g = alpha dL/dalpha, 0
    where alpha is clamped), dL/dcolour per channel and, with_absgrad, |dL/dmean x|, |dL/dmean y|."""
    n_tiles = len(offsets) - 1
    n_channels = colors.shape[1]
    per_camera = tiles_x * ((height + TILE - 1) // TILE)
    sums = np.zeros((len(ids), 6 + n_channels + 2 * with_absgrad), np.float64)
    for t in numba.prange(n_tiles):
        camera, tile = t // per_camera, t % per_camera
        ty, tx = tile // tiles_x, tile % tiles_x
        start, stop = offsets[t], offsets[t + 1]
        local = _tile_table(ids, start, stop, table)
        alphas = np.empty(stop - start, np.float64)
        transmittances = np.empty(stop - start, np.float64)
        for y in range(ty * TILE, min((ty + 1) * TILE, height)):
            for x in range(tx * TILE, min((tx + 1) * TILE, width)):
                p = camera * height * width + y * width + x
                end = ends[p]
                transmittance = 1.0
                for k in range(end):
                    alpha, dx, dy = _alpha(local, k, x + 0.5, y + 0.5)
                    alphas[k], transmittances[k] = alpha, transmittance
                    transmittance *= 1.0 - alpha
                behind = 0.0
                for k in range(end - 1, -1, -1):
                    alpha = alphas[k]
                    if alpha == 0.0:
                        continue
                    g_id = ids[start + k]
                    weight = alpha * transmittances[k]
                    h = grad_accumulated[p]
                    for d in range(n_channels):
                        h += grad_image[p, d] * colors[g_id, d]
                        sums[start + k, 6 + d] += grad_image[p, d] * weight
                    grad_alpha = transmittances[k] * h - behind / (1.0 - alpha)
                    behind += h * weight
                    if alpha >= MAX_ALPHA:
                        continue
                    g = alpha * grad_alpha
                    dx = local[k, 0] - (x + 0.5)
                    dy = local[k, 1] - (y + 0.5)
                    row = sums[start + k]
                    row[0] += g * dx
                    row[1] += g * dy
                    row[2] += g * dx * dx
                    row[3] += g * dx * dy
                    row[4] += g * dy * dy
                    row[5] += g
                    if with_absgrad:
                        row[6 + n_channels] += abs(local[k, 2] * g * dx + local[k, 3] * g * dy)
                        row[7 + n_channels] += abs(local[k, 4] * g * dy + local[k, 3] * g * dx)
    return sums


@numba.njit(cache=True)
def _per_gaussian(ids, sums, n_flat: int):
    """Add the per-entry sums up per Gaussian, in entry order (the same result for any thread count)."""
    out = np.zeros((n_flat, sums.shape[1]), np.float64)
    for e in range(len(ids)):
        out[ids[e]] += sums[e]
    return out


def composite(*args, **kwargs) -> tuple[Tensor, Tensor, int]:
    """:func:`splatpose.splat.torch_rasterizer.composite` (same arguments, shapes and results) through the
    kernels above; CPU tensors only."""
    return torch_composite(*args, **kwargs, function=_CompositeTiles)


def _tile_lists(means2d: Tensor, conics: Tensor, opacities: Tensor, depths: Tensor, radii: Tensor,
                n_gaussians: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(table [6, M] float64: mean x, mean y, conic a, b, c, opacity per flat id; tile offsets; tile ids;
    tiles across) for the kernels. The bounding box of a Gaussian is its alpha = 1/255 ellipse's."""
    with torch.no_grad():
        table = torch.stack([means2d[:, 0], means2d[:, 1], conics[:, 0], conics[:, 1], conics[:, 2],
                             opacities]).double()
        a, b, c = table[2], table[3], table[4]
        det = (a * c - b * b).clamp(min=1e-20)
        level = 2.0 * torch.log(table[5].clamp(min=ALPHA_THRESHOLD) / ALPHA_THRESHOLD)
        half_x, half_y = torch.sqrt(level * c / det), torch.sqrt(level * a / det)  # cov_xx = c / det
        n_flat = len(table[0])
        camera_of = torch.arange(n_flat) // n_gaussians
        visible = torch.nonzero((radii > 0).all(dim=-1)).squeeze(1)
        # depth order within each camera: sort by depth (stable), then by camera (stable)
        visible = visible[torch.argsort(depths[visible], stable=True)]
        visible = visible[torch.argsort(camera_of[visible], stable=True)]
    tiles_x, tiles_y = (width + TILE - 1) // TILE, (height + TILE - 1) // TILE
    table = table.numpy()
    offsets, ids = _bin(visible.numpy(), camera_of.numpy(), table[0], table[1], half_x.numpy(), half_y.numpy(),
                        tiles_x, tiles_y, n_flat // n_gaussians)
    return table, offsets, ids, tiles_x


class _CompositeTiles(torch.autograd.Function):
    """Front-to-back compositing through the numba kernels, with their backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, depths, radii, n_gaussians, width, height,
                absgrad_target, counts):
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        table, offsets, ids, tiles_x = _tile_lists(means2d, conics, opacities, depths, radii, n_gaussians,
                                                   width, height)
        colors64 = colors.detach().double().numpy()
        image, accumulated, ends, kept = _forward(offsets, ids, table, colors64, width, height, tiles_x,
                                                  (height + TILE - 1) // TILE)
        counts["kept"] = int(kept.sum())
        ctx.save_for_backward(conics, opacities)
        ctx.lists = (table, offsets, ids, tiles_x, colors64, ends, width, height)
        ctx.absgrad_target = absgrad_target
        return torch.from_numpy(image).to(colors.dtype), torch.from_numpy(accumulated).to(colors.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_image, grad_accumulated):
        conics, opacities = ctx.saved_tensors
        table, offsets, ids, tiles_x, colors64, ends, width, height = ctx.lists
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        with_absgrad = ctx.absgrad_target is not None
        n_channels = colors64.shape[1]
        sums = _backward(offsets, ids, table, colors64, ends, grad_image.double().contiguous().numpy(),
                         grad_accumulated.double().contiguous().numpy(), width, height, tiles_x, with_absgrad)
        sums = torch.from_numpy(_per_gaussian(ids, sums, len(colors64)).T.copy()).to(conics.dtype)
        # sigma = a dx^2 / 2 + b dx dy + c dy^2 / 2 with dx = mean x - pixel x: dsigma/dmean x = a dx + b dy, ...
        a, b, c = conics.t()
        grad_means2d = -torch.stack([a * sums[0] + b * sums[1], c * sums[1] + b * sums[0]], 1)
        grad_conics = -torch.stack([0.5 * sums[2], sums[3], 0.5 * sums[4]], 1)
        grad_opacities = sums[5] / opacities.clamp(min=ALPHA_THRESHOLD)  # dalpha/dopacity = alpha / opacity
        if with_absgrad:
            ctx.absgrad_target.absgrad = sums[6 + n_channels:].t().reshape(ctx.absgrad_target.shape)
        return (grad_means2d, grad_conics, grad_opacities, sums[6:6 + n_channels].t(),
                None, None, None, None, None, None, None)
