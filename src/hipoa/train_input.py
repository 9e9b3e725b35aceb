"""Training and validation input on TensorFlow: contexts held in memory, augmentation in the graph.

A site's training contexts (the store's ``manual/{site}`` patches, ``(n, C, C)`` float16 images
and uint8 masks, C = 176 by default; about 140 MB for 1,500 images) are read once
(:func:`read_contexts`) and held as TensorFlow variables on the CPU, so the input graph refers to
them by handle instead of embedding 140 MB of constants in every dataset graph.

Each image gives ``1 + n_augment`` samples per epoch: sample 0 is the identity (exactly the
stored centre crop), the others a rotation, scaling and displacement drawn uniformly within
:class:`hipoa.augment.AugmentSettings` (the NumPy reference is tests/unit/augment_reference.py;
the geometry is :func:`hipoa.geometry.augment_affine`, whose TF twin is :func:`augment_affine_tf`).
Transforms and the sample order are drawn with stateless ops keyed by ``(seed, epoch)``, so a
run repeats exactly and each epoch differs. Samples are resampled by
``tf.raw_ops.ImageProjectiveTransformV3`` (a fused, multithreaded C++ kernel; bilinear for
images, nearest for masks), which maps each OUTPUT pixel ``(u, v)`` to the INPUT pixel
``(a0 u + a1 v + a2, b0 u + b1 v + b2)`` with integer pixel centres, as our affine does.

The pipeline batches sample ids first and then warps a whole batch per call (``map`` with
``num_parallel_calls=AUTOTUNE``): on a shared 2-core CPU, 2,000-3,600 samples per CPU-second
(benchmarks/train_input.py; the spread is other load) against 1,050 for the NumPy generator it
replaced. Images are cast to float32 before the warp:
the float16 kernel rounds its output to float16 (up to 2e-3 on z-scored values) and was slower
(2,900 samples per CPU-second).

Validation samples (:class:`ValidationInput`) are made once with a fixed seed and held in
memory as float16, so every epoch is scored on the same samples.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import tensorflow as tf

from hipoa.augment import AugmentSettings, check_context
from hipoa.sites import PATCH_SIZE

log = logging.getLogger(__name__)

_WARP_CHUNK = 256
"""Samples per warp call when the validation set is made (bounds its transient memory to ~30 MB)."""


def read_contexts(image: Any, mask: Any, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Read context patches once, in sorted row order (chunk-friendly Zarr reads).

    Args:
        image: ``(N, C, C)`` float16 Dask or NumPy array (a :class:`hipoa.store.PatchSet`'s image).
        mask: ``(N, C, C)`` uint8 array on the same grid.
        indices: Rows to read (any order; duplicates are an error).

    Returns:
        ``(n, C, C)`` float16 images and ``(n, C, C)`` uint8 0/1 masks, rows in ascending index
        order (training shuffles, and validation keeps store order, as the stream did before).

    Raises:
        ValueError: naming the count when ``indices`` repeats a row.
    """
    rows = np.sort(np.asarray(indices, dtype=np.int64))
    if np.any(np.diff(rows) == 0):
        raise ValueError(f"read_contexts: {len(rows) - len(np.unique(rows))} repeated rows in indices")
    x, y = image[rows], mask[rows]
    if hasattr(x, "compute"):
        import dask

        x, y = dask.compute(x, y)  # one parallel read of both arrays
    return np.asarray(x, dtype=np.float16), (np.asarray(y) > 0).astype(np.uint8)


def augment_affine_tf(params: tf.Tensor, context: int, size: int = PATCH_SIZE) -> tf.Tensor:
    """TF twin of :func:`hipoa.geometry.augment_affine` (tested equal to it).

    Args:
        params: ``(n, 4)`` float64 ``theta`` (rad), ``s`` (factor), ``dx``, ``dy`` (patch pixels).
        context: Side ``C`` of the context patch.
        size: Side of the output patch.

    Returns:
        ``(n, 2, 3)`` float64 affines from patch pixel ``(u, v, 1)`` to context pixel ``(x, y)``.
    """
    params = tf.reshape(tf.cast(params, tf.float64), (-1, 4))
    theta, s, dx, dy = tf.unstack(params, axis=1)
    c = (size - 1) / 2.0
    o = float((context - size) // 2)
    a, b = s * tf.cos(theta), s * tf.sin(theta)
    row0 = tf.stack([a, -b, o + c + dx - (a - b) * c], axis=1)
    row1 = tf.stack([b, a, o + c + dy - (a + b) * c], axis=1)
    return tf.stack([row0, row1], axis=1)


def projective_transforms(affine: tf.Tensor) -> tf.Tensor:
    """``(n, 8)`` float32 ``[a0, a1, a2, b0, b1, b2, 0, 0]`` for ImageProjectiveTransformV3.

    Args:
        affine: ``(n, 2, 3)`` patch -> context affines (:func:`augment_affine_tf`).
    """
    flat = tf.reshape(tf.cast(affine, tf.float32), (-1, 6))
    return tf.concat([flat, tf.zeros((tf.shape(flat)[0], 2), tf.float32)], axis=1)


def warp(images: tf.Tensor, masks: tf.Tensor, params: tf.Tensor, size: int = PATCH_SIZE) -> tuple[tf.Tensor, tf.Tensor]:
    """Resample samples from contexts: the TF counterpart of the NumPy reference in tests/unit/augment_reference.py.

    Args:
        images: ``(n, C, C)`` float16 or float32 contexts.
        masks: ``(n, C, C)`` uint8 masks on the same grid.
        params: ``(n, 4)`` transforms (see :func:`augment_affine_tf`); within
            :func:`hipoa.augment.check_context`, so every read is inside the context.
        size: Side of the output patch.

    Returns:
        ``x`` ``(n, size, size, 1)`` float32 (bilinear) and ``y`` ``(n, size, size)`` uint8 (nearest).
    """
    context = int(images.shape[-1])
    transforms = projective_transforms(augment_affine_tf(params, context, size))
    common = {"transforms": transforms, "output_shape": [size, size], "fill_value": 0.0, "fill_mode": "CONSTANT"}
    x = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32)[..., None], interpolation="BILINEAR", **common
    )
    y = tf.raw_ops.ImageProjectiveTransformV3(images=masks[..., None], interpolation="NEAREST", **common)
    return x, y[..., 0]


def draw_params(n_images: int, per_image: int, settings: AugmentSettings, seed: tf.Tensor, size: int = PATCH_SIZE) -> tf.Tensor:
    """Stateless transforms of ``n_images * per_image`` samples; sample 0 of each image is the identity.

    Args:
        n_images, per_image: Images and samples per image (``1 + n_augment``).
        settings: Ranges, drawn uniformly within the ranges.
        seed: ``(2,)`` int64 stateless seed.
        size: Patch side (the displacement is a fraction of it).

    Returns:
        ``(n_images * per_image, 4)`` float64 ``theta, s, dx, dy``; row ``i * per_image + k`` is
        sample ``k`` of image ``i``.
    """
    d = settings.displacement * size
    lo = tf.constant([-settings.rotation, 1.0 - settings.scale, -d, -d], tf.float64)
    hi = tf.constant([settings.rotation, 1.0 + settings.scale, d, d], tf.float64)
    u = tf.random.stateless_uniform((n_images * per_image, 4), seed=seed, dtype=tf.float64)
    params = lo + (hi - lo) * u
    first = tf.equal(tf.range(n_images * per_image) % per_image, 0)[:, None]
    return tf.where(first, tf.constant([[0.0, 1.0, 0.0, 0.0]], tf.float64), params)


def _resident(array: np.ndarray, name: str) -> tf.Variable:
    """``array`` as a non-trainable CPU variable: datasets capture its handle, not its 140 MB."""
    with tf.device("/CPU:0"):
        return tf.Variable(array, trainable=False, name=name)


class TrainingInput:
    """Endless batches of augmented training samples, made in the tf.data graph.

    Args:
        images: ``(n, C, C)`` float16 contexts (:func:`read_contexts`).
        masks: ``(n, C, C)`` uint8 0/1 masks.
        n_augment: Random samples per image besides the identity.
        settings: Augmentation ranges; checked against C (:func:`hipoa.augment.check_context`).
        batch_size: Samples per batch; the last batch of an epoch may be smaller.
        seed: Run seed; epoch ``e`` draws from the stateless key ``(seed, e)``.

    Attributes:
        n_samples: Samples per epoch, ``n * (1 + n_augment)``.
        steps_per_epoch: Batches per epoch, ``ceil(n_samples / batch_size)``.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, *, n_augment: int, settings: AugmentSettings,
                 batch_size: int, seed: int) -> None:
        if images.ndim != 3 or images.shape != masks.shape or images.shape[1] != images.shape[2]:
            raise ValueError(f"images and masks must both be (n, C, C), got {images.shape} and {masks.shape}")
        if len(images) == 0 or n_augment < 0 or batch_size < 1:
            raise ValueError(f"need images, n_augment >= 0, batch_size >= 1, got {len(images)}, {n_augment}, {batch_size}")
        check_context(settings, int(images.shape[1]))
        self.n_images, self.per_image = len(images), 1 + int(n_augment)
        self.settings, self.batch_size, self.seed = settings, int(batch_size), int(seed)
        self.n_samples = self.n_images * self.per_image
        self.steps_per_epoch = math.ceil(self.n_samples / self.batch_size)
        self._images = _resident(images, "train_images")
        self._masks = _resident(masks, "train_masks")

    def epoch_plan(self, epoch: tf.Tensor | int) -> tuple[tf.Tensor, tf.Tensor]:
        """The samples of one epoch, in training order.

        Returns:
            ``ids`` ``(n_samples,)`` int64, a permutation of ``image * per_image + k``, and
            ``params`` ``(n_samples, 4)`` float64, the transform of each id in that order.
        """
        key = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(epoch, tf.int64)])
        param_seed, order_seed = tf.unstack(tf.random.experimental.stateless_split(key, num=2))
        params = draw_params(self.n_images, self.per_image, self.settings, param_seed)
        ids = tf.random.experimental.stateless_shuffle(tf.range(self.n_samples, dtype=tf.int64), seed=order_seed)
        return ids, tf.gather(params, ids)

    def _batch(self, ids: tf.Tensor, params: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        rows = ids // self.per_image
        return warp(tf.gather(self._images, rows), tf.gather(self._masks, rows), params)

    def dataset(self) -> tf.data.Dataset:
        """Endless ``(x, y)``: ``x`` ``(B, 128, 128, 1)`` float32, ``y`` ``(B, 128, 128)`` uint8 0/1.

        Epoch ``e`` is exactly ``steps_per_epoch`` batches (batched before the epochs are joined).
        Pass ``steps_per_epoch`` to ``fit``: Keras then keeps one iterator for the whole run. (A
        finite dataset makes Keras create a new iterator every epoch, which would also restart
        the epoch counter and so repeat epoch 0's transforms.)
        """
        def one_epoch(epoch):
            return tf.data.Dataset.from_tensor_slices(self.epoch_plan(epoch)).batch(self.batch_size)

        ds = tf.data.Dataset.counter(dtype=tf.int64).flat_map(one_epoch)
        ds = ds.map(self._batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)


class ValidationInput:
    """Validation samples made once (same transforms every epoch) and held in memory.

    Args:
        images, masks, n_augment, settings, batch_size: As :class:`TrainingInput`.
        seed: Fixed seed of the validation transforms (``hipoa.train.VAL_AUGMENT_SEED``).

    Attributes:
        x: ``(n_samples, 128, 128)`` float16 samples, image order, ``1 + n_augment`` per image
            (sample 0 of each image is its centre crop).
        y: ``(n_samples, 128, 128)`` uint8 0/1 masks.
        n_samples, steps_per_epoch: As :class:`TrainingInput`.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, *, n_augment: int, settings: AugmentSettings,
                 batch_size: int, seed: int) -> None:
        plan = TrainingInput(images, masks, n_augment=n_augment, settings=settings, batch_size=batch_size, seed=seed)
        self.n_samples, self.steps_per_epoch, self.batch_size = plan.n_samples, plan.steps_per_epoch, plan.batch_size
        params = draw_params(plan.n_images, plan.per_image, settings, tf.constant([seed, 0], tf.int64))
        ids = tf.data.Dataset.from_tensor_slices((tf.range(self.n_samples, dtype=tf.int64), params))
        xs, ys = [], []
        for x, y in ids.batch(_WARP_CHUNK).map(plan._batch, num_parallel_calls=tf.data.AUTOTUNE):
            xs.append(tf.cast(x[..., 0], tf.float16).numpy())
            ys.append(y.numpy())
        self.x, self.y = np.concatenate(xs), np.concatenate(ys)
        del plan  # its copy of the training-sized contexts is no longer needed
        self._x, self._y = _resident(self.x, "val_x"), _resident(self.y, "val_y")

    def dataset(self) -> tf.data.Dataset:
        """Endless passes over the same ``steps_per_epoch`` batches (``validation_steps`` in ``fit``)."""
        def batch(ids):
            return tf.cast(tf.gather(self._x, ids), tf.float32)[..., None], tf.gather(self._y, ids)

        ds = tf.data.Dataset.range(self.n_samples).batch(self.batch_size).repeat()
        return ds.map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)
