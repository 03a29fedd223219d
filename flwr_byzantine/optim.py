"""Projected SGD step of Algorithm 1 (pure numpy, no Flower)."""

from __future__ import annotations

import numpy as np


def project_l2_ball(x: np.ndarray, radius: float, center: np.ndarray | None = None) -> np.ndarray:
    """Euclidean projection ``Proj_C(x)`` on the l2 ball ``C = {z : ||z - center|| <= radius}``.

    Algorithm 1, line "x_{t+1} = Proj_C(x_t - eta g_hat)" with C a closed l2 ball.
    ``radius <= 0`` or ``inf`` means ``C = R^d`` (no projection).
    """
    if radius <= 0 or not np.isfinite(radius):
        return x
    c = np.zeros_like(x) if center is None else center
    diff = x - c
    norm = float(np.linalg.norm(diff))
    if norm <= radius:
        return x
    return c + diff * (radius / norm)

