"""The pipeline's refine stage: every localized query's PnP pose refined against its image.

Writes ``refined_poses.json`` into the stage folder (one entry per query, in test order: the pose
used for rendering, whether it was refined, and what refining did) and reuses it when complete.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from splatpose.data.mad_sim import ClassData, read_image
from splatpose.refine.pose_refinement import PoseRefiner
from splatpose.sfm.config import default_conf_dir
from splatpose.sfm.localization import QueryPose
from splatpose.splat.ply import load_gaussians
from splatpose.stage_cache import write_json_atomic

log = logging.getLogger(__name__)

REFINED_POSES_FILE = "refined_poses.json"


def default_refine_config() -> DictConfig:
    """conf/refine/lbfgs.yaml: the refinement the pipeline runs by default."""
    return OmegaConf.load(default_conf_dir() / "refine" / "lbfgs.yaml")


@dataclass
class RefinedPose:
    """The pose a query is rendered at.

    w2c: [4, 4] float64 world-to-camera (OpenCV): the refined pose, or the PnP pose when the query was
        not refined (refinement off, or a fallback pose with ``skip_unlocalized``).
    refinement: what refining did (steps, losses, pose change, seconds); None when not refined.
    """

    name: str
    w2c: np.ndarray
    refinement: dict | None = None

    @property
    def refined(self) -> bool:
        return self.refinement is not None


def refine_query_poses(data: ClassData, poses: list[QueryPose], cfg: DictConfig, gaussians_ply: Path,
                       out_dir: Path | None, device: str, backend: str = "auto", scorer=None) -> list[RefinedPose]:
    """Refine every query pose (``cfg``: the ``refine`` node); ``out_dir`` None: no cache file."""
    if not cfg.enabled:
        return [RefinedPose(p.name, p.w2c) for p in poses]
    cache_file = Path(out_dir) / REFINED_POSES_FILE if out_dir is not None else None
    cached = _load(cache_file, [p.name for p in poses])
    if cached is not None:
        log.info("refinement: reusing %s", cache_file)
        return cached
    refiner = PoseRefiner(load_gaussians(gaussians_ply, device), data.K, data.width, data.height, cfg,
                          backend=backend, scorer=scorer)
    refined = []
    for test, pose in tqdm(list(zip(data.test, poses, strict=True)), desc="refine poses", leave=False):
        if not pose.success and cfg.skip_unlocalized:
            refined.append(RefinedPose(pose.name, pose.w2c))
            continue
        query = torch.from_numpy(read_image(test.path)).permute(2, 0, 1)
        result = refiner.refine(query, pose.w2c)
        refined.append(RefinedPose(pose.name, result.w2c, result.summary()))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_file, [{"name": r.name, "w2c": r.w2c.tolist(), "refinement": r.refinement}
                                       for r in refined])
    seconds = [r.refinement["seconds"] for r in refined if r.refined]
    log.info("refinement: %d/%d poses refined, %.2f s per query", len(seconds), len(refined),
             float(np.mean(seconds)) if seconds else 0.0)
    return refined


def _load(path: Path | None, names: list[str]) -> list[RefinedPose] | None:
    if path is None or not path.exists():
        return None
    entries = json.loads(path.read_text())
    if [e["name"] for e in entries] != names:
        log.warning("%s does not match the test images; refining again", path)
        return None
    return [RefinedPose(e["name"], np.asarray(e["w2c"], dtype=np.float64), e["refinement"]) for e in entries]
