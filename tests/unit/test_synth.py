"""Tests of the synthetic UKB hip-DXA cohort (hipoa.synth, hipoa.synth.anatomy)."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from hipoa import synth
from hipoa.synth import anatomy
from hipoa.cli import main
from hipoa.points import read_pts
from hipoa.sites import DEFAULT_SITES

SP = synth.SPACING_MM
N = 10  # participants; faults=6 puts one of each kind on six of them


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("cohort")
    truth = synth.make_cohort(out, participants=N, seed=11, annotated_fraction=0.5, faults=6, workers=1)
    return out, truth


def _zip(out: Path, eid: int) -> Path:
    return out / "ukb" / "20158" / f"{eid}_20158_2_0.zip"


def _members(out: Path, eid: int) -> dict[str, pydicom.Dataset]:
    """Every DICOM member of a participant's zip, by member name (full data sets)."""
    with zipfile.ZipFile(_zip(out, eid)) as zf:
        return {n: pydicom.dcmread(io.BytesIO(zf.read(n))) for n in zf.namelist() if n.endswith(".dcm")}


def _hip(out: Path, eid: int, side: str) -> pydicom.Dataset:
    (ds,) = [d for d in _members(out, eid).values() if d.ProtocolName == synth.PROTOCOLS[side]]
    return ds


def _clean(truth: pd.DataFrame) -> pd.DataFrame:
    """Images of participants without any planted fault."""
    return truth[~truth["eid"].isin(truth.loc[truth["fault"] != "", "eid"])]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in (".zip", ".pts", ".png")}


# --- determinism ------------------------------------------------------------------------------


def test_same_seed_same_bytes_whatever_the_workers(cohort, tmp_path):
    out, truth = cohort
    again = synth.make_cohort(tmp_path, participants=N, seed=11, annotated_fraction=0.5, faults=6, workers=2)
    pd.testing.assert_frame_equal(truth, again)
    a, b = _files(out), _files(tmp_path)
    assert a.keys() == b.keys()
    assert len(a) > 3 * N
    assert [k for k in a if a[k] != b[k]] == []


def test_different_seed_differs(cohort, tmp_path):
    out, truth = cohort
    other = synth.make_cohort(tmp_path, participants=3, seed=12, workers=1)
    assert not set(other["eid"]) & set(truth["eid"])
    first = _clean(truth).iloc[0]
    a = _hip(out, first["eid"], first["side"]).pixel_array
    b = _hip(tmp_path, other["eid"].iloc[0], first["side"]).pixel_array
    assert a.shape != b.shape or not np.array_equal(a, b)


# --- layout and truth table ---------------------------------------------------------------------


def test_synthetic_eids_keep_the_order_and_shards_of_the_former_draw():
    from hipoa.ingest import shard_of

    drawn = np.sort(np.random.default_rng(5).choice(9_000_000, size=3000, replace=False)) + 1_000_000
    eids = synth.synthetic_eids(drawn)
    assert eids.dtype == np.int64 and len(eids) == len(drawn)
    assert np.all(np.diff(eids) > 0)  # unique and in the drawn order
    assert eids[0] >= synth.SYNTHETIC_EIDS.start and eids[-1] < synth.SYNTHETIC_EIDS.stop
    for n in (1, 2, 4, 8):
        assert [shard_of(e, n) for e in eids] == [shard_of(d, n) for d in drawn]
    # another shard count is not kept (the draw is not the identity in disguise)
    assert [shard_of(e, 5) for e in eids] != [shard_of(d, 5) for d in drawn]


def test_a_cohort_too_large_for_the_eid_block_is_refused(tmp_path):
    with pytest.raises(ValueError, match="participants must be 1..100000"):
        synth.make_cohort(tmp_path, participants=synth.MAX_PARTICIPANTS + 1, seed=0)
    with pytest.raises(ValueError, match="do not fit the synthetic eid block"):
        synth.synthetic_eids(np.arange(1_000_000, 1_200_000))


def test_truth_table_layout(cohort):
    out, truth = cohort
    assert len(truth) == 2 * N
    site_cols = [f"{s.name}_{what}" for s in DEFAULT_SITES for what in ("present", "area_mm2")]
    for col in ["eid", "instance", "side", "annotated", *site_cols, "reference_length_mm", "fault",
                "expected_reason"]:
        assert col in truth.columns, col
    assert truth["eid"].dtype == np.int64
    assert truth["eid"].isin(synth.SYNTHETIC_EIDS).all()  # a block UK Biobank does not issue
    assert truth["eid"].nunique() == N
    assert (truth["instance"] == 2).all()
    assert sorted(truth["side"].unique()) == ["L", "R"]
    # annotate_sides="L": exactly round(0.5 * N) left hips annotated, no right ones
    assert truth.loc[truth["side"] == "L", "annotated"].sum() == round(0.5 * N)
    assert not truth.loc[truth["side"] == "R", "annotated"].any()
    on_disk = pd.read_parquet(out / "truth.parquet")
    pd.testing.assert_frame_equal(on_disk, truth)
    csv = pd.read_csv(out / "truth.csv", keep_default_na=False)
    assert list(csv.columns) == list(truth.columns) and len(csv) == len(truth)

    for _, r in truth.iterrows():
        stem = f"{r['eid']}_2_{r['side']}"
        assert _zip(out, r["eid"]).exists()
        assert (out / "masks" / f"{stem}.png").exists() == r["annotated"]
        assert (out / "points" / "manual" / f"{stem}.pts").exists() == r["annotated"]
        assert (out / "points" / "auto" / f"{stem}.pts").exists() == (r["fault"] != "missing_points")


def test_zip_members_and_protocols(cohort):
    out, truth = cohort
    for eid in _clean(truth)["eid"].unique():
        with zipfile.ZipFile(_zip(out, eid)) as zf:
            assert zf.testzip() is None
            names = zf.namelist()
            listing = zf.read("manifest.cvs").decode("ascii")
        dcm = [n for n in names if n != "manifest.cvs"]
        assert set(names) == set(dcm) | {"manifest.cvs"}
        assert 3 <= len(dcm) <= 4
        for n in dcm:
            assert re.fullmatch(r"[0-9]+(\.[0-9]+)+\.dcm", n), n  # a UID, nothing about the scan
            assert n in listing
        members = _members(out, eid)
        protocols = sorted(str(d.ProtocolName) for d in members.values())
        assert protocols.count("Left Femur") == 1 and protocols.count("Right Femur") == 1
        assert set(protocols) - {"Left Femur", "Right Femur"} <= {"AP Spine", "Total Body"}
        for d in members.values():
            assert d.PerformedProcedureStepDescription == d.ProtocolName
            assert d.SOPInstanceUID + ".dcm" in names
        # nothing else tells the scans apart
        for kw in ("SeriesDescription", "BodyPartExamined", "Laterality", "ImageLaterality"):
            assert len({str(d.get(kw, "")) for d in members.values()}) == 1, kw


def test_header_profile(cohort):
    out, truth = cohort
    for _, r in _clean(truth).iterrows():
        ds = _hip(out, r["eid"], r["side"])
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.Modality == "CR"
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (8, 8, 7, 0)
        assert ds.SamplesPerPixel == 1 and ds.PhotometricInterpretation == "MONOCHROME2"
        assert "PixelSpacing" not in ds and "ImagerPixelSpacing" not in ds
        width_mm, height_mm = ds.ExposedArea
        assert width_mm / ds.Columns == pytest.approx(SP) and height_mm / ds.Rows == pytest.approx(SP)
        assert (ds.Rows, ds.Columns) in synth.SIZES
        assert (ds.Rows, ds.Columns) == (r["rows"], r["cols"])
        assert 560 <= ds.Rows <= 660 and 620 <= ds.Columns <= 720
        assert ds.Manufacturer == "GE Healthcare" and ds.ManufacturerModelName == "Lunar iDXA"
        # the scanner identifiers ingest puts in the manifest (covariates), constant in the demo
        assert ds.DeviceSerialNumber == "SYNTH0001" and str(ds.SoftwareVersions).startswith("hipoa ")
        assert str(ds.PatientName) == "ANON^SYNTH"
        assert str(r["eid"]) not in str(ds.PatientID) and ds.PatientID
        assert not ds.get("PatientBirthDate")
        px = ds.pixel_array
        assert px.dtype == np.uint8 and px.shape == (ds.Rows, ds.Columns)
        assert px.std() > 20  # bone on soft tissue, not a blank image


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian package dicom3tools) not installed; .ci/run installs it")
def test_dicoms_pass_dciodvfy(cohort, tmp_path):
    out, truth = cohort
    eid = _clean(truth)["eid"].iloc[0]
    with zipfile.ZipFile(_zip(out, eid)) as zf:
        names = [n for n in zf.namelist() if n.endswith(".dcm")]
        zf.extractall(tmp_path, members=names)
    for n in names:
        res = subprocess.run(["dciodvfy", str(tmp_path / n)], capture_output=True, text=True, timeout=60)
        report = res.stdout + res.stderr
        assert "CRImage" in report  # it recognised the IOD
        errors = [ln for ln in report.splitlines() if ln.startswith("Error")]
        assert errors == [], f"{n}:\n{report}"


# --- points -------------------------------------------------------------------------------------


def _circle(p: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares circle through (n, 2) points: centre, radius."""
    a = np.column_stack([2 * p, np.ones(len(p))])
    (cx, cy, c), *_ = np.linalg.lstsq(a, (p ** 2).sum(axis=1), rcond=None)
    return np.array([cx, cy]), float(np.sqrt(c + cx ** 2 + cy ** 2))


def test_points_semantics(cohort):
    out, truth = cohort
    for _, r in _clean(truth).iterrows():
        stem = f"{r['eid']}_2_{r['side']}"
        auto = read_pts(out / "points" / "auto" / f"{stem}.pts")
        assert auto.shape == (85, 2)
        x, y = auto[:, 0], auto[:, 1]
        assert x.min() >= 0 and y.min() >= 0 and x.max() <= r["cols"] - 1 and y.max() <= r["rows"] - 1
        assert 55.0 <= r["reference_length_mm"] <= 70.0
        ref_auto = np.linalg.norm(auto[12] - auto[39]) * SP
        assert abs(ref_auto - r["reference_length_mm"]) < 8.0
        pts = read_pts(out / "points" / "manual" / f"{stem}.pts") if r["annotated"] else auto
        # 16-29 run around the femoral head; 15 and 30 are its inferior and superior neck junctions
        centre, radius = _circle(pts[16:30])
        assert 20.0 <= radius * SP <= 28.5
        for j in (15, 30):
            assert abs(np.linalg.norm(pts[j] - centre) - radius) * SP < 4.0
        assert pts[15, 1] > centre[1] and pts[30, 1] < pts[15, 1]  # inferior below superior (y down)
        # 78, the lateral acetabular margin, sits above the head, lateral of its centre
        lateral = 1.0 if r["side"] == "L" else -1.0
        assert pts[78, 1] < centre[1] and lateral * (pts[78, 0] - centre[0]) > 0
        # Left hip: pelvis on the image's left, femoral shaft to its right; right hip mirrored.
        shaft_x = np.r_[pts[0:10, 0], pts[40:45, 0]].mean()
        assert lateral * (shaft_x - pts[45:85, 0].mean()) > 0
        assert lateral * (pts[39, 0] - centre[0]) > 0  # greater trochanter lateral of the head


def test_manual_points_close_auto_points_noisier(cohort):
    out, truth = cohort
    rows = _clean(truth)[_clean(truth)["annotated"]]
    assert len(rows) >= 2
    for _, r in rows.iterrows():
        stem = f"{r['eid']}_2_{r['side']}"
        manual = read_pts(out / "points" / "manual" / f"{stem}.pts")
        assert abs(np.linalg.norm(manual[12] - manual[39]) * SP - r["reference_length_mm"]) < 1.0
    # points are the same outline under noise: auto within a few mm of manual on average
    r = rows.iloc[0]
    stem = f"{r['eid']}_2_{r['side']}"
    d = np.linalg.norm(read_pts(out / "points" / "auto" / f"{stem}.pts")
                       - read_pts(out / "points" / "manual" / f"{stem}.pts"), axis=1) * SP
    assert 0.3 < np.median(d) < 3.0


def test_auto_points_noise_model():
    true = np.stack([np.linspace(100, 500, 85), np.linspace(150, 450, 85)], axis=1)
    rng = np.random.default_rng(0)
    d = np.array([np.linalg.norm(synth.auto_points(rng, true, 600, 680, gross_rate=0.0) - true, axis=1)
                  for _ in range(50)])
    assert 1.5 < np.median(d) < 6.0  # px: noise + smooth shift, no gross errors
    gross = np.array([np.linalg.norm(synth.auto_points(rng, true, 600, 680, gross_rate=1.0) - true, axis=1).max()
                      for _ in range(20)])
    assert np.median(gross) * SP > 3.0  # gross errors move a run of points by several mm
    m = np.linalg.norm(synth.manual_points(rng, true) - true, axis=1)
    assert 0.5 < m.mean() < 2.0


def test_site_patches_fit_in_the_image(cohort):
    """Crop's default min_inside=0.9 must not reject fault-free synthetic images."""
    out, truth = cohort
    for _, r in _clean(truth).iterrows():
        auto = read_pts(out / "points" / "auto" / f"{r['eid']}_2_{r['side']}.pts")
        ref = np.linalg.norm(auto[12] - auto[39])
        for s in DEFAULT_SITES:
            half = 64 * s.dp * ref
            cx, cy = auto[s.centre]
            w = min(cx + half, r["cols"] - 0.5) - max(cx - half, -0.5)
            h = min(cy + half, r["rows"] - 0.5) - max(cy - half, -0.5)
            assert w * h / (2 * half) ** 2 >= 0.9, (r["eid"], r["side"], s.name)


# --- masks and osteophytes ----------------------------------------------------------------------


def test_masks_match_truth_and_sites(cohort):
    out, truth = cohort
    annotated = truth[truth["annotated"]]
    assert len(annotated) >= 4
    positive = 0
    for _, r in annotated.iterrows():
        stem = f"{r['eid']}_2_{r['side']}"
        img = Image.open(out / "masks" / f"{stem}.png")
        assert img.mode == "P"  # one 8-bit channel of label values, with a palette (hipoa.labels)
        m = np.asarray(img)
        assert m.dtype == np.uint8 and m.shape == (r["rows"], r["cols"])
        assert set(np.unique(m)) <= {0, 1, 2, 3}
        manual = read_pts(out / "points" / "manual" / f"{stem}.pts")
        for s in DEFAULT_SITES:
            yy, xx = np.nonzero(m == s.label)
            assert xx.size * SP * SP == pytest.approx(r[f"{s.name}_area_mm2"])
            assert r[f"{s.name}_present"] == (xx.size > 0)
            if xx.size:
                positive += 1
                d = np.hypot(xx - manual[s.centre, 0], yy - manual[s.centre, 1]) * SP
                assert d.max() < 30.0, (stem, s.name, d.max())
    assert positive > 0
    present = truth[[f"{s.name}_present" for s in DEFAULT_SITES]]
    areas = truth[[f"{s.name}_area_mm2" for s in DEFAULT_SITES]]
    assert ((areas.to_numpy() > 0) == present.to_numpy()).all()


def test_prevalence_wiring(tmp_path):
    truth = synth.make_cohort(tmp_path, participants=4, seed=3, annotated_fraction=0.5,
                              enriched_prevalence=1.0, prevalence=0.0, workers=1)
    present = truth[[f"{s.name}_present" for s in DEFAULT_SITES]].to_numpy()
    assert present[truth["annotated"].to_numpy()].all()
    assert not present[~truth["annotated"].to_numpy()].any()
    areas = truth.loc[truth["annotated"], [f"{s.name}_area_mm2" for s in DEFAULT_SITES]].to_numpy()
    assert areas.min() >= 1.0  # at least a few pixels of spur outside the bone


def _render(seed: int, present: dict[int, bool]) -> anatomy.HipRender:
    who = anatomy.draw_participant(np.random.default_rng([seed, 0]))
    geo = anatomy.draw_geometry(np.random.default_rng([seed, 1]), who, 600, 680, SP)
    spurs = anatomy.draw_osteophytes(np.random.default_rng([seed, 2]), geo, present)
    return anatomy.render_hip(np.random.default_rng([seed, 3]), who, geo, spurs)


def test_osteophytes_are_drawn_where_the_mask_is():
    plain = _render(5, {})
    spurred = _render(5, {1: True, 2: True, 3: True})
    assert plain.labels.max() == 0
    diff = spurred.image.astype(float) - plain.image.astype(float)
    for label in (1, 2, 3):
        inside = spurred.labels == label
        assert inside.sum() > 0
        assert diff[inside].mean() > 8.0, label  # bone density added on those very pixels
    far = np.ones_like(plain.labels, bool)
    ys, xs = np.nonzero(spurred.labels)
    far[max(ys.min() - 40, 0): ys.max() + 40, max(xs.min() - 40, 0): xs.max() + 40] = False
    # nothing else changed (but a rounding flip where the femur's bounding box moved the sums)
    assert np.abs(diff[far]).max() <= 1 and np.mean(diff[far] != 0) < 0.01
    # the acetabular site is the faintest (it overlaps the head)
    assert diff[spurred.labels == 3].mean() < max(diff[spurred.labels == 1].mean(), diff[spurred.labels == 2].mean())


def test_image_looks_like_a_hip():
    h = _render(7, {})
    img = h.image.astype(float)
    p = h.points
    head = img[int(p[16:30, 1].mean()) - 10: int(p[16:30, 1].mean()) + 10,
               int(p[16:30, 0].mean()) - 10: int(p[16:30, 0].mean()) + 10].mean()
    soft = img[int(p[39, 1]) - 10: int(p[39, 1]) + 10, int(p[39, 0]) + 60: int(p[39, 0]) + 80].mean()
    assert head > soft + 60  # bone bright on dark soft tissue (MONOCHROME2)
    assert 20 < soft < 110


def test_mirror_hip():
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    lab = np.zeros((3, 4), np.uint8)
    lab[1, 0] = 2
    pts = np.array([[0.0, 1.0], [3.0, 2.0], [1.25, 0.0]])
    m = anatomy.mirror_hip(anatomy.HipRender(image=img, labels=lab, points=pts, spacing_mm=SP))
    assert m.image.tolist() == [[3, 2, 1, 0], [7, 6, 5, 4], [11, 10, 9, 8]]
    assert m.labels[1, 3] == 2 and m.labels.sum() == 2
    assert m.points.tolist() == [[3.0, 1.0], [0.0, 2.0], [1.75, 0.0]]


# --- faults -------------------------------------------------------------------------------------


def test_planted_faults(cohort):
    out, truth = cohort
    faulty = truth[truth["fault"] != ""]
    assert set(faulty["fault"]) == set(synth.FAULTS)
    assert (faulty["expected_reason"] == faulty["fault"].map(synth.FAULTS)).all()
    assert faulty["eid"].nunique() == 6  # one fault per participant
    assert (truth.loc[truth["fault"] == "", "expected_reason"] == "").all()
    by = {f: faulty[faulty["fault"] == f] for f in synth.FAULTS}
    # zip-wide: both hips; the rest: the left hip only, the right one is fine
    assert sorted(by["corrupt_zip"]["side"]) == ["L", "R"]
    for f in set(synth.FAULTS) - {"corrupt_zip"}:
        assert list(by[f]["side"]) == ["L"], f

    eid = by["corrupt_zip"]["eid"].iloc[0]
    with pytest.raises(zipfile.BadZipFile):
        with zipfile.ZipFile(_zip(out, eid)) as zf:
            zf.testzip()

    eid = by["truncated_dicom"]["eid"].iloc[0]
    with zipfile.ZipFile(_zip(out, eid)) as zf:
        for n in zf.namelist():
            if not n.endswith(".dcm"):
                continue
            ds = pydicom.dcmread(io.BytesIO(zf.read(n)), stop_before_pixels=True)
            if ds.ProtocolName == "Left Femur":
                assert zf.getinfo(n).file_size < ds.Rows * ds.Columns
                with pytest.raises(Exception):
                    pydicom.dcmread(io.BytesIO(zf.read(n))).pixel_array
            else:
                assert pydicom.dcmread(io.BytesIO(zf.read(n))).pixel_array.size > 0

    eid = by["no_hip_scan"]["eid"].iloc[0]
    protocols = [str(d.ProtocolName) for d in _members(out, eid).values()]
    assert "Left Femur" not in protocols and "Right Femur" in protocols

    eid = by["wrong_point_count"]["eid"].iloc[0]
    assert read_pts(out / "points" / "auto" / f"{eid}_2_L.pts", n_points=None).shape == (84, 2)
    assert read_pts(out / "points" / "auto" / f"{eid}_2_R.pts").shape == (85, 2)

    eid = by["missing_points"]["eid"].iloc[0]
    assert not (out / "points" / "auto" / f"{eid}_2_L.pts").exists()

    r = by["points_off_image"].iloc[0]
    pts = read_pts(out / "points" / "auto" / f"{r['eid']}_2_L.pts")
    assert ((pts[:, 0] > r["cols"]) | (pts[:, 1] > r["rows"])).all()


# --- arguments, CLI, preview --------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, needle", [
    ({"participants": 0}, "participants"),
    ({"faults": 5}, "faults"),
    ({"annotated_fraction": 1.5}, "annotated_fraction"),
    ({"annotate_sides": "X"}, "annotate_sides"),
])
def test_bad_arguments(tmp_path, kwargs, needle):
    args = {"participants": 2, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=needle):
        synth.make_cohort(tmp_path, **args)


def test_cli_synth_and_preview(tmp_path, capsys):
    out = tmp_path / "demo"
    png = tmp_path / "preview.png"
    assert main(["synth", "--out", str(out), "--participants", "3", "--seed", "4", "--workers", "1",
                 "--annotated-fraction", "1", "--preview", str(png)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "3 participants" in line and "6 hip images" in line and "3 annotated" in line
    assert len(pd.read_parquet(out / "truth.parquet")) == 6
    img = Image.open(png)
    assert img.size[0] > 600 and img.size[1] > 300
    png.unlink()
    assert main(["synth", "--out", str(out), "--preview-only", "--preview", str(png)]) == 0
    assert png.exists()
    assert main(["synth", "--out", str(out), "--preview-only"]) == 2  # needs --preview


def test_rerun_replaces_previous_cohort(tmp_path):
    synth.make_cohort(tmp_path, participants=3, seed=1, annotated_fraction=1.0, workers=1)
    assert len(list((tmp_path / "masks").glob("*.png"))) == 3
    truth = synth.make_cohort(tmp_path, participants=2, seed=2, annotated_fraction=0.0, workers=1)
    assert list((tmp_path / "masks").glob("*.png")) == []
    assert list((tmp_path / "points" / "manual").glob("*.pts")) == []
    zips = sorted(p.name for p in (tmp_path / "ukb" / "20158").glob("*.zip"))
    assert zips == sorted(f"{e}_20158_2_0.zip" for e in truth["eid"].unique())


def test_curve_helpers_by_hand():
    ctrl = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0]])
    dense, idx = anatomy._catmull_rom(ctrl, per_mm=2.0)
    np.testing.assert_allclose(dense[idx], ctrl, atol=1e-9)  # passes through its control points
    line = np.stack([np.linspace(0.0, 10.0, 101), np.zeros(101)], axis=1)
    pts = anatomy._label_points(line, {0: 0, 4: 100}, 0, 4)
    np.testing.assert_allclose([pts[j][0] for j in range(5)], [0.0, 2.5, 5.0, 7.5, 10.0])
    # 2x bilinear upsampling: pixel centres of the half grid at 2i + 0.5
    up = anatomy._up2(np.array([[0.0, 4.0]], np.float32), axis=1)
    np.testing.assert_allclose(up, [[0.0, 1.0, 3.0, 4.0]])


def test_second_scanner_and_two_annotators(tmp_path):
    """The second scanner's hips are on a 0.30 mm grid with its own sizes and device serial; a
    second annotator's masks differ from the true labels at the boundary; the truth keeps the true
    areas."""
    from hipoa.dicom import find_hip_member, read_image, read_image_header
    from PIL import Image

    truth = synth.make_cohort(tmp_path, participants=8, seed=4, annotated_fraction=1.0, second_scanner=0.5,
                              annotators=2, annotate_sides="LR", workers=1)
    assert (truth["scanner"] == "B").sum() == 8  # 4 participants, both hips
    assert set(truth["annotator"]) == {1, 2}
    for r in truth.itertuples(index=False):
        z = tmp_path / "ukb" / "20158" / synth.zip_name(r.eid)
        member = find_hip_member(z, r.side)
        hip = read_image(z, member)
        header = read_image_header(z, member)
        want = 0.30 if r.scanner == "B" else 0.25
        assert hip.spacing_mm == pytest.approx((want, want), abs=1e-3)
        assert ((r.rows, r.cols) in synth.SECOND_SIZES) == (r.scanner == "B")
        assert (header.device_serial == "SYNTH0001") == (r.scanner == "A")
        mask = np.asarray(Image.open(tmp_path / "masks" / f"{synth.image_stem(r.eid, r.side)}.png"))
        for name, label in synth.SITE_LABELS.items():
            drawn = np.count_nonzero(mask == label) * want * want
            if r.annotator == 1:
                assert drawn == pytest.approx(getattr(r, f"{name}_area_mm2"))
            elif getattr(r, f"{name}_present"):
                assert drawn != pytest.approx(getattr(r, f"{name}_area_mm2"))


def test_unfit_hips_are_left_hips_of_clean_unannotated_participants(tmp_path):
    truth = synth.make_cohort(tmp_path, participants=20, seed=6, annotated_fraction=0.3, faults=4, unfit=6, workers=1)
    unfit = truth[truth["unfit"]]
    assert len(unfit) == 6 and set(unfit["side"]) == {"L"} and not unfit["annotated"].any()
    assert (unfit["fault"].value_counts() == 2).all()
    assert (unfit["expected_reason"] == unfit["fault"].map(synth.UNFIT)).all()
    faulty = set(truth.loc[(truth["fault"] != "") & ~truth["unfit"], "eid"])
    assert not faulty & set(unfit["eid"])
    with pytest.raises(ValueError, match="unfit"):
        synth.make_cohort(tmp_path, participants=4, seed=6, annotated_fraction=0.5, unfit=3, workers=1)
