"""Localizing images that are already in memory, one or a batch at a time.

:class:`splatpose.sfm.Localizer` localizes an image file; a detector has the image decoded already
(it also scores it) and wants batches on a GPU. :class:`ImageLocalizer` adds that entry point to the
same localizer: the same extractor, retrieval, matcher, 2D-3D tables, PnP and fallback rule, so a
test image localized here gets the pose the evaluation's localize stage gave it. What batching
changes:

- extraction: one network pass over the batch (same-size images); on CUDA with ``cuda_graphs``, ALIKED
  replays a CUDA graph (:mod:`splatpose.detect.static_aliked`, the same features up to rounding);
- matching: "static" pads every query to a few fixed lengths against a db padded once and replays
  LightGlue from CUDA graphs (:mod:`splatpose.detect.static_lightglue`); "batched" runs every (query,
  retrieved db image) pair of the batch in one padded eager pass (:mod:`splatpose.detect.batched_lightglue`);
  "sequential" matches pair by pair exactly as the localize stage does; "auto" is static on CUDA and
  sequential on the CPU, where padding gains nothing and sequential matching reproduces the
  evaluation run bit for bit. :attr:`ImageLocalizer.matching_path` says which path ran.

Per-query times of a batched stage are the batch's time divided by the batch size. A batch is localized
in two halves, :meth:`ImageLocalizer.start_localization` (device stages; PnP handed to a host pool) and
:meth:`ImageLocalizer.finish_localization` (PnP results, second try), so that a caller can run another
batch's device stages while the host solves this one's PnP problems (``Detector.detect_stream``).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from splatpose.sfm.features import AlikedExtractor
from splatpose.sfm.localization import Localizer, QueryPose
from splatpose.sfm.matchers import LightGlueMatcher

from splatpose.detect.batched_lightglue import match_pairs_batched
from splatpose.detect.cuda_graphs import GraphCache
from splatpose.detect.static_aliked import GraphedAliked
from splatpose.detect.static_lightglue import DEFAULT_LENGTHS, StaticLightGlue

log = logging.getLogger(__name__)

MATCHING_MODES = ("auto", "sequential", "batched", "static")


@dataclass
class PendingPoses:
    """A batch localized up to PnP (:meth:`ImageLocalizer.start_localization`), one entry per query in
    batch order: features, db ranking, the first try's db images and matches (db name -> (matches0,
    scores0)); ``times``: per-query seconds of extract, retrieve and match (the batch's split evenly);
    ``solving``: the PnP problems' futures in the host pool, or None when
    :meth:`ImageLocalizer.finish_localization` solves them."""

    names: list[str]
    features: list[dict]
    ranked: list[np.ndarray]
    retrieved: list[np.ndarray]
    matches: list[dict]
    times: dict[str, float]
    solving: list[Future] | None = None


def resolve_matching(matching: str, device: str, matcher) -> str:
    """The matching path ("sequential" | "batched" | "static") that ``matching`` means on ``device``.

    Only LightGlue has batched and static paths; other matchers always match pair by pair.
    """
    if matching not in MATCHING_MODES:
        raise ValueError(f"detect.matching={matching!r} is unknown; choose one of {', '.join(MATCHING_MODES)}")
    if not isinstance(matcher, LightGlueMatcher):
        return "sequential"
    if matching == "auto":
        return "static" if str(device).startswith("cuda") else "sequential"
    return matching


class ImageLocalizer(Localizer):
    """A :class:`Localizer` over decoded images, single or batched (arguments as Localizer's, plus
    ``matching``; ``pairs_per_call``: LightGlue pairs per forward pass when batched or static;
    ``pnp_workers``: threads solving the PnP problems of a batch at once, as PoseLib and pycolmap release
    the GIL while they solve; ``static_lengths``, ``lightglue_precision``, ``cuda_graphs``, ``lightglue_compile``:
    the static path's query lengths, precision, graph replay and compilation, see :class:`StaticLightGlue`;
    ``graph_cache``: where ALIKED's and static LightGlue's CUDA graphs are kept, the detector's
    :class:`~splatpose.detect.cuda_graphs.GraphCache`; default: one each)."""

    def __init__(self, *args, matching: str = "auto", pairs_per_call: int = 32, pnp_workers: int = 1,
                 static_lengths=DEFAULT_LENGTHS, lightglue_precision: str = "fp32", cuda_graphs: bool = True,
                 lightglue_compile: bool = False, graph_cache: GraphCache | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs_per_call = int(pairs_per_call)
        self.pnp_pool = ThreadPoolExecutor(int(pnp_workers), "pnp") if int(pnp_workers) > 1 else None
        self.static_options = {"lengths": tuple(static_lengths), "precision": lightglue_precision,
                               "cuda_graphs": bool(cuda_graphs), "compile": bool(lightglue_compile),
                               "cache": graph_cache}
        self.static: StaticLightGlue | None = None
        self.static_failure: str | None = None
        self.set_matching(matching)
        if isinstance(self.extractor, AlikedExtractor) and cuda_graphs and str(self.device).startswith("cuda"):
            self.extractor = GraphedAliked(self.extractor, cache=graph_cache)

    @property
    def extract_path(self) -> str:
        """What extracted the last queries' features: the static ALIKED's path, or "eager"."""
        return self.extractor.path if isinstance(self.extractor, GraphedAliked) else "eager"

    def set_matching(self, matching: str) -> None:
        """Switch the matching mode ("auto" | "sequential" | "batched" | "static")."""
        self.matching = resolve_matching(matching, self.device, self.matcher)
        if self.matching == "static" and self.static is None:
            self.static = StaticLightGlue(self.matcher.model, self.db_prepared, **self.static_options)

    @property
    def matching_path(self) -> str:
        """What matched the last queries: "sequential", "batched", or the static path's description."""
        if self.matching == "static":
            return self.static.path
        return self.matching if self.static_failure is None else f"{self.matching} ({self.static_failure})"

    def resize_for_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> the size features are extracted at (the run's :class:`FeatureSize`, as
        ``load_image_tensor`` applies it to files)."""
        return self.feature_size.resized(images)

    def localize_images(self, images: torch.Tensor, names: list[str]) -> list[QueryPose]:
        """Poses of a batch of same-size images.

        Args:
            images: [B, 3, H, W] float32 in [0, 1], white background, on any device.
            names: one name per image (recorded in the QueryPose).
        Returns:
            one QueryPose per image; ``times`` holds per-image seconds of extract, retrieve, match and
            pnp (a batched stage's time split evenly), and pnp_wait (see :meth:`finish_localization`).
            Never raises for an image that cannot be localized: it gets the fallback pose and
            ``success=False``.
        """
        return self.finish_localization(self.start_localization(images, names))

    def start_localization(self, images: torch.Tensor, names: list[str]) -> "PendingPoses":
        """The first half of :meth:`localize_images` (same arguments): extract, retrieve and match the batch
        (device work, done when this returns), then hand its PnP problems to the host pool
        (``pnp_workers`` > 1 and more than one image; else :meth:`finish_localization` solves them) and
        return without waiting for them, so that the caller can drive the device meanwhile (the next
        batch's extraction and matching). A query's pose does not depend on what runs beside its PnP."""
        batch = len(names)
        start = time.perf_counter()
        resized = self.resize_for_features(images.to(self.device))
        features = self.extract(resized, (images.shape[-1], images.shape[-2]))
        extract = time.perf_counter() - start

        start = time.perf_counter()
        ranked = [self.rank(feats, resized[b]) for b, feats in enumerate(features)]
        retrieved = [self.first_try(r) for r in ranked]
        retrieve = time.perf_counter() - start

        start = time.perf_counter()
        matches = self._match(features, retrieved)
        match = time.perf_counter() - start

        pending = PendingPoses(list(names), features, ranked, retrieved, matches,
                               {"extract": extract / batch, "retrieve": retrieve / batch, "match": match / batch})
        if self.pnp_pool is not None and batch > 1:
            pending.solving = [self.pnp_pool.submit(self._solve, pending, b) for b in range(batch)]
        return pending

    def finish_localization(self, pending: "PendingPoses") -> list[QueryPose]:
        """The poses of a batch that :meth:`start_localization` began, in its order: its PnP results (waited
        for, or solved here), then the second try of the queries whose first try failed (device matching
        again, see :meth:`_second_try`). Each pose's ``times`` gains "pnp_wait": the seconds this call waited
        for the batch's PnP results, split evenly (the part of PnP that other work did not hide; without
        anything between the two halves, the batch's PnP wall time). Re-raises an error of a PnP problem."""
        start = time.perf_counter()
        if pending.solving is None:
            poses = [self._solve(pending, b) for b in range(len(pending.names))]
        else:
            poses = [future.result() for future in pending.solving]
        wait = round((time.perf_counter() - start) / len(poses), 6)
        for pose in poses:
            pose.times["pnp_wait"] = wait
        return self._second_try(poses, pending.features, pending.ranked, pending.matches)

    def _solve(self, pending: "PendingPoses", b: int) -> QueryPose:
        """Query ``b``'s first-try pose from its matches (in a pool thread or the caller's); its times: the
        batch's device stages split evenly, and its own PnP seconds."""
        start = time.perf_counter()
        pose = self.pose_from_matches(pending.names[b], pending.features[b], pending.retrieved[b], pending.matches[b])
        pose.times = {k: round(v, 6) for k, v in {**pending.times, "pnp": time.perf_counter() - start}.items()}
        return pose

    def _second_try(self, poses: list[QueryPose], features: list[dict], ranked: list[np.ndarray],
                    matches: list[dict]) -> list[QueryPose]:
        """The queries whose first try failed, matched against further db images (``second_try``) in one
        batched call, and solved again over the matches of both tries."""
        more = {b: self.second_try(pose, ranked[b]) for b, pose in enumerate(poses)}
        again = [b for b, views in more.items() if len(views)]
        if not again:
            return poses
        start = time.perf_counter()
        for b, found in zip(again, self._match([features[b] for b in again], [more[b] for b in again])):
            matches[b].update(found)
        retried = {b: self.retry_pose(poses[b], features[b], ranked[b], matches[b]) for b in again}
        seconds = round((time.perf_counter() - start) / len(again), 6)  # the batched call split evenly
        for b, pose in retried.items():
            pose.times = {**poses[b].times, "retry": seconds}
            poses[b] = pose
        return poses

    def _match(self, features: list[dict], retrieved: list[np.ndarray]) -> list[dict[str, tuple]]:
        """Per query, db name -> (matches0, scores0) for each retrieved db image."""
        prepared = [self.matcher.prepare(feats) for feats in features]
        if self.matching == "static":
            try:
                matched = self.static.match(prepared, [list(r) for r in retrieved], self.pairs_per_call)
                return [dict(zip((self.db_names[i] for i in retrieved[b]), matched[b])) for b in range(len(features))]
            except RuntimeError as error:  # e.g. out of memory at a new shape: the eager padded pass still works
                log.warning("static LightGlue failed (%s: %s); matching with the eager padded pass from now on",
                            type(error).__name__, error)
                self.matching, self.static_failure = "batched", f"static failed: {type(error).__name__}"
        if self.matching == "sequential":
            return [{self.db_names[i]: self.matcher(prepared[b], self.db_prepared[i]) for i in retrieved[b]}
                    for b in range(len(features))]
        pairs = [(prepared[b], self.db_prepared[i]) for b in range(len(features)) for i in retrieved[b]]
        flat = iter(match_pairs_batched(self.matcher.model, pairs, self.pairs_per_call))
        return [{self.db_names[i]: next(flat) for i in retrieved[b]} for b in range(len(features))]
