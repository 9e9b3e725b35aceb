"""Reading hip DICOMs (hipoa.dicom) on pydicom's bundled test files and on DICOMs built here."""

from __future__ import annotations

import io
import warnings
import zipfile

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    ComputedRadiographyImageStorage as CRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSNearLossless,
    generate_uid,
)

from hipoa.dicom import (
    DicomError,
    HipImage,
    find_hip_member,
    pixel_spacing,
    probe_hip,
    read_image,
    read_image_header,
)

# pydicom test files this suite uses; all ship inside the pydicom wheel (no pydicom-data download).
CR_MONO1 = "dicomdirtests/77654033/CR1/6154"  # CR, MONOCHROME1, 12-bit, slope 0.684, intercept 200
MR_SMALL = "MR_small.dcm"  # 64 x 64 signed 16-bit MONOCHROME2, Explicit VR LE
MR_SMALL_VARIANTS = {  # the same pixels in other transfer syntaxes
    "MR_small_RLE.dcm": "RLE Lossless",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS Lossless",
    "MR_small_jp2klossless.dcm": "JPEG 2000 Image Compression (Lossless Only)",
    "MR_small_implicit.dcm": "Implicit VR Little Endian",
    "MR_small_bigendian.dcm": "Explicit VR Big Endian",
    "MR_small_expb.dcm": "Explicit VR Big Endian",
}
JPEG_EXTENDED = "JPGExtended.dcm"  # 12-bit JPEG Extended (process 2/4) grayscale NM, 1024 x 256
JPEG_BROKEN = "JPEG-lossy.dcm"  # same image with a corrupt JPEG stream (pydicom's own "bad" file)
CT_SMALL = "CT_small.dcm"  # slope 1, intercept -1024
MR_TRUNCATED = "MR_truncated.dcm"  # pixel data cut short
J2K_LOSSY = "693_J2KI.dcm"  # JPEG 2000 (lossy) CT, 512 x 512, signed
RGB_RLE = "SC_rgb_rle.dcm"
RGB_JPEG_LOSSLESS = "SC_rgb_jpeg_gdcm.dcm"  # the only bundled JPEG Lossless SV1 file: colour
BUNDLED = [CR_MONO1, MR_SMALL, *MR_SMALL_VARIANTS, JPEG_EXTENDED, JPEG_BROKEN, CT_SMALL, MR_TRUNCATED, J2K_LOSSY,
           RGB_RLE, RGB_JPEG_LOSSLESS]


def bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not bundled with this pydicom"
    return path


# ---------------------------------------------------------------------------------------------
# DICOMs built here: the UKB iDXA header profile (CR, Implicit VR LE, MONOCHROME2, ExposedArea)


def hip_dataset(
    pixels: np.ndarray,
    protocol: str | None = "Left Femur",
    *,
    exposed_area: tuple[int, int] | None = (170, 150),
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    step_description: str | None = None,
) -> Dataset:
    arr = np.ascontiguousarray(pixels)
    uid = generate_uid(entropy_srcs=[str(protocol), str(arr.shape), str(arr.sum())])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.SOPClassUID = CRImageStorage
    ds.SOPInstanceUID = uid
    ds.Modality = "CR"
    if protocol is not None:
        ds.ProtocolName = protocol
    if step_description is not None:
        ds.PerformedProcedureStepDescription = step_description
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if exposed_area is not None:
        ds.ExposedArea = list(exposed_area)
    ds.PixelData = arr.tobytes()
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_dicom(path, ds: Dataset) -> str:
    path.write_bytes(dicom_bytes(ds))
    return str(path)


def encapsulated(ds: Dataset, frame: bytes, transfer_syntax: str) -> Dataset:
    """``ds`` with its pixel data replaced by one compressed frame."""
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def jpeg_lossless_sv1(arr: np.ndarray, precision: int) -> bytes:
    """Encode unsigned 2-D ``arr`` as JPEG Lossless (ITU-T T.81 process 14, predictor 1, Pt 0).

    A plain-Python encoder: pydicom's plugins only decode this syntax, and the one bundled JPEG
    Lossless test file is colour. Huffman table: the 17 difference categories, each a 5-bit code.
    """
    x = arr.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)  # H.1.2.1: first sample
    pred[0, 1:] = x[0, :-1]  # first line: Ra (left)
    pred[1:, 0] = x[:-1, 0]  # first column: Rb (above)
    pred[1:, 1:] = x[1:, :-1]  # predictor 1: Ra
    diff = (x - pred) % 65536
    diff = np.where(diff >= 32768, diff - 65536, diff)
    bits: list[str] = []
    for d in diff.ravel().tolist():
        ssss = abs(d).bit_length()
        bits.append(format(ssss, "05b"))
        if 0 < ssss < 16:
            bits.append(format(d if d > 0 else d + (1 << ssss) - 1, f"0{ssss}b"))
    s = "".join(bits)
    s += "1" * (-len(s) % 8)
    data = int(s, 2).to_bytes(len(s) // 8, "big").replace(b"\xff", b"\xff\x00")
    rows, cols = arr.shape
    sof = b"\xff\xc3" + (11).to_bytes(2, "big") + bytes([precision]) + rows.to_bytes(2, "big")
    sof += cols.to_bytes(2, "big") + b"\x01\x01\x11\x00"
    dht = b"\xff\xc4" + (36).to_bytes(2, "big") + b"\x00" + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = b"\xff\xda" + (8).to_bytes(2, "big") + b"\x01\x01\x00\x01\x00\x00"
    return b"\xff\xd8" + sof + dht + sos + data + b"\xff\xd9"


def smooth_image(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A smooth 8-bit image (lossy codecs keep it close)."""
    y, x = np.mgrid[0:rows, 0:cols]
    rng = np.random.default_rng(seed)
    disc = (x - cols / 2) ** 2 + (y - rows / 2) ** 2 < (rows / 4) ** 2
    img = 100 + 60 * np.sin(x / 9.0) * np.cos(y / 13.0) + 40 * disc
    return np.clip(img + rng.normal(0, 1, img.shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Bundled files


def test_every_test_file_used_is_bundled():
    # No silent skips: every file this suite reads must ship with the installed pydicom.
    for name in BUNDLED:
        bundled(name)


def test_mr_small_reference():
    im = read_image(bundled(MR_SMALL))
    raw = pydicom.dcmread(bundled(MR_SMALL)).pixel_array
    assert isinstance(im, HipImage)
    assert im.pixels.dtype == np.float32 and im.pixels.shape == (64, 64)
    np.testing.assert_array_equal(im.pixels, raw.astype(np.float32))
    assert im.spacing_mm == (0.3125, 0.3125)
    assert im.source == bundled(MR_SMALL)


@pytest.mark.parametrize("name", sorted(MR_SMALL_VARIANTS))
def test_lossless_variants_decode_equal_to_mr_small(name):
    ref = read_image(bundled(MR_SMALL)).pixels
    ts = pydicom.dcmread(bundled(name), stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert MR_SMALL_VARIANTS[name] in ts.name
    np.testing.assert_array_equal(read_image(bundled(name)).pixels, ref)


def test_jpeg_extended_12bit_decodes():
    im = read_image(bundled(JPEG_EXTENDED))
    assert im.pixels.shape == (1024, 256)
    assert 0 <= im.pixels.min() and im.pixels.max() <= 4095
    assert im.pixels.std() > 1  # an image, not a constant
    assert im.spacing_mm == (2.26, 2.26)


def test_jpeg2000_lossy_bundled_decodes_with_rescale():
    path = bundled(J2K_LOSSY)
    ds = pydicom.dcmread(path)
    im = read_image(path)
    assert im.pixels.shape == (512, 512)
    # intercept -1024, slope 1: modality LUT applied on top of the decoded values
    np.testing.assert_array_equal(im.pixels, ds.pixel_array.astype(np.float32) - 1024)


def test_corrupt_jpeg_stream_is_dicom_error():
    path = bundled(JPEG_BROKEN)
    with pytest.raises(DicomError) as exc:
        read_image(path)
    assert path in str(exc.value) and "(7FE0,0010) Pixel Data" in str(exc.value)
    assert exc.value.reason == "unreadable_dicom"


def test_cr_monochrome1_rescaled_then_inverted():
    path = bundled(CR_MONO1)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 12
    stored = ds.pixel_array.astype(np.float64)
    im = read_image(path)
    # modality LUT first (0.684 * v + 200), then MONOCHROME1 inverted against the largest
    # possible output, 0.684 * 4095 + 200
    expected = (0.684 * 4095 + 200) - (0.684 * stored + 200)
    np.testing.assert_allclose(im.pixels, expected.astype(np.float32), rtol=1e-6)
    assert im.spacing_mm == (0.1, 0.1)  # (0018,1164) Imager Pixel Spacing


def test_monochrome1_is_the_mirror_of_monochrome2(tmp_path):
    path = bundled(CR_MONO1)
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME2"
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", ds)).pixels
    mono1 = read_image(path).pixels
    # bright = dense: the brightest MONOCHROME2 pixel is the darkest stored MONOCHROME1 one
    np.testing.assert_allclose(mono1 + mono2, np.full_like(mono1, 0.684 * 4095 + 200), rtol=1e-6)


def test_ct_small_rescale_intercept():
    ds = pydicom.dcmread(bundled(CT_SMALL))
    im = read_image(bundled(CT_SMALL))
    np.testing.assert_array_equal(im.pixels, ds.pixel_array.astype(np.float32) - 1024)


def test_truncated_bundled_file_names_the_file():
    path = bundled(MR_TRUNCATED)
    with pytest.raises(DicomError) as exc:
        read_image(path)
    assert path in str(exc.value) and "8130" in str(exc.value)
    assert exc.value.reason == "unreadable_dicom"
    with pytest.raises(DicomError, match="truncated"):
        read_image_header(path)


def test_truncated_encapsulated_file(tmp_path):
    data = open(bundled("MR_small_RLE.dcm"), "rb").read()
    path = tmp_path / "rle_cut.dcm"
    path.write_bytes(data[:-2000])
    with pytest.raises(DicomError) as exc:
        read_image(path)
    assert str(path) in str(exc.value) and "(7FE0,0010)" in str(exc.value)


@pytest.mark.parametrize("name", [RGB_RLE, RGB_JPEG_LOSSLESS])
def test_colour_is_rejected(name):
    with pytest.raises(DicomError, match=r"\(0028,0002\) Samples per Pixel.*got 3"):
        read_image(bundled(name))


# ---------------------------------------------------------------------------------------------
# Built files: rescale, bit depths, compression, spacing


def test_rescale_slope_intercept_on_built_file(tmp_path):
    ds = hip_dataset(np.array([[0, 1, 2], [3, 4, 255]], dtype=np.uint8))
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -5
    im = read_image(write_dicom(tmp_path / "r.dcm", ds))
    np.testing.assert_array_equal(im.pixels, [[-5, -3, -1], [1, 3, 505]])


def test_12bit_monochrome1_inverts_against_4095(tmp_path):
    arr = np.array([[0, 1000], [4000, 4095]], dtype=np.uint16)
    ds = hip_dataset(arr, photometric="MONOCHROME1", bits_stored=12)
    im = read_image(write_dicom(tmp_path / "m1.dcm", ds))
    np.testing.assert_array_equal(im.pixels, [[4095, 3095], [95, 0]])


def test_16bit_monochrome2_exact(tmp_path):
    arr = np.array([[0, 65535], [300, 40000]], dtype=np.uint16)
    im = read_image(write_dicom(tmp_path / "16.dcm", hip_dataset(arr)))
    np.testing.assert_array_equal(im.pixels, arr.astype(np.float32))


@pytest.mark.parametrize("bits", [8, 16])
def test_jpeg_lossless_decodes_exactly(tmp_path, bits):
    if bits == 8:
        arr = np.random.default_rng(1).integers(0, 256, size=(30, 41), dtype=np.uint8)
    else:  # MR_small's values (127..2145) as unsigned 16-bit
        arr = pydicom.dcmread(bundled(MR_SMALL)).pixel_array.astype(np.uint16)
    ds = encapsulated(hip_dataset(arr), jpeg_lossless_sv1(arr, precision=bits), JPEGLosslessSV1)
    im = read_image(write_dicom(tmp_path / f"jll{bits}.dcm", ds))
    np.testing.assert_array_equal(im.pixels, arr.astype(np.float32))


def test_jpeg_baseline_8bit_close(tmp_path):
    arr = smooth_image(96, 120)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="JPEG", quality=95)
    ds = encapsulated(hip_dataset(arr), buf.getvalue(), JPEGBaseline8Bit)
    im = read_image(write_dicom(tmp_path / "jpg.dcm", ds))
    err = np.abs(im.pixels - arr)
    assert err.mean() < 2.0 and err.max() < 30


def test_jpeg_ls_near_lossless_within_error_bound(tmp_path):
    ds = pydicom.dcmread(bundled(MR_SMALL))
    ref = ds.pixel_array.astype(np.float32)
    ds.compress(JPEGLSNearLossless, jls_error=3)
    im = read_image(write_dicom(tmp_path / "jls.dcm", ds))
    err = np.abs(im.pixels - ref)
    assert err.max() <= 3 and err.max() > 0  # lossy, but within the near-lossless bound


def test_jpeg2000_lossy_close(tmp_path):
    ds = pydicom.dcmread(bundled(MR_SMALL))
    ref = ds.pixel_array.astype(np.float32)
    ds.compress(JPEG2000, j2k_cr=[5])  # 5:1
    im = read_image(write_dicom(tmp_path / "j2k.dcm", ds))
    err = np.abs(im.pixels - ref)
    span = ref.max() - ref.min()
    assert 0 < err.max() < 0.05 * span and err.mean() < 0.01 * span


def test_multiframe_is_rejected(tmp_path):
    ds = hip_dataset(np.zeros((2, 4, 5), dtype=np.uint8).reshape(8, 5))
    ds.Rows = 4
    ds.NumberOfFrames = 2
    with pytest.raises(DicomError, match=r"\(0028,0008\) Number of Frames.*got 2"):
        read_image(write_dicom(tmp_path / "mf.dcm", ds))


def test_missing_rows_names_tag(tmp_path):
    ds = hip_dataset(np.zeros((4, 5), dtype=np.uint8))
    del ds.Rows
    path = write_dicom(tmp_path / "norows.dcm", ds)
    with pytest.raises(DicomError) as exc:
        read_image_header(path)
    assert path in str(exc.value) and "(0028,0010) Rows is missing" in str(exc.value)


def test_not_dicom_is_dicom_error(tmp_path):
    path = tmp_path / "x.dcm"
    path.write_text("hello, not a dicom\n" * 20)
    with pytest.raises(DicomError, match=r"x.dcm: not a DICOM"):
        read_image(path)


def _spacing_ds(**tags) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns = 600, 680
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def test_spacing_precedence():
    all3 = _spacing_ds(PixelSpacing=[0.5, 0.4], ImagerPixelSpacing=[0.3, 0.2], ExposedArea=[170, 150])
    assert pixel_spacing(all3, "f") == (0.5, 0.4)
    imager = _spacing_ds(ImagerPixelSpacing=[0.3, 0.2], ExposedArea=[170, 150])
    assert pixel_spacing(imager, "f") == (0.3, 0.2)
    area = _spacing_ds(ExposedArea=[170, 120])  # [width_mm, height_mm]
    assert pixel_spacing(area, "f") == (120 / 600, 170 / 680)
    empty_ps = _spacing_ds(PixelSpacing=None, ExposedArea=[170, 150])  # Type 2 empty = absent
    assert pixel_spacing(empty_ps, "f") == (0.25, 0.25)


def test_no_spacing_names_all_three_tags():
    with pytest.raises(DicomError) as exc:
        pixel_spacing(_spacing_ds(), "scan.zip::1.2.3")
    msg = str(exc.value)
    assert msg.startswith("scan.zip::1.2.3: ")
    for tag in ("(0028,0030) Pixel Spacing", "(0018,1164) Imager Pixel Spacing", "(0040,0303) Exposed Area"):
        assert tag in msg


@pytest.mark.parametrize(
    ("tags", "tag", "value"),
    [
        ({"PixelSpacing": [0.0, 0.25]}, "(0028,0030) Pixel Spacing", "0.0"),
        ({"ImagerPixelSpacing": [0.25]}, "(0018,1164) Imager Pixel Spacing", "0.25"),
        ({"ExposedArea": [170, 0]}, "(0040,0303) Exposed Area", "[170, 0]"),
    ],
)
def test_invalid_spacing_names_tag_and_value(tags, tag, value):
    with pytest.raises(DicomError) as exc:
        pixel_spacing(_spacing_ds(**tags), "f.dcm")
    msg = str(exc.value)
    assert "f.dcm" in msg and tag in msg and value in msg


# ---------------------------------------------------------------------------------------------
# Zips


def ukb_zip(path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return str(path)


@pytest.fixture
def hip_zip(tmp_path):
    rng = np.random.default_rng(7)
    left = rng.integers(0, 256, size=(600, 680), dtype=np.uint8)
    right = left[:, ::-1].copy()
    spine = rng.integers(0, 256, size=(50, 40), dtype=np.uint8)
    path = ukb_zip(
        tmp_path / "9000001_20158_2_0.zip",
        {
            "manifest.cvs": b"1.3.6.1.4.1.9590.100.1.2.1,spine\n",
            "1.3.6.1.4.1.9590.100.1.2.1": dicom_bytes(hip_dataset(spine, "AP Spine")),
            "1.3.6.1.4.1.9590.100.1.2.2": dicom_bytes(hip_dataset(right, "Right Femur")),
            "1.3.6.1.4.1.9590.100.1.2.3": dicom_bytes(hip_dataset(left, "Left Femur")),
        },
    )
    return path, left, right


def test_hip_in_zip_spacing_and_pixels_exact(hip_zip, tmp_path):
    path, left, right = hip_zip
    before = sorted(p.name for p in tmp_path.iterdir())
    member = find_hip_member(path, "L")
    assert member == "1.3.6.1.4.1.9590.100.1.2.3"
    im = read_image(path, member)
    assert im.spacing_mm == (0.25, 0.25)  # ExposedArea [170, 150] over 600 rows x 680 columns
    np.testing.assert_array_equal(im.pixels, left.astype(np.float32))
    assert im.protocol == "Left Femur"
    assert im.source == f"{path}::{member}"
    im_r = read_image(path, find_hip_member(path, "R"))
    np.testing.assert_array_equal(im_r.pixels, right.astype(np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing unpacked to disk


def test_probe_hip_finds_each_side_and_reads_its_header(hip_zip):
    path, _, _ = hip_zip
    assert find_hip_member(path, "L") == "1.3.6.1.4.1.9590.100.1.2.3"
    member, header = probe_hip(path, "R")
    assert member == "1.3.6.1.4.1.9590.100.1.2.2"
    assert (header.rows, header.cols, header.spacing_mm) == (600, 680, (0.25, 0.25))


def test_protocol_match_is_case_and_space_insensitive_with_fallback(tmp_path):
    px = np.zeros((6, 8), dtype=np.uint8)
    path = ukb_zip(
        tmp_path / "z.zip",
        {
            "a": dicom_bytes(hip_dataset(px, "  left   FEMUR ")),
            "b": dicom_bytes(hip_dataset(px, None, step_description="Right Femur")),
        },
    )
    assert find_hip_member(path, "l") == "a"
    assert find_hip_member(path, "R") == "b"


def test_no_hip_names_zip_and_reason(tmp_path):
    px = np.zeros((6, 8), dtype=np.uint8)
    path = ukb_zip(tmp_path / "nohip.zip", {"manifest.cvs": b"x", "s": dicom_bytes(hip_dataset(px, "AP Spine"))})
    with pytest.raises(DicomError) as exc:
        find_hip_member(path, "L")
    assert exc.value.reason == "no_hip_dicom"
    assert "no_hip_dicom" in str(exc.value) and path in str(exc.value) and "Left Femur" in str(exc.value)


def test_truncated_hip_in_zip_names_member(tmp_path):
    data = dicom_bytes(hip_dataset(np.full((60, 68), 9, dtype=np.uint8)))
    path = ukb_zip(tmp_path / "cut.zip", {"m1": data[:-500]})
    member = find_hip_member(path, "L")  # the header is intact
    with pytest.raises(DicomError) as exc:
        read_image(path, member)
    assert f"{path}::m1" in str(exc.value) and exc.value.reason == "unreadable_dicom"
    with pytest.raises(DicomError, match="truncated"):
        probe_hip(path, "L")


def test_bad_zip_is_unreadable_zip(tmp_path):
    path = tmp_path / "bad.zip"
    path.write_bytes(b"PK\x03\x04 this is not really a zip" * 10)
    for call in (lambda: find_hip_member(path, "L"), lambda: probe_hip(path, "R"), lambda: read_image(path, "m")):
        with pytest.raises(DicomError) as exc:
            call()
        assert exc.value.reason == "unreadable_zip" and str(path) in str(exc.value)


def test_corrupt_member_data_is_unreadable_zip(tmp_path):
    data = dicom_bytes(hip_dataset(np.random.default_rng(3).integers(0, 256, (60, 68), dtype=np.uint8)))
    path = tmp_path / "crc.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("m1", data)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # flip pixel bytes: the member's CRC no longer matches
    path.write_bytes(bytes(raw))
    with pytest.raises(DicomError) as exc:
        read_image(path, "m1")
    assert exc.value.reason == "unreadable_zip" and "m1" in str(exc.value)


def test_dicom_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(DicomError("f.zip::m: cut", "unreadable_dicom", member="m")))
    assert isinstance(err, ValueError) and str(err) == "f.zip::m: cut"
    assert (err.reason, err.member) == ("unreadable_dicom", "m")


def test_explicit_vr_hip_reads_the_same(tmp_path):
    arr = smooth_image(20, 30)
    ds = hip_dataset(arr)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    np.testing.assert_array_equal(read_image(write_dicom(tmp_path / "e.dcm", ds)).pixels, arr)


# ---------------------------------------------------------------------------------------------
# Scanner and software identifiers (General Equipment Module), never patient data

GE_IDXA = {
    "Manufacturer": "GE Healthcare",
    "ManufacturerModelName": "Lunar iDXA",
    "DeviceSerialNumber": "200123",
    "SoftwareVersions": ["12.30.008", "enCORE 16"],  # multi-valued: stored as "12.30.008\enCORE 16"
}
DEVICE_FIELDS = ("manufacturer", "manufacturer_model", "device_serial", "software_versions")


def device_dataset(pixels: np.ndarray, protocol: str = "Left Femur", **tags) -> Dataset:
    ds = hip_dataset(pixels, protocol)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JANE", "PID4711", "19500101"
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def device_of(header) -> tuple[str, ...]:
    return tuple(getattr(header, f) for f in DEVICE_FIELDS)


def test_device_fields_read_from_the_header(tmp_path):
    path = write_dicom(tmp_path / "hip.dcm", device_dataset(np.zeros((6, 8), np.uint8), **GE_IDXA))
    header = read_image_header(path)
    assert device_of(header) == ("GE Healthcare", "Lunar iDXA", "200123", "12.30.008\\enCORE 16")
    # the raw element bytes are the backslash-joined values: what the manifest keeps
    assert b"12.30.008\\enCORE 16" in (tmp_path / "hip.dcm").read_bytes()
    # the patient's name, id and birth date are in the file but nowhere in the header
    text = repr(header)
    assert "DOE" not in text and "PID4711" not in text and "19500101" not in text


def test_device_fields_absent_are_empty(tmp_path):
    path = write_dicom(tmp_path / "bare.dcm", hip_dataset(np.zeros((6, 8), np.uint8)))
    assert device_of(read_image_header(path)) == ("", "", "", "")
    # an empty (Type 2) element counts as absent; a single software version has no backslash
    ds = device_dataset(np.zeros((6, 8), np.uint8), Manufacturer="", SoftwareVersions="enCORE 16")
    header = read_image_header(write_dicom(tmp_path / "half.dcm", ds))
    assert device_of(header) == ("", "", "", "enCORE 16")


def test_device_fields_of_a_zip_member(tmp_path):
    px = np.arange(48, dtype=np.uint8).reshape(6, 8)
    path = ukb_zip(
        tmp_path / "9000001_20158_2_0.zip",
        {
            "manifest.cvs": b"x",
            "spine": dicom_bytes(device_dataset(px, "AP Spine", Manufacturer="Other", DeviceSerialNumber="S1")),
            "left": dicom_bytes(device_dataset(px, **GE_IDXA)),
            "right": dicom_bytes(device_dataset(px, "Right Femur")),
        },
    )
    member, header = probe_hip(path, "L")
    assert member == "left"
    assert device_of(header) == ("GE Healthcare", "Lunar iDXA", "200123", "12.30.008\\enCORE 16")
    assert device_of(read_image_header(path, "left")) == device_of(header)
    assert device_of(probe_hip(path, "R")[1]) == ("", "", "", "")  # the other scans' tags never leak in


@pytest.mark.parametrize("name", [MR_SMALL, *sorted(MR_SMALL_VARIANTS)])
def test_device_fields_in_every_transfer_syntax(name):
    # MR_small and its RLE / JPEG-LS / JPEG 2000 / big-endian copies: Toshiba's tags, read by hand
    header = read_image_header(bundled(name))
    assert device_of(header) == ("TOSHIBA_MEC", "MRT50H1", "-0000200", "V3.51*P25")


def test_device_text_from_a_hostile_header(tmp_path):
    with warnings.catch_warnings():  # pydicom warns when writing values an LO may not hold
        warnings.simplefilter("ignore")
        ds = device_dataset(
            np.zeros((6, 8), np.uint8),
            Manufacturer="GE\tHealth\ncare",  # control characters: one field of one line
            DeviceSerialNumber="9" * 5000,
        )
        path = write_dicom(tmp_path / "odd.dcm", ds)
    header = read_image_header(path)
    assert header.manufacturer == "GE Health care"
    assert header.device_serial == "9" * 1024
