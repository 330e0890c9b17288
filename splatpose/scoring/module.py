"""Thin Lightning glue around an anomaly scorer, so evaluation runs through ``Trainer.test``.

The scorer itself is a plain ``nn.Module`` (query, render -> raw anomaly maps); metrics, panels and
logging are callbacks (``splatpose.callbacks``), as in anomalib: the module only turns a batch of
(query, render) pairs into maps and hands them on, with the batch's metadata, to the callbacks.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch.utils.data import Dataset


class QueryRenderPairs(Dataset):
    """Query images beside their rendered pseudo-references, with ground truth.

    Args:
        queries: [N, H, W, 3] float32 in [0,1]
        renders: [N, H, W, 3] float32 in [0,1] (rendered at each query's localized pose)
        masks: [N, H, W] bool defect masks (all False for good images)
        names, defects: per-image test name ("test/Burrs/003.png") and defect type ("good", ...)
        alphas: [N, H, W] float32 in [0, 1], each render's coverage (None: batches carry no "alpha")
        expected: [N, H, W] float32, the map a good image is expected to have at each query's pose
            (splatpose.scoring.uncertainty; None: batches carry no "expected")
    """

    def __init__(self, queries: np.ndarray, renders: np.ndarray, masks: np.ndarray,
                 names: list[str], defects: list[str], alphas: np.ndarray | None = None,
                 expected: np.ndarray | None = None):
        if not (len(queries) == len(renders) == len(masks) == len(names) == len(defects)):
            raise ValueError("queries, renders, masks, names and defects must have one entry per image")
        for name, extra in (("alphas", alphas), ("expected", expected)):
            if extra is not None and len(extra) != len(renders):
                raise ValueError(f"{name}: {len(extra)} for {len(renders)} renders; give one per render")
        self.queries, self.renders, self.masks, self.alphas = queries, renders, masks, alphas
        self.expected = expected
        self.names, self.defects = names, defects

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        extras = {} if self.alphas is None else {"alpha": torch.from_numpy(self.alphas[i])}
        if self.expected is not None:
            extras["expected"] = torch.from_numpy(self.expected[i])
        return {**extras,
            "query": torch.from_numpy(self.queries[i]).permute(2, 0, 1),
            "render": torch.from_numpy(self.renders[i]).permute(2, 0, 1),
            "mask": torch.from_numpy(self.masks[i]),
            "name": self.names[i],
            "defect": self.defects[i],
        }


class AnomalyScoringModule(LightningModule):
    """Runs ``scorer(query, render, alpha, expected)`` on each test batch and returns raw maps for the callbacks."""

    def __init__(self, scorer: torch.nn.Module):
        super().__init__()
        self.scorer = scorer

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        maps = self.scorer(batch["query"], batch["render"], batch.get("alpha"), batch.get("expected"))  # [B, S, S]
        return {"maps": maps.float().cpu()}
