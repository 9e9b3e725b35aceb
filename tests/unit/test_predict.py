"""Tests for hipoa.predict: presence, area through affine and spacing, NA rules, masks, CLI.

The shard store and the hand-made model come from hipoa_fixtures.py (the helpers several test files
share).
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
from hipoa.sites import PATCH_SIZE

from hipoa_fixtures import (  # noqa: E402  (tests/unit is on sys.path)
    SITES,
    example_shard,
    make_model,
    make_store,
    mirror_affine,
    scale_affine,
)

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
