"""Pose refinement through the differentiable renderer: a few optimiser steps from the PnP pose.

PnP gives the pose that best explains a few hundred keypoint matches; the anomaly map compares the
query with a render, so what matters is that the render lines up with the query pixel for pixel.
Starting from the PnP pose, :class:`PoseRefiner` optimises an SE(3) increment
(:mod:`splatpose.refine.se3`, left-multiplied on w2c) to minimise a render-vs-query loss:

- ``l1``: mean absolute colour difference over the object region (pixels covered by the render or
  not white in the query: the white background carries no pose information but would dilute it);
- ``l1_ssim``: (1 - w) * l1 + w * (1 - SSIM), SSIM over the whole image (3DGS's training loss);
- ``feature``: mean squared difference of the scorer backbone's features (feature-metric alignment,
  less sensitive to the render's colour errors than raw pixels);
- ``l1_silhouette``: colour difference over the whole image plus ``silhouette_weight`` times the squared
  difference of the rendered alpha and the query's object mask, per query object pixel: the outline
  pulls a pose towards the object where colours are flat. (Alpha suits opaque objects; a scene of
  scattered translucent Gaussians leaves alpha low where the query's mask is set, and this term then
  pulls the camera closer.) With ``enclosed_white: unknown`` white pixels the part encloses weigh 0
  (:func:`enclosed_white_mask`: a hole or a highlight blown out to the background's white cannot be told
  apart; left as background, a blown-out highlight pulls the pose off itself).

The increment is ``xi = (translation / d, rotation)`` with ``d`` the camera's distance to the scene
(median depth of the Gaussians): a unit of either moves the image by about the same amount, so the
problem is well scaled for any scene size. About the camera centre (``rotation_centre: camera``) it is
still ill-conditioned: for a small object a rotation about an image axis and a sideways shift look
nearly alike, and only parallax tells them apart. Plain gradient steps (Adam) align the image quickly
but then crawl along that valley; L-BFGS (``optimizer: lbfgs``, the default, with a strong-Wolfe line
search) builds the curvature up and walks it (measured on a toy scene: 1.5 deg -> 0.15 deg in 20
iterations where Adam stayed near 1 deg). ``rotation_centre: object`` turns about the object's centre
instead, in units that move its outline as far as a shift does: on 01Ant's splats the loss's Hessian
at the true pose goes from a condition number of about 1100 to about 20, and L-BFGS settles a level in
about 8 renders instead of walking the valley for 30 (experiments/results/refine_speed_cpu_2026-12-05.md).
``steps`` is the number of L-BFGS iterations (or Adam steps); each costs one render forward and
backward, line-search probes add a few. With ``stop_patience`` an L-BFGS level ends once that many
renders in a row have not lowered its loss by ``stop_tolerance`` of its starting loss.

Refinement runs **coarse to fine**: at each of ``levels`` (render sizes relative to the image) it
optimises ``steps`` iterations from the pose the level before returned, with images and renders
blurred by ``blur`` (Gaussian sigma as a fraction of the image's longest side); ``steps``, ``blur`` and
``loss`` take one value per level or one for all. Small blurred renders widen the basin and cost little; the last level settles the detail.
With ``max_size`` every level but the last is relative to the image fitted into that many pixels (longest
side): a 400x400 query searches at the render sizes of a 200x200 one (a render's cost grows with its
pixels), and the last level still settles the pose at the image's own resolution.
On weakly textured objects the outline carries most of the pose, which is what ``l1_silhouette`` with a
coarse level adds (06PlainAnt, PnP poses: within 1 deg 57 % -> 86 %; experiments/results/
refine_c2f_cpu_2026-12-05.md). With ``keep_best`` each level returns the lowest-loss pose it rendered
(its start included), so no level makes its own loss worse.

The gradient of the loss in the increment comes from autograd through the rasterizer on the CPU, and on
CUDA (``gradients: auto``) from central differences over one batched forward render of 13 poses (the
pose and a step of about ``DIFFERENCE_STEP_PX`` pixels each way along every variable). gsplat's backward
pass sums per-pixel gradients with atomic additions whose order changes from run to run; L-BFGS's line
searches amplify the last-bit differences, and the same query, splats and settings came out up to 19 deg
apart between two runs (experiments/results/refine_determinism_h100_2026-12-06.md). Forward renders
are deterministic, so the refinement is too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from scipy import ndimage
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur

from splatpose.data.cameras import center_error, rotation_error_deg
from splatpose.refine.se3 import apply_increment, se3_exp
from splatpose.scoring.anomaly_maps import AnomalyScorer
from splatpose.splat.gaussians import Gaussians
from splatpose.splat.losses import ssim
from splatpose.splat.rendering import TORCH_BACKENDS, WHITE, rasterize, resolve_backend
from splatpose.splat.torch_rasterizer import gaussian_colors, world_covariances

REFINE_LOSSES = ("l1", "l1_ssim", "feature", "l1_silhouette")
REFINE_OPTIMIZERS = ("lbfgs", "adam")
ENCLOSED_WHITE = ("background", "unknown")
# What the settler keeps when neither PnP's pose nor the recovery's lines up
# (``refine.recovery.when_neither_lines_up``).
NEITHER_LINES_UP = ("pnp", "silhouette")
ROTATION_CENTRES = ("camera", "object")
GRADIENTS = ("auto", "autograd", "differences")
# Central differences step each increment variable by what moves the object's outline about this many
# pixels of the level's render: far below the blur's smallest sigma (1 px at 200 px), far above float32 noise.
DIFFERENCE_STEP_PX = 0.05
# refine.max_size=auto on the CPU (px), where a render's cost follows its pixels; on CUDA small renders are
# launch-bound and auto is no cap (experiments/results/refine_max_size_2026-12-06.md).
CPU_MAX_SIZE = 200
# Adam's step size decays exponentially to this fraction of refine.lr over the steps.
ADAM_FINAL_LR_FRACTION = 0.05
# A query pixel darker than this in some channel is object, not white background.
BACKGROUND_LEVEL = 0.98


def enclosed_white_mask(image: Tensor) -> Tensor:
    """[3, H, W] in [0, 1] -> bool [H, W] (on the CPU): the white pixels (every channel at least
    :data:`BACKGROUND_LEVEL`) that no path of white pixels (4-connected) joins to the image's border.

    A part photographed on white shows the background as white that reaches the border. White enclosed by the
    part is either background seen through a hole or the part's own highlight blown out to the background's
    white, and the colour cannot tell which (``refine.enclosed_white``)."""
    white = (image >= BACKGROUND_LEVEL).all(dim=0).cpu().numpy()
    labels, _ = ndimage.label(white)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return torch.from_numpy(white & ~np.isin(labels, border))


class LevelSettings(NamedTuple):
    """One level of a ``refine`` node: render size relative to the image, iterations, blur sigma as a
    fraction of the image's longest side, loss."""

    scale: float
    steps: int
    blur: float
    loss: str


@dataclass
class _Level:
    """One level of the coarse-to-fine refinement: render size, intrinsics at that size, iterations and
    blur sigma in pixels of that size."""

    width: int
    height: int
    K: Tensor
    steps: int
    blur: float
    loss: str

    @staticmethod
    def of(settings: LevelSettings, K: np.ndarray, width: int, height: int, device: torch.device,
           max_size: int | None = None) -> "_Level":
        scale = settings.scale * min(1.0, max_size / max(width, height)) if max_size else settings.scale
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        K_scaled = np.asarray(K, dtype=np.float64).copy()
        K_scaled[:2] *= [[w / width], [h / height]]  # image spans [0, W]: scale fx, cx alike
        return _Level(w, h, torch.as_tensor(K_scaled, dtype=torch.float32, device=device), settings.steps,
                      settings.blur * max(w, h), settings.loss)


class _LevelConverged(Exception):
    """Raised by a level's loss evaluation to end the level: its loss has stopped falling."""


@dataclass
class _SceneInputs:
    """The pose-independent rasterizer inputs of a scene, activated once for every render of a refinement:
    means [N, 3], unit quats [N, 4], scales [N, 3] (standard deviations), opacities [N] in [0, 1], SH
    coefficients [N, K, 3] of degree ``sh_degree``, world covariances [N, 3, 3] (None on the gsplat backend,
    which is faster from quats and scales), white backgrounds [1, 3]; the means' per-axis median [3] (float64)
    and their median distance from it."""

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    sh_coeffs: Tensor
    sh_degree: int
    covars: Tensor | None
    backgrounds: Tensor
    centre: Tensor
    radius: float

    @staticmethod
    def of(gaussians: Gaussians, backend: str) -> "_SceneInputs":
        means = gaussians.means.detach()
        quats = F.normalize(gaussians.quats.detach(), dim=-1)
        scales = torch.exp(gaussians.scales.detach())
        covars = world_covariances(quats, scales) if resolve_backend(backend, means.device) in TORCH_BACKENDS else None
        backgrounds = torch.tensor([WHITE], dtype=means.dtype, device=means.device)
        centre = means.double().median(dim=0).values
        radius = float((means.double() - centre).norm(dim=1).median().clamp(min=1e-9))
        return _SceneInputs(means, quats, scales, torch.sigmoid(gaussians.opacities.detach()),
                            gaussians.sh_coeffs.detach(), gaussians.sh_degree, covars, backgrounds, centre, radius)

    def colours(self, w2c: Tensor) -> Tensor:
        """[N, 3] the Gaussians' colours seen from the camera ``w2c`` [4, 4] (no gradient)."""
        with torch.no_grad():
            viewmats = w2c[None].to(self.means.device, self.means.dtype)
            return gaussian_colors(self.sh_coeffs, self.means, viewmats, self.sh_degree)[0]


@dataclass
class Refinement:
    """What refining one pose did.

    w2c: [4, 4] float64 refined world-to-camera (OpenCV); equals the start when nothing improved.
    steps: renders evaluated (optimiser steps plus line-search probes), over all levels run.
    loss_start, loss_end: the loss at the start pose (first level run) and at the returned pose (last
        level run: losses of different levels are not comparable).
    rotation_change_deg, center_change: how far the returned pose is from the start (degrees, world units).
    rounds: refinements run one after the other (a query on a bench is put on white again between them).
    """

    w2c: np.ndarray
    steps: int
    loss_start: float
    loss_end: float
    rotation_change_deg: float
    center_change: float
    seconds: float
    rounds: int = 1

    def summary(self) -> dict:
        out = {"steps": self.steps, "loss_start": round(self.loss_start, 6), "loss_end": round(self.loss_end, 6),
               "rotation_change_deg": round(self.rotation_change_deg, 5),
               "center_change": round(self.center_change, 6), "seconds": round(self.seconds, 4)}
        if self.rounds > 1:
            out["rounds"] = self.rounds
        return out


def check_refine_config(cfg: DictConfig) -> None:
    """Raise ValueError naming the ``refine`` key and the fix for an unusable setting."""
    levels = refine_levels(cfg)
    for level in levels:
        if level.loss not in REFINE_LOSSES:
            raise ValueError(f"refine.loss={level.loss!r} is unknown; choose one of {', '.join(REFINE_LOSSES)}")
    if cfg.optimizer not in REFINE_OPTIMIZERS:
        raise ValueError(f"refine.optimizer={cfg.optimizer!r} is unknown; choose one of "
                         f"{', '.join(REFINE_OPTIMIZERS)}")
    if not levels:
        raise ValueError("refine.levels is empty; give at least one render size, e.g. [1.0]")
    if cfg.get("rotation_centre", "camera") not in ROTATION_CENTRES:
        raise ValueError(f"refine.rotation_centre={cfg.rotation_centre!r} is unknown; choose one of "
                         f"{', '.join(ROTATION_CENTRES)}")
    if cfg.get("gradients", "auto") not in GRADIENTS:
        raise ValueError(f"refine.gradients={cfg.gradients!r} is unknown; choose one of {', '.join(GRADIENTS)}")
    if cfg.get("first_step") is not None and not float(cfg.first_step) > 0:
        raise ValueError(f"refine.first_step must be > 0 (or null: torch's own first step), got {cfg.first_step}")
    if int(cfg.get("stop_patience") or 0) < 0 or float(cfg.get("stop_tolerance") or 0.0) < 0:
        raise ValueError(f"refine.stop_patience and refine.stop_tolerance must be >= 0 (stop_patience 0: no early "
                         f"stop), got {cfg.get('stop_patience')} and {cfg.get('stop_tolerance')}")
    max_size = cfg.get("max_size")
    if max_size not in (None, "auto") and not (isinstance(max_size, int) and max_size >= 16):
        raise ValueError(f"refine.max_size must be auto, null (levels relative to the image itself) or a number "
                         f"of px >= 16, got {max_size!r}")
    bench = cfg.get("bench") or {}
    rounds, settle_deg = bench.get("rounds"), bench.get("settle_deg")  # null (or absent): one refinement
    if (rounds is not None and int(rounds) < 1) or (settle_deg is not None and float(settle_deg) < 0):
        raise ValueError(f"refine.bench.rounds must be >= 1 (1: refine once) and refine.bench.settle_deg >= 0, got "
                         f"{bench.get('rounds')} and {bench.get('settle_deg')}")
    if cfg.get("enclosed_white", "background") not in ENCLOSED_WHITE:
        raise ValueError(f"refine.enclosed_white={cfg.enclosed_white!r} is unknown; choose one of "
                         f"{', '.join(ENCLOSED_WHITE)}")
    neither = (cfg.get("recovery") or {}).get("when_neither_lines_up", "pnp")
    if neither not in NEITHER_LINES_UP:
        raise ValueError(f"refine.recovery.when_neither_lines_up={neither!r} is unknown; choose one of "
                         f"{', '.join(NEITHER_LINES_UP)}")
    wider = (cfg.get("second_opinion") or {}).get("recovered_hypotheses")
    if wider is not None and not (isinstance(wider, int) and wider >= 1):
        raise ValueError(f"refine.second_opinion.recovered_hypotheses must be a number of coarse poses >= 1 (or "
                         f"null: recovered poses get no second opinion), got {wider!r}")
    symmetry = cfg.get("symmetry") or {}
    span, step = symmetry.get("polish_span_deg"), symmetry.get("polish_step_deg")
    if span is not None and not (float(span) >= 0 and step is not None and float(step) > 0):
        raise ValueError(f"refine.symmetry.polish_span_deg must be >= 0 (0 or null: no search of the turn about the "
                         f"axis) with polish_step_deg > 0, got {span} and {step}")
    for scale, steps, blur, _ in levels:
        if steps < 1:
            raise ValueError(f"refine.steps must be >= 1 (or set refine.enabled=false), got {cfg.steps}")
        if not 0 < scale <= 1:
            raise ValueError(f"refine.levels must be in (0, 1] (render size relative to the image), got {cfg.levels}")
        if blur < 0:
            raise ValueError(f"refine.blur must be >= 0 (a fraction of the image size), got {cfg.blur}")


def resolve_max_size(max_size: int | str | None, device: torch.device) -> int | None:
    """``refine.max_size`` in px on ``device`` (auto: :data:`CPU_MAX_SIZE` on the CPU, no cap on CUDA)."""
    if max_size == "auto":
        return CPU_MAX_SIZE if device.type == "cpu" else None
    return max_size


def refine_levels(cfg: DictConfig) -> list[LevelSettings]:
    """(scale, steps, blur fraction, loss) per level of a ``refine`` node; ``steps``, ``blur`` and ``loss``
    may be one value for every level. A node without ``levels`` (runs made before they existed) is one level at
    its ``scale``."""
    scales = [float(x) for x in cfg.levels] if cfg.get("levels") is not None else [float(cfg.get("scale", 1.0))]

    def per_level(value, name: str) -> list:
        values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value] * len(scales)
        if len(values) != len(scales):
            raise ValueError(f"refine.{name} has {len(values)} entries for {len(scales)} levels ({list(scales)}); "
                             "give one per level or a single number")
        return values

    steps = [int(x) for x in per_level(cfg.steps, "steps")]
    blurs = [float(x) for x in per_level(cfg.get("blur", 0.0), "blur")]
    losses = [str(x) for x in per_level(cfg.loss, "loss")]
    return [LevelSettings(*values) for values in zip(scales, steps, blurs, losses)]


class PoseRefiner:
    """Refines camera poses of one scene against query images.

    Args:
        gaussians: the scene (on ``device``), as it is now: its activated parameters are kept.
        K: [3, 3] intrinsics of the full-size image; width, height its size.
        cfg: the ``refine`` node (optimizer, lr, loss, ssim_weight, silhouette_weight, levels, steps, blur,
            keep_best; optional, absent in older runs' nodes, which then refine as they did: rotation_centre
            (camera), first_step (null), stop_patience (0), stop_tolerance, colours_per_level (false);
            gradients (auto: central differences on CUDA, autograd elsewhere; see the module docstring);
            max_size (px: every level but the last relative to the image fitted into that size; null: to the
            image itself; auto: :func:`resolve_max_size`)).
        backend: renderer backend ("auto" | "gsplat" | "torch" | "numba"); all are differentiable in the pose.
        scorer: the anomaly scorer whose backbone the ``feature`` loss uses (None otherwise).
    """

    def __init__(self, gaussians: Gaussians, K: np.ndarray, width: int, height: int, cfg: DictConfig,
                 backend: str = "auto", scorer: AnomalyScorer | None = None):
        check_refine_config(cfg)
        levels = refine_levels(cfg)
        if any(level.loss == "feature" for level in levels) and (scorer is None or scorer.backbone is None):
            raise ValueError("refine.loss=feature needs a scorer with a backbone (scorer=efficientnet_lite0 "
                             "or efficientnet_b4); use loss=l1 with the pixel scorer")
        self.gaussians, self.cfg, self.backend, self.scorer = gaussians, cfg, backend, scorer
        # how the query's enclosed white is read (ENCLOSED_WHITE); runs made before the key read it as background
        self.enclosed_white = cfg.get("enclosed_white", "background")
        self.device = gaussians.means.device
        # the coarse levels capped (refine.max_size), the last one at the image's own size
        caps = [resolve_max_size(cfg.get("max_size"), self.device)] * (len(levels) - 1) + [None]
        self.levels = [_Level.of(settings, K, width, height, self.device, cap) for settings, cap in zip(levels, caps)]
        self.scene = _SceneInputs.of(gaussians, backend)
        gradients = cfg.get("gradients", "auto")
        self.differences = gradients == "differences" or (gradients == "auto" and self.device.type == "cuda")

    def refine(self, query: Tensor, w2c: np.ndarray, levels: list[int] | None = None) -> Refinement:
        """Refine ``w2c`` [4, 4] (OpenCV world-to-camera) against ``query`` [3, H, W] in [0, 1], through
        ``levels`` (indices into the configured levels; None: all, coarse to fine)."""
        start_time = time.perf_counter()
        results = []
        for index in range(len(self.levels)) if levels is None else levels:
            results.append(self._refine_level(query, w2c if not results else results[-1].w2c, self.levels[index]))
        refined = results[-1].w2c
        return Refinement(w2c=refined, steps=sum(r.steps for r in results), loss_start=results[0].loss_start,
                          loss_end=results[-1].loss_end, rotation_change_deg=rotation_error_deg(w2c, refined),
                          center_change=center_error(w2c, refined), seconds=time.perf_counter() - start_time)

    def losses_at(self, query: Tensor, poses: list[np.ndarray], level: int) -> list[float]:
        """The loss of level ``level`` (an index into the configured levels) at each pose [4, 4] against
        ``query`` [3, H, W], without optimising: what that level's ``loss_end`` would be there."""
        settings = self.levels[level]
        target, target_mask, known = self._target(query, settings)
        losses = []
        with torch.no_grad():
            for w2c in poses:
                rgb, alpha = self._blurred(settings, *self._render(
                    torch.as_tensor(w2c, dtype=torch.float64, device=self.device), settings))
                region = target_mask if settings.loss == "l1_silhouette" else self._object_region(target, alpha)
                losses.append(float(self._loss(rgb, alpha, target, region, settings.loss, known)))
        return losses

    def _refine_level(self, query: Tensor, w2c: np.ndarray, level: _Level) -> Refinement:
        start_time = time.perf_counter()
        target, target_mask, known = self._target(query, level)
        w2c_start = torch.as_tensor(w2c, dtype=torch.float64, device=self.device)
        # The optimiser's variable is the increment / first_step: L-BFGS's first step (steepest descent, at
        # most 1 in L1 norm of its variable) then moves the pose by at most first_step; later steps follow
        # the curvature, which the scaling does not change.
        lbfgs = self.cfg.optimizer == "lbfgs"
        first_step = float(self.cfg.get("first_step") or 1.0) if lbfgs else 1.0
        pose_at = self._pose_map(w2c_start)
        # Early stop with keep_best only: a stop inside a line search would return a probe otherwise.
        patience = int(self.cfg.get("stop_patience") or 0) if lbfgs and self.cfg.keep_best else 0
        tolerance = float(self.cfg.get("stop_tolerance") or 0.0)
        u = torch.zeros(6, dtype=torch.float64, device=self.device, requires_grad=True)
        state = {"region": None, "first": None, "best": float("inf"), "best_w2c": w2c_start, "evaluations": 0,
                 "progress_at": 0, "progress_loss": float("inf")}
        # The view-dependent colours barely change over a level's few tenths of a degree; fixed at its start,
        # the Gaussians' SH are evaluated once per level instead of forward and backward at every render.
        colours = self.scene.colours(w2c_start) if self.cfg.get("colours_per_level") else None

        def pose_of(u: Tensor) -> Tensor:
            return pose_at(u * first_step)

        # Central differences: the pose and a step each way along each variable, in the optimiser's units.
        probes = self._difference_probes(level, first_step) if self.differences else None

        def region_of(alpha: Tensor) -> Tensor:
            if state["region"] is None:  # fixed at the start pose, so losses compare between steps
                state["region"] = target_mask if level.loss == "l1_silhouette" else \
                    self._object_region(target, alpha.detach())
            return state["region"]

        def evaluate(optimizer: torch.optim.Optimizer) -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            if probes is None:
                pose = pose_of(u)
                rgb, alpha = self._blurred(level, *self._render(pose, level, colours))
                loss = self._loss(rgb, alpha, target, region_of(alpha), level.loss, known)
                loss.backward()
            else:
                with torch.no_grad():
                    poses = torch.func.vmap(pose_of)(u.detach() + probes)
                    rgb, alpha = self._blurred(level, *self._render(poses, level, colours))
                    losses = self._losses(rgb, alpha, target, region_of(alpha[:1]), level.loss, known).double()
                    u.grad = (losses[1:7] - losses[7:]) / (2 * probes[1:7].diagonal())
                pose, loss = poses[0], losses[0]
            value = float(loss.detach())
            state["evaluations"] += 1
            state["first"] = value if state["first"] is None else state["first"]
            if value < state["best"] or not self.cfg.keep_best:
                state["best"], state["best_w2c"] = value, pose.detach()
            if patience:
                if value < state["progress_loss"] - tolerance * state["first"]:
                    state["progress_at"], state["progress_loss"] = state["evaluations"], value
                elif state["evaluations"] - state["progress_at"] >= patience:
                    raise _LevelConverged
            return loss

        steps = level.steps
        with torch.enable_grad():
            if lbfgs:
                optimizer = torch.optim.LBFGS([u], lr=float(self.cfg.lr), max_iter=steps, max_eval=steps + steps // 4 + 1,
                                              history_size=10, line_search_fn="strong_wolfe",
                                              tolerance_grad=1e-10, tolerance_change=1e-12)
                try:
                    optimizer.step(lambda: evaluate(optimizer))
                except _LevelConverged:
                    pass
            else:
                optimizer = torch.optim.Adam([u], lr=float(self.cfg.lr))
                decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=ADAM_FINAL_LR_FRACTION ** (1 / steps))
                for _ in range(steps):
                    evaluate(optimizer)
                    optimizer.step()
                    decay.step()
                with torch.no_grad():  # the pose after the last step has not been scored yet
                    evaluate_last = float(self._loss(*self._blurred(level, *self._render(pose_of(u), level, colours)), target,
                                                     state["region"], level.loss, known))
                if evaluate_last < state["best"] or not self.cfg.keep_best:
                    state["best"], state["best_w2c"] = evaluate_last, pose_of(u).detach()
        refined = state["best_w2c"].cpu().numpy()
        return Refinement(w2c=refined, steps=state["evaluations"], loss_start=state["first"], loss_end=state["best"],
                          rotation_change_deg=rotation_error_deg(w2c, refined),
                          center_change=center_error(w2c, refined), seconds=time.perf_counter() - start_time)

    def _target(self, query: Tensor, level: _Level) -> tuple[Tensor, Tensor, Tensor | None]:
        """[3, H, W] -> the image [1, 3, h, w], its object mask [1, 1, h, w] and the weight [1, 1, h, w] of
        each pixel in ``l1_silhouette`` at the refinement resolution, all blurred alike. The weight is None
        (every pixel counts) unless ``enclosed_white: unknown`` and the query has enclosed white
        (:func:`enclosed_white_mask`), which then weighs 0."""
        # Contiguous: a permuted view would change the loss's summation order, and L-BFGS amplifies
        # such last-bit differences, so the same image must give the same pose in every caller.
        target = query[None].to(self.device, torch.float32).contiguous()
        unknown = None
        if self.enclosed_white == "unknown":
            unknown = enclosed_white_mask(query)
            unknown = unknown[None, None].to(self.device, torch.float32) if unknown.any() else None
        if target.shape[-2:] != (level.height, level.width):
            size = (level.height, level.width)
            target = F.interpolate(target, size=size, mode="bilinear", antialias=True, align_corners=False)
            if unknown is not None:
                unknown = F.interpolate(unknown, size=size, mode="bilinear", antialias=True, align_corners=False)
        mask = (target < BACKGROUND_LEVEL).any(dim=1, keepdim=True).float()
        if unknown is None:
            return *self._blurred(level, target, mask), None
        target, mask, unknown = self._blurred(level, target, mask, unknown)
        return target, mask, 1.0 - unknown

    @staticmethod
    def _blurred(level: _Level, *images: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Gaussian blur of the level's sigma in pixels (0: none): a wider basin for poses that start far off."""
        sigma = level.blur
        if sigma > 0:
            size = 2 * math.ceil(3 * sigma) + 1
            images = tuple(gaussian_blur(image, [size, size], [sigma, sigma]) for image in images)
        return images[0] if len(images) == 1 else images

    def _pose_map(self, w2c: Tensor):
        """The poses [4, 4] reached from ``w2c`` [4, 4] (float64) by increments v [6] (float64, differentiable).

        ``refine.rotation_centre: camera`` (also when the key is absent): v = (translation / d, rotation) applied
        on the left of ``w2c``, with d the camera's distance to the scene: turns about the camera centre.
        ``object``: turns about the object's centre c (the Gaussians' per-axis median), v = (sideways shift
        / d, depth shift * R / d^2, rotation * R / d), with R the object's radius (median distance of the
        Gaussians from c): every unit moves the object's outline by about the same number of pixels.
        A turn about the camera shifts the image as a sideways shift does, and the loss then has a narrow
        valley (a turn and a shift that nearly cancel) that L-BFGS walks slowly; about the object, a turn
        moves the image only by parallax and the variables are far less coupled.
        """
        distance = self._scene_distance(w2c)
        if self.cfg.get("rotation_centre", "camera") != "object":
            return lambda v: apply_increment(torch.cat([v[:3] * distance, v[3:]]), w2c)
        centre = w2c[:3, :3] @ self.scene.centre + w2c[:3, 3]  # [3] in the camera frame
        reach = distance / self.scene.radius
        bottom = w2c.new_tensor([[0.0, 0.0, 0.0, 1.0]])

        def pose(v: Tensor) -> Tensor:
            step = se3_exp(torch.cat([v[:2] * distance, v[2:3] * distance * reach, v[3:] * reach]))
            rotation = step[:3, :3]  # about c: x -> c + rotation (x - c) + shift
            about_centre = torch.cat([rotation, (step[:3, 3] + centre - rotation @ centre)[:, None]], dim=1)
            return torch.cat([about_centre, bottom]) @ w2c

        return pose

    def _scene_distance(self, w2c: Tensor) -> float:
        """Median depth of the Gaussians in this camera: the unit of the translation increment."""
        means = self.gaussians.means.to(torch.float64)
        depth = means @ w2c[2, :3] + w2c[2, 3]
        depth = depth[depth > 0]
        return float(depth.median()) if len(depth) else float(w2c[:3, 3].norm())

    def _render(self, w2c: Tensor, level: _Level, colours: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """[4, 4] or [B, 4, 4] -> rgb [B, 3, h, w] on the white background and its alpha [B, 1, h, w] (B = 1
        for one pose), at the level's size; what :func:`~splatpose.splat.rendering.render` gives. ``colours``
        [N, 3]: the Gaussians' colours instead of their SH seen from ``w2c``."""
        scene = self.scene
        viewmats = (w2c[None] if w2c.dim() == 2 else w2c).to(self.device, scene.means.dtype)
        cameras = viewmats.shape[0]
        colors, sh_degree = (scene.sh_coeffs, scene.sh_degree) if colours is None else (colours, None)
        rgb, alpha, _ = rasterize(scene.means, scene.quats, scene.scales, scene.opacities, colors, viewmats,
                                  level.K[None].expand(cameras, 3, 3), level.width, level.height,
                                  backend=self.backend, sh_degree=sh_degree,
                                  backgrounds=scene.backgrounds.expand(cameras, 3), covars=scene.covars)
        return rgb.permute(0, 3, 1, 2), alpha.permute(0, 3, 1, 2)

    def _difference_probes(self, level: _Level, first_step: float) -> Tensor:
        """[13, 6] float64: no increment, then +h and -h along each variable of the optimiser (whose unit is
        ``first_step`` increment units; an increment unit moves the outline by about the focal length in
        pixels, see :meth:`_pose_map`), h moving it by about ``DIFFERENCE_STEP_PX`` pixels at this level."""
        h = DIFFERENCE_STEP_PX / (float(level.K[0, 0]) * first_step)
        steps = h * torch.eye(6, dtype=torch.float64, device=self.device)
        return torch.cat([steps.new_zeros(1, 6), steps, -steps])

    @staticmethod
    def _object_region(target: Tensor, alpha: Tensor) -> Tensor:
        """[1, 1, h, w] float: pixels the render covers or that are not white in the query."""
        foreground = (target < BACKGROUND_LEVEL).any(dim=1, keepdim=True)
        return (foreground | (alpha > 0.5)).float()

    def _losses(self, rgb: Tensor, alpha: Tensor, target: Tensor, region: Tensor, loss: str,
                known: Tensor | None = None) -> Tensor:
        """:meth:`_loss` of each of B renders (rgb [B, 3, h, w], alpha [B, 1, h, w]) against one target: [B]."""
        if loss == "l1_silhouette":
            area = region.sum().clamp(min=1.0)
            colour, outline = (rgb - target).abs(), (alpha - region).square()
            if known is not None:
                colour, outline = colour * known, outline * known
            return colour.flatten(1).sum(1) / (3 * area) + \
                float(self.cfg.silhouette_weight) * outline.flatten(1).sum(1) / area
        return torch.stack([self._loss(rgb[i:i + 1], alpha[i:i + 1], target, region, loss) for i in range(len(rgb))])

    def _loss(self, rgb: Tensor, alpha: Tensor, target: Tensor, region: Tensor, loss: str,
              known: Tensor | None = None) -> Tensor:
        """The loss of one render (rgb [1, 3, h, w], alpha [1, 1, h, w]) against the target: a scalar. ``known``
        [1, 1, h, w] (``l1_silhouette`` only): each pixel's weight (None: every pixel 1)."""
        if loss == "l1_silhouette":
            # region: the query's object mask. Normalised by its area, fixed for the query, so losses
            # compare across poses and levels.
            area = region.sum().clamp(min=1.0)
            colour, outline = (rgb - target).abs(), (alpha - region).square()
            if known is not None:
                colour, outline = colour * known, outline * known
            return colour.sum() / (3 * area) + float(self.cfg.silhouette_weight) * outline.sum() / area
        if loss == "feature":
            images = self.scorer.prepare(torch.cat([rgb, target]))
            features = self.scorer.backbone(images)
            return sum((f[:1] - f[1:]).square().mean() for f in features) / len(features)
        l1 = ((rgb - target).abs() * region).sum() / (3 * region.sum()).clamp(min=1.0)
        if loss == "l1":
            return l1
        weight = float(self.cfg.ssim_weight)
        return (1 - weight) * l1 + weight * (1 - ssim(rgb, target).mean())
