"""Benchmark the training input (hipoa.train_input) without a model, and against a simulated consumer.

On a synthetic patch store of realistic contexts (tests/unit/tiny_patch_store.py: smooth noise, a
bone band, osteophyte disks; 176 x 176 float16 images and uint8 masks), in one run:

- the one-time read of the contexts into memory (seconds);
- for n_augment 7 and 19, at each ``--appearance`` strength (0: geometric only; 1: the default
  appearance augmentation of hipoa.augment): samples/s of wall time and samples per CPU-second of
  this process (``time.process_time()``, all threads: tf.data's workers included), the pipeline
  alone, after warm-up. "Per core" below means per CPU-second used, so it does not depend on how
  many cores the machine lends;
- with a simulated consumer that takes ``batch_size / rate`` seconds per batch (a GPU training
  step that leaves the host CPU free: it sleeps), at each ``--consumer-rate``: the fraction of wall
  time the consumer is busy (goal >= 90 %) and the samples/s it gets.

The last line is ``train_input: <samples/s per core> samples/s/core``: the lower of the two
n_augment figures at the last ``--appearance`` strength (goal >= 2,000 geometric only).

    python benchmarks/train_input.py [--images 1000] [--batch-size 32] [--seconds 8]
                                     [--consumer-rate 500 2000] [--appearance 0 1]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))

log = logging.getLogger("benchmarks.train_input")


def pipeline_rate(train, seconds: float) -> tuple[float, float, int]:
    """Samples/s of wall time and per CPU-second, iterating ``train.dataset()`` for ``seconds``."""
    it = iter(train.dataset())
    for _ in range(3):  # warm-up: tracing, thread pools, autotuning's first guesses
        next(it)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        n += int(next(it)[0].shape[0])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n / wall, n / cpu, n


def consumer_busy(train, rate: float, seconds: float) -> tuple[float, float]:
    """Fraction of wall time a consumer of ``rate`` samples/s is busy, and the samples/s it gets.

    The consumer takes each batch inside a ``tf.function``, as Keras's train step does (the
    iterator's ``get_next`` is part of the step's graph), then is busy ``B / rate`` seconds (it
    sleeps, leaving the CPU to the input pipeline, as an accelerator would).
    """
    import tensorflow as tf

    @tf.function
    def take(iterator):
        x, _ = next(iterator)
        return tf.shape(x)[0]

    it = iter(train.dataset())
    take(it)
    time.sleep(1.0)  # let the prefetch buffer fill once, as during a real first step's tracing
    busy, n, t0 = 0.0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = int(take(it))
        step = b / rate
        time.sleep(step)
        busy += step
        n += b
    wall = time.perf_counter() - t0
    return busy / wall, n / wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000, help="context patches in the synthetic store")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per measurement")
    p.add_argument("--consumer-rate", type=float, nargs="+", default=[500.0, 2000.0], help="samples/s")
    p.add_argument("--appearance", type=float, nargs="+", default=[0.0, 1.0],
                   help="appearance strengths (AugmentSettings.appearance); the consumer runs at the last")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import os

    import tensorflow as tf
    from tiny_patch_store import write_tiny_store

    from hipoa.augment import AugmentSettings
    from hipoa.splits import open_site_patches
    from hipoa.train_input import TrainingInput, read_contexts

    import dataclasses

    settings = AugmentSettings(rotation=0.1, scale=0.1, displacement=0.05, appearance=0.0)  # the acetabulum's ranges
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        store = write_tiny_store(Path(tmp) / "shard-0000.zarr", eids=[str(1_000_000 + i) for i in range(args.images)])
        made = time.perf_counter() - t
        manual = open_site_patches(store, "lateral_acetabulum", "manual")
        t = time.perf_counter()
        image, mask = read_contexts(manual.image, manual.mask, np.arange(len(manual.rows)))
        read = time.perf_counter() - t
    print(f"cores: {os.cpu_count()}; TF intra-op threads {tf.config.threading.get_intra_op_parallelism_threads()} (0 = all)")
    print(f"store: {len(image)} contexts {image.shape[1]}x{image.shape[2]} float16 + uint8 masks "
          f"({(image.nbytes + mask.nbytes) / 1e6:.0f} MB), written in {made:.1f} s, read once in {read:.2f} s")

    for appearance in args.appearance:
        settings = dataclasses.replace(settings, appearance=appearance)
        per_core = []
        for n_augment in (7, 19):
            train = TrainingInput(image, mask, n_augment=n_augment, settings=settings, batch_size=args.batch_size,
                                  seed=1, epochs=15)
            wall_rate, cpu_rate, n = pipeline_rate(train, args.seconds)
            per_core.append(cpu_rate)
            print(f"pipeline alone, n_augment {n_augment:2d}, appearance {appearance:g}: {wall_rate:,.0f} samples/s "
                  f"wall, {cpu_rate:,.0f} samples per CPU-second ({n:,} samples)")
    train = TrainingInput(image, mask, n_augment=7, settings=settings, batch_size=args.batch_size, seed=1,
                          epochs=15)
    for rate in args.consumer_rate:
        busy, got = consumer_busy(train, rate, args.seconds)
        print(f"consumer at {rate:,.0f} samples/s (n_augment 7, appearance {settings.appearance:g}): "
              f"busy {100 * busy:.1f} % of wall time, got {got:,.0f} samples/s")
    print(f"train_input: {min(per_core):.0f} samples/s/core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
