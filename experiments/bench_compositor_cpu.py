"""The CPU rasterizer's two compositors on a finished run's splats: agreement and time per training step.

For a few train views of the run's class, one render of the splats (all SH degrees, white background,
gsplat's absgrad on, as training renders them) and one backward of a fixed weighted sum of the image and
its alpha, with ``splat.backend=torch`` (the chunked torch compositor) and ``numba`` (the fused kernels of
``splatpose.splat.numba_compositor``; projection and SH in torch for both). Prints the composited pairs,
the largest pixel difference, the relative difference of every gradient, and forward / backward
milliseconds (the second of two calls: the first compiles or warms up).

    python experiments/bench_compositor_cpu.py outputs/runs/synthetic/01Ant/<time> --threads 2 --scale 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from splatpose.data import resolve_dataset
from splatpose.splat.numba_compositor import composite as numba_composite
from splatpose.splat.ply import load_gaussians
from splatpose.splat.torch_rasterizer import rasterize_torch
from splatpose.splat.train import load_posed_views


def step(gaussians, w2c, K, width: int, height: int, compositor: str):
    """One training-like render and backward: (rgb, alpha, grads by name, absgrad, forward s, backward s, pairs)."""
    params = {name: getattr(gaussians, name).detach().clone().requires_grad_(True)
              for name in ("means", "sh_coeffs", "opacities", "scales", "quats")}
    started = time.perf_counter()
    rgb, alpha, info = rasterize_torch(params["means"], F.normalize(params["quats"], dim=-1), torch.exp(params["scales"]),
                                       torch.sigmoid(params["opacities"]), params["sh_coeffs"], w2c[None].float(),
                                       K[None].float(), width, height, sh_degree=gaussians.sh_degree,
                                       backgrounds=torch.ones(1, 3), absgrad=True,
                                       compositor=numba_composite if compositor == "numba" else None)
    info["means2d"].retain_grad()
    forward = time.perf_counter() - started
    weights = torch.linspace(0, 1, rgb.numel()).reshape(rgb.shape)
    started = time.perf_counter()
    ((rgb * weights).sum() + 0.3 * alpha.sum()).backward()
    backward = time.perf_counter() - started
    grads = {name: p.grad for name, p in params.items()}
    return rgb.detach(), alpha.detach(), grads, info["means2d"].absgrad, forward, backward, info["n_pairs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run folder (results.json)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0, help="render size relative to the class's images")
    parser.add_argument("--views", type=int, nargs="+", default=[0, 5])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = json.loads((args.run / "results.json").read_text())
    data = resolve_dataset(OmegaConf.create(results["config"]).dataset, results["class"])
    gaussians = load_gaussians(results["gaussians_ply"])
    views = load_posed_views(data)
    K = (views.K if views.K.dim() == 2 else views.K[0]).clone()
    K[:2] *= args.scale
    width, height = round(data.width * args.scale), round(data.height * args.scale)
    print(f"{results['dataset']}/{results['class']}: {len(gaussians.means)} Gaussians, {width}x{height}, "
          f"{args.threads} thread(s)")
    for view in args.views:
        torch_run = [step(gaussians, views.w2c[view], K, width, height, "torch") for _ in range(2)][-1]
        numba_run = [step(gaussians, views.w2c[view], K, width, height, "numba") for _ in range(2)][-1]
        gradients = " ".join(f"{name} {float((a - numba_run[2][name]).norm() / a.norm().clamp(min=1e-12)):.1e}"
                             for name, a in torch_run[2].items())
        print(f"view {view}: pairs {torch_run[6]} / {numba_run[6]}; max |rgb diff| "
              f"{float((torch_run[0] - numba_run[0]).abs().max()):.1e}, |alpha diff| "
              f"{float((torch_run[1] - numba_run[1]).abs().max()):.1e}; gradients (relative) {gradients}; "
              f"absgrad {float((torch_run[3] - numba_run[3]).norm() / torch_run[3].norm()):.1e}")
        print(f"    ms: torch forward {1e3 * torch_run[4]:.0f} backward {1e3 * torch_run[5]:.0f} | "
              f"numba forward {1e3 * numba_run[4]:.0f} backward {1e3 * numba_run[5]:.0f}")


if __name__ == "__main__":
    main()
