"""Compare variants of a splat preset on existing classes: held-out PSNR, Gaussians, time.

Each variant is a list of ``key=value`` overrides of ``conf/splat/<preset>.yaml``; every (variant,
class) is trained once from scratch with the pipeline's ``train_splats`` (no SfM points: the
silhouette-carved initialisation). Used to tune the quick preset on a GPU, where a 700-step run
takes seconds instead of minutes (the gsplat and torch backends agree to > 100 dB, see
experiments/results/splat_gpu.md), before confirming the choice with the torch rasterizer on a CPU.

    python experiments/splat_preset_sweep.py --data <dataset root> --classes 01Ant 03Nut --preset fast \\
        --variant base --variant sh0x4 lr.sh0=1e-2 --accelerator gpu --out sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def parse_variants(groups: list[list[str]]) -> dict[str, list[str]]:
    """[["name", "k=v", ...], ...] -> {name: ["k=v", ...]}."""
    variants = {}
    for name, *overrides in groups:
        if "=" in name:
            raise SystemExit(f"--variant takes a name first, then key=value overrides; got {name!r}")
        variants[name] = overrides
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="dataset root (MAD-Sim layout)")
    parser.add_argument("--classes", nargs="+", required=True)
    parser.add_argument("--preset", default="fast", help="conf/splat/<preset>.yaml")
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [KEY=VALUE ...]")
    parser.add_argument("--accelerator", default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="JSON results (a markdown table beside it)")
    args = parser.parse_args()

    from splatpose.data.mad_sim import load_class
    from splatpose.splat.train import METRICS_NAME, train_splats

    base = OmegaConf.load(REPO / "conf" / "splat" / f"{args.preset}.yaml")
    rows = []
    for name, overrides in parse_variants(args.variant).items():
        cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
        for class_name in args.classes:
            data = load_class(args.data, class_name)
            work = Path(tempfile.mkdtemp(prefix=f"sweep-{name}-{class_name}-"))
            start = time.perf_counter()
            train_splats(data, None, None, cfg, work, {"accelerator": args.accelerator, "devices": 1,
                                                       "enable_progress_bar": False, "logger": False})
            metrics = json.loads((work / METRICS_NAME).read_text())
            rows.append({"variant": name, "overrides": " ".join(overrides), "class": class_name,
                         "psnr": round(metrics["psnr"], 2), "ssim": round(metrics["ssim"], 4),
                         "gaussians": metrics["num_gaussians"], "wall_s": round(time.perf_counter() - start, 1)})
            print(rows[-1], flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"command": sys.argv, "device": _device(args.accelerator),
                                            "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=2) + "\n")
    keys = ["variant", "overrides", "class", "psnr", "ssim", "gaussians", "wall_s"]
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    args.out.with_suffix(".md").write_text(f"# splat={args.preset} variants ({_device(args.accelerator)})\n\n"
                                           + "\n".join(table) + "\n")


def _device(accelerator: str) -> str:
    return torch.cuda.get_device_name(0) if accelerator == "gpu" and torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
