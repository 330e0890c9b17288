"""The scorer with its pieces for real captures on (off by default): the photometric fit and the object region."""

import numpy as np
import torch
from omegaconf import OmegaConf

from splatpose.scoring import build_scorer

CAPTURE_SCORING = {"photometric_fit": {"enabled": True}, "object_region": {"enabled": True}}


def capture_maps(cfg_scorer, queries, renders, alphas, **overrides) -> np.ndarray:
    """[N, S, S] raw maps of [N, H, W, 3] queries and renders with [N, H, W] alphas (numpy, in [0, 1]),
    scored by ``cfg_scorer`` with the capture pieces on and ``overrides`` on top."""
    scorer = build_scorer(OmegaConf.merge(cfg_scorer, CAPTURE_SCORING, overrides), "cpu")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    return scorer(t(queries).permute(0, 3, 1, 2), t(renders).permute(0, 3, 1, 2), t(alphas)).numpy()
