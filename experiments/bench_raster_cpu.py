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
    # 4. training: --steps of splat=fast from scratch with either rasterizer (ms/step, held-out PSNR)
    python experiments/bench_raster_cpu.py train --baseline 75ab20b --steps 150 --out train.json

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


def activated(gaussians, requires_grad: bool) -> dict:
    """Fresh leaf copies of the scene's raw parameters (``render_with`` activates them)."""
    return {k: v.detach().clone().requires_grad_(requires_grad) for k, v in gaussians.as_dict().items()}


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
                    # candidates the rasterizer enumerates, those with alpha >= 1/255, and those kept
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
                m2d_scale = float(m2d_a.abs().max()) or 1.0
                worst["grad"] = max(worst["grad"], float((m2d_a - m2d_b).abs().max()) / m2d_scale)
            row = {"class": name, "size": f"{width}x{height}", "gaussians": len(gaussians.means), "views": n_views - 1}
            for key in variants:
                f, b = (1000 * sum(v) / len(v) for v in (times[key]["forward"], times[key]["backward"]))
                row[f"{key}_fwd_ms"], row[f"{key}_bwd_ms"], row[f"{key}_ms"] = round(f, 1), round(b, 1), round(f + b, 1)
            row["speedup"] = round(row["before_ms"] / row["after_ms"], 2)
            row["max_abs_image_diff"] = f"{worst['image']:.1e}"
            row["max_rel_grad_diff"] = f"{worst['grad']:.1e}"
            print(row, flush=True)


VIEW_OPS = {"view", "slice", "select", "expand", "t", "transpose", "unsqueeze", "squeeze", "as_strided", "detach",
            "alias", "_unsafe_view", "unbind", "split", "split_with_sizes", "permute", "_reshape_alias", "unfold",
            "lift_fresh", "_to_copy_noop"}


def traffic(args) -> None:
    """Bytes that torch ops read and write in one forward + backward (every tensor argument and
    result of every non-view op, as if each streamed through memory), per kept and per candidate pair."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from splatpose.splat import torch_rasterizer as new

    class Traffic(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes, self.ops = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__.rstrip("_") not in VIEW_OPS:
                self.ops += 1
                self.bytes += sum(t.nbytes for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
            return out

    variants = {"before": module_at(args.baseline), "after": new}
    for name in args.classes:
        for scale in args.scale:
            gaussians, views, K, width, height = load_scene(args.snapshots, name, args.data, scale)
            row = {"class": name, "size": f"{width}x{height}"}
            for key, module in variants.items():
                params = activated(gaussians, True)
                with Traffic() as counter:
                    rgb, alpha, info = render_with(module, params, gaussians.sh_degree, views.w2c[1], K, width, height)
                    (rgb.sum() + alpha.sum()).backward()
                row["kept_pairs"] = info["n_pairs"]
                row[f"{key}_ops"], row[f"{key}_MB"] = counter.ops, round(counter.bytes / 1e6)
                row[f"{key}_B_per_pair"] = round(counter.bytes / info["n_pairs"])
            print(row, flush=True)


def ops(args) -> None:
    """torch.profiler's self CPU time per aten op over forward + backward of a few views, per rasterizer."""
    from torch.profiler import ProfilerActivity, profile

    from splatpose.splat import torch_rasterizer as new

    variants = {"before": module_at(args.baseline), "after": new}
    for name in args.classes:
        for scale in args.scale:
            gaussians, views, K, width, height = load_scene(args.snapshots, name, args.data, scale)
            for key, module in variants.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for i in range(1, args.views + 1):
                        params = activated(gaussians, True)
                        rgb, alpha, info = render_with(module, params, gaussians.sh_degree, views.w2c[i], K,
                                                       width, height)
                        (rgb.sum() + alpha.sum()).backward()
                print(f"## {name} {width}x{height} {key}: {args.views} views, self CPU time per op\n")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18,
                                                max_name_column_width=40), flush=True)


def train(args) -> None:
    """``train_splats`` for ``--steps`` steps of splat=fast from scratch with the baseline's rasterizer and
    the working tree's, alternating which goes first per class; ms/step, held-out PSNR, Gaussians."""
    from splatpose.data.mad_sim import load_class
    from splatpose.splat import rendering
    from splatpose.splat import torch_rasterizer as new
    from splatpose.splat.train import METRICS_NAME, train_splats

    variants = {"before": module_at(args.baseline).rasterize_torch, "after": new.rasterize_torch}
    variants = {k: v for k, v in variants.items() if k in args.variants}
    if args.chunk:  # another chunk size changes only the rounding of the sums: a noise check for PSNR
        new.PAIR_CHUNK = args.chunk
    root = dataset_root(args.data)
    rows = []
    for k, name in enumerate(args.classes):
        data = load_class(root, name)
        for key in (list(variants) if k % 2 == 0 else list(variants)[::-1]):
            rendering.rasterize_torch = variants[key]
            cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "splat" / "fast.yaml"),
                                  OmegaConf.from_dotlist([f"steps={args.steps}", f"eval.every_n_steps={args.steps}",
                                                          f"checkpoint_every={args.steps}", "eval.save_renders=false"]))
            work = Path(tempfile.mkdtemp(prefix=f"raster-train-{name}-{key}-"))
            start = time.perf_counter()
            train_splats(data, None, None, cfg, work,
                         {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False})
            wall = time.perf_counter() - start
            metrics = json.loads((work / METRICS_NAME).read_text())
            rows.append({"class": name, "rasterizer": key, "chunk": new.PAIR_CHUNK if key == "after" else None,
                         "steps": args.steps, "wall_s": round(wall, 1),
                         "fit_s": metrics["train_seconds"],
                         "ms_per_step": round(1000 * metrics["train_seconds"] / args.steps, 1),
                         "gaussians": metrics["num_gaussians"], "psnr": round(metrics["psnr"], 3),
                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
            print(rows[-1], flush=True)
    if args.out:
        args.out.write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["snapshot", "count", "ab", "train", "traffic", "ops"])
    parser.add_argument("--classes", nargs="+", default=["05PlainNut", "01Ant"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="synthetic dataset cache")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--snapshots", type=Path)
    parser.add_argument("--scale", type=int, nargs="+", default=[1])
    parser.add_argument("--views", type=int, default=12)
    parser.add_argument("--baseline", default="HEAD")
    parser.add_argument("--variants", nargs="+", default=["before", "after"], help="train: which to run")
    parser.add_argument("--chunk", type=int, default=None, help="train: PAIR_CHUNK of the working tree's")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    {"snapshot": snapshot, "count": count, "ab": ab, "train": train, "traffic": traffic,
     "ops": ops}[args.mode](args)


if __name__ == "__main__":
    main()
