"""Augmentation geometry: exact centre crops, known shifts and rotations, never outside the context."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hipoa.augment import (
    AugmentSettings,
    augment,
    check_context,
    draw_params,
    identity_params,
    required_context,
    sample_coordinates,
)

C, S = 176, 128
O = (C - S) // 2  # 24
PAPER_ACETABULUM = AugmentSettings(rotation=0.1, scale=0.1, displacement=0.05)


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
    coords = sample_coordinates(params, C)[0]
    np.testing.assert_allclose(x[0], coords[0] + 0.01 * coords[1], atol=1e-4)


def test_larger_scale_shows_a_larger_area():
    yy, xx = np.mgrid[0:C, 0:C].astype(np.float32)
    ramp = xx[None]
    params = identity_params(1)
    params[0, 1] = 1.1
    x, _ = augment(ramp, np.zeros((1, C, C), np.uint8), params)
    # across the 127-px span of the patch the sampled columns span 1.1 x 127
    assert x[0, 0, -1] - x[0, 0, 0] == pytest.approx(1.1 * (S - 1), abs=1e-3)


def test_paper_extremes_stay_inside_the_context():
    s = PAPER_ACETABULUM
    d = s.displacement * S
    for theta, scale, dx, dy in itertools.product((-s.rotation, s.rotation), (1 - s.scale, 1 + s.scale), (-d, d), (-d, d)):
        xy = sample_coordinates(np.array([[theta, scale, dx, dy]]), C)
        assert xy.min() >= 0 and xy.max() <= C - 1, (theta, scale, dx, dy, xy.min(), xy.max())
    rng = np.random.default_rng(1)
    xy = sample_coordinates(draw_params(500, s, rng), C)
    assert xy.min() >= 0 and xy.max() <= C - 1
    check_context(s, C)  # does not raise
    assert required_context(s) <= C


def test_required_context_is_tight_enough_to_fail():
    s = PAPER_ACETABULUM
    small = required_context(s) - 2
    d = s.displacement * S
    worst = np.array([[s.rotation, 1 + s.scale, d, d]])
    xy = sample_coordinates(worst, small)
    assert xy.max() > small - 1 or xy.min() < 0
    with pytest.raises(ValueError, match="context patch of at least"):
        check_context(s, small)
    with pytest.raises(ValueError, match="reads outside"):
        augment(np.zeros((1, small, small)), np.zeros((1, small, small), np.uint8), worst)


def test_no_blank_corners_with_a_nan_border():
    """Everything outside the reachable disc is NaN: a sample that read it would contain NaN."""
    s = PAPER_ACETABULUM
    reach = int(np.ceil((1 + s.scale) * (S - 1) / 2 * (np.cos(s.rotation) + np.sin(s.rotation)) + s.displacement * S)) + 1
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
        AugmentSettings(rotation=-0.1)
    with pytest.raises(ValueError, match="scale"):
        AugmentSettings(scale=1.5)
