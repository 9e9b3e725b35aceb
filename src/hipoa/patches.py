"""Landmark-normalised patches: geometry, sampling, normalisation, and one shard's Zarr store.

Geometry
--------
Points are pixels of the image *as stored* (``.pts`` convention): x to the right, y down, (0, 0)
at the centre of the top-left pixel. A pixel covers ``x - 0.5 .. x + 0.5``, so a point is in the
image when ``-0.5 <= x <= cols - 0.5`` and ``-0.5 <= y <= rows - 0.5``.

Right hips (``side == "R"``) are mirrored into the left orientation, image, points and mask
together: ``x' = cols - 1 - x``, ``image[:, ::-1]``. All patches are therefore left hips.

Work happens in millimetres so that anisotropic pixels are handled: ``X = x * dx``, ``Y = y * dy``
with ``dx`` the column spacing and ``dy`` the row spacing (``HipImage.spacing_mm == (dy, dx)``).
For a site (Ebsim et al., section 3):

- reference length ``L_mm = |P[ref0] - P[ref1]|`` in mm (points 12 and 39 by default);
- patch pixel size ``s = dp * L_mm`` in mm, square;
- patch pixel ``(u, v)`` (u = column, v = row), centre ``c = (S - 1) / 2``, axis-aligned in the
  mirrored frame: ``X' = X'c + (u - c) * s``, ``Y = Yc + (v - c) * s``.

These compose, mirroring included, into one 2x3 affine from ``(u, v, 1)`` to the STORED image's
pixel ``(x, y)``::

    left:  x = xc + (u - c) * s / dx        right:  x = xc - (u - c) * s / dx
           y = yc + (v - c) * s / dy                y = yc + (v - c) * s / dy

so predictions map back to the original image without knowing the side, and the area of one
patch pixel is ``|det(A[:, :2])| * dx * dy = s**2`` mm^2. Mirroring is done by the affine (a
negative x scale), never by copying the image.

Sampling: bilinear for images (``order=1``), nearest for masks (``order=0``), at the patch pixel
centres. A patch pixel is *inside* when its centre falls on an image pixel (the bounds above);
inside pixels within half a pixel of the border use the edge pixel, outside pixels get ``fill``.
``inside_fraction`` is the share of inside pixels of the 128 x 128 patch.

Normalisation
-------------
Per-patch z-score over the inside pixels of the 128 x 128 core: ``(p - mean) / max(std, 1e-6)``
(pixel units of the DICOM, modality LUT applied); outside pixels are then set to 0, which is the
patch mean. A context patch uses its core's mean and std, so its centre crop equals the 128 patch
exactly. Stored as float16 (z-scores need no more precision).

Context for augmentation
------------------------
Training augments with rotations up to +-0.1 rad, scalings up to +-10% and centre displacements up
to +-0.05 * 128 = 6.4 px (paper, section 4). Resampling the 128 patch itself would leave blank
corners, and re-reading the DICOMs at training time would tie training to the zips. So patches
from manual points are stored as a larger *context* crop, C x C with C = 176 (default) at the same
pixel size; the 128 patch is its centre crop at offset ``(C - 128) / 2 = 24``. The farthest
context pixel an augmented patch needs is at half-width
``64 * 1.1 * (cos 0.1 + sin 0.1) + 6.4 * sqrt(2) = 86.1 < 88 = C / 2``
(``augmentation_half_width``), so augmentation never leaves the context. The affine stored with a
context patch maps context pixel coordinates.

Which points made a patch
-------------------------
``auto/`` patches come from the automatic points (what evaluation and phenotyping use, as the
paper's test sets did) for every manifest row. ``manual/`` patches come from the manual points of
annotated rows (what training learns from). The reference length, centre and mirroring always
come from the same point set as the patch.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from hipoa import __version__, qc
from hipoa.dicom import read_image
from hipoa.points import PointsError, read_pts
from hipoa.progress import Progress
from hipoa.sites import PATCH_SIZE, Site

log = logging.getLogger(__name__)

CONTEXT_SIZE = 176
"""Side of the stored manual-point context crop in patch pixels (see module docstring)."""

MIN_INSIDE = 0.75
"""Default smallest fraction of a 128 patch that must lie in the image."""

NORM_EPS = 1e-6
"""Floor on the patch standard deviation (pixel units), so a constant patch normalises to 0."""

FILL = 0.0
"""Value of outside-image pixels in a normalised patch (= the patch mean)."""

AUGMENT_ROTATION = 0.1
"""Largest training rotation in radians (paper, section 4)."""
AUGMENT_SCALE = 0.1
"""Largest training scaling as a fraction (paper, section 4)."""
AUGMENT_DISPLACEMENT = 0.05
"""Largest training centre displacement as a fraction of the patch width (paper, section 4.4)."""

NORMALISATION = (
    "per-patch z-score over the in-image pixels of the 128x128 core: (p - mean) / max(std, 1e-6), "
    "p in DICOM pixel units after the modality LUT; outside-image pixels set to 0 (the patch mean) "
    "after normalisation; a context patch uses its core's mean and std; stored as float16"
)

CONTEXT_NOTE = (
    "manual/ patches are context crops of C x C at the same pixel size as the 128 patch, which is "
    "their centre crop at offset (C-128)/2; C=176 covers training augmentation (rotation +-0.1 rad, "
    "scale +-10%, centre displacement +-0.05*128 px) without blank corners: the farthest needed "
    "context pixel is at half-width 64*1.1*(cos 0.1 + sin 0.1) + 6.4*sqrt(2) = 86.1 < 88"
)

AFFINE_NOTE = (
    "affine (2, 3) float64 maps patch pixel (u = column, v = row, 1) to the stored (unmirrored) "
    "image's pixel (x right, y down, (0,0) = centre of the top-left pixel); right hips have a "
    "negative x scale (mirrored into left orientation); patch pixel area in mm^2 = "
    "|det(affine[:, :2])| * spacing_row_mm * spacing_col_mm"
)

POINTS_SOURCE = {
    "auto": "automatic points (manifest points_auto) for every manifest row: evaluation and phenotyping",
    "manual": "manual points (manifest points_manual) for annotated rows only: training",
}


# --------------------------------------------------------------------------------------------
# geometry


def mirror_points(points: np.ndarray, cols: int) -> np.ndarray:
    """Mirror points left-right in an image of ``cols`` columns: ``x' = cols - 1 - x``.

    Args:
        points: ``(n, 2)`` x, y in pixels.
        cols: Image width in pixels.

    Returns:
        ``(n, 2)`` float64, a new array.
    """
    out = np.array(points, dtype=np.float64, copy=True)
    out[:, 0] = cols - 1 - out[:, 0]
    return out


def reference_length_mm(points: np.ndarray, site: Site, spacing_mm: tuple[float, float]) -> float:
    """Distance in mm between the site's two reference points.

    Args:
        points: ``(n, 2)`` x, y in stored-image pixels.
        site: Gives the reference point indices.
        spacing_mm: ``(dy, dx)``: row and column spacing in mm.

    Returns:
        The length in mm (mirroring does not change it).
    """
    dy, dx = spacing_mm
    a, b = points[site.reference[0]], points[site.reference[1]]
    return float(math.hypot((a[0] - b[0]) * dx, (a[1] - b[1]) * dy))


def patch_affine(
    points: np.ndarray,
    site: Site,
    spacing_mm: tuple[float, float],
    cols: int,
    side: str,
    size: int = PATCH_SIZE,
) -> np.ndarray:
    """The 2x3 affine from patch pixel ``(u, v, 1)`` to stored-image pixel ``(x, y)``.

    The patch is centred on ``points[site.centre]`` (patch pixel ``((size-1)/2, (size-1)/2)``), its
    pixels are squares of ``site.dp * reference_length_mm`` mm, and right hips are mirrored into
    the left orientation (see the module docstring for the formulas).

    Args:
        points: ``(n, 2)`` float x, y in stored-image pixels (right hips NOT mirrored).
        site: Centre, reference points and dp.
        spacing_mm: ``(dy, dx)`` row and column spacing in mm.
        cols: Image width in pixels (only used to mirror; the result does not depend on it, since
            mirroring the image and the points cancel).
        side: ``"L"`` or ``"R"``.
        size: Patch side in pixels (128, or the context size).

    Returns:
        ``(2, 3)`` float64.

    Raises:
        ValueError: on an unknown side, a non-positive spacing or a zero/non-finite reference length.
    """
    if side not in ("L", "R"):
        raise ValueError(f"side must be 'L' or 'R', got {side!r}")
    dy, dx = float(spacing_mm[0]), float(spacing_mm[1])
    if not (dx > 0 and dy > 0 and math.isfinite(dx) and math.isfinite(dy)):
        raise ValueError(f"pixel spacing must be positive and finite, got {spacing_mm}")
    pts = np.asarray(points, dtype=np.float64)
    if side == "R":
        pts = mirror_points(pts, cols)
    length = reference_length_mm(pts, site, (dy, dx))
    if not (length > 0 and math.isfinite(length)):
        raise ValueError(
            f"site {site.name}: reference length between points {site.reference} is {length} mm"
        )
    s = site.dp * length
    c = (size - 1) / 2.0
    xc, yc = pts[site.centre]
    if not (math.isfinite(xc) and math.isfinite(yc)):
        raise ValueError(f"site {site.name}: centre point {site.centre} is not finite: {pts[site.centre]}")
    # mirrored frame: x' = xc' + (u - c) * s/dx, y = yc + (v - c) * s/dy
    a = np.array([[s / dx, 0.0, xc - c * s / dx], [0.0, s / dy, yc - c * s / dy]])
    if side == "R":
        # stored x = cols - 1 - x'
        a[0] = [-a[0, 0], 0.0, cols - 1 - a[0, 2]]
    return a


def patch_coordinates(affine: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Stored-image pixel coordinates of every patch pixel centre.

    Args:
        affine: ``(2, 3)`` patch -> image affine.
        size: Patch side.

    Returns:
        ``(x, y)``, each ``(size, size)`` float64 indexed ``[v, u]``.
    """
    u = np.arange(size, dtype=np.float64)
    uu, vv = np.meshgrid(u, u)
    x = affine[0, 0] * uu + affine[0, 1] * vv + affine[0, 2]
    y = affine[1, 0] * uu + affine[1, 1] * vv + affine[1, 2]
    return x, y


def _axis_aligned(affine: np.ndarray) -> bool:
    return affine[0, 1] == 0.0 and affine[1, 0] == 0.0


def _axis_coords(affine: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    u = np.arange(size, dtype=np.float64)
    return affine[0, 0] * u + affine[0, 2], affine[1, 1] * u + affine[1, 2]


def inside_mask(affine: np.ndarray, size: int, shape: tuple[int, int]) -> np.ndarray:
    """Which patch pixels have their centre on an image pixel.

    Args:
        affine: ``(2, 3)`` patch -> image affine.
        size: Patch side.
        shape: ``(rows, cols)`` of the image.

    Returns:
        ``(size, size)`` bool, indexed ``[v, u]``.
    """
    rows, cols = shape
    if _axis_aligned(affine):
        x, y = _axis_coords(affine, size)
        in_x = (x >= -0.5) & (x <= cols - 0.5)
        in_y = (y >= -0.5) & (y <= rows - 0.5)
        return in_y[:, None] & in_x[None, :]
    x, y = patch_coordinates(affine, size)
    return (x >= -0.5) & (x <= cols - 0.5) & (y >= -0.5) & (y <= rows - 0.5)


def inside_fraction(affine: np.ndarray, size: int, shape: tuple[int, int]) -> float:
    """Fraction of the patch's pixels whose centres lie in the image (0..1)."""
    rows, cols = shape
    if _axis_aligned(affine):
        x, y = _axis_coords(affine, size)
        fx = np.count_nonzero((x >= -0.5) & (x <= cols - 0.5)) / size
        fy = np.count_nonzero((y >= -0.5) & (y <= rows - 0.5)) / size
        return float(fx * fy)
    return float(inside_mask(affine, size, shape).mean())


def _sample_axis_aligned(image: np.ndarray, affine: np.ndarray, size: int, order: int, fill: float) -> np.ndarray:
    """``sample_patch`` for an axis-aligned affine: x depends on u only and y on v only, so the
    interpolation is separable (rows, then columns) over only the pixels the patch touches."""
    rows, cols = image.shape
    x, y = _axis_coords(affine, size)  # (size,) each, monotonic
    if order == 0:
        xi = np.floor(x + 0.5).astype(np.intp)
        yi = np.floor(y + 0.5).astype(np.intp)
        np.clip(xi, 0, cols - 1, out=xi)
        np.clip(yi, 0, rows - 1, out=yi)
        out = image[yi[:, None], xi]
    else:
        x0, y0 = np.floor(x), np.floor(y)
        fx = (x - x0).astype(np.float32)
        fy = (y - y0).astype(np.float32)[:, None]
        xa, ya = x0.astype(np.intp), y0.astype(np.intp)
        xb, yb = xa + 1, ya + 1
        # edge extension (mode "nearest"); only patches at the border need it
        if min(xa[0], xa[-1]) < 0 or max(xb[0], xb[-1]) > cols - 1:
            np.clip(xa, 0, cols - 1, out=xa)
            np.clip(xb, 0, cols - 1, out=xb)
        if min(ya[0], ya[-1]) < 0 or max(yb[0], yb[-1]) > rows - 1:
            np.clip(ya, 0, rows - 1, out=ya)
            np.clip(yb, 0, rows - 1, out=yb)
        lo, hi = int(min(xa[0], xa[-1])), int(max(xb[0], xb[-1])) + 1
        sub = image[:, lo:hi]
        if sub.dtype != np.float32:
            sub = sub.astype(np.float32)
        top, bottom = sub[ya], sub[yb]  # (size, hi - lo) rows above / below each sample
        bottom -= top
        bottom *= fy
        top += bottom
        xa -= lo
        xb -= lo
        out, right = top[:, xa], top[:, xb]
        right -= out
        right *= fx
        out += right
    inside_x = -0.5 <= min(x[0], x[-1]) and max(x[0], x[-1]) <= cols - 0.5
    inside_y = -0.5 <= min(y[0], y[-1]) and max(y[0], y[-1]) <= rows - 0.5
    if not (inside_x and inside_y):
        inside = ((y >= -0.5) & (y <= rows - 0.5))[:, None] & ((x >= -0.5) & (x <= cols - 0.5))
        out[~inside] = fill
    return out


def sample_patch(
    image: np.ndarray,
    affine: np.ndarray,
    size: int = PATCH_SIZE,
    order: int = 1,
    fill: float = 0.0,
) -> np.ndarray:
    """Sample a patch from an image through a patch -> image affine.

    Axis-aligned affines (all of this module's) use an exact separable path that touches only
    the rows and columns the patch needs; other affines (e.g. rotated ones from augmentation) go
    through ``scipy.ndimage.map_coordinates``. Both give the same values: bilinear or nearest
    interpolation at the patch pixel centres, edge pixels within half a pixel of the border,
    ``fill`` outside (see ``inside_mask``).

    Args:
        image: ``(rows, cols)`` stored image (or mask), any real dtype.
        affine: ``(2, 3)`` patch pixel ``(u, v, 1)`` -> image pixel ``(x, y)``.
        size: Patch side in pixels.
        order: 1 bilinear (images), 0 nearest (label masks).
        fill: Value for patch pixels outside the image.

    Returns:
        ``(size, size)`` indexed ``[v, u]``: float32 for ``order=1``, ``image.dtype`` for ``order=0``.
    """
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (rows, cols), got shape {image.shape}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (bilinear), got {order}")
    rows, cols = image.shape
    out_dtype = np.float32 if order == 1 else image.dtype
    if _axis_aligned(affine):
        return _sample_axis_aligned(image, affine, size, order, fill)
    x, y = patch_coordinates(affine, size)
    inside = (x >= -0.5) & (x <= cols - 0.5) & (y >= -0.5) & (y <= rows - 0.5)
    src = image.astype(np.float32, copy=False) if order == 1 else image
    out = ndimage.map_coordinates(src, [y, x], order=order, mode="nearest", output=out_dtype)
    out[~inside] = fill
    return out


def normalise_patch(
    patch: np.ndarray, inside: np.ndarray, core: tuple[slice, slice] | None = None
) -> np.ndarray:
    """Z-score a patch over the inside pixels of its core; outside pixels become 0.

    Args:
        patch: ``(S, S)`` float sampled values.
        inside: ``(S, S)`` bool, which pixels lie in the image.
        core: Slices of the 128 core within a context patch; ``None`` for the whole patch.

    Returns:
        ``(S, S)`` float32 ``(patch - mean) / max(std, NORM_EPS)``, 0 outside; all 0 when the core
        has no inside pixel.
    """
    all_inside = bool(inside.all())
    cp = patch if core is None else patch[core]
    vals = (cp if all_inside else cp[inside if core is None else inside[core]]).astype(np.float32, copy=False).ravel()
    if vals.size == 0:
        return np.zeros(patch.shape, np.float32)
    mean = np.float32(vals.sum(dtype=np.float64) / vals.size)
    dev = vals - mean
    std = math.sqrt(float(np.dot(dev, dev)) / vals.size)  # two-pass: no cancellation
    out = np.subtract(patch, mean, dtype=np.float32)
    out *= np.float32(1.0 / max(std, NORM_EPS))
    if not all_inside:
        out[~inside] = FILL
    return out


def augmentation_half_width(
    size: int = PATCH_SIZE,
    rotation: float = AUGMENT_ROTATION,
    scale: float = AUGMENT_SCALE,
    displacement: float = AUGMENT_DISPLACEMENT,
) -> float:
    """Largest distance (per axis, in patch pixels) from the centre that augmentation samples.

    A patch of half-width ``size/2`` rotated by up to ``rotation`` and scaled by up to ``1+scale``
    reaches ``size/2 * (1+scale) * (cos r + sin r)`` along an axis; a displacement of up to
    ``displacement * size`` on both axes adds ``displacement * size * sqrt(2)`` (conservative).
    """
    half = size / 2.0
    return half * (1.0 + scale) * (math.cos(rotation) + math.sin(rotation)) + displacement * size * math.sqrt(2.0)


def context_offset(context: int, size: int = PATCH_SIZE) -> int:
    """Offset of the ``size`` patch inside a ``context`` crop: ``(context - size) // 2``.

    Raises:
        ValueError: when ``context < size`` or ``context - size`` is odd (no exact centre crop).
    """
    if context < size or (context - size) % 2:
        raise ValueError(f"context size must be >= {size} and differ from it by an even number, got {context}")
    return (context - size) // 2


# --------------------------------------------------------------------------------------------
# one shard


REQUIRED_COLUMNS = ("eid", "instance", "side", "image", "member", "points_auto", "shard")


def _text(value: Any) -> str:
    if value is None:
        return ""
    try:
        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    return str(value)


def _float(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _int(value: Any, default: int = 0) -> int:
    try:
        if pd.isna(value):
            return default
        return int(value)
    except (TypeError, ValueError):
        return default


def _read_mask(path: str, shape: tuple[int, int], labels: tuple[int, ...]) -> np.ndarray:
    """Read a label PNG; ValueError naming the file if it is not an 8-bit single-channel PNG of
    ``shape`` holding only 0 and ``labels`` (:func:`hipoa.ingest.check_mask`'s rules)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.format != "PNG" or im.mode not in ("L", "P"):
            raise ValueError(f"{path}: mask must be an 8-bit grey or palette PNG, got {im.format} mode {im.mode!r}")
        if (im.height, im.width) != tuple(shape):
            raise ValueError(f"{path}: mask is {im.height}x{im.width}, image is {shape[0]}x{shape[1]}")
        arr = np.asarray(im)
    bad = sorted(set(np.unique(arr).tolist()) - {0, *labels})
    if bad:
        raise ValueError(f"{path}: mask values {bad[:10]} are not 0 or a site label {sorted(labels)}")
    return arr.astype(np.uint8, copy=False)


def _read_points(path: str, n_points: int) -> tuple[np.ndarray | None, str]:
    """Points and '' or (None, reason) with reason ``points_missing`` / ``points_invalid``."""
    if not path:
        return None, qc.POINTS_MISSING
    try:
        pts = read_pts(path, n_points=n_points)
    except FileNotFoundError:
        return None, qc.POINTS_MISSING
    except (PointsError, OSError) as exc:
        log.warning("%s: %s: %s", path, qc.POINTS_INVALID, exc)
        return None, qc.POINTS_INVALID
    return pts, ""


@dataclass
class _Arrays:
    """In-memory arrays of one shard, written to Zarr once at the end."""

    n: int
    sites: list[Site]
    size: int
    context: int
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    auto: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    manual: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=dict)
    manual_rows: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n, s = self.n, self.size
        self.rows = {
            "eid": np.empty(n, dtype=object),
            "instance": np.zeros(n, np.int16),
            "side": np.empty(n, dtype=object),
            "qc_reason": np.empty(n, dtype=object),
            "annotated": np.zeros(n, bool),
            "reference_length_mm": np.full(n, np.nan),
            "spacing_row_mm": np.full(n, np.nan),
            "spacing_col_mm": np.full(n, np.nan),
            "rows": np.zeros(n, np.int32),
            "cols": np.zeros(n, np.int32),
        }
        for site in self.sites:
            self.rows[f"{site.name}_true_area_mm2"] = np.full(n, np.nan)
            self.auto[site.name] = {
                "image": np.zeros((n, s, s), np.float16),
                "mask": np.zeros((n, s, s), np.uint8),
                "affine": np.full((n, 2, 3), np.nan),
                "inside": np.full(n, np.nan, np.float32),
            }
            self.manual[site.name] = {"image": [], "mask": [], "affine": [], "inside": []}


def _crop_row(
    arrays: _Arrays, i: int, row: Any, sites: list[Site], min_inside: float, n_points: int, limits: qc.Limits
) -> str:
    """Fill row ``i`` of ``arrays``; returns its qc_reason ('' when fine). Never raises on bad data."""
    r = arrays.rows
    side = _text(row.side)
    reason_in = _text(getattr(row, "qc_reason", ""))
    r["rows"][i] = _int(getattr(row, "rows", 0))
    r["cols"][i] = _int(getattr(row, "cols", 0))
    r["spacing_row_mm"][i] = _float(getattr(row, "spacing_row_mm", np.nan))
    r["spacing_col_mm"][i] = _float(getattr(row, "spacing_col_mm", np.nan))
    if reason_in:
        return reason_in

    member = _text(row.member) or None
    try:
        hip = read_image(_text(row.image), member, limits)
        pixels = np.asarray(hip.pixels)
        if pixels.ndim != 2 or pixels.size == 0:
            raise ValueError(f"pixel array has shape {pixels.shape}, expected (rows, cols)")
    except Exception as exc:  # any decode failure of one image must not stop the shard
        # DicomError.reason tells a broken zip from a broken DICOM; anything else is a decode failure
        reason = getattr(exc, "reason", None) or qc.UNREADABLE_DICOM
        log.warning("row %d (eid %s): %s: %s", i, row.eid, reason, exc)
        return reason
    shape = (int(pixels.shape[0]), int(pixels.shape[1]))
    spacing = (float(hip.spacing_mm[0]), float(hip.spacing_mm[1]))
    r["rows"][i], r["cols"][i] = shape
    r["spacing_row_mm"][i], r["spacing_col_mm"][i] = spacing

    # mask first: the true areas are known even if the points fail
    mask = None
    mask_path = _text(getattr(row, "mask", ""))
    if mask_path:
        try:
            mask = _read_mask(mask_path, shape, tuple(s.label for s in sites))
        except Exception as exc:
            log.warning("%s: mask unusable, row treated as not annotated: %s", mask_path, exc)
            mask = None
    if mask is not None:
        r["annotated"][i] = True
        counts = np.bincount(mask.ravel(), minlength=256)
        for site in sites:
            r[f"{site.name}_true_area_mm2"][i] = counts[site.label] * spacing[0] * spacing[1]

    reason = _crop_auto(
        arrays, i, pixels, mask, spacing, side, sites, min_inside, _text(row.points_auto), n_points, limits
    )
    if mask is not None:
        _crop_manual(arrays, i, pixels, mask, spacing, side, sites, min_inside, row, n_points, limits)
    return reason


class _AllInside(dict):
    """Read-only all-True inside masks by patch size (most patches lie wholly in the image)."""

    def __missing__(self, size: int) -> np.ndarray:
        mask = np.ones((size, size), bool)
        mask.flags.writeable = False
        self[size] = mask
        return mask


_ALL_INSIDE = _AllInside()


def _crop_auto(
    arrays: _Arrays,
    i: int,
    pixels: np.ndarray,
    mask: np.ndarray | None,
    spacing: tuple[float, float],
    side: str,
    sites: list[Site],
    min_inside: float,
    points_path: str,
    n_points: int,
    limits: qc.Limits,
) -> str:
    pts, reason = _read_points(points_path, n_points)
    if pts is None:
        return reason
    shape = pixels.shape
    size = arrays.size
    try:
        affines = [patch_affine(pts, s, spacing, shape[1], side, size) for s in sites]
    except (ValueError, IndexError) as exc:
        log.warning("%s: %s: %s", points_path, qc.POINTS_INVALID, exc)
        return qc.POINTS_INVALID
    lengths = [reference_length_mm(pts, s, spacing) for s in sites]
    problems = [p for p in map(limits.reference_length_problem, lengths) if p]
    if problems:
        log.warning("%s: %s: %s", points_path, qc.IMPLAUSIBLE_REFERENCE_LENGTH, problems[0])
        return qc.IMPLAUSIBLE_REFERENCE_LENGTH
    arrays.rows["reference_length_mm"][i] = lengths[0]
    fractions = [inside_fraction(a, size, shape) for a in affines]
    for site, a, f in zip(sites, affines, fractions):
        arrays.auto[site.name]["affine"][i] = a
        arrays.auto[site.name]["inside"][i] = f
    if min(fractions) < min_inside:
        worst = int(np.argmin(fractions))
        log.warning(
            "%s: %s: %s patch %.2f inside (< %.2f)",
            points_path, qc.PATCH_OUTSIDE_IMAGE, sites[worst].name, fractions[worst], min_inside,
        )
        return qc.PATCH_OUTSIDE_IMAGE
    for site, a, f in zip(sites, affines, fractions):
        patch = sample_patch(pixels, a, size, order=1, fill=0.0)
        inside = _ALL_INSIDE[size] if f == 1.0 else inside_mask(a, size, shape)
        arrays.auto[site.name]["image"][i] = normalise_patch(patch, inside)
        if mask is not None:
            arrays.auto[site.name]["mask"][i] = sample_patch(mask, a, size, order=0, fill=0) == site.label
    return ""


def _crop_manual(
    arrays: _Arrays,
    i: int,
    pixels: np.ndarray,
    mask: np.ndarray,
    spacing: tuple[float, float],
    side: str,
    sites: list[Site],
    min_inside: float,
    row: Any,
    n_points: int,
    limits: qc.Limits,
) -> None:
    path = _text(getattr(row, "points_manual", ""))
    if not path:
        log.warning("row %d (eid %s): annotated but no manual points; no manual patch", i, row.eid)
        return
    pts, reason = _read_points(path, n_points)
    if pts is None:
        log.warning("%s: %s; no manual patch", path, reason)
        return
    shape = pixels.shape
    size, context = arrays.size, arrays.context
    off = context_offset(context, size)
    core = (slice(off, off + size), slice(off, off + size))
    try:
        affines = [patch_affine(pts, s, spacing, shape[1], side, context) for s in sites]
    except (ValueError, IndexError) as exc:
        log.warning("%s: manual points invalid, no manual patch: %s", path, exc)
        return
    problems = [p for p in (limits.reference_length_problem(reference_length_mm(pts, s, spacing)) for s in sites) if p]
    if problems:
        log.warning("%s: manual points: %s; no manual patch", path, problems[0])
        return
    # the core's inside fraction, i.e. the same measure as auto/ (the context is only a margin)
    shift = np.array([[1.0, 0.0, off], [0.0, 1.0, off], [0.0, 0.0, 1.0]])
    fractions = [inside_fraction(a @ shift, size, shape) for a in affines]
    if min(fractions) < min_inside:
        log.warning("%s: manual patch %.2f inside (< %.2f); no manual patch", path, min(fractions), min_inside)
        return
    crops = []
    for site, a, f in zip(sites, affines, fractions):
        patch = sample_patch(pixels, a, context, order=1, fill=0.0)
        inside = inside_mask(a, context, shape)
        image = normalise_patch(patch, inside, core).astype(np.float16)
        label = (sample_patch(mask, a, context, order=0, fill=0) == site.label).astype(np.uint8)
        crops.append((site.name, image, label, a, np.float32(f)))
    # append all sites together, so manual/{site}/ stay aligned with manual_rows
    for name, image, label, a, f in crops:
        m = arrays.manual[name]
        m["image"].append(image)
        m["mask"].append(label)
        m["affine"].append(a)
        m["inside"].append(f)
    arrays.manual_rows.append(i)


def _compressor() -> Any:
    from zarr.codecs import BloscCodec

    # Bitshuffle groups the float16 sign/exponent bits and packs the 0/1 masks. On synthetic
    # UKB-like patches lz4 is ~5x faster than zstd-3 for 7 % more bytes (24 vs 22.5 kB per
    # 128x128 float16 patch), and the write would otherwise cost as much as the cropping.
    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


PATCH_CHUNK = 64
"""Patches per Zarr chunk: 64 x 128 x 128 float16 = 2 MiB raw, ~1.5 MiB compressed (a few chunks
per shard file set, and a sensible Dask chunk for prediction batches)."""


def _write_array(group: Any, name: str, data: np.ndarray, attributes: dict[str, Any] | None = None) -> None:
    data = np.asarray(data)
    if data.dtype == object:
        data = data.astype(str) if data.size else np.zeros(0, dtype=str)
        dtype: Any = str
    else:
        dtype = data.dtype
    # patches in chunks of PATCH_CHUNK rows; per-row tables (and affines) in one chunk
    rows_per_chunk = PATCH_CHUNK if data.ndim == 3 and data.shape[1] >= 64 else data.shape[0]
    chunks = (max(1, min(rows_per_chunk, data.shape[0])),) + data.shape[1:]
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=dtype,
        chunks=chunks,
        compressors=_compressor() if dtype is not str else "auto",
        attributes=attributes or {},
        # skip zarr's per-chunk "all fill value?" scan: a third of the write time, and an
        # all-zero chunk compresses to a few bytes anyway
        config={"write_empty_chunks": True},
    )
    if data.size:
        arr[...] = data


def _write_store(path: Path, arrays: _Arrays, attrs: dict[str, Any]) -> None:
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs.update(attrs)
    rows = root.create_group("rows", attributes={"columns": list(arrays.rows)})
    for name, data in arrays.rows.items():
        _write_array(rows, name, data)
    auto = root.create_group("auto", attributes={"points_source": POINTS_SOURCE["auto"]})
    manual = root.create_group("manual", attributes={"points_source": POINTS_SOURCE["manual"]})
    size, context = arrays.size, arrays.context
    m = len(arrays.manual_rows)
    for site in arrays.sites:
        g = auto.create_group(site.name, attributes={"patch_size": size, "points_source": "auto"})
        for name, data in arrays.auto[site.name].items():
            _write_array(g, name, data)
        g = manual.create_group(
            site.name, attributes={"patch_size": context, "core_offset": context_offset(context, size), "points_source": "manual"}
        )
        lists = arrays.manual[site.name]
        _write_array(g, "image", np.stack(lists["image"]) if m else np.zeros((0, context, context), np.float16))
        _write_array(g, "mask", np.stack(lists["mask"]) if m else np.zeros((0, context, context), np.uint8))
        _write_array(g, "affine", np.stack(lists["affine"]) if m else np.zeros((0, 2, 3)))
        _write_array(g, "inside", np.asarray(lists["inside"], np.float32))
        _write_array(g, "row", np.asarray(arrays.manual_rows, np.int32))


def crop_shard(
    *,
    manifest: Path | pd.DataFrame,
    shard: int,
    out: Path,
    sites: list[Site],
    context: int = CONTEXT_SIZE,
    min_inside: float = MIN_INSIDE,
    n_points: int = 85,
    limits: qc.Limits | None = None,
) -> dict[str, Any]:
    """Crop every manifest row of one shard into a Zarr v3 patch store (docs/DESIGN.md "Patch store").

    Every row of the shard appears once in ``rows/`` and ``auto/``, in manifest order. Rows that
    fail QC keep zeros in their patches and get a ``qc_reason``: the manifest's own reason if it has
    one, else ``unreadable_dicom`` (pixel decode failure), ``points_missing`` / ``points_invalid``
    (automatic points) or ``patch_outside_image`` (any site's patch less than ``min_inside`` in the
    image; its ``affine`` and ``inside`` are kept). A mask that cannot be read or does not match the
    image is logged and the row is treated as not annotated. Annotated rows are cropped a second
    time from their manual points into ``manual/`` (context crops, see the module docstring),
    provided the manual points are valid and every site's 128 core is at least ``min_inside`` in
    the image.

    The store is written to ``out`` + ``.tmp`` and renamed at the end, so a killed job leaves no
    half-written store at ``out``.

    Args:
        manifest: The side's manifest (Parquet path or DataFrame; docs/DESIGN.md "Manifest").
        shard: Which shard (the manifest's ``shard`` column) to crop.
        out: The ``.zarr`` directory to write (replaced if present).
        sites: Sites to crop (``hipoa.sites.load_sites``).
        context: Side of the manual-point context crops (>= 128, even margin).
        min_inside: Smallest fraction of each 128 patch that must lie in the image.
        n_points: Points expected in each ``.pts`` file.
        limits: Plausibility ranges and resource caps (default :class:`hipoa.qc.Limits`): the
            image is re-checked as ingest did, and a reference length outside
            ``reference_length_mm`` is ``implausible_reference_length``.

    Returns:
        Counts: ``rows``, ``passed``, ``flagged``, ``annotated``, ``manual``, ``reasons``
        ({qc_reason: count}), ``seconds``, ``images_per_s``, ``bytes``.

    Raises:
        ValueError: on a manifest without the needed columns, a site whose points exceed
            ``n_points``, or a bad ``context`` / ``min_inside``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if not sites:
        raise ValueError("no sites to crop")
    context_offset(context, PATCH_SIZE)
    if not 0.0 <= min_inside <= 1.0:
        raise ValueError(f"min_inside must be in 0..1, got {min_inside}")
    for s in sites:
        top = max(s.centre, *s.reference)
        if top >= n_points:
            raise ValueError(f"site {s.name}: point {top} does not exist with n_points={n_points}")

    if isinstance(manifest, pd.DataFrame):
        table = manifest
        source = "DataFrame"
    else:
        table = pd.read_parquet(manifest)
        source = str(manifest)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{source}: manifest lacks columns {missing}")
    rows = table[table["shard"].astype("int64") == int(shard)].reset_index(drop=True)
    n = len(rows)
    bad_side = sorted({_text(v) for v in rows["side"]} - {"L", "R"})
    if bad_side:
        raise ValueError(f"{source}: side must be L or R, got {bad_side} (a manifest not written by hipoa ingest?)")
    qc.check_reasons(rows["qc_reason"].fillna("") if "qc_reason" in rows else [], source)
    limits = limits if limits is not None else qc.Limits()
    sides = sorted({_text(v) for v in table["side"]})

    arrays = _Arrays(n=n, sites=list(sites), size=PATCH_SIZE, context=context)
    reasons: Counter[str] = Counter()
    progress = Progress(n, f"crop-patches shard {shard}", log, unit="images")
    for i, row in enumerate(rows.itertuples(index=False)):
        arrays.rows["eid"][i] = _text(row.eid)
        arrays.rows["instance"][i] = _int(row.instance)
        arrays.rows["side"][i] = _text(row.side)
        try:
            reason = _crop_row(arrays, i, row, list(sites), min_inside, n_points, limits)
        except Exception:  # a bug on one odd image must not lose the shard; it is logged in full
            log.exception("row %d (eid %s): %s", i, row.eid, qc.CROP_FAILED)
            reason = qc.CROP_FAILED
        if reason:
            for site in sites:
                arrays.auto[site.name]["image"][i] = 0
                arrays.auto[site.name]["mask"][i] = 0
        arrays.rows["qc_reason"][i] = reason
        reasons[reason] += 1
        progress.update()
    progress.close()

    attrs = {
        "hipoa_version": __version__,
        "side": ",".join(s for s in sides if s),
        "shard": int(shard),
        "n_rows": n,
        "patch_size": PATCH_SIZE,
        "context_size": int(context),
        "context_offset": context_offset(context, PATCH_SIZE),
        "context_note": CONTEXT_NOTE,
        "augmentation": {
            "rotation_rad": AUGMENT_ROTATION,
            "scale": AUGMENT_SCALE,
            "displacement_fraction": AUGMENT_DISPLACEMENT,
            "max_half_width_px": augmentation_half_width(),
        },
        "normalisation": NORMALISATION,
        "fill": FILL,
        "affine": AFFINE_NOTE,
        "sites": {s.name: {"centre": s.centre, "reference": list(s.reference), "dp": s.dp, "label": s.label} for s in sites},
        "min_inside_fraction": float(min_inside),
        "qc_limits": json.loads(limits.to_json()),
        "n_points": int(n_points),
        "points_source": POINTS_SOURCE,
        "manifest": source,
    }
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    _write_store(tmp, arrays, attrs)
    from hipoa.store import seal_store

    seal_store(tmp)  # the completion marker, written last: readers refuse a store without it
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)

    seconds = time.perf_counter() - t0
    nbytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    counts = {
        "rows": n,
        "passed": reasons.get("", 0),
        "flagged": n - reasons.get("", 0),
        "annotated": int(arrays.rows["annotated"].sum()),
        "manual": len(arrays.manual_rows),
        "reasons": {k: v for k, v in sorted(reasons.items()) if k},
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else float("nan"),
        "bytes": nbytes,
    }
    log.info(
        "shard %d: %d rows, %d passed, %d flagged %s, %d manual; %s bytes (%.0f per image)",
        shard, n, counts["passed"], counts["flagged"], counts["reasons"], counts["manual"],
        f"{nbytes:,}", nbytes / max(n, 1),
    )
    return counts
