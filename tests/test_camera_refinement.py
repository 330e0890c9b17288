"""Reference-camera refinement during splat training: cameras given with a known error are pulled back
toward the truth (trained views through the joint fit, held-out views by the pose-only alignment), the
known-pose path trains without corrections, and ``auto`` follows sfm.reference_poses."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from splatpose.data.cameras import rotation_error_deg
from splatpose.data.mad_sim import ClassData, TrainView
from splatpose.splat.camera_refinement import CameraCorrections, resolve_camera_refinement
from splatpose.splat.gaussians import init_gaussians
from splatpose.splat.module import GaussianSplatModule
from splatpose.splat.rendering import render
from splatpose.splat.train import CAMERAS_NAME, METRICS_NAME, load_posed_views, read_refined_cameras, train_splats
from scene_cameras import look_at  # tests/scene_cameras.py

CONF = Path(__file__).resolve().parents[1] / "conf" / "splat"
SIZE = 64
NUM_VIEWS = 16
PERTURBED = (1, 2, 4, 6, 9, 10, 13)  # views 0, 4, 8, 12 are held out (holdout_every=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def turned(w2c: np.ndarray, degrees: float, seed: int) -> np.ndarray:
    """``w2c`` with its camera turned by ``degrees`` about a random axis through its centre."""
    axis = np.random.default_rng(seed).normal(size=3)
    axis *= np.deg2rad(degrees) / np.linalg.norm(axis)
    correction = CameraCorrections(1, 1.0)
    with torch.no_grad():
        correction.delta[0, 3:] = torch.as_tensor(axis)
        return correction(torch.as_tensor(w2c)[None], [0])[0].numpy()


def scene_points() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(200, 3)) * 0.35, rng.random((200, 3))


@pytest.fixture(scope="module")
def true_and_perturbed(tmp_path_factory) -> tuple[ClassData, ClassData]:
    return blob_views(tmp_path_factory.mktemp("camopt") / "blob")


def blob_views(root: Path) -> tuple[ClassData, ClassData]:
    """16 views of a 200-Gaussian coloured blob (64x64), at their true cameras and with 1.5-2 deg errors
    on the views in PERTURBED (the held-out view 8 too)."""
    (root / "train" / "good").mkdir(parents=True)
    xyz, rgb = scene_points()
    scene = init_gaussians(xyz, rgb, sh_degree=0)
    scene.opacities[:] = 2.0
    K = np.array([[80.0, 0, SIZE / 2], [0, 80.0, SIZE / 2], [0, 0, 1]])
    true_views, given_views = [], []
    for i, angle in enumerate(np.linspace(0, 2 * np.pi, NUM_VIEWS, endpoint=False)):
        w2c = look_at([3 * np.cos(angle), 3 * np.sin(angle), 0.9 * np.sin(3 * angle)])
        with torch.no_grad():
            image = render(scene, torch.tensor(w2c, dtype=torch.float32), torch.tensor(K, dtype=torch.float32),
                           SIZE, SIZE, backend="torch")[0]
        path = root / "train" / "good" / f"{i}.png"
        Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)
        name = f"train/good/{i}.png"
        true_views.append(TrainView(name=name, path=path, w2c=w2c))
        error = 1.5 + 0.5 * (i % 2) if i in PERTURBED or i == 8 else 0.0
        given_views.append(TrainView(name=name, path=path, w2c=turned(w2c, error, seed=i) if error else w2c))
    make = lambda views: ClassData(root=root, class_name="blob", width=SIZE, height=SIZE, K=K, train=views, test=[])
    return make(true_views), make(given_views)


def camera_config(enabled, **overrides):
    cfg = OmegaConf.load(CONF / "fast.yaml")
    small = {"steps": 400, "checkpoint_every": 400, "sh_degree": 0, "init.num_points": 200, "init.carve": False,
             "eval.holdout_every": 4, "eval.every_n_steps": 400, "eval.save_renders": False,
             "strategy.refine_start_iter": 1000, "camera_opt.enabled": enabled, "camera_opt.holdout_steps": 60}
    small.update(overrides)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in small.items()]))


def trainer_kwargs():
    return {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


def mean_displacement_px(w2c: np.ndarray, true_w2c: np.ndarray, K: np.ndarray, points: np.ndarray) -> float:
    """Mean distance (px) between the points' projections through ``w2c`` and through ``true_w2c``."""
    def project(pose):
        camera = pose[:3, :3] @ points.T + pose[:3, 3:4]
        pixels = K @ camera
        return (pixels[:2] / pixels[2]).T
    return float(np.linalg.norm(project(w2c) - project(true_w2c), axis=1).mean())


def test_refinement_pulls_perturbed_cameras_toward_the_truth(true_and_perturbed, tmp_path):
    """The Gaussians start at the truth and their means are held nearly still (lr.means), so that only
    the cameras can take the error up: the corrections must move the cameras given 1.5-2 deg off to
    where they see the scene as the true ones do (projections within a fraction of a pixel), and
    closer to the true orientation; the cameras given right stay right."""
    truth, given = true_and_perturbed
    xyz, rgb = scene_points()
    torch.manual_seed(0)  # the views' sampling order
    train_splats(given, xyz, rgb, camera_config(True, **{"lr.means": 1e-6, "init.opacity": 0.88}), tmp_path,
                 trainer_kwargs())
    refined = read_refined_cameras(tmp_path)
    assert refined is not None and set(refined) == {v.name for v in given.train}
    true_w2c = {v.name: v.w2c for v in truth.train}
    given_w2c = {v.name: v.w2c for v in given.train}
    shift_before = {n: mean_displacement_px(given_w2c[n], true_w2c[n], truth.K, xyz) for n in true_w2c}
    shift_after = {n: mean_displacement_px(refined[n], true_w2c[n], truth.K, xyz) for n in true_w2c}
    turn_before = {n: rotation_error_deg(given_w2c[n], true_w2c[n]) for n in true_w2c}
    turn_after = {n: rotation_error_deg(refined[n], true_w2c[n]) for n in true_w2c}
    perturbed = [f"train/good/{i}.png" for i in PERTURBED]
    untouched = [f"train/good/{i}.png" for i in range(NUM_VIEWS) if i not in PERTURBED and i % 4]
    for name in perturbed:  # trained views given off
        assert shift_after[name] < 0.5 * shift_before[name], (name, shift_before[name], shift_after[name])
        assert turn_after[name] < turn_before[name], (name, turn_before[name], turn_after[name])
    assert np.median([turn_after[n] for n in perturbed]) < 0.75 * np.median([turn_before[n] for n in perturbed])
    assert max(shift_after[name] for name in untouched) < 0.5, shift_after
    # the held-out view given 1.5 deg off, aligned to the trained splats afterwards (pose only)
    assert shift_after["train/good/8.png"] < 0.5 * shift_before["train/good/8.png"]
    content = json.loads((tmp_path / CAMERAS_NAME).read_text())
    assert content["how"][8] == "aligned" and content["how"][1] == "trained"
    metrics = json.loads((tmp_path / METRICS_NAME).read_text())
    assert metrics["psnr_aligned"] > metrics["psnr"], metrics


def test_known_poses_train_without_corrections(true_and_perturbed, tmp_path):
    truth, _ = true_and_perturbed
    cfg = resolve_camera_refinement(camera_config("auto", steps=4), "known")
    assert "camera_opt" not in cfg  # the splat stage's cache key is that of a config without the node
    module = GaussianSplatModule(init_gaussians(*scene_points(), sh_degree=0), cfg, 3.0, SIZE, SIZE,
                                 load_posed_views(truth))
    assert module.cameras is None and len(module.configure_optimizers()[0]) == 6
    train_splats(truth, *scene_points(), cfg, tmp_path, trainer_kwargs())
    assert read_refined_cameras(tmp_path) is None


def test_auto_refines_only_estimated_cameras():
    cfg = camera_config("auto")
    assert resolve_camera_refinement(cfg, "estimate").camera_opt.enabled is True
    assert "camera_opt" not in resolve_camera_refinement(cfg, "known")
    assert "camera_opt" not in resolve_camera_refinement(camera_config(False), "estimate")
    assert resolve_camera_refinement(camera_config(True), "known").camera_opt.enabled is True
