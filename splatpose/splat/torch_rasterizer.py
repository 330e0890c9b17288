"""A differentiable 3DGS rasterizer in plain PyTorch, for CPU (gsplat's rasterizer is CUDA-only).

``rasterize_torch`` takes the arguments of ``gsplat.rasterization`` (non-packed mode) and returns
the same ``(colors [C,H,W,D], alphas [C,H,W,1], info)``, with the ``info`` keys that gsplat's
``DefaultStrategy`` reads (``means2d`` with its gradient, ``radii``, ``width``, ``height``,
``n_cameras``, ``gaussian_ids``), so densification runs unchanged on either backend.

Projection, covariances and spherical harmonics come from gsplat's own pure-torch reference
(``gsplat.cuda._torch_impl``). The compositor is this module's and follows the semantics of
gsplat 1.5.3's CUDA kernels, so that both backends render the same image:

- 2D covariance blurred by ``eps2d`` (0.3 px), pixel centres at (x + 0.5, y + 0.5);
- alpha = min(0.999, opacity * exp(-sigma)); pairs with sigma < 0 or alpha < 1/255 are skipped;
- front-to-back by depth; a pixel stops *before* the Gaussian that would bring its transmittance
  to 1e-4 or below (that Gaussian and all behind it are excluded);
- ``radii`` as gsplat computes them: the opacity-aware extent min(3.33, sqrt(2 ln(255 opacity)))
  standard deviations, zero for culled Gaussians.

How it is fast on a CPU: the (Gaussian, pixel) pairs are enumerated without autograd, row by row
inside each Gaussian's alpha = 1/255 ellipse (nearly every candidate has alpha >= 1/255), and
handled a chunk of whole image rows at a time (``PAIR_CHUNK`` candidates, about 2^18), so that a
chunk's per-pair temporaries stay in the CPU cache: a torch op over millions of pairs in main
memory costs several times more than over the same pairs in chunks. Within a chunk, spans come in
(row, depth) order and one stable sort by pixel gives (pixel, depth) order; transmittance is an
exclusive cumulative sum of log(1 - alpha) per pixel, done as one cumulative sum over the chunk
minus its value at the start of each pixel's run (float64, because the sum is long), and the stop
rule drops the pairs behind. Compositing is one ``torch.autograd.Function`` whose backward is
written out (see ``_CompositePairs``): autograd would keep a dozen per-pair intermediates and
scatter each gradient separately. No per-tile padding, no Python loop over pixels or Gaussians.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from gsplat.cuda._torch_impl import (
    _persp_proj,
    _quat_scale_to_covar_preci,
    _spherical_harmonics,
    _world_to_cam,
)
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0  # gsplat's ALPHA_THRESHOLD
MAX_ALPHA = 0.999  # alpha clamp in gsplat's rasterize_to_pixels kernels
MIN_TRANSMITTANCE = 1e-4  # a pixel is done once T would fall to this
MAX_EXTENT_SIGMAS = 3.33  # gsplat's cap on the bounding-box half size, in standard deviations
# Candidate pairs handled at once (a chunk of whole image rows): small enough that a chunk's [P]
# temporaries stay in the CPU cache, large enough that the per-chunk Python overhead is small.
PAIR_CHUNK = 1 << 18


def rasterize_torch(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3] (activated: standard deviations)
    opacities: Tensor,  # [N] (activated: in [0, 1])
    colors: Tensor,  # [N, D], [C, N, D], or SH coefficients [N, K, 3] when sh_degree is set
    viewmats: Tensor,  # [C, 4, 4] world-to-camera, OpenCV axes
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: int | None = None,
    packed: bool = False,
    backgrounds: Tensor | None = None,  # [C, D]
    absgrad: bool = False,
    rasterize_mode: str = "classic",
    render_mode: str = "RGB",
    camera_model: str = "pinhole",
    covars: Tensor | None = None,  # [N, 3, 3]: when given, quats and scales are ignored
    compositor=None,  # None: this module's composite; or one with its signature (numba_compositor.composite)
    **unsupported,
) -> tuple[Tensor, Tensor, dict]:
    """Render C images of N Gaussians; argument meanings as in ``gsplat.rasterization``.

    Returns:
        colors: [C, H, W, D] (D = 3 for SH colours), composited on ``backgrounds`` when given
        alphas: [C, H, W, 1] accumulated opacity
        info: dict with ``means2d`` [C, N, 2] (a non-leaf tensor: call ``retain_grad`` on it),
            ``radii`` [C, N, 2] int32, ``depths`` [C, N], ``conics`` [C, N, 3], ``opacities``
            [C, N], ``gaussian_ids`` None (non-packed), ``width``, ``height``, ``n_cameras``,
            ``n_batches``, and ``n_pairs`` (number of (Gaussian, pixel) pairs composited)
    """
    if packed:
        raise ValueError("the torch backend renders in gsplat's non-packed mode only: pass packed=False")
    if render_mode != "RGB" or camera_model != "pinhole":
        raise ValueError(f"the torch backend supports render_mode='RGB' with camera_model='pinhole', "
                         f"got render_mode={render_mode!r}, camera_model={camera_model!r}")
    if rasterize_mode not in ("classic", "antialiased"):
        raise ValueError(f"rasterize_mode must be 'classic' or 'antialiased', got {rasterize_mode!r}")
    used = {k for k, v in unsupported.items() if v not in (None, False)}
    if used:
        raise ValueError(f"the torch backend does not support the gsplat arguments {sorted(used)}; "
                         "use backend='gsplat' on a CUDA device for them")
    if means.dim() != 2 or viewmats.dim() != 3:
        raise ValueError(f"the torch backend takes means [N,3] and viewmats [C,4,4] without batch "
                         f"dimensions, got {tuple(means.shape)} and {tuple(viewmats.shape)}")

    projection = project_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height,
                                   eps2d=eps2d, near_plane=near_plane, far_plane=far_plane,
                                   radius_clip=radius_clip,
                                   antialiased=rasterize_mode == "antialiased", covars=covars)
    point_colors = gaussian_colors(colors, means, viewmats, sh_degree)  # [C, N, D]
    render_colors, render_alphas, n_pairs = (compositor or composite)(
        projection["means2d"], projection["conics"], projection["opacities"], point_colors,
        projection["depths"], projection["radii"], width, height, backgrounds,
        absgrad_target=projection["means2d"] if absgrad else None)
    info = {
        **projection,
        "batch_ids": None,
        "camera_ids": None,
        "gaussian_ids": None,
        "width": width,
        "height": height,
        "n_cameras": viewmats.shape[0],
        "n_batches": 1,
        "n_pairs": n_pairs,
    }
    return render_colors, render_alphas, info


def project_gaussians(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor,
                      viewmats: Tensor, Ks: Tensor, width: int, height: int, eps2d: float = 0.3,
                      near_plane: float = 0.01, far_plane: float = 1e10, radius_clip: float = 0.0,
                      antialiased: bool = False, covars: Tensor | None = None) -> dict[str, Tensor]:
    """EWA projection of 3D Gaussians into C cameras, as gsplat's fused CUDA projection does it.

    ``covars`` [N, 3, 3]: the world covariances, when the caller has them (:func:`world_covariances` of
    ``quats`` and ``scales``, which are then ignored): a camera-independent step a caller rendering one
    scene many times need not repeat.

    Returns a dict: means2d [C,N,2] (pixels), conics [C,N,3] (inverse blurred 2D covariance,
    entries xx, xy, yy), depths [C,N] (camera z), opacities [C,N] (times the antialiasing
    compensation when ``antialiased``), radii [C,N,2] int32 (0 = culled).
    """
    if covars is None:
        covars = world_covariances(quats, scales)
    means_cam, covars_cam = _world_to_cam(means, covars, viewmats)  # [C,N,3], [C,N,3,3]
    means2d, covars2d = _persp_proj(means_cam, covars_cam, Ks, width, height)  # [C,N,2], [C,N,2,2]

    xx, xy, yy = covars2d[..., 0, 0], 0.5 * (covars2d[..., 0, 1] + covars2d[..., 1, 0]), covars2d[..., 1, 1]
    det_unblurred = xx * yy - xy * xy
    xx, yy = xx + eps2d, yy + eps2d  # the 0.3 px low-pass filter of 3DGS
    det = xx * yy - xy * xy
    safe_det = det.clamp(min=1e-10)
    conics = torch.stack([yy / safe_det, -xy / safe_det, xx / safe_det], dim=-1)

    opacities = opacities[None].expand(viewmats.shape[0], -1)  # [C, N]
    if antialiased:
        opacities = opacities * torch.sqrt((det_unblurred / safe_det).clamp(min=0.0))
    depths = means_cam[..., 2]

    with torch.no_grad():
        # Opacity-aware bounding box (gsplat 1.5): beyond it alpha < 1/255 anyway.
        extent = torch.sqrt(2.0 * torch.log(opacities.clamp(min=ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
        extent = extent.clamp(max=MAX_EXTENT_SIGMAS)
        radius_x = torch.ceil(extent * torch.sqrt(xx.clamp(min=0)))
        radius_y = torch.ceil(extent * torch.sqrt(yy.clamp(min=0)))
        valid = ((det > 0) & (depths >= near_plane) & (depths <= far_plane)
                 & (opacities >= ALPHA_THRESHOLD)
                 & ((radius_x > radius_clip) | (radius_y > radius_clip))
                 & (means2d[..., 0] + radius_x > 0) & (means2d[..., 0] - radius_x < width)
                 & (means2d[..., 1] + radius_y > 0) & (means2d[..., 1] - radius_y < height))
        radii = torch.where(valid[..., None], torch.stack([radius_x, radius_y], -1), 0).int()
    return {"means2d": means2d, "conics": conics, "depths": depths, "opacities": opacities,
            "radii": radii}


def world_covariances(quats: Tensor, scales: Tensor) -> Tensor:
    """[N, 4] unit quaternions (w, x, y, z), [N, 3] standard deviations -> [N, 3, 3] covariances R S S R^T."""
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False)
    return covars


def gaussian_colors(colors: Tensor, means: Tensor, viewmats: Tensor, sh_degree: int | None) -> Tensor:
    """Per-camera colours [C, N, D]: the given colours, or SH evaluated toward each camera.

    SH colours follow gsplat and Inria: ``max(SH(direction from camera to mean) + 0.5, 0)``.
    """
    n_cameras = viewmats.shape[0]
    if sh_degree is None:
        return colors if colors.dim() == 3 else colors[None].expand(n_cameras, -1, -1)
    camera_centres = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
    directions = means[None] - camera_centres[:, None]  # [C, N, 3]
    coeffs = colors if colors.dim() == 4 else colors[None].expand(n_cameras, -1, -1, -1)
    return torch.clamp_min(_spherical_harmonics(sh_degree, directions, coeffs) + 0.5, 0.0)


def composite(means2d: Tensor, conics: Tensor, opacities: Tensor, colors: Tensor, depths: Tensor,
              radii: Tensor, width: int, height: int, backgrounds: Tensor | None = None,
              absgrad_target: Tensor | None = None, function: type | None = None) -> tuple[Tensor, Tensor, int]:
    """Alpha-composite projected Gaussians front to back into C images.

    Args:
        means2d [C,N,2], conics [C,N,3], opacities [C,N], colors [C,N,D], depths [C,N],
        radii [C,N,2] (0 = culled), backgrounds [C,D] or None (black)
        absgrad_target: when given (``means2d``), its ``.absgrad`` attribute receives the sum
            over pixels of the absolute per-pixel gradients during backward (gsplat's absgrad)
        function: the autograd Function that composites the flattened inputs (None: ``_CompositePairs``;
            :mod:`splatpose.splat.numba_compositor` passes its kernels' with the same signature)

    Returns: (colors [C,H,W,D], alphas [C,H,W,1], number of composited pairs)
    """
    n_cameras, n_gaussians = opacities.shape
    n_channels = colors.shape[-1]
    counts: dict = {}
    image, accumulated = (function or _CompositePairs).apply(
        means2d.reshape(-1, 2), conics.reshape(-1, 3), opacities.reshape(-1), colors.reshape(-1, n_channels),
        depths.detach().reshape(-1), radii.reshape(-1, 2), n_gaussians, width, height, absgrad_target, counts)
    if backgrounds is not None:
        camera_of_pixel = torch.arange(n_cameras, device=image.device).repeat_interleave(height * width)
        image = image + (1.0 - accumulated)[:, None] * backgrounds[camera_of_pixel]
    return (image.reshape(n_cameras, height, width, n_channels),
            accumulated.reshape(n_cameras, height, width, 1), counts["kept"])


class VisiblePairs(NamedTuple):
    """The composited (Gaussian, pixel) pairs of some whole image rows, in (pixel, depth) order; [P] each."""

    ids: Tensor  # int32, flat Gaussian index c*N + n
    pixels: Tensor  # int32, flat pixel index c*H*W + y*W + x, non-decreasing
    alphas: Tensor  # the pair's alpha, in [1/255, 0.999]
    transmittances: Tensor  # product of (1 - alpha) over the pairs in front of it in its pixel
    run_ends: Tensor  # int64, index (in this chunk) one past the last pair of the same pixel
    dx: Tensor  # mean minus pixel centre, x
    dy: Tensor  # mean minus pixel centre, y


class _CompositePairs(torch.autograd.Function):
    """Front-to-back compositing with a hand-written backward, a chunk of image rows at a time.

    Forward: w_i = alpha_i T_i, image[p] = sum_i w_i colour_i, accumulated[p] = sum_i w_i over the
    pairs i of pixel p in depth order. Backward, with h_i = dL/dimage[p] . colour_i + dL/dacc[p]:
    dL/dalpha_i = T_i h_i - S_i / (1 - alpha_i), where S_i = sum over the pairs j behind i in the same
    pixel of h_j w_j (one cumulative sum, read at the end of each pixel's run); then through
    alpha = min(0.999, o exp(-sigma)) to the 2D mean, conic, opacity and colour of each Gaussian.
    Autograd would keep a dozen intermediates per pair in memory; here only the pair lists are kept,
    and each chunk's [P] temporaries stay in the CPU cache.
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, depths, radii, n_gaussians, width, height,
                absgrad_target, counts):
        n_channels = colors.shape[1]
        n_pixels = (radii.shape[0] // n_gaussians) * height * width
        color_columns = colors.t().contiguous()  # [D, M]: one-dimensional gathers are the fast ones
        image = colors.new_zeros(n_channels, n_pixels)
        accumulated = colors.new_zeros(n_pixels)
        chunks = list(visible_pair_chunks(means2d, conics, opacities, depths, radii, n_gaussians, width, height,
                                          PAIR_CHUNK))
        for pairs in chunks:
            weights = pairs.alphas * pairs.transmittances
            for d in range(n_channels):
                image[d].index_add_(0, pairs.pixels, weights * color_columns[d].index_select(0, pairs.ids))
            accumulated.index_add_(0, pairs.pixels, weights)
        counts["kept"] = sum(len(pairs.ids) for pairs in chunks)
        ctx.save_for_backward(conics, opacities, color_columns)
        ctx.chunks, ctx.absgrad_target = chunks, absgrad_target
        return image.t(), accumulated

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_image, grad_accumulated):
        conics, opacities, color_columns = ctx.saved_tensors
        n_channels, n_gaussians = color_columns.shape
        conic_columns = conics.t().contiguous()
        grad_image = grad_image.t().contiguous()  # [D, pixels]
        grad_accumulated = grad_accumulated.contiguous()
        with_absgrad = ctx.absgrad_target is not None
        # Sums per Gaussian over its pairs, with g = -dL/dsigma = alpha dL/dalpha (0 where alpha is
        # clamped): g dx, g dy, g dx dx, g dx dy, g dy dy, g, dL/dcolour..., |dL/dmean x|, |dL/dmean y|.
        # The conic and the opacity are constant per Gaussian, so the gradients follow from these
        # moments without gathering them per pair.
        sums = conics.new_zeros(6 + n_channels + 2 * with_absgrad, n_gaussians)
        for pairs in ctx.chunks:
            ids, pixels, alphas, transmittances = pairs.ids, pairs.pixels, pairs.alphas, pairs.transmittances
            weights = alphas * transmittances
            h = grad_accumulated.index_select(0, pixels)
            for d in range(n_channels):
                grad_pixel = grad_image[d].index_select(0, pixels)
                h = h + grad_pixel * color_columns[d].index_select(0, ids)
                sums[6 + d].index_add_(0, ids, grad_pixel * weights)
            # S_i: sum of h_j w_j over j behind i in i's pixel = (prefix sum at the run's end) - (at i)
            inclusive = torch.cumsum((h * weights).double(), dim=0)
            behind = (inclusive.index_select(0, pairs.run_ends - 1) - inclusive).to(h.dtype)
            grad_alpha = transmittances * h - behind / (1.0 - alphas)
            # alpha = min(0.999, opacity exp(-sigma)): dalpha/dsigma = -alpha, none through the clamp
            g = torch.where(alphas < MAX_ALPHA, alphas * grad_alpha, 0.0)
            g_dx, g_dy = g * pairs.dx, g * pairs.dy
            columns = [g_dx, g_dy, g_dx * pairs.dx, g_dx * pairs.dy, g_dy * pairs.dy, g]
            if with_absgrad:
                a, b, c = (conic_columns[k].index_select(0, ids) for k in range(3))
                columns += [None] * n_channels + [(a * g_dx + b * g_dy).abs(), (c * g_dy + b * g_dx).abs()]
            for k, column in enumerate(columns):
                if column is not None:
                    sums[k].index_add_(0, ids, column)
        # sigma = a dx^2 / 2 + b dx dy + c dy^2 / 2 with dx = mean x - pixel x: dsigma/dmean x = a dx + b dy, ...
        a, b, c = conic_columns
        grad_means2d = -torch.stack([a * sums[0] + b * sums[1], c * sums[1] + b * sums[0]], 1)
        grad_conics = -torch.stack([0.5 * sums[2], sums[3], 0.5 * sums[4]], 1)
        grad_opacities = sums[5] / opacities.clamp(min=ALPHA_THRESHOLD)  # dalpha/dopacity = alpha / opacity
        if with_absgrad:
            ctx.absgrad_target.absgrad = sums[6 + n_channels:].t().reshape(ctx.absgrad_target.shape)
        return (grad_means2d, grad_conics, grad_opacities, sums[6:6 + n_channels].t(),
                None, None, None, None, None, None, None)


@torch.no_grad()
def visible_pair_chunks(means2d: Tensor, conics: Tensor, opacities: Tensor, depths: Tensor, radii: Tensor,
                        n_gaussians: int, width: int, height: int, chunk_pairs: int = PAIR_CHUNK,
                        stats: dict | None = None):
    """The (Gaussian, pixel) pairs that the compositor blends, chunk by chunk of whole image rows.

    Inputs are flattened over cameras ([C*N, ...]). A pair is kept when alpha >= 1/255 and sigma
    >= 0, and the pixel's transmittance before it stays above 1e-4 after it (gsplat's stop rule).
    Each chunk holds about ``chunk_pairs`` candidate pairs, so that its temporaries fit the CPU cache.

    Yields: ``VisiblePairs`` per chunk, chunks in increasing pixel order.
    """
    visible = torch.nonzero((radii > 0).all(dim=-1)).squeeze(1)
    visible = visible[torch.argsort(depths[visible], stable=True)]
    owner, y, x0, length = _pixel_rows_inside_ellipses(means2d[visible], conics[visible], opacities[visible],
                                                       width, height)
    owner = visible.index_select(0, owner)
    # Spans grouped by image row, front to back within a row (the sort is stable); the pairs of a
    # chunk then come in (row, depth, x) order, and one stable sort by pixel gives (pixel, depth).
    image_row = torch.div(owner, n_gaussians, rounding_mode="floor") * height + y
    image_row, order = torch.sort(image_row, stable=True)
    owner, y, x0, length = _select(order, owner, y, x0, length)
    row_start = image_row * width
    # Per-pair indices in int32 (half the bytes of int64 through every gather and scatter).
    owner, x0, length32 = owner.int(), x0.int(), length.int()
    n_rows = (radii.shape[0] // n_gaussians) * height
    spans_through_row = torch.cumsum(torch.bincount(image_row, minlength=n_rows), 0)
    pairs_through_row = torch.cat([length.new_zeros(1), torch.cumsum(length, 0)]).index_select(0, spans_through_row)
    total = int(pairs_through_row[-1]) if n_rows else 0
    cut_rows = torch.searchsorted(pairs_through_row, torch.arange(chunk_pairs, max(total, chunk_pairs), chunk_pairs,
                                                                  device=length.device))
    bounds = sorted({0, *spans_through_row.index_select(0, cut_rows.clamp(max=n_rows - 1)).tolist(), len(owner)})

    table = torch.stack([means2d[:, 0], means2d[:, 1], conics[:, 0], conics[:, 1], conics[:, 2], opacities])
    for s, e in zip(bounds[:-1], bounds[1:]):
        ids, local, alphas, dx, dy = _alpha_pairs_in_spans(owner[s:e], y[s:e], (row_start[s:e] - row_start[s]).int(),
                                                           x0[s:e], length32[s:e], table)
        if stats is not None:
            stats["enumerated"] = stats.get("enumerated", 0) + len(ids)
            stats["alpha_pass"] = stats.get("alpha_pass", 0) + int((alphas > 0).sum())
        if len(ids) == 0:
            continue
        local, order = torch.sort(local, stable=True)  # pixel ids within the chunk
        sorted_alphas = alphas.index_select(0, order)
        counts = torch.bincount(local)

        # Log-transmittance before and after each pair: a cumulative sum (float64: it runs over
        # the whole chunk) minus its value at the start of the pair's pixel run. gsplat stops a
        # pixel at the first Gaussian with T * (1 - alpha) <= 1e-4 and skips the rest.
        after = torch.cat([alphas.new_zeros(1, dtype=torch.float64),
                           torch.cumsum(torch.log1p(-sorted_alphas.double()), 0)])
        before_run = after.index_select(0, torch.cumsum(counts, 0) - counts).index_select(0, local)
        keep = (after[1:] - before_run > math.log(MIN_TRANSMITTANCE)) & (sorted_alphas > 0)
        keep = torch.nonzero(keep).squeeze(1)
        # The kept pairs are a prefix of each pixel's run (but for the skipped alpha < 1/255 ones,
        # which leave T as it is): their transmittance is unchanged by the cut.
        transmittances = torch.exp((after[:-1] - before_run).index_select(0, keep))
        ids, alphas, dx, dy = _select(order.index_select(0, keep), ids, alphas, dx, dy)
        local = local.index_select(0, keep)
        run_ends = torch.cumsum(torch.bincount(local, minlength=len(counts)), 0).index_select(0, local)
        yield VisiblePairs(ids, local + row_start[s], alphas, transmittances.to(alphas.dtype), run_ends, dx, dy)


def _alpha_pairs_in_spans(owner: Tensor, y: Tensor, row_start: Tensor, x0: Tensor, length: Tensor,
                          table: Tensor) -> tuple[Tensor, ...]:
    """Every pixel of every row span, in span order, with alpha set to 0 where gsplat skips the pair
    (alpha < 1/255 or sigma < 0): the spans hug the alpha = 1/255 ellipse, so these are too few
    to be worth a compaction.

    Args: per span (int32 but y): owner (flat Gaussian id), y (image row), row_start (pixel id of
        x = 0 in the chunk), x0, length; table [6, M]: mean x, mean y, conic a, b, c, opacity per
        flat Gaussian id.
    Returns: (flat Gaussian ids, pixel ids (int32, as row_start), alphas, dx, dy), [P] each
    """
    total = int(length.sum())
    span = torch.repeat_interleave(torch.arange(owner.numel(), dtype=torch.int32, device=owner.device), length,
                                   output_size=total)
    x = (torch.arange(total, dtype=torch.int32, device=owner.device)
         - (torch.cumsum(length, 0, dtype=torch.int32) - length - x0).index_select(0, span))
    ids = owner.index_select(0, span)
    pixels = row_start.index_select(0, span) + x.to(row_start.dtype)
    mean_x, mean_y, a, b, c, opacity = (column.index_select(0, ids) for column in table)
    dx = mean_x - (x.to(table.dtype) + 0.5)
    dy = mean_y - (y.index_select(0, span).to(table.dtype) + 0.5)
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alphas = torch.clamp(opacity * torch.exp(-sigma), max=MAX_ALPHA)
    alphas = torch.where((sigma >= 0) & (alphas >= ALPHA_THRESHOLD), alphas, 0.0)
    return ids, pixels, alphas, dx, dy


def _pixel_rows_inside_ellipses(means2d: Tensor, conics: Tensor, opacities: Tensor, width: int,
                                height: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per Gaussian and image row, the span of pixels whose centres can reach alpha >= 1/255.

    alpha >= 1/255  <=>  sigma(u, v) = 0.5 a u^2 + b u v + 0.5 c v^2 <= L = ln(255 opacity), with
    (u, v) the offset of the pixel centre from the mean. The ellipse spans |v| <= sqrt(2 L cov_yy)
    rows; on row v it spans u in (-b v +- sqrt(2 a L - v^2 det)) / a. Enumerating only these spans
    (instead of bounding boxes) makes the candidate pairs nearly the kept pairs.

    Args: means2d [G,2], conics [G,3], opacities [G] of the visible Gaussians.

    Returns: per row: owner [R] (index into the G Gaussians), y [R], first x [R], length [R]
        (clipped to the image; rows outside it are dropped).
    """
    a, b, c = conics.unbind(-1)
    det = (a * c - b * b).clamp(min=1e-20)
    level = torch.log(opacities.clamp(min=ALPHA_THRESHOLD) / ALPHA_THRESHOLD)
    half_y = torch.sqrt(2.0 * level * a / det)  # cov_yy = a / det(conic)
    y0 = torch.ceil(means2d[:, 1] - half_y - 0.5).clamp(0, height - 1).long()
    y1 = torch.floor(means2d[:, 1] + half_y - 0.5).clamp(-1, height - 1).long()
    n_rows = (y1 - y0 + 1).clamp(min=0)

    owner = torch.repeat_interleave(torch.arange(len(n_rows), device=n_rows.device), n_rows)
    y = y0.index_select(0, owner) + (torch.arange(owner.numel(), device=owner.device)
                                     - (torch.cumsum(n_rows, 0) - n_rows).index_select(0, owner))
    a, b, det, level = _select(owner, a, b, det, level)
    mean_x, mean_y = _select(owner, means2d[:, 0], means2d[:, 1])
    v = y.to(means2d.dtype) + 0.5 - mean_y
    root = torch.sqrt((2.0 * a * level - v * v * det).clamp(min=0.0))
    x0 = torch.ceil(mean_x + (-b * v - root) / a - 0.5).clamp(0, width - 1).long()
    x1 = torch.floor(mean_x + (-b * v + root) / a - 0.5).clamp(-1, width - 1).long()
    return owner, y, x0, (x1 - x0 + 1).clamp(min=0)


def _select(indices: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """``t[indices]`` for each tensor, via index_select (several times faster than advanced
    indexing on a CPU, and a boolean mask would repeat its nonzero for every tensor)."""
    return tuple(t.index_select(0, indices) for t in tensors)
