"""``scorer.uncertainty`` on a GPU (tests/test_uncertainty.py runs it on the CPU only): each Gaussian's
expected score and the expected map at a new pose through gsplat on CUDA are the torch rasterizer's on the
CPU, and the detector's graphed scorer takes the expected map off as the eager scorer does."""

import numpy as np
import pytest
import torch

from splatpose.detect.cuda_graphs import GraphedScorer
from splatpose.scoring.anomaly_maps import AnomalyScorer
from splatpose.scoring.uncertainty import expected_maps, gaussian_expected_scores
from test_uncertainty import HEIGHT, WIDTH, K, camera, two_blobs  # tests/test_uncertainty.py

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_expected_scores_and_maps_through_gsplat_equal_the_cpu_rasterizers():
    gaussians = two_blobs()
    w2c = torch.stack([camera(0.0), camera(0.1)])
    maps = torch.full((2, HEIGHT, WIDTH), 0.5)
    maps[:, :, : WIDTH // 2] = 2.0  # the left blob's half scores 2, the right one's 0.5
    on_cpu = gaussian_expected_scores(gaussians, w2c, K, maps, backend="torch")
    on_gpu = gaussian_expected_scores(gaussians.to("cuda"), w2c.cuda(), K.cuda(), maps.cuda(), backend="gsplat")
    assert on_gpu.device.type == "cuda"
    np.testing.assert_allclose(on_gpu.cpu().numpy(), [2.0, 0.5], atol=0.05)
    np.testing.assert_allclose(on_gpu.cpu().numpy(), on_cpu.numpy(), atol=0.02)

    new_pose = camera(-0.05)[None]
    map_cpu = expected_maps(gaussians, on_cpu, new_pose, K, WIDTH, HEIGHT, backend="torch")[0]
    map_gpu = expected_maps(gaussians.to("cuda"), on_gpu, new_pose.cuda(), K.cuda(), WIDTH, HEIGHT,
                            backend="gsplat")[0].cpu()
    assert abs(float(map_gpu[HEIGHT // 2, 10]) - 2.0) < 0.1 and abs(float(map_gpu[HEIGHT // 2, 38]) - 0.5) < 0.1
    assert float(map_gpu[0, 0]) == 0.0, "nothing is expected where no splat covers the pixel"
    np.testing.assert_allclose(map_gpu.numpy(), map_cpu.numpy(), atol=0.05)


def test_the_graphed_scorer_takes_the_expected_map_off_as_the_eager_scorer_does():
    scorer = AnomalyScorer(backbone=None, size=32, blur_kernel_size=0, uncertainty_weight=1.0).cuda()
    generator = torch.Generator().manual_seed(0)
    query, render = (torch.rand(2, 3, 32, 32, generator=generator).cuda() for _ in range(2))
    plain = scorer(query, render)
    expected = torch.full((2, 32, 32), float(plain.mean()), device="cuda")
    graphed = GraphedScorer(scorer)
    for _ in range(2):  # capture, then replay
        maps = graphed(query, render, expected=expected)
    assert not graphed.failed and len(graphed.graphs) == 1, "the scorer fell back to eager scoring"
    torch.testing.assert_close(maps, scorer(query, render, expected=expected), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps, (plain - expected).clamp(min=0), atol=1e-5, rtol=1e-4)
    assert 0 < float((maps > 0).float().mean()) < 1, "the discount must keep some pixels and drop others"
