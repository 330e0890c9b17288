"""3D Gaussian Splatting: parameters, two rasterizer backends (gsplat CUDA, pure torch), training, PLY io.

    ply = train_splats(data, points_xyz, points_rgb, cfg.splat, out_dir, trainer_kwargs)   # -> point_cloud.ply
    gaussians = load_gaussians(ply, device)
    rgb = render(gaussians, w2c, K, width, height)      # [B,H,W,3] on white, OpenCV w2c [B,4,4]

Modules: gaussians (the parameters and their initialisation), torch_rasterizer (the CPU backend),
rendering (backend dispatch, ``rasterize`` with gsplat's signature, ``render``), losses (L1 + D-SSIM,
PSNR), module (the LightningModule), train (the stage function), ply (3DGS PLY io).
"""

from splatpose.splat.gaussians import Gaussians, init_gaussians
from splatpose.splat.ply import load_gaussians, load_ply, save_ply
from splatpose.splat.rendering import rasterize, render, resolve_backend
from splatpose.splat.train import train_splats

__all__ = ["Gaussians", "init_gaussians", "load_gaussians", "load_ply", "rasterize", "render", "resolve_backend",
           "save_ply", "train_splats"]
