"""Running a site's U-Net on patches: per-patch probability maps for a store or an array."""

from __future__ import annotations

import logging

import numpy as np

from hipoa.progress import Progress
from hipoa.sites import PATCH_SIZE

log = logging.getLogger(__name__)


def predict_probability(
    model, image, indices: np.ndarray, *, batch_size: int = 64, block: int = 512, crop: int = 0,
    progress: str | None = None,
) -> np.ndarray:
    """Osteophyte probability maps for patches read in blocks from a (Dask or NumPy) array.

    Args:
        model: U-Net returning ``(B, S, S, 2)`` softmax.
        image: ``(n, C, C)`` patches; with ``crop`` > 0 the centre ``C - 2 * crop`` crop is used.
        indices: Rows of ``image`` to predict, any order.
        batch_size: Batch size of ``model.predict``.
        block: Patches read from the store at a time.
        crop: Margin to cut from each side (``(C - 128) // 2`` for context patches).
        progress: Log progress (rate, ETA) under this label; ``None``: silent.

    Returns:
        ``(len(indices), S, S)`` float32, softmax channel 1, in ``indices`` order.
    """
    indices = np.asarray(indices, dtype=np.int64)
    out = [np.zeros((0, PATCH_SIZE, PATCH_SIZE), np.float32)]
    tracker = Progress(len(indices), progress, log, unit="patches") if progress else None
    for b in range(0, len(indices), block):
        x = take_rows(image, indices[b : b + block]).astype(np.float32)
        if crop:
            x = x[:, crop : crop + PATCH_SIZE, crop : crop + PATCH_SIZE]
        out.append(np.asarray(model.predict(x[..., None], batch_size=batch_size, verbose=0))[..., 1].astype(np.float32))
        if tracker is not None:
            tracker.update(len(x))
    if tracker is not None:
        tracker.close()
    return np.concatenate(out)


def take_rows(array, indices: np.ndarray) -> np.ndarray:
    """``array[indices]`` as NumPy, in ``indices`` order, reading a Dask array in sorted order.

    Dask reads run in the calling thread (``scheduler="synchronous"``): callers read a block at a
    time from inside tf.data's generator thread, where a Dask thread pool per calling thread would
    only add threads competing with TensorFlow's.
    """
    indices = np.asarray(indices, dtype=np.int64)
    order = np.argsort(indices, kind="stable")
    x = array[indices[order]]
    x = np.asarray(x.compute(scheduler="synchronous") if hasattr(x, "compute") else x)
    unsort = np.empty_like(order)
    unsort[order] = np.arange(len(order))
    return x[unsort]


def read_masks(mask, indices: np.ndarray, *, crop: int = 0) -> np.ndarray:
    """``(len(indices), 128, 128)`` uint8 0/1 masks, in ``indices`` order (optionally centre-cropped)."""
    m = take_rows(mask, indices)
    if crop:
        m = m[:, crop : crop + PATCH_SIZE, crop : crop + PATCH_SIZE]
    return (m > 0).astype(np.uint8)
