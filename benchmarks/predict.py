"""Benchmark the predict step against a bare ``model.predict`` on the same patches.

In one run, on the same patches of a real Zarr patch store (``--store``, or a synthetic store in
the patch-store layout: smooth noise, a bright band and disks):

- *bare*: ``model.predict(x, batch_size=B)`` on the patches already in memory (warmed up);
- *predict step*: what a job does per shard once its models are loaded
  (:func:`hipoa.predict.predict_shards` loads them once for many shards): read the patches from
  Zarr (prefetching reader threads), the model and the on-device presence rule, the copy back of
  per-image scalars and present masks, connected components, and the Parquet and mask-Zarr
  writes; warmed up, fastest of ``--repeats``;
- the ratio of the two (goal <= 1.1 on a CPU), and the cold ``predict_shard`` (load, trace,
  predict, write) for reference;
- a simulated accelerator: the prefetching reader feeding a consumer that takes ``B / rate``
  seconds per batch (``--sim-rate`` patches/s, default 10,000), and how busy it is kept.

The U-Net is ``results/models/{site}/unet.keras`` when it exists (trained), else a randomly
initialised :func:`hipoa.unet.build_unet` (said in the output).

    python benchmarks/predict.py [--n 256 | --store S.zarr] [--model M.keras] [--batch-size 32]
                                 [--repeats 2] [--random] [--depth 4] [--base-filters 64]
                                 [--policy float32] [--sim-rate 10000]

Figures are printed (the last line: ``predict: <ratio> x bare model.predict (<patches/s>)``) and
written to ``benchmarks/out/predict.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from hipoa import predict
from hipoa.modelio import ModelCard, PresenceRule, model_json_path, write_model_card
from hipoa.sites import DEFAULT_SITES, PATCH_SIZE

log = logging.getLogger("benchmarks.predict")


def synthetic_store(path: Path, n: int, seed: int = 0) -> Path:
    """A one-site-per-default-site patch store of ``n`` synthetic patches (docs/DESIGN.md layout)."""
    import zarr
    from scipy import ndimage

    from hipoa.store import seal_store

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:PATCH_SIZE, 0:PATCH_SIZE]
    images = np.empty((n, PATCH_SIZE, PATCH_SIZE), np.float16)
    for i in range(n):
        noise = ndimage.gaussian_filter(rng.normal(0, 1, (PATCH_SIZE, PATCH_SIZE)), 1.5) * 2.0
        angle = rng.uniform(0, 2 * np.pi)
        band = np.cos(angle) * (xx - 64) + np.sin(angle) * (yy - 64)
        img = 0.4 * noise + 2.0 / (1.0 + np.exp(-(band - rng.uniform(20, 40)) / 3.0)) - 1.0
        if rng.random() < 0.5:
            cx, cy, r = rng.uniform(40, 88, 2).tolist() + [rng.uniform(4, 10)]
            img += 1.5 * (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r)
        images[i] = img
    root = zarr.open_group(str(path), mode="w")
    root.attrs.update(
        {
            "hipoa_version": "benchmark",
            "side": "L",
            "shard": 0,
            "patch_size": PATCH_SIZE,
            "context_size": 176,
            "normalisation": "synthetic",
            "fill": 0.0,
            "sites": {s.name: s.to_dict() for s in DEFAULT_SITES},
            "min_inside_fraction": 0.9,
        }
    )
    rows = {
        "eid": np.array([str(1_000_000 + i) for i in range(n)]),
        "instance": np.full(n, 2, np.int16),
        "side": np.array(["L"] * n),
        "qc_reason": np.array([""] * n),
        "annotated": np.zeros(n, bool),
        "reference_length_mm": np.full(n, 50.0),
        "spacing_row_mm": np.full(n, 0.25),
        "spacing_col_mm": np.full(n, 0.25),
        "rows": np.full(n, 600, np.int32),
        "cols": np.full(n, 680, np.int32),
    }
    g = root.create_group("rows")
    for name, values in rows.items():
        g.create_array(name, shape=(n,), dtype=str if values.dtype.kind == "U" else values.dtype)[:] = values
    affine = np.tile(np.array([[1.0, 0.0, 200.0], [0.0, 1.0, 100.0]]), (n, 1, 1))
    for s in DEFAULT_SITES:
        a = root.create_group(f"auto/{s.name}")
        a.create_array("image", shape=images.shape, chunks=(32, PATCH_SIZE, PATCH_SIZE), dtype="float16")[...] = images
        a.create_array("mask", shape=images.shape, chunks=(32, PATCH_SIZE, PATCH_SIZE), dtype="uint8")
        a.create_array("affine", shape=(n, 2, 3), dtype="float64")[...] = affine
        a.create_array("inside", shape=(n,), dtype="float32")[...] = np.ones(n, np.float32)
    seal_store(path)  # readers refuse a store without its completion marker
    return path


def get_model(
    site: str, work: Path, depth: int, base_filters: int, min_area_px: int, random: bool = False,
    model: Path | None = None,
) -> tuple[Path, str]:
    """``model`` if given, else the trained model of ``site`` under results/models (unless ``random``),
    else a random U-Net."""
    if model is not None:
        if not model.is_file() or not model_json_path(model).is_file():
            raise FileNotFoundError(f"--model {model}: the .keras file or the .json beside it is missing")
        return model, f"trained ({model})"
    trained = Path("results/models") / site / "unet.keras"
    if not random and trained.is_file() and model_json_path(trained).is_file():
        return trained, f"trained ({trained})"
    import keras

    from hipoa.unet import build_unet

    keras.utils.set_random_seed(1)
    model = build_unet(depth=depth, base_filters=base_filters)
    path = work / "unet.keras"
    model.save(path)
    write_model_card(path, ModelCard(presence=PresenceRule(0.5, min_area_px, 0.5)))
    return path, f"randomly initialised build_unet(depth={depth}, base_filters={base_filters}), seed 1"


def simulated_busy(image, idx: np.ndarray, batch_size: int, rate: float, passes: int) -> tuple[float, float]:
    """``(busy fraction, patches/s)`` of a consumer taking ``batch_size / rate`` s per batch, fed
    by the prefetching reader (:func:`hipoa.infer.prefetch_batches`) over ``idx`` ``passes`` times."""
    from hipoa.infer import prefetch_batches

    every = np.tile(idx, passes)
    busy = 0.0
    w = time.perf_counter()
    for b, _ in prefetch_batches(image, every, batch_size):
        t = batch_size / rate
        time.sleep(t)  # the accelerator's work on the batch; the reader runs meanwhile
        busy += t
    wall = time.perf_counter() - w
    return busy / wall, len(every) / wall


def timed(fn, repeats: int) -> tuple[float, float]:
    """``(wall s, process CPU s)`` of ``fn()``, the fastest of ``repeats``."""
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="patches (synthetic store)")
    p.add_argument("--store", type=Path, help="an existing shard store instead of a synthetic one")
    p.add_argument("--site", default=DEFAULT_SITES[1].name)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", type=Path, help="a trained unet.keras (default: results/models/SITE/unet.keras)")
    p.add_argument("--random", action="store_true", help="a random U-Net even where a trained one exists")
    p.add_argument("--depth", type=int, default=4, help="random U-Net depth (paper: 4)")
    p.add_argument("--base-filters", type=int, default=64, help="random U-Net width (paper: 64)")
    p.add_argument("--min-area-px", type=int, default=20, help="presence rule of a random U-Net")
    p.add_argument("--policy", default="float32", help="float32, mixed_bfloat16 or mixed_float16")
    p.add_argument("--repeats", type=int, default=2, help="timings are the fastest of this many runs")
    p.add_argument("--sim-rate", type=float, default=10_000.0, help="simulated accelerator, patches/s")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/predict.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    from hipoa.store import open_patches

    work = Path(tempfile.mkdtemp(prefix="hipoa-bench-predict-"))
    store = args.store or synthetic_store(work / "shard-0000.zarr", args.n)
    model_path, model_kind = get_model(args.site, work, args.depth, args.base_filters, args.min_area_px, args.random,
                                      args.model)
    models = {args.site: model_path}
    ps = open_patches([store], args.site)
    ok, _ = predict.measurable(ps.rows, ps.inside, 0.9, ps.affine)
    idx = np.flatnonzero(ok)
    x = ps.image[idx].compute().astype(np.float32)[..., None]
    n, bs = len(x), args.batch_size

    cold, _ = timed(lambda: predict.predict_shard(store=store, models=models, out=work / "cold.parquet",
                                                  masks_out=work / "cold.zarr", batch_size=bs,
                                                  precision=args.policy), 1)
    engines = predict.load_site_models(models, args.policy)
    model = engines[args.site].model
    model.predict(x[:bs], batch_size=bs, verbose=0)  # warm-up: trace once, as the step below does
    step = lambda: predict.predict_store(store, engines, work / "p.parquet", work / "p.zarr", bs)  # noqa: E731
    step()
    # Interleaved, so both see the same machine state.
    bare_s, bare_cpu, step_s, step_cpu = [], [], [], []
    for _ in range(args.repeats):
        b = timed(lambda: model.predict(x, batch_size=bs, verbose=0), 1)
        s = timed(step, 1)
        bare_s.append(b[0]), bare_cpu.append(b[1]), step_s.append(s[0]), step_cpu.append(s[1])
    busy, sim_rate = simulated_busy(ps.image, idx, bs, args.sim_rate, passes=max(1, 20_000 // max(n, 1)))

    res = {
        "model": model_kind, "patches": n, "batch_size": bs, "site": args.site, "policy": args.policy,
        "repeats": args.repeats, "bare_predict_s": min(bare_s), "bare_patches_per_s": n / min(bare_s),
        "predict_step_s": min(step_s), "predict_step_patches_per_s": n / min(step_s),
        "ratio_step_to_bare": min(step_s) / min(bare_s), "cpu_time_ratio_step_to_bare": min(step_cpu) / min(bare_cpu),
        "cold_predict_shard_s": cold, "sim_rate_patches_per_s": args.sim_rate, "sim_busy_fraction": busy,
        "sim_reader_patches_per_s": sim_rate,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"model: {model_kind}; {n} patches of {args.site}, batch {bs}, {args.policy}")
    print(f"bare model.predict: {res['bare_patches_per_s']:.1f} patches/s; predict step (Zarr read, model, on-device "
          f"rule, copy back, components, writes): {res['predict_step_patches_per_s']:.1f} patches/s; "
          f"CPU-time ratio {res['cpu_time_ratio_step_to_bare']:.3f}; cold predict_shard (load, trace) {cold:.2f} s")
    print(f"simulated accelerator at {args.sim_rate:.0f} patches/s: kept {100 * busy:.1f} % busy by the reader "
          f"({sim_rate:.0f} patches/s)")
    print(f"written: {args.out}")
    print(f"predict: {res['ratio_step_to_bare']:.3f} x bare model.predict ({res['predict_step_patches_per_s']:.1f} "
          f"patches/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
