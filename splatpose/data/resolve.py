"""From the `dataset` config node and a class name to a validated ClassData (the pipeline's data stage).

Checks run before any work: the dataset root exists, the class is one of the dataset's classes;
each failure is a DatasetError that names what is available and the config key to set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from splatpose.data.mad_sim import ClassData, DatasetError, list_classes, load_class
from splatpose.data.photo_folder import load_photo_folder
from splatpose.errors import require_extra

KINDS = ("synthetic", "parts", "mad_sim", "custom", "folder")


def resolve_dataset(cfg_dataset: DictConfig | Mapping[str, Any], class_name: str | None) -> ClassData:
    """Load (generating first, for the generated families synthetic and parts) one class of the configured dataset.

    Args:
        cfg_dataset: the ``dataset`` node (conf/dataset/*.yaml): name, root, classes, default_class,
            and for ``synthetic`` and ``parts`` also preset and generator.
        class_name: the ``class`` value of the run config.
    Raises:
        DatasetError: unknown dataset name, missing or nonexistent root, unknown class, or any
            validation error of :func:`load_class`.
    """
    cfg = OmegaConf.to_container(cfg_dataset, resolve=True) if isinstance(cfg_dataset, DictConfig) \
        else dict(cfg_dataset)
    name = cfg.get("name")
    if name not in KINDS:
        raise DatasetError(f"dataset.name={name!r} is not a known dataset; choose one of {', '.join(KINDS)} "
                           "(dataset=synthetic|parts|mad_sim|custom|folder)")
    if name == "synthetic":
        return _resolve_synthetic(cfg, class_name)
    if name == "parts":
        return _resolve_parts(cfg, class_name)
    if name == "folder":
        return _resolve_folder(cfg, class_name)
    root = _existing_root(cfg, name)
    available = list_classes(root)
    configured = cfg.get("classes")
    if class_name is None:
        raise DatasetError(f"no class selected; set class=<name>; classes under {root}: "
                           f"{', '.join(available) if available else '(none)'}")
    if class_name not in available and (root / class_name).is_dir():
        load_class(root, class_name)  # the folder is there: its own error names what it lacks
    if class_name not in available:
        hint = ""
        if configured and class_name in configured:
            hint = f" ({class_name} is a {name} class, but its folder is missing or has no transforms.json)"
        raise DatasetError(f"unknown class {class_name!r} in {root}{hint}; classes found there: "
                           f"{', '.join(available) if available else '(none: is dataset.root the folder that holds the class folders?)'}")
    return load_class(root, class_name)


def _existing_root(cfg: dict, name: str) -> Path:
    env_hint = " or set the environment variable MAD_SIM_ROOT" if name == "mad_sim" else ""
    if not cfg.get("root"):
        raise DatasetError(f"dataset={name} needs its root folder: pass dataset.root=/path/to/dataset{env_hint}")
    root = Path(str(cfg["root"])).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder; fix dataset.root{env_hint}")
    return root


def _resolve_synthetic(cfg: dict, class_name: str | None) -> ClassData:
    # Imported here: the generator pulls in VTK, which readers of real datasets never need.
    require_extra(("pyvista", "vtk"), "dataset=synthetic (the generated dataset)")
    from splatpose.data.synthetic import ensure_synthetic_dataset
    from splatpose.data.synthetic_scene import MESHES

    classes = list(cfg.get("classes") or MESHES)
    if class_name not in classes:
        raise DatasetError(f"unknown class {class_name!r} for dataset=synthetic; its classes: "
                           f"{', '.join(classes)} (meshes that can be added to dataset.classes: "
                           f"{', '.join(MESHES)})")
    if not cfg.get("root"):
        raise DatasetError("dataset=synthetic needs dataset.root (the cache folder for generated data)")
    overrides = {k: v for k, v in (cfg.get("generator") or {}).items() if v is not None}
    root = ensure_synthetic_dataset(Path(os.path.expanduser(str(cfg["root"]))), [class_name],
                                    preset=cfg.get("preset", "small"), **overrides)
    return load_class(root, class_name)


def _resolve_parts(cfg: dict, class_name: str | None) -> ClassData:
    # Imported here: the parts generator's renderer (Mitsuba) runs only in its child process.
    require_extra(("trimesh", "shapely", "mapbox_earcut", "mitsuba"), "dataset=parts (the generated dataset)")
    from splatpose.data.parts import PARTS_CLASSES, ensure_parts_dataset

    classes = list(cfg.get("classes") or PARTS_CLASSES)
    if class_name not in classes:
        raise DatasetError(f"unknown class {class_name!r} for dataset=parts; its classes: {', '.join(classes)} "
                           f"(parts that can be added to dataset.classes: {', '.join(PARTS_CLASSES)})")
    if not cfg.get("root"):
        raise DatasetError("dataset=parts needs dataset.root (the cache folder for generated data)")
    overrides = {k: v for k, v in (cfg.get("generator") or {}).items() if v is not None}
    try:
        root = ensure_parts_dataset(Path(os.path.expanduser(str(cfg["root"]))), [class_name],
                                    preset=cfg.get("preset", "small"), **overrides)
    except ValueError as e:  # an unknown preset, setting or class: a config error, not a crash
        raise DatasetError(f"dataset=parts: {e}") from e
    return load_class(root, class_name)


def _resolve_folder(cfg: dict, class_name: str | None) -> ClassData:
    for key in ("good", "inspect"):
        if not cfg.get(key):
            raise DatasetError(f"dataset=folder needs dataset.{key}: the folder of the "
                               f"{'defect-free photos' if key == 'good' else 'photos to inspect'}")
    return load_photo_folder(Path(str(cfg["good"])), Path(str(cfg["inspect"])), class_name or "photos")
