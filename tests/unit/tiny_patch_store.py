"""A tiny patch store in the layout of docs/DESIGN.md ("Patch store"), for the U-Net tests.

Patches are smooth noise with a bright "bone" band and, on positive images, a bright disk
(the "osteophyte") near the centre; the mask is the disk. Auto-point patches are the centre crop
of the context patch displaced by a few pixels, like automatic versus manual point placements.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from scipy import ndimage

from hipoa.store import seal_store

PATCH = 128
SPACING_MM = 0.25
PATCH_PX_MM = 0.2  # patch pixel size, mm (dp x reference length)


def _image(rng: np.random.Generator, size: int) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 1.5) * 2.0
    yy, xx = np.mgrid[0:size, 0:size]
    angle = rng.uniform(0, 2 * np.pi)
    band = np.cos(angle) * (xx - size / 2) + np.sin(angle) * (yy - size / 2)
    bone = 1.0 / (1.0 + np.exp(-(band - rng.uniform(30, 50)) / 3.0))
    return (noise * 0.4 + 0.2 * bone).astype(np.float32)


def _disk(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8)


def write_tiny_store(
    path: str | Path,
    *,
    eids: list[str],
    instances_per_eid: int = 1,
    site: str = "lateral_acetabulum",
    seed: int = 0,
    context: int = 176,
    positive_fraction: float = 0.5,
    annotated_fraction: float = 1.0,
    qc_fail_every: int = 0,
    side: str = "L",
    shard: int = 0,
) -> Path:
    """Write a one-site store; returns its path. Rows: every eid x instance, one side."""
    rng = np.random.default_rng(seed)
    keys = [(e, 2 + i) for e in eids for i in range(instances_per_eid)]
    n = len(keys)
    annotated = rng.random(n) < annotated_fraction
    positive = annotated & (rng.random(n) < positive_fraction)
    qc = np.array([""] * n, dtype=object)
    if qc_fail_every:
        qc[::qc_fail_every] = "points_invalid"
    o = (context - PATCH) // 2

    ctx_img = np.zeros((n, context, context), np.float32)
    ctx_mask = np.zeros((n, context, context), np.uint8)
    auto_img = np.zeros((n, PATCH, PATCH), np.float16)
    auto_mask = np.zeros((n, PATCH, PATCH), np.uint8)
    area_mm2 = np.full(n, np.nan)
    for i in range(n):
        img = _image(rng, context)
        mask = np.zeros((context, context), np.uint8)
        if positive[i]:
            c = context / 2 + rng.uniform(-18, 18, 2)
            mask = _disk(context, c[0], c[1], rng.uniform(10, 18))
            img = img + 2.0 * ndimage.gaussian_filter(mask.astype(np.float32), 0.7)
        img = (img - img.mean()) / img.std()
        ctx_img[i], ctx_mask[i] = img, mask
        if annotated[i]:
            area_mm2[i] = mask.sum() * PATCH_PX_MM**2
        if qc[i]:
            continue  # QC failures: zero patches, like the real store
        dx, dy = rng.integers(-4, 5, 2)
        auto_img[i] = img[o + dy : o + dy + PATCH, o + dx : o + dx + PATCH]
        auto_mask[i] = mask[o + dy : o + dy + PATCH, o + dx : o + dx + PATCH] * annotated[i]

    manual_rows = np.flatnonzero(annotated & (qc == "")).astype(np.int32)
    affine = np.tile(np.array([[PATCH_PX_MM / SPACING_MM, 0, 100.0], [0, PATCH_PX_MM / SPACING_MM, 80.0]]), (n, 1, 1))

    g = zarr.open_group(str(path), mode="w")
    g.attrs.update(
        {
            "hipoa_version": "test",
            "side": side,
            "shard": shard,
            "patch_size": PATCH,
            "context_size": context,
            "normalisation": "zero mean, unit standard deviation per patch",
            "fill": 0.0,
            "sites": {site: {"centre": 78, "reference": [12, 39], "dp": 0.01, "label": 3}},
            "min_inside_fraction": 0.9,
        }
    )
    rows = {
        "eid": np.array([k[0] for k in keys]),
        "instance": np.array([k[1] for k in keys], np.int16),
        "side": np.array([side] * n),
        "qc_reason": np.array(list(qc), dtype=str),
        "annotated": annotated,
        "reference_length_mm": np.full(n, PATCH_PX_MM / 0.01),
        "spacing_row_mm": np.full(n, SPACING_MM),
        "spacing_col_mm": np.full(n, SPACING_MM),
        "rows": np.full(n, 600, np.int32),
        "cols": np.full(n, 680, np.int32),
        f"{site}_true_area_mm2": area_mm2,
    }
    every = {"write_empty_chunks": True}  # as hipoa.store writes: every chunk on disk, so check_store sees a lost one
    for name, values in rows.items():
        if values.dtype.kind in "UO":
            arr = g.create_array(f"rows/{name}", shape=values.shape, dtype=str, config=every)
            arr[:] = values
        else:
            g.create_array(f"rows/{name}", data=values, config=every)
    chunk = (16, PATCH, PATCH)
    g.create_array(f"auto/{site}/image", data=auto_img, chunks=chunk, config=every)
    g.create_array(f"auto/{site}/mask", data=auto_mask, chunks=chunk, config=every)
    g.create_array(f"auto/{site}/affine", data=affine, config=every)
    g.create_array(f"auto/{site}/inside", data=np.ones(n, np.float32), config=every)
    m = manual_rows.size
    g.create_array(f"manual/{site}/image", data=ctx_img[manual_rows].astype(np.float16), chunks=(16, context, context),
                   config=every)
    g.create_array(f"manual/{site}/mask", data=ctx_mask[manual_rows], chunks=(16, context, context), config=every)
    g.create_array(f"manual/{site}/affine", data=affine[:m] if m else np.zeros((0, 2, 3)), config=every)
    g.create_array(f"manual/{site}/row", data=manual_rows, config=every)
    seal_store(path)  # complete: readers refuse a store without the marker
    return Path(path)

