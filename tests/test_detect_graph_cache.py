"""The detector's CUDA graphs share one memory pool and are bounded per batch size (GraphCache).

A long-running detector that meets several batch sizes must not keep every size's graphs in private
pools: on an H100 batches of 16 and 32 kept 54.5 GiB and batch 64 then ran out of memory
(experiments/results/detector_pipeline_h100_2026-12-07_s24.md), and with a reserve alone batch 64's own
captures still did (detector_graph_memory_h100_2026-12-07_s25.md). The policy's bookkeeping runs on the
CPU with any values; on a GPU, graphs of several shapes in one pool take about the largest one's
activations and replay what eager execution gives, in any order, and a graph captured again after a
release replays what the first one did.
"""

import gc
import weakref

import pytest
import torch

from splatpose.detect.cuda_graphs import GraphCache, GraphedScorer, capture_graph
from splatpose.detect.detector import default_detect_config


class Captures:
    """Capture functions that count their calls, note the pool they were given and return a fresh tensor
    (what a graph's buffers are)."""

    def __init__(self):
        self.calls: list[str] = []
        self.pools: dict[str, tuple] = {}

    def __call__(self, name: str):
        def capture(pool):
            self.calls.append(name)
            self.pools[name] = pool
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


def test_a_capture_out_of_memory_releases_every_graph_and_is_tried_once_more_in_a_new_pool():
    """The graphs share one pool, which goes back to the device only when none of them is kept."""
    cache, captures = GraphCache(max_batch_sizes=None), Captures()
    for size in (8, 16):
        with cache.serving(size):
            cache.fetch("aliked", size, captures(f"aliked{size}"))
    failures = []

    def capture_after_one_failure(pool):
        if not failures:
            failures.append(pool)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return captures("aliked32")(pool)

    with cache.serving(32):
        cache.fetch("lightglue", 32, captures("lightglue32"))
        cache.fetch("aliked", 32, capture_after_one_failure)
    assert failures == [captures.pools["aliked8"]], "the failed capture did not share the kept graphs' pool"
    assert cache.batch_sizes() == [32] and set(cache.graphs("aliked")) == {32}
    assert cache.graphs("lightglue") == {}, "a graph kept in the pool kept the pool from the device"
    assert captures.pools["aliked32"] != captures.pools["aliked8"]
    stats = cache.stats()
    assert stats["out_of_memory_retries"] == 1 and stats["released_batch_sizes"] == 2
    assert stats["released_graphs"] == 3

    def always_out_of_memory(pool):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with cache.serving(64), pytest.raises(torch.cuda.OutOfMemoryError):
        cache.fetch("aliked", 64, always_out_of_memory)
    assert 64 not in cache.graphs("aliked") and cache.stats()["out_of_memory_retries"] == 2

    def cuda_call_out_of_memory(pool):  # a CUDA call's error, not the allocator's: raised as torch's, to tell apart
        raise RuntimeError("CUDA error: out of memory")

    with cache.serving(128), pytest.raises(torch.cuda.OutOfMemoryError, match="CUDA error: out of memory"):
        cache.fetch("aliked", 128, cuda_call_out_of_memory)
    assert cache.stats()["out_of_memory_retries"] == 3


def test_captures_share_the_kept_graphs_pool_and_a_new_one_when_none_is_kept_or_a_capture_failed():
    """PyTorch's allocator refuses a pool that no graph uses any more (an internal assert), and a capture
    that broke off may leave its pool marked as capturing: those pools are never handed out again."""
    cache, captures = GraphCache(max_batch_sizes=None), Captures()
    with cache.serving(16):
        cache.fetch("aliked", 16, captures("aliked16"))
        cache.fetch("lightglue", 16, captures("lightglue16"))
    with cache.serving(32):
        cache.fetch("scorer", 32, captures("scorer32"))
    first = captures.pools["aliked16"]
    assert captures.pools["lightglue16"] == captures.pools["scorer32"] == first

    def uncapturable(pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    with cache.serving(32), pytest.raises(RuntimeError, match="capturing"):
        cache.fetch("lightglue", 32, uncapturable)
    with cache.serving(32):
        cache.fetch("aliked", 32, captures("aliked32"))
    assert captures.pools["aliked32"] != first, "a capture that broke off left its pool in use"
    with cache.serving(32):
        cache.fetch("lightglue", 64, captures("lightglue64"))
    assert captures.pools["lightglue64"] == captures.pools["aliked32"]

    limited = GraphCache(max_batch_sizes=1)
    with limited.serving(16):
        limited.fetch("scorer", 16, captures("limited16"))
    with limited.serving(32):  # 16's graph goes first: no kept graph uses its pool any more
        limited.fetch("scorer", 32, captures("limited32"))
    assert captures.pools["limited32"] != captures.pools["limited16"]


def test_below_the_reserve_before_a_capture_every_graph_is_released(monkeypatch):
    """One pool goes back to the device only whole: releasing some of its graphs frees no device memory."""
    cache, captures = GraphCache(max_batch_sizes=None, reserve_bytes=8 << 30), Captures()
    free = {"bytes": 20 << 30}
    monkeypatch.setattr(cache, "_on_cuda", lambda: True)
    monkeypatch.setattr(cache, "_free_bytes", lambda: free["bytes"])
    for size in (8, 16):
        with cache.serving(size):
            cache.fetch("aliked", size, captures(f"aliked{size}"))
            cache.fetch("lightglue", size, captures(f"lightglue{size}"))
    assert cache.stats()["released_graphs"] == 0
    free["bytes"] = 6 << 30
    with cache.serving(32):
        cache.fetch("aliked", 32, captures("aliked32"))
    assert cache.batch_sizes() == [32] and set(cache.graphs("aliked")) == {32} and cache.graphs("lightglue") == {}
    stats = cache.stats()
    assert stats["released_for_memory"] == 4 and stats["released_graphs"] == 4
    assert "free before a capture" in stats["releases"][-1]["why"]
    assert captures.pools["aliked32"] != captures.pools["aliked8"]


def test_any_other_capture_error_reaches_the_caller_without_a_retry():
    """A kernel that cannot be captured is the accelerator's to handle (it turns its graphs off)."""
    cache, calls = GraphCache(max_batch_sizes=2), []

    def uncapturable(pool):
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
            cache.fetch("scorer", size, lambda pool: size)
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
    allocated = torch.cuda.memory_allocated()
    with cache.serving(8):  # a third batch size: batch 2's graphs go, before batch 8 captures anything
        assert cache.batch_sizes() == [4, 8] and len(aliked.graphs) == 1 and len(scorer.graphs) == 1
        # their tensors' memory goes back to the pool (for the next captures), not to the device
        assert torch.cuda.memory_allocated() < allocated, "releasing batch 2's graphs freed none of their tensors"
    first[8] = detect(8)
    assert aliked.path == "static+cuda_graph" and not scorer.failed
    again = detect(2)  # captured again (releasing batch 4)
    assert cache.batch_sizes() == [8, 2] and cache.stats()["released_batch_sizes"] == 2
    assert all(len(f["keypoints"]) > 50 for f in again[0])
    assert same_features(first[2][0], again[0], atol=1e-4)
    torch.testing.assert_close(again[1], first[2][1], atol=1e-5, rtol=1e-5)


def pool_bytes(graphs) -> tuple[int, int]:
    """Device memory of the pools that ``graphs`` (CUDA graphs) were captured into: reserved (their
    segments) and held by live tensors (their allocated blocks)."""
    pools = {tuple(graph.pool()) for graph in graphs}
    segments = [segment for segment in torch.cuda.memory_snapshot()
                if tuple(segment.get("segment_pool_id", ())) in pools]
    return sum(s["total_size"] for s in segments), sum(s["allocated_size"] for s in segments)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphs_of_several_shapes_share_the_largest_ones_activations_and_replay_what_eager_gives():
    """Six shapes of a network whose activations (a 4x wider hidden layer) dwarf its output: in one cache
    their pool holds their outputs and about the largest shape's activations, where private pools hold
    every shape's; replayed in another order than captured, each gives what eager execution gives."""
    torch.manual_seed(0)
    width, rows = 1024, (4096, 3072, 2048, 1024, 512, 256)
    weights = [torch.randn(width, 4 * width, device="cuda") / width**0.5,
               torch.randn(4 * width, 8, device="cuda") / (4 * width) ** 0.5]

    def network(x):
        return ((x @ weights[0]).relu().square() @ weights[1]).tanh()

    def capture(n, pool):
        static = torch.randn(n, width, device="cuda")
        return (static, *capture_graph(lambda: network(static), pool))

    for n in rows:  # warm-up: cuBLAS picks its kernels outside the captures
        network(torch.randn(n, width, device="cuda"))
    torch.cuda.synchronize()
    private = [capture(n, None) for n in rows]
    private_bytes, _ = pool_bytes(graph for _, graph, _ in private)
    del private

    cache = GraphCache(device="cuda", reserve_bytes=0)
    with cache.serving(1):
        for n in rows:
            cache.fetch("network", n, lambda pool, n=n: capture(n, pool))
    shared_bytes, kept_bytes = pool_bytes(graph for _, graph, _ in cache.graphs("network").values())
    largest = 2 * 4096 * 4 * width * 4  # the largest shape's two live hidden layers, float32
    assert shared_bytes < 0.6 * private_bytes, (shared_bytes, private_bytes)
    assert shared_bytes < 1.5 * largest, (shared_bytes, largest)
    assert 0 < kept_bytes < 0.1 * shared_bytes, "the outputs are small: the rest is the shared activations"
    stats = cache.stats()
    assert abs(stats["pool_gib"] - shared_bytes / 2**30) <= 0.01 and stats["pool_kept_gib"] <= 0.01

    for n in (256, 4096, 1024, 3072, 512, 2048, 4096, 256):
        with cache.serving(1):
            static, graph, output = cache.fetch("network", n, lambda pool: pytest.fail("captured again"))
        x = torch.randn(n, width, device="cuda")
        static.copy_(x)
        graph.replay()
        torch.testing.assert_close(output, network(x), atol=1e-4, rtol=1e-4)
