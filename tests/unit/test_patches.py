"""hipoa.patches: normalisation of sampled patches, on small synthetic arrays (geometry: test_geometry.py)."""

from __future__ import annotations

import numpy as np
from hip_scene import hip_points, smooth_image

from hipoa.geometry import context_offset, inside_mask, patch_affine, sample_patch
from hipoa.patches import normalise_patch
from hipoa.sites import PATCH_SIZE, Site

S = PATCH_SIZE
SITES = [
    Site("inferior_femoral_head", centre=2, reference=(0, 1), dp=0.005, label=1),
    Site("superior_femoral_head", centre=2, reference=(0, 1), dp=0.006, label=2),
    Site("lateral_acetabulum", centre=3, reference=(0, 1), dp=0.010, label=3),
]


# -------------------------------------------------------------------------------- normalisation


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


def test_normalise_patch_by_hand():
    p = np.array([[1.0, 3.0], [5.0, 100.0]], np.float32)
    inside = np.array([[True, True], [False, True]])
    out = normalise_patch(p, inside)
    vals = np.array([1.0, 3.0, 100.0])
    np.testing.assert_allclose(out[inside], (vals - vals.mean()) / vals.std(), rtol=1e-5)
    assert out[1, 0] == 0
    np.testing.assert_array_equal(normalise_patch(np.full((3, 3), 7.0, np.float32), np.ones((3, 3), bool)), 0)
    np.testing.assert_array_equal(normalise_patch(p, np.zeros((2, 2), bool)), 0)


def test_reference_length_outliers_are_robust_z_on_the_log():
    from hipoa.patches import reference_length_z

    rng = np.random.default_rng(0)
    lengths = rng.uniform(55.0, 70.0, 60)
    lengths[[3, 7]] = lengths[[3, 7]] * np.array([2.0, 0.5])  # a 2x and a 0.5x spacing error
    lengths[10] = np.nan
    z = reference_length_z(lengths, min_images=40)
    assert np.isnan(z[10]) and abs(z[3]) > 5 and abs(z[7]) > 5  # qc.reference_length_max_z
    assert np.nanmax(np.abs(np.delete(z, [3, 7]))) < 3
    assert np.isnan(reference_length_z(lengths[:30], min_images=40)).all()  # too few: not checked
