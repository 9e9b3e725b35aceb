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

The scanner is identified by the General Equipment Module (PS3.3 C.7.5.1): ``(0008,0070)
Manufacturer``, ``(0008,1090) Manufacturer's Model Name``, ``(0018,1000) Device Serial Number`` and
``(0018,1020) Software Versions`` (:data:`DEVICE_TAGS`, in :class:`ImageHeader`). No patient tag
is kept.

Every :class:`DicomError` names the file (``path.zip::member`` for zip members), the tag as
``(gggg,eeee) Name`` and the value received, and carries a machine-readable ``reason`` from
:data:`hipoa.qc.REASONS` that ingest stores as ``qc_reason``.

Hostile files cost no more than the caps of :class:`hipoa.qc.Limits`: paths that are not regular
files are never opened (``not_a_file``); a zip with too many members, a member or file over
``max_member_mb`` (declared or inflated) and a header whose Rows x Columns x Samples exceed
``max_image_pixels`` are ``image_too_large`` before anything is decoded; header scans skip
elements over 1 MiB instead of reading them. Two members with the side's protocol are
``ambiguous_hip_dicom``: none is picked.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import stat
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
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.tag import Tag

from hipoa.qc import (
    AMBIGUOUS_HIP_DICOM,
    IMAGE_TOO_LARGE,
    IMPLAUSIBLE_IMAGE_SIZE,
    IMPLAUSIBLE_SPACING,
    NO_HIP_DICOM,
    NOT_A_FILE,
    UNREADABLE_DICOM,
    UNREADABLE_ZIP,
    Limits,
)

log = logging.getLogger(__name__)

SIDE_PROTOCOLS: dict[str, str] = {"L": "Left Femur", "R": "Right Femur"}
"""ProtocolName of each side's hip scan in UKB iDXA exports (compared case/space-insensitively)."""

DEFAULT_LIMITS = Limits()
_HEADER_DEFER = 1 << 20  # header elements larger than this are skipped, not read into memory

_PROTOCOL_TAGS = (0x00181030, 0x00400254)  # ProtocolName, PerformedProcedureStepDescription
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_DICM_OFFSET = 128


class DicomError(ValueError):
    """A DICOM (or the zip holding it) that cannot be used.

    The message names the file (``path.zip::member`` for zip members), the tag as
    ``(gggg,eeee) Name`` and the value received.

    Attributes:
        reason: Machine-readable cause, a key of :data:`hipoa.qc.REASONS`; ingest stores it as
            the manifest's ``qc_reason``.
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
        max_value: The top of the pixel range: the largest value the modality LUT can give over
            the stored range (255 for UKB's 8-bit data); NaN when unknown.
    """

    pixels: np.ndarray
    spacing_mm: tuple[float, float]
    protocol: str
    source: str
    max_value: float = float("nan")


@dataclass(frozen=True)
class ImageHeader:
    """What ingest needs from a hip DICOM, read without decoding the pixels.

    The four device fields identify the scanner and its software (covariates for a GWAS, see
    :data:`DEVICE_TAGS`); they are equipment data, and no patient tag is read into the header.

    Attributes:
        rows: ``(0028,0010) Rows``.
        cols: ``(0028,0011) Columns``.
        spacing_mm: ``(row spacing dy, column spacing dx)`` in mm, see :func:`pixel_spacing`.
        protocol: Protocol name, ``""`` if absent.
        source: ``"path"`` or ``"path.zip::member"``.
        manufacturer: ``(0008,0070) Manufacturer``, ``""`` if absent.
        manufacturer_model: ``(0008,1090) Manufacturer's Model Name``, ``""`` if absent.
        device_serial: ``(0018,1000) Device Serial Number``, ``""`` if absent.
        software_versions: ``(0018,1020) Software Versions``, its values joined by ``\\`` as
            DICOM encodes a multi-valued element, ``""`` if absent.
    """

    rows: int
    cols: int
    spacing_mm: tuple[float, float]
    protocol: str
    source: str
    manufacturer: str = ""
    manufacturer_model: str = ""
    device_serial: str = ""
    software_versions: str = ""


DEVICE_TAGS: dict[str, int] = {
    "manufacturer": 0x00080070,  # (0008,0070) Manufacturer, LO
    "manufacturer_model": 0x00081090,  # (0008,1090) Manufacturer's Model Name, LO
    "device_serial": 0x00181000,  # (0018,1000) Device Serial Number, LO
    "software_versions": 0x00181020,  # (0018,1020) Software Versions, LO, VM 1-n
}
""":class:`ImageHeader` field -> the General Equipment Module tag it is read from (PS3.3 C.7.5.1)."""

_DEVICE_TEXT_MAX = 1024  # LO values are at most 64 characters (PS3.5 6.2); a hostile header stays small
_CONTROL_TO_SPACE = {c: " " for c in (*range(32), 127)}  # NUL padding, tab, CR, LF: not allowed in LO


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


def _stat_problem(path: str | Path) -> tuple[str, os.stat_result | None]:
    """``("", stat)`` for a regular file (links followed), else ``(what it is instead, stat or None)``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "no such file" + (" (a broken link)" if os.path.islink(path) else ""), None
    except OSError as exc:
        return f"cannot stat: {exc.strerror or exc}", None
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return "", st
    if stat.S_ISDIR(mode):
        return "is a directory", st
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe)", st
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device", st
    if stat.S_ISSOCK(mode):
        return "is a socket", st
    return "is not a regular file", st


def regular_file_problem(path: str | Path) -> str:
    """``""`` when ``path`` is a regular file (links followed), else what it is instead.

    Checked with ``os.stat`` only, so a FIFO or a device is never opened (opening a FIFO for
    reading blocks until a writer appears).
    """
    return _stat_problem(path)[0]


def _check_file(path: str | Path, limits: Limits) -> None:
    """Raise ``not_a_file`` / ``image_too_large`` before anything opens ``path`` (one ``stat``)."""
    problem, st = _stat_problem(path)
    if problem == "no such file":  # a manifest naming a file that is not there (yet)
        is_zip = str(path).lower().endswith(".zip")
        raise DicomError(f"{path}: no such file", UNREADABLE_ZIP if is_zip else UNREADABLE_DICOM)
    if problem:
        raise DicomError(f"{path}: {problem}, expected a regular file", NOT_A_FILE)
    if not str(path).lower().endswith(".zip") and st.st_size > limits.max_member_bytes:
        raise DicomError(
            f"{path}: {st.st_size:,} bytes, over the cap of {limits.max_member_bytes:,} (qc.max_member_mb)",
            IMAGE_TOO_LARGE,
        )


def _open_zip(zip_path: str | Path, limits: Limits = DEFAULT_LIMITS) -> zipfile.ZipFile:
    _check_file(zip_path, limits)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, zlib.error, EOFError, ValueError) as exc:
        raise DicomError(f"{zip_path}: cannot open as a zip: {exc}", UNREADABLE_ZIP) from None
    n = sum(1 for info in zf.infolist() if not info.is_dir())
    if n > limits.max_zip_members:
        zf.close()
        raise DicomError(
            f"{zip_path}: {n} members, over the cap of {limits.max_zip_members} (qc.max_zip_members)",
            IMAGE_TOO_LARGE,
        )
    return zf


def _read_member(zf: zipfile.ZipFile, zip_path: str | Path, member: str, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """All bytes of ``member``, at most ``limits.max_member_bytes`` of them (declared and inflated).

    The CRC is checked once the member is read to its end.
    """
    source = source_name(zip_path, member)
    cap = limits.max_member_bytes
    try:
        info = zf.getinfo(member)
        if info.file_size > cap:
            raise DicomError(
                f"{source}: declares {info.file_size:,} bytes inflated ({info.compress_size:,} compressed), "
                f"over the cap of {cap:,} (qc.max_member_mb)",
                IMAGE_TOO_LARGE,
            )
        with zf.open(info) as fp:
            data = fp.read(cap + 1)
            if len(data) > cap:
                raise DicomError(f"{source}: inflates past the cap of {cap:,} bytes (qc.max_member_mb)", IMAGE_TOO_LARGE)
            return data
    except KeyError:
        raise DicomError(f"{source}: no such member in the zip", UNREADABLE_ZIP) from None
    except (zipfile.BadZipFile, OSError, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise DicomError(f"{source}: cannot read from the zip: {exc}", UNREADABLE_ZIP) from None


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
            ds = pydicom.dcmread(
                fp,
                stop_before_pixels=stop_before_pixels,
                force=True,
                # a header scan never holds a huge element (e.g. a padded private tag) in memory
                defer_size=_HEADER_DEFER if stop_before_pixels else None,
            )
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


def _read_bytes(image: str | Path, member: str | None, limits: Limits = DEFAULT_LIMITS) -> bytes:
    if member is None:
        if str(image).lower().endswith(".zip"):
            raise ValueError(f"{image}: a zip needs a member (see find_hip_member)")
        _check_file(image, limits)
        try:
            return Path(image).read_bytes()
        except OSError as exc:
            raise DicomError(f"{image}: cannot read: {exc}") from None
    with _open_zip(image, limits) as zf:
        return _read_member(zf, image, member, limits)


# ---------------------------------------------------------------------------------------------
# Finding the hip in a zip


def _scan_hips(zf: zipfile.ZipFile, zip_path: str | Path) -> tuple[dict[str, list[str]], list[str]]:
    """One pass over the members: ``({side: [members]}, [unparsable DICOM members])``."""
    found: dict[str, list[str]] = {}
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
        if side is not None:
            found.setdefault(side, []).append(info.filename)
    return found, broken


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


def _the_hip(found: dict[str, list[str]], broken: Sequence[str], zip_path: str | Path, side: str) -> str:
    """The one member of ``side``, or the DicomError saying why there is not exactly one."""
    members = found.get(side, [])
    if not members:
        raise _missing_hip_error(zip_path, side, broken)
    if len(members) > 1:
        raise DicomError(
            f"{zip_path}: {len(members)} members have {tag_name(0x00181030)} {SIDE_PROTOCOLS[side]!r}: "
            f"{', '.join(members)}; none is picked",
            AMBIGUOUS_HIP_DICOM,
        )
    return members[0]


def find_hip_member(zip_path: str | Path, side: str) -> str:
    """Name of the zip member holding the hip scan of ``side``.

    Args:
        zip_path: A UKB field-20158 zip.
        side: ``"L"`` (``Left Femur``) or ``"R"`` (``Right Femur``).

    Returns:
        The member name.

    Raises:
        DicomError: ``reason="no_hip_dicom"`` when no member carries that side's protocol,
            ``"ambiguous_hip_dicom"`` when two or more do, ``"unreadable_dicom"`` when none does
            but some DICOM member cannot be parsed, ``"unreadable_zip"`` when the zip cannot be
            read, ``"not_a_file"`` / ``"image_too_large"`` before it is opened.
    """
    key = _side_key(side)
    with _open_zip(zip_path) as zf:
        found, broken = _scan_hips(zf, zip_path)
    return _the_hip(found, broken, zip_path, key)


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


def _check_image_header(ds: Dataset, source: str, limits: Limits = DEFAULT_LIMITS) -> tuple[int, int]:
    """Validate what :func:`read_image` needs from the header; returns ``(rows, cols)``.

    Rows x Columns x Samples per Pixel over ``limits.max_image_pixels`` is ``image_too_large``,
    checked before any pixel is decoded (a small JPEG can declare a huge matrix).
    """
    rows = _int_tag(ds, 0x00280010, source)
    cols = _int_tag(ds, 0x00280011, source)
    if rows <= 0 or cols <= 0:
        raise DicomError(
            f"{source}: {tag_name(0x00280010)} x {tag_name(0x00280011)} must be positive, got {rows} x {cols}"
        )
    try:
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        raise DicomError(f"{source}: {tag_name(0x00280002)} is not an integer: {ds.get('SamplesPerPixel')!r}") from None
    if rows * cols * max(spp, 1) > limits.max_image_pixels:
        raise DicomError(
            f"{source}: {rows} x {cols} x {spp} samples = {rows * cols * spp:,} pixels, over the cap of "
            f"{limits.max_image_pixels:,} (qc.max_image_pixels); not decoded",
            IMAGE_TOO_LARGE,
        )
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


def read_image_header(
    image: str | Path, member: str | None = None, *, data: bytes | None = None, limits: Limits | None = None
) -> ImageHeader:
    """Everything :func:`read_image` checks, without decoding the pixels (what ingest uses).

    Reads the whole file (or zip member, CRC-checked) but only parses it: Rows, Columns, spacing,
    single-frame monochrome 8/16-bit, a decoder available for the transfer syntax, and pixel data
    present and not truncated (native: at least ``Rows x Columns x BitsAllocated / 8`` bytes;
    encapsulated: the sequence delimiter reached).

    Args:
        image: A ``.dcm`` file or a zip.
        member: The DICOM's name in the zip, if ``image`` is a zip.
        data: The file's bytes when the caller has read them already.
        limits: Resource caps (default :class:`hipoa.qc.Limits`); when given, the image size
            and pixel spacing must also be plausible (``implausible_image_size``,
            ``implausible_spacing``).

    Returns:
        An :class:`ImageHeader`.

    Raises:
        DicomError: anything :func:`read_image` would reject before decoding.
    """
    source = source_name(image, member)
    if data is None:
        data = _read_bytes(image, member, limits or DEFAULT_LIMITS)
    ds, rows, cols, spacing = _parse_checked(data, source, limits)
    return ImageHeader(
        rows=rows,
        cols=cols,
        spacing_mm=spacing,
        protocol=protocol_of(ds),
        source=source,
        **{field: device_text(ds, tag) for field, tag in DEVICE_TAGS.items()},
    )


def device_text(ds: Dataset, tag: int) -> str:
    """A device-identifying text element (:data:`DEVICE_TAGS`) as one string, ``""`` if absent.

    Values of a multi-valued element are joined by ``\\``, as DICOM encodes them (PS3.5 6.4),
    e.g. ``(0018,1020) Software Versions`` ``["12.30", "enCORE 15"]`` -> ``"12.30\\enCORE 15"``.
    Each value loses its padding (spaces, NULs); control characters (tab, newline: not allowed
    in LO, PS3.5 6.2) become spaces, so the value stays one field of one line; at most
    1,024 characters are kept. A value that cannot be read as text counts as absent: these tags
    only describe the scanner, and never make an image unusable.

    Args:
        ds: The dataset (a header is enough).
        tag: The element, e.g. ``0x00181020``.
    """
    try:
        with warnings.catch_warnings():  # pydicom's VR checks on access (e.g. an LO over 64 chars)
            warnings.simplefilter("ignore")
            elem = ds.get(tag)
            value = None if elem is None else elem.value
        if value is None or elem.VR == "SQ":  # a sequence is no text (a hostile or broken header)
            return ""
        items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        parts = []
        for item in items[:_DEVICE_TEXT_MAX]:
            text = item.decode("latin-1") if isinstance(item, (bytes, bytearray)) else str(item)
            parts.append(text[:_DEVICE_TEXT_MAX].translate(_CONTROL_TO_SPACE).strip())
    except Exception as exc:  # noqa: BLE001 - a malformed equipment tag is not the image's problem
        log.debug("%s: cannot read as text: %s: %s", tag_name(tag), type(exc).__name__, exc)
        return ""
    return "\\".join(parts).strip()[:_DEVICE_TEXT_MAX] if any(parts) else ""


def _parse_checked(data: bytes, source: str, limits: Limits | None) -> tuple[Dataset, int, int, tuple[float, float]]:
    """Parse a DICOM's bytes and run every check short of decoding; plausibility when ``limits``."""
    ds = _dcmread(io.BytesIO(data), source, stop_before_pixels=False)
    rows, cols = _check_image_header(ds, source, limits or DEFAULT_LIMITS)
    spacing = pixel_spacing(ds, source)
    _check_pixel_data(ds, source, rows, cols)
    if limits is not None:
        problem = limits.size_problem(rows, cols)
        if problem:
            raise DicomError(f"{source}: {problem}", IMPLAUSIBLE_IMAGE_SIZE)
        problem = limits.spacing_problem(spacing)
        if problem:
            raise DicomError(f"{source}: {problem} ({spacing_source(ds)})", IMPLAUSIBLE_SPACING)
    return ds, rows, cols, spacing


def transfer_syntax_name(ds: Dataset) -> str:
    """``(0002,0010) Transfer Syntax UID`` as name and UID, e.g. ``JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91)``."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if not ts:
        return "(0002,0010) Transfer Syntax UID absent, read as Implicit VR Little Endian"
    return f"(0002,0010) Transfer Syntax UID {ts.name} ({str(ts)})"


def spacing_source(ds: Dataset) -> str:
    """Which tag the pixel spacing came from, as :func:`pixel_spacing` chooses it."""
    for tag in (0x00280030, 0x00181164, 0x00400303):
        if _present(ds, tag):
            return f"from {tag_name(tag)} {ds[tag].value!r}"
    return "no spacing tag"


def probe_hip(zip_path: str | Path, side: str, limits: Limits | None = None) -> tuple[str, ImageHeader]:
    """Find ``side``'s hip in a zip and check its header and pixel-data length, in one open.

    Args:
        zip_path: A UKB field-20158 zip.
        side: ``"L"`` or ``"R"``.
        limits: As for :func:`read_image_header`.

    Returns:
        ``(member, header)``.

    Raises:
        DicomError: with a ``reason`` of :data:`hipoa.qc.REASONS` (``not_a_file`` to
            ``implausible_spacing``); ``member`` names the hip member when it was found but
            cannot be used.
    """
    key = _side_key(side)
    with _open_zip(zip_path, limits or DEFAULT_LIMITS) as zf:
        found, broken = _scan_hips(zf, zip_path)
        member = _the_hip(found, broken, zip_path, key)
        try:
            data = _read_member(zf, zip_path, member, limits or DEFAULT_LIMITS)
        except DicomError as exc:
            exc.member = member
            raise
    try:
        return member, read_image_header(zip_path, member, data=data, limits=limits)
    except DicomError as exc:
        exc.member = member
        raise


# ---------------------------------------------------------------------------------------------
# Pixels


@contextlib.contextmanager
def _quiet_decoders():
    """Silence pydicom's per-plugin ERROR tracebacks while decoding: a failure becomes one
    DicomError line naming the member, the transfer syntax and every plugin's message."""
    logger = logging.getLogger("pydicom.pixels.decoders.base")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


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


def read_image(image: str | Path, member: str | None = None, limits: Limits | None = None) -> HipImage:
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
        limits: As for :func:`read_image_header`.

    Returns:
        A :class:`HipImage` with ``(rows, cols)`` float32 pixels.

    Raises:
        DicomError: unreadable zip or header, missing spacing, colour or multi-frame images,
            bit depth other than 8/16 allocated, truncated or undecodable pixel data.
    """
    source = source_name(image, member)
    data = _read_bytes(image, member, limits or DEFAULT_LIMITS)
    ds, rows, cols, spacing = _parse_checked(data, source, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _quiet_decoders():
                stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure makes the image unreadable
        # one line: pydicom's plugin errors span several lines (one per plugin tried)
        detail = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise DicomError(
            f"{source}: {tag_name(0x7FE00010)} cannot be decoded ({transfer_syntax_name(ds)}): "
            f"{type(exc).__name__}: {detail}"
        ) from None
    if stored.shape != (rows, cols):
        raise DicomError(
            f"{source}: {tag_name(0x7FE00010)} decodes to shape {stored.shape}, header says ({rows}, {cols})"
        )
    # No float64 copy of the whole image when there is no rescale (UKB's 8-bit data): converting
    # integers straight to float32 is exact and halves read time (benchmarks/crop.py).
    values = np.asarray(apply_modality_lut(stored, ds))
    top = _max_possible(ds)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        values = top - values.astype(np.float64)
    return HipImage(
        pixels=values.astype(np.float32),
        spacing_mm=spacing,
        protocol=protocol_of(ds),
        source=source,
        max_value=float(top),
    )
