"""Localizing query images against the reference model: retrieval, matching, PnP-RANSAC.

Per query image:

1. extract its local features (the reference's extractor);
2. retrieve the ``top_k`` most similar db images (``sfm/retrieval``);
3. match it to each of them; a match to a db keypoint that belongs to a triangulated point gives a
   2D-3D correspondence (keypoint i of a db image is point2D i of that image in the reconstruction);
4. LO-RANSAC absolute pose (P3P) with non-linear refinement, intrinsics fixed (PoseLib's or pycolmap's,
   ``sfm.localization.pnp``: :mod:`splatpose.sfm.pnp`).

A query is localized when PnP returns a pose with at least ``min_inliers`` inliers. Otherwise it gets
an explicit fallback pose, the pose of the retrieved db image with the most 2D-3D matches
(``fallback="retrieved_db_pose"``), with ``success=False``: never a silent guess, never an exception.

:class:`Localizer` keeps the networks, the db features (on the device) and the 2D-3D tables in memory,
so localizing one more image costs only the four steps above; :func:`localize_queries` runs it over a
class's test images and writes hloc-layout files plus the poses.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pycolmap
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from splatpose.atomic_files import write_text_atomic
from splatpose.data.mad_sim import ClassData
from splatpose.sfm import hloc_files
from splatpose.sfm.config import check_sfm_config
from splatpose.sfm.features import FeatureSize, build_extractor, load_image_tensor, to_original_pixels
from splatpose.sfm.matchers import build_matcher
from splatpose.sfm.pnp import PnPSolver
from splatpose.sfm.reference import Reference
from splatpose.sfm.retrieval import build_retrieval, rank_database
from splatpose.sfm.triangulation import colmap_camera, keypoint_point_ids

log = logging.getLogger(__name__)

FALLBACK_RETRIEVED = "retrieved_db_pose"
POSES_FILE = "query_poses.json"
POSES_TXT = "query_poses.txt"


@dataclass
class QueryPose:
    """The localization result of one query image.

    w2c: [4, 4] float64 world-to-camera, OpenCV axes. When ``success`` is False it is the fallback pose
        named by ``fallback`` (e.g. "retrieved_db_pose"), not an estimate.
    num_inliers: PnP inliers (0 when PnP failed or did not run).
    num_matches: 2D-3D correspondences handed to PnP.
    retrieved: db image names the query was matched against, most similar first (more than
        ``localization.top_k`` when a failed first try was matched again: ``retried``).
    times: seconds per stage: extract, retrieve, match, pnp (and retry, the second try's match and PnP).
    """

    name: str
    w2c: np.ndarray
    success: bool
    num_inliers: int
    num_matches: int
    retrieved: list[str]
    fallback: str | None = None
    retried: bool = False
    times: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = asdict(self)
        out["w2c"] = np.asarray(self.w2c).tolist()
        return out

    @classmethod
    def from_json(cls, entry: dict) -> "QueryPose":
        return cls(**{**entry, "w2c": np.asarray(entry["w2c"], dtype=np.float64)})


@dataclass
class LocalizationDetails:
    """What localizing one image produced besides its pose (written to the hloc files)."""

    features: dict[str, np.ndarray]
    matches: dict[str, tuple[np.ndarray, np.ndarray]]  # db name -> (matches0, scores0)


class Localizer:
    """Localizes images against one reference model; build once, call per image.

    Args:
        K: [3, 3] intrinsics of the query camera (COLMAP pixel convention); width, height its image size.
        cfg: the ``sfm`` node (feature, matcher, retrieval, localization, max_keypoints, and the extraction size:
            resize_max, resize_force, upscale_below; :class:`FeatureSize`).
        reference: the finished reference model (its db features and reconstruction).
        db_w2c: [N, 4, 4] poses of the db images in ``reference.db_names`` order (for fallbacks).
    """

    def __init__(self, K: np.ndarray, width: int, height: int, cfg: DictConfig, reference: Reference,
                 db_w2c: np.ndarray, device: str):
        check_sfm_config(cfg)
        self.cfg, self.device = cfg, device
        self.feature_size = FeatureSize.from_config(cfg)
        self.top_k = int(cfg.localization.top_k)
        self.retry_top_k = int(cfg.localization.get("retry_top_k") or 0)
        self.min_inliers = int(cfg.localization.min_inliers)
        self.retry_min_inliers = max(self.min_inliers, int(cfg.localization.get("retry_min_inliers") or 0))
        self.camera = colmap_camera(K, width, height)
        # a query's keypoint budget: the reference's, unless set (a query on a cluttered bench spends most of it
        # off the object, where the reference's object-only keypoints have no partner)
        self.max_keypoints = int(cfg.localization.get("max_keypoints") or cfg.max_keypoints)
        self.extractor = build_extractor(cfg.feature, self.max_keypoints, device)
        self.matcher = build_matcher(cfg.matcher, cfg.feature.name, device)
        self.retrieval = build_retrieval(cfg.retrieval, device)

        self.db_names = list(reference.db_names)
        self.db_w2c = np.asarray(db_w2c, dtype=np.float64)
        db_features = hloc_files.read_all_features(reference.features_path, self.db_names)
        self.db_prepared = [self.matcher.prepare(db_features[n]) for n in self.db_names]
        self.db_point_ids, self.points_xyz = keypoint_point_ids(reference.load_reconstruction(), self.db_names,
                                                                db_features)
        self.retrieval.fit([db_features[n] for n in self.db_names])
        self.db_global = np.stack([self.retrieval.describe(self._db_image(reference, n), db_features[n])
                                   for n in self.db_names])

        self.pnp = PnPSolver(cfg.localization, self.camera)

    def _db_image(self, reference: Reference, name: str) -> torch.Tensor | None:
        if not self.retrieval.needs_images:
            return None
        return load_image_tensor(reference.image_root / name, self.feature_size)[0]

    def localize(self, path: Path, name: str | None = None) -> tuple[QueryPose, LocalizationDetails]:
        """Pose of one image file; never raises for an image that simply cannot be localized."""
        name = name or Path(path).name
        times = {}
        start = time.perf_counter()
        image, original_wh = load_image_tensor(Path(path), self.feature_size)
        features = self.extract(image[None], original_wh)[0]
        times["extract"] = time.perf_counter() - start

        start = time.perf_counter()
        ranked = self.rank(features, image)
        retrieved = self.first_try(ranked)
        times["retrieve"] = time.perf_counter() - start

        start = time.perf_counter()
        prepared = self.matcher.prepare(features)
        matches = {self.db_names[i]: self.matcher(prepared, self.db_prepared[i]) for i in retrieved}
        times["match"] = time.perf_counter() - start

        start = time.perf_counter()
        pose = self.pose_from_matches(name, features, retrieved, matches)
        times["pnp"] = time.perf_counter() - start
        more = self.second_try(pose, ranked)
        if len(more):
            start = time.perf_counter()
            matches.update({self.db_names[i]: self.matcher(prepared, self.db_prepared[i]) for i in more})
            pose = self.retry_pose(pose, features, ranked, matches)
            times["retry"] = time.perf_counter() - start
        pose.times = {k: round(v, 6) for k, v in times.items()}
        return pose, LocalizationDetails(features, matches)

    def extract(self, images: torch.Tensor, original_wh: tuple[int, int]) -> list[dict]:
        """Features of [B, 3, h, w] images already resized for extraction (``resize_max``), one dict per
        image, keypoints in the pixels of the original ``original_wh`` (width, height) image.

        On the CPU one image at a time, as the reference's extraction (faster there): then a query's
        features, and so its pose, are bit for bit those it gets alone, whatever images share its batch.
        (A batched convolution rounds differently, ~1e-8 in PnP poses, which the refinement's line
        searches can turn into tenths of a degree where its loss is flat.) On a GPU the batch stays one
        call, equal to single images up to that rounding."""
        images = images.to(self.device)
        if images.device.type == "cpu":
            features = [feats for image in images for feats in self.extractor(image[None])]
        else:
            features = self.extractor(images)
        for feats in features:
            feats["keypoints"] = to_original_pixels(feats["keypoints"], (images.shape[-1], images.shape[-2]),
                                                    original_wh)
            feats["image_size"] = np.array(original_wh, dtype=np.int64)
        return features

    def rank(self, features: dict, image: torch.Tensor) -> np.ndarray:
        """Every index into ``db_names``, the db images most similar to the query first (the retrieval's
        global descriptors). ``image`` [3, h, w]: the extraction's input."""
        descriptor = self.retrieval.describe(image if self.retrieval.needs_images else None, features)
        return rank_database(descriptor, self.db_global)

    def first_try(self, ranked: np.ndarray) -> np.ndarray:
        """The db images a query is matched against first: every one when the retrieval is exhaustive,
        else the ``top_k`` best ranked."""
        return ranked if self.retrieval.exhaustive else ranked[: self.top_k]

    def second_try(self, pose: "QueryPose", ranked: np.ndarray) -> np.ndarray:
        """The further db images to match when PnP failed on the first try: the next ones of the ranking,
        up to ``localization.retry_top_k`` in all (none when it is null or the pose succeeded). On a
        cluttered bench the retrieval ranks by the bench as much as by the object, and the views that
        see the query's side of the object may rank lower than ``top_k``
        (experiments/results/realistic_cpu_2026-12-05.md)."""
        if pose.success or self.retrieval.exhaustive or self.retry_top_k <= self.top_k:
            return ranked[:0]
        return ranked[self.top_k:self.retry_top_k]

    def retry_pose(self, first: "QueryPose", features: dict, ranked: np.ndarray, matches: dict) -> "QueryPose":
        """The pose from the matches of both tries (``matches`` holds every db image matched so far) when
        PnP keeps at least ``localization.retry_min_inliers`` inliers (more views give a spurious consensus
        more chances: with 16 views and a floor of 8, 9-12 inliers gave poses 44-108 deg off); else the
        first try's answer. Either way ``retried`` says that a second try ran."""
        pose = self.pose_from_matches(first.name, features, ranked[: self.retry_top_k], matches,
                                      min_inliers=self.retry_min_inliers)
        if not pose.success:
            pose = first
        pose.retried = True
        return pose

    def pose_from_matches(self, name: str, features: dict, retrieved: np.ndarray, matches: dict,
                          min_inliers: int | None = None) -> QueryPose:
        """PnP over the 2D-3D correspondences of the matches (db name -> (matches0, scores0)), localized
        with at least ``min_inliers`` inliers (default ``localization.min_inliers``); when it fails, the
        fallback: the pose of the retrieved db image with the most correspondences."""
        query_idx, point_ids, per_db = self._correspondences(retrieved, matches)
        pose = self._estimate_pose(name, features["keypoints"], query_idx, point_ids,
                                   self.min_inliers if min_inliers is None else int(min_inliers))
        if not pose.success:
            best = retrieved[int(np.argmax(per_db))] if len(retrieved) else 0
            pose.w2c, pose.fallback = self.db_w2c[best].copy(), FALLBACK_RETRIEVED
        pose.retrieved = [self.db_names[i] for i in retrieved]
        return pose

    def _correspondences(self, retrieved: np.ndarray, matches: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unique (query keypoint, 3D point) pairs over all retrieved db images, and counts per db image."""
        pairs, per_db = [], []
        for i in retrieved:
            matches0, _ = matches[self.db_names[i]]
            q = np.flatnonzero(matches0 > -1)
            pid = self.db_point_ids[i][matches0[q]]
            keep = pid > -1
            pairs.append(np.stack([q[keep], pid[keep]], axis=1))
            per_db.append(int(keep.sum()))
        pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
        if len(pairs) == 0:  # also a reference without 3D points (an object without texture)
            return pairs[:, 0], pairs[:, 1], np.array(per_db)
        # unique rows through one int64 key per row (query keypoint major, as np.unique(axis=0) orders
        # them), 10x faster than np.unique's row sort
        num_points = len(self.points_xyz)
        query_idx, point_ids = np.divmod(np.unique(pairs[:, 0] * num_points + pairs[:, 1]), num_points)
        return query_idx, point_ids, np.array(per_db)

    def _estimate_pose(self, name: str, keypoints: np.ndarray, query_idx: np.ndarray,
                       point_ids: np.ndarray, min_inliers: int) -> QueryPose:
        failed = QueryPose(name=name, w2c=np.eye(4), success=False, num_inliers=0,
                           num_matches=len(query_idx), retrieved=[])
        if len(query_idx) < max(min_inliers, 4):
            return failed
        points2d = keypoints[query_idx].astype(np.float64) + 0.5  # hloc -> COLMAP pixel convention
        solved = self.pnp(points2d, self.points_xyz[point_ids])
        if solved is None:
            return failed
        w2c, failed.num_inliers = solved
        if failed.num_inliers < min_inliers:
            return failed
        return QueryPose(name=name, w2c=w2c, success=True, num_inliers=failed.num_inliers,
                         num_matches=len(query_idx), retrieved=[])


def localize_queries(data: ClassData, cfg: DictConfig, reference: Reference, out_dir: Path,
                     device: str) -> list[QueryPose]:
    """Localize every test image of ``data``; reuse ``out_dir/query_poses.json`` when it is complete.

    Writes into ``out_dir``: features.h5 (query features), pairs.txt (query -> retrieved db),
    matches.h5, query_poses.json (every QueryPose, written last) and query_poses.txt (hloc's
    ``name qw qx qy qz tx ty tz`` for the localized queries).

    Returns:
        One QueryPose per test image, in ``data.test`` order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [t.name for t in data.test]
    cached = _load_poses(out_dir / POSES_FILE, names)
    if cached is not None:
        log.info("localization: reusing %s", out_dir / POSES_FILE)
        return cached

    localizer = Localizer(data.K, data.width, data.height, cfg, reference, data.train_w2c, device)
    poses, pairs = [], []
    with hloc_files.atomic_h5(out_dir / "features.h5") as f_handle, \
            hloc_files.atomic_h5(out_dir / "matches.h5") as m_handle:
        for test in tqdm(data.test, desc="localize queries", leave=False):
            pose, details = localizer.localize(test.path, test.name)
            poses.append(pose)
            hloc_files.write_image_features(f_handle, test.name, details.features)
            for db_name, (matches0, scores0) in details.matches.items():
                hloc_files.write_pair_matches(m_handle, test.name, db_name, matches0, scores0)
                pairs.append((test.name, db_name))
    hloc_files.write_pairs(out_dir / "pairs.txt", pairs)
    write_text_atomic(out_dir / POSES_TXT, "".join(_hloc_pose_line(p) for p in poses if p.success))
    write_text_atomic(out_dir / POSES_FILE, json.dumps([p.to_json() for p in poses], indent=1))
    localized = sum(p.success for p in poses)
    retried = sum(p.retried for p in poses)
    log.info("localization: %d/%d queries localized%s", localized, len(poses),
             f" ({retried} matched again after a failed first try)" if retried else "")
    return poses


def _hloc_pose_line(pose: QueryPose) -> str:
    rigid = pycolmap.Rigid3d(pycolmap.Rotation3d(pose.w2c[:3, :3]), pose.w2c[:3, 3])
    x, y, z, w = rigid.rotation.quat
    t = pose.w2c[:3, 3]
    return f"{pose.name} {w} {x} {y} {z} {t[0]} {t[1]} {t[2]}\n"


def _load_poses(path: Path, names: list[str]) -> list[QueryPose] | None:
    if not path.exists():
        return None
    poses = [QueryPose.from_json(entry) for entry in json.loads(path.read_text())]
    if [p.name for p in poses] != names:
        log.warning("%s does not match the test images; localizing again", path)
        return None
    return poses
