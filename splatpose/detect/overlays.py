"""Overlay panels of a detection: the query, its render, and the anomaly map over the query.

The map is shown on a fixed scale, the run's normalisation: 0 (blue) is the lowest raw value of the
evaluation's test maps and 1 (red) the highest, so colours mean the same in every panel and a new
image brighter than anything in the evaluation saturates at red.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

COLORMAP = "jet"
MAP_OPACITY = 0.5


def heatmap_rgb(anomaly_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """[S, S] normalised map -> [H, W, 3] float RGB in [0, 1] (values clipped to [0, 1])."""
    resized = Image.fromarray(np.clip(anomaly_map, 0, 1).astype(np.float32)).resize((width, height), Image.BILINEAR)
    return colormaps[COLORMAP](np.asarray(resized))[..., :3]


def overlay_panel(query: np.ndarray, render: np.ndarray | None, anomaly_map: np.ndarray, caption: str) -> Image.Image:
    """One image: query | render | map blended over the query, with a caption line.

    Args:
        query, render: [H, W, 3] float in [0, 1] (render None: a grey tile).
        anomaly_map: [S, S] normalised map.
    """
    height, width = query.shape[:2]
    blend = (1 - MAP_OPACITY) * query + MAP_OPACITY * heatmap_rgb(anomaly_map, width, height)
    tiles = [query, render if render is not None else np.full_like(query, 0.5), blend]
    strip = np.concatenate([np.clip(t, 0, 1) for t in tiles], axis=1)
    panel = Image.fromarray((strip * 255).round().astype(np.uint8))
    canvas = Image.new("RGB", (panel.width, panel.height + 16), "white")
    canvas.paste(panel, (0, 16))
    ImageDraw.Draw(canvas).text((4, 2), caption, fill="black")
    return canvas


def write_overlay(path: Path, query: np.ndarray, render: np.ndarray | None, anomaly_map: np.ndarray,
                  caption: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay_panel(query, render, anomaly_map, caption).save(path)
    return path
