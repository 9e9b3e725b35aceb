"""ISBE / BoneFinder ``.pts`` landmark files.

Format (version 1)::

    version: 1
    n_points: 85
    {
    316.069 201.255
    ...
    }

Coordinates are x to the right and y down, in pixels of the image as stored, with (0, 0) at the
centre of the top-left pixel (so a point is in the image by :func:`hipoa.geometry.inside_image`).
Right hips are NOT pre-mirrored in the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_POINTS = 85
"""Points in the hip outline: 0-44 femur, 45-84 pelvis (the table in :mod:`hipoa.synth.anatomy`)."""
FEMUR_POINTS = np.arange(0, 45)
"""The femur's outline: medial shaft, lesser trochanter, neck, head, greater trochanter, lateral shaft."""
PELVIS_POINTS = np.arange(45, 85)
"""The pelvis: ischium, teardrop, acetabulum, ilium."""
HEAD_POINTS = np.arange(13, 32)
"""The femoral head's outline and its neck junctions (sites 15 and 30 lie in it)."""
HEAD_ARC = np.arange(16, 30)
"""The head's circular arc, for a fitted circle."""
ACETABULUM_POINTS = np.arange(59, 79)
"""Acetabular fossa and roof, up to the lateral margin (site 78)."""
REFERENCE_POINTS = (12, 39)
"""Lesser and greater trochanter: their distance is the reference length a patch is scaled by."""
SITE_CENTRES = {"inferior_femoral_head": 15, "superior_femoral_head": 30, "lateral_acetabulum": 78}
"""The point each default site's patch is centred on (:data:`hipoa.sites.DEFAULT_SITES`)."""


class PointsError(ValueError):
    """A ``.pts`` file that cannot be used; the message names the file, the line and the value."""


def _shown(text: str, limit: int = 60) -> str:
    """``text`` quoted as in a message, cut after ``limit`` characters: a coordinate written with
    400 digits or a binary line is not echoed whole."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


def _read_header(lines: list[str], path: Path) -> tuple[int, int, int]:
    """``(n_points declared, its line number, index of the line after '{')`` of a ``.pts`` header."""
    declared: int | None = None
    declared_line = 0
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("//"):
            continue
        if line == "{":
            break
        key, sep, value = line.partition(":")
        if not sep:
            raise PointsError(f"{path}: line {i}: expected 'key: value' or '{{', got {_shown(line)}")
        key = key.strip().lower()
        if key == "version":
            if value.strip() != "1":
                raise PointsError(f"{path}: line {i}: unsupported version {_shown(value.strip())} (expected 1)")
        elif key == "n_points":
            try:
                declared = int(value.strip())
                declared_line = i
            except ValueError:
                raise PointsError(f"{path}: line {i}: n_points is not an integer: {_shown(value.strip())}") from None
    else:
        last = lines[-1].strip() if lines else ""
        raise PointsError(f"{path}: line {len(lines)}: no '{{' opening the point list (last line {_shown(last)})")
    if declared is None:
        raise PointsError(f"{path}: line {i}: '{{' before any 'n_points:' header line")
    return declared, declared_line, i


def _read_coords(lines: list[str], i: int, path: Path) -> tuple[list[tuple[float, float]], list[int]]:
    """The ``x y`` pairs from line index ``i`` to the closing ``}``, and their 1-based line numbers."""
    coords: list[tuple[float, float]] = []
    line_numbers: list[int] = []
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line:
            continue
        if line == "}":
            return coords, line_numbers
        parts = line.split()
        if len(parts) != 2:
            raise PointsError(f"{path}: line {i}: expected 'x y', got {_shown(line)}")
        try:
            coords.append((float(parts[0]), float(parts[1])))
        except ValueError:
            raise PointsError(f"{path}: line {i}: coordinates are not numbers: {_shown(line)}") from None
        line_numbers.append(i)
    last = lines[-1].strip() if lines else ""
    raise PointsError(
        f"{path}: line {len(lines)}: point list not closed with '}}' (file truncated?), last line {_shown(last)}"
    )


def read_pts(path: str | Path, n_points: int | None = N_POINTS) -> np.ndarray:
    """Read a ``.pts`` file.

    Args:
        path: The file.
        n_points: Expected number of points; ``None`` accepts any count.

    Returns:
        ``(n, 2)`` float64 array, columns x (right) and y (down), in pixels.

    Raises:
        FileNotFoundError: if the file does not exist.
        PointsError: on a malformed header, a bad coordinate line, a non-finite value or a
            count that differs from ``n_points``; the message names the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig", errors="strict")
    except UnicodeDecodeError as exc:
        raise PointsError(f"{path}: not a text .pts file ({exc.reason} at byte {exc.start})") from None
    lines = text.splitlines()
    declared, declared_line, i = _read_header(lines, path)
    coords, line_numbers = _read_coords(lines, i, path)
    pts = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    # finiteness checked once for the whole array (per-value checks were half of read time)
    bad = np.flatnonzero(~np.isfinite(pts).all(axis=1))
    if bad.size:
        k = line_numbers[bad[0]]
        raise PointsError(f"{path}: line {k}: non-finite coordinate {_shown(lines[k - 1].strip())}")
    if len(coords) != declared:
        raise PointsError(
            f"{path}: line {declared_line}: header says n_points: {declared}, but the list has {len(coords)} points"
        )
    if n_points is not None and len(coords) != n_points:
        raise PointsError(f"{path}: line {declared_line}: expected {n_points} points, got {len(coords)}")
    return pts


def write_pts(path: str | Path, points: np.ndarray) -> None:
    """Write ``(n, 2)`` x, y points as a version-1 ``.pts`` file (3 decimals, as BoneFinder writes)."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{path}: points must have shape (n, 2), got {pts.shape}")
    if not np.all(np.isfinite(pts)):
        bad = np.flatnonzero(~np.isfinite(pts).all(axis=1))
        raise ValueError(f"{path}: non-finite point(s) {bad.tolist()}: first {pts[bad[0]].tolist()}")
    body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in pts)
    Path(path).write_text(f"version: 1\nn_points: {len(pts)}\n{{\n{body}\n}}\n", encoding="utf-8")

