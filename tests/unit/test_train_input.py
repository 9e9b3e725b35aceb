"""The training input on TensorFlow (hipoa.train_input) against the NumPy reference (augment_reference)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf
from tiny_patch_store import write_tiny_store

from augment_reference import augment, draw_params, identity_params, stream_reference

from hipoa.augment import AugmentSettings
from hipoa.geometry import augment_affine, augment_coefficients, augment_coordinates
from hipoa.splits import open_site_patches
from hipoa.train_input import (
    TrainingInput,
    ValidationInput,
    read_contexts,
    warp,
)

SITE = "lateral_acetabulum"
SETTINGS = AugmentSettings(rotation=0.1, scale=0.1, displacement=0.05, appearance=0.0)

# The TF resampling repeats the NumPy reference's float32 operations in the same order, so they
# agree exactly: any difference (a re-associated sum, another rounding of the nearest neighbour)
# changes the training samples and with them the trained models.

@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    """``(n, 176, 176)`` float16 images and uint8 masks of a real tiny store (half positive)."""
    store = write_tiny_store(tmp_path_factory.mktemp("store") / "shard-0000.zarr",
                             eids=[str(5_000_000 + i) for i in range(24)], seed=3)
    manual = open_site_patches(store, SITE, "manual")
    image, mask = read_contexts(manual.image, manual.mask, np.arange(len(manual.rows))[::-1])
    assert image.dtype == np.float16 and mask.dtype == np.uint8 and image.shape == (24, 176, 176)
    np.testing.assert_array_equal(image, np.asarray(manual.image)[:24])  # sorted, whatever the order asked
    assert mask.max() == 1
    return image, mask


def _corner_params(settings: AugmentSettings, size: int = 128) -> np.ndarray:
    """Every corner of the ranges (theta, s, dx, dy each at its minimum or maximum): (16, 4)."""
    d = settings.displacement * size
    corners = itertools.product((-settings.rotation, settings.rotation), (1 - settings.scale, 1 + settings.scale),
                                (-d, d), (-d, d))
    return np.array(list(corners))


def _warp(images, masks, params):
    x, y = warp(tf.constant(images), tf.constant(masks), tf.constant(augment_coefficients(params, images.shape[1])))
    assert x.shape == (len(params), 128, 128, 1) and x.dtype == tf.float32 and y.dtype == tf.uint8
    return x.numpy()[..., 0], y.numpy()


def test_coefficients_are_the_centred_form_of_the_affine():
    params = np.concatenate([_corner_params(SETTINGS), draw_params(50, SETTINGS, np.random.default_rng(1)),
                             identity_params(2)])
    u = np.arange(128.0)
    for context in (176, 177):  # an odd margin puts the crop off-centre by half a pixel
        x, y = augment_coordinates(augment_coefficients(params, context))
        A = augment_affine(params, context)
        want_x = A[:, 0, 0, None, None] * u[None, None, :] + A[:, 0, 1, None, None] * u[None, :, None] + A[:, 0, 2, None, None]
        want_y = A[:, 1, 0, None, None] * u[None, None, :] + A[:, 1, 1, None, None] * u[None, :, None] + A[:, 1, 2, None, None]
        assert x.dtype == np.float32 and x.shape == (len(params), 128, 128)
        np.testing.assert_allclose(x, want_x, rtol=0, atol=1e-4)  # float32 of coordinates up to ~180
        np.testing.assert_allclose(y, want_y, rtol=0, atol=1e-4)


def test_warp_equals_numpy_reference_at_random_and_corner_transforms(contexts):
    image, mask = contexts
    n = len(image)
    rng = np.random.default_rng(7)
    corners = _corner_params(SETTINGS)
    params = np.concatenate([draw_params(n, SETTINGS, rng), corners[np.arange(n) % len(corners)]])
    both = np.concatenate([np.arange(n), np.arange(n)])
    x_tf, y_tf = _warp(image[both], mask[both], params)
    x_np, y_np = augment(image[both], mask[both], params)
    np.testing.assert_array_equal(x_tf, x_np)
    np.testing.assert_array_equal(y_tf, y_np)
    assert y_np.sum() > 5_000  # the masks compared have osteophytes in them, not just zeros
    # the comparison has teeth: a hundredth of a pixel of displacement changes both
    x_off, y_off = _warp(image[both], mask[both], params + np.array([0, 0, 0.01, 0]))
    assert np.abs(x_off - x_np).max() > 1e-3 and np.any(y_off != y_np)


def test_identity_sample_is_the_stored_centre_crop(contexts):
    image, mask = contexts
    x, y = _warp(image, mask, identity_params(len(image)))
    np.testing.assert_array_equal(x, image[:, 24:152, 24:152].astype(np.float32))
    np.testing.assert_array_equal(y, mask[:, 24:152, 24:152])


def _epoch(ds_iter, steps):
    batches = [next(ds_iter) for _ in range(steps)]
    return np.concatenate([b[0].numpy() for b in batches]), np.concatenate([b[1].numpy() for b in batches])


def test_training_input_repeats_by_seed_and_differs_by_epoch(contexts):
    image, mask = contexts
    kw = {"n_augment": 3, "settings": SETTINGS, "batch_size": 10, "epochs": 2}
    train = TrainingInput(image, mask, seed=5, **kw)
    assert train.n_samples == 24 * 4 and train.steps_per_epoch == 10  # 96 samples: 9 x 10 + 6
    it = iter(train.dataset())
    first = next(it)
    assert first[0].shape == (10, 128, 128, 1) and first[0].dtype == tf.float32
    assert first[1].shape == (10, 128, 128) and first[1].dtype == tf.uint8
    assert set(np.unique(first[1].numpy())) <= {0, 1}
    e0 = _epoch(iter(train.dataset()), train.steps_per_epoch)
    e1 = _epoch(it, train.steps_per_epoch - 1)  # the rest of epoch 0 from the first iterator...
    np.testing.assert_array_equal(np.concatenate([first[0].numpy(), e1[0]]), e0[0])
    np.testing.assert_array_equal(np.concatenate([first[1].numpy(), e1[1]]), e0[1])
    assert e0[0].shape == (96, 128, 128, 1)
    ep1 = _epoch(it, train.steps_per_epoch)  # ... and epoch 1: new transforms, new order
    assert ep1[0].shape == e0[0].shape and not np.array_equal(ep1[0], e0[0])
    # a fresh object with the same seed repeats the run exactly; another seed does not
    again = _epoch(iter(TrainingInput(image, mask, seed=5, **kw).dataset()), train.steps_per_epoch)
    np.testing.assert_array_equal(again[0], e0[0])
    other = _epoch(iter(TrainingInput(image, mask, seed=6, **kw).dataset()), train.steps_per_epoch)
    assert not np.array_equal(other[0], e0[0])


def test_epoch_plan_covers_each_image_one_plus_n_augment_times(contexts):
    image, mask = contexts
    train = TrainingInput(image, mask, n_augment=3, settings=SETTINGS, batch_size=8, seed=2, epochs=2)
    ids0, params0 = train.epoch_plan(0)
    ids1, params1 = train.epoch_plan(1)
    for ids in (ids0, ids1):
        np.testing.assert_array_equal(np.sort(ids), np.arange(96))
        np.testing.assert_array_equal(np.bincount(ids // 4, minlength=24), np.full(24, 4))
    assert not np.array_equal(ids0, ids1)
    # sample 0 of every image is the identity, the others are random within the ranges
    for ids, params in ((ids0, params0), (ids1, params1)):
        first = ids % 4 == 0
        np.testing.assert_array_equal(params[first], identity_params(24))
        rest = params[~first]
        assert np.all(np.abs(rest[:, 0]) <= 0.1) and np.all(np.abs(rest[:, 1] - 1) <= 0.1)
        assert np.all(np.abs(rest[:, 2:]) <= 0.05 * 128) and np.abs(rest[:, 2:]).max() > 3  # spread, not degenerate
    # per sample id, epoch 1 redraws every random transform
    random = np.arange(96) % 4 != 0
    by_id0, by_id1 = params0[np.argsort(ids0)], params1[np.argsort(ids1)]
    assert np.all(np.any(by_id0[random] != by_id1[random], axis=1))


def test_validation_made_once_identical_across_epochs(contexts):
    image, mask = contexts
    val = ValidationInput(image, mask, n_augment=2, settings=SETTINGS, batch_size=7, seed=20_211_014)
    assert val.n_samples == 72 and val.steps_per_epoch == 11 and val.x.dtype == np.float32
    it = iter(val.dataset())
    e0, e1 = _epoch(it, val.steps_per_epoch), _epoch(it, val.steps_per_epoch)
    np.testing.assert_array_equal(e0[0], e1[0])
    np.testing.assert_array_equal(e0[1], e1[1])
    np.testing.assert_array_equal(e0[0][..., 0], val.x)
    # image order; sample 0 of each image is its centre crop, the others are not
    np.testing.assert_array_equal(val.x[::3], image[:, 24:152, 24:152])
    np.testing.assert_array_equal(val.y[::3], mask[:, 24:152, 24:152])
    assert not np.array_equal(val.x[1::3], image[:, 24:152, 24:152])
    # the same fixed seed gives the same set, whatever the batch size
    np.testing.assert_array_equal(
        ValidationInput(image, mask, n_augment=2, settings=SETTINGS, batch_size=5, seed=20_211_014).x, val.x)


def test_rejects_bad_input(contexts):
    image, mask = contexts
    with pytest.raises(ValueError, match="context patch of at least"):
        TrainingInput(image, mask, n_augment=1, settings=AugmentSettings(0.4, 0.3, 0.1, 0.0), batch_size=4, seed=0,
                      epochs=1)
    with pytest.raises(ValueError, match=r"\(n, C, C\)"):
        TrainingInput(image, mask[:3], n_augment=1, settings=SETTINGS, batch_size=4, seed=0, epochs=1)
    with pytest.raises(ValueError, match="repeated rows"):
        read_contexts(image, mask, np.array([1, 1, 2]))


@pytest.mark.parametrize("n_augment, displacement", [(7, 0.0), (19, 0.05)])
def test_batches_are_those_of_the_former_stream(contexts, n_augment, displacement):
    """Two training epochs and the validation set equal hipoa 0.x's stream bit for bit, so a seed
    trains the same model as before (and the demo's evaluation cannot move with this change)."""
    image, mask = contexts
    settings = AugmentSettings(0.1, 0.1, displacement, 0.0)
    kw = {"n_augment": n_augment, "settings": settings, "batch_size": 16}
    train = TrainingInput(image, mask, seed=3, epochs=2, **kw)
    it = iter(train.dataset())
    for epoch in range(2):
        for x_old, y_old in stream_reference(image, mask, seed=3, epoch=epoch, **kw):
            x, y = next(it)
            np.testing.assert_array_equal(x.numpy(), x_old)
            np.testing.assert_array_equal(y.numpy(), y_old)
    val = ValidationInput(image, mask, seed=20_211_014, **kw)
    old = np.concatenate([x[..., 0] for x, _ in stream_reference(image, mask, seed=20_211_014, epoch=0, fixed=True, **kw)])
    np.testing.assert_array_equal(val.x, old)
