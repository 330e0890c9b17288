"""The similarity alignment of estimated cameras to true ones (evaluation of pose-free runs)."""

import numpy as np
import pycolmap
from scipy.spatial.transform import Rotation

from splatpose.data.cameras import look_at_opengl_c2w, opengl_c2w_to_opencv_w2c, rotation_error_deg
from splatpose.sfm.frame_alignment import align_to_true_poses
from splatpose.sfm.triangulation import rigid_from_w2c, w2c_from_rigid


def ring_of_cameras(n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, 4, 4] OpenCV w2c of cameras around the origin at distance 3, looking at it."""
    poses = []
    for i in range(n):
        azimuth, elevation = 2 * np.pi * i / n, rng.uniform(-0.6, 1.0)
        eye = 3.0 * np.array([np.cos(azimuth) * np.cos(elevation), np.sin(azimuth) * np.cos(elevation),
                              np.sin(elevation)])
        poses.append(opengl_c2w_to_opencv_w2c(look_at_opengl_c2w(eye, np.zeros(3), np.array([0, 0, 1.0]))))
    return np.stack(poses)


def test_alignment_recovers_a_known_similarity_despite_outlier_cameras():
    rng = np.random.default_rng(3)
    true_w2c = ring_of_cameras(30, rng)
    # The SfM frame: true = s R sfm + t, i.e. sfm_from_true is the inverse similarity.
    true_from_sfm = pycolmap.Sim3d(0.37, pycolmap.Rotation3d(Rotation.from_rotvec([0.4, -1.1, 0.7]).as_matrix()),
                                   np.array([2.0, -5.0, 0.5]))
    sfm_from_true = true_from_sfm.inverse()
    sfm_w2c = np.stack([w2c_from_rigid(sfm_from_true.transform_camera_world(rigid_from_w2c(w))) for w in true_w2c])
    # Three badly placed cameras: moved by half the scene radius and turned by 20 degrees.
    outliers = [4, 11, 25]
    for i in outliers:
        bad = sfm_w2c[i].copy()
        bad[:3, :3] = Rotation.from_rotvec([0.0, 0.35, 0.0]).as_matrix() @ bad[:3, :3]
        bad[:3, 3] += np.array([3.0, -2.0, 1.0])
        sfm_w2c[i] = bad
    names = [f"{i}.png" for i in range(len(true_w2c))]

    alignment = align_to_true_poses(names, sfm_w2c, true_w2c)

    assert alignment is not None
    assert abs(alignment.true_from_sfm.scale - 0.37) < 1e-6
    np.testing.assert_allclose(alignment.true_from_sfm.matrix(), true_from_sfm.matrix(), atol=1e-6)
    summary = alignment.summary()
    assert summary["outliers"] == [names[i] for i in outliers]
    assert summary["num_inliers"] == 27 and summary["median_center_error_rel"] < 1e-6
    assert summary["median_rotation_error_deg"] < 1e-4 and summary["max_rotation_error_deg"] > 10
    # A pose of the SfM frame maps to the same camera in the true frame.
    inlier = 7
    mapped = alignment.w2c_in_true_frame(sfm_w2c[inlier])
    assert rotation_error_deg(mapped, true_w2c[inlier]) < 1e-4
    np.testing.assert_allclose(mapped, true_w2c[inlier], atol=1e-6)


def test_alignment_needs_three_cameras():
    w2c = ring_of_cameras(2, np.random.default_rng(0))
    assert align_to_true_poses(["a", "b"], w2c, w2c) is None
