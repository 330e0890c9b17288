"""CUDA graph replay of the anomaly scorer, for single-image latency on a GPU.

Scoring one (query, render) pair with EfficientNet-Lite0 is a few hundred small kernels: at batch 1
the GPU waits on their launches, not on arithmetic (about 4 ms per pair at batch 1 against 0.25 ms
per pair at batch 16 on an H100, experiments/results/bench_metrics.md). Its shapes are fixed for a
run, so the whole forward pass can be captured once per batch size as a CUDA graph and replayed with
a single launch; the kernels, and so the maps, are the same as eager execution's.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

WARMUP_CALLS = 3  # eager calls before capture: cuDNN picks its algorithms, allocations settle


class GraphedScorer:
    """``scorer(query, render)`` replayed from a CUDA graph per input shape (eager on the CPU).

    Args:
        scorer: an :class:`splatpose.scoring.anomaly_maps.AnomalyScorer` on a CUDA device.
    Call: as the scorer: query, render [B, 3, H, W] in [0, 1] -> maps [B, S, S] (a fresh tensor).
    """

    def __init__(self, scorer: torch.nn.Module):
        self.scorer = scorer
        self.graphs: dict[tuple, tuple] = {}
        self.failed = False

    def __getattr__(self, name: str):  # backbone, prepare, size ... as the wrapped scorer
        return getattr(self.__dict__["scorer"], name)

    def __call__(self, query: torch.Tensor, render: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        # The object region and the photometric fit decide per image on the host (how many pixels are
        # object, trimmed fits): they run eagerly.
        if self.failed or query.device.type != "cuda" or alpha is not None:
            return self.scorer(query, render, alpha)
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
        side = torch.cuda.Stream(query.device)
        side.wait_stream(torch.cuda.current_stream(query.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.scorer(static_query, static_render)
        torch.cuda.current_stream(query.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            maps = self.scorer(static_query, static_render)
        return static_query, static_render, graph, maps
