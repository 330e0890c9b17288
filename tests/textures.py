"""Synthetic image pairs for matcher tests: a texture and a rotated, shifted copy of it."""

import numpy as np
import torch
import torch.nn.functional as F


def textured_pair(size: int = 320, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth random texture and the same texture rotated by 8 degrees and shifted: [1, 3, S, S] each."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 3, size // 8, size // 8, generator=generator)
    image = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    cos, sin = float(np.cos(np.radians(8.0))), float(np.sin(np.radians(8.0)))
    theta = torch.tensor([[[cos, -sin, 0.05], [sin, cos, -0.03]]], dtype=torch.float32)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    return image, F.grid_sample(image, grid, padding_mode="border", align_corners=False)
