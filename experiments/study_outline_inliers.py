"""Do a PnP pose's inliers lie on the part's outline, and does that tell wrong PnP poses from right ones?

On a part of one colour the only keypoints are on its outline (the contrast with the background) and on
shading edges. An outline keypoint is not a fixed point of the surface (it slides over the surface as the view
moves), so the 2D-3D matches it gives are not those of one rigid pose, and on a turned part (a knob) any turn
fits them. This study localizes every test image of each run again (the run's settings and reference model),
takes the PnP inliers (matches reprojecting within ``ransac_max_error`` at the pose), renders the splats'
alpha at the PnP pose and counts the inliers at least ``--inside`` px inside the rendered silhouette's edge.
Printed per query and summed per run: PnP error, inliers, interior inliers; and how well the interior count
(against the plain count) ranks right PnP poses (<= 1 deg) above wrong ones (> 5 deg), over all runs.

    OMP_NUM_THREADS=1 python experiments/study_outline_inliers.py outputs/runs/synthetic/12SoftKnob/<time> ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from scipy.ndimage import distance_transform_edt
from sklearn.metrics import roc_auc_score

from splatpose.data import resolve_dataset
from splatpose.data.cameras import rotation_error_deg
from splatpose.sfm import pnp as pnp_module
from splatpose.sfm.localization import Localizer
from splatpose.sfm.reference import build_reference
from splatpose.splat.ply import load_gaussians
from splatpose.splat.rendering import render

LAST_CALL: dict = {}
_solve = pnp_module.PnPSolver.__call__


def _recording_solve(self, points2d, points3d):
    """The solver as it is, keeping its input for the inlier test below."""
    LAST_CALL.update(points2d=np.asarray(points2d, np.float64), points3d=np.asarray(points3d, np.float64),
                     max_error=float(self.ransac["max_reproj_error"]) if self.name == "poselib"
                     else float(self.estimation.ransac.max_error))
    return _solve(self, points2d, points3d)


pnp_module.PnPSolver.__call__ = _recording_solve


def inlier_pixels(w2c: np.ndarray, K: np.ndarray) -> np.ndarray:
    """[M, 2] COLMAP-convention pixels of the last PnP call's matches that reproject within its max error."""
    p2, p3 = LAST_CALL["points2d"], LAST_CALL["points3d"]
    cam = p3 @ w2c[:3, :3].T + w2c[:3, 3]
    proj = cam[:, :2] / cam[:, 2:3] * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]
    ok = (cam[:, 2] > 0) & (np.linalg.norm(proj - p2, axis=1) <= LAST_CALL["max_error"])
    return p2[ok]


def depth_inside(gaussians, K: np.ndarray, w2c: np.ndarray, width: int, height: int) -> np.ndarray:
    """[H, W] px from each pixel to the nearest pixel outside the rendered silhouette (alpha > 0.5); 0 outside."""
    _, alpha = render(gaussians, torch.as_tensor(w2c, dtype=torch.float32), torch.as_tensor(K, dtype=torch.float32),
                      width, height, return_alpha=True)
    return distance_transform_edt(alpha[0, ..., 0].numpy() > 0.5)


def study(path: Path, inside: float) -> list[dict]:
    res = json.loads((path / "results.json").read_text())
    cfg = OmegaConf.create(res["config"])
    data = resolve_dataset(cfg.dataset, res["class"])
    reference = build_reference(data, cfg.sfm, Path(res["stage_dirs"]["sfm"]), "cpu")
    localizer = Localizer(data.K, data.width, data.height, cfg.sfm, reference, data.train_w2c, "cpu")
    gaussians = load_gaussians(Path(res["gaussians_ply"]), "cpu")
    rows = []
    print(f"\n## {res['dataset']}/{res['class']} ({cfg.dataset.get('preset')}, {path.name})\n\n"
          "| query | PnP deg | inliers | interior inliers |\n|---|---|---|---|")
    for test in data.test:
        pose, _ = localizer.localize(test.path, test.name)
        if not pose.success:
            continue
        pixels = inlier_pixels(pose.w2c, data.K)
        depth = depth_inside(gaussians, data.K, pose.w2c, data.width, data.height)
        col = np.clip(np.floor(pixels[:, 0]).astype(int), 0, data.width - 1)
        row = np.clip(np.floor(pixels[:, 1]).astype(int), 0, data.height - 1)
        interior = int((depth[row, col] >= inside).sum())
        error = rotation_error_deg(pose.w2c, data.test_poses[test.name])
        rows.append({"run": res["class"], "error": error, "inliers": pose.num_inliers, "interior": interior})
        print(f"| {test.name} | {error:.2f} | {pose.num_inliers} | {interior} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--inside", type=float, default=3.0, help="px inside the rendered silhouette's edge")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = [r for path in args.runs for r in study(path, args.inside)]
    right = np.array([r["error"] <= 1.0 for r in rows])
    wrong = np.array([r["error"] > 5.0 for r in rows])
    keep = right | wrong
    print(f"\n{right.sum()} right (<= 1 deg), {wrong.sum()} wrong (> 5 deg) PnP poses over {len(args.runs)} runs")
    if right.sum() and wrong.sum():
        for key in ("inliers", "interior"):
            values = np.array([r[key] for r in rows])[keep]
            print(f"AUROC of {key} (right above wrong): {roc_auc_score(right[keep], values):.3f}; "
                  f"wrong max {values[wrong[keep]].max()}, right 5th pct {np.percentile(values[right[keep]], 5):.0f}")
    for threshold in (5, 10, 15, 20):
        kept = np.array([r["interior"] >= threshold for r in rows])
        print(f"interior >= {threshold}: keeps {int((kept & right).sum())} of {right.sum()} right, "
              f"{int((kept & wrong).sum())} of {wrong.sum()} wrong")


if __name__ == "__main__":
    main()
