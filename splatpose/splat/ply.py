"""Gaussians to and from the standard 3DGS PLY layout (Inria's; read by common splat viewers).

One binary little-endian ``vertex`` element with float32 properties, in this order::

    x y z  nx ny nz  f_dc_0..2  f_rest_0..(3K-1)  opacity  scale_0..2  rot_0..3

``f_dc`` is the degree-0 SH coefficient per channel, ``f_rest`` the higher ones stored channel-major
(all K coefficients of red, then green, then blue: 45 values for degree 3), ``opacity`` the logit,
``scale`` the log standard deviations, ``rot`` the quaternion (w, x, y, z). Normals are zero (unused).
Values are written as they are stored in :class:`Gaussians`, so a round trip is exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement

from splatpose.atomic_files import atomic_path
from splatpose.splat.gaussians import Gaussians


def ply_property_names(num_rest: int) -> list[str]:
    """Property names in file order for K = ``num_rest`` higher SH coefficients per channel."""
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(3 * num_rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def save_ply(gaussians: Gaussians, path: Path) -> Path:
    """Write ``gaussians`` to ``path`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    g = {k: v.detach().float().cpu().numpy() for k, v in gaussians.as_dict().items()}
    n, num_rest = len(gaussians), g["shN"].shape[1]
    columns = np.concatenate([
        g["means"], np.zeros((n, 3), np.float32), g["sh0"][:, 0, :],
        g["shN"].transpose(0, 2, 1).reshape(n, 3 * num_rest),
        g["opacities"][:, None], g["scales"], g["quats"],
    ], axis=1)
    names = ply_property_names(num_rest)
    vertices = np.empty(n, dtype=[(name, "<f4") for name in names])
    for i, name in enumerate(names):
        vertices[name] = columns[:, i]
    with atomic_path(path) as tmp:
        PlyData([PlyElement.describe(vertices, "vertex")], byte_order="<").write(str(tmp))
    return path


def load_ply(path: Path) -> Gaussians:
    """Read a 3DGS PLY (the layout above, any SH degree) into float32 CPU tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Gaussian splat PLY; train the splats first (train_splats)")
    vertex = PlyData.read(str(path))["vertex"]
    names = [p.name for p in vertex.properties]
    num_rest = sum(name.startswith("f_rest_") for name in names)
    if num_rest % 3:
        raise ValueError(f"{path}: {num_rest} f_rest_* properties is not a multiple of 3; not a 3DGS PLY")
    missing = [name for name in ply_property_names(num_rest // 3) if name not in names and name[0] != "n"]
    if missing:
        raise ValueError(f"{path}: not a 3DGS PLY, the vertex element lacks {missing[:6]}")

    def stack(*keys: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(vertex[k], dtype=np.float32) for k in keys], axis=1))

    n, k = len(vertex["x"]), num_rest // 3
    return Gaussians(
        means=stack("x", "y", "z"),
        quats=stack("rot_0", "rot_1", "rot_2", "rot_3"),
        scales=stack("scale_0", "scale_1", "scale_2"),
        opacities=stack("opacity")[:, 0].contiguous(),
        sh0=stack("f_dc_0", "f_dc_1", "f_dc_2")[:, None, :].contiguous(),
        shN=(stack(*[f"f_rest_{i}" for i in range(num_rest)]).reshape(n, 3, k).transpose(1, 2).contiguous()
             if k else torch.zeros(n, 0, 3)),
    )


def load_gaussians(ply: Path, device: str | torch.device = "cpu") -> Gaussians:
    """The scene of a 3DGS PLY on ``device`` (the pipeline's entry point for rendering)."""
    return load_ply(ply).to(device)
