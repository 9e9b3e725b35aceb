"""hipoa.presence: the presence rule chosen on validation for the cohort's prevalence (moved from test_train)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from tiny_patch_store import write_tiny_store

from hipoa.calibration import Calibration, fit_calibration
from hipoa.infer import SiteModel
from hipoa.metrics import choose_min_area, predicted_area_px, presence_from_probability
from hipoa.presence import choose_presence_rule
from hipoa.splits import make_splits, open_site_patches, patch_indices

SITE = "lateral_acetabulum"


def _bright_pixel_model(threshold: float = 2.0, gain: float = 6.0):
    """A fixed 'U-Net': per pixel, P(osteophyte) = sigmoid(gain * (x - threshold)), two-class softmax.

    The tiny store's osteophytes are bright disks on a normalised patch, so this model finds them
    (and, like a real one, a few bright noise pixels), deterministically and without training.
    """
    inp = keras.Input((128, 128, 1))
    conv = keras.layers.Conv2D(2, 1, activation="softmax")
    out = conv(inp)
    conv.set_weights([np.array([0.0, gain], np.float32).reshape(1, 1, 1, 2),
                      np.array([0.0, -gain * threshold], np.float32)])
    return keras.Model(inp, out)


def test_presence_rule_follows_the_prevalence(tmp_path):

    eids = [str(4_000_000 + i) for i in range(90)]
    # Half the images annotated (half of those positive); the unannotated ones have no osteophyte,
    # so the cohort outside train and val has a prevalence well below the balanced splits' 0.5.
    store = write_tiny_store(tmp_path / "shard-0000.zarr", eids=eids, seed=6, annotated_fraction=0.5, qc_fail_every=11)
    splits = make_splits(stores=[store], site=SITE, seed=1, val_fraction=0.3, test_fraction=0.2)
    model = _bright_pixel_model()

    auto = open_site_patches([store], SITE, "auto")
    val = splits[splits["split"] == "val"]
    # the reference: the previous NumPy path (model.predict, softmax channel 1, pixel counts)
    x = auto.image[np.sort(patch_indices(auto.rows, val))].compute().astype(np.float32)[..., None]
    order = np.argsort(np.argsort(patch_indices(auto.rows, val)))
    prob = model.predict(x, batch_size=16, verbose=0)[..., 1][order]
    count = predicted_area_px(prob, 0.9)
    truth = val["positive"].to_numpy(bool)

    kw = dict(stores=[store], splits=splits, site=SITE)
    fixed, scores = choose_presence_rule(model, **kw, prevalence=0.5, detect_threshold=0.9)
    assert fixed["prevalence_source"] == "config" and fixed["detect_threshold"] == 0.9
    assert fixed["min_area_px"] == choose_min_area(count, truth, 0.5)[0]
    assert scores["n"] == len(val) and 0.0 <= scores["dice_mean_positive"] <= 1.0
    rare, _ = choose_presence_rule(model, **kw, prevalence=0.02, detect_threshold=0.9)
    assert rare["min_area_px"] == choose_min_area(count, truth, 0.02)[0] >= fixed["min_area_px"]
    # detect_threshold auto: the candidate with the best weighted accuracy, ties to the higher
    chosen, _ = choose_presence_rule(model, **kw, prevalence=0.3)
    cands = chosen["candidates"]
    assert set(cands) == {"0.5", "0.7", "0.9"}
    best = max(c["weighted_accuracy"] for c in cands.values())
    assert chosen["detect_threshold"] == max(float(t) for t, c in cands.items() if c["weighted_accuracy"] == best)
    assert chosen["min_area_px"] == cands[str(chosen["detect_threshold"])]["min_area_px"]

    auto_rule, _ = choose_presence_rule(model, **kw, prevalence="auto")
    est = auto_rule["prevalence_estimate"]
    # the estimate uses every measurable image of participants in no train or val split
    fitted = set(splits.loc[splits["split"].isin(["train", "val"]), "eid"])
    outside = auto.rows[(auto.rows["qc_reason"] == "") & ~auto.rows["eid"].isin(fitted)]
    assert auto_rule["prevalence_source"] == "estimated" and est["n_images"] == len(outside) > 20
    true_prevalence = (outside[f"{SITE}_true_area_mm2"].fillna(0) > 0).mean()
    assert true_prevalence < 0.3
    assert auto_rule["prevalence"] == pytest.approx(true_prevalence, abs=0.1)
    # the calibration: fitted on the validation images' raw scores at the chosen rule, for the
    # estimated prevalence (a split this small has < 10 images of a class: Platt)
    raw = presence_from_probability(prob, 0.5, auto_rule["min_area_px"], auto_rule["detect_threshold"])[3]
    cal = Calibration.from_dict(auto_rule["calibration"])
    assert cal == fit_calibration(raw, truth, target_prevalence=auto_rule["prevalence"])
    assert cal.method == "platt" and cal.info["n"] == len(val) and cal.info["fitted_on"] == "val"
    assert cal.val_prevalence == truth.mean() and cal.target_prevalence == auto_rule["prevalence"]
    assert fixed["calibration"]["target_prevalence"] == 0.5 and rare["calibration"]["target_prevalence"] == 0.02
    # an all-negative validation split: no calibration, said why
    negative = splits.copy()
    negative.loc[(negative["split"] == "val") & negative["positive"], "split"] = "train"
    one_class, _ = choose_presence_rule(model, stores=[store], splits=negative, site=SITE, prevalence=0.3)
    assert one_class["calibration"] == {"method": "none", "reason": "validation split all one class"}
    with pytest.raises(ValueError, match="calibration"):
        choose_presence_rule(model, **kw, calibration="beta")
    with pytest.raises(ValueError, match="prevalence"):
        choose_presence_rule(model, **kw, prevalence=1.5)
    with pytest.raises(ValueError, match="detect_threshold"):
        choose_presence_rule(model, **kw, detect_threshold=0.3)
    # a model that calls every image separates nothing: no estimate, prevalence 0.5, said why
    blind, _ = choose_presence_rule(_bright_pixel_model(threshold=1.0), **kw)
    assert blind["prevalence"] == 0.5 and "Youden" in blind["prevalence_source"]
    assert "prevalence_estimate" not in blind


def test_a_site_model_and_a_keras_model_choose_the_same_rule(tmp_path):
    eids = [str(4_100_000 + i) for i in range(40)]
    store = write_tiny_store(tmp_path / "shard-0000.zarr", eids=eids, seed=7)
    splits = make_splits(stores=[store], site=SITE, seed=1, val_fraction=0.4, test_fraction=0.2)
    model = _bright_pixel_model()
    kw = dict(stores=[store], splits=splits, site=SITE, prevalence=0.3)
    a = choose_presence_rule(model, **kw, batch_size=4)
    b = choose_presence_rule(SiteModel(model), **kw, batch_size=64)
    assert a == b
