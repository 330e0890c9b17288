"""The detector: what a user relies on.

On a finished run of a small generated class (tests marked slow: the module fixture runs the real
evaluation pipeline first, a few minutes on two idle CPU cores): the detector's maps for the
evaluation's own test images are the evaluation's maps (same poses, same normalisation), a batch
gives what single images give, bad inputs become per-image errors or flags while the batch goes on,
and `task=detect` writes its files. Without a run (default suite, seconds): input checks, run-folder
errors, and batched LightGlue against pairwise LightGlue on real ALIKED features.
"""

import csv
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from splatpose.data import resolve_dataset
from splatpose.data.cameras import rotation_error_deg
from splatpose.data.mad_sim import read_image
from splatpose.detect.batched_lightglue import match_pairs_batched
from splatpose.detect.finished_run import RunFolderError, load_finished_run
from splatpose.detect.inputs import InputError, LoadedImage, expand_inputs, load_input, pixels_to_float_torch
from splatpose.detect.detector import Detector, detect_task
from splatpose.metrics import normalise_maps
from splatpose.scoring.anomaly_maps import build_scorer
from splatpose.sfm.matchers import build_matcher
from textures import textured_pair  # tests/textures.py

ROOT = Path(__file__).resolve().parents[1]
CLASS = "03Nut"  # compact and textured: plenty of keypoints at 128 px
# The same generated class as tests/test_sfm_reference.py, so one pytest session generates it once.
OVERRIDES = ["debug=fast", "logger=none", "device=cpu", f"class={CLASS}", "dataset.preset=small",
             "dataset.generator.width=128", "dataset.generator.height=128", "dataset.generator.n_train=16",
             "dataset.generator.n_test_good=2", "dataset.generator.n_test_per_defect=1",
             "sfm.max_keypoints=512", "sfm.resize_max=256", "sfm.resize_force=true", "sfm.db_pairs.num_neighbors=4",
             "sfm.localization.top_k=3", "splat.steps=30", "splat.lr.means=1.6e-4", "splat.lr.scales=5e-3",
             "splat.lr.sh0=2.5e-3", "splat.lr.opacities=5e-2"]
# The paper's learning rates for this 30-step scene: with splat=fast's doubled rates the 30-step splats
# are rough enough that a 1e-7 pose difference (float rounding between the detector's and the localize
# stage's feature extraction) crosses the rasterizer's alpha thresholds during refinement, and maps
# differed by 2e-4 (single image vs batch: refined poses 4e-4 apart). The check is of the computation,
# so it runs on a scene where rounding stays rounding.
SEQUENTIAL = {"matching": "sequential"}


def compose_config(tmp_path: Path, overrides=()) -> OmegaConf:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.output_dir={tmp_path / 'out'}",
                                           f"paths.cache_dir={tmp_path / 'cache'}", *OVERRIDES, *overrides])
        OmegaConf.resolve(cfg)
    return cfg


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """A finished evaluation run (the real pipeline) and the class it ran on."""
    from splatpose.pipeline import run_pipeline

    base = tmp_path_factory.mktemp("evaluation")
    cfg = compose_config(base, [f"dataset.root={tmp_path_factory.getbasetemp() / 'synthetic'}"])
    results = run_pipeline(cfg)
    return Path(cfg.paths.output_dir), results, resolve_dataset(cfg.dataset, CLASS), cfg


@pytest.fixture(scope="module")
def detector(evaluation):
    run_dir, _, _, _ = evaluation
    return Detector.from_run(run_dir, SEQUENTIAL, device="cpu")


def evaluation_maps(results: dict, data, cfg) -> np.ndarray:
    """The evaluation's normalised maps, recomputed from its cached renders through its scorer."""
    renders = np.load(Path(results["stage_dirs"]["render"]) / "renders.npz")["renders"]
    queries = np.stack([read_image(t.path) for t in data.test])
    scorer = build_scorer(cfg.scorer, "cpu")
    scorer.sheen_allowance = results["sheen_allowance"]
    batch = cfg.scorer.batch_size
    raw = torch.cat([scorer(torch.from_numpy(queries[i:i + batch]).permute(0, 3, 1, 2),
                            torch.from_numpy(renders[i:i + batch]).permute(0, 3, 1, 2))
                     for i in range(0, len(queries), batch)]).numpy()
    lo, hi = results["map_range"]
    assert raw.min() == pytest.approx(lo, rel=1e-5) and raw.max() == pytest.approx(hi, rel=1e-5), \
        "the recomputed raw maps must span the evaluation's map_range"
    return normalise_maps(raw, lo, hi)


@pytest.mark.slow
def test_maps_equal_the_evaluation_maps_on_its_test_images(evaluation, detector):
    run_dir, results, data, cfg = evaluation
    # one image at a time, as the localize stage extracted them (batching the feature network changes
    # float rounding: see test_single_images_and_batches_agree)
    detections = [detector.detect(t.path, t.name) for t in data.test]
    assert all(d.ok for d in detections), [d.error for d in detections]

    stored_poses = json.loads((Path(results["stage_dirs"]["localize"]) / "query_poses.json").read_text())
    refined_poses = json.loads((Path(results["stage_dirs"]["refine"]) / "refined_poses.json").read_text())
    assert any(r["refinement"] for r in refined_poses), "the run refines its poses (refine=lbfgs, the default)"
    for detection, stored, refined in zip(detections, stored_poses, refined_poses):
        assert detection.name == stored["name"] == refined["name"] and detection.localized == stored["success"]
        np.testing.assert_allclose(detection.w2c_pnp, np.asarray(stored["w2c"]), atol=1e-9)
        # The detector refines as the run did, from the same PnP pose against the same image.
        np.testing.assert_allclose(detection.w2c, np.asarray(refined["w2c"]), atol=1e-7)

    expected = evaluation_maps(results, data, cfg)
    maps = np.stack([d.anomaly_map for d in detections])
    assert maps.shape == expected.shape
    assert np.abs(maps - expected).max() < 1e-4

    with open(run_dir / "per_image.csv") as handle:
        scores = {row["name"]: float(row["score"]) for row in csv.DictReader(handle)}
    for detection in detections:  # the evaluation's own image scores (max of its normalised maps)
        assert detection.score == pytest.approx(scores[detection.name], abs=1e-4)


@pytest.mark.slow
def test_single_images_and_batches_agree(evaluation, detector):
    """A query's answer does not depend on the images batched with it. On the CPU its features are
    extracted alone in both (Localizer.extract), so its PnP pose is bit for bit the same; the refinement
    and the recovery, whose line searches and early stops turn tiny differences into tenths of a degree
    where their loss is flat, then start from the same pose and end within rounding (3.6e-5 deg seen; the
    maps differ by the scorer's batched convolutions)."""
    _, _, data, _ = evaluation
    tests = data.test[:3]
    batch = detector.detect_batch([t.path for t in tests])
    for test, batched in zip(tests, batch):
        single = detector.detect(test.path)
        assert single.localized == batched.localized
        assert single.pose_path == batched.pose_path
        np.testing.assert_array_equal(single.w2c_pnp, batched.w2c_pnp)
        assert rotation_error_deg(single.w2c, batched.w2c) < 0.01
        np.testing.assert_allclose(single.w2c[:3, 3], batched.w2c[:3, 3], atol=1e-4)
        assert np.abs(single.anomaly_map - batched.anomaly_map).max() < 5e-3
        assert set(single.times) >= {"load", "extract", "retrieve", "match", "pnp", "refine", "render", "score",
                                     "total"}


@pytest.mark.slow
def test_bad_inputs_give_per_image_errors_or_flags_and_the_batch_goes_on(evaluation, detector, tmp_path):
    _, results, data, _ = evaluation
    localized = results["localization"]["per_query"]
    good = next(t.path for t in data.test if localized[t.name]["success"])
    image = Image.open(good).convert("RGB")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    larger = tmp_path / "larger.png"
    image.resize((256, 256)).save(larger)
    other_aspect = tmp_path / "other_aspect.png"
    image.resize((128, 96)).save(other_aspect)
    gray = tmp_path / "gray.png"
    image.convert("L").save(gray)
    blank = tmp_path / "blank.png"  # nothing to localize: no keypoints at all
    Image.new("RGB", image.size, "white").save(blank)

    sources = [good, truncated, tmp_path / "missing.png", larger, other_aspect, gray, blank]
    results = {Path(s).stem: d for s, d in zip(sources, detector.detect_batch(sources))}

    assert results[good.stem].ok and not results[good.stem].flags
    assert not results["truncated"].ok and "truncated.png" in results["truncated"].error
    assert not results["missing"].ok and "not found" in results["missing"].error
    assert results["larger"].ok and "resized_from_256x256" in results["larger"].flags
    assert not results["other_aspect"].ok and "aspect" in results["other_aspect"].error
    assert results["gray"].ok and "grayscale" in results["gray"].flags
    assert results["blank"].ok and not results["blank"].localized and "not_localized" in results["blank"].flags
    assert results["blank"].fallback == "retrieved_db_pose"
    # the good image scores as it does alone (up to rounding, see test_single_images_and_batches_agree)
    alone = detector.detect(good)
    assert np.abs(alone.anomaly_map - results[good.stem].anomaly_map).max() < 5e-3


@pytest.fixture(scope="module")
def pooled_detector(evaluation):
    """The detector with two PnP threads, whatever this machine's cores: the pipeline's host pool exists."""
    run_dir, _, _, _ = evaluation
    return Detector.from_run(run_dir, {**SEQUENTIAL, "pnp_workers": 2}, device="cpu")


@pytest.mark.slow
def test_the_pipelined_stream_gives_what_detect_batch_gives_per_batch(evaluation, pooled_detector, tmp_path):
    """detect_stream with the pipeline (batch k's PnP in the host pool while batch k+1 is uploaded, extracted
    and matched) gives each batch's detect_batch answers, to the bit and in input order; an unreadable file
    among them is its own error."""
    _, _, data, _ = evaluation
    sources = [t.path for t in data.test]
    sources.insert(1, tmp_path / "missing.png")
    size = 2
    assert len(sources) > 2 * size, "three batches or more: one in flight while the next begins"
    expected = [d for i in range(0, len(sources), size) for d in pooled_detector.detect_batch(sources[i:i + size])]
    streamed = list(pooled_detector.detect_stream(sources, batch_size=size, pipeline=True))

    assert [d.name for d in streamed] == [d.name for d in expected] == [Path(s).name for s in sources]
    assert not streamed[1].ok and "not found" in streamed[1].error
    for got, want in zip(streamed, expected):
        assert (got.ok, got.error, got.flags, got.localized, got.pose_path) == \
            (want.ok, want.error, want.flags, want.localized, want.pose_path)
        if want.ok:
            np.testing.assert_array_equal(got.w2c_pnp, want.w2c_pnp)
            np.testing.assert_array_equal(got.w2c, want.w2c)
            np.testing.assert_array_equal(got.anomaly_map, want.anomaly_map)
            assert got.score == want.score
            assert got.times["pnp_wait"] >= 0 and got.times["stages_wall"] > 0


@pytest.mark.slow
def test_a_failure_in_a_pipelined_batch_loses_no_other_image(evaluation, pooled_detector, monkeypatch):
    """A PnP problem that raises in the host pool, its batch in flight while the next one begins: that
    image gets the error, its batch's other images are detected one by one, and the order holds."""
    _, _, data, _ = evaluation
    tests = data.test[:3]  # batches [0, 1] and [2]: the first fails in the pool while the second begins
    failing = tests[1].name
    solve = pooled_detector.localizer.pose_from_matches

    def pose_from_matches(name, *args, **kwargs):
        if name == failing:
            raise RuntimeError("a PnP failure for the test")
        return solve(name, *args, **kwargs)

    monkeypatch.setattr(pooled_detector.localizer, "pose_from_matches", pose_from_matches)
    names = [t.name for t in tests]
    streamed = list(pooled_detector.detect_stream([t.path for t in tests], names, batch_size=2, pipeline=True))
    assert [d.name for d in streamed] == names
    assert [d.ok for d in streamed] == [name != failing for name in names]
    assert streamed[1].error == "RuntimeError: a PnP failure for the test"
    assert all(d.anomaly_map is not None for d in streamed if d.ok)


class StageRecorder(Detector):
    """The Detector's batching over stand-in stages (no run): each records its call; a batch of several
    images holding "bad" fails in the stage named by ``fail_in``, as an unexpected error would."""

    def __init__(self, pipeline: bool, fail_in: str = "start"):
        self.cfg = OmegaConf.create({"pipeline": pipeline, "batch_size": 2})
        self._loader = ThreadPoolExecutor(1)
        self.background_fast_decode, self.fail_in, self.calls = False, fail_in, []

    def _stage(self, stage: str, items) -> None:
        names = [detection.name for detection, _ in items]
        self.calls.append(f"{stage} {'+'.join(names)}")
        if stage == self.fail_in and "bad" in names and len(names) > 1:
            raise RuntimeError("a stage failed")

    def _start_stages(self, items):
        self._stage("start", items)
        return items

    def _finish_stages(self, started, keep_images):
        self._stage("finish", started)
        for detection, _ in started:
            detection.ok = True


def test_the_pipelined_stream_begins_the_next_batch_before_it_completes_one():
    """With detect.pipeline, batch k+1's device stages start before batch k finishes (its PnP runs
    meanwhile); without it, one batch after the other. Detections come out in input order either way."""
    names = ["a", "b", "c", "d", "e"]
    sources = [LoadedImage(pixels=np.zeros((4, 4, 3), np.uint8)) for _ in names]
    for pipeline, order in [(True, ["start a+b", "start c+d", "finish a+b", "start e", "finish c+d", "finish e"]),
                            (False, ["start a+b", "finish a+b", "start c+d", "finish c+d", "start e", "finish e"])]:
        detector = StageRecorder(pipeline)
        assert [d.name for d in detector.detect_stream(sources, names)] == names
        assert detector.calls == order


@pytest.mark.parametrize("fail_in", ["start", "finish"])
def test_a_pipelined_batch_that_fails_is_detected_one_by_one(fail_in):
    names = ["a", "bad", "c", "d"]
    sources = [LoadedImage(pixels=np.zeros((4, 4, 3), np.uint8)) for _ in names]
    detector = StageRecorder(pipeline=True, fail_in=fail_in)
    detections = list(detector.detect_stream(sources, names))
    assert [d.name for d in detections] == names and all(d.ok for d in detections)
    singles = ["start a", "finish a", "start bad", "finish bad"]
    begun = ["start a+bad", "start c+d"] if fail_in == "start" else ["start a+bad", "start c+d", "finish a+bad"]
    assert detector.calls == [*begun, *singles, "finish c+d"]


def test_load_input_checks_size_aspect_and_colour(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8))
    image.save(tmp_path / "same.png")
    image.resize((256, 192)).save(tmp_path / "larger.png")
    image.resize((128, 128)).save(tmp_path / "square.png")
    image.convert("L").save(tmp_path / "gray.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "same.png").read_bytes()[:100])

    same = load_input(tmp_path / "same.png", 128, 96)
    assert same.float_image().shape == (3, 96, 128) and same.flags == []
    assert same.pixels.dtype == np.uint8  # a file at the run's size is uploaded as its decoded bytes
    larger = load_input(tmp_path / "larger.png", 128, 96)
    assert larger.float_image().shape == (3, 96, 128) and larger.flags == ["resized_from_256x192"]
    gray = load_input(tmp_path / "gray.png", 128, 96)
    assert gray.flags == ["grayscale"] and gray.float_image().shape == (3, 96, 128)
    with pytest.raises(InputError, match="aspect 1.000.*crop to the run's aspect ratio"):
        load_input(tmp_path / "square.png", 128, 96)
    with pytest.raises(InputError, match="truncated.png"):
        load_input(tmp_path / "truncated.png", 128, 96)
    with pytest.raises(InputError, match="run's camera is 128x96.*on_size_mismatch=resize"):
        load_input(tmp_path / "larger.png", 128, 96, on_size_mismatch="reject")
    with pytest.raises(ValueError, match="on_size_mismatch='crop' is unknown"):
        load_input(tmp_path / "same.png", 128, 96, on_size_mismatch="crop")
    array = load_input(np.zeros((96, 128), np.float32), 128, 96)  # a decoded single-channel array
    assert array.flags == ["grayscale"]


def test_pixels_become_the_floats_read_image_gives(tmp_path):
    """The detector's conversion (on its device) equals read_image to the bit, RGBA composited."""
    rng = np.random.default_rng(1)
    rgba = (rng.random((40, 50, 4)) * 255).astype(np.uint8)
    rgba[..., 3][:10] = 255  # opaque rows, transparent and half-transparent pixels elsewhere
    rgba[..., 3][10:20] = 0
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "rgb.png")
    for name in ("rgba.png", "rgb.png"):
        loaded = load_input(tmp_path / name, 50, 40)
        converted = pixels_to_float_torch(torch.from_numpy(loaded.pixels))
        assert torch.equal(converted, torch.from_numpy(read_image(tmp_path / name)))


@pytest.mark.slow
def test_detect_task_writes_detections_overlays_and_maps(evaluation, tmp_path):
    run_dir, _, data, _ = evaluation
    inputs = str(data.root / "test" / "*" / "*.png")
    cfg = compose_config(tmp_path, ["task=detect", f"run_dir={run_dir}", f"inputs='{inputs}'",
                                    "detect.matching=sequential", "detect.batch_size=2", "detect.threshold=0.5"])
    summary = detect_task(cfg)
    out = Path(cfg.paths.output_dir)
    assert summary["num_images"] == summary["num_ok"] == len(data.test)
    with open(out / "detections.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["name"] for r in rows) == sorted(t.name.removeprefix("test/") for t in data.test)
    assert all(r["anomalous"] in ("True", "False") for r in rows)
    assert len(list((out / "overlays").glob("*.png"))) == len(data.test)
    maps = np.load(out / "maps.npz")
    assert maps["maps"].shape == (len(data.test), 224, 224)
    written = json.loads((out / "summary.json").read_text())
    assert written["seconds_per_stage"]["match"]["median"] > 0
    assert written["warm_up_seconds"] > 0  # renders of db views went through first, and are not in the outputs
    assert written["map_range"] == list(load_finished_run(run_dir).map_range)


def aliked_lightglue(device: str, width_confidence: float | None = None):
    from splatpose.sfm.config import compose_sfm_config
    from splatpose.sfm.features import build_extractor

    cfg = compose_sfm_config("aliked", "lightglue", "global", {"max_keypoints": 512})
    if width_confidence is not None:
        cfg.matcher.width_confidence = width_confidence
    return build_extractor(cfg.feature, 512, device), build_matcher(cfg.matcher, "aliked", device)


def textured_pairs(extractor, matcher, device: str, count: int = 2) -> list:
    """Prepared LightGlue inputs of ``count`` (texture, warped texture) pairs, plus one mixed pair."""
    prepared = []
    for seed in range(count):
        image, warped = textured_pair(seed=seed)
        for feats in extractor(torch.cat([image, warped]).to(device)):
            feats["image_size"] = np.array([image.shape[-1], image.shape[-2]])
            prepared.append(matcher.prepare(feats))
    pairs = [(prepared[2 * i], prepared[2 * i + 1]) for i in range(count)]
    return pairs + [(prepared[0], prepared[3])]


def test_batched_lightglue_matches_like_pairwise_lightglue():
    """One padded LightGlue pass over several pairs = LightGlue on each pair alone (pruning off: the
    batched path never prunes, and LightGlue prunes on a GPU only above 1024 keypoints)."""
    extractor, matcher = aliked_lightglue("cpu", width_confidence=-1)
    pairs = textured_pairs(extractor, matcher, "cpu")
    assert len({p[1]["keypoints"].shape[1] for p in pairs}) > 1, "pairs of different lengths exercise the padding"
    batched = match_pairs_batched(matcher.model, pairs, pairs_per_call=2)
    for (feats0, feats1), (matches0, scores0) in zip(pairs[:2], batched[:2]):
        expected0, expected_scores = matcher(feats0, feats1)
        assert (expected0 > -1).sum() > 50
        assert np.mean(matches0 == expected0) > 0.99
        np.testing.assert_allclose(scores0, expected_scores, atol=1e-3)


def test_run_folder_errors_name_the_fix(tmp_path):
    with pytest.raises(RunFolderError, match="results.json: not found; run_dir must be the folder of a finished"):
        load_finished_run(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"config": {}, "map_range": [0, 1]}))
    with pytest.raises(RunFolderError, match="field 'stage_dirs' is missing"):
        load_finished_run(tmp_path)


def test_expand_inputs(tmp_path):
    for name in ("b.png", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in expand_inputs(str(tmp_path / "*.png"))] == ["a.png", "b.png"]
    assert [p.name for p in expand_inputs(tmp_path)] == ["a.png", "b.png"]
    with pytest.raises(InputError, match="matched no image files"):
        expand_inputs(str(tmp_path / "*.jpg"))


def test_a_pattern_in_a_list_that_matches_nothing_is_a_warning(tmp_path, caplog):
    (tmp_path / "a.png").write_bytes(b"")
    with caplog.at_level("WARNING", logger="splatpose.detect.inputs"):
        paths = expand_inputs([str(tmp_path / "a.png"), str(tmp_path / "typo" / "*.png")])
    assert [p.name for p in paths] == ["a.png"]
    assert f"{tmp_path / 'typo' / '*.png'}" in caplog.text and "matched no files" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_lightglue_on_cuda_matches_like_pairwise():
    """On a GPU LightGlue does not prune at <= 1024 keypoints, so one padded pass over several pairs must
    give each pair's own matches (up to float16 attention rounding)."""
    extractor, matcher = aliked_lightglue("cuda")
    pairs = textured_pairs(extractor, matcher, "cuda", count=3)
    for index, ((feats0, feats1), (matches0, scores0)) in enumerate(zip(pairs, match_pairs_batched(matcher.model, pairs))):
        expected0, expected_scores = matcher(feats0, feats1)
        if index < 3:  # the last pair mixes two textures: few matches, but they must agree too
            assert (expected0 > -1).sum() > 50
        agree = matches0 == expected0
        assert np.mean(agree) > 0.98
        # float16 rounding flips a few matches (one side's score is 0) and which weak unmatched keypoints
        # are mutual nearest neighbours (a score below the threshold or 0): compare the agreeing matches
        matched = agree & (expected0 > -1)
        np.testing.assert_allclose(scores0[matched], expected_scores[matched], atol=2e-2)
