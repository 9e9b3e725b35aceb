"""Training throughput with and without the scanner appearance augmentation and the boundary-tolerant loss.

Runs the real training path (hipoa.train_input.TrainingInput -> tf.data -> model.fit with
hipoa.train's callback container and loss, Adam) on synthetic contexts in memory
(tests/unit/tiny_patch_store.py), for each recipe:

- ``paper``: geometric augmentation only, plain cross-entropy (hipoa before issue 15);
- ``robust``: ``appearance`` 1 and ``boundary_weight`` 0.5 (the defaults since);

and prints, per recipe, the training input alone (patches/s of wall time and per CPU-second) and
training (patches/s, after one warm-up step). The U-Net is the demo's by default (depth 3, 16
filters), where the CPU trains.

    python benchmarks/appearance.py [--images 64] [--steps 20] [--batch-size 16] [--depth 3] [--base-filters 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))

RECIPES = {"paper": (0.0, 1.0), "robust": (1.0, 0.5)}
"""Recipe -> (appearance strength, boundary_weight)."""


def input_rate(train, batches: int) -> tuple[float, float]:
    """Patches/s of wall time and per CPU-second over ``batches`` batches, after warm-up."""
    it = iter(train.dataset())
    for _ in range(3):
        next(it)
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for _ in range(batches):
        n += int(next(it)[0].shape[0])
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def train_rate(train, *, steps: int, depth: int, base_filters: int, boundary_weight: float) -> float:
    """Training patches/s over ``steps`` steps after one warm-up (tracing) step."""
    import keras

    from hipoa.train import callback_container, pixel_loss
    from hipoa.unet import build_unet

    keras.utils.set_random_seed(0)
    model = build_unet(depth=depth, base_filters=base_filters, dtype="float32")
    model.compile(optimizer=keras.optimizers.Adam(), loss=pixel_loss(boundary_weight))

    class Timer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                self.t0 = time.perf_counter()

        def on_train_end(self, logs=None):
            self.t1 = time.perf_counter()

    timer = Timer()
    callbacks = callback_container([timer], model=model, epochs=1, steps=steps + 1)
    model.fit(train.dataset(), steps_per_epoch=steps + 1, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
    return steps * train.batch_size / (timer.t1 - timer.t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64, help="context patches in the synthetic store")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per recipe")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--base-filters", type=int, default=16)
    p.add_argument("--n-augment", type=int, default=7)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import os

    from tiny_patch_store import write_tiny_store

    from hipoa.augment import AugmentSettings
    from hipoa.splits import open_site_patches
    from hipoa.train_input import TrainingInput, read_contexts

    with tempfile.TemporaryDirectory() as tmp:
        store = write_tiny_store(Path(tmp) / "shard-0000.zarr", eids=[str(9_000_000 + i) for i in range(args.images)])
        manual = open_site_patches(store, "lateral_acetabulum", "manual")
        image, mask = read_contexts(manual.image, manual.mask, np.arange(len(manual.rows)))
    print(f"cores: {os.cpu_count()}; {len(image)} contexts, n_augment {args.n_augment}, batch {args.batch_size}, "
          f"U-Net depth {args.depth}, {args.base_filters} base filters, float32")
    geometric = AugmentSettings(rotation=0.1, scale=0.1, displacement=0.05, appearance=0.0)
    for name, (appearance, boundary_weight) in RECIPES.items():
        settings = dataclasses.replace(geometric, appearance=appearance)
        train = TrainingInput(image, mask, n_augment=args.n_augment, settings=settings, batch_size=args.batch_size,
                              seed=1, epochs=2)
        wall, cpu = input_rate(train, max(40, args.steps))
        rate = train_rate(train, steps=args.steps, depth=args.depth, base_filters=args.base_filters,
                          boundary_weight=boundary_weight)
        print(f"{name:>6s} (appearance {appearance:g}, boundary_weight {boundary_weight:g}): input alone "
              f"{wall:,.0f} patches/s wall, {cpu:,.0f} per CPU-second; training {rate:,.1f} patches/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
