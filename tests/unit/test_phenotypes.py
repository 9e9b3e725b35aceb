"""Tests for hipoa.phenotypes: the contract table read back by pyarrow, duckdb and polars, the
GWAS TSVs, NA rules, determinism, masks back in image space and right-hip twins.

Two left shards of six hand-checkable images each (see test_predict.example_shard), predicted by
the tiny known-output model; the second shard holds a second visit (instance 3) of eid 2000.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hipoa import phenotypes, predict, tables
from hipoa.sites import DEFAULT_SITES

from hipoa_fixtures import SITES, example_shard, make_model  # noqa: E402  (tests/unit is on sys.path)

A, B = SITES
LABEL = {s.name: s.label for s in DEFAULT_SITES}
SHARD1_EIDS = ["2000", "2001", "2002", "2003", "2004", "2000"]
SHARD1_INSTANCES = [2, 2, 2, 2, 2, 3]

CONTRACT = {  # column -> (arrow type, nullable)
    "eid": ("int64", False),
    "instance": ("int16", False),
    "side": ("string", False),
    "qc_pass": ("bool", False),
    "qc_reason": ("string", False),
    "reference_length_mm": ("double", True),  # unknown (null) when the points are missing
    **{c: (t, True) for s in SITES
       for c, t in zip(tables.site_columns(s), ("int8", "double", "float", "int16", "double"))},
    "any_present": ("int8", True),
    "total_area_mm2": ("double", True),
    "annotated": ("bool", False),
    "used_in_training": ("bool", False),
}


def write_manifest(path: Path, rows: pd.DataFrame) -> Path:
    """A manifest in docs/DESIGN.md's columns (those gather reads, plus a few others)."""
    m = pd.DataFrame(
        {
            "eid": rows["eid"].astype(str),
            "instance": rows["instance"].astype(np.int16),
            "array": np.zeros(len(rows), np.int16),
            "side": rows["side"].astype(str),
            "image": [f"img/{e}.zip" for e in rows["eid"]],
            "annotated": rows["annotated"].astype(bool),
            "shard": rows["shard"].astype(np.int32),
            "qc_reason": rows["qc_reason"].astype(str),
        }
    )
    m.to_parquet(path, index=False)
    return path


def build_side(tmp: Path, models: dict[str, Path], side: str):
    """Two shards of one side: stores, predictions, mask stores and the manifest."""
    tmp.mkdir(parents=True, exist_ok=True)
    preds, masks, frames, expected = [], [], [], {}
    for k, (eids, inst) in enumerate([(None, None), (SHARD1_EIDS, SHARD1_INSTANCES)]):
        store, rows, exp = example_shard(tmp, name=f"shard-{k:04d}", side=side, eids=eids, instances=inst)
        preds.append(tmp / f"shard-{k:04d}.parquet")
        masks.append(tmp / f"shard-{k:04d}.masks.zarr")
        predict.predict_shard(store=store, models=models, out=preds[-1], masks_out=masks[-1], precision="float32")
        frames.append(rows.assign(side=side, shard=k))
        for i, eid in enumerate(rows["eid"]):
            expected[(eid, int(rows["instance"][i]))] = {s: exp[s][i] for s in exp}
    manifest = write_manifest(tmp / f"{side}.parquet", pd.concat(frames, ignore_index=True))
    return manifest, preds, masks, expected


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {s: make_model(d / s / "unet.keras") for s in SITES}


@pytest.fixture(scope="module")
def left(tmp_path_factory, models):
    tmp = tmp_path_factory.mktemp("left")
    manifest, preds, masks, expected = build_side(tmp / "work", models, "L")
    splits = tmp / "splits.parquet"
    pd.DataFrame({"eid": ["1000", "1001", "2000"], "split": ["train", "val", "test"]}).to_parquet(splits)
    out = tmp / "phenotypes" / "osteophytes_L.parquet"
    df = phenotypes.gather(manifest=manifest, predictions=preds, models=models, side="L", out=out,
                           splits=[splits], config_hash="abc123", masks_dir=tmp / "masks" / "L", mask_stores=masks)
    return {"df": df, "out": out, "manifest": manifest, "preds": preds, "masks": masks, "splits": splits,
            "expected": expected, "tmp": tmp}


def test_every_manifest_row_once_with_values(left):
    df, expected = left["df"], left["expected"]
    assert len(df) == 12 and not df.duplicated(["eid", "instance"]).any()
    assert df["eid"].tolist() == sorted(df["eid"].tolist())  # sorted by eid, then instance
    for _, r in df.iterrows():
        exp = expected[(str(r["eid"]), int(r["instance"]))]
        for site, value in exp.items():
            present, area, prob, n_regions, largest = (r[c] for c in tables.site_columns(site))
            if value is None:
                assert pd.isna(present) and pd.isna(area) and pd.isna(prob)
                assert pd.isna(n_regions) and pd.isna(largest)
            else:
                assert present == value[0] and area == pytest.approx(value[1], rel=1e-12)
                # each hand-made osteophyte is one rectangle: one region holding all of the area
                assert n_regions == value[0] and largest == pytest.approx(value[1], rel=1e-12)
        measured_all = all(v is not None for v in exp.values())
        assert r["qc_pass"] == measured_all
        assert (r["qc_reason"] == "") == measured_all
    qc = df.set_index(["eid", "instance"])
    assert qc.loc[(1002, 2), "qc_reason"] == "points_missing"
    assert qc.loc[(1003, 2), "qc_reason"] == "patch_outside_image"
    # 1003: site A not measurable, site B present -> any_present 1 but total area NA
    assert qc.loc[(1003, 2), "any_present"] == 1 and pd.isna(qc.loc[(1003, 2), "total_area_mm2"])
    assert qc.loc[(1000, 2), "total_area_mm2"] == pytest.approx(100 * 4 * 0.0625)
    assert qc.loc[(1001, 2), "any_present"] == 0 and qc.loc[(1001, 2), "total_area_mm2"] == 0.0
    assert df.loc[df["used_in_training"], "eid"].unique().tolist() == [1000, 1001]
    assert df["annotated"].sum() == 4


def test_parquet_pyarrow_types_nulls_metadata(left, models):
    table = pq.read_table(left["out"])
    assert table.column_names == list(CONTRACT)
    for col, (arrow_type, nullable) in CONTRACT.items():
        assert str(table.schema.field(col).type) == arrow_type, col
        assert table.schema.field(col).nullable == nullable, col
        if not nullable:
            assert table.column(col).null_count == 0, col
    assert table.column(f"{A}_present").null_count == 4  # 1002, 1003, 2002 and eid 2003 (outside)
    assert table.column("reference_length_mm").null_count == 2  # NaN in the store -> null, not a number
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    from hipoa import __version__

    assert meta["hipoa_version"] == __version__ and meta["config_hash"] == "abc123"
    for s in SITES:
        assert meta[f"model_sha256:{s}"] == phenotypes.sha256_file(models[s])
        assert json.loads(meta[f"presence_threshold:{s}"]) == {
            "pixel_threshold": 0.5, "detect_threshold": 0.5, "min_area_px": 20
        }
        # the tiny models' cards have no calibration: the probability column is the raw score, and says so
        assert json.loads(meta[f"probability_calibration:{s}"])["method"] == "none"
    assert meta["created"].endswith("+00:00")


def test_parquet_duckdb(left):
    import duckdb

    con = duckdb.connect()
    path = str(left["out"])
    described = con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet('{path}'))")
    types = dict(described.fetchall())
    duck = {"int64": "BIGINT", "int16": "SMALLINT", "string": "VARCHAR", "bool": "BOOLEAN", "double": "DOUBLE",
            "int8": "TINYINT", "float": "FLOAT"}
    assert types == {c: duck[t] for c, (t, _) in CONTRACT.items()}
    nulls = con.execute(
        f"SELECT count(*) FILTER ({A}_present IS NULL), count(*) FILTER (total_area_mm2 IS NULL), "
        f"count(*) FILTER (NOT qc_pass), sum({B}_present) FROM read_parquet('{path}')"
    ).fetchone()
    assert nulls == (4, 4, 4, 2)
    keys = {k.decode() if isinstance(k, bytes) else k
            for (k,) in con.execute(f"SELECT key FROM parquet_kv_metadata('{path}')").fetchall()}
    assert {"hipoa_version", "config_hash", "created", f"model_sha256:{A}", f"presence_threshold:{B}"} <= keys


def test_parquet_polars(left):
    import polars as pl

    df = pl.read_parquet(left["out"])
    pol = {"int64": pl.Int64, "int16": pl.Int16, "string": pl.String, "bool": pl.Boolean, "double": pl.Float64,
           "int8": pl.Int8, "float": pl.Float32}
    assert dict(df.schema) == {c: pol[t] for c, (t, _) in CONTRACT.items()}
    assert df.filter(pl.col("qc_pass"))[f"{A}_area_mm2"].null_count() == 0
    assert df.filter(~pl.col("qc_pass"))["total_area_mm2"].null_count() == 4
    meta = pl.read_parquet_metadata(left["out"])
    assert {"hipoa_version", "config_hash", "created", f"model_sha256:{B}"} <= set(meta)


def test_any_present_and_total_na_logic():
    df = pd.DataFrame(
        {
            "a_present": pd.array([1, 0, 0, pd.NA, pd.NA], dtype="Int8"),
            "b_present": pd.array([pd.NA, 0, pd.NA, 1, pd.NA], dtype="Int8"),
            "a_area_mm2": pd.array([2.5, 0.0, 0.0, pd.NA, pd.NA], dtype="Float64"),
            "b_area_mm2": pd.array([pd.NA, 0.0, pd.NA, 1.0, pd.NA], dtype="Float64"),
        }
    )
    out = tables.combine_sites(df, ["a", "b"])
    assert out["any_present"].tolist() == [1, 0, pd.NA, 1, pd.NA]
    assert out["total_area_mm2"].tolist() == [pd.NA, 0.0, pd.NA, pd.NA, pd.NA]
    assert str(out["any_present"].dtype) == "Int8" and str(out["total_area_mm2"].dtype) == "Float64"


def test_gwas_files_and_dict_tsv(left):
    from hipoa.release import release_path

    stem = left["out"].with_suffix("")
    bt = pd.read_csv(release_path(stem, "bt"), sep="\t", dtype=str, keep_default_na=False)
    assert list(bt.columns) == ["FID", "IID", *[f"{s}_present" for s in SITES], "any_present"]
    assert len(bt) == 11 and bt["FID"].is_unique and (bt["FID"] == bt["IID"]).all()  # 2000 once
    assert set(bt[f"{A}_present"]) == {"0", "1", "NA"} and set(bt["any_present"]) <= {"0", "1", "NA"}
    assert (bt.set_index("IID").loc["1002"].drop("FID") == "NA").all()  # QC failure: every trait missing
    qt = pd.read_csv(release_path(stem, "qt"), sep="\t", dtype=str, keep_default_na=False)
    areas = [f"{s}_area_mm2" for s in SITES] + ["total_area_mm2"]
    assert list(qt.columns) == ["FID", "IID", *[c for a in areas for c in (a, f"{a}_rint")]]
    assert float(qt.set_index("IID").loc["1000", f"{A}_area_mm2"]) == pytest.approx(25.0)
    assert (qt[f"{A}_area_mm2"] == "NA").tolist() == (qt[f"{A}_area_mm2_rint"] == "NA").tolist()
    covar = pd.read_csv(release_path(stem, "covar"), sep="\t", dtype=str, keep_default_na=False)
    assert list(covar.columns[:4]) == ["FID", "IID", "instance", "reference_length_mm"]
    assert covar.set_index("IID").loc["2000", "instance"] == "2"  # its lowest instance that passes QC
    removed = release_path(stem, "remove").read_text().split("\n")
    assert removed == ["1000\t1000", "1001\t1001", ""]  # train and val; 2000 is test
    d = pd.read_csv(phenotypes.out_tsv_path(left["out"], "dict"), sep="\t", keep_default_na=False)
    assert list(d.columns) == ["FIELD", "FILES", "TYPE", "DESCRIPTION", "UNITS"]
    names = pq.read_schema(left["out"]).names
    assert d.loc[d["FILES"] == "parquet", "FIELD"].tolist() == names
    parquet = d[d["FILES"] == "parquet"].set_index("FIELD")
    assert parquet.loc[f"{A}_area_mm2", "UNITS"] == "mm^2" and parquet.loc[f"{A}_area_mm2", "TYPE"] == "Float64"
    assert parquet.loc["eid", "TYPE"] == "int64" and parquet.loc["any_present", "TYPE"] == "Int8"
    assert parquet.loc[f"{A}_n_components", "TYPE"] == "Int16" and parquet.loc[f"{A}_n_components", "UNITS"] == ""
    assert parquet.loc[f"{A}_largest_area_mm2", "UNITS"] == "mm^2"
    probability = parquet.loc[f"{A}_probability", "DESCRIPTION"]
    assert "calibrated probability" in probability and "isotonic" in probability and "prevalence" in probability
    assert probability.endswith("NA not measurable")
    for kind, table in (("bt", bt), ("qt", qt), ("covar", covar)):
        assert d.loc[d["FILES"] == kind, "FIELD"].tolist() == list(table.columns[2:]), kind
    assert (d["DESCRIPTION"] != "").all()
    # the GWAS files keep the traits (presence, area): the region columns are in the Parquet only
    assert f"{A}_n_components" not in bt.columns and f"{A}_n_components" not in qt.columns


def test_rerun_is_identical_but_created(left, models, tmp_path):
    out = tmp_path / "osteophytes_L.parquet"
    phenotypes.gather(manifest=left["manifest"], predictions=list(reversed(left["preds"])), models=models,
                      side="L", out=out, splits=[left["splits"]], config_hash="abc123")
    a, b = pq.read_table(left["out"]), pq.read_table(out)
    assert a.equals(b)
    ma, mb = dict(a.schema.metadata), dict(b.schema.metadata)
    ma.pop(b"created"), mb.pop(b"created")
    assert ma == mb
    from hipoa.release import release_path

    for kind in ("bt", "qt", "covar", "remove", "dict"):
        first, again = release_path(left["out"].with_suffix(""), kind), release_path(out.with_suffix(""), kind)
        assert again.read_bytes() == first.read_bytes(), kind


def test_missing_or_duplicated_predictions_are_errors(left, models, tmp_path):
    kw = dict(manifest=left["manifest"], models=models, side="L", out=tmp_path / "o.parquet")
    with pytest.raises(ValueError, match="6 of 12 images .* have no prediction"):
        phenotypes.gather(predictions=left["preds"][:1], **kw)
    with pytest.raises(ValueError, match="given more than once"):
        phenotypes.gather(predictions=left["preds"] + left["preds"][:1], **kw)
    copy = tmp_path / "copy.parquet"
    copy.write_bytes(left["preds"][0].read_bytes())
    with pytest.raises(ValueError, match="predicted more than once"):
        phenotypes.gather(predictions=left["preds"] + [copy], **kw)
    with pytest.raises(ValueError, match="lacks columns"):
        phenotypes.gather(predictions=left["preds"], **{**kw, "models": {"lateral_acetabulum": models[A]}})


def test_repeated_images_kept_in_order(models, tmp_path):
    """Ingest keeps a repeated (eid, instance, side) row, flagged duplicate_image: both appear."""
    eids = ["1000", "1001", "1002", "1003", "1000", "1005"]
    qc = ["", "", "points_missing", "", "duplicate_image", ""]
    store, rows, _ = example_shard(tmp_path, eids=eids, qc=qc)
    pred = tmp_path / "p.parquet"
    predict.predict_shard(store=store, models=models, out=pred, precision="float32")
    manifest = write_manifest(tmp_path / "L.parquet", rows.assign(side="L", shard=0))
    out = tmp_path / "osteophytes_L.parquet"
    df = phenotypes.gather(manifest=manifest, predictions=[pred], models=models, side="L", out=out)
    first, second = df[df["eid"] == 1000].itertuples()
    assert first.qc_pass and getattr(first, f"{A}_present") == 1
    assert second.qc_reason == "duplicate_image" and pd.isna(getattr(second, f"{A}_present"))
    t = pd.read_csv(out.with_name("osteophytes_L.bt.tsv"), sep="\t", dtype=str)
    assert t["IID"].tolist() == ["1000", "1001", "1002", "1003", "1005"]
    assert t.set_index("IID").loc["1000", f"{A}_present"] == "1"


def test_eid_string_when_not_numeric():
    assert str(tables.eid_column(pd.Series(["12", "3"])).dtype) == "int64"
    assert tables.eid_column(pd.Series(["12", "3"])).tolist() == [12, 3]
    # a leading zero is not a canonical integer: kept as given, so 003 and 3 stay two people
    s = tables.eid_column(pd.Series(["12", "003", "3"]))
    assert str(s.dtype) == "string" and s.tolist() == ["12", "003", "3"]
    s = tables.eid_column(pd.Series(["12", "p7"]))
    assert str(s.dtype) == "string" and s.tolist() == ["12", "p7"]


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_masks_land_where_the_patch_was(left):
    masks_dir = left["tmp"] / "masks" / "L"
    written = sorted(p.name for p in masks_dir.glob("*.png"))
    # every image with a measured site; 1002 and 2002 failed QC (no site measured)
    assert len(written) == 10 and "1002_2_L.png" not in written and "2000_3_L.png" in written
    m = _png(masks_dir / "1000_2_L.png")
    assert m.shape == (600, 680) and m.dtype == np.uint8
    # Site A's 10x10 square at patch rows 40-49, columns 50-59 through x = 2u + 100, y = 2v + 50:
    # patch pixel u covers image columns 2u + 99 and 2u + 100, so columns 199-218 and rows 129-148.
    expected = np.zeros((600, 680), np.uint8)
    expected[129:149, 199:219] = LABEL[A]
    np.testing.assert_array_equal(m, expected)
    m3 = _png(masks_dir / "1003_2_L.png")  # site B only (A outside the image): 8x8 at 1.5 px
    assert set(np.unique(m3)) == {0, LABEL[B]} and (m3 == LABEL[B]).sum() == pytest.approx(64 * 2.25, abs=12)
    assert not _png(masks_dir / "1001_2_L.png").any()


def test_right_hip_twins_match_and_unmirror(left, models, tmp_path):
    manifest, preds, masks, _ = build_side(tmp_path / "work", models, "R")
    out = tmp_path / "osteophytes_R.parquet"
    right = phenotypes.gather(manifest=manifest, predictions=preds, models=models, side="R", out=out,
                              splits=[left["splits"]], masks_dir=tmp_path / "masks" / "R", mask_stores=masks)
    left_df = left["df"]
    assert (right["side"] == "R").all()
    pd.testing.assert_frame_equal(right.drop(columns="side"), left_df.drop(columns="side"))
    for name in ("1000_2", "1003_2", "1005_2", "2000_3"):
        l_png = _png(left["tmp"] / "masks" / "L" / f"{name}_L.png")
        r_png = _png(tmp_path / "masks" / "R" / f"{name}_R.png")
        assert l_png.any()
        np.testing.assert_array_equal(r_png, l_png[:, ::-1])


def test_cli_phenotypes_summary(left, models, tmp_path, capsys):
    from hipoa.cli import main

    out = tmp_path / "osteophytes_L.parquet"
    argv = ["phenotypes", "--manifest", str(left["manifest"]), "--predictions", *map(str, left["preds"]),
            "--model", *(f"{s}={m}" for s, m in models.items()), "--splits", str(left["splits"]), "--side", "L",
            "--out", str(out), "--config-hash", "abc123"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "images: 12" in text and "qc failures: " in text and "points_missing=2" in text
    assert f"{A}: measured 8, present" in text
    assert pq.read_table(out).equals(pq.read_table(left["out"]))
    assert main(argv[:-2] + ["--masks-dir", str(tmp_path / "m")]) == 2  # --masks-dir without --mask-stores


def test_right_twins_end_to_end_through_ingest_and_crop(models, tmp_path):
    """Mirror real left-hip DICOMs, their points (x -> cols - 1 - x) into Right Femur twins, and
    run both through ingest, crop, predict and gather: same phenotypes, PNGs mirrored back."""
    from hipoa import ingest, patches, synth
    from hipoa.dicom import find_hip_member, read_image
    from hipoa.points import read_pts, write_pts

    cohort = tmp_path / "cohort"
    synth.make_cohort(cohort, participants=3, seed=3, annotated_fraction=0.0)
    zips = sorted((cohort / "ukb" / "20158").glob("*.zip"))
    twins = tmp_path / "twins"
    twins.mkdir()
    rows = {"L": [], "R": []}
    for z in zips:
        eid = z.name.split("_")[0]
        pts_l = cohort / "points" / "auto" / f"{eid}_2_L.pts"
        pixels = read_image(z, find_hip_member(z, "L")).pixels
        assert pixels.min() >= 0 and pixels.max() <= 255  # 8-bit, no rescale: exact round trip
        dcm = twins / f"{eid}_R.dcm"
        dcm.write_bytes(synth.dicom_bytes(
            pixels[:, ::-1].astype(np.uint8), "Right Femur", sop_uid=f"1.2.3.{eid}.1", study_uid=f"1.2.3.{eid}",
            series_uid=f"1.2.3.{eid}.2", patient_id="TWIN", study_date="20200101", series_number=1))
        pts = read_pts(pts_l)
        pts[:, 0] = pixels.shape[1] - 1 - pts[:, 0]
        write_pts(twins / f"{eid}_2_R.pts", pts)
        common = {"eid": eid, "instance": 2, "points_manual": "", "mask": ""}
        rows["L"].append({**common, "side": "L", "image": str(z), "points_auto": str(pts_l)})
        rows["R"].append({**common, "side": "R", "image": str(dcm), "points_auto": str(twins / f"{eid}_2_R.pts")})
    out = {}
    for side in ("L", "R"):
        csv = tmp_path / f"{side}.csv"
        pd.DataFrame(rows[side]).to_csv(csv, index=False)
        manifest = ingest.build_manifest(manifest=csv, side=side, n_shards=1)
        manifest.to_parquet(tmp_path / f"{side}.parquet", index=False)
        store = tmp_path / f"{side}.zarr"
        patches.crop_shard(manifest=manifest, shard=0, out=store, sites=list(DEFAULT_SITES))
        predict.predict_shard(store=store, models=models, out=tmp_path / f"{side}.pred.parquet",
                              masks_out=tmp_path / f"{side}.masks.zarr", precision="float32")
        out[side] = phenotypes.gather(
            manifest=tmp_path / f"{side}.parquet", predictions=[tmp_path / f"{side}.pred.parquet"], models=models,
            side=side, out=tmp_path / f"osteophytes_{side}.parquet", masks_dir=tmp_path / "masks" / side,
            mask_stores=[tmp_path / f"{side}.masks.zarr"])
    left, right = out["L"], out["R"]
    assert len(left) == 3 and left["qc_pass"].all() and right["qc_pass"].all()
    for s in SITES:
        assert right[f"{s}_present"].tolist() == left[f"{s}_present"].tolist()
        np.testing.assert_allclose(right[f"{s}_area_mm2"].to_numpy(float), left[f"{s}_area_mm2"].to_numpy(float),
                                   rtol=1e-9)
    np.testing.assert_allclose(right["reference_length_mm"], left["reference_length_mm"], rtol=1e-9)
    for eid in left["eid"]:
        l_png = _png(tmp_path / "masks" / "L" / f"{eid}_2_L.png")
        r_png = _png(tmp_path / "masks" / "R" / f"{eid}_2_R.png")
        assert l_png.any() and r_png.shape == l_png.shape
        np.testing.assert_array_equal(r_png, l_png[:, ::-1])  # the same patches, mapped back exactly


def test_eid_int64_for_every_ukb_table_even_empty():
    assert str(tables.eid_column(pd.Series([], dtype=object)).dtype) == "int64"
    assert str(tables.eid_column(pd.Series([], dtype="string")).dtype) == "int64"
    assert str(tables.eid_column(pd.Series([9000001, 9000002])).dtype) == "int64"
