"""Localize a finished run's test images again with other ``sfm.localization`` settings (no other stage runs).

For each run folder (outputs/runs/<dataset>/<class>/<time>) the run's SfM reference is loaded from its stage
folder, every test image is localized with the run's ``sfm`` node plus each variant's overrides, and one row
per (run, variant) gives the queries PnP localized, how many of them lie within 1 and 5 deg of the true pose,
the median rotation error and inliers, and the seconds per query; then each variant's totals.

    python experiments/study_localization.py --variant base= --variant border=localization.bench_border_tau=0.01 \
        outputs/runs/synthetic/06PlainAnt/<time>

A variant is ``name=key=value,key=value`` as in study_scoring.py (dotted keys under ``sfm``; ``name=`` alone: the
run's own). A variant that changes a key outside ``localization`` builds its own reference model first (in a
temporary folder).
Errors are in the true frame of known-pose runs (PnP poses are not refined here).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from splatpose.data import resolve_dataset
from splatpose.data.cameras import rotation_error_deg
from splatpose.sfm.localization import Localizer
from splatpose.sfm.reference import build_reference
from study_scoring import parse_variant  # experiments/study_scoring.py: the same variant syntax


def localize_all(run: Path, overrides: list[str]) -> dict:
    res = json.loads((run / "results.json").read_text())
    cfg = OmegaConf.create(res["config"])
    sfm_cfg = OmegaConf.merge(cfg.sfm, OmegaConf.from_dotlist(overrides))
    data = resolve_dataset(cfg.dataset, res["class"])
    if any(not o.startswith("localization.") for o in overrides):  # the variant's own reference model
        with tempfile.TemporaryDirectory(prefix="study_sfm_") as reference_dir:
            return _localize_all(res, data, sfm_cfg, build_reference(data, sfm_cfg, Path(reference_dir), "cpu"))
    return _localize_all(res, data, sfm_cfg, build_reference(data, cfg.sfm, Path(res["stage_dirs"]["sfm"]), "cpu"))


def _localize_all(res: dict, data, sfm_cfg, reference) -> dict:
    localizer = Localizer(data.K, data.width, data.height, sfm_cfg, reference, data.train_w2c, "cpu")
    errors, inliers, started = [], [], time.perf_counter()
    for test in data.test:
        pose, _ = localizer.localize(test.path, test.name)
        if pose.success:
            errors.append(rotation_error_deg(pose.w2c, data.test_poses[test.name]))
            inliers.append(pose.num_inliers)
    errors = np.array(errors)
    return {"name": f"{res['dataset']}/{res['class']}", "queries": len(data.test), "localized": len(errors),
            "within_1": int((errors <= 1).sum()), "within_5": int((errors <= 5).sum()),
            "median_deg": float(np.median(errors)) if len(errors) else float("nan"),
            "median_inliers": float(np.median(inliers)) if inliers else 0.0,
            "seconds_per_query": (time.perf_counter() - started) / len(data.test)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--variant", action="append", required=True)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    variants = [parse_variant(v) for v in args.variant]
    totals = {name: np.zeros(4) for name, _ in variants}
    print("| run | variant | localized by PnP | within 1 deg | within 5 deg | median error (deg) | median inliers | s per query |\n"
          "|---|---|---|---|---|---|---|---|")
    for path in args.runs:
        for name, overrides in variants:
            r = localize_all(path, overrides)
            totals[name] += [r["queries"], r["localized"], r["within_1"], r["within_5"]]
            print(f"| {r['name']} | {name} | {r['localized']} / {r['queries']} | {r['within_1']} | {r['within_5']} "
                  f"| {r['median_deg']:.3f} | {r['median_inliers']:.0f} | {r['seconds_per_query']:.1f} |", flush=True)
    print("\n| variant | queries | localized by PnP | within 1 deg | within 5 deg |\n|---|---|---|---|---|")
    for name, (queries, localized, within_1, within_5) in totals.items():
        print(f"| {name} | {queries:.0f} | {localized:.0f} | {within_1:.0f} | {within_5:.0f} |")


if __name__ == "__main__":
    main()
