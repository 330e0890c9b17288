"""Localizing images that are already in memory, one or a batch at a time.

:class:`splatpose.sfm.Localizer` localizes an image file; a detector has the image decoded already
(it also scores it) and wants batches on a GPU. :class:`ImageLocalizer` adds that entry point to the
same localizer: the same extractor, retrieval, matcher, 2D-3D tables, PnP and fallback rule, so a
test image localized here gets the pose the evaluation's localize stage gave it. What batching
changes:

- extraction: one network pass over the batch (same-size images);
- matching (``matching="batched"``): every (query, retrieved db image) pair of the batch in one
  padded LightGlue pass (:mod:`splatpose.detect.batched_lightglue`); "sequential" matches pair by pair
  exactly as the localize stage does; "auto" batches on CUDA and stays sequential on the CPU, where
  batching gains little and sequential matching reproduces the evaluation run bit for bit.

Per-query times of a batched stage are the batch's time divided by the batch size.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from splatpose.sfm.features import to_original_pixels
from splatpose.sfm.localization import FALLBACK_RETRIEVED, Localizer, QueryPose
from splatpose.sfm.matchers import LightGlueMatcher
from splatpose.sfm.retrieval import rank_database

from splatpose.detect.batched_lightglue import match_pairs_batched

MATCHING_MODES = ("auto", "sequential", "batched")


def use_batched_matching(matching: str, device: str, matcher) -> bool:
    """Whether ``matching`` ("auto" | "sequential" | "batched") batches on ``device`` with ``matcher``.

    Only LightGlue has a batched path; other matchers always match pair by pair.
    """
    if matching not in MATCHING_MODES:
        raise ValueError(f"detect.matching={matching!r} is unknown; choose one of {', '.join(MATCHING_MODES)}")
    if not isinstance(matcher, LightGlueMatcher):
        return False
    return matching == "batched" or (matching == "auto" and str(device).startswith("cuda"))


class ImageLocalizer(Localizer):
    """A :class:`Localizer` over decoded images, single or batched (arguments as Localizer's, plus
    ``matching``; ``pairs_per_call``: LightGlue pairs per forward pass when batched; ``pnp_workers``:
    threads solving the PnP problems of a batch at once, as pycolmap releases the GIL while it solves)."""

    def __init__(self, *args, matching: str = "auto", pairs_per_call: int = 32, pnp_workers: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.batched_matching = use_batched_matching(matching, self.device, self.matcher)
        self.pairs_per_call = int(pairs_per_call)
        self.pnp_pool = ThreadPoolExecutor(int(pnp_workers), "pnp") if int(pnp_workers) > 1 else None

    def resize_for_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> the size features are extracted at (hloc's resize_max rule, as
        ``load_image_tensor`` applies it to files)."""
        height, width = images.shape[-2:]
        longest = max(height, width)
        if self.resize_max and (longest > self.resize_max or (self.resize_force and longest != self.resize_max)):
            scale = self.resize_max / longest
            size = (round(height * scale), round(width * scale))
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        return images

    def localize_images(self, images: torch.Tensor, names: list[str]) -> list[QueryPose]:
        """Poses of a batch of same-size images.

        Args:
            images: [B, 3, H, W] float32 in [0, 1], white background, on any device.
            names: one name per image (recorded in the QueryPose).
        Returns:
            one QueryPose per image; ``times`` holds per-image seconds of extract, retrieve, match and
            pnp (a batched stage's time split evenly). Never raises for an image that cannot be
            localized: it gets the fallback pose and ``success=False``.
        """
        batch = len(names)
        original_wh = (images.shape[-1], images.shape[-2])
        start = time.perf_counter()
        resized = self.resize_for_features(images.to(self.device))
        features = self.extractor(resized)
        for feats in features:
            feats["keypoints"] = to_original_pixels(feats["keypoints"], (resized.shape[-1], resized.shape[-2]),
                                                    original_wh)
            feats["image_size"] = np.array(original_wh, dtype=np.int64)
        extract = time.perf_counter() - start

        start = time.perf_counter()
        retrieved = []
        for b, feats in enumerate(features):
            descriptor = self.retrieval.describe(resized[b] if self.retrieval.needs_images else None, feats)
            ranked = rank_database(descriptor, self.db_global)
            retrieved.append(ranked if self.retrieval.exhaustive else ranked[: self.top_k])
        retrieve = time.perf_counter() - start

        start = time.perf_counter()
        matches = self._match(features, retrieved)
        match = time.perf_counter() - start

        def solve(b: int) -> QueryPose:
            start = time.perf_counter()
            pose = self._pose_from_matches(names[b], features[b], retrieved[b], matches[b])
            pose.times = {k: round(v, 6) for k, v in {"extract": extract / batch, "retrieve": retrieve / batch,
                                                       "match": match / batch,
                                                       "pnp": time.perf_counter() - start}.items()}
            return pose

        if self.pnp_pool is not None and batch > 1:
            return list(self.pnp_pool.map(solve, range(batch)))
        return [solve(b) for b in range(batch)]

    def _match(self, features: list[dict], retrieved: list[np.ndarray]) -> list[dict[str, tuple]]:
        """Per query, db name -> (matches0, scores0) for each retrieved db image."""
        prepared = [self.matcher.prepare(feats) for feats in features]
        if not self.batched_matching:
            return [{self.db_names[i]: self.matcher(prepared[b], self.db_prepared[i]) for i in retrieved[b]}
                    for b in range(len(features))]
        pairs = [(prepared[b], self.db_prepared[i]) for b in range(len(features)) for i in retrieved[b]]
        flat = iter(match_pairs_batched(self.matcher.model, pairs, self.pairs_per_call))
        return [{self.db_names[i]: next(flat) for i in retrieved[b]} for b in range(len(features))]

    def _pose_from_matches(self, name: str, features: dict, retrieved: np.ndarray, matches: dict) -> QueryPose:
        """PnP over the 2D-3D correspondences, with the localize stage's fallback rule."""
        query_idx, point_ids, per_db = self._correspondences(retrieved, matches)
        pose = self._estimate_pose(name, features["keypoints"], query_idx, point_ids)
        if not pose.success:
            best = retrieved[int(np.argmax(per_db))] if len(retrieved) else 0
            pose.w2c, pose.fallback = self.db_w2c[best].copy(), FALLBACK_RETRIEVED
        pose.retrieved = [self.db_names[i] for i in retrieved]
        return pose
