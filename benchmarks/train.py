"""Training throughput of the U-Net: patches per second and seconds per epoch, per precision.

Runs the real training path (hipoa.train_input.TrainingInput -> tf.data -> model.fit with
hipoa.train's callback container, Adam, sparse categorical cross-entropy) for a few steps per
precision, after one warm-up step, and prints:

- the training input alone (augmentation in the tf.data graph), patches/s;
- training, patches/s and the seconds an epoch of the paper's acetabulum training set would take
  (Table 1: 3,760 images x 20 samples with n_augment 19) and of its superior-femoral-head set
  (1,700 images x 8 samples).

Data: random context patches in memory (default), or the manual patches of a site in real stores
(``--stores ... --site ...``), read once into memory as training does.

Usage::

    python benchmarks/train.py --depth 4 --base-filters 64 --precision float32 mixed_bfloat16 --steps 5
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

PAPER_EPOCH_SAMPLES = {"lateral_acetabulum (3760 x 20)": 3760 * 20, "superior_femoral_head (1700 x 8)": 1700 * 8}


def _data(args):
    if args.stores:
        from hipoa.store import open_patches
        from hipoa.train_input import read_contexts

        ps = open_patches(args.stores, args.site, "manual")
        return read_contexts(ps.image, ps.mask, np.arange(min(len(ps.rows), args.images)))
    rng = np.random.default_rng(0)
    image = rng.normal(size=(args.images, 176, 176)).astype(np.float16)
    mask = (rng.random((args.images, 176, 176)) > 0.97).astype(np.uint8)
    return image, mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--base-filters", type=int, default=64)
    p.add_argument("--precision", nargs="+", default=["float32", "mixed_bfloat16"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per precision")
    p.add_argument("--n-augment", type=int, default=7)
    p.add_argument("--images", type=int, default=256, help="images in the sample pool")
    p.add_argument("--stores", nargs="*", default=None)
    p.add_argument("--site", default="lateral_acetabulum")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import keras

    from hipoa.augment import AugmentSettings
    from hipoa.precision import choose_policy
    from hipoa.train import callback_container
    from hipoa.train_input import TrainingInput
    from hipoa.unet import build_unet

    image, mask = _data(args)
    settings = AugmentSettings(0.1, 0.1, 0.05, 0.0)
    train = TrainingInput(image, mask, n_augment=args.n_augment, settings=settings,
                          batch_size=args.batch_size, seed=0, epochs=15)
    it = iter(train.dataset())
    next(it)  # tracing
    t = time.perf_counter()
    n = sum(int(next(it)[0].shape[0]) for _ in range(train.steps_per_epoch))
    aug_rate = n / (time.perf_counter() - t)
    print(f"training input (augment in tf.data), {len(image)} images x {1 + args.n_augment}: {aug_rate:,.0f} patches/s")

    batches = args.steps + 1
    for precision in args.precision:
        policy = choose_policy(precision)
        keras.utils.set_random_seed(0)
        model = build_unet(depth=args.depth, base_filters=args.base_filters, dtype=policy)
        opt = keras.optimizers.Adam()
        if policy == "mixed_float16":
            opt = keras.optimizers.LossScaleOptimizer(opt)
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy())
        ds = train.dataset()

        class Timer(keras.callbacks.Callback):
            """Clock after the warm-up (tracing) step is dispatched, and at the end (after Keras's sync)."""

            def on_train_batch_end(self, batch, logs=None):
                if batch == 0:
                    self.t0 = time.perf_counter()

            def on_train_end(self, logs=None):
                self.t1 = time.perf_counter()

        timer = Timer()
        callbacks = callback_container([timer], model=model, epochs=1, steps=batches)
        model.fit(ds, steps_per_epoch=batches, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
        rate = args.steps * args.batch_size / (timer.t1 - timer.t0)
        epochs = ", ".join(f"{name}: {s / rate:,.0f} s/epoch" for name, s in PAPER_EPOCH_SAMPLES.items())
        print(
            f"train depth {args.depth} base {args.base_filters} ({model.count_params():,} params) {policy:>15s}, "
            f"batch {args.batch_size}: {rate:,.1f} patches/s; {epochs}"
        )


if __name__ == "__main__":
    main()
