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
UK Biobank carry no Pixel Spacing. Where a header carries more than one, they must agree within
``qc.spacing_agreement`` (else ``spacing_inconsistent``).

The stored values are checked against the header before anything is measured
(``pixel_data_inconsistent``): native Pixel Data no longer than the matrix needs, raw words
inside the range Bits Stored and Pixel Representation allow (before pydicom masks them), a JPEG
2000 codestream's sign resolvable against Pixel Representation, and not nearly every pixel one
value. Whether the image looks like a hip DXA (bone brighter than soft tissue, no noise filling
the range) is :mod:`hipoa.pixelcheck`'s, at crop, where the outline is known.

Members are recognised by parsing, not by their first bytes: a Part 10 file, a file meta group
without its preamble, or a raw data set in Explicit VR Little / Big Endian or Implicit VR Little
Endian (:func:`hipoa.headerscan.sniff`). Objects whose SOP Class stores no image (structured
reports, RT plans, waveforms, DICOMDIR) are refused by name.

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
``max_image_pixels`` are ``image_too_large`` before anything is decoded; so is a header whose
structure passes :data:`HEADER_CAPS` (elements, sequence items, nesting: counted by
:func:`hipoa.headerscan.scan` before pydicom builds any object), in every member a scan touches,
hip or not. Header scans skip elements over 1 MiB instead of reading them. Two members with the
side's protocol are ``ambiguous_hip_dicom``: none is picked. A member that cannot be read or
parsed is skipped and named in the log; the hip is measured when its own member is intact.
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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_description
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.tag import Tag
from pydicom.uid import JPEG2000TransferSyntaxes

from hipoa.headerscan import HeaderCaps, HeaderTooLarge, scan, sniff
from hipoa.qc import (
    AMBIGUOUS_HIP_DICOM,
    IMAGE_TOO_LARGE,
    IMPLAUSIBLE_IMAGE_SIZE,
    IMPLAUSIBLE_SPACING,
    NO_HIP_DICOM,
    NOT_A_FILE,
    PIXEL_DATA_INCONSISTENT,
    SPACING_INCONSISTENT,
    UNREADABLE_DICOM,
    UNREADABLE_ZIP,
    Limits,
)

log = logging.getLogger(__name__)

SIDE_PROTOCOLS: dict[str, str] = {"L": "Left Femur", "R": "Right Femur"}
"""ProtocolName of each side's hip scan in UKB iDXA exports (compared case/space-insensitively)."""

DEFAULT_LIMITS = Limits()
_HEADER_DEFER = 1 << 20  # header elements larger than this are skipped, not read into memory
HEADER_CAPS = HeaderCaps()
"""How much structure one DICOM may hold before pydicom parses it (:mod:`hipoa.headerscan`)."""

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
        notes: Warnings for the log (:func:`probe_hip`: other members of the zip skipped).
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
    notes: tuple[str, ...] = ()


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


def _not_dicom(data: bytes, source: str) -> DicomError:
    return DicomError(
        f"{source}: not a DICOM file (no 'DICM' prefix at byte 128, and no file meta group or data set "
        f"parses at byte 0 in Explicit VR Little / Big Endian or Implicit VR Little Endian; "
        f"starts {data[:16]!r})"
    )


def _dcmread(data: bytes, source: str, *, stop_before_pixels: bool) -> Dataset:
    """``pydicom.dcmread`` of a file's bytes, after :func:`hipoa.headerscan.scan` bounds its structure.

    Every failure becomes a :class:`DicomError` naming ``source``: ``image_too_large`` for a
    header over :data:`HEADER_CAPS` (elements, sequence items, nesting), ``unreadable_dicom``
    for anything pydicom cannot parse.
    """
    try:
        counts = scan(data, HEADER_CAPS)
    except HeaderTooLarge as exc:
        raise DicomError(f"{source}: DICOM header is over the parse caps: {exc}; not parsed", IMAGE_TOO_LARGE) from None
    except Exception as exc:  # noqa: BLE001 - a structure the walk cannot follow is no DICOM it can bound
        raise DicomError(f"{source}: DICOM structure cannot be walked: {type(exc).__name__}: {exc}") from None
    if counts is None:
        raise _not_dicom(data, source)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(
                io.BytesIO(data),
                stop_before_pixels=stop_before_pixels,
                force=True,
                # a header scan never holds a huge element (e.g. a padded private tag) in memory
                defer_size=_HEADER_DEFER if stop_before_pixels else None,
            )
    except Exception as exc:  # noqa: BLE001 - any parser failure makes the file unreadable
        raise DicomError(f"{source}: DICOM header cannot be parsed: {type(exc).__name__}: {exc}") from None
    for w in caught:
        log.debug("%s: pydicom: %s", source, w.message)
    meta = ds.file_meta if hasattr(ds, "file_meta") else None
    if meta is None or not meta.get("TransferSyntaxUID"):
        # no file meta (a raw data set): the encoding pydicom read it in is its transfer syntax
        implicit, little = ds.original_encoding
        if meta is None:
            ds.file_meta = meta = FileMetaDataset()
        meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit else
                                  pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
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


@dataclass
class _Scan:
    """What one pass over a zip's members found (:func:`_scan_hips`)."""

    found: dict[str, list[str]]  # side -> members with that side's protocol
    data: dict[str, bytes]  # hip members' bytes, read once
    skipped: dict[str, tuple[str, str]]  # member -> (reason, why), members that cannot be read or parsed
    not_dicom: list[str]  # members that are no DICOM (manifest.cvs, ...)


def _scan_hips(zf: zipfile.ZipFile, zip_path: str | Path, limits: Limits = DEFAULT_LIMITS) -> _Scan:
    """One pass over the members: each is read (under ``limits.max_member_mb``), recognised by
    parsing (:func:`hipoa.headerscan.sniff`) and its header parsed under :data:`HEADER_CAPS`.

    A member that cannot be read from the zip, is over a cap or whose header cannot be parsed is
    recorded in ``skipped`` with its reason and the scan goes on: the side's hip is measured when
    its own member is intact, whatever the others are.
    """
    scan_ = _Scan(found={}, data={}, skipped={}, not_dicom=[])
    for info in zf.infolist():
        if info.is_dir():
            continue
        source = source_name(zip_path, info.filename)
        try:
            data = _read_member(zf, zip_path, info.filename, limits)
            if sniff(data) is None:
                log.debug("%s: not DICOM, skipped", source)
                scan_.not_dicom.append(info.filename)
                continue
            ds = _dcmread(data, source, stop_before_pixels=True)
            side = side_of_protocol(protocol_of(ds))
        except DicomError as exc:
            log.debug("%s", exc)
            scan_.skipped[info.filename] = (exc.reason, str(exc))
            continue
        if side is not None:
            scan_.found.setdefault(side, []).append(info.filename)
            scan_.data[info.filename] = data
    return scan_


def _skipped_text(scan_: _Scan) -> str:
    """``"2 members skipped: 1 unreadable_zip (a.dcm), 1 unreadable_dicom (b.dcm)"``, or ``""``."""
    by: dict[str, list[str]] = {}
    for member, (reason, _why) in scan_.skipped.items():
        by.setdefault(reason, []).append(member)
    if scan_.not_dicom:
        by["not DICOM"] = scan_.not_dicom
    if not by:
        return ""
    n = sum(map(len, by.values()))
    parts = [f"{len(m)} {reason} ({', '.join(m[:5])}{', ...' if len(m) > 5 else ''})" for reason, m in by.items()]
    return f"{n} member(s) skipped: {'; '.join(parts)}"


def _missing_hip_error(zip_path: str | Path, side: str, scan_: _Scan) -> DicomError:
    """No member has ``side``'s protocol: the reason is that of the members that could not be
    read (the hip may be among them: ``unreadable_zip``, then ``image_too_large``, then
    ``unreadable_dicom``), else ``no_hip_dicom``; the message counts every skipped member."""
    want = SIDE_PROTOCOLS[side]
    reasons = {reason for reason, _why in scan_.skipped.values()}
    skipped = _skipped_text(scan_)
    for reason in (UNREADABLE_ZIP, IMAGE_TOO_LARGE, UNREADABLE_DICOM):
        if reason in reasons:
            first = next(why for r, why in scan_.skipped.values() if r == reason)
            return DicomError(
                f"{zip_path}: no member with {tag_name(0x00181030)} {want!r} can be read; {skipped}; first: {first}",
                reason,
            )
    return DicomError(
        f"{zip_path}: no_hip_dicom: no member with {tag_name(0x00181030)} (or "
        f"{tag_name(0x00400254)}) {want!r}" + (f"; {skipped}" if skipped else ""),
        NO_HIP_DICOM,
    )


def _the_hip(scan_: _Scan, zip_path: str | Path, side: str) -> str:
    """The one member of ``side``, or the DicomError saying why there is not exactly one."""
    members = scan_.found.get(side, [])
    if not members:
        raise _missing_hip_error(zip_path, side, scan_)
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
            ``"ambiguous_hip_dicom"`` when two or more do; when none does but some member cannot
            be read, that member's reason (``"unreadable_zip"``, ``"image_too_large"``,
            ``"unreadable_dicom"``); ``"not_a_file"`` / ``"image_too_large"`` before it is opened.
    """
    key = _side_key(side)
    with _open_zip(zip_path) as zf:
        scan_ = _scan_hips(zf, zip_path)
    return _the_hip(scan_, zip_path, key)


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


def spacing_sources(ds: Dataset, source: str) -> dict[str, tuple[float, float]]:
    """Every pixel spacing the header states, ``{tag name: (dy, dx)}`` in mm, in precedence order.

    ``(0028,0030) Pixel Spacing`` and ``(0018,1164) Imager Pixel Spacing`` are
    ``[row spacing, column spacing]`` (PS3.3 10.7.1.3); ``(0040,0303) Exposed Area``
    ``[width_mm, height_mm]`` over ``(0028,0010) Rows`` and ``(0028,0011) Columns`` gives
    ``(height_mm / Rows, width_mm / Columns)``: UKB's iDXA hips have ExposedArea ``[170, 150]`` over
    600 rows x 680 columns, 0.25 mm each way. An empty (Type 2) element counts as absent.

    Raises:
        DicomError: a spacing tag holds something other than two positive finite numbers.
    """
    out: dict[str, tuple[float, float]] = {}
    for tag in (0x00280030, 0x00181164):
        if _present(ds, tag):
            value = ds[tag].value
            pair = _positive_pair(value)
            if pair is None:
                raise DicomError(f"{source}: {tag_name(tag)}: expected 2 positive numbers, got {value!r}")
            out[tag_name(tag)] = pair
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
        out[f"{tag_name(0x00400303)} / matrix"] = (height_mm / rows, width_mm / cols)
    return out


def pixel_spacing(ds: Dataset, source: str) -> tuple[float, float]:
    """Pixel spacing ``(row spacing dy, column spacing dx)`` in mm: the first of
    :func:`spacing_sources` (Pixel Spacing, then Imager Pixel Spacing, then Exposed Area over the
    matrix). :func:`spacing_disagreement` checks that the others agree with it.

    Args:
        ds: The dataset (a header is enough).
        source: Name of the file for error messages.

    Returns:
        ``(dy, dx)`` in mm, positive and finite.

    Raises:
        DicomError: a spacing tag holds something other than two positive finite numbers, or no
            spacing tag is present.
    """
    sources = spacing_sources(ds, source)
    if not sources:
        raise DicomError(
            f"{source}: no pixel spacing: {tag_name(0x00280030)}, {tag_name(0x00181164)} and "
            f"{tag_name(0x00400303)} are all missing or empty"
        )
    return next(iter(sources.values()))


def spacing_disagreement(sources: dict[str, tuple[float, float]], tolerance: float) -> str:
    """``""`` when every spacing source agrees with the first within ``tolerance`` (relative,
    each axis), else what differs (for the log and ``spacing_inconsistent``)."""
    items = list(sources.items())
    if len(items) < 2:
        return ""
    first_name, first = items[0]
    for name, pair in items[1:]:
        worst = max(abs(a - b) / min(a, b) for a, b in zip(first, pair))
        if worst > tolerance:
            return (
                f"{first_name} gives (dy, dx) = ({first[0]:.6g}, {first[1]:.6g}) mm but {name} gives "
                f"({pair[0]:.6g}, {pair[1]:.6g}) mm: {100 * worst:.1f} % apart (> qc.spacing_agreement "
                f"{100 * tolerance:g} %); the areas would be wrong by the square of that"
            )
    return ""


def _check_image_header(ds: Dataset, source: str, limits: Limits = DEFAULT_LIMITS) -> tuple[int, int]:
    """Validate what :func:`read_image` needs from the header; returns ``(rows, cols)``.

    Rows x Columns x Samples per Pixel over ``limits.max_image_pixels`` is ``image_too_large``,
    checked before any pixel is decoded (a small JPEG can declare a huge matrix).
    """
    _check_sop_class(ds, source)
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
    stored = _int_tag(ds, 0x00280101, source) if _present(ds, 0x00280101) else allocated
    if not 1 <= stored <= allocated:
        raise DicomError(f"{source}: {tag_name(0x00280101)}: expected 1..{allocated}, got {stored}")
    if _present(ds, 0x00280103) and _int_tag(ds, 0x00280103, source) not in (0, 1):
        raise DicomError(f"{source}: {tag_name(0x00280103)}: expected 0 or 1, got {ds[0x00280103].value!r}")
    _check_modality_lut(ds, source)
    return rows, cols


def _check_sop_class(ds: Dataset, source: str) -> None:
    """Refuse an object that is no image by what it is: ``(0008,0016) SOP Class UID`` (or the
    file meta's ``(0002,0002) Media Storage SOP Class UID``) names a known class that stores no
    image (a structured report, RT plan, waveform, DICOMDIR, ...). Unknown and private classes
    go on to the image checks."""
    meta = getattr(ds, "file_meta", None)
    for tag, holder in ((0x00080016, ds), (0x00020002, meta)):
        elem = holder.get(tag) if holder is not None else None
        if elem is None or not elem.value:
            continue
        uid = pydicom.uid.UID(str(elem.value).strip("\0 "))
        name = uid.name if uid.is_valid else ""
        if name and name != str(uid) and "Image" not in name:
            raise DicomError(f"{source}: {tag_name(tag)}: {name!r} ({uid}) is not an image object")


def _check_modality_lut(ds: Dataset, source: str) -> None:
    """A Modality LUT Sequence item holds what PS3.3 C.11.1 requires: LUT Descriptor (3 numbers,
    entries >= 1, 8 or 16 bits) and LUT Data; a Rescale Slope / Intercept, when present, is a
    finite number."""
    if _present(ds, 0x00283000):
        seq = ds[0x00283000].value
        where = f"{tag_name(0x00283000)} item 1"
        item = seq[0] if len(seq) else None
        if item is None:
            raise DicomError(f"{source}: {tag_name(0x00283000)} has no item")
        if not _present(item, 0x00283002):
            raise DicomError(f"{source}: {where}: {tag_name(0x00283002)} is missing")
        if not _present(item, 0x00283006):
            raise DicomError(f"{source}: {where}: {tag_name(0x00283006)} is missing")
        desc = item[0x00283002].value
        try:
            entries, _first, bits = (int(v) for v in desc)
        except (TypeError, ValueError):
            raise DicomError(f"{source}: {where}: {tag_name(0x00283002)}: expected 3 numbers, got {desc!r}") from None
        if bits not in (8, 16):
            raise DicomError(f"{source}: {where}: {tag_name(0x00283002)}: expected 8 or 16 bits, got {bits}")
        return
    for tag in (0x00281053, 0x00281052):
        if _present(ds, tag):
            value = ds[tag].value
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise DicomError(f"{source}: {tag_name(tag)} is not a number: {value!r}") from None
            if not math.isfinite(number) or (tag == 0x00281053 and number == 0):
                raise DicomError(f"{source}: {tag_name(tag)}: expected a finite{' non-zero' if tag == 0x00281053 else ''} number, got {value!r}")


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
    if len(data) > expected + (expected % 2):  # one pad byte makes an odd length even (PS3.5 8.1.1)
        raise DicomError(
            f"{source}: {tag_name(0x7FE00010)} holds {len(data):,} bytes, {rows} x {cols} x "
            f"{int(ds.BitsAllocated)} bits need {expected:,}: the matrix or Bits Allocated is wrong",
            PIXEL_DATA_INCONSISTENT,
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
    with _named(source):
        ds, rows, cols, spacing = _parse_checked(data, source, limits)
    return ImageHeader(
        rows=rows,
        cols=cols,
        spacing_mm=spacing,
        protocol=protocol_of(ds),
        source=source,
        **{field: device_text(ds, tag) for field, tag in DEVICE_TAGS.items()},
    )


@contextlib.contextmanager
def _named(source: str):
    """Turn any exception a check did not foresee into a one-line :class:`DicomError` naming the
    file and member (every foreseen failure names its tag as well)."""
    try:
        yield
    except DicomError:
        raise
    except Exception as exc:  # noqa: BLE001 - the reader's promise: every failure names the file
        detail = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise DicomError(f"{source}: unexpected {type(exc).__name__} while checking the header or pixels: {detail} "
                         "(please report it with the file's header, e.g. dcmdump)") from None


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
    ds = _dcmread(data, source, stop_before_pixels=False)
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
        problem = spacing_disagreement(spacing_sources(ds, source), limits.spacing_agreement)
        if problem:
            raise DicomError(f"{source}: {problem}", SPACING_INCONSISTENT)
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
            ``spacing_inconsistent``); ``member`` names the hip member when it was found but
            cannot be used. Other members that cannot be read are skipped: the header's
            ``notes`` name them.
    """
    key = _side_key(side)
    with _open_zip(zip_path, limits or DEFAULT_LIMITS) as zf:
        scan_ = _scan_hips(zf, zip_path, limits or DEFAULT_LIMITS)
    member = _the_hip(scan_, zip_path, key)
    notes = tuple(f"{why} (a {reason} member, skipped: the hip member {member} is intact)"
                  for _m, (reason, why) in scan_.skipped.items())
    try:
        header = read_image_header(zip_path, member, data=scan_.data[member], limits=limits)
    except DicomError as exc:
        exc.member = member
        raise
    return member, replace(header, notes=notes)


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


def _stored_range(ds: Dataset) -> tuple[int, int]:
    """``(lo, hi)``: the stored values ``(0028,0101) Bits Stored`` and ``(0028,0103) Pixel
    Representation`` allow (e.g. 0-4095 for unsigned 12-bit data)."""
    stored = int(ds.get("BitsStored", ds.BitsAllocated) or ds.BitsAllocated)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2 ** (stored - 1)), 2 ** (stored - 1) - 1
    return 0, 2**stored - 1


def _max_possible(ds: Dataset) -> float:
    """Largest value the modality LUT can output for this header's stored-value range."""
    lo, hi = _stored_range(ds)
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        values = np.arange(lo, hi + 1, dtype=np.int64)  # a LUT need not be monotonic
    else:
        values = np.array([lo, hi], dtype=np.int64)  # a rescale is linear: the ends suffice
    return float(np.max(apply_modality_lut(values, ds)))


PINNED_FRACTION = 0.95
"""An image with at least this fraction of its pixels at one stored value is
``pixel_data_inconsistent`` (a decode that lost the image, or an empty export): a hip DXA's most
common value holds under 5 % of its pixels (synthetic cohorts: under 1 %)."""


def _j2k_sign_problem(ds: Dataset, ts: object) -> str:
    """A JPEG 2000 codestream whose sign (SIZ ``Ssiz``) differs from ``(0028,0103) Pixel
    Representation`` at full precision: pydicom, like GDCM and DCMTK, reinterprets the bits when
    the codestream's precision is under Bits Allocated (the top bits carry the sign); at full
    precision there is no spare bit, and the same word is a negative value or one 65,536 higher,
    so the image is refused rather than guessed."""
    if ts not in JPEG2000TransferSyntaxes:
        return ""
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:  # noqa: BLE001 - the decoder reports a broken stream with the tag
        return ""
    info = get_j2k_parameters(frame[:64])
    if not info:
        return ""
    pixrep = int(ds.get("PixelRepresentation", 0) or 0)
    if bool(info["is_signed"]) != bool(pixrep) and int(info["precision"]) >= int(ds.BitsAllocated):
        return (
            f"the JPEG 2000 codestream is {'signed' if info['is_signed'] else 'unsigned'} "
            f"{info['precision']}-bit (SIZ Ssiz) but {tag_name(0x00280103)} is {pixrep}: at full precision "
            "the sign cannot be resolved (values would be off by 65,536)"
        )
    return ""


def _stored_values_problem(ds: Dataset, stored: np.ndarray, rows: int, cols: int) -> str:
    """``""`` when the stored values are what the header promises, else what contradicts it.

    Native data is checked on its raw words, before pydicom masks them to Bits Stored: a value
    above ``2**BitsStored - 1`` (or, signed, bits above the sign that do not extend it) would
    otherwise wrap silently. Decoded codestreams are checked on what they decode to: a JPEG 2000
    stream signed under Pixel Representation 0 (or the reverse) decodes outside the range.
    """
    lo, hi = _stored_range(ds)
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    problem = _j2k_sign_problem(ds, ts)
    if problem:
        return problem
    what = "stored"
    values = stored
    if not (ts and ts.is_compressed):
        allocated = int(ds.BitsAllocated)
        little = ds.original_encoding[1] if ds.original_encoding[1] is not None else True
        kind = "i" if lo < 0 else "u"
        dtype = np.dtype(f"{'<' if little else '>'}{kind}{allocated // 8}")
        values = np.frombuffer(ds.PixelData, dtype=dtype, count=rows * cols)
        what = "raw"
    vmin, vmax = int(values.min()), int(values.max())
    if vmin < lo or vmax > hi:
        n = int(np.count_nonzero((values < lo) | (values > hi)))
        return (
            f"{n:,} of {values.size:,} {what} pixel values lie outside [{lo}, {hi}], the range "
            f"{tag_name(0x00280101)} {ds.get('BitsStored', ds.BitsAllocated)} and {tag_name(0x00280103)} "
            f"{int(ds.get('PixelRepresentation', 0) or 0)} allow (found {vmin} to {vmax}; {transfer_syntax_name(ds)})"
        )
    if np.issubdtype(stored.dtype, np.integer) and vmax - vmin < 1 << 20:
        counts = np.bincount((np.asarray(stored, np.int64) - vmin).ravel())
        top = int(counts.argmax())
        if counts[top] >= PINNED_FRACTION * stored.size:
            return (
                f"{100 * counts[top] / stored.size:.1f} % of the pixels hold the single stored value {top + vmin} "
                f"(>= {100 * PINNED_FRACTION:g} %): no image"
            )
    return ""


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
    with _named(source):
        return _decode(data, source, limits)


def _decode(data: bytes, source: str, limits: Limits | None) -> HipImage:
    """:func:`read_image` on a file's bytes."""
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
    problem = _stored_values_problem(ds, stored, rows, cols)
    if problem:
        raise DicomError(f"{source}: {tag_name(0x7FE00010)}: {problem}", PIXEL_DATA_INCONSISTENT)
    # No float64 copy of the whole image when there is no rescale (UKB's 8-bit data): converting
    # integers straight to float32 is exact and halves read time (benchmarks/crop.py).
    try:
        values = np.asarray(apply_modality_lut(stored, ds))
        top = _max_possible(ds)
    except Exception as exc:  # noqa: BLE001 - _check_modality_lut should have caught it: name the tags anyway
        tags = tag_name(0x00283000) if _present(ds, 0x00283000) else f"{tag_name(0x00281053)} / {tag_name(0x00281052)}"
        raise DicomError(f"{source}: {tags}: the modality LUT cannot be applied: {type(exc).__name__}: {exc}") from None
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        values = top - values.astype(np.float64)
    return HipImage(
        pixels=values.astype(np.float32),
        spacing_mm=spacing,
        protocol=protocol_of(ds),
        source=source,
        max_value=float(top),
    )
