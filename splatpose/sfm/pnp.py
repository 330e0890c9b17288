"""Absolute pose from 2D-3D correspondences: RANSAC (P3P) and a non-linear refinement, intrinsics fixed.

Two solvers, chosen by ``sfm.localization.pnp``:

- ``poselib`` (the default): PoseLib's LO-RANSAC, then its Levenberg-Marquardt refinement of the pose on
  the RANSAC inliers with a Cauchy loss of 1 px, the objective of pycolmap's refinement. Same errors
  against the true poses as pycolmap in a fraction of its time, its refinement being a small dense
  solver rather than a Ceres problem. The final refinement inside PoseLib's ``estimate_absolute_pose``
  is skipped (``max_iterations`` 0): refining the inliers separately gives smaller rotation errors.
  Chosen in experiments/results/localization_options_cpu_01Ant400_2026-11-25.md.
- ``pycolmap``: COLMAP's LO-RANSAC and its Ceres refinement (also what a finished run whose config has
  no ``pnp`` key localizes with).

Both take points in COLMAP's pixel convention (pixel centres at +0.5) and a PINHOLE camera, and return
the world-to-camera pose with the number of RANSAC inliers, or None when RANSAC found nothing.
"""

from __future__ import annotations

import numpy as np
import poselib
import pycolmap
from omegaconf import DictConfig

PNP_SOLVERS = ("poselib", "pycolmap")
DEFAULT_SOLVER_OF_OLD_RUNS = "pycolmap"


def solver_name(localization: DictConfig) -> str:
    """The ``pnp`` setting of a ``localization`` node (absent: pycolmap, what older runs used); ValueError
    naming the choices for an unknown one."""
    name = localization.get("pnp", DEFAULT_SOLVER_OF_OLD_RUNS)
    if name not in PNP_SOLVERS:
        raise ValueError(f"sfm.localization.pnp={name} is unknown; choose one of {', '.join(PNP_SOLVERS)}")
    return name


class PnPSolver:
    """One solver with the ``localization`` node's settings; call with points2d [N, 2], points3d [N, 3].

    Settings used: ``pnp``, ``ransac_max_error`` (px), ``ransac_min_num_trials`` and
    ``refine_max_iterations`` (null: the solver's own default; pycolmap 100 and 100, PoseLib 1000 and
    100). RANSAC is seeded (0), so a query gets the same pose in every run.
    """

    def __init__(self, localization: DictConfig, camera: pycolmap.Camera):
        self.name = solver_name(localization)
        max_error = float(localization.ransac_max_error)
        min_trials = localization.get("ransac_min_num_trials")
        refine_iterations = localization.get("refine_max_iterations")
        self.camera = camera
        if self.name == "poselib":
            self.poselib_camera = {"model": camera.model.name, "width": camera.width, "height": camera.height,
                                   "params": [float(p) for p in camera.params]}
            self.ransac = {"max_reproj_error": max_error, "seed": 0}
            if min_trials is not None:
                self.ransac["min_iterations"] = int(min_trials)
            self.bundle = {"loss_type": "CAUCHY", "loss_scale": 1.0}  # px, as pycolmap's loss_function_scale
            if refine_iterations is not None:
                self.bundle["max_iterations"] = int(refine_iterations)
        else:
            self.estimation = pycolmap.AbsolutePoseEstimationOptions()
            self.estimation.ransac.max_error = max_error
            self.estimation.ransac.random_seed = 0
            if min_trials is not None:
                self.estimation.ransac.min_num_trials = int(min_trials)
            self.refinement = pycolmap.AbsolutePoseRefinementOptions()
            if refine_iterations is not None:
                self.refinement.max_num_iterations = int(refine_iterations)

    def __call__(self, points2d: np.ndarray, points3d: np.ndarray) -> tuple[np.ndarray, int] | None:
        """(w2c [4, 4] float64, number of inliers), or None when no pose was found."""
        points2d = np.ascontiguousarray(points2d, dtype=np.float64)
        points3d = np.ascontiguousarray(points3d, dtype=np.float64)
        w2c = np.eye(4)
        if self.name == "poselib":
            pose, info = poselib.estimate_absolute_pose(points2d, points3d, self.poselib_camera, self.ransac,
                                                        {"max_iterations": 0})
            inliers = np.asarray(info["inliers"], dtype=bool)
            if not inliers.any():
                return None
            pose, _ = poselib.refine_absolute_pose(points2d[inliers], points3d[inliers], pose, self.poselib_camera,
                                                   self.bundle)
            w2c[:3] = pose.Rt
            return w2c, int(inliers.sum())
        result = pycolmap.estimate_and_refine_absolute_pose(points2d, points3d, self.camera, self.estimation,
                                                            self.refinement)
        if result is None:
            return None
        w2c[:3] = result["cam_from_world"].matrix()
        return w2c, int(result["num_inliers"])
