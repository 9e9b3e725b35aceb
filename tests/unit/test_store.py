"""crop_shard -> Zarr store -> open_patches, on a tiny cohort of real DICOM-in-zip files."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from hipoa.cli import main
from hipoa.dicom import read_image
from hipoa.geometry import inside_mask, mirror_points, patch_affine, sample_patch
from hipoa.patches import CONTEXT_SIZE, crop_shard, normalise_patch
from hipoa.points import read_pts, write_pts
from hipoa.qc import Limits
from hipoa.sites import DEFAULT_SITES
from hipoa.store import (
    MARKER,
    check_store,
    open_patches,
    read_rows,
    store_attrs,
    write_patch_store,
)

ROWS, COLS = 220, 260
EXPOSED_AREA = (65, 66)  # (0040,0303) [width_mm, height_mm], VR US: dx = 0.25, dy = 0.3 mm
# Anisotropic pixels on purpose, to test the geometry, and miniature hips (220 x 260 images,
# reference length ~16 mm) to keep the tests fast: the default QC would flag both.
ANISOTROPIC = Limits(max_spacing_anisotropy=0.25, reference_length_mm=(5.0, 150.0))
SPACING = (66 / ROWS, 65 / COLS)  # (dy, dx), anisotropic on purpose


# ------------------------------------------------------------------------------- tiny cohort


def hip_points(rng: np.random.Generator) -> np.ndarray:
    """85 points: femur 0-44 around a head at (110, 120), pelvis 45-84 on a larger arc (left hip)."""
    centre = np.array([110.0, 120.0]) + rng.uniform(-4, 4, 2)
    t = np.linspace(0.3 * np.pi, 2.3 * np.pi, 45)
    femur = centre + 35 * np.c_[np.cos(t), np.sin(t)]
    t = np.linspace(0.9 * np.pi, 1.9 * np.pi, 40)
    pelvis = centre + 48 * np.c_[np.cos(t), np.sin(t)]
    return np.vstack([femur, pelvis])


def hip_image(rng: np.random.Generator, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image (bright head disk + noise) and a label mask with a blob at each site's centre."""
    y, x = np.mgrid[0:ROWS, 0:COLS]
    centre = pts[:45].mean(axis=0)
    head = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2) <= 35**2
    img = 40 + 120 * head + rng.normal(0, 8, (ROWS, COLS))
    mask = np.zeros((ROWS, COLS), np.uint8)
    for site in DEFAULT_SITES:
        if rng.random() < 0.7:
            cx, cy = pts[site.centre] + rng.uniform(-2, 2, 2)
            blob = ((x - cx) / 4.0) ** 2 + ((y - cy) / 3.0) ** 2 <= 1
            mask[blob] = site.label
            img[blob] += 60
    return np.clip(img, 0, 255).astype(np.uint8), mask


def dicom_bytes(pixels: np.ndarray, protocol: str, uid: str, *, truncate: bool = False) -> bytes:
    """An 8-bit MONOCHROME2 CR in Implicit VR Little Endian with ExposedArea and no PixelSpacing (UKB iDXA)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = uid
    ds.Modality = "CR"
    ds.ProtocolName = protocol
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.ExposedArea = list(EXPOSED_AREA)
    data = pixels.astype(np.uint8).tobytes()
    ds.PixelData = data[: len(data) // 3] if truncate else data
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr("manifest.cvs", "hip scans\n")


def make_cohort(root: Path, n: int = 10, seed: int = 0) -> pd.DataFrame:
    """``n`` participants, left hips, with every other one annotated, plus planted faults.

    Returns a manifest in docs/DESIGN.md's columns; ``shard`` = participant index % 2. Faults
    (row eids): f-trunc truncated pixel data, f-zip not a zip, f-pts malformed points, f-nopts
    missing points, f-edge a site at the image edge, f-preset a manifest qc_reason, f-mask a
    mask of the wrong size (annotated but unusable).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    records = []

    def add(eid: str, *, pts: np.ndarray, img: np.ndarray, mask: np.ndarray | None, side: str = "L",
            manual: np.ndarray | None = None, shard: int = 0, truncate: bool = False, qc: str = "",
            zip_bytes: bytes | None = None, pts_text: str | None = None, pts_path: str | None = None,
            mask_img: np.ndarray | None = None) -> None:
        protocol = {"L": "Left Femur", "R": "Right Femur"}[side]
        zpath = root / f"{eid}_20158_2_0_{side}.zip"  # one zip per hip keeps the fixture simple
        if zip_bytes is None:
            member = f"1.2.3.{eid}.dcm"
            write_zip(zpath, {"spine.dcm": b"not the hip", member: dicom_bytes(img, protocol, generate_uid(entropy_srcs=[eid, side]), truncate=truncate)})
        else:
            member = "hip.dcm"
            zpath.write_bytes(zip_bytes)
        p_auto = root / f"auto_{eid}_2_{side}.pts"
        if pts_text is not None:
            p_auto.write_text(pts_text)
        else:
            write_pts(p_auto, pts)
        p_manual, p_mask = "", ""
        if mask is not None or mask_img is not None:
            p_mask = str(root / f"{eid}_2_{side}.png")
            Image.fromarray(mask_img if mask_img is not None else mask).save(p_mask)
            p_manual = str(root / f"manual_{eid}_2_{side}.pts")
            write_pts(p_manual, pts if manual is None else manual)
        records.append(
            dict(eid=eid, instance=2, array=0, side=side, image=str(zpath), member=member,
                 points_auto=pts_path if pts_path is not None else str(p_auto), points_manual=p_manual,
                 mask=p_mask, rows=ROWS, cols=COLS, spacing_row_mm=SPACING[0], spacing_col_mm=SPACING[1],
                 annotated=bool(p_mask), shard=shard, qc_reason=qc)
        )

    for k in range(n):
        pts = hip_points(rng)
        img, mask = hip_image(rng, pts)
        annotated = k % 2 == 0
        manual = pts + rng.normal(0, 1.0, pts.shape) if annotated else None
        add(f"{1000 + k}", pts=pts, img=img, mask=mask if annotated else None, manual=manual, shard=k % 2)
    pts = hip_points(rng)
    img, mask = hip_image(rng, pts)
    add("f-trunc", pts=pts, img=img, mask=mask, truncate=True)
    add("f-zip", pts=pts, img=img, mask=None, zip_bytes=b"this is not a zip file")
    add("f-pts", pts=pts, img=img, mask=None, pts_text="version: 1\nn_points: 85\n{\n1 2\n}\n")
    add("f-nopts", pts=pts, img=img, mask=None, pts_path=str(root / "does_not_exist.pts"))
    edge = pts.copy()
    edge[78] = [12.0, 14.0]  # in view (3 mm in), but the acetabulum patch hangs off the top-left corner
    add("f-edge", pts=edge, img=img, mask=mask)
    add("f-preset", pts=pts, img=img, mask=mask, qc="no_hip_dicom")
    add("f-mask", pts=pts, img=img, mask=None, mask_img=np.zeros((10, 10), np.uint8))
    # a right hip that is the mirror image of row 0's left hip (same participant scene)
    first = records[0]
    img0 = read_image(first["image"], first["member"]).pixels.astype(np.uint8)
    pts0 = read_pts(first["points_auto"])
    mask0 = np.asarray(Image.open(first["mask"]))
    add("1000", pts=mirror_points(pts0, COLS), img=img0[:, ::-1], mask=mask0[:, ::-1], side="R",
        manual=mirror_points(read_pts(first["points_manual"]), COLS))
    df = pd.DataFrame.from_records(records)
    return df.astype({"instance": "int16", "array": "int16", "rows": "Int32", "cols": "Int32", "shard": "int32"})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("cohort")
    return root, make_cohort(root / "data")


@pytest.fixture(scope="module")
def shard0(cohort) -> tuple[Path, dict, pd.DataFrame]:
    root, manifest = cohort
    out = root / "shard-0000.zarr"
    counts = crop_shard(manifest=manifest, shard=0, out=out, sites=list(DEFAULT_SITES), limits=ANISOTROPIC)
    return out, counts, manifest[manifest["shard"] == 0].reset_index(drop=True)


# ------------------------------------------------------------------------------- the store


def test_every_row_once_in_manifest_order_with_planted_faults_flagged(shard0):
    out, counts, rows_in = shard0
    rows = read_rows(out)
    assert list(rows["eid"]) == list(rows_in["eid"])
    assert list(rows["side"]) == list(rows_in["side"])
    reason = dict(zip(rows["eid"] + rows["side"], rows["qc_reason"]))
    assert reason["f-truncL"] == "unreadable_dicom"
    assert reason["f-zipL"] == "unreadable_zip"  # DicomError.reason passed through
    assert reason["f-ptsL"] == "points_invalid"
    assert reason["f-noptsL"] == "points_missing"
    assert reason["f-edgeL"] == "patch_outside_image"
    assert reason["f-presetL"] == "no_hip_dicom"
    good = [k for k in reason if not k.startswith("f-") or k == "f-maskL"]
    assert all(reason[k] == "" for k in good)
    assert counts["rows"] == len(rows_in) and counts["flagged"] == 6
    assert counts["reasons"]["unreadable_dicom"] == 1
    for site in DEFAULT_SITES:
        g = zarr.open_group(str(out), mode="r")[f"auto/{site.name}"]
        assert g["image"].shape == (len(rows_in), 128, 128) and g["image"].dtype == np.float16
        assert g["mask"].dtype == np.uint8 and g["affine"].shape == (len(rows_in), 2, 3)
        flagged = rows["qc_reason"].ne("").to_numpy()
        image = g["image"][:]
        assert not image[flagged].any()  # QC failures: zeros
        assert (np.abs(image[~flagged]).reshape((~flagged).sum(), -1).max(axis=1) > 0.5).all()
    # the edge row keeps its affine and per-site inside, the acetabulum being the culprit
    i = int(np.flatnonzero(rows["eid"] == "f-edge")[0])
    inside = {s.name: float(zarr.open_group(str(out), mode="r")[f"auto/{s.name}/inside"][i]) for s in DEFAULT_SITES}
    assert inside["lateral_acetabulum"] < 0.5 and inside["superior_femoral_head"] == 1.0
    assert not (out.parent / (out.name + ".tmp")).exists()


def test_mask_problems_make_rows_not_annotated(shard0):
    out, _, rows_in = shard0
    rows = read_rows(out).set_index(["eid", "side"])
    assert rows_in.set_index(["eid", "side"]).loc[("f-mask", "L"), "annotated"]  # the manifest thought so
    assert not rows.loc[("f-mask", "L"), "annotated"]
    assert np.isnan(rows.loc[("f-mask", "L"), "superior_femoral_head_true_area_mm2"])
    # unreadable image: the mask cannot be checked against it
    assert not rows.loc[("f-trunc", "L"), "annotated"]


def test_rows_columns_and_true_areas(shard0):
    out, _, rows_in = shard0
    rows = read_rows(out)
    expected = ["eid", "instance", "side", "qc_reason", "annotated", "reference_length_mm", "spacing_row_mm",
                "spacing_col_mm", "rows", "cols", "implant_area_mm2", "motion_score"]
    expected += [f"{s.name}_true_area_mm2" for s in DEFAULT_SITES]
    assert list(rows.columns) == expected
    assert rows["instance"].dtype == np.int16 and rows["rows"].dtype == np.int32
    assert rows["annotated"].dtype == bool
    ok = rows["qc_reason"].eq("")
    np.testing.assert_allclose(rows.loc[ok, "spacing_col_mm"], SPACING[1])
    np.testing.assert_allclose(rows.loc[ok, "spacing_row_mm"], SPACING[0])
    assert (rows.loc[ok, "rows"] == ROWS).all() and (rows.loc[ok, "cols"] == COLS).all()
    assert rows.loc[ok, "reference_length_mm"].between(10, 25).all()
    for i, r in rows_in.iterrows():
        if not rows.loc[i, "annotated"]:
            assert np.isnan(rows.loc[i, "inferior_femoral_head_true_area_mm2"])
            continue
        mask = np.asarray(Image.open(r["mask"]))
        for s in DEFAULT_SITES:
            want = np.count_nonzero(mask == s.label) * SPACING[0] * SPACING[1]
            assert rows.loc[i, f"{s.name}_true_area_mm2"] == pytest.approx(want)


def test_auto_patches_equal_direct_geometry(shard0):
    """The stored patch of a clean row is the documented sampling of its DICOM, mirroring included."""
    out, _, rows_in = shard0
    root = zarr.open_group(str(out), mode="r")
    for i in (0, len(rows_in) - 1):  # a left hip and the right twin
        r = rows_in.iloc[i]
        hip = read_image(r["image"], r["member"])
        pts = read_pts(r["points_auto"])
        for s in DEFAULT_SITES:
            a = patch_affine(pts, s, hip.spacing_mm, COLS, r["side"])
            want = normalise_patch(sample_patch(hip.pixels, a), inside_mask(a, 128, hip.pixels.shape))
            g = root[f"auto/{s.name}"]
            np.testing.assert_allclose(g["affine"][i], a)
            np.testing.assert_allclose(g["image"][i].astype(np.float32), want, atol=2e-2)


def test_right_twin_has_the_same_patches_and_masks(shard0):
    out, _, rows_in = shard0
    root = zarr.open_group(str(out), mode="r")
    left, right = 0, len(rows_in) - 1
    assert rows_in.loc[right, "side"] == "R" and rows_in.loc[right, "eid"] == rows_in.loc[left, "eid"]
    for s in DEFAULT_SITES:
        g = root[f"auto/{s.name}"]
        np.testing.assert_allclose(g["image"][right].astype(np.float32), g["image"][left].astype(np.float32), atol=1e-3)
        np.testing.assert_array_equal(g["mask"][right], g["mask"][left])
        # the affines differ (x runs backwards) but both put the centre on the same anatomy
        assert g["affine"][right][0, 0] == pytest.approx(-g["affine"][left][0, 0])
    rows = read_rows(out)
    for s in DEFAULT_SITES:
        assert rows.loc[right, f"{s.name}_true_area_mm2"] == rows.loc[left, f"{s.name}_true_area_mm2"]


def test_manual_patches_are_context_crops_from_manual_points(shard0):
    out, counts, rows_in = shard0
    rows = read_rows(out)
    root = zarr.open_group(str(out), mode="r")
    want = [i for i in range(len(rows)) if rows.loc[i, "annotated"] and rows.loc[i, "qc_reason"] != "patch_outside_image"]
    for s in DEFAULT_SITES:
        g = root[f"manual/{s.name}"]
        assert list(g["row"][:]) == want
        m = len(want)
        assert g["image"].shape == (m, CONTEXT_SIZE, CONTEXT_SIZE) and g["image"].dtype == np.float16
        assert g["mask"].shape == (m, CONTEXT_SIZE, CONTEXT_SIZE) and g["affine"].shape == (m, 2, 3)
        for j, i in enumerate(want):
            r = rows_in.iloc[i]
            manual = read_pts(r["points_manual"])
            a = patch_affine(manual, s, SPACING, COLS, r["side"], size=CONTEXT_SIZE)
            np.testing.assert_allclose(g["affine"][j], a, atol=1e-6)
            # mask pixels sampled through the stored affine carry the site's label in the input mask
            mask = np.asarray(Image.open(r["mask"]))
            np.testing.assert_array_equal(g["mask"][j], sample_patch(mask, a, CONTEXT_SIZE, order=0) == s.label)
    assert counts["manual"] == len(want)
    assert store_attrs(out)["context_size"] == CONTEXT_SIZE


def test_store_attrs(shard0):
    out, _, _ = shard0
    attrs = store_attrs(out)
    for key in ("hipoa_version", "side", "shard", "patch_size", "context_size", "normalisation", "fill",
                "sites", "min_inside_fraction", "points_source", "context_note"):
        assert key in attrs
    assert attrs["patch_size"] == 128 and attrs["shard"] == 0 and attrs["fill"] == 0.0
    assert attrs["sites"]["lateral_acetabulum"] == {"centre": 78, "reference": [12, 39], "dp": 0.01, "label": 3}
    assert "z-score" in attrs["normalisation"]


def test_open_patches_concatenates_shards_lazily(cohort, shard0):
    root, manifest = cohort
    out0, _, rows0 = shard0
    out1 = root / "shard-0001.zarr"
    crop_shard(manifest=manifest, shard=1, out=out1, sites=list(DEFAULT_SITES), limits=ANISOTROPIC)
    n0, n1 = len(rows0), int((manifest["shard"] == 1).sum())
    ps = open_patches([out0, out1], "superior_femoral_head")
    assert isinstance(ps.image, da.Array) and isinstance(ps.mask, da.Array)
    assert ps.image.shape == (n0 + n1, 128, 128) and ps.image.dtype == np.float16
    assert ps.mask.shape == (n0 + n1, 128, 128) and ps.mask.dtype == np.uint8
    assert ps.affine.shape == (n0 + n1, 2, 3) and ps.affine.dtype == np.float64
    assert len(ps) == n0 + n1 and list(ps.rows.index) == list(range(n0 + n1))
    assert list(ps.rows["store"].unique()) == [str(out0), str(out1)]
    assert list(ps.rows["index"]) == list(range(n0)) + list(range(n1))
    assert set(ps.rows["points_source"]) == {"auto"}
    assert ps.rows["inside"].dtype == np.float32
    direct = zarr.open_group(str(out1), mode="r")["auto/superior_femoral_head/image"][2]
    np.testing.assert_array_equal(ps.image[n0 + 2].compute(), direct)
    manual = open_patches([out0, out1], "superior_femoral_head", source="manual")
    assert manual.image.shape[1:] == (CONTEXT_SIZE, CONTEXT_SIZE) and manual.core_offset == 24
    assert manual.rows["annotated"].all() and set(manual.rows["points_source"]) == {"manual"}
    assert len(manual) == manual.affine.shape[0] == manual.image.shape[0]
    with pytest.raises(KeyError, match="no_such_site"):
        open_patches([out0], "no_such_site")


def test_empty_shard_writes_an_empty_store(cohort, tmp_path):
    _, manifest = cohort
    out = tmp_path / "empty.zarr"
    manifest = manifest.copy()
    manifest.attrs["ingest"] = {"shards": 8}  # as ingest --shards 8 records it: shard 7 exists, empty
    counts = crop_shard(manifest=manifest, shard=7, out=out, sites=list(DEFAULT_SITES), limits=ANISOTROPIC)
    assert counts["rows"] == 0
    ps = open_patches([out], "lateral_acetabulum", source="manual")
    assert ps.image.shape == (0, CONTEXT_SIZE, CONTEXT_SIZE) and len(ps.rows) == 0


def test_a_shard_outside_the_manifest_is_refused_before_anything_is_written(cohort, tmp_path):
    _, manifest = cohort
    out = tmp_path / "s.zarr"
    with pytest.raises(ValueError, match="--shard 7 is outside the manifest's shards"):
        crop_shard(manifest=manifest, shard=7, out=out, sites=list(DEFAULT_SITES), limits=ANISOTROPIC)
    assert not out.exists()


def test_rerun_replaces_the_store(cohort, tmp_path):
    _, manifest = cohort
    out = tmp_path / "s.zarr"
    crop_shard(manifest=manifest, shard=1, out=out, sites=list(DEFAULT_SITES)[:1], limits=ANISOTROPIC)
    crop_shard(manifest=manifest, shard=1, out=out, sites=list(DEFAULT_SITES), limits=ANISOTROPIC)
    assert sorted(zarr.open_group(str(out), mode="r")["auto"].group_keys()) == sorted(s.name for s in DEFAULT_SITES)


def test_bad_arguments_raise(cohort, tmp_path):
    _, manifest = cohort
    with pytest.raises(ValueError, match="context"):
        crop_shard(manifest=manifest, shard=0, out=tmp_path / "x.zarr", sites=list(DEFAULT_SITES), context=130 + 1)
    with pytest.raises(ValueError, match="n_points"):
        crop_shard(manifest=manifest, shard=0, out=tmp_path / "x.zarr", sites=list(DEFAULT_SITES), n_points=50)
    with pytest.raises(ValueError, match="lacks columns"):
        crop_shard(manifest=manifest.drop(columns=["member"]), shard=0, out=tmp_path / "x.zarr", sites=list(DEFAULT_SITES), limits=ANISOTROPIC)


def _tiny_store_arrays(n: int = 3, m: int = 1) -> dict:
    """write_patch_store's arguments for one site: n rows with 8 px patches, m context crops of 12 px."""
    rows = {"eid": np.array(["1", "2", "3"][:n], dtype=object), "qc_reason": np.array(["", "x", ""][:n], dtype=object),
            "instance": np.arange(n, dtype=np.int16)}
    auto = {"s": {"image": np.ones((n, 8, 8), np.float16), "mask": np.zeros((n, 8, 8), np.uint8),
                  "affine": np.zeros((n, 2, 3)), "inside": np.ones(n, np.float32)}}
    manual = {"s": {"image": np.full((m, 12, 12), 2, np.float16), "mask": np.ones((m, 12, 12), np.uint8),
                    "affine": np.zeros((m, 2, 3)), "inside": np.ones(m, np.float32), "row": np.arange(m, dtype=np.int32)}}
    return dict(attrs={"shard": 0}, rows=rows, auto=auto, manual=manual, points_source={"auto": "A", "manual": "M"})


def test_write_patch_store_layout_sealed_and_atomic(tmp_path):
    out = tmp_path / "t.zarr"
    out.mkdir()
    (out / "stale").write_text("from an earlier run")
    assert write_patch_store(out, **_tiny_store_arrays()) == out
    check_store(out)  # sealed: the marker lists every file
    assert (out / MARKER).is_file() and not (out / "stale").exists() and not (tmp_path / "t.zarr.tmp").exists()
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["shard"] == 0 and root["rows"].attrs["columns"] == ["eid", "qc_reason", "instance"]
    assert dict(root["auto/s"].attrs) == {"patch_size": 8, "points_source": "auto"}
    assert dict(root["manual/s"].attrs) == {"patch_size": 12, "core_offset": 2, "points_source": "manual"}
    assert root["auto"].attrs["points_source"] == "A" and root["manual"].attrs["points_source"] == "M"
    ps = open_patches(out, "s", source="manual")
    assert ps.core_offset == 2 and ps.rows["eid"].tolist() == ["1"] and float(ps.image[0].compute().mean()) == 2.0
    assert read_rows(out)["qc_reason"].tolist() == ["", "x", ""]


def test_write_patch_store_refuses_ragged_arrays_and_writes_nothing(tmp_path):
    args = _tiny_store_arrays()
    args["auto"]["s"]["inside"] = np.ones(2, np.float32)
    with pytest.raises(ValueError, match=r"auto/s/inside has 2 rows, expected 3"):
        write_patch_store(tmp_path / "bad.zarr", **args)
    args = _tiny_store_arrays()
    args["manual"]["s"]["image"] = np.zeros((2, 12, 12), np.float16)
    with pytest.raises(ValueError, match=r"manual/s/image has 2 rows, expected 1"):
        write_patch_store(tmp_path / "bad.zarr", **args)
    args = _tiny_store_arrays()
    args["manual"]["s"]["image"] = np.zeros((1, 11, 11), np.float16)  # odd margin: no exact centre crop
    with pytest.raises(ValueError, match="context"):
        write_patch_store(tmp_path / "bad.zarr", **args)
    assert list(tmp_path.iterdir()) == []  # neither the store nor its temporary directory


def test_cli_crop_and_show_patches(cohort, tmp_path):
    root, manifest = cohort
    path = tmp_path / "m.parquet"
    manifest.to_parquet(path)
    out = tmp_path / "shard-0001.zarr"
    assert main(["crop-patches", "--manifest", str(path), "--shard", "1", "--out", str(out),
                 "--sites", '{"lateral_acetabulum": {"centre": 78, "reference": [12, 39], "dp": 0.01, "label": 3}}',
                 "--context", "160", "--min-inside", "0.8", "--limits", ANISOTROPIC.to_json()]) == 0
    attrs = store_attrs(out)
    assert list(attrs["sites"]) == ["lateral_acetabulum"] and attrs["context_size"] == 160
    assert attrs["min_inside_fraction"] == 0.8
    png = tmp_path / "montage.png"
    assert main(["show-patches", "--stores", str(out), "--out", str(png), "--n", "3", "--source", "manual"]) == 0
    with Image.open(png) as im:
        assert im.size[0] > 200 and im.size[1] > 200


# ------------------------------------------------------------------------------- synthetic cohort


@pytest.fixture(scope="module")
def synth_shards(tmp_path_factory):
    """hipoa.synth cohort (both sides annotated, every fault kind) -> ingest -> crop 2 shards per side."""
    from hipoa.ingest import build_manifest
    from hipoa.synth import make_cohort

    root = tmp_path_factory.mktemp("synth")
    truth = make_cohort(root / "cohort", participants=10, seed=5, faults=6, annotated_fraction=0.6, annotate_sides="LR")
    c = root / "cohort"
    stores, manifests = {}, {}
    for side in ("L", "R"):
        manifest = build_manifest(
            images=str(c / "ukb/20158/{eid}_20158_{instance}_{array}.zip"),
            points_auto=str(c / "points/auto/{eid}_{instance}_{side}.pts"),
            points_manual=str(c / "points/manual/{eid}_{instance}_{side}.pts"),
            masks=str(c / "masks/{eid}_{instance}_{side}.png"),
            side=side, n_shards=2,
        )
        manifests[side] = manifest
        stores[side] = []
        for k in range(2):
            out = root / f"{side}-shard-{k:04d}.zarr"
            crop_shard(manifest=manifest, shard=k, out=out, sites=list(DEFAULT_SITES), limits=ANISOTROPIC)
            stores[side].append(out)
    truth = truth.assign(eid=truth["eid"].astype(str))
    return truth, manifests, stores


def test_synth_every_image_once_and_faults_flagged(synth_shards):
    truth, manifests, stores = synth_shards
    for side in ("L", "R"):
        manifest = manifests[side]
        got = pd.concat([read_rows(s) for s in stores[side]], ignore_index=True)
        for k, store in enumerate(stores[side]):
            assert list(read_rows(store)["eid"]) == list(manifest.loc[manifest["shard"] == k, "eid"])
        assert sorted(got["eid"]) == sorted(manifest["eid"]) and not got.duplicated(["eid", "instance"]).any()
        merged = got.merge(truth, on=["eid", "side"], validate="one_to_one", suffixes=("", "_truth"))
        faulted = merged["expected_reason"] != ""
        assert faulted.sum() > 0
        assert (merged.loc[faulted, "qc_reason"] == merged.loc[faulted, "expected_reason"]).all()
        # clean images pass: an acetabulum patch may hang a little off the top of the image,
        # but never past the default threshold
        clean = merged[~faulted]
        assert (clean["qc_reason"] == "").all(), clean.loc[clean["qc_reason"] != "", ["eid", "qc_reason"]]


def test_synth_areas_match_the_generator_truth(synth_shards):
    truth, _, stores = synth_shards
    checked = 0
    for side in ("L", "R"):
        for site in DEFAULT_SITES:
            ps = open_patches(stores[side], site.name)
            r = ps.rows.merge(truth, on=["eid", "side"], how="left", validate="one_to_one", suffixes=("", "_truth"))
            ann = r["annotated"].to_numpy()
            np.testing.assert_allclose(r.loc[ann, f"{site.name}_true_area_mm2"], r.loc[ann, f"{site.name}_area_mm2"])
            ok = ann & r["qc_reason"].eq("").to_numpy()
            det = np.abs(np.linalg.det(ps.affine[ok][:, :, :2]))
            area = ps.mask[ok].sum(axis=(1, 2)).compute() * det * r.loc[ok, "spacing_row_mm"] * r.loc[ok, "spacing_col_mm"]
            want = r.loc[ok, f"{site.name}_area_mm2"].to_numpy()
            np.testing.assert_allclose(area, want, rtol=0.05, atol=1.5)
            checked += int((want > 0).sum())
            # reference length from the automatic points, close to the true outline's
            np.testing.assert_allclose(r.loc[ok, "reference_length_mm"], r.loc[ok, "reference_length_mm_truth"], rtol=0.08)
    assert checked >= 5


@pytest.mark.parametrize("n", [1, 3, 40])
def test_montage_picks_positives_first_reading_only_annotated_masks(synth_shards, n):
    """The montage's choice equals a full scan of every mask (positives first, then other
    passing rows, in store order), though masks are read only where a row is annotated."""
    from hipoa.store import pick_patches

    _, _, stores = synth_shards
    for site in DEFAULT_SITES:
        for source in ("auto", "manual"):
            ps, picked = pick_patches(stores["L"] + stores["R"], site.name, source, n)
            ok = ps.rows["qc_reason"].eq("").to_numpy()
            area = ps.mask.sum(axis=(1, 2)).compute()
            assert not (area[~ps.rows["annotated"].to_numpy()] > 0).any()  # what makes the shortcut true
            positive = [i for i in range(len(ok)) if ok[i] and area[i] > 0]
            other = [i for i in range(len(ok)) if ok[i] and area[i] == 0]
            assert list(picked) == (positive + other)[:n], (site.name, source)


# ------------------------------------------------------------------------------- damaged stores (issue 22, item 6)


def _damaged_copy(shard0, tmp_path: Path, damage: str) -> tuple[Path, str]:
    """A copy of the real crop_shard store with one chunk of ``auto/<site>/image`` damaged."""
    import json
    import shutil

    src, _, _ = shard0
    store = tmp_path / "shard-0000.zarr"
    shutil.copytree(src, store)
    site = DEFAULT_SITES[0].name
    chunk = next(f for f in sorted((store / "auto" / site / "image").rglob("*"))
                 if f.is_file() and f.name != "zarr.json")
    rel = chunk.relative_to(store).as_posix()
    data = bytearray(chunk.read_bytes())
    marker = json.loads((store / MARKER).read_text())
    if damage == "truncated":  # and the marker made to agree: once a segfault in blosc (rc 139)
        chunk.write_bytes(bytes(data[: len(data) // 2]))
        entry = marker["files"][rel]  # [size, crc32]; a bare size in a version-1 marker
        marker["files"][rel] = [len(data) // 2, *entry[1:]] if isinstance(entry, list) else len(data) // 2
    elif damage == "64_bytes":  # once a blosc traceback
        data[16:80] = bytes(b ^ 0xFF for b in data[16:80])
        chunk.write_bytes(bytes(data))
    elif damage == "one_bit":  # once pixels changed silently
        data[len(data) // 2] ^= 0x04
        chunk.write_bytes(bytes(data))
    elif damage == "deleted":  # from disk and marker: once read as zeros
        chunk.unlink()
        del marker["files"][rel]
    (store / MARKER).write_text(json.dumps(marker))
    return store, rel


@pytest.mark.parametrize("damage", ["truncated", "64_bytes", "one_bit", "deleted"])
def test_a_damaged_chunk_of_a_cropped_store_is_one_line_naming_store_and_chunk(shard0, tmp_path, damage):
    from hipoa.store import StoreError

    store, rel = _damaged_copy(shard0, tmp_path, damage)
    why = {"truncated": "changed since it was written", "64_bytes": "CRC-32", "one_bit": "CRC-32",
           "deleted": "would read as zeros"}[damage]
    site = DEFAULT_SITES[0].name
    for read in (lambda: open_patches([store], site), lambda: read_rows(store), lambda: store_attrs(store),
                 lambda: check_store(store)):
        with pytest.raises(StoreError) as info:
            read()
        msg = str(info.value)
        assert "\n" not in msg and str(store) in msg and f"chunk {rel} " in msg and why in msg, msg


def test_an_intact_copy_of_a_cropped_store_reads_as_the_original(shard0, tmp_path):
    import shutil

    src, _, _ = shard0
    store = tmp_path / "copy.zarr"
    shutil.copytree(src, store)
    site = DEFAULT_SITES[0].name
    a, b = open_patches([src], site), open_patches([store], site)
    np.testing.assert_array_equal(a.image.compute(), b.image.compute())
    np.testing.assert_array_equal(a.mask.compute(), b.mask.compute())
    pd.testing.assert_frame_equal(read_rows(src), read_rows(store))


def test_cli_show_patches_on_a_damaged_store_is_one_error_line(shard0, tmp_path, capsys):
    store, rel = _damaged_copy(shard0, tmp_path, "one_bit")
    rc = main(["show-patches", "--stores", str(store), "--out", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "ERROR" in line]
    assert rc == 2 and not (tmp_path / "m.png").exists()
    assert len(errors) == 1 and "ERROR hipoa" in errors[0] and rel in errors[0] and str(store) in errors[0], err
    assert "Traceback" not in err
