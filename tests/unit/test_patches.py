"""Geometry of hipoa.patches on small synthetic arrays whose answers can be checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from hipoa.patches import (
    augmentation_half_width,
    context_offset,
    inside_fraction,
    inside_mask,
    mirror_points,
    normalise_patch,
    patch_affine,
    patch_coordinates,
    reference_length_mm,
    sample_patch,
)
from hipoa.sites import PATCH_SIZE, Site

S = PATCH_SIZE
C0 = (S - 1) / 2  # 63.5, the patch centre
SITE = Site("superior_femoral_head", centre=2, reference=(0, 1), dp=0.006, label=2)
SITES = [
    Site("inferior_femoral_head", centre=2, reference=(0, 1), dp=0.005, label=1),
    SITE,
    Site("lateral_acetabulum", centre=3, reference=(0, 1), dp=0.010, label=3),
]


def hip_points(rows: int = 300, cols: int = 340, scale: float = 1.0) -> np.ndarray:
    """Four points: reference pair 0-1 (~200 px apart), site centres 2 and 3."""
    return np.array([[60.0, 80.0], [250.0, 150.0], [170.3, 140.6], [120.7, 100.2]]) * scale


def smooth_image(rows: int, cols: int, spacing: tuple[float, float]) -> np.ndarray:
    """A smooth pattern defined in mm (so two resolutions render the same scene): pixel centre (x, y) -> X = x*dx."""
    dy, dx = spacing
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    X, Y = x * dx, y * dy
    img = (
        100 * np.exp(-((X - 42.0) ** 2 + (Y - 35.0) ** 2) / (2 * 6.0**2))
        + 60 * np.exp(-((X - 30.0) ** 2 + (Y - 25.0) ** 2) / (2 * 9.0**2))
        + 20 * np.sin(X / 3.0) * np.cos(Y / 4.0)
    )
    return img.astype(np.float32)


# -------------------------------------------------------------------------------- the affine


@pytest.mark.parametrize("side", ["L", "R"])
def test_affine_maps_centre_pixel_to_site_point(side):
    pts = hip_points()
    a = patch_affine(pts, SITE, (0.3, 0.2), cols=340, side=side, size=S)
    x, y = a @ np.array([C0, C0, 1.0])
    assert (x, y) == pytest.approx(tuple(pts[SITE.centre]), abs=1e-9)


def test_affine_pixel_size_is_dp_times_reference_length_in_mm():
    pts = hip_points()
    spacing = (0.3, 0.2)  # dy, dx: anisotropic on purpose
    length = math.hypot((250 - 60) * 0.2, (150 - 80) * 0.3)
    assert reference_length_mm(pts, SITE, spacing) == pytest.approx(length)
    a = patch_affine(pts, SITE, spacing, cols=340, side="L", size=S)
    s = SITE.dp * length
    # one patch pixel step along u moves s mm along x, i.e. s/dx stored pixels
    assert a[0, 0] * 0.2 == pytest.approx(s)
    assert a[1, 1] * 0.3 == pytest.approx(s)
    assert a[0, 1] == 0 and a[1, 0] == 0


def test_right_affine_runs_x_backwards_and_ignores_cols():
    pts = hip_points()
    left = patch_affine(pts, SITE, (0.25, 0.25), cols=340, side="L")
    right = patch_affine(pts, SITE, (0.25, 0.25), cols=340, side="R")
    right_wide = patch_affine(pts, SITE, (0.25, 0.25), cols=999, side="R")
    assert right[0, 0] == pytest.approx(-left[0, 0])
    np.testing.assert_allclose(right, right_wide)
    # u increasing = towards the stored image's left (medial for a right hip)
    assert (right @ [C0 + 10, C0, 1])[0] < pts[SITE.centre, 0]


def test_mirror_points():
    np.testing.assert_array_equal(mirror_points(np.array([[0.0, 5.0], [9.0, 1.0]]), cols=10), [[9.0, 5.0], [0.0, 1.0]])


def test_affine_rejects_bad_input():
    pts = hip_points()
    with pytest.raises(ValueError, match="side"):
        patch_affine(pts, SITE, (0.25, 0.25), cols=340, side="X")
    with pytest.raises(ValueError, match="reference length"):
        patch_affine(np.zeros((4, 2)), SITE, (0.25, 0.25), cols=340, side="L")
    with pytest.raises(ValueError, match="spacing"):
        patch_affine(pts, SITE, (0.0, 0.25), cols=340, side="L")


# -------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("side", ["L", "R"])
@pytest.mark.parametrize("site", SITES, ids=lambda s: s.name)
def test_bright_dot_at_site_point_lands_at_patch_centre(side, site):
    rows, cols = 300, 340
    pts = hip_points()
    pts[site.centre] = [171.0, 141.0]  # on a pixel centre, so the dot is symmetric about it
    img = np.zeros((rows, cols), np.float32)
    img[140:143, 170:173] = 1000.0  # 3x3 dot centred on the point
    a = patch_affine(pts, site, (0.25, 0.25), cols=cols, side=side)
    patch = sample_patch(img, a, S, order=1)
    assert patch.max() > 0
    v, u = ndimage.center_of_mass(patch)
    assert u == pytest.approx(C0, abs=0.1) and v == pytest.approx(C0, abs=0.1)
    # and nothing bright far from the centre
    assert patch[:40].max() == 0 and patch[-40:].max() == 0


def test_left_and_mirrored_right_twin_give_identical_patches():
    rows, cols = 300, 340
    spacing = (0.27, 0.23)
    img = smooth_image(rows, cols, spacing)
    mask = (img > 70).astype(np.uint8) * 2
    pts = hip_points()
    twin_img, twin_mask, twin_pts = img[:, ::-1].copy(), mask[:, ::-1].copy(), mirror_points(pts, cols)
    for site in SITES:
        a_l = patch_affine(pts, site, spacing, cols, "L")
        a_r = patch_affine(twin_pts, site, spacing, cols, "R")
        np.testing.assert_allclose(sample_patch(twin_img, a_r), sample_patch(img, a_l), atol=1e-3)
        np.testing.assert_array_equal(sample_patch(twin_mask, a_r, order=0), sample_patch(mask, a_l, order=0))
        assert inside_fraction(a_r, S, (rows, cols)) == inside_fraction(a_l, S, (rows, cols))


def test_same_hip_at_twice_the_resolution_gives_the_same_patch():
    spacing = (0.30, 0.24)  # anisotropic
    rows, cols = 240, 300
    lo = smooth_image(rows, cols, spacing)
    hi = smooth_image(2 * rows, 2 * cols, (spacing[0] / 2, spacing[1] / 2))
    pts = hip_points(scale=0.8)
    for side in ("L", "R"):
        for site in SITES:
            # right: the scene is the same, only labelled R (both images mirrored the same way)
            p_lo = sample_patch(lo, patch_affine(pts, site, spacing, cols, side))
            p_hi = sample_patch(hi, patch_affine(pts * 2, site, (spacing[0] / 2, spacing[1] / 2), 2 * cols, side))
            assert np.abs(p_hi - p_lo).max() < 0.01 * np.ptp(p_lo) + 0.5
            np.testing.assert_allclose(
                normalise_patch(p_hi, np.ones_like(p_hi, bool)), normalise_patch(p_lo, np.ones_like(p_lo, bool)), atol=0.02
            )


@pytest.mark.parametrize("side", ["L", "R"])
def test_mask_area_through_affine_matches_full_size_area(side):
    rows, cols = 300, 340
    spacing = (0.28, 0.22)  # dy, dx
    dy, dx = spacing
    pts = hip_points()
    site = SITES[1]
    cx, cy = pts[site.centre]
    y, x = np.mgrid[0:rows, 0:cols]
    # an ellipse of semi-axes 3 mm x 2 mm around the site point, in mm so it is round in the world
    mask = np.where(((x - cx) * dx / 3.0) ** 2 + ((y - cy) * dy / 2.0) ** 2 <= 1.0, site.label, 0).astype(np.uint8)
    mask[10:20, 10:20] = 1  # another site's label far away, must not count
    true_area = np.count_nonzero(mask == site.label) * dx * dy
    assert true_area == pytest.approx(math.pi * 3 * 2, rel=0.05)
    a = patch_affine(pts, site, spacing, cols, side)
    patch = sample_patch(mask, a, S, order=0) == site.label
    area = patch.sum() * abs(np.linalg.det(a[:, :2])) * dx * dy
    assert area == pytest.approx(true_area, rel=0.03)


def test_context_centre_crop_equals_128_patch():
    rows, cols = 300, 340
    spacing = (0.25, 0.25)
    img = smooth_image(rows, cols, spacing)
    pts = hip_points()
    C = 176
    off = context_offset(C)
    assert off == 24
    for side in ("L", "R"):
        for site in SITES:
            a128 = patch_affine(pts, site, spacing, cols, side, size=S)
            actx = patch_affine(pts, site, spacing, cols, side, size=C)
            ctx = sample_patch(img, actx, C)
            np.testing.assert_allclose(ctx[off : off + S, off : off + S], sample_patch(img, a128, S), atol=1e-3)
            # the affines agree once shifted by the offset
            np.testing.assert_allclose(actx @ [off, off, 1], a128 @ [0, 0, 1], atol=1e-9)
            # normalising the context with its core's statistics == normalising the 128 patch
            core = (slice(off, off + S), slice(off, off + S))
            n_ctx = normalise_patch(ctx, inside_mask(actx, C, (rows, cols)), core)
            n_128 = normalise_patch(sample_patch(img, a128, S), inside_mask(a128, S, (rows, cols)))
            np.testing.assert_allclose(n_ctx[core], n_128, atol=1e-4)


def test_context_offset_rejects_odd_margins():
    with pytest.raises(ValueError, match="context"):
        context_offset(177)
    with pytest.raises(ValueError, match="context"):
        context_offset(100)


def test_augmentation_stays_within_the_context():
    """Every augmented 128 patch (rotation +-0.1, scale +-10%, displacement +-6.4 px) only needs
    context pixels, bilinear neighbours included."""
    C = 176
    half = augmentation_half_width()
    assert half == pytest.approx(64 * 1.1 * (math.cos(0.1) + math.sin(0.1)) + 6.4 * math.sqrt(2))
    assert half < C / 2
    # numerically: the corners of the worst cases, in context pixel coordinates
    c_ctx = (C - 1) / 2
    corners = np.array([[u, v] for u in (0, S - 1) for v in (0, S - 1)], float) - C0
    worst = 0.0
    for theta in (-0.1, 0.1):
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        for scale in (0.9, 1.1):
            for d in ([6.4, 6.4], [-6.4, 6.4], [6.4, -6.4], [-6.4, -6.4]):
                xy = corners @ (rot * scale).T + d + c_ctx
                assert xy.min() >= 0 and np.floor(xy.max()) + 1 <= C - 1  # bilinear neighbour in range
                worst = max(worst, np.abs(xy - c_ctx).max())
    assert worst <= half
    # and C=160 would not be enough: the bound is tight enough to matter
    assert half > (160 - 1) / 2


@pytest.mark.parametrize("order", [0, 1])
def test_separable_sampler_equals_map_coordinates(order):
    rng = np.random.default_rng(0)
    img = rng.random((50, 60)).astype(np.float32) * 100
    if order == 0:
        img = (img // 25).astype(np.uint8)
    fill = -7 if order == 1 else 250
    for a in (
        # offsets chosen so that no coordinate is an exact .5 (nearest-neighbour ties may round either way)
        np.array([[0.7, 0.0, -3.37], [0.0, 0.45, 5.13]]),  # partly outside on the left
        np.array([[-0.9, 0.0, 58.23], [0.0, 0.8, 20.31]]),  # mirrored, partly below
        np.array([[0.31, 0.0, 10.14], [0.0, 0.37, 12.22]]),  # fully inside
    ):
        fast = sample_patch(img, a, 40, order=order, fill=fill)
        x, y = patch_coordinates(a, 40)
        ref = ndimage.map_coordinates(img.astype(np.float32), [y, x], order=order, mode="nearest")
        ref[~inside_mask(a, 40, img.shape)] = fill
        if order == 0:
            assert fast.dtype == np.uint8
            np.testing.assert_array_equal(fast, ref.astype(np.uint8))
        else:
            assert fast.dtype == np.float32
            np.testing.assert_allclose(fast, ref, atol=1e-3)
        # the general path (a tiny rotation term forces it) agrees too
        rot = a.copy()
        rot[0, 1] = 1e-12
        np.testing.assert_allclose(sample_patch(img, rot, 40, order=order, fill=fill).astype(np.float32), fast.astype(np.float32), atol=1e-3)


def test_inside_fraction_by_hand():
    # 4x4 patch with unit pixels starting at x = -2.0: columns -2, -1 outside, 0, 1 inside
    a = np.array([[1.0, 0.0, -2.0], [0.0, 1.0, 0.0]])
    assert inside_fraction(a, 4, (10, 10)) == 0.5
    assert inside_mask(a, 4, (10, 10))[:, :2].sum() == 0
    # x = -0.5 is still on pixel 0 (pixel centres convention)
    a = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]])
    assert inside_fraction(a, 4, (10, 10)) == 1.0
    # rows run out at the bottom: y = 8, 9 inside, 10, 11 outside
    a = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 8.0]])
    assert inside_fraction(a, 4, (10, 10)) == 0.5
    assert inside_fraction(np.array([[1.0, 1e-9, 0.0], [0.0, 1.0, 8.0]]), 4, (10, 10)) == 0.5


def test_sample_fill_outside_and_edge_half_pixel():
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    a = np.array([[1.0, 0.0, -1.0], [0.0, 1.0, -0.5]])  # x = -1, 0, 1, 2 ; y = -0.5, 0.5, 1.5, 2.5
    p = sample_patch(img, a, 4, order=1, fill=-1)
    # column x=-1 is outside; y=-0.5 is the edge row itself; y=0.5 halfway rows 0/1
    np.testing.assert_array_equal(p[:, 0], [-1, -1, -1, -1])
    np.testing.assert_allclose(p[0, 1:], [0, 1, 2])
    np.testing.assert_allclose(p[1, 1:], [2, 3, 4])
    np.testing.assert_allclose(p[3, 1:], [8, 9, 10])


def test_normalise_patch_by_hand():
    p = np.array([[1.0, 3.0], [5.0, 100.0]], np.float32)
    inside = np.array([[True, True], [False, True]])
    out = normalise_patch(p, inside)
    vals = np.array([1.0, 3.0, 100.0])
    np.testing.assert_allclose(out[inside], (vals - vals.mean()) / vals.std(), rtol=1e-5)
    assert out[1, 0] == 0
    np.testing.assert_array_equal(normalise_patch(np.full((3, 3), 7.0, np.float32), np.ones((3, 3), bool)), 0)
    np.testing.assert_array_equal(normalise_patch(p, np.zeros((2, 2), bool)), 0)
