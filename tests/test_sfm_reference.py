"""SfM reference model and localization on a small generated class (CPU, about a minute in all).

The files are read back with plain h5py against hloc's documented layout, the triangulated points
are checked against the known train poses with the project's own projection (not COLMAP's), and
queries that cannot be localized must come back flagged, with a fallback pose, without stopping the run.
"""

import dataclasses

import h5py
import numpy as np
import pycolmap
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from splatpose.data.cameras import project_points, rotation_error_deg
from splatpose.data import mad_sim
from splatpose.data.synthetic import ensure_synthetic_dataset
from splatpose.sfm import FALLBACK_RETRIEVED, Localizer, build_reference, check_sfm_config, localize_queries
from splatpose.sfm.config import ALIKED_DESCRIPTOR_DIMS, compose_sfm_config
from splatpose.sfm.features import build_extractor

CLASS = "03Nut"  # a compact object: many features even at 128 px
# Few, small views keep the whole module near a minute on two CPU cores.
GENERATOR = dict(preset="small", width=160, height=160, n_train=16, n_test_good=2, n_test_per_defect=1)
SFM = {"max_keypoints": 384, "resize_max": 256, "resize_force": True, "db_pairs": {"num_neighbors": 3},
       "localization": {"top_k": 3}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = ensure_synthetic_dataset(tmp_path_factory.getbasetemp() / "synthetic", [CLASS], **GENERATOR)
    return mad_sim.load_class(root, CLASS)


@pytest.fixture(scope="module")
def cfg():
    return compose_sfm_config("aliked", "lightglue", "global", SFM)


@pytest.fixture(scope="module")
def reference(data, cfg, tmp_path_factory):
    return build_reference(data, cfg, tmp_path_factory.mktemp("sfm"), "cpu")


def test_features_h5_follows_hloc_layout(data, reference):
    with h5py.File(reference.features_path, "r") as handle:
        for view in data.train:
            group = handle[view.name]  # nested groups "train" / "good" / "<i>.png", as hloc writes them
            keypoints, descriptors = group["keypoints"][()], group["descriptors"][()]
            assert keypoints.ndim == 2 and keypoints.shape[1] == 2 and len(keypoints) > 20
            assert descriptors.shape == (128, len(keypoints)), "descriptors are stored D x N"
            assert tuple(group["image_size"][()]) == (data.width, data.height)  # (W, H)
            # hloc convention: pixel centres at integers, so every keypoint lies in [-0.5, W - 0.5]
            assert keypoints.min() >= -0.5 and keypoints[:, 0].max() <= data.width - 0.5
            assert np.allclose(np.linalg.norm(descriptors, axis=0), 1.0, atol=1e-3)


def test_matches_h5_and_pairs_follow_hloc_layout(reference):
    lines = reference.pairs_path.read_text().splitlines()
    pairs = [tuple(line.split(" ")) for line in lines]
    assert pairs and all(len(p) == 2 for p in pairs)
    with h5py.File(reference.features_path, "r") as features, h5py.File(reference.matches_path, "r") as matches:
        for name0, name1 in pairs:
            group = matches[name0.replace("/", "-")][name1.replace("/", "-")]
            matches0, scores0 = group["matches0"][()], group["matching_scores0"][()]
            n0, n1 = len(features[name0]["keypoints"]), len(features[name1]["keypoints"])
            assert matches0.shape == scores0.shape == (n0,)
            assert matches0.min() >= -1 and matches0.max() < n1
            matched = matches0 > -1
            assert len(np.unique(matches0[matched])) == matched.sum(), "one-to-one matches"
            assert (scores0[matched] > 0).all() and (scores0 <= 1).all()
        assert sum((matches[a.replace("/", "-")][b.replace("/", "-")]["matches0"][()] > -1).sum()
                   for a, b in pairs) > 10 * len(pairs)


def test_triangulated_points_reproject_within_2px_on_the_views_that_see_them(data, reference):
    reconstruction = pycolmap.Reconstruction(str(reference.reconstruction_dir))
    assert reconstruction.num_points3D() == len(reference.points_xyz) > 100
    views = {view.name: view for view in data.train}
    with h5py.File(reference.features_path, "r") as features:
        keypoints = {name: features[name]["keypoints"][()] for name in views}
    checked = 0
    for point in reconstruction.points3D.values():
        assert point.track.length() >= 2
        for element in point.track.elements:
            name = reconstruction.image(element.image_id).name
            uv, depth = project_points(point.xyz[None], views[name].w2c, data.K)
            observed = keypoints[name][element.point2D_idx] + 0.5  # hloc -> COLMAP pixel centres
            assert depth[0] > 0
            assert np.linalg.norm(uv[0] - observed) <= 2.0, f"point {point.xyz} in {name}"
            checked += 1
    assert checked > 200
    # colours come from the images (white background, textured object): in range and not all white
    assert reference.points_rgb.shape == reference.points_xyz.shape
    assert 0.0 <= reference.points_rgb.min() and reference.points_rgb.max() <= 1.0
    assert reference.points_rgb.mean() < 0.9


def test_a_rerun_reuses_the_reference(data, cfg, reference):
    stamp = reference.matches_path.stat().st_mtime_ns
    again = build_reference(data, cfg, reference.features_path.parent, "cpu")
    assert reference.matches_path.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.points_xyz, reference.points_xyz)


def test_blank_and_noise_queries_are_flagged_and_the_run_completes(data, cfg, reference, tmp_path):
    blank = tmp_path / "blank.png"
    noise = tmp_path / "noise.png"
    Image.fromarray(np.full((data.height, data.width, 3), 255, np.uint8)).save(blank)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (data.height, data.width, 3), dtype=np.uint8)).save(noise)
    queries = [mad_sim.TestImage("test/good/blank.png", blank, "good", None),
               mad_sim.TestImage("test/good/noise.png", noise, "good", None), *data.test]
    poses = localize_queries(dataclasses.replace(data, test=queries), cfg, reference, tmp_path / "loc", "cpu")

    assert [p.name for p in poses] == [q.name for q in queries]
    for failed in poses[:2]:
        assert not failed.success and failed.fallback == FALLBACK_RETRIEVED
        db_poses = [v.w2c for v in data.train if v.name in failed.retrieved]
        assert any(np.allclose(failed.w2c, w2c) for w2c in db_poses), "fallback = a retrieved db pose"
    # 16 train views leave gaps, so not every real query has enough overlap; most do
    localized = [p for p in poses[2:] if p.success]
    assert len(localized) >= 3
    for pose in localized:
        assert pose.fallback is None and pose.num_inliers >= cfg.localization.min_inliers
        assert rotation_error_deg(pose.w2c, data.test_poses[pose.name]) < 2.0
        assert set(pose.times) == {"extract", "retrieve", "match", "pnp"}
        assert len(pose.retrieved) == cfg.localization.top_k
    # the results are on disk for a rerun, which reuses them
    assert (tmp_path / "loc" / "query_poses.json").exists()
    again = localize_queries(dataclasses.replace(data, test=queries), cfg, reference, tmp_path / "loc", "cpu")
    np.testing.assert_array_equal(again[-1].w2c, poses[-1].w2c)


def test_a_query_has_its_own_keypoint_budget(data, cfg, reference):
    """sfm.localization.max_keypoints sets how many keypoints a query spends (a cluttered bench takes most
    of them), independent of the reference's sfm.max_keypoints (null: the same)."""
    query, counts = data.test[0], {}
    for budget in (None, 128):
        query_cfg = OmegaConf.merge(cfg, {"localization": {"max_keypoints": budget}})
        localizer = Localizer(data.K, data.width, data.height, query_cfg, reference, data.train_w2c, "cpu")
        _, details = localizer.localize(query.path, query.name)
        counts[budget] = len(details.features["keypoints"])
    assert counts[128] <= 128 < counts[None] <= int(cfg.max_keypoints)


def test_a_failed_first_try_is_matched_again_further_down_the_ranking(data, cfg, reference):
    """sfm.localization.retry_top_k: a query whose PnP fails on its top_k retrieved views is matched
    against the next ones of the ranking and solved over both tries' matches, in the pipeline's
    Localizer and the detector's batched ImageLocalizer alike; without it the query stays failed."""
    from splatpose.detect.localization import ImageLocalizer
    from splatpose.data.mad_sim import read_image

    def localizer(cls=Localizer, **localization):
        query_cfg = OmegaConf.merge(cfg, {"localization": localization})
        return cls(data.K, data.width, data.height, query_cfg, reference, data.train_w2c, "cpu")

    # a query that its best-ranked view alone does not localize and its three best do (at these sizes: one)
    query, three_views = next(((q, pose) for q in data.test
                               if not localizer(top_k=1, retry_top_k=None).localize(q.path, q.name)[0].success
                               and (pose := localizer(top_k=3).localize(q.path, q.name)[0]).success), (None, None))
    assert query is not None, "no query that three views localize and the best one alone does not"
    strict = dict(top_k=1)
    pose, _ = localizer(**strict, retry_top_k=3).localize(query.path, query.name)
    assert pose.success and pose.retried and pose.retrieved == three_views.retrieved and "retry" in pose.times
    assert pose.num_inliers == three_views.num_inliers
    image = torch.from_numpy(read_image(query.path)).permute(2, 0, 1)[None].float()
    batched = localizer(ImageLocalizer, **strict, retry_top_k=3).localize_images(image, [query.name])[0]
    assert batched.success and batched.retried and batched.retrieved == pose.retrieved
    np.testing.assert_allclose(batched.w2c, pose.w2c, atol=1e-6)

    # a second-try pose under retry_min_inliers is not taken: the first try's fallback stands, flagged
    first, _ = localizer(**strict, retry_top_k=None).localize(query.path, query.name)
    floor = dict(strict, retry_top_k=3, retry_min_inliers=three_views.num_inliers + 1)
    for kept in (localizer(**floor).localize(query.path, query.name)[0],
                 localizer(ImageLocalizer, **floor).localize_images(image, [query.name])[0]):
        assert not kept.success and kept.retried and kept.fallback == first.fallback
        assert kept.retrieved == first.retrieved
        np.testing.assert_allclose(kept.w2c, first.w2c)


def test_invalid_feature_matcher_pair_fails_with_the_valid_pairs():
    bad = compose_sfm_config("aliked", "lighterglue")
    with pytest.raises(ValueError, match="lighterglue: xfeat") as error:
        check_sfm_config(bad)
    assert "sfm/feature=aliked" in str(error.value) and "lightglue: aliked, disk, superpoint" in str(error.value)
    with pytest.raises(ValueError, match="valid feature/matcher pairs"):
        build_reference(None, compose_sfm_config("sift", "lightglue"), "/nonexistent", "cpu")


def test_aliked_networks_are_checked_against_the_matcher_before_any_work():
    tiny = compose_sfm_config("aliked", "lightglue", overrides={"feature": {"model": "aliked-t16"}})
    with pytest.raises(ValueError, match="64-dim descriptors.*aliked-n16.*nn_mutual"):
        check_sfm_config(tiny)
    check_sfm_config(compose_sfm_config("aliked", "nn_mutual", overrides={"feature": {"model": "aliked-t16"}}))
    with pytest.raises(ValueError, match="not an ALIKED network"):
        check_sfm_config(compose_sfm_config("aliked", "lightglue", overrides={"feature": {"model": "aliked-x9"}}))


def test_the_aliked_descriptor_table_matches_the_networks():
    image = torch.rand(1, 3, 64, 64)
    for model, dim in ALIKED_DESCRIPTOR_DIMS.items():
        extractor = build_extractor(OmegaConf.create({"name": "aliked", "model": model, "nms_radius": 2,
                                                      "detection_threshold": -1.0}), 16, "cpu")
        assert extractor(image)[0]["descriptors"].shape[-1] == dim, model


def test_weights_that_no_package_ships_must_be_given_by_path(tmp_path):
    with pytest.raises(ValueError, match="sfm.feature.weights"):
        check_sfm_config(compose_sfm_config("superpoint", "nn_mutual"))
    with pytest.raises(ValueError, match="sfm.matcher.weights"):
        check_sfm_config(compose_sfm_config("superpoint", "lightglue",
                                            overrides={"feature": {"weights": str(tmp_path / "sp.pth")}}))
    with pytest.raises(ValueError, match="sfm.retrieval.weights"):
        check_sfm_config(compose_sfm_config("aliked", "lightglue", "netvlad"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_localization_agrees_with_cpu(data, cfg, reference):
    cpu = Localizer(data.K, data.width, data.height, cfg, reference, data.train_w2c, "cpu")
    gpu = Localizer(data.K, data.width, data.height, cfg, reference, data.train_w2c, "cuda")
    agreeing = 0
    for test in data.test:
        a, _ = cpu.localize(test.path, test.name)
        b, _ = gpu.localize(test.path, test.name)
        agreeing += a.success == b.success and (not a.success or rotation_error_deg(a.w2c, b.w2c) < 0.2)
    assert agreeing >= len(data.test) - 1  # float differences may flip one borderline query
