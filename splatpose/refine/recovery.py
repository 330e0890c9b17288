"""A query's pose through the splats when PnP fails or is weak: silhouette search, then render-and-compare.

Weakly textured objects give few keypoints, so PnP often has too few 2D-3D matches. The object's
outline and shading still pin its pose down, and the splats can render the object at any pose. For one
query image, :class:`PoseRecovery`

1. **searches coarsely** over search views (:class:`SearchViews`: the splats rendered at the
   reference cameras and at cameras orbited a few degrees from them, :func:`orbit_views`): each view
   is rotated about its object's centroid by every roll of a grid, scaled to the query's object area and
   shifted onto the query's centroid (a 2D similarity), and compared with the query at low resolution
   (silhouette IoU minus colour difference; the views are first screened at half that resolution,
   :func:`screened_search`). The best few (view, roll) pairs become 3D poses
   (:func:`pose_from_similarity`): the view's camera rolled about its axis, moved along it by the
   scale and sideways by the shift;
2. **refines** each of them through the differentiable renderer, coarse to fine
   (:class:`~splatpose.refine.pose_refinement.PoseRefiner` with the ``l1_silhouette`` loss: colour plus
   silhouette, at ``levels`` of the image size, blurred the more the coarser), keeping the lowest-loss
   pose;
3. **scores the result** (:func:`alignment_confidence`): the IoU of the rendered and the query's object
   silhouettes and the colour difference inside them. A pose is accepted when the IoU reaches
   ``min_iou`` and the colour difference stays under ``max_l1``; otherwise the query is flagged as not
   localized, never silently "recovered" (a blank image has no silhouette; a foreign object's does not
   line up).

The images are taken to be on a white background (the MAD-Sim convention): the silhouette is the set of
pixels darker than ``BACKGROUND_LEVEL`` in some channel.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from splatpose.refine.pose_refinement import BACKGROUND_LEVEL, PoseRefiner, enclosed_white_mask
from splatpose.splat.gaussians import Gaussians
from splatpose.splat.rendering import render


def foreground_mask(image: Tensor) -> Tensor:
    """[..., 3, H, W] in [0, 1] -> [..., 1, H, W] float {0, 1}: pixels darker than the white background."""
    return (image < BACKGROUND_LEVEL).any(dim=-3, keepdim=True).float()


def silhouette_moments(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Centroid [B, 2] (x, y in pixels, pixel centres at i + 0.5) and area [B] (pixels) of masks [B, 1, H, W]."""
    _, _, height, width = mask.shape
    ys = torch.arange(height, dtype=mask.dtype, device=mask.device) + 0.5
    xs = torch.arange(width, dtype=mask.dtype, device=mask.device) + 0.5
    area = mask.sum(dim=(1, 2, 3))
    safe = area.clamp(min=1.0)
    cx = (mask.sum(dim=(1, 2)) * xs).sum(dim=-1) / safe
    cy = (mask.sum(dim=(1, 3)) * ys).sum(dim=-1) / safe
    return torch.stack([cx, cy], dim=-1), area


def downsample(images: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, C, H, W] -> [B, C, h, w], area-averaged (a mask becomes its coverage fraction)."""
    return F.interpolate(images, size=size, mode="area") if images.shape[-2:] != size else images


@dataclass
class SearchViews:
    """The search views at search resolution, for the coarse pose search (:func:`render_search_views`).

    w2c: [N, 4, 4] float64 world-to-camera (OpenCV) of the views.
    images: [N, 3, h, w] colours; masks: [N, 1, h, w] object coverage in [0, 1] (both at search size).
    centroids: [N, 2] object centroids and areas: [N] object areas, in full-image pixels.
    width, height: the full image size the poses and moments refer to.
    """

    w2c: np.ndarray
    images: Tensor
    masks: Tensor
    centroids: Tensor
    areas: Tensor
    width: int
    height: int

    def subset(self, views: list[int]) -> SearchViews:
        """The views of indices ``views``, in that order."""
        return SearchViews(self.w2c[views], self.images[views], self.masks[views], self.centroids[views],
                           self.areas[views], self.width, self.height)

    def coarser(self, factor: int) -> SearchViews:
        """The same views with images and masks area-averaged ``factor`` times smaller (moments unchanged)."""
        h, w = self.images.shape[-2:]
        size = (max(1, h // factor), max(1, w // factor))
        return SearchViews(self.w2c, downsample(self.images, size), downsample(self.masks, size), self.centroids,
                           self.areas, self.width, self.height)


def orbit_views(w2c: np.ndarray, centre: np.ndarray, offsets_deg: list[float]) -> np.ndarray:
    """Cameras around each given one: orbited about ``centre`` by every (a, b) of ``offsets_deg`` squared,
    a about the camera's own x axis (up/down) then b about its y axis (left/right).

    Args:
        w2c: [N, 4, 4] world-to-camera (OpenCV); centre: [3] the point orbited (the object).
    Returns:
        [N * len(offsets_deg)**2, 4, 4], each camera's orbits in turn (offset (0, 0) is the camera itself).
    """
    out = []
    for pose in np.asarray(w2c, dtype=np.float64):
        rotation, eye = pose[:3, :3], -pose[:3, :3].T @ pose[:3, 3]
        for a in offsets_deg:
            for b in offsets_deg:
                orbit = axis_angle(rotation[1], math.radians(b)) @ axis_angle(rotation[0], math.radians(a))
                new_rotation = rotation @ orbit.T
                new_eye = centre + orbit @ (eye - centre)
                view = np.eye(4)
                view[:3, :3], view[:3, 3] = new_rotation, -new_rotation @ new_eye
                out.append(view)
    return np.stack(out)


def axis_angle(axis: np.ndarray, angle: float) -> np.ndarray:
    """[3, 3] rotation by ``angle`` radians about the unit vector ``axis`` (Rodrigues)."""
    x, y, z = axis / np.linalg.norm(axis)
    cross = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def render_search_views(gaussians: Gaussians, K: np.ndarray, width: int, height: int, w2c: np.ndarray,
                         search_size: int, backend: str = "auto", batch: int = 16) -> SearchViews:
    """Search views rendered from the splats at poses ``w2c`` [N, 4, 4] (e.g. :func:`orbit_views`).

    Rendered at twice the search size and area-averaged down; moments from that render, in full-image pixels.
    """
    device = gaussians.means.device
    h, w = search_shape(width, height, search_size)
    scale_x, scale_y = 2 * w / width, 2 * h / height
    K_render = np.asarray(K, dtype=np.float64).copy()
    K_render[0] *= scale_x
    K_render[1] *= scale_y
    K_t = torch.as_tensor(K_render, dtype=torch.float32, device=device)
    images = []
    with torch.no_grad():
        for start in range(0, len(w2c), batch):
            poses = torch.as_tensor(w2c[start:start + batch], dtype=torch.float32, device=device)
            images.append(render(gaussians, poses, K_t, 2 * w, 2 * h, backend=backend).clamp(0, 1).permute(0, 3, 1, 2).cpu())
    full = torch.cat(images)
    masks = foreground_mask(full)
    centroids, areas = silhouette_moments(masks)
    centroids = centroids / torch.tensor([scale_x, scale_y])
    areas = areas / (scale_x * scale_y)
    return SearchViews(np.asarray(w2c, dtype=np.float64), downsample(full, (h, w)), downsample(masks, (h, w)),
                                centroids, areas, int(width), int(height))


def search_shape(width: int, height: int, search_size: int) -> tuple[int, int]:
    """(h, w) of the search images: the longest side ``search_size``, the aspect kept."""
    scale = search_size / max(width, height)
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass
class Hypothesis:
    """A coarse pose: reference view ``view`` rolled by ``roll`` radians and scaled by ``scale``
    (query object size / reference object size), its object centroid moved onto the query's."""

    view: int
    roll: float
    scale: float
    score: float


def search_similarities(query: Tensor, reference: SearchViews, rolls: int, keep: int,
                        colour_weight: float) -> list[Hypothesis]:
    """The ``keep`` best (view, roll) pairs, at most one per view, best first.

    Args:
        query: [3, H, W] in [0, 1], the full-size query image.
        rolls: roll angles tried per view, evenly spaced over 360 degrees.
        colour_weight: weight of the mean colour difference (inside the union of the silhouettes)
            subtracted from the silhouette IoU.
    """
    mask_full = foreground_mask(query[None])
    centroid_q, area_q = silhouette_moments(mask_full)
    if float(area_q[0]) < 1.0:
        return []
    size = tuple(reference.images.shape[-2:])
    query_small = downsample(query[None].float(), size)[0]
    mask_small = downsample(mask_full, size)[0]
    h, w = size
    sx, sy = reference.width / w, reference.height / h
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                            indexing="ij")
    offsets = torch.stack([xs * sx, ys * sy], dim=-1) - centroid_q[0]            # [h, w, 2] full-res pixels
    angles = torch.arange(rolls, dtype=torch.float32) * (2 * math.pi / rolls)
    n_views = len(reference.w2c)
    scores = torch.empty(n_views, rolls)
    scales = torch.sqrt(area_q / reference.areas.clamp(min=1.0))                 # [N]
    # query pixel p comes from view pixel c_view + Rot(-roll) (p - c_q) / scale
    cos, sin = torch.cos(angles), torch.sin(angles)
    rot_inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)   # [R, 2, 2]
    rotated = torch.einsum("rij,hwj->rhwi", rot_inv, offsets)                               # [R, h, w, 2]
    for v in range(n_views):
        source = rotated / scales[v] + reference.centroids[v]
        grid = torch.stack([2 * source[..., 0] / reference.width - 1, 2 * source[..., 1] / reference.height - 1], -1)
        stacked = torch.cat([reference.images[v], reference.masks[v]])[None].expand(rolls, -1, -1, -1)
        warped = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # border padding repeats the edge: background (white, mask 0) around the object
        mask_w, image_w = warped[:, 3:], warped[:, :3]
        union = torch.maximum(mask_w, mask_small)
        iou = torch.minimum(mask_w, mask_small).sum(dim=(1, 2, 3)) / union.sum(dim=(1, 2, 3)).clamp(min=1e-6)
        colour = ((image_w - query_small).abs().mean(dim=1, keepdim=True) * union).sum(dim=(1, 2, 3)) \
            / union.sum(dim=(1, 2, 3)).clamp(min=1e-6)
        scores[v] = iou - colour_weight * colour
    best_roll = scores.argmax(dim=1)
    best = scores.gather(1, best_roll[:, None])[:, 0]
    order = torch.argsort(best, descending=True)[:keep]
    return [Hypothesis(int(v), float(angles[best_roll[v]]), float(scales[v]), float(best[v])) for v in order]


def screened_search(query: Tensor, reference: SearchViews, screen: SearchViews | None, screen_views: int, rolls: int,
                    keep: int, colour_weight: float) -> list[Hypothesis]:
    """:func:`search_similarities`, the views first screened at a coarser size: every view of ``screen``
    (``reference`` made coarser, :meth:`SearchViews.coarser`) is scored, and only the ``screen_views``
    best are searched at the reference's size. ``screen`` None, or no more views than ``screen_views``:
    the plain search. The search's cost follows views x rolls x pixels, so a screen at half the size costs
    a quarter of the plain search, and the views it keeps only their share of it."""
    if screen is None or len(reference.w2c) <= screen_views:
        return search_similarities(query, reference, rolls, keep, colour_weight)
    views = [h.view for h in search_similarities(query, screen, rolls, screen_views, colour_weight)]
    found = search_similarities(query, reference.subset(views), rolls, keep, colour_weight)
    return [Hypothesis(views[h.view], h.roll, h.scale, h.score) for h in found]


def pose_from_similarity(w2c_ref: np.ndarray, K: np.ndarray, centroid_ref: np.ndarray, centroid_query: np.ndarray,
                         roll: float, scale: float, depth: float) -> np.ndarray:
    """The camera that sees the reference view's object rolled, scaled and moved as the 2D similarity says.

    Args:
        w2c_ref: [4, 4] reference world-to-camera (OpenCV axes).
        K: [3, 3] intrinsics; centroid_ref, centroid_query: [2] object centroids (pixels).
        roll: radians: the query image is the reference image rotated by ``roll`` (x right, y down).
        scale: query object size / reference object size; depth: the object's depth in the reference camera.
    Returns:
        [4, 4] world-to-camera: rotated by ``roll`` about the optical axis, the object's centroid point
        at depth ``depth / scale`` on the ray through ``centroid_query``.
    """
    K_inv = np.linalg.inv(K)
    point_ref = depth * (K_inv @ np.array([*centroid_ref, 1.0]))       # object point, reference camera
    target = (depth / scale) * (K_inv @ np.array([*centroid_query, 1.0]))
    cos, sin = math.cos(roll), math.sin(roll)
    roll_matrix = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    w2c = np.eye(4)
    w2c[:3, :3] = roll_matrix @ w2c_ref[:3, :3]
    w2c[:3, 3] = target - roll_matrix @ (point_ref - w2c_ref[:3, 3])
    return w2c


@dataclass
class Confidence:
    """How well a render at a pose lines up with the query (full resolution).

    iou: IoU of the silhouettes (non-white pixels) of the render and the query, in [0, 1].
    l1: mean absolute colour difference over the union of the two silhouettes, in [0, 1].
    """

    iou: float
    l1: float

    def accepted(self, min_iou: float, max_l1: float) -> bool:
        return self.iou >= min_iou and self.l1 <= max_l1

    def summary(self) -> dict:
        return {"iou": round(self.iou, 5), "l1": round(self.l1, 5)}


def alignment_confidence(gaussians: Gaussians, w2c: np.ndarray, query: Tensor, K: np.ndarray, backend: str,
                         enclosed_white: str = "background") -> Confidence:
    """Render at ``w2c`` [4, 4] and compare with ``query`` [3, H, W] (see :class:`Confidence`). With
    ``enclosed_white: unknown`` (``refine.enclosed_white``) the white the query's part encloses
    (:func:`~splatpose.refine.pose_refinement.enclosed_white_mask`: a hole, or a highlight blown out to white)
    counts in neither silhouette nor the colour difference, as in the refinement's loss."""
    device = gaussians.means.device
    height, width = query.shape[-2:]
    with torch.no_grad():
        rgb = render(gaussians, torch.as_tensor(w2c, dtype=torch.float32, device=device),
                     torch.as_tensor(K, dtype=torch.float32, device=device), width, height, backend=backend)
    rgb, target = rgb[0].permute(2, 0, 1).clamp(0, 1).cpu(), query.float().cpu()
    # one rule for both silhouettes (not alpha > 0.5 for the render), so soft edges count alike
    rendered, observed = foreground_mask(rgb) > 0.5, foreground_mask(target) > 0.5
    union = rendered | observed
    if enclosed_white == "unknown":
        known = ~enclosed_white_mask(target)
        rendered, union = rendered & known, union & known
    union = union.float()
    iou = float((rendered & observed).sum()) / max(float(union.sum()), 1.0)
    l1 = float(((rgb - target).abs().mean(dim=0, keepdim=True) * union).sum()) / max(float(union.sum()), 1.0)
    return Confidence(iou, l1)


@dataclass
class Recovery:
    """What recovering one pose did.

    w2c: [4, 4] float64 the best pose found (valid only when ``accepted``).
    confidence: its alignment with the query; accepted: confidence passed the thresholds.
    start_view: the reference view index of the winning hypothesis (-1: the given start pose).
    hypotheses: how many coarse poses were refined; seconds: wall time (both searches, when two ran).
    search: the refinement search that produced ``w2c``: "configured" (the node's search keys), or
        "camera" (the second try, turning about the camera, after the configured search lined nothing up).
    searches: how many searches ran (2 when the second try did).
    """

    w2c: np.ndarray
    confidence: Confidence
    accepted: bool
    start_view: int
    hypotheses: int
    seconds: float
    search: str = "configured"
    searches: int = 1

    def summary(self) -> dict:
        return {"accepted": self.accepted, "start_view": self.start_view, "hypotheses": self.hypotheses,
                "seconds": round(self.seconds, 4), "search": self.search, "searches": self.searches,
                **self.confidence.summary()}


# How much smaller the screening search's images are than the search views (refine.recovery.screen_views).
SCREEN_FACTOR = 2

# Keys of the PoseRefiner's search a ``refine.recovery`` node may set (see PoseRefiner; absent: its defaults).
SEARCH_KEYS = ("rotation_centre", "first_step", "stop_patience", "stop_tolerance", "colours_per_level")


class PoseRecovery:
    """Recovers query poses of one scene from its search views and splats.

    Args:
        gaussians: the scene; K: [3, 3] intrinsics of the full image; width, height: its size.
        reference: the reference views at search resolution.
        cfg: the ``refine.recovery`` node (rolls, colour_weight, screen_views, levels, and per level
            hypotheses, steps, blur; silhouette_weight, min_iou, max_l1).
        backend: renderer backend; gradients, max_size, enclosed_white: the PoseRefiner's (``refine.gradients``,
            ``refine.max_size``, ``refine.enclosed_white``).
    """

    def __init__(self, gaussians: Gaussians, K: np.ndarray, width: int, height: int,
                 reference: SearchViews, cfg: DictConfig, backend: str = "auto", gradients: str = "auto",
                 max_size: int | str | None = None, enclosed_white: str = "background"):
        self.gaussians, self.K, self.width, self.height = gaussians, np.asarray(K, np.float64), width, height
        self.reference, self.cfg, self.backend = reference, cfg, backend
        self.gradients, self.max_size, self.enclosed_white = gradients, max_size, enclosed_white
        if len(cfg.hypotheses) != len(cfg.levels):
            raise ValueError(f"refine.recovery.hypotheses has {len(cfg.hypotheses)} entries for "
                             f"{len(cfg.levels)} levels ({list(cfg.levels)}); give one per level")
        search = {key: cfg[key] for key in SEARCH_KEYS if cfg.get(key) is not None}
        self.refiner = self._refiner(search)
        # absent in runs made before the screen: they search every view at the full search size, as they did
        self._screen_views = int(cfg.get("screen_views") or 0)
        self._screen = reference.coarser(SCREEN_FACTOR) if self._screen_views else None
        # Turning about the object with bounded first steps settles turned parts' poses; its short steps can
        # stall on a hypothesis far off, where torch's long probes about the camera still reach the pose. So
        # a query the configured search lines nothing up for gets one more try with that search (its
        # refiner built on the first such query).
        self.has_second_try = bool(search)

    def recover(self, query: Tensor, start_w2c: np.ndarray | None = None, first_hypotheses: int | None = None
                ) -> Recovery:
        """Best pose for ``query`` [3, H, W] in [0, 1]; ``start_w2c`` (e.g. a weak PnP pose) competes too.
        ``first_hypotheses``: how many starts the first level refines (None: ``hypotheses[0]``; ``start_w2c`` is
        one of them); a wider search for a pose that lines up but whose colours are doubtful."""
        started = time.perf_counter()
        keep = [int(k) for k in self.cfg.hypotheses]
        if first_hypotheses is not None:
            keep[0] = int(first_hypotheses)
        starts = self.coarse_poses(query, keep[0])
        if start_w2c is not None:  # first, so the first level always refines it
            starts.insert(0, (-1, np.asarray(start_w2c, dtype=np.float64)))
        if not starts:
            return Recovery(np.eye(4), Confidence(0.0, 1.0), False, -1, 0, time.perf_counter() - started)
        result = self._refine_starts(query, starts, self.refiner, "configured", keep)
        if not result.accepted and self.has_second_try:
            second = self._refine_starts(query, starts, self._second_refiner, "camera", keep)
            if second.accepted or second.confidence.iou > result.confidence.iou:
                result = second
            result.searches = 2
        result.seconds = time.perf_counter() - started
        return result

    def coarse_poses(self, query: Tensor, keep: int) -> list[tuple[int, np.ndarray]]:
        """The silhouette search's ``keep`` best coarse poses for ``query`` [3, H, W] in [0, 1] (on white), best
        first: (search view index, [4, 4] world-to-camera), unrefined."""
        query_host = query.float().cpu()  # the search views live on the host (the query may be on the GPU)
        hypotheses = screened_search(query_host, self.reference, self._screen, self._screen_views, int(self.cfg.rolls),
                                     keep, float(self.cfg.colour_weight))
        centroid_q = silhouette_moments(foreground_mask(query_host[None]))[0][0].numpy()
        return [(h.view, self._pose_of(h, centroid_q)) for h in hypotheses]

    def _refine_starts(self, query: Tensor, starts: list[tuple[int, np.ndarray]], refiner: PoseRefiner,
                       search: str, keep_per_level: list[int]) -> Recovery:
        """Refine the coarse poses ``starts`` [(view, [4, 4])] level by level with ``refiner``; the best
        one, with its alignment (``seconds`` left for the caller)."""
        # The finer levels cost more: each refines only the best ``keep_per_level[level]`` of the level before.
        candidates = starts
        for level, keep in enumerate(keep_per_level):
            refined = sorted(((view, refiner.refine(query, w2c, levels=[level]))
                              for view, w2c in candidates[:int(keep)]), key=lambda item: item[1].loss_end)
            candidates = [(view, result.w2c) for view, result in refined]
        view, w2c = candidates[0]
        confidence = alignment_confidence(self.gaussians, w2c, query, self.K, self.backend, self.enclosed_white)
        accepted = confidence.accepted(float(self.cfg.min_iou), float(self.cfg.max_l1))
        return Recovery(w2c, confidence, accepted, view, len(starts), 0.0, search)

    @functools.cached_property
    def _second_refiner(self) -> PoseRefiner:
        return self._refiner({})

    def _refiner(self, search: dict) -> PoseRefiner:
        """The recovery's refinement (l1_silhouette, L-BFGS, the node's levels) with ``search`` (SEARCH_KEYS)."""
        cfg = self.cfg
        return PoseRefiner(self.gaussians, self.K, self.width, self.height, OmegaConf.create({
            "enabled": True, "optimizer": "lbfgs", "lr": 1.0, "loss": "l1_silhouette",
            "silhouette_weight": float(cfg.silhouette_weight), "ssim_weight": 0.0, "keep_best": True,
            "levels": list(cfg.levels), "steps": list(cfg.steps), "blur": list(cfg.blur),
            "gradients": self.gradients, "max_size": self.max_size, "enclosed_white": self.enclosed_white,
            **search}), backend=self.backend)

    def _pose_of(self, hypothesis: Hypothesis, centroid_query: np.ndarray) -> np.ndarray:
        w2c_ref = self.reference.w2c[hypothesis.view]
        depth = self._object_depth(w2c_ref)
        return pose_from_similarity(w2c_ref, self.K, self.reference.centroids[hypothesis.view].numpy(),
                                    centroid_query, hypothesis.roll, hypothesis.scale, depth)

    def _object_depth(self, w2c: np.ndarray) -> float:
        """Median depth of the Gaussians in a camera (the object's depth)."""
        means = self.gaussians.means.detach().cpu().double().numpy()
        depth = means @ w2c[2, :3] + w2c[2, 3]
        depth = depth[depth > 0]
        return float(np.median(depth)) if len(depth) else float(np.linalg.norm(w2c[:3, 3]))
