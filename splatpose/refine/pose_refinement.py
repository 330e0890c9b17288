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
  pulls the camera closer.)

The increment is ``xi = (translation / d, rotation)`` with ``d`` the camera's distance to the scene
(median depth of the Gaussians): a unit of either moves the image by about the same amount, so the
problem is well scaled for any scene size. It is still ill-conditioned: for a small object a
rotation about an image axis and a sideways shift look nearly alike, and only parallax tells them
apart. Plain gradient steps (Adam) align the image quickly but then crawl along that valley;
L-BFGS (``optimizer: lbfgs``, the default, with a strong-Wolfe line search) builds the curvature up
and walks it (measured on a toy scene: 1.5 deg -> 0.15 deg in 20 iterations where Adam stayed near
1 deg). ``steps`` is the number of L-BFGS iterations (or Adam steps); each costs one render forward
and backward, line-search probes add a few.

Refinement runs **coarse to fine**: at each of ``levels`` (render sizes relative to the image) it
optimises ``steps`` iterations from the pose the level before returned, with images and renders
blurred by ``blur`` (Gaussian sigma as a fraction of the image's longest side); ``steps``, ``blur`` and
``loss`` take one value per level or one for all. Small blurred renders widen the basin and cost little; the last level settles the detail.
On weakly textured objects the outline carries most of the pose, which is what ``l1_silhouette`` with a
coarse level adds (06PlainAnt, PnP poses: within 1 deg 57 % -> 86 %; experiments/results/
refine_c2f_cpu_2026-12-05.md). With ``keep_best`` each level returns the lowest-loss pose it rendered
(its start included), so no level makes its own loss worse.
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
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur

from splatpose.data.cameras import center_error, rotation_error_deg
from splatpose.refine.se3 import apply_increment
from splatpose.scoring.anomaly_maps import AnomalyScorer
from splatpose.splat.gaussians import Gaussians
from splatpose.splat.losses import ssim
from splatpose.splat.rendering import render

REFINE_LOSSES = ("l1", "l1_ssim", "feature", "l1_silhouette")
REFINE_OPTIMIZERS = ("lbfgs", "adam")
# Adam's step size decays exponentially to this fraction of refine.lr over the steps.
ADAM_FINAL_LR_FRACTION = 0.05
# A query pixel darker than this in some channel is object, not white background.
BACKGROUND_LEVEL = 0.98


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
    def of(settings: LevelSettings, K: np.ndarray, width: int, height: int, device: torch.device) -> "_Level":
        w, h = max(1, round(width * settings.scale)), max(1, round(height * settings.scale))
        K_scaled = np.asarray(K, dtype=np.float64).copy()
        K_scaled[:2] *= [[w / width], [h / height]]  # image spans [0, W]: scale fx, cx alike
        return _Level(w, h, torch.as_tensor(K_scaled, dtype=torch.float32, device=device), settings.steps,
                      settings.blur * max(w, h), settings.loss)


@dataclass
class Refinement:
    """What refining one pose did.

    w2c: [4, 4] float64 refined world-to-camera (OpenCV); equals the start when nothing improved.
    steps: renders evaluated (optimiser steps plus line-search probes), over all levels run.
    loss_start, loss_end: the loss at the start pose (first level run) and at the returned pose (last
        level run: losses of different levels are not comparable).
    rotation_change_deg, center_change: how far the returned pose is from the start (degrees, world units).
    """

    w2c: np.ndarray
    steps: int
    loss_start: float
    loss_end: float
    rotation_change_deg: float
    center_change: float
    seconds: float

    def summary(self) -> dict:
        return {"steps": self.steps, "loss_start": round(self.loss_start, 6), "loss_end": round(self.loss_end, 6),
                "rotation_change_deg": round(self.rotation_change_deg, 5),
                "center_change": round(self.center_change, 6), "seconds": round(self.seconds, 4)}


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
    for scale, steps, blur, _ in levels:
        if steps < 1:
            raise ValueError(f"refine.steps must be >= 1 (or set refine.enabled=false), got {cfg.steps}")
        if not 0 < scale <= 1:
            raise ValueError(f"refine.levels must be in (0, 1] (render size relative to the image), got {cfg.levels}")
        if blur < 0:
            raise ValueError(f"refine.blur must be >= 0 (a fraction of the image size), got {cfg.blur}")


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
        gaussians: the scene (on ``device``).
        K: [3, 3] intrinsics of the full-size image; width, height its size.
        cfg: the ``refine`` node (optimizer, lr, loss, ssim_weight, silhouette_weight, levels, steps, blur,
            keep_best).
        backend: renderer backend ("auto" | "gsplat" | "torch"); both are differentiable in the pose.
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
        self.device = gaussians.means.device
        self.levels = [_Level.of(settings, K, width, height, self.device) for settings in levels]

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
        target, target_mask = self._target(query, settings)
        losses = []
        with torch.no_grad():
            for w2c in poses:
                rgb, alpha = self._blurred(settings, *self._render(
                    torch.as_tensor(w2c, dtype=torch.float64, device=self.device), settings))
                region = target_mask if settings.loss == "l1_silhouette" else self._object_region(target, alpha)
                losses.append(float(self._loss(rgb, alpha, target, region, settings.loss)))
        return losses

    def _refine_level(self, query: Tensor, w2c: np.ndarray, level: _Level) -> Refinement:
        start_time = time.perf_counter()
        target, target_mask = self._target(query, level)
        w2c_start = torch.as_tensor(w2c, dtype=torch.float64, device=self.device)
        distance = self._scene_distance(w2c_start)
        # xi = (translation / distance, rotation): both about "one image width per radian" in effect.
        xi = torch.zeros(6, dtype=torch.float64, device=self.device, requires_grad=True)
        state = {"region": None, "first": None, "best": float("inf"), "best_w2c": w2c_start, "evaluations": 0}

        def pose_of(xi: Tensor) -> Tensor:
            return apply_increment(torch.cat([xi[:3] * distance, xi[3:]]), w2c_start)

        def evaluate(optimizer: torch.optim.Optimizer) -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            pose = pose_of(xi)
            rgb, alpha = self._blurred(level, *self._render(pose, level))
            if state["region"] is None:  # fixed at the start pose, so losses compare between steps
                state["region"] = target_mask if level.loss == "l1_silhouette" else \
                    self._object_region(target, alpha.detach())
            loss = self._loss(rgb, alpha, target, state["region"], level.loss)
            loss.backward()
            value = float(loss.detach())
            state["evaluations"] += 1
            state["first"] = value if state["first"] is None else state["first"]
            if value < state["best"] or not self.cfg.keep_best:
                state["best"], state["best_w2c"] = value, pose.detach()
            return loss

        steps = level.steps
        with torch.enable_grad():
            if self.cfg.optimizer == "lbfgs":
                optimizer = torch.optim.LBFGS([xi], lr=float(self.cfg.lr), max_iter=steps, max_eval=steps + steps // 4 + 1,
                                              history_size=10, line_search_fn="strong_wolfe",
                                              tolerance_grad=1e-10, tolerance_change=1e-12)
                optimizer.step(lambda: evaluate(optimizer))
            else:
                optimizer = torch.optim.Adam([xi], lr=float(self.cfg.lr))
                decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=ADAM_FINAL_LR_FRACTION ** (1 / steps))
                for _ in range(steps):
                    evaluate(optimizer)
                    optimizer.step()
                    decay.step()
                with torch.no_grad():  # the pose after the last step has not been scored yet
                    evaluate_last = float(self._loss(*self._blurred(level, *self._render(pose_of(xi), level)), target,
                                                     state["region"], level.loss))
                if evaluate_last < state["best"] or not self.cfg.keep_best:
                    state["best"], state["best_w2c"] = evaluate_last, pose_of(xi).detach()
        refined = state["best_w2c"].cpu().numpy()
        return Refinement(w2c=refined, steps=state["evaluations"], loss_start=state["first"], loss_end=state["best"],
                          rotation_change_deg=rotation_error_deg(w2c, refined),
                          center_change=center_error(w2c, refined), seconds=time.perf_counter() - start_time)

    def _target(self, query: Tensor, level: _Level) -> tuple[Tensor, Tensor]:
        """[3, H, W] -> the image [1, 3, h, w] and its object mask [1, 1, h, w] at the refinement
        resolution, both blurred alike."""
        # Contiguous: a permuted view would change the loss's summation order, and L-BFGS amplifies
        # such last-bit differences, so the same image must give the same pose in every caller.
        target = query[None].to(self.device, torch.float32).contiguous()
        if target.shape[-2:] != (level.height, level.width):
            target = F.interpolate(target, size=(level.height, level.width), mode="bilinear", antialias=True,
                                   align_corners=False)
        mask = (target < BACKGROUND_LEVEL).any(dim=1, keepdim=True).float()
        return self._blurred(level, target, mask)

    @staticmethod
    def _blurred(level: _Level, *images: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Gaussian blur of the level's sigma in pixels (0: none): a wider basin for poses that start far off."""
        sigma = level.blur
        if sigma > 0:
            size = 2 * math.ceil(3 * sigma) + 1
            images = tuple(gaussian_blur(image, [size, size], [sigma, sigma]) for image in images)
        return images[0] if len(images) == 1 else images

    def _scene_distance(self, w2c: Tensor) -> float:
        """Median depth of the Gaussians in this camera: the unit of the translation increment."""
        means = self.gaussians.means.to(torch.float64)
        depth = means @ w2c[2, :3] + w2c[2, 3]
        depth = depth[depth > 0]
        return float(depth.median()) if len(depth) else float(w2c[:3, 3].norm())

    def _render(self, w2c: Tensor, level: _Level) -> tuple[Tensor, Tensor]:
        """[4, 4] -> rgb [1, 3, h, w] on the white background and its alpha [1, 1, h, w], at the level's size."""
        rgb, alpha = render(self.gaussians, w2c[None], level.K, level.width, level.height, backend=self.backend,
                            return_alpha=True)
        return rgb.permute(0, 3, 1, 2), alpha.permute(0, 3, 1, 2)

    @staticmethod
    def _object_region(target: Tensor, alpha: Tensor) -> Tensor:
        """[1, 1, h, w] float: pixels the render covers or that are not white in the query."""
        foreground = (target < BACKGROUND_LEVEL).any(dim=1, keepdim=True)
        return (foreground | (alpha > 0.5)).float()

    def _loss(self, rgb: Tensor, alpha: Tensor, target: Tensor, region: Tensor, loss: str) -> Tensor:
        if loss == "l1_silhouette":
            # region: the query's object mask. Normalised by its area, fixed for the query, so losses
            # compare across poses and levels.
            area = region.sum().clamp(min=1.0)
            colour = (rgb - target).abs().sum() / (3 * area)
            return colour + float(self.cfg.silhouette_weight) * (alpha - region).square().sum() / area
        if loss == "feature":
            images = self.scorer.prepare(torch.cat([rgb, target]))
            features = self.scorer.backbone(images)
            return sum((f[:1] - f[1:]).square().mean() for f in features) / len(features)
        l1 = ((rgb - target).abs() * region).sum() / (3 * region.sum()).clamp(min=1.0)
        if loss == "l1":
            return l1
        weight = float(self.cfg.ssim_weight)
        return (1 - weight) * l1 + weight * (1 - ssim(rgb, target).mean())
