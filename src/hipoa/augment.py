"""Training augmentation: rotation, scaling and centre displacement drawn from a context patch.

The paper (section 4.2) adds samples rotated within +-0.1 rad and scaled within +-10%; for the
acetabulum (U-Net 4 of Table 2) also with the centre displaced by up to +-0.05 of the patch width.
The patch store keeps, for annotated images with manual points, a ``C x C`` context patch
(C = 176 by default) whose centre crop is the 128 x 128 network patch, sampled in the same
landmark frame. An augmented sample is resampled from that context, so it never has blank corners
as long as C is at least :func:`hipoa.geometry.required_context` (checked by :func:`check_context`).

This module holds what the augmentation is: its ranges (:class:`AugmentSettings`) and their check
against the context (:func:`check_context`), the draws of the geometric (:func:`draw_params`) and
appearance (:func:`draw_appearance`) parameters, and the appearance transform (:func:`appear`). The geometry, ``(x, y)_context = o + c + s * R(theta) @ ((u, v) - c) +
(dx, dy)``, is :func:`hipoa.geometry.augment_affine`; the samples are drawn and resampled on the
device by :mod:`hipoa.train_input` (images bilinear, masks nearest), and tests hold that to a
NumPy reference (tests/unit/augment_reference.py).

Appearance (``AugmentSettings.appearance``, a strength: 0 = off, 1 = the ranges below) makes the
models robust to what changes between DXA scanners and software versions, on the image only
(never the mask), after the geometric resampling, and only on the random samples (sample 0 of
each image and the validation samples stay as stored). Per sample, in this order (the order an
image goes through a scanner: object, pixel grid and point spread, detector, display):

===========  ===================================================  ==================================
component    what                                                 range at strength s (uniform)
===========  ===================================================  ==================================
contrast     signal times c (more soft tissue, harder beam:       c in [1 - 0.3 s, 1]
             less bone contrast against noise and ramp)
ramp         + a * (u cos phi + v sin phi), u, v in [-1, 1]:      a in [0, 0.5 s] z, phi in [0, 2 pi)
             smooth soft-tissue thickness change across the patch
grid         area down-sampling to pixels f times as wide, grid   f in [1, 1 + 0.25 s], p in [0, 1)
             phase p, then linear up-sampling: 0.30 mm instead
             of 0.25 mm source pixels is f = 1.2
psf          b > 0: Gaussian blur of sigma b px; b < 0: unsharp   b in [-0.5 s, 1.0 s]
             mask (separable, sigma 1 px) of amount -b
noise        a white noise field w of std n (the detector's):     n in [0, 0.2 s] z, t in [0, 1]
             sqrt(t) n w added before grid and psf, which
             texture it, sqrt(1 - t) n w after (texture t)
banding      + per-row offsets of std r (line-by-line scanning)   r in [0, 0.1 s] z
tone         min-max to [0, 1], then u + k u (1 - u): the         k in [-0.35 s, 0.35 s]
             display LUT's gamma (k 0.35 moves mid-grey as
             gamma 1 / 1.3 does, -0.35 as gamma 1.3)
===========  ===================================================  ==================================

then the patch is z-scored again (zero mean, unit std), the stored normalisation. ``z`` is the
unit of the stored patch (one patch standard deviation). The scalar parameters are drawn on the
host (:func:`draw_appearance`, keyed by seed, epoch and sample); the noise fields come from
a stateless TensorFlow random op keyed by integers drawn with them, so a seed repeats its
batches. The transform itself is :func:`appear` (TensorFlow ops, run in the training input graph
of :mod:`hipoa.train_input`); the geometric transforms are drawn by :func:`draw_params`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hipoa.geometry import required_context
from hipoa.sites import PATCH_SIZE

if TYPE_CHECKING:
    import tensorflow as tf


@dataclass(frozen=True)
class AugmentSettings:
    """Ranges of the random transforms (all symmetric around the identity).

    Attributes:
        rotation: Maximum absolute rotation in radians (paper: 0.1).
        scale: Maximum relative scaling; the factor is drawn in ``[1 - scale, 1 + scale]`` (paper: 0.1).
        displacement: Maximum centre shift per axis as a fraction of the patch width
            (paper, U-Net 4: 0.05, about +-6 px).
        appearance: Strength of the appearance augmentation (module docstring): 0 = off (the
            samples are exactly the geometric ones), 1 = the documented ranges, at most
            :data:`MAX_APPEARANCE`.

    Every range is given: the defaults are the training settings' (:class:`hipoa.train_settings.TrainSettings`,
    whose :meth:`~hipoa.train_settings.TrainSettings.augment` makes this object).
    """

    rotation: float
    scale: float
    displacement: float
    appearance: float

    def __post_init__(self) -> None:
        for name in ("rotation", "scale", "displacement", "appearance"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"augmentation {name} must be a finite number >= 0, got {value}")
        if self.scale >= 1:
            raise ValueError(f"augmentation scale must be < 1, got {self.scale}")
        if self.appearance > MAX_APPEARANCE:
            raise ValueError(f"augmentation appearance must be <= {MAX_APPEARANCE}, got {self.appearance}")


MAX_APPEARANCE = 2.5
"""Largest appearance strength: the tone curve stays monotonic (``|k| = 0.35 s <= 1``) and the
contrast factor positive."""

APPEARANCE_FIELDS = ("contrast", "ramp", "ramp_angle", "grid", "grid_phase", "psf", "noise", "noise_texture",
                     "banding", "tone")
"""Columns of :func:`draw_appearance`'s table, in the order the transform applies them."""

NEUTRAL_APPEARANCE = (1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
"""The row of :data:`APPEARANCE_FIELDS` that changes nothing (up to the final z-score)."""


def draw_appearance(n: int, strength: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Appearance parameters of ``n`` samples, uniform within the ranges of the module docstring.

    Args:
        n: Samples.
        strength: ``AugmentSettings.appearance``; at 0 every component is neutral (the grid
            phase, ramp direction and noise texture are then drawn but change nothing).
        rng: The draw's generator.

    Returns:
        ``params`` ``(n, 10)`` float32 in the order of :data:`APPEARANCE_FIELDS`, and ``keys``
        ``(n,)`` int64 in ``[0, 2**31)``, the seeds of the samples' noise fields.
    """
    s = float(strength)
    columns = [
        rng.uniform(1.0 - 0.3 * s, 1.0, n),  # contrast
        rng.uniform(0.0, 0.5 * s, n),  # ramp amplitude at the patch edge, z
        rng.uniform(0.0, 2.0 * np.pi, n),  # ramp direction
        rng.uniform(1.0, 1.0 + 0.25 * s, n),  # grid coarsening factor (0.30 / 0.25 mm = 1.2)
        rng.uniform(0.0, 1.0, n),  # grid phase, fraction of a coarse pixel
        rng.uniform(-0.5 * s, 1.0 * s, n),  # psf: blur sigma (px) if > 0, sharpening amount if < 0
        rng.uniform(0.0, 0.2 * s, n),  # noise std, z
        rng.uniform(0.0, 1.0, n),  # noise texture: share of correlated noise
        rng.uniform(0.0, 0.1 * s, n),  # banding: std of the row offsets, z
        rng.uniform(-0.35 * s, 0.35 * s, n),  # tone curve: +-0.35 is about gamma 1 / 1.3 or 1.3 at mid-grey
    ]
    keys = rng.integers(0, 2**31, n, dtype=np.int64)
    return np.stack(columns, axis=1).astype(np.float32), keys


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


def draw_params(n_images: int, per_image: int, settings: AugmentSettings, rng: np.random.Generator,
                size: int = PATCH_SIZE) -> np.ndarray:
    """Transforms of ``per_image`` samples of each of ``n_images`` images; sample 0 is the identity.

    Args:
        n_images, per_image: Images and samples per image (``1 + n_augment``).
        settings: Ranges; rotation, scale and displacement are drawn uniformly within them.
        rng: The draw's generator.
        size: Patch side (the displacement is a fraction of it).

    Returns:
        ``(n_images, per_image, 4)`` float64 ``theta`` (rad), ``s``, ``dx``, ``dy`` (patch pixels).
    """
    n = n_images * per_image
    d = settings.displacement * size
    theta = rng.uniform(-settings.rotation, settings.rotation, n)
    s = rng.uniform(1.0 - settings.scale, 1.0 + settings.scale, n)
    dx = rng.uniform(-d, d, n)
    dy = rng.uniform(-d, d, n)
    params = np.stack([theta, s, dx, dy], axis=1).reshape(n_images, per_image, 4)
    params[:, 0] = (0.0, 1.0, 0.0, 0.0)
    return params


# ---- the appearance transform, as TensorFlow ops (imported when first run) ---------------------


def _smoothing(sigma: tf.Tensor, size: int) -> tf.Tensor:
    """``(n, size, size)`` Gaussian smoothing matrices of ``sigma`` px (``(n,)``), rows summing to 1.

    Rows are renormalised at the patch border (no dark rim); ``sigma`` 0 gives the identity.
    """
    import tensorflow as tf

    i = tf.range(size, dtype=tf.float32)
    d2 = tf.square(i[:, None] - i[None, :])
    g = tf.exp(-d2[None] / (2.0 * tf.square(sigma)[:, None, None] + 1e-6))
    return g / tf.reduce_sum(g, axis=2, keepdims=True)


def _regrid(factor: tf.Tensor, phase: tf.Tensor, size: int) -> tf.Tensor:
    """``(n, size, size)`` matrices of a down-and-up resampling through a grid ``factor`` x coarser.

    Coarse pixel ``k`` is centred at ``(k - 1 + phase) * factor`` on the patch grid and, as a
    detector pixel ``factor`` patch pixels wide, averages what it covers (area weights, each patch
    pixel a unit square); the patch is then linearly interpolated back from the coarse pixels.
    ``factor`` 1 with ``phase`` 0 is the identity.
    """
    import tensorflow as tf

    k = tf.range(size + 2, dtype=tf.float32)  # factor >= 1: (size + 1) * factor reaches past the patch
    f = factor[:, None, None]
    centres = ((k[None, :] - 1.0 + phase[:, None]) * factor[:, None])[:, None, :]  # (n, 1, K)
    i = tf.range(size, dtype=tf.float32)[None, :, None]  # (1, size, 1)
    area = tf.maximum(0.0, tf.minimum(i + 0.5, centres + f / 2) - tf.maximum(i - 0.5, centres - f / 2))
    down = area / tf.maximum(tf.reduce_sum(area, axis=1, keepdims=True), 1e-6)  # (n, size, K): D[k, i]
    tent = tf.maximum(0.0, 1.0 - tf.abs(i - centres) / f)
    up = tent / tf.maximum(tf.reduce_sum(tent, axis=2, keepdims=True), 1e-6)  # (n, size, K): U[i, k]
    return tf.matmul(up, down, transpose_b=True)


def _zscore(x: tf.Tensor) -> tf.Tensor:
    """Per-patch ``(x - mean) / max(std, 1e-6)`` over the last two axes (the store's normalisation)."""
    import tensorflow as tf

    mean = tf.reduce_mean(x, axis=(-2, -1), keepdims=True)
    std = tf.sqrt(tf.reduce_mean(tf.square(x - mean), axis=(-2, -1), keepdims=True))
    return (x - mean) / tf.maximum(std, 1e-6)


def _noise(keys: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Unit-std white noise ``(n, size, size)`` and ``(n, size, 1)`` row offsets (uniform).

    One stateless draw per batch, seeded by its first and last samples' keys: the same seed and
    batch size give the same batches. Random numbers are the largest single cost of the
    appearance augmentation on a CPU, hence uniform ones (a third of the time of normal ones) and
    one draw per batch (one per sample, ``map_fn``, took 40 times as long).
    """
    import tensorflow as tf

    n = tf.shape(keys)[0]
    seed = tf.stack([keys[0], keys[-1]])
    fields = (tf.random.stateless_uniform(tf.stack([n, size + 1, size]), seed=seed) - 0.5) * math.sqrt(12.0)
    return fields[:, :size], fields[:, size, :, None]


def appear(images: tf.Tensor, params: tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
    """The appearance augmentation (module docstring) on a batch of samples, as TensorFlow ops.

    Order: ``c * x + ramp + sqrt(t) n w``; grid, then psf (one separable linear operator ``A``,
    applied as ``A X A^T``); ``+ sqrt(1 - t) n w + banding``; the tone curve on the patch's
    min-max range; z-score (``w`` one white noise field, ``n`` its std, ``t`` the texture).

    Args:
        images: ``(n, S, S, 1)`` float32 samples (:func:`hipoa.train_input.warp`'s ``x``), rows y down.
        params: ``(n, 10)`` float32 in the order of :data:`APPEARANCE_FIELDS`
            (:func:`draw_appearance`).
        keys: ``(n,)`` int64 seeds of the samples' noise fields.

    Returns:
        ``(n, S, S, 1)`` float32, each patch with zero mean and unit std.
    """
    import tensorflow as tf

    size = int(images.shape[1])
    x = images[..., 0]
    p = tf.cast(params, tf.float32)
    contrast, ramp, angle, factor, phase, psf, noise, texture, banding, tone = (p[:, j] for j in range(10))
    t = tf.linspace(-1.0, 1.0, size)
    gradient = tf.cos(angle)[:, None, None] * t[None, None, :] + tf.sin(angle)[:, None, None] * t[None, :, None]
    white, rows = _noise(keys, size)
    # The textured share of the detector noise goes in before the grid and psf, which shape it
    # as a scanner's filtering does (blur: blotchy, sharpening: fine-grained); the rest after.
    x = contrast[:, None, None] * x + ramp[:, None, None] * gradient + (noise * tf.sqrt(texture))[:, None, None] * white
    # psf > 0: P = G(psf), a blur; psf < 0: P = I + |psf| (I - G(1 px)), an unsharp mask.
    blur = psf > 0
    smooth = _smoothing(tf.where(blur, psf, 1.0), size)
    amount = tf.where(blur, -1.0, -psf)[:, None, None]
    eye = tf.eye(size, batch_shape=[tf.shape(x)[0]])
    operator = tf.matmul(eye + amount * (eye - smooth), _regrid(factor, phase, size))
    x = tf.matmul(tf.matmul(operator, x), operator, transpose_b=True)
    x = x + (noise * tf.sqrt(1.0 - texture))[:, None, None] * white + banding[:, None, None] * rows
    lo = tf.reduce_min(x, axis=(1, 2), keepdims=True)
    hi = tf.reduce_max(x, axis=(1, 2), keepdims=True)
    unit = (x - lo) / tf.maximum(hi - lo, 1e-6)
    x = unit + tone[:, None, None] * unit * (1.0 - unit)  # tf.pow (a true gamma) was a quarter of the cost
    return _zscore(x)[..., None]
