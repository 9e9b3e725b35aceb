"""A bounded walk over a DICOM file's element structure, before pydicom builds any object.

pydicom turns every element, sequence item and nested data set it parses into Python objects
(about a kilobyte each): a 330 kB zip member whose header holds a sequence of a million empty
items costs gigabytes once parsed, although it is far under the byte caps. :func:`scan` walks
the same bytes with :mod:`struct` alone, counting elements, sequence items and nesting depth, and
refuses the file before pydicom sees it when a count passes :class:`HeaderCaps`.

It also tells which encoding a file uses when it has no 128-byte preamble and ``DICM`` prefix
(:func:`sniff`): a raw data set in Explicit VR Little or Big Endian or Implicit VR Little Endian,
or a file meta group without a preamble, recognised by parsing its first elements (tags
ascending, valid VRs, lengths inside the file) rather than by its first bytes.

The walk follows PS3.5 7.1 (data elements), 7.5 (nesting of data sets: items with defined or
undefined length, item and sequence delimiters) and A.4 (encapsulated pixel data, whose
fragments are counted as items). Where the structure ends early (a file truncated inside an
element) the walk stops there and leaves the verdict to the reader, which reports truncation
with the tag; only the caps make it raise.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR

_DICM_OFFSET = 128
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_VRS = _LONG_VRS | frozenset({
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL",
    b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
})
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")

ENCODINGS: dict[str, tuple[bool, bool]] = {
    "Explicit VR Little Endian": (False, True),
    "Explicit VR Big Endian": (False, False),
    "Implicit VR Little Endian": (True, True),
}
"""A raw data set's encodings :func:`sniff` tries, in this order: ``name -> (implicit, little)``."""


@dataclass(frozen=True)
class HeaderCaps:
    """What one DICOM's structure may hold (a UK Biobank hip DXA has ~150 elements, a few items).

    Attributes:
        max_elements: Data elements, at every nesting level together.
        max_items: Sequence items, encapsulated pixel-data fragments included.
        max_depth: Sequences nested in sequences.
        max_inflated_bytes: Largest deflated data set (Deflated Explicit VR Little Endian) once
            inflated; the byte cap of the file it came from.
    """

    max_elements: int = 20_000
    max_items: int = 5_000
    max_depth: int = 16
    max_inflated_bytes: int = 64 << 20


class HeaderTooLarge(ValueError):
    """The structure passes a :class:`HeaderCaps` cap; the message says which, where."""


@dataclass(frozen=True)
class HeaderCounts:
    """What :func:`scan` found: the data set's encoding and how much structure it holds."""

    encoding: str
    elements: int
    items: int
    depth: int


class _Walk:
    def __init__(self, data: bytes | memoryview, caps: HeaderCaps) -> None:
        self.d = data
        self.caps = caps
        self.elements = 0
        self.items = 0
        self.depth = 0

    def _count(self, what: str, pos: int) -> None:
        if what == "element":
            self.elements += 1
            if self.elements > self.caps.max_elements:
                raise HeaderTooLarge(f"more than {self.caps.max_elements:,} data elements (at byte {pos:,})")
        else:
            self.items += 1
            if self.items > self.caps.max_items:
                raise HeaderTooLarge(f"more than {self.caps.max_items:,} sequence items (at byte {pos:,})")

    def _tag(self, pos: int, little: bool) -> int:
        g, e = struct.unpack_from("<HH" if little else ">HH", self.d, pos)
        return (g << 16) | e

    def element(self, pos: int, end: int, implicit: bool, little: bool) -> tuple[int, bytes | None, int, int] | None:
        """``(tag, vr or None, length, value start)``, or None where the element runs past ``end``."""
        if end - pos < 8:
            return None
        tag = self._tag(pos, little)
        vr = bytes(self.d[pos + 4 : pos + 6])
        if tag >> 16 == 0xFFFE or implicit or vr not in _VRS:
            (length,) = struct.unpack_from("<I" if little else ">I", self.d, pos + 4)
            return tag, None, length, pos + 8
        if vr in _LONG_VRS:
            if end - pos < 12:
                return None
            (length,) = struct.unpack_from("<I" if little else ">I", self.d, pos + 8)
            return tag, vr, length, pos + 12
        (length,) = struct.unpack_from("<H" if little else ">H", self.d, pos + 6)
        return tag, vr, length, pos + 8

    def dataset(self, pos: int, end: int, implicit: bool, little: bool, depth: int, in_item: bool) -> int:
        """Walk the elements in ``[pos, end)``; the position after them (after the item delimiter
        when ``in_item`` and the item has undefined length)."""
        while pos < end:
            head = self.element(pos, end, implicit, little)
            if head is None:
                return end
            tag, vr, length, start = head
            if tag == _ITEM_END and in_item:
                return start
            self._count("element", pos)
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA and depth == 0:
                    pos = self.fragments(start, end, little)
                else:  # SQ, or UN holding a sequence in Implicit VR Little Endian (PS3.5 6.2.2)
                    inner_implicit = implicit or vr == b"UN"
                    pos = self.sequence(start, end, inner_implicit, little or vr == b"UN", depth + 1)
                continue
            if start + length > end:
                return end
            if vr == b"SQ" or (vr is None and _is_sequence(tag)):
                self.sequence(start, start + length, implicit, little, depth + 1)
            elif (vr is None or vr == b"UN") and length >= 8 and self._tag(start, little or vr == b"UN") == _ITEM:
                # an unknown (private) element whose value is a sequence: readers parse it as one
                self.sequence(start, start + length, implicit or vr == b"UN", little or vr == b"UN", depth + 1)
            pos = start + length
        return pos

    def sequence(self, pos: int, end: int, implicit: bool, little: bool, depth: int) -> int:
        """Walk one sequence's items from ``pos``; the position after it."""
        if depth > self.caps.max_depth:
            raise HeaderTooLarge(f"sequences nested more than {self.caps.max_depth} deep (at byte {pos:,})")
        self.depth = max(self.depth, depth)
        while pos + 8 <= end:
            tag = self._tag(pos, little)
            (length,) = struct.unpack_from("<I" if little else ">I", self.d, pos + 4)
            if tag == _SEQ_END:
                return pos + 8
            if tag != _ITEM:
                return pos  # a defined-length sequence ends with its bytes; anything else is the reader's to judge
            self._count("item", pos)
            start = pos + 8
            if length == _UNDEFINED:
                pos = self.dataset(start, end, implicit, little, depth, in_item=True)
            else:
                stop = min(start + length, end)
                self.dataset(start, stop, implicit, little, depth, in_item=False)
                pos = stop
        return end

    def fragments(self, pos: int, end: int, little: bool) -> int:
        """Count encapsulated pixel data's items (offset table and fragments); skip their bytes."""
        while pos + 8 <= end:
            tag = self._tag(pos, little)
            (length,) = struct.unpack_from("<I" if little else ">I", self.d, pos + 4)
            if tag == _SEQ_END:
                return pos + 8
            if tag != _ITEM or length == _UNDEFINED:
                return end
            self._count("item", pos)
            pos += 8 + length
        return end


def _is_sequence(tag: int) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def _plausible(data: bytes | memoryview, pos: int, implicit: bool, little: bool, n: int = 4) -> bool:
    """The first ``n`` elements at ``pos`` (or all up to the end) parse under this encoding: the
    first tag's group at most 0x0010 (a data set starts with groups 0000-0010), tags ascending,
    VRs valid (explicit), lengths inside the data."""
    walk = _Walk(data, HeaderCaps())
    end = len(data)
    last = -1
    for k in range(n):
        if pos >= end:
            return k > 0
        head = walk.element(pos, end, implicit, little)
        if head is None:
            return False
        tag, vr, length, start = head
        if (k == 0 and tag >> 16 > 0x0010) or tag <= last or tag >> 16 == 0xFFFE:
            return False
        if not implicit and vr is None:
            return False
        last = tag
        if length == _UNDEFINED:
            return implicit or vr in (b"SQ", b"UN", b"OB", b"OW")
        if start + length > end:
            return tag == _PIXEL_DATA  # a truncated image is still an image
        pos = start + length
    return True


def sniff(data: bytes | memoryview) -> str | None:
    """How the file is laid out, or None when it is no DICOM.

    Returns:
        ``"Part 10"`` (``DICM`` at byte 128), ``"File Meta"`` (a file meta group without the
        preamble), a key of :data:`ENCODINGS` (a raw data set), or None.
    """
    if len(data) >= _DICM_OFFSET + 4 and bytes(data[_DICM_OFFSET : _DICM_OFFSET + 4]) == b"DICM":
        return "Part 10"
    if len(data) >= 8 and bytes(data[:2]) == b"\x02\x00" and _plausible(data, 0, False, True):
        return "File Meta"
    for name, (implicit, little) in ENCODINGS.items():
        if _plausible(data, 0, implicit, little):
            return name
    return None


def _meta(walk: _Walk, pos: int) -> tuple[int, str]:
    """Walk a file meta group (always Explicit VR Little Endian) from ``pos``; ``(end, transfer syntax)``."""
    d, end = walk.d, len(walk.d)
    ts = ""
    while pos + 8 <= end and struct.unpack_from("<H", d, pos)[0] == 0x0002:
        head = walk.element(pos, end, False, True)
        if head is None:
            break
        tag, _vr, length, start = head
        walk._count("element", pos)
        if length == _UNDEFINED or start + length > end:
            break
        if tag == 0x00020010:
            ts = bytes(d[start : start + length]).decode("ascii", "replace").strip("\0 ")
        pos = start + length
    return pos, ts


def scan(data: bytes | memoryview, caps: HeaderCaps = HeaderCaps()) -> HeaderCounts | None:
    """Walk a whole DICOM file's structure (pixel data skipped), or None when it is no DICOM.

    Raises:
        HeaderTooLarge: the structure passes a cap of ``caps``.
    """
    layout = sniff(data)
    if layout is None:
        return None
    walk = _Walk(data, caps)
    pos, ts = 0, ""
    if layout in ("Part 10", "File Meta"):
        pos, ts = _meta(walk, _DICM_OFFSET + 4 if layout == "Part 10" else 0)
    if ts in _DEFLATED:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            body = inflater.decompress(bytes(data[pos:]), caps.max_inflated_bytes + 1)
        except zlib.error:
            return HeaderCounts(ts, walk.elements, 0, 0)  # the reader reports the broken stream
        if len(body) > caps.max_inflated_bytes:
            raise HeaderTooLarge(f"the deflated data set inflates past {caps.max_inflated_bytes:,} bytes")
        walk = _Walk(body, caps)
        walk.elements = 0
        walk.dataset(0, len(body), False, True, 0, in_item=False)
        return HeaderCounts(ts, walk.elements, walk.items, walk.depth)
    if ts == _IMPLICIT_LE:
        implicit, little, encoding = True, True, ts
    elif ts == _EXPLICIT_BE:
        implicit, little, encoding = False, False, ts
    elif ts:
        implicit, little, encoding = False, True, ts  # every other transfer syntax is Explicit VR LE
    else:
        encoding = next((n for n, (i, lt) in ENCODINGS.items() if _plausible(data, pos, i, lt)), "")
        if not encoding:
            return HeaderCounts("unknown", walk.elements, 0, 0)  # the reader decides
        implicit, little = ENCODINGS[encoding]
    walk.dataset(pos, len(data), implicit, little, 0, in_item=False)
    return HeaderCounts(encoding, walk.elements, walk.items, walk.depth)
