"""Initial points: SfM points kept, topped up with random points carved by the silhouettes."""

import numpy as np
import torch

from splatpose.splat.initialization import initial_points, object_bounds_from_cameras
from scene_cameras import look_at  # tests/scene_cameras.py

SIZE, RADIUS, FOCAL = 48, 0.5, 60.0


def sphere_views(n_views=12):
    """Views of a grey ball of radius 0.5 at the origin on white: (images uint8, w2c, K)."""
    K = np.array([[FOCAL, 0, SIZE / 2], [0, FOCAL, SIZE / 2], [0, 0, 1]])
    angles = np.linspace(0, 2 * np.pi, n_views, endpoint=False)
    w2c = np.stack([look_at([3 * np.cos(t), 3 * np.sin(t), 1.2 * np.sin(2 * t)]) for t in angles])
    j, i = np.meshgrid(np.arange(SIZE) + 0.5, np.arange(SIZE) + 0.5)
    rays_cam = np.stack([(j - SIZE / 2) / FOCAL, (i - SIZE / 2) / FOCAL, np.ones_like(i)], -1)
    images = []
    for pose in w2c:
        rays = rays_cam @ pose[:3, :3]  # to world (R^T d), unnormalised
        rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
        origin = -pose[:3, :3].T @ pose[:3, 3]
        # distance from the ball's centre (origin) to each ray
        along = -(rays @ origin)
        distance = np.linalg.norm(origin[None, None] + along[..., None] * rays, axis=-1)
        images.append(np.where(distance[..., None] < RADIUS, 120, 255).astype(np.uint8).repeat(3, -1))
    return torch.from_numpy(np.stack(images)), torch.tensor(w2c, dtype=torch.float32), torch.tensor(K, dtype=torch.float32)


def test_bounds_from_cameras_contain_the_object():
    _, w2c, K = sphere_views()
    centre, radius = object_bounds_from_cameras(w2c.double().numpy(), K.double().numpy(), SIZE, SIZE)
    assert np.linalg.norm(centre) < 0.05 and RADIUS < radius < 3 * RADIUS


def test_sfm_points_are_kept_and_topped_up_inside_the_silhouettes():
    images, w2c, K = sphere_views()
    sfm = np.array([[0.0, 0.0, 0.5], [0.1, -0.2, 0.3]])
    xyz, rgb = initial_points(sfm, np.full((2, 3), 0.25), images, w2c, K, num_points=3000)
    assert xyz.shape == (3000, 3) and rgb.shape == (3000, 3)
    assert np.array_equal(xyz[:2], sfm) and np.allclose(rgb[:2], 0.25)
    distance = np.linalg.norm(xyz[2:], axis=1)
    # the visual hull of a ball seen from a ring of views: close around it, never far outside
    assert distance.max() < 1.6 * RADIUS and np.mean(distance < RADIUS) > 0.6
    assert np.allclose(rgb[2:], 120 / 255, atol=0.02)  # colours sampled from the views


def test_without_carving_points_fill_the_bounding_sphere():
    images, w2c, K = sphere_views()
    xyz, _ = initial_points(None, None, images, w2c, K, num_points=2000, carve=False)
    assert len(xyz) == 2000 and np.mean(np.linalg.norm(xyz, axis=1) > 1.6 * RADIUS) > 0.3
