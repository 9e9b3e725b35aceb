"""Reading hip DXA images from DICOM files and UK Biobank zips.

A UKB field-20158 zip holds several DICOM files (hips, spine, total body, ...) and a text
``manifest.cvs``. The hip is found by ``(0018,1030) Protocol Name`` (``Left Femur`` /
``Right Femur``), falling back to ``(0040,0254) Performed Procedure Step Description``; members are
read straight from the zip with :mod:`zipfile`, never unpacked to disk.

Pixels come back as float32 in the sense of MONOCHROME2 (bright = dense), after this order of
operations (DICOM PS3.4 N.2, the grayscale pipeline):

1. the stored values are decoded by pydicom's pixel API (native, RLE Lossless, JPEG baseline /
   extended / lossless, JPEG-LS, JPEG 2000 through the pylibjpeg / pyjpegls plugins);
2. the modality LUT: ``(0028,3000) Modality LUT Sequence`` if present, else
   ``value * (0028,1053) Rescale Slope + (0028,1052) Rescale Intercept`` (PS3.3 C.11.1);
3. photometric interpretation: ``MONOCHROME1`` images are inverted as
   ``max_possible - value`` (see :func:`read_image`).

Pixel spacing (row spacing dy, column spacing dx) in mm is ``(0028,0030) Pixel Spacing``, else
``(0018,1164) Imager Pixel Spacing``, else it is derived from ``(0040,0303) Exposed Area``
``[width_mm, height_mm]`` as ``(height_mm / Rows, width_mm / Columns)``: GE Lunar iDXA exports in
UK Biobank carry no Pixel Spacing.

Every :class:`DicomError` names the file (``path.zip::member`` for zip members), the tag as
``(gggg,eeee) Name`` and the value received, and carries a machine-readable ``reason``
(``unreadable_zip``, ``no_hip_dicom`` or ``unreadable_dicom``) that ingest stores as ``qc_reason``.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_description
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.tag import Tag

log = logging.getLogger(__name__)

SIDE_PROTOCOLS: dict[str, str] = {"L": "Left Femur", "R": "Right Femur"}
"""ProtocolName of each side's hip scan in UKB iDXA exports (compared case/space-insensitively)."""

UNREADABLE_ZIP = "unreadable_zip"
NO_HIP_DICOM = "no_hip_dicom"
UNREADABLE_DICOM = "unreadable_dicom"

_PROTOCOL_TAGS = (0x00181030, 0x00400254)  # ProtocolName, PerformedProcedureStepDescription
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_DICM_OFFSET = 128


class DicomError(ValueError):
    """A DICOM (or the zip holding it) that cannot be used.

    The message names the file (``path.zip::member`` for zip members), the tag as
    ``(gggg,eeee) Name`` and the value received.

    Attributes:
        reason: Machine-readable cause, one of ``"unreadable_zip"``, ``"no_hip_dicom"``,
            ``"unreadable_dicom"``; ingest stores it as the manifest's ``qc_reason``.
        member: The zip member at fault when one was identified (set by :func:`probe_hip`),
            else ``""``.
    """

    def __init__(self, message: str, reason: str = UNREADABLE_DICOM, member: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.member = member

    def __reduce__(self):  # keep ``reason`` and ``member`` across process pools
        return (type(self), (str(self), self.reason, self.member))


@dataclass
class HipImage:
    """A decoded hip image.

    Attributes:
        pixels: ``(rows, cols)`` float32, modality LUT applied, MONOCHROME2 sense (bright = bone).
        spacing_mm: ``(row spacing dy, column spacing dx)`` in mm.
        protocol: ``(0018,1030) Protocol Name`` (or the step description it fell back to).
        source: ``"path"`` or ``"path.zip::member"``.
    """

    pixels: np.ndarray
    spacing_mm: tuple[float, float]
    protocol: str
    source: str


@dataclass(frozen=True)
class ImageHeader:
    """What ingest needs from a hip DICOM, read without decoding the pixels.

    Attributes:
        rows: ``(0028,0010) Rows``.
        cols: ``(0028,0011) Columns``.
        spacing_mm: ``(row spacing dy, column spacing dx)`` in mm, see :func:`pixel_spacing`.
        protocol: Protocol name, ``""`` if absent.
        source: ``"path"`` or ``"path.zip::member"``.
    """

    rows: int
    cols: int
    spacing_mm: tuple[float, float]
    protocol: str
    source: str


def tag_name(tag: int) -> str:
    """``(gggg,eeee) Name`` as pydicom's dictionary spells it, e.g. ``(0028,0030) Pixel Spacing``."""
    t = Tag(tag)
    try:
        name = dictionary_description(t)
    except KeyError:
        name = "Unknown"
    return f"({t.group:04X},{t.element:04X}) {name}"


def source_name(image: str | Path, member: str | None = None) -> str:
    """``"path"`` or ``"path.zip::member"``: how errors and manifests name an image."""
    return f"{image}::{member}" if member else str(image)


def _norm(text: object) -> str:
    return " ".join(str(text).split()).lower()


def _side_key(side: str) -> str:
    key = str(side).strip().upper()
    if key not in SIDE_PROTOCOLS:
        raise ValueError(f"side must be 'L' or 'R', got {side!r}")
    return key


def protocol_of(ds: Dataset) -> str:
    """``(0018,1030) Protocol Name``, else ``(0040,0254) Performed Procedure Step Description``, else ``""``."""
    for tag in _PROTOCOL_TAGS:
        elem = ds.get(tag)
        if elem is not None and elem.value not in (None, ""):
            return str(elem.value).strip()
    return ""


def side_of_protocol(protocol: str) -> str | None:
    """``"L"``/``"R"`` if ``protocol`` is a hip protocol (``Left Femur``/``Right Femur``), else None."""
    p = _norm(protocol)
    for side, name in SIDE_PROTOCOLS.items():
        if p == _norm(name):
            return side
    return None


# ---------------------------------------------------------------------------------------------
# Opening files and zip members


def _open_zip(zip_path: str | Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, zlib.error, EOFError, ValueError) as exc:
        raise DicomError(f"{zip_path}: cannot open as a zip: {exc}", UNREADABLE_ZIP) from None


def _read_member(zf: zipfile.ZipFile, zip_path: str | Path, member: str) -> bytes:
    """All bytes of ``member`` (the CRC is checked once the member is read to its end)."""
    try:
        return zf.read(member)
    except KeyError:
        raise DicomError(f"{source_name(zip_path, member)}: no such member in the zip", UNREADABLE_ZIP) from None
    except (zipfile.BadZipFile, OSError, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise DicomError(f"{source_name(zip_path, member)}: cannot read from the zip: {exc}", UNREADABLE_ZIP) from None


def _looks_like_dicom(head: bytes) -> bool:
    """True for a Part 10 file (``DICM`` at byte 128) or a raw dataset starting at group 0002/0008."""
    if len(head) >= _DICM_OFFSET + 4 and head[_DICM_OFFSET : _DICM_OFFSET + 4] == b"DICM":
        return True
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3:4] == b"\x00"


def _dcmread(fp, source: str, *, stop_before_pixels: bool) -> Dataset:
    """``pydicom.dcmread`` with every failure turned into a :class:`DicomError` naming ``source``."""
    head = fp.read(_DICM_OFFSET + 4)
    fp.seek(0)
    if not _looks_like_dicom(head):
        raise DicomError(f"{source}: not a DICOM file (no 'DICM' prefix at byte 128, got {head[:16]!r}...)")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, force=True)
    except (zipfile.BadZipFile, zlib.error):
        raise  # a damaged zip member, not a damaged DICOM: the caller reports unreadable_zip
    except Exception as exc:  # noqa: BLE001 - any parser failure makes the file unreadable
        raise DicomError(f"{source}: DICOM header cannot be parsed: {type(exc).__name__}: {exc}") from None
    for w in caught:
        log.debug("%s: pydicom: %s", source, w.message)
    if not stop_before_pixels and any("before delimiter" in str(w.message) for w in caught):
        raise DicomError(
            f"{source}: {tag_name(0x7FE00010)}: encapsulated pixel data ends before its "
            "sequence delimiter (file truncated)"
        )
    return ds


def _read_bytes(image: str | Path, member: str | None) -> bytes:
    if member is None:
        if str(image).lower().endswith(".zip"):
            raise ValueError(f"{image}: a zip needs a member (see find_hip_member)")
        try:
            return Path(image).read_bytes()
        except OSError as exc:
            raise DicomError(f"{image}: cannot read: {exc}") from None
    with _open_zip(image) as zf:
        return _read_member(zf, image, member)


def read_header(image: str | Path, member: str | None = None) -> Dataset:
    """Read a DICOM header without its pixel data.

    Args:
        image: A ``.dcm`` file, or a zip when ``member`` is given.
        member: Name of the DICOM inside the zip; it is read from the zip, never unpacked to disk.

    Returns:
        The dataset, read with ``stop_before_pixels=True``.

    Raises:
        DicomError: the zip or the header cannot be read (``reason`` says which).
    """
    source = source_name(image, member)
    if member is None:
        if str(image).lower().endswith(".zip"):
            raise ValueError(f"{image}: a zip needs a member (see find_hip_member)")
        try:
            with open(image, "rb") as fp:
                return _dcmread(fp, source, stop_before_pixels=True)
        except OSError as exc:
            raise DicomError(f"{source}: cannot read: {exc}") from None
    with _open_zip(image) as zf:
        try:
            with zf.open(member) as fp:
                return _dcmread(fp, source, stop_before_pixels=True)
        except KeyError:
            raise DicomError(f"{source}: no such member in the zip", UNREADABLE_ZIP) from None
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
            raise DicomError(f"{source}: cannot read from the zip: {exc}", UNREADABLE_ZIP) from None


# ---------------------------------------------------------------------------------------------
# Finding the hip in a zip


def _scan_hips(zf: zipfile.ZipFile, zip_path: str | Path) -> tuple[dict[str, str], list[str]]:
    """One pass over the members: ``({side: member}, [unparsable DICOM members])``."""
    found: dict[str, str] = {}
    broken: list[str] = []
    for info in zf.infolist():
        if info.is_dir():
            continue
        source = source_name(zip_path, info.filename)
        try:
            with zf.open(info) as fp:
                head = fp.read(_DICM_OFFSET + 4)
                if not _looks_like_dicom(head):
                    log.debug("%s: not DICOM, skipped", source)
                    continue
                fp.seek(0)
                ds = _dcmread(fp, source, stop_before_pixels=True)
        except DicomError as exc:
            log.debug("%s", exc)
            broken.append(info.filename)
            continue
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
            raise DicomError(f"{source}: cannot read from the zip: {exc}", UNREADABLE_ZIP) from None
        side = side_of_protocol(protocol_of(ds))
        if side is None:
            continue
        if side in found:
            log.warning(
                "%s: two %s scans (%s and %s); using the first",
                zip_path, SIDE_PROTOCOLS[side], found[side], info.filename,
            )
            continue
        found[side] = info.filename
    return found, broken


def hip_members(zip_path: str | Path) -> dict[str, str]:
    """Find both hips of a zip in one pass over its members' headers.

    Non-DICOM members (``manifest.cvs``) and DICOMs whose header cannot be parsed are skipped.

    Args:
        zip_path: A UKB field-20158 zip.

    Returns:
        ``{"L": member, "R": member}`` for the sides present (possibly empty).

    Raises:
        DicomError: ``reason="unreadable_zip"`` if the zip cannot be opened or read.
    """
    with _open_zip(zip_path) as zf:
        return _scan_hips(zf, zip_path)[0]


def _missing_hip_error(zip_path: str | Path, side: str, broken: Sequence[str]) -> DicomError:
    want = SIDE_PROTOCOLS[side]
    if broken:
        # The hip may be among the members whose header could not be read.
        return DicomError(
            f"{zip_path}: no member with {tag_name(0x00181030)} {want!r}, and "
            f"{len(broken)} DICOM member(s) cannot be parsed: {', '.join(broken)}",
            UNREADABLE_DICOM,
        )
    return DicomError(
        f"{zip_path}: no_hip_dicom: no member with {tag_name(0x00181030)} (or "
        f"{tag_name(0x00400254)}) {want!r}",
        NO_HIP_DICOM,
    )


def find_hip_member(zip_path: str | Path, side: str) -> str:
    """Name of the zip member holding the hip scan of ``side``.

    Args:
        zip_path: A UKB field-20158 zip.
        side: ``"L"`` (``Left Femur``) or ``"R"`` (``Right Femur``).

    Returns:
        The member name.

    Raises:
        DicomError: ``reason="no_hip_dicom"`` when no member carries that side's protocol,
            ``"unreadable_dicom"`` when none does but some DICOM member cannot be parsed,
            ``"unreadable_zip"`` when the zip cannot be read.
    """
    key = _side_key(side)
    with _open_zip(zip_path) as zf:
        found, broken = _scan_hips(zf, zip_path)
    if key not in found:
        raise _missing_hip_error(zip_path, key, broken)
    return found[key]


# ---------------------------------------------------------------------------------------------
# Header checks and spacing


def _positive_pair(value: object) -> tuple[float, float] | None:
    """Two positive finite floats from a multi-valued element, or None."""
    items = value if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]
    try:
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        return None
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        return None
    return values[0], values[1]


def _present(ds: Dataset, tag: int) -> bool:
    elem = ds.get(tag)
    return elem is not None and elem.value not in (None, "", b"") and not (
        isinstance(elem.value, (list, tuple)) and len(elem.value) == 0
    )


def _int_tag(ds: Dataset, tag: int, source: str) -> int:
    if not _present(ds, tag):
        raise DicomError(f"{source}: {tag_name(tag)} is missing")
    value = ds[tag].value
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise DicomError(f"{source}: {tag_name(tag)} is not an integer: {value!r}") from None
    return n


def pixel_spacing(ds: Dataset, source: str) -> tuple[float, float]:
    """Pixel spacing ``(row spacing dy, column spacing dx)`` in mm.

    Precedence: ``(0028,0030) Pixel Spacing``, then ``(0018,1164) Imager Pixel Spacing`` (both
    ``[row spacing, column spacing]``, PS3.3 10.7.1.3), then ``(0040,0303) Exposed Area``
    ``[width_mm, height_mm]`` with ``(0028,0010) Rows`` and ``(0028,0011) Columns``, giving
    ``(height_mm / Rows, width_mm / Columns)``: UKB's iDXA hips have ExposedArea ``[170, 150]`` over
    600 rows x 680 columns, 0.25 mm each way. An empty (Type 2) element counts as absent.

    Args:
        ds: The dataset (a header is enough).
        source: Name of the file for error messages.

    Returns:
        ``(dy, dx)`` in mm, positive and finite.

    Raises:
        DicomError: a spacing tag holds something other than two positive finite numbers, or no
            spacing tag is present.
    """
    for tag in (0x00280030, 0x00181164):
        if _present(ds, tag):
            value = ds[tag].value
            pair = _positive_pair(value)
            if pair is None:
                raise DicomError(f"{source}: {tag_name(tag)}: expected 2 positive numbers, got {value!r}")
            return pair
    if _present(ds, 0x00400303):
        value = ds[0x00400303].value
        pair = _positive_pair(value)
        if pair is None:
            raise DicomError(
                f"{source}: {tag_name(0x00400303)}: expected [width_mm, height_mm], 2 positive numbers, got {value!r}"
            )
        width_mm, height_mm = pair
        rows = _int_tag(ds, 0x00280010, source)
        cols = _int_tag(ds, 0x00280011, source)
        if rows <= 0 or cols <= 0:
            raise DicomError(
                f"{source}: {tag_name(0x00280010)} x {tag_name(0x00280011)} must be positive, got {rows} x {cols}"
            )
        return height_mm / rows, width_mm / cols
    raise DicomError(
        f"{source}: no pixel spacing: {tag_name(0x00280030)}, {tag_name(0x00181164)} and "
        f"{tag_name(0x00400303)} are all missing or empty"
    )


def _check_image_header(ds: Dataset, source: str) -> tuple[int, int]:
    """Validate what :func:`read_image` needs from the header; returns ``(rows, cols)``."""
    rows = _int_tag(ds, 0x00280010, source)
    cols = _int_tag(ds, 0x00280011, source)
    if rows <= 0 or cols <= 0:
        raise DicomError(
            f"{source}: {tag_name(0x00280010)} x {tag_name(0x00280011)} must be positive, got {rows} x {cols}"
        )
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1:
        raise DicomError(f"{source}: {tag_name(0x00280002)}: colour images are not hip DXAs, got {spp}")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _MONOCHROME:
        raise DicomError(
            f"{source}: {tag_name(0x00280004)}: expected MONOCHROME1 or MONOCHROME2, got {photometric!r}"
        )
    frames_value = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames_value if frames_value not in (None, "") else 1)
    except (TypeError, ValueError):
        raise DicomError(f"{source}: {tag_name(0x00280008)} is not an integer: {frames_value!r}") from None
    if frames != 1:
        raise DicomError(f"{source}: {tag_name(0x00280008)}: expected a single frame, got {frames}")
    allocated = _int_tag(ds, 0x00280100, source)
    if allocated not in (8, 16):
        raise DicomError(f"{source}: {tag_name(0x00280100)}: expected 8 or 16, got {allocated}")
    stored = int(ds.get("BitsStored", allocated) or allocated)
    if not 1 <= stored <= allocated:
        raise DicomError(f"{source}: {tag_name(0x00280101)}: expected 1..{allocated}, got {stored}")
    return rows, cols


def _check_pixel_data(ds: Dataset, source: str, rows: int, cols: int) -> None:
    """Detect missing or truncated pixel data without decoding it."""
    if "PixelData" not in ds:
        raise DicomError(f"{source}: {tag_name(0x7FE00010)} is missing (file truncated?)")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    ts = ts or pydicom.uid.ImplicitVRLittleEndian
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DicomError(f"{source}: (0002,0010) Transfer Syntax UID: no pixel decoder for {ts!r}") from None
    if not decoder.is_available:
        raise DicomError(
            f"{source}: (0002,0010) Transfer Syntax UID: {ts!r} needs a pixel plugin that is not installed"
        )
    data = ds.PixelData
    if ts.is_compressed:
        if len(data) < 16:
            raise DicomError(f"{source}: {tag_name(0x7FE00010)}: {len(data)} bytes of encapsulated data (truncated)")
        return
    expected = rows * cols * (int(ds.BitsAllocated) // 8)
    if len(data) < expected:
        raise DicomError(
            f"{source}: unreadable_dicom: {tag_name(0x7FE00010)} holds {len(data)} bytes, "
            f"{rows} x {cols} x {int(ds.BitsAllocated)} bits need {expected} (file truncated)"
        )


def read_image_header(image: str | Path, member: str | None = None, *, data: bytes | None = None) -> ImageHeader:
    """Everything :func:`read_image` checks, without decoding the pixels (what ingest uses).

    Reads the whole file (or zip member, CRC-checked) but only parses it: Rows, Columns, spacing,
    single-frame monochrome 8/16-bit, a decoder available for the transfer syntax, and pixel data
    present and not truncated (native: at least ``Rows x Columns x BitsAllocated / 8`` bytes;
    encapsulated: the sequence delimiter reached).

    Args:
        image: A ``.dcm`` file or a zip.
        member: The DICOM's name in the zip, if ``image`` is a zip.
        data: The file's bytes when the caller has read them already.

    Returns:
        An :class:`ImageHeader`.

    Raises:
        DicomError: anything :func:`read_image` would reject before decoding.
    """
    source = source_name(image, member)
    if data is None:
        data = _read_bytes(image, member)
    ds = _dcmread(io.BytesIO(data), source, stop_before_pixels=False)
    rows, cols = _check_image_header(ds, source)
    spacing = pixel_spacing(ds, source)
    _check_pixel_data(ds, source, rows, cols)
    return ImageHeader(rows=rows, cols=cols, spacing_mm=spacing, protocol=protocol_of(ds), source=source)


def probe_hip(zip_path: str | Path, side: str) -> tuple[str, ImageHeader]:
    """Find ``side``'s hip in a zip and check its header and pixel-data length, in one open.

    Args:
        zip_path: A UKB field-20158 zip.
        side: ``"L"`` or ``"R"``.

    Returns:
        ``(member, header)``.

    Raises:
        DicomError: with ``reason`` ``unreadable_zip``, ``no_hip_dicom`` or ``unreadable_dicom``;
            ``member`` names the hip member when it was found but cannot be used.
    """
    key = _side_key(side)
    with _open_zip(zip_path) as zf:
        found, broken = _scan_hips(zf, zip_path)
        if key not in found:
            raise _missing_hip_error(zip_path, key, broken)
        member = found[key]
        try:
            data = _read_member(zf, zip_path, member)
        except DicomError as exc:
            exc.member = member
            raise
    try:
        return member, read_image_header(zip_path, member, data=data)
    except DicomError as exc:
        exc.member = member
        raise


# ---------------------------------------------------------------------------------------------
# Pixels


def _max_possible(ds: Dataset) -> float:
    """Largest value the modality LUT can output for this header's stored-value range."""
    stored = int(ds.get("BitsStored", ds.BitsAllocated) or ds.BitsAllocated)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        lo, hi = -(2 ** (stored - 1)), 2 ** (stored - 1) - 1
    else:
        lo, hi = 0, 2**stored - 1
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        values = np.arange(lo, hi + 1, dtype=np.int64)  # a LUT need not be monotonic
    else:
        values = np.array([lo, hi], dtype=np.int64)  # a rescale is linear: the ends suffice
    return float(np.max(apply_modality_lut(values, ds)))


def read_image(image: str | Path, member: str | None = None) -> HipImage:
    """Decode a hip DICOM into float pixels and its spacing.

    Order of operations (PS3.4 N.2): decode the stored values (pydicom's pixel API: native,
    RLE Lossless, JPEG baseline / extended / lossless, JPEG-LS, JPEG 2000), then the modality LUT
    (``(0028,3000) Modality LUT Sequence``, else ``value * (0028,1053) Rescale Slope +
    (0028,1052) Rescale Intercept``), then ``(0028,0004) Photometric Interpretation``:
    ``MONOCHROME1`` pixels are inverted as ``max_possible - value``, where ``max_possible`` is the
    largest modality-LUT output over the stored range of ``(0028,0101) Bits Stored`` and
    ``(0028,0103) Pixel Representation`` (e.g. 4095 for unsigned 12-bit data with no rescale), so
    that bright means dense and unsigned data stays non-negative.

    Args:
        image: A ``.dcm`` file, or a zip when ``member`` is given (read without unpacking).
        member: The DICOM's name in the zip.

    Returns:
        A :class:`HipImage` with ``(rows, cols)`` float32 pixels.

    Raises:
        DicomError: unreadable zip or header, missing spacing, colour or multi-frame images,
            bit depth other than 8/16 allocated, truncated or undecodable pixel data.
    """
    source = source_name(image, member)
    data = _read_bytes(image, member)
    ds = _dcmread(io.BytesIO(data), source, stop_before_pixels=False)
    rows, cols = _check_image_header(ds, source)
    spacing = pixel_spacing(ds, source)
    _check_pixel_data(ds, source, rows, cols)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure makes the image unreadable
        raise DicomError(
            f"{source}: unreadable_dicom: {tag_name(0x7FE00010)} cannot be decoded: {type(exc).__name__}: {exc}"
        ) from None
    if stored.shape != (rows, cols):
        raise DicomError(
            f"{source}: {tag_name(0x7FE00010)} decodes to shape {stored.shape}, header says ({rows}, {cols})"
        )
    # No float64 copy of the whole image when there is no rescale (UKB's 8-bit data): converting
    # integers straight to float32 is exact and halves read time (benchmarks/crop.py).
    values = np.asarray(apply_modality_lut(stored, ds))
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        values = _max_possible(ds) - values.astype(np.float64)
    return HipImage(
        pixels=values.astype(np.float32),
        spacing_mm=spacing,
        protocol=protocol_of(ds),
        source=source,
    )
