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
   bounds what the graphs hold: free device memory kept above a reserve, one retry of a capture that runs
   out of device memory after the other batch sizes' graphs are released, and, when
   ``detect.graph_batch_sizes`` is set, the graphs of at most that many batch sizes (least recently served
   released).

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
    what ``function`` returned: tensors that every replay writes. ``pool``: a memory pool to share with
    graphs captured before (``graph.pool()``), for graphs that replay in sequence over shared buffers.
    Contexts that the captured kernels depend on (autocast, inference mode) belong inside ``function``.
    Raises what the capture raises (RuntimeError for an operation that cannot be captured)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        result = function()
    return graph, result


RELEASES_REMEMBERED = 20  # GraphCache.stats lists the last releases


@dataclass
class _Entry:
    """One stored capture: what the capture returned (graph, static buffers, outputs) and the batch sizes
    that captured or replayed it."""

    value: object
    batch_sizes: set = field(default_factory=set)


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the device ran out of memory: torch's allocator's error, or a CUDA call's
    ("CUDA error: out of memory") that a capture can raise as a plain RuntimeError."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


class GraphCache:
    """The CUDA graphs of one detector (its scorer, ALIKED and static LightGlue), kept per batch size served.

    Each accelerator stores what its capture returns (the graph, its static buffers and outputs) here,
    under (owner, key), through :meth:`fetch` (the owner: the accelerator itself, so that two of a kind
    never share graphs; its ``OWNER`` attribute names it in :meth:`stats`); nothing else keeps them, so
    releasing an entry frees its graph's private memory pool. The detector says which batch size it serves
    (:meth:`serving`, around each batch's stages). A graph belongs to every batch size that captured or
    replayed it (LightGlue's 32-query calls serve batches of 32 and of 64 alike); outside :meth:`serving`,
    to ``None``.

    The contract (one home for every accelerator's graphs):

    - at most ``max_batch_sizes`` batch sizes are kept (None: no limit): serving one more releases the least
      recently served batch size first, with every graph that no kept batch size uses;
    - before each capture, the least recently used graphs (of any batch size) are released one by one while
      the device (``device``) has less than ``reserve_bytes`` free (default: a tenth of it, at least 2 GiB);
    - a capture that runs out of device memory (``torch.cuda.OutOfMemoryError``, or a CUDA call's "out of
      memory" RuntimeError) releases every other batch size (and the graphs only they use) and is tried once
      more; a second time it raises ``torch.cuda.OutOfMemoryError`` to the caller, which keeps its graphs on
      (the detector then redoes the batch one image at a time, as after any failed batch);
    - a release is followed by ``torch.cuda.empty_cache()``: the pools go back to the device;
    - a replay runs the graph captured for its key, or one captured again from the same function at the same
      shape after a release: the same detections (tests/test_detect_graph_cache.py);
    - releases are counted in :meth:`stats` and logged (the first one as a warning).

    A caller copies a replay's outputs out before its next :meth:`fetch` (a capture may release the graph
    that wrote them). The bookkeeping is device-agnostic: values can be anything, and without a CUDA device
    the memory steps are skipped (the CPU tests run the policy so).
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

    def fetch(self, owner: Hashable, key: Hashable, capture: Callable[[], Result]) -> Result:
        """What ``capture()`` returned for (``owner``, ``key``), captured now when not kept (after releasing
        graphs for free memory, and once more after an out-of-memory error, see the class); it becomes the
        most recently used and belongs to the batch size served now."""
        self._keep(self.batch_size)
        name = (owner, key)
        entry = self._entries.get(name)
        if entry is None:
            self._make_room()
            entry = self._entries[name] = _Entry(self._captured(capture))
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
        process holds (GiB: reserved by PyTorch's allocator, graph pools included; free on the device)."""
        per_owner: dict[str, int] = {}
        for owner, _ in self._entries:
            name = str(getattr(owner, "OWNER", owner))
            per_owner[name] = per_owner.get(name, 0) + 1
        stats = {"max_batch_sizes": self.max_batch_sizes, "batch_sizes": self.batch_sizes(), "graphs": per_owner,
                 **self.counts, "releases": list(self.releases)}
        if self._on_cuda():
            stats["memory_reserved_gib"] = round(torch.cuda.memory_reserved(self.device) / 2**30, 2)
            stats["device_free_gib"] = round(torch.cuda.mem_get_info(self.device)[0] / 2**30, 2)
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
        if not self._on_cuda() or not self.reserve_bytes:
            return
        if torch.cuda.mem_get_info(self.device)[0] < self.reserve_bytes:
            self._free_memory()  # the allocator's cached blocks first, then graphs
        released = 0
        while self._entries and torch.cuda.mem_get_info(self.device)[0] < self.reserve_bytes:
            self._drop([next(iter(self._entries))])
            released += 1
        if released:
            self.counts["released_for_memory"] += released
            self._record({"batch_size": None, "graphs": released,
                          "why": f"less than {self.reserve_bytes / 2**30:.1f} GiB free before a capture"})

    def _captured(self, capture: Callable[[], Result]) -> Result:
        try:
            return capture()
        except RuntimeError as error:
            if not out_of_memory(error):
                raise
            message = str(error).splitlines()[0] if str(error) else "out of memory"
        # out of the except clause: the failed capture's frames, and the tensors they held, are gone
        self.counts["out_of_memory_retries"] += 1
        others = [size for size in self._batch_sizes if size != self.batch_size]
        log.warning("CUDA graph capture ran out of device memory (%s); releasing the graphs of the other batch "
                    "sizes (%s) and capturing once more", message, others)
        for size in others:
            self._release_batch_size(size, "out of device memory during a capture")
        self._free_memory()
        try:
            return capture()
        except RuntimeError as error:
            if isinstance(error, torch.cuda.OutOfMemoryError) or not out_of_memory(error):
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
            static_query, static_render, graph, maps = self.cache.fetch(self, key,
                                                                        lambda: self._capture(query, render))
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

    def _capture(self, query: torch.Tensor, render: torch.Tensor) -> tuple:
        static_query, static_render = query.clone(), render.contiguous().clone()
        warm_up_on_side_stream(lambda: self.scorer(static_query, static_render), query.device, WARMUP_CALLS)
        graph, maps = capture_graph(lambda: self.scorer(static_query, static_render))
        return static_query, static_render, graph, maps
