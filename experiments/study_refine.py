"""Does pose refinement pay? Pose error and anomaly metrics with and without it, on generated data.

On a finished run of the generated dataset (which has the true test poses), every test image is
localized once by the detector (PnP, the evaluation's localization). Then, for each refinement
setting, the localized poses are refined against their images, and for every setting the script
reports:

- pose error against the true poses: median and mean rotation error (degrees) and camera-centre
  error (% of the camera-to-object distance), over the localized queries;
- pixel AUROC, AUPRO@0.3 and image AUROC of the maps rendered at those poses (the run's scorer and
  normalisation; masks at map resolution, nearest, as the evaluation does);
- refinement seconds per query (median).

Two reference rows frame the result: "pnp" (no refinement: what the pipeline does today) and
"true poses" (renders at the true test poses: the most any pose refinement could give).

    python experiments/study_refine.py --run-dir outputs/runs/synthetic/01Ant/<time> --device cpu \\
        --out experiments/results/refine_cpu_01Ant.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from splatpose.data import resolve_dataset
from splatpose.data.cameras import camera_center, center_error, rotation_error_deg
from splatpose.data.mad_sim import read_image, read_mask
from splatpose.detect.detector import Detector
from splatpose.metrics import evaluate
from splatpose.refine import PoseRefiner, default_refine_config

# name -> overrides of conf/refine/lbfgs.yaml
SETTINGS = {
    "lbfgs l1 x20 @0.5": {"loss": "l1", "steps": 20, "levels": [0.5], "blur": 0.0},
    "lbfgs l1_ssim x20 @0.5": {"loss": "l1_ssim", "steps": 20, "levels": [0.5], "blur": 0.0},
    "lbfgs l1 x20 @1.0": {"loss": "l1", "steps": 20, "levels": [1.0], "blur": 0.0},
    "lbfgs l1 x10 @1.0": {"loss": "l1", "steps": 10, "levels": [1.0], "blur": 0.0},
    "lbfgs feature x10 @1.0": {"loss": "feature", "steps": 10, "levels": [1.0], "blur": 0.0},
    "adam l1 x20 @0.5": {"optimizer": "adam", "lr": 3e-3, "loss": "l1", "steps": 20, "levels": [0.5], "blur": 0.0},
    # coarse to fine with the outline in the loss (the default since 2026-12-05)
    "c2f l1_silhouette x20 @0.5 + x10 @1.0": {"loss": "l1_silhouette", "levels": [0.5, 1.0], "steps": [20, 10],
                                              "blur": [0.02, 0.005]},
    "c2f l1_silhouette x20 @0.5 + l1 x10 @1.0": {"loss": ["l1_silhouette", "l1"], "levels": [0.5, 1.0],
                                                 "steps": [20, 10], "blur": [0.02, 0.0]},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), help=f"any of {list(SETTINGS)}")
    parser.add_argument("--out", type=Path, required=True, help="markdown file (a .json beside it)")
    return parser.parse_args(argv)


def pose_errors(poses: dict[str, np.ndarray], truth: dict[str, np.ndarray], names: list[str]) -> dict:
    rotations = [rotation_error_deg(poses[n], truth[n]) for n in names]
    centres = [100 * center_error(poses[n], truth[n]) / np.linalg.norm(camera_center(truth[n])) for n in names]
    return {"median_rotation_deg": float(np.median(rotations)), "mean_rotation_deg": float(np.mean(rotations)),
            "within_1deg": float(np.mean(np.array(rotations) <= 1.0)),
            "median_center_pct": float(np.median(centres)), "mean_center_pct": float(np.mean(centres))}


def maps_at(detector: Detector, queries: torch.Tensor, poses: list[np.ndarray], batch: int = 4) -> np.ndarray:
    out = []
    for start in range(0, len(poses), batch):
        renders = detector.render_references(np.stack(poses[start:start + batch]))
        out.append(detector.score(queries[start:start + batch], renders).float().cpu().numpy())
    return np.concatenate(out)


def main(argv=None) -> dict:
    args = parse_args(argv)
    # PnP poses only: the rows below refine them themselves.
    detector = Detector.from_run(args.run_dir, {"matching": "sequential", "refine": {"enabled": False}}, device=args.device)
    data = resolve_dataset(detector.run.config.dataset, detector.run.class_name)
    if not data.test_poses:
        raise SystemExit(f"{data.root}: no test_poses.json; the study needs generated data with true poses")
    tests = data.test
    names = [t.name for t in tests]
    detections = [detector.detect(t.path, t.name) for t in tests]
    queries = torch.stack([torch.from_numpy(read_image(t.path)).permute(2, 0, 1) for t in tests]).to(detector.device)
    size = detections[0].anomaly_map.shape[-1]
    masks = np.stack([read_mask(t.mask_path) if t.mask_path else np.zeros((data.height, data.width), bool)
                      for t in tests])
    masks = F.interpolate(torch.from_numpy(masks)[:, None].float(), size=(size, size), mode="nearest")[:, 0].numpy() > 0.5
    labels = np.array([t.label for t in tests])
    defects = [t.defect for t in tests]
    localized = [d.name for d in detections if d.localized]
    pnp = {d.name: d.w2c_pnp for d in detections}

    def row(label: str, poses: dict, seconds: list[float] | None) -> dict:
        maps = maps_at(detector, queries, [poses[n] for n in names])
        metrics = evaluate(maps, masks, labels, defects)
        return {"setting": label, **pose_errors(poses, data.test_poses, localized),
                "pixel_auroc": metrics["pixel_auroc"], "aupro": metrics["aupro"], "image_auroc": metrics["image_auroc"],
                "refine_seconds_median": None if seconds is None else float(np.median(seconds))}

    rows = [row("pnp (no refinement)", pnp, None)]
    print(json.dumps(rows[-1]), flush=True)
    for label in args.settings:
        cfg = OmegaConf.merge(default_refine_config(), SETTINGS[label])
        refiner = PoseRefiner(detector.gaussians, detector.run.K, detector.width, detector.height, cfg,
                              backend=detector.backend, scorer=detector.scorer)
        poses, seconds = dict(pnp), []
        for test, query in zip(tests, queries):
            if test.name in localized:
                result = refiner.refine(query, pnp[test.name])
                poses[test.name] = result.w2c
                seconds.append(result.seconds)
        rows.append(row(label, poses, seconds))
        print(json.dumps(rows[-1]), flush=True)
    rows.append(row("true poses (upper bound)", {n: data.test_poses[n] for n in names}, None))
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "device": args.device,
              "load_average": [round(x, 2) for x in os.getloadavg()], "run_dir": str(args.run_dir),
              "class": detector.run.class_name, "image_size": [data.width, data.height],
              "gaussians": len(detector.gaussians), "num_queries": len(tests), "num_localized": len(localized),
              "run_metrics": {k: detector.run.metrics.get(k) for k in ("pixel_auroc", "aupro", "image_auroc")},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"# Pose refinement study: {report['class']} ({report['image_size'][0]}x{report['image_size'][1]})", "",
             f"- date: {report['date']}; device: {report['device']}; load average {report['load_average']}",
             f"- command: `{report['command']}`",
             f"- run: {report['run_dir']} ({report['gaussians']} Gaussians; its evaluation metrics {report['run_metrics']})",
             f"- {report['num_queries']} test images, {report['num_localized']} localized by PnP; pose errors over the "
             "localized ones against the true test poses; metrics over all test images", "",
             "| setting | rot. median (deg) | rot. mean | within 1 deg | centre median (% dist) | centre mean | pixel AUROC | AUPRO "
             "| image AUROC | refine s/query |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        fmt = lambda v, f="{:.4f}": "-" if v is None else f.format(v)  # noqa: E731
        lines.append(f"| {r['setting']} | {fmt(r['median_rotation_deg'], '{:.3f}')} | {fmt(r['mean_rotation_deg'], '{:.3f}')} "
                     f"| {fmt(r['within_1deg'], '{:.2f}')} "
                     f"| {fmt(r['median_center_pct'], '{:.3f}')} | {fmt(r['mean_center_pct'], '{:.3f}')} "
                     f"| {fmt(r['pixel_auroc'])} | {fmt(r['aupro'])} | {fmt(r['image_auroc'])} "
                     f"| {fmt(r['refine_seconds_median'], '{:.2f}')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
