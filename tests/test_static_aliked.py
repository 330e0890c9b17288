"""The detector's static ALIKED (batched heads, device constants, CUDA graph on a GPU) gives the
features of ALIKED's own forward pass (AlikedExtractor), which the SfM reference was built with."""

import numpy as np
import pytest
import torch

from splatpose.detect.static_aliked import GraphedAliked
from splatpose.sfm.config import compose_sfm_config
from splatpose.sfm.features import build_extractor


def textured_images(count: int = 2, height: int = 200, width: int = 232) -> torch.Tensor:
    """Smooth random textures on a white frame (blank background, as the objects): [B, 3, H, W]."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(count, 3, height // 8, width // 8, generator=generator)
    images = torch.nn.functional.interpolate(noise, size=(height, width), mode="bicubic", align_corners=False)
    images = images.clamp(0, 1)
    images[..., :30, :] = 1.0
    return images


def assert_same_features(expected: list, actual: list, atol: float):
    for want, got in zip(expected, actual, strict=True):
        assert len(want["keypoints"]) > 50
        assert got["keypoints"].shape == want["keypoints"].shape
        np.testing.assert_allclose(got["keypoints"], want["keypoints"], atol=atol)
        np.testing.assert_allclose(got["scores"], want["scores"], atol=atol)
        np.testing.assert_allclose(got["descriptors"], want["descriptors"], atol=atol)


def test_static_aliked_gives_alikeds_own_features():
    cfg = compose_sfm_config("aliked", "lightglue", "global")
    extractor = build_extractor(cfg.feature, 256, "cpu")
    images = textured_images()  # 232 px wide: padded to 256 inside, keypoints in the padding dropped
    static = GraphedAliked(extractor)
    assert static.path == "static eager"
    assert_same_features(extractor(images), static(images), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_static_aliked_cuda_graph_gives_alikeds_own_features():
    cfg = compose_sfm_config("aliked", "lightglue", "global")
    extractor = build_extractor(cfg.feature, 512, "cuda")
    images = textured_images().cuda()
    static = GraphedAliked(extractor)
    for _ in range(2):  # capture, then replay
        features = static(images)
    assert static.path == "static+cuda_graph" and len(static.graphs) == 1
    assert_same_features(extractor(images), features, atol=2e-3)
