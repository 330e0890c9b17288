"""What a detector needs from a finished evaluation run, read from its folder.

``python run.py`` (task=evaluate) leaves ``results.json`` in its run folder. It names the stage
folders of the stage cache (SfM reference, localization, splats, renders), the Gaussians' PLY, the
resolved config and ``map_range``: the (lo, hi) of the raw anomaly maps of the class's test set,
i.e. the fixed normalisation a detector applies to a single new image. The camera (intrinsics and
image size) and the db poses are read back from the SfM reconstruction itself, so detection needs
neither the dataset nor the stage cache: what it reads (the SfM reference and the Gaussians) is kept
in the run folder's ``artifacts/`` (:func:`keep_detector_artifacts`), which results.json names by
paths relative to the run folder. A run folder can be moved, and the cache cleared.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from splatpose.atomic_files import atomic_path
from splatpose.errors import UserError
from splatpose.sfm.reference import FEATURES_FILE, POINTS_FILE, SUMMARY_FILE, Reference
from splatpose.sfm.triangulation import w2c_from_rigid

RESULTS_FILE = "results.json"
ARTIFACTS_DIR = "artifacts"
EXPECTED_SCORES_NAME = "expected_scores.npy"
RECONSTRUCTION_DIR = "sfm"  # the COLMAP model inside an SfM stage folder
# What a detector reads of the SfM stage folder (not the matches or the COLMAP database).
SFM_ARTIFACTS = (SUMMARY_FILE, POINTS_FILE, FEATURES_FILE, RECONSTRUCTION_DIR)


class RunFolderError(UserError):
    """A run folder that a detector cannot use; the message names the file and the fix."""


@dataclass
class FinishedRun:
    """The artifacts of one finished evaluation run.

    K: [3, 3] float64 intrinsics of the run's camera (COLMAP pixel convention); width, height in px.
    db_w2c: [N, 4, 4] float64 world-to-camera (OpenCV) of the db images, in ``reference.db_names`` order.
    map_range: (lo, hi) of the evaluation's raw maps: detector maps are ``(raw - lo) / (hi - lo)``.
    sheen_allowance: the class's sheen allowance the evaluation scored with (None: none, as in runs
        made before it existed or with ``scorer.sheen`` off): the detector scores the same way.
    typical_l1: the class's usual colour difference at a settled pose, over the run's queries (None: not
        measured, as in runs without refinement or made before it was kept): the detector asks for second
        opinions against it, as the refine stage did.
    expected_scores: [N] float32, each Gaussian's expected score (``scorer.uncertainty``; None: off): the
        detector takes the map they render at a query's pose off its map, as the evaluation did.
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
    search_views: Path | None = None
    sheen_allowance: float | None = None
    typical_l1: float | None = None
    expected_scores: np.ndarray | None = None

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
    sfm_dir, ply = detector_inputs(run_dir, results)
    lo, hi = (float(v) for v in results["map_range"])
    if not hi > lo:
        raise RunFolderError(f"{results_path}: map_range = {results['map_range']} is empty (hi <= lo), so "
                             "maps cannot be normalised; the evaluation's maps were constant")
    reference, K, width, height, db_w2c = read_reference(sfm_dir)
    db_w2c = refined_db_w2c(run_dir, results, reference.db_names, db_w2c)
    return FinishedRun(run_dir=run_dir, config=OmegaConf.create(results["config"]), reference=reference,
                       gaussians_ply=ply, K=K, width=width, height=height, db_w2c=db_w2c,
                       map_range=(lo, hi), stage_dirs=stage_dirs, metrics=results.get("metrics", {}),
                       search_views=search_views_file(run_dir, results),
                       sheen_allowance=results.get("sheen_allowance"),
                       typical_l1=(results.get("final_poses") or {}).get("typical_l1"),
                       expected_scores=expected_scores(run_dir, results))


def expected_scores(run_dir: Path, results: dict) -> np.ndarray | None:
    """The Gaussians' expected scores the run kept in artifacts/ (None when it scored without
    ``scorer.uncertainty``). Raises RunFolderError when the run used them and the file is gone."""
    if not ((results["config"].get("scorer") or {}).get("uncertainty") or {}).get("enabled", False):
        return None
    relative = (results.get("artifacts") or {}).get("expected_scores")
    path = run_dir / relative if relative else None
    if path is None or not path.is_file():
        raise RunFolderError(f"{run_dir}: the run scored with scorer.uncertainty but its expected scores "
                             f"({path or 'artifacts/' + EXPECTED_SCORES_NAME}) are missing; copy the run folder "
                             "whole, or rerun the evaluation")
    return np.load(path)


def detector_inputs(run_dir: Path, results: dict) -> tuple[Path, Path]:
    """(SfM stage folder, Gaussians' PLY) of a run: its own ``artifacts/`` copies, or (runs written
    before the run folder kept them) the stage cache's folders.

    Raises:
        RunFolderError: naming the missing folder or file and the fix.
    """
    results_path = run_dir / RESULTS_FILE
    rerun = f"rerun the evaluation with the same config (class={results['config'].get('class')}) to rebuild it"
    artifacts = results.get("artifacts")
    if artifacts:
        sfm_dir, ply = run_dir / artifacts["sfm"], run_dir / artifacts["gaussians_ply"]
        for path in [ply, *(sfm_dir / name for name in SFM_ARTIFACTS)]:
            if not path.exists():
                raise RunFolderError(f"{path}: missing from the run folder (results.json lists it under "
                                     "'artifacts'); copy the run folder whole, or " + rerun)
        return sfm_dir, ply
    sfm_dir, ply = Path(results["stage_dirs"].get("sfm", "")), Path(results["gaussians_ply"])
    if not sfm_dir.is_dir():
        raise RunFolderError(f"{results_path}: the SfM stage folder {sfm_dir} does not exist (was the stage cache "
                             f"deleted? this run folder predates artifacts/ and keeps no copy); {rerun}")
    if not ply.is_file():
        raise RunFolderError(f"{results_path}: gaussians_ply = {ply} does not exist (was the stage cache "
                             f"deleted?); {rerun}")
    return sfm_dir, ply


def keep_detector_artifacts(run_dir: Path, sfm_dir: Path, ply: Path, search_views: Path | None = None,
                            reference_cameras: Path | None = None,
                            expected_scores: np.ndarray | None = None) -> dict[str, str]:
    """Put what a detector reads into ``run_dir/artifacts/``: the SfM reference (summary, points,
    features, COLMAP model), the Gaussians' PLY, the pose recovery's search views (when the run made
    them) and the refined reference cameras (when the splat training refined them: the detector then
    uses them, not the SfM model's, as the reference views' poses). Hard links where the file system
    allows (no space, no copy time; the cache writes files by rename, so a link keeps the content it
    had), else copies. With ``expected_scores`` (each Gaussian's, ``scorer.uncertainty``), they are
    written there too.

    Returns: {"sfm": ..., "gaussians_ply": ..., ["search_views": ...], ["reference_cameras": ...],
    ["expected_scores": ...]}, paths relative to ``run_dir``.
    """
    target = Path(run_dir) / ARTIFACTS_DIR
    for name in SFM_ARTIFACTS:
        _link_or_copy(Path(sfm_dir) / name, target / "sfm" / name)
    _link_or_copy(Path(ply), target / Path(ply).name)
    kept = {"sfm": f"{ARTIFACTS_DIR}/sfm", "gaussians_ply": f"{ARTIFACTS_DIR}/{Path(ply).name}"}
    if search_views is not None and Path(search_views).is_file():
        _link_or_copy(Path(search_views), target / Path(search_views).name)
        kept["search_views"] = f"{ARTIFACTS_DIR}/{Path(search_views).name}"
    if reference_cameras is not None and Path(reference_cameras).is_file():
        _link_or_copy(Path(reference_cameras), target / Path(reference_cameras).name)
        kept["reference_cameras"] = f"{ARTIFACTS_DIR}/{Path(reference_cameras).name}"
    if expected_scores is not None:
        with atomic_path(target / EXPECTED_SCORES_NAME) as tmp:
            np.save(tmp, expected_scores.astype(np.float32))
        kept["expected_scores"] = f"{ARTIFACTS_DIR}/{EXPECTED_SCORES_NAME}"
    return kept


def refined_db_w2c(run_dir: Path, results: dict, db_names: list[str], db_w2c: np.ndarray) -> np.ndarray:
    """The db images' poses [N, 4, 4] the run's splats were trained at: the refined reference cameras the
    run kept in artifacts/ (``reference_cameras.json``: names, w2c), else ``db_w2c`` (the SfM model's).

    Raises:
        RunFolderError: the file lacks a db image (it belongs to another run).
    """
    relative = (results.get("artifacts") or {}).get("reference_cameras")
    if relative is None:
        return db_w2c
    path = run_dir / relative
    content = json.loads(path.read_text())
    refined = dict(zip(content["names"], content["w2c"]))
    missing = [name for name in db_names if name not in refined]
    if missing:
        raise RunFolderError(f"{path}: no refined camera for the db images {missing[:5]}; it does not belong to "
                             "this run's SfM model, rerun the evaluation")
    return np.stack([np.asarray(refined[name], dtype=np.float64) for name in db_names])


def search_views_file(run_dir: Path, results: dict) -> Path | None:
    """The pose recovery's search views a run kept in artifacts/ (None: no query of the run needed them)."""
    artifacts = results.get("artifacts") or {}
    return run_dir / artifacts["search_views"] if "search_views" in artifacts else None


def _link_or_copy(source: Path, destination: Path) -> None:
    if source.is_dir():
        for child in source.iterdir():
            _link_or_copy(child, destination / child.name)
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.unlink(missing_ok=True)
    try:
        os.link(source, destination)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, destination)


def read_reference(sfm_dir: Path) -> tuple[Reference, np.ndarray, int, int, np.ndarray]:
    """The reference model of a finished SfM stage folder, with its camera and db poses.

    Returns: (reference, K [3, 3], width, height, db_w2c [N, 4, 4]); db images in COLMAP image-id
    order, which is the ``data.train`` order the reference was built in.
    """
    sfm_dir = Path(sfm_dir)
    for name in (SUMMARY_FILE, POINTS_FILE, FEATURES_FILE):
        if not (sfm_dir / name).is_file():
            raise RunFolderError(f"{sfm_dir / name}: missing; the SfM reference is incomplete, rerun "
                                 "the evaluation to rebuild it")
    reference = Reference(points_xyz=np.zeros((0, 3), np.float32), points_rgb=np.zeros((0, 3), np.float32),
                          reconstruction_dir=sfm_dir / RECONSTRUCTION_DIR, features_path=sfm_dir / FEATURES_FILE,
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
