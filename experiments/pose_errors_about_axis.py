"""Per query of a finished run: the final pose's rotation error and its part about the object's axis.

A turned part (a knob, a bottle, a mug) looks nearly the same turned about its axis; this tells such a
turn from any other pose error. The axis is the one of the run's splats' near-symmetric turns
(``splatpose.refine.symmetry.near_symmetries`` with the run's ``refine.symmetry`` settings; with none
found, only the total error is given). For query i with true and final world-to-camera poses T_i and
E_i, the world turn D = T_i^-1 E_i (E_i = T_i D) has a rotation vector r; its part about the unit axis a
is |r . a| (degrees). Needs the class's true test poses (generated data) and a run with known reference
poses (an estimated-camera run's poses are in the SfM frame).

    python experiments/pose_errors_about_axis.py outputs/runs/synthetic/08PlainKnob/<time> \
        .cache/splatpose/synthetic/synthetic-852d737ce844
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from scipy.spatial.transform import Rotation

from splatpose.data import mad_sim
from splatpose.refine.symmetry import near_symmetries
from splatpose.splat.ply import load_gaussians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished evaluation run (results.json)")
    parser.add_argument("dataset_root", type=Path, help="the folder holding the run's class (MAD-Sim layout)")
    args = parser.parse_args()
    results = json.loads((args.run_dir / "results.json").read_text())
    cfg = OmegaConf.load(args.run_dir / "config_resolved.yaml")
    refine_dir = Path(results["stage_dirs"]["refine"])
    poses = {p["name"]: p for p in json.loads((refine_dir / "refined_poses.json").read_text())}
    turns = near_symmetries(load_gaussians(Path(results["gaussians_ply"])), cfg.refine.symmetry)
    axis = np.asarray(turns[0].axis) if turns else None
    print(f"{len(turns)} near-symmetric turns; axis {None if axis is None else np.round(axis, 3).tolist()}")
    data = mad_sim.load_class(args.dataset_root, results["class"])
    if not data.test_poses:
        raise SystemExit(f"{args.dataset_root / results['class']} has no true test poses")
    rows = []
    for name, truth in data.test_poses.items():
        pose = poses[name]
        turn = Rotation.from_matrix((np.linalg.inv(truth) @ np.asarray(pose["w2c"]))[:3, :3]).as_rotvec()
        about = math.degrees(abs(turn @ axis)) if axis is not None else float("nan")
        rows.append((name, pose["path"], math.degrees(np.linalg.norm(turn)), about))
    print("| query | path | rotation error deg | about the axis deg |\n|---|---|---|---|")
    for name, path, total, about in sorted(rows, key=lambda row: -row[2]):
        print(f"| {name} | {path} | {total:.3f} | {about:.3f} |")
    print(f"\nwithin 1 deg: {np.mean([row[2] < 1.0 for row in rows]):.2f}")


if __name__ == "__main__":
    main()
