"""Render-and-match: can a query's pose be corrected by matching it against the splats' render at a pose guess?

For a pose guess, the splats are rendered at it twice: colours on white (what the localization's features are
extracted from) and a *point map* (each pixel's expected world point: the Gaussians' centres composited as
colours, divided by alpha). The run's own extractor and matcher match the query against the colour render;
each match's render keypoint is lifted to its world point (where alpha > ``--min-alpha``), and the run's PnP
solver gives a new pose. Repeated ``--rounds`` times from the new pose. Matching against a render near the
query's pose needs no bench handling (the render is on white, the bench has nothing to match) and sees the
query's own viewpoint, not the nearest reference view's.

Printed per run: for the final poses (the run's answers), and for the true poses turned by ``--perturb-deg``
about a random axis through the object (the basin), each round's pose error, matches and inliers.

    OMP_NUM_THREADS=1 python experiments/study_render_match.py outputs/runs/synthetic/12SoftKnob/<time> ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from study_scoring import load_run
from splatpose.data.cameras import rotation_error_deg
from splatpose.refine.recovery import axis_angle
from splatpose.sfm.features import FeatureSize, build_extractor, to_original_pixels
from splatpose.sfm.matchers import build_matcher
from splatpose.sfm.pnp import PnPSolver
from splatpose.sfm.triangulation import colmap_camera
from splatpose.splat.ply import load_gaussians
from splatpose.splat.rendering import activated, rasterize, render


class RenderMatcher:
    """One run's extractor, matcher and PnP, and its splats; ``step(query, w2c)`` is one render-and-match round."""

    def __init__(self, run: dict, min_alpha: float):
        cfg = run["config"]
        data = run["data"]
        self.gaussians = load_gaussians(run["ply"], "cpu")
        self.K = torch.as_tensor(data.K, dtype=torch.float32)
        self.width, self.height = data.width, data.height
        self.feature_size = FeatureSize.from_config(cfg.sfm)
        max_keypoints = int(cfg.sfm.localization.get("max_keypoints") or cfg.sfm.max_keypoints)
        self.extractor = build_extractor(cfg.sfm.feature, max_keypoints, "cpu")
        self.matcher = build_matcher(cfg.sfm.matcher, cfg.sfm.feature.name, "cpu")
        self.pnp = PnPSolver(cfg.sfm.localization, colmap_camera(data.K, data.width, data.height))
        self.min_alpha = min_alpha
        self._query_cache: dict[int, dict] = {}

    def features(self, image: torch.Tensor) -> dict:
        """Features of ``image`` [3, H, W] in [0, 1], resized as the localization resizes, keypoints in its pixels."""
        h, w = image.shape[-2:]
        image = self.feature_size.resized(image[None])[0]
        feats = self.extractor(image[None])[0]
        feats["keypoints"] = to_original_pixels(feats["keypoints"], (image.shape[-1], image.shape[-2]), (w, h))
        feats["image_size"] = np.array((w, h), dtype=np.int64)
        return feats

    def point_map(self, w2c: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Colour render [3, H, W], world points [H, W, 3] and alpha [H, W] at ``w2c``."""
        viewmat = torch.as_tensor(w2c, dtype=torch.float32)[None]
        rgb = render(self.gaussians, viewmat, self.K, self.width, self.height)[0].clamp(0, 1).permute(2, 0, 1)
        means, quats, scales, opacities = activated(self.gaussians)
        points, alpha, _ = rasterize(means, quats, scales, opacities, means, viewmat, self.K[None], self.width,
                                     self.height, backgrounds=torch.zeros(1, 3))
        alpha = alpha[0, ..., 0]
        return rgb, points[0] / alpha.clamp_min(1e-6)[..., None], alpha

    def step(self, key: int, query: np.ndarray, w2c: np.ndarray) -> tuple[np.ndarray | None, int, int]:
        """(new w2c or None, matches, inliers) of one round from ``w2c``."""
        if key not in self._query_cache:
            self._query_cache[key] = self.features(torch.from_numpy(query).permute(2, 0, 1).float())
        q = self._query_cache[key]
        rgb, points, alpha = self.point_map(w2c)
        r = self.features(rgb)
        matches0, _ = self.matcher(self.matcher.prepare(q), self.matcher.prepare(r))
        qi = np.flatnonzero(matches0 > -1)
        rk = np.rint(r["keypoints"][matches0[qi]]).astype(int)
        rk[:, 0] = rk[:, 0].clip(0, self.width - 1)
        rk[:, 1] = rk[:, 1].clip(0, self.height - 1)
        keep = alpha[rk[:, 1], rk[:, 0]].numpy() > self.min_alpha
        if keep.sum() < 6:
            return None, int(keep.sum()), 0
        points3d = points[rk[keep, 1], rk[keep, 0]].double().numpy()
        solved = self.pnp(q["keypoints"][qi[keep]].astype(np.float64) + 0.5, points3d)
        if solved is None:
            return None, int(keep.sum()), 0
        return solved[0], int(keep.sum()), solved[1]


def turned(w2c: np.ndarray, degrees: float, rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    """``w2c`` with the world turned by ``degrees`` about a random axis through ``centre``."""
    axis = rng.normal(size=3)
    rotation = axis_angle(axis / np.linalg.norm(axis), np.radians(degrees))
    transform = np.eye(4)
    transform[:3, :3], transform[:3, 3] = rotation, centre - rotation @ centre
    return np.asarray(w2c) @ transform


def study(path: Path, rounds: int, perturb: list[float], min_alpha: float, only_wrong: bool) -> None:
    run = load_run(path)
    data = run["data"]
    res = json.loads((path / "results.json").read_text())
    settled = json.loads((Path(res["stage_dirs"]["refine"]) / "refined_poses.json").read_text())
    matcher = RenderMatcher(run, min_alpha)
    centre = matcher.gaussians.means.detach().median(0).values.double().numpy()
    rng = np.random.default_rng(0)
    starts = {"final": [np.asarray(p["w2c"]) for p in settled]}
    for deg in perturb:
        starts[f"true+{deg:g}"] = [turned(data.test_poses[t.name], deg, rng, centre) for t in data.test]
    print(f"\n## {run['name']} ({path.name})\n")
    print("| start | query | start deg | " + " | ".join(f"round {k + 1} deg (matches/inliers)" for k in range(rounds))
          + " |\n|---|---|---|" + "---|" * rounds)
    for label, poses in starts.items():
        errors = []
        for i, (test, w2c) in enumerate(zip(data.test, poses)):
            true = np.asarray(data.test_poses[test.name])
            start_err = rotation_error_deg(w2c, true)
            if label == "final" and only_wrong and start_err <= 1.0:
                continue
            cells, pose = [], w2c
            for _ in range(rounds):
                new, n_matches, n_inliers = matcher.step(i, run["queries"][i], pose)
                if new is None:
                    cells.append(f"- ({n_matches}/{n_inliers})")
                    continue
                pose = new
                cells.append(f"{rotation_error_deg(pose, true):.2f} ({n_matches}/{n_inliers})")
            errors.append((start_err, rotation_error_deg(pose, true)))
            print(f"| {label} | {test.name} | {start_err:.2f} | " + " | ".join(cells) + " |", flush=True)
        if errors:
            e = np.array(errors)
            print(f"\n{label}: within 1 deg {int((e[:, 0] <= 1).sum())} -> {int((e[:, 1] <= 1).sum())} of {len(e)}; "
                  f"median {np.median(e[:, 0]):.3f} -> {np.median(e[:, 1]):.3f} deg\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--perturb-deg", type=float, nargs="*", default=[10.0, 20.0])
    parser.add_argument("--min-alpha", type=float, default=0.9)
    parser.add_argument("--only-wrong", action="store_true", help="final poses: only those over 1 deg")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for path in args.runs:
        study(path, args.rounds, args.perturb_deg, args.min_alpha, args.only_wrong)


if __name__ == "__main__":
    main()
