"""Near-symmetric turns: poses that line up almost as well as the right one, and the check between them.

A turned or toothed object (a mug, a nut, a gear, a knob) looks nearly the same after a turn about its
axis: only a small feature (a handle, a flat, a colour boundary) tells the turns apart. Render-and-compare
refinement cannot cross from one such turn to another (the outline gives no gradient along the turn),
and its alignment confidence is as high at a wrong turn as at the right one. So once per scene the
splats' own near-symmetries are found (:func:`near_symmetries`), and every settled pose competes with
its turned copies (:class:`SymmetryCheck`): each copy is refined like the pose was, and the one whose
colours match the image best at full size wins, by a margin. The same flatness makes refinement slow to
settle a small turn about the axis (its loss changes little, so a level stops while the turn is still a
degree or two off): :class:`TurnPolish` searches that turn directly, as the last step.

Near-symmetries are found on the Gaussians' centres (the opaque ones, a fixed subsample; their density
varies, so distances are measured in local spacings: a turned point's distance to the nearest point
over that point's distance to its 4th neighbour). The *misfit* of a turn is the mean of that ratio,
capped at 3: about 0.5 for an exact symmetry, 2-3 for a turn that moves the shape. About each
principal axis of the cloud, the axis is first fitted to its best turn (a pattern search over the
axis' tilt and its offset from the median: a handle or a flat pulls the principal axes and the median
off the axis of a turned part), then every turn of at most ``max_misfit`` is a candidate; candidates
closer than ``min_separation_deg`` (to each other or to no turn) are merged, lowest misfit first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from omegaconf import DictConfig
from scipy.spatial import cKDTree
from torch import Tensor

from splatpose.refine.pose_refinement import PoseRefiner
from splatpose.refine.recovery import Confidence, alignment_confidence, axis_angle
from splatpose.splat.gaussians import Gaussians


@dataclass(frozen=True)
class NearSymmetry:
    """A turn of the scene by ``angle_deg`` about ``axis`` [3] (unit, world) through ``centre`` [3] that
    maps the splats nearly onto themselves; ``misfit`` as in the module docstring (lower: closer)."""

    axis: tuple[float, float, float]
    angle_deg: float
    centre: tuple[float, float, float]
    misfit: float

    def world_transform(self) -> np.ndarray:
        """[4, 4] the turn as a world-to-world map X -> R (X - c) + c."""
        rotation, centre = axis_angle(np.asarray(self.axis), math.radians(self.angle_deg)), np.asarray(self.centre)
        transform = np.eye(4)
        transform[:3, :3], transform[:3, 3] = rotation, centre - rotation @ centre
        return transform

    def turn_camera(self, w2c: np.ndarray) -> np.ndarray:
        """[4, 4] the camera that sees the scene as ``w2c`` [4, 4] sees the turned scene (for a symmetric
        scene: the pose turned by the symmetry, which renders nearly the same image)."""
        return np.asarray(w2c, dtype=np.float64) @ self.world_transform()

    def summary(self) -> dict:
        return {"axis": [round(v, 5) for v in self.axis], "angle_deg": round(self.angle_deg, 3),
                "misfit": round(self.misfit, 4)}


def symmetry_points(gaussians: Gaussians, min_opacity: float, max_points: int) -> np.ndarray:
    """[M, 3] float64: centres of the Gaussians with opacity >= ``min_opacity`` (all when few are),
    every k-th of them so that M <= ``max_points`` (deterministic)."""
    means = gaussians.means.detach().cpu().double().numpy()
    opacity = torch.sigmoid(gaussians.opacities.detach().cpu()).numpy()
    points = means[opacity >= min_opacity] if (opacity >= min_opacity).sum() >= 10 else means
    return points[:: max(1, math.ceil(len(points) / max_points))]


MAX_RATIO = 3.0  # cap on a turned point's distance in local spacings (a point far off counts as 3)
PATTERN_TILTS_DEG = (8.0, 4.0, 2.0, 1.0)
PATTERN_OFFSETS = (0.08, 0.04, 0.02, 0.01)  # fractions of the cloud's median radius


class _Cloud:
    """The point cloud the turns are measured on (see the module docstring)."""

    def __init__(self, points: np.ndarray):
        self.points, self.tree = points, cKDTree(points)
        self.spacing = self.tree.query(points, k=5)[0][:, 4]
        self.centre = np.median(points, axis=0)
        self.radius = float(np.median(np.linalg.norm(points - self.centre, axis=1)))

    def misfit(self, axis: np.ndarray, centre: np.ndarray, angle_deg: float) -> float:
        rotation = axis_angle(axis, math.radians(angle_deg))
        distance, nearest = self.tree.query((self.points - centre) @ rotation.T + centre)
        return float(np.minimum(distance / np.maximum(self.spacing[nearest], 1e-12), MAX_RATIO).mean())

    def fit_axis(self, axis: np.ndarray, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
        """Pattern search from ``axis`` through the median: tilts and offsets (perpendicular to the axis)
        that lower the misfit of the turn by ``angle_deg``, halving the steps from 8 deg and 8 % of the radius."""
        centre, best = self.centre, self.misfit(axis, self.centre, angle_deg)
        for tilt_deg, offset in zip(PATTERN_TILTS_DEG, PATTERN_OFFSETS):
            improved = True
            while improved:
                improved = False
                u, v = _perpendiculars(axis)
                moves = [(axis_angle(w, math.radians(sign * tilt_deg)) @ axis, centre) for w in (u, v) for sign in (-1, 1)]
                moves += [(axis, centre + sign * offset * self.radius * w) for w in (u, v) for sign in (-1, 1)]
                for new_axis, new_centre in moves:
                    value = self.misfit(new_axis, new_centre, angle_deg)
                    if value < best - 1e-9:
                        axis, centre, best, improved = new_axis / np.linalg.norm(new_axis), new_centre, value, True
        return axis, centre


def _perpendiculars(axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    helper = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(axis, helper)
    u /= np.linalg.norm(u)
    return u, np.cross(axis, u)


def near_symmetries(gaussians: Gaussians, cfg: DictConfig) -> list[NearSymmetry]:
    """The scene's near-symmetric turns (``cfg``: the ``refine.symmetry`` node), lowest misfit first."""
    points = symmetry_points(gaussians, float(cfg.min_opacity), int(cfg.max_points))
    if len(points) < 10:
        return []
    cloud = _Cloud(points)
    step, separation = float(cfg.step_deg), float(cfg.min_separation_deg)
    angles = np.arange(step, 360.0 - step / 2, step)
    turns = (angles >= separation) & (angles <= 360.0 - separation)
    if not turns.any():
        return []
    found = []
    for axis in np.linalg.eigh(np.cov((points - cloud.centre).T))[1].T:
        curve = np.array([cloud.misfit(axis, cloud.centre, a) for a in angles[turns]])
        axis, centre = cloud.fit_axis(axis, float(angles[turns][curve.argmin()]))
        found += [NearSymmetry(tuple(float(v) for v in axis), float(a), tuple(float(v) for v in centre), value)
                  for a in angles[turns] if (value := cloud.misfit(axis, centre, a)) <= float(cfg.max_misfit)]
    kept: list[NearSymmetry] = []
    for turn in sorted(found, key=lambda t: t.misfit):  # merge turns that are nearly the same rotation
        if all(_rotation_between_deg(turn, other) >= separation for other in kept) and \
                _rotation_between_deg(turn, None) >= separation:
            kept.append(turn)
    return kept[: int(cfg.max_candidates)]


def _rotation_between_deg(a: NearSymmetry, b: NearSymmetry | None) -> float:
    """Angle (degrees) of the rotation between two turns' rotations (b None: no turn)."""
    rotation_b = np.eye(3) if b is None else b.world_transform()[:3, :3]
    cosine = (np.trace(a.world_transform()[:3, :3].T @ rotation_b) - 1.0) / 2.0
    return math.degrees(math.acos(np.clip(cosine, -1.0, 1.0)))


@dataclass
class SymmetryVerdict:
    """What checking a pose against its turned copies did.

    w2c: [4, 4] the pose kept (the turned copy's refined pose when one won); pose_w2c: the pose checked.
    switched: a turned copy won; turn: the winning turn (None if none won).
    confidence: the kept pose's alignment; confidence_of_pose: the given pose's.
    hypotheses: turned copies screened; refined: how many of them were refined; seconds: wall time.
    """

    w2c: np.ndarray
    pose_w2c: np.ndarray
    switched: bool
    turn: NearSymmetry | None
    confidence: Confidence
    confidence_of_pose: Confidence
    hypotheses: int
    refined: int
    seconds: float

    def summary(self) -> dict:
        """JSON-able record; with the replaced pose ([4, 4] nested lists) when a turned copy won."""
        record = {"switched": self.switched, "turn": self.turn.summary() if self.turn else None,
                  "confidence": self.confidence.summary(), "confidence_of_pose": self.confidence_of_pose.summary(),
                  "hypotheses": self.hypotheses, "refined": self.refined, "seconds": round(self.seconds, 4)}
        if self.switched:
            record["replaced_w2c"] = np.asarray(self.pose_w2c).tolist()
        return record


class SymmetryCheck:
    """Checks settled poses of one scene against their near-symmetric turns.

    The turned copies line up in outline by construction, so colour decides: a copy, refined like the pose
    was, replaces the pose when its mean colour difference over the silhouettes (full size,
    :func:`~splatpose.refine.recovery.alignment_confidence`) is lower by more than ``margin`` (relative)
    and its silhouette IoU is no more than ``max_iou_drop`` below the pose's.

    Args:
        refiner: the refinement the poses were settled with (its levels and loss are reused).
        symmetries: the scene's near-symmetries (:func:`near_symmetries`).
        cfg: the ``refine.symmetry`` node (keep: how many turned copies are refined at most, those with the
            lowest loss at the first refinement level and no more than ``screen_ratio`` times the pose's
            loss there; margin; max_iou_drop).
        K: [3, 3] intrinsics of the full image; backend: renderer backend.
    """

    def __init__(self, refiner: PoseRefiner, symmetries: list[NearSymmetry], cfg: DictConfig, K: np.ndarray,
                 backend: str = "auto"):
        self.refiner, self.symmetries, self.cfg, self.backend = refiner, symmetries, cfg, backend
        self.K = np.asarray(K, dtype=np.float64)

    def check(self, query: Tensor, w2c: np.ndarray, confidence: Confidence | None = None) -> SymmetryVerdict:
        """Keep ``w2c`` [4, 4] (a pose refined by ``refiner``) or replace it by a refined turned copy that
        explains ``query`` [3, H, W] better; ``confidence``: the pose's alignment when the caller has it."""
        started = time.perf_counter()
        pose_w2c = np.asarray(w2c, dtype=np.float64)
        pose_confidence = confidence if confidence is not None else self._confidence(pose_w2c, query)
        copies = [(turn, turn.turn_camera(pose_w2c)) for turn in self.symmetries]
        # screened at the first (coarsest) level, unrefined: a turn that visibly moves colours or outline
        # is not worth refining
        pose_loss, *losses = self.refiner.losses_at(query, [pose_w2c] + [copy for _, copy in copies], 0)
        limit = float(self.cfg.screen_ratio) * pose_loss
        screened = [copies[i] for i in np.argsort(losses) if losses[i] <= limit][: int(self.cfg.keep)]
        best_turn, best_w2c, best = None, pose_w2c, pose_confidence
        for turn, start in screened:
            refined = self.refiner.refine(query, start).w2c
            candidate = self._confidence(refined, query)
            if (candidate.l1 < best.l1 * (1.0 - float(self.cfg.margin))
                    and candidate.iou >= pose_confidence.iou - float(self.cfg.max_iou_drop)):
                best_turn, best_w2c, best = turn, refined, candidate
        return SymmetryVerdict(best_w2c, pose_w2c, best_turn is not None, best_turn, best, pose_confidence,
                               len(copies), len(screened), time.perf_counter() - started)

    def _confidence(self, w2c: np.ndarray, query: Tensor) -> Confidence:
        return alignment_confidence(self.refiner.gaussians, w2c, query, self.K, self.backend,
                                    self.refiner.enclosed_white)


def axis_of_most_turns(symmetries: list[NearSymmetry], within_deg: float = 3.0) -> NearSymmetry:
    """Of ``symmetries`` (lowest misfit first), the first whose axis (either direction, within ``within_deg``)
    carries the most of them: a turned part's own axis carries a turn per rib or tooth, a flip's axis one."""
    if not symmetries:
        raise ValueError("no near-symmetries to choose an axis from")
    cosine = math.cos(math.radians(within_deg))
    axes = np.array([s.axis for s in symmetries])
    counts = (np.abs(axes @ axes.T) >= cosine).sum(axis=1)
    return symmetries[int(np.argmax(counts))]


class TurnPolish:
    """The last step of settling a pose of a part with a near-symmetry: a search of its turn about the axis.

    About a near-symmetric part's axis the render changes little with a small turn (only ribs, a flat or
    a highlight move), so refinement's stop rule (``stop_patience`` renders without ``stop_tolerance``'s
    gain) ends a level while such a turn is still a degree or two off; on the tuning family's 11SheenKnob every
    final error over 0.3 deg was a turn about the axis (experiments/results/turn_polish_cpu_2026-12-07_s28.md).
    This compares the refiner's finest-level loss at turns of the pose about the axis of ``symmetry``
    (:func:`axis_of_most_turns`, the part's own axis): every ``4 * step_deg`` within ``span_deg``, then every
    ``step_deg`` within three steps of the best, and keeps the lowest when it lowers the loss by more than
    ``min_gain`` (relative; the pipeline passes the refinement's own ``stop_tolerance``: a turn that gains
    less is one refinement would have stopped short of too, and along a glossy part's axis such gains are
    the highlights' noise, not the turn); a tie goes to the smaller turn.
    """

    def __init__(self, refiner: PoseRefiner, symmetry: NearSymmetry, span_deg: float, step_deg: float,
                 min_gain: float = 0.0):
        if not (span_deg > 0 and step_deg > 0 and min_gain >= 0):
            raise ValueError(f"turn polish needs span_deg and step_deg > 0 and min_gain >= 0, got {span_deg}, "
                             f"{step_deg}, {min_gain}")
        self.refiner, self.symmetry = refiner, symmetry
        self.span_deg, self.step_deg, self.min_gain = float(span_deg), float(step_deg), float(min_gain)

    @classmethod
    def configured(cls, refiner: PoseRefiner, symmetries: list[NearSymmetry], cfg: DictConfig) -> "TurnPolish | None":
        """The polish the ``refine`` node ``cfg`` asks for, about the axis of most of the scene's ``symmetries``
        with the refinement's ``stop_tolerance`` as its gain; None when ``symmetry.polish_span_deg`` is 0, null or
        absent (runs made before it), or the scene has no near-symmetry."""
        symmetry = cfg.get("symmetry") or {}
        span = symmetry.get("polish_span_deg")
        if not span or not symmetries:
            return None
        return cls(refiner, axis_of_most_turns(symmetries), float(span), float(symmetry.get("polish_step_deg")),
                   min_gain=float(cfg.get("stop_tolerance") or 0.0))

    def polish(self, query: Tensor, w2c: np.ndarray) -> tuple[np.ndarray, dict]:
        """``w2c`` [4, 4] (a settled pose) turned about the axis to where the finest level's loss against
        ``query`` [3, H, W] is lowest, and the record (turn_deg, loss_before, loss_after, renders, seconds)."""
        started = time.perf_counter()
        pose = np.asarray(w2c, dtype=np.float64)
        coarse = 4.0 * self.step_deg
        reach = math.floor(self.span_deg / coarse)
        losses = self._losses(query, pose, np.arange(-reach, reach + 1) * coarse)
        best = min(losses, key=lambda turn: (losses[turn], abs(turn)))
        fine = [best + k * self.step_deg for k in (-3, -2, -1, 1, 2, 3)]
        losses.update(self._losses(query, pose, [t for t in fine if abs(t) <= self.span_deg + 1e-9]))
        best = min(losses, key=lambda turn: (losses[turn], abs(turn)))
        if losses[best] >= losses[0.0] * (1.0 - self.min_gain):
            best = 0.0
        record = {"turn_deg": best, "loss_before": round(losses[0.0], 7), "loss_after": round(losses[best], 7),
                  "renders": len(losses), "seconds": round(time.perf_counter() - started, 4)}
        return (self._turned(pose, best) if best else pose), record

    def _losses(self, query: Tensor, pose: np.ndarray, turns) -> dict[float, float]:
        turns = [round(float(t), 6) + 0.0 for t in turns]  # (+ 0.0: no -0.0 in the record)
        finest = len(self.refiner.levels) - 1
        return dict(zip(turns, self.refiner.losses_at(query, [self._turned(pose, t) for t in turns], finest)))

    def _turned(self, pose: np.ndarray, turn_deg: float) -> np.ndarray:
        return replace(self.symmetry, angle_deg=turn_deg).turn_camera(pose)
