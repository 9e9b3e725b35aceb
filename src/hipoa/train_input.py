"""Training and validation input on TensorFlow: contexts held in memory, augmentation in the graph.

A site's training contexts (the store's ``manual/{site}`` patches, ``(n, C, C)`` float16 images
and uint8 masks, C = 176 by default; about 140 MB for 1,500 images) are read once
(:func:`read_contexts`) and held as TensorFlow variables on the CPU, so the input graph refers to
them by handle instead of embedding 140 MB of constants in every dataset graph.

Each image gives ``1 + n_augment`` samples per epoch: sample 0 is the identity (exactly the
stored centre crop), the others a rotation, scaling and displacement drawn uniformly within
:class:`hipoa.augment.AugmentSettings` (the NumPy reference is tests/unit/augment_reference.py;
the geometry is :func:`hipoa.geometry.augment_affine`, whose TF twin is :func:`augment_affine_tf`).
Which image and which transform each sample of an epoch gets, and their order, is a small table
(about 40 bytes a sample) that a pure function of ``(seed, epoch)`` draws on the host
(:func:`epoch_plan`), so a run repeats exactly, each epoch differs, and the draws are the ones the
previous streaming reader made. Only ids and transforms cross from Python into the graph; the
pixels never do. Samples are resampled by
``tf.raw_ops.ImageProjectiveTransformV3`` (a fused, multithreaded C++ kernel; bilinear for
images, nearest for masks), which maps each OUTPUT pixel ``(u, v)`` to the INPUT pixel
``(a0 u + a1 v + a2, b0 u + b1 v + b2)`` with integer pixel centres, as our affine does.

The pipeline feeds batches of sample ids and then warps a whole batch per call (``map`` with
``num_parallel_calls=AUTOTUNE``): on a shared 2-core CPU, 2,000-3,600 samples per CPU-second
(benchmarks/train_input.py; the spread is other load) against 1,050 for the NumPy generator it
replaced. Images are cast to float32 before the warp:
the float16 kernel rounds its output to float16 (up to 2e-3 on z-scored values) and was slower
(2,900 samples per CPU-second).

Validation samples (:class:`ValidationInput`) are made once with a fixed seed and held in
memory (float32, as the network sees them), so every epoch is scored on the same samples.
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


STREAM_GROUP = 16
"""Images that stay together when an epoch is shuffled (see :func:`epoch_plan`)."""
STREAM_BLOCK = 1024
"""About this many samples are shuffled together (see :func:`epoch_plan`)."""


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


def epoch_plan(n_images: int, per_image: int, settings: AugmentSettings, seed: int, epoch: int,
               fixed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The samples of one epoch, in training order: which image, which transform.

    A pure function of ``(seed, epoch)`` (NumPy's generator seeded with the pair; nothing carries
    over from one epoch to the next), so a run repeats exactly and any epoch can be made alone.
    The order is the one hipoa's streaming reader used, so models trained from the same split
    and seed are the same as before up to the float rounding of the resampling: groups of
    :data:`STREAM_GROUP` images in random order, cut into blocks of about
    :data:`STREAM_BLOCK` samples; each block draws its images' transforms, then its samples are
    shuffled. With ``fixed`` (validation) the transforms are given and the order is image order.

    Args:
        n_images, per_image, settings: As :func:`draw_params`.
        seed, epoch: The key of the epoch's draw.
        fixed: ``(n_images, per_image, 4)`` transforms to use instead of drawing (no shuffle).

    Returns:
        ``ids`` ``(n_images * per_image,)`` int64, ``image * per_image + k`` for sample ``k`` of
        an image, and ``params`` ``(n_images * per_image, 4)`` float64, the transform of each.
    """
    rng = np.random.default_rng([seed, epoch])
    groups = [np.arange(i, min(i + STREAM_GROUP, n_images)) for i in range(0, n_images, STREAM_GROUP)]
    if fixed is None:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    per_block = max(1, STREAM_BLOCK // (per_image * STREAM_GROUP))
    ids, params = [], []
    for b in range(0, len(groups), per_block):
        pos = np.sort(np.concatenate(groups[b : b + per_block]))
        block = fixed[pos] if fixed is not None else draw_params(len(pos), per_image, settings, rng)
        block_ids = (pos[:, None] * per_image + np.arange(per_image)[None, :]).reshape(-1)
        block = block.reshape(-1, 4)
        if fixed is None:
            order = rng.permutation(len(block_ids))
            block_ids, block = block_ids[order], block[order]
        ids.append(block_ids)
        params.append(block)
    return np.concatenate(ids).astype(np.int64), np.concatenate(params)


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
        seed: Run seed; epoch ``e`` is :func:`epoch_plan` of ``(seed, e)``.
        epochs: Epochs planned; the dataset starts again at epoch 0 after them.

    Attributes:
        n_samples: Samples per epoch, ``n * (1 + n_augment)``.
        steps_per_epoch: Batches per epoch, ``ceil(n_samples / batch_size)``.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, *, n_augment: int, settings: AugmentSettings,
                 batch_size: int, seed: int, epochs: int) -> None:
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if images.ndim != 3 or images.shape != masks.shape or images.shape[1] != images.shape[2]:
            raise ValueError(f"images and masks must both be (n, C, C), got {images.shape} and {masks.shape}")
        if len(images) == 0 or n_augment < 0 or batch_size < 1:
            raise ValueError(f"need images, n_augment >= 0, batch_size >= 1, got {len(images)}, {n_augment}, {batch_size}")
        check_context(settings, int(images.shape[1]))
        self.n_images, self.per_image = len(images), 1 + int(n_augment)
        self.settings, self.batch_size, self.seed = settings, int(batch_size), int(seed)
        self.n_samples = self.n_images * self.per_image
        self.steps_per_epoch = math.ceil(self.n_samples / self.batch_size)
        self.epochs = int(epochs)
        self._images = _resident(images, "train_images")
        self._masks = _resident(masks, "train_masks")
        # Every epoch's plan up front (about 40 bytes a sample and epoch): the input graph then
        # runs without Python, and a rerun with the same seed makes the same batches.
        plans = [self.epoch_plan(e) for e in range(self.epochs)]
        self._ids = _resident(np.stack([ids for ids, _ in plans]), "train_ids")
        self._params = _resident(np.stack([params for _, params in plans]), "train_params")

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch ``epoch``'s ``(ids, params)`` in training order (:func:`epoch_plan`)."""
        return epoch_plan(self.n_images, self.per_image, self.settings, self.seed, int(epoch))

    def _batch(self, ids: tf.Tensor, params: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        rows = ids // self.per_image
        return warp(tf.gather(self._images, rows), tf.gather(self._masks, rows), params)

    def dataset(self) -> tf.data.Dataset:
        """Endless ``(x, y)``: ``x`` ``(B, 128, 128, 1)`` float32, ``y`` ``(B, 128, 128)`` uint8 0/1.

        Epoch ``e`` is exactly ``steps_per_epoch`` batches (batched before the epochs are joined);
        after ``epochs`` epochs the plans start again. Pass ``steps_per_epoch`` to ``fit``: Keras
        then keeps one iterator for the whole run. (A finite dataset makes Keras create a new
        iterator every epoch, which would repeat epoch 0's transforms.)
        """
        def one_epoch(epoch):
            return tf.data.Dataset.from_tensor_slices((self._ids[epoch], self._params[epoch])).batch(self.batch_size)

        ds = tf.data.Dataset.range(self.epochs).repeat().flat_map(one_epoch)
        ds = ds.map(self._batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)


class ValidationInput:
    """Validation samples made once (same transforms every epoch) and held in memory.

    Args:
        images, masks, n_augment, settings, batch_size: As :class:`TrainingInput`.
        seed: Fixed seed of the validation transforms (``hipoa.train.VAL_AUGMENT_SEED``).

    Attributes:
        x: ``(n_samples, 128, 128)`` float32 samples, image order, ``1 + n_augment`` per image
            (sample 0 of each image is its centre crop).
        y: ``(n_samples, 128, 128)`` uint8 0/1 masks.
        n_samples, steps_per_epoch: As :class:`TrainingInput`.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, *, n_augment: int, settings: AugmentSettings,
                 batch_size: int, seed: int) -> None:
        plan = TrainingInput(images, masks, n_augment=n_augment, settings=settings, batch_size=batch_size, seed=seed,
                             epochs=1)
        self.n_samples, self.steps_per_epoch, self.batch_size = plan.n_samples, plan.steps_per_epoch, plan.batch_size
        fixed = draw_params(plan.n_images, plan.per_image, settings, np.random.default_rng(seed))
        ids, params = epoch_plan(plan.n_images, plan.per_image, settings, seed, 0, fixed=fixed)
        xs, ys = [], []
        plans = tf.data.Dataset.from_tensor_slices((ids, params)).batch(_WARP_CHUNK)
        for x, y in plans.map(plan._batch, num_parallel_calls=tf.data.AUTOTUNE):
            xs.append(x[..., 0].numpy())
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
