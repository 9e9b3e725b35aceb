"""Segmentation and detection measures (Ebsim et al., section 4.3, Table 2), and the presence rule.

Plain functions on NumPy arrays. Detection measures take per-image booleans; Dice takes masks.
The presence rule (:func:`presence_from_probability`) is the one place that turns a U-Net's
per-pixel probabilities into present / absent, used by evaluation and by prediction alike.
"""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray | float:
    """Dice coefficient 2|P & T| / (|P| + |T|) per image.

    Both masks empty gives 1.0 (perfect agreement that there is nothing), so callers decide over
    which images to average (see :func:`hipoa.evaluate.evaluate_site`). A positive truth with an
    empty prediction gives 0.0.

    Args:
        pred: ``(H, W)`` or ``(n, H, W)`` masks, nonzero = foreground.
        truth: Same shape as ``pred``.

    Returns:
        A float for ``(H, W)`` input, else ``(n,)`` float64.

    Raises:
        ValueError: naming both shapes when they differ.
    """
    pred = np.asarray(pred) != 0
    truth = np.asarray(truth) != 0
    if pred.shape != truth.shape:
        raise ValueError(f"dice: pred shape {pred.shape} differs from truth shape {truth.shape}")
    if pred.ndim < 2:
        raise ValueError(f"dice: expected (H, W) or (n, H, W) masks, got shape {pred.shape}")
    single = pred.ndim == 2
    p = pred.reshape(1 if single else pred.shape[0], -1)
    t = truth.reshape(p.shape)
    inter = np.count_nonzero(p & t, axis=1).astype(np.float64)
    total = (np.count_nonzero(p, axis=1) + np.count_nonzero(t, axis=1)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(total > 0, 2.0 * inter / total, 1.0)
    return float(d[0]) if single else d


def confusion(pred_present: np.ndarray, true_present: np.ndarray) -> tuple[int, int, int, int]:
    """Binary confusion counts.

    Args:
        pred_present: ``(n,)`` bool (or 0/1), predicted presence per image.
        true_present: ``(n,)`` bool (or 0/1), true presence per image.

    Returns:
        ``(tn, fp, fn, tp)`` as ints, the order of ``sklearn.metrics.confusion_matrix(...).ravel()``.
    """
    p = np.asarray(pred_present).astype(bool).ravel()
    t = np.asarray(true_present).astype(bool).ravel()
    if p.shape != t.shape:
        raise ValueError(f"confusion: {p.size} predictions for {t.size} truths")
    tp = int(np.count_nonzero(p & t))
    tn = int(np.count_nonzero(~p & ~t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    return tn, fp, fn, tp


def _ratio(num: int, den: int) -> float:
    return float(num) / den if den else float("nan")


def sensitivity(pred_present: np.ndarray, true_present: np.ndarray) -> float:
    """TP / (TP + FN) over ``(n,)`` booleans; NaN without true positives in the truth."""
    tn, fp, fn, tp = confusion(pred_present, true_present)
    return _ratio(tp, tp + fn)


def specificity(pred_present: np.ndarray, true_present: np.ndarray) -> float:
    """TN / (TN + FP) over ``(n,)`` booleans; NaN without true negatives in the truth."""
    tn, fp, fn, tp = confusion(pred_present, true_present)
    return _ratio(tn, tn + fp)


def f1(pred_present: np.ndarray, true_present: np.ndarray) -> float:
    """2 TP / (2 TP + FP + FN) over ``(n,)`` booleans; 0.0 when there is nothing to find or found."""
    tn, fp, fn, tp = confusion(pred_present, true_present)
    den = 2 * tp + fp + fn
    return 2.0 * tp / den if den else 0.0


def youden_j(pred_present: np.ndarray, true_present: np.ndarray) -> float:
    """Sensitivity + specificity - 1 over ``(n,)`` booleans."""
    return sensitivity(pred_present, true_present) + specificity(pred_present, true_present) - 1.0


def predicted_area_px(prob: np.ndarray, pixel_threshold: float = 0.5) -> np.ndarray:
    """Pixels at or above ``pixel_threshold`` per image: ``(n, H, W)`` float -> ``(n,)`` int64."""
    prob = np.asarray(prob)
    if prob.ndim != 3:
        raise ValueError(f"expected (n, H, W) probabilities, got shape {prob.shape}")
    return np.count_nonzero(prob >= pixel_threshold, axis=(1, 2)).astype(np.int64)


def presence_from_probability(
    prob: np.ndarray, pixel_threshold: float = 0.5, min_area_px: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The presence rule: a pixel is osteophyte if its probability >= ``pixel_threshold``, and an
    image has an osteophyte if at least ``min_area_px`` pixels are.

    The per-image ``probability`` is the ``k``-th largest pixel probability with
    ``k = max(min_area_px, 1)``: the probability that the ``k`` most confident pixels all reach.
    It is in [0, 1], ranks images for ROC analyses, and agrees with the rule by construction:
    ``present == (probability >= pixel_threshold)``.

    Args:
        prob: ``(n, H, W)`` float, the osteophyte-class probability per pixel (softmax channel 1).
        pixel_threshold: Pixel probability threshold (0.5: the argmax of a two-class softmax).
        min_area_px: Minimum predicted area in patch pixels (chosen on the validation split).

    Returns:
        ``present`` ``(n,)`` bool; ``mask`` ``(n, H, W)`` uint8, the thresholded pixels, all zero
        where not present; ``area_px`` ``(n,)`` int64, pixels of ``mask`` (0 where not present);
        ``probability`` ``(n,)`` float32.
    """
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 3:
        raise ValueError(f"expected (n, H, W) probabilities, got shape {prob.shape}")
    if not 0.0 < pixel_threshold <= 1.0:
        raise ValueError(f"pixel_threshold must be in (0, 1], got {pixel_threshold}")
    k = max(int(min_area_px), 1)
    n, h, w = prob.shape
    if k > h * w:
        raise ValueError(f"min_area_px {min_area_px} exceeds the patch area {h * w}")
    flat = prob.reshape(n, -1)
    if n:
        probability = -np.partition(-flat, k - 1, axis=1)[:, k - 1]
    else:
        probability = np.zeros(0, np.float32)
    raw = flat >= pixel_threshold
    present = raw.sum(axis=1) >= k
    mask = (raw & present[:, None]).reshape(n, h, w).astype(np.uint8)
    area = mask.reshape(n, -1).sum(axis=1).astype(np.int64)
    return present, mask, area, np.clip(probability, 0.0, 1.0).astype(np.float32)


def choose_min_area(
    area_px: np.ndarray, true_present: np.ndarray
) -> tuple[int, dict[str, float]]:
    """Choose the presence rule's ``min_area_px`` maximising Youden's J on validation images.

    The rule ``area >= T`` changes only where ``T`` passes an observed area ``a`` (between ``a`` and
    ``a + 1``), so the candidates are 1 and every observed ``a + 1``: the smallest threshold of each
    stretch with the same calls. Ties go to the smaller threshold.

    Args:
        area_px: ``(n,)`` predicted areas in patch pixels (:func:`predicted_area_px`).
        true_present: ``(n,)`` bool truth.

    Returns:
        ``(min_area_px, scores)`` with ``scores`` = sensitivity, specificity, f1, youden_j at the
        chosen threshold, and ``n``, ``n_positive``.

    Raises:
        ValueError: if the truth has no positive or no negative image (J is then undefined).
    """
    area = np.asarray(area_px).ravel()
    truth = np.asarray(true_present).astype(bool).ravel()
    if area.shape != truth.shape:
        raise ValueError(f"choose_min_area: {area.size} areas for {truth.size} truths")
    if truth.all() or not truth.any():
        raise ValueError(
            f"choose_min_area needs positive and negative validation images, got {int(truth.sum())} "
            f"positive of {truth.size}"
        )
    candidates = np.unique(np.concatenate([[1], area[area >= 1] + 1])).astype(np.int64)
    best_t, best_j = int(candidates[0]), -np.inf
    for t in candidates:  # ascending, strict > keeps the smaller on ties
        j = youden_j(area >= t, truth)
        if j > best_j + 1e-12:
            best_t, best_j = int(t), j
    pred = area >= best_t
    scores = {
        "n": int(truth.size),
        "n_positive": int(truth.sum()),
        "sensitivity": sensitivity(pred, truth),
        "specificity": specificity(pred, truth),
        "f1": f1(pred, truth),
        "youden_j": float(best_j),
    }
    return best_t, scores
