"""The SfM building blocks on small synthetic inputs (no dataset, a few seconds in all)."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from splatpose.data.cameras import look_at_opengl_c2w, opengl_c2w_to_opencv_w2c, project_points
from splatpose.sfm import hloc_files
from splatpose.sfm.features import FeatureSize, load_image_tensor, to_original_pixels
from splatpose.sfm.matchers import MutualNearestNeighbourMatcher, build_matcher
from splatpose.sfm.pairs import pairs_from_poses
from splatpose.sfm.retrieval import NetVLADPooling, VladRetrieval, build_retrieval, rank_database
from splatpose.sfm.superpoint import SuperPoint
from splatpose.sfm.triangulation import fundamental_from_poses, sampson_error, verify_with_poses

K = np.array([[100.0, 0, 64], [0, 100.0, 64], [0, 0, 1]])


def ring_of_cameras(n: int, distance: float = 3.0) -> np.ndarray:
    """[n, 4, 4] OpenCV w2c on a horizontal circle, looking at the origin, in angular order."""
    poses = []
    for a in np.linspace(0, 2 * np.pi, n, endpoint=False):
        eye = distance * np.array([np.cos(a), np.sin(a), 0.3])
        poses.append(opengl_c2w_to_opencv_w2c(look_at_opengl_c2w(eye, np.zeros(3), np.array([0, 0, 1.0]))))
    return np.stack(poses)


def test_db_pairs_link_each_view_to_its_nearest_viewing_directions():
    names = [f"train/good/{i}.png" for i in range(12)]
    pairs = pairs_from_poses(names, ring_of_cameras(12), num_neighbors=2)
    # on a ring each view's two nearest are its two neighbours: 12 unordered pairs, each once
    assert len(pairs) == 12 and len(set(pairs)) == 12
    assert ("train/good/0.png", "train/good/1.png") in pairs and ("train/good/0.png", "train/good/11.png") in pairs
    assert all(a != b for a, b in pairs)
    with pytest.raises(ValueError, match="num_neighbors"):
        pairs_from_poses(names, ring_of_cameras(12), num_neighbors=0)


def test_matches_are_found_whichever_order_the_pair_was_stored_in(tmp_path):
    path = tmp_path / "matches.h5"
    with hloc_files.atomic_h5(path) as handle:
        hloc_files.write_pair_matches(handle, "a/0.png", "b/1.png", np.array([2, -1, 0]), np.array([0.9, 0, 0.5]))
    with h5py.File(path, "r") as handle:  # hloc's names_to_pair: '/' inside names becomes '-'
        assert list(handle["a-0.png"]["b-1.png"]["matches0"][()]) == [2, -1, 0]
    idx, scores = hloc_files.read_pair_matches(path, "a/0.png", "b/1.png")
    assert idx.tolist() == [[0, 2], [2, 0]] and scores.tolist() == pytest.approx([0.9, 0.5])
    reverse, _ = hloc_files.read_pair_matches(path, "b/1.png", "a/0.png")
    assert reverse.tolist() == [[2, 0], [0, 2]]
    with pytest.raises(KeyError, match="re-run the matching step"):
        hloc_files.read_pair_matches(path, "a/0.png", "c/2.png")


def test_interrupted_h5_write_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "features.h5"
    features = {"keypoints": np.zeros((3, 2)), "descriptors": np.ones((3, 4)), "image_size": [8, 6]}
    with hloc_files.atomic_h5(path) as handle:
        hloc_files.write_image_features(handle, "x.png", features)
    with pytest.raises(RuntimeError):
        with hloc_files.atomic_h5(path) as handle:
            hloc_files.write_image_features(handle, "y.png", features)
            raise RuntimeError("killed mid-write")
    assert hloc_files.names_in_features(path) == {"x.png"}
    assert not list(tmp_path.glob(".*tmp"))


def test_keypoints_map_back_to_original_pixels_with_the_centre_convention():
    # pixel centres at integers: the centre of a 100 px image resized to 50 px stays at the centre
    centre_small = np.array([[24.5, 24.5]])
    assert to_original_pixels(centre_small, (50, 50), (100, 100)) == pytest.approx(np.array([[49.5, 49.5]]))
    corner = np.array([[-0.5, -0.5]])  # the image corner maps to the corner
    assert to_original_pixels(corner, (50, 50), (100, 100)) == pytest.approx(corner)


def test_resize_follows_hloc_resize_max_and_force(tmp_path):
    from PIL import Image

    path = tmp_path / "im.png"
    Image.fromarray(np.zeros((40, 80, 4), np.uint8)).save(path)  # fully transparent -> white
    image, original = load_image_tensor(path, FeatureSize())
    assert original == (80, 40) and image.shape == (3, 40, 80) and float(image.min()) == 1.0
    assert load_image_tensor(path, FeatureSize(40))[0].shape == (3, 20, 40)  # scaled down to resize_max
    assert load_image_tensor(path, FeatureSize(160))[0].shape == (3, 40, 80)  # never up without force
    assert load_image_tensor(path, FeatureSize(160, force=True))[0].shape == (3, 80, 160)
    # from upscale_below px up an image keeps its own size (80 px here); smaller ones are still scaled up
    assert load_image_tensor(path, FeatureSize(160, force=True, upscale_below=80))[0].shape == (3, 40, 80)
    assert load_image_tensor(path, FeatureSize(160, force=True, upscale_below=81))[0].shape == (3, 80, 160)
    assert load_image_tensor(path, FeatureSize(60, force=True, upscale_below=40))[0].shape == (3, 30, 60)  # down


def test_the_sfm_node_gives_the_extraction_size_and_a_bad_floor_is_named():
    """The defaults: a 200 px demo image is scaled up to 600 px, a 400 px benchmark image keeps its size, a
    larger one comes down to 600; a run made before ``upscale_below`` existed is extracted as it was."""
    from splatpose.config_checks import ConfigError, check_sfm_values

    sfm = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "sfm" / "default.yaml")
    size = FeatureSize.from_config(sfm)
    assert [size.longest_side(side) for side in (200, 399, 400, 512, 800)] == [600, 600, 400, 512, 600]
    del sfm["upscale_below"]
    assert FeatureSize.from_config(sfm).longest_side(400) == 600
    sfm.upscale_below = 0
    with pytest.raises(ConfigError, match="sfm.upscale_below=0"):
        check_sfm_values(sfm)


def test_epipolar_verification_keeps_true_correspondences_only():
    rng = np.random.default_rng(0)
    w2c = ring_of_cameras(8)
    points = rng.uniform(-0.5, 0.5, (50, 3))
    uv0, _ = project_points(points, w2c[0], K)
    uv1, _ = project_points(points, w2c[1], K)
    F = fundamental_from_poses(K, w2c[0], w2c[1])
    assert sampson_error(F, uv0, uv1).max() < 1e-6
    matches = np.stack([np.arange(50), np.arange(50)], 1)
    wrong = np.stack([np.arange(50), np.roll(np.arange(50), 1)], 1)
    kept = verify_with_poses(K, w2c[0], w2c[1], uv0, uv1, np.concatenate([matches, wrong]), max_error=1.0)
    assert len(kept) >= 50 and set(map(tuple, matches)) <= set(map(tuple, kept))
    assert len(kept) < 60, "most wrong correspondences are off their epipolar line"


def test_mutual_nearest_neighbour_matcher_is_one_to_one_and_applies_the_ratio_test():
    rng = np.random.default_rng(0)
    desc1 = rng.normal(size=(30, 16)).astype(np.float32)
    desc0 = desc1[::-1] + 0.01 * rng.normal(size=(30, 16)).astype(np.float32)
    feats = lambda d: {"keypoints": np.zeros((len(d), 2), np.float32), "descriptors": d}  # noqa: E731
    matcher = MutualNearestNeighbourMatcher(OmegaConf.create({"ratio_threshold": 0.8}), "sift", "cpu")
    matches0, scores0 = matcher(matcher.prepare(feats(desc0)), matcher.prepare(feats(desc1)))
    assert matches0.tolist() == list(range(29, -1, -1)) and (scores0 > 0.9).all()
    # a second copy of every descriptor makes every match ambiguous: the ratio test drops them all
    doubled = np.concatenate([desc1, desc1 + 1e-4])
    matches0, _ = matcher(matcher.prepare(feats(desc0)), matcher.prepare(feats(doubled)))
    assert (matches0 == -1).all()


def test_lightglue_loads_packaged_weights_without_download_and_matches_a_shifted_copy(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    cfg = OmegaConf.create({"name": "lightglue", "filter_threshold": 0.1, "depth_confidence": 0.95,
                            "width_confidence": 0.99})
    matcher = build_matcher(cfg, "aliked", "cpu")
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(64, 128)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    kpts = rng.uniform(0, 100, (64, 2)).astype(np.float32)
    a = {"keypoints": kpts, "descriptors": desc, "image_size": np.array([100, 100])}
    b = {"keypoints": kpts + 2.0, "descriptors": desc, "image_size": np.array([100, 100])}
    matches0, scores0 = matcher(matcher.prepare(a), matcher.prepare(b))
    assert (matches0 == np.arange(64)).mean() > 0.9
    empty = {"keypoints": np.zeros((0, 2), np.float32), "descriptors": np.zeros((0, 128), np.float32),
             "image_size": np.array([100, 100])}
    assert (matcher(matcher.prepare(a), matcher.prepare(empty))[0] == -1).all()


def test_vlad_retrieval_ranks_the_image_with_the_same_descriptors_first():
    rng = np.random.default_rng(0)
    images = [{"descriptors": rng.normal(size=(80, 32)).astype(np.float32)} for _ in range(6)]
    retrieval = VladRetrieval(num_clusters=8)
    retrieval.fit(images)
    db = np.stack([retrieval.describe(None, f) for f in images])
    assert np.allclose(np.linalg.norm(db, axis=1), 1.0)
    query = {"descriptors": images[4]["descriptors"][:60] + 0.05 * rng.normal(size=(60, 32)).astype(np.float32)}
    assert rank_database(retrieval.describe(None, query), db)[0] == 4
    # VLAD by its definition: residuals to the nearest centre summed per centre, each centre's sum
    # L2-normalised, signed square root, L2-normalised
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    desc = unit(images[2]["descriptors"])
    nearest = np.argmax(desc @ retrieval.centres.T, axis=1)
    sums = np.stack([(desc[nearest == c] - retrieval.centres[c]).sum(0) for c in range(8)])
    expected = unit(sums).ravel()
    expected = unit(np.sign(expected) * np.sqrt(np.abs(expected)))
    assert np.allclose(db[2], expected, atol=1e-6)
    blank = retrieval.describe(None, {"descriptors": np.zeros((0, 32), np.float32)})
    assert len(rank_database(blank, db)) == 6  # no keypoints: still a (useless) ranking, no crash


def test_netvlad_checkpoint_must_be_given_and_must_fit(tmp_path):
    with pytest.raises(ValueError, match="sfm.retrieval.weights is not set"):
        build_retrieval(OmegaConf.create({"name": "netvlad", "weights": None}), "cpu")
    with pytest.raises(FileNotFoundError, match="sfm.retrieval.weights"):
        build_retrieval(OmegaConf.create({"name": "netvlad", "weights": str(tmp_path / "nope.pth")}), "cpu")
    pooling = NetVLADPooling(num_clusters=4, dim=8)
    out = pooling(torch.randn(2, 8, 5, 5))
    assert out.shape == (2, 32) and torch.allclose(out.norm(dim=1), torch.ones(2))


def test_superpoint_loads_magicleap_parameter_names_strictly(tmp_path):
    path = tmp_path / "superpoint_v1.pth"
    torch.save(SuperPoint().state_dict(), path)  # random weights in the released checkpoint's layout
    model = SuperPoint.from_weights(path, detection_threshold=0.0, max_keypoints=50)
    out = model(torch.rand(1, 3, 64, 96))
    assert out["keypoints"][0].shape == (50, 2) and out["descriptors"][0].shape == (50, 256)
    assert (out["keypoints"][0][:, 0] < 96).all() and (out["keypoints"][0][:, 1] < 64).all()
    torch.save({"conv1a.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a SuperPoint checkpoint"):
        SuperPoint.from_weights(path)
    with pytest.raises(FileNotFoundError, match="sfm.feature.weights"):
        SuperPoint.from_weights(tmp_path / "missing.pth")


def test_localization_settings_are_checked_before_any_work():
    from splatpose.sfm.config import check_sfm_config, compose_sfm_config

    check_sfm_config(compose_sfm_config())  # the defaults are valid
    for key in ("top_k", "ransac_min_num_trials", "max_keypoints", "retry_top_k", "retry_min_inliers"):
        with pytest.raises(ValueError, match=f"sfm.localization.{key} must be >= 1, got 0"):
            check_sfm_config(compose_sfm_config(overrides={"localization": {key: 0}}))
