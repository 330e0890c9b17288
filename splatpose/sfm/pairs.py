"""Database image pairs for triangulation, chosen from the known train poses.

The train views of an inspected object all look at the object from a sphere of directions, so two
views overlap when their viewing directions are close. Each view is paired with its ``k`` nearest
neighbours by the angle between optical axes; that measure ignores the scene's scale and origin.
"""

from __future__ import annotations

import numpy as np


def viewing_directions(w2c: np.ndarray) -> np.ndarray:
    """Unit optical axes in world coordinates [N, 3] of world-to-camera poses [N, 4, 4] (OpenCV: +z forward)."""
    return np.asarray(w2c, dtype=np.float64)[:, 2, :3]  # third row of R = camera z axis in world


def pairs_from_poses(names: list[str], w2c: np.ndarray, num_neighbors: int) -> list[tuple[str, str]]:
    """Each image with its ``num_neighbors`` closest views by optical-axis angle; every unordered pair once.

    Args:
        names: image names [N].
        w2c: [N, 4, 4] world-to-camera poses (OpenCV axes) in the order of ``names``.
        num_neighbors: neighbours per image (clipped to N - 1).
    Returns:
        Pairs (name_i, name_j) with i < j in the order of ``names``, sorted.
    """
    if len(names) != len(w2c):
        raise ValueError(f"{len(names)} names but {len(w2c)} poses")
    if num_neighbors < 1:
        raise ValueError(f"sfm.db_pairs.num_neighbors must be >= 1, got {num_neighbors}")
    axes = viewing_directions(w2c)
    cosine = axes @ axes.T
    np.fill_diagonal(cosine, -np.inf)
    k = min(num_neighbors, len(names) - 1)
    neighbours = np.argsort(-cosine, axis=1)[:, :k]
    pairs = {(min(i, j), max(i, j)) for i in range(len(names)) for j in neighbours[i]}
    return [(names[i], names[j]) for i, j in sorted(pairs)]
