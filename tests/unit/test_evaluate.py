"""hipoa.evaluate: the Table 2 measures, their definitions at the extremes, and the figures."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from PIL import Image
from tiny_patch_store import write_tiny_store

from hipoa.evaluate import evaluate_site
from hipoa.paper import PAPER_TABLE2
from hipoa.store import open_patches
from hipoa.infer import read_masks
from hipoa.splits import make_splits, patch_indices
from hipoa.unet import build_unet

SITE = "superior_femoral_head"
CONTRACT_KEYS = {"n", "n_positive", "sensitivity", "specificity", "f1", "dice_mean", "dice_std", "confusion_matrix"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    store = write_tiny_store(root / "shard-0000.zarr", eids=[str(4_000_000 + i) for i in range(40)], site=SITE, seed=3)
    splits = make_splits(stores=[store], site=SITE, seed=1, test_fraction=0.4)
    model = root / "models" / "unet.keras"
    model.parent.mkdir()
    keras.utils.set_random_seed(0)  # the same untrained weights on every run
    build_unet(depth=1, base_filters=2).save(model)  # untrained: the rule decides what it predicts
    test = splits[splits["split"] == "test"]
    auto = open_patches([store], SITE, "auto")
    truth = read_masks(auto.mask, patch_indices(auto.rows, test))
    return store, splits, model, test, truth


def _evaluate(setup, tmp_path, presence):
    store, splits, model, _, _ = setup
    model.with_suffix(".json").write_text(json.dumps({"presence": presence}))
    out = tmp_path / "evaluation" / f"{SITE}.json"
    result = evaluate_site(site=SITE, model=model, stores=[store], splits=splits, out=out, figures_dir=tmp_path / "fig",
                           precision="float32")
    assert json.loads(out.read_text())["n"] == result["n"]
    return result


def test_never_present_scores(setup, tmp_path):
    _, _, _, test, truth = setup
    # every pixel of the patch at probability exactly 1.0: a rule no image meets (with a 0.5
    # threshold an undertrained model can call all 128 x 128 pixels and pass it)
    r = _evaluate(setup, tmp_path, {"pixel_threshold": 1.0, "min_area_px": 128 * 128})
    n, n_pos = len(test), int(test["positive"].sum())
    assert CONTRACT_KEYS <= set(r)
    assert (r["n"], r["n_positive"]) == (n, n_pos) and 0 < n_pos < n
    assert r["confusion_matrix"] == [[n - n_pos, 0], [n_pos, 0]]
    assert (r["sensitivity"], r["specificity"], r["f1"]) == (0.0, 1.0, 0.0)
    assert r["dice_mean"] == 0.0 and r["dice_std"] == 0.0  # a missed positive counts 0
    empty_truth = ~truth.reshape(n, -1).any(axis=1)
    assert r["dice_mean_all"] == pytest.approx(empty_truth.mean())  # empty on empty counts 1
    assert r["paper_table2"] == PAPER_TABLE2[SITE] and r["paper_table2"][0]["dice_mean"] == 0.71


def test_always_everything_scores(setup, tmp_path):
    _, _, _, test, truth = setup
    # every pixel reaches a threshold this low, so the prediction is the whole patch
    r = _evaluate(setup, tmp_path, {"pixel_threshold": 1e-30, "min_area_px": 1})
    pos = test["positive"].to_numpy(bool)
    assert r["confusion_matrix"] == [[0, int((~pos).sum())], [0, int(pos.sum())]]
    assert (r["sensitivity"], r["specificity"]) == (1.0, 0.0)
    area = truth.reshape(len(truth), -1).sum(axis=1)
    expected = 2 * area[pos] / (area[pos] + 128 * 128)
    assert r["dice_mean"] == pytest.approx(expected.mean())
    assert r["dice_std"] == pytest.approx(expected.std())


def test_figures_are_written(setup, tmp_path):
    _evaluate(setup, tmp_path, {"pixel_threshold": 0.5, "min_area_px": 1})
    for name in (f"{SITE}_confusion.png", f"{SITE}_overlay.png"):
        with Image.open(tmp_path / "fig" / name) as im:
            assert im.size[0] > 200 and im.size[1] > 200
            assert np.asarray(im.convert("L")).std() > 10  # not a blank canvas


def test_missing_presence_rule_is_named(setup, tmp_path):
    store, splits, model, _, _ = setup
    other = tmp_path / "x.keras"
    other.write_bytes(model.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"x\.json"):
        evaluate_site(site=SITE, model=other, stores=[store], splits=splits, out=tmp_path / "e.json")


def test_calibration_scores_at_the_validation_prior(setup, tmp_path):
    from hipoa.calibration import Calibration
    from hipoa.infer import take_rows
    from hipoa.metrics import brier_score, expected_calibration_error, presence_from_probability

    store, _, model, test, _ = setup
    rule = {"pixel_threshold": 0.5, "min_area_px": 3}
    plain = _evaluate(setup, tmp_path / "plain", rule)
    # a linear map 0.2 + 0.6 * score, fitted on a balanced split, for a cohort of prevalence 0.05
    cal = Calibration(method="isotonic", x=(0.0, 1.0), y=(0.2, 0.8), val_prevalence=0.5, target_prevalence=0.05,
                      eps=0.01)
    calibrated = _evaluate(setup, tmp_path / "cal", {**rule, "calibration": cal.to_dict()})
    # the reference: the rule's raw score of the test images by the NumPy path
    auto = open_patches([store], SITE, "auto")
    x = take_rows(auto.image, patch_indices(auto.rows, test)).astype(np.float32)[..., None]
    prob = keras.saving.load_model(model).predict(x, verbose=0)[..., 1]
    raw = presence_from_probability(prob, 0.5, 3)[3]
    truth = test["positive"].to_numpy(bool)
    for r in (plain, calibrated):
        assert r["ece_bins"] == 10
        assert r["ece_raw"] == pytest.approx(expected_calibration_error(raw, truth), abs=1e-6)
        assert r["brier_raw"] == pytest.approx(brier_score(raw, truth), abs=1e-6)
    assert (plain["ece"], plain["brier"]) == (plain["ece_raw"], plain["brier_raw"])  # uncalibrated: the raw score
    assert plain["calibration"]["method"] == "none" and plain["calibration_prior"].startswith("none")
    at_val = 0.2 + 0.6 * raw.astype(np.float64)
    assert calibrated["ece"] == pytest.approx(expected_calibration_error(at_val, truth), abs=1e-6)
    assert calibrated["brier"] == pytest.approx(brier_score(at_val, truth), abs=1e-6)
    assert calibrated["brier"] != pytest.approx(brier_score(cal.apply(raw), truth), abs=1e-3)  # not the cohort's
    assert calibrated["calibration_prior"] == "validation split"
    assert calibrated["calibration"]["method"] == "isotonic" and calibrated["calibration"]["target_prevalence"] == 0.05
    # every key the evaluation had keeps its value (the rule, not its calibration, under "presence")
    new = {"ece", "brier", "ece_raw", "brier_raw", "ece_bins", "calibration_prior", "calibration"}
    assert new <= set(plain) and set(plain) == set(calibrated)
    assert {k: v for k, v in plain.items() if k not in new} == {k: v for k, v in calibrated.items() if k not in new}
    assert calibrated["presence"] == {**rule, "detect_threshold": 0.5}
