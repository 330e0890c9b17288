"""Real-time anomaly detection on new images with a finished evaluation run.

    detector = Detector.from_run("outputs/runs/synthetic/01Ant/<time>")      # load once
    detector.warm_up()                                                       # GPU: compile and capture now
    detection = detector.detect("new_part.png")                              # one image
    for d in detector.detect_stream(paths, batch_size=16): ...              # throughput

Loading reads the run once: the SfM reference (db features on the device, 2D-3D tables, retrieval
vocabulary) through :class:`splatpose.detect.localization.ImageLocalizer`, the Gaussians, the scorer
backbone and the run's map normalisation. Per image (or per batch) it then runs

    load -> extract -> retrieve -> match -> pnp -> [refine] -> render -> score

and returns a :class:`Detection`: the anomaly map normalised with the evaluation run's fixed
``map_range`` (not a per-batch min-max, so one image's score means the same alone or in a batch),
the image score (max of the map), the pose, whether PnP localized it, its inliers, flags, and the
seconds of every stage. A bad input (unreadable, unusable size) becomes a Detection with ``ok=False``
and an error message; the rest of the batch goes on (:mod:`splatpose.detect.inputs`).

On a GPU, ALIKED, LightGlue (at fixed padded shapes, ``detect.matching: static``) and the scorer
replay CUDA graphs (``detect.cuda_graphs``; each falls back to eager execution when capture fails,
and :meth:`Detector.paths` says what ran), and in batched mode files are decoded and PnP problems
solved in threads (``detect.load_workers``, ``detect.pnp_workers``). ``detect_stream`` overlaps the host and
the device (``detect.pipeline``): a batch's PnP problems are solved while the next batch's device stages run.
Latency and throughput: experiments/bench_detector.py, experiments/results/detector_*.md.

On the evaluation run's own test images, with sequential matching and the run's own refinement, the maps equal
the evaluation's maps (tests/test_detector.py). ``python run.py task=detect`` calls :func:`detect_task`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from splatpose.detect.cuda_graphs import GraphCache, GraphedScorer
from splatpose.detect.finished_run import FinishedRun, load_finished_run
from splatpose.detect.inputs import (EncodedImage, InputError, LoadedImage, display_names, expand_inputs, load_input,
                                     pixels_to_float_torch)
from splatpose.detect.localization import ImageLocalizer, PendingPoses
from splatpose.metrics import normalise_maps
from splatpose.refine.queries import PoseSettler
from splatpose.scoring.anomaly_maps import build_scorer
from splatpose.scoring.uncertainty import expected_maps
from splatpose.splat.ply import load_gaussians
from splatpose.splat.rendering import render

log = logging.getLogger(__name__)

# splatpose/conf: the repository's conf/ (a symlink in a checkout, packaged in a wheel).
DEFAULTS_FILE = Path(__file__).resolve().parent.parent / "conf" / "detect" / "default.yaml"
STAGES = ("load", "upload", "extract", "retrieve", "match", "pnp", "refine", "render", "score")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu' (as the pipeline resolves it)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} was asked for but CUDA is not available; use device=cpu or auto")
    return str(device)


def worker_threads(setting) -> int:
    """detect.load_workers / pnp_workers: a number, or "auto": one per CPU core, at most 8."""
    if setting == "auto":
        return max(1, min(8, os.cpu_count() or 1))
    if int(setting) < 1:
        raise ValueError(f"worker threads must be >= 1 or auto, got {setting!r}")
    return int(setting)


def default_detect_config() -> DictConfig:
    """The ``detect`` node of conf/detect/default.yaml (what Hydra composes for task=detect)."""
    return OmegaConf.load(DEFAULTS_FILE).detect


@dataclass
class Detection:
    """The result for one input image.

    anomaly_map: [S, S] float32, normalised with the run's map_range (0..1 on the evaluation's test
        set; a new image may go beyond 1). None when ``ok`` is False.
    score: the image score of anomaly_map as the run's scorer defines it (its maximum, or its largest excess
        over its local background: :mod:`splatpose.scoring.image_score`); anomalous: score >= detect.threshold
        (None without a threshold).
    localized: the final pose has a path (``pose_path`` "pnp" or "recovered", see
        :class:`splatpose.refine.queries.PoseSettler`); otherwise (``pose_path`` "failed") ``w2c`` is a best
        effort and the map is unreliable (flag "not_localized"). A pose kept although neither PnP's nor the
        recovery's lined up is localized but flagged "not_lined_up" (its map is doubtful). confidence: the
        render's alignment with the image ({"iou", "l1"}); recovery: what the recovery through the splats
        did; symmetry: what the check against the scene's near-symmetric turns did; second_opinion: what the
        second opinion on a doubtful pose did; turn_polish: what the search of the turn about the part's
        axis did (each None when it did not run).
    w2c: [4, 4] float64 world-to-camera (OpenCV) used for the render (after refinement, if any);
        w2c_pnp: the pose before refinement.
    flags: notes such as "grayscale", "resized_from_640x480", "not_localized", "not_lined_up".
    times: seconds per stage (STAGES) and "total" (their sum), a batched stage's time split over its images;
        "pnp": the query's own PnP solve (in a host pool thread when batched); "pnp_wait": how long the
        host waited for its batch's PnP results (split); "stages_wall": the host's wall time on its batch
        from upload to maps, split (all stages but load, with what no stage clock covers). In a pipelined
        ``detect_stream`` (``detect.pipeline``) a batch's PnP runs while the next batch is uploaded,
        extracted and matched: then "pnp" is hidden behind that work but for "pnp_wait", "total" (which
        counts "pnp" whole) can exceed "stages_wall", "stages_wall" leaves out the other batch's stages
        run between the batch's two halves (summed over a stream: its wall time less the waits for files),
        and the extract, retrieve and match clocks run while PnP threads share the host's cores.
    query, render: [H, W, 3] float32 images, kept only when asked (for overlays).
    """

    name: str
    source: str
    ok: bool = False
    error: str | None = None
    flags: list[str] = field(default_factory=list)
    anomaly_map: np.ndarray | None = None
    score: float | None = None
    anomalous: bool | None = None
    localized: bool = False
    pose_path: str = "failed"
    num_inliers: int = 0
    num_matches: int = 0
    fallback: str | None = None
    w2c: np.ndarray | None = None
    w2c_pnp: np.ndarray | None = None
    retrieved: list[str] = field(default_factory=list)
    refinement: dict | None = None
    confidence: dict | None = None
    recovery: dict | None = None
    symmetry: dict | None = None
    second_opinion: dict | None = None
    turn_polish: dict | None = None
    times: dict[str, float] = field(default_factory=dict)
    query: np.ndarray | None = None
    render: np.ndarray | None = None

    def record(self) -> dict:
        """JSON-able summary (poses as nested lists, no images or maps)."""
        return {"name": self.name, "source": self.source, "ok": self.ok, "error": self.error,
                "flags": self.flags, "score": self.score, "anomalous": self.anomalous,
                "localized": self.localized, "pose_path": self.pose_path, "confidence": self.confidence,
                "recovery": self.recovery, "symmetry": self.symmetry, "second_opinion": self.second_opinion,
                "turn_polish": self.turn_polish,
                "num_inliers": self.num_inliers, "num_matches": self.num_matches,
                "fallback": self.fallback, "retrieved": self.retrieved, "refinement": self.refinement,
                "w2c": None if self.w2c is None else np.asarray(self.w2c).tolist(),
                "w2c_pnp": None if self.w2c_pnp is None else np.asarray(self.w2c_pnp).tolist(),
                "times": self.times}


@dataclass
class _Started:
    """A batch after :meth:`Detector._start_stages`: its (Detection, image) pairs, the queries on the device
    ([B, 3, H, W] float32), its localization waiting for PnP, the upload's seconds and the host's wall
    seconds of that first half."""

    items: list[tuple[Detection, LoadedImage]]
    queries: torch.Tensor
    pending: PendingPoses
    upload_seconds: float
    start_seconds: float


@dataclass
class _Batch:
    """A batch between :meth:`Detector._begin` and :meth:`Detector._complete`: every input's Detection in
    order, the (Detection, image) pairs that loaded, and what their first half gave (``started``) or the
    error that stopped it."""

    detections: list[Detection]
    items: list[tuple[Detection, LoadedImage]]
    started: _Started | None = None
    error: Exception | None = None


class Detector:
    """Scores new images against one finished run; build once, call per image or per batch.

    Args:
        run: the finished run (:func:`splatpose.detect.finished_run.load_finished_run`).
        cfg: the ``detect`` node (conf/detect/default.yaml; missing keys take those defaults).
        device: "auto" | "cpu" | "cuda[:i]".
    """

    def __init__(self, run: FinishedRun, cfg: DictConfig | dict | None = None, device: str = "auto"):
        start = time.perf_counter()
        self.cfg = OmegaConf.merge(default_detect_config(), cfg or {})
        self.run = run
        self.device = resolve_device(device)
        if self.device.startswith("cuda") and self.cfg.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
            torch.backends.cudnn.deterministic = False
        self.width, self.height = run.width, run.height
        self.lo, self.hi = run.map_range
        use_graphs = self.device.startswith("cuda") and self.cfg.cuda_graphs
        # every accelerator's CUDA graphs in one cache, bounded per batch size (see GraphCache)
        self.graph_cache = GraphCache(self.cfg.graph_batch_sizes, self.device) if use_graphs else None
        self.localizer = ImageLocalizer(run.K, run.width, run.height, run.config.sfm, run.reference, run.db_w2c,
                                        self.device, matching=self.cfg.matching,
                                        pairs_per_call=self.cfg.pairs_per_call,
                                        pnp_workers=worker_threads(self.cfg.pnp_workers),
                                        static_lengths=self.cfg.static_lengths,
                                        lightglue_precision=self.cfg.lightglue_precision,
                                        lightglue_compile=self.cfg.lightglue_compile,
                                        cuda_graphs=self.cfg.cuda_graphs, graph_cache=self.graph_cache)
        self.gaussians = load_gaussians(run.gaussians_ply, self.device)
        self.expected_scores = (None if run.expected_scores is None else
                                torch.as_tensor(run.expected_scores, device=self.device))
        self.scorer = build_scorer(run.config.scorer, self.device)
        self.scorer.sheen_allowance = run.sheen_allowance
        self.score_maps = GraphedScorer(self.scorer, self.graph_cache) if use_graphs else self.scorer
        self.backend = self.cfg.render_backend or run.config.splat.get("backend", "auto")
        self.K = torch.as_tensor(run.K, dtype=torch.float32, device=self.device)
        # The run's own refinement unless overridden (a run config without a refine node: none).
        self.refine_cfg = self.cfg.refine if self.cfg.refine is not None else run.config.get("refine")
        self.settler = None
        if self.refine_cfg is not None and self.refine_cfg.enabled:
            # the run's search views when it kept them; else rendered at the first query that needs them
            self.settler = PoseSettler(self.gaussians, run.K, run.width, run.height, self.refine_cfg, run.db_w2c,
                                       run.search_views, backend=self.backend, scorer=self.scorer)
            self.settler.typical_l1 = run.typical_l1
        self._staging: dict[tuple, torch.Tensor] = {}  # page-locked upload buffers per batch shape
        self._pinning_failed = False
        self._loader = ThreadPoolExecutor(max_workers=worker_threads(self.cfg.load_workers),
                                          thread_name_prefix="detect-load")
        self.setup_seconds = time.perf_counter() - start
        self.warm_up_seconds = 0.0
        self.background_fast_decode = False  # what detect_stream's threads decode with (see _prefetch)
        log.info("Detector for %s/%s ready in %.1f s on %s (%d Gaussians, matching %s, refine %s)",
                 run.config.dataset.name, run.class_name, self.setup_seconds, self.device, len(self.gaussians),
                 self.localizer.matching_path, "on" if self.settler else "off")

    @classmethod
    def from_run(cls, run_dir: Path | str, cfg: DictConfig | dict | None = None, device: str = "auto") -> "Detector":
        """A detector for the finished run in ``run_dir`` (the folder holding results.json)."""
        return cls(load_finished_run(run_dir), cfg, device)

    # ----------------------------------------------------------------------------------------------
    # Entry points

    def detect(self, source, name: str | None = None, keep_images: bool = False) -> Detection:
        """One image: a file path, an :class:`~splatpose.detect.inputs.EncodedImage` (a file's bytes), a
        decoded [H, W, 3] float array in [0, 1], or the :class:`LoadedImage` that ``prepare`` returned."""
        return self.detect_batch([source], None if name is None else [name], keep_images)[0]

    def detect_batch(self, sources: list, names: list[str] | None = None, keep_images: bool = False) -> list[Detection]:
        """A batch of images (any source ``detect`` takes), processed together; one Detection per source,
        in order."""
        loaded = [self._load(source) for source in sources]
        return self._complete(self._begin(sources, names, loaded), keep_images)

    def detect_stream(self, sources: Iterable, names: list[str] | None = None, batch_size: int | None = None,
                      keep_images: bool = False, pipeline: bool | None = None) -> Iterator[Detection]:
        """Detections for many images, ``batch_size`` at a time (default ``detect.batch_size``), in input
        order; each batch's detections are those ``detect_batch`` gives for it.

        The next batch's files are decoded in background threads while the current batch runs. With
        ``pipeline`` (default ``detect.pipeline``) the host and the device also work at once: batch k's PnP
        problems are solved in the host pool (``detect.pnp_workers``) while batch k+1 is uploaded,
        extracted and matched on the device; then batch k finishes (its PnP results, refinement, render,
        score) and its detections come out. The poses and maps are the same either way (the batches
        share no state); only the stage clocks read otherwise (see :class:`Detection`'s ``times``).
        """
        sources = list(sources)
        names = names or [self._default_name(s, i) for i, s in enumerate(sources)]
        size = int(batch_size or self.cfg.batch_size)
        overlap = bool(self.cfg.pipeline if pipeline is None else pipeline)
        batches = [range(i, min(i + size, len(sources))) for i in range(0, len(sources), size)]
        pending = self._prefetch([sources[i] for i in batches[0]]) if batches else []
        in_flight = None  # the batch begun last, its PnP problems still in the host pool
        for k, batch in enumerate(batches):
            loaded = [future.result() for future in pending]
            if k + 1 < len(batches):
                pending = self._prefetch([sources[i] for i in batches[k + 1]])
            begun = self._begin([sources[i] for i in batch], [names[i] for i in batch], loaded)
            if in_flight is not None:
                yield from self._complete(in_flight, keep_images)
            in_flight = begun
            if not overlap:
                yield from self._complete(in_flight, keep_images)
                in_flight = None
        if in_flight is not None:
            yield from self._complete(in_flight, keep_images)

    def warm_up(self, batch_size: int = 1) -> list[Detection]:
        """Detect renders of the run's first db views once, so that the CUDA graphs are captured and
        LightGlue's steps compiled before the first real image: on a fresh GPU machine that takes about
        a minute, which would otherwise land on the first image (on the CPU it costs one detection).
        Returns those detections (the log says how many localized: renders of well-trained splats
        localize near their db views' poses)."""
        start = time.perf_counter()
        views = [i % len(self.run.db_w2c) for i in range(batch_size)]
        renders = self.render_references(self.run.db_w2c[views]).cpu().numpy()
        names = [f"warm-up/{self.run.reference.db_names[i]}" for i in views]
        detections = self.detect_batch(list(renders), names)
        shapes = self._capture_matching_shapes(batch_size)
        self.warm_up_seconds = time.perf_counter() - start
        log.info("Detector warmed up in %.1f s on renders of %d db views (%d localized; %d more LightGlue shapes "
                 "captured; paths: %s)", self.warm_up_seconds, len(detections), sum(d.localized for d in detections),
                 shapes, self.paths())
        return detections

    def _capture_matching_shapes(self, batch_size: int) -> int:
        """The static LightGlue's graphs for every keypoint count a query of a ``batch_size`` batch can have
        (one render found one shape; a query with more or fewer keypoints would capture its own at first
        sight, inside its latency). Returns how many shapes were captured."""
        localizer = self.localizer
        if localizer.matching != "static" or localizer.static is None:
            return 0
        pairs_per_query = len(localizer.db_names) if localizer.retrieval.exhaustive else min(localizer.top_k,
                                                                                               len(localizer.db_names))
        queries_per_call = max(1, min(batch_size, localizer.pairs_per_call // max(pairs_per_query, 1)))
        with self._serving(batch_size):
            return localizer.static.capture_shapes(queries_per_call, pairs_per_query, localizer.max_keypoints)

    # ----------------------------------------------------------------------------------------------
    # Stages

    def _prefetch(self, sources: list) -> list:
        # Pillow in these threads: it releases the GIL while it decodes, so the decoding hides behind
        # the current batch; libspng holds it and would stall the thread that drives the GPU
        return [self._loader.submit(self._load, source, self.background_fast_decode) for source in sources]

    def prepare(self, source) -> LoadedImage:
        """Decode and check one input for this run (size policy, flags) ahead of ``detect``, e.g. outside
        a lock that serialises inference; its detection reports this call's time as its load stage. Raises
        InputError for an input that cannot be scored."""
        start = time.perf_counter()
        loaded = load_input(source, self.width, self.height, self.cfg.on_size_mismatch)
        loaded.load_seconds = time.perf_counter() - start
        return loaded

    def _load(self, source, fast_decode: bool = True) -> tuple[LoadedImage | InputError, float]:
        if isinstance(source, LoadedImage):
            return source, source.load_seconds
        start = time.perf_counter()
        try:
            result = load_input(source, self.width, self.height, self.cfg.on_size_mismatch, fast_decode)
        except InputError as error:
            result = error
        return result, time.perf_counter() - start

    @staticmethod
    def _default_name(source, index: int) -> str:
        if isinstance(source, EncodedImage):
            return source.name
        return Path(source).name if isinstance(source, (str, Path)) else f"image_{index}"

    def _begin(self, sources: list, names: list[str] | None, loaded: list) -> "_Batch":
        """A batch's Detections (load errors recorded) and its device stages up to PnP
        (:meth:`_start_stages`) for the images that loaded. Never raises: an error of those stages is kept
        in the batch for :meth:`_complete`."""
        names = names or [self._default_name(s, i) for i, s in enumerate(sources)]
        detections = [Detection(name=name, source=str(s) if isinstance(s, (str, Path, EncodedImage)) else "<array>")
                      for name, s in zip(names, sources)]
        good = []
        for detection, (result, seconds) in zip(detections, loaded):
            detection.times["load"] = round(seconds, 6)
            if isinstance(result, InputError):
                detection.error = str(result)
            else:
                detection.flags += result.flags
                good.append((detection, result))
        batch = _Batch(detections, good)
        if good:
            try:
                batch.started = self._start_stages(good)
            except Exception as error:  # handled in _complete, as an error of the later stages is
                batch.error = error
        return batch

    def _complete(self, batch: "_Batch", keep_images: bool) -> list[Detection]:
        """Finish a batch that :meth:`_begin` began (:meth:`_finish_stages`) and return its Detections in
        input order. When a stage failed for the batch, its images are detected again one by one, so that
        one image's unexpected failure does not lose the others (that image gets ``ok=False`` and the
        error)."""
        good = batch.items
        if good and batch.error is None:
            try:
                self._finish_stages(batch.started, keep_images)
                return batch.detections
            except Exception as error:
                batch.error = error
        if not good:
            return batch.detections
        error = batch.error
        if len(good) == 1:
            log.error("detection failed for %s", good[0][0].source, exc_info=error)
            good[0][0].error = f"{type(error).__name__}: {error}"
            return batch.detections
        log.warning("a batch of %d images failed (%s: %s); scoring them one by one", len(good),
                    type(error).__name__, error)
        for detection, image in good:
            detection.flags, detection.times = list(image.flags), {"load": detection.times["load"]}
            try:
                self._finish_stages(self._start_stages([(detection, image)]), keep_images)
            except Exception as single_error:
                log.exception("detection failed for %s", detection.source)
                detection.error = f"{type(single_error).__name__}: {single_error}"
        return batch.detections

    def _start_stages(self, items: list[tuple[Detection, LoadedImage]]) -> "_Started":
        """Upload, extract, retrieve and match a batch (the device's work, done on return) and hand its PnP
        problems to the host pool (:meth:`ImageLocalizer.start_localization`)."""
        start = time.perf_counter()
        queries = self._upload([image for _, image in items])  # [B, 3, H, W] float32
        upload_seconds = self._clock() - start
        with self._serving(len(items)):
            pending = self.localizer.start_localization(queries, [d.name for d, _ in items])
        return _Started(items, queries, pending, upload_seconds, time.perf_counter() - start)

    def _finish_stages(self, started: "_Started", keep_images: bool) -> None:
        """The rest of a batch that :meth:`_start_stages` began: its poses (PnP results, second try), the
        settling (refinement, recovery) when configured, the renders at the final poses and the maps,
        written into its Detections."""
        items, queries = started.items, started.queries
        batch = len(items)
        finish_start = time.perf_counter()
        with self._serving(batch):  # a second try matches again
            poses = self.localizer.finish_localization(started.pending)
        w2c = np.stack([pose.w2c for pose in poses])
        for b, ((detection, _), pose) in enumerate(zip(items, poses)):
            detection.times["upload"] = round(started.upload_seconds / batch, 6)
            detection.times.update(pose.times)
            detection.fallback = pose.fallback
            detection.num_inliers, detection.num_matches = int(pose.num_inliers), int(pose.num_matches)
            detection.retrieved, detection.w2c_pnp = list(pose.retrieved), pose.w2c.copy()
            detection.times["refine"] = 0.0
            detection.localized, detection.pose_path = bool(pose.success), "pnp" if pose.success else "failed"
            if self.settler is not None:
                start = time.perf_counter()
                final = self.settler.settle(queries[b], pose)
                w2c[b] = final.w2c
                detection.localized, detection.pose_path = final.localized, final.path
                detection.refinement, detection.confidence = final.refinement, final.confidence
                detection.recovery, detection.symmetry = final.recovery, final.symmetry
                detection.second_opinion, detection.turn_polish = final.second_opinion, final.turn_polish
                detection.times["refine"] = round(time.perf_counter() - start, 6)
            if not detection.localized:
                detection.flags.append("not_localized")
            elif self.settler is not None and not final.lines_up:
                detection.flags.append("not_lined_up")

        start = self._clock()
        # alpha only for a scorer that reads it: without one the scorer replays its CUDA graph
        renders, alphas = self.render_references(w2c, return_alpha=True)
        alphas = alphas if getattr(self.scorer, "uses_alpha", False) else None
        expected = self.expected_maps(w2c)
        render_seconds = self._clock() - start

        start = self._clock()
        with self._serving(batch):
            maps = self.score(queries, renders, alphas, expected).float()
            scores = self.scorer.image_scores(maps).cpu().tolist()
            maps_np = maps.cpu().numpy()
        score_seconds = self._clock() - start

        threshold = self.cfg.threshold
        renders_np = renders.cpu().numpy() if keep_images else None
        queries_np = queries.permute(0, 2, 3, 1).cpu().numpy() if keep_images else None
        for b, (detection, image) in enumerate(items):
            detection.ok = True
            detection.w2c = w2c[b].copy()
            detection.anomaly_map = maps_np[b]
            detection.score = scores[b]
            detection.anomalous = None if threshold is None else bool(detection.score >= float(threshold))
            detection.times["render"] = round(render_seconds / batch, 6)
            detection.times["score"] = round(score_seconds / batch, 6)
            detection.times["total"] = round(sum(detection.times.get(s, 0.0) for s in STAGES), 6)
            # the host's wall time on this batch, both halves (not another batch's work between them), per
            # image: total minus this is load plus bookkeeping, or with the pipeline PnP hidden behind the device
            wall = started.start_seconds + time.perf_counter() - finish_start
            detection.times["stages_wall"] = round(wall / batch, 6)
            if keep_images:
                detection.query = queries_np[b]
                detection.render = renders_np[b]

    def paths(self) -> dict[str, str]:
        """Which implementation ran each accelerated stage (a fast path that failed says so)."""
        graphed = isinstance(self.score_maps, GraphedScorer) and not self.score_maps.failed
        return {"extract": self.localizer.extract_path, "matching": self.localizer.matching_path,
                "score": "cuda_graph" if graphed else "eager"}

    def graph_stats(self) -> dict:
        """The CUDA graphs kept and released (:meth:`GraphCache.stats`: batch sizes kept, graphs per
        accelerator, releases, device memory); empty without CUDA graphs."""
        return self.graph_cache.stats() if self.graph_cache is not None else {}

    def _serving(self, batch_size: int):
        """The context in which a batch of ``batch_size`` images replays and captures its CUDA graphs."""
        return self.graph_cache.serving(batch_size) if self.graph_cache is not None else contextlib.nullcontext()

    def _upload(self, images: list[LoadedImage]) -> torch.Tensor:
        """Loaded images -> one [B, 3, H, W] float32 tensor on the device, white background.

        Files at the run's size travel as the decoded uint8 pixels (a quarter of the float bytes),
        through a page-locked buffer kept per batch shape, and become floats on the device
        (``pixels_to_float_torch``, equal to the CPU's ``read_image`` to the bit), which makes the upload
        stage several times shorter than float32 staged on the host
        (experiments/results/detector_h100_2026-11-24.md). Arrays and resized images (float already) are
        stacked and copied as they are.
        """
        shapes = {None if image.pixels is None else image.pixels.shape for image in images}
        if len(shapes) != 1 or None in shapes:
            return torch.stack([image.float_image() for image in images]).to(self.device)
        pixels = self._staged([image.pixels for image in images])
        return pixels_to_float_torch(pixels.to(self.device, non_blocking=True)).permute(0, 3, 1, 2).contiguous()

    def _staged(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """The arrays stacked into one tensor: in a page-locked buffer on CUDA (copies from pageable memory
        are slow and synchronous), in a fresh one on the CPU."""
        shape = (len(arrays), *arrays[0].shape)
        if not self.device.startswith("cuda"):
            return torch.from_numpy(np.stack(arrays))
        staging = self._staging.get(shape)
        if staging is None and not self._pinning_failed:
            try:
                staging = self._staging[shape] = torch.empty(shape, dtype=torch.uint8).pin_memory()
            except RuntimeError as error:  # no page-locked memory to be had: copy from pageable memory
                log.warning("page-locked upload buffer unavailable (%s); uploading from pageable memory", error)
                self._pinning_failed = True
        if staging is None:
            return torch.from_numpy(np.stack(arrays))
        # the caller synchronises (stage clock) before the buffer is filled again
        np.stack(arrays, out=staging.numpy())
        return staging

    def render_references(self, w2c: np.ndarray, return_alpha: bool = False):
        """Defect-free renders at poses w2c [B, 4, 4] (OpenCV world-to-camera): [B, H, W, 3] in [0, 1],
        and with ``return_alpha`` their coverage [B, H, W] in [0, 1]."""
        with torch.no_grad():
            rgb, alpha = render(self.gaussians, torch.as_tensor(w2c, dtype=torch.float32, device=self.device),
                                self.K, self.width, self.height, backend=self.backend, return_alpha=True)
        return (rgb.clamp(0, 1), alpha[..., 0].clamp(0, 1)) if return_alpha else rgb.clamp(0, 1)

    def expected_maps(self, w2c: np.ndarray) -> torch.Tensor | None:
        """The maps [B, H, W] a good image is expected to have at poses w2c [B, 4, 4] (the run's
        ``scorer.uncertainty``, :mod:`splatpose.scoring.uncertainty`), or None when the run scored without."""
        if self.expected_scores is None:
            return None
        return expected_maps(self.gaussians, self.expected_scores,
                             torch.as_tensor(w2c, dtype=torch.float32, device=self.device), self.K, self.width,
                             self.height, self.backend)

    def score(self, queries: torch.Tensor, renders: torch.Tensor, alphas: torch.Tensor | None = None,
              expected: torch.Tensor | None = None) -> torch.Tensor:
        """Anomaly maps [B, S, S] of queries [B, 3, H, W] against renders [B, H, W, 3] (alphas [B, H, W]:
        their coverage, for the scorer's object region; expected [B, H, W]: :meth:`expected_maps`; as in
        the evaluation), normalised with the run's map_range."""
        raw = self.score_maps(queries.to(self.device), renders.permute(0, 3, 1, 2), alphas, expected)
        return normalise_maps(raw, self.lo, self.hi)

    def _clock(self) -> float:
        """perf_counter after the device's queued work is done (stage times on CUDA need the sync)."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def close(self) -> None:
        self._loader.shutdown(wait=False)
        if self.localizer.pnp_pool is not None:
            self.localizer.pnp_pool.shutdown(wait=False)


def detect_task(cfg: DictConfig) -> dict:
    """``python run.py task=detect run_dir=... inputs=...``: detect, write outputs, return the summary."""
    from splatpose.detect.records import DetectionWriter

    if not cfg.get("run_dir"):
        raise ValueError("run_dir is not set; pass run_dir=<folder of a finished evaluation run> (the folder "
                         "`python run.py` printed as 'Outputs: ...')")
    paths = expand_inputs(cfg.get("inputs"))
    names = display_names(paths)
    detector = Detector.from_run(cfg.run_dir, cfg.get("detect"), device=cfg.get("device", "auto"))
    if detector.cfg.warm_up:
        print("Warming up: capturing CUDA graphs and compiling LightGlue on a GPU (about a minute on a fresh "
              "machine, seconds after) ..." if detector.device.startswith("cuda") else "Warming up ...", flush=True)
        detector.warm_up(int(detector.cfg.batch_size))
    writer = DetectionWriter(Path(cfg.paths.output_dir), detector)
    start = time.perf_counter()
    try:
        for detection in detector.detect_stream(paths, names, keep_images=bool(detector.cfg.write_overlays)):
            writer.add(detection)
    finally:
        detector.close()
    summary = writer.close(wall_seconds=time.perf_counter() - start)
    print(writer.console_summary())
    return summary
