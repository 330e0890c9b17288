"""Camera conventions: the one place where poses change axes.

MAD-Sim (like every NeRF-Blender dataset) stores camera-to-world matrices in OpenGL/Blender axes:
x right, y up, z pointing *backwards* (the camera looks along -z). Inside this project every pose is
world-to-camera in OpenCV/COLMAP axes: x right, y down, z forward. Both describe the same physical
camera; the conversion flips the camera's y and z axes and inverts the rigid transform.

Pixel convention (COLMAP's): the image spans [0, W] x [0, H]; the centre of pixel (row i, column j)
is at (j + 0.5, i + 0.5). So a principal point at (W/2, H/2) is the exact image centre.
"""

from __future__ import annotations

import numpy as np

# Flipping y and z turns OpenGL camera axes into OpenCV camera axes (and back: it is its own inverse).
_FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])


def invert_rigid(T: np.ndarray) -> np.ndarray:
    """Inverse of rigid transforms [..., 4, 4] (rotation + translation), exact and cheap: [R|t]^-1 = [R^T|-R^T t]."""
    T = np.asarray(T, dtype=np.float64)
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    Rt = np.swapaxes(R, -1, -2)
    out = np.zeros_like(T)
    out[..., :3, :3] = Rt
    out[..., :3, 3:] = -Rt @ t
    out[..., 3, 3] = 1.0
    return out


def opengl_c2w_to_opencv_w2c(c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world in OpenGL axes (y up, z back) -> world-to-camera in OpenCV axes (y down, z forward).

    Args:
        c2w: [..., 4, 4] rigid transforms, as in transforms.json ``frames[i].transform_matrix``.
    Returns:
        w2c: [..., 4, 4] float64, mapping world points into OpenCV camera coordinates.
    """
    c2w = np.asarray(c2w, dtype=np.float64)
    if c2w.shape[-2:] != (4, 4):
        raise ValueError(f"expected camera-to-world matrices of shape [..., 4, 4], got {c2w.shape}")
    # Express the camera axes in OpenCV convention first (c2w @ flip), then invert.
    return invert_rigid(c2w @ _FLIP_YZ)


def opencv_w2c_to_opengl_c2w(w2c: np.ndarray) -> np.ndarray:
    """Inverse of :func:`opengl_c2w_to_opencv_w2c`: [..., 4, 4] OpenCV w2c -> OpenGL c2w (float64)."""
    w2c = np.asarray(w2c, dtype=np.float64)
    if w2c.shape[-2:] != (4, 4):
        raise ValueError(f"expected world-to-camera matrices of shape [..., 4, 4], got {w2c.shape}")
    return invert_rigid(w2c) @ _FLIP_YZ


def intrinsics_from_fov_x(camera_angle_x: float, width: int, height: int) -> np.ndarray:
    """Pinhole K [3, 3] (float64) from the horizontal field of view, as the MAD-Sim reference code does.

    Square pixels: f = 0.5 * W / tan(0.5 * camera_angle_x), principal point at the image centre
    (W/2, H/2) in COLMAP's pixel convention (see module docstring).

    Args:
        camera_angle_x: horizontal field of view in radians, in (0, pi).
        width, height: image size in pixels.
    """
    if not 0.0 < camera_angle_x < np.pi:
        raise ValueError(f"camera_angle_x must be a field of view in radians in (0, pi), got {camera_angle_x}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    f = 0.5 * width / np.tan(0.5 * camera_angle_x)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def camera_center(w2c: np.ndarray) -> np.ndarray:
    """World position [3] of the camera of a world-to-camera matrix [4, 4]: c = -R^T t."""
    w2c = np.asarray(w2c, dtype=np.float64)
    return -w2c[:3, :3].T @ w2c[:3, 3]


def rotation_error_deg(w2c_a: np.ndarray, w2c_b: np.ndarray) -> float:
    """Angle in degrees of the relative rotation between two world-to-camera poses [4, 4]."""
    R = np.asarray(w2c_a, dtype=np.float64)[:3, :3] @ np.asarray(w2c_b, dtype=np.float64)[:3, :3].T
    cos = np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)))


def center_error(w2c_a: np.ndarray, w2c_b: np.ndarray) -> float:
    """Euclidean distance (world units) between the camera centres of two world-to-camera poses [4, 4]."""
    return float(np.linalg.norm(camera_center(w2c_a) - camera_center(w2c_b)))


def project_points(points_world: np.ndarray, w2c: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project world points [N, 3] through an OpenCV w2c [4, 4] and K [3, 3].

    Returns:
        uv: [N, 2] pixel coordinates (x to the right, y down; COLMAP pixel convention).
        depth: [N] z in the camera frame (positive in front of the camera).
    """
    points_world = np.asarray(points_world, dtype=np.float64)
    cam = points_world @ w2c[:3, :3].T + w2c[:3, 3]
    depth = cam[:, 2]
    uv_h = cam @ np.asarray(K, dtype=np.float64).T
    return uv_h[:, :2] / uv_h[:, 2:3], depth


def look_at_opengl_c2w(eye: np.ndarray, target: np.ndarray, up: np.ndarray, roll_deg: float = 0.0) -> np.ndarray:
    """OpenGL camera-to-world [4, 4] of a camera at ``eye`` looking at ``target``.

    ``up`` is the world direction that should appear upwards in the image (it must not be parallel
    to the viewing direction); ``roll_deg`` then rotates the camera about its viewing axis
    (right-handed about the OpenGL +z axis, so the image content turns clockwise).
    """
    eye = np.asarray(eye, dtype=np.float64)
    back = eye - np.asarray(target, dtype=np.float64)  # OpenGL +z points away from the target
    back /= np.linalg.norm(back)
    right = np.cross(np.asarray(up, dtype=np.float64), back)
    norm = np.linalg.norm(right)
    if norm < 1e-8:
        raise ValueError(f"up vector {up} is parallel to the viewing direction from {eye} to {target}")
    right /= norm
    cam_up = np.cross(back, right)
    if roll_deg:
        a = np.radians(roll_deg)
        right, cam_up = np.cos(a) * right + np.sin(a) * cam_up, -np.sin(a) * right + np.cos(a) * cam_up
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, cam_up, back, eye
    return c2w
