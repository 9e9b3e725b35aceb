"""Training augmentation: rotation, scaling and centre displacement drawn from a context patch.

The paper (section 4.2) adds samples rotated within +-0.1 rad and scaled within +-10%; for the
acetabulum (U-Net 4 of Table 2) also with the centre displaced by up to +-0.05 of the patch width.
The patch store keeps, for annotated images with manual points, a ``C x C`` context patch
(C = 176 by default) whose centre crop is the 128 x 128 network patch, sampled in the same
landmark frame. An augmented sample is resampled from that context, so it never has blank corners
as long as :func:`required_context` <= C (checked by :func:`check_context`).

Geometry, with patch pixel ``(u, v)`` = (column, row), ``c = (size - 1) / 2`` the patch centre and
``o = (C - size) // 2`` the offset of the centre crop in the context::

    (x, y)_context = o + c + s * R(theta) @ ((u, v) - c) + (dx, dy)

so ``s`` > 1 shows a larger area (content shrinks), ``theta`` > 0 rotates the sampling grid
counter-clockwise in (x right, y down) coordinates, and ``(dx, dy)`` moves the centre by that many
pixels. With ``theta = 0, s = 1, d = 0`` the sample is exactly the centre crop. Images are
interpolated bilinearly, masks by nearest neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def draw_params(n: int, settings: AugmentSettings, rng: np.random.Generator, size: int = PATCH_SIZE) -> np.ndarray:
    """Draw ``n`` random transforms, uniformly within the settings' ranges.

    Returns:
        ``(n, 4)`` float64: ``theta`` (rad), ``s`` (factor), ``dx``, ``dy`` (patch pixels).
    """
    theta = rng.uniform(-settings.rotation, settings.rotation, n)
    s = rng.uniform(1.0 - settings.scale, 1.0 + settings.scale, n)
    d = settings.displacement * size
    dx = rng.uniform(-d, d, n)
    dy = rng.uniform(-d, d, n)
    return np.stack([theta, s, dx, dy], axis=1)


def identity_params(n: int) -> np.ndarray:
    """``(n, 4)`` parameters of the identity transform (the centre crop)."""
    p = np.zeros((n, 4))
    p[:, 1] = 1.0
    return p


def _coordinates(params: np.ndarray, context: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``x``, ``y``: ``(n, size, size)`` float32 context coordinates, indexed ``[v, u]``."""
    params = np.asarray(params, dtype=np.float64).reshape(-1, 4)
    c = (size - 1) / 2.0
    o = (context - size) // 2
    d = (np.arange(size, dtype=np.float32) - np.float32(c))[None, :]
    theta, s, dx, dy = params.T
    a = (s * np.cos(theta)).astype(np.float32)[:, None, None]
    b = (s * np.sin(theta)).astype(np.float32)[:, None, None]
    x0 = (o + c + dx).astype(np.float32)[:, None, None]
    y0 = (o + c + dy).astype(np.float32)[:, None, None]
    du, dv = d[None, :, :], d.T[None, :, :]  # (1, 1, size) columns, (1, size, 1) rows
    x = x0 + a * du - b * dv
    y = y0 + b * du + a * dv
    return x, y


def sample_coordinates(params: np.ndarray, context: int, size: int = PATCH_SIZE) -> np.ndarray:
    """Context-pixel coordinates that each patch pixel is read from.

    Args:
        params: ``(n, 4)`` transforms from :func:`draw_params`.
        context: Side ``C`` of the context patch.
        size: Side of the output patch.

    Returns:
        ``(n, 2, size, size)`` float32: x (column) and y (row) in context pixels, indexed ``[v, u]``.
    """
    x, y = _coordinates(params, context, size)
    return np.stack([x, y], axis=1)


def required_context(settings: AugmentSettings, size: int = PATCH_SIZE) -> int:
    """Smallest context side ``C`` that every transform within ``settings`` stays inside.

    The farthest sample is a patch corner rotated by the largest angle, scaled by ``1 + scale``
    and displaced by the largest shift; bilinear interpolation needs one more pixel.
    """
    c = (size - 1) / 2.0
    theta = min(settings.rotation, np.pi / 4)  # |cos|+|sin| is largest at 45 degrees
    reach = (1.0 + settings.scale) * c * (abs(np.cos(theta)) + abs(np.sin(theta))) + settings.displacement * size
    # Coordinates run from (C-1)/2 - reach to (C-1)/2 + reach (the centre is exact when C - size is
    # even); keep them within [0, C - 1]; +1 covers an odd C - size.
    return int(np.ceil(2 * reach + 1)) + 1


def check_context(settings: AugmentSettings, context: int, size: int = PATCH_SIZE) -> None:
    """Raise ``ValueError`` if ``settings`` can read outside a ``context`` x ``context`` patch."""
    need = required_context(settings, size)
    if context < need:
        raise ValueError(
            f"augmentation {settings} needs a context patch of at least {need} px, the store has {context} px; "
            f"crop with a larger --context or reduce rotation/scale/displacement"
        )


def augment(
    images: np.ndarray,
    masks: np.ndarray,
    params: np.ndarray,
    size: int = PATCH_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample patches from context patches.

    Args:
        images: ``(n, C, C)`` float (float16 from the store is fine), normalised image context.
        masks: ``(n, C, C)`` uint8 masks on the same grid.
        params: ``(n, 4)`` transforms (:func:`draw_params`, :func:`identity_params`).
        size: Side of the output patch.

    Returns:
        ``(n, size, size)`` float32 images (bilinear) and ``(n, size, size)`` uint8 masks (nearest).

    Raises:
        ValueError: naming the shapes when they disagree, or when a transform reads outside the
            context (which would leave a blank corner).
    """
    images = np.asarray(images)
    masks = np.asarray(masks)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be (n, C, C), got {images.shape}")
    if masks.shape != images.shape:
        raise ValueError(f"masks shape {masks.shape} differs from images shape {images.shape}")
    n, context = images.shape[0], images.shape[1]
    params = np.asarray(params, dtype=np.float64).reshape(-1, 4)
    if params.shape[0] != n:
        raise ValueError(f"got {params.shape[0]} transforms for {n} images")
    x, y = _coordinates(params, context, size)
    lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
    if lo < 0 or hi > context - 1:
        raise ValueError(
            f"transform reads outside the {context} px context (coordinates {lo:.2f}..{hi:.2f}); "
            f"see hipoa.augment.check_context"
        )
    base = (np.arange(n, dtype=np.intp) * (context * context))[:, None, None]

    # Bilinear: x0 <= C - 2 so x0 + 1 is valid; at x = C - 1 the weight fx is then exactly 1.
    xf = np.minimum(np.floor(x), context - 2)
    yf = np.minimum(np.floor(y), context - 2)
    fx = x - xf
    fy = y - yf
    flat = base + yf.astype(np.intp) * context + xf.astype(np.intp)
    img = images.astype(np.float32, copy=False).reshape(-1)
    top = img.take(flat)
    top += (img.take(flat + 1) - top) * fx
    bottom = img.take(flat + context)
    bottom += (img.take(flat + context + 1) - bottom) * fx
    out_img = top + (bottom - top) * fy

    nearest = base + np.rint(y).astype(np.intp) * context + np.rint(x).astype(np.intp)
    out_mask = masks.reshape(-1).take(nearest).astype(np.uint8, copy=False)
    return out_img.astype(np.float32, copy=False), out_mask
