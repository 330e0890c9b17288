"""The CPU (torch) rasterizer on realistic scenes: pair counts, the memory floor, and A/B timing.

Scenes are snapshots of splat training (``train_splats``, ``splat=fast``, the first ``--steps`` steps, the
slice that experiments/profile_splat_step.py profiles) on generated classes; views are the class's train
views, at the data's size or scaled up (``--scale 2``: 400x400 from a 200x200 class, K scaled alike).

    # 1. snapshot: train the first 150 steps and keep the PLY
    python experiments/bench_raster_cpu.py snapshot --classes 05PlainNut 01Ant --steps 150 --out /tmp/snap
    # 2. counts: Gaussians, candidate pairs, kept pairs per view (no timing)
    python experiments/bench_raster_cpu.py count --snapshots /tmp/snap --scale 1 2
    # 3. A/B: forward + backward of a baseline rasterizer (a git revision's module) and the working
    #    tree's, interleaved view by view in one process; images and gradients compared
    python experiments/bench_raster_cpu.py ab --snapshots /tmp/snap --baseline 75ab20b --views 12

Run with OMP_NUM_THREADS=1 on a shared machine: both variants then see the same contention.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / ".cache" / "splatpose" / "synthetic"


def dataset_root(path: Path) -> Path:
    """The synthetic dataset folder (``synthetic-<key>``) under ``path``, or ``path`` itself."""
    found = sorted(path.glob("synthetic-*"))
    return found[0] if found else path


def snapshot(args) -> None:
    from splatpose.data.mad_sim import load_class
    from splatpose.splat.train import METRICS_NAME, PLY_NAME, train_splats

    root = dataset_root(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.classes:
        cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "splat" / "fast.yaml"),
                              OmegaConf.from_dotlist([f"steps={args.steps}", f"eval.every_n_steps={args.steps}",
                                                      f"checkpoint_every={args.steps}", "eval.save_renders=false"]))
        work = Path(tempfile.mkdtemp(prefix=f"raster-snap-{name}-"))
        start = time.perf_counter()
        train_splats(load_class(root, name), None, None, cfg, work,
                     {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False})
        wall = time.perf_counter() - start
        metrics = json.loads((work / METRICS_NAME).read_text())
        (args.out / f"{name}.ply").write_bytes((work / PLY_NAME).read_bytes())
        info = {"class": name, "steps": args.steps, "wall_s": round(wall, 1), "fit_s": metrics["train_seconds"],
                "ms_per_step": round(1000 * metrics["train_seconds"] / args.steps, 1),
                "gaussians": metrics["num_gaussians"], "psnr": round(metrics["psnr"], 2),
                "dataset": str(root), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        (args.out / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
        print(info, flush=True)


def load_scene(snapshots: Path, name: str, data_root: Path, scale: int):
    from splatpose.data.mad_sim import load_class
    from splatpose.splat.ply import load_ply
    from splatpose.splat.train import load_posed_views

    gaussians = load_ply(snapshots / f"{name}.ply")
    views = load_posed_views(load_class(dataset_root(data_root), name))
    K = views.K.clone()
    K[:2] *= scale
    width, height = views.images.shape[2] * scale, views.images.shape[1] * scale
    return gaussians, views, K, width, height


def module_at(revision: str):
    """The rasterizer module as it is at a git revision, imported under another name."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:splatpose/splat/torch_rasterizer.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="raster-baseline-")) / f"torch_rasterizer_{revision}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def activated(gaussians, requires_grad: bool):
    from splatpose.splat.rendering import WHITE  # noqa: F401  (white background, as training)

    params = {k: v.detach().clone().requires_grad_(requires_grad) for k, v in gaussians.as_dict().items()}
    return params


def render_with(module, params: dict, sh_degree: int, w2c, K, width, height):
    """One training-like render (white background, SH colours) with ``module.rasterize_torch``."""
    coeffs = torch.cat([params["sh0"], params["shN"]], 1)
    backgrounds = torch.ones(1, 3, dtype=params["means"].dtype)
    return module.rasterize_torch(
        params["means"], torch.nn.functional.normalize(params["quats"], dim=-1), torch.exp(params["scales"]),
        torch.sigmoid(params["opacities"]), coeffs, w2c[None], K[None], width, height, sh_degree=sh_degree,
        backgrounds=backgrounds)


def count(args) -> None:
    from splatpose.splat import torch_rasterizer as tr

    rows = []
    for name in args.classes:
        for scale in args.scale:
            gaussians, views, K, width, height = load_scene(args.snapshots, name, args.data, scale)
            sh_degree = gaussians.sh_degree
            totals = dict(visible=0, bbox=0, ellipse=0, enumerated=0, alpha_pass=0, kept=0, pixels=0)
            n_views = min(args.views, len(views))
            for i in range(n_views):
                params = activated(gaussians, False)
                with torch.no_grad():
                    w2c = views.w2c[i]
                    projection = tr.project_gaussians(
                        params["means"], torch.nn.functional.normalize(params["quats"], dim=-1),
                        torch.exp(params["scales"]), torch.sigmoid(params["opacities"]), w2c[None], K[None],
                        width, height)
                    radii = projection["radii"][0]
                    visible = (radii > 0).all(-1)
                    totals["visible"] += int(visible.sum())
                    totals["bbox"] += int(((2 * radii[visible, 0] + 1) * (2 * radii[visible, 1] + 1)).sum())
                    m2d, con, opa = (projection[k][0][visible] for k in ("means2d", "conics", "opacities"))
                    _, _, _, length = tr._pixel_rows_inside_ellipses(m2d, con, opa, width, height)
                    totals["ellipse"] += int(length.sum())
                    # pairs enumerated by the slab walk (after skipping saturated rows) and kept
                    stats = {}
                    chunks = list(tr.visible_pair_chunks(
                        projection["means2d"][0], projection["conics"][0], projection["opacities"][0],
                        projection["depths"][0], radii, len(radii), width, height, stats=stats))
                    totals["enumerated"] += stats["enumerated"]
                    totals["alpha_pass"] += stats["alpha_pass"]
                    totals["kept"] += sum(len(c.ids) for c in chunks)
                    totals["pixels"] += sum(int(torch.unique(c.pixels).numel()) for c in chunks)
            row = {"class": name, "size": f"{width}x{height}", "gaussians": len(gaussians.means), "views": n_views}
            row.update({k: round(v / n_views) for k, v in totals.items()})
            rows.append(row)
            print(row, flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


def ab(args) -> None:
    from splatpose.splat import torch_rasterizer as new

    old = module_at(args.baseline)
    variants = {"before": old, "after": new}
    for name in args.classes:
        for scale in args.scale:
            gaussians, views, K, width, height = load_scene(args.snapshots, name, args.data, scale)
            times = {k: {"forward": [], "backward": []} for k in variants}
            worst = {"image": 0.0, "grad": 0.0}
            n_views = min(args.views, len(views))
            weights_gen = torch.Generator().manual_seed(0)
            for i in range(n_views):
                w2c = views.w2c[i]
                weights = torch.rand(1, height, width, 3, generator=weights_gen)
                results = {}
                order = list(variants) if i % 2 == 0 else list(variants)[::-1]
                for key in order:
                    params = activated(gaussians, True)
                    start = time.perf_counter()
                    rgb, alpha, info = render_with(variants[key], params, gaussians.sh_degree, w2c, K, width, height)
                    info["means2d"].retain_grad()
                    middle = time.perf_counter()
                    ((rgb * weights).sum() + alpha.sum()).backward()
                    end = time.perf_counter()
                    if i > 0:  # the first view warms up allocators
                        times[key]["forward"].append(middle - start)
                        times[key]["backward"].append(end - middle)
                    results[key] = (rgb.detach(), {k: v.grad for k, v in params.items()}, info["means2d"].grad)
                rgb_a, grads_a, m2d_a = results["before"]
                rgb_b, grads_b, m2d_b = results["after"]
                worst["image"] = max(worst["image"], float((rgb_a - rgb_b).abs().max()))
                for k in grads_a:
                    scale_k = float(grads_a[k].abs().max()) or 1.0
                    worst["grad"] = max(worst["grad"], float((grads_a[k] - grads_b[k]).abs().max()) / scale_k)
                worst["grad"] = max(worst["grad"], float((m2d_a - m2d_b).abs().max()) / (float(m2d_a.abs().max()) or 1.0))
            row = {"class": name, "size": f"{width}x{height}", "gaussians": len(gaussians.means), "views": n_views - 1}
            for key in variants:
                f, b = (1000 * sum(v) / len(v) for v in (times[key]["forward"], times[key]["backward"]))
                row[f"{key}_fwd_ms"], row[f"{key}_bwd_ms"], row[f"{key}_ms"] = round(f, 1), round(b, 1), round(f + b, 1)
            row["speedup"] = round(row["before_ms"] / row["after_ms"], 2)
            row["max_abs_image_diff"] = f"{worst['image']:.1e}"
            row["max_rel_grad_diff"] = f"{worst['grad']:.1e}"
            print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["snapshot", "count", "ab"])
    parser.add_argument("--classes", nargs="+", default=["05PlainNut", "01Ant"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="synthetic dataset cache")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--snapshots", type=Path)
    parser.add_argument("--scale", type=int, nargs="+", default=[1])
    parser.add_argument("--views", type=int, default=12)
    parser.add_argument("--baseline", default="HEAD")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    {"snapshot": snapshot, "count": count, "ab": ab}[args.mode](args)


if __name__ == "__main__":
    main()
