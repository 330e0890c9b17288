"""The Lightning module that fits Gaussians to posed images (3DGS training loop, gsplat style).

One training step: render the batch's views, L1 + D-SSIM against the images, backward, one Adam
step per parameter tensor, the means' exponential learning-rate decay, then the densification
strategy (gsplat's ``DefaultStrategy`` or ``MCMCStrategy``, unchanged) may add, split or remove
Gaussians. Because that changes tensor shapes, optimization is manual and a checkpoint's
parameters are resized before its state is loaded (``on_load_checkpoint``). A checkpoint also holds
the global random generators' states, restored when training resumes, so that the densification's
random draws continue as in an uninterrupted run.
"""

from __future__ import annotations

from typing import Any

import random

import hydra
import numpy as np
import torch
from gsplat.strategy import DefaultStrategy, MCMCStrategy
from lightning.pytorch import LightningModule
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from splatpose.splat.camera_refinement import CameraCorrections
from splatpose.splat.gaussians import PARAMETER_NAMES, Gaussians
from splatpose.splat.losses import exponential_decay_gamma, l1_dssim_loss, psnr, ssim
from splatpose.splat.rendering import render, resolve_backend
from splatpose.splat.views import PosedViews


class GaussianSplatModule(LightningModule):
    """Trains a :class:`Gaussians` scene.

    Args:
        gaussians: the initial scene
        cfg: the ``splat`` config node (conf/splat/*.yaml): steps, lr.*, loss.*, sh_degree,
            sh_degree_interval, strategy (a gsplat strategy ``_target_``), backend, absgrad,
            antialiased, init.*, eval.*, and optionally camera_opt.* (``enabled: true`` trains a rigid
            correction per training view, :class:`CameraCorrections`; anything else, ``auto`` included,
            leaves the cameras as given: the pipeline resolves ``auto``)
        scene_scale: size of the camera rig; the means' learning rate and the strategy's 3D scale
            thresholds are relative to it (as in gsplat's trainer)
        width, height: image size of the training views
        views: the training views ([V,H,W,3] uint8 images, [V,4,4] w2c, [3,3] K), kept on the module's
            device for the whole fit: a training batch is a list of view indices, so no step copies an
            image from the host (a copy from pageable memory also waits for the GPU to drain)
        validation batch keys: ``image`` [B,H,W,3] uint8, ``w2c`` [B,4,4] (OpenCV), ``K`` [B,3,3]
    """

    def __init__(self, gaussians: Gaussians, cfg: DictConfig | dict, scene_scale: float, width: int,
                 height: int, views: PosedViews):
        super().__init__()
        self.automatic_optimization = False  # densification changes the parameter shapes
        self.cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(cfg), resolve=True))
        self.scene_scale = float(scene_scale)
        self.width, self.height = int(width), int(height)
        # non-persistent: moved with the module, never written into checkpoints
        self.register_buffer("view_images", views.images, persistent=False)
        self.register_buffer("view_w2c", views.w2c.float(), persistent=False)
        self.register_buffer("view_K", views.K.float(), persistent=False)
        # One correction per training view, trained with the Gaussians (``refined_w2c``).
        self.cameras = (CameraCorrections(len(views), self.scene_scale)
                        if camera_refinement_enabled(self.cfg) else None)
        self.splats = torch.nn.ParameterDict(
            {name: torch.nn.Parameter(tensor.float().clone()) for name, tensor in gaussians.as_dict().items()})
        self.strategy = hydra.utils.instantiate(self.cfg.strategy)
        if isinstance(self.strategy, DefaultStrategy):
            self.strategy_state = self.strategy.initialize_state(scene_scale=self.scene_scale)
        else:
            self.strategy_state = self.strategy.initialize_state()
        self._resumed_rng_states: dict[str, Any] | None = None  # set by on_load_checkpoint
        self.save_hyperparameters({"splat": OmegaConf.to_container(self.cfg), "scene_scale": self.scene_scale,
                                   "width": self.width, "height": self.height})

    # ------------------------------------------------------------------ helpers

    @property
    def gaussians(self) -> Gaussians:
        return Gaussians.from_dict(self.splats)

    def active_sh_degree(self, step: int) -> int:
        """SH degree ramp: one more band every ``sh_degree_interval`` steps, up to ``sh_degree``."""
        return min(step // max(int(self.cfg.sh_degree_interval), 1), int(self.cfg.sh_degree))

    def render_batch(self, batch: dict, sh_degree: int, gaussians: Gaussians | None = None, **kwargs):
        """Render ``batch`` (w2c [B,4,4], K) with the module's Gaussians, or ``gaussians`` (e.g. detached)."""
        backend = resolve_backend(self.cfg.backend, self.device)
        gaussians = gaussians if gaussians is not None else self.gaussians
        return render(gaussians, batch["w2c"], batch["K"], self.width, self.height, backend=backend,
                      sh_degree=sh_degree, return_alpha=True, return_info=True,
                      rasterize_mode="antialiased" if self.cfg.get("antialiased", False) else "classic",
                      **kwargs)

    def raw_optimizers(self, wrapped=None) -> dict[str, torch.optim.Optimizer]:
        """Parameter name -> its torch optimizer, the mapping gsplat's strategies edit in place (the
        camera corrections' optimizer, last in the list when present, is not theirs to edit)."""
        return {name: opt.optimizer for name, opt in zip(PARAMETER_NAMES, wrapped or self.optimizers())}

    # ------------------------------------------------------------------ Lightning hooks

    def configure_optimizers(self):
        lr = self.cfg.lr
        rates = {"means": lr.means * self.scene_scale, "quats": lr.quats, "scales": lr.scales,
                 "opacities": lr.opacities, "sh0": lr.sh0, "shN": lr.shN}
        # One Adam per tensor (gsplat's strategies require it); eps 1e-15 as in 3DGS. On a GPU the
        # fused kernel saves most of the per-step Python overhead of six optimizers.
        fused = self.device.type == "cuda"
        optimizers = [torch.optim.Adam([{"params": [self.splats[name]], "lr": rates[name], "name": name}],
                                       eps=1e-15, fused=fused) for name in PARAMETER_NAMES]
        gamma = exponential_decay_gamma(lr.means, lr.means_final, int(self.cfg.steps))
        schedules = [torch.optim.lr_scheduler.ExponentialLR(optimizers[0], gamma=gamma)]
        if self.cameras is not None:
            camera_opt = self.cfg.camera_opt
            optimizers.append(torch.optim.Adam(self.cameras.parameters(), lr=float(camera_opt.lr), eps=1e-15))
            schedules.append(torch.optim.lr_scheduler.ExponentialLR(optimizers[-1], gamma=exponential_decay_gamma(
                float(camera_opt.lr), float(camera_opt.lr_final), int(self.cfg.steps))))
        return optimizers, schedules

    def views_batch(self, indices: list[int]) -> dict:
        """The batch of train views ``indices`` (Python ints: indexing with them needs no host sync), at
        their corrected cameras when the cameras are refined."""
        w2c = torch.stack([self.view_w2c[i] for i in indices])
        if self.cameras is not None:
            w2c = self.cameras(w2c, indices)
        return {"image": torch.stack([self.view_images[i] for i in indices]), "w2c": w2c, "K": self.view_K}

    @torch.no_grad()
    def refined_w2c(self) -> Tensor:
        """[V, 4, 4] the training views' world-to-camera poses (OpenCV) as trained: corrected when the
        cameras are refined, else as given."""
        if self.cameras is None:
            return self.view_w2c.clone()
        return self.cameras(self.view_w2c, list(range(len(self.view_w2c))))

    def training_step(self, batch: list[int], batch_idx: int) -> Tensor:
        step = self.global_step
        batch = self.views_batch(batch)
        images = batch["image"].float() / 255.0
        rgb, _, info = self.render_batch(batch, self.active_sh_degree(step), absgrad=bool(self.cfg.absgrad))
        wrapped = self.optimizers()
        optimizers = self.raw_optimizers(wrapped)
        self.strategy.step_pre_backward(self.splats, optimizers, self.strategy_state, step, info)

        loss, parts = l1_dssim_loss(rgb, images, float(self.cfg.loss.ssim_weight))
        loss = loss + self.regularization()
        self.manual_backward(loss)

        # Lightning counts one global step per LightningOptimizer.step(); stepping only the first
        # through its wrapper keeps global_step == iteration (max_steps, checkpoints and resume
        # rely on it). The others are plain torch optimizers, stepped directly.
        wrapped[0].step()
        for optimizer in wrapped[1:]:
            optimizer.optimizer.step()
        for optimizer in wrapped:
            optimizer.optimizer.zero_grad(set_to_none=True)
        schedules = self.lr_schedulers()
        schedules = schedules if isinstance(schedules, list) else [schedules]
        means_lr = schedules[0].get_last_lr()[0]
        for schedule in schedules:
            schedule.step()

        if isinstance(self.strategy, MCMCStrategy):
            self.strategy.step_post_backward(self.splats, optimizers, self.strategy_state, step, info,
                                             lr=means_lr)
        else:
            self.strategy.step_post_backward(self.splats, optimizers, self.strategy_state, step, info,
                                             packed=False)

        # self.log costs a fraction of a millisecond per call, a good share of a GPU step: log
        # only on the steps the loggers record anyway.
        if step % self.trainer.log_every_n_steps == 0:
            batch_size = images.shape[0]
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
            self.log("train/l1", parts["l1"], batch_size=batch_size)
            self.log("train/ssim", parts["ssim"], batch_size=batch_size)
            self.log("train/num_gaussians", float(len(self.splats["means"])), prog_bar=True, batch_size=batch_size)
            self.log("train/sh_degree", float(self.active_sh_degree(step)), batch_size=batch_size)
        return loss.detach()

    def regularization(self) -> Tensor:
        """MCMC's opacity and scale penalties (weights 0 disable them), and the camera corrections'
        pull toward zero (``camera_opt.reg`` times their mean square): it holds the frame, which the
        images alone leave free (moving every camera and the Gaussians together costs nothing)."""
        total = self.splats["means"].new_zeros(())
        if self.cameras is not None and float(self.cfg.camera_opt.get("reg", 0.0)):
            total = total + float(self.cfg.camera_opt.reg) * self.cameras.delta.square().sum(-1).mean()
        if self.cfg.loss.get("opacity_reg", 0.0):
            total = total + self.cfg.loss.opacity_reg * torch.sigmoid(self.splats["opacities"]).mean()
        if self.cfg.loss.get("scale_reg", 0.0):
            total = total + self.cfg.loss.scale_reg * torch.exp(self.splats["scales"]).mean()
        return total

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"].float() / 255.0
        rgb, _, _ = self.render_batch(batch, self.active_sh_degree(self.global_step))
        rgb = rgb.clamp(0, 1)
        batch_size = images.shape[0]
        self.log("val/psnr", psnr(rgb, images).mean(), prog_bar=True, batch_size=batch_size)
        self.log("val/ssim", ssim(rgb.permute(0, 3, 1, 2), images.permute(0, 3, 1, 2)).mean(),
                 batch_size=batch_size)
        self.log("val/num_gaussians", float(len(self.splats["means"])), batch_size=batch_size)

    def on_train_start(self) -> None:
        # A resumed strategy state was loaded on the CPU; the strategy adds GPU gradients to it.
        self.strategy_state = {k: v.to(self.device) if isinstance(v, Tensor) else v
                               for k, v in self.strategy_state.items()}

        if self._resumed_rng_states is not None:
            # Restored here, not on load: Lightning draws from the generators between the two.
            restore_rng_states(self._resumed_rng_states)
            self._resumed_rng_states = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["strategy_state"] = self.strategy_state
        checkpoint["rng_states"] = capture_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resize the parameters to the checkpoint's number of Gaussians before its state is loaded
        (Lightning calls this before ``load_state_dict`` and before creating the optimizers)."""
        state = checkpoint["state_dict"]
        for name in PARAMETER_NAMES:
            saved = state[f"splats.{name}"]
            self.splats[name] = torch.nn.Parameter(torch.empty_like(saved, device=self.splats[name].device))
        if "strategy_state" in checkpoint:
            self.strategy_state = checkpoint["strategy_state"]
        self._resumed_rng_states = checkpoint.get("rng_states")



def camera_refinement_enabled(cfg: DictConfig) -> bool:
    """Whether the ``splat`` node asks for camera corrections: ``camera_opt.enabled`` is true (a
    resolved setting; ``auto`` is resolved by the pipeline from ``sfm.reference_poses``)."""
    camera_opt = cfg.get("camera_opt")
    return camera_opt is not None and camera_opt.get("enabled") is True


def capture_rng_states() -> dict[str, Any]:
    """The states of Python's, numpy's, torch's CPU and (when present) CUDA global generators, as
    tensors and plain values (Lightning loads checkpoints with ``weights_only``: no numpy arrays)."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                        float(cached_gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global generators to ``states`` (from :func:`capture_rng_states`)."""
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
