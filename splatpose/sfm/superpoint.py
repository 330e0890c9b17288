"""SuperPoint (DeTone, Malisiewicz, Rabinovich, CVPR-W 2018) as a small torch module.

No installed package ships SuperPoint, and its weights are not redistributable with this project, so
the network is defined here with the parameter names of MagicLeap's released checkpoint
(``superpoint_v1.pth``: conv1a ... conv4b, convPa/convPb for the detector, convDa/convDb for the
descriptor), which then loads strictly from a user-given path.

Input: float images [B, 3 or 1, H, W] in [0, 1], H and W multiples of 8.
Output per image: keypoints [N, 2] (x, y; the centre of the top-left pixel is (0, 0)), scores [N],
descriptors [N, 256] (L2-normalised).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CELL = 8  # the detector predicts one of 64 positions (or "none") per 8x8 cell


def _conv(c_in: int, c_out: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=1, padding=kernel // 2)


class SuperPoint(nn.Module):
    def __init__(self, nms_radius: int = 4, detection_threshold: float = 0.005, max_keypoints: int = 1024,
                 border: int = 4):
        super().__init__()
        self.nms_radius, self.threshold = nms_radius, detection_threshold
        self.max_keypoints, self.border = max_keypoints, border
        widths = [(1, 64), (64, 64), (64, 64), (64, 64), (64, 128), (128, 128), (128, 128), (128, 128)]
        names = ["conv1a", "conv1b", "conv2a", "conv2b", "conv3a", "conv3b", "conv4a", "conv4b"]
        for name, (c_in, c_out) in zip(names, widths):
            self.add_module(name, _conv(c_in, c_out, 3))
        self.encoder_names = names
        self.convPa, self.convPb = _conv(128, 256, 3), _conv(256, CELL * CELL + 1, 1)
        self.convDa, self.convDb = _conv(128, 256, 3), _conv(256, 256, 1)

    @classmethod
    def from_weights(cls, path: Path, **kwargs) -> "SuperPoint":
        """Build and load MagicLeap's checkpoint strictly; clear errors for a missing or foreign file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sfm.feature.weights={path}: no such file; point it to MagicLeap's "
                                    "superpoint_v1.pth")
        model = cls(**kwargs)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"sfm.feature.weights={path}: not a SuperPoint checkpoint with MagicLeap's "
                             f"parameter names (conv1a ... convDb): {error}") from error
        return model

    def encode(self, gray: torch.Tensor) -> torch.Tensor:
        x = gray
        for i, name in enumerate(self.encoder_names):
            x = F.relu(getattr(self, name)(x))
            if i in (1, 3, 5):  # pool after each pair of convolutions but the last
                x = F.max_pool2d(x, 2, 2)
        return x

    def keypoint_heatmap(self, features: torch.Tensor) -> torch.Tensor:
        """[B, H, W] probability of a keypoint at each pixel (the 65th "no keypoint" class dropped)."""
        logits = self.convPb(F.relu(self.convPa(features)))
        prob = logits.softmax(1)[:, :-1]
        return F.pixel_shuffle(prob, CELL)[:, 0]

    def dense_descriptors(self, features: torch.Tensor) -> torch.Tensor:
        """[B, 256, H/8, W/8] L2-normalised descriptors."""
        return F.normalize(self.convDb(F.relu(self.convDa(features))), dim=1)

    def forward(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        gray = images.mean(1, keepdim=True) if images.shape[1] == 3 else images
        features = self.encode(gray)
        heatmap = self.keypoint_heatmap(features)
        descriptors = self.dense_descriptors(features)
        out = {"keypoints": [], "scores": [], "descriptors": []}
        for heat, desc in zip(heatmap, descriptors):
            keypoints, scores = self.detect(heat)
            out["keypoints"].append(keypoints)
            out["scores"].append(scores)
            out["descriptors"].append(sample_descriptors(desc, keypoints))
        return out

    def detect(self, heat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local maxima of ``heat`` [H, W] above the threshold, away from the border, strongest first."""
        size = 2 * self.nms_radius + 1
        is_max = heat == F.max_pool2d(heat[None, None], size, stride=1, padding=self.nms_radius)[0, 0]
        keep = is_max & (heat > self.threshold)
        if self.border > 0:
            b = self.border
            keep[:b], keep[-b:], keep[:, :b], keep[:, -b:] = False, False, False, False
        ys, xs = torch.nonzero(keep, as_tuple=True)
        scores = heat[ys, xs]
        order = scores.argsort(descending=True)[: self.max_keypoints]
        keypoints = torch.stack([xs, ys], -1)[order].float()
        return keypoints, scores[order]


def sample_descriptors(dense: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
    """Bilinear descriptors [N, D] at pixel keypoints [N, 2] from a stride-8 map [D, h, w]."""
    _, h, w = dense.shape
    # pixel centre x -> continuous coordinate (x + 0.5) in an image of width 8w -> [-1, 1] (align_corners=False)
    grid = (keypoints + 0.5) / torch.tensor([w * CELL, h * CELL], device=keypoints.device) * 2 - 1
    sampled = F.grid_sample(dense[None], grid[None, None], mode="bilinear", align_corners=False)
    return F.normalize(sampled[0, :, 0].T, dim=1)
