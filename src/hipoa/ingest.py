"""Ingest: turn the UK Biobank layout (or a manifest CSV) into the per-side manifest Parquet.

One manifest row per (eid, instance, side) image, never dropped (participants who withdrew
consent excepted, see below): what is already wrong with an image is recorded in ``qc_reason``,
the first that applies in the order of :data:`hipoa.qc.REASONS`. Ingest gives the reasons from
``not_a_file`` (the path is a directory, FIFO or device: never opened) through
``points_outside_image``, and ``duplicate_image`` (another row of the same (eid, instance, side)
is kept, see :func:`build_manifest`); crop and predict add the later ones.

Only headers are parsed (the hip member is read, within the caps of :class:`hipoa.qc.Limits`, to
check its CRC and pixel-data length, not decoded), so 40k zips ingest in minutes; ``workers > 1``
spreads zips over processes.

Identity: eids are kept exactly as given, as strings (``0123`` and ``123`` are two participants);
an eid must match :data:`EID_PATTERN`, so that it is a safe file name and a single field of a
whitespace-separated GWAS files (``.bt.tsv``, ``.qt.tsv``).

Withdrawals: participants who withdrew consent (UK Biobank's withdrawal file, read by
:func:`read_withdrawn`) are removed from the job list before any file of theirs is opened, so no
manifest row, log line, warning or error names them or their files; only counts are logged and
stored (``df.attrs["ingest"]`` and the Parquet's key-value metadata, see :func:`write_manifest`).

Scanner: the manifest carries ``manufacturer``, ``manufacturer_model``, ``device_serial`` and
``software_versions`` from the hip's General Equipment Module (:data:`hipoa.dicom.DEVICE_TAGS`),
NA when the tag is absent or the image could not be read: covariates for association studies,
never a person's data.

Masks: a mask is used for training only when it is a real 8-bit single-channel PNG (grey or
palette indices) of the image's size whose values are 0 or a site label; otherwise the row is
not ``annotated``, and the problem is logged and counted (:data:`hipoa.labels.MASK_PROBLEMS`).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import re
from collections import Counter
from collections.abc import Collection, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hipoa import __version__, qc
from hipoa.dicom import (
    DEVICE_TAGS,
    SIDE_PROTOCOLS,
    DicomError,
    probe_hip,
    read_image_header,
    regular_file_problem,
    side_of_protocol,
)
from hipoa.geometry import inside_image
from hipoa.labels import mask_problem
from hipoa.patterns import check_image_patterns, fill_pattern, pattern_to_glob, wildcards
from hipoa.points import N_POINTS, PointsError, read_pts
from hipoa.progress import Progress
from hipoa.sites import DEFAULT_SITES

log = logging.getLogger(__name__)

EID_PATTERN = re.compile(r"-?[A-Za-z0-9][A-Za-z0-9._-]*")
"""What an eid may be: letters, digits, ``.``, ``_``, ``-`` (a leading ``-`` too, as UKB's
withdrawn ids), no spaces: a safe file name and one field of a whitespace-separated table."""

DEFAULT_LABELS: tuple[int, ...] = tuple(s.label for s in DEFAULT_SITES)

MANIFEST_SCHEMA = pa.schema(
    [
        ("eid", pa.string()),
        ("instance", pa.int16()),
        ("array", pa.int16()),
        ("side", pa.string()),
        ("image", pa.string()),
        ("member", pa.string()),
        ("points_auto", pa.string()),
        ("points_manual", pa.string()),
        ("mask", pa.string()),
        ("rows", pa.int32()),
        ("cols", pa.int32()),
        ("spacing_row_mm", pa.float64()),
        ("spacing_col_mm", pa.float64()),
        ("manufacturer", pa.string()),
        ("manufacturer_model", pa.string()),
        ("device_serial", pa.string()),
        ("software_versions", pa.string()),
        ("annotated", pa.bool_()),
        ("shard", pa.int32()),
        ("qc_reason", pa.string()),
    ]
)
"""Columns and Arrow types of ``results/manifest/{side}.parquet`` (docs/DESIGN.md)."""

MANIFEST_COLUMNS: tuple[str, ...] = tuple(MANIFEST_SCHEMA.names)

_PANDAS_DTYPES = {
    "eid": "string",
    "instance": "int16",
    "array": "int16",
    "side": "string",
    "image": "string",
    "member": "string",
    "points_auto": "string",
    "points_manual": "string",
    "mask": "string",
    "rows": "Int32",
    "cols": "Int32",
    "spacing_row_mm": "float64",
    "spacing_col_mm": "float64",
    "manufacturer": "string",
    "manufacturer_model": "string",
    "device_serial": "string",
    "software_versions": "string",
    "annotated": "bool",
    "shard": "int32",
    "qc_reason": "string",
}



def shard_of(eid: str | int, n_shards: int) -> int:
    """Shard of a participant: ``blake2b(str(eid), 8 bytes, big-endian) mod n_shards``.

    Every image of a participant lands in the same shard, independent of the rest of the cohort,
    so adding participants never moves existing ones.

    Args:
        eid: Participant id (its string form is hashed, so ``9000123`` and ``"9000123"`` agree).
        n_shards: Number of shards, at least 1.

    Returns:
        An int in ``[0, n_shards)``.
    """
    if int(n_shards) < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    digest = hashlib.blake2b(str(eid).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % int(n_shards)


# ---------------------------------------------------------------------------------------------
# Withdrawals


WITHDRAWN_HEADERS = frozenset({"eid", "f.eid", "n_eid", "iid"})
"""Header names (compared lower-case) that a withdrawal file's first line may hold although they
look like eids; UK Biobank eids are numbers."""


class Withdrawals(frozenset):
    """The withdrawn participants' keys (:func:`withdrawal_key`), as :func:`read_withdrawn` read them.

    Attributes:
        numeric: Entries not written as canonical eids but equal to one as an integer
            (``09751499``, ``9751499.0``, ``9.751499e6``): matched by that integer.
    """

    numeric: int = 0


_DIGITS = re.compile(r"[0-9]+")
_CANONICAL_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")
_MAX_EID_DIGITS = 30
"""More digits than any eid has: such a number is refused, not converted."""
_NUMBER = re.compile(r"[+-]?(?P<mantissa>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE](?P<exponent>[+-]?[0-9]+))?")


def withdrawal_key(eid: object) -> str:
    """What a withdrawal entry and a participant's eid are compared by: an all-digit eid as its
    integer (``09751499`` and ``9751499`` are one participant for withdrawal: a tool that drops
    or adds leading zeros must not release anyone), any other eid as written."""
    text = str(eid).strip()
    return str(int(text)) if _DIGITS.fullmatch(text) else text


def _numeric_entry(value: str) -> tuple[str | None, str]:
    """``(key, "")`` for a number that is exactly one integer eid, ``(None, why)`` for a number that
    is not, ``(None, "")`` for text that is no number."""
    m = _NUMBER.fullmatch(value)
    if m is None:
        return None, ""
    from decimal import Decimal, InvalidOperation

    try:
        number = Decimal(value)
    except InvalidOperation:
        return None, ""
    if number.adjusted() >= _MAX_EID_DIGITS:  # before int(): 1e999999999 is a billion digits
        return None, f"a number of more than {_MAX_EID_DIGITS} digits, too large to be an eid"
    if number != number.to_integral_value():
        return None, "a number that is not an integer"
    integer = str(int(number))
    if m.group("exponent") is not None:
        significant = m.group("mantissa").replace(".", "").lstrip("0")
        if len(significant) < len(integer):
            return None, (f"a number in exponent notation with {len(significant)} significant digits, which cannot "
                          f"identify a {len(integer)}-digit eid (a spreadsheet's rounding?)")
    return integer, ""


def _written(value: str) -> str:
    """How a refused entry is named in the error: its shape with every digit written ``#``
    (``9.75e6`` as ``'#.##e#'``, at most 40 characters), so the line is recognised but no eid in it
    reaches a log."""
    shape = re.sub(r"[0-9]", "#", value)
    return ascii(shape if len(shape) <= 40 else shape[:39] + "~")


def read_withdrawn(path: str | Path) -> Withdrawals:
    """The participants in a UK Biobank withdrawal file: those who withdrew consent.

    UKB sends one eid per line (plain text or a one-column CSV); spreadsheets and data frames
    rewrite it. Read as written, each non-empty line (surrounding whitespace, Windows or old Mac
    line endings, blank lines and a UTF-8 byte-order mark tolerated; double quotes around the
    value and one trailing comma dropped) is one of:

    - a canonical eid: an integer without leading zeros (``9751499``), or any other
      :data:`EID_PATTERN` that is no number (a negative UKB placeholder ``-3``, a study's own
      id): matched exactly;
    - a number equal to exactly one integer but not written as one: leading zeros
      (``09751499``), a sign (``+9751499``), a decimal part of zeros (``9751499.0``), exponent
      notation that writes every digit of the integer (``9.751499e6``, ``9.751499E+06``):
      **matched by that integer, with one WARNING giving how many entries were**;
    - a header on the first line (one of :data:`WITHDRAWN_HEADERS`, e.g. ``eid``, ``f.eid``, or
      any text with a letter and no run of six digits that is neither an eid nor a number):
      skipped.

    Anything else is **refused before any image is read**, with one error naming the file, the
    line number and the entry's shape (digits written ``#``: no eid reaches the log):

    - a number that is not an integer (``9751499.5``);
    - exponent notation whose mantissa has fewer significant digits (leading zeros not counted)
      than the integer it denotes (``9.75e6`` = 9750000 from 3 digits: a spreadsheet's rounding
      of any of a thousand participants; ``9.75149e6`` too, though 9751490 is a possible eid:
      write ``9.751490e6`` or, better, export the column as text);
    - a number of more than :data:`_MAX_EID_DIGITS` digits;
    - a line that is no eid (a space, ``;`` or a second column inside it, other characters),
      the first line included when it holds six digits in a row (``9751499,withdrawn``).

    An empty file means no withdrawals. Entries that match no image are not an error: ingest
    counts them (``withdrawn_unmatched_entries``).

    Args:
        path: The withdrawal file.

    Returns:
        The withdrawn participants' keys (:class:`Withdrawals`, a frozenset of strings).

    Raises:
        ValueError: the path is not a regular file or not text, or a line is refused; the
            message names the file, the line number, the entry's shape and why, never an eid.
    """
    problem = regular_file_problem(path)
    if problem:
        raise ValueError(f"withdrawal file {path}: {problem}, expected a text file with one eid per line")
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"withdrawal file {path}: not UTF-8 text (byte {exc.start}), expected one eid per line"
        ) from None
    keys: set[str] = set()
    numeric = 0
    seen_first = False
    for number, line in enumerate(text.splitlines(), start=1):  # splitlines: \n, \r\n and \r
        value = line.strip()
        if not value:
            continue
        first, seen_first = not seen_first, True
        value = value.strip('"').rstrip(",").strip().strip('"').strip()  # a one-column CSV: "9234567" or 9234567,
        if first and value.lower() in WITHDRAWN_HEADERS:
            continue
        if _CANONICAL_INTEGER.fullmatch(value):
            keys.add(value)
            continue
        key, why = _numeric_entry(value)
        if key is not None:
            keys.add(key)
            numeric += 1
            continue
        if why:
            raise ValueError(
                f"withdrawal file {path}: line {number}, written {_written(value)}, is {why}; nothing was read. "
                "Write the eids as integers (e.g. export the column as text), then run again"
            )
        if EID_PATTERN.fullmatch(value):  # e.g. a negative placeholder eid, or a study's own ids
            keys.add(value)
        elif not first or not re.search(r"[A-Za-z]", value) or re.search(r"[0-9]{6}", value):
            # a header holds a letter and no run of six digits: "9751499,withdrawn" is an eid, refused
            bad = next((i for i, c in enumerate(value) if not re.fullmatch(r"[A-Za-z0-9._-]", c)), 0)
            raise ValueError(
                f"withdrawal file {path}: line {number}, written {_written(value)}, is not an eid (letters, digits, "
                f"'.', '_', '-'; the first unexpected character at column {bad + 1}); nothing was read"
            )
    if numeric:
        log.warning(
            "withdrawal file %s: %d entries are not written as canonical eids (leading zeros, a sign, a decimal "
            "part, exponent notation) and are matched by their integer value", path, numeric,
        )
    out = Withdrawals(keys)
    out.numeric = numeric
    return out


def _withdrawn_in(path: str, withdrawn: Collection[str]) -> str | None:
    """The withdrawn key that a run of letters and digits in ``path`` is, if any."""
    return next((withdrawal_key(t) for t in re.findall(r"[A-Za-z0-9]+", str(path)) if withdrawal_key(t) in withdrawn),
                None)


def _withdrawn_set(withdrawn: Collection[str] | None) -> frozenset[str]:
    if withdrawn is None:
        return frozenset()
    if isinstance(withdrawn, (str, bytes, Path)):
        raise TypeError(
            f"withdrawn: expected a set of eids (read the file with read_withdrawn), got {type(withdrawn).__name__}"
        )
    return frozenset(withdrawal_key(e) for e in withdrawn)


# ---------------------------------------------------------------------------------------------
# One image


@dataclass(frozen=True)
class _Job:
    eid: str
    instance: int
    array: int
    side: str
    image: str
    member: str  # "" = find the hip in the zip (or a plain DICOM)
    points_auto: str
    points_manual: str
    mask: str
    n_points: int
    limits: qc.Limits = qc.Limits()
    labels: tuple[int, ...] = DEFAULT_LABELS


def check_points(path: str, n_points: int, rows: int, cols: int) -> tuple[str, str]:
    """``(qc_reason, detail)`` for a points file; ``("", "")`` when it is usable."""
    if not path:
        return qc.POINTS_MISSING, "(no pattern): no points file"
    problem = regular_file_problem(path)
    if problem.startswith("no such file"):
        return qc.POINTS_MISSING, f"{path}: {problem}"
    if problem:
        return qc.POINTS_INVALID, f"{path}: {problem}, expected a .pts file"
    try:
        pts = read_pts(path, n_points=n_points)
    except PointsError as exc:
        return qc.POINTS_INVALID, str(exc)
    except OSError as exc:
        return qc.POINTS_INVALID, f"{path}: cannot read: {exc}"
    inside = inside_image(pts[:, 0], pts[:, 1], (rows, cols))
    if not inside.all():
        i = int(np.flatnonzero(~inside)[0])
        return qc.POINTS_OUTSIDE_IMAGE, (
            f"{path}: {int((~inside).sum())} point(s) outside the {rows} x {cols} image, "
            f"first point {i} at ({pts[i, 0]:.7g}, {pts[i, 1]:.7g})"  # compact: 1e+308, not 309 digits
        )
    return "", ""


def _ingest_one(job: _Job) -> tuple[dict[str, object], list[str]]:
    """Manifest row of one image plus warnings for the log; never raises for a bad input."""
    notes: list[str] = []
    row: dict[str, object] = {
        "eid": job.eid,
        "instance": job.instance,
        "array": job.array,
        "side": job.side,
        "image": job.image,
        "member": job.member,
        "points_auto": job.points_auto,
        "points_manual": "",
        "mask": "",
        "rows": pd.NA,
        "cols": pd.NA,
        "spacing_row_mm": np.nan,
        "spacing_col_mm": np.nan,
        **{field: pd.NA for field in DEVICE_TAGS},
        "annotated": False,
        "qc_reason": "",
    }
    name = f"{job.eid}_{job.instance}_{job.side}"
    header = None
    try:
        if job.image.lower().endswith(".zip") and not job.member:
            member, header = probe_hip(job.image, job.side, job.limits)
            row["member"] = member
            notes.extend(f"{name}: {note}" for note in header.notes)
        else:
            header = read_image_header(job.image, job.member or None, limits=job.limits)
            side = side_of_protocol(header.protocol)
            if side is not None and side != job.side:
                notes.append(
                    f"{name}: {header.source} has protocol {header.protocol!r}, "
                    f"but the row says side {job.side} ({SIDE_PROTOCOLS[job.side]})"
                )
    except DicomError as exc:
        row["qc_reason"] = exc.reason
        row["member"] = exc.member or job.member
        notes.append(f"{name}: {exc}" if exc.reason in str(exc) else f"{name}: {exc.reason}: {exc}")
    except Exception as exc:  # noqa: BLE001 - one bad input must never stop a 40k-image ingest
        row["qc_reason"] = qc.UNREADABLE_DICOM
        detail = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        notes.append(f"{name}: {qc.UNREADABLE_DICOM}: {job.image}: {type(exc).__name__}: {detail}")

    if header is not None:
        row["rows"], row["cols"] = header.rows, header.cols
        row["spacing_row_mm"], row["spacing_col_mm"] = header.spacing_mm
        for field in DEVICE_TAGS:  # "" (tag absent) is NA in the manifest, like an unread image
            row[field] = getattr(header, field) or pd.NA
        reason, detail = check_points(job.points_auto, job.n_points, header.rows, header.cols)
        if reason:
            row["qc_reason"] = reason
            notes.append(f"{name}: {reason}: {detail}")

    row["_mask_problem"] = ""
    if job.mask and regular_file_problem(job.mask) != "no such file":  # no file: not annotated
        shape = (header.rows, header.cols) if header is not None else None
        problem, detail = mask_problem(job.mask, shape, job.labels)
        if problem:
            row["_mask_problem"] = problem
            notes.append(f"{name}: mask not used for training ({problem}): {detail}")
        else:
            row["mask"] = job.mask
            row["annotated"] = True

    if job.points_manual:
        problem = regular_file_problem(job.points_manual)
        if not problem:
            rows = header.rows if header is not None else 1 << 30
            cols = header.cols if header is not None else 1 << 30
            reason, detail = check_points(job.points_manual, job.n_points, rows, cols)
            if reason:
                notes.append(f"{name}: manual points not used ({reason}): {detail}")
            else:
                row["points_manual"] = job.points_manual
        elif row["annotated"]:
            notes.append(f"{name}: annotated, but no manual points at {job.points_manual} ({problem})")
    return row, notes


def _run(jobs: list[_Job], workers: int, side: str) -> Iterator[tuple[dict[str, object], list[str]]]:
    progress = Progress(len(jobs), f"ingest {side}", log, unit="images")
    if workers > 1 and len(jobs) > 1:
        chunksize = max(1, min(64, len(jobs) // (4 * workers)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(_ingest_one, jobs, chunksize=chunksize):
                progress.update()
                yield result
    else:
        for job in jobs:
            result = _ingest_one(job)
            progress.update()
            yield result
    progress.close()


# ---------------------------------------------------------------------------------------------
# Jobs from the UKB layout or a manifest


def _layout_jobs(
    images: str,
    points_auto: str | None,
    points_manual: str | None,
    masks: str | None,
    side: str,
    n_points: int,
    withdrawn: frozenset[str] = frozenset(),
) -> tuple[list[_Job], list[str], Counter[str]]:
    """Jobs of the images matching the pattern, the paths the glob found but the pattern
    cannot parse (or whose eid is not an :data:`EID_PATTERN`), and the images left out because
    their eid is ``withdrawn`` ({eid: count}, never logged)."""
    image_pattern = fill_pattern(images, **{"side": side}) if "{side}" in images else images
    glob_pattern, regex = pattern_to_glob(image_pattern)
    for p in (points_auto, points_manual, masks):
        if p:
            wildcards(p)
    check_image_patterns(images, {"--points-auto": points_auto or "", "--points-manual": points_manual or "",
                                  "--masks": masks or ""}, [side])
    paths = sorted(glob.glob(glob_pattern))
    jobs: list[_Job] = []
    unmatched: list[str] = []
    removed: Counter[str] = Counter()
    for path in paths:
        m = regex.fullmatch(path)
        if m is not None and withdrawal_key(m.group("eid")) in withdrawn:  # before anything can log the path
            removed[withdrawal_key(m.group("eid"))] += 1
            continue
        if m is None or not EID_PATTERN.fullmatch(m.group("eid")):
            named = _withdrawn_in(path, withdrawn) if withdrawn else None
            if named is not None:  # unparsed, but its name holds a withdrawn eid: counted, never named
                removed[named] += 1
                continue
            why = "the pattern cannot parse it" if m is None else f"its eid {m.group('eid')!r} is not a valid eid"
            log.warning("%s: found by the glob %s but %s (pattern %s); no row", path, glob_pattern, why, images)
            unmatched.append(path)
            continue
        values = {
            "eid": m.group("eid"),
            "instance": int(m.group("instance")) if "instance" in m.groupdict() else 0,
            "array": int(m.group("array")) if "array" in m.groupdict() else 0,
            "side": side,
        }
        jobs.append(
            _Job(
                eid=values["eid"],
                instance=values["instance"],
                array=values["array"],
                side=side,
                image=path,
                member="",
                points_auto=fill_pattern(points_auto, **values) if points_auto else "",
                points_manual=fill_pattern(points_manual, **values) if points_manual else "",
                mask=fill_pattern(masks, **values) if masks else "",
                n_points=n_points,
            )
        )
    if not jobs and not removed:  # every image withdrawn: an empty manifest, not an error
        raise ValueError(
            f"no image matches the pattern {images!r} (glob {glob_pattern!r}"
            + (f"; {len(unmatched)} file(s) found by the glob do not parse, e.g. {unmatched[0]!r})" if unmatched else ")")
        )
    return jobs, unmatched, removed


def _refuse_shared_files(jobs: list[_Job], keys: dict[str, str]) -> None:
    """Refuse when one points or mask file is looked up for two different images (a pattern or a
    manifest column that cannot tell them apart): every such image would be measured with it."""
    for field, key in keys.items():
        owner: dict[str, tuple[str, int]] = {}
        for job in jobs:
            path = getattr(job, field)
            if not path:
                continue
            image = (job.eid, job.instance)
            first = owner.setdefault(path, image)
            if first != image:
                n = sum(1 for j in jobs if getattr(j, field) == path)
                raise ValueError(f"{key}: one file, {path}, is looked up for {n} images (of different participants "
                                 "or visits); each image needs its own (a pattern with {eid} and {instance})")


def _read_table(path: Path) -> pd.DataFrame:
    problem = regular_file_problem(path)
    if problem:
        raise ValueError(f"manifest {path}: {problem}, expected a CSV or Parquet file")
    if path.suffix.lower() in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return df


def _text(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _eid_text(value: object) -> str:
    """An eid cell as text, exactly as given (no stripping): whitespace makes it invalid."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _manifest_jobs(
    manifest: str | Path, side: str, n_points: int, withdrawn: frozenset[str] = frozenset()
) -> tuple[list[_Job], Counter[str]]:
    """Jobs of the table's rows of ``side``, and the rows left out because their eid is
    ``withdrawn`` ({eid: count}): dropped before the row is checked, so no error names them."""
    path = Path(manifest)
    df = _read_table(path)
    missing = [c for c in ("eid", "instance", "side", "image") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {missing}; has {list(df.columns)}")
    base = path.parent

    def resolve(value: object) -> str:
        text = _text(value)
        if not text:
            return ""
        p = Path(text)
        return str(p if p.is_absolute() else base / p)

    jobs: list[_Job] = []
    removed: Counter[str] = Counter()
    other = 0
    for i, rec in enumerate(df.to_dict("records")):
        line = f"{path}: row {i + 1}"
        row_side = _text(rec["side"]).upper()
        row_side = {"LEFT": "L", "RIGHT": "R"}.get(row_side, row_side)
        eid = _eid_text(rec["eid"])
        if withdrawn and withdrawal_key(eid) in withdrawn:
            if row_side == side:
                removed[withdrawal_key(eid)] += 1
            continue
        if row_side not in SIDE_PROTOCOLS:
            raise ValueError(f"{line}: side must be L or R, got {rec['side']!r}")
        if row_side != side:
            other += 1
            continue
        if not eid:
            raise ValueError(f"{line}: empty eid")
        if not EID_PATTERN.fullmatch(eid):
            raise ValueError(
                f"{line}: eid {eid!r} is not a valid eid (letters, digits, '.', '_', '-', no spaces): it would "
                "break file names and the whitespace-separated GWAS files"
            )
        try:
            instance = int(_text(rec["instance"]))
            array = int(_text(rec.get("array", "")) or 0)
        except ValueError:
            raise ValueError(
                f"{line}: instance/array must be integers, got {rec['instance']!r}/{rec.get('array', '')!r}"
            ) from None
        image = resolve(rec["image"])
        if not image:
            raise ValueError(f"{line}: empty image path")
        jobs.append(
            _Job(
                eid=eid,
                instance=instance,
                array=array,
                side=side,
                image=image,
                member=_text(rec.get("member", "")),
                points_auto=resolve(rec.get("points_auto", "")),
                points_manual=resolve(rec.get("points_manual", "")),
                mask=resolve(rec.get("mask", "")),
                n_points=n_points,
            )
        )
    log.info("%s: %d rows of side %s, %d of the other side ignored", path, len(jobs), side, other)
    return jobs, removed


# ---------------------------------------------------------------------------------------------
# The manifest


def _mark_duplicates(df: pd.DataFrame) -> None:
    """Within each (eid, instance, side), keep the first row that passes QC; later passing rows get
    ``duplicate_image`` (rows already failing keep their own reason)."""
    keys = ["eid", "instance", "side"]
    dup_keys = df.duplicated(keys, keep=False)
    if not dup_keys.any():
        return
    for _, idx in df[dup_keys].groupby(keys, sort=False).groups.items():
        kept = False
        for i in idx:
            if df.at[i, "qc_reason"] != "":
                continue
            if kept:
                df.at[i, "qc_reason"] = qc.DUPLICATE_IMAGE
                log.warning(
                    "%s_%s_%s: " + qc.DUPLICATE_IMAGE + ": %s (an earlier image of the same key is kept)",
                    df.at[i, "eid"], df.at[i, "instance"], df.at[i, "side"], df.at[i, "image"],
                )
            kept = True


def empty_manifest() -> pd.DataFrame:
    """A manifest with no rows and the manifest's columns and dtypes."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in _PANDAS_DTYPES.items()})


def build_manifest(
    *,
    images: str | None = None,
    points_auto: str | None = None,
    points_manual: str | None = None,
    masks: str | None = None,
    manifest: str | Path | None = None,
    side: str,
    n_shards: int,
    n_points: int = N_POINTS,
    workers: int = 1,
    limits: qc.Limits | None = None,
    labels: tuple[int, ...] = DEFAULT_LABELS,
    withdrawn: Collection[str] | None = None,
) -> pd.DataFrame:
    """Build the manifest of one side: one row per (eid, instance, side) image, never dropped
    (except a withdrawn participant's).

    Two entry points (exactly one):

    * UKB layout: ``images`` is a pattern with ``{eid}``, ``{instance}``, ``{array}`` (and
      optionally ``{side}``) that is globbed; ``points_auto``, ``points_manual`` and ``masks``
      are patterns resolved per image with ``{eid}``, ``{instance}``, ``{side}``, ``{array}``.
      Every zip gives one row for ``side``.
    * ``manifest``: a CSV or Parquet with ``eid, instance, side, image, points_auto,
      points_manual, mask`` (optional ``array``, ``member``); ``image`` a ``.dcm`` or a ``.zip``;
      rows of the other side are ignored; relative paths are resolved against the manifest's
      folder.

    A mask is recorded (and ``annotated`` set) only when its file exists and passes
    :func:`hipoa.labels.mask_problem`; a mask that fails is logged and counted, and the row is not annotated.
    Files the glob finds but the pattern cannot parse are logged as warnings and counted. Manual
    points are
    recorded when the file exists and is valid (right count, inside the image); otherwise the
    problem is logged and ``points_manual`` left ``""`` (the row is still phenotyped from its
    automatic points). Rows with the same (eid, instance, side) are all kept: the first one that
    passes QC stays clean and the later passing ones get ``duplicate_image``.

    Withdrawn participants (``withdrawn``, e.g. from :func:`read_withdrawn`) get no row: their
    images are removed as soon as their eid is known (parsed from the path, or read from the
    table's row), before any header, points file or mask is opened and before the row is
    validated, so no log record, warning or error names them or their files. Only the counts
    are logged (``withdrawn: 3 participants (6 images) removed before ingest``) and kept. eids
    match exactly as strings. A glob result the pattern cannot parse has no eid to match and is
    logged as before.

    Args:
        images: Image pattern (UKB layout mode).
        points_auto: Pattern of the automatic ``.pts`` files (required with ``images``).
        points_manual: Pattern of the manual ``.pts`` files, optional.
        masks: Pattern of the PNG label masks, optional.
        manifest: Manifest CSV/Parquet (manifest mode).
        side: ``"L"`` or ``"R"``.
        n_shards: Number of shards (see :func:`shard_of`).
        n_points: Points expected per ``.pts`` file.
        workers: Processes reading zips; 1 reads in this process.
        limits: Plausibility ranges and resource caps (default :class:`hipoa.qc.Limits`).
        labels: The sites' mask labels (values a mask may hold besides 0).
        withdrawn: eids of participants who withdrew consent (a set of strings; None = none).
            A path is refused (``TypeError``): read the file with :func:`read_withdrawn`.

    Returns:
        DataFrame with :data:`MANIFEST_COLUMNS`, sorted by (eid as string, instance, side), ``eid``
        a string, ``rows``/``cols`` nullable Int32, spacings float64 (NaN when unknown), the
        device columns (``manufacturer``, ``manufacturer_model``, ``device_serial``,
        ``software_versions``) nullable strings, NA when the tag is absent or the image unread.
        ``df.attrs["ingest"]`` holds ``unmatched`` (paths the pattern cannot parse),
        ``mask_problems`` ({problem: count}), ``withdrawn_participants`` (withdrawn eids that had
        images of this side) and ``withdrawn_images`` (the rows they would have had), both ints.

    Raises:
        ValueError: bad arguments, a malformed manifest table, or no image matching ``images``
            (all of them withdrawn gives an empty manifest instead).
    """
    side = str(side).strip().upper()
    if side not in SIDE_PROTOCOLS:
        raise ValueError(f"side must be 'L' or 'R', got {side!r}")
    if int(n_shards) < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if (images is None) == (manifest is None):
        raise ValueError("give exactly one of images (a UKB layout pattern) or manifest (a CSV/Parquet)")
    gone = _withdrawn_set(withdrawn)
    if images is not None:
        if not points_auto:
            raise ValueError("points_auto (a pattern) is required with images")
        jobs, unmatched, removed = _layout_jobs(images, points_auto, points_manual, masks, side, int(n_points), gone)
    else:
        (jobs, removed), unmatched = _manifest_jobs(manifest, side, int(n_points), gone), []
    names = ({"points_auto": "--points-auto", "points_manual": "--points-manual", "mask": "--masks"} if images is not None
             else {"points_auto": "column points_auto", "points_manual": "column points_manual", "mask": "column mask"})
    _refuse_shared_files(jobs, names)
    unmatched_entries = len(gone - set(removed))
    if withdrawn is not None:
        log.info(
            "withdrawn: %d participants (%d images) removed before ingest; %d eids listed, %d of them match no "
            "image of side %s", len(removed), sum(removed.values()), len(gone), unmatched_entries, side,
        )
    limits = limits if limits is not None else qc.Limits()
    labels = tuple(int(v) for v in labels)
    jobs = [dataclasses.replace(j, limits=limits, labels=labels) for j in jobs]
    jobs.sort(key=lambda j: (j.eid, j.instance, j.side, j.array, j.image))

    rows, mask_problems = _read_rows(jobs, int(workers), side)
    summary = {
        "unmatched": unmatched,
        "mask_problems": dict(sorted(mask_problems.items())),
        "withdrawn_participants": len(removed),
        "withdrawn_images": sum(removed.values()),
        "withdrawn_unmatched_entries": unmatched_entries,
        "shards": int(n_shards),
    }
    if unmatched:
        log.warning("%d file(s) found by the glob but not parsed by the pattern have no row (listed above)", len(unmatched))
    if mask_problems:
        log.warning("masks not used for training: %s", ", ".join(f"{k} {v}" for k, v in sorted(mask_problems.items())))
    df = _manifest_table(rows, side, int(n_shards))
    df.attrs["ingest"] = summary
    return df


def _read_rows(jobs: list, workers: int, side: str) -> tuple[list[dict[str, object]], Counter[str]]:
    """Every job's manifest row (its notes logged) and the count of each mask problem."""
    rows: list[dict[str, object]] = []
    mask_problems: Counter[str] = Counter()
    for row, notes in _run(jobs, workers, side):
        for note in notes:
            log.warning("%s", note)
        problem = str(row.pop("_mask_problem", ""))
        if problem:
            mask_problems[problem] += 1
        rows.append(row)
    return rows, mask_problems


def _manifest_table(rows: list[dict[str, object]], side: str, n_shards: int) -> pd.DataFrame:
    """The typed manifest of ``rows``: shards assigned, duplicates marked, reasons checked."""
    if not rows:
        log.warning("no %s images to ingest", side)
        return empty_manifest()
    df = pd.DataFrame.from_records(rows)
    df["shard"] = [shard_of(e, n_shards) for e in df["eid"]]
    df = df[list(MANIFEST_COLUMNS)].astype(_PANDAS_DTYPES)
    df = df.reset_index(drop=True)
    _mark_duplicates(df)
    qc.check_reasons(df["qc_reason"], f"manifest {side}")
    counts = df["qc_reason"].replace("", "ok").value_counts().sort_index()
    log.info("manifest %s: %d rows; %s", side, len(df), ", ".join(f"{k} {v}" for k, v in counts.items()))
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> None:
    """Write a manifest as Parquet with :data:`MANIFEST_SCHEMA`'s explicit types.

    Key-value metadata: ``hipoa_version``; ``withdrawn_participants``, ``withdrawn_images`` and
    ``withdrawn_unmatched_entries`` (entries of the list that match no image of this side), and
    ``shards`` (the shard count the rows were assigned with) (decimal strings, from ``df.attrs["ingest"]``; ``"0"`` when none were removed or no list
    was given).

    Args:
        df: As returned by :func:`build_manifest`.
        path: Output ``.parquet``; its folder is created.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {missing}")
    summary = df.attrs.get("ingest", {})
    df = df[list(MANIFEST_COLUMNS)].astype(_PANDAS_DTYPES)
    table = pa.Table.from_pandas(df, schema=MANIFEST_SCHEMA, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"hipoa_version"] = __version__.encode()
    from hipoa.provenance import provenance_json

    meta[b"provenance"] = provenance_json().encode()
    for key in ("withdrawn_participants", "withdrawn_images", "withdrawn_unmatched_entries"):
        meta[key.encode()] = str(int(summary.get(key, 0))).encode()
    if "shards" in summary:  # crop refuses a shard index outside them
        meta[b"shards"] = str(int(summary["shards"])).encode()
    table = table.replace_schema_metadata(meta)
    from hipoa.atomic import atomic_path

    with atomic_path(path) as tmp:  # the manifest appears complete or not at all
        pq.write_table(table, tmp)
