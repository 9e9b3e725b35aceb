"""Running a site's U-Net on patches: the one inference path of training, evaluation and prediction.

A :class:`SiteModel` is loaded once (:meth:`SiteModel.load`: the model through
:func:`hipoa.modelio.load_model`, file checked and safe mode, its card read and validated, under
the precision policy of :func:`hipoa.precision.choose_policy`) and then serves any number of
stores or arrays. :meth:`SiteModel.run` yields per-patch results in batches:

- patches are read by a prefetching reader (:func:`prefetch_batches`): a pool of threads reads
  and decompresses the next blocks of Zarr chunks while the model works on the current one
  (Zarr's codecs release the GIL, so the reads run in parallel);
- every batch is padded to one fixed shape, so the model is traced once (a shorter last batch
  would trace it again: on a CPU as long as predicting ~100 patches);
- the presence rule (:func:`hipoa.metrics.presence_from_probability`), the per-image probability,
  the mask area and any pixel counts are computed inside the same ``tf.function`` as the model
  call, on the accelerator when there is one (:func:`device_rule`), so only per-image scalars are
  copied back, plus the uint8 masks when they are asked for (only the present images' masks with
  ``masks="present"``: an absent image's mask is all zero). Probability maps never leave the
  device.

The device rule gives exactly the NumPy rule's results on the same model output: ``probability``
is the ``k``-th largest pixel probability (``tf.math.top_k``, ``k = max(min_area_px, 1)``), the
comparisons are float32 against float32 thresholds (as NumPy's, whose Python-float thresholds
are cast to the array's float32), and counts are exact integers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hipoa.modelio import ModelCard, PresenceRule
from hipoa.progress import Progress
from hipoa.sites import PATCH_SIZE

log = logging.getLogger(__name__)

MASK_MODES = ("none", "present", "all", "pixels")
"""What :meth:`SiteModel.run` copies back as ``mask``: nothing; the rule's mask of the present
images (absent ones are zero); the rule's mask of every image; or the pixels >= the rule's
``pixel_threshold`` of every image, whether present or not (for choosing a rule)."""

READ_THREADS = 4
"""Reader threads: enough to decompress a block of Zarr chunks in the time the model takes."""
READ_BLOCK = 256
"""Patches per read (rounded to whole batches), see :func:`prefetch_batches`."""


@dataclass(frozen=True)
class Batch:
    """Per-patch results of one batch (padding dropped), in the order of the indices asked for.

    Attributes:
        indices: ``(b,)`` int64, rows of the source array.
        present: ``(b,)`` bool, the rule's call (all False without a rule).
        area_px: ``(b,)`` int64, mask pixels (0 where absent).
        probability: ``(b,)`` float32, the ``k``-th largest pixel probability.
        mask: ``(b, 128, 128)`` uint8 0/1 (see :data:`MASK_MODES`), or None.
        counts: ``(b, t)`` int64 pixels >= each of ``count_thresholds``, or None.
    """

    indices: np.ndarray
    present: np.ndarray
    area_px: np.ndarray
    probability: np.ndarray
    mask: np.ndarray | None = None
    counts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)


def take_rows(array, indices: np.ndarray) -> np.ndarray:
    """``array[indices]`` as NumPy, in ``indices`` order, reading a Dask array in sorted order.

    Dask reads run in the calling thread (``scheduler="synchronous"``): callers read a block at a
    time from their own threads (the reader pool of :func:`prefetch_batches`), where a Dask thread
    pool per calling thread would only add threads competing with TensorFlow's.
    """
    indices = np.asarray(indices, dtype=np.int64)
    order = np.argsort(indices, kind="stable")
    sorted_idx = indices[order]
    if len(sorted_idx) and sorted_idx[-1] - sorted_idx[0] + 1 == len(sorted_idx):
        x = array[int(sorted_idx[0]) : int(sorted_idx[-1]) + 1]  # a run: a slice reads fewer chunks' metadata
    else:
        x = array[sorted_idx]
    x = np.asarray(x.compute(scheduler="synchronous") if hasattr(x, "compute") else x)
    unsort = np.empty_like(order)
    unsort[order] = np.arange(len(order))
    return x[unsort]


def read_masks(mask, indices: np.ndarray, *, crop: int = 0) -> np.ndarray:
    """``(len(indices), 128, 128)`` uint8 0/1 truth masks, in ``indices`` order (optionally centre-cropped)."""
    m = take_rows(mask, indices)
    if crop:
        m = m[:, crop : crop + PATCH_SIZE, crop : crop + PATCH_SIZE]
    return (m > 0).astype(np.uint8)


def prefetch_batches(
    image, indices: np.ndarray, batch_size: int, *, threads: int = READ_THREADS, ahead: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices_b, patches_b)``: ``patches_b`` is ``image[indices_b]`` zero-padded to ``batch_size``.

    Rows are read in blocks of about :data:`READ_BLOCK` patches (whole batches): each Dask read
    costs ~1 ms of graph building besides the chunks, which at 32 patches a read held a reader to
    ~6,000 patches/s on 2 cores, at 256 to ~9,000. Up to ``ahead`` blocks (default
    ``threads + 1``) are being read at once by ``threads`` threads while the caller works on the
    current batch. Memory: ``ahead + 1`` blocks.

    Args:
        image: ``(n, S, S)`` Dask or NumPy array (float16 in patch stores; the dtype is kept).
        indices: Rows to read, any order; yielded in this order.
        batch_size: Patches per batch.
        threads, ahead: Reader threads and blocks in flight.

    Yields:
        ``(b,)`` int64 indices and ``(batch_size, S, S)`` patches (rows past ``b`` are zero).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    indices = np.asarray(indices, dtype=np.int64)
    step = batch_size * max(1, READ_BLOCK // batch_size)
    blocks = [indices[i : i + step] for i in range(0, len(indices), step)]
    ahead = max(1, ahead if ahead is not None else threads + 1)

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="hipoa-read") as pool:
        pending = [pool.submit(take_rows, image, b) for b in blocks[:ahead]]
        for k, block in enumerate(blocks):
            x = pending[k].result()
            pending[k] = None  # drop the reference: memory stays at `ahead` blocks
            if k + ahead < len(blocks):
                pending.append(pool.submit(take_rows, image, blocks[k + ahead]))
            for i in range(0, len(block), batch_size):
                b, xb = block[i : i + batch_size], x[i : i + batch_size]
                if len(b) < batch_size:
                    xb = np.concatenate([xb, np.zeros((batch_size - len(b), *xb.shape[1:]), xb.dtype)])
                yield b, xb


def device_rule(prob, rule: PresenceRule | None, *, count_thresholds: Sequence[float] = (), masks: str = "none"):
    """The presence rule on a batch of probability maps, as TensorFlow ops (inside ``tf.function``).

    Args:
        prob: ``(B, H, W)`` float32 tensor, class-1 probability per pixel.
        rule: The presence rule; ``None``: only ``counts`` (and ``masks="pixels"`` at 0.5) are
            meaningful, ``present`` is all False.
        count_thresholds: Thresholds at which to count pixels ``>=`` per image.
        masks: One of :data:`MASK_MODES`.

    Returns:
        Dict of tensors: ``present`` ``(B,)`` bool, ``area_px`` ``(B,)`` int32, ``probability``
        ``(B,)`` float32; ``counts`` ``(B, t)`` int32 when thresholds are given; ``mask`` uint8:
        ``(B, H, W)``, or ``(p, H, W)`` for the ``p`` present images with ``masks="present"``.
    """
    import tensorflow as tf

    if masks not in MASK_MODES:
        raise ValueError(f"masks must be one of {MASK_MODES}, got {masks!r}")
    flat = tf.reshape(tf.cast(prob, tf.float32), (tf.shape(prob)[0], -1))
    pixel = float(rule.pixel_threshold) if rule is not None else 0.5
    k = max(int(rule.min_area_px), 1) if rule is not None else 1
    kth = tf.math.top_k(flat, k=k, sorted=True).values[:, k - 1]
    detect = tf.constant(rule.detect if rule is not None else np.inf, tf.float32)
    present = kth >= detect
    above = flat >= tf.constant(pixel, tf.float32)
    gated = tf.logical_and(above, present[:, None])
    out = {
        "present": present,
        "area_px": tf.reduce_sum(tf.cast(gated, tf.int32), axis=1),
        "probability": tf.clip_by_value(kth, 0.0, 1.0),
    }
    if count_thresholds:
        out["counts"] = tf.stack(
            [tf.reduce_sum(tf.cast(flat >= tf.constant(float(t), tf.float32), tf.int32), axis=1) for t in count_thresholds],
            axis=1,
        )
    shape = tf.shape(prob)
    if masks == "pixels":
        out["mask"] = tf.reshape(tf.cast(above, tf.uint8), shape)
    elif masks == "all":
        out["mask"] = tf.reshape(tf.cast(gated, tf.uint8), shape)
    elif masks == "present":
        # Only the present images' masks cross to the host: boolean_mask runs where the model does.
        out["mask"] = tf.boolean_mask(tf.reshape(tf.cast(gated, tf.uint8), shape), present)
    return out


class SiteModel:
    """A site's U-Net, loaded once, that serves any number of stores and arrays.

    Args:
        model: A Keras 3 model, input ``(B, 128, 128, 1)``, output ``(B, 128, 128, C)`` (softmax;
            class 1 is the osteophyte, or channel 0 of a single sigmoid channel).
        rule: The presence rule (None: only counts and pixel masks, as when choosing a rule).
        card: The model card it was loaded with, if any.
        policy: The Keras dtype policy it runs under.
        path: Where it was loaded from, if anywhere.
    """

    def __init__(self, model, rule: PresenceRule | None = None, *, card: ModelCard | None = None,
                 policy: str = "float32", path: Path | None = None) -> None:
        self.model = model
        self.rule = rule if rule is not None or card is None else card.presence
        self.card = card
        self.policy = policy
        self.path = path
        self._steps: dict[tuple, Any] = {}

    @classmethod
    def load(cls, path: str | Path, *, precision: str = "auto", policy: str | None = None) -> SiteModel:
        """Read the card beside ``path`` and load the model, checked, under a precision policy.

        Args:
            path: The ``.keras`` model; its card is the ``.json`` beside it.
            precision: ``"auto"`` or a policy name (:func:`hipoa.precision.choose_policy`).
            policy: An already resolved policy (skips ``precision``).

        Raises:
            FileNotFoundError: naming the model or its card when missing.
            hipoa.modelio.ModelError: (a ValueError) naming the file when either is unusable.
        """
        from hipoa import modelio
        from hipoa.precision import choose_policy

        path = Path(path)
        card = modelio.read_model_card(path)  # the card first: a bad rule fails before the slow load
        policy = policy or choose_policy(precision)
        return cls(modelio.load_model(path, policy), card=card, policy=policy, path=path)

    def _step(self, rule: PresenceRule | None, count_thresholds: tuple[float, ...], masks: str, crop: int):
        """The ``tf.function`` of one request: model call and :func:`device_rule`, cached."""
        import tensorflow as tf

        key = (rule, count_thresholds, masks, crop)
        if key not in self._steps:
            model = self.model
            channel = 1 if int(model.output_shape[-1]) >= 2 else 0

            @tf.function
            def step(x):
                x = tf.cast(x, tf.float32)  # patches cross as stored (float16: half the bytes)
                if crop:
                    x = x[:, crop : crop + PATCH_SIZE, crop : crop + PATCH_SIZE]
                y = model(x[..., None], training=False)
                return device_rule(y[..., channel], rule, count_thresholds=count_thresholds, masks=masks)

            self._steps[key] = step
        return self._steps[key]

    def run(
        self,
        image,
        indices: np.ndarray | None = None,
        *,
        batch_size: int = 64,
        masks: str = "none",
        count_thresholds: Sequence[float] = (),
        crop: int = 0,
        rule: PresenceRule | None = None,
        progress: str | None = None,
        threads: int = READ_THREADS,
    ) -> Iterator[Batch]:
        """Yield :class:`Batch` results for ``image[indices]``, ``batch_size`` patches at a time.

        Args:
            image: ``(n, S, S)`` patches, a Dask array (:class:`hipoa.store.PatchSet` ``image``)
                or NumPy; with ``crop`` > 0 the centre ``128`` crop (``S = 128 + 2 * crop``) is used.
            indices: Rows to predict, any order (default all).
            batch_size: Patches per model call; the last batch is padded to it.
            masks: What masks to copy back (:data:`MASK_MODES`).
            count_thresholds: Also count pixels >= each of these per image.
            crop: Margin cut from each side (``(S - 128) // 2`` for context patches).
            rule: Overrides the model's rule for this call.
            progress: Log progress (rate, ETA) under this label; None: silent.
            threads: Reader threads.
        """
        rule = rule if rule is not None else self.rule
        if masks not in MASK_MODES:
            raise ValueError(f"masks must be one of {MASK_MODES}, got {masks!r}")
        if rule is None and masks in ("present", "all"):
            raise ValueError(f"masks={masks!r} needs a presence rule ({self.path or 'model'} has none)")
        step = self._step(rule, tuple(float(t) for t in count_thresholds), masks, int(crop))
        indices = np.arange(len(image), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        tracker = Progress(len(indices), progress, log, unit="patches") if progress else None
        for b, x in prefetch_batches(image, indices, batch_size, threads=threads):
            yield _to_host(step(x), len(b), b, masks)
            if tracker is not None:
                tracker.update(len(b))
        if tracker is not None:
            tracker.close()

    def predict(self, image, indices: np.ndarray | None = None, **kwargs) -> Batch:
        """:meth:`run` gathered into one :class:`Batch` over all ``indices`` (same arguments)."""
        return concat_batches(list(self.run(image, indices, **kwargs)), masks=kwargs.get("masks", "none"),
                              counts=bool(kwargs.get("count_thresholds")))


def _to_host(out: dict, b: int, indices: np.ndarray, masks: str) -> Batch:
    """Copy one step's results to NumPy, padding rows dropped."""
    present = out["present"].numpy()
    mask = None
    if masks == "present":
        # The step returned only the present rows' masks (padding rows are zero patches, and a
        # zero patch can be present too: keep the masks of real rows only).
        rows = np.flatnonzero(present)
        got = out["mask"].numpy()
        mask = np.zeros((b, *got.shape[1:]), np.uint8)
        keep = rows < b
        mask[rows[keep]] = got[keep]
    elif masks != "none":
        mask = out["mask"].numpy()[:b]
    return Batch(
        indices=indices,
        present=present[:b].astype(bool),
        area_px=out["area_px"].numpy()[:b].astype(np.int64),
        probability=out["probability"].numpy()[:b].astype(np.float32),
        mask=mask,
        counts=out["counts"].numpy()[:b].astype(np.int64) if "counts" in out else None,
    )


def concat_batches(batches: list[Batch], *, masks: str = "none", counts: bool = False) -> Batch:
    """One :class:`Batch` of several (in order); empty arrays of the right shapes when none."""
    if not batches:
        return Batch(
            indices=np.zeros(0, np.int64), present=np.zeros(0, bool), area_px=np.zeros(0, np.int64),
            probability=np.zeros(0, np.float32),
            mask=None if masks == "none" else np.zeros((0, PATCH_SIZE, PATCH_SIZE), np.uint8),
            counts=np.zeros((0, 0), np.int64) if counts else None,
        )
    cat = np.concatenate
    return Batch(
        indices=cat([b.indices for b in batches]),
        present=cat([b.present for b in batches]),
        area_px=cat([b.area_px for b in batches]),
        probability=cat([b.probability for b in batches]),
        mask=None if batches[0].mask is None else cat([b.mask for b in batches]),
        counts=None if batches[0].counts is None else cat([b.counts for b in batches]),
    )


def as_site_model(model, rule: PresenceRule | None = None) -> SiteModel:
    """``model`` if it is a :class:`SiteModel`, else a Keras model wrapped in one (float32 as built)."""
    return model if isinstance(model, SiteModel) else SiteModel(model, rule)
