"""Camera conventions: the OpenGL c2w -> OpenCV w2c conversion, checked against an independent
projection and against what VTK actually renders."""

import numpy as np
import pytest

from splatpose.data.cameras import (
    camera_center,
    center_error,
    intrinsics_from_fov_x,
    look_at_opengl_c2w,
    opencv_w2c_to_opengl_c2w,
    opengl_c2w_to_opencv_w2c,
    project_points,
    rotation_error_deg,
)


def _random_c2w(rng):
    eye = rng.normal(size=3)
    eye *= rng.uniform(2.0, 4.0) / np.linalg.norm(eye)
    return look_at_opengl_c2w(eye, rng.uniform(-0.2, 0.2, 3), np.array([0.0, 0.0, 1.0]),
                              roll_deg=rng.uniform(-30, 30))


def _project_opengl(point, c2w, f, width, height):
    """Textbook OpenGL pinhole, written independently of cameras.py: camera looks along -z, y is up,
    image rows grow downwards; pixel centres at +0.5 (the image spans [0, W] x [0, H])."""
    x, y, z = (np.linalg.inv(c2w) @ np.append(point, 1.0))[:3]
    depth = -z
    return np.array([width / 2 + f * x / depth, height / 2 - f * y / depth])


def test_conversion_round_trip_and_batch():
    rng = np.random.default_rng(0)
    c2w = np.stack([_random_c2w(rng) for _ in range(5)])
    w2c = opengl_c2w_to_opencv_w2c(c2w)
    assert w2c.shape == (5, 4, 4)
    np.testing.assert_allclose(opencv_w2c_to_opengl_c2w(w2c), c2w, atol=1e-12)
    np.testing.assert_allclose(w2c[2], opengl_c2w_to_opencv_w2c(c2w[2]), atol=1e-12)
    # The camera centre is the c2w translation in both conventions.
    np.testing.assert_allclose(camera_center(w2c[0]), c2w[0, :3, 3], atol=1e-12)


def test_known_point_lands_on_same_pixel_in_both_conventions():
    rng = np.random.default_rng(1)
    width, height, angle_x = 320, 240, 0.69
    K = intrinsics_from_fov_x(angle_x, width, height)
    f = 0.5 * width / np.tan(0.5 * angle_x)
    for _ in range(20):
        c2w = _random_c2w(rng)
        point = rng.uniform(-0.5, 0.5, 3)
        uv, depth = project_points(point[None], opengl_c2w_to_opencv_w2c(c2w), K)
        assert depth[0] > 0, "a point in front of the camera must have positive OpenCV depth"
        np.testing.assert_allclose(uv[0], _project_opengl(point, c2w, f, width, height), atol=1e-9)


def test_camera_looks_at_its_target_and_roll_turns_about_the_view_axis():
    c2w = look_at_opengl_c2w(np.array([3.0, 0.0, 0.0]), np.zeros(3), np.array([0.0, 0.0, 1.0]))
    K = intrinsics_from_fov_x(0.7, 100, 100)
    w2c = opengl_c2w_to_opencv_w2c(c2w)
    uv, _ = project_points(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.5]]), w2c, K)
    np.testing.assert_allclose(uv[0], [50.0, 50.0], atol=1e-9)  # the target is the image centre
    assert uv[1, 1] < 50.0  # world up (+z) is up in the image (smaller row)
    rolled = opengl_c2w_to_opencv_w2c(look_at_opengl_c2w(np.array([3.0, 0.0, 0.0]), np.zeros(3),
                                                         np.array([0.0, 0.0, 1.0]), roll_deg=30.0))
    assert rotation_error_deg(w2c, rolled) == pytest.approx(30.0, abs=1e-6)
    assert center_error(w2c, rolled) == pytest.approx(0.0, abs=1e-12)


def test_intrinsics_from_fov():
    K = intrinsics_from_fov_x(np.pi / 2, 200, 100)
    np.testing.assert_allclose(K, [[100.0, 0, 100.0], [0, 100.0, 50.0], [0, 0, 1]], atol=1e-12)
    with pytest.raises(ValueError, match="camera_angle_x"):
        intrinsics_from_fov_x(40.0, 200, 100)  # degrees by mistake


def test_projection_matches_the_vtk_render():
    """A small sphere rendered by the dataset generator's renderer appears where K and w2c project it,
    on a non-square image (checks VTK's vertical view angle and the principal point)."""
    pv = pytest.importorskip("pyvista")
    from splatpose.data.offscreen import SURFACE_ID, OffscreenRenderer

    width, height, angle_x = 160, 120, 0.6911
    K = intrinsics_from_fov_x(angle_x, width, height)
    rng = np.random.default_rng(2)
    with OffscreenRenderer(width, height, angle_x) as renderer:
        for _ in range(3):
            c2w = _random_c2w(rng)
            centre = rng.uniform(-0.4, 0.4, 3)
            sphere = pv.Sphere(radius=0.04, center=centre, theta_resolution=24, phi_resolution=24)
            sphere.cell_data[SURFACE_ID] = np.arange(sphere.n_cells)
            ids = renderer.render_surface_ids(sphere, c2w)
            rows, cols = np.nonzero(ids >= 0)
            assert rows.size > 10, "the sphere should be visible"
            # Pixel (row i, col j) has its centre at (j + 0.5, i + 0.5).
            seen = np.array([cols.mean() + 0.5, rows.mean() + 0.5])
            uv, _ = project_points(centre[None], opengl_c2w_to_opencv_w2c(c2w), K)
            np.testing.assert_allclose(seen, uv[0], atol=0.35)


def test_supersampling_keeps_the_id_pass_and_antialiases_the_colour_pass():
    """The id pass reads each pixel's centre whatever the supersampling (so masks stay exact), while
    the colour pass gains blended silhouette pixels, as a real camera gives them."""
    pv = pytest.importorskip("pyvista")
    from splatpose.data.offscreen import SURFACE_ID, VERTEX_RGB, OffscreenRenderer

    sphere = pv.Sphere(radius=0.5, theta_resolution=32, phi_resolution=32)
    sphere.cell_data[SURFACE_ID] = np.arange(sphere.n_cells)
    sphere.point_data[VERTEX_RGB] = np.tile(np.array([[20, 40, 200]], np.uint8), (sphere.n_points, 1))
    c2w = _random_c2w(np.random.default_rng(5))
    renders = {}
    for factor in (1, 3):
        with OffscreenRenderer(96, 80, 0.6911, supersample=factor) as renderer:
            renders[factor] = renderer.render_surface_ids(sphere, c2w), renderer.render_rgb(sphere, c2w)
    (ids_1, rgb_1), (ids_3, rgb_3) = renders[1], renders[3]
    assert (ids_1 >= 0).sum() > 200, "the sphere should be visible"
    assert (ids_1 != ids_3).mean() < 0.002, "the id pass should not depend on the supersampling"
    blue = rgb_3[..., 2].astype(int) - rgb_3[..., 0].astype(int)   # 0 on white, large on the sphere
    aliased_blue = rgb_1[..., 2].astype(int) - rgb_1[..., 0].astype(int)
    is_blend = lambda b: (b > 5) & (b < 0.6 * np.median(b[ids_1 >= 0]))  # noqa: E731
    assert is_blend(blue).sum() > 3 * max(1, is_blend(aliased_blue).sum()), "silhouette pixels should blend"
    with pytest.raises(ValueError, match="odd"):
        OffscreenRenderer(16, 16, 0.7, supersample=2)
