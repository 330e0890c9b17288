"""Evaluator callback: gathers the test maps of one class and computes the benchmark metrics.

Metrics need every map of the class at once (class-level min-max normalisation, pixel AUROC and
AUPRO over all pixels), so the callback collects per-batch outputs on the CPU and evaluates once at
the end of the test epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from splatpose.metrics import evaluate, normalise_maps

log = logging.getLogger(__name__)

PREVIEW_SIZE = 224  # side of the query/render thumbnails kept for panels


@dataclass
class Evaluation:
    """Everything the evaluation of one class produced.

    maps: [N, S, S] anomaly maps after class-level min-max normalisation (0..1)
    masks: [N, S, S] bool ground truth at map resolution
    scores: [N] image scores of the normalised maps (the scorer's :meth:`image_scores`)
    queries, renders: [N, P, P, 3] uint8 thumbnails for panels
    map_range: (lo, hi) of the raw maps, i.e. the normalisation a detector must reuse
    metrics: overall and per-defect metrics (plain floats; None where undefined)
    """

    names: list[str]
    defects: list[str]
    maps: np.ndarray
    masks: np.ndarray
    scores: np.ndarray
    queries: np.ndarray
    renders: np.ndarray
    map_range: tuple[float, float]
    metrics: dict = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        return np.array([d != "good" for d in self.defects], dtype=np.int64)


class AnomalyEvaluator(Callback):
    """Collects raw maps during ``trainer.test`` and evaluates them at the end of the epoch.

    The result is attached to the module as ``pl_module.evaluation`` (an :class:`Evaluation`) for
    later callbacks (panels) and for the pipeline, and the metrics go to every configured logger.
    """

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._batches: list[dict] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        maps = outputs["maps"]
        size = maps.shape[-1]
        self._batches.append({
            "maps": maps.numpy(),
            "masks": _resize_mask(batch["mask"].cpu(), size),
            "queries": _thumbnail(batch["query"].cpu()),
            "renders": _thumbnail(batch["render"].cpu()),
            "names": list(batch["name"]),
            "defects": list(batch["defect"]),
        })

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        def cat(key):
            return np.concatenate([b[key] for b in self._batches])

        raw = cat("maps")
        lo, hi = float(raw.min()), float(raw.max())
        maps = normalise_maps(raw, lo, hi)
        names = [n for b in self._batches for n in b["names"]]
        defects = [d for b in self._batches for d in b["defects"]]
        masks = cat("masks")
        labels = np.array([d != "good" for d in defects], dtype=np.int64)
        scores = pl_module.scorer.image_scores(maps)
        metrics = evaluate(maps, masks, labels, defects, scores=scores)
        pl_module.evaluation = Evaluation(
            names=names, defects=defects, maps=maps, masks=masks,
            scores=scores, queries=cat("queries"),
            renders=cat("renders"), map_range=(lo, hi), metrics=metrics)
        flat = flatten_metrics(metrics)
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in flat.items() if v is not None})
        self._batches = []


def flatten_metrics(metrics: dict, prefix: str = "") -> dict:
    """{'pixel_auroc': .., 'per_defect': {'Burrs': {...}}} -> {'pixel_auroc': .., 'Burrs/pixel_auroc': ..}"""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, prefix=f"{prefix}{key}/" if key != "per_defect" else prefix))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _resize_mask(mask: torch.Tensor, size: int) -> np.ndarray:
    """[B, H, W] bool -> [B, size, size] bool (nearest), the resolution metrics are computed at."""
    resized = F.interpolate(mask[:, None].float(), size=(size, size), mode="nearest")
    return resized[:, 0].numpy() > 0.5


def _thumbnail(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0,1] -> [B, P, P, 3] uint8 for panels."""
    small = F.interpolate(images.float(), size=(PREVIEW_SIZE, PREVIEW_SIZE), mode="bilinear",
                          antialias=True, align_corners=False)
    return (small.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
