"""``train_splats``: the pipeline's splat stage (posed images + initial points -> a 3DGS PLY).

Writes into ``out_dir``::

    checkpoints/last.ckpt    Lightning checkpoint, every ``checkpoint_every`` steps (resume point)
    point_cloud.ply          the trained Gaussians, standard 3DGS layout (written last)
    splat_metrics.json       PSNR/SSIM on the held-out train views, Gaussian count, timings
    holdout/<name>.png       renders of the held-out views beside their images (when eval.save_renders)
    reference_cameras.json   only when the cameras are refined (``camera_opt.enabled``): every view's
                             refined world-to-camera pose (:func:`read_refined_cameras`)

A folder with ``point_cloud.ply`` and ``splat_metrics.json`` is finished and is returned as is; a
folder with only a checkpoint belongs to an interrupted run, which resumes from it (same step,
same Gaussians, same optimizer and strategy state, same random generators) and ends where an
uninterrupted run would: the views of step ``s`` are drawn from a generator seeded by (seed, s)
(:class:`StepSeededViews`), so a resumed run trains on the steps it lost with the same views.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from gsplat.strategy import MCMCStrategy
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from splatpose.atomic_files import write_text_atomic
from splatpose.data.mad_sim import ClassData, read_image, read_object_mask
from splatpose.splat.camera_refinement import align_cameras
from splatpose.splat.gaussians import Gaussians, init_gaussians, scene_scale_from_cameras
from splatpose.splat.initialization import initial_points
from splatpose.splat.losses import psnr
from splatpose.splat.module import GaussianSplatModule
from splatpose.splat.views import PosedViews
from splatpose.splat.ply import save_ply

log = logging.getLogger(__name__)

PLY_NAME = "point_cloud.ply"
METRICS_NAME = "splat_metrics.json"
CAMERAS_NAME = "reference_cameras.json"
CHECKPOINT_DIR = "checkpoints"
REQUIRED_KEYS = ("steps", "sh_degree", "sh_degree_interval", "backend", "lr", "loss", "strategy", "init", "eval",
                 "checkpoint_every", "batch_size")


def load_posed_views(data: ClassData, object_masks: bool = False) -> PosedViews:
    """Read every train view of ``data`` (RGBA composited on white) into a :class:`PosedViews`.

    With ``object_masks`` and a class whose train views come with object masks (train/masks/), each
    view is composited onto white through its mask, ``mask * image + (1 - mask) * 1``: the splats then
    model the part alone, not the bench behind it, and render it on white as they were trained.
    """
    images = []
    for view in data.train:
        image = read_image(view.path)
        if image.shape[:2] != (data.height, data.width):
            raise ValueError(f"{view.path}: image is {image.shape[1]}x{image.shape[0]} but the class "
                             f"{data.class_name} is {data.width}x{data.height}; all views must share one size")
        if object_masks and view.mask_path is not None:
            mask = read_object_mask(view.mask_path)[..., None]
            image = mask * image + (1.0 - mask)
        images.append(np.round(image * 255.0).astype(np.uint8))
    return PosedViews(names=[v.name for v in data.train],
                      images=torch.from_numpy(np.stack(images)),
                      w2c=torch.as_tensor(np.stack([v.w2c for v in data.train]), dtype=torch.float32),
                      K=torch.as_tensor(data.K, dtype=torch.float32))


def holdout_split(n_views: int, holdout_every: int) -> tuple[list[int], list[int]]:
    """Every ``holdout_every``-th view (0, k, 2k, ...) is held out for evaluation; 0 holds out none."""
    if holdout_every <= 0:
        return list(range(n_views)), []
    held = [i for i in range(n_views) if i % holdout_every == 0]
    return [i for i in range(n_views) if i % holdout_every != 0], held


def evaluation_view_ids(n_views: int, holdout_every: int) -> list[int]:
    """The views the splats are judged on: the held-out ones, or (none held out) about 8 train views."""
    train_ids, holdout_ids = holdout_split(n_views, holdout_every)
    return holdout_ids or train_ids[:: max(len(train_ids) // 8, 1)]


def initial_gaussians(views: PosedViews, points_xyz: np.ndarray | None, points_rgb: np.ndarray | None,
                      cfg: DictConfig) -> Gaussians:
    """Gaussians at the SfM points, topped up with points inside the silhouettes (see initialization)."""
    xyz, rgb = initial_points(points_xyz, points_rgb, views.images, views.w2c, views.K,
                              num_points=int(cfg.init.num_points),
                              carve=bool(cfg.init.carve), background_threshold=float(cfg.init.background_threshold),
                              seed=int(cfg.init.seed))
    return init_gaussians(xyz, rgb, sh_degree=int(cfg.sh_degree), init_opacity=float(cfg.init.opacity),
                          init_scale=float(cfg.init.scale))


def check_splat_config(cfg: DictConfig) -> None:
    """Raise ValueError naming missing keys of the ``splat`` node (conf/splat/*.yaml)."""
    missing = [key for key in REQUIRED_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"the splat config lacks {missing}; start from conf/splat/fast.yaml or default.yaml")
    if int(cfg.steps) <= 0:
        raise ValueError(f"splat.steps={cfg.steps} must be positive")


def train_splats(data: ClassData, points_xyz: np.ndarray | None, points_rgb: np.ndarray | None,
                 cfg_splat: DictConfig | dict, out_dir: Path, trainer_kwargs: dict | None = None) -> Path:
    """Fit Gaussians to the train views of ``data``; return the exported PLY.

    Args:
        data: the class (train views with poses, intrinsics, image size)
        points_xyz: [N,3] initial points (SfM), or None for a random init inside the object bounds
        points_rgb: [N,3] their colours in [0,1]
        cfg_splat: the ``splat`` config node (conf/splat/{fast,default,mcmc}.yaml)
        out_dir: folder for checkpoints, the PLY and metrics (resumed when it holds a checkpoint)
        trainer_kwargs: Lightning ``Trainer`` arguments (accelerator, devices, logger, callbacks,
            enable_progress_bar, ...); max_steps, validation cadence and checkpointing come from
            ``cfg_splat`` and override them.

    Returns: ``out_dir / "point_cloud.ply"``
    """
    cfg = cfg_splat if isinstance(cfg_splat, DictConfig) else OmegaConf.create(cfg_splat)
    check_splat_config(cfg)
    out_dir = Path(out_dir)
    ply_path, metrics_path = out_dir / PLY_NAME, out_dir / METRICS_NAME
    if ply_path.is_file() and metrics_path.is_file():
        log.info("Splats already trained: %s", ply_path)
        return ply_path
    out_dir.mkdir(parents=True, exist_ok=True)

    views = load_posed_views(data, object_masks=bool(cfg.get("object_masks", False)))
    train_ids, holdout_ids = holdout_split(len(views), int(cfg.eval.holdout_every))
    train_views = views.subset(train_ids)
    eval_views = views.subset(evaluation_view_ids(len(views), int(cfg.eval.holdout_every)))
    module = GaussianSplatModule(initial_gaussians(train_views, points_xyz, points_rgb, cfg), cfg,
                                 scene_scale_from_cameras(train_views.w2c.double().numpy()),
                                 data.width, data.height, train_views)

    checkpoint_dir = out_dir / CHECKPOINT_DIR
    resume_from = checkpoint_dir / "last.ckpt"
    resume_from = resume_from if resume_from.is_file() else None
    trainer = Trainer(**_trainer_arguments(cfg, trainer_kwargs, checkpoint_dir, out_dir, bool(holdout_ids)))
    if isinstance(module.strategy, MCMCStrategy) and trainer.strategy.root_device.type != "cuda":
        raise ValueError("splat=mcmc needs a CUDA device: gsplat's MCMCStrategy relocates Gaussians with "
                         "a CUDA kernel; use splat=fast or splat=default on a CPU")
    # Training batches are lists of view indices: the module holds the views on its device. The
    # sampler's seed is drawn from the global generator, which the pipeline seeds per stage key.
    sampler = StepSeededViews(len(train_views), int(cfg.batch_size), int(cfg.steps),
                              seed=int(torch.randint(2**31 - 1, ()).item()),
                              first_step=lambda: trainer.global_step)
    train_loader = DataLoader(range(len(train_views)), batch_size=int(cfg.batch_size), collate_fn=list,
                              sampler=sampler)
    eval_loader = DataLoader(eval_views, batch_size=1)

    start = time.perf_counter()
    if resume_from:
        log.info("Resuming splat training from %s", resume_from)
    with warnings.catch_warnings():
        # Expected here: in-memory tensors need no worker processes; a checkpoint holds the state
        # after the step's optimizer update (what resuming needs); a resumed run finds its own
        # checkpoint folder; the views are sampled at random, so a restarted epoch loses nothing.
        for message in ("does not have many workers", "no pre-optimization state was saved",
                        "exists and is not empty", "dataloader is not resumable"):
            warnings.filterwarnings("ignore", message=f".*{message}.*")
        trainer.fit(module, train_loader, eval_loader if holdout_ids else None, ckpt_path=resume_from)
        train_seconds = time.perf_counter() - start
        final = trainer.validate(module, eval_loader, verbose=False)[0]

    gaussians = module.gaussians.detach()
    device = trainer.strategy.root_device  # Lightning has moved the module back to the CPU by now
    camera_metrics = {}
    if module.cameras is not None:
        camera_metrics = write_refined_cameras(module.to(device), views, train_ids, holdout_ids, cfg,
                                               out_dir / CAMERAS_NAME)
    save_ply(gaussians, ply_path)
    if cfg.eval.get("save_renders", False):
        save_holdout_renders(module.to(device), eval_views, out_dir / "holdout")
    metrics = {
        "psnr": float(final["val/psnr"]), "ssim": float(final["val/ssim"]),
        "num_gaussians": len(gaussians), "steps": int(trainer.global_step),
        "train_seconds": round(train_seconds, 2), "resumed": resume_from is not None,
        "eval_views": eval_views.names, "eval_on": "holdout" if holdout_ids else "train",
        "device": str(device), "backend": str(cfg.backend),
        "width": data.width, "height": data.height, "num_train_views": len(train_views),
        **camera_metrics,
    }
    write_text_atomic(metrics_path, json.dumps(metrics, indent=2) + "\n")
    log.info("Splats: %d Gaussians, held-out PSNR %.2f dB, SSIM %.4f, %.1f s -> %s", len(gaussians),
             metrics["psnr"], metrics["ssim"], train_seconds, ply_path)
    return ply_path


def write_refined_cameras(module: GaussianSplatModule, views: PosedViews, train_ids: list[int],
                          holdout_ids: list[int], cfg: DictConfig, path: Path) -> dict:
    """Write every view's refined camera to ``path`` and return the metrics of the refinement.

    The training views' cameras are the module's corrected ones; the held-out views, which the
    training never saw, are aligned to the trained Gaussians afterwards, pose only
    (``camera_opt.holdout_steps`` Adam steps each, :func:`align_cameras`), so that every registered view
    has a refined camera and the held-out PSNR can also be measured at cameras consistent with the
    splats (``psnr_aligned``; ``psnr`` stays at the given cameras).

    File: {"names": [V], "w2c": [V][4][4] (OpenCV world-to-camera, the frame of the given cameras),
    "how": [V] "trained" | "aligned"}, views in the order of ``views``.
    Returns: {"camera_refinement": {median/max correction rotation (deg) and translation (relative to
    the scene scale) of the trained views, and of the aligned held-out ones}, "psnr_aligned": dB or None}.
    """
    device = module.device
    w2c = views.w2c.clone().to(device)
    w2c[train_ids] = module.refined_w2c().to(device)
    psnr_aligned = None
    if holdout_ids:
        gaussians = module.gaussians.detach()
        degree = int(cfg.sh_degree)

        def render_at(camera: torch.Tensor) -> torch.Tensor:
            return module.render_batch({"w2c": camera, "K": module.view_K}, degree, gaussians=gaussians)[0]

        images = views.images[holdout_ids].to(device).float() / 255.0
        with torch.enable_grad():
            w2c[holdout_ids] = align_cameras(render_at, images, w2c[holdout_ids], module.scene_scale,
                                             steps=int(cfg.camera_opt.get("holdout_steps", 60)),
                                             lr=float(cfg.camera_opt.lr))
        with torch.no_grad():
            rendered = torch.cat([render_at(w2c[i:i + 1]) for i in holdout_ids]).clamp(0, 1)
            psnr_aligned = float(psnr(rendered, images).mean())
    given = views.w2c.to(device).double()
    moved = torch.linalg.inv(given) @ w2c.double()
    angles = torch.rad2deg(torch.arccos(((moved[:, 0, 0] + moved[:, 1, 1] + moved[:, 2, 2] - 1) / 2).clamp(-1, 1)))
    shifts = moved[:, :3, 3].norm(dim=-1) / module.scene_scale
    how = ["aligned" if i in set(holdout_ids) else "trained" for i in range(len(views))]
    write_text_atomic(path, json.dumps({"names": views.names, "w2c": w2c.double().cpu().numpy().tolist(),
                                        "how": how}) + "\n")

    def stats(ids: list[int]) -> dict:
        if not ids:
            return {}
        a, t = angles[ids].cpu().numpy(), shifts[ids].cpu().numpy()
        return {"count": len(ids), "median_rotation_deg": float(np.median(a)), "max_rotation_deg": float(a.max()),
                "median_translation_rel": float(np.median(t)), "max_translation_rel": float(t.max())}

    log.info("Camera refinement: trained views moved by %.3f deg (median), held-out views aligned by %.3f deg; "
             "held-out PSNR at the aligned cameras %s dB", stats(train_ids).get("median_rotation_deg", 0.0),
             stats(holdout_ids).get("median_rotation_deg", 0.0),
             "-" if psnr_aligned is None else f"{psnr_aligned:.2f}")
    return {"camera_refinement": {"trained": stats(train_ids), "aligned": stats(holdout_ids)},
            "psnr_aligned": psnr_aligned}


def read_refined_cameras(splat_dir: Path) -> dict[str, np.ndarray] | None:
    """The refined cameras a splat stage folder holds: view name -> w2c [4, 4] (OpenCV, float64), or
    None when its training did not refine them."""
    path = Path(splat_dir) / CAMERAS_NAME
    if not path.is_file():
        return None
    content = json.loads(path.read_text())
    return {name: np.asarray(w2c, dtype=np.float64) for name, w2c in zip(content["names"], content["w2c"])}


class StepSeededViews(Sampler):
    """View indices for training steps ``first_step() .. steps - 1``, ``batch_size`` per step, drawn
    with replacement from a generator seeded by (seed, step): step ``s`` sees the same views whether
    the run started at 0 or resumed from a checkpoint before ``s`` (Lightning restarts a resumed
    epoch's iteration from the beginning, so the sampler itself skips the steps already done)."""

    def __init__(self, num_views: int, batch_size: int, steps: int, seed: int, first_step=lambda: 0):
        self.num_views, self.batch_size, self.steps, self.seed = num_views, batch_size, steps, seed
        self.first_step = first_step

    def __iter__(self):
        for step in range(self.first_step(), self.steps):
            yield from np.random.default_rng((self.seed, step)).integers(0, self.num_views, self.batch_size).tolist()

    def __len__(self) -> int:
        return max(self.steps - self.first_step(), 0) * self.batch_size


def _trainer_arguments(cfg: DictConfig, trainer_kwargs: dict | None, checkpoint_dir: Path, out_dir: Path,
                       validate: bool) -> dict:
    kwargs = dict(trainer_kwargs or {})
    callbacks = list(kwargs.pop("callbacks", None) or [])
    callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="step{step}", auto_insert_metric_name=False,
                                     every_n_train_steps=int(cfg.checkpoint_every), save_top_k=1,
                                     save_last=True))
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_model_summary", False)
    kwargs.update(
        callbacks=callbacks,
        max_steps=int(cfg.steps),
        default_root_dir=str(out_dir),
        num_sanity_val_steps=0,
        # validation every eval.every_n_steps steps, counted over the whole run (not per epoch)
        val_check_interval=min(int(cfg.eval.every_n_steps), int(cfg.steps)) if validate else None,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if validate else 0,
        enable_checkpointing=True,
    )
    return kwargs


@torch.no_grad()
def save_holdout_renders(module: GaussianSplatModule, views: PosedViews, folder: Path) -> None:
    """For eyes: each held-out image beside its render, as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(views)):
        batch = {k: v[None].to(module.device) if torch.is_tensor(v) and k != "K" else v
                 for k, v in views[i].items()}
        batch["K"] = views.K[None].to(module.device)
        rgb, _, _ = module.render_batch(batch, int(module.cfg.sh_degree))
        render = (rgb[0].clamp(0, 1) * 255).round().byte().cpu().numpy()
        side_by_side = np.concatenate([views.images[i].numpy(), render], axis=1)
        Image.fromarray(side_by_side).save(folder / (views.names[i].replace("/", "_")))
