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

The scorer: scoring one (query, render) pair with EfficientNet-Lite0 is a few hundred small kernels: at
batch 1 the GPU waits on their launches, not on arithmetic (experiments/results/bench_metrics.md). Its
shapes are fixed for a run, so the whole forward pass is captured once per batch size and replayed with
a single launch; the kernels, and so the maps, are the same as eager execution's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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


class GraphedScorer:
    """``scorer(query, render)`` replayed from a CUDA graph per input shape (eager on the CPU).

    Args:
        scorer: an :class:`splatpose.scoring.anomaly_maps.AnomalyScorer` on a CUDA device.
    Call: as the scorer: query, render [B, 3, H, W] in [0, 1] (alpha, expected as the scorer's) -> maps
    [B, S, S] (a fresh tensor).
    """

    def __init__(self, scorer: torch.nn.Module):
        self.scorer = scorer
        self.graphs: dict[tuple, tuple] = {}
        self.failed = False

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
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(query, render)
            except RuntimeError as error:  # a backend that cannot be captured: stay eager, say so once
                log.warning("CUDA graph capture of the scorer failed (%s); scoring eagerly", error)
                self.failed = True
                return self.scorer(query, render)
        static_query, static_render, graph, maps = self.graphs[key]
        static_query.copy_(query)
        static_render.copy_(render)
        graph.replay()
        return maps.clone()

    def _capture(self, query: torch.Tensor, render: torch.Tensor) -> tuple:
        static_query, static_render = query.clone(), render.contiguous().clone()
        warm_up_on_side_stream(lambda: self.scorer(static_query, static_render), query.device, WARMUP_CALLS)
        graph, maps = capture_graph(lambda: self.scorer(static_query, static_render))
        return static_query, static_render, graph, maps
