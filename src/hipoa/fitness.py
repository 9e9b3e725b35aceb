"""Image fitness: is a readable hip image fit to measure? Checked at crop, before any patch.

The paper excluded 820 of 41,160 left hips by hand for poor image quality or image error. Three
kinds of unfit image are found here, each with its own ``qc_reason`` (:mod:`hipoa.qc`) and a
threshold in config ``qc`` (:class:`hipoa.qc.Limits`):

``head_out_of_view``
    The femoral head or the acetabulum is cut by the image edge: a point of the head's outline
    (points 13-31) or of the acetabulum (59-78) lies within ``qc.edge_margin_mm`` of an edge, or
    the circle fitted to the head's outline (16-29) leaves the image by more than that margin.
    An automatic search keeps its points on the image, so a cut head shows as points on the edge.
``implant``
    A metal hip prosthesis (femoral stem, ball, acetabular cup): metal stops the beam, so its
    pixels form a plateau at the top of the image's own range. The level is set from the image,
    not from Bits Stored (an export may scale the values, store 12 bits in 16-bit words, or window
    them so that the metal, or the metal and the brightest bone, clip together): inside the hip's
    outline (the femur's outline, points 0-44, and a disc of 1.5 head radii around the head for
    the cup) the floor is the 5th percentile (soft tissue) and the top the brightest 1 mm square;
    pixels at or above ``qc.implant_level`` of the way from floor to top are metal candidates
    (:func:`metal_level`). The candidates are opened by a 1.5 mm disc (a prosthesis is 10 mm
    thick or more; noise, the cortex and bone clipped by a window are thinner) and flagged when
    their largest connected region covers at least ``qc.implant_min_area_mm2``.
``motion``
    The participant moved during the scan, so the image appears twice at a shift ``d``. The image
    around the hip (at its own pixels, its smooth background off) is autocorrelated through
    a whitened power spectrum: each frequency's power divided by the median of its ring of
    ``|f|`` and clipped at 4 (:data:`MOTION_CLIP`), and each ring weighted by its part above the
    noise floor of the outer rings. A doubled image modulates the whole spectrum with fringes
    (``cos(2 pi f.d)``) that survive this; a scanner's periodic texture (stripes of any period
    and direction, their harmonics) or line banding (the ``f_x = 0`` column) is a few spectral
    lines far above their ring, clipped, and noise grain is flattened. Straight edges make ridges,
    not peaks, so the peak's prominence is ``acf(d) - max(acf(d / 2), mean(acf(d -+ s along d)),
    0)`` with the step ``s = min(1 mm, 0.3 |d|)`` and ``acf(d / 2)`` only where ``d / 2`` is itself
    searched (``|d| >= 5 mm``; acf normalised to 1 at zero shift), and the score is its largest
    value over
    ``2.5 mm <= |d| <= 10 mm`` in robust standard deviations (1.4826 MAD) of the acf over those
    shifts; flagged when it reaches ``qc.motion_score``.

The outline-based checks need the 85-point hip outline of the contract; with another
``n_points`` they are skipped (the implant and motion checks then use the points' bounding box).

Cost: tens of ms an image on one CPU core, the implant check's region and the motion check's
spectrum (benchmarks/fitness.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi

from hipoa import qc
from hipoa.geometry import edge_distance
from hipoa.points import ACETABULUM_POINTS, FEMUR_POINTS, HEAD_ARC, HEAD_POINTS, N_POINTS

log = logging.getLogger(__name__)


IMPLANT_FLOOR_PERCENTILE = 5.0
"""Percentile of the hip region's pixels taken as its soft tissue (the implant check's floor)."""
IMPLANT_TOP_MM = 1.0
"""Side of the square whose brightest mean in the hip region is the implant check's top (a few
noisy or hot pixels do not set it)."""
IMPLANT_OPEN_MM = 1.5
"""Radius of the disc that opens the metal mask: thinner bright structures are not metal."""

MOTION_GRID_MM = 0.25
"""Coarsest grid of the motion check's autocorrelation, in whole pixels (0.25 mm and 0.3 mm
pixels are used as they are, 0.1 mm ones in blocks of two). A 0.5 mm grid, half the cost, loses
the spectrum above 1 cycle/mm, where a doubled image's fringes stand clear of a coarse noise grain:
it missed 8 of 300 doubled images on a 0.5 mm grain (benchmarks/fitness.py's H-grain), 2 at 0.25
mm."""
MOTION_DETREND_MM = 4.0
"""Gaussian sigma (mm) of the smooth background taken off before the autocorrelation."""
MOTION_BACKGROUND_MM = 1.0
"""Blocks (about this size) on which that background is smoothed, then interpolated back: a
4 mm Gaussian on 0.25 mm pixels directly was half the check's time, and the background is smooth."""
MOTION_RINGS = 64
"""Rings of |frequency| over which the power spectrum is whitened."""
MOTION_CLIP = 4.0
"""Largest whitened power kept: a periodic texture's spectral lines stand far above their ring."""
MOTION_SHIFT_MM = (2.5, 10.0)
"""Shifts the motion check looks at: nearer ones are the texture's own correlation."""
MOTION_PEAK_MM = 1.0
"""A peak must stand above the autocorrelation this far nearer and farther along its shift ..."""
MOTION_PEAK_FRACTION = 0.3
"""... or this fraction of the shift where that is nearer (shifts under 3.3 mm): a 1 mm step from
a 2.5 mm shift lands on the zero shift's own peak."""


@dataclass(frozen=True)
class Fitness:
    """The first unfit reason of an image ('' when fit) and what was measured (for the log)."""

    reason: str
    detail: str
    implant_area_mm2: float
    motion_score: float


def check_image(pixels: np.ndarray, points: np.ndarray, spacing_mm: tuple[float, float], limits: qc.Limits,
                max_value: float = float("nan")) -> Fitness:
    """Run the fitness checks on one hip image in the order of :data:`hipoa.qc.REASONS`.

    Args:
        pixels: ``(rows, cols)`` float, modality LUT applied, bright = dense (as stored, not
            mirrored: every check is symmetric).
        points: ``(n, 2)`` automatic points (x, y) in pixels of the stored image.
        spacing_mm: ``(row, column)`` spacing.
        limits: Thresholds (``edge_margin_mm``, ``implant_level``, ``implant_min_area_mm2``,
            ``motion_score``).
        max_value: The top of the DICOM's pixel range; accepted and not used (the implant
            level is the image's own, :func:`metal_level`).

    Returns:
        A :class:`Fitness`; ``reason`` is ``head_out_of_view``, ``implant``, ``motion`` or ''.
    """
    pts = np.asarray(points, dtype=np.float64)
    outline = len(pts) == N_POINTS
    if outline:
        problem = head_out_of_view(pts, pixels.shape, spacing_mm, limits.edge_margin_mm)
        if problem:
            return Fitness(qc.HEAD_OUT_OF_VIEW, problem, float("nan"), float("nan"))
    area = implant_area_mm2(pixels, pts, spacing_mm, limits.implant_level, max_value, limits.implant_min_area_mm2)
    if area >= limits.implant_min_area_mm2:
        return Fitness(qc.IMPLANT, f"{area:.0f} mm^2 at >= {limits.implant_level:g} of the way from soft tissue to "
                       f"the brightest mm^2 inside the hip outline (qc.implant_min_area_mm2 "
                       f"{limits.implant_min_area_mm2:g})", area, float("nan"))
    score, shift = motion_score(pixels, pts, spacing_mm)
    if score >= limits.motion_score:
        return Fitness(qc.MOTION, f"edges repeated at a shift of ({shift[0]:.1f}, {shift[1]:.1f}) mm (x, y), "
                       f"score {score:.2f} >= qc.motion_score {limits.motion_score:g}", area, score)
    return Fitness("", "", area, score)


# ---------------------------------------------------------------------------------------------
# Field of view
# ---------------------------------------------------------------------------------------------


def fit_circle(xy: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares circle through ``(k, 2)`` points (Kasa): centre ``(2,)`` and radius."""
    x, y = xy[:, 0], xy[:, 1]
    a = np.column_stack([x, y, np.ones_like(x)])
    b = x * x + y * y
    (cx2, cy2, c), *_ = np.linalg.lstsq(a, b, rcond=None)
    centre = np.array([cx2 / 2.0, cy2 / 2.0])
    return centre, float(np.sqrt(max(c + centre @ centre, 0.0)))


def head_out_of_view(points: np.ndarray, shape: tuple[int, int], spacing_mm: tuple[float, float],
                     margin_mm: float) -> str:
    """What cuts the head or acetabulum off ('' when both are in view), for the log."""
    dy, dx = spacing_mm
    mx, my = margin_mm / dx, margin_mm / dy
    for name, idx in (("femoral head", HEAD_POINTS), ("acetabulum", ACETABULUM_POINTS)):
        p = points[idx]
        gap_x, gap_y = edge_distance(p[:, 0], p[:, 1], shape)
        near = (gap_x < mx) | (gap_y < my)
        if near.any():
            j = int(idx[np.argmax(near)])
            return (f"{name} outline point {j} at ({points[j, 0]:.1f}, {points[j, 1]:.1f}) px is within "
                    f"qc.edge_margin_mm {margin_mm:g} of the image edge")
    centre, radius = fit_circle(points[HEAD_ARC])
    # the circle's extreme points along each axis, by how far they lie beyond the image's edge
    gap_x, gap_y = edge_distance(centre[0] + np.array([-radius, radius]), centre[1] + np.array([-radius, radius]),
                                 shape)
    over = max(-float(gap_x.min()) * dx, -float(gap_y.min()) * dy)
    if over > margin_mm:
        return f"the circle fitted to the femoral head leaves the image by {over:.1f} mm"
    return ""


# ---------------------------------------------------------------------------------------------
# Implant
# ---------------------------------------------------------------------------------------------


def _polygon_mask(poly: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``shape`` bool, True inside the polygon ``(x, y)`` in pixels (PIL's scanline fill: 1 ms,
    where skimage.draw.polygon took 50 ms for the femur's 45 points)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("1", (shape[1], shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in poly], fill=1)
    return np.array(canvas, dtype=bool)  # a writable copy


def hip_region(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``shape`` bool: inside the femur's outline (points 0-44, closed) or within 1.5 head radii of
    the head's fitted centre (where an acetabular cup sits)."""
    region = _polygon_mask(points[FEMUR_POINTS], shape)
    centre, radius = fit_circle(points[HEAD_ARC])
    yy, xx = np.ogrid[0: shape[0], 0: shape[1]]
    region |= (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= (1.5 * radius) ** 2
    return region


def _box_region(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    region = np.zeros(shape, bool)
    lo = np.clip(np.floor(points.min(axis=0)).astype(int), 0, None)
    hi = np.ceil(points.max(axis=0)).astype(int) + 1
    region[lo[1]: hi[1], lo[0]: hi[0]] = True
    return region


def _disc(radius_px: float) -> np.ndarray:
    r = int(np.floor(radius_px))
    yy, xx = np.mgrid[-r: r + 1, -r: r + 1]
    return xx * xx + yy * yy <= radius_px * radius_px


def metal_level(pixels: np.ndarray, region: np.ndarray, spacing_mm: tuple[float, float],
                level: float) -> tuple[float, float, float]:
    """The implant check's metal level from the image's own intensities inside ``region``.

    Returns:
        ``(threshold, floor, top)``: ``floor`` is the region's :data:`IMPLANT_FLOOR_PERCENTILE`
        percentile (soft tissue), ``top`` its brightest :data:`IMPLANT_TOP_MM` square (mean), and
        ``threshold = floor + level * (top - floor)``. NaN threshold when the region is empty or flat.
    """
    nan = float("nan")
    if not region.any():
        return nan, nan, nan
    ys, xs = np.nonzero(np.any(region, axis=1))[0], np.nonzero(np.any(region, axis=0))[0]
    box = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    sub = np.asarray(pixels[box], dtype=np.float32)
    inside = region[box]
    k = max(1, int(round(IMPLANT_TOP_MM / min(float(v) for v in spacing_mm))))
    top = float(ndi.uniform_filter(sub, k, mode="nearest")[inside].max())
    floor = float(np.percentile(sub[inside], IMPLANT_FLOOR_PERCENTILE))
    if not (np.isfinite(top) and np.isfinite(floor) and top > floor):
        return nan, floor, top
    return floor + level * (top - floor), floor, top


def implant_area_mm2(pixels: np.ndarray, points: np.ndarray, spacing_mm: tuple[float, float], level: float,
                     max_value: float = float("nan"), min_area_mm2: float = 0.0) -> float:
    """Area (mm^2) of the largest 8-connected metal region inside the hip's outline
    (:func:`hip_region`, or the points' bounding box when they are not the 85-point outline).

    Metal: pixels at or above :func:`metal_level` (``level`` of the way from the region's soft
    tissue to its brightest mm^2, the image's own intensities: any export's scale, bit depth or
    window), after a morphological opening by a disc of :data:`IMPLANT_OPEN_MM` radius (a
    prosthesis is 10 mm thick or more; the few bone or noise pixels near the top of a normal
    hip's range, even where a window clips the brightest bone with the metal, are thinner).
    Images with fewer pixels at the level in all than ``min_area_mm2`` return that total at once.

    ``max_value`` (the top of the DICOM's range) is accepted for callers and not used: a level
    from Bits Stored misses metal that an export scaled, windowed or stored in wider words.
    """
    del max_value
    region = hip_region(points, pixels.shape) if len(points) == N_POINTS else _box_region(points, pixels.shape)
    threshold, _, _ = metal_level(pixels, region, spacing_mm, level)
    if not np.isfinite(threshold):
        return 0.0
    bright = (pixels >= threshold) & region
    px_mm2 = float(spacing_mm[0]) * float(spacing_mm[1])
    total = int(np.count_nonzero(bright)) * px_mm2
    if total < min_area_mm2 or total == 0.0:
        return total
    disc = _disc(IMPLANT_OPEN_MM / min(float(v) for v in spacing_mm))
    ys, xs = np.nonzero(np.any(bright, axis=1))[0], np.nonzero(np.any(bright, axis=0))[0]
    r = disc.shape[0]
    sub = bright[max(ys[0] - r, 0): ys[-1] + r + 1, max(xs[0] - r, 0): xs[-1] + r + 1]
    sub = ndi.binary_opening(sub, structure=disc)
    labels, n = ndi.label(sub, structure=np.ones((3, 3), bool))
    largest = int(np.bincount(labels.ravel())[1:].max()) if n else 0
    return largest * px_mm2


# ---------------------------------------------------------------------------------------------
# Motion
# ---------------------------------------------------------------------------------------------


def _ring_medians(values: np.ndarray, ring: np.ndarray, n: int) -> np.ndarray:
    """The median of ``values`` over each ring ``0..n-1`` (0 for an empty ring): the values
    grouped by ring with one integer sort, then a partition per ring (``scipy.ndimage.median``
    with labels gives the same, ten times slower)."""
    v, r = values.ravel(), ring.ravel()
    v = v[np.argsort(r, kind="stable")]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=n)[:n])])
    return np.array([float(np.median(v[a:b])) if b > a else 0.0 for a, b in zip(bounds[:-1], bounds[1:])])


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    r, c = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    return a[:r, :c].reshape(r // f, f, c // f, f).mean(axis=(1, 3))


def _smooth_background(a: np.ndarray, sigma_px: float, factor: int) -> np.ndarray:
    """``a``'s Gaussian smoothing of ``sigma_px``, computed on ``factor`` x ``factor`` block means
    (edges padded by repetition) and interpolated back linearly to ``a``'s grid (float32)."""
    if factor <= 1:
        return ndi.gaussian_filter(a, sigma_px)
    padded = np.pad(a, ((0, -a.shape[0] % factor), (0, -a.shape[1] % factor)), mode="edge")
    coarse = ndi.gaussian_filter(_block_mean(padded, factor), sigma_px / factor)
    wy, wx = _lerp_matrix(a.shape[0], coarse.shape[0], factor), _lerp_matrix(a.shape[1], coarse.shape[1], factor)
    return (wy @ coarse.astype(np.float32) @ wx.T).astype(np.float32)


def _lerp_matrix(n: int, m: int, factor: int) -> np.ndarray:
    """``(n, m)`` weights of linear interpolation from ``m`` block centres (block ``k`` centred at
    ``(k + 0.5) factor - 0.5``) to ``n`` pixels, constant beyond the first and last centre."""
    t = np.clip((np.arange(n) + 0.5) / factor - 0.5, 0.0, m - 1.0)
    lo = np.minimum(np.floor(t).astype(int), max(m - 2, 0))
    frac = t - lo
    w = np.zeros((n, m), np.float32)
    w[np.arange(n), lo] = 1.0 - frac
    w[np.arange(n), np.minimum(lo + 1, m - 1)] += frac
    return w


def motion_score(pixels: np.ndarray, points: np.ndarray, spacing_mm: tuple[float, float]) -> tuple[float, tuple[float, float]]:
    """The motion score (module docstring) and the shift ``(x, y)`` in mm where it peaks."""
    rows, cols = pixels.shape
    dy, dx = (float(v) for v in spacing_mm)
    pad = 5.0 / min(dy, dx)
    lo = np.clip(np.floor(points.min(axis=0) - pad).astype(int), 0, None)
    hi = np.minimum(np.ceil(points.max(axis=0) + pad).astype(int) + 1, [cols, rows])
    crop = np.asarray(pixels[lo[1]: hi[1], lo[0]: hi[0]], dtype=np.float32)
    f = max(1, int(np.floor(MOTION_GRID_MM / min(dy, dx) + 1e-6)))
    small = _block_mean(crop, f)
    if min(small.shape) < 16:
        return 0.0, (0.0, 0.0)
    gy, gx = dy * f, dx * f  # mm per grid pixel
    blocks = max(1, int(MOTION_BACKGROUND_MM / min(gy, gx)))
    small = small - _smooth_background(small, MOTION_DETREND_MM / min(gy, gx), blocks)
    window = np.outer(np.hanning(small.shape[0]), np.hanning(small.shape[1])).astype(np.float32)
    g = (small - small.mean()) * window
    ry, rx = int(np.ceil(MOTION_SHIFT_MM[1] / gy)), int(np.ceil(MOTION_SHIFT_MM[1] / gx))
    # zero padding by more than the largest shift (and the step beyond it) keeps those lags acyclic
    size = (sfft.next_fast_len(g.shape[0] + 2 * ry + 8, real=True),
            sfft.next_fast_len(g.shape[1] + 2 * rx + 8, real=True))
    power = np.abs(sfft.rfft2(g, s=size)) ** 2
    # whiten by the power's median over each ring of |frequency|, clip what stands out of its ring
    # (a periodic texture's lines, line banding's kx = 0 column), weight each ring by its part
    # above the noise floor (the outer rings)
    fy = sfft.fftfreq(size[0], gy)[:, None]
    fx = sfft.rfftfreq(size[1], gx)[None, :]
    radius = np.hypot(fy, fx)
    ring = np.minimum((radius * (MOTION_RINGS / radius.max())).astype(np.int32), MOTION_RINGS - 1)
    med = _ring_medians(power, ring, MOTION_RINGS)
    floor = float(np.median(med[int(0.75 * MOTION_RINGS):]))
    ring_power = med[ring] + 1e-30
    weight = np.minimum(power / ring_power, MOTION_CLIP) * np.clip(1.0 - floor / ring_power, 0.0, None)
    acf = sfft.irfft2(weight, s=size)
    c0 = (ry + 4, rx + 4)
    acf = np.roll(acf, c0, axis=(0, 1))[: 2 * c0[0] + 1, : 2 * c0[1] + 1]
    if not acf[c0] > 0:
        return 0.0, (0.0, 0.0)
    acf = acf / acf[c0]
    sy, sx = (a.astype(np.float64) for a in np.mgrid[-ry: ry + 1, -rx: rx + 1])
    dist = np.hypot(sy * gy, sx * gx)
    use = (dist >= MOTION_SHIFT_MM[0]) & (dist <= MOTION_SHIFT_MM[1])
    sy, sx, dist = sy[use], sx[use], dist[use]

    def at(ky: np.ndarray, kx: np.ndarray) -> np.ndarray:
        return ndi.map_coordinates(acf, [ky + c0[0], kx + c0[1]], order=1)

    k = np.minimum(MOTION_PEAK_MM, MOTION_PEAK_FRACTION * dist) / dist  # one step along the shift, either way
    here = at(sy, sx)
    # the half shift only where it is itself a searched shift (a periodic texture's peak at twice
    # its period); nearer, it lies on the zero shift's own peak, which a short doubling sits beside
    half = np.where(dist >= 2.0 * MOTION_SHIFT_MM[0], at(sy / 2.0, sx / 2.0), -np.inf)
    ridge = np.maximum.reduce([half, 0.5 * (at(sy * (1 - k), sx * (1 - k)) + at(sy * (1 + k), sx * (1 + k))),
                               np.zeros_like(dist)])
    spread = 1.4826 * float(np.median(np.abs(here - np.median(here))))
    if not spread > 0:
        return 0.0, (0.0, 0.0)
    score = (here - ridge) / spread
    j = int(np.argmax(score))
    return float(score[j]), (float(sx[j] * gx), float(sy[j] * gy))
