"""Does the decoded image look like a hip DXA at all? Checked at crop, before fitness.

:mod:`hipoa.dicom` checks the stored values against the header (range, length, one pinned
value: ``pixel_data_inconsistent``). What no header can promise is that the image, once through
the modality LUT and the photometric interpretation, shows bone bright: a negative Rescale
Slope, a Presentation LUT Shape of INVERSE or a mislabelled MONOCHROME1 gives a negative image
whose areas would be measured on the wrong tissue, and a decoder can turn a codestream into
noise that fills the range. Two measurements on the pixels around the automatic femur outline
(points 0-44) tell them apart (``implausible_pixels``):

- **contrast**: ``(median inside - median outside) / (p99 - p1)``, the medians over bands
  :data:`BAND_MM` inside and outside the femur outline, the percentiles over the image. Bone is
  denser than the soft tissue beside it; an inverted image scores below zero. Under
  :data:`MIN_CONTRAST`: ``implausible_pixels``.
- **roughness**: ``median |horizontal neighbour difference| / (p99 - p1)`` over the image. A
  radiograph is smooth at the pixel scale (its noise a few percent of the range); a texture that
  fills the range scores near 0.3. Over :data:`MAX_ROUGHNESS`: ``implausible_pixels``.

Their distributions on the synthetic cohorts and the false-flag rate are printed by
``python benchmarks/pixel_sanity.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from hipoa import qc
from hipoa.points import FEMUR_POINTS


BAND_MM = (1.0, 4.0)
"""The bands inside and outside the femur outline whose medians are compared (mm from it)."""

MIN_CONTRAST = 0.03
"""Bone must be brighter than the soft tissue beside it by this fraction of the range."""

MAX_ROUGHNESS = 0.15
"""Largest median neighbour difference, as a fraction of the range, of a radiograph."""


@dataclass(frozen=True)
class PixelCheck:
    """What :func:`check_pixels` measured; ``reason`` is ``""`` or ``implausible_pixels``."""

    contrast: float
    roughness: float
    reason: str = ""
    detail: str = ""


_STEP = 2  # the bands are measured on every second pixel each way: 4x cheaper, same medians


def _bands(points: np.ndarray, shape: tuple[int, int], spacing_mm: tuple[float, float]
           ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The femur outline's bounding box plus the band, subsampled by :data:`_STEP` (as slices of
    the image), and in it the inner and outer bands."""
    from PIL import Image, ImageDraw

    poly = points[FEMUR_POINTS]
    pad = int(np.ceil(BAND_MM[1] / float(min(spacing_mm)))) + 2 * _STEP
    x0 = max(int(np.floor(poly[:, 0].min())) - pad, 0)
    x1 = min(int(np.ceil(poly[:, 0].max())) + pad + 1, shape[1])
    y0 = max(int(np.floor(poly[:, 1].min())) - pad, 0)
    y1 = min(int(np.ceil(poly[:, 1].max())) + pad + 1, shape[0])
    box = (slice(y0, y1, _STEP), slice(x0, x1, _STEP))
    h, w = len(range(y0, y1, _STEP)), len(range(x0, x1, _STEP))
    canvas = Image.new("1", (w, h), 0)
    xy = [(float(x - x0) / _STEP, float(y - y0) / _STEP) for x, y in poly]
    ImageDraw.Draw(canvas).polygon(xy, fill=1)
    inside = np.asarray(canvas, dtype=bool)
    sampling = (spacing_mm[0] * _STEP, spacing_mm[1] * _STEP)
    d_in = ndi.distance_transform_edt(inside, sampling=sampling)
    d_out = ndi.distance_transform_edt(~inside, sampling=sampling)
    lo, hi = BAND_MM
    return box, (d_in >= lo) & (d_in <= hi), (d_out >= lo) & (d_out <= hi)


def check_pixels(pixels: np.ndarray, points: np.ndarray, spacing_mm: tuple[float, float]) -> PixelCheck:
    """Measure contrast and roughness (module docstring) and give the verdict.

    Args:
        pixels: ``(rows, cols)`` float, MONOCHROME2 sense after the modality LUT (:func:`hipoa.dicom.read_image`).
        points: ``(85, 2)`` automatic outline points, ``(x, y)`` in pixels, inside the image.
        spacing_mm: ``(dy, dx)``.
    """
    img = np.asarray(pixels, dtype=np.float32)
    p1, p99 = (float(v) for v in np.percentile(img[::4, ::4], [1.0, 99.0]))
    span = p99 - p1
    if not np.isfinite(span) or span <= 0:
        return PixelCheck(float("nan"), float("nan"), qc.IMPLAUSIBLE_PIXELS,
                          f"the image is flat: 1st and 99th percentiles are both {p1:.6g}")
    roughness = float(np.median(np.abs(np.diff(img[::4], axis=1)))) / span
    box, inner, outer = _bands(np.asarray(points, float), img.shape, spacing_mm)
    region = img[box]
    if not inner.any() or not outer.any():
        contrast = float("nan")
    else:
        contrast = (float(np.median(region[inner])) - float(np.median(region[outer]))) / span
    if roughness > MAX_ROUGHNESS:
        return PixelCheck(contrast, roughness, qc.IMPLAUSIBLE_PIXELS,
                          f"neighbouring pixels differ by {100 * roughness:.0f} % of the range (median; > "
                          f"{100 * MAX_ROUGHNESS:g} %): a noise-like texture, no radiograph")
    if np.isfinite(contrast) and contrast < MIN_CONTRAST:
        return PixelCheck(contrast, roughness, qc.IMPLAUSIBLE_PIXELS,
                          f"bone inside the femur outline is {'darker' if contrast < 0 else 'hardly brighter'} than "
                          f"the soft tissue beside it (contrast {contrast:+.3f} of the range, < {MIN_CONTRAST:g}): "
                          "an inverted image (check Rescale Slope, Photometric Interpretation, Presentation LUT Shape)")
    return PixelCheck(contrast, roughness)
