"""hipoa.release: the participant table over both sides and the GWAS files (bt, qt, covar, remove).

Each GWAS file is read back with a strict reader of regenie's phenotype/covariate format as its
documentation states it (header ``FID IID ...``, tab- or space-separated, ``NA`` for missing,
binary traits 0/1), and the participant table with pyarrow, duckdb and polars.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.stats import norm

from hipoa import phenotypes, release

from test_phenotypes import SITES, build_side  # noqa: E402  (tests/unit is on sys.path)
from hipoa_fixtures import make_model  # noqa: E402

A = SITES[0]


def read_regenie(path: Path, binary: bool = False) -> pd.DataFrame:
    """A phenotype or covariate file as regenie's documentation states the format, strictly.

    Header ``FID IID`` then the trait names; fields separated by one tab or space; one line per
    sample, every line as many fields as the header; unique ``FID IID``; a value is ``NA`` or a
    number (covariates may also be categorical: a token without whitespace); with ``binary`` every
    trait is ``0``, ``1`` or ``NA``.
    """
    text = path.read_text()
    assert text.endswith("\n") and "\r" not in text, path
    lines = text.split("\n")[:-1]
    split = [re.split(r"[\t ]", line) for line in lines]
    header = split[0]
    assert header[:2] == ["FID", "IID"], header
    assert len(set(header)) == len(header), header
    for number, fields in enumerate(split[1:], start=2):
        assert len(fields) == len(header), (path, number, fields)
        assert all(field != "" for field in fields), (path, number)
    table = pd.DataFrame(split[1:], columns=header)
    assert not table.duplicated(["FID", "IID"]).any(), path
    for column in header[2:]:
        values = table[column]
        if binary:
            assert set(values) <= {"0", "1", "NA"}, (path, column, sorted(set(values)))
        elif column in release.DEVICE_COLUMNS:  # categorical: a token that starts with a letter, never NA
            assert "NA" not in set(values), (path, column)  # plink2 refuses NA in a categorical column
            assert values.str.fullmatch(r"[A-Za-z]\S*").all(), (path, column)
        else:
            numeric = values[values != "NA"]
            assert numeric.str.fullmatch(r"-?\d+(\.\d+)?([eE][-+]?\d+)?").all(), (path, column)
    return table


# ---- pieces ---------------------------------------------------------------------------------


def test_rank_inverse_normal_blom_with_ties_and_na():
    values = pd.Series([0.0, 0.0, 0.0, 5.0, None, 2.0, 9.0], dtype="Float64")
    z = release.rank_inverse_normal(values)
    n = 6
    ranks = np.array([2.0, 2.0, 2.0, 5.0, 4.0, 6.0])  # the three zeros share ranks 1-3
    expected = norm.ppf((ranks - 3 / 8) / (n + 1 / 4))
    np.testing.assert_allclose(z.dropna().to_numpy(dtype=float), expected, rtol=0, atol=1e-12)
    assert pd.isna(z[4]) and str(z.dtype) == "Float64"
    assert z[0] == z[1] == z[2] < z[5] < z[3] < z[6]
    assert release.rank_inverse_normal(pd.Series([None, None], dtype="Float64")).isna().all()


def test_instance_policies():
    df = pd.DataFrame({"eid": ["1", "1", "2", "3", "3"], "instance": [2, 3, 2, 2, 3]})
    passing = pd.Series([False, True, False, True, True])
    first_passing = release.choose_instances(df, "first_passing", passing)
    assert first_passing[["eid", "instance"]].values.tolist() == [["1", 3], ["2", 2], ["3", 2]]
    first = release.choose_instances(df, "first", passing)
    assert first["instance"].tolist() == [2, 2, 2]
    only3 = release.choose_instances(df, 3, passing)
    assert only3[["eid", "instance"]].values.tolist() == [["1", 3], ["3", 3]]
    for bad in ("latest", -1, True):
        with pytest.raises(ValueError, match="first_passing, first or an instance number"):
            release.parse_instance_policy(bad)
    # a repeated image of one instance: the one that passes QC, whatever the policy
    repeated = pd.DataFrame({"eid": ["1", "1", "1"], "instance": [2, 2, 3]})
    passing = pd.Series([False, True, True])
    for policy in ("first_passing", "first", 2):
        chosen = release.choose_instances(repeated, policy, passing)
        assert chosen.index.tolist() == [1], policy


def test_text_covariates_are_categorical_tokens():
    values = pd.Series(["200123", "12.30.008\\enCORE 16", "", None, " Lunar  iDXA "], dtype="string")
    out = release.text_covariate(values, "serial_")
    assert out.tolist()[:2] == ["serial_200123", "serial_12.30.008\\enCORE_16"]
    assert not out.isna().any()  # a categorical column is never NA: plink2 refuses it
    assert (out == release.MISSING_CATEGORY).tolist() == [False, False, True, True, False]
    assert out.iloc[4] == "serial_Lunar_iDXA"


def _side(side: str, rows: list[tuple]) -> pd.DataFrame:
    """A minimal side table: (eid, instance, qc_pass, present, area) for one site."""
    df = pd.DataFrame(rows, columns=["eid", "instance", "qc_pass", f"{A}_present", f"{A}_area_mm2"])
    df["side"] = side
    df["qc_reason"] = np.where(df["qc_pass"], "", "points_missing")
    df[f"{A}_present"] = df[f"{A}_present"].astype("Int8")
    df[f"{A}_area_mm2"] = df[f"{A}_area_mm2"].astype("Float64")
    df["reference_length_mm"] = 60.0
    df["any_present"] = df[f"{A}_present"]
    df["total_area_mm2"] = df[f"{A}_area_mm2"]
    df["annotated"] = False
    df["used_in_training"] = df["eid"] == "3"
    return df


def test_participant_table_combines_sides_with_documented_na_rules():
    left = _side("L", [("1", 2, True, 1, 4.0), ("2", 2, True, 0, 0.0), ("3", 2, True, 0, 0.0), ("4", 2, False, None, None)])
    right = _side("R", [("1", 2, True, 0, 0.0), ("2", 2, True, 0, 0.0), ("4", 2, True, 1, 3.0)])
    wide = release.participant_table({"L": left, "R": right}, [A]).set_index("eid")
    assert list(wide.index) == [1, 2, 3, 4]
    # participant 1: present on the left only
    assert wide.loc[1, f"{A}_present_any"] == 1 and wide.loc[1, f"{A}_area_sum_mm2"] == 4.0
    assert wide.loc[1, f"{A}_area_max_mm2"] == 4.0 and wide.loc[1, "n_sides_measured"] == 2
    # participant 2: measured absent on both hips
    assert wide.loc[2, f"{A}_present_any"] == 0 and wide.loc[2, "any_present"] == 0
    # participant 3: no right image at this visit -> right columns NA, presence unknown, sums NA
    assert pd.isna(wide.loc[3, "qc_pass_R"]) and pd.isna(wide.loc[3, f"{A}_present_R"])
    assert pd.isna(wide.loc[3, f"{A}_present_any"]) and pd.isna(wide.loc[3, f"{A}_area_sum_mm2"])
    assert wide.loc[3, "n_sides_measured"] == 1 and wide.loc[3, "used_in_training"]
    # participant 4: left failed QC, right present -> present on some hip, areas unknown
    assert wide.loc[4, f"{A}_present_any"] == 1 and pd.isna(wide.loc[4, f"{A}_area_max_mm2"])
    assert wide.loc[4, "qc_pass_L"] == False  # noqa: E712  (nullable boolean)
    assert str(wide["qc_pass_L"].dtype) == "boolean" and str(wide[f"{A}_present_any"].dtype) == "Int8"


# ---- end to end: two sides through gather, then the participant release ------------------------


UNREAD = "1003"  # the example shard's participant with its device fields NA in the manifest


def release_cohort(tmp: Path) -> dict:
    """Both sides of the example shards (right hips: the left's mirror twins) through gather,
    with 1000 in train, 1001 in val and 2000 in test, then the participant release."""
    models = {s: make_model(tmp / "models" / s / "unet.keras") for s in SITES}
    splits = tmp / "splits.parquet"
    pd.DataFrame({"eid": ["1000", "1001", "2000"], "split": ["train", "val", "test"]}).to_parquet(splits)
    tables, manifests = {}, {}
    for side in ("L", "R"):
        manifest, preds, _, _ = build_side(tmp / f"work{side}", models, side)
        # Scanner identifiers as they come: an all-digit serial, software versions that start
        # like a number (both must still reach plink2 as categories).
        rows = pd.read_parquet(manifest)
        odd = rows["eid"].astype(str).str[-1].astype(int) % 2 == 1
        rows["device_serial"] = pd.array(np.where(odd, "200123", "200456"), dtype="string")
        rows["software_versions"] = pd.array(["12.30.008\\enCORE 16"] * len(rows), dtype="string")
        # and a participant whose header was never read (an unreadable image): every device field NA
        unread = rows["eid"].astype(str) == UNREAD
        for column in ("device_serial", "software_versions"):  # the example manifests have no other device field
            rows[column] = rows[column].astype("string").mask(unread)
        rows.to_parquet(manifest)
        out = tmp / "phenotypes" / f"osteophytes_{side}.parquet"
        phenotypes.gather(manifest=manifest, predictions=preds, models=models, side=side, out=out, splits=[splits])
        tables[side], manifests[side] = out, manifest
    out = tmp / "phenotypes" / "osteophytes.parquet"
    table = release.release_both_sides(phenotypes=tables, manifests=manifests, out=out)
    return {"table": table, "out": out, "tables": tables, "tmp": tmp}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return release_cohort(tmp_path_factory.mktemp("release"))


def test_participant_parquet_read_by_pyarrow_duckdb_polars(released):
    duckdb = pytest.importorskip("duckdb")
    polars = pytest.importorskip("polars")
    out, table = released["out"], released["table"]
    left = pd.read_parquet(released["tables"]["L"])
    assert len(table) == len(left.drop_duplicates(["eid", "instance"]))  # the right hips are the left's twins
    schema = pq.read_schema(out)
    assert schema.metadata[b"sides"] == b"L,R" and schema.metadata[b"instance_policy"] == b"first_passing"
    for name in (f"{A}_present_L", f"{A}_present_R", f"{A}_present_any", f"{A}_area_sum_mm2", "n_sides_measured"):
        assert name in schema.names
    n = duckdb.sql(f"SELECT count(*) FROM '{out}' WHERE {A}_present_any = 1").fetchall()[0][0]
    assert n == int((table[f"{A}_present_any"] == 1).sum()) > 0
    frame = polars.read_parquet(out)
    assert frame.height == len(table) and frame[f"{A}_area_sum_mm2"].null_count() == int(
        table[f"{A}_area_sum_mm2"].isna().sum())
    # twins: the sum of both hips is twice the left's area, the larger one the left's
    twice = table[f"{A}_area_sum_mm2"].dropna()
    np.testing.assert_allclose(twice, 2 * table.loc[twice.index, f"{A}_area_mm2_L"].astype(float))


def test_participant_gwas_files_in_regenie_format(released):
    stem = released["out"].with_suffix("")
    bt = read_regenie(release.release_path(stem, "bt"), binary=True)
    qt = read_regenie(release.release_path(stem, "qt"))
    covar = read_regenie(release.release_path(stem, "covar"))
    assert bt["IID"].tolist() == qt["IID"].tolist() == covar["IID"].tolist()
    assert bt["IID"].is_unique and len(bt) == released["table"]["eid"].nunique()
    assert f"{A}_present_any" in bt.columns and f"{A}_area_max_mm2_rint" in qt.columns
    assert {"instance", "n_sides_measured", "reference_length_mm", "reference_length_mm_L",
            "reference_length_mm_R", "device_serial"} <= set(covar.columns)
    assert set(covar["device_serial"]) == {"serial_200123", "serial_200456", release.MISSING_CATEGORY}
    assert (covar.loc[covar["IID"] == UNREAD, list(release.DEVICE_COLUMNS)] == release.MISSING_CATEGORY).all(axis=None)
    removed = release.release_path(stem, "remove").read_text().splitlines()
    assert removed == ["1000\t1000", "1001\t1001"]
    d = pd.read_csv(release.release_path(stem, "dict"), sep="\t", keep_default_na=False)
    for kind, table in (("bt", bt), ("qt", qt), ("covar", covar)):
        assert d.loc[d["FILES"] == kind, "FIELD"].tolist() == list(table.columns[2:])
    assert d.loc[d["FILES"] == "parquet", "FIELD"].tolist() == pq.read_schema(released["out"]).names
    assert (d["DESCRIPTION"].str.len() > 10).all()


def test_side_gwas_files_in_regenie_format(released):
    for side in ("L", "R"):
        stem = released["tables"][side].with_suffix("")
        bt = read_regenie(release.release_path(stem, "bt"), binary=True)
        qt = read_regenie(release.release_path(stem, "qt"))
        read_regenie(release.release_path(stem, "covar"))
        assert bt["IID"].tolist() == qt["IID"].tolist()


def test_cli_release(released, tmp_path):
    from hipoa.cli import main

    tmp = released["tmp"]
    out = tmp_path / "osteophytes.parquet"
    manifests = {side: tmp / f"work{side}" / f"{side}.parquet" for side in ("L", "R")}
    argv = ["release", "--phenotypes", *map(str, released["tables"].values()),
            "--manifests", *map(str, manifests.values()), "--out", str(out)]
    assert main(argv) == 0
    assert pq.read_table(out).drop(["eid"]).equals(pq.read_table(released["out"]).drop(["eid"]))
    assert main([*argv[:-2], "--out", str(tmp_path / "x.parquet"), "--instance", "latest"]) == 2


def test_every_table_records_its_provenance_and_the_calibrations(released):
    """The participant table (and each side's) names the commit and the tools' versions, and
    carries each site's probability calibration as the side tables do."""
    import json

    from hipoa.provenance import PACKAGES

    for path in [released["out"], *released["tables"].values()]:
        meta = pq.read_schema(path).metadata
        record = json.loads(meta[b"provenance"])
        assert set(record) == {"git_commit", "python", "hipoa", *PACKAGES}, path
        assert record["git_commit"] and all(isinstance(v, str) and v for v in record.values())
    side = pq.read_schema(released["tables"]["L"]).metadata
    both = pq.read_schema(released["out"]).metadata
    keys = [k for k in side if k.startswith(b"probability_calibration:")]
    assert keys and all(both[k] == side[k] for k in keys)


def test_git_commit_is_the_checkout_or_says_there_is_none(tmp_path, monkeypatch):
    import subprocess

    from hipoa.provenance import git_commit

    repo = Path(__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert git_commit(repo).startswith(head.stdout.strip())
    assert git_commit(tmp_path) == "none (not a git checkout)"
    monkeypatch.setenv("HIPOA_GIT_COMMIT", "abc123")
    assert git_commit(tmp_path) == "abc123"


def test_participant_table_joins_the_ukb_main_dataset_as_it_ships(released, tmp_path):
    """UK Biobank's main dataset (ukbconv's csv: quoted header and values; its tab form with
    ``f.eid``) read the way an analyst reads it: eid comes out int64, and the join on it keeps
    every row of hipoa's table (one per participant and visit; the main dataset is one row per
    participant), whatever their images' fate."""
    table = pd.read_parquet(released["out"])
    assert str(table["eid"].dtype) == "int64"
    eids = sorted(set(table["eid"])) + [9999990]  # and a participant with no DXA
    main = tmp_path / "ukb67890.csv"
    main.write_text('"eid","31-0.0","21003-2.0"\n' + "".join(f'"{e}","{e % 2}","{60 + e % 9}"\n' for e in eids))
    tab = tmp_path / "ukb67890.tab"
    tab.write_text("f.eid\tf.31.0.0\n" + "".join(f"{e}\t{e % 2}\n" for e in eids))
    for frame, key in ((pd.read_csv(main), "eid"), (pd.read_csv(tab, sep="\t").rename(columns={"f.eid": "eid"}), "eid")):
        assert str(frame[key].dtype) == "int64"
        joined = table.merge(frame, on=key, how="inner", validate="many_to_one")
        assert len(joined) == len(table)
        assert (joined["eid"] % 2 == joined.filter(regex="31").iloc[:, 0]).all()  # rows matched, not shifted
