"""gsplat's DefaultStrategy with its per-step statistics kept on the device (no host sync).

gsplat 1.5.3 accumulates each step's screen-space gradients with ``torch.where(sel)`` and boolean
indexing (``DefaultStrategy._update_state``, non-packed mode). Both need the number of selected
Gaussians on the host, so every training step waits there for the GPU to finish the backward pass
before Python can queue the next step: the host's launch work and the GPU's kernels then run one after
the other instead of overlapping. The same sums written as dense masked additions give
the same statistics with no sync; growing, splitting and pruning (every ``refine_every`` steps) are
gsplat's own, unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from gsplat.strategy import DefaultStrategy


class DeviceStatsDefaultStrategy(DefaultStrategy):
    """:class:`gsplat.strategy.DefaultStrategy` whose per-step update needs no host sync.

    For the non-packed layout (what the renderers here produce) the running sums equal gsplat's:
    each Gaussian visible in a camera adds its gradient norm and 1 to its count, invisible ones add
    exactly 0. Packed input is passed to gsplat's own update.
    """

    def _update_state(self, params, state: dict[str, Any], info: dict[str, Any], packed: bool = False) -> None:
        if packed:
            return super()._update_state(params, state, info, packed=True)
        gradient = info[self.key_for_gradient]
        grads = (gradient.absgrad if self.absgrad else gradient.grad).clone()  # [C, N, 2]
        grads[..., 0] *= info["width"] / 2.0 * info["n_cameras"]
        grads[..., 1] *= info["height"] / 2.0 * info["n_cameras"]
        n_gaussians = len(params["means"])
        for key in ("grad2d", "count") + (("radii",) if self.refine_scale2d_stop_iter > 0 else ()):
            if state[key] is None:
                state[key] = torch.zeros(n_gaussians, device=grads.device)

        visible = (info["radii"] > 0.0).all(dim=-1)  # [C, N]
        state["grad2d"] += torch.where(visible, grads.norm(dim=-1), 0.0).sum(dim=0)
        state["count"] += visible.sum(dim=0, dtype=torch.float32)
        if self.refine_scale2d_stop_iter > 0:
            radii = info["radii"].max(dim=-1).values / float(max(info["width"], info["height"]))  # [C, N]
            seen = torch.where(visible, radii.to(state["radii"].dtype), 0.0).amax(dim=0)
            torch.maximum(state["radii"], seen, out=state["radii"])
