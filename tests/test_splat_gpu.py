"""Backend agreement on a GPU: gsplat's CUDA rasterizer and the pure-torch one render the same image
(PSNR >= 40 dB) and give the same gradients (cosine >= 0.99 for means and colours).

Run on a CUDA machine with ``pytest -m gpu tests/test_splat_gpu.py``; skipped elsewhere.
"""

import pytest
import torch

from splatpose.splat.gaussians import Gaussians
from splatpose.splat.losses import psnr
from splatpose.splat.rendering import render
from scene_cameras import look_at  # tests/scene_cameras.py

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (gsplat has no CPU path)")]


def object_like_scene(n: int = 20000, seed: int = 0) -> Gaussians:
    """Small anisotropic Gaussians near a sphere's surface, mostly opaque, with SH up to degree 3."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    means = directions * (0.8 + 0.05 * torch.randn(n, 1, generator=g))
    return Gaussians(means=means, quats=torch.randn(n, 4, generator=g),
                     scales=torch.log(0.01 + 0.03 * torch.rand(n, 3, generator=g)),
                     opacities=2.0 * torch.randn(n, generator=g) + 1.0,
                     sh0=torch.randn(n, 1, 3, generator=g), shN=0.2 * torch.randn(n, 15, 3, generator=g))


def render_with_grads(scene: Gaussians, backend: str, w2c, K, size: int, target: torch.Tensor):
    params = {k: v.cuda().clone().requires_grad_(True) for k, v in scene.as_dict().items()}
    rgb = render(Gaussians.from_dict(params), w2c.cuda(), K.cuda(), size, size, backend=backend)
    (rgb - target).abs().mean().backward()  # the L1 part of the training loss
    return rgb.detach(), {k: p.grad for k, p in params.items()}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.parametrize("eye", [(3.0, 0.4, 0.8), (-1.5, 2.2, -1.0)])
def test_gsplat_and_torch_backends_agree(eye):
    size = 256
    scene = object_like_scene()
    K = torch.tensor([[300.0, 0, size / 2], [0, 300.0, size / 2], [0, 0, 1]])
    w2c = torch.tensor(look_at(eye), dtype=torch.float32)
    target = torch.rand(1, size, size, 3, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    rgb_cuda, grads_cuda = render_with_grads(scene, "gsplat", w2c, K, size, target)
    rgb_torch, grads_torch = render_with_grads(scene, "torch", w2c, K, size, target)

    assert float(psnr(rgb_torch.clamp(0, 1), rgb_cuda.clamp(0, 1))) >= 40.0
    colours = torch.cat([grads_cuda["sh0"], grads_cuda["shN"]], 1), torch.cat([grads_torch["sh0"], grads_torch["shN"]], 1)
    assert cosine(grads_cuda["means"], grads_torch["means"]) >= 0.99
    assert cosine(*colours) >= 0.99
    for name in ("opacities", "scales", "quats"):
        assert cosine(grads_cuda[name], grads_torch[name]) >= 0.95, name


def test_torch_backend_runs_on_cuda_tensors():
    scene = object_like_scene(n=500)
    K = torch.tensor([[100.0, 0, 32], [0, 100.0, 32], [0, 0, 1]])
    w2c = torch.tensor(look_at((3.0, 0.0, 0.0)), dtype=torch.float32)
    rgb = render(scene.to("cuda"), w2c.cuda(), K.cuda(), 64, 64, backend="torch")
    assert rgb.is_cuda and rgb.shape == (1, 64, 64, 3)
