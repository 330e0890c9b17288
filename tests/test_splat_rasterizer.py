"""The CPU (torch) rasterizer: compositing semantics against a per-pixel loop, gradients against
finite differences, and the info that gsplat's densification strategy needs."""

import math

import numpy as np
import pytest
import torch
from gsplat.strategy import DefaultStrategy

from splatpose.splat.gaussians import Gaussians, init_gaussians
from splatpose.splat.numba_compositor import composite as numba_composite
from splatpose.splat.rendering import render, resolve_backend
from splatpose.splat.torch_rasterizer import project_gaussians, rasterize_torch, world_covariances
from scene_cameras import look_at  # tests/scene_cameras.py


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_scene(n=40, seed=0, dtype=torch.float64, sh_degree=1) -> Gaussians:
    rng = np.random.default_rng(seed)
    gaussians = init_gaussians(rng.normal(size=(n, 3)) * 0.4, rng.random((n, 3)), sh_degree=sh_degree)
    gaussians.scales[:] = torch.log(torch.as_tensor(rng.uniform(0.08, 0.25, (n, 3)), dtype=torch.float32))
    gaussians.quats[:] = torch.as_tensor(rng.normal(size=(n, 4)), dtype=torch.float32)
    gaussians.opacities[:] = torch.as_tensor(rng.uniform(-1.0, 3.0, n), dtype=torch.float32)
    gaussians.shN[:] = torch.as_tensor(rng.normal(size=gaussians.shN.shape) * 0.2, dtype=torch.float32)
    return Gaussians(**{k: v.to(dtype) for k, v in gaussians.as_dict().items()})


def tiny_camera(width=24, height=20, dtype=torch.float64):
    K = torch.tensor([[30.0, 0, width / 2], [0, 30.0, height / 2], [0, 0, 1]], dtype=dtype)
    w2c = torch.tensor(np.stack([look_at([2.5, 0.3, 0.8]), look_at([-0.4, 2.6, -0.5])]), dtype=dtype)
    return w2c, K, width, height


def reference_composite(projection, colors, width, height, background):
    """gsplat's per-pixel loop, written the slow obvious way (front to back, 1/255 skip, stop at
    T <= 1e-4 excluding the Gaussian that would cross it)."""
    n_cameras, n = projection["opacities"].shape
    image = torch.zeros(n_cameras, height, width, colors.shape[-1], dtype=colors.dtype)
    for cam in range(n_cameras):
        order = torch.argsort(projection["depths"][cam])
        for y in range(height):
            for x in range(width):
                transmittance, pixel = 1.0, torch.zeros(colors.shape[-1], dtype=colors.dtype)
                for g in order.tolist():
                    if (projection["radii"][cam, g] == 0).any():
                        continue
                    dx = projection["means2d"][cam, g, 0] - (x + 0.5)
                    dy = projection["means2d"][cam, g, 1] - (y + 0.5)
                    a, b, c = projection["conics"][cam, g]
                    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                    alpha = min(0.999, float(projection["opacities"][cam, g] * torch.exp(-sigma)))
                    if sigma < 0 or alpha < 1 / 255:
                        continue
                    if transmittance * (1 - alpha) <= 1e-4:
                        break
                    pixel += colors[cam, g] * alpha * transmittance
                    transmittance *= 1 - alpha
                image[cam, y, x] = pixel + transmittance * background
    return image


@pytest.mark.parametrize("compositor", ["torch", "numba"])
def test_compositor_matches_a_per_pixel_loop(compositor):
    gaussians = tiny_scene(n=30)
    gaussians.opacities[:5] = 8.0  # nearly opaque ones exercise the 0.999 clamp and the stop rule
    w2c, K, width, height = tiny_camera(width=16, height=12)
    Ks = K.expand(2, 3, 3)
    quats = torch.nn.functional.normalize(gaussians.quats, dim=-1)
    scales, opacities = gaussians.scales.exp(), gaussians.opacities.sigmoid()
    colors = torch.rand(2, len(gaussians), 3, dtype=torch.float64)
    background = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)

    rgb, alpha, info = rasterize_torch(gaussians.means, quats, scales, opacities, colors, w2c, Ks,
                                       width, height, backgrounds=background.expand(2, 3),
                                       compositor=numba_composite if compositor == "numba" else None)
    projection = project_gaussians(gaussians.means, quats, scales, opacities, w2c, Ks, width, height)
    expected = reference_composite(projection, colors, width, height, background)

    assert info["n_pairs"] > 0
    assert torch.allclose(rgb, expected, atol=1e-10)
    assert alpha.shape == (2, height, width, 1) and float(alpha.max()) <= 1.0


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_gradients_match_finite_differences(backend):
    gaussians = tiny_scene(n=12, seed=3)
    w2c, K, width, height = tiny_camera()
    weights = torch.rand(2, height, width, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss_of(params: dict) -> torch.Tensor:
        return (render(Gaussians.from_dict(params), w2c, K, width, height, backend=backend) * weights).sum()

    params = {k: v.clone().requires_grad_(True) for k, v in gaussians.as_dict().items()}
    loss_of(params).backward()
    step = 1e-6
    for name, param in params.items():
        flat = param.detach().reshape(-1)
        # a few entries per parameter tensor keep the test fast
        for index in torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(1))[:6]:
            shifted = {k: v.detach().clone() for k, v in params.items()}
            shifted[name].view(-1)[index] += step
            up = loss_of(shifted)
            shifted[name].view(-1)[index] -= 2 * step
            down = loss_of(shifted)
            numeric = float((up - down) / (2 * step))
            analytic = float(param.grad.reshape(-1)[index])
            assert math.isclose(analytic, numeric, rel_tol=1e-4, abs_tol=1e-6), (name, int(index), analytic, numeric)


def test_info_drives_gsplat_default_strategy():
    """Densification runs unchanged on the torch backend: a split/duplicate changes N."""
    gaussians = tiny_scene(n=30, dtype=torch.float32)
    w2c, K, width, height = tiny_camera(dtype=torch.float32)
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(v.clone()) for k, v in gaussians.as_dict().items()})
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    strategy = DefaultStrategy(refine_start_iter=0, refine_every=1, grow_grad2d=0.0, prune_opa=0.0)
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state(scene_scale=1.0)
    rgb, alpha, info = render(Gaussians.from_dict(params), w2c, K, width, height, backend="torch",
                              return_alpha=True, return_info=True)
    strategy.step_pre_backward(params, optimizers, state, 1, info)
    rgb.sum().backward()
    for optimizer in optimizers.values():
        optimizer.step()
    strategy.step_post_backward(params, optimizers, state, 1, info, packed=False)
    visible = int((info["radii"] > 0).all(-1).any(0).sum())
    assert visible > 0
    assert len(params["means"]) == 30 + visible  # every visible Gaussian duplicated or split


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_absgrad_is_the_sum_of_absolute_pixel_gradients(backend):
    gaussians = tiny_scene(n=20, dtype=torch.float64)
    gaussians.means.requires_grad_(True)
    w2c, K, width, height = tiny_camera()
    rgb, info = render(gaussians, w2c, K, width, height, backend=backend, return_info=True, absgrad=True)
    info["means2d"].retain_grad()
    (rgb * torch.randn_like(rgb)).sum().backward()
    absgrad, grad = info["means2d"].absgrad, info["means2d"].grad
    assert absgrad.shape == grad.shape
    assert bool((absgrad >= grad.abs() - 1e-12).all()) and float(absgrad.sum()) > float(grad.abs().sum())


def test_auto_backend_is_numba_on_cpu_and_gsplat_refuses_cpu():
    assert resolve_backend("auto", "cpu") == "numba"
    with pytest.raises(ValueError, match="backend=numba, torch or auto"):
        resolve_backend("gsplat", "cpu")


def test_numba_compositor_gives_the_torch_compositors_images_and_gradients_for_any_thread_count():
    """The fused CPU kernels (the CPU default) against the torch compositor on a scene with overlapping,
    partly opaque Gaussians over several 16 px tiles; and the same bits with one thread and two (each
    tile is one thread's, the per-Gaussian sums are added in a fixed order)."""
    gaussians = tiny_scene(n=400, seed=5, dtype=torch.float32)
    gaussians.opacities[:50] = 8.0
    w2c, K, width, height = tiny_camera(48, 40, dtype=torch.float32)
    weights = torch.rand(2, height, width, 3, generator=torch.Generator().manual_seed(0))

    def rendered(backend: str, threads: int):
        torch.set_num_threads(threads)
        params = {k: v.clone().requires_grad_(True) for k, v in gaussians.as_dict().items()}
        rgb, alpha = render(Gaussians.from_dict(params), w2c, K, width, height, backend=backend, return_alpha=True)
        ((rgb * weights).sum() + alpha.sum()).backward()
        return [rgb.detach(), alpha.detach()] + [params[k].grad for k in sorted(params)]

    expected, one, two = rendered("torch", 1), rendered("numba", 1), rendered("numba", 2)
    torch.set_num_threads(1)
    for name, a, b, c in zip(["rgb", "alpha"] + sorted(gaussians.as_dict()), expected, one, two):
        assert torch.equal(b, c), name
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (name, float((a - b).abs().max()))


def test_a_pose_renders_the_same_alone_and_in_a_batch():
    """The detector renders one pose at a time, the evaluation a batch of them; both must give the same
    pixels, bit for bit, so that the detector's maps equal the evaluation's."""
    gaussians = tiny_scene(n=300, dtype=torch.float32)
    w2c, K, width, height = tiny_camera(48, 40, dtype=torch.float32)
    batch_rgb, batch_alpha = render(gaussians, w2c, K, width, height, return_alpha=True)
    for c in range(len(w2c)):
        rgb, alpha = render(gaussians, w2c[c], K, width, height, return_alpha=True)
        assert torch.equal(rgb[0], batch_rgb[c]) and torch.equal(alpha[0], batch_alpha[c])
    assert batch_rgb.shape == (2, height, width, 3) and (batch_alpha > 0.5).any()


def test_given_world_covariances_render_what_quats_and_scales_render():
    """``covars`` (gsplat's argument): a caller rendering one scene many times computes them once; the
    pixels and the gradients in the pose must not change, bit for bit."""
    gaussians = tiny_scene(n=300, dtype=torch.float32)
    w2c, K, width, height = tiny_camera(48, 40, dtype=torch.float32)
    viewmats = w2c[:1].clone().requires_grad_(True)
    quats, scales = torch.nn.functional.normalize(gaussians.quats, dim=-1), torch.exp(gaussians.scales)
    args = (gaussians.means, quats, scales, torch.sigmoid(gaussians.opacities), gaussians.sh_coeffs)
    outputs = []
    for covars in (None, world_covariances(quats, scales)):
        rgb, alpha, _ = rasterize_torch(*args, viewmats, K[None], width, height, sh_degree=gaussians.sh_degree,
                                        covars=covars)
        outputs.append((rgb, alpha, torch.autograd.grad((rgb.square().sum() + alpha.sum()), viewmats)[0]))
    assert all(torch.equal(a, b) for a, b in zip(*outputs)) and outputs[0][2].abs().sum() > 0


def dense_composite(projection, colors, width, height):
    """gsplat's compositing rules on every (Gaussian, pixel) pair at once, differentiable by autograd:
    the reference for the rasterizer's hand-written backward. Returns colors [C,H,W,D], alphas [C,H,W]."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=colors.dtype) + 0.5,
                            torch.arange(width, dtype=colors.dtype) + 0.5, indexing="ij")
    images, alphas = [], []
    for cam in range(colors.shape[0]):
        order = torch.argsort(projection["depths"][cam].detach(), stable=True)
        means2d, conics = projection["means2d"][cam][order], projection["conics"][cam][order]
        opacities, visible = projection["opacities"][cam][order], (projection["radii"][cam][order] > 0).all(-1)
        dx = means2d[:, 0, None] - xs.reshape(1, -1)  # [N, H*W]
        dy = means2d[:, 1, None] - ys.reshape(1, -1)
        sigma = 0.5 * (conics[:, 0, None] * dx * dx + conics[:, 2, None] * dy * dy) + conics[:, 1, None] * dx * dy
        alpha = torch.clamp(opacities[:, None] * torch.exp(-sigma), max=0.999)
        alpha = torch.where(visible[:, None] & (sigma >= 0) & (alpha >= 1 / 255), alpha, 0.0)
        after = torch.cumprod(1.0 - alpha, dim=0)
        before = torch.cat([torch.ones_like(after[:1]), after[:-1]])
        weights = torch.where(after.detach() > 1e-4, alpha * before, 0.0)  # stop before T would reach 1e-4
        images.append((weights.t() @ colors[cam][order]).reshape(height, width, -1))
        alphas.append(weights.sum(0).reshape(height, width))
    return torch.stack(images), torch.stack(alphas)


@pytest.mark.parametrize("chunk_pairs", [64, 1 << 18])
def test_chunked_compositor_and_its_backward_match_autograd(monkeypatch, chunk_pairs):
    """The compositor's hand-written backward, over one chunk or many, against autograd through a
    dense evaluation of the same rules: images and gradients of every Gaussian parameter."""
    from splatpose.splat import torch_rasterizer

    monkeypatch.setattr(torch_rasterizer, "PAIR_CHUNK", chunk_pairs)
    gaussians = tiny_scene(n=60, seed=5)
    gaussians.opacities[:8] = 9.0  # nearly opaque ones: the stop rule and (with the large ones) the 0.999 clamp
    gaussians.scales[:3] = math.log(0.5)
    w2c, K, width, height = tiny_camera(width=22, height=18)
    Ks = K.expand(2, 3, 3)
    colors = torch.rand(2, len(gaussians), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weights = torch.randn(2, height, width, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def loss_and_grads(rasterize):
        params = [p.detach().clone().requires_grad_(True) for p in
                  (gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities, colors)]
        means, quats, scales, opacities, point_colors = params
        projection = project_gaussians(means, torch.nn.functional.normalize(quats, dim=-1), scales.exp(),
                                       opacities.sigmoid(), w2c, Ks, width, height)
        rgb, alpha = rasterize(projection, point_colors)
        loss = (rgb * weights[..., :3]).sum() + (alpha.reshape(2, height, width) * weights[..., 3]).sum()
        loss.backward()
        return rgb.detach(), [p.grad for p in params]

    def chunked(projection, point_colors):
        rgb, alpha, n_pairs = torch_rasterizer.composite(
            projection["means2d"], projection["conics"], projection["opacities"], point_colors,
            projection["depths"], projection["radii"], width, height)
        assert n_pairs > 0
        return rgb, alpha

    rgb, grads = loss_and_grads(chunked)
    expected_rgb, expected_grads = loss_and_grads(lambda p, c: dense_composite(p, c, width, height))
    assert torch.allclose(rgb, expected_rgb, atol=1e-10)
    for name, grad, expected in zip(("means", "quats", "scales", "opacities", "colors"), grads, expected_grads):
        assert float(expected.abs().max()) > 0, name
        assert torch.allclose(grad, expected, rtol=1e-7, atol=1e-9), (name, float((grad - expected).abs().max()))
    projection = project_gaussians(gaussians.means, torch.nn.functional.normalize(gaussians.quats, dim=-1),
                                   gaussians.scales.exp(), gaussians.opacities.sigmoid(), w2c, Ks, width, height)
    chunks = list(torch_rasterizer.visible_pair_chunks(
        projection["means2d"].reshape(-1, 2), projection["conics"].reshape(-1, 3),
        projection["opacities"].reshape(-1), projection["depths"].reshape(-1), projection["radii"].reshape(-1, 2),
        len(gaussians), width, height, chunk_pairs))
    assert (len(chunks) > 4) == (chunk_pairs == 64)
