"""SE(3) increments of a camera pose, for gradient-based pose refinement.

A pose update is a twist ``xi = (rho, omega)`` [6]: ``rho`` a translation, ``omega`` an axis-angle
rotation (radians), both in the camera frame. Its exponential, applied on the left of a
world-to-camera matrix, moves the camera:

    w2c_new = exp(hat(xi)) @ w2c

so ``xi = 0`` is the starting pose and small ``xi`` rotate the camera about its own centre and shift
it along its own axes. The exponential is ``torch.linalg.matrix_exp`` of the 4x4 twist matrix: exact
(no small-angle approximation) and differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor


def twist_matrix(xi: Tensor) -> Tensor:
    """hat(xi): [6] (rho [3], omega [3]) -> the 4x4 element of se(3) [[omega]_x, rho; 0, 0]."""
    rho, omega = xi[:3], xi[3:]
    zero = xi.new_zeros(())
    return torch.stack([
        torch.stack([zero, -omega[2], omega[1], rho[0]]),
        torch.stack([omega[2], zero, -omega[0], rho[1]]),
        torch.stack([-omega[1], omega[0], zero, rho[2]]),
        torch.stack([zero, zero, zero, zero]),
    ])


def se3_exp(xi: Tensor) -> Tensor:
    """exp(hat(xi)): [6] -> [4, 4] rigid transform (rotation by |omega| radians about omega)."""
    return torch.linalg.matrix_exp(twist_matrix(xi))


def apply_increment(xi: Tensor, w2c: Tensor) -> Tensor:
    """Left-multiply the increment on a world-to-camera pose: [6], [4, 4] -> [4, 4]."""
    return se3_exp(xi) @ w2c

