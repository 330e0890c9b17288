"""Triangulating the database matches with the known train poses, through pycolmap.

The steps hloc's ``triangulation.py`` takes, with the poses known from transforms.json:

1. a COLMAP reconstruction holding one camera and every train image at its known pose (no points);
2. a COLMAP database with the same cameras, rigs, frames and images (same ids), the keypoints of
   features.h5 (+0.5: COLMAP's pixel centres are at half-integers) and, per db pair, the matches that
   agree with the known epipolar geometry (geometric verification from poses, no RANSAC needed);
3. ``pycolmap.triangulate_points``: COLMAP's point triangulator (poses and intrinsics stay fixed),
   then points whose reprojection error exceeds ``max_reproj_error`` are dropped.

Keypoint i of an image in features.h5 is point2D i of that image in the reconstruction, which is how
localization turns 2D-2D matches into 2D-3D correspondences.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pycolmap

from splatpose.data.mad_sim import ClassData, read_image

log = logging.getLogger(__name__)


def colmap_camera(K: np.ndarray, width: int, height: int, camera_id: int = 1) -> pycolmap.Camera:
    """A PINHOLE camera from K [3, 3] (principal point already in COLMAP's pixel convention)."""
    return pycolmap.Camera(model="PINHOLE", width=int(width), height=int(height),
                           params=[K[0, 0], K[1, 1], K[0, 2], K[1, 2]], camera_id=camera_id)


def rigid_from_w2c(w2c: np.ndarray) -> pycolmap.Rigid3d:
    """OpenCV world-to-camera [4, 4] -> pycolmap cam_from_world (same axes: COLMAP uses OpenCV's)."""
    return pycolmap.Rigid3d(pycolmap.Rotation3d(np.asarray(w2c[:3, :3], dtype=np.float64)),
                            np.asarray(w2c[:3, 3], dtype=np.float64))


def w2c_from_rigid(cam_from_world: pycolmap.Rigid3d) -> np.ndarray:
    w2c = np.eye(4)
    w2c[:3, :4] = cam_from_world.matrix()
    return w2c


def posed_reconstruction(data: ClassData) -> pycolmap.Reconstruction:
    """Camera + every train view at its known pose; image ids 1..N in ``data.train`` order."""
    reconstruction = pycolmap.Reconstruction()
    reconstruction.add_camera_with_trivial_rig(colmap_camera(data.K, data.width, data.height))
    for image_id, view in enumerate(data.train, start=1):
        image = pycolmap.Image(name=view.name, camera_id=1, image_id=image_id)
        reconstruction.add_image_with_trivial_frame(image, rigid_from_w2c(view.w2c))
    return reconstruction


def fundamental_from_poses(K: np.ndarray, w2c_0: np.ndarray, w2c_1: np.ndarray) -> np.ndarray:
    """F [3, 3] with x1^T F x0 = 0 for pixels (homogeneous) of image 0 and image 1."""
    relative = w2c_1 @ np.linalg.inv(w2c_0)  # cam1_from_cam0
    R, t = relative[:3, :3], relative[:3, 3]
    t_cross = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    K_inv = np.linalg.inv(K)
    return K_inv.T @ t_cross @ R @ K_inv


def sampson_error(F: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """First-order geometric distance (pixels) of correspondences x0, x1 [M, 2] to the epipolar geometry F."""
    h0 = np.concatenate([x0, np.ones((len(x0), 1))], axis=1)
    h1 = np.concatenate([x1, np.ones((len(x1), 1))], axis=1)
    Fx0 = h0 @ F.T
    Ftx1 = h1 @ F
    numerator = np.sum(h1 * Fx0, axis=1) ** 2
    denominator = Fx0[:, 0] ** 2 + Fx0[:, 1] ** 2 + Ftx1[:, 0] ** 2 + Ftx1[:, 1] ** 2
    return np.sqrt(numerator / np.maximum(denominator, 1e-12))


def verify_with_poses(K: np.ndarray, w2c_0: np.ndarray, w2c_1: np.ndarray, kpts0: np.ndarray, kpts1: np.ndarray,
                      matches: np.ndarray, max_error: float) -> np.ndarray:
    """The matches [M, 2] whose Sampson error under the known relative pose is <= max_error pixels."""
    if len(matches) == 0:
        return matches
    F = fundamental_from_poses(K, w2c_0, w2c_1)
    errors = sampson_error(F, kpts0[matches[:, 0]], kpts1[matches[:, 1]])
    return matches[errors <= max_error]


def write_database(database_path: Path, reconstruction: pycolmap.Reconstruction,
                   keypoints: dict[str, np.ndarray], matches: dict[tuple[str, str], np.ndarray],
                   verified: bool = True) -> None:
    """COLMAP database mirroring ``reconstruction`` with keypoints (hloc convention, +0.5 here) and
    matches [M, 2] per pair.

    ``verified``: the matches already agree with the (known) geometry and are written as both raw and
    inlier matches; otherwise only as raw matches, for ``pycolmap.verify_matches`` to verify.
    """
    if database_path.exists():
        database_path.unlink()
    ids = {image.name: image_id for image_id, image in reconstruction.images.items()}
    database = pycolmap.Database.open(str(database_path))
    try:
        for camera in reconstruction.cameras.values():
            database.write_camera(camera, use_camera_id=True)
        for rig in reconstruction.rigs.values():
            database.write_rig(rig, use_rig_id=True)
        for frame in reconstruction.frames.values():
            database.write_frame(frame, use_frame_id=True)
        for image in reconstruction.images.values():
            database.write_image(image, use_image_id=True)
        for name, image_id in ids.items():
            database.write_keypoints(image_id, (keypoints[name] + 0.5).astype(np.float32))
        for (name0, name1), pair_matches in matches.items():
            pair_matches = pair_matches.astype(np.uint32)
            database.write_matches(ids[name0], ids[name1], pair_matches)
            if verified:
                geometry = pycolmap.TwoViewGeometry(inlier_matches=pair_matches,
                                                    config=pycolmap.TwoViewGeometryConfiguration.CALIBRATED)
                database.write_two_view_geometry(ids[name0], ids[name1], geometry)
    finally:
        database.close()


def triangulation_options(max_reproj_error: float, min_angle_deg: float,
                          keep_two_view_tracks: bool) -> pycolmap.IncrementalPipelineOptions:
    options = pycolmap.IncrementalPipelineOptions()
    options.triangulation.ignore_two_view_tracks = not keep_two_view_tracks
    options.triangulation.min_angle = min_angle_deg
    options.triangulation.complete_max_reproj_error = max_reproj_error
    options.triangulation.merge_max_reproj_error = max_reproj_error
    options.mapper.filter_max_reproj_error = max_reproj_error
    options.mapper.filter_min_tri_angle = min_angle_deg
    return options


def triangulate(reconstruction: pycolmap.Reconstruction, database_path: Path, image_dir: Path,
                out_dir: Path, options: pycolmap.IncrementalPipelineOptions,
                max_reproj_error: float) -> pycolmap.Reconstruction:
    """Run COLMAP's point triangulator on a posed reconstruction and keep well-reprojecting points.

    COLMAP's final filter runs before its last bundle adjustment, so a few points may drift past the
    threshold; they are removed here so that every kept observation reprojects within it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    result = pycolmap.triangulate_points(reconstruction, str(database_path), str(image_dir), str(out_dir),
                                         options=options, refine_intrinsics=False)
    remove_points_above_error(result, max_reproj_error)
    return result


def remove_points_above_error(reconstruction: pycolmap.Reconstruction, max_error: float) -> int:
    """Delete 3D points with any observation reprojecting farther than ``max_error`` px; returns how many."""
    removed = 0
    for point_id, point in list(reconstruction.points3D.items()):
        for element in point.track.elements:
            image = reconstruction.image(element.image_id)
            projected = image.project_point(point.xyz)
            observed = image.points2D[element.point2D_idx].xy
            if projected is None or np.linalg.norm(projected - observed) > max_error:
                reconstruction.delete_point3D(point_id)
                removed += 1
                break
    return removed


def point_colors(reconstruction: pycolmap.Reconstruction, image_dir: Path) -> dict[int, np.ndarray]:
    """Mean colour (float [3] in [0, 1], white background) of each 3D point over its observations.

    Read through the project's image reader (RGBA composited onto white) rather than COLMAP's, so the
    colours match what the splats are trained on.
    """
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for image in reconstruction.images.values():
        observations = [(p.point3D_id, p.xy) for p in image.points2D if p.has_point3D()]
        if not observations:
            continue
        rgb = read_image(image_dir / image.name)
        height, width = rgb.shape[:2]
        ids = np.array([pid for pid, _ in observations])
        xy = np.array([xy for _, xy in observations])
        # COLMAP pixel convention: pixel (row i, col j) covers [j, j+1) x [i, i+1)
        cols = np.clip(np.floor(xy[:, 0]).astype(int), 0, width - 1)
        rows = np.clip(np.floor(xy[:, 1]).astype(int), 0, height - 1)
        for pid, colour in zip(ids, rgb[rows, cols]):
            sums[pid] = sums.get(pid, 0.0) + colour
            counts[pid] = counts.get(pid, 0) + 1
    return {pid: sums[pid] / counts[pid] for pid in sums}


def keypoint_point_ids(reconstruction: pycolmap.Reconstruction, db_names: list[str],
                       db_features: dict[str, dict]) -> tuple[list[np.ndarray], np.ndarray]:
    """Per db image, the row in the returned points array of each keypoint's 3D point (-1: none).

    Returns:
        ids: list (db_names order) of int64 [N_i] arrays.
        points_xyz: float64 [P, 3].
    """
    point_ids = sorted(reconstruction.points3D)
    row = {pid: r for r, pid in enumerate(point_ids)}
    xyz = np.array([reconstruction.points3D[p].xyz for p in point_ids], dtype=np.float64).reshape(-1, 3)
    by_name = {image.name: image for image in reconstruction.images.values()}
    ids = []
    for name in db_names:
        table = np.full(len(db_features[name]["keypoints"]), -1, dtype=np.int64)
        image = by_name[name]
        for index, point in enumerate(image.points2D):
            if point.has_point3D():
                table[index] = row[point.point3D_id]
        ids.append(table)
    return ids, xyz
