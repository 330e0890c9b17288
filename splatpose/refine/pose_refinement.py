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
  difference of the rendered alpha and the query's object mask, both per query object pixel: the
  outline pulls a pose that starts far off (:mod:`splatpose.refine.recovery`) towards the object.

The increment is ``xi = (translation / d, rotation)`` with ``d`` the camera's distance to the scene
(median depth of the Gaussians): a unit of either moves the image by about the same amount, so the
problem is well scaled for any scene size. It is still ill-conditioned: for a small object a
rotation about an image axis and a sideways shift look nearly alike, and only parallax tells them
apart. Plain gradient steps (Adam) align the image quickly but then crawl along that valley;
L-BFGS (``optimizer: lbfgs``, the default, with a strong-Wolfe line search) builds the curvature up
and walks it (measured on a toy scene: 1.5 deg -> 0.15 deg in 20 iterations where Adam stayed near
1 deg). ``steps`` is the number of L-BFGS iterations (or Adam steps); each costs one render forward
and backward, line-search probes add a few. Rendering can run at a lower ``scale`` than the image for
speed. With ``keep_best`` the returned pose is the lowest-loss pose rendered (the start included),
so refinement never makes the loss worse than PnP's pose.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
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


@dataclass
class Refinement:
    """What refining one pose did.

    w2c: [4, 4] float64 refined world-to-camera (OpenCV); equals the start when nothing improved.
    steps: renders evaluated (optimiser steps plus line-search probes).
    loss_start, loss_end: the loss at the start pose and at the returned pose.
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
    if cfg.loss not in REFINE_LOSSES:
        raise ValueError(f"refine.loss={cfg.loss!r} is unknown; choose one of {', '.join(REFINE_LOSSES)}")
    if cfg.optimizer not in REFINE_OPTIMIZERS:
        raise ValueError(f"refine.optimizer={cfg.optimizer!r} is unknown; choose one of "
                         f"{', '.join(REFINE_OPTIMIZERS)}")
    if int(cfg.steps) < 1:
        raise ValueError(f"refine.steps must be >= 1 (or set refine.enabled=false), got {cfg.steps}")
    if not 0 < float(cfg.scale) <= 1:
        raise ValueError(f"refine.scale must be in (0, 1] (render size relative to the image), got {cfg.scale}")


class PoseRefiner:
    """Refines camera poses of one scene against query images.

    Args:
        gaussians: the scene (on ``device``).
        K: [3, 3] intrinsics of the full-size image; width, height its size.
        cfg: the ``refine`` node (optimizer, steps, lr, loss, ssim_weight, scale, keep_best).
        backend: renderer backend ("auto" | "gsplat" | "torch"); both are differentiable in the pose.
        scorer: the anomaly scorer whose backbone the ``feature`` loss uses (None otherwise).
    """

    def __init__(self, gaussians: Gaussians, K: np.ndarray, width: int, height: int, cfg: DictConfig,
                 backend: str = "auto", scorer: AnomalyScorer | None = None):
        check_refine_config(cfg)
        if cfg.loss == "feature" and (scorer is None or scorer.backbone is None):
            raise ValueError("refine.loss=feature needs a scorer with a backbone (scorer=efficientnet_lite0 "
                             "or efficientnet_b4); use loss=l1 with the pixel scorer")
        self.gaussians, self.cfg, self.backend, self.scorer = gaussians, cfg, backend, scorer
        self.device = gaussians.means.device
        scale = float(cfg.scale)
        self.width, self.height = max(1, round(width * scale)), max(1, round(height * scale))
        K_scaled = np.asarray(K, dtype=np.float64).copy()
        K_scaled[:2] *= [[self.width / width], [self.height / height]]  # image spans [0, W]: scale fx, cx alike
        self.K = torch.as_tensor(K_scaled, dtype=torch.float32, device=self.device)

    def refine(self, query: Tensor, w2c: np.ndarray) -> Refinement:
        """Refine ``w2c`` [4, 4] (OpenCV world-to-camera) against ``query`` [3, H, W] in [0, 1]."""
        start_time = time.perf_counter()
        target, target_mask = self._target(query)
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
            rgb, alpha = self._blurred(*self._render(pose))
            if state["region"] is None:  # fixed at the start pose, so losses compare between steps
                state["region"] = target_mask if self.cfg.loss == "l1_silhouette" else \
                    self._object_region(target, alpha.detach())
            loss = self._loss(rgb, alpha, target, state["region"])
            loss.backward()
            value = float(loss.detach())
            state["evaluations"] += 1
            state["first"] = value if state["first"] is None else state["first"]
            if value < state["best"] or not self.cfg.keep_best:
                state["best"], state["best_w2c"] = value, pose.detach()
            return loss

        steps = int(self.cfg.steps)
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
                    evaluate_last = float(self._loss(*self._blurred(*self._render(pose_of(xi))), target,
                                                     state["region"]))
                if evaluate_last < state["best"] or not self.cfg.keep_best:
                    state["best"], state["best_w2c"] = evaluate_last, pose_of(xi).detach()
        refined = state["best_w2c"].cpu().numpy()
        return Refinement(w2c=refined, steps=state["evaluations"], loss_start=state["first"], loss_end=state["best"],
                          rotation_change_deg=rotation_error_deg(w2c, refined),
                          center_change=center_error(w2c, refined), seconds=time.perf_counter() - start_time)

    def _target(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """[3, H, W] -> the image [1, 3, h, w] and its object mask [1, 1, h, w] at the refinement
        resolution, both blurred alike."""
        # Contiguous: a permuted view would change the loss's summation order, and L-BFGS amplifies
        # such last-bit differences, so the same image must give the same pose in every caller.
        target = query[None].to(self.device, torch.float32).contiguous()
        if target.shape[-2:] != (self.height, self.width):
            target = F.interpolate(target, size=(self.height, self.width), mode="bilinear", antialias=True,
                                   align_corners=False)
        mask = (target < BACKGROUND_LEVEL).any(dim=1, keepdim=True).float()
        return self._blurred(target, mask)

    def _blurred(self, *images: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Gaussian blur of ``refine.blur`` pixels (0: none): a wider basin for poses that start far off."""
        sigma = float(self.cfg.get("blur", 0.0))
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

    def _render(self, w2c: Tensor) -> tuple[Tensor, Tensor]:
        """[4, 4] -> rgb [1, 3, h, w], alpha [1, 1, h, w] on the white background."""
        rgb, alpha = render(self.gaussians, w2c[None], self.K, self.width, self.height, backend=self.backend,
                            return_alpha=True)
        return rgb.permute(0, 3, 1, 2), alpha.permute(0, 3, 1, 2)

    @staticmethod
    def _object_region(target: Tensor, alpha: Tensor) -> Tensor:
        """[1, 1, h, w] float: pixels the render covers or that are not white in the query."""
        foreground = (target < BACKGROUND_LEVEL).any(dim=1, keepdim=True)
        return (foreground | (alpha > 0.5)).float()

    def _loss(self, rgb: Tensor, alpha: Tensor, target: Tensor, region: Tensor) -> Tensor:
        if self.cfg.loss == "l1_silhouette":
            # region: the query's object mask. Normalised by its area, fixed for the query, so losses
            # compare across poses and levels.
            area = region.sum().clamp(min=1.0)
            colour = (rgb - target).abs().sum() / (3 * area)
            return colour + float(self.cfg.silhouette_weight) * (alpha - region).square().sum() / area
        if self.cfg.loss == "feature":
            images = self.scorer.prepare(torch.cat([rgb, target]))
            features = self.scorer.backbone(images)
            return sum((f[:1] - f[1:]).square().mean() for f in features) / len(features)
        l1 = ((rgb - target).abs() * region).sum() / (3 * region.sum()).clamp(min=1.0)
        if self.cfg.loss == "l1":
            return l1
        weight = float(self.cfg.ssim_weight)
        return (1 - weight) * l1 + weight * (1 - ssim(rgb, target).mean())
