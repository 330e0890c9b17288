"""The detector's static ALIKED (batched heads, device constants, CUDA graph on a GPU) gives the
features of ALIKED's own forward pass (AlikedExtractor), which the SfM reference was built with."""

import numpy as np
import pytest
import torch

from splatpose.detect.static_aliked import GraphedAliked, same_features
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
    # its network has the BatchNorms folded into the convolutions; ALIKED's own keeps them
    batch_norms = lambda model: sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # noqa: E731
    assert batch_norms(static.model) == 0 and batch_norms(extractor.model) == 8
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
    # the first replay passed the check against ALIKED's own forward (or the path would say otherwise)
    assert static.path == "static+cuda_graph" and len(static.graphs) == 1
    expected = extractor(images)
    assert all(len(f["keypoints"]) > 50 for f in expected)
    # TF32 convolutions with the batch norms folded: a keypoint at the detection threshold may come or go
    assert same_features(expected, features, atol=2e-3)


def test_the_check_tolerates_threshold_keypoints_but_not_a_wrong_path():
    """``same_features`` (the first-shape check of the graphed ALIKED) accepts a keypoint or two that
    rounding pushes across the detection threshold, and rejects what a broken fast path gives."""
    rng = np.random.default_rng(0)
    keypoints = rng.uniform(0, 600, (500, 2)).astype(np.float32)
    descriptors = rng.normal(size=(500, 128)).astype(np.float32)
    scores = rng.uniform(0.2, 1, 500).astype(np.float32)
    expected = [{"keypoints": keypoints, "descriptors": descriptors, "scores": scores}]

    def changed(keep=slice(None), shift=0.0, noise=0.0):
        order = rng.permutation(500)[keep]  # kept keypoints in another order
        return [{"keypoints": keypoints[order] + shift, "descriptors": descriptors[order] + noise,
                 "scores": scores[order] + noise}]

    assert same_features(expected, changed(noise=1e-4))
    assert same_features(expected, changed(keep=slice(2, None)))  # two keypoints fell below the threshold
    assert not same_features(expected, changed(keep=slice(50, None)))  # 10 % lost
    assert not same_features(expected, changed(shift=0.5))  # keypoints moved
    assert not same_features(expected, changed(noise=0.1))  # other descriptors
