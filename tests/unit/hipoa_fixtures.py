"""Helpers shared by the unit tests: a tiny shard store in docs/DESIGN.md's layout and a tiny Keras
model whose output is known by hand (tests/unit is on sys.path: ``from hipoa_fixtures import``).

The model is one 1x1 convolution and a softmax: the class-1 probability of a pixel is
sigmoid(2 * GAIN * x), so a patch that is +1 on a square and -1 elsewhere predicts exactly that
square (probability > 0.999 inside, < 0.001 outside).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from hipoa.modelio import model_json_path
from hipoa.sites import DEFAULT_SITES, PATCH_SIZE
from hipoa.store import seal_store

SITES = [s.name for s in DEFAULT_SITES[:2]]  # two sites keep the tests small
GAIN = 5.0
MIN_AREA_PX = 20


# ---- helpers shared with test_phenotypes.py and test_plink2.py ----------------------------------


def square_patch(r0: int, c0: int, size: int) -> np.ndarray:
    """(128, 128) float16 patch: +1 on rows r0..r0+size-1, columns c0..c0+size-1, -1 elsewhere."""
    p = -np.ones((PATCH_SIZE, PATCH_SIZE), dtype=np.float16)
    p[r0 : r0 + size, c0 : c0 + size] = 1
    return p


def scale_affine(scale: float, x0: float, y0: float) -> np.ndarray:
    """(2, 3) affine x = scale*u + x0, y = scale*v + y0 (a left hip)."""
    return np.array([[scale, 0.0, x0], [0.0, scale, y0]])


def mirror_affine(affine: np.ndarray, cols: int) -> np.ndarray:
    """The affine of the same patch for a right hip stored mirrored: x' = cols - 1 - x."""
    m = np.asarray(affine, dtype=np.float64).copy()
    m[0] = -m[0]
    m[0, 2] += cols - 1
    return m


def make_model(path: Path, min_area_px: int = MIN_AREA_PX, pixel_threshold: float = 0.5) -> Path:
    """Save the tiny known-output model as ``path`` (.keras) with its ``unet.json`` beside it."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(PATCH_SIZE, PATCH_SIZE, 1), name="patch")
    logits = layers.Conv2D(2, 1, name="logits")(inputs)
    outputs = layers.Activation("softmax", dtype="float32", name="softmax_float32")(logits)
    model = keras.Model(inputs, outputs, name="tiny")
    model.get_layer("logits").set_weights([np.array([[[[-GAIN, GAIN]]]], dtype=np.float32), np.zeros(2, np.float32)])
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    rule = {"pixel_threshold": pixel_threshold, "min_area_px": min_area_px}
    model_json_path(path).write_text(json.dumps({"presence": rule, "validation": {"dice": 1.0}}))
    return path


def make_store(
    path: Path,
    rows: pd.DataFrame,
    patches: dict[str, np.ndarray],
    affines: dict[str, np.ndarray],
    inside: dict[str, np.ndarray] | None = None,
    side: str = "L",
    shard: int = 0,
    min_inside_fraction: float = 0.9,
) -> Path:
    """Write a shard store in docs/DESIGN.md's layout (attrs, rows/, auto/{site}/).

    ``rows`` needs eid, instance, qc_reason, spacing_row_mm, spacing_col_mm, rows, cols; the
    other ``rows/`` arrays get defaults. ``patches[site]`` is (n, 128, 128), ``affines[site]``
    (n, 2, 3), ``inside[site]`` (n,) (default all 1).
    """
    import zarr

    n = len(rows)
    root = zarr.open_group(str(path), mode="w")
    root.attrs.update(
        {
            "hipoa_version": "test",
            "side": side,
            "shard": shard,
            "patch_size": PATCH_SIZE,
            "context_size": 176,
            "normalisation": "test",
            "fill": 0.0,
            "sites": {s.name: s.to_dict() for s in DEFAULT_SITES},
            "min_inside_fraction": min_inside_fraction,
        }
    )
    full = {
        "eid": rows["eid"].astype(str).to_numpy(dtype=str),
        "instance": rows["instance"].to_numpy(np.int16),
        "side": np.array([side] * n),
        "qc_reason": rows["qc_reason"].astype(str).to_numpy(dtype=str),
        "annotated": rows.get("annotated", pd.Series([False] * n)).to_numpy(bool),
        "reference_length_mm": rows.get("reference_length_mm", pd.Series([50.0] * n)).to_numpy(np.float64),
        "spacing_row_mm": rows["spacing_row_mm"].to_numpy(np.float64),
        "spacing_col_mm": rows["spacing_col_mm"].to_numpy(np.float64),
        "rows": rows["rows"].to_numpy(np.int32),
        "cols": rows["cols"].to_numpy(np.int32),
    }
    for s in DEFAULT_SITES:
        full[f"{s.name}_true_area_mm2"] = np.full(n, np.nan)
    every = {"write_empty_chunks": True}  # as hipoa.store writes: every chunk on disk, so check_store sees a lost one
    g = root.create_group("rows")
    for name, values in full.items():
        dtype = str if values.dtype.kind == "U" else values.dtype  # variable-length, as hipoa.patches writes
        a = g.create_array(name, shape=(n,), dtype=dtype, config=every)
        a[:] = values
    for site, image in patches.items():
        a = root.create_group(f"auto/{site}")
        a.create_array("image", shape=image.shape, chunks=(4, PATCH_SIZE, PATCH_SIZE), dtype="float16",
                       config=every)[...] = image
        a.create_array("mask", shape=image.shape, chunks=(4, PATCH_SIZE, PATCH_SIZE), dtype="uint8",
                       config=every)[...] = 0
        a.create_array("affine", shape=(n, 2, 3), dtype="float64", config=every)[...] = affines[site]
        ins = np.ones(n, np.float32) if inside is None or site not in inside else inside[site]
        a.create_array("inside", shape=(n,), dtype="float32", config=every)[...] = ins
    seal_store(path)  # complete: readers refuse a store without the marker
    return path


def example_shard(
    tmp_path: Path,
    name: str = "shard-0000",
    side: str = "L",
    eids: list[str] | None = None,
    instances: list[int] | None = None,
    qc: list[str] | None = None,
):
    """Six hand-checkable images for two sites; returns (store, rows, expected).

    ``expected[site]`` lists (present, area_mm2) per row, None for NA. Right hips (``side="R"``)
    have the same patches (cropping mirrors them into the left orientation) and mirrored affines.
    """
    n = 6
    rows = pd.DataFrame(
        {
            "eid": eids or [str(1000 + i) for i in range(n)],
            "instance": instances or [2] * n,
            "qc_reason": qc or ["", "", "points_missing", "", "", ""],
            "spacing_row_mm": [0.25, 0.25, np.nan, 0.25, 0.25, 0.3],
            "spacing_col_mm": [0.25, 0.25, np.nan, 0.25, 0.25, 0.2],
            "rows": [600] * n,
            "cols": [680] * n,
            "annotated": [True, False, False, False, False, True],
            "reference_length_mm": [50.0, 52.0, np.nan, 48.0, 50.0, 55.0],  # unknown without points
        }
    )
    a, b = SITES
    # Site a: row 0 a 10x10 square, row 1 nothing, row 4 a 4x4 square (16 px < MIN_AREA_PX: absent),
    # row 5 a 5x6 rectangle; row 3 is only 50% inside the image for site a.
    pa = np.stack([-np.ones((PATCH_SIZE, PATCH_SIZE), np.float16)] * n)
    pa[0] = square_patch(40, 50, 10)
    pa[2] = square_patch(0, 0, 30)  # would be present, but the row failed QC
    pa[3] = square_patch(10, 10, 20)
    pa[4] = square_patch(60, 60, 4)
    pa[5, 70:75, 20:26] = 1
    pb = np.stack([-np.ones((PATCH_SIZE, PATCH_SIZE), np.float16)] * n)
    pb[3] = square_patch(100, 100, 8)  # 64 px, present
    aff_a = np.stack([scale_affine(2.0, 100.0, 50.0)] * n)
    aff_a[5] = np.array([[1.5, 0.5, 300.0], [-0.5, 1.5, 200.0]])  # rotated and scaled: det 2.5
    aff_b = np.stack([scale_affine(1.5, 200.0, 60.0)] * n)
    if side == "R":
        aff_a = np.stack([mirror_affine(x, 680) for x in aff_a])
        aff_b = np.stack([mirror_affine(x, 680) for x in aff_b])
    inside = {a: np.array([1, 1, 1, 0.5, 1, 1], np.float32)}
    store = make_store(tmp_path / f"{name}.zarr", rows, {a: pa, b: pb}, {a: aff_a, b: aff_b}, inside, side=side)
    px = 0.25 * 0.25
    expected = {
        a: [(1, 100 * 4.0 * px), (0, 0.0), None, None, (0, 0.0), (1, 30 * 2.5 * 0.3 * 0.2)],
        b: [(0, 0.0), (0, 0.0), None, (1, 64 * 2.25 * px), (0, 0.0), (0, 0.0)],
    }
    return store, rows, expected
