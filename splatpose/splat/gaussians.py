"""The Gaussian parameters of a 3DGS scene and how they are initialised.

Parameters are stored *before* activation, as in the 3DGS paper and gsplat's trainer:

    means      [N, 3]     world coordinates
    quats      [N, 4]     rotation quaternion (w, x, y, z), not necessarily unit length
    scales     [N, 3]     log of the per-axis standard deviations (world units)
    opacities  [N]        logit of the opacity
    sh0        [N, 1, 3]  degree-0 spherical-harmonics coefficient per colour channel
    shN        [N, K, 3]  higher-degree coefficients, K = (sh_degree + 1)**2 - 1 (15 for degree 3)

The renderer activates them (normalised quats, exp(scales), sigmoid(opacities)) and evaluates the
SH colour as ``SH(dir) + 0.5`` clamped at 0, the convention of gsplat and of Inria's 3DGS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

# Degree-0 SH basis value: colour = SH_C0 * sh0 + 0.5 for a view-independent Gaussian.
SH_C0 = 0.28209479177387814

PARAMETER_NAMES = ("means", "quats", "scales", "opacities", "sh0", "shN")


def rgb_to_sh0(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0,1] -> degree-0 SH coefficient (inverse of ``SH_C0 * sh0 + 0.5``)."""
    return (rgb - 0.5) / SH_C0


def num_sh_rest(sh_degree: int) -> int:
    """Number of SH coefficients above degree 0 per channel (15 for degree 3)."""
    return (sh_degree + 1) ** 2 - 1


@dataclass
class Gaussians:
    """A 3DGS scene as plain tensors (see the module docstring for shapes and activations)."""

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    sh0: torch.Tensor
    shN: torch.Tensor

    def __post_init__(self) -> None:
        n = self.means.shape[0]
        expected = {"means": (n, 3), "quats": (n, 4), "scales": (n, 3), "opacities": (n,),
                    "sh0": (n, 1, 3)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"Gaussians.{name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"expected {shape}")
        if self.shN.dim() != 3 or self.shN.shape[0] != n or self.shN.shape[2] != 3:
            raise ValueError(f"Gaussians.shN has shape {tuple(self.shN.shape)}, expected ({n}, K, 3)")
        if math.isqrt(self.shN.shape[1] + 1) ** 2 != self.shN.shape[1] + 1:
            raise ValueError(f"Gaussians.shN holds {self.shN.shape[1]} coefficients per channel; "
                             "it must be (degree+1)**2 - 1 (0, 3, 8 or 15)")

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        """The highest SH degree the coefficients can represent."""
        return math.isqrt(self.shN.shape[1] + 1) - 1

    @property
    def sh_coeffs(self) -> torch.Tensor:
        """All SH coefficients, [N, (sh_degree+1)**2, 3], as gsplat's ``colors`` argument expects."""
        return torch.cat([self.sh0, self.shN], dim=1)

    def to(self, device: str | torch.device) -> "Gaussians":
        return Gaussians(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def detach(self) -> "Gaussians":
        return Gaussians(**{f.name: getattr(self, f.name).detach() for f in fields(self)})

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in PARAMETER_NAMES}

    @classmethod
    def from_dict(cls, tensors) -> "Gaussians":
        """From any mapping with the six parameter names (a dict, a ParameterDict, a state dict)."""
        return cls(**{name: tensors[name] for name in PARAMETER_NAMES})


def nearest_neighbour_distance(points: np.ndarray, k: int = 3) -> np.ndarray:
    """Mean distance of every point to its ``k`` nearest other points, [N] (as in 3DGS's init).

    scipy's KD-tree; where scipy is not installed (a bare GPU box), a brute-force ``torch.cdist``
    on the GPU. Duplicate points would give zero; they are floored at a tenth of the median so
    that no Gaussian starts with a degenerate (log 0) scale.
    """
    if len(points) < 2:
        return np.full(len(points), 0.01, dtype=np.float64)
    k = min(k, len(points) - 1)
    try:
        from scipy.spatial import cKDTree
    except ImportError:
        mean = _nearest_neighbour_distance_torch(points, k)
    else:
        distances, _ = cKDTree(points).query(points, k=k + 1)  # the first neighbour is the point itself
        mean = distances[:, 1:].mean(axis=1)
    floor = max(float(np.median(mean)) * 0.1, 1e-7)
    return np.maximum(mean, floor)


def _nearest_neighbour_distance_torch(points: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    xyz = torch.as_tensor(points, dtype=torch.float32, device=device)
    means = [torch.cdist(xyz[start:start + chunk], xyz).topk(k + 1, dim=1, largest=False).values[:, 1:].mean(1)
             for start in range(0, len(xyz), chunk)]
    return torch.cat(means).double().cpu().numpy()


def init_gaussians(points_xyz: np.ndarray, points_rgb: np.ndarray, sh_degree: int = 3,
                   init_opacity: float = 0.1, init_scale: float = 1.0) -> Gaussians:
    """One isotropic Gaussian per point, as in the 3DGS paper.

    Args:
        points_xyz: [N, 3] world positions (SfM points or random samples)
        points_rgb: [N, 3] colours in [0,1]
        sh_degree: highest SH degree to allocate (the coefficients above 0 start at zero)
        init_opacity: starting opacity of every Gaussian (0.1 in the paper)
        init_scale: multiplier on the nearest-neighbour distance used as the starting std-dev

    Returns: float32 CPU tensors.
    """
    points_xyz = np.asarray(points_xyz, dtype=np.float64)
    points_rgb = np.asarray(points_rgb, dtype=np.float64)
    if points_xyz.ndim != 2 or points_xyz.shape[1] != 3 or len(points_xyz) == 0:
        raise ValueError(f"points_xyz must be a non-empty [N, 3] array, got shape {points_xyz.shape}")
    if points_rgb.shape != points_xyz.shape:
        raise ValueError(f"points_rgb has shape {points_rgb.shape} but points_xyz has {points_xyz.shape}")
    n = len(points_xyz)
    scale = nearest_neighbour_distance(points_xyz) * init_scale
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1.0
    return Gaussians(
        means=torch.as_tensor(points_xyz, dtype=torch.float32),
        quats=quats,
        scales=torch.as_tensor(np.log(scale), dtype=torch.float32)[:, None].repeat(1, 3),
        opacities=torch.full((n,), math.log(init_opacity / (1 - init_opacity))),
        sh0=rgb_to_sh0(torch.as_tensor(np.clip(points_rgb, 0, 1), dtype=torch.float32))[:, None, :],
        shN=torch.zeros(n, num_sh_rest(sh_degree), 3),
    )


def scene_scale_from_cameras(w2c: np.ndarray) -> float:
    """Radius of the camera rig around its mean centre times 1.1, the ``scene_scale`` of gsplat's
    strategies (their 3D scale thresholds are relative to it)."""
    centres = np.linalg.inv(w2c)[:, :3, 3]
    return float(np.linalg.norm(centres - centres.mean(0), axis=1).max() * 1.1)
