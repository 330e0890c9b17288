"""Splat training benchmark on the built-in generated dataset: time, held-out PSNR/SSIM, Gaussians.

For each class: generate (or reuse) the synthetic dataset, train ``splat=<preset>`` from scratch
with ``train_splats`` (the pipeline's stage function) and record wall and process CPU time, the
PSNR/SSIM on the held-out train views (every 8th) and the final number of Gaussians. Writes a
markdown table (and JSON beside it) with the device, date, command and the load average, because
on a shared machine other processes inflate wall times.

    python experiments/bench_splat_training.py --preset fast --classes 01Ant 02Airplane 03Nut \\
        --out experiments/results/splat_cpu.md
    # on a GPU machine: --accelerator gpu --preset default --dataset-preset mad_sim_like
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def device_description(accelerator: str) -> str:
    if accelerator == "gpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fast", help="conf/splat/<preset>.yaml")
    parser.add_argument("--classes", nargs="+", default=["01Ant", "02Airplane", "03Nut"])
    parser.add_argument("--dataset-root", type=Path, default=REPO / ".cache" / "synthetic")
    parser.add_argument("--dataset-preset", default="small", help="synthetic generator preset")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, required=True, help="markdown file (JSON written beside it)")
    parser.add_argument("--set", nargs="*", default=[], help="splat config overrides, key=value")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from splatpose.data.mad_sim import load_class
    from splatpose.data.synthetic import ensure_synthetic_dataset
    from splatpose.splat.train import METRICS_NAME, train_splats

    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "splat" / f"{args.preset}.yaml"),
                          OmegaConf.from_dotlist(args.set))
    root = ensure_synthetic_dataset(args.dataset_root, args.classes, preset=args.dataset_preset)
    rows = []
    for name in args.classes:
        data = load_class(root, name)
        work = Path(tempfile.mkdtemp(prefix=f"splat-bench-{name}-"))
        load_before = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        train_splats(data, None, None, cfg, work, {"accelerator": args.accelerator, "devices": 1,
                                                   "enable_progress_bar": False, "logger": False})
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        metrics = json.loads((work / METRICS_NAME).read_text())
        rows.append({"class": name, "size": f"{data.width}x{data.height}", "views": metrics["num_train_views"],
                     "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "fit_s": metrics["train_seconds"],
                     "psnr": round(metrics["psnr"], 2), "ssim": round(metrics["ssim"], 4),
                     "gaussians": metrics["num_gaussians"], "load_avg_before": round(load_before, 2),
                     "load_avg_after": round(os.getloadavg()[0], 2), "work_dir": str(work)})
        print(rows[-1], flush=True)

    header = (f"# Splat training benchmark: splat={args.preset}\n\n"
              f"- device: {device_description(args.accelerator)}\n- date: {time.strftime('%Y-%m-%d %H:%M')}\n"
              f"- command: `{' '.join(sys.argv)}`\n- dataset: synthetic preset `{args.dataset_preset}` ({root.name}); "
              "no SfM points (silhouette-carved random init)\n"
              "- wall_s: whole `train_splats` call; cpu_s: process CPU time (all threads); fit_s: `Trainer.fit`;\n"
              "  load_avg: 1-minute load average of the machine (2 cores: above 2, other work was competing)\n\n")
    keys = list(rows[0])[:-1]
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n".join(table) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"command": sys.argv, "rows": rows,
                                                         "splat_config": OmegaConf.to_container(cfg)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
