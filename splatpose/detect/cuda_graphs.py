"""CUDA graphs for the detector: the capture protocol its accelerators share, and the scorer's graph.

The protocol (the scorer here, ALIKED in :mod:`splatpose.detect.static_aliked`, LightGlue in
:mod:`splatpose.detect.static_lightglue`):

1. A shape is captured at first sight (or ahead, when warming up), over static input buffers (clones
   of its first inputs).
2. Warm-up first, :func:`warm_up_on_side_stream`: a few eager calls on a side stream, so that what
   initialises lazily (cuDNN's and cuBLAS's algorithm choice, SDPA's kernels, torch.compile) does so
   outside the capture, as PyTorch's notes on CUDA graphs advise.
3. Capture, :func:`capture_graph`: the graph and the tensors its replays write (fixed buffers).
4. Replay: copy the new inputs into the static buffers, replay, read the outputs (a copy, if they must
   outlive the next replay).
5. A capture that raises RuntimeError (an operation that cannot be captured) turns that accelerator's
   graphs off for good: it runs eagerly from then on, logs one warning and says so (its ``path``; the
   scorer's ``failed``). What each falls back to, and any check that a replay equals eager execution,
   is its own.

6. Every captured graph is kept in one :class:`GraphCache` per detector, the one home of the policy that
   bounds what the graphs hold: one memory pool shared by every capture, free device memory kept above a
   reserve, one retry of a capture that runs out of device memory after every graph is released, and,
   when ``detect.graph_batch_sizes`` is set, the graphs of at most that many batch sizes (least recently
   served released).

The scorer: scoring one (query, render) pair with EfficientNet-Lite0 is a few hundred small kernels: at
batch 1 the GPU waits on their launches, not on arithmetic (experiments/results/bench_metrics.md). Its
shapes are fixed for a run, so the whole forward pass is captured once per batch size and replayed with
a single launch; the kernels, and so the maps, are the same as eager execution's.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from splatpose.scoring.anomaly_maps import discount_expected

log = logging.getLogger(__name__)

WARMUP_CALLS = 3  # the scorer's eager calls before capture: cuDNN picks its algorithms, allocations settle

Result = TypeVar("Result")


def warm_up_on_side_stream(function: Callable[[], object], device: torch.device | str, calls: int) -> None:
    """Call ``function()`` ``calls`` times on a new side stream of CUDA ``device``, ordered after the
    work already queued on the current stream; the current stream then waits for them."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(calls):
            function()
    torch.cuda.current_stream(device).wait_stream(side)


def capture_graph(function: Callable[[], Result], pool=None) -> tuple[torch.cuda.CUDAGraph, Result]:
    """Capture ``function()`` as one CUDA graph (its kernels are recorded, not run). Returns the graph and
    what ``function`` returned: tensors that every replay writes. ``pool``: the memory pool to capture into
    (a :class:`GraphCache`'s, shared with the graphs captured before; None: a private one).
    Contexts that the captured kernels depend on (autocast, inference mode) belong inside ``function``.
    Raises what the capture raises (RuntimeError for an operation that cannot be captured)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        result = function()
    return graph, result


RELEASES_REMEMBERED = 20  # GraphCache.stats lists the last releases


@dataclass
class _Entry:
    """One stored capture: what the capture returned (graph, static buffers, outputs), the memory pool it was
    captured into and the batch sizes that captured or replayed it."""

    value: object
    pool: tuple
    batch_sizes: set = field(default_factory=set)


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the device ran out of memory: torch's allocator's error, or a CUDA call's
    ("CUDA error: out of memory") that a capture can raise as a plain RuntimeError."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


class GraphCache:
    """The CUDA graphs of one detector (its scorer, ALIKED and static LightGlue), kept per batch size served.

    Each accelerator stores what its capture returns (the graph, its static buffers and outputs) here,
    under (owner, key), through :meth:`fetch` (the owner: the accelerator itself, so that two of a kind
    never share graphs; its ``OWNER`` attribute names it in :meth:`stats`); nothing else keeps them. The
    detector says which batch size it serves (:meth:`serving`, around each batch's stages). A graph belongs
    to every batch size that captured or replayed it (LightGlue's 32-query calls serve batches of 32 and of
    64 alike); outside :meth:`serving`, to ``None``.

    **One memory pool.** Every capture goes into one pool (``torch.cuda.graph_pool_handle()``), so the memory
    a graph uses only while it runs (its activations, freed by the end of its capture) is reused by the
    graphs captured after it: the pool holds the tensors the graphs keep (static outputs, LightGlue's pair
    state) plus about the largest graph's activations, not every graph's own (with a private pool per
    capture, one batch size's 14-28 LightGlue shapes and its scorer filled an H100:
    experiments/results/detector_graph_memory_h100_2026-12-07_s25.md). Graphs that never run concurrently
    may share a pool in any order as long as none reads another's outputs (PyTorch's CUDA graph notes,
    "Sharing memory across captures"; pytorch/pytorch#166975). So the callers' side of the contract:

    - replays run on one stream, one at a time (the detector's thread);
    - a replay may overwrite what any other graph of the cache wrote: a caller reads or copies a replay's
      outputs before any other graph of the cache replays (and before its next :meth:`fetch`, which may
      release the graph that wrote them), and a graph's static inputs are allocated outside its capture.

    The pool goes back to the device only when no graph captured into it is kept. The next capture uses
    the kept graphs' pool, or a new one when none is kept or the last capture failed (the allocator refuses
    a pool that no graph uses any more, and one whose capture broke off may still be marked as capturing).

    The bounds (one home for every accelerator's graphs):

    - at most ``max_batch_sizes`` batch sizes are kept (None: no limit): serving one more releases the least
      recently served batch size first, with every graph that no kept batch size uses (its tensors' memory
      then serves the next captures);
    - before each capture, while the device (``device``) has less than ``reserve_bytes`` free (default: a
      tenth of it, at least 2 GiB), the allocator's cached blocks go back, then every graph is released (the
      pool goes back to the device only whole);
    - a capture that runs out of device memory (``torch.cuda.OutOfMemoryError``, or a CUDA call's "out of
      memory" RuntimeError) releases every graph and is tried once more, in a new pool; a second time it
      raises ``torch.cuda.OutOfMemoryError`` to the caller, which keeps its graphs on (the detector then
      redoes the batch one image at a time, as after any failed batch);
    - a release is followed by ``torch.cuda.empty_cache()``;
    - a replay runs the graph captured for its key, or one captured again from the same function at the same
      shape after a release: the same detections (tests/test_detect_graph_cache.py);
    - releases are counted in :meth:`stats` and logged (the first one as a warning).

    The bookkeeping is device-agnostic: values can be anything, and without a CUDA device the memory steps
    are skipped (the CPU tests run the policy so).
    """

    def __init__(self, max_batch_sizes: int | None = None, device: torch.device | str | None = None,
                 reserve_bytes: int | None = None):
        if max_batch_sizes is not None and int(max_batch_sizes) < 1:
            raise ValueError(f"detect.graph_batch_sizes={max_batch_sizes!r}: keep the CUDA graphs of at least 1 "
                             "batch size, or null for no limit")
        self.max_batch_sizes = None if max_batch_sizes is None else int(max_batch_sizes)
        self.device = None if device is None else torch.device(device)
        on_cuda = self.device is not None and self.device.type == "cuda"
        if reserve_bytes is None:
            reserve_bytes = (max(2 << 30, torch.cuda.get_device_properties(self.device).total_memory // 10)
                             if on_cuda else 0)
        self.reserve_bytes = int(reserve_bytes)
        self.batch_size: Hashable = None  # the batch size served now
        self._pool: tuple | None = None  # the pool of the next capture (see the class)
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()  # least recently used first
        self._batch_sizes: OrderedDict[Hashable, None] = OrderedDict()  # kept, least recently served first
        self.counts = {"captures": 0, "released_batch_sizes": 0, "released_graphs": 0, "released_for_memory": 0,
                       "out_of_memory_retries": 0}
        self.releases: list[dict] = []  # the last RELEASES_REMEMBERED: batch size, graphs, why

    @contextlib.contextmanager
    def serving(self, batch_size: Hashable) -> Iterator[None]:
        """Within: the graphs fetched belong to ``batch_size``, which becomes the most recently served (one not
        kept yet is kept now, releasing the least recently served beyond ``max_batch_sizes``)."""
        previous = self.batch_size
        self.batch_size = batch_size
        self._keep(batch_size)
        try:
            yield
        finally:
            self.batch_size = previous

    def fetch(self, owner: Hashable, key: Hashable, capture: Callable[[tuple], Result]) -> Result:
        """What ``capture(pool)`` returned for (``owner``, ``key``), captured now when not kept (after releasing
        graphs for free memory, and once more after an out-of-memory error, see the class); it becomes the
        most recently used and belongs to the batch size served now. ``capture`` captures every graph it makes
        into ``pool`` (:func:`capture_graph`'s argument) and its static inputs outside them."""
        self._keep(self.batch_size)
        name = (owner, key)
        entry = self._entries.get(name)
        if entry is None:
            self._make_room()
            entry = self._entries[name] = _Entry(*self._captured(capture))
            self.counts["captures"] += 1
        self._entries.move_to_end(name)
        entry.batch_sizes.add(self.batch_size)
        return entry.value

    def graphs(self, owner: Hashable) -> dict:
        """``owner``'s kept values by key, least recently used first."""
        return {key: entry.value for (who, key), entry in self._entries.items() if who == owner}

    def release_owner(self, owner: Hashable) -> None:
        """Drop every graph of ``owner`` (its accelerator stopped replaying graphs)."""
        self._drop([name for name in self._entries if name[0] == owner])

    def batch_sizes(self) -> list:
        """The batch sizes kept, least recently served first."""
        return list(self._batch_sizes)

    def stats(self) -> dict:
        """What is kept and what was released: the limit, the batch sizes kept (least recently served
        first), graphs kept per owner, the counts, the last releases and, on CUDA, the device memory the
        process holds (GiB: reserved by PyTorch's allocator, graph pools included; free on the device) and
        the kept graphs' pool (GiB: ``pool_gib`` reserved by it, ``pool_kept_gib`` of it held by the tensors
        the graphs keep; the rest is the activations the graphs share)."""
        per_owner: dict[str, int] = {}
        for owner, _ in self._entries:
            name = str(getattr(owner, "OWNER", owner))
            per_owner[name] = per_owner.get(name, 0) + 1
        stats = {"max_batch_sizes": self.max_batch_sizes, "batch_sizes": self.batch_sizes(), "graphs": per_owner,
                 **self.counts, "releases": list(self.releases)}
        if self._on_cuda():
            stats["memory_reserved_gib"] = round(torch.cuda.memory_reserved(self.device) / 2**30, 2)
            stats["device_free_gib"] = round(self._free_bytes() / 2**30, 2)
            pools = {tuple(entry.pool) for entry in self._entries.values()}
            segments = [segment for segment in torch.cuda.memory_snapshot()
                        if tuple(segment.get("segment_pool_id", ())) in pools]
            stats["pool_gib"] = round(sum(segment["total_size"] for segment in segments) / 2**30, 2)
            stats["pool_kept_gib"] = round(sum(segment["allocated_size"] for segment in segments) / 2**30, 2)
        return stats

    # ----------------------------------------------------------------------------------------------

    def _keep(self, batch_size: Hashable) -> None:
        if batch_size in self._batch_sizes:
            self._batch_sizes.move_to_end(batch_size)
            return
        self._batch_sizes[batch_size] = None
        if self.max_batch_sizes is not None:
            for old in list(self._batch_sizes)[: -self.max_batch_sizes]:
                self._release_batch_size(old, f"limit of {self.max_batch_sizes} batch sizes (detect.graph_batch_sizes)",
                                         "; a process that keeps meeting more batch sizes captures them again each "
                                         "time: raise detect.graph_batch_sizes")

    def _release_batch_size(self, batch_size: Hashable, why: str, hint: str = "") -> None:
        """Forget ``batch_size``; release the graphs no other kept batch size uses."""
        del self._batch_sizes[batch_size]
        orphaned = []
        for name, entry in self._entries.items():
            entry.batch_sizes.discard(batch_size)
            if not entry.batch_sizes:
                orphaned.append(name)
        self._drop(orphaned)
        self.counts["released_batch_sizes"] += 1
        self._record({"batch_size": batch_size, "graphs": len(orphaned), "why": why}, hint)

    def _make_room(self) -> None:
        if not self._on_cuda() or not self.reserve_bytes or self._free_bytes() >= self.reserve_bytes:
            return
        self._free_memory()  # the allocator's cached blocks first, then the graphs
        if self._entries and self._free_bytes() < self.reserve_bytes:
            self.counts["released_for_memory"] += len(self._entries)
            self._release_every_graph(f"less than {self.reserve_bytes / 2**30:.1f} GiB free before a capture")

    def _free_bytes(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0]

    def _release_every_graph(self, why: str) -> None:
        """Release every graph (their pool goes back to the device) and forget the other batch sizes."""
        others = [size for size in self._batch_sizes if size != self.batch_size]
        for size in others:
            del self._batch_sizes[size]
        self.counts["released_batch_sizes"] += len(others)
        graphs = len(self._entries)
        self._drop(list(self._entries))
        self._record({"batch_size": [*others, self.batch_size], "graphs": graphs, "why": why})

    def _pool_for_capture(self) -> tuple:
        """The kept graphs' pool, or a new one (see the class)."""
        if self._pool is None or all(entry.pool != self._pool for entry in self._entries.values()):
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def _captured(self, capture: Callable[[tuple], Result]) -> tuple[Result, tuple]:
        """What ``capture(pool)`` returned and the pool, with the out-of-memory retry (see the class)."""
        pool = self._pool_for_capture()
        try:
            return capture(pool), pool
        except Exception as error:
            self._pool = None  # a capture that broke off may leave its pool marked as capturing
            if not isinstance(error, RuntimeError) or not out_of_memory(error):
                raise
            message = str(error).splitlines()[0] if str(error) else "out of memory"
        # out of the except clause: the failed capture's frames, and the tensors they held, are gone
        self.counts["out_of_memory_retries"] += 1
        log.warning("CUDA graph capture ran out of device memory (%s); releasing every graph (batch sizes %s) "
                    "and capturing once more", message, self.batch_sizes())
        self._release_every_graph("out of device memory during a capture")
        pool = self._pool_for_capture()
        try:
            return capture(pool), pool
        except Exception as error:
            self._pool = None
            if not isinstance(error, RuntimeError) or isinstance(error, torch.cuda.OutOfMemoryError) \
                    or not out_of_memory(error):
                raise
            # as torch's own error, so that the accelerators tell it from a kernel that cannot be captured
            raise torch.cuda.OutOfMemoryError(f"{error} (capturing a CUDA graph, twice)") from error

    def _drop(self, names: list[tuple]) -> None:
        if not names:
            return
        self._synchronize()  # no replay of a graph dropped here is still running
        for name in names:
            del self._entries[name]
        self.counts["released_graphs"] += len(names)
        self._free_memory()

    def _record(self, release: dict, hint: str = "") -> None:
        first = not self.releases
        self.releases = [*self.releases, release][-RELEASES_REMEMBERED:]
        log.log(logging.WARNING if first else logging.INFO, "CUDA graphs released: %d of batch size %s (%s); "
                "batch sizes kept: %s%s", release["graphs"], release["batch_size"], release["why"], self.batch_sizes(),
                hint if first else "")

    def _on_cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def _synchronize(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize(self.device if self._on_cuda() else None)

    def _free_memory(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._synchronize()
            torch.cuda.empty_cache()


class GraphedScorer:
    """``scorer(query, render)`` replayed from a CUDA graph per input shape (eager on the CPU).

    Args:
        scorer: an :class:`splatpose.scoring.anomaly_maps.AnomalyScorer` on a CUDA device.
        cache: where the graphs are kept (the detector's, shared with its other accelerators); default: its own.
    Call: as the scorer: query, render [B, 3, H, W] in [0, 1] (alpha, expected as the scorer's) -> maps
    [B, S, S] (a fresh tensor).
    """

    OWNER = "scorer"

    def __init__(self, scorer: torch.nn.Module, cache: GraphCache | None = None):
        self.scorer = scorer
        self.cache = cache if cache is not None else GraphCache()
        self.failed = False

    @property
    def graphs(self) -> dict:
        """The captured shapes' (static query, static render, graph, maps), least recently used first."""
        return self.cache.graphs(self)

    def __getattr__(self, name: str):  # backbone, prepare, size ... as the wrapped scorer
        return getattr(self.__dict__["scorer"], name)

    def __call__(self, query: torch.Tensor, render: torch.Tensor, alpha: torch.Tensor | None = None,
                 expected: torch.Tensor | None = None) -> torch.Tensor:
        # The object region and the photometric fit decide per image on the host (how many pixels are
        # object, trimmed fits), the denoising runs there: they run eagerly.
        if self.failed or query.device.type != "cuda" or alpha is not None or self.scorer.denoise_strength:
            return self.scorer(query, render, alpha, expected)
        maps = self._replayed(query, render)
        if expected is not None and self.scorer.uncertainty_weight:  # the scorer's last step, outside the graph
            return discount_expected(maps, expected, self.scorer.uncertainty_weight)
        return maps

    def _replayed(self, query: torch.Tensor, render: torch.Tensor) -> torch.Tensor:
        key = (tuple(query.shape), query.dtype, render.dtype)
        try:
            static_query, static_render, graph, maps = self.cache.fetch(
                self, key, lambda pool: self._capture(query, render, pool))
        except torch.cuda.OutOfMemoryError:  # after the cache's retry: the batch fails, the graphs stay on
            raise
        except RuntimeError as error:  # a backend that cannot be captured: stay eager, say so once
            log.warning("CUDA graph capture of the scorer failed (%s); scoring eagerly", error)
            self.failed = True
            self.cache.release_owner(self)
            return self.scorer(query, render)
        static_query.copy_(query)
        static_render.copy_(render)
        graph.replay()
        return maps.clone()

    def _capture(self, query: torch.Tensor, render: torch.Tensor, pool: tuple) -> tuple:
        static_query, static_render = query.clone(), render.contiguous().clone()
        warm_up_on_side_stream(lambda: self.scorer(static_query, static_render), query.device, WARMUP_CALLS)
        graph, maps = capture_graph(lambda: self.scorer(static_query, static_render), pool)
        return static_query, static_render, graph, maps
