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
    assert_same_features(extractor(images), static(images), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_static_aliked_cuda_graph_gives_alikeds_own_features():
    """One graph of the whole network (deformable convolutions from grid_sample) passes the first-shape
    check and gives ALIKED's features; the order of near-equal peaks may differ (see same_features)."""
    cfg = compose_sfm_config("aliked", "lightglue", "global")
    extractor = build_extractor(cfg.feature, 512, "cuda")
    images = textured_images().cuda()
    static = GraphedAliked(extractor)
    for _ in range(2):  # capture, then replay
        features = static(images)
    assert static.path == "static+cuda_graph" and len(static.graphs) == 1
    expected = extractor(images)
    assert all(len(f["keypoints"]) > 50 for f in expected)
    assert same_features(expected, features, atol=2e-3)


def test_feature_check_tolerates_reordering_but_not_real_differences():
    rng = np.random.default_rng(0)
    keypoints = rng.uniform(0, 200, (300, 2)).astype(np.float32)
    descriptors = rng.normal(size=(300, 128)).astype(np.float32)
    scores = rng.uniform(0.2, 1, 300).astype(np.float32)
    features = {"keypoints": keypoints, "descriptors": descriptors, "scores": scores}
    order = rng.permutation(300)[:-1]  # reordered, one keypoint fewer (moved across the top-k cut)
    reordered = {key: value[order] + 1e-5 for key, value in features.items()}
    assert same_features([features], [reordered])
    shifted = dict(reordered, scores=reordered["scores"] + 0.045)  # every score moved (e.g. folded batch norms)
    assert not same_features([features], [shifted])
    few_lost = {key: value[:295] for key, value in features.items()}  # 5 lost, as a batch of 8 on an H100 can
    assert same_features([features], [few_lost])
    fewer = {key: value[:280] for key, value in features.items()}  # 20 keypoints lost
    assert not same_features([features], [fewer])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_sampled_deformable_convolution_equals_torchvisions(device):
    """The capturable deformable convolution (grid_sample + matmul) computes torchvision's deform_conv2d,
    on ALIKED's own blocks with offsets large enough to sample between pixels and outside the map."""
    from splatpose.detect.static_aliked import deformable_resblock, encode_fine, sampled_deform_conv

    cfg = compose_sfm_config("aliked", "lightglue", "global")
    model = build_extractor(cfg.feature, 256, device).model
    images = textured_images(1, 256, 256).to(device)
    # float rounding: the sampling positions differ in the last bits (grid_sample's normalised coordinates),
    # and on a GPU the block's other convolutions run in TF32
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if device == "cpu" else {"atol": 1e-3, "rtol": 1e-3}
    with torch.inference_mode():
        _, _, x3_input = encode_fine(model, images)
        for conv in (model.block3.conv1, model.block3.conv2):
            x = x3_input if conv is model.block3.conv1 else torch.randn(1, 64, 32, 32, device=device)
            expected = conv(x)
            actual = sampled_deform_conv(conv, x)
            assert expected.abs().max() > 0.1
            torch.testing.assert_close(actual, expected, **tolerance)
        # offsets far outside the map: torchvision samples zeros there, and so must grid_sample
        conv = model.block3.conv1
        big = torch.nn.Conv2d(32, 18, 3, padding=1).to(device)
        torch.nn.init.normal_(big.weight, std=2.0)
        original, conv.offset_conv = conv.offset_conv, big
        try:
            torch.testing.assert_close(sampled_deform_conv(conv, x3_input), conv(x3_input), **tolerance)
        finally:
            conv.offset_conv = original
        torch.testing.assert_close(deformable_resblock(model.block3, x3_input), model.block3(x3_input), **tolerance)
