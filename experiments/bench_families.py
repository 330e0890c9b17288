"""Benchmark: every class of both dataset families through the README's main command, one table.

    python experiments/bench_families.py                         # CPU small presets, both families
    python experiments/bench_families.py --families synthetic --classes 01Ant 05PlainNut
    python experiments/bench_families.py --args splat=default dataset.preset=mad_sim_like   # GPU full preset

Each (family, class) runs ``python run.py dataset=<family> class=<class> logger=none <args>`` in its own
process (finished stages come from the stage cache), into ``outputs/bench_families/<family>/<class>``;
a job that fails is recorded and the rest go on. The table (markdown, with device, date and command)
and the raw rows (JSON) go to ``--out``: per class the PnP localization rate, the final poses' paths
(PnP / recovered / failed), the share within 1 degree of the true pose and the median rotation error,
the three detection metrics and the seconds of every stage, then each family's mean.

``synthetic`` is the family defaults are tuned on; ``parts`` is only evaluated (experiments/PROTOCOL.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data", "sfm", "localize", "splat", "refine", "render", "score", "total")
METRICS = ("pixel_auroc", "aupro", "image_auroc")


def family_classes(family: str) -> list[str]:
    """The classes a family's config lists (conf/dataset/<family>.yaml)."""
    from omegaconf import OmegaConf

    return [str(c) for c in OmegaConf.load(ROOT / "conf" / "dataset" / f"{family}.yaml").classes]


def run_class(family: str, class_name: str, extra: list[str], out_root: Path, root: str | None = None,
              timeout: float | None = None) -> dict:
    """Run one class; returns its row (status "failed" with the log's tail when the run failed).

    ``root``: a folder holding the family's classes already generated (MAD-Sim layout), read through
    ``dataset=custom`` instead of generating them (the lent GPU has neither VTK nor Mitsuba)."""
    run_dir = out_root / family / class_name
    dataset = [f"dataset={family}"] if root is None else ["dataset=custom", f"dataset.root={root}"]
    command = [sys.executable, "run.py", *dataset, f"class={class_name}", "logger=none",
               f"hydra.run.dir={run_dir}", *extra]
    start = time.perf_counter()
    try:
        process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as stopped:
        log = (run_dir / "run.log").read_text()[-1500:] if (run_dir / "run.log").is_file() else ""
        return {"family": family, "class": class_name, "command": " ".join(command[1:]), "status": "failed",
                "wall_seconds": round(time.perf_counter() - start, 1),
                "error": f"stopped after {stopped.timeout:.0f} s (--timeout); the run's log ended:\n{log}"}
    row = {"family": family, "class": class_name, "command": " ".join(command[1:]),
           "wall_seconds": round(time.perf_counter() - start, 1)}
    results_path = run_dir / "results.json"
    if process.returncode != 0 or not results_path.is_file():
        return {**row, "status": "failed", "error": (process.stderr or process.stdout)[-2000:]}
    return {**row, "status": "ok", **summarise(json.loads(results_path.read_text()))}


def summarise(results: dict) -> dict:
    """The table's numbers from one results.json."""
    final = results.get("final_poses", {})
    paths = final.get("paths", {})
    n = max(sum(paths.values()), 1)
    return {"pnp_localized": results["localization"]["success_rate"],
            "path_pnp": paths.get("pnp", 0) / n, "path_recovered": paths.get("recovered", 0) / n,
            "path_failed": paths.get("failed", 0) / n, "posed": final.get("success_rate"),
            "within_1deg": final.get("within_1deg_rate"),
            "median_rotation_error_deg": final.get("median_rotation_error_deg"),
            "sheen_allowance": results.get("sheen_allowance"),
            **{m: results["metrics"].get(m) for m in METRICS},
            **{f"image_auroc_top{q}": v for q, v in results["metrics"].get("image_auroc_by_top_fraction", {}).items()},
            **{f"s_{s}": (results["timings"].get(s) or {}).get("seconds") for s in STAGES},
            "image_auroc_per_defect": {defect: values.get("image_auroc")
                                       for defect, values in results["metrics"].get("per_defect", {}).items()}}


def markdown(rows: list[dict], header: str) -> str:
    columns = ["pnp_localized", "path_recovered", "path_failed", "within_1deg", "median_rotation_error_deg",
               "sheen_allowance", *METRICS, *(f"image_auroc_top{q}" for q in ("0.0", "0.001", "0.01", "0.05")), *(f"s_{s}" for s in STAGES)]
    lines = [header, "", "| family | class | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]

    def cell(value) -> str:
        return "-" if value is None else (f"{value:.4f}" if isinstance(value, float) and abs(value) < 10 else
                                          f"{value:.0f}" if isinstance(value, float) else str(value))

    for family in dict.fromkeys(r["family"] for r in rows):
        done = [r for r in rows if r["family"] == family and r["status"] == "ok"]
        for r in rows:
            if r["family"] != family:
                continue
            values = [cell(r.get(c)) for c in columns] if r["status"] == "ok" else ["failed"] + [""] * (len(columns) - 1)
            lines.append(f"| {family} | {r['class']} | " + " | ".join(values) + " |")
        if done:
            means = [cell(float(np.mean([r[c] for r in done if r.get(c) is not None])) if any(r.get(c) is not None for r in done) else None)
                     for c in columns]
            lines.append(f"| {family} | **mean ({len(done)})** | " + " | ".join(means) + " |")
    lines += per_defect_markdown(rows)
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        lines += ["", f"{r['family']}/{r['class']} failed:", "```", r["error"].strip()[-1500:], "```"]
    return "\n".join(lines) + "\n"


def per_defect_markdown(rows: list[dict]) -> list[str]:
    """Image AUROC per defect type, one table per family (its classes' defect types as columns)."""
    lines = []
    for family in dict.fromkeys(r["family"] for r in rows):
        done = [r for r in rows if r["family"] == family and r["status"] == "ok" and r.get("image_auroc_per_defect")]
        defects = sorted({d for r in done for d in r["image_auroc_per_defect"]})
        if not done:
            continue
        lines += ["", f"Image AUROC per defect type, `{family}`:", "",
                  "| class | " + " | ".join(defects) + " |", "|---|" + "---|" * len(defects)]
        for r in done:
            values = [r["image_auroc_per_defect"].get(d) for d in defects]
            lines.append(f"| {r['class']} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in values) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["synthetic", "parts"])
    parser.add_argument("--classes", nargs="*", default=None, help="only these classes (of every family listed)")
    parser.add_argument("--args", nargs="*", default=[], help="extra run.py overrides for every job")
    parser.add_argument("--timeout", type=float, default=None, help="seconds one job may run (then: failed)")
    parser.add_argument("--root", nargs="*", default=[], metavar="FAMILY=FOLDER",
                        help="read a family's classes from a folder of generated classes (dataset=custom)")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" /
                        f"families_{time.strftime('%Y-%m-%d')}")
    args = parser.parse_args()
    roots = dict(item.split("=", 1) for item in args.root)
    out_root = ROOT / "outputs" / "bench_families"
    header = (f"# Both dataset families, {time.strftime('%Y-%m-%d %H:%M')} UTC\n\n"
              f"Command: `python experiments/bench_families.py {' '.join(sys.argv[1:])}` "
              f"(each job: `python run.py dataset=<family> class=<class> logger=none {' '.join(args.args)}`), "
              f"host {platform.node()} ({device_name(args.args)}).\n`synthetic` is tuned on; `parts` is only "
              "evaluated (experiments/PROTOCOL.md). Rates are fractions of the test images; s_* are stage "
              "seconds (0 or near 0 when reused from the stage cache).")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in args.families:
        for class_name in args.classes or family_classes(family):
            if args.classes and class_name not in family_classes(family):
                continue
            row = run_class(family, class_name, args.args, out_root, roots.get(family), args.timeout)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
            # written after every job, so that a run stopped part-way keeps the rows it made
            args.out.with_suffix(".md").write_text(markdown(rows, header))
            args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(markdown(rows, header))


def device_name(run_args: list[str]) -> str:
    """The GPU's name when the jobs ran on CUDA, else the CPU's."""
    if any("cuda" in a for a in run_args):
        try:
            import torch

            return torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001 - a label only
            return "GPU"
    return platform.processor() or "CPU"


if __name__ == "__main__":
    main()
