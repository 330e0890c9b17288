"""Estimated cameras in the true frame: a robust similarity transform, for evaluation only.

A model built from images alone lives in its own frame (origin, rotation and scale arbitrary). Where
the true poses are known (generated data, MAD-Sim), the estimated reference cameras are aligned to the
true ones by the similarity (scale, rotation, translation) that maps the estimated camera centres onto
the true ones, estimated with LO-RANSAC (``pycolmap.estimate_sim3d_robust``), so that a few badly
placed cameras do not pull it. The estimated query poses are then mapped into the true frame with it
(``pycolmap.Sim3d.transform_camera_world``) and compared with the true query poses on the same numbers
as a known-pose run. Nothing here feeds back into the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pycolmap

from splatpose.data.cameras import camera_center, rotation_error_deg
from splatpose.sfm.triangulation import rigid_from_w2c, w2c_from_rigid


@dataclass
class FrameAlignment:
    """true_from_sfm: the similarity mapping SfM-frame points to true-frame points.

    center_errors: [M] distance (true-frame units) between each aligned estimated reference camera
        centre and its true one; rotation_errors_deg: [M] angle between aligned and true orientations;
        inliers: [M] bool, LO-RANSAC's inliers (centre error within its threshold); names: the M cameras' names.
    scene_radius: median distance of the true camera centres from their centroid (true units), the
        scale relative errors are given in.
    """

    true_from_sfm: pycolmap.Sim3d
    names: list[str]
    center_errors: np.ndarray
    rotation_errors_deg: np.ndarray
    inliers: np.ndarray
    scene_radius: float

    def w2c_in_true_frame(self, w2c_sfm: np.ndarray) -> np.ndarray:
        """A world-to-camera pose [4, 4] (OpenCV) of the SfM frame as the same camera in the true frame."""
        return w2c_from_rigid(self.true_from_sfm.transform_camera_world(rigid_from_w2c(w2c_sfm)))

    def summary(self) -> dict:
        """JSON-able: scale, inlier count, and the alignment residuals (relative to the scene radius)."""
        relative = self.center_errors / max(self.scene_radius, 1e-12)
        return {"scale": float(self.true_from_sfm.scale), "num_cameras": len(self.names),
                "num_inliers": int(self.inliers.sum()),
                "median_center_error_rel": float(np.median(relative)),
                "rms_center_error_rel": float(np.sqrt(np.mean(relative ** 2))),
                "max_center_error_rel": float(relative.max()),
                "median_rotation_error_deg": float(np.median(self.rotation_errors_deg)),
                "max_rotation_error_deg": float(self.rotation_errors_deg.max()),
                "outliers": [n for n, inlier in zip(self.names, self.inliers) if not inlier]}


def align_to_true_poses(names: list[str], w2c_sfm: np.ndarray, w2c_true: np.ndarray,
                        max_center_error_rel: float = 0.05, seed: int = 0) -> FrameAlignment | None:
    """The similarity that best maps the estimated camera centres onto the true ones, robustly.

    Args:
        names: the M reference cameras' names.
        w2c_sfm: [M, 4, 4] their estimated world-to-camera poses (OpenCV, SfM frame).
        w2c_true: [M, 4, 4] their true poses (OpenCV, true frame), same order.
        max_center_error_rel: RANSAC inlier threshold on the aligned centre distance, as a fraction of
            the scene radius (median distance of the true centres from their centroid).
    Returns:
        The alignment, or None when fewer than 3 cameras are given or no similarity is found.
    """
    if len(names) < 3:
        return None
    sfm_centers = np.stack([camera_center(w) for w in w2c_sfm])
    true_centers = np.stack([camera_center(w) for w in w2c_true])
    radius = float(np.median(np.linalg.norm(true_centers - true_centers.mean(axis=0), axis=1)))
    options = pycolmap.RANSACOptions()
    options.max_error = max_center_error_rel * radius
    options.random_seed = seed
    found = pycolmap.estimate_sim3d_robust(sfm_centers, true_centers, options)
    if not found:
        return None
    true_from_sfm = found["tgt_from_src"]
    errors = np.linalg.norm(true_from_sfm * sfm_centers - true_centers, axis=1)
    alignment = FrameAlignment(true_from_sfm, list(names), errors, np.zeros(len(names)),
                               np.asarray(found["inlier_mask"], dtype=bool), radius)
    alignment.rotation_errors_deg = np.array([rotation_error_deg(alignment.w2c_in_true_frame(s), t)
                                              for s, t in zip(w2c_sfm, w2c_true)])
    return alignment
