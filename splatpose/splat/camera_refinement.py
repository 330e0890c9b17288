"""Learned corrections of the reference cameras, optimised through the splats.

Estimated reference cameras (SfM from the images alone) agree with each other at the keypoints but
sit a fraction of a degree from the true ones; splats trained at them blur where the views disagree.
Here every reference camera gets a small rigid correction, a 6-vector ``delta = (t, w)``: ``w`` an
axis-angle rotation (radians) and ``t`` a translation in units of the scene scale, both in the
camera's own frame, applied on the left of the world-to-camera pose::

    w2c_refined = [exp([w]x)  t * scene_scale] @ w2c
                  [   0              1       ]

All zeros is the identity, so a correction starts as the camera it corrects (as gsplat's
``CameraOptModule`` and nerfstudio's ``CameraOptimizer``; this one is axis-angle, not 6-D rotations).
The rasterizers pass gradients to the view matrices (gsplat's CUDA kernels; the torch rasterizer's
projection is plain autograd in front of its compositing Function), so the corrections train jointly
with the Gaussians. ``align_cameras`` is the same correction fitted for cameras the training did not
see (held-out views), with the Gaussians frozen.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from splatpose.splat.losses import l1_dssim_loss


def resolve_camera_refinement(cfg_splat: DictConfig, reference_poses: str) -> DictConfig:
    """The ``splat`` node with ``camera_opt.enabled`` resolved: ``auto`` is on exactly when the reference
    cameras are estimated (``reference_poses == "estimate"``). When off, ``camera_opt`` is dropped, so a
    run without refinement trains (and caches) the splats exactly as a config without the node."""
    resolved = OmegaConf.create(OmegaConf.to_container(cfg_splat, resolve=True))
    camera_opt = resolved.get("camera_opt")
    if camera_opt is None:
        return resolved
    enabled = camera_opt.get("enabled", "auto")
    enabled = reference_poses == "estimate" if enabled == "auto" else bool(enabled)
    if not enabled:
        del resolved["camera_opt"]
    else:
        resolved.camera_opt.enabled = True
    return resolved


def skew(vectors: Tensor) -> Tensor:
    """[..., 3] -> [..., 3, 3] cross-product matrices."""
    x, y, z = vectors.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*vectors.shape[:-1], 3, 3)


def correction_matrices(delta: Tensor, scene_scale: float) -> Tensor:
    """[B, 6] corrections (t: [:, :3] in scene-scale units, w: [:, 3:] axis-angle, radians) -> [B, 4, 4]
    rigid transforms in camera coordinates (the rotation through ``matrix_exp``, exact and smooth at 0)."""
    rotation = torch.linalg.matrix_exp(skew(delta[:, 3:]))
    top = torch.cat([rotation, delta[:, :3, None] * scene_scale], dim=-1)
    bottom = torch.zeros_like(top[:, :1])
    bottom[..., 3] = 1.0
    return torch.cat([top, bottom], dim=1)


class CameraCorrections(torch.nn.Module):
    """One learned rigid correction per camera.

    Args:
        num_cameras: V, the cameras corrected (train views, in their index order)
        scene_scale: the size of the camera rig; a translation of 1 in ``delta`` moves a camera by it

    ``delta``: [V, 6] parameter, zeros at the start (see the module docstring for its layout).
    """

    def __init__(self, num_cameras: int, scene_scale: float):
        super().__init__()
        self.scene_scale = float(scene_scale)
        self.delta = torch.nn.Parameter(torch.zeros(num_cameras, 6))

    def forward(self, w2c: Tensor, indices: list[int] | Tensor) -> Tensor:
        """w2c [B, 4, 4] (OpenCV, world-to-camera) of cameras ``indices`` (B) -> their corrected poses [B, 4, 4]."""
        delta = self.delta[torch.as_tensor(indices, device=self.delta.device)]
        return correction_matrices(delta, self.scene_scale).to(w2c.dtype) @ w2c

    def magnitudes(self) -> tuple[Tensor, Tensor]:
        """Per camera: rotation angle (degrees) [V] and translation (scene-scale units) [V] of its correction."""
        delta = self.delta.detach()
        return torch.rad2deg(delta[:, 3:].norm(dim=-1)), delta[:, :3].norm(dim=-1)


def align_cameras(render_fn, images: Tensor, w2c: Tensor, scene_scale: float, steps: int = 100,
                  lr: float = 2e-3) -> Tensor:
    """Fit a rigid correction to each camera against fixed Gaussians (pose-only photometric alignment).

    Args:
        render_fn: ``w2c [1, 4, 4] -> rgb [1, H, W, 3]``, differentiable in w2c (the Gaussians frozen)
        images: [V, H, W, 3] float in [0, 1], the views
        w2c: [V, 4, 4] their starting poses (OpenCV, world-to-camera)
        scene_scale: as in :class:`CameraCorrections`
        steps: Adam steps per camera; lr: its learning rate (per step, radians and scene-scale units),
            decayed to a hundredth over the steps

    Returns: [V, 4, 4] the corrected poses (detached).
    """
    corrected = []
    for i in range(len(w2c)):
        corrections = CameraCorrections(1, scene_scale).to(w2c.device)
        optimizer = torch.optim.Adam(corrections.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.01 ** (1.0 / max(steps, 1)))
        for _ in range(steps):
            rgb = render_fn(corrections(w2c[i:i + 1], [0]))
            loss, _ = l1_dssim_loss(rgb, images[i:i + 1], 0.2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        with torch.no_grad():
            corrected.append(corrections(w2c[i:i + 1], [0])[0])
    return torch.stack(corrected).detach()
