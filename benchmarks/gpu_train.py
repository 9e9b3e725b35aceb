"""Helpers of benchmarks/gpu.sh: training from the real input against a constant batch, and a predict store.

``train``: a U-Net (paper size by default: depth 4, 64 base filters, ``mixed_bfloat16``) trained
for ``--steps`` steps by ``model.fit`` (Adam, sparse categorical cross-entropy, hipoa.train's
callback container, which reads no batch logs) from

- the real training input (:class:`hipoa.train_input.TrainingInput` on ``--images`` synthetic
  176 x 176 contexts in memory, n_augment ``--n-augment``), and
- a constant batch repeated (the bound: the same shapes with no input work at all);

prints samples/s of each and their ratio (goal >= 0.8).

``store``: a sealed patch store of ``--n`` synthetic 128 x 128 patches of one site (smoothed
noise, a bright band, disks on half of them; the patch-store layout of docs/DESIGN.md) and a
randomly initialised U-Net of the given size with its model card, for ``hipoa predict-masks``.

    python benchmarks/gpu_train.py train [--steps 200] [--batch-size 32] [--depth 4] [--base-filters 64]
    python benchmarks/gpu_train.py store --n 120000 --out W/shard-0000.zarr --model W/unet.keras
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

SITE = "lateral_acetabulum"
BLOCK = 4096
"""Patches synthesised and written per block (about 130 MB of float32 scratch)."""


def _smooth_noise(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``(n, size, size)`` float32 z-scored patches: smoothed noise, a bright band, disks on half."""
    from scipy import ndimage

    img = ndimage.uniform_filter(rng.standard_normal((n, size, size), dtype=np.float32), size=(1, 5, 5))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, n).astype(np.float32)[:, None, None]
    band = np.cos(angle) * (xx - size / 2) + np.sin(angle) * (yy - size / 2)
    img += 2.0 / (1.0 + np.exp(-(band - 30.0) / 3.0))
    cx, cy = (rng.uniform(0.35, 0.65, (2, n)) * size).astype(np.float32)[:, :, None, None]
    disk = ((xx - cx) ** 2 + (yy - cy) ** 2 <= 64.0) & (rng.random(n) < 0.5)[:, None, None]
    img += 1.5 * disk
    img -= img.mean(axis=(1, 2), keepdims=True)
    img /= img.std(axis=(1, 2), keepdims=True)
    return img, disk.astype(np.uint8)


def train(args: argparse.Namespace) -> None:
    import keras
    import tensorflow as tf

    from hipoa.augment import AugmentSettings
    from hipoa.precision import choose_policy
    from hipoa.train import callback_container
    from hipoa.train_input import TrainingInput
    from hipoa.unet import build_unet

    print(f"devices: {[d.name for d in tf.config.list_logical_devices()]}")
    policy = choose_policy(args.policy)
    image, mask = _smooth_noise(np.random.default_rng(0), args.images, 176)
    real = TrainingInput(image.astype(np.float16), mask, n_augment=args.n_augment, batch_size=args.batch_size,
                         settings=AugmentSettings(0.1, 0.1, 0.05, 0.0), seed=1, epochs=15)
    constant = tf.data.Dataset.from_tensors(next(iter(real.dataset()))).repeat()
    keras.utils.set_random_seed(1)
    model = build_unet(depth=args.depth, base_filters=args.base_filters, dtype=policy)
    model.compile(optimizer=keras.optimizers.Adam(), loss=keras.losses.SparseCategoricalCrossentropy())
    print(f"U-Net depth {args.depth}, {args.base_filters} base filters, {model.count_params():,} parameters, "
          f"{policy}, batch {args.batch_size}, {args.steps} steps")

    def fit(ds, steps: int) -> float:
        callbacks = callback_container([], model=model, epochs=1, steps=steps)
        t0 = time.perf_counter()
        model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
        return time.perf_counter() - t0  # fit ends with the epoch's logs read: the device is done

    fit(constant, args.warmup)  # tracing and autotuning, not timed
    fit(real.dataset(), args.warmup)
    rates = {}
    for name, ds in (("constant batch (bound)", constant), ("training input", real.dataset())):
        rates[name] = args.steps * args.batch_size / fit(ds, args.steps)
        print(f"train from {name}: {rates[name]:,.0f} samples/s")
    ratio = rates["training input"] / rates["constant batch (bound)"]
    print(f"gpu_train: {ratio:.2f} of the constant-input bound")


def store(args: argparse.Namespace) -> None:
    import zarr

    from hipoa.modelio import write_model_card
    from hipoa.sites import DEFAULT_SITES, PATCH_SIZE
    from hipoa.store import seal_store
    from hipoa.modelio import write_model
    from hipoa.unet import build_unet

    n, t0 = args.n, time.perf_counter()
    root = zarr.open_group(str(args.out), mode="w")
    root.attrs.update({
        "hipoa_version": "benchmark", "side": "L", "shard": 0, "patch_size": PATCH_SIZE, "context_size": 176,
        "normalisation": "synthetic", "fill": 0.0, "min_inside_fraction": 0.9,
        "sites": {s.name: s.to_dict() for s in DEFAULT_SITES if s.name == SITE},
    })
    rows = {
        "eid": np.array([str(9_000_000 + i) for i in range(n)]), "instance": np.full(n, 2, np.int16),
        "side": np.array(["L"] * n), "qc_reason": np.array([""] * n), "annotated": np.zeros(n, bool),
        "reference_length_mm": np.full(n, 50.0), "spacing_row_mm": np.full(n, 0.25),
        "spacing_col_mm": np.full(n, 0.25), "rows": np.full(n, 600, np.int32), "cols": np.full(n, 680, np.int32),
    }
    for name, values in rows.items():
        root.create_array(f"rows/{name}", shape=(n,), dtype=str if values.dtype.kind == "U" else values.dtype)[:] = values
    group = root.create_group(f"auto/{SITE}")
    image = group.create_array("image", shape=(n, PATCH_SIZE, PATCH_SIZE), chunks=(32, PATCH_SIZE, PATCH_SIZE),
                               dtype="float16")
    group.create_array("mask", shape=(n, PATCH_SIZE, PATCH_SIZE), chunks=(32, PATCH_SIZE, PATCH_SIZE), dtype="uint8")
    group.create_array("affine", shape=(n, 2, 3), dtype="float64")[...] = np.tile(
        np.array([[1.0, 0.0, 200.0], [0.0, 1.0, 100.0]]), (n, 1, 1))
    group.create_array("inside", shape=(n,), dtype="float32")[...] = np.ones(n, np.float32)
    rng = np.random.default_rng(0)
    for i in range(0, n, BLOCK):
        image[i : i + BLOCK] = _smooth_noise(rng, min(BLOCK, n - i), PATCH_SIZE)[0].astype(np.float16)
    seal_store(args.out)
    model = build_unet(depth=args.depth, base_filters=args.base_filters)
    write_model(model, args.model)
    write_model_card(args.model, {"site": SITE, "presence": {"pixel_threshold": 0.5, "min_area_px": 20}})
    print(f"store: {n:,} patches of {SITE} in {args.out}, model {args.model}; {time.perf_counter() - t0:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--warmup", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--images", type=int, default=1500)
    t.add_argument("--n-augment", type=int, default=7)
    t.add_argument("--policy", default="mixed_bfloat16")
    s = sub.add_parser("store")
    s.add_argument("--n", type=int, default=120_000)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--model", type=Path, required=True)
    for q in (t, s):
        q.add_argument("--depth", type=int, default=4)
        q.add_argument("--base-filters", type=int, default=64)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    train(args) if args.command == "train" else store(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
