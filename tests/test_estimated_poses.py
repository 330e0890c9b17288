"""Reference cameras estimated from the images (``sfm.reference_poses=estimate``, issue 17):

- the image pairs: every pair for few views, retrieval's nearest beyond;
- too few registered views stop with an error naming them and what to try, also through ``run.py``
  on photos that do not overlap (random noise);
- a class whose transforms.json was removed runs end to end through ``python run.py`` (tiny data,
  SIFT), said once on the console, with the estimated cameras in results.json.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from splatpose.sfm.estimated_poses import (EstimationError, check_registration, focal_from_fov, fov_from_exif,
                                          image_pairs)

ROOT = Path(__file__).resolve().parents[1]

# Small and quick, yet enough overlap to register: 32 views of the compact, textured 03Nut at 128 px
# (16 views register 4 at most; the tiny preset's coarser mesh and texture 6 of 32), SIFT + mutual
# nearest neighbours, a few splat steps, pixel scorer.
CLASS = "03Nut"
TINY_ESTIMATE = ["debug=fast", "logger=none", "callbacks=none", "device=cpu", "sfm/feature=sift",
                 "sfm/matcher=nn_mutual", "sfm.max_keypoints=1024", "sfm.resize_max=384",
                 "sfm.estimate.verification.min_num_inliers=15", "sfm.estimate.verification.max_error=2.0",
                 "sfm.estimate.init_min_num_inliers=30", "sfm.estimate.register_min_num_inliers=15",
                 "splat.steps=6", "splat.checkpoint_every=3", "splat.sh_degree_interval=3",
                 "splat.strategy.refine_start_iter=2", "splat.strategy.refine_stop_iter=5",
                 "splat.strategy.refine_every=2", "splat.eval.every_n_steps=6", "splat.init.num_points=2000",
                 "scorer=pixel", "refine=off"]


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
           "SPLATPOSE_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "run.py", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def test_few_views_match_every_pair_more_match_their_retrieved_neighbours():
    rng = np.random.default_rng(0)
    names = [f"{i}.png" for i in range(12)]
    features = {n: {"descriptors": rng.normal(size=(50, 16)).astype(np.float32)} for n in names}
    cfg = OmegaConf.create({"exhaustive_max_views": 12, "retrieval_top_k": 3, "num_clusters": 4})
    assert len(image_pairs(names, features, cfg)) == 12 * 11 // 2
    cfg.exhaustive_max_views = 11
    pairs = image_pairs(names, features, cfg)
    assert all(names.index(a) < names.index(b) for a, b in pairs) and len(set(pairs)) == len(pairs)
    for name in names:  # each view with at least its own top 3
        assert sum(name in pair for pair in pairs) >= 3
    assert len(pairs) <= 12 * 3


def test_too_few_registered_views_name_them_and_what_to_try(tmp_path):
    names = [f"train/good/{i}.png" for i in range(10)]
    check_registration(names, names[:8], 0.8, tmp_path)  # 80 %: enough
    with pytest.raises(EstimationError, match=r"only 7 of 10 train views registered.*not registered: "
                                              r"train/good/7.png, train/good/8.png, train/good/9.png\..*Try:"):
        check_registration(names, names[:7], 0.8, tmp_path)


def test_focal_from_the_field_of_view_hint():
    assert focal_from_fov(90.0, 200) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="fov_x_deg"):
        focal_from_fov(0.0, 200)


def test_field_of_view_from_a_photos_exif(tmp_path):
    """A phone's 26 mm-equivalent lens on a 4:3 photo: about 67 degrees across."""
    exif = Image.Exif()
    exif.get_ifd(0x8769)[41989] = 26  # Exif sub-IFD, FocalLengthIn35mmFilm
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(tmp_path / "phone.jpg", exif=exif)
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(tmp_path / "render.png")
    assert fov_from_exif(tmp_path / "phone.jpg", 400, 300) == pytest.approx(67.3, abs=0.1)
    assert fov_from_exif(tmp_path / "render.png", 400, 300) is None


def test_photos_that_do_not_overlap_stop_with_the_clear_error(tmp_path):
    """Random noise as train photos (no transforms.json): nothing registers; one message, exit 1."""
    rng, class_dir = np.random.default_rng(0), tmp_path / "photos" / "noise"
    for folder in ("train/good", "test/good"):
        (class_dir / folder).mkdir(parents=True)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(class_dir / f"train/good/{i}.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(class_dir / "test/good/0.png")

    proc = run_cli(tmp_path, "dataset=custom", f"dataset.root={tmp_path / 'photos'}", "class=noise",
                   *TINY_ESTIMATE, f"hydra.run.dir={tmp_path / 'run'}")

    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, output[-3000:]
    assert "of 8 train views registered" in errors[0] and "not registered: train/good/" in errors[0]
    assert "The photos must overlap" in errors[0] and "Try:" in errors[0]
    assert output.count("has no transforms.json: estimating its reference cameras") == 1


@pytest.fixture(scope="module")
def class_without_poses(tmp_path_factory):
    """A copy of a generated class (32 views, 128 px) whose transforms.json was removed."""
    from splatpose.data.synthetic import ensure_synthetic_dataset

    tmp = tmp_path_factory.mktemp("posefree")
    generated = ensure_synthetic_dataset(tmp / "generated", [CLASS], preset="small", n_train=32, width=128,
                                         height=128, n_test_good=2, n_test_per_defect=1)
    shutil.copytree(generated / CLASS, tmp / "photos" / CLASS)
    (tmp / "photos" / CLASS / "transforms.json").unlink()
    return tmp


def test_class_without_transforms_runs_end_to_end(class_without_poses):
    tmp = class_without_poses
    proc = run_cli(tmp, "dataset=custom", f"dataset.root={tmp / 'photos'}", f"class={CLASS}", *TINY_ESTIMATE,
                   f"hydra.run.dir={tmp / 'run'}")

    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert output.count("has no transforms.json: estimating its reference cameras") == 1
    results = json.loads((tmp / "run" / "results.json").read_text())
    cameras = results["reference_cameras"]
    assert cameras["reference_poses"] == "estimate" and cameras["num_views"] == 32
    assert cameras["registration_rate"] >= 0.8 and cameras["focal_px"] > 0
    assert "alignment" not in cameras and "focal_error_pct" not in cameras  # no true poses to compare with
    assert results["config"]["sfm"]["reference_poses"] == "known"  # as configured; the class switched itself
    assert np.isfinite(results["metrics"]["pixel_auroc"])
    # The reference the detector reads: the registered views, one PINHOLE camera.
    sfm_dir = Path(results["stage_dirs"]["sfm"])
    summary = json.loads((sfm_dir / "reference.json").read_text())
    assert summary["cameras"]["num_registered"] == cameras["num_registered"]
    assert (sfm_dir / "sfm" / "cameras.bin").is_file() and (sfm_dir / "mapping").is_dir()


def test_photo_folder_without_masks_gives_maps_and_a_run_folder_for_detect(class_without_poses):
    """dataset=folder: good photos in one folder, photos to inspect in another; no poses, no masks."""
    tmp = class_without_poses
    generated = next((tmp / "generated").glob(f"*/{CLASS}"))
    good, inspect = tmp / "folder" / "good", tmp / "folder" / "new"
    shutil.copytree(generated / "train" / "good", good)
    inspect.mkdir()
    for path in sorted((generated / "test").glob("*/*.png")):
        shutil.copy(path, inspect / f"{path.parent.name}_{path.name}")
    num_inspected = len(list(inspect.iterdir()))

    proc = run_cli(tmp, "dataset=folder", f"dataset.good={good}", f"dataset.inspect={inspect}", "class=nut",
                   *TINY_ESTIMATE, "callbacks=default", f"hydra.run.dir={tmp / 'folder_run'}")

    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "has no ground-truth masks: pixel AUROC, AUPRO and image AUROC need masks" in output
    run_dir = tmp / "folder_run"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["dataset"] == "folder" and results["class"] == "nut"
    assert results["reference_cameras"]["reference_poses"] == "estimate"
    assert results["metrics"]["pixel_auroc"] is None and results["metrics"]["image_auroc"] is None
    rows = (run_dir / "per_image.csv").read_text().splitlines()[1:]
    assert len(rows) == num_inspected and all(row.startswith("new/") for row in rows)
    assert len(list((run_dir / "panels").glob("*/*.png"))) == num_inspected

    query = sorted(inspect.iterdir())[0]
    proc = run_cli(tmp, "task=detect", f"run_dir={run_dir}", f"inputs={query}", "device=cpu", "logger=none",
                   "detect.lightglue_compile=false", "detect.warm_up=false", f"hydra.run.dir={tmp / 'detect'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_a_camera_on_the_wrong_side_of_the_object_disagrees_with_its_outline(tmp_path):
    """Points of a cube seen by a camera at its true pose fall inside the cube's outline in its photo;
    the same photo given a camera turned away (the wrong side) sees none of them there."""
    import pycolmap

    from splatpose.sfm.estimated_poses import silhouette_agreement

    width = height = 64
    K = np.array([[60.0, 0, 32], [0, 60.0, 32], [0, 0, 1]])
    grid = np.linspace(-0.5, 0.5, 5)
    cube = np.stack(np.meshgrid(grid, grid, grid), axis=-1).reshape(-1, 3)
    w2c = np.eye(4)
    w2c[2, 3] = 4.0  # the camera 4 units in front of the cube, looking at it
    uv = (cube + w2c[:3, 3]) @ K.T
    uv = uv[:, :2] / uv[:, 2:]
    photo = np.full((height, width, 3), 255, np.uint8)
    lo, hi = np.floor(uv.min(axis=0)).astype(int), np.ceil(uv.max(axis=0)).astype(int)
    photo[lo[1]:hi[1], lo[0]:hi[0]] = 40
    Image.fromarray(photo).save(tmp_path / "right.png")
    Image.fromarray(photo).save(tmp_path / "wrong.png")

    model = pycolmap.Reconstruction()
    model.add_camera_with_trivial_rig(pycolmap.Camera(model="PINHOLE", width=width, height=height,
                                                      params=[60.0, 60.0, 32.0, 32.0], camera_id=1))
    turned = np.diag([-1.0, 1.0, -1.0, 1.0]) @ w2c  # 180 degrees about its y axis: looking away
    for image_id, (name, pose) in enumerate((("right.png", w2c), ("wrong.png", turned)), start=1):
        model.add_image_with_trivial_frame(pycolmap.Image(name=name, camera_id=1, image_id=image_id),
                                           pycolmap.Rigid3d(pycolmap.Rotation3d(pose[:3, :3]), pose[:3, 3]))
    for xyz in cube:
        model.add_point3D(xyz, pycolmap.Track())

    agreement = silhouette_agreement(model, ["right.png", "wrong.png"], tmp_path)
    assert agreement["right.png"] == pytest.approx(1.0) and agreement["wrong.png"] == 0.0


def cube_scene(tmp_path: Path, poses: dict[str, np.ndarray], blank: tuple[str, ...] = ()):
    """5x5x5 points of a unit cube seen by PINHOLE cameras (64 px, f 60) at ``poses`` (name -> w2c): per
    view its keypoints (hloc pixels: the projections - 0.5) and a photo with the cube's outline dark on
    white (white all over for the ``blank`` names)."""
    K = np.array([[60.0, 0, 32], [0, 60.0, 32], [0, 0, 1]])
    grid = np.linspace(-0.5, 0.5, 5)
    cube = np.stack(np.meshgrid(grid, grid, grid), axis=-1).reshape(-1, 3)
    keypoints = {}
    for name, w2c in poses.items():
        cam = cube @ w2c[:3, :3].T + w2c[:3, 3]
        uv = cam @ K.T
        uv = uv[:, :2] / uv[:, 2:]
        keypoints[name] = uv - 0.5
        photo = np.full((64, 64, 3), 255, np.uint8)
        if name not in blank:
            lo, hi = np.floor(uv.min(axis=0)).astype(int) - 1, np.ceil(uv.max(axis=0)).astype(int) + 1
            photo[max(lo[1], 0):hi[1], max(lo[0], 0):hi[0]] = 40
        Image.fromarray(photo).save(tmp_path / name)
    return cube, keypoints


def turned_about_y(degrees: float, distance: float = 4.0) -> np.ndarray:
    """A camera ``distance`` in front of the origin, turned about the cube's vertical axis."""
    angle = np.radians(degrees)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    w2c = np.eye(4)
    w2c[:3, :3], w2c[2, 3] = rotation, distance
    return w2c


def test_a_left_over_view_is_registered_by_pnp_against_the_model_and_joins_its_tracks(tmp_path):
    """The mapper registered a.png; b.png matches a.png's keypoints of every cube point and comes back at
    its true pose (its inliers join the points' tracks in the compact model); c.png matches as well
    but its photo shows no object where its camera sees the model: left out by the outline check."""
    import pycolmap

    from splatpose.sfm.estimated_poses import compact_reconstruction, register_left_over_views
    from splatpose.sfm.triangulation import w2c_from_rigid

    poses = {"a.png": turned_about_y(0.0), "b.png": turned_about_y(25.0), "c.png": turned_about_y(-25.0)}
    cube, keypoints = cube_scene(tmp_path, poses, blank=("c.png",))
    model = pycolmap.Reconstruction()
    model.add_camera_with_trivial_rig(pycolmap.Camera(model="PINHOLE", width=64, height=64,
                                                      params=[60.0, 60.0, 32.0, 32.0], camera_id=1))
    model.add_image_with_trivial_frame(
        pycolmap.Image(name="a.png", keypoints=keypoints["a.png"] + 0.5, camera_id=1, image_id=1),
        pycolmap.Rigid3d(pycolmap.Rotation3d(poses["a.png"][:3, :3]), poses["a.png"][:3, 3]))
    for index, xyz in enumerate(cube):
        track = pycolmap.Track()
        track.add_element(1, index)
        model.add_point3D(xyz, track)
    features = {name: {"keypoints": kpts} for name, kpts in keypoints.items()}
    identity = np.stack([np.arange(len(cube))] * 2, axis=1)
    raw_matches = {("b.png", "a.png"): identity, ("a.png", "c.png"): identity}
    localization = OmegaConf.load(ROOT / "conf" / "sfm" / "default.yaml").localization

    late, tried = register_left_over_views(model, ["a.png"], ["b.png", "c.png"], features, raw_matches,
                                           localization, tmp_path, min_agreement=0.85)

    assert set(late) == {"b.png"}
    assert tried["b.png"]["inliers"] == len(cube) and tried["b.png"]["agreement"] == pytest.approx(1.0)
    assert tried["c.png"]["inliers"] == len(cube) and tried["c.png"]["agreement"] == 0.0
    np.testing.assert_allclose(w2c_from_rigid(late["b.png"].cam_from_world), poses["b.png"], atol=1e-6)
    compact = compact_reconstruction(model, ["a.png", "b.png"], late)
    assert sorted(compact.image(i).name for i in compact.reg_image_ids()) == ["a.png", "b.png"]
    assert all(point.track.length() == 2 for point in compact.points3D.values())
    assert len(compact.points3D) == len(cube)


def test_a_left_over_view_outvoted_by_a_look_alike_comes_back_from_its_true_neighbour(tmp_path):
    """A cube with a tail on one side. e.png's matches to m.png pair its cube keypoints with the cube
    turned by 180 degrees (a look-alike: 125 consistent matches) and its matches to a.png are right but
    fewer (32): PnP over all of them puts e.png on the wrong side, where the tail falls outside its
    outline; a.png's matches alone give the true pose, which agrees with the outline and is kept."""
    import pycolmap

    from splatpose.sfm.estimated_poses import register_left_over_views
    from splatpose.sfm.triangulation import w2c_from_rigid

    grid = np.linspace(-0.5, 0.5, 5)
    cube = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), axis=-1).reshape(-1, 3)
    tail = np.stack(np.meshgrid(np.linspace(0.7, 1.4, 5), np.linspace(-0.2, 0.2, 5), np.linspace(-0.2, 0.2, 5),
                                indexing="ij"), axis=-1).reshape(-1, 3)
    points = np.concatenate([cube, tail])
    K = np.array([[60.0, 0, 32], [0, 60.0, 32], [0, 0, 1]])
    poses = {"a.png": turned_about_y(0.0, 5.0), "m.png": turned_about_y(40.0, 5.0), "e.png": turned_about_y(20.0, 5.0)}
    keypoints = {}
    for name, w2c in poses.items():
        uv = (points @ w2c[:3, :3].T + w2c[:3, 3]) @ K.T
        uv = uv[:, :2] / uv[:, 2:]
        keypoints[name] = uv - 0.5
        photo = np.full((64, 64, 3), 255, np.uint8)
        for part in (uv[:len(cube)], uv[len(cube):]):  # the cube's and the tail's outlines
            lo, hi = np.floor(part.min(axis=0)).astype(int) - 1, np.ceil(part.max(axis=0)).astype(int) + 1
            photo[max(lo[1], 0):hi[1], max(lo[0], 0):hi[0]] = 40
        Image.fromarray(photo).save(tmp_path / name)
    model = pycolmap.Reconstruction()
    model.add_camera_with_trivial_rig(pycolmap.Camera(model="PINHOLE", width=64, height=64,
                                                      params=[60.0, 60.0, 32.0, 32.0], camera_id=1))
    for image_id, name in enumerate(("a.png", "m.png"), start=1):
        model.add_image_with_trivial_frame(
            pycolmap.Image(name=name, keypoints=keypoints[name] + 0.5, camera_id=1, image_id=image_id),
            pycolmap.Rigid3d(pycolmap.Rotation3d(poses[name][:3, :3]), poses[name][:3, 3]))
    for index, xyz in enumerate(points):
        track = pycolmap.Track()
        track.add_element(1, index)
        track.add_element(2, index)
        model.add_point3D(xyz, track)
    # the cube turned by 180 degrees about its vertical axis: (x, y, z) -> (-x, y, -z), an index permutation
    turned = {tuple(np.round(p, 6)): i for i, p in enumerate(cube)}
    look_alike = np.array([turned[tuple(np.round(p * [-1, 1, -1], 6))] for p in cube])
    raw_matches = {("e.png", "m.png"): np.stack([np.arange(len(cube)), look_alike], axis=1),
                   ("e.png", "a.png"): np.stack([np.arange(0, len(points), 8)] * 2, axis=1)}
    features = {name: {"keypoints": kpts} for name, kpts in keypoints.items()}
    localization = OmegaConf.load(ROOT / "conf" / "sfm" / "default.yaml").localization

    late, tried = register_left_over_views(model, ["a.png", "m.png"], ["e.png"], features, raw_matches,
                                           localization, tmp_path, min_agreement=0.85)

    assert set(late) == {"e.png"} and tried["e.png"]["one_view"], tried
    np.testing.assert_allclose(w2c_from_rigid(late["e.png"].cam_from_world), poses["e.png"], atol=1e-6)
    assert tried["e.png"]["agreement"] == pytest.approx(1.0)
