"""Withdrawals cannot be missed (issue 22 item 1): UK Biobank's withdrawal list read as UKB writes
it and as spreadsheets and data frames rewrite it, through the real ``hipoa ingest``.

One small cohort (built once): participant 9751499 (two visits, an annotation) and three others.
Each spelling of 9751499 must remove that participant so that the eid is in no cell or metadata
of the manifest and in no line of the debug log; a number that cannot be exactly one eid stops
ingest before any image is read, with one line naming the file, the line and the entry's shape.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_ingest import good_points, ukb_members, write_mask, write_zip  # noqa: E402  (tests/unit is on sys.path)

from hipoa.cli import main  # noqa: E402
from hipoa.ingest import read_withdrawn  # noqa: E402
from hipoa.points import write_pts  # noqa: E402

GONE = "9751499"  # the participant who withdrew: two zips (instances 2 and 3), left images
OTHERS = ("9000002", "9000003", "2")
IMAGES = "ukb/20158/{eid}_20158_{instance}_{array}.zip"
AUTO = "points/auto/{eid}_{instance}_{side}.pts"
MANUAL = "points/manual/{eid}_{instance}_{side}.pts"
MASKS = "masks/{eid}_{instance}_{side}.png"
NUMERIC_WARNING = "entries are not written as canonical eids"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("withdrawals")
    ukb, auto, manual = root / "ukb" / "20158", root / "points" / "auto", root / "points" / "manual"
    for d in (ukb, auto, manual):
        d.mkdir(parents=True)
    for eid in (GONE, *OTHERS):
        write_zip(ukb / f"{eid}_20158_2_0.zip", ukb_members(int(eid)))
        write_pts(auto / f"{eid}_2_L.pts", good_points(int(eid) % 97))
    write_zip(ukb / f"{GONE}_20158_3_0.zip", ukb_members(int(GONE)))
    write_pts(auto / f"{GONE}_3_L.pts", good_points(3))
    # an annotation too, so mask and manual-point paths would carry the eid
    write_mask(root / "masks" / f"{GONE}_2_L.png")
    write_pts(manual / f"{GONE}_2_L.pts", good_points(4))
    return root


def _ingest(cohort: Path, out: Path, withdrawn: Path | None) -> int:
    argv = ["-v", "ingest", "--images", str(cohort / IMAGES), "--points-auto", str(cohort / AUTO),
            "--points-manual", str(cohort / MANUAL), "--masks", str(cohort / MASKS), "--side", "L",
            "--shards", "2", "--out", str(out)]
    return main(argv + (["--withdrawn", str(withdrawn)] if withdrawn is not None else []))


def _traces(out: Path, text: str) -> list[str]:
    """Where the manifest ``out`` or the captured ``text`` holds GONE."""
    df = pd.read_parquet(out)
    where = [f"column {c}" for c in df.columns if df[c].astype(str).str.contains(GONE, regex=False).any()]
    meta = pq.read_metadata(out).metadata or {}
    where += [f"metadata {k!r}" for k, v in meta.items() if GONE.encode() in k + v]
    where += [f"log: {line}" for line in text.splitlines() if GONE in line]
    return where


def test_without_a_list_the_participant_is_in_the_manifest_and_the_log(cohort, tmp_path, capsys):
    """The control: the checks below can fail."""
    out = tmp_path / "L.parquet"
    assert _ingest(cohort, out, None) == 0
    captured = capsys.readouterr()
    where = _traces(out, captured.out + captured.err)
    assert "column eid" in where and "column image" in where and "column mask" in where
    assert any(w.startswith("log: ") for w in where)  # the debug log names the images it reads
    assert (pd.read_parquet(out)["eid"] == GONE).sum() == 2


# spelling -> (the file's bytes, entries matched only by their integer value)
SPELLINGS = {
    "leading_zeros": (b"09751499\n", 1),
    "decimal_zero": (b"9751499.0\n", 1),
    "exponent": (b"9.751499e6\n", 1),
    "exponent_upper_signed": (b"9.751499E+06\n", 1),
    "exponent_zero_mantissa": (b"0.9751499e7\n", 1),
    "quotes": (b'"9751499"\n', 0),
    "spaces": (b"   9751499 \t\n", 0),
    "bom": ("\ufeff9751499\n".encode(), 0),
    "crlf_blank_lines": (b"\r\n9751499\r\n\r\n", 0),
    "header_eid": (b"eid\n9751499\n", 0),
    "header_f_eid": (b'"f.eid"\n"9751499"\n', 0),
    "float_column_csv": ("\ufeff\"f.eid\",\r\n\" 9751499.0 \",\r\n\r\n".encode(), 1),
    "duplicates": (b"eid\n9751499\n09751499\n9.751499e6\n", 2),
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_every_spelling_removes_the_participant_without_a_trace(cohort, tmp_path, capsys, spelling):
    text, numeric = SPELLINGS[spelling]
    listing = tmp_path / "withdraw.csv"
    listing.write_bytes(text)
    out = tmp_path / "L.parquet"
    assert _ingest(cohort, out, listing) == 0
    captured = capsys.readouterr()
    assert _traces(out, captured.out + captured.err) == []
    df = pd.read_parquet(out)
    assert sorted(df["eid"]) == sorted(OTHERS)
    meta = pq.read_metadata(out).metadata
    assert (meta[b"withdrawn_participants"], meta[b"withdrawn_images"]) == (b"1", b"2")
    assert meta[b"withdrawn_unmatched_entries"] == b"0"
    warnings = [line for line in captured.err.splitlines() if NUMERIC_WARNING in line]
    if numeric:  # matched only numerically: one WARNING naming the count
        assert len(warnings) == 1 and "WARNING" in warnings[0] and f": {numeric} entries are not" in warnings[0]
    else:
        assert warnings == []
    assert "withdrawn, removed before ingest (no row): 1 participants, 2 images" in captured.out


def test_entries_that_match_no_participant_are_counted(cohort, tmp_path, capsys):
    listing = tmp_path / "w.txt"
    listing.write_bytes(b"eid\n9751499\n9999999\n08888888\n")
    out = tmp_path / "L.parquet"
    assert _ingest(cohort, out, listing) == 0
    captured = capsys.readouterr()
    assert _traces(out, captured.out + captured.err) == []
    assert pq.read_metadata(out).metadata[b"withdrawn_unmatched_entries"] == b"2"
    assert "3 eids listed, 2 of them match no image of side L" in captured.err  # ingest's summary log line
    assert "2 of the list's 3 entries match no L image" in captured.out


@pytest.mark.parametrize("text, line, shape, why", [
    (b"9751499\n9.75e6\n", 2, "'#.##e#'", "3 significant digits, which cannot identify a 7-digit eid"),
    (b"eid\n9.75149e6\n", 2, "'#.#####e#'", "6 significant digits"),  # 9751490 would need 9.751490e6
    (b"9751499.5\n", 1, "'#######.#'", "not an integer"),
    (b"1e400\n", 1, "'#e###'", "more than 30 digits"),
    (b"eid\n9000002\n\n9751499 2026-01-01\n", 4, "'####### ####-##-##'", "is not an eid"),
    (b"9751499;\n", 1, "'#######;'", "is not an eid"),
    (b"9751499,withdrawn\n", 1, "'#######,withdrawn'", "is not an eid"),  # no header: it holds an eid
])
def test_an_entry_that_cannot_be_one_eid_stops_ingest_before_any_image(
    cohort, tmp_path, capsys, monkeypatch, text, line, shape, why
):
    import hipoa.ingest

    def no_images(**kw):
        raise AssertionError("build_manifest ran: images would have been read")

    monkeypatch.setattr(hipoa.ingest, "build_manifest", no_images)
    listing = tmp_path / "w.txt"
    listing.write_bytes(text)
    out = tmp_path / "L.parquet"
    assert _ingest(cohort, out, listing) == 2
    assert not out.exists()
    errors = [x for x in capsys.readouterr().err.splitlines() if "ERROR" in x]
    assert len(errors) == 1
    assert f"withdrawal file {listing}: line {line}, written {shape}, " in errors[0] and why in errors[0]
    assert GONE not in errors[0] and "9000002" not in errors[0]  # the shape, never an eid


def test_the_exponent_rule(tmp_path):
    """Exponent notation is one integer only when it writes every digit of it."""
    path = tmp_path / "w.txt"
    for text in ("9.751499e6", "17.51499E5", "1.7514990e6", "9751499e0", "0.9751499e+7", "9.751490e6"):
        path.write_text(text + "\n")
        got = read_withdrawn(path)
        assert (sorted(got), got.numeric) == ([str(int(float(text)))], 1), text
    for text in ("9.75e6", "9.75149e6", "1.8e6", "2e6", "1.7514995e6"):
        path.write_text(text + "\n")
        with pytest.raises(ValueError, match="line 1, written"):
            read_withdrawn(path)


def test_canonical_entries_log_no_warning(tmp_path, caplog):
    path = tmp_path / "w.txt"
    path.write_text("eid\n9751499\n9000002\n-3\n")
    with caplog.at_level(logging.DEBUG, logger="hipoa"):
        got = read_withdrawn(path)
    assert got == {"9751499", "9000002", "-3"} and got.numeric == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
