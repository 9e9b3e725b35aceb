"""Training augmentation: rotation, scaling and centre displacement drawn from a context patch.

The paper (section 4.2) adds samples rotated within +-0.1 rad and scaled within +-10%; for the
acetabulum (U-Net 4 of Table 2) also with the centre displaced by up to +-0.05 of the patch width.
The patch store keeps, for annotated images with manual points, a ``C x C`` context patch
(C = 176 by default) whose centre crop is the 128 x 128 network patch, sampled in the same
landmark frame. An augmented sample is resampled from that context, so it never has blank corners
as long as C is at least :func:`hipoa.geometry.required_context` (checked by :func:`check_context`).

This module holds the ranges (:class:`AugmentSettings`) and their check against the context
(:func:`check_context`). The geometry, ``(x, y)_context = o + c + s * R(theta) @ ((u, v) - c) +
(dx, dy)``, is :func:`hipoa.geometry.augment_affine`; the samples are drawn and resampled on the
device by :mod:`hipoa.train_input` (images bilinear, masks nearest), and tests hold that to a
NumPy reference (tests/unit/augment_reference.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hipoa.geometry import required_context
from hipoa.sites import PATCH_SIZE


@dataclass(frozen=True)
class AugmentSettings:
    """Ranges of the random transforms (all symmetric around the identity).

    Attributes:
        rotation: Maximum absolute rotation in radians (paper: 0.1).
        scale: Maximum relative scaling; the factor is drawn in ``[1 - scale, 1 + scale]`` (paper: 0.1).
        displacement: Maximum centre shift per axis as a fraction of the patch width
            (paper, U-Net 4: 0.05, about +-6 px).
    """

    rotation: float = 0.1
    scale: float = 0.1
    displacement: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rotation", "scale", "displacement"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"augmentation {name} must be a finite number >= 0, got {value}")
        if self.scale >= 1:
            raise ValueError(f"augmentation scale must be < 1, got {self.scale}")


def check_context(settings: AugmentSettings, context: int, size: int = PATCH_SIZE) -> None:
    """Raise ``ValueError`` if ``settings`` can read outside a ``context`` x ``context`` patch.

    The reach itself is :func:`hipoa.geometry.required_context`, the same one the crop records in
    the store's ``augmentation`` attrs.
    """
    need = required_context(settings.rotation, settings.scale, settings.displacement, size)
    if context < need:
        raise ValueError(
            f"augmentation {settings} needs a context patch of at least {need} px, the store has {context} px; "
            f"crop with a larger --context or reduce rotation/scale/displacement"
        )
