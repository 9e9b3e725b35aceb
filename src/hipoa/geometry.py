"""Patch geometry: the one place that maps patch pixels to image (or context) pixels.

(Being filled in: the landmark affine, inside tests, sampling, augmentation reach and pasting
masks back move here from ``hipoa.patches``, ``hipoa.augment`` and ``hipoa.phenotypes``.)

Augmentation affine
-------------------
A training sample is resampled from a ``C x C`` context patch whose centre crop is the 128 patch.
With patch pixel ``(u, v)`` = (column, row), ``c = (size - 1) / 2`` and ``o = (C - size) // 2``::

    (x, y)_context = o + c + s * R(theta) @ ((u, v) - c) + (dx, dy)

so ``s`` > 1 shows a larger area (content shrinks), ``theta`` > 0 rotates the sampling grid
counter-clockwise in (x right, y down) coordinates, and ``(dx, dy)`` moves the centre by that many
pixels. ``theta = 0, s = 1, d = 0`` is exactly the centre crop.
"""

from __future__ import annotations

import numpy as np

from hipoa.sites import PATCH_SIZE


def augment_affine(params: np.ndarray, context: int, size: int = PATCH_SIZE) -> np.ndarray:
    """The patch -> context affines of augmentation transforms.

    Args:
        params: ``(n, 4)`` transforms ``theta`` (rad), ``s`` (factor), ``dx``, ``dy`` (patch
            pixels), as :func:`hipoa.augment.draw_params` draws them.
        context: Side ``C`` of the context patch.
        size: Side of the output patch.

    Returns:
        ``(n, 2, 3)`` float64 affines from patch pixel ``(u, v, 1)`` to context pixel ``(x, y)``.
    """
    params = np.asarray(params, dtype=np.float64).reshape(-1, 4)
    theta, s, dx, dy = params.T
    c = (size - 1) / 2.0
    o = (context - size) // 2
    a, b = s * np.cos(theta), s * np.sin(theta)
    out = np.empty((len(params), 2, 3))
    out[:, 0, 0], out[:, 0, 1], out[:, 0, 2] = a, -b, o + c + dx - (a - b) * c
    out[:, 1, 0], out[:, 1, 1], out[:, 1, 2] = b, a, o + c + dy - (a + b) * c
    return out
