"""Training and validation input on TensorFlow: contexts held in memory, augmentation in the graph.

A site's training contexts (the store's ``manual/{site}`` patches, ``(n, C, C)`` float16 images
and uint8 masks, C = 176 by default; about 140 MB for 1,500 images) are read once
(:func:`read_contexts`) and held as TensorFlow variables on the CPU, so the input graph refers to
them by handle instead of embedding 140 MB of constants in every dataset graph.

Each image gives ``1 + n_augment`` samples per epoch: sample 0 is the identity (exactly the
stored centre crop), the others a rotation, scaling and displacement drawn uniformly within
:class:`hipoa.augment.AugmentSettings`. Which image and which transform each sample of an epoch
gets, and their order, is a small table (about 20 bytes a sample) that a pure function of
``(seed, epoch)`` draws on the host (:func:`epoch_plan`) for every epoch up front: a run repeats
exactly, each epoch differs, and the draws are those of the streaming reader this module
replaced. Only that table enters the input graph; no pixel passes through Python.

The resampling (:func:`warp`) runs in the tf.data graph, a whole batch per call (``map`` with
``num_parallel_calls=AUTOTUNE``), on the geometry of :func:`hipoa.geometry.augment_coefficients`:
bilinear for images, nearest for masks, with the same float32 operations in the same order as the
NumPy reference (tests/unit/augment_reference.py), so the samples are equal to it bit for bit and
a seed trains the same model as before. (``tf.raw_ops.ImageProjectiveTransformV3`` is about 1.5x
faster on a CPU but rounds differently, which changed the trained demo models.)

With ``AugmentSettings.appearance`` above 0, the random samples (never sample 0 of an image, never
the masks) then go through the appearance augmentation of :mod:`hipoa.augment` (:func:`hipoa.augment.appear`:
contrast, soft-tissue ramp, coarser pixel grid, blur or sharpening, noise, banding, tone curve,
then a fresh z-score). Its per-sample parameters are drawn on the host for every epoch up front
too (:func:`appearance_plan`, a stream of their own: the geometric draws do not change), and at 0
the input graph is exactly the geometric one.

Validation samples (:class:`ValidationInput`) are made once with a fixed seed and held in
memory (float32, as the network sees them), so every epoch is scored on the same samples.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import tensorflow as tf

from hipoa.augment import NEUTRAL_APPEARANCE, AugmentSettings, appear, check_context, draw_appearance, draw_params
from hipoa.geometry import augment_coefficients
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


def warp(images: tf.Tensor, masks: tf.Tensor, coefficients: tf.Tensor, rows: tf.Tensor | None = None,
         size: int = PATCH_SIZE) -> tuple[tf.Tensor, tf.Tensor]:
    """Resample samples from contexts: images bilinear, masks nearest, as TensorFlow ops.

    The same operations, in the same order and precision, as the NumPy reference
    (:func:`hipoa.geometry.augment_coordinates` then :func:`hipoa.geometry.sample_grid`), so the
    samples are equal bit for bit (tests/unit/test_train_input.py), on any device.

    Args:
        images: ``(N, C, C)`` float16 or float32 contexts (all of them: ``rows`` picks).
        masks: ``(N, C, C)`` uint8 masks on the same grid.
        coefficients: ``(n, 4)`` float32 ``a, b, xc, yc`` (:func:`hipoa.geometry.augment_coefficients`),
            within :func:`hipoa.augment.check_context`, so every read is inside the context.
        rows: ``(n,)`` the context of each sample (default: sample ``i`` from context ``i``).
            Pixels are gathered straight from ``images``: no copy of the batch's contexts.
        size: Side of the output patch.

    Returns:
        ``x`` ``(n, size, size, 1)`` float32 (bilinear) and ``y`` ``(n, size, size)`` uint8 (nearest).
    """
    context = int(images.shape[-1])
    k = tf.cast(coefficients, tf.float32)
    rows = tf.range(tf.shape(k)[0]) if rows is None else tf.cast(rows, tf.int32)
    a, b, xc, yc = (k[:, j, None, None] for j in range(4))
    d = tf.range(size, dtype=tf.float32) - tf.constant((size - 1) / 2.0, tf.float32)
    du, dv = d[None, None, :], d[None, :, None]
    x = xc + a * du - b * dv
    # (yc + b du) - (-a) dv is yc + b du + a dv exactly; written as a difference because Grappler
    # re-associates chains of additions, which would round differently from the reference.
    y = (yc + b * du) - (-a) * dv
    base = (rows * (context * context))[:, None, None]  # int32: up to 69,000 contexts of 176 px
    xf = tf.minimum(tf.floor(x), float(context - 2))  # x0 + 1 is a pixel; at x = C - 1, fx is 1
    yf = tf.minimum(tf.floor(y), float(context - 2))
    fx, fy = x - xf, y - yf
    flat = base + tf.cast(yf, tf.int32) * context + tf.cast(xf, tf.int32)
    pixels = tf.reshape(images, [-1])

    def at(index):  # float16 -> float32 is exact: the same values the reference casts first
        return tf.cast(tf.gather(pixels, index), tf.float32)

    top = at(flat)
    top = top + (at(flat + 1) - top) * fx
    bottom = at(flat + context)
    bottom = bottom + (at(flat + context + 1) - bottom) * fx
    out = top + (bottom - top) * fy
    nearest = base + tf.cast(tf.round(y), tf.int32) * context + tf.cast(tf.round(x), tf.int32)  # ties to even
    return out[..., None], tf.gather(tf.reshape(masks, [-1]), nearest)


STREAM_GROUP = 16
"""Images that stay together when an epoch is shuffled (see :func:`epoch_plan`)."""
STREAM_BLOCK = 1024
"""About this many samples are shuffled together (see :func:`epoch_plan`)."""


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
        n_images, per_image, settings: As :func:`hipoa.augment.draw_params`.
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


APPEARANCE_STREAM = 1
"""Third entry of the appearance draw's seed, ``(seed, epoch, APPEARANCE_STREAM)``: a stream of its
own, so the geometric draws (and the samples at appearance 0) are those of before."""


def appearance_plan(ids: np.ndarray, per_image: int, strength: float, seed: int,
                    epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The appearance parameters of an epoch's samples, in the order of ``ids`` (:func:`epoch_plan`).

    Drawn in sample-id order from NumPy's generator seeded with ``(seed, epoch, APPEARANCE_STREAM)``,
    so a sample's parameters do not depend on the shuffle; sample 0 of each image gets the neutral
    row (and is left as it is: :meth:`TrainingInput.dataset`).

    Returns:
        ``params`` ``(n, 10)`` float32 and ``keys`` ``(n,)`` int64 (:func:`hipoa.augment.draw_appearance`).
    """
    ids = np.asarray(ids, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch, APPEARANCE_STREAM])
    params, keys = draw_appearance(len(ids), strength, rng)
    params, keys = params[ids], keys[ids]
    params[ids % per_image == 0] = NEUTRAL_APPEARANCE
    return params, keys


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
            ``settings.appearance`` > 0 adds the appearance augmentation to the random samples.
        batch_size: Samples per batch; the last batch of an epoch may be smaller (the noise
            fields are drawn per batch, so the batches repeat for the same seed and batch size).
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
        # Every epoch's plan up front (about 40 bytes a sample and epoch; 88 with appearance): the
        # input graph then runs without Python, and a rerun with the same seed makes the same batches.
        plans = [self.epoch_plan(e) for e in range(self.epochs)]
        context = int(images.shape[1])
        self._ids = _resident(np.stack([ids for ids, _ in plans]), "train_ids")
        self._coefficients = _resident(np.stack([augment_coefficients(p, context) for _, p in plans]), "train_coefficients")
        self._appearance = self._keys = None
        if settings.appearance > 0:  # at 0 the graph is the geometric one, op for op
            looks = [self.appearance_plan(e, ids) for e, (ids, _) in enumerate(plans)]
            self._appearance = _resident(np.stack([a for a, _ in looks]), "train_appearance")
            self._keys = _resident(np.stack([k for _, k in looks]), "train_appearance_keys")

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch ``epoch``'s ``(ids, params)`` in training order (:func:`epoch_plan`)."""
        return epoch_plan(self.n_images, self.per_image, self.settings, self.seed, int(epoch))

    def appearance_plan(self, epoch: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Epoch ``epoch``'s appearance ``(params, keys)`` in training order (:func:`appearance_plan`)."""
        ids = self.epoch_plan(epoch)[0] if ids is None else ids
        return appearance_plan(ids, self.per_image, self.settings.appearance, self.seed, int(epoch))

    def _batch(self, ids: tf.Tensor, coefficients: tf.Tensor, appearance: tf.Tensor | None = None,
               keys: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = warp(self._images, self._masks, coefficients, rows=ids // self.per_image)
        if appearance is not None:  # the image only, and only the random samples
            random = (ids % self.per_image != 0)[:, None, None, None]
            x = tf.where(random, appear(x, appearance, keys), x)
        return x, y

    def dataset(self) -> tf.data.Dataset:
        """Endless ``(x, y)``: ``x`` ``(B, 128, 128, 1)`` float32, ``y`` ``(B, 128, 128)`` uint8 0/1.

        Epoch ``e`` is exactly ``steps_per_epoch`` batches (batched before the epochs are joined);
        after ``epochs`` epochs the plans start again. Pass ``steps_per_epoch`` to ``fit``: Keras
        then keeps one iterator for the whole run. (A finite dataset makes Keras create a new
        iterator every epoch, which would repeat epoch 0's transforms.)
        """
        def one_epoch(epoch):
            plan = (self._ids[epoch], self._coefficients[epoch])
            if self._appearance is not None:
                plan += (self._appearance[epoch], self._keys[epoch])
            return tf.data.Dataset.from_tensor_slices(plan).batch(self.batch_size)

        ds = tf.data.Dataset.range(self.epochs).repeat().flat_map(one_epoch)
        ds = ds.map(self._batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)


class ValidationInput:
    """Validation samples made once (same transforms every epoch) and held in memory.

    Args:
        images, masks, n_augment, settings, batch_size: As :class:`TrainingInput`; the
            appearance strength is ignored (validation samples are geometric only, as the
            images the models will see).
        seed: Fixed seed of the validation transforms (``hipoa.train.VAL_AUGMENT_SEED``).

    Attributes:
        x: ``(n_samples, 128, 128)`` float32 samples, image order, ``1 + n_augment`` per image
            (sample 0 of each image is its centre crop).
        y: ``(n_samples, 128, 128)`` uint8 0/1 masks.
        n_samples, steps_per_epoch: As :class:`TrainingInput`.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, *, n_augment: int, settings: AugmentSettings,
                 batch_size: int, seed: int) -> None:
        settings = dataclasses.replace(settings, appearance=0.0)  # validation: geometric only, as stored
        plan = TrainingInput(images, masks, n_augment=n_augment, settings=settings, batch_size=batch_size, seed=seed,
                             epochs=1)
        self.n_samples, self.steps_per_epoch, self.batch_size = plan.n_samples, plan.steps_per_epoch, plan.batch_size
        fixed = draw_params(plan.n_images, plan.per_image, settings, np.random.default_rng(seed))
        ids, params = epoch_plan(plan.n_images, plan.per_image, settings, seed, 0, fixed=fixed)
        xs, ys = [], []
        coefficients = augment_coefficients(params, int(images.shape[1]))
        plans = tf.data.Dataset.from_tensor_slices((ids, coefficients)).batch(_WARP_CHUNK)
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
