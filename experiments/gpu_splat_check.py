"""Everything the splat stage must show on a GPU, in one run (the lent GPU is scarce):

1. the GPU tests (tests/test_splat_gpu.py: gsplat vs torch backend on a synthetic scene);
2. the training benchmark: ``splat=<preset>`` on generated 400x400 classes, ``--runs`` runs per
   class, wall time of ``train_splats`` (median), held-out PSNR/SSIM and the final Gaussian count;
3. backend agreement on each *trained* scene at a held-out pose: PSNR between the gsplat and torch
   renders and the cosine between their gradients of the L1 loss against the real image.

Results go to ``<out>/splat_gpu_check.json`` and ``<out>/splat_gpu_check.md``. gsplat compiles its
CUDA code on first use; ``--gsplat-so`` loads an extension compiled by an earlier run instead (the
run copies the one it compiled to ``<out>/gsplat_cuda.so``).

    PYTHONPATH=. python experiments/gpu_splat_check.py --data <dataset root> --classes 01Ant 02Airplane \\
        --preset default --runs 3 --out results/
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_precompiled_gsplat(so_path: Path) -> None:
    """Make ``from gsplat import csrc`` (gsplat's first choice) find an already compiled extension,
    so gsplat skips its JIT build (the module inside is named gsplat_cuda)."""
    loader = importlib.machinery.ExtensionFileLoader("gsplat_cuda", str(so_path))
    spec = importlib.util.spec_from_file_location("gsplat_cuda", str(so_path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules["gsplat.csrc"] = module


def compile_or_load_gsplat(so_path: Path | None, out: Path) -> float:
    """Returns the seconds spent making gsplat's CUDA code available."""
    start = time.perf_counter()
    if so_path and so_path.is_file():
        load_precompiled_gsplat(so_path)
    from gsplat.cuda._backend import _C  # compiles here when nothing was loaded

    if _C is None:
        raise RuntimeError("gsplat could not build its CUDA extension (no CUDA toolkit found)")
    seconds = time.perf_counter() - start
    if not (so_path and so_path.is_file()):
        shutil.copy2(_C.__file__, out / "gsplat_cuda.so")
    return seconds


def run_gpu_tests(out: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                             str(REPO / "tests" / "test_splat_gpu.py")], capture_output=True, text=True, cwd=REPO)
    (out / "gpu_tests.txt").write_text(result.stdout + result.stderr)
    return {"returncode": result.returncode, "summary": result.stdout.strip().splitlines()[-1:]}


def train_once(data, cfg, work: Path) -> dict:
    from splatpose.splat.train import METRICS_NAME, train_splats

    torch.cuda.synchronize()
    start = time.perf_counter()
    ply = train_splats(data, None, None, cfg, work, {"accelerator": "gpu", "devices": 1,
                                                     "enable_progress_bar": False, "logger": False})
    torch.cuda.synchronize()
    metrics = json.loads((work / METRICS_NAME).read_text())
    return {**metrics, "wall_seconds": round(time.perf_counter() - start, 2), "ply": str(ply)}


def backend_agreement(data, ply: Path, view_index: int) -> dict:
    """gsplat vs torch on a trained scene at a held-out pose: image PSNR and gradient cosines."""
    from splatpose.data.mad_sim import read_image
    from splatpose.splat.gaussians import Gaussians
    from splatpose.splat.losses import psnr
    from splatpose.splat.ply import load_gaussians
    from splatpose.splat.rendering import render

    scene = load_gaussians(ply, "cuda")
    view = data.train[view_index]
    target = torch.as_tensor(read_image(view.path), device="cuda")[None]
    w2c = torch.as_tensor(view.w2c, dtype=torch.float32, device="cuda")
    K = torch.as_tensor(data.K, dtype=torch.float32, device="cuda")
    results, grads = {}, {}
    for backend in ("gsplat", "torch"):
        params = {k: v.clone().requires_grad_(True) for k, v in scene.as_dict().items()}
        torch.cuda.synchronize()
        start = time.perf_counter()
        rgb = render(Gaussians.from_dict(params), w2c, K, data.width, data.height, backend=backend)
        (rgb - target).abs().mean().backward()
        torch.cuda.synchronize()
        results[backend] = rgb.detach().clamp(0, 1)
        grads[backend] = {k: p.grad for k, p in params.items()}
        grads[backend]["colours"] = torch.cat([grads[backend]["sh0"], grads[backend]["shN"]], 1)
        grads[backend]["seconds"] = time.perf_counter() - start

    def cosine(name: str) -> float:
        a, b = grads["gsplat"][name].flatten().double(), grads["torch"][name].flatten().double()
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    return {"view": view.name, "num_gaussians": len(scene),
            "psnr_between_backends": float(psnr(results["torch"], results["gsplat"])),
            "psnr_gsplat_vs_image": float(psnr(results["gsplat"], target)),
            "grad_cosine": {name: round(cosine(name), 5) for name in ("means", "colours", "opacities", "scales", "quats")},
            "seconds_fwd_bwd": {b: round(grads[b]["seconds"], 4) for b in ("gsplat", "torch")}}


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# Splat GPU check ({report['device']}, {report['date']})", "",
             f"Command: `{report['command']}`", "",
             f"gsplat CUDA extension ready in {report['gsplat_setup_seconds']:.1f} s; GPU tests: "
             f"{' '.join(report['gpu_tests']['summary'])}", "",
             f"## Training, splat={report['preset']} ({report['runs']} runs per class)", "",
             "| class | size | train views | median wall s | runs (s) | fit s (median) | held-out PSNR | SSIM | Gaussians |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, c in report["classes"].items():
        lines.append(f"| {name} | {c['size']} | {c['num_train_views']} | {c['median_wall_seconds']:.1f} | "
                     f"{', '.join(f'{s:.1f}' for s in c['wall_seconds'])} | {c['median_fit_seconds']:.1f} | "
                     f"{c['psnr']:.2f} | {c['ssim']:.4f} | {c['num_gaussians']} |")
    lines += ["", "## Backend agreement on the trained scenes (held-out pose, L1 loss vs the image)", "",
              "| class | Gaussians | PSNR torch vs gsplat | cos means | cos colours | cos opacities | cos scales | cos quats | fwd+bwd s gsplat / torch |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, a in report["agreement"].items():
        g = a["grad_cosine"]
        lines.append(f"| {name} | {a['num_gaussians']} | {a['psnr_between_backends']:.2f} | {g['means']:.4f} | "
                     f"{g['colours']:.4f} | {g['opacities']:.4f} | {g['scales']:.4f} | {g['quats']:.4f} | "
                     f"{a['seconds_fwd_bwd']['gsplat']:.4f} / {a['seconds_fwd_bwd']['torch']:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="dataset root (MAD-Sim layout)")
    parser.add_argument("--classes", nargs="+", required=True)
    parser.add_argument("--preset", default="default", help="conf/splat/<preset>.yaml")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gsplat-so", type=Path, default=None, help="a gsplat_cuda.so from an earlier run")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], help="splat config overrides, key=value")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from omegaconf import OmegaConf

    from splatpose.data.mad_sim import load_class

    report = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "command": " ".join(sys.argv), "preset": args.preset, "runs": args.runs}
    report["gsplat_setup_seconds"] = compile_or_load_gsplat(args.gsplat_so, args.out)
    print(f"gsplat ready in {report['gsplat_setup_seconds']:.1f} s", flush=True)
    report["gpu_tests"] = {"summary": ["skipped"]} if args.skip_tests else run_gpu_tests(args.out)
    print("gpu tests:", report["gpu_tests"]["summary"], flush=True)

    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "splat" / f"{args.preset}.yaml"),
                          OmegaConf.from_dotlist(args.set))
    report["splat_config"] = OmegaConf.to_container(cfg)
    report["classes"], report["agreement"] = {}, {}
    for name in args.classes:
        data = load_class(args.data, name)
        runs = []
        for run in range(args.runs):
            work = Path(tempfile.mkdtemp(prefix=f"splat-{name}-{run}-"))
            runs.append(train_once(data, cfg, work))
            print(name, run, {k: runs[-1][k] for k in ("wall_seconds", "train_seconds", "psnr", "num_gaussians")}, flush=True)
        report["classes"][name] = {
            "size": f"{data.width}x{data.height}", "num_train_views": runs[0]["num_train_views"],
            "wall_seconds": [r["wall_seconds"] for r in runs],
            "median_wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
            "median_fit_seconds": statistics.median(r["train_seconds"] for r in runs),
            "psnr": statistics.median(r["psnr"] for r in runs), "ssim": statistics.median(r["ssim"] for r in runs),
            "num_gaussians": int(statistics.median(r["num_gaussians"] for r in runs)), "runs": runs}
        holdout = next(i for i, v in enumerate(data.train) if v.name == runs[0]["eval_views"][1])
        report["agreement"][name] = backend_agreement(data, Path(runs[0]["ply"]), holdout)
        print(name, "agreement", report["agreement"][name], flush=True)
        (args.out / "splat_gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        write_markdown(report, args.out / "splat_gpu_check.md")


if __name__ == "__main__":
    main()
