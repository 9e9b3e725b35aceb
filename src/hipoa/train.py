"""U-Net training of one site (Ebsim et al., section 4.2).

Training (:func:`train_site`) follows the paper: Adam with Keras's default parameters, sparse
categorical cross-entropy on the two-class per-pixel softmax, 15 epochs, and the weights of the
epoch with the lowest validation loss are kept. One change, for noisy labels: two annotators'
outlines of the same osteophyte differ by a pixel or two, so the pixels within 1 px of the mask's
boundary count ``boundary_weight`` (0.5 by default) in the cross-entropy, training and validation
alike (:func:`pixel_loss`; 1 is the paper's plain loss). Training and validation learn from the store's
``manual/`` context patches of the split's train and val images (:mod:`hipoa.splits`). Each
image gives ``1 + n_augment`` samples per epoch (the un-augmented centre crop and ``n_augment``
random rotations, scalings and displacements, the training ones also with the scanner
appearance augmentation of :mod:`hipoa.augment`), made in the TensorFlow input graph from contexts
read once into memory (:mod:`hipoa.train_input`); the validation samples are drawn once with a
fixed seed, so every epoch (and every training seed) is scored on the same validation set.

Progress is logged per epoch, and within an epoch every 30 s from the clock alone: batch logs
are never read, so no step waits for the device to report its loss (:func:`callback_container`).
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hipoa import __version__
from hipoa.atomic import atomic_path
from hipoa.augment import AugmentSettings, check_context
from hipoa.presence import choose_presence_rule
from hipoa.progress import Progress, format_seconds
from hipoa.provenance import provenance
from hipoa.sites import PATCH_SIZE
from hipoa.splits import open_site_patches, patch_indices, read_splits, split_counts
from hipoa.store import PatchSet
from hipoa.train_settings import TrainSettings

log = logging.getLogger(__name__)

VAL_AUGMENT_SEED = 20_211_014
"""Seed of the validation augmentations: fixed, so every epoch and every run see the same set."""

PROGRESS_EVERY_S = 30.0
"""Seconds between progress lines within an epoch."""


# ---- callbacks -------------------------------------------------------------------------------


def callback_container(callbacks: list, *, model, epochs: int, steps: int):
    """Keras's callback container, minus the per-step host sync.

    Keras 3.15 on TensorFlow (``backend.IS_THREAD_SAFE`` is False, so batch hooks are never
    dispatched asynchronously) converts every batch's logs to Python floats in
    ``CallbackList._on_train_batch_end`` / ``_on_test_batch_end`` (``pythonify_logs``, whether or not a
    callback implements a batch hook): each step then waits for the device to finish it before the
    next is dispatched. Here batch hooks get ``logs=None`` and nothing is converted; epoch hooks
    get the epoch's logs as usual (one sync per epoch). ``fit`` uses a container it is given as is.
    """
    import keras

    class BatchLogsUnread(keras.callbacks.CallbackList):
        def on_train_batch_end(self, batch, logs=None):
            for callback in self.callbacks:
                callback.on_train_batch_end(batch, logs=None)

        def on_test_batch_end(self, batch, logs=None):
            for callback in self.callbacks:
                callback.on_test_batch_end(batch, logs=None)

    return BatchLogsUnread(callbacks, add_history=True, add_progbar=False, model=model,
                           verbose=0, epochs=epochs, steps=steps)


def training_callbacks(site: str, epochs: int, steps: int, n_samples: int, every_s: float = PROGRESS_EVERY_S):
    """``(EpochLog, KeepBest)``: progress from the clock, and the best-``val_loss`` weights."""
    import keras

    class EpochLog(keras.callbacks.Callback):
        """Logs loss, val loss, s/epoch, patches/s and ETA per epoch; batches/s and ETA every ``every_s``.

        The batch hook only counts and looks at the clock; it never reads ``logs``.
        """

        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_train_begin(self, logs=None):
            self.t_train = time.monotonic()

        def on_epoch_begin(self, epoch, logs=None):
            self.t_epoch = time.monotonic()
            self.progress = Progress(steps, f"train {site} epoch {epoch + 1}/{epochs}", log, unit="batches",
                                     every_s=every_s)

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
                format_seconds(time.monotonic() - self.t_train), format_seconds(eta),
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


# ---- loss ------------------------------------------------------------------------------------


def boundary_weights(mask, weight: float):
    """Per-pixel loss weights: ``weight`` within 1 px of the mask's boundary, 1 elsewhere.

    The ring is the 3 x 3 (8-neighbour) dilation minus the erosion of the mask: the pixels on
    both sides of the outline, where two annotators disagree. The patch border is no boundary
    (the pooling ignores the padding). A mask of 1 or 2 px is all ring, so a tiny osteophyte
    counts ``weight`` as much.

    Args:
        mask: ``(n, H, W)`` 0/1 masks (any dtype), a tensor of the Keras backend or NumPy.
        weight: Weight of the ring, in ``[0, 1]``.

    Returns:
        ``(n, H, W)`` float32 weights.
    """
    from keras import ops

    m = ops.cast(mask, "float32")[..., None]
    grown = ops.max_pool(m, 3, strides=1, padding="same")
    shrunk = -ops.max_pool(-m, 3, strides=1, padding="same")
    return 1.0 - (1.0 - float(weight)) * (grown - shrunk)[..., 0]


def pixel_loss(boundary_weight: float = 1.0):
    """The training loss: sparse categorical cross-entropy, the boundary ring weighted.

    Per pixel ``w * CE`` with ``w`` from :func:`boundary_weights`, averaged over all pixels
    (Keras's ``sum_over_batch_size``, as the plain loss), computed in the graph from the (warped)
    mask, so validation (and early stopping) uses the same loss. At ``boundary_weight`` 1 it is
    ``keras.losses.SparseCategoricalCrossentropy()`` value for value. The probabilities are the
    float32 softmax under any precision policy (:data:`hipoa.unet.OUTPUT_LAYER`).

    Raises:
        ValueError: naming the value when ``boundary_weight`` is outside ``[0, 1]``.
    """
    import keras

    if not 0.0 <= boundary_weight <= 1.0:
        raise ValueError(f"boundary_weight must be in [0, 1], got {boundary_weight}")

    class BoundaryTolerantCrossentropy(keras.losses.SparseCategoricalCrossentropy):
        def call(self, y_true, y_pred):
            return super().call(y_true, y_pred) * boundary_weights(y_true, boundary_weight)

    return BoundaryTolerantCrossentropy(name="boundary_tolerant_crossentropy")


# ---- training phases -------------------------------------------------------------------------


@dataclass
class _SiteData:
    """A site's split table and manual context patches, with the train and val rows in them."""

    table: pd.DataFrame
    manual: PatchSet
    context: int
    train_idx: np.ndarray
    val_idx: np.ndarray


@dataclass
class _FitResult:
    """What :func:`fit_unet` leaves for the card: the model, its history, timings and the best epoch."""

    model: Any
    history: pd.DataFrame
    seconds: float
    epoch_seconds: list[float]
    best_epoch: int
    best_val_loss: float


def _open_site_data(stores: Sequence[str | Path], splits, site: str, settings: AugmentSettings) -> _SiteData:
    """Read the split table, open the manual patches and find the train and val rows in them.

    Raises:
        ValueError: naming the site when the contexts are too small for ``settings``, their 128
            core is not centred, or the split has no train or no val image.
        KeyError: naming split rows without a manual patch.
    """
    table = read_splits(splits)
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
    return _SiteData(
        table=table, manual=manual, context=context,
        train_idx=patch_indices(manual.rows, train_rows, "manual patches"),
        val_idx=patch_indices(manual.rows, val_rows, "manual patches"),
    )


def _make_inputs(data: _SiteData, *, n_augment: int, settings: AugmentSettings, batch_size: int, seed: int,
                 epochs: int):
    """Read the train and val contexts once; ``(TrainingInput, ValidationInput)``."""
    from hipoa.train_input import TrainingInput, ValidationInput, read_contexts

    t0 = time.monotonic()
    kw = {"n_augment": n_augment, "settings": settings, "batch_size": batch_size}
    train = TrainingInput(*read_contexts(data.manual.image, data.manual.mask, data.train_idx), seed=seed,
                          epochs=epochs, **kw)
    val = ValidationInput(*read_contexts(data.manual.image, data.manual.mask, data.val_idx), seed=VAL_AUGMENT_SEED, **kw)
    log.info("training input: %d train and %d val contexts read, %d val samples made, %.1f s",
             len(data.train_idx), len(data.val_idx), val.n_samples, time.monotonic() - t0)
    return train, val


def fit_unet(train, val, *, site: str, epochs: int, depth: int, base_filters: int, dropout: float,
         policy: str, boundary_weight: float = 1.0) -> _FitResult:
    """Build and compile the U-Net, fit it for ``epochs`` and restore the best-``val_loss`` weights."""
    import keras

    from hipoa.unet import build_unet

    model = build_unet(size=PATCH_SIZE, depth=depth, base_filters=base_filters, dropout=dropout, dtype=policy)
    optimizer = keras.optimizers.Adam()  # the paper: default parameters (learning rate 1e-3)
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=pixel_loss(boundary_weight))
    log.info(
        "train %s: U-Net depth %d, %d base filters, %d parameters, %s; %d train images x %d = %d samples, "
        "%d val samples per epoch",
        site, depth, base_filters, model.count_params(), policy, train.n_images, train.per_image,
        train.n_samples, val.n_samples,
    )
    epoch_log, keep_best = training_callbacks(site, epochs, train.steps_per_epoch, train.n_samples)
    callbacks = callback_container([epoch_log, keep_best], model=model, epochs=epochs, steps=train.steps_per_epoch)
    t0 = time.monotonic()
    history = model.fit(
        train.dataset(), steps_per_epoch=train.steps_per_epoch,
        validation_data=val.dataset(), validation_steps=val.steps_per_epoch,
        epochs=epochs, callbacks=callbacks, shuffle=False, verbose=0,  # the input shuffles itself
    )
    seconds = time.monotonic() - t0
    hist = pd.DataFrame(history.history)
    hist.insert(0, "epoch", np.arange(1, len(hist) + 1))
    hist["seconds"] = epoch_log.seconds[: len(hist)]
    return _FitResult(model=model, history=hist, seconds=seconds, epoch_seconds=epoch_log.seconds,
                      best_epoch=keep_best.best_epoch + 1, best_val_loss=keep_best.best)


def _card(*, site: str, settings: dict, stores, splits, data: _SiteData, samples: dict, fit: _FitResult,
          scores: dict, presence: dict) -> dict:
    """The model card's content (``unet.json``), in the layout of :class:`hipoa.modelio.ModelCard`."""
    mean_epoch = float(np.mean(fit.epoch_seconds)) if fit.epoch_seconds else float("nan")
    return {
        "site": site,
        "hipoa_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "provenance": provenance(),
        "settings": settings,
        "architecture": {
            "size": PATCH_SIZE, "depth": settings["depth"], "base_filters": settings["base_filters"],
            "dropout": settings["dropout"], "n_classes": 2, "parameters": int(fit.model.count_params()),
            "saved_policy": "float32",
        },
        "data": {
            "stores": [str(s) for s in ([stores] if isinstance(stores, (str, Path)) else stores)],
            "splits": None if isinstance(splits, pd.DataFrame) else str(splits),
            "context_size": data.context,
            "counts": split_counts(data.table),
            "samples_per_epoch": samples,
        },
        "training": {
            "epochs_run": len(fit.history),
            "best_epoch": fit.best_epoch,
            "best_val_loss": fit.best_val_loss,
            "seconds": fit.seconds,
            "seconds_per_epoch": mean_epoch,
            "patches_per_second": samples["train"] / mean_epoch if fit.epoch_seconds else float("nan"),
        },
        "validation": scores,
        "presence": presence,
    }


def _write_outputs(out: Path, fit: _FitResult, card: dict) -> None:
    """Write the model (float32), ``history.csv`` and the card, each complete or not at all."""
    from hipoa.modelio import write_model, write_model_card
    from hipoa.precision import with_policy

    out.parent.mkdir(parents=True, exist_ok=True)
    write_model(with_policy(fit.model, "float32"), out)  # written to a temporary path, then renamed
    with atomic_path(out.parent / "history.csv") as tmp:
        fit.history.to_csv(tmp, index=False, quoting=csv.QUOTE_MINIMAL)
    write_model_card(out, card)


def train_site(
    *,
    stores: Sequence[str | Path],
    splits: str | Path | pd.DataFrame,
    site: str,
    out: str | Path,
    settings: TrainSettings = TrainSettings(),
) -> dict:
    """Train one site's U-Net and choose its presence rule (:func:`hipoa.presence.choose_presence_rule`).

    Args:
        stores: Patch stores holding the split's images.
        splits: Split table (:func:`hipoa.splits.make_splits`), Parquet path or DataFrame.
        site: Site key.
        out: The model file to write, ``.../unet.keras``. Beside it: ``unet.json`` (settings,
            data counts, validation scores, presence rule) and ``history.csv`` (per-epoch loss).
        settings: Training length, U-Net size, augmentation, loss, seed, precision and the
            presence rule's prevalence and detection threshold (:class:`hipoa.train_settings.TrainSettings`,
            each setting's meaning and range). The ``seed`` seeds weights, dropout and training
            augmentation (``keras.utils.set_random_seed``, and the key of every epoch plan,
            :func:`hipoa.train_input.epoch_plan`).

    Returns:
        The dict written to ``unet.json``.
    """
    import keras

    from hipoa.precision import choose_policy

    out = Path(out)
    s = settings
    augment = s.augment()
    data = _open_site_data(stores, splits, site, augment)
    keras.utils.set_random_seed(s.seed)
    policy = choose_policy(s.precision)
    train, val = _make_inputs(data, n_augment=s.n_augment, settings=augment, batch_size=s.batch_size, seed=s.seed,
                              epochs=s.epochs)
    fit = fit_unet(train, val, site=site, epochs=s.epochs, depth=s.depth, base_filters=s.base_filters,
               dropout=s.dropout, policy=policy, boundary_weight=s.boundary_weight)

    presence, scores = choose_presence_rule(
        fit.model, stores=stores, splits=data.table, site=site, prevalence=s.prevalence,
        detect_threshold=s.detect_threshold, batch_size=s.batch_size, seed=s.seed,
    )
    card_settings = {
        **s.to_dict(),
        "policy": policy,
        "optimizer": "Adam (Keras defaults)",
        "loss": "sparse categorical cross-entropy" + (
            f", pixels within 1 px of the mask boundary weighted {s.boundary_weight}" if s.boundary_weight < 1 else ""),
        "kept": "weights of the epoch with the lowest validation loss (val_loss)",
        "val_augment_seed": VAL_AUGMENT_SEED,
    }
    card = _card(site=site, settings=card_settings, stores=stores, splits=splits, data=data,
                 samples={"train": train.n_samples, "val": val.n_samples}, fit=fit, scores=scores, presence=presence)
    _write_outputs(out, fit, card)
    log.info(
        "train %s: best epoch %d (val_loss %.4f), min_area_px %d, val sensitivity %.3f specificity %.3f, "
        "val Dice (positives) %.3f; wrote %s",
        site, fit.best_epoch, fit.best_val_loss, presence["min_area_px"], scores.get("sensitivity", math.nan),
        scores.get("specificity", math.nan), scores["dice_mean_positive"], out,
    )
    return card
