"""Reference cameras estimated from the images: SfM from scratch, for photos without poses.

``sfm.reference_poses=estimate`` (or a class without transforms.json) builds the reference model
without known poses, hloc's ``reconstruction.py`` steps on the project's own features and matches:

1. features of every train image (the configured extractor), as with known poses;
2. image pairs from retrieval (VLAD over the images' own descriptors, :mod:`splatpose.sfm.retrieval`),
   or every pair when there are few views (``sfm.estimate.pairs.exhaustive_max_views``);
3. matches of those pairs (the configured matcher);
4. a COLMAP database with ONE shared camera (SIMPLE_PINHOLE, focal length from the photos' EXIF
   35 mm-equivalent focal length, else the field-of-view hint ``sfm.estimate.fov_x_deg``; principal
   point at the image centre), the keypoints and the raw
   matches; ``pycolmap.verify_matches`` estimates each pair's two-view geometry (RANSAC);
5. ``pycolmap.incremental_mapping``: registration, triangulation and bundle adjustment, the focal
   length refined with the poses;
6. the largest model, compacted: only the registered views, image ids 1..M in ``data.train`` order,
   the camera as PINHOLE (fx = fy), so that everything downstream (localization, the splats, the
   detector's reading of a run folder) takes it as it takes a model built from known poses.

Registered views whose camera does not see the model inside the object's outline
(:func:`silhouette_agreement`: look-alike views can put a camera on the wrong side of the object) are
left out of the mapper's result. The views left over then get a second chance
(:func:`register_left_over_views`, ``sfm.estimate.late_registration``): PnP against the model, as a
query is localized (their raw matches to the registered views, the ``localization`` node's RANSAC), kept
when enough matches are inliers and the outline agrees. Views still left over are listed (console and
reference.json) and left out; fewer registered than
``sfm.estimate.min_registered_fraction`` of the views stops the run with :class:`EstimationError`.

The model lives in the SfM frame (arbitrary origin, rotation and scale). :func:`posed_class_data`
hands the downstream stages the class at the estimated cameras; evaluation against true poses aligns
the frames by a similarity transform (:mod:`splatpose.sfm.frame_alignment`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pycolmap
from omegaconf import DictConfig, OmegaConf
from scipy import ndimage

from splatpose.data.mad_sim import ClassData
from splatpose.errors import UserError
from splatpose.sfm.retrieval import VladRetrieval, rank_database
from splatpose.sfm.pnp import PnPSolver
from splatpose.sfm.triangulation import (colmap_camera, keypoint_point_ids, rigid_from_w2c, w2c_from_rigid,
                                         write_database)

log = logging.getLogger(__name__)

REFERENCE_POSES = ("known", "estimate")
MAPPING_DIR = "mapping"  # pycolmap's raw output (every model it found), kept for inspection


class EstimationError(UserError):
    """The reference cameras could not be estimated from the images; the message names them and what to try."""


def resolve_reference_poses(cfg_sfm: DictConfig, data: ClassData) -> DictConfig:
    """The ``sfm`` node with the reference-pose mode this class gets.

    ``known`` (the default) where the class has poses (transforms.json); a class without them gets
    ``estimate``, said once on the console. The returned node is what the stage keys hash, so a
    switched class is cached as an estimated one.

    Raises:
        UserError: an unknown ``sfm.reference_poses`` value.
    """
    mode = cfg_sfm.get("reference_poses", "known")
    if mode not in REFERENCE_POSES:
        raise UserError(f"sfm.reference_poses={mode} is unknown; choose one of {', '.join(REFERENCE_POSES)}")
    if mode == "known" and not data.poses_known:
        log.warning("%s has no transforms.json: estimating its reference cameras from the images "
                    "(sfm.reference_poses=estimate; field-of-view hint sfm.estimate.fov_x_deg=%s)",
                    data.root, cfg_sfm.estimate.fov_x_deg)
        mode = "estimate"
    resolved = cfg_sfm.copy()
    OmegaConf.set_struct(resolved, False)
    resolved.reference_poses = mode
    return resolved


def focal_from_fov(fov_x_deg: float, width: int) -> float:
    """Focal length (px) of a pinhole camera whose horizontal field of view is ``fov_x_deg`` degrees."""
    if not 0.0 < float(fov_x_deg) < 180.0:
        raise UserError(f"sfm.estimate.fov_x_deg={fov_x_deg}: a horizontal field of view in degrees in (0, 180) "
                        "is needed (50 mm on a full-frame camera: 39.6; a phone's main camera: about 65-70)")
    return 0.5 * width / np.tan(0.5 * np.radians(float(fov_x_deg)))


EXIF_IFD, EXIF_FOCAL_35MM = 0x8769, 41989  # the Exif sub-IFD and its FocalLengthIn35mmFilm tag
FULL_FRAME_DIAGONAL_MM = float(np.hypot(36.0, 24.0))


def fov_from_exif(path: Path, width: int, height: int) -> float | None:
    """The horizontal field of view (degrees) a photo's EXIF gives, or None.

    From the 35 mm-equivalent focal length (what phones and most cameras write): the lens that gives
    the same diagonal field of view on a 36 x 24 mm frame. The horizontal one follows from the image's
    aspect: tan(fov_x / 2) = (W / diagonal_px) * 43.27 mm / (2 f_35).
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            focal_35mm = image.getexif().get_ifd(EXIF_IFD).get(EXIF_FOCAL_35MM)
    except (OSError, ValueError):
        return None
    if not focal_35mm or float(focal_35mm) <= 0:
        return None
    half_width = width / np.hypot(width, height) * FULL_FRAME_DIAGONAL_MM / (2.0 * float(focal_35mm))
    return float(np.degrees(2.0 * np.arctan(half_width)))


def fov_hint(data: ClassData, cfg_estimate: DictConfig) -> tuple[float, str]:
    """(horizontal field of view in degrees, where it came from): the first train photo's EXIF when
    ``sfm.estimate.use_exif`` and it has one, else ``sfm.estimate.fov_x_deg``."""
    if bool(cfg_estimate.get("use_exif", True)):
        fov = fov_from_exif(data.train[0].path, data.width, data.height)
        if fov is not None:
            return fov, f"EXIF of {data.train[0].name}"
    return float(cfg_estimate.fov_x_deg), "sfm.estimate.fov_x_deg"


def initial_camera(width: int, height: int, fov_x_deg: float) -> pycolmap.Camera:
    """The one shared camera the mapper starts from: SIMPLE_PINHOLE (f, cx, cy), f from the hint
    (marked as a prior, so COLMAP trusts it), principal point at the image centre (COLMAP pixels)."""
    camera = pycolmap.Camera(model="SIMPLE_PINHOLE", width=int(width), height=int(height),
                             params=[focal_from_fov(fov_x_deg, width), width / 2.0, height / 2.0], camera_id=1)
    camera.has_prior_focal_length = True
    return camera


def image_pairs(names: list[str], features: dict[str, dict], cfg_pairs: DictConfig, seed: int = 0
                ) -> list[tuple[str, str]]:
    """The image pairs to match when the poses are unknown.

    Every pair when there are at most ``cfg_pairs.exhaustive_max_views`` views; otherwise each view
    with its ``cfg_pairs.retrieval_top_k`` most similar views by VLAD of its own descriptors
    (vocabulary from these images), the union of both directions.

    Args:
        names: image names [N]; features: name -> features (hloc layout: ``descriptors`` [N_i, D]).
    Returns:
        Pairs (name_i, name_j), i < j in the order of ``names``, each once, sorted.
    """
    n = len(names)
    if n <= int(cfg_pairs.exhaustive_max_views):
        return [(names[i], names[j]) for i in range(n) for j in range(i + 1, n)]
    retrieval = VladRetrieval(int(cfg_pairs.num_clusters), seed=seed)
    retrieval.fit([features[name] for name in names])
    descriptors = np.stack([retrieval.describe(None, features[name]) for name in names])
    k = min(int(cfg_pairs.retrieval_top_k), n - 1)
    pairs = set()
    for i in range(n):
        ranked = [j for j in rank_database(descriptors[i], descriptors) if j != i][:k]
        pairs.update((min(i, j), max(i, j)) for j in ranked)
    return [(names[i], names[j]) for i, j in sorted(pairs)]


def unposed_reconstruction(names: list[str], camera: pycolmap.Camera) -> pycolmap.Reconstruction:
    """The shared camera and every image (ids 1..N in ``names`` order), no poses: what the database mirrors."""
    reconstruction = pycolmap.Reconstruction()
    reconstruction.add_camera_with_trivial_rig(camera)
    for image_id, name in enumerate(names, start=1):
        reconstruction.add_image_with_trivial_frame(pycolmap.Image(name=name, camera_id=camera.camera_id,
                                                                   image_id=image_id))
    return reconstruction


def verification_options(cfg_verify: DictConfig, seed: int) -> pycolmap.TwoViewGeometryOptions:
    options = pycolmap.TwoViewGeometryOptions()
    options.ransac.max_error = float(cfg_verify.max_error)
    options.ransac.random_seed = seed
    options.min_num_inliers = int(cfg_verify.min_num_inliers)
    options.compute_relative_pose = True  # for drop_opposite_pairs
    return options


def drop_opposite_pairs(database: Path, max_rotation_deg: float) -> list[tuple[int, int]]:
    """Delete the verified pairs whose cameras turn by more than ``max_rotation_deg`` between them.

    Views from opposite sides of an object share only what is seen from both sides (thin parts: legs,
    wires, edges), and the two cameras then face each other along their baseline, where the relative
    pose from the essential matrix is ambiguous (the twisted pair passes the cheirality test). On the
    generated 01Ant such pairs (up to 66 inliers of 74 matches at 170 degrees) put 3 of 48 cameras on the
    wrong side of the object. Needs the relative poses (``compute_relative_pose``).

    Returns:
        The (image_id1, image_id2) of the pairs deleted.
    """
    db = pycolmap.Database.open(str(database))
    try:
        pair_ids, geometries = db.read_two_view_geometries()
        dropped = []
        for pair_id, geometry in zip(pair_ids, geometries):
            pose = geometry.cam2_from_cam1
            if len(geometry.inlier_matches) and pose is not None \
                    and np.degrees(pose.rotation.angle()) > max_rotation_deg:
                image_ids = pycolmap.pair_id_to_image_pair(pair_id)
                db.delete_two_view_geometry(*image_ids)
                dropped.append(tuple(int(i) for i in image_ids))
    finally:
        db.close()
    return dropped


def mapping_options(cfg_estimate: DictConfig, seed: int) -> pycolmap.IncrementalPipelineOptions:
    """COLMAP's incremental mapper with one shared camera whose focal length (only) is refined."""
    options = pycolmap.IncrementalPipelineOptions()
    options.ba_refine_focal_length = True
    options.ba_refine_principal_point = False
    options.ba_refine_extra_params = False
    options.extract_colors = False  # colours come from the project's image reader (point_colors)
    options.min_model_size = 3
    options.num_threads = int(cfg_estimate.num_threads)
    options.random_seed = seed
    options.mapper.filter_max_reproj_error = float(cfg_estimate.max_reproj_error)
    options.mapper.init_min_num_inliers = int(cfg_estimate.init_min_num_inliers)
    options.mapper.abs_pose_min_num_inliers = int(cfg_estimate.register_min_num_inliers)
    options.triangulation.ignore_two_view_tracks = not bool(cfg_estimate.keep_two_view_tracks)
    return options


def global_mapping_options(cfg_estimate: DictConfig, seed: int) -> pycolmap.GlobalPipelineOptions:
    """GLOMAP's global mapper (rotation averaging, global positioning, bundle adjustment) with one
    shared camera whose focal length (only) is refined."""
    options = pycolmap.GlobalPipelineOptions()
    options.num_threads = int(cfg_estimate.num_threads)
    options.random_seed = seed
    options.mapper.num_threads = int(cfg_estimate.num_threads)
    options.mapper.random_seed = seed
    options.mapper.rotation_averaging.random_seed = seed
    options.mapper.global_positioning.random_seed = seed
    options.mapper.global_positioning.use_gpu = False
    options.mapper.bundle_adjustment.refine_focal_length = True
    options.mapper.bundle_adjustment.refine_principal_point = False
    options.mapper.bundle_adjustment.refine_extra_params = False
    options.mapper.bundle_adjustment.ceres.use_gpu = False
    return options


def map_images(database: Path, image_dir: Path, out_dir: Path, cfg_estimate: DictConfig,
               seed: int) -> pycolmap.Reconstruction | None:
    """Run pycolmap's mapper (``sfm.estimate.mapper``: ``incremental`` or ``global``); the model with
    the most registered images (None: none).

    Every model pycolmap found is kept under ``out_dir/<index>/`` for inspection.
    """
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    if cfg_estimate.mapper == "global":
        models = pycolmap.global_mapping(str(database), str(image_dir), str(out_dir),
                                         options=global_mapping_options(cfg_estimate, seed))
    else:
        models = pycolmap.incremental_mapping(str(database), str(image_dir), str(out_dir),
                                              options=mapping_options(cfg_estimate, seed))
    if not models:
        return None
    return max(models.values(), key=lambda model: model.num_reg_images())


def registered_names(model: pycolmap.Reconstruction | None, names: list[str]) -> list[str]:
    """The names (in ``names`` order) of the images ``model`` registered."""
    if model is None:
        return []
    registered = {model.image(i).name for i in model.reg_image_ids()}
    return [name for name in names if name in registered]


def silhouette_agreement(model: pycolmap.Reconstruction, names: list[str], image_dir: Path,
                         background_threshold: float = 0.96, tolerance_px: int = 2) -> dict[str, float]:
    """Per registered image: the fraction of the model's 3D points that project onto the object in it.

    Every point of the object projects inside its outline in every view (occlusion does not matter
    for an outline), so a camera at its true pose scores near 1 (0.91-0.98 on the generated 01Ant:
    noisy points, thin legs), and one that look-alike views put on the wrong side of the object far
    less (0.75). The object is what is not (near-)white background (images on white, the project's
    convention; a photo without white background scores 1: the check says nothing there).

    Args:
        model: the mapper's model; names: registered image names; image_dir: the folder they are in.
        background_threshold: a pixel whose darkest channel is at least this (in [0, 1]) is background.
        tolerance_px: the outline is widened by this many pixels (thin parts, sub-pixel noise).
    Returns:
        name -> agreement in [0, 1] (points behind the camera or outside the image count as misses).
    """
    by_name = {model.image(i).name: model.image(i) for i in model.reg_image_ids()}
    xyz = model_points(model)
    return {name: outline_agreement(xyz, model.camera(by_name[name].camera_id), by_name[name].cam_from_world(),
                                    object_outline(image_dir / name, background_threshold, tolerance_px))
            for name in names}


def model_points(model: pycolmap.Reconstruction) -> np.ndarray:
    """[P, 3] float64: the model's 3D points."""
    return np.array([point.xyz for point in model.points3D.values()], dtype=np.float64).reshape(-1, 3)


def outline_agreement(xyz: np.ndarray, camera: pycolmap.Camera, cam_from_world: pycolmap.Rigid3d,
                      foreground: np.ndarray) -> float:
    """The fraction of the points ``xyz`` [P, 3] that one camera projects onto ``foreground`` [H, W] bool
    (:func:`object_outline` of its photo; see :func:`silhouette_agreement`)."""
    uv = camera.img_from_cam(cam_from_world * xyz)  # NaN behind the camera
    valid = np.isfinite(uv).all(axis=1)
    cols, rows = np.floor(np.nan_to_num(uv[:, 0], nan=-1)), np.floor(np.nan_to_num(uv[:, 1], nan=-1))
    inside = valid & (cols >= 0) & (rows >= 0) & (cols < camera.width) & (rows < camera.height)
    hits = foreground[rows[inside].astype(int), cols[inside].astype(int)]
    return float(hits.sum() / max(len(xyz), 1))


def object_outline(image_path: Path, background_threshold: float = 0.96, tolerance_px: int = 2) -> np.ndarray:
    """[H, W] bool: the photo's non-background pixels, widened by ``tolerance_px``."""
    from splatpose.data.mad_sim import read_image

    return ndimage.binary_dilation(read_image(image_path).min(axis=2) < background_threshold,
                                   iterations=tolerance_px)


@dataclasses.dataclass
class LateView:
    """A view registered after mapping (:func:`register_left_over_views`).

    cam_from_world: its pose; keypoints: [N, 2] all its keypoints in COLMAP pixels (hloc + 0.5);
    observations: [K, 2] int64 (keypoint index, model 3D point id) of its PnP inliers, which join those
    points' tracks.
    """

    cam_from_world: pycolmap.Rigid3d
    keypoints: np.ndarray
    observations: np.ndarray


def register_left_over_views(model: pycolmap.Reconstruction, registered: list[str], left_over: list[str],
                             features: dict[str, dict], raw_matches: dict[tuple[str, str], np.ndarray],
                             cfg_localization: DictConfig, image_dir: Path, min_agreement: float
                             ) -> tuple[dict[str, LateView], dict[str, dict]]:
    """Register views the mapper left out by PnP against its model, as a query is localized.

    Each left-over view's raw matches to the registered views give (its keypoint, the 3D point of the
    matched keypoint) pairs; PnP with the ``localization`` node's solver and RANSAC threshold on the
    model's refined camera; the view is kept when at least ``min_inliers`` pairs are inliers and the
    camera sees the model inside the view's outline (:func:`outline_agreement` >= ``min_agreement``).
    When the pose from all the pairs fails the outline (look-alike views outvoting the true
    neighbours), the pairs through each registered view alone are tried, and the agreeing pose with
    the most inliers is kept (``one_view`` in the summary).
    Unlike a looser mapper, a wrong pose here cannot pull the model: the model is not changed.

    Returns:
        (name -> :class:`LateView` of the views kept, name -> {matches, inliers, agreement, one_view} of
        every left-over view tried, for the summary).
    """
    by_name = {model.image(i).name: model.image(i) for i in model.reg_image_ids()}
    camera = model.camera(by_name[registered[0]].camera_id)
    solver, max_error = PnPSolver(cfg_localization, camera), float(cfg_localization.ransac_max_error)
    rows, xyz = keypoint_point_ids(model, registered, features)  # xyz rows in sorted point-id order
    rows_of, point_ids = dict(zip(registered, rows)), sorted(model.points3D)
    min_inliers = max(int(cfg_localization.min_inliers), 4)
    late, tried = {}, {}
    for name in left_over:
        found = [_keypoint_point_rows(name, other, raw_matches, rows_of[other]) for other in registered]
        pairs = np.unique(np.concatenate([np.zeros((0, 2), np.int64), *found]), axis=0)
        outline = object_outline(image_dir / name)

        def checked_pose(subset: np.ndarray) -> tuple | None:
            """(cam_from_world, inliers, outline agreement) of PnP over ``subset``; None below min_inliers."""
            if len(subset) < min_inliers:
                return None
            points2d = features[name]["keypoints"][subset[:, 0]].astype(np.float64) + 0.5
            solved = solver(points2d, xyz[subset[:, 1]])
            if solved is None or solved[1] < min_inliers:
                return None
            cam_from_world = rigid_from_w2c(solved[0])
            return cam_from_world, int(solved[1]), round(outline_agreement(xyz, camera, cam_from_world, outline), 4)

        # All its matches first; when that pose fails the outline (look-alike views outvote the true
        # neighbours), each registered view's matches alone, the agreeing pose with the most inliers.
        first = checked_pose(pairs)
        tried[name] = {"matches": int(len(pairs)), "inliers": first[1] if first else 0,
                       "agreement": first[2] if first else None}
        if first is not None and first[2] >= min_agreement:
            best, tried[name]["one_view"] = first, False
        else:
            agreeing = [pose for rows in found if (pose := checked_pose(rows)) and pose[2] >= min_agreement]
            if not agreeing:
                continue
            best = max(agreeing, key=lambda pose: pose[1])
            tried[name].update(inliers=best[1], agreement=best[2], one_view=True)
        cam_from_world = best[0]
        points2d = features[name]["keypoints"][pairs[:, 0]].astype(np.float64) + 0.5
        projected = camera.img_from_cam(cam_from_world * xyz[pairs[:, 1]])
        inlier = pairs[np.linalg.norm(np.nan_to_num(projected - points2d, nan=np.inf), axis=1) <= max_error]
        inlier = inlier[~_repeated(inlier[:, 1])]  # a point observed once per image ...
        inlier = inlier[~_repeated(inlier[:, 0])]  # ... by one keypoint, which observes one point
        observations = np.stack([inlier[:, 0], np.asarray(point_ids, dtype=np.int64)[inlier[:, 1]]], axis=1)
        late[name] = LateView(cam_from_world, features[name]["keypoints"].astype(np.float64) + 0.5, observations)
    return late, tried


def _keypoint_point_rows(name: str, other: str, raw_matches: dict[tuple[str, str], np.ndarray],
                         other_rows: np.ndarray) -> np.ndarray:
    """[K, 2] (keypoint of ``name``, row of the 3D point of its match in ``other``) over their raw matches."""
    if (name, other) in raw_matches:
        ours, theirs = raw_matches[(name, other)][:, 0], raw_matches[(name, other)][:, 1]
    elif (other, name) in raw_matches:
        ours, theirs = raw_matches[(other, name)][:, 1], raw_matches[(other, name)][:, 0]
    else:
        return np.zeros((0, 2), np.int64)
    rows = other_rows[theirs]
    return np.stack([ours[rows >= 0], rows[rows >= 0]], axis=1).astype(np.int64)


def _repeated(values: np.ndarray) -> np.ndarray:
    """True where a value already occurred earlier in ``values``."""
    _, first = np.unique(values, return_index=True)
    repeated = np.ones(len(values), dtype=bool)
    repeated[first] = False
    return repeated


def check_registration(names: list[str], registered: list[str], min_fraction: float, image_dir: Path) -> None:
    """Stop with :class:`EstimationError` when fewer than ``min_fraction`` of ``names`` registered.

    The message names the images that did not register and what to try.
    """
    missing = [name for name in names if name not in set(registered)]
    if len(registered) >= float(min_fraction) * len(names) and len(registered) >= 2:
        return
    shown = ", ".join(missing[:12]) + (f" ... ({len(missing)} in all)" if len(missing) > 12 else "")
    raise EstimationError(
        f"estimating the reference cameras of {image_dir}: only {len(registered)} of {len(names)} train views "
        f"registered (sfm.estimate.min_registered_fraction={min_fraction}); not registered: {shown}. The photos "
        "must overlap: each part of the object seen in at least 3 views, neighbouring views at most 25-30 degrees "
        "apart, the object sharp and textured. Try: more photos between those listed, sfm.estimate.fov_x_deg "
        "closer to the camera's field of view, sfm.estimate.pairs.exhaustive_max_views at least the number of "
        "views (match every pair), more keypoints (sfm.max_keypoints), or a lower "
        "sfm.estimate.min_registered_fraction to go on without the views listed")


def compact_reconstruction(model: pycolmap.Reconstruction, names: list[str],
                           late: dict[str, LateView] | None = None) -> pycolmap.Reconstruction:
    """The registered part of ``model`` in the layout of a known-pose reference.

    Args:
        model: the mapper's model; names: the registered image names in ``data.train`` order, the views
            registered after mapping (``late``) among them.
    Returns:
        A reconstruction with one PINHOLE camera (id 1, fx = fy = the refined focal length), the
        images of ``names`` with ids 1..M in that order at their estimated poses, each with all its
        keypoints as points2D (keypoint i = point2D i), and every 3D point whose track lies in them (a
        late view's PnP inliers join the tracks of their points); normalised by
        ``Reconstruction.normalize`` (a similarity: the frame stays arbitrary).
    """
    late = late or {}
    by_name = {model.image(i).name: model.image(i) for i in model.reg_image_ids()}
    old_camera = model.camera(by_name[next(n for n in names if n not in late)].camera_id)
    compact = pycolmap.Reconstruction()
    compact.add_camera_with_trivial_rig(colmap_camera(old_camera.calibration_matrix(), old_camera.width,
                                                      old_camera.height))
    new_id, late_observations = {}, {}
    for image_id, name in enumerate(names, start=1):
        if name in late:
            keypoints, cam_from_world = late[name].keypoints, late[name].cam_from_world
            for keypoint, point_id in late[name].observations:
                late_observations.setdefault(int(point_id), []).append((image_id, int(keypoint)))
        else:
            old = by_name[name]
            keypoints = np.array([point.xy for point in old.points2D], dtype=np.float64).reshape(-1, 2)
            cam_from_world = old.cam_from_world()
            new_id[old.image_id] = image_id
        compact.add_image_with_trivial_frame(pycolmap.Image(name=name, keypoints=keypoints, camera_id=1,
                                                            image_id=image_id), cam_from_world)
    for point_id, point in model.points3D.items():
        track = pycolmap.Track()
        for element in point.track.elements:
            if element.image_id in new_id:
                track.add_element(new_id[element.image_id], element.point2D_idx)
        for image_id, keypoint in late_observations.get(point_id, []):
            track.add_element(image_id, keypoint)
        if track.length() >= 2:
            compact.add_point3D(point.xyz, track, point.color)
    # COLMAP's own normalisation (centred, the camera centres spread over 10 units): the mapper's
    # frame has an arbitrary scale, and fixed near planes and tolerances downstream need a sane one.
    compact.normalize()
    compact.update_point_3d_errors()
    return compact


def estimate_reconstruction(data: ClassData, cfg: DictConfig, features: dict[str, dict],
                            pairs: list[tuple[str, str]], raw_matches: dict[tuple[str, str], np.ndarray],
                            database: Path, pairs_path: Path, mapping_dir: Path, seed: int = 0
                            ) -> tuple[pycolmap.Reconstruction, dict]:
    """Steps 4-6 of the module docstring: database, verification, mapping, compaction.

    Args:
        data: the class (its train images; poses are not read).
        cfg: the ``sfm`` node (``estimate`` holds this step's settings).
        features: name -> features (hloc layout; keypoints [N_i, 2] in hloc pixels).
        pairs, raw_matches: the matched pairs and their matches [M, 2] (keypoint indices).
        database, pairs_path, mapping_dir: where the COLMAP database, the pairs file and the mapper's
            models go.
    Returns:
        (the compacted reconstruction, a summary: registered/unregistered names, focal lengths in px).
    Raises:
        EstimationError: too few views registered.
    """
    est = cfg.estimate
    names = [view.name for view in data.train]
    fov, fov_source = fov_hint(data, est)
    camera = initial_camera(data.width, data.height, fov)
    write_database(database, unposed_reconstruction(names, camera),
                   {n: features[n]["keypoints"] for n in names}, raw_matches, verified=False)
    pycolmap.verify_matches(str(database), str(pairs_path), options=verification_options(est.verification, seed))
    dropped = drop_opposite_pairs(database, float(est.verification.max_pair_rotation_deg))
    model = map_images(database, data.root, mapping_dir, est, seed)
    registered = registered_names(model, names)
    unregistered = [name for name in names if name not in set(registered)]
    if unregistered:
        log.info("The mapper did not register %d of %d reference views: %s", len(unregistered), len(names),
                 ", ".join(unregistered))
    agreement = silhouette_agreement(model, registered, data.root) if registered else {}
    off_outline = [name for name in registered if agreement[name] < float(est.min_silhouette_agreement)]
    if off_outline:
        log.info("%d views registered by the mapper are set aside: their cameras do not see the model inside the "
                    "object's outline (sfm.estimate.min_silhouette_agreement=%s): %s", len(off_outline),
                    est.min_silhouette_agreement, ", ".join(f"{n} ({agreement[n]:.2f})" for n in off_outline))
        registered = [name for name in registered if name not in set(off_outline)]
        unregistered = [name for name in names if name not in set(registered)]
    late, tried = {}, {}
    if est.late_registration and registered and unregistered:
        late, tried = register_left_over_views(model, registered, unregistered, features, raw_matches,
                                               cfg.localization, data.root, float(est.min_silhouette_agreement))
        log.info("Registered after mapping (PnP against the model): %d of %d left-over views%s", len(late),
                 len(unregistered), f" ({', '.join(late)})" if late else "")
        registered = [name for name in names if name in set(registered) | set(late)]
        unregistered = [name for name in names if name not in set(registered)]
    if unregistered:
        log.warning("%d of %d reference views are left out: %s", len(unregistered), len(names),
                    ", ".join(unregistered))
    check_registration(names, registered, float(est.min_registered_fraction), data.root)
    compact = compact_reconstruction(model, registered, late)
    focal = float(compact.camera(1).focal_length_x)
    summary = {"reference_poses": "estimate", "num_views": len(names), "num_registered": len(registered),
               "registration_rate": len(registered) / len(names), "unregistered": unregistered,
               "off_outline": off_outline, "late_registered": sorted(late), "late_registration": tried,
               "silhouette_agreement": {n: round(a, 4) for n, a in agreement.items()},
               "focal_hint_px": float(camera.focal_length), "focal_hint_from": fov_source, "focal_px": focal,
               "num_verified_pairs": _verified_pairs(database), "num_opposite_pairs_dropped": len(dropped)}
    log.info("Estimated cameras: %d/%d views registered, focal length %.2f px (hint %.2f px from %s)",
             len(registered), len(names), focal, camera.focal_length, fov_source)
    return compact, summary


def _verified_pairs(database: Path) -> int:
    db = pycolmap.Database.open(str(database))
    try:
        return int(db.num_verified_image_pairs())
    finally:
        db.close()


def posed_class_data(data: ClassData, reconstruction: pycolmap.Reconstruction) -> ClassData:
    """``data`` at the cameras of ``reconstruction``: what the downstream stages train and localize on.

    The train views are those the reconstruction holds (in its image-id order, which is ``data.train``
    order), each at its pose there (world-to-camera, OpenCV axes, SfM frame); K [3, 3] is its camera's.
    The true test poses (if any) are dropped: they live in another frame; evaluation maps the
    estimated poses into theirs (:mod:`splatpose.sfm.frame_alignment`).
    """
    views = {view.name: view for view in data.train}
    images = sorted(reconstruction.images.values(), key=lambda image: image.image_id)
    train = [dataclasses.replace(views[image.name], w2c=w2c_from_rigid(image.cam_from_world())) for image in images]
    K = reconstruction.camera(images[0].camera_id).calibration_matrix()
    return dataclasses.replace(data, K=np.asarray(K, dtype=np.float64), train=train, test_poses=None)
