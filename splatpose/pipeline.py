"""The evaluation pipeline of one class, stage by stage, with the stage cache.

    data ─► sfm (reference model) ─► localize (query poses) ─► splat (3DGS) ─► refine (poses through
    the splats) ─► render ─► score + evaluate

Each stage is a plain function of its package (``splatpose.data``, ``.sfm``, ``.splat``,
``.scoring``); this module only wires them, decides what is reused from the cache, times every stage
and writes the run's ``results.json``, ``per_image.csv`` and ``report.html``. ``run_pipeline(cfg)`` is what
``run.py`` calls, and what the tests call on a shrunk config.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Iterator

import hydra
import numpy as np
import torch
from lightning import seed_everything
from lightning.pytorch import Trainer
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from splatpose.atomic_files import atomic_path, write_json_atomic
from splatpose.callbacks.evaluation import Evaluation, flatten_metrics
from splatpose.config_checks import ConfigError, check_run_config
from splatpose.data import resolve_dataset
from splatpose.data.cameras import camera_center, center_error, rotation_error_deg
from splatpose.data.mad_sim import ClassData, read_image, read_mask
from splatpose.detect.finished_run import keep_detector_artifacts
from splatpose.refine.queries import (POSE_PATHS, SEARCH_VIEWS_FILE, RefinedPose, refine_query_poses,
                                      typical_colour_difference)
from splatpose.report import CURVES_NAME, compute_curves, save_curves, write_run_report
from splatpose.run_info import environment_info
from splatpose.scoring.anomaly_maps import build_scorer
from splatpose.scoring.module import AnomalyScoringModule, QueryRenderPairs
from splatpose.scoring.sheen import SheenSettings, sheen_allowance
from splatpose.scoring.uncertainty import expected_maps, gaussian_expected_scores, upsampled
from splatpose.sfm import QueryPose, Reference, build_reference, check_sfm_config, localize_queries, reference_settings
from splatpose.sfm.config import sfm_settings
from splatpose.sfm.estimated_poses import posed_class_data, resolve_reference_poses
from splatpose.sfm.frame_alignment import FrameAlignment, align_to_true_poses
from splatpose.splat.camera_refinement import resolve_camera_refinement
from splatpose.splat.ply import load_gaussians
from splatpose.splat.rendering import render
from splatpose.splat.train import CAMERAS_NAME as SPLAT_CAMERAS_NAME, METRICS_NAME as SPLAT_METRICS_NAME
from splatpose.splat.train import evaluation_view_ids, load_posed_views, read_refined_cameras, train_splats
from splatpose.stage_cache import StageCache, stage_key

log = logging.getLogger(__name__)

RENDER_BATCH = 8


class StageFailed(RuntimeError):
    """A pipeline stage failed; the message names the stage and the class it ran on."""


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} was asked for but CUDA is not available; use device=cpu or auto")
    return device


def validate_config(cfg: DictConfig) -> None:
    """Checks that need no data, run before any work: the values (``check_run_config``: steps, sizes,
    rates, weights files) and the feature/matcher pairing.

    Raises:
        ConfigError: naming the setting and the fix.
    """
    check_run_config(cfg)
    try:
        check_sfm_config(cfg.sfm)
    except ValueError as error:
        raise ConfigError(str(error)) from None


class StageTimer:
    """Collects per-stage wall times and whether each stage came from the cache."""

    def __init__(self) -> None:
        self.stages: dict[str, dict] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, subject: str) -> Iterator[dict]:
        record = {"seconds": 0.0, "reused": False}
        start = time.perf_counter()
        try:
            yield record
        except Exception as error:
            raise StageFailed(f"stage '{name}' failed for {subject}: {type(error).__name__}: {error}") from error
        finally:
            record["seconds"] = round(time.perf_counter() - start, 3)
            self.stages[name] = record
        log.info("[%s] %s in %.1f s", name, "reused" if record["reused"] else "done", record["seconds"])


def run_pipeline(cfg: DictConfig, loggers: list | None = None, data: ClassData | None = None) -> dict:
    """Run every stage for ``cfg["class"]`` and return the results written to results.json.

    Args:
        cfg: the composed config (conf/config.yaml)
        loggers: Lightning loggers shared by training and evaluation (built by run.py from cfg.logger)
        data: the class as ``run.py``'s preflight loaded and checked it (None: the data stage loads it)
    """
    loggers = loggers or []
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    validate_config(cfg)
    seed_everything(cfg.seed, workers=True, verbose=False)
    device = resolve_device(cfg.device)
    class_name = str(cfg["class"])
    subject = f"{cfg.dataset.name}/{class_name}"
    cache = StageCache(cfg.paths.cache_dir, enabled=cfg.use_cache, device=torch.device(device).type,
                       threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability())
    timer = StageTimer()
    total_start = time.perf_counter()

    with timer("data", subject):
        data = data if data is not None else resolve_dataset(cfg.dataset, class_name)
    log.info("Class %s: %d train views, %d test images (%dx%d) from %s", class_name, len(data.train),
             len(data.test), data.width, data.height, data.root)
    data_key = stage_key("data", {"dataset": dataset_identity(cfg.dataset), "class": class_name,
                                  "files": data.fingerprint()})

    # The reference model depends on features, matcher and db pairs, not on query retrieval/PnP.
    sfm_cfg = resolve_reference_poses(cfg.sfm, data)
    with timer("sfm", subject) as record, cache.stage("sfm", without_unused_masks(reference_settings(sfm_cfg), data),
                                                       (data_key,)) as st:
        record["reused"] = st.reused
        reference = build_reference(data, sfm_cfg, st.dir, device)
        st.summary = {"num_points": int(len(reference.points_xyz))}
    log.info("SfM reference: %d points (%s)", len(reference.points_xyz), st.dir)
    # Downstream stages work in the reference's frame, at its cameras (estimated ones included);
    # pose errors are measured in the true frame (``truth``), through ``alignment`` for estimated cameras.
    posed, truth, alignment = reference_frames(data, reference, sfm_cfg)
    cameras = reference_cameras_summary(data, posed, reference, alignment)

    with timer("localize", subject) as record, cache.stage("localize", without_unused_masks(sfm_settings(sfm_cfg), data),
                                                            (st.key,)) as loc:
        record["reused"] = loc.reused
        poses = localize_queries(posed, sfm_cfg, reference, loc.dir, device)
    localization = localization_summary(truth, [in_true_frame(pose, alignment) for pose in poses])
    log.info("Localized %d/%d queries", localization["num_localized"], len(poses))

    # Estimated cameras are refined with the splats (splat.camera_opt); from here on every stage works at
    # the refined cameras, in the splats' frame.
    splat_cfg = resolve_camera_refinement(cfg.splat, sfm_cfg.reference_poses)
    with timer("splat", subject) as record, cache.stage("splat", splat_settings(splat_cfg, posed, cfg.seed),
                                                         (data_key, st.key)) as sp:
        record["reused"] = sp.reused
        ply = train_splats(posed, reference.points_xyz, reference.points_rgb, splat_cfg, sp.dir,
                           trainer_kwargs=splat_trainer_kwargs(cfg, loggers))
    log.info("Gaussians: %s", ply)
    posed, alignment = refined_reference_frame(data, posed, sp.dir, alignment, cameras)

    backend = cfg.splat.get("backend", "auto")
    refine_settings = {"refine": cfg.refine, "backend": backend,
                       "scorer": cfg.scorer if cfg.refine.get("loss") == "feature" else None}
    with timer("refine", subject) as record, cache.stage("refine", refine_settings, (sp.key, loc.key)) as rf:
        record["reused"] = rf.reused
        scorer = build_scorer(cfg.scorer, device) if cfg.refine.get("loss") == "feature" else None
        refined = refine_query_poses(posed, poses, cfg.refine, ply, rf.dir, device, backend=backend, scorer=scorer)
    final_poses = final_pose_summary(truth, [in_true_frame(pose, alignment) for pose in refined])
    paths = final_poses["paths"]
    log.info("Final poses: %d by PnP, %d recovered, %d failed", paths["pnp"], paths["recovered"], paths["failed"])

    with timer("render", subject) as record, cache.stage("render", {"backend": backend}, (sp.key, rf.key)) as rd:
        record["reused"] = rd.reused
        renders, alphas = render_pseudo_references(posed, refined, ply, rd.dir / "renders.npz", device,
                                                   backend=backend)

    with timer("score", subject):
        allowance = class_sheen_allowance(cfg, posed, ply, device, backend)
        expected_scores, expected = class_expected_maps(cfg, posed, refined, ply, device, backend, allowance)
        evaluation = score_and_evaluate(cfg, data, renders, loggers, device, alphas=alphas,
                                        sheen_allowance=allowance, expected=expected)
    if not any(t.mask_path for t in data.test):
        log.warning("%s has no ground-truth masks: pixel AUROC, AUPRO and image AUROC need masks (and defect "
                    "labels), so they are undefined; the anomaly maps and scores are in %s (per_image.csv, "
                    "panels/)", subject, out_dir)

    results = {
        "status": "ok", "dataset": cfg.dataset.name, "class": class_name, "device": device,
        "metrics": evaluation.metrics,
        "map_range": list(evaluation.map_range),
        "sheen_allowance": allowance,
        "reference_cameras": cameras,
        "localization": localization,
        "final_poses": final_poses,
        "splat": splat_summary(ply),
        "timings": {**timer.stages, "total": {"seconds": round(time.perf_counter() - total_start, 3)}},
        "stage_dirs": {"sfm": str(st.dir), "localize": str(loc.dir), "splat": str(sp.dir),
                       "refine": str(rf.dir), "render": str(rd.dir)},
        "gaussians_ply": str(ply),
        "artifacts": keep_detector_artifacts(out_dir, st.dir, ply, rf.dir / SEARCH_VIEWS_FILE,
                                             sp.dir / SPLAT_CAMERAS_NAME, expected_scores),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "environment": environment_info(device),
    }
    write_json_atomic(out_dir / "results.json", results)
    write_per_image_csv(out_dir / "per_image.csv", evaluation, localization, final_poses)
    write_report(out_dir, evaluation)
    log_run_summary(loggers, results)
    return results


def write_report(out_dir: Path, evaluation: Evaluation) -> Path | None:
    """The run's report.html (``splatpose.report``), with the ROC/PRO curves computed from the maps in
    memory (and kept in curves.npz for a later rewrite). A report that fails is logged, not raised: the
    run's results are written by then and ``python -m splatpose.report <run_dir>`` can retry."""
    start = time.perf_counter()
    try:
        curves = compute_curves(evaluation.maps, evaluation.masks, evaluation.defects, evaluation.scores)
        save_curves(out_dir / CURVES_NAME, curves)
        path = write_run_report(out_dir, curves)
    except Exception as error:  # noqa: BLE001 - the report must never cost a finished run
        log.warning("The HTML report failed (%s: %s); `python -m splatpose.report %s` retries it",
                    type(error).__name__, error, out_dir)
        return None
    log.info("Report: %s (written in %.1f s)", path, time.perf_counter() - start)
    return path


def dataset_identity(cfg_dataset: DictConfig) -> dict:
    """The dataset settings that decide a class's data: not the list of classes a run may choose from
    (adding a class to ``dataset.classes`` must not invalidate the caches of the others), nor the folder
    it lives in (``root``, and dataset=folder's ``good`` and ``inspect``): the data key holds the files'
    content, so the same files in another checkout, cache or machine give the same keys, seeds and results."""
    return {k: v for k, v in OmegaConf.to_container(cfg_dataset, resolve=True).items()
            if k not in ("classes", "default_class", "root", "good", "inspect")}


def without_unused_masks(settings: dict, data: ClassData) -> dict:
    """A stage's settings without ``object_masks`` for a class that ships no reference masks: there the
    switch changes nothing, so it must not change the stage's key."""
    if data.has_reference_masks:
        return settings
    return {k: v for k, v in settings.items() if k != "object_masks"}


def splat_settings(cfg_splat: DictConfig, data: ClassData, seed: int) -> dict:
    """What decides the splat stage: the splat config (``object_masks`` only with reference masks) and the seed."""
    return {"splat": without_unused_masks(OmegaConf.to_container(cfg_splat, resolve=True), data), "seed": seed}


def splat_trainer_kwargs(cfg: DictConfig, loggers: list) -> dict:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs["logger"] = loggers or False
    return kwargs


def reference_frames(data: ClassData, reference: Reference, sfm_cfg: DictConfig
                     ) -> tuple[ClassData, ClassData, FrameAlignment | None]:
    """The class as the downstream stages see it, the class the pose errors are measured against, and
    the similarity between their frames.

    Known poses: ``data`` for both, no alignment. Estimated cameras: the class at the reference's
    cameras (registered views only, SfM frame; :func:`posed_class_data`), and, when the class has true
    poses, ``data`` with the alignment of the estimated reference cameras to the true ones (the query
    poses are mapped into the true frame through it); without true reference poses nothing is
    compared (``truth`` has no test poses).
    """
    if sfm_cfg.reference_poses == "known":
        return data, data, None
    reconstruction = reference.load_reconstruction()
    posed = posed_class_data(data, reconstruction)
    if not data.poses_known:
        return posed, dataclasses.replace(data, test_poses=None), None
    true_w2c = {view.name: view.w2c for view in data.train}
    alignment = align_to_true_poses([v.name for v in posed.train], posed.train_w2c,
                                    np.stack([true_w2c[v.name] for v in posed.train]))
    if alignment is None:
        log.warning("The estimated reference cameras could not be aligned to the true ones: no pose errors")
        return posed, dataclasses.replace(data, test_poses=None), None
    return posed, data, alignment


def refined_reference_frame(data: ClassData, posed: ClassData, splat_dir: Path, alignment: FrameAlignment | None,
                            cameras: dict) -> tuple[ClassData, FrameAlignment | None]:
    """The class at the cameras the splats were trained at, and its alignment to the true frame.

    Without camera refinement (no ``reference_cameras.json`` in ``splat_dir``): ``posed`` and ``alignment``
    unchanged. With it: ``posed`` with every train view at its refined camera, and, when the true poses
    are known, the refined cameras aligned to the true ones afresh; ``cameras`` (results.json
    ``reference_cameras``) gains ``refined_alignment`` (the same numbers as ``alignment``, after the
    refinement) and ``camera_refinement`` (how far the corrections moved the cameras).
    """
    refined = read_refined_cameras(splat_dir)
    if refined is None:
        return posed, alignment
    missing = [view.name for view in posed.train if view.name not in refined]
    if missing:
        raise ValueError(f"{Path(splat_dir) / SPLAT_CAMERAS_NAME}: no refined camera for {missing}; delete "
                         f"the splat stage folder {splat_dir} to retrain it")
    posed = dataclasses.replace(posed, train=[dataclasses.replace(view, w2c=refined[view.name])
                                              for view in posed.train])
    metrics = json.loads((Path(splat_dir) / SPLAT_METRICS_NAME).read_text())
    cameras["camera_refinement"] = {**metrics.get("camera_refinement", {}),
                                    "holdout_psnr_at_aligned_cameras": metrics.get("psnr_aligned")}
    if alignment is None:
        return posed, None
    true_w2c = {view.name: view.w2c for view in data.train}
    refined_alignment = align_to_true_poses([v.name for v in posed.train], posed.train_w2c,
                                            np.stack([true_w2c[v.name] for v in posed.train]))
    if refined_alignment is None:
        log.warning("The refined reference cameras could not be aligned to the true ones: no pose errors")
        return posed, None
    cameras["refined_alignment"] = refined_alignment.summary()
    log.info("Refined cameras vs true: alignment residual %.4f (median centre error / scene radius), %.3f deg "
             "(before the refinement %.4f, %.3f deg)", cameras["refined_alignment"]["median_center_error_rel"],
             cameras["refined_alignment"]["median_rotation_error_deg"],
             cameras["alignment"]["median_center_error_rel"], cameras["alignment"]["median_rotation_error_deg"])
    return posed, refined_alignment


def in_true_frame(pose, alignment: FrameAlignment | None):
    """A QueryPose or RefinedPose with its w2c (and a pose replaced by a near-symmetric turn or a second
    opinion) mapped into the true frame (unchanged without alignment)."""
    if alignment is None:
        return pose
    changes = {"w2c": alignment.w2c_in_true_frame(pose.w2c)}
    for step in ("symmetry", "second_opinion"):
        record = getattr(pose, step, None)
        if record and "replaced_w2c" in record:
            replaced = alignment.w2c_in_true_frame(np.asarray(record["replaced_w2c"]))
            changes[step] = {**record, "replaced_w2c": np.asarray(replaced).tolist()}
    return dataclasses.replace(pose, **changes)


def reference_cameras_summary(data: ClassData, posed: ClassData, reference: Reference,
                              alignment: FrameAlignment | None) -> dict:
    """How the reference cameras were found (results.json ``reference_cameras``): known or estimated,
    views registered, the focal length (px) and, against true cameras, its error (%) and the
    alignment of the estimated cameras to the true ones (scale, residuals relative to the scene radius)."""
    summary = dict(reference.summary.get("cameras") or {"reference_poses": "known"})
    summary["focal_px"] = float(posed.K[0, 0])
    if data.K is not None:
        summary["true_focal_px"] = float(data.K[0, 0])
        summary["focal_error_pct"] = float(100.0 * (posed.K[0, 0] - data.K[0, 0]) / data.K[0, 0])
    if alignment is not None:
        summary["alignment"] = alignment.summary()
        log.info("Estimated cameras vs true: %d/%d registered, focal error %.2f %%, alignment residual %.4f "
                 "(median centre error / scene radius), %.3f deg", summary.get("num_registered", 0),
                 summary.get("num_views", 0), summary["focal_error_pct"],
                 summary["alignment"]["median_center_error_rel"], summary["alignment"]["median_rotation_error_deg"])
    return summary


def splat_summary(ply: Path) -> dict:
    """The splat stage's record from its splat_metrics.json beside ``ply``: held-out PSNR (dB) and SSIM,
    the Gaussians count, training steps and seconds (of the run that trained them: a reused stage reports
    its original training time), what was evaluated, and ``resumed``: whether the training was resumed
    from a checkpoint of an interrupted run."""
    metrics = json.loads((Path(ply).parent / SPLAT_METRICS_NAME).read_text())
    return {key: metrics.get(key) for key in ("psnr", "ssim", "num_gaussians", "steps", "train_seconds", "eval_on",
                                              "resumed")}


def localization_summary(data: ClassData, poses: list[QueryPose]) -> dict:
    """Success rate and inliers; with true test poses (generated data) also the pose errors.

    Errors are reported for localized queries only (fallback poses are counted as failures).
    """
    per_query = {}
    for pose in poses:
        entry = {"success": bool(pose.success), "num_inliers": int(pose.num_inliers),
                 "fallback": pose.fallback}
        truth = (data.test_poses or {}).get(pose.name)
        if truth is not None:
            distance = float(np.linalg.norm(camera_center(truth)))
            entry["rotation_error_deg"] = float(rotation_error_deg(pose.w2c, truth))
            entry["center_error_rel"] = float(center_error(pose.w2c, truth) / max(distance, 1e-9))
        per_query[pose.name] = entry
    localized = [e for e in per_query.values() if e["success"]]
    summary = {"num_queries": len(poses), "num_localized": len(localized),
               "success_rate": len(localized) / max(len(poses), 1),
               "median_inliers": float(np.median([e["num_inliers"] for e in per_query.values()] or [0])),
               "median_seconds": {k: float(np.median([p.times.get(k, 0.0) for p in poses]))
                                  for k in (poses[0].times if poses else {})},
               "per_query": per_query}
    if localized and "rotation_error_deg" in localized[0]:
        summary["median_rotation_error_deg"] = float(np.median([e["rotation_error_deg"] for e in localized]))
        summary["median_center_error_rel"] = float(np.median([e["center_error_rel"] for e in localized]))
    return summary


def final_pose_summary(data: ClassData, refined: list[RefinedPose]) -> dict:
    """The final poses: how each was found (path), how well it lines up, at what cost, and (with true
    test poses) its errors. ``success_rate`` counts the localized queries (path "pnp" or "recovered");
    ``not_lined_up`` the poses among them kept although neither PnP's nor the recovery's lined up
    (:attr:`RefinedPose.lines_up`: their maps are doubtful); ``within_1deg_rate`` counts every query, failed
    ones included."""
    per_query = {}
    for pose in refined:
        entry = {"path": pose.path, "lines_up": pose.lines_up, "refined": pose.refined, **(pose.refinement or {})}
        if pose.confidence:
            entry["confidence"] = pose.confidence
        if pose.recovery:
            entry["recovery"] = pose.recovery
        if pose.symmetry:
            entry["symmetry"] = pose.symmetry
        if pose.second_opinion:
            entry["second_opinion"] = pose.second_opinion
        if pose.turn_polish:
            entry["turn_polish"] = pose.turn_polish
        truth = (data.test_poses or {}).get(pose.name)
        if truth is not None:
            entry["rotation_error_deg"] = float(rotation_error_deg(pose.w2c, truth))
            entry["center_error_rel"] = float(center_error(pose.w2c, truth) / max(np.linalg.norm(camera_center(truth)),
                                                                                   1e-9))
            if pose.symmetry and pose.symmetry["switched"]:
                entry["rotation_error_before_turn_deg"] = float(rotation_error_deg(
                    np.asarray(pose.symmetry["replaced_w2c"]), truth))
            if pose.second_opinion and pose.second_opinion["replaced"]:
                entry["rotation_error_before_second_opinion_deg"] = float(rotation_error_deg(
                    np.asarray(pose.second_opinion["replaced_w2c"]), truth))
        per_query[pose.name] = entry
    done = [e for e in per_query.values() if e["refined"]]
    recovered = [p.recovery["seconds"] for p in refined if p.recovery]
    summary = {"num_refined": len(done), "per_query": per_query,
               "paths": {path: sum(p.path == path for p in refined) for path in POSE_PATHS},
               "success_rate": sum(p.localized for p in refined) / max(len(refined), 1),
               "not_lined_up": sum(p.localized and not p.lines_up for p in refined),
               "median_seconds": float(np.median([e["seconds"] for e in done])) if done else 0.0,
               "median_recovery_seconds": float(np.median(recovered)) if recovered else 0.0,
               "symmetry_switched": sum(bool(p.symmetry and p.symmetry["switched"]) for p in refined),
               "turn_polished": sum(bool(p.turn_polish and p.turn_polish["turn_deg"]) for p in refined),
               "typical_l1": typical_colour_difference(refined),
               "second_opinions": {"asked": sum(p.second_opinion is not None for p in refined),
                                   "replaced": sum(bool(p.second_opinion and p.second_opinion["replaced"])
                                                   for p in refined)}}
    errors = [e["rotation_error_deg"] for e in per_query.values() if "rotation_error_deg" in e]
    if errors:
        summary["median_rotation_error_deg"] = float(np.median(errors))
        summary["median_center_error_rel"] = float(np.median([e["center_error_rel"] for e in per_query.values()]))
        summary["within_1deg_rate"] = float(np.mean(np.array(errors) <= 1.0))
    return summary


def render_pseudo_references(data: ClassData, poses: list[RefinedPose], ply: Path, cache_file: Path,
                             device: str, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Render the defect-free splats at every query's pose (refined, or as localized).

    Returns: renders [N, H, W, 3] float32 in [0,1] and their alphas [N, H, W] float32 in [0, 1] (the
    object's rendered coverage), in the order of ``poses``; cached in ``cache_file``.
    """
    if cache_file.exists():
        with np.load(cache_file) as cached:
            if "alphas" in cached:
                return cached["renders"], cached["alphas"]
    gaussians = load_gaussians(ply, device)
    K = torch.as_tensor(data.K, dtype=torch.float32, device=device)
    w2c = torch.as_tensor(np.stack([p.w2c for p in poses]), dtype=torch.float32, device=device)
    chunks, alpha_chunks = [], []
    with torch.no_grad():
        for start in range(0, len(poses), RENDER_BATCH):
            rgb, alpha = render(gaussians, w2c[start:start + RENDER_BATCH], K, data.width, data.height,
                                backend=backend, return_alpha=True)
            chunks.append(rgb.clamp(0, 1).float().cpu().numpy())
            alpha_chunks.append(alpha[..., 0].clamp(0, 1).float().cpu().numpy())
    renders, alphas = np.concatenate(chunks), np.concatenate(alpha_chunks)
    with atomic_path(cache_file) as tmp:
        np.savez(tmp, renders=renders, alphas=alphas)
    return renders, alphas


def class_sheen_allowance(cfg: DictConfig, posed: ClassData, ply: Path, device: str,
                          backend: str = "auto") -> float | None:
    """The class's sheen allowance (:mod:`splatpose.scoring.sheen`): rendered at the views the splats are
    judged on (held out of their training), composited as they were trained; None with ``scorer.sheen`` off."""
    settings = SheenSettings.from_config(cfg.scorer.get("sheen"))
    if not settings.enabled:
        return None
    views = load_posed_views(posed, object_masks=bool(cfg.splat.get("object_masks", False)))
    views = views.subset(evaluation_view_ids(len(views), int(cfg.splat.eval.holdout_every)))
    with torch.no_grad():
        renders = render(load_gaussians(ply, device), views.w2c.to(device), views.K.to(device), posed.width,
                         posed.height, backend=backend).clamp(0, 1)
    images = views.images.to(device).float() / 255.0
    allowance = sheen_allowance(images.permute(0, 3, 1, 2), renders.permute(0, 3, 1, 2), settings)
    log.info("Sheen allowance: %.3f (the white excess of %d held-out views)", allowance, len(views))
    return allowance


def class_expected_maps(cfg: DictConfig, posed: ClassData, poses: list[RefinedPose], ply: Path, device: str,
                        backend: str = "auto", allowance: float | None = None
                        ) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """With ``scorer.uncertainty`` (:mod:`splatpose.scoring.uncertainty`): each Gaussian's expected score
    [G] float32 — the scorer's maps of every reference view against its render (as the splats were
    trained: composited on white through the class's object masks), carried back to the Gaussians — and
    the map a good image is expected to have at each query's pose (``poses``) [N, H, W] float32.
    (None, None) with it off."""
    if not (cfg.scorer.get("uncertainty") or {}).get("enabled", False):
        return None, None
    views = load_posed_views(posed, object_masks=bool(cfg.splat.get("object_masks", False)))
    gaussians = load_gaussians(ply, device)
    K = views.K.to(device)
    scorer = build_scorer(cfg.scorer, device)
    scorer.sheen_allowance = allowance
    maps = []
    with torch.no_grad():
        for start in range(0, len(views), RENDER_BATCH):
            w2c = views.w2c[start:start + RENDER_BATCH].to(device)
            rgb, alpha = render(gaussians, w2c, K, posed.width, posed.height, backend=backend, return_alpha=True)
            images = views.images[start:start + RENDER_BATCH].to(device).float() / 255.0
            maps.append(scorer(images.permute(0, 3, 1, 2), rgb.clamp(0, 1).permute(0, 3, 1, 2), alpha[..., 0]))
    maps = upsampled(torch.cat(maps), posed.height, posed.width)
    expected = gaussian_expected_scores(gaussians, views.w2c.to(device), K, maps, backend)
    log.info("Expected scores of %d Gaussians from %d reference views (median %.3g, 99th percentile %.3g)",
             len(expected), len(views), float(expected.median()), float(expected.quantile(0.99)))
    query_w2c = torch.as_tensor(np.stack([p.w2c for p in poses]), dtype=torch.float32, device=device)
    at_queries = expected_maps(gaussians, expected, query_w2c, K, posed.width, posed.height, backend)
    return expected.cpu().numpy().astype(np.float32), at_queries.cpu().numpy()


def score_and_evaluate(cfg: DictConfig, data: ClassData, renders: np.ndarray, loggers: list,
                       device: str, alphas: np.ndarray | None = None,
                       sheen_allowance: float | None = None, expected: np.ndarray | None = None) -> Evaluation:
    """Anomaly maps for every (query, render) pair through ``Trainer.test``; metrics via callbacks.

    ``alphas`` [N, H, W]: the renders' coverage, for the scorer's object region (None: whole image);
    ``sheen_allowance``: the class's (:func:`class_sheen_allowance`; None: no sheen taken off);
    ``expected`` [N, H, W]: the map a good image is expected to have at each query's pose
    (:func:`class_expected_maps`; None: nothing taken off)."""
    queries = np.stack([read_image(t.path) for t in data.test])
    masks = np.stack([read_mask(t.mask_path) if t.mask_path else np.zeros(queries.shape[1:3], bool)
                      for t in data.test])
    pairs = QueryRenderPairs(queries, renders, masks, [t.name for t in data.test],
                             [t.defect for t in data.test], alphas=alphas, expected=expected)
    scorer = build_scorer(cfg.scorer, device)
    scorer.sheen_allowance = sheen_allowance
    module = AnomalyScoringModule(scorer)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    trainer = Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                      logger=loggers or False, callbacks=callbacks,
                      enable_progress_bar=cfg.trainer.enable_progress_bar, enable_model_summary=False)
    trainer.test(module, DataLoader(pairs, batch_size=cfg.scorer.get("batch_size", 16)), verbose=False)
    return module.evaluation


def write_per_image_csv(path: Path, evaluation: Evaluation, localization: dict, final_poses: dict) -> None:
    """One row per test image: label, score, PnP localization, and the final pose (path, whether it lines up,
    IoU, whether a near-symmetric turn replaced it, whether a second opinion was asked and replaced it, errors)."""
    fields = ["name", "defect", "label", "score", "localized", "fallback", "num_inliers",
              "rotation_error_deg", "center_error_rel", "pose_path", "lines_up", "iou", "turned", "second_opinion",
              "refined", "final_rotation_error_deg", "final_center_error_rel"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for i, name in enumerate(evaluation.names):
            q = localization["per_query"].get(name, {})
            r = final_poses["per_query"].get(name, {})
            writer.writerow({"name": name, "defect": evaluation.defects[i],
                             "label": int(evaluation.labels[i]), "score": f"{evaluation.scores[i]:.6f}",
                             "localized": q.get("success"), "fallback": q.get("fallback") or "",
                             "num_inliers": q.get("num_inliers"),
                             "rotation_error_deg": q.get("rotation_error_deg", ""),
                             "center_error_rel": q.get("center_error_rel", ""),
                             "pose_path": r.get("path", ""), "lines_up": r.get("lines_up", ""),
                             "iou": (r.get("confidence") or {}).get("iou", ""),
                             "turned": (r.get("symmetry") or {}).get("switched", ""),
                             "second_opinion": (r.get("second_opinion") or {}).get("replaced", ""),
                             "refined": r.get("refined", False),
                             "final_rotation_error_deg": r.get("rotation_error_deg", ""),
                             "final_center_error_rel": r.get("center_error_rel", "")})


def log_run_summary(loggers: list, results: dict) -> None:
    """Per-stage timings and localization numbers to every logger (metrics were logged by the evaluator)."""
    summary = {f"time/{stage}": t["seconds"] for stage, t in results["timings"].items()}
    for section in ("localization", "final_poses", "splat"):
        summary.update({f"{section}/{k}": v for k, v in results[section].items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for logger in loggers:
        logger.log_metrics(summary)
        logger.log_hyperparams({"class": results["class"], "dataset": results["dataset"]})


def format_metrics(metrics: dict) -> str:
    """One line per metric, for the console (the image-score alternatives stay in results.json)."""
    shown = {k: v for k, v in metrics.items() if k != "image_auroc_by_top_fraction"}
    return "\n".join(f"  {k:<28} {'undefined' if v is None else f'{v:.4f}'}"
                     for k, v in flatten_metrics(shown).items())
