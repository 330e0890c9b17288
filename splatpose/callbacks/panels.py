"""Image panels (query | pseudo-reference | anomaly map | ground truth), saved and sent to W&B.

People judge anomaly detectors by looking at maps, so every evaluation writes one PNG panel per
test image into the run folder and uploads a selection to W&B in one batch (one step), with a
per-image W&B table beside it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from lightning.pytorch import Callback
from lightning.pytorch.loggers import WandbLogger
from matplotlib import colormaps
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)


class ImagePanels(Callback):
    """Writes ``<out_dir>/panels/<defect>/<stem>.png`` for every test image after evaluation.

    Args:
        out_dir: folder of the run (panels go to ``out_dir/panels``)
        max_logged: how many panels go to W&B (the highest-scoring defects and good images
            first, so the interesting ones are always there); all are saved to disk.
    """

    def __init__(self, out_dir: str | Path, max_logged: int = 16):
        self.out_dir = Path(out_dir)
        self.max_logged = max_logged

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        evaluation = getattr(pl_module, "evaluation", None)
        if evaluation is None:
            log.warning("ImagePanels: no evaluation found; is AnomalyEvaluator before it in callbacks?")
            return
        panels = []
        for i, name in enumerate(evaluation.names):
            panel = anomaly_panel(evaluation.queries[i], evaluation.renders[i], evaluation.maps[i],
                                  evaluation.masks[i], title=f"{name}  score={evaluation.scores[i]:.3f}")
            path = self.out_dir / "panels" / evaluation.defects[i] / f"{Path(name).stem}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(panel).save(path)
            panels.append(panel)
        log.info("Anomaly-map panels: %s", self.out_dir / "panels")
        self._log_to_wandb(trainer, evaluation, panels)

    def _log_to_wandb(self, trainer, evaluation, panels: list[np.ndarray]) -> None:
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers:
            return
        order = np.argsort(-evaluation.scores)[: self.max_logged]
        captions = [f"{evaluation.names[i]} ({evaluation.defects[i]}) score={evaluation.scores[i]:.3f}"
                    for i in order]
        rows = [[evaluation.names[i], evaluation.defects[i], int(evaluation.labels[i]),
                 float(evaluation.scores[i])] for i in range(len(evaluation.names))]
        for logger in wandb_loggers:
            logger.log_image("panels", [panels[i] for i in order], caption=captions)
            logger.log_table("per_image_scores", columns=["name", "defect", "label", "score"], data=rows)


def anomaly_panel(query: np.ndarray, render: np.ndarray, anomaly_map: np.ndarray,
                  mask: np.ndarray, title: str = "") -> np.ndarray:
    """One row: query | render | anomaly map (inferno, 0..1) | map over query with the GT outline.

    Args:
        query, render: [P, P, 3] uint8
        anomaly_map: [S, S] float in [0, 1] (class-normalised)
        mask: [S, S] bool ground truth
    Returns: [P + 18, 4 P, 3] uint8
    """
    size = query.shape[0]
    heat = _resize(_colorize(anomaly_map), size)
    outline = _resize(np.repeat(_outline(mask)[..., None], 3, axis=2).astype(np.uint8) * 255, size) > 127
    overlay = (0.5 * query + 0.5 * heat).astype(np.uint8)
    overlay[outline[..., 0]] = (0, 255, 0)
    row = np.concatenate([query, render, heat, overlay], axis=1)
    canvas = Image.new("RGB", (row.shape[1], row.shape[0] + 18), "white")
    canvas.paste(Image.fromarray(row), (0, 18))
    ImageDraw.Draw(canvas).text((4, 3), title + "   [query | render | map | overlay + GT]", fill="black")
    return np.asarray(canvas)


def _colorize(values: np.ndarray) -> np.ndarray:
    return (colormaps["inferno"](np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.NEAREST))


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a bool mask (mask minus its 4-neighbour erosion)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior
