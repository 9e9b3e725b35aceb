"""Per-site data splits and U-Net training (Ebsim et al., sections 4.1 and 4.2).

Splits (:func:`make_splits`) are by participant and seeded. Training and validation learn from
patches cropped at manual points (the store's ``manual/`` context patches); the test split is
evaluated on patches cropped at automatic points, as the model is used (the paper's test sets).

Training (:func:`train_site`) follows the paper: Adam with Keras's default parameters, sparse
categorical cross-entropy on the two-class per-pixel softmax, 15 epochs, and the weights of the
epoch with the lowest validation loss are kept. Each training and validation image gives
``1 + n_augment`` samples (the un-augmented centre crop and ``n_augment`` random rotations,
scalings and displacements, :mod:`hipoa.augment`); the validation samples are drawn once with a
fixed seed, so every epoch (and every training seed) is scored on the same validation set.
Batches are streamed from the Zarr store in blocks of about 1,024 samples (e.g. 128 images with
``n_augment`` 7), so memory (about 100 MB) is set by the block size, not by the training set's.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from hipoa import __version__
from hipoa.atomic import atomic_path
from hipoa.augment import AugmentSettings, augment, check_context, draw_params, identity_params
from hipoa.infer import take_rows
from hipoa.modelio import model_json_path
from hipoa.presence import choose_presence_rule
from hipoa.progress import Progress, _fmt_seconds
from hipoa.sites import PATCH_SIZE
from hipoa.splits import open_site_patches, patch_indices, read_splits, split_counts

log = logging.getLogger(__name__)

VAL_AUGMENT_SEED = 20_211_014
"""Seed of the validation augmentations: fixed, so every epoch and every run see the same set."""

# ---- streaming samples -----------------------------------------------------------------------


class SampleStream:
    """Batches of (augmented) samples streamed from context patches in a patch store.

    Each image gives ``1 + n_augment`` samples: sample 0 is the centre crop, the others random
    transforms. Images are read in blocks (groups of store-adjacent images, so reads stay chunk
    friendly), the block's samples are made and shuffled, and batches are yielded; memory is one
    block's samples. With ``fixed=True`` the transforms are drawn once and the order never changes
    (validation); otherwise each call (epoch) draws new transforms and a new order.

    Calling the object starts an epoch and returns an iterator of ``(x, y)``: ``x`` ``(B, 128, 128,
    1)`` float32 images and ``y`` ``(B, 128, 128)`` uint8 masks (0/1).
    """

    def __init__(
        self,
        image,
        mask,
        indices: np.ndarray,
        *,
        n_augment: int,
        settings: AugmentSettings,
        batch_size: int,
        seed: int,
        fixed: bool,
        block_samples: int = 1024,
        group: int = 16,
        workers: int | None = None,
    ) -> None:
        self.image, self.mask = image, mask
        self.indices = np.sort(np.asarray(indices, dtype=np.int64))
        self.per_image = 1 + int(n_augment)
        self.settings = settings
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.fixed = fixed
        self.group = int(group)
        self.groups_per_block = max(1, block_samples // (self.per_image * self.group))
        self.workers = int(workers) if workers else min(8, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self.epoch = 0
        self._fixed_params = None
        if fixed:
            rng = np.random.default_rng(self.seed)
            self._fixed_params = self._params(len(self.indices), rng)

    @property
    def n_samples(self) -> int:
        return len(self.indices) * self.per_image

    def __len__(self) -> int:
        return math.ceil(self.n_samples / self.batch_size)

    def _params(self, n_images: int, rng: np.random.Generator) -> np.ndarray:
        p = draw_params(n_images * self.per_image, self.settings, rng).reshape(n_images, self.per_image, 4)
        p[:, 0] = identity_params(n_images)
        return p

    def _augment(self, images, masks, reps, params) -> tuple[np.ndarray, np.ndarray]:
        """Augment in ``workers`` threads (NumPy releases the GIL); same result for any count."""
        parts = np.array_split(np.arange(len(reps)), min(self.workers, max(1, len(reps) // 64)))
        if len(parts) == 1:
            return augment(images[reps], masks[reps], params)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="hipoa-augment")
        done = list(self._pool.map(lambda q: augment(images[reps[q]], masks[reps[q]], params[q]), parts))
        return np.concatenate([d[0] for d in done]), np.concatenate([d[1] for d in done])

    def __call__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.indices)
        groups = [np.arange(i, min(i + self.group, n)) for i in range(0, n, self.group)]
        if not self.fixed:
            groups = [groups[i] for i in rng.permutation(len(groups))]
        left_x = np.zeros((0, PATCH_SIZE, PATCH_SIZE), np.float32)
        left_y = np.zeros((0, PATCH_SIZE, PATCH_SIZE), np.uint8)
        for b in range(0, len(groups), self.groups_per_block):
            t0 = time.perf_counter()
            pos = np.sort(np.concatenate(groups[b : b + self.groups_per_block]))
            ctx_img = take_rows(self.image, self.indices[pos])
            ctx_mask = take_rows(self.mask, self.indices[pos])
            t1 = time.perf_counter()
            params = self._fixed_params[pos] if self.fixed else self._params(len(pos), rng)
            reps = np.repeat(np.arange(len(pos)), self.per_image)
            x, y = self._augment(ctx_img, ctx_mask, reps, params.reshape(-1, 4))
            log.debug("sample stream epoch %d block %d: read %d images %.2f s, %d samples %.2f s",
                      epoch, b // self.groups_per_block, len(pos), t1 - t0, len(x), time.perf_counter() - t1)
            y = (y > 0).astype(np.uint8)
            if not self.fixed:
                order = rng.permutation(len(x))
                x, y = x[order], y[order]
            x, y = np.concatenate([left_x, x]), np.concatenate([left_y, y])
            full = len(x) // self.batch_size * self.batch_size
            for i in range(0, full, self.batch_size):
                yield x[i : i + self.batch_size, ..., None], y[i : i + self.batch_size]
            left_x, left_y = x[full:], y[full:]
        if len(left_x):
            yield left_x[..., None], left_y

    def forever(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Epoch after epoch without end: ``len(self)`` batches make one epoch."""
        while True:
            yield from self()

    def dataset(self):
        """The stream as an endless ``tf.data.Dataset`` prefetching two batches.

        Pass ``steps_per_epoch=len(stream)`` (``validation_steps`` for validation) to ``fit``: Keras
        then keeps one iterator for the whole run. (A finite dataset makes Keras create a new
        iterator every epoch, which stalled the first batch of most epochs by about 30 s on the CPU.)
        """
        import tensorflow as tf

        ds = tf.data.Dataset.from_generator(
            self.forever,
            output_signature=(
                tf.TensorSpec((None, PATCH_SIZE, PATCH_SIZE, 1), tf.float32),
                tf.TensorSpec((None, PATCH_SIZE, PATCH_SIZE), tf.uint8),
            ),
        )
        return ds.prefetch(2)


# ---- training --------------------------------------------------------------------------------


def _callbacks(site: str, epochs: int, steps: int, n_samples: int):
    import keras

    class EpochLog(keras.callbacks.Callback):
        """Logs loss, val loss, s/epoch, patches/s and ETA per epoch; batch progress within one."""

        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_train_begin(self, logs=None):
            self.t_train = time.monotonic()

        def on_epoch_begin(self, epoch, logs=None):
            self.t_epoch = time.monotonic()
            self.progress = Progress(steps, f"train {site} epoch {epoch + 1}/{epochs}", log, unit="batches", every_s=30)

        def on_train_batch_end(self, batch, logs=None):
            self.progress.update(1)

        def on_epoch_end(self, epoch, logs=None):
            self.progress.close()
            sec = time.monotonic() - self.t_epoch
            self.seconds.append(sec)
            logs = logs or {}
            eta = float(np.mean(self.seconds)) * (epochs - epoch - 1)
            log.info(
                "train %s: epoch %d/%d, loss %.4f, val_loss %.4f, %.1f s/epoch, %.1f patches/s, elapsed %s, ETA %s",
                site, epoch + 1, epochs, logs.get("loss", float("nan")), logs.get("val_loss", float("nan")),
                sec, n_samples / sec if sec > 0 else float("nan"),
                _fmt_seconds(time.monotonic() - self.t_train), _fmt_seconds(eta),
            )

    class KeepBest(keras.callbacks.Callback):
        """Keeps the weights of the epoch with the lowest validation loss and restores them at the end."""

        def __init__(self) -> None:
            super().__init__()
            self.best = math.inf
            self.best_epoch = -1
            self.weights = None

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get("val_loss", math.nan)
            if value < self.best:
                self.best, self.best_epoch = float(value), epoch
                self.weights = [w.copy() for w in self.model.get_weights()]

        def on_train_end(self, logs=None):
            if self.weights is not None:
                self.model.set_weights(self.weights)

    return EpochLog(), KeepBest()


def train_site(
    *,
    stores: Sequence[str | Path],
    splits: str | Path | pd.DataFrame,
    site: str,
    out: str | Path,
    epochs: int = 15,
    batch_size: int = 32,
    depth: int = 4,
    base_filters: int = 64,
    dropout: float = 0.3,
    n_augment: int = 7,
    rotation: float = 0.1,
    scale: float = 0.1,
    displacement: float = 0.0,
    seed: int = 1,
    precision: str = "auto",
    prevalence: float | str = "auto",
    detect_threshold: float | str = "auto",
) -> dict:
    """Train one site's U-Net and choose its presence rule (:func:`choose_presence_rule`).

    Args:
        stores: Patch stores holding the split's images.
        splits: Split table (:func:`make_splits`), Parquet path or DataFrame.
        site: Site key.
        out: The model file to write, ``.../unet.keras``. Beside it: ``unet.json`` (settings,
            data counts, validation scores, presence rule) and ``history.csv`` (per-epoch loss).
        epochs, batch_size: Training length and batch size (paper: 15 epochs).
        depth, base_filters, dropout: U-Net size (paper: 4, 64, 0.3), :func:`hipoa.unet.build_unet`.
        n_augment: Extra augmented samples per image (paper: 7; 19 for the acetabulum).
        rotation, scale, displacement: Augmentation ranges (:class:`hipoa.augment.AugmentSettings`).
        seed: Seed of weights, dropout and training augmentation (``keras.utils.set_random_seed``).
        precision: ``auto`` or a policy name (:func:`hipoa.precision.choose_policy`).
        prevalence, detect_threshold: Of the presence rule, :func:`choose_presence_rule`.

    Returns:
        The dict written to ``unet.json``.
    """
    import keras

    from hipoa.precision import choose_policy, with_policy
    from hipoa.unet import build_unet, save_model

    out = Path(out)
    if epochs < 1 or batch_size < 1 or n_augment < 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, n_augment >= 0, got {epochs}, {batch_size}, {n_augment}")
    settings = AugmentSettings(rotation=rotation, scale=scale, displacement=displacement)
    table = read_splits(splits)
    keras.utils.set_random_seed(seed)
    policy = choose_policy(precision)

    manual = open_site_patches(stores, site, "manual")
    context = int(manual.image.shape[1])
    check_context(settings, context)
    crop = (context - PATCH_SIZE) // 2
    if getattr(manual, "core_offset", crop) != crop:
        raise ValueError(
            f"manual patches of {site}: the 128 core is at offset {manual.core_offset}, expected the centre {crop}"
        )
    train_rows = table[table["split"] == "train"]
    val_rows = table[table["split"] == "val"]
    if train_rows.empty or val_rows.empty:
        raise ValueError(f"site {site}: need train and val images, got {len(train_rows)} train, {len(val_rows)} val")
    train_idx = patch_indices(manual.rows, train_rows, "manual patches")
    val_idx = patch_indices(manual.rows, val_rows, "manual patches")

    train_stream = SampleStream(
        manual.image, manual.mask, train_idx, n_augment=n_augment, settings=settings,
        batch_size=batch_size, seed=seed, fixed=False,
    )
    val_stream = SampleStream(
        manual.image, manual.mask, val_idx, n_augment=n_augment, settings=settings,
        batch_size=batch_size, seed=VAL_AUGMENT_SEED, fixed=True,
    )
    model = build_unet(size=PATCH_SIZE, depth=depth, base_filters=base_filters, dropout=dropout, dtype=policy)
    optimizer = keras.optimizers.Adam()  # the paper: default parameters (learning rate 1e-3)
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy())
    log.info(
        "train %s: U-Net depth %d, %d base filters, %d parameters, %s; %d train images x %d = %d samples, "
        "%d val images x %d = %d samples per epoch",
        site, depth, base_filters, model.count_params(), policy, len(train_idx), 1 + n_augment,
        train_stream.n_samples, len(val_idx), 1 + n_augment, val_stream.n_samples,
    )
    epoch_log, keep_best = _callbacks(site, epochs, len(train_stream), train_stream.n_samples)
    t0 = time.monotonic()
    history = model.fit(
        train_stream.dataset(), steps_per_epoch=len(train_stream),
        validation_data=val_stream.dataset(), validation_steps=len(val_stream),
        epochs=epochs, callbacks=[epoch_log, keep_best], shuffle=False, verbose=0,  # the stream shuffles itself
    )
    train_seconds = time.monotonic() - t0

    presence, scores = choose_presence_rule(
        model, stores=stores, splits=table, site=site, prevalence=prevalence,
        detect_threshold=detect_threshold, batch_size=batch_size, seed=seed,
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(with_policy(model, "float32"), out)  # written to a temporary path, then renamed
    seconds = epoch_log.seconds
    hist = pd.DataFrame(history.history)
    hist.insert(0, "epoch", np.arange(1, len(hist) + 1))
    hist["seconds"] = seconds[: len(hist)]
    with atomic_path(out.parent / "history.csv") as tmp:
        hist.to_csv(tmp, index=False, quoting=csv.QUOTE_MINIMAL)
    info = {
        "site": site,
        "hipoa_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "epochs": epochs, "batch_size": batch_size, "depth": depth, "base_filters": base_filters,
            "dropout": dropout, "n_augment": n_augment, "rotation": rotation, "scale": scale,
            "displacement": displacement, "seed": seed, "precision": precision, "policy": policy,
            "prevalence": prevalence, "detect_threshold": detect_threshold,
            "optimizer": "Adam (Keras defaults)", "loss": "sparse categorical cross-entropy",
            "kept": "weights of the epoch with the lowest validation loss (val_loss)",
            "val_augment_seed": VAL_AUGMENT_SEED,
        },
        "architecture": {
            "size": PATCH_SIZE, "depth": depth, "base_filters": base_filters, "dropout": dropout,
            "n_classes": 2, "parameters": int(model.count_params()), "saved_policy": "float32",
        },
        "data": {
            "stores": [str(s) for s in ([stores] if isinstance(stores, (str, Path)) else stores)],
            "splits": None if isinstance(splits, pd.DataFrame) else str(splits),
            "context_size": context,
            "counts": split_counts(table),
            "samples_per_epoch": {"train": train_stream.n_samples, "val": val_stream.n_samples},
        },
        "training": {
            "epochs_run": len(hist),
            "best_epoch": keep_best.best_epoch + 1,
            "best_val_loss": keep_best.best,
            "seconds": train_seconds,
            "seconds_per_epoch": float(np.mean(seconds)) if seconds else float("nan"),
            "patches_per_second": train_stream.n_samples / float(np.mean(seconds)) if seconds else float("nan"),
        },
        "validation": scores,
        "presence": presence,
    }
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(json_safe(info), indent=2) + "\n")
    log.info(
        "train %s: best epoch %d (val_loss %.4f), min_area_px %d, val sensitivity %.3f specificity %.3f, "
        "val Dice (positives) %.3f; wrote %s",
        site, keep_best.best_epoch + 1, keep_best.best, presence["min_area_px"], scores.get("sensitivity", math.nan),
        scores.get("specificity", math.nan), scores["dice_mean_positive"], out,
    )
    return info


def json_safe(obj):
    """JSON has no NaN: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def load_existing(*, model: str | Path, out: str | Path) -> dict:
    """Use an existing model instead of training: check it loads and fits, copy it and its JSON.

    Args:
        model: An existing ``.keras`` U-Net with a ``.json`` of the same stem beside it.
        out: Where the workflow expects the model (``results/models/{site}/unet.keras``).

    Returns:
        The JSON's content, with ``loaded_from`` added.

    Raises:
        FileNotFoundError: naming the missing model or JSON.
        hipoa.modelio.ModelError: (a ValueError) naming the file: not a loadable, safe ``.keras``
            U-Net (:func:`hipoa.modelio.load_model`), not 128x128 -> 128x128xk, or its JSON is
            invalid or lacks the presence rule.
    """
    from hipoa.modelio import load_model, read_model_card

    src, out = Path(model), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"model to load not found: {src}")
    info_path = model_json_path(src)
    if not info_path.exists():
        raise FileNotFoundError(f"{src}: its settings file {info_path} is missing (it holds the presence rule)")
    info = read_model_card(src)
    load_model(src)  # checks the file, then that Keras loads it and its shapes
    presence = info["presence"]
    # Each file appears complete or not at all (hipoa.atomic); the model, then its card and history.
    if src.resolve() != out.resolve():
        with atomic_path(out) as tmp:
            shutil.copyfile(src, tmp)
    info["loaded_from"] = str(src)
    with atomic_path(model_json_path(out)) as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    hist_src, hist_out = src.parent / "history.csv", out.parent / "history.csv"
    if hist_src.is_file():
        if hist_src.resolve() != hist_out.resolve():
            with atomic_path(hist_out) as tmp:
                shutil.copyfile(hist_src, tmp)
    else:
        with atomic_path(hist_out) as tmp:
            tmp.write_text("epoch,loss,val_loss,seconds\n")
    log.info("loaded %s (min_area_px %s) -> %s", src, presence["min_area_px"], out)
    return info
