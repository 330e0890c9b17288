"""Splat training: an interrupted run resumes from its checkpoint, a finished one is reused, and
training actually fits the views. Uses a tiny scene rendered by the project's own rasterizer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from PIL import Image

from splatpose.data.mad_sim import ClassData, TrainView
from splatpose.splat.gaussians import init_gaussians
from splatpose.splat.rendering import render
from splatpose.splat.train import METRICS_NAME, train_splats
from splatpose.stage_cache import seed_stage
from scene_cameras import look_at  # tests/scene_cameras.py

CONF = Path(__file__).resolve().parents[1] / "conf" / "splat"
SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def blob_points() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(150, 3)) * 0.3


@pytest.fixture(scope="module")
def tiny_class(tmp_path_factory) -> ClassData:
    """12 views of a 150-Gaussian blob, 32x32, written as PNGs in the MAD-Sim folder layout."""
    root = tmp_path_factory.mktemp("tiny") / "blob"
    (root / "train" / "good").mkdir(parents=True)
    rng = np.random.default_rng(0)
    scene = init_gaussians(blob_points(), rng.random((150, 3)), sh_degree=0)
    scene.opacities[:] = 2.0
    K = np.array([[40.0, 0, SIZE / 2], [0, 40.0, SIZE / 2], [0, 0, 1]])
    views = []
    for i, angle in enumerate(np.linspace(0, 2 * np.pi, 12, endpoint=False)):
        w2c = look_at([3 * np.cos(angle), 3 * np.sin(angle), 0.8 * np.sin(3 * angle)])
        with torch.no_grad():
            rgb = render(scene, torch.tensor(w2c, dtype=torch.float32), torch.tensor(K, dtype=torch.float32),
                         SIZE, SIZE, backend="torch")[0]
        path = root / "train" / "good" / f"{i}.png"
        Image.fromarray((rgb.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)
        views.append(TrainView(name=f"train/good/{i}.png", path=path, w2c=w2c))
    return ClassData(root=root, class_name="blob", width=SIZE, height=SIZE, K=K, train=views, test=[])


def tiny_config(**overrides):
    cfg = OmegaConf.load(CONF / "fast.yaml")
    small = {"steps": 12, "checkpoint_every": 4, "sh_degree": 1, "sh_degree_interval": 5,
             "init.num_points": 300, "eval.holdout_every": 4, "eval.every_n_steps": 6,
             "eval.save_renders": False, "strategy.refine_start_iter": 2, "strategy.refine_every": 3,
             "strategy.refine_stop_iter": 100, "strategy.grow_grad2d": 1e-6}
    small.update(overrides)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in small.items()]))


class StopAt(Callback):
    """Simulates a crash (or a killed job) after a given step."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("interrupted")


class RecordStart(Callback):
    def on_train_start(self, trainer, module):
        self.step = trainer.global_step
        self.num_gaussians = len(module.splats["means"])
        self.exp_avg_shape = tuple(module.raw_optimizers()["means"].state[module.splats["means"]]["exp_avg"].shape)


def trainer_kwargs(*callbacks):
    return {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "callbacks": list(callbacks)}


def test_interrupted_run_resumes_from_its_checkpoint(tiny_class, tmp_path):
    cfg = tiny_config()
    with pytest.raises(RuntimeError, match="interrupted"):
        train_splats(tiny_class, None, None, cfg, tmp_path, trainer_kwargs(StopAt(10)))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    saved_n = checkpoint["state_dict"]["splats.means"].shape[0]
    assert checkpoint["global_step"] == 8
    assert saved_n != 300, "densification should have changed the number of Gaussians before the checkpoint"
    assert not (tmp_path / "point_cloud.ply").exists()

    start = RecordStart()
    ply = train_splats(tiny_class, None, None, cfg, tmp_path, trainer_kwargs(start))
    assert (start.step, start.num_gaussians) == (8, saved_n)
    assert start.exp_avg_shape == (saved_n, 3)  # optimizer state restored at the resized shape
    metrics = json.loads((tmp_path / METRICS_NAME).read_text())
    assert ply.is_file() and metrics["steps"] == 12 and metrics["resumed"] is True


def test_resumed_run_ends_where_an_uninterrupted_one_does(tiny_class, tmp_path):
    """Killed after step 10 (its last checkpoint at step 8, steps 9-10 lost) and resumed: the same
    Gaussians to the byte as a run that was never interrupted, on the CPU. The pipeline seeds each
    stage from its key (seed_stage); here both runs start from the same seed the same way."""
    cfg = tiny_config()
    seed_stage("resume-test")
    uninterrupted = train_splats(tiny_class, None, None, cfg, tmp_path / "whole", trainer_kwargs())
    seed_stage("resume-test")
    with pytest.raises(RuntimeError, match="interrupted"):
        train_splats(tiny_class, None, None, cfg, tmp_path / "killed", trainer_kwargs(StopAt(10)))
    torch.manual_seed(12345)  # a new process starts from other generator states: the checkpoint restores them
    seed_stage("resume-test")
    resumed = train_splats(tiny_class, None, None, cfg, tmp_path / "killed", trainer_kwargs())
    assert resumed.read_bytes() == uninterrupted.read_bytes()
    from splatpose.pipeline import splat_summary  # what results.json records of the splat stage

    assert splat_summary(resumed)["resumed"] is True and splat_summary(uninterrupted)["resumed"] is False


def test_finished_run_is_reused_without_training(tiny_class, tmp_path):
    cfg = tiny_config(steps=4)
    first = train_splats(tiny_class, None, None, cfg, tmp_path, trainer_kwargs())
    stamp = first.stat().st_mtime_ns
    again = train_splats(tiny_class, None, None, cfg, tmp_path, trainer_kwargs(StopAt(0), StopAt(1)))
    assert again == first and again.stat().st_mtime_ns == stamp


def test_training_fits_the_views(tiny_class, tmp_path):
    """From the right positions with grey colours, training recovers the colours of held-out views
    (colour learning rate raised: the preset's is tuned for hundreds of steps, not 150)."""
    cfg = tiny_config(steps=150, **{"eval.every_n_steps": 150, "strategy.grow_grad2d": 2e-4, "init.num_points": 150,
                                    "strategy.refine_start_iter": 40, "strategy.refine_every": 40,
                                    "lr.sh0": 0.02})
    train_splats(tiny_class, blob_points(), np.full((150, 3), 0.5), cfg, tmp_path, trainer_kwargs())
    metrics = json.loads((tmp_path / METRICS_NAME).read_text())
    assert metrics["eval_on"] == "holdout" and len(metrics["eval_views"]) == 3
    assert metrics["psnr"] > 20.0, metrics  # far above the grey start


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_mcmc_preset_refuses_a_cpu_with_a_clear_message(tiny_class, tmp_path):
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "mcmc.yaml"), OmegaConf.from_dotlist(["init.num_points=200"]))
    with pytest.raises(ValueError, match="splat=mcmc needs a CUDA device"):
        train_splats(tiny_class, None, None, cfg, tmp_path, trainer_kwargs())
