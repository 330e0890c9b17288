"""Query localization: accuracy against the true poses and per-query time by stage.

For each feature/matcher pair and each class of the built-in generated dataset this script

1. builds (or reuses) the SfM reference model,
2. localizes every test image once and compares with the true test poses (success rate, median
   rotation error, median camera-centre error relative to the camera-to-object distance),
3. times that localization, warm (after one warm-up query), one query at a time: the median seconds
   of each stage (extract, retrieve, match, pnp) per class and over all classes of a pair
   (``--queries`` cycles the test images for more timed queries per class).

It writes ``<out>/localization.json`` and ``<out>/localization.md`` with the device, date and command.

    python experiments/bench_localization.py --device cpu --out experiments/results/localization_cpu
    python experiments/bench_localization.py --device cuda --out /tmp/localization_cuda
    # a dataset generated elsewhere (e.g. carried to a GPU box without pyvista), in the MAD-Sim layout:
    python experiments/bench_localization.py --dataset-dir .gpu/data --classes 01Ant --out /tmp/loc
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from splatpose.data.cameras import camera_center, center_error, rotation_error_deg
from splatpose.data.mad_sim import ClassData, load_class
from splatpose.sfm import Localizer, build_reference
from splatpose.sfm.config import compose_sfm_config

STAGES = ("extract", "retrieve", "match", "pnp")
DEFAULT_CLASSES = ("01Ant", "02Airplane", "03Nut")  # the generator's (not imported: it needs pyvista)
DEFAULT_PAIRS = ("aliked+lightglue", "xfeat+lighterglue")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cache = Path(os.environ.get("SPLATPOSE_CACHE", Path.cwd() / ".cache" / "splatpose"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="folder for localization.{json,md}")
    parser.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS), help="feature+matcher, e.g. disk+lightglue")
    parser.add_argument("--retrieval", default="global")
    parser.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES))
    parser.add_argument("--queries", type=int, default=0,
                        help="timed queries per class (test images cycled; default: each test image once)")
    parser.add_argument("--data-root", type=Path, default=cache / "synthetic",
                        help="cache folder of the generated dataset (the pipeline's default)")
    parser.add_argument("--work", type=Path, default=cache / "bench_localization",
                        help="folder for the reference models (reused by later runs)")
    parser.add_argument("--preset", default="small", help="generated dataset preset")
    parser.add_argument("--dataset-dir", type=Path, default=None,
                        help="use this folder of classes (MAD-Sim layout with test_poses.json) as is; "
                             "nothing is generated")
    return parser.parse_args(argv)


def localize_class(data: ClassData, localizer: Localizer, queries: int) -> tuple[dict, list[dict]]:
    """Localize the test images in order (cycled up to ``queries``, at least one pass), warm.

    Returns the accuracy of the first pass against the true poses (errors over the localized
    queries) and the per-stage seconds of every query.
    """
    localizer.localize(data.test[0].path, data.test[0].name)  # warm-up: first calls allocate and compile
    rotations, centres, successes, times = [], [], 0, []
    for i in range(max(queries, len(data.test))):
        test = data.test[i % len(data.test)]
        start = time.perf_counter()
        pose, _ = localizer.localize(test.path, test.name)
        times.append({**pose.times, "total": time.perf_counter() - start})
        if i >= len(data.test) or not pose.success:
            continue
        truth = data.test_poses[test.name]
        successes += 1
        rotations.append(rotation_error_deg(pose.w2c, truth))
        centres.append(center_error(pose.w2c, truth) / np.linalg.norm(camera_center(truth)))
    accuracy = {"num_queries": len(data.test), "success_rate": successes / len(data.test),
                "median_rotation_error_deg": float(np.median(rotations)) if rotations else None,
                "median_center_error_pct": 100 * float(np.median(centres)) if centres else None}
    return accuracy, times


def median_times(times: list[dict]) -> dict:
    out = {f"{stage}_s": float(np.median([t[stage] for t in times])) for stage in (*STAGES, "total")}
    out["num_timed_queries"] = len(times)
    return out


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: on a shared machine they say how much the timings are worth."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def markdown(report: dict) -> str:
    lines = [f"# Query localization ({report['device']})", "",
             f"- device: {report['device_name']}", f"- date: {report['date']}",
             f"- command: `{report['command']}`",
             f"- load average (1, 5, 15 min) at start {report['load_average_at_start']}, at end "
             f"{report.get('load_average_at_end')} (other jobs on a shared machine slow the timings)",
             f"- dataset: generated, preset {report['preset']} ({report['data_root']})",
             f"- first query per class is a warm-up, not timed; {report['queries'] or 'each test image once'} "
             "timed queries per class",
             f"- retrieval: {report['retrieval']}; timings are warm medians over the queries of each row, "
             "one query at a time, in milliseconds", "",
             "| pair | class | success | median rot (deg) | median centre (% dist) | extract | retrieve | match "
             "| PnP | total |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        acc, t = row["accuracy"], row["timings"]
        rot = "n/a" if acc["median_rotation_error_deg"] is None else f"{acc['median_rotation_error_deg']:.3f}"
        cen = "n/a" if acc["median_center_error_pct"] is None else f"{acc['median_center_error_pct']:.3f}"
        lines.append(f"| {row['pair']} | {row['class']} | {100 * acc['success_rate']:.0f}% "
                     f"({acc['num_queries']}) | {rot} | {cen} | "
                     + " | ".join(f"{1000 * t[f'{s}_s']:.1f}" for s in (*STAGES, "total")) + " |")
    lines += ["", "All classes together (median per stage, ms):", "",
              "| pair | queries | extract | retrieve | match | PnP | total |", "|---|---|---|---|---|---|---|"]
    for pair, t in report["pairs"].items():
        lines.append(f"| {pair} | {t['num_timed_queries']} | "
                     + " | ".join(f"{1000 * t[f'{s}_s']:.1f}" for s in (*STAGES, "total")) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work
    if args.dataset_dir is not None:
        data_root, args.preset = args.dataset_dir, f"as found in {args.dataset_dir}"
    else:
        from splatpose.data.synthetic import ensure_synthetic_dataset

        data_root = ensure_synthetic_dataset(args.data_root, args.classes, preset=args.preset)
    report = {"device": args.device, "device_name": device_name(args.device),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "preset": args.preset,
              "data_root": str(data_root), "retrieval": args.retrieval, "queries": args.queries,
              "torch": torch.__version__, "load_average_at_start": _load_average(), "rows": [],
              "pairs": {}}
    for pair in args.pairs:
        feature, matcher = pair.split("+")
        cfg = compose_sfm_config(feature, matcher, args.retrieval)
        pair_times = []
        for class_name in args.classes:
            data = load_class(data_root, class_name)
            reference = build_reference(data, cfg, work / f"{feature}-{matcher}" / class_name, args.device)
            localizer = Localizer(data.K, data.width, data.height, cfg, reference, data.train_w2c, args.device)
            accuracy, times = localize_class(data, localizer, args.queries)
            pair_times += times
            row = {"pair": pair, "class": class_name, "accuracy": accuracy, "timings": median_times(times),
                   "reference": reference.summary}
            report["rows"].append(row)
            print(json.dumps({k: row[k] for k in ("pair", "class", "accuracy", "timings")}), flush=True)
        report["pairs"][pair] = median_times(pair_times)
    report["load_average_at_end"] = _load_average()
    (args.out / "localization.json").write_text(json.dumps(report, indent=2))
    (args.out / "localization.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
