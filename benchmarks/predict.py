"""Benchmark the predict step: hipoa.predict.predict_shard against a bare ``model.predict``.

On the same patches, in one run, for float32 and mixed_bfloat16:

- patches/s of ``predict_shard`` end to end (model load, Zarr reads through Dask, presence,
  areas, Parquet and mask Zarr writes) and of a bare, warmed-up ``model.predict`` on the same
  patches already in memory (also a cold one: load, trace and predict, as any job must); their
  wall-time ratio (goal <= 1.2), and their process CPU-time ratio, which other users of a shared
  machine disturb less;
- the bfloat16 speed-up over float32;
- the agreement of bfloat16 with float32: Dice between their predicted masks (goal >= 0.99),
  pooled over all pixels and per patch, presence agreement and the largest probability change.

The U-Net is ``results/models/{site}/unet.keras`` when it exists (trained), else a randomly
initialised :func:`hipoa.unet.build_unet` (said in the output). Patches come from ``--store``
or from a synthetic store in the patch-store layout (smooth noise, a bright band and disks).

    python benchmarks/predict.py [--n 128 | --store S.zarr] [--model M.keras] [--batch-size 32]
                                 [--repeats 1] [--random]
                                 [--depth 4] [--base-filters 64]

Figures are printed and written to ``benchmarks/out/predict.json``.
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
from hipoa.sites import DEFAULT_SITES, PATCH_SIZE

log = logging.getLogger("benchmarks.predict")


def synthetic_store(path: Path, n: int, seed: int = 0) -> Path:
    """A one-site-per-default-site patch store of ``n`` synthetic patches (docs/DESIGN.md layout)."""
    import zarr
    from scipy import ndimage

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
    return path


def get_model(
    site: str, work: Path, depth: int, base_filters: int, min_area_px: int, random: bool = False,
    model: Path | None = None,
) -> tuple[Path, str]:
    """``model`` if given, else the trained model of ``site`` under results/models (unless ``random``),
    else a random U-Net."""
    if model is not None:
        if not model.is_file() or not predict.model_json_path(model).is_file():
            raise FileNotFoundError(f"--model {model}: the .keras file or the .json beside it is missing")
        return model, f"trained ({model})"
    trained = Path("results/models") / site / "unet.keras"
    if not random and trained.is_file() and predict.model_json_path(trained).is_file():
        return trained, f"trained ({trained})"
    import keras

    from hipoa.unet import build_unet

    keras.utils.set_random_seed(1)
    model = build_unet(depth=depth, base_filters=base_filters)
    path = work / "unet.keras"
    model.save(path)
    predict.model_json_path(path).write_text(
        json.dumps({"presence": {"pixel_threshold": 0.5, "min_area_px": min_area_px}})
    )
    return path, f"randomly initialised build_unet(depth={depth}, base_filters={base_filters}), seed 1"


def pooled_dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    den = a.sum() + b.sum()
    return 1.0 if den == 0 else float(2 * (a & b).sum() / den)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=128, help="patches (synthetic store)")
    p.add_argument("--store", type=Path, help="an existing shard store instead of a synthetic one")
    p.add_argument("--site", default=DEFAULT_SITES[1].name)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", type=Path, help="a trained unet.keras (default: results/models/SITE/unet.keras)")
    p.add_argument("--random", action="store_true", help="a random U-Net even where a trained one exists")
    p.add_argument("--depth", type=int, default=4, help="random U-Net depth (paper: 4)")
    p.add_argument("--base-filters", type=int, default=64, help="random U-Net width (paper: 64)")
    p.add_argument("--min-area-px", type=int, default=20, help="presence rule of a random U-Net")
    p.add_argument("--repeats", type=int, default=1, help="timings are the fastest of this many runs")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/predict.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import zarr

    from hipoa.metrics import dice
    from hipoa.precision import cpu_flags
    from hipoa.store import open_patches

    work = Path(tempfile.mkdtemp(prefix="hipoa-bench-predict-"))
    store = args.store or synthetic_store(work / "shard-0000.zarr", args.n)
    model_path, model_kind = get_model(args.site, work, args.depth, args.base_filters, args.min_area_px, args.random,
                                      args.model)
    ps = open_patches([store], args.site)
    ok = ps.rows["qc_reason"].eq("").to_numpy() & (ps.inside >= 0.9)
    x = ps.image[np.flatnonzero(ok)].compute().astype(np.float32)[..., None]
    n = len(x)
    log.info("model: %s; %d patches", model_kind, n)

    res: dict = {"model": model_kind, "patches": n, "batch_size": args.batch_size, "site": args.site,
                 "repeats": args.repeats,
                 "cpu_bf16_flags": sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"})}
    probs, masks = {}, {}
    for policy in ("float32", "mixed_bfloat16"):
        bare, bare_cpu, cold, shard, shard_cpu = [], [], [], [], []
        for _ in range(args.repeats):
            # cold: what a plain script does (load, trace, predict); then warm: the same call again
            w = time.perf_counter()
            model = predict.load_model(model_path, policy)
            model.predict(x, batch_size=args.batch_size, verbose=0)
            cold.append(time.perf_counter() - w)
            w, c = time.perf_counter(), time.process_time()
            out = model.predict(x, batch_size=args.batch_size, verbose=0)
            bare.append(time.perf_counter() - w)
            bare_cpu.append(time.process_time() - c)
            probs[policy] = predict.class1_probability(out)
            del model

            w, c = time.perf_counter(), time.process_time()
            df = predict.predict_shard(store=store, models={args.site: model_path}, out=work / f"{policy}.parquet",
                                       masks_out=work / f"{policy}.zarr", batch_size=args.batch_size,
                                       precision=policy)
            shard.append(time.perf_counter() - w)
            shard_cpu.append(time.process_time() - c)
        masks[policy] = zarr.open_group(str(work / f"{policy}.zarr"), mode="r")[f"{args.site}/mask"][:][ok]
        res[policy] = {
            "bare_predict_s": min(bare),
            "bare_patches_per_s": n / min(bare),
            "predict_shard_s": min(shard),
            "predict_shard_patches_per_s": n / min(shard),
            "ratio_shard_to_bare": min(shard) / min(bare),
            "bare_cold_s": min(cold),
            "ratio_shard_to_bare_cold": min(shard) / min(cold),
            "bare_cpu_s": min(bare_cpu),
            "predict_shard_cpu_s": min(shard_cpu),
            "cpu_time_ratio_shard_to_bare": min(shard_cpu) / min(bare_cpu),
            "present": int(df[f"{args.site}_present"].sum()),
        }
    f32, b16 = "float32", "mixed_bfloat16"
    either = (masks[f32].any(axis=(1, 2))) | (masks[b16].any(axis=(1, 2)))
    per_patch = np.atleast_1d(dice(masks[b16][either], masks[f32][either])) if either.any() else np.array([1.0])
    res["bf16_speedup_bare"] = res[f32]["bare_predict_s"] / res[b16]["bare_predict_s"]
    res["bf16_speedup_shard"] = res[f32]["predict_shard_s"] / res[b16]["predict_shard_s"]
    res["dice_bf16_vs_f32_masks_pooled"] = pooled_dice(masks[b16], masks[f32])
    res["dice_bf16_vs_f32_masks_per_patch_mean"] = float(np.mean(per_patch))
    res["dice_bf16_vs_f32_masks_per_patch_min"] = float(np.min(per_patch))
    res["dice_bf16_vs_f32_pixels_p>=0.5_pooled"] = pooled_dice(probs[b16] >= 0.5, probs[f32] >= 0.5)
    res["presence_agreement"] = float(np.mean(masks[b16].any(axis=(1, 2)) == masks[f32].any(axis=(1, 2))))
    res["max_abs_prob_diff"] = float(np.abs(probs[b16] - probs[f32]).max())

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"model: {model_kind}; {n} patches of {args.site}, batch {args.batch_size}; "
          f"CPU bf16 flags: {res['cpu_bf16_flags'] or 'none'}")
    for policy in (f32, b16):
        r = res[policy]
        print(f"{policy:>15}: bare model.predict {r['bare_patches_per_s']:.2f} patches/s, predict_shard "
              f"{r['predict_shard_patches_per_s']:.2f} patches/s, ratio {r['ratio_shard_to_bare']:.3f} (goal <= 1.2); "
              f"CPU-time ratio {r['cpu_time_ratio_shard_to_bare']:.3f}; ratio to a cold load+predict "
              f"{r['ratio_shard_to_bare_cold']:.3f}")
    print(f"bf16 speed-up: bare {res['bf16_speedup_bare']:.2f}x, predict_shard {res['bf16_speedup_shard']:.2f}x")
    print(f"bf16 vs f32 masks: Dice pooled {res['dice_bf16_vs_f32_masks_pooled']:.4f} (goal >= 0.99), per patch "
          f"mean {res['dice_bf16_vs_f32_masks_per_patch_mean']:.4f} "
          f"min {res['dice_bf16_vs_f32_masks_per_patch_min']:.4f}"
          f" over {int(either.sum())} patches; thresholded pixels {res['dice_bf16_vs_f32_pixels_p>=0.5_pooled']:.4f}; "
          f"presence agreement {res['presence_agreement']:.4f}; max |dprob| {res['max_abs_prob_diff']:.4f}")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
