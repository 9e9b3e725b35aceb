"""pydicom's bundled test files through hipoa's reader, each with its expected outcome.

The table is the contract: a decoder, plugin or pydicom upgrade that changes how any of these
files reads (decoded, or refused with which reason and message) fails here. Columns: file (under
pydicom's ``data/test_files``), transfer syntax, photometric interpretation, Bits Allocated /
Bits Stored, and the outcome of :func:`hipoa.dicom.read_image` without plausibility limits:
``ok ROWSxCOLS MIN..MAX`` of the decoded pixels (modality LUT applied, MONOCHROME2 sense), or
``reason: the start of the message after the file name``.

pydicom-data (pydicom's larger, downloadable corpus) is not on the package index: its test is
skipped unless the ``pydicom_data`` module imports.
"""

from __future__ import annotations

import os
from pathlib import Path

import pydicom.data
import pytest

from hipoa.dicom import DicomError, read_image

ROOT = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"

CORPUS = [
    ("693_J2KI.dcm", "JPEG 2000 Image Compression", "MONOCHROME2", "16/14", 'ok 512x512 -3995..1812'),
    ("CT_small.dcm", "Explicit VR Little Endian", "MONOCHROME2", "16/16", 'ok 128x128 -896..1167'),
    ("ExplVR_BigEnd.dcm", "Explicit VR Big Endian", "RGB", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("ExplVR_BigEndNoMeta.dcm", "no meta", "-", "-/-", "unreadable_dicom: (0008,0016) SOP Class UID: 'RT Ion Plan Storage'"),
    ("ExplVR_LitEndNoMeta.dcm", "no meta", "-", "-/-", "unreadable_dicom: (0008,0016) SOP Class UID: 'RT Ion Plan Storage'"),
    ("GDCMJ2K_TextGBR.dcm", "JPEG 2000 Image Compression (Lossless Only)", "YBR_RCT", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("J2K_pixelrep_mismatch.dcm", "JPEG 2000 Image Compression (Lossless Only)", "MONOCHROME2", "16/13", 'ok 512x512 -2000..1896'),
    ("JPEG-lossy.dcm", "JPEG Extended (Process 2 and 4)", "MONOCHROME2", "16/12", 'unreadable_dicom: (7FE0,0010) Pixel Data cannot be decoded ((0002,'),
    ("JPEG2000-embedded-sequence-delimiter.dcm", "JPEG 2000 Image Compression", "MONOCHROME2", "16/16", 'unreadable_dicom: (7FE0,0010) Pixel Data cannot be decoded ((0002,'),
    ("JPEG2000.dcm", "JPEG 2000 Image Compression", "MONOCHROME2", "16/16", 'ok 1024x256 -30..245'),
    ("JPEGLSNearLossless_08.dcm", "JPEG-LS Lossy (Near-Lossless) Image Compression", "MONOCHROME2", "8/8", 'unreadable_dicom: no pixel spacing: (0028,0030) Pixel Spacing, (00'),
    ("JPEGLSNearLossless_16.dcm", "JPEG-LS Lossy (Near-Lossless) Image Compression", "MONOCHROME2", "16/16", 'unreadable_dicom: no pixel spacing: (0028,0030) Pixel Spacing, (00'),
    ("JPGExtended.dcm", "JPEG Extended (Process 2 and 4)", "MONOCHROME2", "16/12", 'ok 1024x256 0..264'),
    ("MR_small.dcm", "Explicit VR Little Endian", "MONOCHROME2", "16/16", 'ok 64x64 127..2145'),
    ("MR_small_RLE.dcm", "RLE Lossless", "MONOCHROME2", "16/16", 'ok 64x64 127..2145'),
    ("MR_small_bigendian.dcm", "Explicit VR Big Endian", "MONOCHROME2", "16/16", 'ok 64x64 127..2145'),
    ("MR_small_expb.dcm", "Explicit VR Big Endian", "MONOCHROME2", "16/16", 'ok 64x64 127..2145'),
    ("MR_small_implicit.dcm", "Implicit VR Little Endian", "MONOCHROME2", "16/16", 'ok 64x64 127..2145'),
    ("MR_small_jp2klossless.dcm", "JPEG 2000 Image Compression (Lossless Only)", "MONOCHROME2", "16/16", 'ok 64x64 127..2145'),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless Image Compression", "MONOCHROME2", "16/16", 'ok 64x64 127..2145'),
    ("MR_small_padded.dcm", "Explicit VR Little Endian", "MONOCHROME2", "16/16", 'pixel_data_inconsistent: (7FE0,0010) Pixel Data holds 8,320 bytes, 64 x 6'),
    ("MR_truncated.dcm", "Explicit VR Little Endian", "MONOCHROME2", "16/16", 'unreadable_dicom: unreadable_dicom: (7FE0,0010) Pixel Data holds 8'),
    ("SC_jpeg_no_color_transform.dcm", "JPEG Baseline (Process 1)", "RGB", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_jpeg_no_color_transform_2.dcm", "JPEG Baseline (Process 1)", "RGB", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_dcmtk_+eb+cr.dcm", "JPEG Baseline (Process 1)", "RGB", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "JPEG Baseline (Process 1)", "YBR_FULL", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_dcmtk_+eb+cy+n2.dcm", "JPEG Baseline (Process 1)", "YBR_FULL", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", "JPEG Baseline (Process 1)", "YBR_FULL_422", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_dcmtk_+eb+cy+s2.dcm", "JPEG Baseline (Process 1)", "YBR_FULL_422", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_dcmtk_+eb+cy+s4.dcm", "JPEG Baseline (Process 1)", "YBR_FULL", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_gdcm_KY.dcm", "JPEG 2000 Image Compression", "RGB", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_jls_lossy_line.dcm", "JPEG-LS Lossy (Near-Lossless) Image Compression", "RGB", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_jls_lossy_sample.dcm", "JPEG-LS Lossy (Near-Lossless) Image Compression", "RGB", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_jpeg.dcm", "JPEG Baseline (Process 1)", "RGB", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_jpeg_app14_dcmd.dcm", "JPEG Baseline (Process 1)", "RGB", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_jpeg_dcmd.dcm", "Implicit VR Little Endian", "RGB", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_jpeg_dcmtk.dcm", "JPEG Baseline (Process 1)", "YBR_FULL", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_jpeg_gdcm.dcm", "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])", "RGB", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_jpeg_lossy_gdcm.dcm", "JPEG Baseline (Process 1)", "YBR_FULL", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_rle.dcm", "RLE Lossless", "RGB", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_rle_16bit.dcm", "RLE Lossless", "RGB", "16/16", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_rle_16bit_2frame.dcm", "RLE Lossless", "RGB", "16/16", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_rle_2frame.dcm", "RLE Lossless", "RGB", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_rle_32bit.dcm", "RLE Lossless", "RGB", "32/32", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_rle_32bit_2frame.dcm", "RLE Lossless", "RGB", "32/32", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_small_odd.dcm", "Explicit VR Little Endian", "RGB", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_small_odd_big_endian.dcm", "Explicit VR Big Endian", "RGB", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_rgb_small_odd_jpeg.dcm", "JPEG Baseline (Process 1)", "YBR_FULL", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("SC_ybr_full_422_uncompressed.dcm", "Explicit VR Little Endian", "YBR_FULL_422", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("UN_sequence.dcm", "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])", "-", "-/-", 'unreadable_dicom: (0028,0010) Rows is missing'),
    ("badVR.dcm", "Explicit VR Little Endian", "MONOCHROME2", "32/32", "unreadable_dicom: (0008,0016) SOP Class UID: 'RT Dose Storage' (1."),
    ("empty_charset_LEI.dcm", "Implicit VR Little Endian", "-", "-/-", 'unreadable_dicom: (0028,0010) Rows is missing'),
    ("examples_jpeg2k.dcm", "JPEG 2000 Image Compression (Lossless Only)", "YBR_RCT", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("examples_overlay.dcm", "Explicit VR Little Endian", "MONOCHROME2", "16/12", 'ok 300x484 0..1123'),
    ("examples_palette.dcm", "Explicit VR Little Endian", "PALETTE COLOR", "8/8", 'unreadable_dicom: (0028,0004) Photometric Interpretation: expected'),
    ("examples_rgb_color.dcm", "Explicit VR Little Endian", "RGB", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("examples_ybr_color.dcm", "JPEG Baseline (Process 1)", "YBR_FULL_422", "8/8", 'unreadable_dicom: (0028,0002) Samples per Pixel: colour images are'),
    ("image_dfl.dcm", "Deflated Explicit VR Little Endian", "MONOCHROME2", "8/8", 'unreadable_dicom: no pixel spacing: (0028,0030) Pixel Spacing, (00'),
    ("liver_1frame.dcm", "Explicit VR Little Endian", "MONOCHROME2", "1/1", "unreadable_dicom: (0008,0016) SOP Class UID: 'Segmentation Storage"),
    ("liver_expb_1frame.dcm", "Explicit VR Big Endian", "MONOCHROME2", "1/1", "unreadable_dicom: (0008,0016) SOP Class UID: 'Segmentation Storage"),
    ("meta_missing_tsyntax.dcm", "no meta", "-", "-/-", 'unreadable_dicom: (0028,0010) Rows is missing'),
    ("nested_priv_SQ.dcm", "Implicit VR Little Endian", "-", "-/-", 'unreadable_dicom: (0028,0010) Rows is missing'),
    ("no_meta.dcm", "no meta", "-", "-/-", "unreadable_dicom: not a DICOM file (no 'DICM' prefix at byte 128, "),
    ("no_meta_group_length.dcm", "Implicit VR Little Endian", "-", "-/-", 'unreadable_dicom: (0028,0010) Rows is missing'),
    ("priv_SQ.dcm", "Implicit VR Little Endian", "-", "-/-", 'unreadable_dicom: (0028,0010) Rows is missing'),
    ("reportsi.dcm", "Explicit VR Little Endian", "-", "-/-", "unreadable_dicom: (0008,0016) SOP Class UID: 'Basic Text SR Storag"),
    ("reportsi_with_empty_number_tags.dcm", "Explicit VR Little Endian", "-", "-/-", "unreadable_dicom: (0008,0016) SOP Class UID: 'Basic Text SR Storag"),
    ("rtdose.dcm", "Implicit VR Little Endian", "MONOCHROME2", "32/32", "unreadable_dicom: (0008,0016) SOP Class UID: 'RT Dose Storage' (1."),
    ("rtdose_1frame.dcm", "Implicit VR Little Endian", "MONOCHROME2", "32/32", "unreadable_dicom: (0008,0016) SOP Class UID: 'RT Dose Storage' (1."),
    ("rtdose_expb.dcm", "Explicit VR Big Endian", "MONOCHROME2", "32/32", "unreadable_dicom: (0008,0016) SOP Class UID: 'RT Dose Storage' (1."),
    ("rtdose_expb_1frame.dcm", "Explicit VR Big Endian", "MONOCHROME2", "32/32", "unreadable_dicom: (0008,0016) SOP Class UID: 'RT Dose Storage' (1."),
    ("rtdose_rle.dcm", "RLE Lossless", "MONOCHROME2", "32/32", "unreadable_dicom: (0008,0016) SOP Class UID: 'RT Dose Storage' (1."),
    ("rtdose_rle_1frame.dcm", "RLE Lossless", "MONOCHROME2", "32/32", "unreadable_dicom: (0008,0016) SOP Class UID: 'RT Dose Storage' (1."),
    ("rtplan.dcm", "Implicit VR Little Endian", "-", "-/-", "unreadable_dicom: (0008,0016) SOP Class UID: 'RT Plan Storage' (1."),
    ("rtplan_truncated.dcm", "Implicit VR Little Endian", "-", "-/-", "unreadable_dicom: (0008,0016) SOP Class UID: 'RT Plan Storage' (1."),
    ("rtstruct.dcm", "no meta", "-", "-/-", "unreadable_dicom: (0008,0016) SOP Class UID: 'RT Structure Set Sto"),
    ("test-SR.dcm", "Explicit VR Little Endian", "-", "-/-", "unreadable_dicom: (0008,0016) SOP Class UID: 'Comprehensive SR Sto"),
    ("waveform_ecg.dcm", "Explicit VR Little Endian", "-", "-/-", "unreadable_dicom: (0008,0016) SOP Class UID: '12-lead ECG Waveform"),
    ("dicomdirtests/77654033/CR1/6154", "Explicit VR Little Endian", "MONOCHROME1", "16/12", 'ok 16x16 884.412..1437.08'),
    ("dicomdirtests/DICOMDIR", "Explicit VR Little Endian", "-", "-/-", "unreadable_dicom: (0002,0002) Media Storage SOP Class UID: 'Media "),
]


def outcome(path: Path) -> str:
    try:
        img = read_image(path)
    except DicomError as exc:
        return f"{exc.reason}: {str(exc)[len(str(path)) + 2:]}"
    return f"ok {img.pixels.shape[0]}x{img.pixels.shape[1]} {img.pixels.min():g}..{img.pixels.max():g}"


def test_the_table_covers_every_bundled_file():
    bundled = {p.name for p in ROOT.glob("*.dcm")}
    assert bundled <= {row[0] for row in CORPUS}, sorted(bundled - {row[0] for row in CORPUS})


@pytest.mark.parametrize("name, syntax, photometric, bits, expected", CORPUS, ids=[row[0] for row in CORPUS])
def test_bundled_file_outcome(name, syntax, photometric, bits, expected):
    got = outcome(ROOT / name)
    if expected.startswith("ok "):
        assert got == expected
    else:
        assert got.startswith(expected), got


def test_pydicom_data_files_never_crash_the_reader():
    pydicom_data = pytest.importorskip("pydicom_data", reason="pydicom-data is not installed (not on PyPI)")
    files = sorted(Path(pydicom_data.__file__).parent.rglob("*.dcm"))
    assert files
    for path in files:
        outcome(path)  # decoded or a DicomError naming file and tag; anything else raises here
