"""Ingest: turn the UK Biobank layout (or a manifest CSV) into the per-side manifest Parquet.

One manifest row per (eid, instance, side) image, never dropped: what is already wrong with an
image is recorded in ``qc_reason`` (the first that applies, in this order):

``unreadable_zip``
    the zip cannot be opened or a member cannot be read (bad zip, CRC, missing file);
``no_hip_dicom``
    no member's ``(0018,1030) Protocol Name`` is this side's ``Left Femur``/``Right Femur``;
``unreadable_dicom``
    the hip header cannot be parsed, lacks Rows/Columns or every spacing tag, is colour or
    multi-frame, or its pixel data is missing or truncated;
``points_missing``
    no automatic ``.pts`` file;
``points_invalid``
    the automatic ``.pts`` is malformed or has the wrong number of points;
``points_outside_image``
    an automatic point lies outside the image;
``duplicate_image``
    another row of the same (eid, instance, side) is kept (see :func:`build_manifest`).

Only headers are parsed (the hip member is read to check its CRC and pixel-data length, not
decoded), so 40k zips ingest in minutes; ``workers > 1`` spreads zips over processes.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import re
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hipoa import __version__
from hipoa.dicom import SIDE_PROTOCOLS, DicomError, probe_hip, read_image_header, side_of_protocol
from hipoa.points import N_POINTS, PointsError, points_inside, read_pts
from hipoa.progress import Progress

log = logging.getLogger(__name__)

QC_REASONS: tuple[str, ...] = (
    "unreadable_zip",
    "no_hip_dicom",
    "unreadable_dicom",
    "points_missing",
    "points_invalid",
    "points_outside_image",
    "duplicate_image",
)
"""Every ``qc_reason`` ingest writes, in the order they are checked."""

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
    "annotated": "bool",
    "shard": "int32",
    "qc_reason": "string",
}

_WILDCARD = re.compile(r"\{([^{}]*)\}")
_WILDCARD_REGEX = {"eid": r"[^/\\]+?", "instance": r"\d+", "array": r"\d+", "side": r"[LR]"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def shard_of(eid: str | int, n_shards: int) -> int:
    """Shard of a participant: ``blake2b(str(eid), 8 bytes, big-endian) mod n_shards``.

    Every image of a participant lands in the same shard, independent of the rest of the cohort,
    so adding participants never moves existing ones.

    Args:
        eid: Participant id (its string form is hashed, so ``1000123`` and ``"1000123"`` agree).
        n_shards: Number of shards, at least 1.

    Returns:
        An int in ``[0, n_shards)``.
    """
    if int(n_shards) < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    digest = hashlib.blake2b(str(eid).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % int(n_shards)


# ---------------------------------------------------------------------------------------------
# Patterns


def _wildcards(pattern: str) -> list[str]:
    names = _WILDCARD.findall(pattern)
    bad = sorted({n for n in names if n not in _WILDCARD_REGEX})
    if bad:
        raise ValueError(f"pattern {pattern!r}: unknown wildcard(s) {bad}; allowed: eid, instance, array, side")
    return names


def fill_pattern(pattern: str, **values: object) -> str:
    """Replace ``{eid}``, ``{instance}``, ``{array}``, ``{side}`` in ``pattern`` with ``values``.

    Raises:
        ValueError: the pattern holds a wildcard that is unknown or not given.
    """
    for name in _wildcards(pattern):
        if name not in values:
            raise ValueError(f"pattern {pattern!r}: no value for {{{name}}}")
    return _WILDCARD.sub(lambda m: str(values[m.group(1)]), pattern)


def pattern_to_glob(pattern: str) -> tuple[str, re.Pattern[str]]:
    """Turn an image pattern into a glob and a regex that parses its wildcards back.

    ``ukb/{eid}_20158_{instance}_{array}.zip`` -> ``ukb/*_20158_*_*.zip`` and a regex with named
    groups ``eid`` (any text without a slash), ``instance`` and ``array`` (digits), ``side``
    (``L``/``R``). A wildcard that repeats must match the same text each time.

    Raises:
        ValueError: unknown wildcard, or no ``{eid}``.
    """
    names = _wildcards(pattern)
    if "eid" not in names:
        raise ValueError(f"image pattern {pattern!r} has no {{eid}}")
    glob_parts: list[str] = []
    regex_parts: list[str] = []
    seen: set[str] = set()
    pos = 0
    for m in _WILDCARD.finditer(pattern):
        literal = pattern[pos : m.start()]
        glob_parts += [glob.escape(literal), "*"]
        regex_parts.append(re.escape(literal))
        name = m.group(1)
        regex_parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>{_WILDCARD_REGEX[name]})")
        seen.add(name)
        pos = m.end()
    glob_parts.append(glob.escape(pattern[pos:]))
    regex_parts.append(re.escape(pattern[pos:]))
    return "".join(glob_parts), re.compile("".join(regex_parts))


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


def _png_size(path: Path) -> tuple[int, int] | None:
    """``(rows, cols)`` from a PNG's IHDR chunk, or None if it is not a PNG."""
    with open(path, "rb") as fp:
        head = fp.read(24)
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def _check_points(path: str, n_points: int, rows: int, cols: int) -> tuple[str, str]:
    """``(qc_reason, detail)`` for a points file; ``("", "")`` when it is usable."""
    if not path or not Path(path).is_file():
        return "points_missing", f"{path or '(no pattern)'}: no such file"
    try:
        pts = read_pts(path, n_points=n_points)
    except PointsError as exc:
        return "points_invalid", str(exc)
    except OSError as exc:
        return "points_invalid", f"{path}: cannot read: {exc}"
    inside = points_inside(pts, rows, cols)
    if not inside.all():
        i = int(np.flatnonzero(~inside)[0])
        return "points_outside_image", (
            f"{path}: {int((~inside).sum())} point(s) outside the {rows} x {cols} image, "
            f"first point {i} at ({pts[i, 0]:.3f}, {pts[i, 1]:.3f})"
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
        "annotated": False,
        "qc_reason": "",
    }
    name = f"{job.eid}_{job.instance}_{job.side}"
    header = None
    try:
        if job.image.lower().endswith(".zip") and not job.member:
            member, header = probe_hip(job.image, job.side)
            row["member"] = member
        else:
            header = read_image_header(job.image, job.member or None)
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
        row["qc_reason"] = "unreadable_dicom"
        notes.append(f"{name}: unreadable_dicom: {job.image}: {type(exc).__name__}: {exc}")

    if header is not None:
        row["rows"], row["cols"] = header.rows, header.cols
        row["spacing_row_mm"], row["spacing_col_mm"] = header.spacing_mm
        reason, detail = _check_points(job.points_auto, job.n_points, header.rows, header.cols)
        if reason:
            row["qc_reason"] = reason
            notes.append(f"{name}: {reason}: {detail}")

    if job.mask and Path(job.mask).is_file():
        row["mask"] = job.mask
        row["annotated"] = True
        if header is not None:
            try:
                size = _png_size(Path(job.mask))
            except OSError as exc:
                size = None
                notes.append(f"{name}: mask {job.mask} cannot be read: {exc}")
            if size != (header.rows, header.cols):
                notes.append(
                    f"{name}: mask {job.mask} is {size} (rows, cols), "
                    f"the image is ({header.rows}, {header.cols})"
                )

    if job.points_manual:
        if Path(job.points_manual).is_file():
            rows = header.rows if header is not None else 1 << 30
            cols = header.cols if header is not None else 1 << 30
            reason, detail = _check_points(job.points_manual, job.n_points, rows, cols)
            if reason:
                notes.append(f"{name}: manual points not used ({reason}): {detail}")
            else:
                row["points_manual"] = job.points_manual
        elif row["annotated"]:
            notes.append(f"{name}: annotated, but no manual points at {job.points_manual}")
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
) -> list[_Job]:
    image_pattern = fill_pattern(images, **{"side": side}) if "{side}" in images else images
    glob_pattern, regex = pattern_to_glob(image_pattern)
    for p in (points_auto, points_manual, masks):
        if p:
            _wildcards(p)
    paths = sorted(glob.glob(glob_pattern))
    jobs: list[_Job] = []
    for path in paths:
        m = regex.fullmatch(path)
        if m is None:
            log.debug("%s: matches the glob %s but not the pattern %s, skipped", path, glob_pattern, images)
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
    if not jobs:
        raise ValueError(f"no image matches the pattern {images!r} (glob {glob_pattern!r})")
    return jobs


def _read_table(path: Path) -> pd.DataFrame:
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


def _manifest_jobs(manifest: str | Path, side: str, n_points: int) -> list[_Job]:
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
    other = 0
    for i, rec in enumerate(df.to_dict("records")):
        line = f"{path}: row {i + 1}"
        row_side = _text(rec["side"]).upper()
        row_side = {"LEFT": "L", "RIGHT": "R"}.get(row_side, row_side)
        if row_side not in SIDE_PROTOCOLS:
            raise ValueError(f"{line}: side must be L or R, got {rec['side']!r}")
        if row_side != side:
            other += 1
            continue
        eid = _text(rec["eid"])
        if not eid:
            raise ValueError(f"{line}: empty eid")
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
    return jobs


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
                df.at[i, "qc_reason"] = "duplicate_image"
                log.warning(
                    "%s_%s_%s: duplicate_image: %s (an earlier image of the same key is kept)",
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
) -> pd.DataFrame:
    """Build the manifest of one side: one row per (eid, instance, side) image, never dropped.

    Two entry points (exactly one):

    * UKB layout: ``images`` is a pattern with ``{eid}``, ``{instance}``, ``{array}`` (and
      optionally ``{side}``) that is globbed; ``points_auto``, ``points_manual`` and ``masks``
      are patterns resolved per image with ``{eid}``, ``{instance}``, ``{side}``, ``{array}``.
      Every zip gives one row for ``side``.
    * ``manifest``: a CSV or Parquet with ``eid, instance, side, image, points_auto,
      points_manual, mask`` (optional ``array``, ``member``); ``image`` a ``.dcm`` or a ``.zip``;
      rows of the other side are ignored; relative paths are resolved against the manifest's
      folder.

    A mask is recorded (and ``annotated`` set) only when its file exists. Manual points are
    recorded when the file exists and is valid (right count, inside the image); otherwise the
    problem is logged and ``points_manual`` left ``""`` (the row is still phenotyped from its
    automatic points). Rows with the same (eid, instance, side) are all kept: the first one that
    passes QC stays clean and the later passing ones get ``duplicate_image``.

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

    Returns:
        DataFrame with :data:`MANIFEST_COLUMNS`, sorted by (eid as string, instance, side), ``eid``
        a string, ``rows``/``cols`` nullable Int32, spacings float64 (NaN when unknown).

    Raises:
        ValueError: bad arguments, a malformed manifest table, or no image matching ``images``.
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
    if images is not None:
        if not points_auto:
            raise ValueError("points_auto (a pattern) is required with images")
        jobs = _layout_jobs(images, points_auto, points_manual, masks, side, int(n_points))
    else:
        jobs = _manifest_jobs(manifest, side, int(n_points))
    jobs.sort(key=lambda j: (j.eid, j.instance, j.side, j.array, j.image))

    rows: list[dict[str, object]] = []
    for row, notes in _run(jobs, int(workers), side):
        for note in notes:
            log.warning("%s", note)
        rows.append(row)
    if not rows:
        log.warning("no %s images to ingest", side)
        return empty_manifest()
    df = pd.DataFrame.from_records(rows)
    df["shard"] = [shard_of(e, n_shards) for e in df["eid"]]
    df = df[list(MANIFEST_COLUMNS)].astype(_PANDAS_DTYPES)
    df = df.reset_index(drop=True)
    _mark_duplicates(df)
    counts = df["qc_reason"].replace("", "ok").value_counts().sort_index()
    log.info("manifest %s: %d rows; %s", side, len(df), ", ".join(f"{k} {v}" for k, v in counts.items()))
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> None:
    """Write a manifest as Parquet with :data:`MANIFEST_SCHEMA`'s explicit types.

    Args:
        df: As returned by :func:`build_manifest`.
        path: Output ``.parquet``; its folder is created.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {missing}")
    df = df[list(MANIFEST_COLUMNS)].astype(_PANDAS_DTYPES)
    table = pa.Table.from_pandas(df, schema=MANIFEST_SCHEMA, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"hipoa_version"] = __version__.encode()
    table = table.replace_schema_metadata(meta)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
