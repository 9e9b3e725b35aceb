"""A small synthetic hip scene shared by the geometry and patch tests: four points and a smooth image."""

from __future__ import annotations

import numpy as np


def hip_points(scale: float = 1.0) -> np.ndarray:
    """Four points: reference pair 0-1 (~200 px apart), site centres 2 and 3."""
    return np.array([[60.0, 80.0], [250.0, 150.0], [170.3, 140.6], [120.7, 100.2]]) * scale


def smooth_image(rows: int, cols: int, spacing: tuple[float, float]) -> np.ndarray:
    """A smooth pattern defined in mm: pixel centre (x, y) -> X = x*dx, Y = y*dy."""
    dy, dx = spacing
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    X, Y = x * dx, y * dy
    img = (
        100 * np.exp(-((X - 42.0) ** 2 + (Y - 35.0) ** 2) / (2 * 6.0**2))
        + 60 * np.exp(-((X - 30.0) ** 2 + (Y - 25.0) ** 2) / (2 * 9.0**2))
        + 20 * np.sin(X / 3.0) * np.cos(Y / 4.0)
    )
    return img.astype(np.float32)
