"""Tests for hipoa.predict: presence, area through affine and spacing, NA rules, masks, CLI.

The helpers at the top build a tiny shard store in docs/DESIGN.md's layout and a tiny Keras
model whose output is known by hand; test_phenotypes.py and test_plink2.py reuse them.

The model is one 1x1 convolution and a softmax: the class-1 probability of a pixel is
sigmoid(2 * GAIN * x), so a patch that is +1 on a square and -1 elsewhere predicts exactly that
square (probability > 0.999 inside, < 0.001 outside).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from hipoa import predict, tables
from hipoa.geometry import patch_pixel_area_mm2
from hipoa.modelio import PresenceRule, model_json_path, read_presence_rule
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


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {s: make_model(d / s / "unet.keras") for s in SITES}


# ---- tests ---------------------------------------------------------------------------------------


def test_patch_pixel_area_by_hand():
    aff = np.stack([scale_affine(2.0, 5, 5), np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]]),
                    mirror_affine(scale_affine(2.0, 5, 5), 100)])
    got = patch_pixel_area_mm2(aff, np.array([0.25, 0.5, 0.25]), np.array([0.2, 0.1, 0.2]))
    # det 4 * 0.05 mm^2; |det| 6 (a swap of axes) * 0.05; the mirror keeps the area.
    np.testing.assert_allclose(got, [0.2, 0.3, 0.2])
    with pytest.raises(ValueError, match=r"\(n, 2, 3\)"):
        patch_pixel_area_mm2(np.eye(3)[None], [1.0], [1.0])


def test_presence_rule_read_and_errors(tmp_path):
    m = tmp_path / "unet.keras"
    with pytest.raises(FileNotFoundError, match="unet.json"):
        read_presence_rule(m)
    model_json_path(m).write_text(json.dumps({"presence": {"pixel_threshold": 0.4, "min_area_px": 7}}))
    # a rule from before the detection threshold: it equals the pixel threshold
    assert read_presence_rule(m) == PresenceRule(0.4, 7, 0.4)
    rule = {"pixel_threshold": 0.5, "detect_threshold": 0.9, "min_area_px": 12, "prevalence": 0.2}
    model_json_path(m).write_text(json.dumps({"presence": rule}))
    assert read_presence_rule(m).to_dict() == {"pixel_threshold": 0.5, "detect_threshold": 0.9, "min_area_px": 12}
    model_json_path(m).write_text(json.dumps({"presence": {**rule, "detect_threshold": 0.3}}))
    with pytest.raises(ValueError, match="detect_threshold"):
        read_presence_rule(m)
    model_json_path(m).write_text(json.dumps({"epochs": 3}))
    with pytest.raises(ValueError, match="presence"):
        read_presence_rule(m)


def test_measurable_reasons():
    rows = pd.DataFrame(
        {"qc_reason": ["", "points_invalid", "", "", ""], "spacing_row_mm": [0.25, 0.25, 0.25, np.nan, 0.25],
         "spacing_col_mm": [0.25] * 5}
    )
    ok, reason = predict.measurable(rows, np.array([1.0, 1.0, 0.8, 1.0, 0.9]), 0.9)
    assert ok.tolist() == [True, False, False, False, True]
    assert reason.tolist() == ["", "points_invalid", "patch_outside_image", "pixel_spacing_unknown", ""]


def _check(df: pd.DataFrame, expected: dict) -> None:
    for site, values in expected.items():
        for i, value in enumerate(values):
            present, area, prob, n_regions, largest = (df.loc[i, c] for c in tables.site_columns(site))
            if value is None:
                assert pd.isna(present) and pd.isna(area) and pd.isna(prob), (site, i)
                assert pd.isna(n_regions) and pd.isna(largest), (site, i)
            else:
                # every hand-made osteophyte here is one rectangle: one region, all of the area
                assert n_regions == value[0] and largest == pytest.approx(value[1], rel=1e-12), (site, i)
                assert present == value[0], (site, i)
                assert area == pytest.approx(value[1], rel=1e-12), (site, i)
                assert 0.0 <= prob <= 1.0 and (prob > 0.5) == bool(value[0]), (site, i, prob)


def test_predict_shard_values_and_dtypes(tmp_path, models):
    store, rows, expected = example_shard(tmp_path)
    out = tmp_path / "pred.parquet"
    df = predict.predict_shard(store=store, models=models, out=out, masks_out=tmp_path / "m.zarr", batch_size=4,
                               precision="float32")
    _check(df, expected)
    assert df["qc_reason"].tolist() == ["", "", "points_missing", "patch_outside_image", "", ""]
    back = pd.read_parquet(out)
    assert back["eid"].tolist() == rows["eid"].tolist()
    for site in SITES:
        for col, dtype in zip(tables.site_columns(site), tables.SITE_DTYPES.values()):
            assert str(back[col].dtype) == dtype, col
    assert str(back["instance"].dtype) == "int16"
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    schema = pq.read_schema(out)
    assert str(schema.field(f"{SITES[0]}_probability").type) == "float"

    import zarr

    m = zarr.open_group(str(tmp_path / "m.zarr"), mode="r")
    a = SITES[0]
    assert m[f"{a}/measured"][:].tolist() == [True, True, False, False, True, True]
    mask0 = m[f"{a}/mask"][0]
    assert mask0.sum() == 100 and mask0[40:50, 50:60].all()
    assert m[f"{a}/mask"][4].sum() == 0  # below min_area_px: absent, no pixels
    assert m[f"{a}/mask"][2].sum() == 0  # QC failure: never predicted
    np.testing.assert_array_equal(m[f"{a}/affine"][5], [[1.5, 0.5, 300.0], [-0.5, 1.5, 200.0]])
    assert m["rows/eid"][:].tolist() == rows["eid"].tolist()


def test_batch_size_and_order_do_not_matter(tmp_path, models):
    store, _, expected = example_shard(tmp_path)
    one = predict.predict_shard(store=store, models=models, out=tmp_path / "a.parquet", batch_size=1,
                                precision="float32")
    big = predict.predict_shard(store=store, models=dict(reversed(list(models.items()))),
                                out=tmp_path / "b.parquet", batch_size=64, precision="float32")
    pd.testing.assert_frame_equal(one, big[one.columns])
    _check(one, expected)


def test_mixed_bfloat16_matches(tmp_path, models):
    store, _, expected = example_shard(tmp_path)
    df = predict.predict_shard(store=store, models=models, out=tmp_path / "p.parquet", precision="mixed_bfloat16")
    _check(df, expected)
    assert str(df[f"{SITES[0]}_probability"].dtype) == "Float32"


def test_real_unet_runs(tmp_path):
    from hipoa.unet import build_unet

    model = build_unet(depth=1, base_filters=2, dropout=0.0)
    path = tmp_path / "unet.keras"
    model.save(path)
    model_json_path(path).write_text(json.dumps({"presence": {"pixel_threshold": 0.5, "min_area_px": 5}}))
    store, _, _ = example_shard(tmp_path)
    df = predict.predict_shard(store=store, models={SITES[0]: path}, out=tmp_path / "p.parquet", batch_size=4)
    measured = df[f"{SITES[0]}_present"].notna()
    assert measured.tolist() == [True, True, False, False, True, True]
    assert df.loc[measured, f"{SITES[0]}_probability"].between(0, 1).all()


def test_missing_site_is_an_error(tmp_path, models):
    store, _, _ = example_shard(tmp_path)
    with pytest.raises(KeyError, match="lateral_acetabulum"):
        predict.predict_shard(store=store, models={"lateral_acetabulum": models[SITES[0]]},
                              out=tmp_path / "p.parquet")


def test_cli_predict_masks(tmp_path, models):
    from hipoa.cli import main

    store, _, expected = example_shard(tmp_path)
    out = tmp_path / "pred" / "shard-0000.parquet"
    argv = ["predict-masks", "--stores", str(store), "--out", str(out), "--masks-out", str(tmp_path / "m.zarr"),
            "--batch-size", "3", "--precision", "float32"]
    for site, m in models.items():
        argv += ["--model", f"{site}={m}"]
    assert main(argv) == 0
    _check(pd.read_parquet(out), expected)
    assert (tmp_path / "m.zarr").is_dir()


def test_connected_components_counts_and_largest_area(tmp_path, models):
    n = 5
    rows = pd.DataFrame({"eid": [str(7000 + i) for i in range(n)], "instance": [2] * n,
                         "qc_reason": ["", "", "", "", "points_missing"], "spacing_row_mm": [0.25] * n,
                         "spacing_col_mm": [0.25] * n, "rows": [600] * n, "cols": [680] * n})
    p = np.stack([-np.ones((PATCH_SIZE, PATCH_SIZE), np.float16)] * n)
    p[1, 10:16, 10:16] = 1  # one 6x6 region
    p[2, 10:15, 10:15] = 1  # two regions, 5x5 and 6x6, apart
    p[2, 60:66, 60:66] = 1
    p[3, 10:15, 10:15] = 1  # two 5x5 squares touching at a corner only: one 8-connected region
    p[3, 15:20, 15:20] = 1
    p[4, 0:30, 0:30] = 1  # failed QC: never measured
    site = SITES[0]
    store = make_store(tmp_path / "cc.zarr", rows, {site: p}, {site: np.stack([scale_affine(2.0, 100.0, 50.0)] * n)})
    df = predict.predict_shard(store=store, models={site: models[site]}, out=tmp_path / "cc.parquet",
                               precision="float32")
    px = 4 * 0.25 * 0.25  # mm^2 per patch pixel: det 4 image pixels of 0.25 x 0.25 mm
    assert df[f"{site}_n_components"].tolist()[:4] == [0, 1, 2, 1]
    assert df[f"{site}_largest_area_mm2"].tolist()[:4] == pytest.approx([0.0, 36 * px, 36 * px, 50 * px])
    assert df[f"{site}_area_mm2"].tolist()[:4] == pytest.approx([0.0, 36 * px, 61 * px, 50 * px])
    assert pd.isna(df.loc[4, f"{site}_n_components"]) and pd.isna(df.loc[4, f"{site}_largest_area_mm2"])
    back = pd.read_parquet(tmp_path / "cc.parquet")
    assert str(back[f"{site}_n_components"].dtype) == "Int16"
    assert str(back[f"{site}_largest_area_mm2"].dtype) == "Float64"


def test_cli_predict_masks_several_shards(tmp_path, models):
    from hipoa.cli import main

    a, _, expected = example_shard(tmp_path, name="shard-0000")
    b, _, _ = example_shard(tmp_path, name="shard-0001", eids=[str(3000 + i) for i in range(6)])
    outs = [tmp_path / "p" / "0.parquet", tmp_path / "p" / "1.parquet"]
    argv = ["predict-masks", "--stores", str(a), str(b), "--out", *map(str, outs),
            "--masks-out", str(tmp_path / "m0.zarr"), str(tmp_path / "m1.zarr"), "--precision", "float32"]
    for site, m in models.items():
        argv += ["--model", f"{site}={m}"]
    assert main(argv) == 0
    for out in outs:
        _check(pd.read_parquet(out), expected)
    assert (tmp_path / "m1.zarr").is_dir()
    assert main(argv[:5] + argv[6:]) == 2  # two stores, one out: refused, naming the counts
