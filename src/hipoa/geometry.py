"""Patch geometry: the one place that maps patch pixels to image (or context) pixels.

Everything that needs to know where a patch pixel lies calls this module: cropping
(:mod:`hipoa.patches`), augmentation (:mod:`hipoa.augment` and the TensorFlow input built on
:func:`augment_affine`), ingest QC (:func:`inside_image` of the landmarks) and mask export
(:func:`paste_patch_mask`).

Conventions
-----------
Points are pixels of the image *as stored* (``.pts`` convention): x to the right, y down, (0, 0)
at the centre of the top-left pixel. A pixel covers ``x - 0.5 .. x + 0.5``, so a point is in the
image when ``-0.5 <= x <= cols - 0.5`` and ``-0.5 <= y <= rows - 0.5`` (:func:`inside_image`, the
only place that test is written).

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
pixel ``(x, y)`` (:func:`patch_affine`)::

    left:  x = xc + (u - c) * s / dx        right:  x = xc - (u - c) * s / dx
           y = yc + (v - c) * s / dy                y = yc + (v - c) * s / dy

so predictions map back to the original image without knowing the side, and the area of one
patch pixel is ``|det(A[:, :2])| * dx * dy = s**2`` mm^2. Mirroring is done by the affine (a
negative x scale), never by copying the image.

Sampling
--------
Bilinear for images (``order=1``), nearest for masks (``order=0``, ties round up:
``floor(t + 0.5)``), at the patch pixel centres. A patch pixel is *inside* when its centre falls
on an image pixel (the bounds above); inside pixels within half a pixel of the border use the edge
pixel, outside pixels get ``fill`` (:func:`sample_patch`). :func:`inside_fraction` is the share of
inside pixels of a patch. :func:`sample_grid` is the one batched bilinear / nearest sampler; it
refuses coordinates beyond the outermost pixel centres instead of inventing values there.

Augmentation affine and reach
-----------------------------
A training sample is resampled from a ``C x C`` context patch whose centre crop is the 128 patch.
With patch pixel ``(u, v)`` = (column, row), ``c = (size - 1) / 2`` and ``o = (C - size) // 2``::

    (x, y)_context = o + c + s * R(theta) @ ((u, v) - c) + (dx, dy)

so ``s`` > 1 shows a larger area (content shrinks), ``theta`` > 0 rotates the sampling grid
counter-clockwise in (x right, y down) coordinates, and ``(dx, dy)`` moves the centre by that many
pixels. ``theta = 0, s = 1, d = 0`` is exactly the centre crop.

Along either axis the farthest read is a patch corner (``c`` from the centre on both axes), turned
by the largest angle (``|cos| + |sin|`` grows up to 45 degrees), scaled by ``1 + scale`` and
displaced by the largest shift::

    reach = (1 + scale) * c * (cos t + sin t) + displacement * size,   t = min(rotation, pi / 4)

(:func:`augmentation_reach`; 82.9 px for the paper's 0.1 rad, 10 % and 0.05 x 128). The reads stay
on the context's pixel centres ``0 .. C - 1`` when ``(C - 1) / 2 >= reach``: the smallest such
``C`` with an even margin ``C - size`` is :func:`required_context` (168 for the paper's ranges, so
the stored 176 has 4 px to spare on each side).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from hipoa.sites import PATCH_SIZE

if TYPE_CHECKING:
    from hipoa.sites import Site


# --------------------------------------------------------------------------------------------
# inside the image


def _within(t: np.ndarray, n: int) -> np.ndarray:
    """Coordinates on one axis of ``n`` pixels: pixel centres 0..n-1, each covering +-0.5."""
    return (t >= -0.5) & (t <= n - 0.5)


def inside_image(x: np.ndarray, y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Which points lie on a pixel of an image: ``-0.5 <= x <= cols - 0.5`` and the same for y.

    Args:
        x: Column coordinates in pixels (any shape), x right, (0, 0) the top-left pixel centre.
        y: Row coordinates in pixels, broadcastable with ``x``, y down.
        shape: ``(rows, cols)`` of the image.

    Returns:
        bool array of the broadcast shape of ``x`` and ``y``.
    """
    rows, cols = shape
    return _within(np.asarray(x), cols) & _within(np.asarray(y), rows)


def edge_distance(x: np.ndarray, y: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """How far points lie inside the image from its nearest edge, per axis, in pixels:
    ``min(x + 0.5, cols - 0.5 - x)`` and the same for y (the edges of :func:`inside_image`;
    negative outside).

    Args:
        x, y: Column and row coordinates in pixels (broadcastable), (0, 0) the top-left pixel centre.
        shape: ``(rows, cols)`` of the image.
    """
    rows, cols = shape
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return np.minimum(x + 0.5, cols - 0.5 - x), np.minimum(y + 0.5, rows - 0.5 - y)


# --------------------------------------------------------------------------------------------
# the landmark affine


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


def patch_coordinates(
    affine: np.ndarray, size: int, dtype: type[np.floating] = np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """Image (or context) pixel coordinates of every patch pixel centre.

    Args:
        affine: ``(2, 3)`` or ``(n, 2, 3)`` patch -> image affines.
        size: Patch side.
        dtype: Float type of the result; float32 halves the memory traffic of a training batch
            (coordinates up to ~200 px keep ~1e-5 px precision).

    Returns:
        ``(x, y)``, each ``(size, size)`` (or ``(n, size, size)``) indexed ``[..., v, u]``.
    """
    a = np.asarray(affine, dtype=np.float64)
    batched = a.ndim == 3
    a = a.reshape(-1, 2, 3).astype(dtype, copy=False)
    u = np.arange(size, dtype=dtype)[None, None, :]  # columns
    v = np.arange(size, dtype=dtype)[None, :, None]  # rows
    # (n, 1, size) + (n, size, 1): the column and row terms are built once each, then one add
    x = (a[:, 0, 0, None, None] * u + a[:, 0, 2, None, None]) + a[:, 0, 1, None, None] * v
    y = (a[:, 1, 0, None, None] * u + a[:, 1, 2, None, None]) + a[:, 1, 1, None, None] * v
    return (x, y) if batched else (x[0], y[0])


# --------------------------------------------------------------------------------------------
# inside tests of a patch


def _axis_aligned(affine: np.ndarray) -> bool:
    return affine[0, 1] == 0.0 and affine[1, 0] == 0.0


def _axis_coords(affine: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``x`` of each patch column and ``y`` of each patch row, ``(size,)`` float64 each (axis-aligned only)."""
    u = np.arange(size, dtype=np.float64)
    return affine[0, 0] * u + affine[0, 2], affine[1, 1] * u + affine[1, 2]


def patch_pixel_area_mm2(affine: np.ndarray, spacing_row_mm: np.ndarray, spacing_col_mm: np.ndarray) -> np.ndarray:
    """Area of one patch pixel in mm^2.

    Args:
        affine: ``(n, 2, 3)`` float64, patch ``(u, v, 1)`` -> stored-image pixel ``(x, y)``.
        spacing_row_mm: ``(n,)`` DICOM row spacing (pixel height) in mm.
        spacing_col_mm: ``(n,)`` DICOM column spacing (pixel width) in mm.

    Returns:
        ``(n,)`` float64: ``|det(affine[:, :, :2])| * spacing_row_mm * spacing_col_mm``; mirroring
        flips the determinant's sign, not the area.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.ndim != 3 or affine.shape[1:] != (2, 3):
        raise ValueError(f"affine must have shape (n, 2, 3), got {affine.shape}")
    det = np.full(len(affine), np.nan)
    finite = np.isfinite(affine).all(axis=(1, 2))  # rows without usable points have NaN affines
    det[finite] = np.abs(np.linalg.det(affine[finite, :, :2]))
    return det * np.asarray(spacing_row_mm, dtype=np.float64) * np.asarray(spacing_col_mm, dtype=np.float64)


def inside_mask(affine: np.ndarray, size: int, shape: tuple[int, int]) -> np.ndarray:
    """Which patch pixels have their centre on an image pixel.

    Args:
        affine: ``(2, 3)`` patch -> image affine.
        size: Patch side.
        shape: ``(rows, cols)`` of the image.

    Returns:
        ``(size, size)`` bool, indexed ``[v, u]``.
    """
    if _axis_aligned(affine):
        x, y = _axis_coords(affine, size)
        return inside_image(x[None, :], y[:, None], shape)
    x, y = patch_coordinates(affine, size)
    return inside_image(x, y, shape)


def inside_fraction(affine: np.ndarray, size: int, shape: tuple[int, int]) -> float:
    """Fraction of the patch's pixels whose centres lie in the image (0..1)."""
    rows, cols = shape
    if _axis_aligned(affine):
        x, y = _axis_coords(affine, size)
        fx = np.count_nonzero(_within(x, cols)) / size
        fy = np.count_nonzero(_within(y, rows)) / size
        return float(fx * fy)
    return float(inside_mask(affine, size, shape).mean())


# --------------------------------------------------------------------------------------------
# sampling


def _nearest(t: np.ndarray) -> np.ndarray:
    """Index of the pixel whose centre is nearest (ties to the larger index), as ``intp``."""
    return np.floor(t + 0.5).astype(np.intp)


def sample_grid(images: np.ndarray, x: np.ndarray, y: np.ndarray, order: int = 1) -> np.ndarray:
    """Sample a batch of images at given pixel coordinates: bilinear or nearest.

    Args:
        images: ``(n, rows, cols)`` any real dtype (float16 from a store is fine).
        x: ``(n, ...)`` column coordinates into the matching image, within ``0 .. cols - 1``.
        y: Row coordinates, the same shape as ``x``, within ``0 .. rows - 1``.
        order: 1 bilinear (images), 0 nearest (masks; ties to even).

    Returns:
        ``x.shape``: float32 for ``order=1``, ``images.dtype`` for ``order=0``.

    Raises:
        ValueError: on mismatched shapes, or when a coordinate lies beyond the outermost pixel
            centres (a transform that reads outside a context would leave a blank corner;
            :func:`required_context` says how large a context must be).
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must be (n, rows, cols), got {images.shape}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (bilinear), got {order}")
    n, rows, cols = images.shape
    if x.shape != y.shape or x.shape[:1] != (n,):
        raise ValueError(f"coordinates {x.shape} / {y.shape} do not match {n} images")
    if x.size and (x.min() < 0 or x.max() > cols - 1 or y.min() < 0 or y.max() > rows - 1):
        raise ValueError(
            f"transform reads outside the {rows} x {cols} px grid (x {x.min():.6g}..{x.max():.6g}, "
            f"y {y.min():.6g}..{y.max():.6g}); see hipoa.augment.check_context"
        )
    base = (np.arange(n, dtype=np.intp) * (rows * cols)).reshape((n,) + (1,) * (x.ndim - 1))
    if order == 0:
        # Ties to even (np.rint, tf.round): the rounding every trained model's masks were
        # resampled with; crops keep _nearest, whose ties follow the inside test.
        return images.reshape(-1).take(base + np.rint(y).astype(np.intp) * cols + np.rint(x).astype(np.intp))
    # x0 <= cols - 2 so x0 + 1 is a pixel; at x = cols - 1 the weight fx is then exactly 1
    # (one-pixel axes step 0: their only coordinate is 0, with weight 0 on the neighbour)
    xf = np.minimum(np.floor(x), max(cols - 2, 0))
    yf = np.minimum(np.floor(y), max(rows - 2, 0))
    fx = (x - xf).astype(np.float32, copy=False)
    fy = (y - yf).astype(np.float32, copy=False)
    step_x, step_y = int(cols > 1), cols * int(rows > 1)
    flat = base + yf.astype(np.intp) * cols + xf.astype(np.intp)
    img = images.astype(np.float32, copy=False).reshape(-1)
    top = img.take(flat)
    top += (img.take(flat + step_x) - top) * fx
    bottom = img.take(flat + step_y)
    bottom += (img.take(flat + step_y + step_x) - bottom) * fx
    bottom -= top
    bottom *= fy
    top += bottom
    return top


def _sample_axis_aligned(image: np.ndarray, affine: np.ndarray, size: int, order: int, fill: float) -> np.ndarray:
    """``sample_patch`` for an axis-aligned affine: x depends on u only and y on v only, so the
    interpolation is separable (rows, then columns) over only the pixels the patch touches."""
    rows, cols = image.shape
    x, y = _axis_coords(affine, size)  # (size,) each, monotonic
    if order == 0:
        xi, yi = _nearest(x), _nearest(y)
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
    in_x, in_y = _within(x, cols), _within(y, rows)
    if not (in_x.all() and in_y.all()):
        out[~(in_y[:, None] & in_x[None, :])] = fill
    return out


def sample_patch(
    image: np.ndarray,
    affine: np.ndarray,
    size: int = PATCH_SIZE,
    order: int = 1,
    fill: float = 0.0,
) -> np.ndarray:
    """Sample a patch from an image through a patch -> image affine.

    Axis-aligned affines (all of :func:`patch_affine`'s) use an exact separable path that touches
    only the rows and columns the patch needs; other affines (e.g. rotated ones) go through
    :func:`sample_grid` at coordinates clamped to the outermost pixel centres. Both give the same
    values: bilinear or nearest interpolation at the patch pixel centres, edge pixels within half a
    pixel of the border, ``fill`` outside (see :func:`inside_mask`).

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
    if _axis_aligned(affine):
        return _sample_axis_aligned(image, affine, size, order, fill)
    rows, cols = image.shape
    x, y = patch_coordinates(affine, size)
    inside = inside_image(x, y, image.shape)
    # clamping is the edge extension: within half a pixel of the border the edge pixel is read
    out = sample_grid(image[None], np.clip(x, 0, cols - 1)[None], np.clip(y, 0, rows - 1)[None], order)[0]
    out[~inside] = fill
    return out


# --------------------------------------------------------------------------------------------
# context and augmentation


def context_offset(context: int, size: int = PATCH_SIZE) -> int:
    """Offset of the ``size`` patch inside a ``context`` crop: ``(context - size) // 2``.

    Raises:
        ValueError: when ``context < size`` or ``context - size`` is odd (no exact centre crop).
    """
    if context < size or (context - size) % 2:
        raise ValueError(f"context size must be >= {size} and differ from it by an even number, got {context}")
    return (context - size) // 2


def augmentation_reach(rotation: float, scale: float, displacement: float, size: int = PATCH_SIZE) -> float:
    """Farthest distance along an axis, in context pixels, from the context centre that an
    augmented patch reads (module docstring, "Augmentation affine and reach").

    Args:
        rotation: Largest absolute rotation in radians.
        scale: Largest relative scaling (the factor lies in ``1 +- scale``).
        displacement: Largest centre shift per axis as a fraction of ``size``.
        size: Side of the augmented patch.

    Returns:
        The reach in pixels: exact, attained by a patch corner at the ranges' corners.
    """
    c = (size - 1) / 2.0
    t = min(abs(rotation), math.pi / 4)  # |cos| + |sin| is largest at 45 degrees
    return (1.0 + scale) * c * (math.cos(t) + math.sin(t)) + displacement * size


def required_context(rotation: float, scale: float, displacement: float, size: int = PATCH_SIZE) -> int:
    """Smallest context side ``C`` (``C - size`` even, as stores are cropped) that every transform
    within the ranges reads inside of: ``(C - 1) / 2 >= augmentation_reach(...)``.

    Args:
        rotation: Largest absolute rotation in radians.
        scale: Largest relative scaling.
        displacement: Largest centre shift per axis as a fraction of ``size``.
        size: Side of the augmented patch.

    Returns:
        ``C`` in pixels, at least ``size``; ``C - 2`` is too small.
    """
    need = max(size, math.ceil(2.0 * augmentation_reach(rotation, scale, displacement, size) + 1.0))
    return need + (need - size) % 2


def augment_affine(params: np.ndarray, context: int, size: int = PATCH_SIZE) -> np.ndarray:
    """The patch -> context affines of augmentation transforms.

    Args:
        params: ``(n, 4)`` transforms ``theta`` (rad), ``s`` (factor), ``dx``, ``dy`` (patch
            pixels), as :mod:`hipoa.train_input` draws them.
        context: Side ``C`` of the context patch.
        size: Side of the output patch.

    Returns:
        ``(n, 2, 3)`` float64 affines from patch pixel ``(u, v, 1)`` to context pixel ``(x, y)``.
    """
    params = np.asarray(params, dtype=np.float64).reshape(-1, 4)
    theta, s, dx, dy = params.T
    c = (size - 1) / 2.0
    o = (context - size) // 2
    a, b = s * np.cos(theta), s * np.sin(theta)
    out = np.empty((len(params), 2, 3))
    out[:, 0, 0], out[:, 0, 1], out[:, 0, 2] = a, -b, o + c + dx - (a - b) * c
    out[:, 1, 0], out[:, 1, 1], out[:, 1, 2] = b, a, o + c + dy - (a + b) * c
    return out


def augment_coefficients(params: np.ndarray, context: int, size: int = PATCH_SIZE) -> np.ndarray:
    """The centred form of :func:`augment_affine`, in float32: what the training input computes with.

    ``x = xc + a (u - c) - b (v - c)``, ``y = yc + b (u - c) + a (v - c)`` with ``a = s cos(theta)``,
    ``b = s sin(theta)``, ``(xc, yc) = (o + c + dx, o + c + dy)``: the affine
    ``[[a, -b, xc - (a - b) c], [b, a, yc - (a + b) c]]``. Coordinates from the centre keep float32
    exact at the identity (the centre crop) and are what hipoa has always resampled with, so a
    seed gives the same training samples on every version and device.

    Args:
        params: ``(n, 4)`` ``theta`` (rad), ``s``, ``dx``, ``dy`` (patch pixels).
        context: Side ``C`` of the context patch.
        size: Side of the output patch.

    Returns:
        ``(n, 4)`` float32 ``a, b, xc, yc``.
    """
    params = np.asarray(params, dtype=np.float64).reshape(-1, 4)
    theta, s, dx, dy = params.T
    c = (size - 1) / 2.0
    o = (context - size) // 2
    return np.stack([s * np.cos(theta), s * np.sin(theta), o + c + dx, o + c + dy], axis=1).astype(np.float32)


def augment_coordinates(coefficients: np.ndarray, size: int = PATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Context coordinates of every patch pixel from :func:`augment_coefficients`, in float32.

    Returns:
        ``(x, y)``, each ``(n, size, size)`` float32 indexed ``[v, u]``; the operations and their
        order are the ones :func:`hipoa.train_input.warp` repeats in TensorFlow, so both round alike.
    """
    k = np.asarray(coefficients, dtype=np.float32).reshape(-1, 4)
    a, b, xc, yc = (k[:, j, None, None] for j in range(4))
    d = np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2.0)
    du, dv = d[None, None, :], d[None, :, None]
    return xc + a * du - b * dv, (yc + b * du) + a * dv


# --------------------------------------------------------------------------------------------
# back into the image


def paste_patch_mask(
    mask: np.ndarray, affine: np.ndarray, shape: tuple[int, int]
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Where a patch mask falls in the stored image (nearest neighbour): the inverse of cropping.

    Each image pixel centre in the patch's bounding window is mapped through the inverse affine
    and takes the patch pixel it lands on; the patch covers ``-0.5 <= u < w - 0.5`` (half-open,
    so two adjacent patches never claim the same image pixel).

    Args:
        mask: ``(h, w)`` patch mask, nonzero = foreground.
        affine: ``(2, 3)`` patch ``(u=col, v=row, 1)`` -> stored-image ``(x, y)`` pixel centres.
        shape: ``(rows, cols)`` of the stored image.

    Returns:
        ``(window, fg)``: the image window (row slice, column slice) covering the patch and a bool
        array of that window's shape, True where the image pixel centre maps into a foreground patch
        pixel; None when the mask is empty or the patch misses the image.
    """
    if not mask.any():
        return None
    h, w = mask.shape
    A = np.asarray(affine, dtype=np.float64)
    corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]])
    xy = corners @ A[:, :2].T + A[:, 2]
    x0, y0 = np.floor(xy.min(axis=0)).astype(int)
    x1, y1 = np.ceil(xy.max(axis=0)).astype(int)
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, shape[1] - 1), min(y1, shape[0] - 1)
    if x1 < x0 or y1 < y0:
        return None
    ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
    inv = np.linalg.inv(A[:, :2])
    uv = np.stack([xs - A[0, 2], ys - A[1, 2]], axis=-1) @ inv.T
    u, v = _nearest(uv[..., 0]), _nearest(uv[..., 1])
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    fg = np.zeros(u.shape, dtype=bool)
    fg[inside] = mask[v[inside], u[inside]] != 0
    return (slice(y0, y1 + 1), slice(x0, x1 + 1)), fg
