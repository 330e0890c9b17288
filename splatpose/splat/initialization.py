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
import torch

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


def project(points: torch.Tensor, w2c: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates [V, N, 2] (COLMAP convention, pixel (i, j) centred at (j+0.5, i+0.5)) and
    camera depths [V, N] of world points [N, 3] in V cameras (w2c [V, 4, 4], K [3, 3])."""
    cam = torch.matmul(points, w2c[:, :3, :3].transpose(1, 2)) + w2c[:, None, :3, 3]  # [V, N, 3]
    pixels = torch.matmul(cam, K.T)
    return pixels[..., :2] / pixels[..., 2:3].clamp(min=1e-9), cam[..., 2]


def foreground_masks(images: torch.Tensor, background_threshold: float = 0.96) -> torch.Tensor:
    """bool [V, H, W]: pixels that are not (near-)white background; images [V, H, W, 3] uint8."""
    return images.min(dim=-1).values < round(background_threshold * 255)


def pixel_lookup(pixels: torch.Tensor, depth: torch.Tensor, height: int, width: int):
    """Integer pixel (row, col) [V, N] of projected points, clamped, and whether each is in the image."""
    col, row = torch.floor(pixels[..., 0]).long(), torch.floor(pixels[..., 1]).long()
    inside = (depth > 0) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    return row.clamp(0, height - 1), col.clamp(0, width - 1), inside


def carve_by_silhouettes(points: torch.Tensor, masks: torch.Tensor, w2c: torch.Tensor, K: torch.Tensor,
                         max_misses: int = 1, views_per_pass: int = 8) -> torch.Tensor:
    """Mask [N] of points that fall on foreground in all views but ``max_misses`` (a point outside
    a view's image counts as foreground there: that view says nothing about it).

    Views are checked a few at a time and a point is dropped as soon as it has missed too often,
    so the bulk of the candidates (outside the hull) is only ever projected into a few views.
    """
    n_views, height, width = masks.shape
    alive = torch.arange(len(points), device=points.device)
    misses = torch.zeros(len(points), dtype=torch.int32, device=points.device)
    for first in range(0, n_views, views_per_pass):
        views = torch.arange(first, min(first + views_per_pass, n_views), device=points.device)
        pixels, depth = project(points[alive], w2c[views], K)
        row, col, inside = pixel_lookup(pixels, depth, height, width)
        missed = ~(masks[views[:, None], row, col] | ~inside)
        misses[alive] += missed.sum(dim=0, dtype=torch.int32)
        alive = alive[misses[alive] <= max_misses]
    keep = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    keep[alive] = True
    return keep


def sample_colours(points: torch.Tensor, images: torch.Tensor, w2c: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Median colour [N, 3] in [0, 1] of each point over the views (occlusion is ignored: a
    starting colour only)."""
    n_views, height, width, _ = images.shape
    pixels, depth = project(points, w2c, K)
    row, col, _ = pixel_lookup(pixels, depth, height, width)
    colours = images[torch.arange(n_views, device=points.device)[:, None], row, col].float() / 255.0  # [V, N, 3]
    return colours.median(dim=0).values


def spread_subset(n: int, at_most: int) -> list[int]:
    """At most ``at_most`` indices spread evenly over range(n)."""
    return sorted(set(np.linspace(0, n - 1, min(n, at_most)).round().astype(int).tolist()))


@torch.no_grad()
def initial_points(points_xyz: np.ndarray | None, points_rgb: np.ndarray | None, images: torch.Tensor,
                   w2c: torch.Tensor, K: torch.Tensor, num_points: int, carve: bool = True,
                   background_threshold: float = 0.96, seed: int = 0, max_views: int = 32
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The SfM points, topped up to ``num_points`` with points inside the visual hull.

    Args:
        points_xyz, points_rgb: [M, 3] SfM points and colours in [0, 1], or None
        images: [V, H, W, 3] uint8 train views; w2c: [V, 4, 4] OpenCV; K: [3, 3]
        num_points: total wanted (SfM points are always all kept)
        carve: keep random points only inside the silhouettes (else anywhere in the sphere)
        max_views: silhouettes of this many views (spread over all) carve; more add little

    Returns: (xyz [N, 3] float64, rgb [N, 3] float32 in [0, 1])
    """
    xyz = np.zeros((0, 3)) if points_xyz is None else np.asarray(points_xyz, dtype=np.float64).reshape(-1, 3)
    rgb = np.zeros((0, 3), np.float32) if points_rgb is None or len(xyz) == 0 \
        else np.asarray(points_rgb, dtype=np.float32).reshape(-1, 3)
    missing = num_points - len(xyz)
    if missing <= 0:
        return xyz, rgb
    height, width = images.shape[1:3]
    centre, radius = object_bounds_from_cameras(w2c.double().numpy(), K.double().numpy(), width, height)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = spread_subset(len(images), max_views)
    images, w2c, K = images[chosen].to(device), w2c[chosen].float().to(device), K.float().to(device)
    masks = foreground_masks(images, background_threshold)
    rng = np.random.default_rng(seed)
    extra, acceptance = np.zeros((0, 3)), 1.0
    for _ in range(4):  # the hull fills an unknown share of the sphere: sample, measure, sample more
        wanted = missing - len(extra)
        candidates = random_points_in_sphere(centre, radius, min(int(1.5 * wanted / acceptance) + 1000, 5_000_000), rng)
        if carve:
            keep = carve_by_silhouettes(torch.as_tensor(candidates, dtype=torch.float32, device=device), masks, w2c, K)
            acceptance = max(float(keep.float().mean()), 1e-4)
            candidates = candidates[keep.cpu().numpy()]
        extra = np.concatenate([extra, candidates[:wanted]])
        if len(extra) == missing:
            break
    if carve and len(extra) == 0:
        log.warning("Silhouette carving kept no point (is the background white?); sampling the whole sphere")
        extra = random_points_in_sphere(centre, radius, missing, rng)
    log.info("Initial points: %d from SfM + %d random inside the %s (sphere radius %.3g)", len(xyz), len(extra),
             "visual hull" if carve else "sphere", radius)
    colours = sample_colours(torch.as_tensor(extra, dtype=torch.float32, device=device), images, w2c, K)
    return np.concatenate([xyz, extra]), np.concatenate([rgb, colours.cpu().numpy()]).astype(np.float32)
