"""The 3DGS PLY export: exact round trip and the standard property layout."""

import numpy as np
import pytest
import torch
from plyfile import PlyData

from splatpose.splat.gaussians import Gaussians
from splatpose.splat.ply import load_gaussians, load_ply, save_ply


def random_gaussians(n: int, sh_degree: int, seed: int = 0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    k = (sh_degree + 1) ** 2 - 1
    return Gaussians(means=torch.randn(n, 3, generator=g), quats=torch.randn(n, 4, generator=g),
                     scales=torch.randn(n, 3, generator=g), opacities=torch.randn(n, generator=g),
                     sh0=torch.randn(n, 1, 3, generator=g), shN=torch.randn(n, k, 3, generator=g))


@pytest.mark.parametrize("sh_degree", [3, 1, 0])
def test_round_trip_is_exact(tmp_path, sh_degree):
    gaussians = random_gaussians(257, sh_degree)
    path = save_ply(gaussians, tmp_path / "scene.ply")
    loaded = load_gaussians(path, "cpu")
    for name, tensor in gaussians.as_dict().items():
        assert torch.equal(getattr(loaded, name), tensor), name
    assert loaded.sh_degree == sh_degree


def test_standard_3dgs_layout(tmp_path):
    gaussians = random_gaussians(5, 3)
    path = save_ply(gaussians, tmp_path / "scene.ply")
    assert path.read_bytes().startswith(b"ply\nformat binary_little_endian 1.0\n")
    vertex = PlyData.read(str(path))["vertex"]
    names = [p.name for p in vertex.properties]
    assert names == (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
                     + [f"f_rest_{i}" for i in range(45)]
                     + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    assert all(p.val_dtype in ("f4", "float32", "<f4") for p in vertex.properties)
    # f_rest is channel-major: the 15 coefficients of red first (Inria's layout)
    assert np.allclose(vertex["f_rest_1"], gaussians.shN[:, 1, 0].numpy())
    assert np.allclose(vertex["f_rest_15"], gaussians.shN[:, 0, 1].numpy())


def test_loading_a_non_splat_ply_names_the_file(tmp_path):
    path = tmp_path / "mesh.ply"
    path.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
                    "property float z\nend_header\n0 0 0\n")
    with pytest.raises(ValueError, match="mesh.ply"):
        load_ply(path)
