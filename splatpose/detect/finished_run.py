"""What a detector needs from a finished evaluation run, read from its folder.

``python run.py`` (task=evaluate) leaves ``results.json`` in its run folder. It names the stage
folders of the stage cache (SfM reference, localization, splats, renders), the Gaussians' PLY, the
resolved config and ``map_range``: the (lo, hi) of the raw anomaly maps of the class's test set,
i.e. the fixed normalisation a detector applies to a single new image. The camera (intrinsics and
image size) and the db poses are read back from the SfM reconstruction itself, so detection needs
only the run folder and its stage folders, not the dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from splatpose.sfm.reference import FEATURES_FILE, POINTS_FILE, SUMMARY_FILE, Reference
from splatpose.sfm.triangulation import w2c_from_rigid

RESULTS_FILE = "results.json"


class RunFolderError(ValueError):
    """A run folder that a detector cannot use; the message names the file and the fix."""


@dataclass
class FinishedRun:
    """The artifacts of one finished evaluation run.

    K: [3, 3] float64 intrinsics of the run's camera (COLMAP pixel convention); width, height in px.
    db_w2c: [N, 4, 4] float64 world-to-camera (OpenCV) of the db images, in ``reference.db_names`` order.
    map_range: (lo, hi) of the evaluation's raw maps: detector maps are ``(raw - lo) / (hi - lo)``.
    config: the run's resolved config (``sfm``, ``scorer``, ``splat``, ``dataset`` ... nodes).
    """

    run_dir: Path
    config: DictConfig
    reference: Reference
    gaussians_ply: Path
    K: np.ndarray
    width: int
    height: int
    db_w2c: np.ndarray
    map_range: tuple[float, float]
    stage_dirs: dict[str, Path]
    metrics: dict

    @property
    def class_name(self) -> str:
        return str(self.config["class"])


def load_finished_run(run_dir: Path | str) -> FinishedRun:
    """Read ``run_dir/results.json`` and the SfM reference it points to.

    Raises:
        RunFolderError: no results.json (not a finished run), a missing field, or a stage folder
            that has been deleted since (with the command that rebuilds it).
    """
    run_dir = Path(run_dir).expanduser()
    results_path = run_dir / RESULTS_FILE
    if not results_path.is_file():
        raise RunFolderError(f"{results_path}: not found; run_dir must be the folder of a finished "
                             "evaluation run (`python run.py ...` prints it as 'Outputs: <folder>')")
    try:
        results = json.loads(results_path.read_text())
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{results_path}: not valid JSON ({error}); rerun the evaluation") from error
    for key in ("config", "map_range", "stage_dirs", "gaussians_ply"):
        if key not in results:
            raise RunFolderError(f"{results_path}: field '{key}' is missing; it was written by an older "
                                 "pipeline, rerun the evaluation (`python run.py ...`) to refresh it")
    stage_dirs = {name: Path(path) for name, path in results["stage_dirs"].items()}
    rerun = f"rerun the evaluation with the same config (class={results['config'].get('class')}) to rebuild it"
    for name in ("sfm",):
        if name not in stage_dirs or not stage_dirs[name].is_dir():
            raise RunFolderError(f"{results_path}: stage_dirs.{name} = {stage_dirs.get(name)} does not exist "
                                 f"(was the stage cache deleted?); {rerun}")
    ply = Path(results["gaussians_ply"])
    if not ply.is_file():
        raise RunFolderError(f"{results_path}: gaussians_ply = {ply} does not exist; {rerun}")
    lo, hi = (float(v) for v in results["map_range"])
    if not hi > lo:
        raise RunFolderError(f"{results_path}: map_range = {results['map_range']} is empty (hi <= lo), so "
                             "maps cannot be normalised; the evaluation's maps were constant")
    reference, K, width, height, db_w2c = read_reference(stage_dirs["sfm"])
    return FinishedRun(run_dir=run_dir, config=OmegaConf.create(results["config"]), reference=reference,
                       gaussians_ply=ply, K=K, width=width, height=height, db_w2c=db_w2c,
                       map_range=(lo, hi), stage_dirs=stage_dirs, metrics=results.get("metrics", {}))


def read_reference(sfm_dir: Path) -> tuple[Reference, np.ndarray, int, int, np.ndarray]:
    """The reference model of a finished SfM stage folder, with its camera and db poses.

    Returns: (reference, K [3, 3], width, height, db_w2c [N, 4, 4]); db images in COLMAP image-id
    order, which is the ``data.train`` order the reference was built in.
    """
    sfm_dir = Path(sfm_dir)
    for name in (SUMMARY_FILE, POINTS_FILE, FEATURES_FILE):
        if not (sfm_dir / name).is_file():
            raise RunFolderError(f"{sfm_dir / name}: missing; the SfM stage folder is incomplete, rerun "
                                 "the evaluation to rebuild it")
    reference = Reference(points_xyz=np.zeros((0, 3), np.float32), points_rgb=np.zeros((0, 3), np.float32),
                          reconstruction_dir=sfm_dir / "sfm", features_path=sfm_dir / FEATURES_FILE,
                          pairs_path=sfm_dir / "pairs-db.txt", matches_path=sfm_dir / "matches.h5",
                          db_names=[], image_root=sfm_dir,
                          summary=json.loads((sfm_dir / SUMMARY_FILE).read_text()))
    reconstruction = reference.load_reconstruction()
    images = sorted(reconstruction.images.values(), key=lambda image: image.image_id)
    reference.db_names = [image.name for image in images]
    points = np.load(sfm_dir / POINTS_FILE)
    reference.points_xyz, reference.points_rgb = points["xyz"], points["rgb"]
    camera = reconstruction.cameras[images[0].camera_id]
    fx, fy, cx, cy = (float(v) for v in camera.params[:4])
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    db_w2c = np.stack([w2c_from_rigid(image.cam_from_world()) for image in images])
    return reference, K, int(camera.width), int(camera.height), db_w2c
