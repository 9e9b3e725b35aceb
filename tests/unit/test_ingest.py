"""Ingest (hipoa.ingest): the UKB layout or a manifest CSV -> the manifest Parquet."""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ImplicitVRLittleEndian, generate_uid

from hipoa.cli import main
from hipoa.ingest import (
    MANIFEST_COLUMNS,
    MANIFEST_SCHEMA,
    build_manifest,
    pattern_to_glob,
    read_withdrawn,
    shard_of,
    write_manifest,
)
from hipoa.points import write_pts

ROWS, COLS = 60, 68  # ExposedArea [17, 15] mm -> 0.25 mm each way
IMAGES = "ukb/20158/{eid}_20158_{instance}_{array}.zip"
AUTO = "points/auto/{eid}_{instance}_{side}.pts"
MANUAL = "points/manual/{eid}_{instance}_{side}.pts"
MASKS = "masks/{eid}_{instance}_{side}.png"
DEVICE = {  # (0008,0070), (0008,1090), (0018,1000), (0018,1020): the scanner, never the person
    "Manufacturer": "GE Healthcare",
    "ManufacturerModelName": "Lunar iDXA",
    "DeviceSerialNumber": "200123",
    "SoftwareVersions": ["12.30.008", "enCORE 16"],
}
DEVICE_COLUMNS = ["manufacturer", "manufacturer_model", "device_serial", "software_versions"]


def hip_dicom(
    protocol: str, *, seed: int = 0, exposed_area: tuple[int, int] | None = (17, 15), device: dict | None = DEVICE
) -> bytes:
    """A small hip DICOM with UKB's iDXA header profile (CR, Implicit VR LE, 8-bit MONOCHROME2);
    ``device``: the equipment tags to write (None: none)."""
    arr = np.random.default_rng(seed).integers(0, 256, size=(ROWS, COLS), dtype=np.uint8)
    uid = generate_uid(entropy_srcs=[protocol, str(seed)])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, uid
    ds.Modality = "CR"
    ds.ProtocolName = protocol
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if exposed_area is not None:
        ds.ExposedArea = list(exposed_area)
    for keyword, value in (device or {}).items():
        setattr(ds, keyword, value)
    ds.PatientID = "PID-NOT-IN-MANIFEST"
    ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def ukb_members(eid: int, *, left: bytes | bool | None = None, right: bytes | bool | None = None) -> dict[str, bytes]:
    members = {"manifest.cvs": b"file,description\n"}
    members[f"1.2.826.0.1.{eid}.1"] = hip_dicom("AP Spine", seed=eid + 1)
    if left is not False:
        members[f"1.2.826.0.1.{eid}.2"] = left if left is not None else hip_dicom("Left Femur", seed=eid)
    if right is not False:
        members[f"1.2.826.0.1.{eid}.3"] = right if right is not None else hip_dicom("Right Femur", seed=eid + 2)
    return members


def good_points(seed: int, n: int = 85) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(5, COLS - 5, n), rng.uniform(5, ROWS - 5, n)])


def write_mask(path: Path, shape: tuple[int, int] = (ROWS, COLS)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros(shape, dtype=np.uint8)).save(path)


EXPECTED_L = {  # eid -> qc_reason of its left hip
    "9000001": "",
    "9000002": "",
    "9000003": "unreadable_zip",
    "9000004": "no_hip_dicom",
    "9000005": "unreadable_dicom",
    "9000006": "points_missing",
    "9000007": "points_invalid",
    "9000008": "points_outside_image",
    "9000009": "",
    "9000011": "unreadable_dicom",
    "95": "",
}


def make_layout(root: Path) -> Path:
    """A small UKB layout with one planted problem per left hip (see EXPECTED_L)."""
    ukb = root / "ukb" / "20158"
    auto = root / "points" / "auto"
    manual = root / "points" / "manual"
    for d in (ukb, auto, manual):
        d.mkdir(parents=True, exist_ok=True)
    for eid in (9000001, 9000002, 9000006, 9000007, 9000008, 9000009):
        write_zip(ukb / f"{eid}_20158_2_0.zip", ukb_members(eid))
    write_zip(ukb / "95_20158_2_0.zip", ukb_members(95, left=hip_dicom("Left Femur", seed=2, device=None)))
    (ukb / "9000003_20158_2_0.zip").write_bytes(b"PK\x03\x04 not a zip at all " * 20)
    write_zip(ukb / "9000004_20158_2_0.zip", ukb_members(9000004, left=False))
    write_zip(ukb / "9000005_20158_2_0.zip", ukb_members(9000005, left=hip_dicom("Left Femur", seed=5)[:-700]))
    write_zip(ukb / "9000011_20158_2_0.zip", ukb_members(9000011, left=hip_dicom("Left Femur", exposed_area=None)))
    # a second visit array of 9000001, instance 2: a duplicate image
    write_zip(ukb / "9000001_20158_2_1.zip", ukb_members(9000001))
    # and a later instance: a distinct key
    write_zip(ukb / "9000001_20158_3_0.zip", ukb_members(9000001))

    eids = ["9000001", "9000002", "9000003", "9000004", "9000005", "9000007", "9000008", "9000009", "9000011", "95"]
    for i, eid in enumerate(eids):
        for side in "LR":
            write_pts(auto / f"{eid}_2_{side}.pts", good_points(i))
    write_pts(auto / "9000001_3_L.pts", good_points(99))
    write_pts(auto / "9000001_3_R.pts", good_points(99))
    write_pts(auto / "9000006_2_R.pts", good_points(6))  # left auto points missing
    write_pts(auto / "9000007_2_L.pts", good_points(7, n=84))
    bad = good_points(8)
    bad[40] = [COLS + 3.0, 10.0]
    write_pts(auto / "9000008_2_L.pts", bad)
    # annotations: 9000001 fully; 9000009 with broken manual points; 9000002 manual points only
    write_mask(root / "masks" / "9000001_2_L.png")
    write_pts(manual / "9000001_2_L.pts", good_points(1))
    write_mask(root / "masks" / "9000009_2_L.png")
    (manual / "9000009_2_L.pts").write_text("version: 1\nn_points: 85\n{\n1 2\n")
    write_pts(manual / "9000002_2_L.pts", good_points(2))
    return root


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return make_layout(tmp_path_factory.mktemp("cohort"))


def layout_manifest(root: Path, side: str = "L", **kw) -> pd.DataFrame:
    return build_manifest(
        images=str(root / IMAGES),
        points_auto=str(root / AUTO),
        points_manual=str(root / MANUAL),
        masks=str(root / MASKS),
        side=side,
        n_shards=kw.pop("n_shards", 4),
        **kw,
    )


@pytest.fixture(scope="module")
def manifest_l(layout) -> pd.DataFrame:
    return layout_manifest(layout)


def test_every_reason_flagged_and_no_row_lost(manifest_l):
    df = manifest_l
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    assert len(df) == 13  # 13 zips, one left-hip row each
    inst2 = df[(df["instance"] == 2) & (df["array"] == 0)].set_index("eid")["qc_reason"].to_dict()
    assert inst2 == EXPECTED_L
    dup = df[(df["eid"] == "9000001") & (df["instance"] == 2)]
    assert dup["array"].tolist() == [0, 1] and dup["qc_reason"].tolist() == ["", "duplicate_image"]
    later = df[(df["eid"] == "9000001") & (df["instance"] == 3)]
    assert later["qc_reason"].tolist() == [""]


def test_row_order_and_dtypes(manifest_l):
    df = manifest_l
    keys = list(zip(df["eid"], df["instance"], df["side"]))
    assert keys == sorted(keys)
    assert df["eid"].iloc[0] == "9000001" and df["eid"].iloc[-1] == "95"  # sorted as strings
    assert str(df["instance"].dtype) == "int16" and str(df["shard"].dtype) == "int32"
    assert str(df["rows"].dtype) == "Int32" and df["annotated"].dtype == bool
    assert (df["side"] == "L").all()


def test_header_fields(manifest_l, layout):
    ok = manifest_l[manifest_l["eid"] == "9000002"].iloc[0]
    assert (ok["rows"], ok["cols"]) == (ROWS, COLS)
    assert (ok["spacing_row_mm"], ok["spacing_col_mm"]) == (0.25, 0.25)
    assert ok["member"] == "1.2.826.0.1.9000002.2"
    assert ok["image"] == str(layout / "ukb/20158/9000002_20158_2_0.zip")
    assert ok["points_auto"] == str(layout / "points/auto/9000002_2_L.pts")
    # unreadable zip: nothing known about the image
    bad = manifest_l[manifest_l["eid"] == "9000003"].iloc[0]
    assert bad["member"] == "" and pd.isna(bad["rows"]) and np.isnan(bad["spacing_row_mm"])
    # truncated pixel data: header still read
    cut = manifest_l[manifest_l["eid"] == "9000005"].iloc[0]
    assert cut["member"] == "1.2.826.0.1.9000005.2"


def test_device_columns(manifest_l):
    cols = list(MANIFEST_COLUMNS)
    i = cols.index("spacing_col_mm")
    assert cols[i + 1 : i + 5] == DEVICE_COLUMNS and cols[i + 5] == "annotated"
    for c in DEVICE_COLUMNS:
        assert str(manifest_l[c].dtype) == "string", c
        assert not manifest_l[c].fillna("NA").eq("").any(), c  # missing is NA, never ""
    by = manifest_l[(manifest_l["instance"] == 2) & (manifest_l["array"] == 0)].set_index("eid")
    expected = ["GE Healthcare", "Lunar iDXA", "200123", "12.30.008\\enCORE 16"]
    assert by.loc["9000002", DEVICE_COLUMNS].tolist() == expected
    # points problems do not hide the header; the image's own problems do
    assert by.loc["9000008", "device_serial"] == "200123"
    for eid in ("95", "9000003", "9000004", "9000005", "9000011"):  # no tags; unreadable zip, no hip, cut, no spacing
        assert by.loc[eid, DEVICE_COLUMNS].isna().all(), eid
    # the patient tags of the DICOM are in no column
    assert not manifest_l.astype(str).apply(lambda c: c.str.contains("PID-NOT-IN-MANIFEST")).any().any()


def test_masks_and_manual_points(manifest_l, layout):
    by = manifest_l[(manifest_l["instance"] == 2) & (manifest_l["array"] == 0)].set_index("eid")
    assert by.loc["9000001", "annotated"] and by.loc["9000001", "mask"] == str(layout / "masks/9000001_2_L.png")
    assert by.loc["9000001", "points_manual"] == str(layout / "points/manual/9000001_2_L.pts")
    # annotated, manual points truncated: still phenotyped from auto points, manual left empty
    assert by.loc["9000009", "annotated"] and by.loc["9000009", "points_manual"] == ""
    assert by.loc["9000009", "qc_reason"] == ""
    # manual points without a mask: recorded, not annotated
    assert not by.loc["9000002", "annotated"] and by.loc["9000002", "mask"] == ""
    assert by.loc["9000002", "points_manual"].endswith("9000002_2_L.pts")
    # 9000001 (both arrays of instance 2: the mask pattern has no {array}) and 9000009
    assert int(manifest_l["annotated"].sum()) == 3


def test_manual_points_problem_is_logged(layout, caplog):
    caplog.set_level("WARNING", logger="hipoa.ingest")
    layout_manifest(layout)
    assert any("9000009_2_L" in r.getMessage() and "manual" in r.getMessage() for r in caplog.records)


def test_right_side(layout):
    df = layout_manifest(layout, side="R")
    assert len(df) == 13 and (df["side"] == "R").all()
    by = df[(df["instance"] == 2) & (df["array"] == 0)].set_index("eid")["qc_reason"]
    assert by["9000004"] == "" and by["9000005"] == "" and by["9000006"] == ""  # their left hips were the problem
    assert by["9000003"] == "unreadable_zip"
    assert df.loc[df["eid"] == "9000004", "member"].item() == "1.2.826.0.1.9000004.3"


def test_shards(manifest_l):
    for eid, shard in zip(manifest_l["eid"], manifest_l["shard"]):
        digest = hashlib.blake2b(eid.encode(), digest_size=8).digest()
        assert shard == int.from_bytes(digest, "big") % 4
    assert shard_of(9000001, 7) == shard_of("9000001", 7)
    assert manifest_l.groupby("eid")["shard"].nunique().max() == 1  # a participant's images together
    with pytest.raises(ValueError, match="n_shards"):
        shard_of("1", 0)


def test_adding_participants_does_not_move_shards(tmp_path):
    small = make_layout(tmp_path / "a")
    before = layout_manifest(small, n_shards=3)
    for eid in range(9500000, 9500012):
        write_zip(small / "ukb" / "20158" / f"{eid}_20158_2_0.zip", ukb_members(eid))
        write_pts(small / "points" / "auto" / f"{eid}_2_L.pts", good_points(eid))
    after = layout_manifest(small, n_shards=3)
    assert len(after) == len(before) + 12
    merged = before.merge(after, on=["eid", "instance", "array", "side"], suffixes=("_b", "_a"))
    assert len(merged) == len(before)
    assert (merged["shard_b"] == merged["shard_a"]).all()
    assert set(after["shard"]) == {0, 1, 2}


def test_manifest_csv_equals_layout(layout, manifest_l):
    records = []
    for path in sorted((layout / "ukb" / "20158").glob("*.zip")):
        eid, _, instance, array = path.stem.split("_")
        for side in "LR":
            values = {"eid": eid, "instance": instance, "side": side}
            rel = {k: p.format(**values, array=array) for k, p in (("image", IMAGES), ("points_auto", AUTO),
                                                                    ("points_manual", MANUAL), ("mask", MASKS))}
            if not (layout / rel["mask"]).exists():
                rel["mask"] = ""  # the contract's CSV leaves absent optional files empty
            records.append({"eid": eid, "instance": instance, "side": side, **rel, "array": array})
    csv = layout / "manifest.csv"
    pd.DataFrame(records).to_csv(csv, index=False)
    from_csv = build_manifest(manifest=csv, side="L", n_shards=4)
    pd.testing.assert_frame_equal(from_csv, manifest_l)
    # Parquet works the same, and without the optional array column
    pq_path = layout / "manifest.parquet"
    pd.DataFrame(records).drop(columns="array").to_parquet(pq_path)
    from_pq = build_manifest(manifest=pq_path, side="L", n_shards=4)
    assert from_pq["qc_reason"].tolist().count("duplicate_image") == 1
    assert len(from_pq) == len(manifest_l)


def test_manifest_with_plain_dicoms(tmp_path):
    (tmp_path / "dcm").mkdir()
    (tmp_path / "dcm" / "a.dcm").write_bytes(hip_dicom("Left Femur", seed=1))
    (tmp_path / "dcm" / "b.dcm").write_bytes(hip_dicom("Left Femur", seed=2)[:-300])
    write_pts(tmp_path / "a.pts", good_points(1))
    write_pts(tmp_path / "b.pts", good_points(2))
    write_pts(tmp_path / "c.pts", good_points(1))  # each image its own points file (one for two is refused)
    pd.DataFrame(
        {
            "eid": ["11", "12", "13", "11"],
            "instance": [2, 2, 2, 2],
            "side": ["L", "L", "L", "R"],
            "image": ["dcm/a.dcm", "dcm/b.dcm", "dcm/missing.dcm", "dcm/a.dcm"],
            "points_auto": ["a.pts", "b.pts", "c.pts", ""],
            "points_manual": ["", "", "", ""],
            "mask": ["", "", "", ""],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    df = build_manifest(manifest=tmp_path / "m.csv", side="L", n_shards=2)
    assert df["eid"].tolist() == ["11", "12", "13"]
    assert df["qc_reason"].tolist() == ["", "unreadable_dicom", "unreadable_dicom"]
    assert df["member"].tolist() == ["", "", ""]
    assert df["image"].iloc[0] == str(tmp_path / "dcm" / "a.dcm")
    assert df["spacing_col_mm"].iloc[0] == 0.25


def test_bad_manifest_table_raises(tmp_path):
    pd.DataFrame({"eid": [1], "side": ["L"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ValueError, match=r"m.csv.*instance"):
        build_manifest(manifest=tmp_path / "m.csv", side="L", n_shards=1)


def test_argument_errors(layout):
    with pytest.raises(ValueError, match="exactly one"):
        build_manifest(side="L", n_shards=1)
    with pytest.raises(ValueError, match="points_auto"):
        build_manifest(images=str(layout / IMAGES), side="L", n_shards=1)
    with pytest.raises(ValueError, match="no image matches"):
        build_manifest(images=str(layout / "nowhere/{eid}_{instance}.zip"), points_auto=AUTO, side="L", n_shards=1)
    with pytest.raises(ValueError, match="unknown wildcard"):
        build_manifest(images=str(layout / "ukb/{eid}_{visit}.zip"), points_auto=AUTO, side="L", n_shards=1)


def test_pattern_to_glob():
    g, rx = pattern_to_glob("d[1]/{eid}/{eid}_20158_{instance}_{array}.zip")
    assert g == "d[[]1]/*/*_20158_*_*.zip"
    m = rx.fullmatch("d[1]/123/123_20158_2_0.zip")
    assert m and m.group("eid") == "123" and m.group("instance") == "2" and m.group("array") == "0"
    assert rx.fullmatch("d[1]/123/124_20158_2_0.zip") is None  # a repeated wildcard must agree
    assert rx.fullmatch("d[1]/123/123_20158_x_0.zip") is None


def test_workers_give_the_same_manifest(layout, manifest_l):
    pd.testing.assert_frame_equal(layout_manifest(layout, workers=2), manifest_l)


def test_write_manifest_parquet_types(manifest_l, tmp_path):
    out = tmp_path / "results" / "manifest" / "L.parquet"
    write_manifest(manifest_l, out)
    schema = pq.read_schema(out)
    assert schema.names == MANIFEST_SCHEMA.names
    assert [str(t) for t in schema.types] == [str(t) for t in MANIFEST_SCHEMA.types]
    assert [str(schema.field(c).type) for c in DEVICE_COLUMNS] == ["string"] * 4
    back = pd.read_parquet(out)
    pd.testing.assert_frame_equal(back, manifest_l)
    assert back.loc[back["eid"] == "95", "manufacturer"].isna().all()  # NA survives the round trip
    meta = pq.read_metadata(out).metadata
    assert (meta[b"withdrawn_participants"], meta[b"withdrawn_images"]) == (b"0", b"0")  # no list given


def test_cli_ingest(layout, tmp_path, capsys):
    out = tmp_path / "L.parquet"
    rc = main([
        "ingest", "--images", str(layout / IMAGES), "--points-auto", str(layout / AUTO),
        "--masks", str(layout / MASKS), "--side", "L", "--shards", "3", "--out", str(out),
    ])
    assert rc == 0
    df = pd.read_parquet(out)
    assert len(df) == 13 and df["shard"].max() <= 2
    printed = capsys.readouterr().out
    assert "13 L images" in printed and "points_outside_image" in printed and "unreadable_zip" in printed
    # --images without --points-auto is refused with exit status 2
    assert main(["ingest", "--images", str(layout / IMAGES), "--side", "L", "--shards", "3", "--out", str(out)]) == 2


# ---------------------------------------------------------------------------------------------
# The project's synthetic cohort with planted faults


def test_synthetic_cohort_faults(tmp_path):
    from hipoa.synth import FAULTS, make_cohort

    root = tmp_path / "cohort"
    make_cohort(root, participants=12, seed=3, faults=6)
    truth = pd.read_parquet(root / "truth.parquet")
    truth["eid"] = truth["eid"].astype(str)
    frames = [
        build_manifest(
            images=str(root / "ukb/20158/{eid}_20158_{instance}_{array}.zip"),
            points_auto=str(root / "points/auto/{eid}_{instance}_{side}.pts"),
            points_manual=str(root / "points/manual/{eid}_{instance}_{side}.pts"),
            masks=str(root / "masks/{eid}_{instance}_{side}.png"),
            side=side,
            n_shards=2,
        )
        for side in "LR"
    ]
    got = pd.concat(frames, ignore_index=True)
    assert len(got) == len(truth) == 24  # both hips of 12 participants, nothing lost or invented
    keys = ["eid", "instance", "side"]
    counts = got.groupby(keys).size()
    for rec in truth.itertuples():
        key = (rec.eid, int(rec.instance), rec.side)
        assert counts.get(key, 0) == 1, f"{key}: {counts.get(key, 0)} manifest rows"
    merged = truth.merge(got.astype({"instance": "int64"}), on=keys, how="left")
    faulted = merged[merged["fault"].fillna("") != ""]
    assert set(faulted["fault"]) == set(FAULTS)  # six faulty participants: every kind planted
    expected = faulted["fault"].map({"points_off_image": "points_outside_image"}).fillna(faulted["expected_reason"])
    assert (faulted["qc_reason"] == expected).all(), faulted[["eid", "side", "fault", "expected_reason", "qc_reason"]]
    clean = merged[merged["fault"].fillna("") == ""]
    assert (clean["qc_reason"] == "").all(), clean.loc[clean["qc_reason"] != "", ["eid", "side", "qc_reason"]]
    # the generator's scanner tags reach the manifest
    assert (clean["manufacturer"] == "GE Healthcare").all() and (clean["manufacturer_model"] == "Lunar iDXA").all()
    assert (clean["device_serial"] == "SYNTH0001").all() and clean["software_versions"].str.startswith("hipoa ").all()


# ---------------------------------------------------------------------------------------------
# Withdrawals: participants who withdrew consent vanish before ingest, also from the log

WITHDRAWN = {"9000001", "9000003", "9000006", "9000007", "9999999"}  # 9999999 has no images


def test_read_withdrawn_tolerates_header_blanks_crlf_bom(tmp_path):
    path = tmp_path / "w20260101.csv"
    path.write_bytes("\ufeffeid,\r\n\r\n  9000001 \r\n9000002\r\n\t\r\n-3\r\n\r\n".encode())
    assert read_withdrawn(path) == {"9000001", "9000002", "-3"}
    path.write_text("9000001\n\n9000002\n")  # no header, Unix endings, no final newline issue
    assert read_withdrawn(path) == {"9000001", "9000002"}
    path.write_text("")
    assert read_withdrawn(path) == set()
    path.write_text("eid date\n")  # a header only
    assert read_withdrawn(path) == set()
    path.write_text("EID\n9000001\n")  # a column name that would pass as an eid is a header too
    assert read_withdrawn(path) == {"9000001"}
    path.write_text("0123\n123\n")  # one participant for withdrawal: equal as integers
    assert read_withdrawn(path) == {"123"} and read_withdrawn(path).numeric == 1


def test_read_withdrawn_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text("eid\n9000001\n\n9000042 20260101\n9000003\n")
    with pytest.raises(ValueError) as exc:
        read_withdrawn(path)
    msg = str(exc.value)
    assert str(path) in msg and "line 4" in msg
    assert "9000042" not in msg and "9000001" not in msg  # never an eid from the file
    path.write_text("9000001\neid,date\n")  # a header after an eid is no header
    with pytest.raises(ValueError, match="line 2"):
        read_withdrawn(path)
    with pytest.raises(ValueError, match="no such file"):
        read_withdrawn(tmp_path / "missing.txt")


def test_withdrawn_participants_vanish_from_table_and_log(layout, manifest_l, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    withdrawn = read_withdrawn(_withdrawal_file(tmp_path, WITHDRAWN))
    df = layout_manifest(layout, withdrawn=withdrawn)
    assert not set(df["eid"]) & WITHDRAWN
    expected = manifest_l[~manifest_l["eid"].isin(WITHDRAWN)].reset_index(drop=True)
    pd.testing.assert_frame_equal(df, expected)  # the others' rows are untouched
    summary = df.attrs["ingest"]
    # 9000001: three zips (instance 2 arrays 0 and 1, instance 3); the others one each
    assert (summary["withdrawn_participants"], summary["withdrawn_images"]) == (4, 6)
    messages = [r.getMessage() for r in caplog.records]
    assert ("withdrawn: 4 participants (6 images) removed before ingest; 5 eids listed, 1 of them match no image "
            "of side L") in messages
    # the log does name the other participants' problems, down to DEBUG lines of hipoa.dicom ...
    assert any("9000008" in m and "points_outside_image" in m for m in messages)
    assert any("9000002" in m and "not DICOM, skipped" in m for m in messages)
    # ... and never a withdrawn one: not their missing (9000006) or bad (9000007) points, not
    # the unreadable zip (9000003), not the duplicate (9000001)
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert not [e for e in WITHDRAWN if e in text], text
    out = tmp_path / "L.parquet"
    write_manifest(df, out)
    meta = pq.read_metadata(out).metadata
    assert (meta[b"withdrawn_participants"], meta[b"withdrawn_images"]) == (b"4", b"6")
    assert meta[b"withdrawn_unmatched_entries"] == b"1"  # 9999999 has no images


def test_without_the_list_the_same_log_names_them(layout, caplog):
    # the check above can fail: the same ingest without a list logs the withdrawn eids' problems
    caplog.set_level(logging.DEBUG)
    layout_manifest(layout)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "9000006_2_L: points_missing" in text and "9000007_2_L: points_invalid" in text
    assert "9000003" in text and "9000001_2_L: duplicate_image" in text


def test_everyone_withdrawn_gives_an_empty_manifest(layout):
    every = {p.name.split("_")[0] for p in (layout / "ukb" / "20158").glob("*.zip")}
    df = layout_manifest(layout, withdrawn=every)
    assert len(df) == 0 and list(df.columns) == list(MANIFEST_COLUMNS)
    assert (df.attrs["ingest"]["withdrawn_participants"], df.attrs["ingest"]["withdrawn_images"]) == (11, 13)
    with pytest.raises(TypeError, match="read_withdrawn"):
        layout_manifest(layout, withdrawn=str(layout / "w.txt"))


def test_withdrawn_rows_of_a_manifest_table_are_dropped_unchecked(tmp_path, caplog):
    (tmp_path / "a.dcm").write_bytes(hip_dicom("Left Femur", seed=1))
    write_pts(tmp_path / "a.pts", good_points(1))
    table = pd.DataFrame(
        {
            "eid": ["11", "9000012", "9000012", "9000012"],
            "instance": ["2", "2", "x", "2"],  # a withdrawn row that would be refused
            "side": ["L", "L", "L", "R"],
            "image": ["a.dcm", "9000012.dcm", "", "9000012.dcm"],
            "points_auto": ["a.pts", "9000012.pts", "", ""],
            "points_manual": ["", "", "", ""],
            "mask": ["", "", "", ""],
        }
    )
    table.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ValueError, match="row 3"):  # without the list, row 3 stops the ingest
        build_manifest(manifest=tmp_path / "m.csv", side="L", n_shards=1)
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    df = build_manifest(manifest=tmp_path / "m.csv", side="L", n_shards=1, withdrawn={"9000012"})
    assert df["eid"].tolist() == ["11"] and df["qc_reason"].tolist() == [""]
    assert (df.attrs["ingest"]["withdrawn_participants"], df.attrs["ingest"]["withdrawn_images"]) == (1, 2)
    assert not any("9000012" in r.getMessage() for r in caplog.records)
    right = build_manifest(manifest=tmp_path / "m.csv", side="R", n_shards=1, withdrawn={"9000012"})
    assert len(right) == 0 and right.attrs["ingest"]["withdrawn_images"] == 1


def test_cli_ingest_withdrawn(layout, tmp_path, capsys):
    out = tmp_path / "L.parquet"
    rc = main([
        "-v", "ingest", "--images", str(layout / IMAGES), "--points-auto", str(layout / AUTO),
        "--masks", str(layout / MASKS), "--side", "L", "--shards", "3", "--out", str(out),
        "--withdrawn", str(_withdrawal_file(tmp_path, WITHDRAWN)),
    ])
    assert rc == 0
    df = pd.read_parquet(out)
    assert len(df) == 13 - 6 and not set(df["eid"]) & WITHDRAWN
    assert pq.read_metadata(out).metadata[b"withdrawn_images"] == b"6"
    captured = capsys.readouterr()
    assert "withdrawn, removed before ingest (no row): 4 participants, 6 images" in captured.out
    assert "9000008" in captured.err  # the debug log went to stderr ...
    assert not [e for e in WITHDRAWN if e in captured.out + captured.err]  # ... without them
    (tmp_path / "bad.txt").write_text("9000001\n9000001,x\n")
    assert main(["ingest", "--images", str(layout / IMAGES), "--points-auto", str(layout / AUTO), "--side", "L",
                 "--shards", "3", "--out", str(out), "--withdrawn", str(tmp_path / "bad.txt")]) == 2


def _withdrawal_file(folder: Path, eids: set[str]) -> Path:
    """A withdrawal file as UKB sends it: Windows line endings, a blank line; here with a header."""
    path = folder / "w_withdrawn.csv"
    path.write_bytes(("eid\r\n" + "\r\n".join(sorted(eids)) + "\r\n\r\n").encode())
    return path


def test_read_withdrawn_one_eid_file_and_csv_quoting(tmp_path):
    """A file of one eid withdraws that participant (a first line is a header only if it holds a
    letter); quotes and a trailing comma of a one-column CSV are dropped."""
    path = tmp_path / "w.csv"
    path.write_text("9234567\n")
    assert read_withdrawn(path) == {"9234567"}
    path.write_text('"9234567",\n9000002,\n')
    assert read_withdrawn(path) == {"9234567", "9000002"}
    path.write_text("f.eid,\n9000003\n")
    assert read_withdrawn(path) == {"9000003"}


def test_unparsed_file_naming_a_withdrawn_eid_is_counted_not_logged(tmp_path, caplog):
    import logging

    root = tmp_path / "ukb"
    root.mkdir()
    (root / "9234567_20158_2_0 (1).zip").write_bytes(b"")
    (root / "7654321_20158_2_0 (1).zip").write_bytes(b"")
    with caplog.at_level(logging.DEBUG):
        df = build_manifest(images=str(root / "{eid}_20158_{instance}_{array}.zip"),
                            points_auto="p/{eid}_{instance}_{side}.pts", side="L", n_shards=1, withdrawn={"9234567"})
    assert len(df) == 0 and df.attrs["ingest"]["withdrawn_participants"] == 1
    text = caplog.text
    assert "9234567" not in text
    assert "7654321" in text  # the other unparsed file is still reported by name


# Each spelling of a withdrawal (leading zeros, .0, exponent, quotes, BOM, ...) through hipoa ingest,
# and the entries refused before any image is read: test_withdrawals.py.


# ---------------------------------------------------------------------------------------------
# Leftovers of the second hardening round: paths as given, shards, compact numbers


def test_crop_names_a_missing_manifest_as_given_and_refuses_a_shard_outside_it(layout, tmp_path, capsys):
    assert main(["crop-patches", "--manifest", "/nonexistent", "--shard", "0", "--out", str(tmp_path / "a.zarr")]) == 2
    err = capsys.readouterr().err
    assert "manifest /nonexistent: no such file" in err and "/nonexistent.parquet" not in err
    out = tmp_path / "L.parquet"
    assert main(["ingest", "--images", str(layout / IMAGES), "--points-auto", str(layout / AUTO), "--side", "L",
                 "--shards", "1", "--out", str(out)]) == 0
    assert pq.read_metadata(out).metadata[b"shards"] == b"1"
    capsys.readouterr()
    store = tmp_path / "shard-0005.zarr"
    assert main(["crop-patches", "--manifest", str(out), "--shard", "5", "--out", str(store)]) == 2
    assert "--shard 5 is outside the manifest's shards 0..0" in capsys.readouterr().err
    assert not store.exists() and not Path(f"{store}.tmp").exists()


def test_a_huge_coordinate_is_logged_compactly(tmp_path):
    from hipoa.ingest import check_points

    pts = good_points(1)
    pts[4] = [1e308, 3.0]
    write_pts(tmp_path / "a.pts", pts)
    reason, detail = check_points(str(tmp_path / "a.pts"), 85, ROWS, COLS)
    assert reason == "points_outside_image" and "first point 4 at (1e+308, 3)" in detail and len(detail) < 300
