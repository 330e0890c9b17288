"""Static-shape LightGlue (the detector's fast matcher) gives LightGlue's own matches.

On real ALIKED features of textured image pairs: padded queries against a db padded once, with
adaptive depth decided on the device, must give each pair the matches that LightGlue gives it alone
(pruning off on the CPU, where LightGlue would prune always; on a GPU it does not prune at <= 1024
keypoints), including pairs that LightGlue stops early.
"""

import numpy as np
import pytest
import torch

from splatpose.detect.static_lightglue import (StaticLightGlue, _chunks, bucket_length, compiled_steps, pad_features,
                                               static_forward)
from splatpose.sfm.config import compose_sfm_config
from splatpose.sfm.features import build_extractor
from splatpose.sfm.matchers import build_matcher
from textures import textured_pair  # tests/textures.py


def prepared_images(device: str, seeds=(0, 1, 2), keypoints=(300, 200, 250)):
    """(matcher, [query features], [db features]): seed s gives query s and db image s (its warp)."""
    cfg = compose_sfm_config("aliked", "lightglue", "global", {"max_keypoints": 512})
    cfg.matcher.width_confidence = -1
    matcher = build_matcher(cfg.matcher, "aliked", device)
    queries, db = [], []
    for seed, count in zip(seeds, keypoints):
        extractor = build_extractor(cfg.feature, count, device)  # different lengths exercise the padding
        for side, feats in zip((queries, db), extractor(torch.cat(textured_pair(256, seed)).to(device))):
            feats["image_size"] = np.array([256, 256])
            side.append(matcher.prepare(feats))
    return matcher, queries, db


def assert_like_lightglue(matcher, queries, db, retrieved, static_results, agreement: float, atol: float):
    matched = 0
    for q, per_query in enumerate(static_results):
        assert len(per_query) == len(retrieved[q])
        for d, (matches0, scores0) in zip(retrieved[q], per_query):
            expected0, expected_scores = matcher(queries[q], db[d])
            assert matches0.shape == expected0.shape and matches0.dtype == np.int64
            same = matches0 == expected0
            assert np.mean(same) >= agreement, (q, d)
            # A borderline match that flips in float16 has a score far from LightGlue's, and so does a
            # keypoint that is mutual in one and not the other below the filter threshold (both -1,
            # scores 0 and ~0.08, seen on the H100): compare the scores of the matches both agree on.
            both = same & (expected0 > -1)
            np.testing.assert_allclose(scores0[both], expected_scores[both], atol=atol)
            matched += int((expected0 > -1).sum())
    assert matched > 100, "the pairs must have real matches for the comparison to mean anything"


def test_static_lightglue_matches_like_lightglue_per_pair():
    matcher, queries, db = prepared_images("cpu")
    static = StaticLightGlue(matcher.model, db, lengths=(128, 256, 384))
    longest = max(f["keypoints"].shape[1] for f in db)
    assert static.db_kpts.shape[1] == bucket_length(longest, (128, 256, 384)) and static.path == "static eager (fp32)"
    # right pairs (many matches, LightGlue stops early) and wrong pairs (few matches, it runs longer)
    retrieved = [[0, 1, 2], [1, 0], [2]]
    results = static.match(queries, retrieved, pairs_per_call=4)  # two forward passes
    assert_like_lightglue(matcher, queries, db, retrieved, results, agreement=0.99, atol=1e-3)


def test_static_lightglue_stops_pairs_early_as_lightglue_does():
    """A pair that LightGlue stops at layer i must get layer i's assignment, not the last layer's."""
    matcher, queries, db = prepared_images("cpu", seeds=(0,), keypoints=(300,))
    stop = matcher.model({"image0": queries[0], "image1": db[0]})["stop"]
    assert stop < matcher.model.conf.n_layers, "this pair must stop early to test adaptive depth"
    static = StaticLightGlue(matcher.model, db)
    assert_like_lightglue(matcher, queries, db, [[0]], static.match(queries, [[0]]), agreement=0.99, atol=1e-3)


def test_a_call_pads_the_db_only_to_its_own_longest_image(monkeypatch):
    """Matching against short db images uses a shorter prefix of the padded db, with the same matches."""
    matcher, queries, db = prepared_images("cpu")
    static = StaticLightGlue(matcher.model, db, lengths=(128, 256, 384))
    lengths = []
    eager = static._eager
    monkeypatch.setattr(static, "_eager", lambda *args: lengths.append(args[-1]) or eager(*args))
    counts = [f["keypoints"].shape[1] for f in db]
    short = int(np.argmin(counts))
    results = static.match([queries[short]], [[short]])
    assert lengths == [bucket_length(counts[short], (128, 256, 384))] and lengths[0] < static.db_desc.shape[1]
    assert_like_lightglue(matcher, [queries[short]], db, [[short]], results, agreement=0.99, atol=1e-3)


def test_skipping_layers_after_every_pair_stopped_changes_nothing():
    """The early exit (after the layer where the last pair stopped) equals running every layer."""
    matcher, queries, db = prepared_images("cpu", seeds=(0, 1), keypoints=(300, 250))
    stops = [int(matcher.model({"image0": queries[i], "image1": db[i]})["stop"]) for i in (0, 1)]
    assert max(stops) < matcher.model.conf.n_layers, "the pairs must stop early for the exit to be taken"
    static = StaticLightGlue(matcher.model, db)
    keypoints0, desc0, count0 = pad_features(queries, 512)
    inputs = (desc0, matcher.model.posenc(keypoints0), count0, torch.tensor([0, 1]), torch.tensor([0, 1]))
    early = static._eager(*inputs, static.db_desc.shape[1])
    with torch.inference_mode():
        every_layer = static_forward(matcher.model, static.heads, *inputs[:3], static.db_desc, static.db_enc,
                                     static.db_count, *inputs[3:])
    assert torch.equal(early, every_layer)


def test_compiled_steps_trace_whole_and_serve_every_layer():
    """torch.compile traces each step whole (fullgraph: no graph break falls back to Python) and one
    compiled layer step serves every layer: a per-layer recompilation would cost seconds per layer and
    shape on the GPU. Traced with the eager backend here (the CPU needs no compiler); the GPU test runs
    TorchInductor."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    matcher, queries, db = prepared_images("cpu", seeds=(0, 1), keypoints=(300, 250))
    plain = StaticLightGlue(matcher.model, db)
    expected = plain.match(queries, [[0, 1], [1, 0]])
    torch._dynamo.reset()
    counters.clear()
    compiled = StaticLightGlue(matcher.model, db)
    compiled.steps = compiled_steps(backend="eager")
    results = compiled.match(queries, [[0, 1], [1, 0]])
    assert compiled.layers_run >= 3
    assert counters["stats"]["unique_graphs"] <= 4  # set-up, layer (with and without the stop check), assignment
    for per_query, expected_query in zip(results, expected):
        for (matches0, scores0), (expected0, expected_scores) in zip(per_query, expected_query):
            np.testing.assert_array_equal(matches0, expected0)
            np.testing.assert_allclose(scores0, expected_scores, atol=1e-6)


def test_a_query_without_keypoints_has_no_matches():
    matcher, queries, db = prepared_images("cpu", seeds=(0,), keypoints=(200,))
    empty = {"keypoints": torch.zeros(1, 0, 2), "descriptors": torch.zeros(1, 0, 128), "image_size": torch.ones(1, 2)}
    results = StaticLightGlue(matcher.model, db).match([empty, queries[0]], [[0], [0]])
    assert results[0][0][0].shape == (0,)
    assert (results[1][0][0] > -1).sum() > 50


def test_buckets_and_chunks():
    assert bucket_length(1, (256, 512)) == 256 and bucket_length(513, (256, 512)) == 768
    assert _chunks([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
    assert _chunks([5, 40, 5], 32) == [[0], [1], [2]]  # a query with more pairs than a call still runs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision, agreement, atol", [("fp32", 0.98, 2e-2), ("tf32", 0.95, 5e-2), ("fp16", 0.95, 5e-2)])
def test_static_lightglue_cuda_graph_matches_like_lightglue(precision, agreement, atol):
    matcher, queries, db = prepared_images("cuda")
    static = StaticLightGlue(matcher.model, db, precision=precision)
    retrieved = [[0, 1, 2], [1, 0, 2], [2, 0, 1]]
    for _ in range(2):  # the first call captures the graph, the second replays it
        results = static.match(queries, retrieved)
    assert static.path == f"static+cuda_graph ({precision})" and len(static.graphs) == 1
    assert_like_lightglue(matcher, queries, db, retrieved, results, agreement, atol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shapes_captured_ahead_serve_every_query_length_without_a_new_capture():
    """The detector's warm-up captures every (query bucket, db bucket) shape ahead: queries of 300, 200 and
    250 keypoints (buckets 384 and 256) then replay graphs captured from placeholders, and match as
    LightGlue does."""
    matcher, queries, db = prepared_images("cuda")
    static = StaticLightGlue(matcher.model, db, lengths=(128, 256, 384, 512))
    db_buckets = {bucket_length(count, static.lengths) for count in static.db_counts}
    assert static.capture_shapes(num_queries=1, pairs_per_query=2, max_query_keypoints=300) == 3 * len(db_buckets)
    assert static.capture_shapes(num_queries=1, pairs_per_query=2, max_query_keypoints=300) == 0
    shapes = set(static.graphs)
    retrieved = [[0, 2], [1, 0], [2, 1]]
    results = [static.match([query], [pairs])[0] for query, pairs in zip(queries, retrieved)]
    assert set(static.graphs) == shapes and static.path == "static+cuda_graph (fp32)"
    assert_like_lightglue(matcher, queries, db, retrieved, results, agreement=0.98, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_shapes_are_released_least_recently_used_first_when_memory_runs_short():
    """The captured shapes are a cache bounded by the device's free memory: asking for more free memory
    than the device has releases every older shape before each capture, and what is left still matches
    as LightGlue does (a long-running service meets new shapes for as long as it runs)."""
    matcher, queries, db = prepared_images("cuda")
    static = StaticLightGlue(matcher.model, db, lengths=(128, 256, 384, 512))
    retrieved = [[0, 2], [1, 0], [2, 1]]
    for query, pairs in zip(queries, retrieved):  # buckets 384, 256, 256: two shapes
        static.match([query], [pairs])
    assert len(static.graphs) == 2
    first, second = list(static.graphs)
    static.match([queries[0]], [retrieved[0]])  # a replay makes its shape the most recent
    assert list(static.graphs) == [second, first]
    static.reserve_bytes = torch.cuda.get_device_properties(static.device).total_memory
    results = [static.match([query], [pairs])[0] for query, pairs in zip(queries, [[0, 1, 2]] * 3)]
    # three pairs a query: new shapes; the second evicts the first (the third query replays the second)
    assert len(static.graphs) == 1 and first not in static.graphs and second not in static.graphs
    assert static.path == "static+cuda_graph (fp32)"
    assert_like_lightglue(matcher, queries, db, [[0, 1, 2]] * 3, results, agreement=0.98, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision, agreement, atol", [("fp32", 0.98, 2e-2), ("fp16", 0.95, 5e-2)])
def test_compiled_cuda_graphs_match_like_lightglue(precision, agreement, atol):
    """TorchInductor's fused steps, captured as CUDA graphs, still give LightGlue's matches, at two query
    lengths (one compilation, dynamic shapes)."""
    matcher, queries, db = prepared_images("cuda")
    static = StaticLightGlue(matcher.model, db, precision=precision, compile=True)
    for retrieved in ([[0, 1, 2], [1, 0, 2], [2, 0, 1]], [[1, 2]]):
        chosen = [0, 1, 2] if len(retrieved) == 3 else [1]
        for _ in range(2):  # capture, then replay
            results = static.match([queries[q] for q in chosen], retrieved)
        assert static.path == f"static+cuda_graph ({precision}, compiled)", static.path
        assert_like_lightglue(matcher, [queries[q] for q in chosen], db, retrieved, results, agreement, atol)
    assert len(static.graphs) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_stops_early_with_the_every_layer_result():
    """The graphs' early exit (the host reads each layer's stop byte one layer late) gives what running
    every layer gives, and is taken: fewer layers run than LightGlue has."""
    matcher, queries, db = prepared_images("cuda", seeds=(0, 1), keypoints=(300, 250))
    stops = [int(matcher.model({"image0": queries[i], "image1": db[i]})["stop"]) for i in (0, 1)]
    assert max(stops) < matcher.model.conf.n_layers, f"the pairs must stop early for the exit to be taken: {stops}"
    static = StaticLightGlue(matcher.model, db)
    keypoints0, desc0, count0 = pad_features(queries, 512)
    with torch.inference_mode():
        inputs = (desc0, matcher.model.posenc(keypoints0), count0.cuda(), torch.tensor([0, 1], device="cuda"),
                  torch.tensor([0, 1], device="cuda"))
        every_layer = static_forward(matcher.model, static.heads, *inputs[:3], static.db_desc, static.db_enc,
                                     static.db_count, *inputs[3:])
    for _ in range(2):  # capture, then replay
        replayed = static._forward(*inputs, db_length=static.db_desc.shape[1]).clone()
    assert static.use_graphs and static.layers_run <= max(stops) + 2, (static.layers_run, stops)
    # the same functions, captured: equal up to the kernels cuBLAS/cuDNN pick inside a capture
    same = replayed[0] == every_layer[0]
    assert same.float().mean() > 0.995, same.float().mean()
    assert (every_layer[0] > -1).sum() > 100
    torch.testing.assert_close(replayed[1][same], every_layer[1][same], atol=1e-3, rtol=0)


def test_tf32_precision_leaves_the_process_setting_alone():
    matcher, queries, db = prepared_images("cpu", seeds=(0,), keypoints=(150,))
    before = torch.backends.cuda.matmul.allow_tf32
    StaticLightGlue(matcher.model, db, precision="tf32").match(queries, [[0]])
    assert torch.backends.cuda.matmul.allow_tf32 == before
    with pytest.raises(ValueError, match="lightglue_precision='bf16' is unknown"):
        StaticLightGlue(matcher.model, db, precision="bf16")
