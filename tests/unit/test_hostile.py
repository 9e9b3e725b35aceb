"""Hostile real-world input: every class of bad file, built from a synthetic cohort, through
ingest, crop, predict and gather.

One cohort carries one participant per hostile class (their left hips), beside the synthetic
cohort's planted faults and clean hips. ``hipoa ingest`` runs as a subprocess with a timeout (a
FIFO must never block it), then crop, predict (a tiny model of known output) and gather run on the
real files. Each image must come out exactly once, with the reason of its class and, when it
fails, no phenotype at all; the reasons met must be the whole vocabulary of hipoa.qc but its
safeguards.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from hipoa import qc
from hipoa.dicom import find_hip_member
from hipoa.ingest import build_manifest
from hipoa.patches import crop_shard
from hipoa.phenotypes import gather
from hipoa.points import read_pts, write_pts
from hipoa.predict import predict_shard
from hipoa.tables import AREA, PRESENT, PROBABILITY
from hipoa.sites import DEFAULT_SITES, PATCH_SIZE
from hipoa.synth import make_cohort

sys.path.insert(0, str(Path(__file__).parent))
from hipoa_fixtures import make_model  # noqa: E402

SITES = [s.name for s in DEFAULT_SITES]
# A member cap low enough for a small test bomb, far above a synthetic hip (~0.4 MB).
# points_min_images: the hostile shard is small, and its points are still checked
LIMITS = {"max_member_mb": 4, "points_min_images": 10}
BOMB_BYTES = 6 << 20


# ---- building hostile files ---------------------------------------------------------------------


def _members(zip_path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(zip_path) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def _write_zip(zip_path: Path, members: list[tuple[str, bytes]]) -> None:
    zip_path.unlink()
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)


def _encode(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def edit_hip(zip_path: Path, side: str, edit) -> None:
    """Rewrite the hip member of ``side`` with ``edit(dataset)`` applied."""
    member = find_hip_member(zip_path, side)
    members = _members(zip_path)
    out = []
    for name, data in members:
        if name == member:
            ds = pydicom.dcmread(io.BytesIO(data))
            edit(ds)
            data = _encode(ds)
        out.append((name, data))
    _write_zip(zip_path, out)


def edit_points(path: Path, edit) -> None:
    pts = read_pts(path)
    edit(pts)
    write_pts(path, pts)


def make_fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def make_dir(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.mkdir()


def set_pixel_spacing(value):
    def edit(ds):
        ds.PixelSpacing = value

    return edit


def set_exposed_area(value):
    def edit(ds):
        ds[0x00400303].value = value

    return edit


def tiny_image(ds):
    ds.Rows, ds.Columns = 20, 20
    ds.PixelData = bytes(400)
    ds[0x00400303].value = [5, 5]


def pixels_edit(change):
    """An ``edit_hip`` edit that rewrites the 8-bit pixels as ``change(pixels) -> pixels``."""

    def edit(ds):
        pixels = ds.pixel_array.astype(np.float32)
        ds.PixelData = np.clip(np.rint(change(pixels)), 0, 255).astype(np.uint8).tobytes()

    return edit


def metal_ball(pts_path: Path):
    """A prosthesis' ball: a saturated disc of 40 px radius on the femoral head (points 16-29)."""
    centre = read_pts(pts_path)[16:30].mean(axis=0)

    def change(pixels):
        yy, xx = np.mgrid[0: pixels.shape[0], 0: pixels.shape[1]]
        return np.where((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= 40 ** 2, 255.0, pixels)

    return pixels_edit(change)


def doubled(pixels):
    """Patient motion: a second copy 20 px (5 mm) to the right at 0.45 weight."""
    ghost = np.concatenate([pixels[:, :20], pixels[:, :-20]], axis=1)
    return 0.55 * pixels + 0.45 * ghost


def negative_slope(ds):
    """Rescale Slope -1, Intercept 255 over the stored values: the modality LUT gives ``255 - v``,
    bone comes out dark (an inverted image, measured as is before the pixel sanity check)."""
    ds.RescaleSlope = -1
    ds.RescaleIntercept = 255


def bits_stored_7(ds):
    """Bits Stored 7 over 8-bit data whose values reach 255: the top bit would be masked away."""
    ds.BitsStored, ds.HighBit = 7, 6


def pixel_data_too_long(ds):
    """Pixel Data 4 kB longer than Rows x Columns needs (a header whose matrix is wrong)."""
    ds.PixelData = bytes(ds.PixelData) + bytes(4096)


def spacing_sources_disagree(ds):
    """Pixel Spacing says 0.5 mm, Exposed Area over the matrix 0.25 mm: areas would be 4x."""
    ds.PixelSpacing = [0.5, 0.5]


def spacing_1p6x(ds):
    """Exposed Area (the only spacing source) 1.6x too large: the reference length (~96 mm) stays
    under qc.reference_length_mm's top, but far outside the shard's own distribution."""
    ds[0x00400303].value = [int(round(1.6 * v)) for v in ds[0x00400303].value]


def huge_matrix(ds):
    ds.Rows, ds.Columns = 40000, 40000  # 1.6 gigapixels declared; the pixel data stays small


def bomb(ds):
    """Pixel data padded to BOMB_BYTES of zeros: deflates to a few kB, inflates past the cap."""
    ds.PixelData = bytes(ds.PixelData) + bytes(BOMB_BYTES)


def many_members(zip_path: Path) -> None:
    members = _members(zip_path)
    members += [(f"padding_{k:03d}.txt", b"x") for k in range(70)]
    _write_zip(zip_path, members)


def two_left_femurs(zip_path: Path) -> None:
    member = find_hip_member(zip_path, "L")
    members = _members(zip_path)
    copy = dict(members)[member]
    _write_zip(zip_path, members + [(member + ".copy", copy)])


def with_block(mask: Path, value: int) -> np.ndarray:
    """The mask with a 10 x 10 block of ``value`` (a label outside the site table)."""
    m = np.array(Image.open(mask))
    m[10:20, 10:20] = value
    return m


def write_png(path: Path, array: np.ndarray, fmt: str = "PNG") -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())


# ---- the cohort ---------------------------------------------------------------------------------

HOSTILE: dict[str, str] = {
    # class -> the reason of that participant's left hip
    "pixel_spacing_1000": qc.IMPLAUSIBLE_SPACING,
    "exposed_area_wrapped": qc.IMPLAUSIBLE_SPACING,
    "anisotropic_spacing": qc.IMPLAUSIBLE_SPACING,
    "tiny_image": qc.IMPLAUSIBLE_IMAGE_SIZE,
    "reference_length_1px": qc.IMPLAUSIBLE_REFERENCE_LENGTH,
    "zip_bomb": qc.IMAGE_TOO_LARGE,
    "huge_matrix": qc.IMAGE_TOO_LARGE,
    "many_members": qc.IMAGE_TOO_LARGE,
    "fifo_zip": qc.NOT_A_FILE,
    "directory_zip": qc.NOT_A_FILE,
    "two_left_femurs": qc.AMBIGUOUS_HIP_DICOM,
    "pts_directory": qc.POINTS_INVALID,
    "pts_fifo": qc.POINTS_INVALID,
    "duplicate_zip": "",  # the original stays clean; its copy is the duplicate_image
    # point 78, the acetabulum's lateral margin, on the image's corner: the acetabulum is cut off
    "centre_in_corner": qc.HEAD_OUT_OF_VIEW,
    # 3 mm inside the corner: in view, but the site's patch is mostly outside the image
    "centre_near_corner": qc.PATCH_OUTSIDE_IMAGE,
    "metal_ball": qc.IMPLANT,
    "doubled_image": qc.MOTION,
    # points 28-32 around the superior site 15 mm off the outline (a misplaced automatic search)
    "site_points_displaced": qc.POINTS_IMPLAUSIBLE,
    "spacing_sources_disagree": qc.SPACING_INCONSISTENT,
    "spacing_1p6x": qc.IMPLAUSIBLE_REFERENCE_LENGTH,
    "bits_stored_7": qc.PIXEL_DATA_INCONSISTENT,
    "pixel_data_too_long": qc.PIXEL_DATA_INCONSISTENT,
    "negative_slope": qc.IMPLAUSIBLE_PIXELS,
}
MASKS: dict[str, str] = {
    # class -> the labels.MASK_PROBLEMS key; the image is measured but not annotated
    "mask_label_7": "mask_bad_labels",
    "mask_label_255": "mask_bad_labels",
    "mask_jpeg_renamed": "mask_not_png",
    "mask_rgb": "mask_wrong_mode",
    "mask_wrong_size": "mask_wrong_size",
    "mask_fifo": "mask_not_a_file",
}
UNPARSED = "9800013_20158_2_0 (1).zip"


def _apply(kind: str, cohort: Path, eid: str) -> None:
    z = cohort / "ukb" / "20158" / f"{eid}_20158_2_0.zip"
    pts = cohort / "points" / "auto" / f"{eid}_2_L.pts"
    mask = cohort / "masks" / f"{eid}_2_L.png"
    shape = np.asarray(Image.open(mask)).shape if mask.exists() else None
    edits = {
        "pixel_spacing_1000": lambda: edit_hip(z, "L", set_pixel_spacing([1000, 1000])),
        "exposed_area_wrapped": lambda: edit_hip(z, "L", set_exposed_area([65366, 150])),
        "anisotropic_spacing": lambda: edit_hip(z, "L", set_pixel_spacing([0.25, 0.30])),
        "tiny_image": lambda: edit_hip(z, "L", tiny_image),
        "reference_length_1px": lambda: edit_points(pts, lambda p: p.__setitem__(39, p[12] + [1.0, 0.0])),
        "zip_bomb": lambda: edit_hip(z, "L", bomb),
        "huge_matrix": lambda: edit_hip(z, "L", huge_matrix),
        "many_members": lambda: many_members(z),
        "fifo_zip": lambda: make_fifo(z),
        "directory_zip": lambda: make_dir(z),
        "two_left_femurs": lambda: two_left_femurs(z),
        "pts_directory": lambda: make_dir(pts),
        "pts_fifo": lambda: make_fifo(pts),
        "duplicate_zip": lambda: shutil.copyfile(z, z.with_name(f"{eid}_20158_2_1.zip")),
        "centre_in_corner": lambda: edit_points(pts, lambda p: p.__setitem__(78, [0.0, 0.0])),
        "centre_near_corner": lambda: edit_points(pts, lambda p: p.__setitem__(78, [12.0, 12.0])),
        "metal_ball": lambda: edit_hip(z, "L", metal_ball(pts)),
        "doubled_image": lambda: edit_hip(z, "L", pixels_edit(doubled)),
        "spacing_sources_disagree": lambda: edit_hip(z, "L", spacing_sources_disagree),
        "spacing_1p6x": lambda: edit_hip(z, "L", spacing_1p6x),
        "bits_stored_7": lambda: edit_hip(z, "L", bits_stored_7),
        "pixel_data_too_long": lambda: edit_hip(z, "L", pixel_data_too_long),
        "negative_slope": lambda: edit_hip(z, "L", negative_slope),
        "site_points_displaced": lambda: edit_points(pts, lambda p: p.__setitem__(slice(28, 33), p[28:33] + [0, 60])),
        "mask_label_7": lambda: write_png(mask, with_block(mask, 7)),
        "mask_label_255": lambda: write_png(mask, with_block(mask, 255)),
        "mask_jpeg_renamed": lambda: write_png(mask, np.asarray(Image.open(mask)) * 80, fmt="JPEG"),
        "mask_rgb": lambda: write_png(mask, np.repeat(np.asarray(Image.open(mask))[..., None], 3, axis=2)),
        "mask_wrong_size": lambda: write_png(mask, np.zeros((shape[0] - 8, shape[1]), np.uint8)),
        "mask_fifo": lambda: make_fifo(mask),
    }
    edits[kind]()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The hostile cohort, run through ingest (CLI), crop, predict and gather, left side."""
    root = tmp_path_factory.mktemp("hostile")
    cohort = root / "cohort"
    truth = make_cohort(out=cohort, participants=52, seed=5, annotated_fraction=0.4, faults=6, workers=1)
    left = truth[truth["side"] == "L"]
    clean = left[(left["fault"] == "") & ~left["annotated"]]["eid"].astype(str).tolist()
    annotated = left[(left["fault"] == "") & left["annotated"]]["eid"].astype(str).tolist()
    assert len(clean) >= len(HOSTILE) + 2 and len(annotated) >= len(MASKS) + 2
    kinds = dict(zip(clean, HOSTILE)) | dict(zip(annotated, MASKS))
    for eid, kind in kinds.items():
        _apply(kind, cohort, eid)
    src = cohort / "ukb" / "20158" / f"{clean[-1]}_20158_2_0.zip"
    shutil.copyfile(src, src.with_name(UNPARSED))

    manifest = root / "manifest" / "L.parquet"
    cmd = [
        sys.executable, "-m", "hipoa.cli", "ingest",
        "--images", str(cohort / "ukb/20158/{eid}_20158_{instance}_{array}.zip"),
        "--points-auto", str(cohort / "points/auto/{eid}_{instance}_{side}.pts"),
        "--points-manual", str(cohort / "points/manual/{eid}_{instance}_{side}.pts"),
        "--masks", str(cohort / "masks/{eid}_{instance}_{side}.png"),
        "--side", "L", "--shards", "1", "--workers", "2",
        "--limits", json.dumps(LIMITS), "--out", str(manifest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    man = pd.read_parquet(manifest)

    store = root / "patches" / "shard-0000.zarr"
    crop_shard(manifest=manifest, shard=0, out=store, sites=list(DEFAULT_SITES), limits=qc.load_limits(LIMITS))
    models = {s: make_model(root / "models" / s / "unet.keras") for s in SITES}
    predictions = root / "predictions" / "shard-0000.parquet"
    predict_shard(store=store, models=models, out=predictions, precision="float32")
    table = gather(
        manifest=manifest, predictions=[predictions], models=models, side="L",
        out=root / "phenotypes" / "osteophytes_L.parquet",
    )
    return {
        "root": root, "truth": truth, "kinds": kinds, "manifest": man, "table": table, "store": store,
        "stdout": proc.stdout, "stderr": proc.stderr, "clean": clean,
    }


def _row(table: pd.DataFrame, eid: str, array_copy: bool = False) -> pd.Series:
    rows = table[table["eid"].astype(str) == str(eid)]
    assert len(rows) >= 1, f"eid {eid}: no row"
    return rows.iloc[-1 if array_copy else 0]


def _measurements(row: pd.Series) -> list:
    cols = [f"{s}{suffix}" for s in SITES for suffix in (PRESENT, AREA, PROBABILITY)] + ["any_present", "total_area_mm2"]
    return [row[c] for c in cols]


@pytest.mark.slow
def test_every_class_gets_its_reason_and_no_measurement(hostile):
    table, kinds = hostile["table"], hostile["kinds"]
    for eid, kind in kinds.items():
        if kind in MASKS:
            continue
        row = _row(table, eid)
        assert row["qc_reason"] == HOSTILE[kind], (kind, eid, row["qc_reason"])
        if HOSTILE[kind] == qc.POINTS_IMPLAUSIBLE:
            # a per-site reason: that site is NA, the others are measured
            assert not row["qc_pass"], kind
            assert all(pd.isna(row[f"superior_femoral_head{c}"]) for c in (PRESENT, AREA, PROBABILITY))
            assert all(pd.notna(row[f"{s}{c}"]) for s in SITES if s != "superior_femoral_head"
                       for c in (PRESENT, AREA, PROBABILITY))
        elif HOSTILE[kind]:
            assert not row["qc_pass"], kind
            assert all(pd.isna(v) for v in _measurements(row)), (kind, _measurements(row))


@pytest.mark.slow
def test_duplicate_zip_is_flagged_not_picked(hostile):
    eid = next(e for e, k in hostile["kinds"].items() if k == "duplicate_zip")
    rows = hostile["manifest"][hostile["manifest"]["eid"] == eid]
    assert rows["array"].tolist() == [0, 1]
    assert rows["qc_reason"].tolist() == ["", qc.DUPLICATE_IMAGE]


@pytest.mark.slow
def test_planted_faults_keep_their_reasons(hostile):
    truth, table = hostile["truth"], hostile["table"]
    faulty = truth[(truth["side"] == "L") & (truth["fault"] != "")]
    assert len(faulty) == 6
    for rec in faulty.itertuples():
        assert _row(table, str(rec.eid))["qc_reason"] == rec.expected_reason, rec.fault


@pytest.mark.slow
def test_every_image_exactly_once(hostile):
    """One row per zip the pattern parses (the duplicate's copy included), none for the unparsed one."""
    cohort = hostile["root"] / "cohort" / "ukb" / "20158"
    parsed = [p for p in os.listdir(cohort) if p != UNPARSED]
    table = hostile["table"]
    assert len(table) == len(parsed) == len(hostile["manifest"])
    assert table.duplicated(["eid", "instance", "side"]).sum() == 1  # only the duplicate's copy repeats
    assert "9800013" not in set(table["eid"].astype(str))


@pytest.mark.slow
def test_reasons_met_are_the_vocabulary(hostile):
    met = set(hostile["table"]["qc_reason"]) - {""}
    assert met == set(qc.REASONS) - qc.SAFEGUARDS


@pytest.mark.slow
def test_no_impossible_number_is_written(hostile):
    """Passing rows: finite areas no larger than a whole patch; failing rows: nothing at all."""
    table = hostile["table"]
    ok = table[table["qc_pass"]]
    assert len(ok) > 10
    for s in SITES:
        area = ok[f"{s}{AREA}"].astype(float)
        assert area.notna().all() and (area >= 0).all()
        # the largest patch a plausible hip can have: dp * 150 mm per pixel, 128 x 128 pixels
        dp = next(x.dp for x in DEFAULT_SITES if x.name == s)
        assert (area <= (dp * 150.0 * PATCH_SIZE) ** 2).all()
    assert table["reference_length_mm"][table["qc_pass"]].between(*qc.Limits().reference_length_mm).all()


@pytest.mark.slow
def test_masks_that_are_not_labels_are_not_used(hostile):
    from hipoa.store import read_rows

    man = hostile["manifest"].set_index("eid")
    store_rows = read_rows(hostile["store"]).set_index("eid")
    for eid, kind in hostile["kinds"].items():
        if kind not in MASKS:
            continue
        assert not man.loc[eid, "annotated"], kind
        assert man.loc[eid, "mask"] == "", kind
        assert man.loc[eid, "qc_reason"] == "", kind  # still phenotyped
        assert not store_rows.loc[eid, "annotated"], kind
        assert MASKS[kind] in hostile["stderr"]
    out = hostile["stdout"]
    assert "mask not used for training, mask_bad_labels: 2" in out
    assert "mask not used for training, mask_not_png: 1" in out
    assert "mask_wrong_mode: 1" in out and "mask_wrong_size: 1" in out and "mask_not_a_file: 1" in out


@pytest.mark.slow
def test_ambiguity_and_unparsed_files_are_logged(hostile):
    err, out = hostile["stderr"], hostile["stdout"]
    eid = next(e for e, k in hostile["kinds"].items() if k == "two_left_femurs")
    line = next(x for x in err.splitlines() if qc.AMBIGUOUS_HIP_DICOM in x and eid in x)
    assert "WARNING" in line and ".copy" in line  # both members named
    assert any("WARNING" in x and UNPARSED in x for x in err.splitlines())
    assert "not parsed by the pattern (no row; see the log): 1" in out


@pytest.mark.slow
def test_messages_name_the_file_and_the_problem(hostile):
    err = hostile["stderr"]
    kinds = {k: e for e, k in hostile["kinds"].items()}
    expect = {
        "pixel_spacing_1000": "outside qc.spacing_mm",
        "exposed_area_wrapped": "Exposed Area",
        "anisotropic_spacing": "qc.max_spacing_anisotropy",
        "fifo_zip": "is a FIFO",
        "directory_zip": "is a directory",
        "pts_directory": "is a directory, expected a .pts file",
        "pts_fifo": "is a FIFO",
        "zip_bomb": "qc.max_member_mb",
        "huge_matrix": "qc.max_image_pixels",
        "many_members": "qc.max_zip_members",
        "spacing_sources_disagree": "qc.spacing_agreement",
        "pixel_data_too_long": "(7FE0,0010) Pixel Data holds",
    }
    for kind, text in expect.items():
        eid = kinds[kind]
        assert any(eid in x and text in x for x in err.splitlines()), (kind, text)


# ---- identity -----------------------------------------------------------------------------------


def test_eids_are_kept_as_given(tmp_path):
    """``0123``, ``123`` and ``00123`` are three participants from the manifest to the GWAS files."""
    cohort = tmp_path / "cohort"
    truth = make_cohort(out=cohort, participants=3, seed=2, annotated_fraction=0.0, faults=0, workers=1)
    eids = truth["eid"].astype(str).unique().tolist()
    rows = []
    for given, eid in zip(["0123", "123", "00123"], eids):
        rows.append({
            "eid": given, "instance": 2, "side": "L",
            "image": f"cohort/ukb/20158/{eid}_20158_2_0.zip",
            "points_auto": f"cohort/points/auto/{eid}_2_L.pts", "points_manual": "", "mask": "",
        })
    csv = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    man = build_manifest(manifest=csv, side="L", n_shards=1)
    assert sorted(man["eid"]) == ["00123", "0123", "123"]
    mpath = tmp_path / "L.parquet"
    from hipoa.ingest import write_manifest

    write_manifest(man, mpath)
    store = tmp_path / "shard-0000.zarr"
    crop_shard(manifest=mpath, shard=0, out=store, sites=list(DEFAULT_SITES))
    models = {s: make_model(tmp_path / "models" / s / "unet.keras") for s in SITES}
    pred = tmp_path / "pred.parquet"
    predict_shard(store=store, models=models, out=pred, precision="float32")
    out = tmp_path / "osteophytes_L.parquet"
    table = gather(manifest=mpath, predictions=[pred], models=models, side="L", out=out)
    assert table["eid"].dtype == "string"
    assert sorted(table["eid"]) == ["00123", "0123", "123"]
    assert pd.read_parquet(out)["eid"].tolist() == sorted(["00123", "0123", "123"])
    for kind in ("bt", "qt", "covar"):
        gwas = pd.read_csv(out.with_name(f"osteophytes_L.{kind}.tsv"), sep="\t", dtype=str)
        assert sorted(gwas["IID"]) == ["00123", "0123", "123"], kind


@pytest.mark.parametrize("eid", ["12 3", " 123", "123\t", "a/b", "#1"])
def test_eid_that_would_break_the_tsv_is_rejected(tmp_path, eid):
    csv = tmp_path / "manifest.csv"
    csv.write_text(f"eid,instance,side,image,points_auto\n{eid},2,L,x.zip,x.pts\n")
    with pytest.raises(ValueError, match="not a valid eid"):
        build_manifest(manifest=csv, side="L", n_shards=1)


def test_canonical_integer_eids_become_int64():
    from hipoa.tables import eid_column

    assert eid_column(pd.Series(["9000012", "5", "0"])).dtype == np.int64
    assert eid_column(pd.Series(["9000012", "0123"])).tolist() == ["9000012", "0123"]
    assert eid_column(pd.Series(["1", "+1"])).tolist() == ["1", "+1"]


# ---- errors that name the path ------------------------------------------------------------------


def test_manifest_that_is_a_directory_or_missing(tmp_path):
    (tmp_path / "m.csv").mkdir()
    with pytest.raises(ValueError, match=r"m\.csv: is a directory, expected a CSV or Parquet file"):
        build_manifest(manifest=tmp_path / "m.csv", side="L", n_shards=1)
    with pytest.raises(ValueError, match=r"nope\.csv: no such file"):
        build_manifest(manifest=tmp_path / "nope.csv", side="L", n_shards=1)


def test_undecodable_pixels_are_one_line_with_the_transfer_syntax(tmp_path, caplog):
    """A JPEG 2000 stream cut short: one line naming the member and the transfer syntax."""
    from pydicom.uid import JPEG2000Lossless

    from hipoa.dicom import DicomError, read_image

    cohort = tmp_path / "cohort"
    truth = make_cohort(out=cohort, participants=1, seed=3, annotated_fraction=0.0, faults=0, workers=1)
    z = cohort / "ukb" / "20158" / f"{truth['eid'].iloc[0]}_20158_2_0.zip"

    def to_broken_j2k(ds):
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        frame = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)
        data = next(frame)
        ds.PixelData = pydicom.encaps.encapsulate([data[: len(data) // 3] + bytes(64)])

    edit_hip(z, "L", to_broken_j2k)
    member = find_hip_member(z, "L")
    caplog.set_level("DEBUG")
    with pytest.raises(DicomError) as exc:
        read_image(z, member)
    assert not [r for r in caplog.records if r.exc_info], "pydicom's tracebacks reached the log"
    message = str(exc.value)
    assert "\n" not in message and member in message and "JPEG 2000" in message
    assert exc.value.reason == qc.UNREADABLE_DICOM


def test_reasons_are_spelled_only_in_hipoa_qc():
    """No module but hipoa.qc writes a reason as a string literal (synth's truth table aside), so
    hipoa.qc.REASONS is the complete set the code can emit."""
    import ast

    import hipoa

    spelled = {}
    for path in Path(hipoa.__file__).parent.glob("*.py"):
        if path.name in ("qc.py", "synth.py"):  # synth writes the expected reasons of its planted faults
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in qc.REASONS:
                spelled.setdefault(path.name, set()).add(node.value)
    assert spelled == {}


def test_synth_faults_expect_reasons_of_the_vocabulary():
    from hipoa.synth import FAULTS

    assert set(FAULTS.values()) <= set(qc.REASONS)


def test_vocabulary_and_limits_are_documented():
    root = Path(__file__).parents[2]
    readme = (root / "README.md").read_text()
    config_readme = (root / "config" / "README.md").read_text()
    schema = (root / "workflow" / "schemas" / "config.schema.yaml").read_text()
    config = (root / "config" / "config.yaml").read_text()
    for reason in qc.REASONS:
        assert f"| `{reason}` |" in readme, reason
    for key in qc.LIMIT_KEYS:
        assert f"`qc.{key}`" in config_readme and f"      {key}:" in schema and f"  {key}:" in config, key
    defaults = qc.Limits()
    import yaml

    from_config = yaml.safe_load(config)["qc"]
    assert qc.load_limits(from_config) == defaults  # config/config.yaml states the code's defaults
    properties = yaml.safe_load(schema)["properties"]["qc"]["properties"]
    assert qc.load_limits({k: v["default"] for k, v in properties.items()}) == defaults


@pytest.mark.slow
def test_dictionary_lists_the_reasons(hostile):
    fields = pd.read_csv(hostile["root"] / "phenotypes" / "osteophytes_L.dict.tsv", sep="\t").set_index("FIELD")
    description = fields.loc["qc_reason", "DESCRIPTION"]
    assert all(reason in description for reason in qc.REASONS)
