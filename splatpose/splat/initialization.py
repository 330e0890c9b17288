"""Where the first Gaussians go: SfM points, topped up with points inside the object's visual hull.

SfM on small, texture-poor objects can give only a few hundred points, and 3DGS densification
grows from them slowly (a quick CPU run has ~1500 steps, not 30k). So the SfM points are topped up
to ``num_points`` with random points inside the object: sampled in the sphere that the cameras look
at (from the poses alone) and kept only where every train view sees foreground, i.e. not the white
background of object-centric captures (MAD-Sim and the generated data). This is shape-from-
silhouette carving; with a non-white background nothing is carved away and the points fill the
sphere, which is the plain random initialisation of 3DGS.
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)


def object_bounds_from_cameras(w2c: np.ndarray, K: np.ndarray, width: int, height: int,
                               margin: float = 1.0) -> tuple[np.ndarray, float]:
    """Centre and radius of a sphere that the cameras look at, from the poses alone.

    The cameras of an object-centric capture all point at the object: the centre is the point
    closest (least squares) to all optical axes, and the radius is what the narrowest field of
    view sees at the median camera distance, times ``margin``.

    Args:
        w2c: [V, 4, 4] world-to-camera poses (OpenCV axes)
        K: [3, 3] intrinsics

    Returns: (centre [3], radius)
    """
    c2w = np.linalg.inv(w2c)
    origins = c2w[:, :3, 3]
    axes = c2w[:, :3, 2]  # OpenCV: +z looks forward
    # Least-squares point nearest to all lines o + t*d: sum (I - d d^T) (x - o) = 0.
    projectors = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]
    centre = np.linalg.lstsq(projectors.sum(0), np.einsum("vij,vj->i", projectors, origins), rcond=None)[0]
    distance = float(np.median(np.linalg.norm(origins - centre, axis=1)))
    half_view = min(0.5 * width / K[0, 0], 0.5 * height / K[1, 1])  # tan of the half field of view
    return centre, margin * distance * half_view / math.sqrt(1 + half_view ** 2)


def random_points_in_sphere(centre: np.ndarray, radius: float, num_points: int,
                            rng: np.random.Generator) -> np.ndarray:
    """Uniform random points inside a sphere, [num_points, 3] float64."""
    directions = rng.normal(size=(num_points, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return centre[None] + directions * (radius * rng.random(num_points) ** (1 / 3))[:, None]


def project(points: np.ndarray, w2c: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates [V, N, 2] (COLMAP convention, pixel (i, j) centred at (j+0.5, i+0.5)) and
    camera depths [V, N] of world points [N, 3] in V cameras."""
    cam = np.einsum("vij,nj->vni", w2c[:, :3, :3], points) + w2c[:, None, :3, 3]
    pixels = np.einsum("ij,vnj->vni", K, cam)
    return pixels[..., :2] / pixels[..., 2:3], cam[..., 2]


def foreground_masks(images: np.ndarray, background_threshold: float = 0.96) -> np.ndarray:
    """bool [V, H, W]: pixels that are not (near-)white background; images [V, H, W, 3] uint8."""
    return (images.astype(np.float32) / 255.0).min(axis=-1) < background_threshold


def carve_by_silhouettes(points: np.ndarray, masks: np.ndarray, w2c: np.ndarray, K: np.ndarray,
                         max_misses: int = 1) -> np.ndarray:
    """Mask [N] of points that fall on foreground in all views but ``max_misses`` (a point outside
    a view's image counts as foreground there: that view says nothing about it)."""
    n_views, height, width = masks.shape
    pixels, depth = project(points, w2c, K)
    col, row = np.floor(pixels[..., 0]).astype(np.int64), np.floor(pixels[..., 1]).astype(np.int64)
    inside = (depth > 0) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    on_foreground = np.ones(inside.shape, dtype=bool)
    views = np.nonzero(inside)
    on_foreground[views] = masks[views[0], row[views], col[views]]
    return (~on_foreground).sum(axis=0) <= max_misses


def sample_colours(points: np.ndarray, images: np.ndarray, w2c: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Median colour [N, 3] in [0, 1] of each point over the views it projects into (occlusion is
    ignored: a starting colour only)."""
    n_views, height, width, _ = images.shape
    pixels, depth = project(points, w2c, K)
    col = np.clip(np.floor(pixels[..., 0]).astype(np.int64), 0, width - 1)
    row = np.clip(np.floor(pixels[..., 1]).astype(np.int64), 0, height - 1)
    colours = images[np.arange(n_views)[:, None], row, col].astype(np.float32) / 255.0  # [V, N, 3]
    return np.median(colours, axis=0)


def initial_points(points_xyz: np.ndarray | None, points_rgb: np.ndarray | None, images: np.ndarray,
                   w2c: np.ndarray, K: np.ndarray, num_points: int, carve: bool = True,
                   background_threshold: float = 0.96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The SfM points, topped up to ``num_points`` with points inside the visual hull.

    Args:
        points_xyz, points_rgb: [M, 3] SfM points and colours in [0, 1], or None
        images: [V, H, W, 3] uint8 train views; w2c: [V, 4, 4] OpenCV; K: [3, 3]
        num_points: total wanted (SfM points are always all kept)
        carve: keep random points only inside the silhouettes (else anywhere in the sphere)

    Returns: (xyz [N, 3] float64, rgb [N, 3] float32 in [0, 1])
    """
    xyz = np.zeros((0, 3)) if points_xyz is None else np.asarray(points_xyz, dtype=np.float64).reshape(-1, 3)
    rgb = np.zeros((0, 3), np.float32) if points_rgb is None or len(xyz) == 0 \
        else np.asarray(points_rgb, dtype=np.float32).reshape(-1, 3)
    missing = num_points - len(xyz)
    if missing <= 0:
        return xyz, rgb
    height, width = images.shape[1:3]
    centre, radius = object_bounds_from_cameras(w2c, K, width, height)
    rng = np.random.default_rng(seed)
    masks = foreground_masks(images, background_threshold) if carve else None
    extra = np.zeros((0, 3))
    for _ in range(8):  # the hull fills an unknown share of the sphere: sample until enough
        candidates = random_points_in_sphere(centre, radius, 4 * missing, rng)
        if carve:
            candidates = candidates[carve_by_silhouettes(candidates, masks, w2c, K)]
        extra = np.concatenate([extra, candidates])[:missing]
        if len(extra) == missing:
            break
    if carve and len(extra) == 0:
        log.warning("Silhouette carving kept no point (is the background white?); sampling the whole sphere")
        extra = random_points_in_sphere(centre, radius, missing, rng)
    log.info("Initial points: %d from SfM + %d random inside the %s (sphere radius %.3g)", len(xyz), len(extra),
             "visual hull" if carve else "sphere", radius)
    return (np.concatenate([xyz, extra]),
            np.concatenate([rgb, sample_colours(extra, images, w2c, K)]).astype(np.float32))
