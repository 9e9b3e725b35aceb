"""Robust to scanner and annotator: the appearance augmentation (hipoa.augment.appear)
and the boundary-tolerant loss (hipoa.train.pixel_loss) that trains on noisy outlines."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from tiny_patch_store import write_tiny_store

from augment_reference import stream_reference

from hipoa.augment import (
    APPEARANCE_FIELDS,
    MAX_APPEARANCE,
    NEUTRAL_APPEARANCE,
    AugmentSettings,
    appear,
    draw_appearance,
)
from hipoa.splits import open_site_patches
from hipoa.train_input import TrainingInput, ValidationInput, appearance_plan, read_contexts

SITE = "lateral_acetabulum"
GEOMETRIC = AugmentSettings(rotation=0.1, scale=0.1, displacement=0.05, appearance=0.0)
APPEARANCE = dataclasses.replace(GEOMETRIC, appearance=1.0)
KW = {"n_augment": 3, "batch_size": 8, "epochs": 2}


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    """``(16, 176, 176)`` float16 images and uint8 masks of a tiny store (half positive)."""
    store = write_tiny_store(tmp_path_factory.mktemp("store") / "shard-0000.zarr",
                             eids=[str(6_000_000 + i) for i in range(16)], seed=5)
    manual = open_site_patches(store, SITE, "manual")
    return read_contexts(manual.image, manual.mask, np.arange(len(manual.rows)))


def _epoch(train: TrainingInput):
    """Epoch 0 as ``(x (n, 128, 128), y (n, 128, 128), ids (n,))`` in training order."""
    it = iter(train.dataset())
    batches = [next(it) for _ in range(train.steps_per_epoch)]
    x = np.concatenate([b[0].numpy()[..., 0] for b in batches])
    y = np.concatenate([b[1].numpy() for b in batches])
    return x, y, train.epoch_plan(0)[0]


@pytest.fixture(scope="module")
def epochs(contexts):
    """Epoch 0 with the appearance augmentation (seed 5), without it, and again (seed 5 and 6)."""
    image, mask = contexts
    return {
        "on": _epoch(TrainingInput(image, mask, settings=APPEARANCE, seed=5, **KW)),
        "off": _epoch(TrainingInput(image, mask, settings=GEOMETRIC, seed=5, **KW)),
        "again": _epoch(TrainingInput(image, mask, settings=APPEARANCE, seed=5, **KW)),
        "other": _epoch(TrainingInput(image, mask, settings=APPEARANCE, seed=6, **KW)),
    }


# ---- the training input ----------------------------------------------------------------------


def test_strength_zero_is_the_geometric_input_exactly(contexts, epochs):
    image, mask = contexts
    train = TrainingInput(image, mask, settings=GEOMETRIC, seed=5, **KW)
    assert train._appearance is None  # no appearance tables, no appearance ops in the graph
    x, y, _ = epochs["off"]
    old = list(stream_reference(image, mask, n_augment=3, settings=GEOMETRIC, batch_size=8, seed=5, epoch=0))
    np.testing.assert_array_equal(x, np.concatenate([b[0][..., 0] for b in old]))
    np.testing.assert_array_equal(y, np.concatenate([b[1] for b in old]))


def test_identity_samples_and_masks_unchanged_the_others_changed(epochs):
    (x_on, y_on, ids), (x_off, y_off, ids_off) = epochs["on"], epochs["off"]
    np.testing.assert_array_equal(ids, ids_off)  # same order: the appearance draw has a stream of its own
    np.testing.assert_array_equal(y_on, y_off)  # never the mask
    identity = ids % 4 == 0
    np.testing.assert_array_equal(x_on[identity], x_off[identity])  # sample 0 of each image as stored
    change = np.abs(x_on[~identity] - x_off[~identity]).reshape(int((~identity).sum()), -1).mean(axis=1)
    assert change.min() > 0.02, change.min()


def test_augmented_samples_finite_and_z_scored(epochs):
    x, _, ids = epochs["on"]
    augmented = x[ids % 4 != 0]
    assert np.isfinite(augmented).all()
    np.testing.assert_allclose(augmented.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(augmented.std(axis=(1, 2)), 1.0, atol=1e-4)


def test_same_seed_same_batches_other_seed_other(epochs):
    np.testing.assert_array_equal(epochs["again"][0], epochs["on"][0])
    assert not np.array_equal(epochs["other"][0], epochs["on"][0])


def test_plan_per_sample_neutral_for_identity_and_repeatable():
    ids = np.random.default_rng(0).permutation(40)
    params, keys = appearance_plan(ids, 4, 1.0, seed=3, epoch=1)
    assert params.shape == (40, len(APPEARANCE_FIELDS)) and params.dtype == np.float32 and keys.dtype == np.int64
    np.testing.assert_array_equal(params[ids % 4 == 0], np.tile(np.float32(NEUTRAL_APPEARANCE), (10, 1)))
    # a sample's parameters follow its id, not its place in the shuffle
    again, again_keys = appearance_plan(np.arange(40), 4, 1.0, seed=3, epoch=1)
    np.testing.assert_array_equal(again[ids], params)
    np.testing.assert_array_equal(again_keys[ids], keys)
    # every random sample its own parameters; another epoch redraws them
    random = params[ids % 4 != 0]
    assert len(np.unique(random, axis=0)) == len(random)
    other, _ = appearance_plan(ids, 4, 1.0, seed=3, epoch=2)
    assert np.all(np.any(other[ids % 4 != 0] != random, axis=1))


def test_validation_stays_geometric(contexts):
    image, mask = contexts
    kw = {"n_augment": 2, "batch_size": 8, "seed": 20_211_014}
    np.testing.assert_array_equal(ValidationInput(image, mask, settings=APPEARANCE, **kw).x,
                                  ValidationInput(image, mask, settings=GEOMETRIC, **kw).x)


def test_draw_ranges_and_settings_check():
    rng = np.random.default_rng(1)
    for s in (0.5, 1.0, MAX_APPEARANCE):
        p, keys = draw_appearance(20_000, s, rng)
        col = dict(zip(APPEARANCE_FIELDS, p.T, strict=True))
        assert 1 - 0.3 * s <= col["contrast"].min() and col["contrast"].max() <= 1
        assert col["ramp"].max() <= 0.5 * s and col["noise"].max() <= 0.2 * s and col["banding"].max() <= 0.1 * s
        assert 1 <= col["grid"].min() and col["grid"].max() <= 1 + 0.25 * s and col["grid"].max() > 1 + 0.24 * s
        assert -0.5 * s <= col["psf"].min() < 0 < col["psf"].max() <= s
        assert np.abs(col["tone"]).max() <= min(1.0, 0.35 * s)  # the tone curve stays monotonic
        assert 0 <= keys.min() and keys.max() < 2**31
    with pytest.raises(ValueError, match="appearance must be <= 2.5, got 3"):
        AugmentSettings(rotation=0.1, scale=0.1, displacement=0.0, appearance=3)
    with pytest.raises(ValueError, match="appearance must be a finite number >= 0, got -0.1"):
        AugmentSettings(rotation=0.1, scale=0.1, displacement=0.0, appearance=-0.1)


# ---- each component --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smooth_patches():
    """``(8, 128, 128, 1)`` z-scored smooth random patches with a bright band (like bone)."""
    from scipy import ndimage

    rng = np.random.default_rng(2)
    x = ndimage.gaussian_filter(rng.normal(size=(8, 128, 128)), (0, 3, 3))
    x += (np.arange(128) > 64)[None, None, :] * 0.5 * x.std()
    x = (x - x.mean(axis=(1, 2), keepdims=True)) / x.std(axis=(1, 2), keepdims=True)
    return x.astype(np.float32)[..., None]


def _apply(x, keys=None, **changes):
    row = dict(zip(APPEARANCE_FIELDS, NEUTRAL_APPEARANCE, strict=True))
    unknown = set(changes) - set(row)
    assert not unknown, unknown
    row.update(changes)
    params = np.tile(np.array([row[f] for f in APPEARANCE_FIELDS], np.float32), (len(x), 1))
    keys = np.arange(len(x), dtype=np.int64) + 11 if keys is None else keys
    return appear(tf.constant(x), tf.constant(params), tf.constant(keys)).numpy()[..., 0]


def _high_frequency(x):
    """Mean squared 4-neighbour Laplacian per patch (energy at the highest spatial frequencies)."""
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return np.mean(lap**2, axis=(1, 2))


def test_neutral_row_only_re_z_scores(smooth_patches):
    x = smooth_patches
    np.testing.assert_allclose(_apply(x), x[..., 0], atol=2e-5)
    np.testing.assert_allclose(_apply(x, contrast=0.7), x[..., 0], atol=2e-5)  # contrast acts against the rest


def test_blur_and_coarser_grid_lower_sharpening_raises_high_frequencies(smooth_patches):
    x = smooth_patches
    white = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
    # measured (smooth, white): blur 1 px 0.7, 0.07; grid 1.25 0.82, 0.28; sharpen 0.5 1.23, 1.30
    for patches, blur, grid, sharpen in ((x, 0.8, 0.9, 1.1), (white, 0.2, 0.5, 1.2)):
        base = _high_frequency(_apply(patches))
        assert np.all(_high_frequency(_apply(patches, psf=1.0)) < blur * base)
        assert np.all(_high_frequency(_apply(patches, grid=1.25, grid_phase=0.4)) < grid * base)
        assert np.all(_high_frequency(_apply(patches, psf=-0.5)) > sharpen * base)


def test_coarser_grid_is_close_to_its_own_resampling(smooth_patches):
    """A 1.2x coarser grid keeps the anatomy: the change is a fraction of the patch's variance."""
    x = smooth_patches
    y = _apply(x, grid=1.2, grid_phase=0.5)
    assert 0 < np.mean((y - x[..., 0]) ** 2) < 0.02


def test_noise_adds_the_asked_level_and_texture_follows_the_psf(smooth_patches):
    x = smooth_patches
    base = _apply(x)
    noisy = _apply(x, noise=0.2)
    diff = noisy - base * noisy.std(axis=(1, 2), keepdims=True) / base.std(axis=(1, 2), keepdims=True)
    assert np.all(np.abs(diff.std(axis=(1, 2)) - 0.2) < 0.03)
    assert np.all(_high_frequency(noisy) > 2 * _high_frequency(base))

    def lag1(d):  # correlation of horizontal neighbours of the noise
        return np.mean([np.corrcoef(p[:, :-1].ravel(), p[:, 1:].ravel())[0, 1] for p in d])

    white = _apply(x, noise=0.2, psf=1.0, noise_texture=0.0) - _apply(x, psf=1.0)
    textured = _apply(x, noise=0.2, psf=1.0, noise_texture=1.0) - _apply(x, psf=1.0)
    assert lag1(white) < 0.1 and lag1(textured) > 0.5


def test_banding_adds_row_constant_variance(smooth_patches):
    x = smooth_patches
    base, banded = _apply(x), _apply(x, banding=0.1)
    diff = banded * np.sqrt(1 + 0.1**2) - base  # undo the z-score's rescaling (rows add ~0.01 variance)
    rows = diff.mean(axis=2, keepdims=True)
    assert np.all(np.abs(rows.std(axis=(1, 2)) - 0.1) < 0.03)
    assert np.all((diff - rows).std(axis=(1, 2)) < 0.2 * rows.std(axis=(1, 2)))  # constant along each row


def test_ramp_adds_a_smooth_gradient_in_its_direction(smooth_patches):
    x = smooth_patches
    u = np.linspace(-1, 1, 128, dtype=np.float32)
    for angle, axis in ((0.0, 2), (np.pi / 2, 1)):
        diff = _apply(x, ramp=0.5, ramp_angle=angle) - _apply(x)
        profile = diff.mean(axis=3 - axis)  # mean across the other axis: (n, 128) along the ramp
        slope = (profile * u).sum(axis=1) / (u * u).sum()
        assert np.all(slope > 0.2)
    # less bone contrast makes the same ramp a larger share of the patch
    weak = np.abs(_apply(x, ramp=0.5, contrast=0.7) - _apply(x)).mean()
    strong = np.abs(_apply(x, ramp=0.5) - _apply(x)).mean()
    assert weak > strong


def test_tone_curve_brightens_or_darkens_mid_grey(smooth_patches):
    x = smooth_patches

    def skew(v):
        d = v - v.mean(axis=(1, 2), keepdims=True)
        return (d**3).mean(axis=(1, 2)) / (d**2).mean(axis=(1, 2)) ** 1.5

    base = skew(_apply(x))
    assert np.all(skew(_apply(x, tone=0.35)) < base - 0.05)  # concave curve: a longer dark tail
    assert np.all(skew(_apply(x, tone=-0.35)) > base + 0.05)


def test_noise_fields_follow_the_keys(smooth_patches):
    x = smooth_patches
    a = _apply(x, noise=0.2)
    np.testing.assert_array_equal(a, _apply(x, noise=0.2))
    assert not np.array_equal(a, _apply(x, keys=np.arange(8, dtype=np.int64) + 99, noise=0.2))
    assert not np.array_equal(a[0], a[1] - x[1, ..., 0] + x[0, ..., 0])  # samples of a batch differ


# ---- noisy labels: the boundary-tolerant loss ------------------------------------------------


def test_boundary_weights_ring_on_a_known_mask():
    from hipoa.train import boundary_weights

    mask = np.zeros((1, 9, 9), np.uint8)
    mask[0, 3:6, 3:6] = 1  # a 3 x 3 square
    mask[0, 0, 8] = 1  # a pixel in the corner: the patch border is not a boundary
    w = np.asarray(boundary_weights(mask, 0.5))
    want = np.ones((9, 9), np.float32)
    want[2:7, 2:7] = 0.5  # the 5 x 5 dilation ...
    want[4, 4] = 1.0  # ... minus the erosion, the centre pixel
    want[0:2, 7:9] = 0.5
    np.testing.assert_array_equal(w[0], want)
    np.testing.assert_array_equal(np.asarray(boundary_weights(mask, 1.0)), np.ones((1, 9, 9)))
    np.testing.assert_array_equal(np.asarray(boundary_weights(np.zeros((2, 9, 9)), 0.5)), np.ones((2, 9, 9)))


def test_loss_off_is_the_plain_cross_entropy_and_weighting_lowers_the_boundary():
    import keras

    from hipoa.train import boundary_weights, pixel_loss

    rng = np.random.default_rng(4)
    y = np.zeros((3, 16, 16), np.uint8)
    y[:, 4:10, 5:12] = 1
    p1 = rng.uniform(0.01, 0.99, (3, 16, 16)).astype(np.float32)
    p = np.stack([1 - p1, p1], axis=-1)
    plain = float(keras.losses.SparseCategoricalCrossentropy()(y, p))
    assert float(pixel_loss(1.0)(y, p)) == plain
    half = float(pixel_loss(0.5)(y, p))
    zero = float(pixel_loss(0.0)(y, p))
    assert np.isfinite(half) and zero < half < plain
    ce = -np.log(np.where(y == 1, p1, 1 - p1))
    ring = np.asarray(boundary_weights(y, 0.0)) == 0
    assert half == pytest.approx(float(np.mean(np.where(ring, 0.5 * ce, ce))), rel=1e-5)
    with pytest.raises(ValueError, match="boundary_weight must be in"):
        pixel_loss(1.5)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_fit_with_the_loss_under_mixed_precision(contexts, policy):
    """Training and validation (the same loss) stay finite under both mixed policies."""
    import keras

    from hipoa.train import fit_unet

    image, mask = contexts
    keras.utils.set_random_seed(0)
    kw = {"n_augment": 1, "settings": APPEARANCE, "batch_size": 8}
    train = TrainingInput(image[:8], mask[:8], seed=1, epochs=1, **kw)
    val = ValidationInput(image[8:12], mask[8:12], seed=2, **kw)
    fit = fit_unet(train, val, site=SITE, epochs=1, depth=1, base_filters=2, dropout=0.0, policy=policy,
               boundary_weight=0.5)
    assert fit.model.loss.name == "boundary_tolerant_crossentropy"
    assert np.isfinite(fit.history["loss"]).all() and np.isfinite(fit.best_val_loss)
