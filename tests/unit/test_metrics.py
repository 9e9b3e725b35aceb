"""hipoa.metrics on hand-checkable arrays, and against scikit-learn on random ones."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score, recall_score

from hipoa.metrics import (
    choose_min_area,
    estimate_prevalence,
    confusion,
    dice,
    f1,
    predicted_area_px,
    presence_from_probability,
    sensitivity,
    specificity,
    youden_j,
)


def test_dice_by_hand():
    pred = np.array([[1, 1, 0], [0, 0, 0]])
    truth = np.array([[1, 0, 0], [1, 0, 0]])
    assert dice(pred, truth) == pytest.approx(2 * 1 / (2 + 2))  # one shared pixel of 2 + 2
    assert dice(pred, pred) == 1.0
    assert dice(np.zeros((2, 3)), np.zeros((2, 3))) == 1.0  # both empty: agreement
    assert dice(np.zeros((2, 3)), truth) == 0.0  # a missed positive
    batch = dice(np.stack([pred, np.zeros((2, 3)), pred]), np.stack([truth, np.zeros((2, 3)), np.zeros((2, 3))]))
    np.testing.assert_allclose(batch, [0.5, 1.0, 0.0])


def test_dice_equals_pixel_f1_of_sklearn():
    rng = np.random.default_rng(0)
    pred = rng.random((5, 16, 16)) > 0.6
    truth = rng.random((5, 16, 16)) > 0.7
    expected = [f1_score(t.ravel(), p.ravel()) for p, t in zip(pred, truth)]
    np.testing.assert_allclose(dice(pred, truth), expected)


def test_dice_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        dice(np.zeros((2, 3)), np.zeros((3, 2)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_measures_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    truth = rng.random(57) < 0.4
    pred = np.where(rng.random(57) < 0.8, truth, ~truth)
    assert confusion(pred, truth) == tuple(int(v) for v in confusion_matrix(truth, pred, labels=[False, True]).ravel())
    assert sensitivity(pred, truth) == pytest.approx(recall_score(truth, pred))
    assert specificity(pred, truth) == pytest.approx(recall_score(truth, pred, pos_label=False))
    assert f1(pred, truth) == pytest.approx(f1_score(truth, pred))
    assert youden_j(pred, truth) == pytest.approx(recall_score(truth, pred) + recall_score(truth, pred, pos_label=False) - 1)


def test_confusion_by_hand():
    pred = np.array([1, 1, 0, 0, 1], bool)
    truth = np.array([1, 0, 0, 1, 1], bool)
    assert confusion(pred, truth) == (1, 1, 1, 2)  # tn, fp, fn, tp
    assert sensitivity(pred, truth) == pytest.approx(2 / 3)
    assert specificity(pred, truth) == pytest.approx(1 / 2)
    assert f1(pred, truth) == pytest.approx(4 / 6)
    assert np.isnan(specificity(pred, np.ones(5, bool)))


def test_presence_rule_by_hand():
    prob = np.zeros((2, 4, 4), np.float32)
    prob[0].flat[:3] = [0.9, 0.7, 0.5]  # three pixels at >= 0.5
    prob[0].flat[3] = 0.49
    prob[1].flat[0] = 0.99  # one confident pixel
    present, mask, area, probability = presence_from_probability(prob, 0.5, 3)
    assert present.tolist() == [True, False]
    assert area.tolist() == [3, 0]
    assert mask[0].sum() == 3 and mask[1].sum() == 0  # absent images get an empty mask
    np.testing.assert_allclose(probability, [0.5, 0.0])  # the 3rd largest pixel probability
    present, mask, area, probability = presence_from_probability(prob, 0.5, 1)
    assert present.tolist() == [True, True]
    np.testing.assert_allclose(probability, [0.9, 0.99])
    np.testing.assert_array_equal(predicted_area_px(prob, 0.5), [3, 1])


def test_presence_detect_threshold_ignores_faint_blobs_and_keeps_the_mask():
    prob = np.zeros((2, 8, 8), np.float32)
    prob[0, :2, :3] = 0.95  # 6 confident pixels ...
    prob[0, 2, :4] = 0.6  # ... and 4 less confident pixels of the same osteophyte
    prob[1, :3, :4] = 0.7  # 12 faint pixels: a blob, not an osteophyte
    present, mask, area, probability = presence_from_probability(prob, 0.5, 5, detect_threshold=0.9)
    assert present.tolist() == [True, False]
    assert area.tolist() == [10, 0]  # the area counts every pixel >= 0.5, not only the confident ones
    np.testing.assert_allclose(probability, [0.95, 0.7])
    # without a detect threshold the faint blob is called
    assert presence_from_probability(prob, 0.5, 5)[0].tolist() == [True, True]
    with pytest.raises(ValueError, match="detect_threshold"):
        presence_from_probability(prob, 0.5, 5, detect_threshold=0.4)


def test_presence_probability_agrees_with_rule():
    rng = np.random.default_rng(3)
    prob = rng.random((40, 8, 8)).astype(np.float32) ** 4
    for t in (1, 2, 5, 9):
        present, _, _, probability = presence_from_probability(prob, 0.5, t)
        np.testing.assert_array_equal(present, probability >= 0.5)
        np.testing.assert_array_equal(present, predicted_area_px(prob, 0.5) >= t)
        present, _, _, probability = presence_from_probability(prob, 0.5, t, detect_threshold=0.8)
        np.testing.assert_array_equal(present, probability >= 0.8)
        np.testing.assert_array_equal(present, predicted_area_px(prob, 0.8) >= t)
        assert probability.dtype == np.float32 and ((probability >= 0) & (probability <= 1)).all()


def test_choose_min_area_maximises_youden_in_the_geometric_middle():
    area = np.array([0, 5, 10, 20, 3])
    truth = np.array([False, True, True, True, False])
    t, scores = choose_min_area(area, truth)
    assert scores["stretch"] == [4, 5]  # 4 and 5 both separate the 3-px negative from the 5-px positive
    assert t == 4  # floor(sqrt(4 * 5))
    assert scores["youden_j"] == pytest.approx(1.0) and scores["weighted_accuracy"] == pytest.approx(1.0)
    assert scores["sensitivity"] == 1.0 and scores["specificity"] == 1.0
    # a wide gap: negatives up to 10 px, positives from 90 px -> the middle by ratio, not the edge
    t, scores = choose_min_area(np.array([0, 10, 90, 200]), np.array([False, False, True, True]))
    assert scores["stretch"] == [11, 90] and t == 31  # floor(sqrt(11 * 90)); Youden ties before took 11
    t, _ = choose_min_area(np.array([0, 8, 9]), np.array([False, True, True]))
    assert t == 2  # 1..8 are all perfect: floor(sqrt(8))
    with pytest.raises(ValueError, match="positive and negative"):
        choose_min_area(np.array([1, 2]), np.array([True, True]))
    with pytest.raises(ValueError, match="prevalence"):
        choose_min_area(area, truth, prevalence=1.0)


def test_choose_min_area_weighs_errors_by_prevalence():
    # Overlapping classes: a false-positive blob of 40 px on one of four negatives, and a small
    # 20 px osteophyte among four positives.
    area = np.array([0, 0, 0, 40, 20, 60, 80, 100])
    truth = np.array([False] * 4 + [True] * 4)
    t_balanced, s = choose_min_area(area, truth, prevalence=0.5)
    # balanced: T in 1..20 (sens 1, spec 3/4) scores 0.875, T in 21..40 0.75, T in 41..60 (sens 3/4,
    # spec 1) 0.875 again; the tie goes to the first stretch
    assert s["stretch"] == [1, 20] and t_balanced == 4 and s["sensitivity"] == 1.0
    # rare osteophytes: a false positive costs more than a missed one -> the threshold moves past the blob
    t_rare, s = choose_min_area(area, truth, prevalence=0.15)
    assert s["stretch"] == [41, 60] and t_rare == 49 and s["specificity"] == 1.0 and s["sensitivity"] == 0.75
    # common osteophytes: the other way
    t_common, s = choose_min_area(area, truth, prevalence=0.85)
    assert t_common <= t_balanced and s["sensitivity"] == 1.0


def test_estimate_prevalence_inverts_the_classifier_errors():
    # prevalence 0.2, sensitivity 0.9, specificity 0.95 -> called 0.9 * 0.2 + 0.05 * 0.8 = 0.22
    assert estimate_prevalence(0.22, 0.9, 0.95) == pytest.approx(0.2)
    assert estimate_prevalence(0.22, 1.0, 1.0) == pytest.approx(0.22)  # a perfect classifier: as called
    assert estimate_prevalence(0.01, 0.9, 0.95) == 0.0  # fewer calls than false positives: clipped
    with pytest.raises(ValueError, match="must be > 0"):
        estimate_prevalence(0.3, 0.5, 0.5)


def test_mask_components_by_hand():
    from hipoa.metrics import mask_components

    m = np.zeros((4, 8, 8), np.uint8)
    m[1, 1:3, 1:3] = 1  # one region of 4
    m[2, 0, 0] = m[2, 5:8, 5:8] = 1  # two regions: 1 and 9 pixels
    m[3, 0, 0] = m[3, 1, 1] = m[3, 2, 2] = 1  # a diagonal line: one 8-connected region of 3
    m[3, 0, 7] = 1  # and a second region
    count, largest = mask_components(m)
    assert count.tolist() == [0, 1, 2, 2] and largest.tolist() == [0, 4, 9, 3]
    assert [int(v[0]) for v in mask_components(m[1])] == [1, 4]
    with pytest.raises(ValueError, match="got shape"):
        mask_components(np.zeros(3))
