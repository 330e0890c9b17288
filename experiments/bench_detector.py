"""Detector latency and throughput on a finished run: file in -> map out, warm, per stage, batched.

1. Per query, for each ``--matching`` variant (auto, sequential, batched, static, static:fp16 ...):
   after ``--warmup`` queries, ``--queries`` images (the run's test images, cycled) go through
   ``Detector.detect(path)`` one at a time; the wall time of each call (decode, localize, render,
   score, map back on the host) gives the median and p95, and the detector's own stage clock gives
   each stage's median and p95. Then each test image once more: localized count and pose errors
   against the true test poses (generated data), and the largest map difference against the first
   variant's maps, so a faster path that localizes worse shows it. Each entry records the path that
   ran (``Detector.paths()``: static LightGlue replayed from CUDA graphs, or its fallback).
2. Batched: ``Detector.detect_stream`` over ``--throughput-images`` images per batch size; images/s,
   unpipelined and pipelined (``detect.pipeline``: a batch's PnP on the host beside the next batch's
   device stages) in interleaved rounds in the same process after the same warm-up, and whether
   the two give the same detections.
3. The floor: each stage's kernel alone, warm (median of ``--repeats``): ALIKED on one image,
   LightGlue on one query's top-k pairs (one padded pass and pair by pair), a render of the run's
   Gaussians and, on CUDA, of 200k Gaussians at the run's image size (the issue's reference floor),
   the scorer on one pair (eager and CUDA graph) and its backbone alone, and the PNG decode.

Every section is guarded: a failure is recorded in the report and the rest still runs (the GPU is
lent for minutes at a time). Writes ``<out>/detector.json`` and ``<out>/detector.md``.

    python experiments/bench_detector.py --run-dir outputs/runs/... --device cpu --out experiments/results/detector_cpu
    python experiments/bench_detector.py --run-dir <run> --device cuda --queries 120 --out $OUT/detector_cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from splatpose.data import resolve_dataset
from splatpose.data.cameras import camera_center, center_error, rotation_error_deg
from splatpose.data.mad_sim import decode_pixels, read_image
from splatpose.detect.batched_lightglue import match_pairs_batched
from splatpose.detect.cuda_graphs import GraphedScorer
from splatpose.detect.inputs import load_input
from splatpose.detect.detector import STAGES, Detector
from splatpose.refine import default_refine_config
from splatpose.sfm.pnp import PNP_SOLVERS, PnPSolver, solver_name
from splatpose.sfm.retrieval import rank_database
from splatpose.splat.gaussians import Gaussians
from splatpose.splat.rendering import render

FLOOR_GAUSSIANS = 200_000
KEPT_STATIC: dict[tuple, object] = {}  # (localizer id, precision, compile) -> its StaticLightGlue


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="folder of a finished evaluation run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="folder for detector.{json,md}")
    parser.add_argument("--queries", type=int, default=120, help="timed single-image queries (test images cycled)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1,
                        help="split the timed queries into this many rounds over all --matching variants")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--background-decoders", nargs="+", default=["pillow"], choices=["pillow", "libspng"],
                        help="what detect_stream's threads decode with in the batched runs (A/B: both)")
    parser.add_argument("--decoder-rounds", type=int, default=1, help="rounds over --background-decoders")
    parser.add_argument("--throughput-images", type=int, default=256, help="images per batched measurement")
    parser.add_argument("--stream-modes", nargs="+", default=list(STREAM_MODES), choices=STREAM_MODES,
                        help="detect_stream without and/or with detect.pipeline (PnP of a batch beside the next "
                             "batch's device stages), each timed in the batched runs")
    parser.add_argument("--stream-rounds", type=int, default=3,
                        help="timed streams per mode and batch size, the modes interleaved (median reported)")
    parser.add_argument("--repeats", type=int, default=50, help="repeats per floor measurement")
    parser.add_argument("--matching", nargs="+", default=["auto"],
                        help="detect.matching variants to time per query: a mode, or static:<precision>; "
                             "+compile or +plain: LightGlue's steps compiled or not; +poselib or +pycolmap: the "
                             "PnP solver; @k matches with the k best db images (e.g. auto@3, auto+plain+pycolmap)")
    parser.add_argument("--refine-queries", type=int, default=0,
                        help="also time this many queries with refinement on (conf/refine/lbfgs.yaml; 0: skip)")
    parser.add_argument("--recovery-queries", type=int, default=0,
                        help="with --refine-queries: also time the recovery path alone on this many queries, "
                             "as after a failed PnP (search over the reference views, coarse-to-fine refinement)")
    parser.add_argument("--refine-gradients", default="auto", choices=["auto", "autograd", "differences"],
                        help="refine.gradients of the refining detector (auto: central differences on CUDA)")
    parser.add_argument("--refine-max-size", type=int, default=None,
                        help="refine.max_size of the refining detector (default: conf/refine/lbfgs.yaml's; 0: none)")
    parser.add_argument("--inputs", nargs="*", help="image files to cycle (default: the run's test images)")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor section")
    parser.add_argument("--profile", type=int, default=0,
                        help="single queries to run under torch.profiler after the timed ones: writes "
                             "profile_device.txt and profile_host.txt (operators and kernels by time)")
    parser.add_argument("--throughput-matching", nargs="+", default=["auto"],
                        help="matching variants of the batched runs (the first also for the floor and refine runs)")
    parser.add_argument("--quality-images", type=int, default=None,
                        help="test images per variant for the pose and map comparison (default: all)")
    parser.add_argument("--overrides", type=json.loads, default={},
                        help='detect settings as JSON, e.g. \'{"cuda_graphs": false}\'')
    args = parser.parse_args(argv)
    if args.recovery_queries and not args.refine_queries:
        parser.error("--recovery-queries is timed in the refining detector: give --refine-queries too")
    return args


def percentiles_ms(seconds: list[float]) -> dict:
    values = 1000 * np.asarray(seconds, dtype=np.float64)
    return {"median_ms": round(float(np.median(values)), 3), "p95_ms": round(float(np.percentile(values, 95)), 3),
            "n": len(values)}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_call_ms(fn, device: str, repeats: int, warmup: int = 3) -> dict:
    """Warm median (and p95) wall time of ``fn()`` with the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return percentiles_ms(times)


def guarded(report: dict, section: str, fn):
    """Run one section; on failure record the error in the report and go on."""
    start = time.perf_counter()
    try:
        report[section] = fn()
    except Exception as error:  # a benchmark section that fails must not lose the others' numbers
        report[section] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        print(f"[{section}] FAILED: {error}", flush=True)
    print(f"[{section}] {time.perf_counter() - start:.1f} s", flush=True)


def single_query_latency(detector: Detector, paths: list[Path], queries: int, warmup: int,
                         samples: dict | None = None, start: int = 0) -> dict:
    """Warm single-image detections, one at a time: wall and stage percentiles. With ``samples`` (a
    dict kept across calls) the timings add to it, so that variants can be measured in interleaved
    rounds; ``start`` is the first input of this round (inputs cycle)."""
    for i in range(warmup):
        detector.detect(paths[(start + i) % len(paths)])
    samples = {} if samples is None else samples
    walls, stages = samples.setdefault("walls", []), samples.setdefault("stages", defaultdict(list))
    for i in range(queries):
        begin = time.perf_counter()
        detection = detector.detect(paths[(start + i) % len(paths)])
        walls.append(time.perf_counter() - begin)
        samples["localized"] = samples.get("localized", 0) + detection.localized
        for stage, seconds in detection.times.items():
            stages[stage].append(seconds)
        stages["unaccounted"].append(walls[-1] - detection.times["total"])  # Python and bookkeeping
    return {"wall": percentiles_ms(walls), "stages": {s: percentiles_ms(v) for s, v in stages.items()},
            "localized": samples["localized"], "queries": len(walls)}


def recovery_latency(detector: Detector, paths: list[Path], queries: int) -> dict:
    """The recovery path's own cost, as after a failed PnP (``PoseRecovery.recover`` from no pose), per
    query after one warm-up; and how its poses compare with the PnP-and-refinement pose of the same query
    (rotation difference, degrees), the path a localized query takes."""
    recovery = detector.settler.recovery
    seconds, accepted, rotation_deg = [], 0, []
    for i in range(queries + 1):
        path = paths[i % len(paths)]
        reference = detector.detect(path)
        query = detector._upload([detector.prepare(path)])[0]
        synchronize(detector.device)
        begin = time.perf_counter()
        recovered = recovery.recover(query)
        synchronize(detector.device)
        if i == 0:
            continue  # warm-up: the search views are rendered at the first recovery
        seconds.append(time.perf_counter() - begin)
        accepted += bool(recovered.accepted)
        rotation_deg.append(rotation_error_deg(recovered.w2c, reference.w2c))
    return {**percentiles_ms(seconds), "accepted": accepted, "queries": queries,
            "median_rotation_vs_pnp_deg": round(float(np.median(rotation_deg)), 4),
            "within_1deg_of_pnp": int(np.sum(np.asarray(rotation_deg) <= 1.0))}


def use_matching(detector: Detector, variant: str) -> None:
    """Switch the detector's matching to ``variant``: "auto" | "sequential" | "batched" | "static[:fp16]",
    then optional suffixes: "+compile" or "+plain" (LightGlue's steps compiled by torch.compile, or not),
    "+poselib" or "+pycolmap" (the PnP solver; none: the run's), and "@k": match each query with its k best
    db images instead of the run's top_k (localization settings of the run, tried here without another run)."""
    name = variant
    variant, _, top_k = variant.partition("@")
    variant, *suffixes = variant.split("+")
    unknown = set(suffixes) - {"compile", "plain", *PNP_SOLVERS}
    if unknown:
        raise ValueError(f"unknown variant suffix {sorted(unknown)} in {name!r}")
    mode, _, precision = variant.partition(":")
    localizer = detector.localizer
    localization = detector.run.config.sfm.localization
    localizer.top_k = int(top_k) if top_k else int(localization.top_k)
    solver = next((s for s in suffixes if s in PNP_SOLVERS), solver_name(localization))
    if solver != localizer.pnp.name:
        localizer.pnp = PnPSolver(OmegaConf.merge(localization, {"pnp": solver}), localizer.camera)
    compiled = "compile" in suffixes or ("plain" not in suffixes and bool(detector.cfg.lightglue_compile))
    options = {"precision": precision or str(detector.cfg.lightglue_precision),  # no suffix: as configured
               "compile": compiled}
    current = {key: localizer.static_options[key] for key in options}
    if mode in ("static", "auto") and options != current:
        # one StaticLightGlue per setting, kept: interleaved rounds must not capture graphs again
        KEPT_STATIC[(id(localizer), *current.values())] = localizer.static
        localizer.static_options.update(options)
        localizer.static = KEPT_STATIC.get((id(localizer), *options.values()))  # None: set_matching builds one
    localizer.set_matching(mode)


def pose_quality(detector: Detector, tests: list, true_poses: dict | None, reference_maps: dict | None) -> dict:
    """Each test image once: localized count, pose errors against the true poses (localized queries),
    and the largest map difference against ``reference_maps`` (name -> map) when given."""
    maps, rotation, center, localized = {}, [], [], 0
    for test in tests:
        detection = detector.detect(test.path, test.name)
        maps[test.name] = detection.anomaly_map
        localized += detection.localized
        truth = (true_poses or {}).get(test.name)
        if detection.localized and truth is not None:
            rotation.append(float(rotation_error_deg(detection.w2c, truth)))
            center.append(float(center_error(detection.w2c, truth) / max(np.linalg.norm(camera_center(truth)), 1e-9)))
    out = {"images": len(tests), "localized": localized, "maps": maps}
    if rotation:
        out.update(median_rotation_error_deg=round(float(np.median(rotation)), 4),
                   max_rotation_error_deg=round(float(np.max(rotation)), 4),
                   median_center_error_rel=round(float(np.median(center)), 6))
    if reference_maps:
        out["max_map_difference"] = float(max(np.abs(maps[n] - reference_maps[n]).max() for n in maps))
    return out


STREAM_MODES = ("unpipelined", "pipelined")  # detect_stream without and with detect.pipeline
BATCHED_STAGES = (*STAGES, "pnp_wait", "stages_wall")


def batched_throughput(detector: Detector, paths: list[Path], batch_size: int, images: int,
                       modes: tuple[str, ...] = STREAM_MODES, rounds: int = 1) -> dict:
    """``detect_stream`` over ``images`` inputs (``paths`` cycled) at ``batch_size``, once per mode and round,
    the modes interleaved within each round (the host's speed drifts within a call): per mode the median
    round's seconds and images/s, per-image stage medians of that round, and, with both modes, how far the
    pipelined detections are from the unpipelined ones (they should be equal)."""
    sources = [paths[i % len(paths)] for i in range(max(images, batch_size))]
    on_cuda = detector.device.startswith("cuda")
    if on_cuda:  # the peak of this batch size's capture and streams, graph pools included
        torch.cuda.reset_peak_memory_stats(detector.device)
    # as task=detect does: every static LightGlue shape a batch of this size can meet is captured before the
    # clock starts (a shape met first inside the timed images compiles there, once); then graphs and cuDNN
    detector.warm_up(batch_size)
    for mode in modes:
        list(detector.detect_stream(sources[: 2 * batch_size], batch_size=batch_size, pipeline=mode == "pipelined"))
    timed = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode in modes:
            start = time.perf_counter()
            detections = list(detector.detect_stream(sources, batch_size=batch_size, pipeline=mode == "pipelined"))
            timed[mode].append((time.perf_counter() - start, detections))
    entry = {"batch_size": batch_size, "images": len(sources), "rounds": rounds}
    for mode, runs in timed.items():
        seconds, detections = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
        # per image: a batched stage's time split over its images; load overlaps the previous batch
        stages = {stage: round(1000 * float(np.median([d.times.get(stage, 0.0) for d in detections])), 3)
                  for stage in BATCHED_STAGES}
        # images/s counts the detections that came out ok: a batch that failed (out of memory, say) is fast
        ok = sum(d.ok for d in detections)
        entry[mode] = {"ok": ok, "seconds": round(seconds, 3), "seconds_rounds": [round(run[0], 3) for run in runs],
                       "images_per_second": round(ok / seconds, 2), "median_ms_per_image": stages}
    if len(modes) == 2:
        entry["speedup"] = round(entry["pipelined"]["images_per_second"] / entry["unpipelined"]["images_per_second"], 3)
        entry["agreement"] = stream_agreement(timed["unpipelined"][0][1], timed["pipelined"][0][1])
    entry["images_per_second"] = entry[modes[-1]]["images_per_second"]  # pipelined when timed
    entry["graphs"] = detector.graph_stats()  # what the detector keeps after this batch size (GraphCache)
    if on_cuda:
        entry["graphs"]["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(detector.device) / 2**30, 2)
    entry["_reference"] = timed[modes[0]][0][1]  # for recaptured(); main() takes it out of the report
    return entry


def recaptured(detector: Detector, paths: list[Path], batch_size: int, images: int, reference: list,
               pipeline: bool) -> dict:
    """``batch_size`` streamed once more after the other batch sizes, its CUDA graphs replayed, or captured
    again inside the time where they were released meanwhile (``captures_inside``): its detections against
    those of its first stream (``reference``, same sources and mode), which should be equal."""
    before = detector.graph_stats()
    sources = [paths[i % len(paths)] for i in range(max(images, batch_size))]
    start = time.perf_counter()
    detections = list(detector.detect_stream(sources, batch_size=batch_size, pipeline=pipeline))
    seconds = time.perf_counter() - start
    after = detector.graph_stats()
    return {"batch_size": batch_size, "images": len(sources), "ok": sum(d.ok for d in detections),
            "seconds_with_capture": round(seconds, 3), "batch_sizes_kept_before": before.get("batch_sizes"),
            "captures_inside": after.get("captures", 0) - before.get("captures", 0),
            "agreement": stream_agreement(reference, detections), "graphs": after}


def failed_note(timed: dict, images: int) -> str:
    """" (k of n ok)" for a timed stream whose detections did not all come out ok, else ""."""
    return "" if timed["ok"] == images else f" ({timed['ok']} of {images} ok)"


def stream_agreement(reference: list, other: list) -> dict:
    """How far ``other``'s detections are from ``reference``'s, input by input: names in the same order,
    ok and localized mismatches, the largest pose (w2c entry) and score differences."""
    both = [(a, b) for a, b in zip(reference, other) if a.ok and b.ok]
    return {"same_order": [d.name for d in reference] == [d.name for d in other],
            "ok_mismatches": sum(a.ok != b.ok for a, b in zip(reference, other)),
            "localized_mismatches": sum(a.localized != b.localized for a, b in both),
            "max_w2c_difference": float(max((np.abs(a.w2c - b.w2c).max() for a, b in both), default=0.0)),
            "max_score_difference": float(max((abs(a.score - b.score) for a, b in both), default=0.0))}


def tiled_gaussians(gaussians: Gaussians, count: int, seed: int = 0) -> Gaussians:
    """``count`` Gaussians: copies of the scene's, jittered by about one Gaussian size (a denser scene
    of the same extent, for timing a render at a fixed Gaussian count)."""
    copies = math.ceil(count / len(gaussians))
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def tile(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.repeat(copies, *([1] * (tensor.dim() - 1)))[:count]

    jitter = torch.randn(count, 3, generator=generator).to(gaussians.means) * tile(gaussians.scales).exp()
    return Gaussians(means=tile(gaussians.means) + jitter, quats=tile(gaussians.quats), scales=tile(gaussians.scales),
                     opacities=tile(gaussians.opacities), sh0=tile(gaussians.sh0), shN=tile(gaussians.shN))


def floor(detector: Detector, paths: list[Path], repeats: int) -> dict:
    """Each stage's work alone, warm."""
    device, localizer = detector.device, detector.localizer
    out = {"decode": median_call_ms(lambda: decode_pixels(paths[0]), "cpu", repeats),  # the detector's decoder
           # the load stage: decode and the input checks (grayscale, size)
           "load": median_call_ms(lambda: load_input(paths[0], detector.width, detector.height), "cpu", repeats)}
    if device.startswith("cuda"):
        out.update(upload_floor(paths[0], device, repeats))
    image = torch.from_numpy(read_image(paths[0])).permute(2, 0, 1)[None].to(device)
    resized = localizer.resize_for_features(image)
    out["extract"] = median_call_ms(lambda: localizer.extractor(resized), device, repeats)
    out["extract"]["resolution"] = list(resized.shape[-2:])
    out["extract"]["path"] = localizer.extract_path
    eager_extractor = getattr(localizer.extractor, "extractor", None)  # GraphedAliked's wrapped extractor
    if eager_extractor is not None:
        out["extract_eager"] = median_call_ms(lambda: eager_extractor(resized), device, repeats)
    features = localizer.extractor(resized)[0]
    features["image_size"] = np.array([image.shape[-1], image.shape[-2]])
    ranked = rank_database(localizer.retrieval.describe(None, features), localizer.db_global)[: localizer.top_k]
    prepared = localizer.matcher.prepare(features)
    pairs = [(prepared, localizer.db_prepared[i]) for i in ranked]
    out["keypoints"] = int(len(features["keypoints"]))
    if hasattr(localizer.matcher, "model"):
        out["match_topk_one_pass"] = median_call_ms(lambda: match_pairs_batched(localizer.matcher.model, pairs),
                                                    device, repeats)
        if localizer.static is not None:
            out["match_topk_static"] = median_call_ms(lambda: localizer.static.match([prepared], [list(ranked)]),
                                                      device, repeats)
            out["match_topk_static"]["path"] = localizer.static.path
    out["match_topk_pairwise"] = median_call_ms(lambda: [localizer.matcher(a, b) for a, b in pairs], device, repeats)
    detection = detector.detect(paths[0])
    w2c = torch.as_tensor(detection.w2c, dtype=torch.float32, device=device)[None]

    def render_once(gaussians):
        with torch.no_grad():
            return render(gaussians, w2c, detector.K, detector.width, detector.height, backend=detector.backend)

    out["render_run"] = {**median_call_ms(lambda: render_once(detector.gaussians), device, repeats),
                         "gaussians": len(detector.gaussians)}
    if device.startswith("cuda"):
        dense = tiled_gaussians(detector.gaussians, FLOOR_GAUSSIANS)
        out["render_200k"] = {**median_call_ms(lambda: render_once(dense), device, repeats),
                              "gaussians": FLOOR_GAUSSIANS}
        del dense
    rgb = render_once(detector.gaussians).clamp(0, 1).permute(0, 3, 1, 2)
    out["score_eager"] = median_call_ms(lambda: detector.scorer(image, rgb), device, repeats)
    if device.startswith("cuda"):
        graphed = GraphedScorer(detector.scorer)
        out["score_cuda_graph"] = median_call_ms(lambda: graphed(image, rgb), device, repeats)
    if detector.scorer.backbone is not None:
        prepared_pair = detector.scorer.prepare(torch.cat([image, rgb]))
        with torch.inference_mode():
            out["backbone_only"] = median_call_ms(lambda: detector.scorer.backbone(prepared_pair), device, repeats)
    return out


def profile_queries(detector: Detector, paths: list[Path], queries: int, out: Path) -> dict:
    """``queries`` single detections under torch.profiler (host operators, and device kernels on CUDA,
    those replayed from CUDA graphs included): tables of the top operators by device and by host time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if detector.device.startswith("cuda") else [])
    for path in paths[:3]:  # warm
        detector.detect(path)
    with profile(activities=activities) as profiler:
        for i in range(queries):
            detector.detect(paths[i % len(paths)])
    table = profiler.key_averages()
    files = {"profile_host.txt": table.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)}
    if detector.device.startswith("cuda"):
        files["profile_device.txt"] = table.table(sort_by="self_device_time_total", row_limit=50,
                                                  max_name_column_width=70)
    for name, text in files.items():
        (out / name).write_text(f"{queries} single queries, {detector.paths()}\n{text}")
    return {"queries": queries, "files": sorted(files)}


def upload_floor(path: Path, device: str, repeats: int) -> dict:
    """One image to the GPU: float32 from pageable and from page-locked memory, and the decoded uint8
    pixels from page-locked memory (what the detector sends), with their bandwidths."""
    pixels = decode_pixels(path)
    floats = torch.from_numpy(read_image(path))
    sources = {"upload_float_pageable": floats, "upload_float_pinned": floats.pin_memory(),
               "upload_uint8_pinned": torch.from_numpy(pixels).pin_memory()}
    out = {}
    for name, tensor in sources.items():
        entry = median_call_ms(lambda: tensor.to(device, non_blocking=True), device, repeats)
        entry["bytes"] = tensor.numel() * tensor.element_size()
        entry["GB_per_s"] = round(entry["bytes"] / (entry["median_ms"] * 1e6), 3)
        out[name] = entry
    return out


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def run_description(detector: Detector) -> dict:
    sfm = detector.run.config.sfm
    return {"class": detector.run.class_name, "image_size": [detector.width, detector.height],
            "gaussians": len(detector.gaussians), "feature": sfm.feature.name, "matcher": sfm.matcher.name,
            "retrieval": sfm.retrieval.name, "top_k": int(sfm.localization.top_k),
            "max_keypoints": int(sfm.max_keypoints), "resize_max": sfm.get("resize_max"),
            "resize_force": sfm.get("resize_force"), "upscale_below": sfm.get("upscale_below"), "scorer": detector.run.config.scorer.name,
            "render_backend": detector.backend, "matching": detector.localizer.matching_path,
            "cuda_graphs": bool(detector.cfg.cuda_graphs), "refine": detector.settler is not None}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": args.device, "device_name": device_name(args.device),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "torch": torch.__version__,
              "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    start = time.perf_counter()
    detector = Detector.from_run(args.run_dir, args.overrides, device=args.device)
    use_matching(detector, args.matching[0])
    report["setup_seconds"] = round(time.perf_counter() - start, 3)
    report["run"] = run_description(detector)
    data = resolve_dataset(detector.run.config.dataset, detector.run.class_name)
    paths = [Path(p) for p in args.inputs] if args.inputs else [t.path for t in data.test]
    report["num_distinct_inputs"] = len(paths)
    print(json.dumps(report["run"]), flush=True)

    # the variants' single queries in interleaved rounds: this host's speed drifts by up to 30 % within a
    # call (experiments/results/detector_h100_*.md), which rounds spread over every variant alike
    samples = {variant: {} for variant in args.matching}
    per_round = max(1, args.queries // args.rounds)
    for round_index in range(args.rounds):
        for variant in args.matching:
            def timed_round():
                use_matching(detector, variant)
                warmup = args.warmup if round_index == 0 else min(args.warmup, 5)
                return single_query_latency(detector, paths, per_round, warmup, samples[variant],
                                            start=round_index * per_round)
            guarded(report, f"single_{variant}", timed_round)
    reference_maps = None
    for variant in args.matching:
        def timed():
            use_matching(detector, variant)
            entry = report[f"single_{variant}"]
            if "error" in entry:
                return entry
            entry = {**entry, "rounds": args.rounds}
            quality = pose_quality(detector, data.test[: args.quality_images], data.test_poses, reference_maps)
            entry["quality"] = {k: v for k, v in quality.items() if k != "maps"}
            entry["paths"] = detector.paths()
            entry["maps"] = quality["maps"]
            return entry
        guarded(report, f"single_{variant}", timed)
        reference_maps = reference_maps or report[f"single_{variant}"].pop("maps", None)
        report[f"single_{variant}"].pop("maps", None)
    for variant in args.throughput_matching:
        use_matching(detector, variant)
        references = {}  # batch size -> its first stream's detections
        for size in args.batch_sizes:
            for round_index in range(args.decoder_rounds):
                for decoder in args.background_decoders:  # interleaved, as the single-query rounds
                    detector.background_fast_decode = decoder == "libspng"
                    suffix = "" if args.background_decoders == ["pillow"] else f"_{decoder}_r{round_index}"
                    guarded(report, f"batched_{variant}_{size}{suffix}",
                            lambda: {"matching": variant, "paths": detector.paths(), "decoder": decoder,
                                     **batched_throughput(detector, paths, size, args.throughput_images,
                                                                tuple(args.stream_modes), args.stream_rounds)})
                    references.setdefault(size, report[f"batched_{variant}_{size}{suffix}"].pop("_reference", None))
        first = args.batch_sizes[0]
        if detector.graph_cache is not None and len(set(args.batch_sizes)) > 1 and references.get(first):
            guarded(report, f"recaptured_{variant}_{first}",
                    lambda: recaptured(detector, paths, first, args.throughput_images, references[first],
                                       args.stream_modes[0] == "pipelined"))
    detector.background_fast_decode = False
    use_matching(detector, args.throughput_matching[0])
    if not args.no_floor:
        guarded(report, "floor", lambda: floor(detector, paths, args.repeats))
    if args.profile:
        guarded(report, "profile", lambda: profile_queries(detector, paths, args.profile, args.out))
    if args.refine_queries:
        def refined():
            refine = OmegaConf.to_container(default_refine_config())  # conf/refine/lbfgs.yaml
            refine["gradients"] = args.refine_gradients
            if args.refine_max_size is not None:
                refine["max_size"] = args.refine_max_size or None
            refining = Detector(detector.run, {**args.overrides, "refine": refine}, device=args.device)
            use_matching(refining, args.throughput_matching[0])
            entry = single_query_latency(refining, paths, args.refine_queries, warmup=2)
            entry["gradients"], entry["max_size"] = args.refine_gradients, refine.get("max_size")
            if args.recovery_queries:
                entry["recovery"] = recovery_latency(refining, paths, args.recovery_queries)
            return entry
        guarded(report, "single_refine", refined)
    detector.close()
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    (args.out / "detector.json").write_text(json.dumps(report, indent=2))
    (args.out / "detector.md").write_text(markdown(report))
    print(markdown(report), flush=True)
    return report


def _cell(entry: dict | None, key: str = "median_ms") -> str:
    if not entry or key not in entry:
        return "failed" if entry and "error" in entry else "-"
    return f"{entry[key]:.2f}"


def graph_lines(report: dict, batched: list[dict]) -> list[str]:
    """The CUDA graphs the detector kept after each batch size (GraphCache.stats) and the recapture check."""
    kept = [entry for entry in batched if entry.get("graphs")]
    if not kept:
        return []
    limit = kept[0]["graphs"].get("max_batch_sizes")
    lines = [f"## CUDA graphs kept (detect.graph_batch_sizes: {limit})", "",
             "| after batch size | batch sizes kept (least recent first) | graphs kept | batch sizes released (so far) | "
             "graphs released | out-of-memory retries | peak reserved GiB | reserved after GiB | device free GiB | "
             "graph pool GiB (of it kept by the graphs' tensors) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for entry in kept:
        g = entry["graphs"]
        lines.append(f"| {entry['batch_size']} | {g.get('batch_sizes')} | {g.get('graphs')} | "
                     f"{g.get('released_batch_sizes')} | {g.get('released_graphs')} | {g.get('out_of_memory_retries')} | "
                     f"{g.get('peak_reserved_gib', '-')} | {g.get('memory_reserved_gib', '-')} | "
                     f"{g.get('device_free_gib', '-')} | {g.get('pool_gib', '-')} ({g.get('pool_kept_gib', '-')}) |")
    for key in (k for k in report if k.startswith("recaptured_")):
        entry = report[key]
        if "error" in entry:
            lines.append(f"\n- {key}: failed: {entry['error']}")
            continue
        lines.append(f"\n- batch {entry['batch_size']} again after the others (kept before: "
                     f"{entry['batch_sizes_kept_before']}; graphs captured inside the time: "
                     f"{entry.get('captures_inside', '-')}): {entry['ok']} of "
                     f"{entry['images']} ok in {entry['seconds_with_capture']} s; detections against its first stream's: "
                     f"{entry['agreement']}")
    return [*lines, ""]


def markdown(report: dict) -> str:
    run = report["run"]
    lines = [f"# Detector latency ({report['device']}, {report['device_name']})", "",
             f"- date: {report['date']}; torch {report['torch']}",
             f"- command: `{report['command']}`",
             f"- load average (1, 5, 15 min) at start {report['load_average_at_start']}, at end "
             f"{report.get('load_average_at_end')}",
             f"- run: {run['class']} {run['image_size'][0]}x{run['image_size'][1]}, {run['gaussians']} Gaussians, "
             f"{run['feature']}+{run['matcher']} (max {run['max_keypoints']} keypoints, resize_max "
             f"{run['resize_max']}, force {run['resize_force']} below {run.get('upscale_below')} px), {run['retrieval']} retrieval top-{run['top_k']}, "
             f"scorer {run['scorer']}, render {run['render_backend']}, cuda_graphs {run['cuda_graphs']}",
             f"- detector setup (load the run once): {report['setup_seconds']:.2f} s; "
             f"{report['num_distinct_inputs']} distinct test images cycled", ""]
    singles = [k for k in report if k.startswith("single_")]
    if singles:
        lines += ["## Per query (file in -> map out, warm), milliseconds", "",
                  "| mode | queries | localized | wall median | wall p95 | " + " | ".join(STAGES) + " | unaccounted |",
                  "|---|---|---|---|---|" + "---|" * (len(STAGES) + 1)]
        for key in singles:
            entry = report[key]
            if "error" in entry:
                lines.append(f"| {key[7:]} | failed: {entry['error']} |")
                continue
            stages = " | ".join(f"{_cell(entry['stages'].get(s))} ({_cell(entry['stages'].get(s), 'p95_ms')})"
                                for s in (*STAGES, "unaccounted"))
            lines.append(f"| {key[7:]} | {entry['queries']} | {entry['localized']} | {_cell(entry['wall'])} | "
                         f"{_cell(entry['wall'], 'p95_ms')} | {stages} |")
        lines += ["", "Stage cells: median (p95); a stage's time includes waiting for its device work.", "",
                  "Each variant once over the test images: localized, pose error against the true poses (localized "
                  "queries), largest map difference against the first variant's maps, and the path that ran.", "",
                  "| mode | localized | median rotation error (deg) | max (deg) | median centre error (rel) | "
                  "max map difference | extract path | matching path | score path |", "|---|---|---|---|---|---|---|---|---|"]
        for key in singles:
            quality, paths = report[key].get("quality", {}), report[key].get("paths", {})
            if quality:
                lines.append(f"| {key[7:]} | {quality['localized']}/{quality['images']} | "
                             f"{quality.get('median_rotation_error_deg', '-')} | {quality.get('max_rotation_error_deg', '-')} | "
                             f"{quality.get('median_center_error_rel', '-')} | {quality.get('max_map_difference', '-')} | "
                             f"{paths.get('extract')} | {paths.get('matching')} | {paths.get('score')} |")
        lines.append("")
    batched = [report[k] for k in report if k.startswith("batched_")]
    if batched:
        lines += ["## Batched throughput", "",
                  "| matching (path) | threads decode with | batch size | stream | images | seconds (rounds) | images/s | "
                  "per image, median ms: " + " / ".join(BATCHED_STAGES) + " |",
                  "|---|---|---|---|---|---|---|---|"]
        agreements = []
        for entry in batched:
            if "error" in entry:
                lines.append(f"| failed: {entry['error']} | | | | | | | |")
                continue
            path = entry.get("paths", {}).get("matching", "")
            for mode in (m for m in STREAM_MODES if m in entry):
                timed = entry[mode]
                per_image = " / ".join(str(timed["median_ms_per_image"].get(s, "-")) for s in BATCHED_STAGES)
                rounds = ", ".join(str(x) for x in timed["seconds_rounds"])
                lines.append(f"| {entry.get('matching', '')} ({path}) | {entry.get('decoder', '-')} | "
                             f"{entry['batch_size']} | {mode} | {entry['images']} | {timed['seconds']} ({rounds}) | "
                             f"{timed['images_per_second']}{failed_note(timed, entry['images'])} | {per_image} |")
            if "agreement" in entry:
                agreements.append(f"- batch {entry['batch_size']}: pipelined / unpipelined {entry['speedup']}x; "
                                  f"detections against the unpipelined stream's: {entry['agreement']}")
        lines += ["", "Seconds: the median round's (all rounds in brackets); its detections give the stage medians. "
                  "pnp: one image's own solve in a pool thread; pnp_wait: the host's wait for its batch's PnP results; "
                  "stages_wall: the host's wall time on its batch, split (splatpose.detect.detector.Detection).",
                  "", *agreements]
        lines.append("")
        lines += graph_lines(report, batched)
    floor_entry = report.get("floor", {})
    if floor_entry:
        lines += ["## Floor: each stage's work alone (warm median, ms)", ""]
        if "error" in floor_entry:
            lines.append(f"failed: {floor_entry['error']}")
        else:
            names = [k for k, v in floor_entry.items() if isinstance(v, dict)]
            lines += ["| " + " | ".join(names) + " |", "|" + "---|" * len(names),
                      "| " + " | ".join(_cell(floor_entry[n]) for n in names) + " |", "",
                      f"ALIKED at {floor_entry['extract'].get('resolution')} px ({floor_entry.get('keypoints')} "
                      f"keypoints); render_run: {floor_entry['render_run'].get('gaussians')} Gaussians"]
        lines.append("")
    recovery = report.get("single_refine", {}).get("recovery")
    if recovery:
        lines += ["## The recovery path alone (as after a failed PnP), warm", "",
                  f"{recovery['queries']} queries: median {recovery['median_ms']:.1f} ms, p95 {recovery['p95_ms']:.1f} ms; "
                  f"{recovery['accepted']} accepted, {recovery['within_1deg_of_pnp']} within 1 deg of the PnP pose "
                  f"(median {recovery['median_rotation_vs_pnp_deg']} deg)", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
