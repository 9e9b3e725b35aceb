"""The NumPy reference of the training augmentation, for tests only.

:mod:`hipoa.train_input` resamples training samples with TensorFlow ops; these functions do the
same in NumPy on the library's geometry (:func:`hipoa.geometry.augment_coefficients`,
:func:`hipoa.geometry.augment_coordinates`, :func:`hipoa.geometry.sample_grid`), so that
tests/unit/test_train_input.py can hold the TensorFlow version to them, bit for bit.
"""

from __future__ import annotations

import numpy as np

from hipoa.augment import AugmentSettings
from hipoa.geometry import augment_coefficients, augment_coordinates, sample_grid
from hipoa.sites import PATCH_SIZE


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
    x, y = augment_coordinates(augment_coefficients(params, context, size), size)
    out_img = sample_grid(images, x, y, order=1)  # raises on a read outside the context
    out_mask = sample_grid(masks, x, y, order=0).astype(np.uint8, copy=False)
    return out_img, out_mask


def stream_reference(images, masks, *, n_augment: int, settings: AugmentSettings, batch_size: int, seed: int,
                     epoch: int, fixed: bool = False, group: int = 16, block_samples: int = 1024):
    """One epoch of batches as hipoa 0.x's ``SampleStream`` made them (its ``__call__``, minus the I/O).

    Images are read in groups of ``group`` (shuffled unless ``fixed``), ``block_samples`` at a
    time; each block draws its transforms and shuffles its samples; batches are cut from the
    blocks' concatenation. ``fixed``: the transforms are drawn once from ``default_rng(seed)``
    and the order is image order (validation). :mod:`hipoa.train_input` must repeat these batches.

    Yields:
        ``(x (B, 128, 128, 1) float32, y (B, 128, 128) uint8)``.
    """
    per_image = 1 + n_augment
    n = len(images)

    def params_of(n_images, rng):
        p = draw_params(n_images * per_image, settings, rng).reshape(n_images, per_image, 4)
        p[:, 0] = identity_params(n_images)
        return p

    fixed_params = params_of(n, np.random.default_rng(seed)) if fixed else None
    rng = np.random.default_rng([seed, epoch])
    groups = [np.arange(i, min(i + group, n)) for i in range(0, n, group)]
    if not fixed:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    per_block = max(1, block_samples // (per_image * group))
    left_x = np.zeros((0, PATCH_SIZE, PATCH_SIZE), np.float32)
    left_y = np.zeros((0, PATCH_SIZE, PATCH_SIZE), np.uint8)
    for b in range(0, len(groups), per_block):
        pos = np.sort(np.concatenate(groups[b : b + per_block]))
        params = fixed_params[pos] if fixed else params_of(len(pos), rng)
        reps = np.repeat(np.arange(len(pos)), per_image)
        x, y = augment(images[pos][reps], masks[pos][reps], params.reshape(-1, 4))
        y = (y > 0).astype(np.uint8)
        if not fixed:
            order = rng.permutation(len(x))
            x, y = x[order], y[order]
        x, y = np.concatenate([left_x, x]), np.concatenate([left_y, y])
        full = len(x) // batch_size * batch_size
        for i in range(0, full, batch_size):
            yield x[i : i + batch_size, ..., None], y[i : i + batch_size]
        left_x, left_y = x[full:], y[full:]
    if len(left_x):
        yield left_x[..., None], left_y
