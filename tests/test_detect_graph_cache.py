"""The detector's CUDA graphs are kept for a bounded number of batch sizes (GraphCache).

A long-running detector that meets several batch sizes must not keep every size's graphs: on an H100
batches of 16 and 32 kept 54.5 GiB and batch 64 then ran out of memory
(experiments/results/detector_pipeline_h100_2026-12-07_s24.md). The policy's bookkeeping runs on the CPU
with any values; on a GPU, three batch sizes under a limit of two release the first one's memory, and a
graph captured again replays what the first one did.
"""

import gc
import weakref

import pytest
import torch

from splatpose.detect.cuda_graphs import GraphCache, GraphedScorer
from splatpose.detect.detector import default_detect_config


class Captures:
    """Capture functions that count their calls and return a fresh tensor (what a graph's buffers are)."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, name: str):
        def capture():
            self.calls.append(name)
            return torch.full((4,), float(len(self.calls)))
        return capture


def test_the_least_recently_served_batch_size_is_released_beyond_the_limit():
    cache, captures = GraphCache(max_batch_sizes=2), Captures()
    for size in (16, 32):
        with cache.serving(size):
            cache.fetch("aliked", (size, 3, 416, 416), captures(f"aliked{size}"))
    with cache.serving(16):  # replayed, not captured: 16 is now the most recently served
        cache.fetch("aliked", (16, 3, 416, 416), captures("again"))
    assert captures.calls == ["aliked16", "aliked32"]
    with cache.serving(64):
        cache.fetch("aliked", (64, 3, 416, 416), captures("aliked64"))
    assert cache.batch_sizes() == [16, 64]
    assert set(cache.graphs("aliked")) == {(16, 3, 416, 416), (64, 3, 416, 416)}
    stats = cache.stats()
    assert stats["released_batch_sizes"] == 1 and stats["released_graphs"] == 1 and stats["captures"] == 3
    assert stats["releases"][-1]["batch_size"] == 32 and "graph_batch_sizes" in stats["releases"][-1]["why"]


def test_a_graph_two_batch_sizes_use_stays_while_either_is_kept():
    """LightGlue's 32-query calls serve batches of 32 and of 64: releasing 32 keeps them for 64."""
    cache, captures = GraphCache(max_batch_sizes=2), Captures()
    with cache.serving(32):
        cache.fetch("aliked", 32, captures("aliked32"))
        cache.fetch("lightglue", (32, 1024), captures("lightglue32"))
    with cache.serving(64):
        cache.fetch("aliked", 64, captures("aliked64"))
        shared = cache.fetch("lightglue", (32, 1024), captures("lightglue again"))
    with cache.serving(8):  # releases 32, the least recently served
        cache.fetch("aliked", 8, captures("aliked8"))
    assert cache.batch_sizes() == [64, 8]
    assert set(cache.graphs("aliked")) == {64, 8}
    assert cache.graphs("lightglue")[(32, 1024)] is shared and "lightglue again" not in captures.calls
    with cache.serving(16):  # releases 64: now nothing uses the 32-query graphs
        cache.fetch("aliked", 16, captures("aliked16"))
    assert cache.graphs("lightglue") == {} and set(cache.graphs("aliked")) == {8, 16}


def test_released_graphs_are_no_longer_referenced_and_come_back_when_served_again():
    """Released means dropped (the pools go back to the device only if nothing keeps the buffers), and a
    batch size served again captures its graphs again."""
    cache, captures = GraphCache(max_batch_sizes=1), Captures()
    with cache.serving(16):
        first = weakref.ref(cache.fetch("scorer", 16, captures("scorer16")))
    with cache.serving(32):
        cache.fetch("scorer", 32, captures("scorer32"))
    gc.collect()
    assert first() is None, "a released graph's buffers are still referenced"
    with cache.serving(16):
        cache.fetch("scorer", 16, captures("scorer16 again"))
    assert captures.calls == ["scorer16", "scorer32", "scorer16 again"] and cache.batch_sizes() == [16]


def test_a_capture_out_of_memory_releases_the_other_batch_sizes_and_is_tried_once_more():
    cache, captures = GraphCache(max_batch_sizes=None), Captures()
    for size in (8, 16):
        with cache.serving(size):
            cache.fetch("aliked", size, captures(f"aliked{size}"))
    failures = []

    def capture_after_one_failure():
        if not failures:
            failures.append("out of memory")
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return captures("aliked32")()

    with cache.serving(32):
        cache.fetch("lightglue", 32, captures("lightglue32"))
        cache.fetch("aliked", 32, capture_after_one_failure)
    assert cache.batch_sizes() == [32] and set(cache.graphs("aliked")) == {32}
    assert set(cache.graphs("lightglue")) == {32}, "the served batch size's own graphs stay"
    assert cache.stats()["out_of_memory_retries"] == 1

    def always_out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with cache.serving(64), pytest.raises(torch.cuda.OutOfMemoryError):
        cache.fetch("aliked", 64, always_out_of_memory)
    assert 64 not in cache.graphs("aliked") and cache.stats()["out_of_memory_retries"] == 2

    def cuda_call_out_of_memory():  # a CUDA call's error, not the allocator's: raised as torch's, to tell apart
        raise RuntimeError("CUDA error: out of memory")

    with cache.serving(128), pytest.raises(torch.cuda.OutOfMemoryError, match="CUDA error: out of memory"):
        cache.fetch("aliked", 128, cuda_call_out_of_memory)
    assert cache.stats()["out_of_memory_retries"] == 3


def test_any_other_capture_error_reaches_the_caller_without_a_retry():
    """A kernel that cannot be captured is the accelerator's to handle (it turns its graphs off)."""
    cache, calls = GraphCache(max_batch_sizes=2), []

    def uncapturable():
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    with cache.serving(8), pytest.raises(RuntimeError, match="capturing"):
        cache.fetch("scorer", 8, uncapturable)
    assert calls == [1] and cache.stats()["out_of_memory_retries"] == 0 and cache.graphs("scorer") == {}


def test_the_limit_is_a_config_setting_and_a_wrong_one_names_the_fix():
    assert default_detect_config().graph_batch_sizes is None  # memory, not a count, bounds them by default
    with pytest.raises(ValueError, match="detect.graph_batch_sizes"):
        GraphCache(max_batch_sizes=0)
    cache = GraphCache(max_batch_sizes=None)
    for size in range(1, 9):
        with cache.serving(size):
            cache.fetch("scorer", size, lambda: size)
    assert cache.batch_sizes() == list(range(1, 9)) and cache.stats()["released_batch_sizes"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_three_batch_sizes_under_a_limit_of_two_release_memory_and_replay_the_same():
    """ALIKED's and the scorer's graphs in one cache, as in the detector: serving a third batch size
    releases the first one's graphs and their memory; served again, it is captured again and gives the
    same features and maps as its first graphs did."""
    from splatpose.detect.static_aliked import GraphedAliked, same_features
    from splatpose.scoring.anomaly_maps import AnomalyScorer
    from splatpose.sfm.config import compose_sfm_config
    from splatpose.sfm.features import build_extractor
    from test_static_aliked import textured_images  # tests/test_static_aliked.py

    cache = GraphCache(max_batch_sizes=2, device="cuda")
    cfg = compose_sfm_config("aliked", "lightglue", "global")
    aliked = GraphedAliked(build_extractor(cfg.feature, 512, "cuda"), cache=cache)
    scorer = GraphedScorer(AnomalyScorer(backbone=None, size=64, blur_kernel_size=0).cuda(), cache)
    images = textured_images(count=8, height=192, width=224).cuda()
    renders = images.flip(-1)

    def detect(size: int):
        with cache.serving(size):
            features = aliked(images[:size])
            maps = scorer(images[:size], renders[:size])
        return features, maps

    first = {size: detect(size) for size in (2, 4)}
    assert cache.batch_sizes() == [2, 4] and len(aliked.graphs) == 2 and len(scorer.graphs) == 2
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    with cache.serving(8):  # a third batch size: batch 2's graphs go, before batch 8 captures anything
        assert cache.batch_sizes() == [4, 8] and len(aliked.graphs) == 1 and len(scorer.graphs) == 1
        assert torch.cuda.memory_allocated() < allocated and torch.cuda.memory_reserved() < reserved, \
            "releasing batch 2's graphs freed no device memory"
    first[8] = detect(8)
    assert aliked.path == "static+cuda_graph" and not scorer.failed
    again = detect(2)  # captured again (releasing batch 4)
    assert cache.batch_sizes() == [8, 2] and cache.stats()["released_batch_sizes"] == 2
    assert all(len(f["keypoints"]) > 50 for f in again[0])
    assert same_features(first[2][0], again[0], atol=1e-4)
    torch.testing.assert_close(again[1], first[2][1], atol=1e-5, rtol=1e-5)
