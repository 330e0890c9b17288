"""How many db images a query needs, and what PnP-RANSAC costs: pose error and time per option.

A query's localization time is mostly LightGlue over its ``top_k`` retrieved db images and the PnP
over the 2D-3D correspondences they give. This study localizes every test image of one class once
against its ``--max-k`` most similar db images (features and matches computed once), then, from those
matches, solves PnP for every ``top_k`` in ``--top-k`` (the first k of the same ranking: what
``sfm.localization.top_k=k`` computes) and for a few PnP option sets (``PNP_VARIANTS``; features and
matches are cached next to ``--out`` for reruns), and reports per variant
the localized fraction, the rotation and camera-centre errors against the true poses, the 2D-3D
correspondences handed to PnP, and the PnP time (median of ``--pnp-repeats`` solves per query).
Matching time scales with the number of pairs (``top_k``); the detector's latency benchmark
(bench_detector.py) measures it.

    python experiments/study_localization_options.py --dataset-dir .gpu/data --class-name 01Ant \
        --out experiments/results/localization_options_cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from splatpose.data.cameras import camera_center, center_error, rotation_error_deg
from splatpose.data.mad_sim import load_class
from splatpose.sfm import Localizer, build_reference
from splatpose.sfm.config import compose_sfm_config
from splatpose.sfm.features import load_image_tensor, to_original_pixels
from splatpose.sfm.pnp import PnPSolver
from splatpose.sfm.retrieval import rank_database

# PnP option sets compared: overrides of the sfm.localization node (pnp, ransac_min_num_trials,
# refine_max_iterations; splatpose/sfm/pnp.py), solved by the PnPSolver the localizer uses. "default"
# is the node as conf/sfm/default.yaml sets it. (The studies of 2026-11-24 compared pycolmap's options
# before the solver was a setting: localization_options_*_2026-11-24.md.)
PNP_VARIANTS = {
    "default": {},
    "poselib": {"pnp": "poselib"},
    "pycolmap": {"pnp": "pycolmap"},
    "poselib+min_trials_100": {"pnp": "poselib", "ransac_min_num_trials": 100},
    "poselib+refine_iters_3": {"pnp": "poselib", "refine_max_iterations": 3},
    "pycolmap+min_trials_100": {"pnp": "pycolmap", "ransac_min_num_trials": 100},
    "pycolmap+refine_iters_3": {"pnp": "pycolmap", "refine_max_iterations": 3},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", type=Path, required=True, help="folder of classes (MAD-Sim layout)")
    parser.add_argument("--class-name", default="01Ant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path(".cache/splatpose/study_localization"),
                        help="folder for the reference model (reused)")
    parser.add_argument("--reference-dir", type=Path, default=None,
                        help="a finished reference model to use as it is (e.g. a run's .cache/splatpose/sfm/<key>)")
    parser.add_argument("--out", type=Path, required=True, help="writes <out>.json and <out>.md")
    parser.add_argument("--max-k", type=int, default=5)
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--pnp-repeats", type=int, default=5)
    parser.add_argument("--pnp", nargs="+", default=list(PNP_VARIANTS), choices=list(PNP_VARIANTS),
                        help="PnP option sets, each solved at top_k 3 and --max-k")
    return parser.parse_args(argv)


def match_queries(data, localizer: Localizer, max_k: int) -> list[dict]:
    """Per test image: its features, the db ranking and the matches to its max_k best db images."""
    queries = []
    for test in data.test:
        image, original_wh = load_image_tensor(test.path, localizer.feature_size)
        features = localizer.extractor(image[None].to(localizer.device))[0]
        features["keypoints"] = to_original_pixels(features["keypoints"], (image.shape[-1], image.shape[-2]),
                                                   original_wh)
        features["image_size"] = np.array(original_wh, dtype=np.int64)
        ranked = rank_database(localizer.retrieval.describe(None, features), localizer.db_global)[:max_k]
        prepared = localizer.matcher.prepare(features)
        matches = {localizer.db_names[i]: localizer.matcher(prepared, localizer.db_prepared[i]) for i in ranked}
        queries.append({"name": test.name, "features": features, "ranked": ranked, "matches": matches})
        print(f"matched {test.name}", flush=True)
    return queries


def solve(localizer: Localizer, query: dict, k: int, variant: str, repeats: int) -> dict:
    """PnP of one query from its first k retrieved db images with one option set: pose, time."""
    retrieved = query["ranked"][:k]
    query_idx, point_ids, _ = localizer._correspondences(retrieved, query["matches"])
    points2d = query["features"]["keypoints"][query_idx].astype(np.float64) + 0.5
    points3d = localizer.points_xyz[point_ids]
    solver = PnPSolver(OmegaConf.merge(localizer.cfg.localization, PNP_VARIANTS[variant]), localizer.camera)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = solver(points2d, points3d)
        seconds.append(time.perf_counter() - start)
    ok = result is not None and result[1] >= localizer.min_inliers
    return {"ok": ok, "w2c": result[0] if ok else None, "correspondences": len(query_idx),
            "seconds": float(np.median(seconds)), "inliers": result[1] if result is not None else 0}


def summarize(data, solved: list[dict]) -> dict:
    rotation, centre = [], []
    for name, s in solved:
        if s["ok"]:
            truth = data.test_poses[name]
            rotation.append(rotation_error_deg(s["w2c"], truth))
            centre.append(100 * center_error(s["w2c"], truth) / np.linalg.norm(camera_center(truth)))
    return {"localized": sum(s["ok"] for _, s in solved), "queries": len(solved),
            "median_rotation_deg": float(np.median(rotation)) if rotation else None,
            "max_rotation_deg": float(np.max(rotation)) if rotation else None,
            "median_centre_pct": float(np.median(centre)) if centre else None,
            "max_centre_pct": float(np.max(centre)) if centre else None,
            "median_correspondences": float(np.median([s["correspondences"] for _, s in solved])),
            "median_pnp_ms": 1000 * float(np.median([s["seconds"] for _, s in solved])),
            "p95_pnp_ms": 1000 * float(np.percentile([s["seconds"] for _, s in solved], 95))}


def markdown(report: dict) -> str:
    lines = [f"# Localization options: db images per query and PnP-RANSAC ({report['device']})", "",
             f"- date: {report['date']}; device: {report['device_name']}; class {report['class']} "
             f"({report['dataset']})", f"- command: `{report['command']}`",
             "- errors against the true test poses; PnP time: median over queries of the median of "
             f"{report['pnp_repeats']} solves", "",
             "| top_k | PnP options | localized | median rot (deg) | max rot | median centre (% dist) | max centre "
             "| 2D-3D matches | PnP median ms | PnP p95 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        s = row["summary"]
        fmt = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"| {row['top_k']} | {row['pnp']} | {s['localized']}/{s['queries']} | "
                     f"{fmt(s['median_rotation_deg'])} | {fmt(s['max_rotation_deg'])} | {fmt(s['median_centre_pct'])} | "
                     f"{fmt(s['max_centre_pct'])} | {s['median_correspondences']:.0f} | {s['median_pnp_ms']:.2f} | "
                     f"{s['p95_pnp_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    data = load_class(args.dataset_dir, args.class_name)
    cfg = compose_sfm_config("aliked", "lightglue", "global")
    reference = build_reference(data, cfg, args.reference_dir or args.work / args.class_name, args.device)
    localizer = Localizer(data.K, data.width, data.height, cfg, reference, data.train_w2c, args.device)
    cache = args.out.with_name(args.out.name + f"_matches_k{args.max_k}.pkl")
    if cache.exists():  # the features and matches of an earlier run of this study (same reference)
        queries = pickle.loads(cache.read_bytes())
    else:
        queries = match_queries(data, localizer, args.max_k)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps(queries))
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"{os.cpu_count()} CPU cores")
    report = {"device": args.device, "device_name": device_name, "class": args.class_name,
              "dataset": str(args.dataset_dir), "pnp_repeats": args.pnp_repeats,
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": []}
    variants = [(k, "default") for k in args.top_k] + [(k, v) for k in sorted({3, args.max_k} & set(args.top_k))
                                                        for v in args.pnp if v != "default"]
    for k, variant in variants:
        solved = [(q["name"], solve(localizer, q, k, variant, args.pnp_repeats)) for q in queries]
        row = {"top_k": k, "pnp": variant, "summary": summarize(data, solved)}
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
