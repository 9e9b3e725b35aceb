"""augment(): exact centre crops, known shifts and rotations, scipy agreement (reach: test_geometry.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from augment_reference import augment, draw_params, identity_params

from hipoa.augment import AugmentSettings
from hipoa.geometry import augment_affine, augmentation_reach, patch_coordinates

C, S = 176, 128
O = (C - S) // 2  # 24
PAPER_ACETABULUM = AugmentSettings(rotation=0.1, scale=0.1, displacement=0.05, appearance=0.0)


@pytest.fixture
def context():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, C, C)).astype(np.float16)
    masks = (rng.random((3, C, C)) > 0.7).astype(np.uint8)
    return images, masks


def test_identity_is_the_centre_crop_exactly(context):
    images, masks = context
    x, y = augment(images, masks, identity_params(3))
    assert x.dtype == np.float32 and y.dtype == np.uint8 and x.shape == (3, S, S)
    np.testing.assert_array_equal(x, images[:, O : O + S, O : O + S].astype(np.float32))
    np.testing.assert_array_equal(y, masks[:, O : O + S, O : O + S])


def test_integer_displacement_is_a_shifted_crop(context):
    images, masks = context
    params = identity_params(1)
    params[0, 2:] = [5, -3]  # dx = +5 columns, dy = -3 rows
    x, y = augment(images[:1], masks[:1], params)
    np.testing.assert_array_equal(x[0], images[0, O - 3 : O - 3 + S, O + 5 : O + 5 + S].astype(np.float32))
    np.testing.assert_array_equal(y[0], masks[0, O - 3 : O - 3 + S, O + 5 : O + 5 + S])


def test_quarter_turn_is_rot90(context):
    images, masks = context
    params = identity_params(1)
    params[0, 0] = np.pi / 2
    x, y = augment(images[:1], masks[:1], params)
    crop = images[0, O : O + S, O : O + S].astype(np.float32)
    # out[v, u] = crop[u, S - 1 - v], which is numpy's rot90
    np.testing.assert_allclose(x[0], np.rot90(crop), atol=1e-3)
    np.testing.assert_array_equal(y[0], np.rot90(masks[0, O : O + S, O : O + S]))


def test_bilinear_is_exact_on_a_linear_ramp():
    yy, xx = np.mgrid[0:C, 0:C].astype(np.float32)
    ramp = (xx + 0.01 * yy)[None]  # values small enough to be exact-ish in float32
    params = np.array([[0.07, 1.06, 2.3, -4.7]])
    x, _ = augment(ramp, np.zeros((1, C, C), np.uint8), params)
    cx, cy = patch_coordinates(augment_affine(params, C), S)
    np.testing.assert_allclose(x[0], cx[0] + 0.01 * cy[0], atol=1e-4)


def test_larger_scale_shows_a_larger_area():
    yy, xx = np.mgrid[0:C, 0:C].astype(np.float32)
    ramp = xx[None]
    params = identity_params(1)
    params[0, 1] = 1.1
    x, _ = augment(ramp, np.zeros((1, C, C), np.uint8), params)
    # across the 127-px span of the patch the sampled columns span 1.1 x 127
    assert x[0, 0, -1] - x[0, 0, 0] == pytest.approx(1.1 * (S - 1), abs=1e-3)


def test_random_transforms_equal_scipy_map_coordinates(context):
    images, masks = context
    params = draw_params(3, PAPER_ACETABULUM, np.random.default_rng(5))
    x, y = augment(images, masks, params)
    cx, cy = patch_coordinates(augment_affine(params, C), S)
    for i in range(3):
        ref = ndimage.map_coordinates(images[i].astype(np.float32), [cy[i], cx[i]], order=1)
        np.testing.assert_allclose(x[i], ref, atol=1e-4)
        # nearest: equal but at coordinates within float32 rounding of a tie (none expected here)
        near = ndimage.map_coordinates(masks[i], [cy[i], cx[i]], order=0)
        assert np.count_nonzero(y[i] != near) == 0


def test_read_outside_the_context_raises():
    params = identity_params(1)
    params[0, 2] = 30.0  # 30 px right: beyond the 24 px margin
    with pytest.raises(ValueError, match="reads outside"):
        augment(np.zeros((1, C, C)), np.zeros((1, C, C), np.uint8), params)


def test_no_blank_corners_with_a_nan_border():
    """Everything outside the reachable disc is NaN: a sample that read it would contain NaN."""
    s = PAPER_ACETABULUM
    reach = int(np.ceil(augmentation_reach(s.rotation, s.scale, s.displacement))) + 1
    img = np.full((1, C, C), np.nan, np.float32)
    lo, hi = (C - 1) / 2 - reach, (C - 1) / 2 + reach
    img[0, int(np.floor(lo)) : int(np.ceil(hi)) + 1, int(np.floor(lo)) : int(np.ceil(hi)) + 1] = 1.0
    rng = np.random.default_rng(2)
    params = draw_params(64, s, rng)
    x, _ = augment(np.repeat(img, 64, 0), np.zeros((64, C, C), np.uint8), params)
    assert np.isfinite(x).all()


def test_draw_params_is_seeded_and_within_ranges():
    s = PAPER_ACETABULUM
    a = draw_params(1000, s, np.random.default_rng(7))
    b = draw_params(1000, s, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a[:, 0]).max() <= 0.1 and np.abs(a[:, 1] - 1).max() <= 0.1
    assert np.abs(a[:, 2:]).max() <= 0.05 * S
    assert np.abs(a[:, 2:]).max() > 0.04 * S  # displacement is actually used
    assert not np.array_equal(a, draw_params(1000, s, np.random.default_rng(8)))


def test_settings_validate():
    with pytest.raises(ValueError, match="rotation"):
        AugmentSettings(rotation=-0.1, scale=0.1, displacement=0.0, appearance=0.0)
    with pytest.raises(ValueError, match="scale"):
        AugmentSettings(rotation=0.1, scale=1.5, displacement=0.0, appearance=0.0)
