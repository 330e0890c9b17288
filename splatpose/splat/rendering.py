"""One rasterizer signature, two backends, and ``render`` for a whole scene.

``rasterize`` has the signature of ``gsplat.rasterization`` and returns its ``(colors, alphas,
info)``. ``backend="gsplat"`` calls gsplat's CUDA rasterizer; ``backend="torch"`` calls the
pure-PyTorch rasterizer of :mod:`splatpose.splat.torch_rasterizer` (any device, CPU included);
``backend="numba"`` is the same rasterizer with its compositing step in fused CPU kernels
(:mod:`splatpose.splat.numba_compositor`: the same images and gradients to ~1e-6, 2-6x faster per
training step); ``backend="auto"`` picks gsplat for CUDA tensors and numba otherwise. All run in
gsplat's non-packed mode, so ``info`` has the same keys and shapes and gsplat's densification
strategies work with any of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from splatpose.splat.gaussians import Gaussians
from splatpose.splat.torch_rasterizer import rasterize_torch

BACKENDS = ("auto", "gsplat", "torch", "numba")
# The backends of splatpose.splat.torch_rasterizer (projection in torch, on any device).
TORCH_BACKENDS = ("torch", "numba")
WHITE = (1.0, 1.0, 1.0)


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """'auto' -> 'gsplat' for CUDA tensors, else 'numba'; checks that the choice can run there."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"splat.backend={backend!r} is unknown; choose one of {BACKENDS}")
    if backend == "auto":
        return "gsplat" if device.type == "cuda" else "numba"
    if backend == "gsplat" and device.type != "cuda":
        raise ValueError(f"splat.backend=gsplat needs CUDA tensors (gsplat has no CPU path), got "
                         f"device {device}; use splat.backend=numba, torch or auto on this machine")
    if backend == "numba" and device.type != "cpu":
        raise ValueError(f"splat.backend=numba composites on the CPU, got device {device}; use "
                         f"splat.backend=gsplat or auto on a GPU")
    return backend


def rasterize(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
              viewmats: Tensor, Ks: Tensor, width: int, height: int, *, backend: str = "auto",
              sh_degree: int | None = None, backgrounds: Tensor | None = None,
              packed: bool = False, absgrad: bool = False, eps2d: float = 0.3,
              near_plane: float = 0.01, far_plane: float = 1e10, radius_clip: float = 0.0,
              rasterize_mode: str = "classic", covars: Tensor | None = None) -> tuple[Tensor, Tensor, dict]:
    """Rasterize N Gaussians into C cameras (arguments as ``gsplat.rasterization``).

    Args:
        means [N,3], quats [N,4] (w,x,y,z), scales [N,3] (std-devs, activated), opacities [N]
        (in [0,1]), colors [N,D] or SH coefficients [N,K,3] with ``sh_degree``,
        viewmats [C,4,4] world-to-camera (OpenCV axes), Ks [C,3,3], backgrounds [C,D],
        covars [N,3,3] world covariances or None (when given, quats and scales are ignored)

    Returns: colors [C,H,W,D], alphas [C,H,W,1], info (see ``rasterize_torch``)
    """
    backend = resolve_backend(backend, means.device)
    kwargs = dict(sh_degree=sh_degree, backgrounds=backgrounds, packed=packed, absgrad=absgrad,
                  eps2d=eps2d, near_plane=near_plane, far_plane=far_plane, radius_clip=radius_clip,
                  rasterize_mode=rasterize_mode, covars=covars)
    if backend == "gsplat":
        from gsplat import rasterization  # compiles its CUDA code on first use

        return rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                             **kwargs)
    compositor = None
    if backend == "numba":
        from splatpose.splat.numba_compositor import composite as compositor  # compiles its kernels on first use
    return rasterize_torch(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                           compositor=compositor, **kwargs)


def activated(gaussians: Gaussians) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The rasterizer's geometry of a scene from its raw parameters: means [N, 3], unit quats [N, 4],
    scales [N, 3] (exp) and opacities [N] (sigmoid)."""
    return (gaussians.means, torch.nn.functional.normalize(gaussians.quats, dim=-1), torch.exp(gaussians.scales),
            torch.sigmoid(gaussians.opacities))


def render(gaussians: Gaussians, w2c: Tensor, K: Tensor, width: int, height: int,
           backend: str = "auto", sh_degree: int | None = None,
           background: tuple[float, float, float] = WHITE, return_alpha: bool = False,
           return_info: bool = False, absgrad: bool = False, rasterize_mode: str = "classic"):
    """Render a scene from B cameras on a plain background (white by default).

    Args:
        gaussians: the scene (raw parameters; activated here)
        w2c: [B,4,4] or [4,4] world-to-camera, OpenCV axes (x right, y down, z forward)
        K: [3,3] shared or [B,3,3] per-camera intrinsics, pixel centres at (x+0.5, y+0.5)
        width, height: image size in pixels
        backend: "auto" | "gsplat" | "torch" | "numba"
        sh_degree: SH degree to evaluate (default: all the scene has)
        background: RGB in [0,1]
        absgrad: also accumulate ``info["means2d"].absgrad`` (AbsGS densification)
        rasterize_mode: "classic" or "antialiased" (Mip-Splatting's 2D filter compensation)

    Returns: rgb [B,H,W,3] (not clamped; use ``.clamp(0, 1)`` for display), plus alpha
        [B,H,W,1] when ``return_alpha`` and the rasterizer's info dict when ``return_info``.
    """
    if w2c.dim() == 2:
        w2c = w2c[None]
    n_cameras = w2c.shape[0]
    Ks = K.expand(n_cameras, 3, 3) if K.dim() == 2 else K
    if Ks.shape != (n_cameras, 3, 3):
        raise ValueError(f"K must be [3,3] or [{n_cameras},3,3] to match w2c, got {tuple(K.shape)}")
    if n_cameras > 1 and not return_info and resolve_backend(backend, gaussians.means.device) in TORCH_BACKENDS:
        # The torch rasterizer rounds differently for another batch size (batched projections, one
        # transmittance sum over every camera's pixels), which can flip a pixel at its stop rule (seen:
        # 8e-4 in one pixel of one pose). One camera at a time, a pose renders the same alone as in a
        # batch: the detector's single-image renders equal the evaluation's batched ones.
        options = dict(backend=backend, sh_degree=sh_degree, background=background, return_alpha=return_alpha,
                       absgrad=absgrad, rasterize_mode=rasterize_mode)
        outputs = [render(gaussians, w2c[c:c + 1], Ks[c:c + 1], width, height, **options) for c in range(n_cameras)]
        if return_alpha:
            return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])
        return torch.cat(outputs)
    dtype, device = gaussians.means.dtype, gaussians.means.device
    # filled on the device: a tensor copied from host memory would wait for the GPU every step
    backgrounds = torch.stack([torch.full((n_cameras,), float(v), dtype=dtype, device=device) for v in background], -1)
    degree = gaussians.sh_degree if sh_degree is None else min(sh_degree, gaussians.sh_degree)
    rgb, alpha, info = rasterize(
        *activated(gaussians),
        gaussians.sh_coeffs,
        w2c.to(device=device, dtype=dtype),
        Ks.to(device=device, dtype=dtype),
        width, height, backend=backend, sh_degree=degree, backgrounds=backgrounds, absgrad=absgrad,
        rasterize_mode=rasterize_mode)
    outputs = (rgb,) + ((alpha,) if return_alpha else ()) + ((info,) if return_info else ())
    return outputs[0] if len(outputs) == 1 else outputs
