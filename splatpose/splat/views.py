"""The posed training views of one class, held in memory for splat training."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset


@dataclass
class PosedViews(Dataset):
    """Train views in memory: images [V,H,W,3] uint8, w2c [V,4,4] float32 (OpenCV), K [3,3]."""

    names: list[str]
    images: torch.Tensor
    w2c: torch.Tensor
    K: torch.Tensor

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "w2c": self.w2c[index], "K": self.K, "index": index}

    def subset(self, indices: list[int]) -> "PosedViews":
        return PosedViews([self.names[i] for i in indices], self.images[indices], self.w2c[indices], self.K)
