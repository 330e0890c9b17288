"""How well can a query's part be told from the bench without a pose? Two estimators against the truth.

For each run folder of a class shot on a bench (a realistic preset), each test image's foreground is estimated

- ``border``: what does not look like the bench seen along the image's border (5x5 colour patches, the
  pipeline's ``bench_whitened_by_border`` at ``refine.bench.border_tau``; what the recovery uses today);
- ``bank``: what is far from every bench patch of the reference views, in the scorer backbone's features
  (levels ``--levels`` on a ``--grid`` raster, concatenated): the bench pixels of the reference
  views (outside their object masks, dilated) make a memory bank; a query location is foreground when its
  nearest bank distance exceeds the ``--quantile`` of the distances of bench locations of reference views
  kept out of the bank;

and compared with the part's silhouette rendered at the true pose (the run's splats; alpha > 0.5): IoU, and
the fraction of the silhouette found (recall). Clutter on the bench counts against both alike.

    python experiments/study_foreground.py outputs/runs/synthetic/06PlainAnt/<time> [--levels 1 2]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from scipy.ndimage import binary_dilation

from splatpose.data import resolve_dataset
from splatpose.data.mad_sim import read_image, read_object_mask
from splatpose.refine.recovery import foreground_mask
from splatpose.scoring.anomaly_maps import build_scorer
from splatpose.scoring.object_region import bench_whitened_by_border
from splatpose.splat.ply import load_gaussians
from splatpose.splat.rendering import render


def features(scorer, image: np.ndarray, levels: list[int], grid: int) -> torch.Tensor:
    """[H, W, 3] in [0, 1] -> [G, G, C] the backbone's chosen levels (input at the scorer's size) resampled to
    a ``grid`` x ``grid`` raster, each level unit length."""
    x = scorer.prepare(torch.from_numpy(image).permute(2, 0, 1)[None].float())
    maps = [F.interpolate(scorer.backbone(x)[i], size=(grid, grid), mode="bilinear", align_corners=False,
                          antialias=True) for i in levels]
    feats = torch.cat([F.normalize(m, dim=1) for m in maps], 1)[0].permute(1, 2, 0)
    return feats / len(levels) ** 0.5


def nearest(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    return torch.cat([torch.cdist(q, bank).min(1).values for q in queries.split(chunk)])


def resized(mask: np.ndarray, size: int) -> np.ndarray:
    return F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=(size, size),
                         mode="nearest")[0, 0].numpy() > 0.5


def iou_recall(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    return (float((found & truth).sum() / max((found | truth).sum(), 1)), float((found & truth).sum() / max(truth.sum(), 1)))


def study(run: Path, levels: list[int], quantile: float, bank_size: int, grid: int, seed: int = 0) -> list[dict]:
    res = json.loads((run / "results.json").read_text())
    cfg = OmegaConf.create(res["config"])
    data = resolve_dataset(cfg.dataset, res["class"])
    scorer = build_scorer(cfg.scorer)
    size = grid
    rng = np.random.default_rng(seed)
    bench, held_out = [], []
    for i, view in enumerate(data.train):
        object_mask = binary_dilation(resized(read_object_mask(view.mask_path) > 0.5, size), iterations=2)
        feats = features(scorer, read_image(view.path), levels, grid)[~torch.from_numpy(object_mask)]
        (held_out if i % 4 == 3 else bench).append(feats)
    bank = torch.cat(bench)
    bank = bank[torch.from_numpy(rng.choice(len(bank), min(bank_size, len(bank)), replace=False))]
    held = torch.cat(held_out)
    held = held[torch.from_numpy(rng.choice(len(held), min(20000, len(held)), replace=False))]
    threshold = float(torch.quantile(nearest(held, bank), quantile))
    gaussians = load_gaussians(Path(res["gaussians_ply"]), "cpu")
    K = torch.as_tensor(data.K, dtype=torch.float32)
    rows = []
    for test in data.test:
        image = read_image(test.path)
        w2c = torch.as_tensor(data.test_poses[test.name], dtype=torch.float32)
        with torch.no_grad():
            _, alpha = render(gaussians, w2c, K, data.width, data.height, return_alpha=True)
        truth = resized(alpha[0, ..., 0].numpy() > 0.5, size)
        border = bench_whitened_by_border(torch.from_numpy(image).permute(2, 0, 1), float(cfg.refine.bench.border_tau))
        by_border = resized(foreground_mask(border)[0].numpy() > 0.5, size)
        distance = nearest(features(scorer, image, levels, grid).reshape(-1, bank.shape[1]), bank).reshape(size, size)
        by_bank = (distance > threshold).numpy()
        rows.append({"name": test.name, "border": iou_recall(by_border, truth), "bank": iou_recall(by_bank, truth)})
    print(f"## {res['dataset']}/{res['class']}: bank {len(bank)} bench locations, threshold {threshold:.4f} "
          f"(quantile {quantile} of {len(held)} held-out bench locations)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quantile", type=float, default=0.99)
    parser.add_argument("--bank-size", type=int, default=20000)
    parser.add_argument("--grid", type=int, default=56, help="locations per side compared (and scored)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print("| run | estimator | median IoU | 10th percentile IoU | median recall | queries with IoU >= 0.8 |\n|---|---|---|---|---|---|")
    for run in args.runs:
        rows = study(run, args.levels, args.quantile, args.bank_size, args.grid)
        for estimator in ("border", "bank"):
            ious = np.array([r[estimator][0] for r in rows])
            recalls = np.array([r[estimator][1] for r in rows])
            print(f"| {run.parent.name} | {estimator} | {np.median(ious):.3f} | {np.percentile(ious, 10):.3f} "
                  f"| {np.median(recalls):.3f} | {(ious >= 0.8).sum()} / {len(ious)} |", flush=True)


if __name__ == "__main__":
    main()
