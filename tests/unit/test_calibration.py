"""hipoa.calibration and the calibration measures of hipoa.metrics: PAV against its min-max formula,
monotone maps, ECE and Brier by hand, the prior shift, the model card round trip, and prediction
applying the card's calibration (without changing a presence call)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from hipoa import predict
from hipoa.calibration import (
    MIN_CLASS_ISOTONIC,
    Calibration,
    describe,
    fit_calibration,
    fit_isotonic,
    fit_platt,
    pav,
    prior_shift,
)
from hipoa.metrics import brier_score, expected_calibration_error
from hipoa.modelio import ModelError, model_json_path, read_model_card, write_model_card

from hipoa_fixtures import SITES, example_shard, make_model  # noqa: E402  (tests/unit is on sys.path)


def _minmax_isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The isotonic fit by its closed form f_i = max_{j <= i} min_{k >= i} mean_w(y[j..k]) (Barlow et al., 1972)."""
    n = len(y)
    mean = lambda j, k: np.sum(w[j : k + 1] * y[j : k + 1]) / np.sum(w[j : k + 1])  # noqa: E731
    return np.array([max(min(mean(j, k) for k in range(i, n)) for j in range(i + 1)) for i in range(n)])


# ---- PAV and isotonic regression ----------------------------------------------------------------


def test_pav_by_hand():
    np.testing.assert_allclose(pav([1, 3, 2, 4]), [1, 2.5, 2.5, 4])
    np.testing.assert_allclose(pav([3, 2, 1]), [2, 2, 2])
    np.testing.assert_allclose(pav([0, 1, 1, 2]), [0, 1, 1, 2])  # already in order: unchanged
    np.testing.assert_allclose(pav([2, 0], [3, 1]), [1.5, 1.5])  # weighted mean (3*2 + 0) / 4
    with pytest.raises(ValueError, match="positive weights"):
        pav([1, 2], [1, 0])


def test_pav_matches_the_minmax_formula():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 9))
        y = rng.integers(0, 2, n).astype(float) if rng.random() < 0.5 else rng.normal(size=n)
        w = rng.integers(1, 4, n).astype(float)
        np.testing.assert_allclose(pav(y, w), _minmax_isotonic(y, w), atol=1e-12)


def test_isotonic_knots_pool_ties_by_hand():
    # scores 0.2 twice (one positive): the point (0.2, 0.5) of weight 2, then 0.3 (0) violates:
    # pooled to (2 * 0.5 + 0) / 3 = 1/3 over 0.2..0.3
    x, y = fit_isotonic([0.1, 0.2, 0.2, 0.3, 0.4], [0, 1, 0, 0, 1])
    np.testing.assert_allclose(x, [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(y, [0.0, 1 / 3, 1 / 3, 1.0])
    # 0 | 1 0 1 0 pooled to 0.5 | 1: the flat block keeps only its two ends (0.3, 0.4 dropped)
    x, y = fit_isotonic([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0, 1, 0, 1, 0, 1])
    np.testing.assert_allclose(x, [0.1, 0.2, 0.5, 0.6])
    np.testing.assert_allclose(y, [0.0, 0.5, 0.5, 1.0])


def test_isotonic_calibration_reproduces_the_fit_and_is_monotone():
    rng = np.random.default_rng(1)
    s = rng.random(300).astype(np.float32)
    t = rng.random(300) < s**3
    cal = fit_calibration(s, t, target_prevalence=0.1)
    assert cal.method == "isotonic" and cal.info["n"] == 300 and cal.info["n_positive"] == int(t.sum())
    # at the validation images the map is the isotonic fit of their truth (clipped to [eps, 1 - eps])
    ux, inv = np.unique(s.astype(np.float64), return_inverse=True)
    w = np.bincount(inv).astype(float)
    fit = pav(np.bincount(inv, weights=t.astype(float)) / w, w)[inv]
    eps = 1 / 302
    np.testing.assert_allclose(cal.apply(s, prior="validation"), np.clip(fit, eps, 1 - eps), atol=1e-12)
    grid = np.linspace(-0.1, 1.1, 1001)  # beyond the knots: flat
    for prior in ("validation", "cohort"):
        p = cal.apply(grid, prior=prior)
        assert (np.diff(p) >= 0).all() and p.min() > 0 and p.max() < 1
    assert cal.apply([0.0], prior="validation")[0] == eps  # no validation image can say 0
    assert cal.info["ece_val"] < cal.info["ece_val_raw"]


# ---- Platt scaling ------------------------------------------------------------------------------


def test_platt_recovers_a_logistic_model():
    rng = np.random.default_rng(2)
    s = rng.uniform(0.01, 0.99, 20_000)
    z = np.log(s / (1 - s))
    t = rng.random(s.size) < 1 / (1 + np.exp(-(2.0 * z - 0.5)))
    a, b = fit_platt(s, t)
    assert a == pytest.approx(2.0, abs=0.1) and b == pytest.approx(-0.5, abs=0.1)


def test_platt_is_finite_on_separable_scores_and_constant_when_reversed():
    a, b = fit_platt([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert np.isfinite([a, b]).all() and a > 0  # Platt's targets keep it finite
    a, b = fit_platt([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0])  # ranks against the truth: no decreasing map
    assert a == 0.0 and b == pytest.approx(0.0)  # targets 3/4 and 1/4, two of each: log odds 0
    with pytest.raises(ValueError, match="positive and negative"):
        fit_platt([0.1, 0.2], [1, 1])


def test_auto_method_depends_on_the_class_counts():
    k = MIN_CLASS_ISOTONIC
    s = np.linspace(0.3, 0.7, 2 * k)  # ranks right, probabilities far off: a map helps
    big = fit_calibration(s, np.arange(2 * k) >= k, target_prevalence=None)
    assert big.method == "isotonic" and big.info["choice"]["candidate"] == "isotonic"
    assert big.info["choice"]["loo_brier"] < big.info["choice"]["brier_raw"]
    small = fit_calibration(s, np.arange(2 * k) >= k + 1, target_prevalence=None)  # k - 1 positives
    assert small.info["choice"]["candidate"] == "platt" and small.method == "platt" and small.a > 0
    assert (np.diff(small.apply(np.linspace(0, 1, 101))) >= 0).all()
    with pytest.raises(ValueError, match="positive and negative"):
        fit_calibration(s, np.ones(2 * k, bool), target_prevalence=0.2)
    with pytest.raises(ValueError, match="method"):
        fit_calibration(s, np.arange(2 * k) >= k, target_prevalence=0.2, method="beta")


def test_a_raw_score_that_is_already_calibrated_is_kept():
    """Eight confident, right validation images: no map beats the raw score left out one at a
    time, so the identity is kept (a fitted map would pull 0.99 towards 0.8)."""
    s = np.array([0.01, 0.02, 0.015, 0.03, 0.98, 0.99, 0.97, 0.995])
    t = s > 0.5
    cal = fit_calibration(s, t, target_prevalence=0.2)
    assert cal.method == "identity" and cal.info["choice"]["candidate"] == "platt"
    assert cal.info["choice"]["loo_brier"] >= cal.info["choice"]["brier_raw"]
    np.testing.assert_allclose(cal.apply(s, prior="validation"), s)
    shifted = cal.apply(s)  # to the cohort's 20 % from the split's 50 %
    assert (shifted < s).all() and (np.diff(shifted[np.argsort(s)]) >= 0).all()
    forced = fit_calibration(s, t, target_prevalence=0.2, method="platt")
    assert forced.apply(np.array([0.995]), prior="validation")[0] < 0.95


# ---- ECE, Brier, prior shift --------------------------------------------------------------------


def test_ece_and_brier_by_hand():
    p = [0.05, 0.15, 0.15, 0.95]
    t = [0, 1, 0, 1]
    # bins [0, .1): |0 - .05| * 1/4; [.1, .2): |.5 - .15| * 2/4; [.9, 1]: |1 - .95| * 1/4
    assert expected_calibration_error(p, t) == pytest.approx(0.05 / 4 + 0.35 / 2 + 0.05 / 4)
    assert brier_score(p, t) == pytest.approx((0.05**2 + 0.85**2 + 0.15**2 + 0.05**2) / 4)
    # 0.1 opens the second bin, 1.0 is in the last; one bin of two: |0.5 - 0.065|; 20 bins split them
    assert expected_calibration_error([0.1, 1.0], [0, 1]) == pytest.approx(0.1 / 2)
    assert expected_calibration_error([0.04, 0.09], [1, 0]) == pytest.approx(0.435)
    assert expected_calibration_error([0.04, 0.09], [1, 0], n_bins=20) == pytest.approx((0.96 + 0.09) / 2)
    assert brier_score([0.5] * 4, [0, 1, 1, 0]) == 0.25
    assert np.isnan(expected_calibration_error([], [])) and np.isnan(brier_score([], []))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier_score([1.2], [1])
    with pytest.raises(ValueError, match="2 probabilities for 1"):
        expected_calibration_error([0.1, 0.2], [1])


def test_prior_shift_by_hand():
    np.testing.assert_allclose(prior_shift([0.5, 0.8], 0.5, 0.2), [0.2, 0.5])  # odds 1 and 4 times 1/4
    np.testing.assert_allclose(prior_shift([0.3], 0.4, 0.4), [0.3])
    np.testing.assert_allclose(prior_shift(prior_shift([0.01, 0.3, 0.99], 0.5, 0.1), 0.1, 0.5), [0.01, 0.3, 0.99])
    with pytest.raises(ValueError, match="to_prevalence"):
        prior_shift([0.5], 0.5, 1.0)


def test_shifted_calibration_is_calibrated_in_the_cohort():
    # scores of positives ~ Beta(4, 2), negatives ~ Beta(2, 4); a balanced validation split and a
    # cohort of prevalence 0.1
    rng = np.random.default_rng(3)
    val_t = np.arange(4000) < 2000
    val_s = np.where(val_t, rng.beta(4, 2, 4000), rng.beta(2, 4, 4000))
    cohort_t = rng.random(40_000) < 0.1
    cohort_s = np.where(cohort_t, rng.beta(4, 2, cohort_t.size), rng.beta(2, 4, cohort_t.size))
    cal = fit_calibration(val_s, val_t, target_prevalence=0.1)
    assert cal.val_prevalence == 0.5
    shifted, unshifted = cal.apply(cohort_s), cal.apply(cohort_s, prior="validation")
    assert shifted.mean() == pytest.approx(0.1, abs=0.01)
    assert expected_calibration_error(shifted, cohort_t) < 0.02
    assert expected_calibration_error(unshifted, cohort_t) > 0.15  # the balanced split's probability over-calls
    assert (shifted > 0.5).sum() < (unshifted > 0.5).sum()


# ---- the model card -----------------------------------------------------------------------------


def _card(calibration=None) -> dict:
    presence = {"pixel_threshold": 0.5, "detect_threshold": 0.9, "min_area_px": 12, "prevalence": 0.2}
    if calibration is not None:
        presence["calibration"] = calibration
    return {"site": "lateral_acetabulum", "presence": presence}


def test_calibration_round_trips_through_the_model_card(tmp_path):
    rng = np.random.default_rng(4)
    s = rng.random(60).astype(np.float32)
    model = tmp_path / "unet.keras"
    for t, method in ((rng.random(60) < s, "isotonic"), (np.arange(60) < 5, "platt"), (rng.random(60) < s, "identity")):
        cal = fit_calibration(s, t, target_prevalence=0.2, method=method)
        assert cal.method == method
        write_model_card(model, _card(cal.to_dict()))
        back = read_model_card(model)
        assert back.calibration == cal and back.calibration.info == json.loads(json.dumps(cal.info))
        np.testing.assert_array_equal(back.calibration.apply(s), cal.apply(s))
        assert back.to_dict()["presence"]["calibration"]["method"] == method
        assert back.presence.min_area_px == 12


def test_cards_without_a_calibration_still_load(tmp_path):
    model = tmp_path / "unet.keras"
    model_json_path(model).write_text(json.dumps({"presence": {"pixel_threshold": 0.5, "min_area_px": 3}}))
    card = read_model_card(model)
    assert card.calibration is None and "calibration" not in card.to_dict()["presence"]
    assert describe(None)["method"] == "none"
    write_model_card(model, _card({"method": "none", "reason": "validation split all one class"}))
    card = read_model_card(model)
    assert card.calibration is None
    assert describe(card.presence_info["calibration"]) == {"method": "none", "reason": "validation split all one class"}


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"method": "isotonic", "x": [0.0, 0.5], "y": [0.6, 0.2], "val_prevalence": 0.5}, "non-decreasing"),
        ({"method": "isotonic", "x": [0.5, 0.5], "y": [0.1, 0.2], "val_prevalence": 0.5}, "strictly increasing"),
        ({"method": "isotonic", "x": [0.0], "y": [0.1], "val_prevalence": 1.0}, "val_prevalence"),
        ({"method": "platt", "a": -1.0, "b": 0.0, "val_prevalence": 0.5}, "a >= 0"),
        ({"method": "beta", "val_prevalence": 0.5}, "method"),
        ({"method": "platt", "a": 1.0, "b": 0.0}, "val_prevalence"),
        ([1, 2], "method"),
    ],
)
def test_an_invalid_calibration_names_the_card(tmp_path, bad, match):
    model = tmp_path / "unet.keras"
    model_json_path(model).write_text(json.dumps(_card(bad)))
    with pytest.raises(ModelError, match=match) as err:
        read_model_card(model)
    assert str(model_json_path(model)) in str(err.value) and "presence.calibration" in str(err.value)


# ---- prediction ---------------------------------------------------------------------------------


def test_predict_writes_the_calibrated_probability_and_the_same_calls(tmp_path):
    store, _, _ = example_shard(tmp_path)
    raw_models = {s: make_model(tmp_path / "raw" / s / "unet.keras") for s in SITES}
    cal = Calibration(method="isotonic", x=(0.0, 0.5, 1.0), y=(0.1, 0.2, 0.9), val_prevalence=0.5,
                      target_prevalence=0.2, eps=0.01)
    cal_models = {}
    for s, m in raw_models.items():
        dst = tmp_path / "cal" / s / "unet.keras"
        dst.parent.mkdir(parents=True)
        shutil.copyfile(m, dst)
        card = json.loads(model_json_path(m).read_text())
        card["presence"]["calibration"] = cal.to_dict()
        model_json_path(dst).write_text(json.dumps(card))
        cal_models[s] = dst
    raw = predict.predict_shard(store=store, models=raw_models, out=tmp_path / "raw.parquet", precision="float32")
    got = predict.predict_shard(store=store, models=cal_models, out=tmp_path / "cal.parquet", precision="float32")
    a = SITES[0]
    other = [c for c in raw.columns if not c.endswith("_probability")]
    pd.testing.assert_frame_equal(raw[other], got[other])  # presence, areas, regions: the raw rule's
    prob_raw, prob = raw[f"{a}_probability"], got[f"{a}_probability"]
    assert (prob_raw.isna() == prob.isna()).all()
    ok = prob_raw.notna().to_numpy()
    expected = cal.apply(prob_raw[ok].to_numpy(np.float32)).astype(np.float32)
    np.testing.assert_array_equal(prob[ok].to_numpy(np.float32), expected)
    # by hand: row 0 (present, raw ~1): 0.9 at the validation prior, odds 9 * (0.25 / 1) -> 0.692;
    # row 1 (nothing, raw ~0): 0.1 -> odds 1/9 * 0.25 -> 0.027
    assert prob[0] == pytest.approx(2.25 / 3.25, abs=1e-3) and prob[1] == pytest.approx(0.25 / 9.25, abs=1e-3)
    assert prob_raw[0] > 0.99 and prob_raw[1] < 0.01
