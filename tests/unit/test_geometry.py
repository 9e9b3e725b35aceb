"""hipoa.geometry on small arrays whose answers can be checked by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from augment_reference import augment, draw_params, identity_params
from hip_scene import hip_points, smooth_image
from scipy import ndimage

from hipoa.augment import AugmentSettings, check_context
from hipoa.geometry import (
    augment_affine,
    augmentation_reach,
    context_offset,
    inside_fraction,
    inside_image,
    inside_mask,
    mirror_points,
    paste_patch_mask,
    patch_affine,
    patch_coordinates,
    reference_length_mm,
    required_context,
    sample_grid,
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
PAPER = AugmentSettings(rotation=0.1, scale=0.1, displacement=0.05, appearance=0.0)  # U-Net 4 of the paper


# -------------------------------------------------------------------------------- inside the image


def test_inside_image_bounds_are_half_a_pixel_beyond_the_centres():
    # 4 rows x 5 cols: pixel centres at x 0..4, y 0..3; the image spans -0.5 .. size - 0.5
    eps = 1e-9
    x = np.array([-0.5, 4.5, -0.5 - eps, 4.5 + eps, 2.0, 2.0, 2.0, 2.0])
    y = np.array([-0.5, 3.5, 0.0, 0.0, -0.5 - eps, 3.5 + eps, -0.5, 3.5])
    np.testing.assert_array_equal(inside_image(x, y, (4, 5)), [True, True, False, False, False, False, True, True])
    # broadcasting: a column of y against a row of x is the patch's inside mask
    assert inside_image(np.arange(-1, 6)[None, :], np.arange(-1, 5)[:, None], (4, 5)).sum() == 4 * 5


def test_inside_fraction_by_hand():
    # 4x4 patch with unit pixels starting at x = -2.0: columns -2, -1 outside, 0, 1 inside
    a = np.array([[1.0, 0.0, -2.0], [0.0, 1.0, 0.0]])
    assert inside_fraction(a, 4, (10, 10)) == 0.5
    assert inside_mask(a, 4, (10, 10))[:, :2].sum() == 0
    # x = -0.5 is still on pixel 0 (pixel centres convention), x = -0.5 - 1e-9 is not
    a = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]])
    assert inside_fraction(a, 4, (10, 10)) == 1.0
    a = np.array([[1.0, 0.0, -0.5 - 1e-9], [0.0, 1.0, 0.0]])
    assert inside_fraction(a, 4, (10, 10)) == 0.75
    # the last column at cols - 0.5 = 9.5 is inside, just beyond is not
    assert inside_fraction(np.array([[1.0, 0.0, 6.5], [0.0, 1.0, 0.0]]), 4, (10, 10)) == 1.0
    assert inside_fraction(np.array([[1.0, 0.0, 6.5 + 1e-9], [0.0, 1.0, 0.0]]), 4, (10, 10)) == 0.75
    # rows run out at the bottom: y = 8, 9 inside, 10, 11 outside; the general path agrees
    a = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 8.0]])
    assert inside_fraction(a, 4, (10, 10)) == 0.5
    assert inside_fraction(np.array([[1.0, 1e-9, 0.0], [0.0, 1.0, 8.0]]), 4, (10, 10)) == 0.5


# -------------------------------------------------------------------------------- the affine


def test_affine_of_a_left_and_a_right_hip_by_hand():
    # reference points 10 mm apart at 1 mm pixels, dp = 0.1: patch pixels of exactly 1 mm
    site = Site("s", centre=2, reference=(0, 1), dp=0.1, label=1)
    pts = np.array([[0.0, 0.0], [10.0, 0.0], [5.0, 3.0]])
    left = patch_affine(pts, site, (1.0, 1.0), cols=20, side="L", size=4)  # c = 1.5
    np.testing.assert_allclose(left, [[1.0, 0.0, 3.5], [0.0, 1.0, 1.5]])
    # right: mirrored centre x' = 19 - 5 = 14, then back: x = 19 - (12.5 + u) = 6.5 - u
    right = patch_affine(pts, site, (1.0, 1.0), cols=20, side="R", size=4)
    np.testing.assert_allclose(right, [[-1.0, 0.0, 6.5], [0.0, 1.0, 1.5]])
    # both put the patch centre on the site point; anisotropic pixels scale each axis
    np.testing.assert_allclose(right @ [1.5, 1.5, 1.0], [5.0, 3.0])
    aniso = patch_affine(pts, site, (0.5, 1.0), cols=20, side="L", size=4)  # dy = 0.5 mm
    np.testing.assert_allclose(aniso[:, :2], [[1.0, 0.0], [0.0, 2.0]])


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


def test_patch_coordinates_single_and_batched():
    a = np.array([[2.0, 0.5, 1.0], [-0.5, 3.0, 4.0]])
    x, y = patch_coordinates(a, 3)
    # [v, u] indexing: x = 2u + 0.5v + 1, y = -0.5u + 3v + 4
    assert x[2, 1] == 2 * 1 + 0.5 * 2 + 1 and y[2, 1] == -0.5 * 1 + 3 * 2 + 4
    xb, yb = patch_coordinates(np.stack([a, a * 2]), 3, dtype=np.float32)
    assert xb.shape == (2, 3, 3) and xb.dtype == np.float32
    np.testing.assert_allclose(xb[0], x) and np.testing.assert_allclose(yb[1], 2 * y)


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


def _map_coordinates_reference(img: np.ndarray, a: np.ndarray, size: int, order: int, fill: float) -> np.ndarray:
    """scipy's answer: interpolation with edge extension, ``fill`` where the centre is off the image."""
    x, y = patch_coordinates(a, size)
    ref = ndimage.map_coordinates(img.astype(np.float32), [y, x], order=order, mode="nearest")
    ref[~inside_mask(a, size, img.shape)] = fill
    return ref


@pytest.mark.parametrize("order", [0, 1])
def test_separable_fast_path_equals_map_coordinates_and_the_general_path(order):
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
        ref = _map_coordinates_reference(img, a, 40, order, fill)
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


@pytest.mark.parametrize("order", [0, 1])
def test_rotated_affine_equals_map_coordinates(order):
    rng = np.random.default_rng(3)
    img = rng.random((40, 50)).astype(np.float32) * 100
    if order == 0:
        img = (img // 20).astype(np.uint8)
    t, s = 0.5, 0.9  # a 29 degree turn that runs off the top-left corner
    a = np.array([[s * math.cos(t), -s * math.sin(t), 3.3], [s * math.sin(t), s * math.cos(t), -6.1]])
    got = sample_patch(img, a, 48, order=order, fill=-1 if order else 255)
    ref = _map_coordinates_reference(img, a, 48, order, -1 if order else 255)
    assert 0.5 < inside_fraction(a, 48, img.shape) < 1.0  # both the edge and the fill are exercised
    if order == 0:
        np.testing.assert_array_equal(got, ref.astype(np.uint8))
    else:
        np.testing.assert_allclose(got, ref, atol=1e-3)


def test_sample_fill_outside_and_edge_half_pixel():
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    a = np.array([[1.0, 0.0, -1.0], [0.0, 1.0, -0.5]])  # x = -1, 0, 1, 2 ; y = -0.5, 0.5, 1.5, 2.5
    p = sample_patch(img, a, 4, order=1, fill=-1)
    # column x=-1 is outside; y=-0.5 is the edge row itself; y=0.5 halfway rows 0/1
    np.testing.assert_array_equal(p[:, 0], [-1, -1, -1, -1])
    np.testing.assert_allclose(p[0, 1:], [0, 1, 2])
    np.testing.assert_allclose(p[1, 1:], [2, 3, 4])
    np.testing.assert_allclose(p[3, 1:], [8, 9, 10])


def test_sample_grid_by_hand():
    img = np.arange(12, dtype=np.float16).reshape(1, 3, 4)  # value = 4 * row + col
    x = np.array([[[0.0, 3.0, 1.25, 2.5]]])
    y = np.array([[[0.0, 2.0, 0.5, 1.0]]])
    np.testing.assert_allclose(sample_grid(img, x, y, order=1), [[[0.0, 11.0, 3.25, 6.5]]])
    # nearest: ties to even (2.5 -> 2, 0.5 -> 0, as np.rint and tf.round), and the dtype is kept
    near = sample_grid(img.astype(np.uint8), x, y, order=0)
    assert near.dtype == np.uint8
    np.testing.assert_array_equal(near, [[[0, 11, 1, 6]]])
    with pytest.raises(ValueError, match="reads outside"):
        sample_grid(img, x + 0.01, y, order=1)  # x = 3.01 > cols - 1
    with pytest.raises(ValueError, match="reads outside"):
        sample_grid(img, x, y - 0.01, order=0)
    # a one-pixel axis has a single coordinate, 0
    np.testing.assert_allclose(sample_grid(np.full((1, 1, 1), 7.0), np.zeros((1, 2)), np.zeros((1, 2))), [[7.0, 7.0]])


# -------------------------------------------------------------------------------- context and reach


def test_context_offset_rejects_odd_margins():
    assert context_offset(176) == 24
    with pytest.raises(ValueError, match="context"):
        context_offset(177)
    with pytest.raises(ValueError, match="context"):
        context_offset(100)


def test_augment_affine_identity_is_the_centre_crop():
    C = 176
    a = augment_affine(identity_params(2), C)
    np.testing.assert_array_equal(a, [[[1.0, 0.0, 24.0], [0.0, 1.0, 24.0]]] * 2)
    ctx = np.random.default_rng(0).normal(size=(2, C, C)).astype(np.float32)
    x, y = patch_coordinates(a, S)
    np.testing.assert_array_equal(sample_grid(ctx, x, y), ctx[:, 24 : 24 + S, 24 : 24 + S])


def test_reach_by_hand():
    assert augmentation_reach(0.0, 0.0, 0.0) == C0  # the centre crop reaches its own corners
    assert augmentation_reach(0.1, 0.1, 0.05) == pytest.approx(1.1 * 63.5 * (math.cos(0.1) + math.sin(0.1)) + 6.4)
    # |cos| + |sin| stops growing at 45 degrees: a larger rotation needs no more room
    assert augmentation_reach(1.2, 0.0, 0.0) == pytest.approx(63.5 * math.sqrt(2))
    assert required_context(0.0, 0.0, 0.0) == S
    assert required_context(0.1, 0.1, 0.05) == 168  # 2 * 82.87 + 1 = 166.7, rounded up to an even margin
    assert (required_context(0.1, 0.1, 0.0) - S) % 2 == 0


def _corner_transforms(s: AugmentSettings) -> np.ndarray:
    d = s.displacement * S
    return np.array(list(itertools.product((-s.rotation, s.rotation), (1 - s.scale, 1 + s.scale), (-d, d), (-d, d))))


@pytest.mark.parametrize("settings", [PAPER, AugmentSettings(rotation=0.3, scale=0.2, displacement=0.0, appearance=0.0), AugmentSettings(0.0, 0.0, 0.1, 0.0)])
def test_required_context_is_enough_and_the_next_smaller_is_not(settings):
    need = required_context(settings.rotation, settings.scale, settings.displacement)
    corners = _corner_transforms(settings)
    # at the required size every corner transform reads inside, bilinear neighbours included
    x, y = patch_coordinates(augment_affine(corners, need), S)
    assert x.min() >= 0 and y.min() >= 0 and x.max() <= need - 1 and y.max() <= need - 1
    check_context(settings, need)  # does not raise
    augment(np.zeros((len(corners), need, need)), np.zeros((len(corners), need, need), np.uint8), corners)
    # the next smaller context (an even margin less) is refused, and a corner really reads outside it
    small = need - 2
    with pytest.raises(ValueError, match="context patch of at least"):
        check_context(settings, small)
    x, y = patch_coordinates(augment_affine(corners, small), S)
    assert min(x.min(), y.min()) < 0 or max(x.max(), y.max()) > small - 1
    with pytest.raises(ValueError, match="reads outside"):
        augment(np.zeros((len(corners), small, small)), np.zeros((len(corners), small, small), np.uint8), corners)


def test_random_paper_transforms_stay_inside_the_stored_context():
    C = 176
    x, y = patch_coordinates(augment_affine(draw_params(500, PAPER, np.random.default_rng(1)), C), S)
    assert min(x.min(), y.min()) >= 0 and max(x.max(), y.max()) <= C - 1
    # and they use most of the reach: the bound is not loose
    reach = augmentation_reach(PAPER.rotation, PAPER.scale, PAPER.displacement)
    assert np.abs(x - (C - 1) / 2).max() > 0.9 * reach


# -------------------------------------------------------------------------------- back into the image


@pytest.mark.parametrize("side", ["L", "R"])
def test_paste_back_inverts_cropping(side):
    rows, cols = 30, 40
    rng = np.random.default_rng(4)
    image_mask = np.zeros((rows, cols), np.uint8)
    image_mask[8:20, 10:25] = rng.random((12, 15)) > 0.5
    # unit-scale patch at an integer offset (right: mirrored), so every image pixel is one patch pixel
    a = np.array([[1.0, 0.0, 6.0], [0.0, 1.0, 5.0]]) if side == "L" else np.array([[-1.0, 0.0, 29.0], [0.0, 1.0, 5.0]])
    patch = sample_patch(image_mask, a, 24, order=0)
    window, fg = paste_patch_mask(patch, a, (rows, cols))
    pasted = np.zeros_like(image_mask)
    pasted[window][fg] = 1
    np.testing.assert_array_equal(pasted, image_mask)  # the patch covers all of the foreground
    # the window is the patch's extent, y 4.5..28.5 and x 5.5..29.5, out to whole pixels
    assert window == (slice(4, 30), slice(5, 31))


def test_paste_back_of_a_finer_patch_and_of_nothing():
    # patch pixels of half an image pixel: each image pixel centre lands on patch pixel 2x + 1
    a = np.array([[0.5, 0.0, 1.75], [0.0, 0.5, 1.75]])  # u = 2 (x - 1.75) -> u = 2x - 3.5
    patch = np.zeros((8, 8), np.uint8)
    patch[4:6, 2:4] = 1  # u 2..3 -> x 2.75..3.25, v 4..5 -> y 3.75..4.25: image pixel (x 3, y 4)
    window, fg = paste_patch_mask(patch, a, (10, 10))
    pasted = np.zeros((10, 10), bool)
    pasted[window][fg] = True
    assert np.argwhere(pasted).tolist() == [[4, 3]]
    assert paste_patch_mask(np.zeros((8, 8), np.uint8), a, (10, 10)) is None
    assert paste_patch_mask(patch, np.array([[1.0, 0.0, 50.0], [0.0, 1.0, 0.0]]), (10, 10)) is None


def test_edge_distance_has_the_edges_of_inside_image():
    """One pixel-edge convention: a point is inside exactly where both its edge distances are >= 0."""
    from hipoa.geometry import edge_distance, inside_image

    rng = np.random.default_rng(5)
    x, y = rng.uniform(-2.0, 12.0, 500), rng.uniform(-2.0, 9.0, 500)
    x[:4], y[:4] = [-0.5, 9.5, 3.0, 3.0], [2.0, 2.0, -0.5, 6.5]  # exactly on the four edges
    gx, gy = edge_distance(x, y, (7, 10))
    np.testing.assert_array_equal((gx >= 0) & (gy >= 0), inside_image(x, y, (7, 10)))
    np.testing.assert_array_equal(gx[:2], [0.0, 0.0])
    np.testing.assert_array_equal(gy[2:4], [0.0, 0.0])
    assert edge_distance(np.array([0.0]), np.array([3.0]), (7, 10))[0][0] == 0.5  # a pixel centre: half a pixel in


def test_the_default_sites_are_the_outline_model_s_points():
    from hipoa.synth.anatomy import SITE_POINTS
    from hipoa.sites import DEFAULT_SITES
    from hipoa.points import REFERENCE_POINTS, SITE_CENTRES

    assert {s.name: s.centre for s in DEFAULT_SITES} == SITE_CENTRES
    assert {s.reference for s in DEFAULT_SITES} == {REFERENCE_POINTS}
    assert SITE_POINTS == {s.label: s.centre for s in DEFAULT_SITES}
