"""Timings of the evaluation metrics and of the anomaly scorer.

    python experiments/bench_metrics.py metrics                  # AUPRO / AUROC on a MAD-Sim-sized class
    python experiments/bench_metrics.py scorer --device cuda     # per-query scorer latency
    python experiments/bench_metrics.py scorer --weights-path lite0.pth   # without the lite0 package

Each run prints a Markdown table and, with --out, appends it (with device, date and command) to a file
under experiments/results/. The metrics data are synthetic: random maps, defect regions of random
size on two thirds of the images; only the sizes matter for the timings.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from splatpose.metrics import aupro, evaluate, pixel_auroc
from splatpose.scoring import build_scorer

CONF = Path(__file__).resolve().parents[1] / "conf" / "scorer"


def synthetic_class(num_maps: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """maps [N, S, S] float32, masks [N, S, S] bool, defects [N] like a MAD-Sim test split."""
    rng = np.random.default_rng(seed)
    defects = [("good", "Burrs", "Missing", "Stains")[i % 4] if i >= num_maps // 3 or i % 4 == 0 else "good"
               for i in range(num_maps)]
    masks = np.zeros((num_maps, size, size), dtype=bool)
    for i, defect in enumerate(defects):
        if defect == "good":
            continue
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - size // 8, 2)
            h, w = rng.integers(2, size // 8, 2)
            masks[i, y:y + h, x:x + w] = True
    maps = rng.random(masks.shape, dtype=np.float32) + 0.5 * masks
    return maps, masks, defects


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_metrics(args) -> list[str]:
    maps, masks, defects = synthetic_class(args.num_maps, args.size)
    labels = np.array([d != "good" for d in defects])
    rows = [f"| {args.num_maps} maps of {args.size}^2 ({maps.size / 1e6:.1f} M pixels) | seconds (best of "
            f"{args.repeats}) |", "|---|---|"]
    rows.append(f"| aupro (FPR <= 0.3) | {best_of(lambda: aupro(maps, masks), args.repeats):.2f} |")
    rows.append(f"| pixel_auroc | {best_of(lambda: pixel_auroc(maps, masks), args.repeats):.2f} |")
    rows.append(f"| evaluate (overall + 3 defect types) | "
                f"{best_of(lambda: evaluate(maps, masks, labels, defects), args.repeats):.2f} |")
    if args.sklearn:
        rows.append(f"| sklearn roc_auc_score, same pixels (reference) | "
                    f"{best_of(lambda: roc_auc_score(masks.ravel(), maps.ravel()), 1):.2f} |")
    return rows


def bench_scorer(args) -> list[str]:
    device = torch.device(args.device)
    rows = ["| scorer | batch | input | ms per batch (median) | ms per pair |", "|---|---|---|---|---|"]
    for name in args.scorers:
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        if args.weights_path and name == "efficientnet_lite0":
            cfg.weights_path = args.weights_path
        scorer = build_scorer(cfg, device)
        for batch in args.batches:
            query = torch.rand(batch, 3, args.input_size, args.input_size, device=device)
            render = torch.rand_like(query)
            times = []
            for i in range(args.warmup + args.iters):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                scorer(query, render)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
            ms = 1000 * float(np.median(times))
            rows.append(f"| {name} | {batch} | {args.input_size}^2 | {ms:.2f} | {ms / batch:.2f} |")
    return rows


def device_description(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads " \
           f"(torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    metrics = sub.add_parser("metrics")
    metrics.add_argument("--num-maps", type=int, default=300)
    metrics.add_argument("--size", type=int, default=224)
    metrics.add_argument("--repeats", type=int, default=3)
    metrics.add_argument("--sklearn", action="store_true", help="also time sklearn's roc_auc_score")
    scorer = sub.add_parser("scorer")
    scorer.add_argument("--device", default="cpu")
    scorer.add_argument("--scorers", nargs="+", default=["efficientnet_lite0", "pixel"])
    scorer.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    scorer.add_argument("--input-size", type=int, default=400, help="side of query and render")
    scorer.add_argument("--warmup", type=int, default=5)
    scorer.add_argument("--iters", type=int, default=30)
    scorer.add_argument("--weights-path", help="Lite0 weights file, where the package is not installed")
    for p in (metrics, scorer):
        p.add_argument("--out", type=Path, help="append the table to this Markdown file")
    args = parser.parse_args()

    rows = bench_metrics(args) if args.what == "metrics" else bench_scorer(args)
    device = args.device if args.what == "scorer" else "cpu"
    header = [f"## {args.what}: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {device_description(device)}",
              "", f"`python {' '.join(shlex.quote(a) for a in sys.argv)}`", ""]
    text = "\n".join(header + rows) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
