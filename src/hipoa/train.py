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
from hipoa.metrics import choose_min_area, dice, estimate_prevalence, predicted_area_px, presence_from_probability
from hipoa.progress import Progress, _fmt_seconds
from hipoa.sites import PATCH_SIZE
from hipoa.store import PatchSet, open_patches

log = logging.getLogger(__name__)

KEY = ["eid", "instance", "side"]
SPLITS = ("train", "val", "test", "unused")
PIXEL_THRESHOLD = 0.5
"""Pixel probability of the osteophyte mask (and area): the argmax of the two-class softmax."""
DETECT_THRESHOLDS = (0.5, 0.7, 0.9)
"""Candidate pixel probabilities a pixel needs to count towards ``min_area_px`` (presence), one
chosen per site on validation (``detect_threshold="auto"``). A confident model separates better
at 0.9: on the 400-participant synthetic cohort, held-out AUC 0.987 / 0.968 / 0.980 at 0.9 against
0.978 / 0.956 / 0.988 at 0.5 (inferior / superior / acetabulum), and less prevalence bias. A
small, less confident model (the demo's) rarely reaches 0.9 and needs 0.5."""
POPULATION_SAMPLE = 4000
"""At most this many unlabelled images are predicted to estimate a site's prevalence."""
VAL_AUGMENT_SEED = 20_211_014
"""Seed of the validation augmentations: fixed, so every epoch and every run see the same set."""
PRESENCE_RULE = (
    "an image has an osteophyte if at least min_area_px patch pixels have a probability >= "
    "detect_threshold; its mask (and area) are the pixels >= pixel_threshold. detect_threshold and "
    "min_area_px maximise prevalence * sensitivity + (1 - prevalence) * specificity on the "
    "validation split (ties: the higher detect_threshold, the geometric middle of the best "
    "min_area_px stretch); prevalence is estimated on the cohort's images outside the train and val "
    "splits by adjusted classify-and-count, or set in the config"
)


# ---- data selection --------------------------------------------------------------------------


def open_site_patches(stores: Sequence[str | Path] | str | Path, site: str, source: str) -> PatchSet:
    """:func:`hipoa.store.open_patches` for one path or several."""
    if isinstance(stores, (str, Path)):
        stores = [stores]
    return open_patches([Path(s) for s in stores], site, source)


def _keys(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "eid": rows["eid"].astype(str).to_numpy(),
            "instance": rows["instance"].astype(np.int64).to_numpy(),
            "side": rows["side"].astype(str).to_numpy(),
        }
    )


def patch_indices(rows: pd.DataFrame, wanted: pd.DataFrame, what: str = "patch store") -> np.ndarray:
    """Positions in ``rows`` (a PatchSet's table) of the ``(eid, instance, side)`` keys of ``wanted``.

    Returns:
        ``(len(wanted),)`` int64 indices, in ``wanted``'s order.

    Raises:
        KeyError: naming the first missing key(s).
    """
    have = _keys(rows)
    have["_pos"] = np.arange(len(have))
    want = _keys(wanted)
    merged = want.merge(have, on=KEY, how="left", validate="many_to_one")
    missing = merged["_pos"].isna()
    if missing.any():
        first = merged.loc[missing, KEY].head(3).to_dict("records")
        raise KeyError(f"{int(missing.sum())} split rows have no patch in the {what}, e.g. {first}")
    return merged["_pos"].to_numpy(np.int64)


def make_splits(
    *,
    stores: Sequence[str | Path],
    site: str,
    seed: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
) -> pd.DataFrame:
    """Split a site's annotated images into train / val / test by participant.

    Candidates are annotated rows without a ``qc_reason``; positive means
    ``{site}_true_area_mm2 > 0``. Participants (all their images, instances and sides) are
    shuffled with ``seed`` separately among those with and without any positive image (so small
    cohorts still get positives everywhere) and cut into test, val and train by the fractions.
    In train and val, only images with a manual-point patch are usable, and negatives are sampled
    to match the positives (the paper's Table 1; if negatives are the fewer, positives are sampled
    to match them); the rest become ``unused``. The test split keeps
    every candidate image of its participants, with its natural balance, and is evaluated on
    automatic-point patches.

    Args:
        stores: Patch stores (Zarr) of one or more shards and sides.
        site: Site key.
        seed: Seed of the participant shuffle and the negative sampling.
        val_fraction: Fraction of participants for validation.
        test_fraction: Fraction of participants for testing.

    Returns:
        DataFrame with columns ``eid`` (str), ``instance`` (int16), ``side`` (str), ``split``
        (one of ``train``, ``val``, ``test``, ``unused``), ``positive`` (bool), sorted by key.

    Raises:
        ValueError: on bad fractions or when the stores hold no annotated image for the site.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val, test fractions and val + test < 1, got {val_fraction}, {test_fraction}")
    auto = open_site_patches(stores, site, "auto")
    rows = auto.rows
    area_col = f"{site}_true_area_mm2"
    if area_col not in rows:
        raise KeyError(f"patch stores have no column {area_col!r}; is {site!r} one of their sites?")
    qc = rows["qc_reason"].fillna("").astype(str)
    area = rows[area_col].astype(float)
    candidate = rows["annotated"].astype(bool).to_numpy() & (qc == "").to_numpy() & area.notna().to_numpy()
    cand = _keys(rows)[candidate].reset_index(drop=True)
    if cand.empty:
        raise ValueError(f"no annotated images without qc_reason for site {site!r} in {len(rows)} rows of {stores}")
    cand["positive"] = (area[candidate] > 0).to_numpy()

    manual = _keys(open_site_patches(stores, site, "manual").rows)
    manual["has_manual"] = True
    cand = cand.merge(manual.drop_duplicates(KEY), on=KEY, how="left")
    cand["has_manual"] = cand["has_manual"].fillna(False).astype(bool)
    cand = cand.sort_values(KEY, kind="stable").reset_index(drop=True)

    rng = np.random.default_rng(seed)
    by_eid = cand.groupby("eid")["positive"].any()
    split_of: dict[str, str] = {}
    for stratum in (True, False):
        eids = np.array(sorted(by_eid.index[by_eid == stratum]))
        eids = eids[rng.permutation(len(eids))]
        n_test = int(round(test_fraction * len(eids)))
        n_val = int(round(val_fraction * len(eids)))
        for i, e in enumerate(eids):
            split_of[e] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    cand["split"] = cand["eid"].map(split_of)

    for name in ("train", "val"):
        in_split = cand["split"] == name
        cand.loc[in_split & ~cand["has_manual"], "split"] = "unused"
        usable = in_split & cand["has_manual"]
        pos = np.flatnonzero(usable & cand["positive"])
        neg = np.flatnonzero(usable & ~cand["positive"])
        # Balance by sampling the larger class down to the smaller (negatives, in UKB's 10 % prevalence).
        larger, smaller = (neg, pos) if len(neg) >= len(pos) else (pos, neg)
        if len(larger) > len(smaller):
            keep = rng.choice(larger, size=len(smaller), replace=False)
            cand.loc[np.setdiff1d(larger, keep), "split"] = "unused"
            if larger is pos:
                log.warning("%s %s: more positives (%d) than negatives (%d); %d positives unused to balance",
                            site, name, len(pos), len(neg), len(pos) - len(neg))

    out = cand[KEY + ["split", "positive"]].copy()
    out["instance"] = out["instance"].astype(np.int16)
    counts = out.groupby(["split", "positive"]).size().unstack(fill_value=0)
    log.info("splits for %s (seed %d), images by split x positive:\n%s", site, seed, counts.to_string())
    return out


def read_splits(splits: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Read a split table (Parquet path or DataFrame) and check its columns."""
    df = splits if isinstance(splits, pd.DataFrame) else pd.read_parquet(splits)
    missing = {*KEY, "split", "positive"} - set(df.columns)
    if missing:
        where = "DataFrame" if isinstance(splits, pd.DataFrame) else str(splits)
        raise ValueError(f"split table {where} lacks columns {sorted(missing)}")
    bad = set(df["split"].unique()) - set(SPLITS)
    if bad:
        raise ValueError(f"split table has unknown split names {sorted(bad)}; expected {SPLITS}")
    return df


def split_counts(splits: pd.DataFrame) -> dict[str, dict[str, int]]:
    """``{split: {"n": images, "positive": positive images}}``."""
    out = {}
    for name in SPLITS:
        s = splits[splits["split"] == name]
        out[name] = {"n": int(len(s)), "positive": int(s["positive"].sum())}
    return out


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


# ---- prediction helper (training and evaluation) ---------------------------------------------


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


# ---- presence rule ---------------------------------------------------------------------------


def choose_presence_rule(
    model,
    *,
    stores: Sequence[str | Path] | str | Path,
    splits: str | Path | pd.DataFrame,
    site: str,
    prevalence: float | str = "auto",
    detect_threshold: float | str = "auto",
    batch_size: int = 32,
    seed: int = 1,
    max_population: int = POPULATION_SAMPLE,
) -> tuple[dict, dict]:
    """Choose a trained model's presence rule on the validation split, for the cohort's prevalence.

    The rule (:func:`hipoa.metrics.presence_from_probability`): present when at least
    ``min_area_px`` patch pixels reach ``detect_threshold``; the mask is the pixels >= 0.5. The
    pair minimises the errors expected at the site's prevalence: for each candidate detection
    threshold (:data:`DETECT_THRESHOLDS`, or the one given) :func:`hipoa.metrics.choose_min_area`
    picks ``min_area_px``, and the candidate with the best prevalence-weighted accuracy wins (ties:
    the higher threshold). The validation split is balanced, so its own balance says nothing
    about the cohort's; with ``prevalence="auto"`` it is estimated where the model will be used:

    1. at the detection threshold with the best Youden's J, ``T0``, the rule at prevalence 0.5,
       and its validation sensitivity ``s`` and specificity ``c``;
    2. ``q``, the fraction called present at ``T0`` among the measurable automatic-point patches
       of participants in no train or val split (a seeded sample of at most ``max_population``);
    3. prevalence ``= (q - (1 - c)) / (s + c - 1)`` (:func:`hipoa.metrics.estimate_prevalence`),
       kept within [0.01, 0.99].

    When that cannot be done (no such images, or ``s + c - 1 <= 0``) the prevalence is 0.5 and a
    warning says why. Scoring uses the validation images' automatic-point patches (as the model is
    used), or the manual centre crops where the stores have no automatic patches of them.

    Args:
        model: The trained U-Net.
        stores, splits, site: As for :func:`train_site`.
        prevalence: ``"auto"`` or the expected fraction of images with an osteophyte, in (0, 1).
        detect_threshold: ``"auto"`` (choose among :data:`DETECT_THRESHOLDS`) or a number in [0.5, 1].
        batch_size: Of ``model.predict``.
        seed: Of the population sample.
        max_population: Cap on the images predicted for the estimate.

    Returns:
        ``(presence, scores)``: ``presence`` is ``unet.json``'s rule (``pixel_threshold``,
        ``detect_threshold``, ``min_area_px``, ``prevalence``, ``prevalence_source``,
        ``candidates`` (per detection threshold: ``min_area_px``, ``weighted_accuracy``,
        ``youden_j``) and, when estimated, ``prevalence_estimate``, ``rule``); ``scores`` are the
        validation scores at the rule (:func:`hipoa.metrics.choose_min_area`) plus ``source``,
        ``dice_mean_positive`` and ``dice_mean_all``.
    """
    if detect_threshold == "auto":
        grid = DETECT_THRESHOLDS
    elif isinstance(detect_threshold, (int, float)) and PIXEL_THRESHOLD <= detect_threshold <= 1.0:
        grid = (float(detect_threshold),)
    else:
        raise ValueError(f"detect_threshold must be 'auto' or in [{PIXEL_THRESHOLD}, 1], got {detect_threshold!r}")
    if prevalence != "auto" and not (isinstance(prevalence, (int, float)) and 0.0 < prevalence < 1.0):
        raise ValueError(f"prevalence must be 'auto' or a number in (0, 1), got {prevalence!r}")
    table = read_splits(splits)
    val_rows = table[table["split"] == "val"]
    val_truth = val_rows["positive"].to_numpy(bool)
    source = "auto"
    try:
        auto = open_site_patches(stores, site, "auto")
        idx = patch_indices(auto.rows, val_rows, "auto patches")
        prob = predict_probability(model, auto.image, idx, batch_size=batch_size)
        truth_mask = read_masks(auto.mask, idx)
    except KeyError as exc:
        log.warning("presence rule %s: %s; choosing it on manual centre crops", site, exc)
        auto, source = None, "manual"
        manual = open_site_patches(stores, site, "manual")
        crop = (int(manual.image.shape[1]) - PATCH_SIZE) // 2
        idx = patch_indices(manual.rows, val_rows, "manual patches")
        prob = predict_probability(model, manual.image, idx, batch_size=batch_size, crop=crop)
        truth_mask = read_masks(manual.mask, idx, crop=crop)
    presence: dict = {"pixel_threshold": PIXEL_THRESHOLD}
    if val_truth.all() or not val_truth.any():
        log.warning("presence rule %s: the validation split is all one class; min_area_px defaults to 1", site)
        detect, min_area = grid[0], 1
        scores = {"n": int(len(val_truth)), "n_positive": int(val_truth.sum())}
        presence.update(prevalence=None, prevalence_source="none (validation split all one class)")
    else:
        counts = {t: predicted_area_px(prob, t) for t in grid}
        youden = {t: choose_min_area(counts[t], val_truth, 0.5) for t in grid}
        t_j = max(grid, key=lambda t: (round(youden[t][1]["youden_j"], 9), t))
        if youden[t_j][1]["youden_j"] <= 0:
            log.warning("presence rule %s: no rule separates the validation images (Youden's J %.3f); the model "
                        "has not learned to detect this site", site, youden[t_j][1]["youden_j"])
        if prevalence == "auto":
            pi, src, detail = _estimate_site_prevalence(
                model, auto, table, site, t_j, *youden[t_j], batch_size, seed, max_population
            )
        else:
            pi, src, detail = float(prevalence), "config", None
        chosen = {t: choose_min_area(counts[t], val_truth, pi) for t in grid}
        detect = max(grid, key=lambda t: (round(chosen[t][1]["weighted_accuracy"], 9), t))
        min_area, scores = chosen[detect]
        presence.update(prevalence=pi, prevalence_source=src)
        if detail is not None:
            presence["prevalence_estimate"] = detail
        presence["candidates"] = {
            str(t): {"min_area_px": int(chosen[t][0]), "weighted_accuracy": chosen[t][1]["weighted_accuracy"],
                     "youden_j": youden[t][1]["youden_j"]}
            for t in grid
        }
        log.info(
            "presence rule %s: prevalence %.3f (%s); detect_threshold %.2f, min_area_px %d (best stretch %s), "
            "val sensitivity %.3f, specificity %.3f; candidates %s",
            site, pi, src, detect, min_area, scores["stretch"], scores["sensitivity"], scores["specificity"],
            presence["candidates"],
        )
    presence["detect_threshold"] = float(detect)
    presence["min_area_px"] = int(min_area)
    presence["rule"] = PRESENCE_RULE
    _, mask, _, _ = presence_from_probability(prob, PIXEL_THRESHOLD, min_area, detect)
    d = dice(mask, truth_mask)
    scores.update(
        source=source,
        dice_mean_positive=float(d[val_truth].mean()) if val_truth.any() else float("nan"),
        dice_mean_all=float(d.mean()),
    )
    return presence, scores


def _estimate_site_prevalence(
    model, auto: PatchSet | None, table: pd.DataFrame, site: str, detect_threshold: float, t0: int,
    youden: dict, batch_size: int, seed: int, max_population: int,
) -> tuple[float, str, dict | None]:
    """``(prevalence, source, detail)`` for :func:`choose_presence_rule`'s ``"auto"``: the rule
    ``detect_threshold``, ``t0`` with validation scores ``youden``, applied to the cohort."""
    from hipoa.predict import measurable
    from hipoa.store import store_attrs

    fallback = 0.5
    if auto is None:
        log.warning("presence rule %s: no automatic patches to estimate the prevalence; using %.2f", site, fallback)
        return fallback, "fallback 0.5 (no automatic-point patches)", None
    min_inside = max(float(store_attrs(s).get("min_inside_fraction", 0.0)) for s in auto.rows["store"].unique())
    ok, _ = measurable(auto.rows, auto.inside, min_inside, auto.affine)
    fitted = set(table.loc[table["split"].isin(["train", "val"]), "eid"].astype(str))
    ok &= ~auto.rows["eid"].astype(str).isin(fitted).to_numpy()
    candidates = np.flatnonzero(ok)
    if candidates.size > max_population:
        candidates = np.sort(np.random.default_rng([seed, 7]).choice(candidates, max_population, replace=False))
    sens, spec = youden["sensitivity"], youden["specificity"]
    if candidates.size == 0 or not sens + spec - 1.0 > 0:
        why = "no measurable images outside train and val" if candidates.size == 0 else "Youden's J <= 0"
        log.warning("presence rule %s: cannot estimate the prevalence (%s); using %.2f", site, why, fallback)
        return fallback, f"fallback 0.5 ({why})", None
    prob = predict_probability(model, auto.image, candidates, batch_size=batch_size,
                               progress=f"presence rule {site}: images outside train and val (prevalence)")
    q = float((predicted_area_px(prob, detect_threshold) >= t0).mean())
    pi = float(np.clip(estimate_prevalence(q, sens, spec), 0.01, 0.99))
    detail = {
        "method": "adjusted classify-and-count at the Youden rule",
        "n_images": int(candidates.size), "detect_threshold": float(detect_threshold), "min_area_px": int(t0),
        "called_fraction": q, "val_sensitivity": sens, "val_specificity": spec,
    }
    return pi, "estimated", detail


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


def model_info_path(model: str | Path) -> Path:
    """The JSON beside a model (its model card): same stem, ``.json`` (:func:`hipoa.modelio.model_json_path`)."""
    from hipoa.modelio import model_json_path

    return model_json_path(model)


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
    info_path = model_info_path(src)
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
    with atomic_path(model_info_path(out)) as tmp:
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
