"""One shard's crop: landmark-normalised patches of every manifest row into a Zarr patch store.

For each row :func:`crop_shard` reads the DICOM, its points and (if annotated) its mask, maps a
patch per site through :func:`hipoa.geometry.patch_affine` (coordinate conventions, mirroring of
right hips and the mm frame are documented in :mod:`hipoa.geometry`), samples it with
:func:`hipoa.geometry.sample_patch` (bilinear images, nearest masks), normalises it, and finally
writes the store with :func:`hipoa.store.write_patch_store` (layout: docs/DESIGN.md "Patch store").

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
context pixel an augmented patch reads is
``1.1 * 63.5 * (cos 0.1 + sin 0.1) + 6.4 = 82.9 <= 87.5 = (C - 1) / 2`` pixels from the centre
along an axis (:func:`hipoa.geometry.augmentation_reach`, recorded in the store attrs; C = 168
would do, :func:`hipoa.geometry.required_context`), so augmentation never leaves the context. The
affine stored with a context patch maps context pixel coordinates.

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
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hipoa import __version__, qc
from hipoa.dicom import read_image
from hipoa.fitness import check_image
from hipoa.geometry import (
    augmentation_reach,
    context_offset,
    inside_fraction,
    inside_mask,
    patch_affine,
    reference_length_mm,
    sample_patch,
)
from hipoa.labels import read_label_png
from hipoa.pixelcheck import check_pixels
from hipoa.points import N_POINTS, PointsError, read_pts
from hipoa.progress import Progress
from hipoa.sites import PATCH_SIZE, Site
from hipoa.store import write_patch_store

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
    "scale +-10%, centre displacement +-0.05*128 px) without blank corners: the farthest context "
    "pixel read is 1.1*63.5*(cos 0.1 + sin 0.1) + 0.05*128 = 82.9 px from the centre along an axis, "
    "within (176-1)/2 = 87.5 (augmentation.max_half_width_px; hipoa.geometry.required_context gives 168)"
)

AFFINE_NOTE = (
    "affine (2, 3) float64 maps patch pixel (u = column, v = row, 1) to the stored (unmirrored) "
    "image's pixel (x right, y down, (0,0) = centre of the top-left pixel); right hips have a "
    "negative x scale (mirrored into left orientation); patch pixel area in mm^2 = "
    "|det(affine[:, :2])| * spacing_row_mm * spacing_col_mm"
)

POINTS_WINDOW = 5
"""A site's local outline: the points within this many of its centre along the outline (11)."""
POINTS_SHRINK = 0.2
"""Shrinkage of the local outline's covariance towards its diagonal (stable with few images)."""

POINTS_SOURCE = {
    "auto": "automatic points (manifest points_auto) for every manifest row: evaluation and phenotyping",
    "manual": "manual points (manifest points_manual) for annotated rows only: training",
}


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
    windows: dict[str, np.ndarray] = field(default_factory=dict)

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
            "implant_area_mm2": np.full(n, np.nan),
            "motion_score": np.full(n, np.nan),
        }
        for site in self.sites:
            self.rows[f"{site.name}_true_area_mm2"] = np.full(n, np.nan)
            self.auto[site.name] = {
                "image": np.zeros((n, s, s), np.float16),
                "mask": np.zeros((n, s, s), np.uint8),
                "affine": np.full((n, 2, 3), np.nan),
                "inside": np.full(n, np.nan, np.float32),
                "points_z": np.full(n, np.nan, np.float32),
            }
            self.manual[site.name] = {"image": [], "mask": [], "affine": [], "inside": []}
            self.windows[site.name] = np.full((n, 2 * POINTS_WINDOW + 1, 2), np.nan)

    def manual_arrays(self) -> dict[str, dict[str, np.ndarray]]:
        """``manual/`` as arrays per site: the crops stacked (empty ones shaped), plus ``row``."""
        c, m = self.context, len(self.manual_rows)
        out = {}
        for site in self.sites:
            lists = self.manual[site.name]
            out[site.name] = {
                "image": np.stack(lists["image"]) if m else np.zeros((0, c, c), np.float16),
                "mask": np.stack(lists["mask"]) if m else np.zeros((0, c, c), np.uint8),
                "affine": np.stack(lists["affine"]) if m else np.zeros((0, 2, 3)),
                "inside": np.asarray(lists["inside"], np.float32),
                "row": np.asarray(self.manual_rows, np.int32),
            }
        return out


@dataclass(frozen=True)
class _CropSettings:
    """What every row of a shard is cropped with."""

    sites: list[Site]
    min_inside: float
    n_points: int
    limits: qc.Limits


@dataclass(frozen=True)
class _Hip:
    """One decoded image of a row: pixels, its label mask (None: not annotated), spacing, side and
    the top of its pixel range."""

    pixels: np.ndarray
    mask: np.ndarray | None
    spacing: tuple[float, float]
    side: str
    max_value: float


def _crop_row(arrays: _Arrays, i: int, row: Any, settings: _CropSettings) -> str:
    """Fill row ``i`` of ``arrays``; returns its qc_reason ('' when fine). Never raises on bad data."""
    sites, limits = settings.sites, settings.limits
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
        log.warning("store row %d: %s: %s", i, reason, exc)
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
            mask = read_label_png(mask_path, shape, tuple(s.label for s in sites))
        except Exception as exc:
            log.warning("%s: mask unusable, row treated as not annotated: %s", mask_path, exc)
            mask = None
    if mask is not None:
        r["annotated"][i] = True
        counts = np.bincount(mask.ravel(), minlength=256)
        for site in sites:
            r[f"{site.name}_true_area_mm2"][i] = counts[site.label] * spacing[0] * spacing[1]

    image = _Hip(pixels=pixels, mask=mask, spacing=spacing, side=side, max_value=hip.max_value)
    reason = _crop_auto(arrays, i, image, settings, _text(row.points_auto))
    if mask is not None:
        _crop_manual(arrays, i, image, settings, _text(getattr(row, "points_manual", "")))
    return reason


class _AllInside(dict):
    """Read-only all-True inside masks by patch size (most patches lie wholly in the image)."""

    def __missing__(self, size: int) -> np.ndarray:
        mask = np.ones((size, size), bool)
        mask.flags.writeable = False
        self[size] = mask
        return mask


_ALL_INSIDE = _AllInside()


def _crop_auto(arrays: _Arrays, i: int, hip: _Hip, settings: _CropSettings, points_path: str) -> str:
    """Crop row ``i``'s automatic patches (``auto/``) and run the image checks; its qc_reason."""
    pixels, mask, spacing, side, max_value = hip.pixels, hip.mask, hip.spacing, hip.side, hip.max_value
    sites, min_inside, n_points, limits = settings.sites, settings.min_inside, settings.n_points, settings.limits
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
        arrays.windows[site.name][i] = local_outline(pts, site.centre, a)
    fit = check_image(pixels, pts, spacing, limits, max_value)
    arrays.rows["implant_area_mm2"][i] = fit.implant_area_mm2
    arrays.rows["motion_score"][i] = fit.motion_score
    if fit.reason == qc.HEAD_OUT_OF_VIEW:
        log.warning("%s: %s: %s", points_path, fit.reason, fit.detail)
        return fit.reason
    if min(fractions) < min_inside:
        worst = int(np.argmin(fractions))
        log.warning(
            "%s: %s: %s patch %.2f inside (< %.2f)",
            points_path, qc.PATCH_OUTSIDE_IMAGE, sites[worst].name, fractions[worst], min_inside,
        )
        return qc.PATCH_OUTSIDE_IMAGE
    sane = check_pixels(pixels, pts, spacing)
    if sane.reason:
        log.warning("%s: %s: %s", points_path, sane.reason, sane.detail)
        return sane.reason
    if fit.reason:
        log.warning("%s: %s: %s", points_path, fit.reason, fit.detail)
        return fit.reason
    for site, a, f in zip(sites, affines, fractions):
        patch = sample_patch(pixels, a, size, order=1, fill=0.0)
        inside = _ALL_INSIDE[size] if f == 1.0 else inside_mask(a, size, shape)
        arrays.auto[site.name]["image"][i] = normalise_patch(patch, inside)
        if mask is not None:
            arrays.auto[site.name]["mask"][i] = sample_patch(mask, a, size, order=0, fill=0) == site.label
    return ""


def local_outline(points: np.ndarray, centre: int, affine: np.ndarray) -> np.ndarray:
    """The points within :data:`POINTS_WINDOW` of ``centre`` along the outline (clamped to its
    ends), in the site patch's pixel frame (``affine`` inverted): scaled by the reference length,
    mirrored like the patch, centred on the site. ``(2 * POINTS_WINDOW + 1, 2)``."""
    idx = np.clip(np.arange(centre - POINTS_WINDOW, centre + POINTS_WINDOW + 1), 0, len(points) - 1)
    m = np.asarray(affine, dtype=np.float64)
    lin_inv = np.linalg.inv(m[:, :2])
    return (np.asarray(points, dtype=np.float64)[idx] - m[:, 2]) @ lin_inv.T


def points_scores(windows: np.ndarray, min_images: int, shrink: float = POINTS_SHRINK) -> np.ndarray:
    """How far each image's local outline is from the others': an RMS robust z per image.

    ``windows`` ``(n, k, 2)`` local outlines (:func:`local_outline`; NaN rows are images not
    measured). With at least ``min_images`` finite rows, a Gaussian model of the ``2k``
    coordinates is fitted robustly (start at the coordinate medians and MAD scales; then twice:
    covariance of the 90 % nearest, shrunk by ``shrink`` towards its diagonal) and each image
    scores ``sqrt(d^2 / 2k)``, ``d`` its Mahalanobis distance: about 1 for a typical hip, larger
    where a run of points around the site is displaced against its neighbours (a shift of the whole
    outline moves the patch with it and changes nothing). NaN where not finite or too few images.
    """
    n = len(windows)
    out = np.full(n, np.nan, np.float32)
    if n == 0:
        return out
    x = np.asarray(windows, dtype=np.float64).reshape(n, -1)
    ok = np.isfinite(x).all(axis=1)
    if ok.sum() < max(min_images, 3):
        return out
    data = x[ok]
    dims = data.shape[1]
    mu = np.median(data, axis=0)
    scale = 1.4826 * np.median(np.abs(data - mu), axis=0)
    scale = np.where(scale > 1e-9, scale, 1e-9)
    d2 = (((data - mu) / scale) ** 2).sum(axis=1)
    for _ in range(2):
        inner = data[d2 <= np.quantile(d2, 0.9)]
        mu = inner.mean(axis=0)
        cov = np.cov(inner, rowvar=False)
        cov = (1.0 - shrink) * cov + shrink * np.diag(np.diag(cov)) + 1e-9 * np.eye(dims)
        diff = data - mu
        d2 = np.einsum("ij,ij->i", diff @ np.linalg.inv(cov), diff)
    # the 90 % kept are thinner-tailed than all: rescale so the median image scores as chi2's median
    from scipy.stats import chi2

    d2 = d2 * (chi2.median(dims) / max(float(np.median(d2)), 1e-12))
    out[np.flatnonzero(ok)] = np.sqrt(d2 / dims).astype(np.float32)
    return out


def _score_points(arrays: _Arrays, sites: list[Site], reasons: np.ndarray, limits: qc.Limits, shard: int) -> None:
    """Fill ``auto/{site}/points_z`` from the shard's measurable rows (:func:`points_scores`)."""
    fine = np.array([r == "" for r in reasons], bool)
    for site in sites:
        windows = np.where(fine[:, None, None], arrays.windows[site.name], np.nan)
        z = points_scores(windows, limits.points_min_images)
        arrays.auto[site.name]["points_z"][:] = z
        if fine.sum() and not np.isfinite(z).any():
            log.warning("shard %d: %s: %d measurable images, fewer than qc.points_min_images %d; its points are "
                        "not checked for plausibility", shard, site.name, int(fine.sum()), limits.points_min_images)
            continue
        bad = np.flatnonzero(np.nan_to_num(z, nan=0.0) > limits.points_max_z)
        if bad.size:
            log.warning("shard %d: %s: %d of %d images with implausible points (score > qc.points_max_z %g): %s",
                        shard, site.name, bad.size, int(fine.sum()), limits.points_max_z,
                        ", ".join(f"store row {j} ({z[j]:.3g})" for j in bad[:10]))


def _crop_manual(arrays: _Arrays, i: int, hip: _Hip, settings: _CropSettings, path: str) -> None:
    """Crop an annotated row's manual patches and masks (``manual/``), all sites or none."""
    pixels, mask, spacing, side = hip.pixels, hip.mask, hip.spacing, hip.side
    sites, min_inside, n_points, limits = settings.sites, settings.min_inside, settings.n_points, settings.limits
    if not path:
        log.warning("store row %d: annotated but no manual points; no manual patch", i)
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


def crop_shard(
    *,
    manifest: Path | pd.DataFrame,
    shard: int,
    out: Path,
    sites: list[Site],
    context: int = CONTEXT_SIZE,
    min_inside: float = MIN_INSIDE,
    n_points: int = N_POINTS,
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

    The store is written by :func:`hipoa.store.write_patch_store`: to ``out`` + ``.tmp``, sealed,
    and renamed at the end, so a killed job leaves no half-written store at ``out``.

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
    rows, source, sides = _shard_rows(
        manifest, shard=shard, sites=sites, context=context, min_inside=min_inside, n_points=n_points
    )
    limits = limits if limits is not None else qc.Limits()
    arrays, reasons = _crop_rows(
        rows, shard=shard, sites=list(sites), context=context, min_inside=min_inside, n_points=n_points, limits=limits
    )
    attrs = _store_attrs(
        shard=shard, n=len(rows), sides=sides, context=context, sites=sites, min_inside=min_inside,
        limits=limits, n_points=n_points, source=source,
    )
    out = write_patch_store(
        out, attrs=attrs, rows=arrays.rows, auto=arrays.auto, manual=arrays.manual_arrays(), points_source=POINTS_SOURCE
    )
    return _summary(out, shard=shard, arrays=arrays, reasons=reasons, seconds=time.perf_counter() - t0)


def _shard_rows(
    manifest: Path | pd.DataFrame, *, shard: int, sites: list[Site], context: int, min_inside: float, n_points: int
) -> tuple[pd.DataFrame, str, list[str]]:
    """Validate the arguments and the manifest; the shard's rows, the manifest's name and its sides."""
    if not sites:
        raise ValueError("no sites to crop")
    context_offset(context, PATCH_SIZE)
    if not 0.0 <= min_inside <= 1.0:
        raise ValueError(f"min_inside must be in 0..1, got {min_inside}")
    for s in sites:
        top = max(s.centre, *s.reference)
        if top >= n_points:
            raise ValueError(f"site {s.name}: point {top} does not exist with n_points={n_points}")

    n_shards = None
    if isinstance(manifest, pd.DataFrame):
        table = manifest
        source = "DataFrame"
        n_shards = manifest.attrs.get("ingest", {}).get("shards")
    else:
        from hipoa.dicom import regular_file_problem
        import pyarrow.parquet as pq

        problem = regular_file_problem(manifest)
        if problem:
            raise ValueError(f"manifest {manifest}: {problem}, expected the Parquet hipoa ingest writes")
        table = pd.read_parquet(manifest)
        source = str(manifest)
        meta = pq.read_metadata(manifest).metadata or {}
        n_shards = int(meta[b"shards"]) if b"shards" in meta else None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{source}: manifest lacks columns {missing}")
    known = int(n_shards) if n_shards is not None else int(table["shard"].max()) + 1 if len(table) else 1
    if not 0 <= int(shard) < known:
        raise ValueError(f"{source}: --shard {shard} is outside the manifest's shards 0..{known - 1}"
                         + ("" if n_shards is not None else " (the largest shard a row has)"))
    rows = table[table["shard"].astype("int64") == int(shard)].reset_index(drop=True)
    bad_side = sorted({_text(v) for v in rows["side"]} - {"L", "R"})
    if bad_side:
        raise ValueError(f"{source}: side must be L or R, got {bad_side} (a manifest not written by hipoa ingest?)")
    qc.check_reasons(rows["qc_reason"].fillna("") if "qc_reason" in rows else [], source)
    sides = sorted({_text(v) for v in table["side"]})
    return rows, source, sides


def _crop_rows(
    rows: pd.DataFrame,
    *,
    shard: int,
    sites: list[Site],
    context: int,
    min_inside: float,
    n_points: int,
    limits: qc.Limits,
) -> tuple[_Arrays, Counter[str]]:
    """Crop every row into in-memory arrays; the arrays and the count of each qc_reason."""
    n = len(rows)
    arrays = _Arrays(n=n, sites=sites, size=PATCH_SIZE, context=context)
    reasons: Counter[str] = Counter()
    progress = Progress(n, f"crop-patches shard {shard}", log, unit="images")
    settings = _CropSettings(sites=sites, min_inside=min_inside, n_points=n_points, limits=limits)
    for i, row in enumerate(rows.itertuples(index=False)):
        arrays.rows["eid"][i] = _text(row.eid)
        arrays.rows["instance"][i] = _int(row.instance)
        arrays.rows["side"][i] = _text(row.side)
        try:
            reason = _crop_row(arrays, i, row, settings)
        except Exception:  # a bug on one odd image must not lose the shard; it is logged in full
            log.exception("store row %d: %s", i, qc.CROP_FAILED)
            reason = qc.CROP_FAILED
        if reason:
            for site in sites:
                arrays.auto[site.name]["image"][i] = 0
                arrays.auto[site.name]["mask"][i] = 0
        arrays.rows["qc_reason"][i] = reason
        reasons[reason] += 1
        progress.update()
    progress.close()
    _check_reference_lengths(arrays, sites, reasons, limits, shard)
    _score_points(arrays, sites, arrays.rows["qc_reason"], limits, shard)
    return arrays, reasons


def reference_length_z(lengths: np.ndarray, min_images: int) -> np.ndarray:
    """Robust z of ``log(length)`` against the finite lengths given: ``(log L - median) / (1.4826 MAD)``.

    NaN where the length is not finite, and everywhere when fewer than ``min_images`` lengths are
    finite. The log makes a 2x error as far from the median as a 0.5x one; the MAD (scaled to a
    standard deviation for a normal distribution) is not moved by the outliers it looks for. Its
    floor, 1 % of the median length, keeps a cohort of near-identical hips from flagging normal ones.
    """
    lengths = np.asarray(lengths, float)
    out = np.full(lengths.shape, np.nan)
    ok = np.isfinite(lengths) & (lengths > 0)
    if ok.sum() < max(int(min_images), 3):
        return out
    logs = np.log(lengths[ok])
    med = float(np.median(logs))
    scale = max(1.4826 * float(np.median(np.abs(logs - med))), 0.01)
    out[ok] = (logs - med) / scale
    return out


def _check_reference_lengths(arrays: _Arrays, sites: list[Site], reasons: Counter[str], limits: qc.Limits,
                             shard: int) -> None:
    """Flag ``implausible_reference_length`` where a length passes the fixed range but stands out of
    the shard's own distribution (:func:`reference_length_z` > ``qc.reference_length_max_z``): a
    pixel spacing wrong by 2x whose length still lies in range. Rows already flagged by an earlier
    check keep their reason; the shard's images are a random sample of the side (shards are by
    eid hash), so its distribution is the side's."""
    order = {r: k for k, r in enumerate(qc.REASONS)}
    here = order[qc.IMPLAUSIBLE_REFERENCE_LENGTH]
    lengths = np.asarray(arrays.rows["reference_length_mm"], float)
    z = reference_length_z(lengths, limits.points_min_images)
    if np.isfinite(lengths).any() and not np.isfinite(z).any():
        log.warning("shard %d: %d images with a reference length, fewer than qc.points_min_images %d; the lengths "
                    "are checked against qc.reference_length_mm only", shard, int(np.isfinite(lengths).sum()),
                    limits.points_min_images)
        return
    med = float(np.exp(np.nanmedian(np.log(lengths[np.isfinite(z)])))) if np.isfinite(z).any() else float("nan")
    for i in np.flatnonzero(np.nan_to_num(np.abs(z), nan=0.0) > limits.reference_length_max_z):
        old = str(arrays.rows["qc_reason"][i])
        if old and order.get(old, len(order)) <= here:
            continue
        log.warning("store row %d: %s: reference length %.1f mm is %.1f robust SDs from the shard's median "
                    "%.1f mm (> qc.reference_length_max_z %g): is the pixel spacing right?", i,
                    qc.IMPLAUSIBLE_REFERENCE_LENGTH, lengths[i], abs(z[i]), med, limits.reference_length_max_z)
        for site in sites:
            arrays.auto[site.name]["image"][i] = 0
            arrays.auto[site.name]["mask"][i] = 0
        arrays.rows["qc_reason"][i] = qc.IMPLAUSIBLE_REFERENCE_LENGTH
        reasons[old] -= 1
        reasons[qc.IMPLAUSIBLE_REFERENCE_LENGTH] += 1
    for k in [k for k, v in reasons.items() if v <= 0]:
        del reasons[k]


def _store_attrs(
    *,
    shard: int,
    n: int,
    sides: list[str],
    context: int,
    sites: list[Site],
    min_inside: float,
    limits: qc.Limits,
    n_points: int,
    source: str,
) -> dict[str, Any]:
    """The store's root attributes (docs/DESIGN.md "Patch store")."""
    return {
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
            "max_half_width_px": augmentation_reach(AUGMENT_ROTATION, AUGMENT_SCALE, AUGMENT_DISPLACEMENT),
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


def _summary(out: Path, *, shard: int, arrays: _Arrays, reasons: Counter[str], seconds: float) -> dict[str, Any]:
    """crop_shard's counts (see its Returns), logged in one line."""
    n = arrays.n
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
