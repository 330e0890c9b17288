"""Does the scorer's own map tell a wrong pose from a right one where the colour check cannot (a part on a bench)?

For each run folder, each test image is rendered at its final pose and at its true pose, and the pair is scored
by the run's scorer (bench handling, photometric fit and all); the check's statistic is the mean of the raw map
inside the render's silhouette shrunk by ``--erode`` px (where the bench does not enter), divided by the
class's median over its final poses (a class's maps have their own scale). Printed per run: how well the
statistic and the alignment check's colour l1 rank wrong final poses (rotation error > ``--wrong-deg``) above
right ones (AUROC), and for each wrong pose whether the true pose scores lower (what a search with the
statistic as its objective would need).

    OMP_NUM_THREADS=1 python experiments/study_pose_check.py outputs/runs/synthetic/06PlainAnt/<time> ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_erosion
from sklearn.metrics import roc_auc_score

from study_scoring import allowance, load_run
from splatpose.data.cameras import rotation_error_deg
from splatpose.refine.queries import SEARCH_VIEWS_FILE, PoseSettler
from splatpose.scoring.object_region import bench_whitened_by_border
from splatpose.scoring.anomaly_maps import build_scorer
from splatpose.splat.ply import load_gaussians
from splatpose.splat.rendering import render


def inside_mean(scorer, gaussians, K, query: np.ndarray, w2c: np.ndarray, erode: int) -> float:
    """Mean raw map of ``query`` [H, W, 3] against the render at ``w2c`` inside its eroded silhouette."""
    h, w = query.shape[:2]
    rgb, alpha = render(gaussians, torch.as_tensor(w2c, dtype=torch.float32), K, w, h, return_alpha=True)
    rgb, alpha = rgb[0].permute(2, 0, 1).clamp(0, 1)[None], alpha[0, ..., 0][None]
    q = torch.from_numpy(query).permute(2, 0, 1)[None].float()
    heat = scorer(q, rgb, alpha)[0]
    size = heat.shape[-1]
    inside = F.interpolate(alpha[None], size=(size, size), mode="bilinear", align_corners=False)[0, 0] > 0.5
    inside = torch.from_numpy(binary_erosion(inside.numpy(), iterations=erode))
    return float(heat[inside].mean()) if inside.any() else 1e9  # nothing of the part in the image


def study(path: Path, erode: int, wrong_deg: float, hypotheses: int = 0) -> list[dict]:
    run = load_run(path)
    scorer = build_scorer(run["scorer"])
    scorer.sheen_allowance = allowance(run, run["scorer"])
    data = run["data"]
    res = json.loads((path / "results.json").read_text())
    settled = json.loads((Path(res["stage_dirs"]["refine"]) / "refined_poses.json").read_text())
    gaussians = load_gaussians(run["ply"], "cpu")
    K = torch.as_tensor(data.K, dtype=torch.float32)
    rows = []
    for test, query, pose in zip(data.test, run["queries"], settled):
        true = np.asarray(data.test_poses[test.name])
        final = np.asarray(pose["w2c"])
        rows.append({"name": test.name, "path": pose["path"], "error": rotation_error_deg(final, true),
                     "l1": (pose.get("confidence") or {}).get("l1", float("nan")),
                     "final": inside_mean(scorer, gaussians, K, query, final, erode),
                     "true": inside_mean(scorer, gaussians, K, query, true, erode)})
    usual = np.median([r["final"] for r in rows])
    wrong = np.array([r["error"] > wrong_deg for r in rows])
    print(f"\n## {run['name']} ({path.name}): {wrong.sum()} of {len(rows)} final poses over {wrong_deg} deg\n")
    print("| query | path | error deg | colour l1 | map at final / usual | map at true / usual |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['path']} | {r['error']:.2f} | {r['l1']:.4f} | {r['final'] / usual:.2f} "
              f"| {r['true'] / usual:.2f} |")
    if 0 < wrong.sum() < len(rows):
        for key in ("l1", "final"):
            print(f"AUROC of {key} for wrong poses: {roc_auc_score(wrong, [r[key] for r in rows]):.3f}")
    lower = sum(r["true"] < r["final"] for r, bad in zip(rows, wrong) if bad)
    print(f"wrong poses whose true pose scores lower: {lower} of {wrong.sum()}", flush=True)
    if hypotheses:
        rank_hypotheses(run, res, scorer, gaussians, K, [i for i, bad in enumerate(wrong) if bad], hypotheses, erode)
    return rows


def rank_hypotheses(run: dict, res: dict, scorer, gaussians, K, queries: list[int], keep: int, erode: int) -> None:
    """For each of ``queries``: the recovery's ``keep`` best coarse poses (its silhouette search on the query put
    on white by its border), each refined at the recovery's first level; which of them is nearest the truth,
    and where the refinement's loss and the map statistic rank it."""
    cfg = run["config"].refine
    data = run["data"]
    settler = PoseSettler(gaussians, data.K, data.width, data.height, cfg, data.train_w2c,
                          Path(res["stage_dirs"]["refine"]) / SEARCH_VIEWS_FILE)
    recovery = settler.recovery
    print("\n| query | nearest coarse deg (silhouette rank) | nearest refined deg | its loss rank | its map rank "
          "| map's pick deg |\n|---|---|---|---|---|---|")
    for i in queries:
        test = data.test[i]
        true = np.asarray(data.test_poses[test.name])
        query = torch.from_numpy(run["queries"][i]).permute(2, 0, 1).float()
        prepared = bench_whitened_by_border(query, float(cfg.bench.border_tau))
        coarse = [w2c for _, w2c in recovery.coarse_poses(prepared, keep)]
        coarse_err = [rotation_error_deg(w, true) for w in coarse]
        refined = [recovery.refiner.refine(prepared, w, levels=[0]) for w in coarse]
        err = np.array([rotation_error_deg(r.w2c, true) for r in refined])
        loss = np.array([r.loss_end for r in refined])
        stat = np.array([inside_mean(scorer, gaussians, K, run["queries"][i], r.w2c, erode) for r in refined])
        best = int(err.argmin())
        print(f"| {test.name} | {min(coarse_err):.1f} ({int(np.argmin(coarse_err))}) | {err[best]:.1f} "
              f"| {int((loss < loss[best]).sum())} | {int((stat < stat[best]).sum())} | {err[stat.argmin()]:.1f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--erode", type=int, default=3, help="px of the scorer's map size")
    parser.add_argument("--wrong-deg", type=float, default=2.0)
    parser.add_argument("--hypotheses", type=int, default=0, help="rank this many recovery hypotheses per wrong pose")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for path in args.runs:
        study(path, args.erode, args.wrong_deg, args.hypotheses)


if __name__ == "__main__":
    main()
