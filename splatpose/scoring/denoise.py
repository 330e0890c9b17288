"""Sensor noise off the images before they are compared.

A camera's photon and read noise, and JPEG's blocks, are in the query but not in the render (the splats
average them out over the reference views): the backbone's finest levels answer them, on a part's
textured or edged areas most, and a good image scores higher than a burr. Both images go through the
same non-local-means filter (OpenCV's ``fastNlMeansDenoisingColored``: 5x5 patches compared within a
15x15 window, filter strength ``strength`` in 8-bit grey levels), so that what the filter does to fine
texture it does to both. Measured in experiments/results/realistic_cpu_2026-12-05.md (session 23).
"""

from __future__ import annotations

import numpy as np
import torch

TEMPLATE_PX, SEARCH_PX = 5, 15


def denoised(images: torch.Tensor, strength: float) -> torch.Tensor:
    """[B, 3, H, W] float in [0, 1] -> the same through non-local means (on the host, in 8 bits; returned
    on the input's device and dtype)."""
    import cv2

    pixels = (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([cv2.fastNlMeansDenoisingColored(np.ascontiguousarray(p), None, strength, strength,
                                                    TEMPLATE_PX, SEARCH_PX) for p in pixels])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(images.device, images.dtype) / 255.0
