"""hipoa.infer: the one inference path; its on-device rule equals hipoa.metrics' NumPy rule exactly.

The reference throughout is the previous NumPy path: ``model.predict`` -> softmax channel 1 ->
:func:`hipoa.metrics.presence_from_probability`.
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from hipoa_fixtures import SITES, example_shard, make_model  # noqa: E402  (tests/unit is on sys.path)
from tiny_patch_store import write_tiny_store

from hipoa import predict
from hipoa.infer import SiteModel, device_rule, prefetch_batches
from hipoa.metrics import predicted_area_px, presence_from_probability
from hipoa.modelio import PresenceRule
from hipoa.sites import PATCH_SIZE
from hipoa.store import open_patches

RULES = [
    PresenceRule(0.5, 1, 0.5),  # k = 1: the most confident pixel
    PresenceRule(0.5, 20, 0.7),  # detect above the pixel threshold
    PresenceRule(0.5, 37, 0.9),
    PresenceRule(0.3, 500, 0.95),
    PresenceRule(0.5, PATCH_SIZE * PATCH_SIZE, 0.5),  # k = every pixel
    PresenceRule(0.7, 3, None),  # a card from before detect_threshold
]


def _maps(n: int = 12, seed: int = 0) -> np.ndarray:
    """``(n, 128, 128)`` float32 maps with ties and values exactly at the thresholds (edge cases)."""
    rng = np.random.default_rng(seed)
    p = rng.beta(0.3, 0.6, (n, PATCH_SIZE, PATCH_SIZE)).astype(np.float32)
    for t in (0.3, 0.5, 0.7, 0.9, 0.95):
        p[rng.random(p.shape) < 0.01] = np.float32(t)
    p[0] = 0.0  # nothing
    p[1] = 1.0  # everything
    p[2] = np.float32(0.7)  # every pixel exactly at a threshold
    p[3, :10, :10] = 0.97  # a confident square on noise
    return p


def _reference(model, x: np.ndarray, rule: PresenceRule):
    prob = model.predict(x[..., None].astype(np.float32), batch_size=8, verbose=0)[..., 1]
    return presence_from_probability(prob, rule.pixel_threshold, rule.min_area_px, rule.detect_threshold)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.pixel_threshold}-{r.min_area_px}-{r.detect_threshold}")
def test_device_rule_equals_numpy_rule_exactly(rule):
    p = _maps()
    present, mask, area, probability = presence_from_probability(
        p, rule.pixel_threshold, rule.min_area_px, rule.detect_threshold)
    grid = (0.5, 0.7, 0.9)
    out = tf.function(lambda x: device_rule(x, rule, count_thresholds=grid, masks="all"))(tf.constant(p))
    np.testing.assert_array_equal(out["present"].numpy(), present)
    np.testing.assert_array_equal(out["mask"].numpy(), mask)
    np.testing.assert_array_equal(out["area_px"].numpy(), area)
    got = out["probability"].numpy()
    assert got.dtype == np.float32 and np.array_equal(got, probability)  # equal as float32, not close
    for j, t in enumerate(grid):
        np.testing.assert_array_equal(out["counts"].numpy()[:, j], predicted_area_px(p, t))
    only = tf.function(lambda x: device_rule(x, rule, masks="present"))(tf.constant(p))["mask"].numpy()
    np.testing.assert_array_equal(only, mask[present])  # only the present images' masks cross
    pixels = tf.function(lambda x: device_rule(x, rule, masks="pixels"))(tf.constant(p))["mask"].numpy()
    np.testing.assert_array_equal(pixels, (p >= np.float32(rule.pixel_threshold)).astype(np.uint8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("m") / "unet.keras", min_area_px=20)


def test_last_batch_padded_to_one_shape_and_traced_once(tiny):
    engine = SiteModel.load(tiny, precision="float32")
    assert engine.rule == PresenceRule(0.5, 20, 0.5) and engine.card.validation == {"dice": 1.0}
    x = np.where(_maps(10, seed=1) > 0.5, 1.0, -1.0).astype(np.float16)
    batches = list(engine.run(x, batch_size=4, masks="all"))
    assert [len(b) for b in batches] == [4, 4, 2]
    step = engine._step(engine.rule, (), "all", 0)
    assert step.experimental_get_tracing_count() == 1  # the short last batch did not retrace
    got = engine.predict(x, np.arange(10)[::-1], batch_size=4, masks="present")  # any order
    present, mask, area, probability = _reference(engine.model, x[::-1], engine.rule)
    np.testing.assert_array_equal(got.present, present)
    np.testing.assert_array_equal(got.mask, mask)
    np.testing.assert_array_equal(got.area_px, area)
    np.testing.assert_array_equal(got.probability, probability)
    assert got.indices.tolist() == list(range(9, -1, -1))


def test_prefetching_reader_keeps_order_and_pads():
    image = np.arange(11 * 2 * 2, dtype=np.float16).reshape(11, 2, 2)
    idx = np.array([10, 0, 5, 6, 7, 1, 2])
    seen = list(prefetch_batches(image, idx, 3, threads=3))
    assert [b.tolist() for b, _ in seen] == [[10, 0, 5], [6, 7, 1], [2]]
    for b, x in seen:
        assert x.shape == (3, 2, 2) and x.dtype == np.float16
        np.testing.assert_array_equal(x[: len(b)], image[b])
        assert not x[len(b):].any()
    with pytest.raises(ValueError, match="batch_size"):
        list(prefetch_batches(image, idx, 0))


def test_store_with_rows_not_all_measurable(tmp_path, tiny):
    store, _, _ = example_shard(tmp_path)
    data = open_patches([store], SITES[0], "auto")
    ok, _ = predict.measurable(data.rows, data.inside, 0.9, data.affine)
    idx = np.flatnonzero(ok)
    assert 0 < len(idx) < len(data)
    engine = SiteModel.load(tiny, precision="float32")
    got = engine.predict(data.image, idx, batch_size=3, masks="all", count_thresholds=(0.5,))
    x = data.image[idx].compute()
    present, mask, area, probability = _reference(engine.model, x, engine.rule)
    assert got.indices.tolist() == idx.tolist()
    np.testing.assert_array_equal(got.present, present)
    np.testing.assert_array_equal(got.mask, mask)
    np.testing.assert_array_equal(got.area_px, area)
    np.testing.assert_array_equal(got.probability, probability)
    assert got.counts.shape == (len(idx), 1)


def test_masks_need_a_rule():
    with pytest.raises(ValueError, match="presence rule"):
        list(SiteModel(keras.Sequential()).run(np.zeros((1, 128, 128), np.float32), masks="present"))


def test_same_masks_and_presence_as_the_previous_numpy_path(tmp_path):
    """A real U-Net over a real patch store: the engine gives the previous path's results."""
    from hipoa.unet import build_unet

    store = write_tiny_store(tmp_path / "shard-0000.zarr", eids=[str(5_000_000 + i) for i in range(37)], seed=2,
                             qc_fail_every=7)
    keras.utils.set_random_seed(3)
    model = build_unet(depth=2, base_filters=4, dropout=0.0)
    data = open_patches([store], "lateral_acetabulum", "auto")
    ok = data.rows["qc_reason"].eq("").to_numpy()
    idx = np.flatnonzero(ok)
    x = data.image[idx].compute()
    engine = SiteModel(model)
    calls = []
    # This untrained U-Net's maps run 0.2-0.9, half of the pixels near 0.5: a hard test of exactness.
    for rule in (PresenceRule(0.5, 1, 0.5), PresenceRule(0.5, 200, 0.55), PresenceRule(0.6, 5, 0.7),
                 PresenceRule(0.5, 8000, 0.5)):
        present, mask, area, probability = _reference(model, x, rule)
        got = engine.predict(data.image, idx, batch_size=8, masks="all", rule=rule)
        np.testing.assert_array_equal(got.present, present)
        np.testing.assert_array_equal(got.mask, mask)
        np.testing.assert_array_equal(got.area_px, area)
        # within a float32 ulp: the engine pads the last batch to its fixed size, and oneDNN may pick another
        # convolution kernel for a batch of 8 than for Keras' batch of 7 (AMD EPYC Zen 3: 1 ulp)
        np.testing.assert_allclose(got.probability, probability, rtol=2e-7, atol=0)
        calls.append(present.mean())
    assert min(calls) < 1 and max(calls) > 0 and any(0 < c < 1 for c in calls), calls  # both calls seen


def test_predict_shards_equals_per_shard_calls(tmp_path, tiny):
    import zarr

    models = {SITES[0]: tiny, SITES[1]: tiny}
    a, _, _ = example_shard(tmp_path, name="shard-0000")
    b, _, _ = example_shard(tmp_path, name="shard-0001", eids=[str(2000 + i) for i in range(6)])
    many = predict.predict_shards(stores=[a, b], models=models, outs=[tmp_path / "a.parquet", tmp_path / "b.parquet"],
                                  masks_outs=[tmp_path / "a.zarr", tmp_path / "b.zarr"], batch_size=4,
                                  precision="float32")
    for store, frame, name in zip((a, b), many, "ab"):
        one = predict.predict_shard(store=store, models=models, out=tmp_path / f"{name}1.parquet",
                                    masks_out=tmp_path / f"{name}1.zarr", batch_size=4, precision="float32")
        pd.testing.assert_frame_equal(frame, one)
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / f"{name}.parquet"), one)
        for site in SITES:
            np.testing.assert_array_equal(zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r")[f"{site}/mask"][:],
                                          zarr.open_group(str(tmp_path / f"{name}1.zarr"), mode="r")[f"{site}/mask"][:])
    with pytest.raises(ValueError, match="one out"):
        predict.predict_shards(stores=[a, b], models=models, outs=[tmp_path / "x.parquet"])
    with pytest.raises(ValueError, match="twice"):
        predict.predict_shards(stores=[a, b], models=models, outs=[tmp_path / "x.parquet"] * 2)
