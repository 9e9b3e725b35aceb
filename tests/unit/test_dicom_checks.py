"""Headers that disagree with themselves or with their pixels, hostile structure, and zips whose
other members are broken (hipoa.dicom, hipoa.headerscan, hipoa.pixelcheck)."""

from __future__ import annotations

import io
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from hipoa import qc
from hipoa.dicom import DicomError, find_hip_member, probe_hip, read_image, read_image_header
from hipoa.headerscan import sniff
from hipoa.pixelcheck import check_pixels
sys.path.insert(0, str(Path(__file__).parent))
from test_dicom import dicom_bytes, hip_dataset, ukb_zip, write_dicom  # noqa: E402

LIMITS = qc.Limits()


def hip_pixels(rows: int = 150, cols: int = 170, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(20, 240, (rows, cols), dtype=np.uint8)


def reason_of(call) -> DicomError:
    with pytest.raises(DicomError) as info:
        call()
    return info.value


# ---- spacing sources ---------------------------------------------------------------------------


def test_pixel_spacing_contradicting_exposed_area_is_spacing_inconsistent(tmp_path):
    ds = hip_dataset(hip_pixels(600, 680))  # Exposed Area [170, 150] over 600 x 680: 0.25 mm
    ds.PixelSpacing = [0.5, 0.5]
    path = write_dicom(tmp_path / "a.dcm", ds)
    err = reason_of(lambda: read_image_header(path, limits=LIMITS))
    assert err.reason == qc.SPACING_INCONSISTENT
    assert "(0028,0030) Pixel Spacing" in str(err) and "Exposed Area" in str(err) and "100.0 %" in str(err)
    ds.PixelSpacing = [0.26, 0.26]  # 4 % apart: within qc.spacing_agreement
    assert read_image_header(write_dicom(tmp_path / "b.dcm", ds), limits=LIMITS).spacing_mm == (0.26, 0.26)


def test_imager_pixel_spacing_is_compared_too(tmp_path):
    ds = hip_dataset(hip_pixels(600, 680), exposed_area=None)
    ds.PixelSpacing = [0.25, 0.25]
    ds.ImagerPixelSpacing = [0.5, 0.5]
    err = reason_of(lambda: read_image_header(write_dicom(tmp_path / "a.dcm", ds), limits=LIMITS))
    assert err.reason == qc.SPACING_INCONSISTENT and "(0018,1164) Imager Pixel Spacing" in str(err)


# ---- pixel values against the header -----------------------------------------------------------


def test_values_beyond_bits_stored_are_not_masked_and_measured(tmp_path):
    ds = hip_dataset(hip_pixels(), bits_stored=7)  # values up to 239 under Bits Stored 7
    err = reason_of(lambda: read_image(write_dicom(tmp_path / "a.dcm", ds)))
    assert err.reason == qc.PIXEL_DATA_INCONSISTENT
    assert "(0028,0101) Bits Stored 7" in str(err) and "[0, 127]" in str(err)


def test_12bit_in_16_beyond_4095_is_flagged_and_within_it_reads(tmp_path):
    pixels = (hip_pixels().astype(np.uint16) * 16)  # up to 3824: fine for 12 bits
    ok = read_image(write_dicom(tmp_path / "ok.dcm", hip_dataset(pixels, bits_stored=12)))
    np.testing.assert_array_equal(ok.pixels, pixels.astype(np.float32))
    pixels[5, 5] = 5000
    err = reason_of(lambda: read_image(write_dicom(tmp_path / "bad.dcm", hip_dataset(pixels, bits_stored=12))))
    assert err.reason == qc.PIXEL_DATA_INCONSISTENT and "1 of 25,500 raw pixel values" in str(err)


def test_pixel_data_longer_than_the_matrix_is_flagged_at_the_header(tmp_path):
    ds = hip_dataset(hip_pixels())
    ds.PixelData = bytes(ds.PixelData) + bytes(4096)
    err = reason_of(lambda: read_image_header(write_dicom(tmp_path / "a.dcm", ds)))
    assert err.reason == qc.PIXEL_DATA_INCONSISTENT and "29,596 bytes" in str(err)


def test_an_image_pinned_at_one_value_is_flagged(tmp_path):
    pixels = np.zeros((150, 170), np.uint8)
    pixels[:3] = 200
    err = reason_of(lambda: read_image(write_dicom(tmp_path / "a.dcm", hip_dataset(pixels))))
    assert err.reason == qc.PIXEL_DATA_INCONSISTENT and "single stored value 0" in str(err)


def _j2k_dataset(values: np.ndarray, pixel_representation: int) -> Dataset:
    import openjpeg

    ds = hip_dataset(values.astype(np.uint16))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelRepresentation = pixel_representation
    ds.PixelData = encapsulate([bytes(openjpeg.encode(values))])
    ds["PixelData"].VR = "OB"
    return ds


def test_signed_16bit_j2k_under_pixel_representation_0_is_flagged(tmp_path):
    values = (np.arange(150 * 170).reshape(150, 170) % 60000 - 30000).astype(np.int16)
    err = reason_of(lambda: read_image(write_dicom(tmp_path / "a.dcm", _j2k_dataset(values, 0))))
    assert err.reason == qc.PIXEL_DATA_INCONSISTENT
    assert "codestream is signed 16-bit" in str(err) and "(0028,0103) Pixel Representation is 0" in str(err)
    # the same stream declared signed decodes to its values
    good = read_image(write_dicom(tmp_path / "b.dcm", _j2k_dataset(values, 1)))
    np.testing.assert_array_equal(good.pixels, values.astype(np.float32))


def test_empty_modality_lut_item_names_file_and_tag(tmp_path):
    ds = hip_dataset(hip_pixels())
    ds.ModalityLUTSequence = [Dataset()]
    path = write_dicom(tmp_path / "a.dcm", ds)
    err = reason_of(lambda: read_image(path))
    assert err.reason == qc.UNREADABLE_DICOM
    assert str(err).startswith(path) and "(0028,3000) Modality LUT Sequence item 1" in str(err)
    assert "(0028,3002) LUT Descriptor is missing" in str(err)


def test_non_image_objects_are_refused_by_sop_class():
    path = get_testdata_file("test-SR.dcm", download=False)
    err = reason_of(lambda: read_image(path))
    assert "(0008,0016) SOP Class UID: 'Comprehensive SR Storage'" in str(err) and "is not an image" in str(err)


# ---- the decoded image against a hip DXA's structure ---------------------------------------------


def test_inverted_and_noise_images_fail_the_sanity_check():
    from hipoa.synth import anatomy

    rng = np.random.default_rng(3)
    who = anatomy.draw_participant(rng)
    geo = anatomy.draw_geometry(rng, who, 600, 680, 0.25)
    hip = anatomy.render_hip(rng, who, geo, [])
    img = hip.image.astype(np.float32)
    spacing = (0.25, 0.25)
    fine = check_pixels(img, hip.points, spacing)
    assert fine.reason == "" and fine.contrast > 0.1 and fine.roughness < 0.05
    inverted = check_pixels(255.0 - img, hip.points, spacing)
    assert inverted.reason == qc.IMPLAUSIBLE_PIXELS and "inverted" in inverted.detail
    noise = check_pixels(rng.uniform(0, 255, img.shape).astype(np.float32), hip.points, spacing)
    assert noise.reason == qc.IMPLAUSIBLE_PIXELS and "noise-like" in noise.detail


# ---- structure caps, preamble-less members, broken neighbours --------------------------------------


def _million_items() -> bytes:
    """A hip DICOM's bytes whose (0008,1140) Referenced Image Sequence holds 1,000,000 empty items of
    undefined length (16 MB, deflating to ~20 kB): pydicom parses such a sequence as it reads."""
    ds = hip_dataset(hip_pixels())
    base = dicom_bytes(ds)
    items = b"\xfe\xff\x00\xe0\xff\xff\xff\xff\xfe\xff\x0d\xe0\x00\x00\x00\x00" * 1_000_000
    seq = struct.pack("<HHI", 0x0008, 0x1140, 0xFFFFFFFF) + items + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    ds_start = base.index(b"\x08\x00\x16\x00")  # (0008,0016) SOP Class UID, the data set's first element
    return base[:ds_start] + _insert_before_group(base[ds_start:], 0x0009, seq)


def _insert_before_group(data: bytes, group: int, element: bytes) -> bytes:
    pos = 0
    while pos < len(data):
        g, e, length = struct.unpack_from("<HHI", data, pos)
        if (g << 16 | e) >= (group << 16):
            break
        pos += 8 + length
    return data[:pos] + element + data[pos:]


def test_a_million_sequence_items_are_refused_before_pydicom_parses_them(tmp_path):
    z = ukb_zip(tmp_path / "a.zip", {"hip.dcm": _million_items()})
    err = reason_of(lambda: probe_hip(z, "L"))
    assert err.reason == qc.IMAGE_TOO_LARGE and "more than 5,000 sequence items" in str(err)


def test_deep_nesting_is_refused(tmp_path):
    inner = Dataset()
    for _ in range(40):
        outer = Dataset()
        outer.add_new(0x00091010, "SQ", [inner])
        inner = outer
    ds = hip_dataset(hip_pixels())
    ds.add_new(0x00091010, "SQ", [inner])
    err = reason_of(lambda: read_image_header(write_dicom(tmp_path / "a.dcm", ds)))
    assert err.reason == qc.IMAGE_TOO_LARGE and "nested more than 16 deep" in str(err)


def test_intact_hip_is_measured_beside_unreadable_members(tmp_path):
    hip = dicom_bytes(hip_dataset(hip_pixels()))
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("spine.dcm", dicom_bytes(hip_dataset(hip_pixels(seed=1), protocol="AP Spine")))
        zf.writestr("hip.dcm", hip)
        zf.writestr("bomb.dcm", _million_items())
        zf.writestr("manifest.cvs", "a,b\n")
    raw = bytearray(z.read_bytes())
    with zipfile.ZipFile(z) as zf:
        info = zf.getinfo("spine.dcm")
    raw[info.header_offset + 30 + len(info.filename) + 40] ^= 0xFF  # spine's deflate data: CRC fails
    z.write_bytes(bytes(raw))
    member, header = probe_hip(z, "L")
    assert member == "hip.dcm" and header.rows == 150
    notes = " | ".join(header.notes)
    assert "spine.dcm" in notes and "unreadable_zip" in notes and "bomb.dcm" in notes and "image_too_large" in notes
    # without the hip, the zip's reason is its unreadable member's, and every skipped member is counted
    with zipfile.ZipFile(z) as zf:
        others = {n: zf.read(n) for n in ("bomb.dcm", "manifest.cvs")}
    z2 = ukb_zip(tmp_path / "b.zip", others)
    err = reason_of(lambda: find_hip_member(z2, "L"))
    assert err.reason == qc.IMAGE_TOO_LARGE
    assert "2 member(s) skipped: 1 image_too_large (bomb.dcm); 1 not DICOM (manifest.cvs)" in str(err)


def _raw_dataset(ds: Dataset, little: bool) -> bytes:
    """The data set alone (no preamble, no file meta), Explicit VR, either byte order."""
    buf = io.BytesIO()
    ds = ds.copy()
    del ds.file_meta
    pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=little, enforce_file_format=False)
    return buf.getvalue()


@pytest.mark.parametrize("little", [True, False], ids=["little_endian", "big_endian"])
def test_preamble_less_member_is_found_by_parsing(tmp_path, little):
    pixels = hip_pixels().astype(np.uint16) * 10
    ds = hip_dataset(pixels)
    if not little:  # pydicom writes Pixel Data's bytes as given: a big-endian file holds them swapped
        ds.PixelData = pixels.astype(">u2").tobytes()
    data = _raw_dataset(ds, little)
    assert data[:4] != b"\x02\x00\x00\x00" and sniff(data) == f"Explicit VR {'Little' if little else 'Big'} Endian"
    z = ukb_zip(tmp_path / "a.zip", {"hip": data, "manifest.cvs": b"eid\n"})
    member = find_hip_member(z, "L")
    np.testing.assert_array_equal(read_image(z, member).pixels, pixels.astype(np.float32))


def test_text_and_junk_are_no_dicom():
    assert sniff(b"eid,field\n9000001,20158\n") is None
    assert sniff(bytes(512)) is None
    assert sniff(b"%PDF-1.4\n" + bytes(300)) is None
