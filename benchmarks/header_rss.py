"""Benchmark: peak RSS of ``hipoa ingest`` and ``hipoa crop-patches`` on the worst DICOM headers.

    python benchmarks/header_rss.py [--dir DIR] [--workers 4]

Makes a 6-participant synthetic cohort and rewrites three zips (a header's structure, not its
bytes, is what costs memory once pydicom turns every element and item into objects):

- ``million_items``: the left hip's (0008,1140) Referenced Image Sequence holds 1,000,000 empty
  items of undefined length (16 MB inflated, ~20 kB in the zip): over ``HeaderCaps.max_items``,
  refused (``image_too_large``) before pydicom parses it;
- ``decoy_items``: the same sequence in a *non-hip* member of another zip: skipped, the hip measured;
- ``under_caps``: the left hip's header holds just under every cap, as much as pydicom will be
  asked to parse: 4,900 sequence items of 3 elements with a 4 kB Image Comments each (14,700
  elements, ~60 MB, under ``qc.max_member_mb`` 64), and a chain of 16 nested sequences.

Runs ingest (``--workers``, as the workflow does) and crop as separate processes and prints each
one's peak RSS (``RUSAGE_CHILDREN`` of a wrapper: the largest single process, ingest's workers
included) and the reasons the three hips got.
"""

from __future__ import annotations

import argparse
import struct
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from bomb_rss import AUTO, IMAGES, _rewrite, peak_rss_mb  # noqa: E402

from hipoa.dicom import find_hip_member  # noqa: E402
from hipoa.headerscan import HeaderCaps  # noqa: E402
from hipoa.synth import make_cohort  # noqa: E402

ITEM, ITEM_END, SEQ_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0"
UNDEFINED = b"\xff\xff\xff\xff"


def _element(group: int, elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, elem, len(value)) + value  # Implicit VR Little Endian


def _undefined_sequence(group: int, elem: int, items: list[bytes] | bytes, n: int = 0) -> bytes:
    body = (ITEM + UNDEFINED + items + ITEM_END + bytes(4)) * n if isinstance(items, bytes) else b"".join(
        ITEM + UNDEFINED + it + ITEM_END + bytes(4) for it in items)
    return struct.pack("<HH", group, elem) + UNDEFINED + body + SEQ_END + bytes(4)


def million_items() -> bytes:
    return _undefined_sequence(0x0008, 0x1140, b"", 1_000_000)


def under_caps() -> bytes:
    caps = HeaderCaps()
    comment = b"x" * 4096
    item = _element(0x0008, 0x1150, b"1.2.840.10008.5.1.4.1.1.1\0") + _element(0x0008, 0x1155, b"1.2.3.4\0") + \
        _element(0x0020, 0x4000, comment)
    seq = _undefined_sequence(0x0008, 0x1140, [item] * (caps.max_items - 100))
    nested = b""
    for _ in range(caps.max_depth):  # (0040,0275) Request Attributes Sequence, 16 deep
        nested = _undefined_sequence(0x0040, 0x0275, [nested])
    return seq, nested


def _insert(data: bytes, element: bytes, before: int) -> bytes:
    """``data`` (a Part 10 file, Implicit VR LE data set) with ``element`` before the first tag >= ``before``."""
    pos = data.index(b"\x08\x00\x16\x00")  # (0008,0016), the data set's first element here
    while pos < len(data):
        g, e, length = struct.unpack_from("<HHI", data, pos)
        if (g << 16 | e) >= before:
            break
        pos += 8 + length
    return data[:pos] + element + data[pos:]


def rewrite_member(zip_path: Path, member: str, *elements: tuple[bytes, int]) -> None:
    def write(fp, data: bytes) -> None:
        for element, before in elements:
            data = _insert(data, element, before)
        fp.write(data)

    _rewrite(zip_path, member, write)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--workers", type=int, default=4, help="ingest workers (the workflow's threads: 4)")
    args = ap.parse_args(argv)

    root = args.dir or Path(tempfile.mkdtemp(prefix="hipoa-header-"))
    truth = make_cohort(out=root / "cohort", participants=6, seed=11, annotated_fraction=0.0, workers=1)
    eids = truth["eid"].astype(str).unique().tolist()
    zdir = root / "cohort" / "ukb" / "20158"
    zips = [zdir / f"{e}_20158_2_0.zip" for e in eids]
    rewrite_member(zips[0], find_hip_member(zips[0], "L"), (million_items(), 0x00081141))
    import zipfile

    with zipfile.ZipFile(zips[1]) as zf:
        hips = {find_hip_member(zips[1], "L"), find_hip_member(zips[1], "R")}
        decoy = next(n for n in zf.namelist() if n.endswith(".dcm") and n not in hips)
    rewrite_member(zips[1], decoy, (million_items(), 0x00081141))
    seq, nested = under_caps()
    rewrite_member(zips[2], find_hip_member(zips[2], "L"), (seq, 0x00081141), (nested, 0x00400276))
    for z in zips[:3]:
        print(f"{z.name}: {z.stat().st_size / 1e6:.2f} MB on disk")

    ingest = ["hipoa", "ingest", "--images", str(root / "cohort" / IMAGES), "--points-auto",
              str(root / "cohort" / AUTO), "--side", "L", "--shards", "1", "--workers", str(args.workers)]
    manifest = root / "L.parquet"
    rss_ingest, _ = peak_rss_mb(ingest + ["--out", str(manifest)])
    man = pd.read_parquet(manifest).set_index("eid")
    rss_crop, _ = peak_rss_mb(["hipoa", "crop-patches", "--manifest", str(manifest), "--shard", "0",
                               "--out", str(root / "shard-0000.zarr")])
    for name, eid in zip(("million_items", "decoy_items", "under_caps"), eids[:3]):
        print(f"{name}: qc_reason {man.loc[eid, 'qc_reason']!r}")
    print(f"header_rss: ingest {rss_ingest:.0f} MB, crop {rss_crop:.0f} MB peak RSS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
