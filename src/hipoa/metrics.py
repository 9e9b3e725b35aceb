"""Segmentation and detection measures (Ebsim et al., section 4.3, Table 2), and the presence rule.

Plain functions on NumPy arrays. Detection measures take per-image booleans; Dice takes masks.
The presence rule (:func:`presence_from_probability`) is the one place that turns a U-Net's
per-pixel probabilities into present / absent, used by evaluation and by prediction alike.
Calibration measures (:func:`expected_calibration_error`, :func:`brier_score`) take per-image
probabilities and booleans; the calibration itself is :mod:`hipoa.calibration`.
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
    prob: np.ndarray, pixel_threshold: float = 0.5, min_area_px: int = 1, detect_threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The presence rule: an image has an osteophyte if at least ``min_area_px`` pixels have a
    probability >= ``detect_threshold``; the osteophyte's mask is then its pixels >= ``pixel_threshold``.

    Two thresholds, like hysteresis: the detection asks for confident pixels, so faint blobs on
    healthy bone are not called, while the area is measured on the usual argmax mask (0.5), so a
    called osteophyte's area does not shrink with the detection threshold. With
    ``detect_threshold`` left at ``None`` it equals ``pixel_threshold`` (a single-threshold rule, as
    in models trained before hipoa 0.2).

    The per-image ``probability`` is the ``k``-th largest pixel probability with
    ``k = max(min_area_px, 1)``: the probability that the ``k`` most confident pixels all reach.
    It is in [0, 1], ranks images for ROC analyses, and agrees with the rule by construction:
    ``present == (probability >= detect_threshold)``.

    Args:
        prob: ``(n, H, W)`` float, the osteophyte-class probability per pixel (softmax channel 1).
        pixel_threshold: Pixel probability threshold of the mask (0.5: the argmax of a two-class softmax).
        min_area_px: Minimum number of confident pixels (chosen on the validation split).
        detect_threshold: Pixel probability a pixel needs to count towards ``min_area_px``; at
            least ``pixel_threshold`` (``None``: equal to it).

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
    detect = pixel_threshold if detect_threshold is None else float(detect_threshold)
    if not pixel_threshold <= detect <= 1.0:
        raise ValueError(f"detect_threshold must be in [pixel_threshold, 1] = [{pixel_threshold}, 1], got {detect}")
    k = max(int(min_area_px), 1)
    n, h, w = prob.shape
    if k > h * w:
        raise ValueError(f"min_area_px {min_area_px} exceeds the patch area {h * w}")
    flat = prob.reshape(n, -1)
    if n:
        probability = -np.partition(-flat, k - 1, axis=1)[:, k - 1]
    else:
        probability = np.zeros(0, np.float32)
    present = probability >= detect
    mask = ((flat >= pixel_threshold) & present[:, None]).reshape(n, h, w).astype(np.uint8)
    area = mask.reshape(n, -1).sum(axis=1).astype(np.int64)
    return present, mask, area, np.clip(probability, 0.0, 1.0).astype(np.float32)


def choose_min_area(
    area_px: np.ndarray, true_present: np.ndarray, prevalence: float = 0.5
) -> tuple[int, dict[str, float]]:
    """Choose the presence rule's ``min_area_px``: the fewest errors expected at ``prevalence``.

    Maximises the prevalence-weighted accuracy ``prevalence * sensitivity + (1 - prevalence) *
    specificity`` on validation images. Validation splits are balanced (the paper's Table 1), so
    their plain accuracy would weigh a false positive like a false negative; in a cohort where
    15 % of hips have an osteophyte, each false positive is ~6 times as frequent, and a threshold
    chosen for balance over-calls the prevalence (1.3-1.8 x in hipoa 0.1). At ``prevalence`` 0.5
    the criterion is Youden's J (``J = 2 * criterion - 1``).

    The rule ``area >= T`` changes only where ``T`` passes an observed area ``a`` (between ``a`` and
    ``a + 1``), so the best thresholds form stretches ``lo..hi`` of equal calls. The first (lowest)
    best stretch is taken, and within it the geometric middle ``floor(sqrt(lo * hi))``: the margin to
    both sides' nearest validation image is then equal in ratio, as areas vary by ratio (patch scale),
    rather than sitting just above the largest validation negative.

    Args:
        area_px: ``(n,)`` counts of confident pixels per validation image (:func:`predicted_area_px`
            at the detection threshold).
        true_present: ``(n,)`` bool truth.
        prevalence: Expected fraction of images with an osteophyte where the model is used, in (0, 1).

    Returns:
        ``(min_area_px, scores)`` with ``scores`` = ``n``, ``n_positive``, ``sensitivity``,
        ``specificity``, ``f1``, ``youden_j``, ``weighted_accuracy`` at the chosen threshold, and
        ``prevalence``, ``stretch`` (``[lo, hi]``).

    Raises:
        ValueError: if the truth has no positive or no negative image, or on a prevalence out of range.
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
    if not 0.0 < prevalence < 1.0:
        raise ValueError(f"choose_min_area: prevalence must be in (0, 1), got {prevalence}")
    candidates = np.unique(np.concatenate([[1], area[area >= 1] + 1])).astype(np.int64)
    pos, neg = np.sort(area[truth]), np.sort(area[~truth])
    sens = 1.0 - np.searchsorted(pos, candidates, side="left") / pos.size  # share of positives >= T
    spec = np.searchsorted(neg, candidates, side="left") / neg.size  # share of negatives < T
    score = prevalence * sens + (1.0 - prevalence) * spec
    first = int(np.argmax(score >= score.max() - 1e-12))
    last = first
    while last + 1 < candidates.size and score[last + 1] >= score.max() - 1e-12:
        last += 1
    lo = int(candidates[first])
    # The stretch runs up to just below the next candidate (where the calls change); past the last
    # candidate every image is absent, so the stretch is the candidate alone.
    hi = int(candidates[last + 1]) - 1 if last + 1 < candidates.size else int(candidates[last])
    best_t = max(lo, int(np.floor(np.sqrt(float(lo) * hi))))
    pred = area >= best_t
    scores = {
        "n": int(truth.size),
        "n_positive": int(truth.sum()),
        "sensitivity": sensitivity(pred, truth),
        "specificity": specificity(pred, truth),
        "f1": f1(pred, truth),
        "youden_j": youden_j(pred, truth),
        "weighted_accuracy": float(score[first]),
        "prevalence": float(prevalence),
        "stretch": [lo, hi],
    }
    return best_t, scores


def estimate_prevalence(called_fraction: float, sens: float, spec: float) -> float:
    """Prevalence corrected for a classifier's errors ("adjusted classify and count").

    A classifier with sensitivity ``s`` (``sens``) and specificity ``c`` (``spec``) calls ``q = s * p + (1 - c) * (1 - p)``
    of a population with prevalence ``p``, so ``p = (q - (1 - c)) / (s - (1 - c))`` (Forman, 2008;
    the Rogan-Gladen estimator of epidemiology). The result is clipped to [0, 1].

    Raises:
        ValueError: when ``s + c - 1 <= 0``: the classifier does not separate, so ``q`` says nothing.
    """
    j = sens + spec - 1.0
    if not j > 0:
        raise ValueError(f"estimate_prevalence: sensitivity {sens} + specificity {spec} - 1 must be > 0")
    return float(np.clip((called_fraction - (1.0 - spec)) / j, 0.0, 1.0))


def _probabilities_and_truth(prob: np.ndarray, true_present: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(prob, dtype=np.float64).ravel()
    t = np.asarray(true_present).astype(bool).ravel()
    if p.shape != t.shape:
        raise ValueError(f"{name}: {p.size} probabilities for {t.size} truths")
    if p.size and not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError(f"{name}: probabilities must be finite and in [0, 1], got range [{p.min()}, {p.max()}]")
    return p, t


def expected_calibration_error(prob: np.ndarray, true_present: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error: the bin-count weighted mean gap between predicted and observed presence.

    ``ECE = sum_b (n_b / n) * |mean(truth in b) - mean(prob in b)|`` over ``n_bins`` equal-width
    bins of [0, 1]: bin ``b`` holds ``b / n_bins <= prob < (b + 1) / n_bins``, the last one also
    ``prob == 1``; empty bins add nothing (Naeini et al., 2015; Guo et al., 2017, eq. 3).

    Args:
        prob: ``(n,)`` predicted probabilities of presence, in [0, 1].
        true_present: ``(n,)`` bool truth.
        n_bins: Number of bins (10 in hipoa's evaluation JSON, ``ece_bins``).

    Returns:
        ECE in [0, 1]; NaN for no images.

    Raises:
        ValueError: naming the sizes when they differ, or the range of probabilities outside [0, 1].
    """
    p, t = _probabilities_and_truth(prob, true_present, "expected_calibration_error")
    if n_bins < 1:
        raise ValueError(f"expected_calibration_error: n_bins must be >= 1, got {n_bins}")
    if not p.size:
        return float("nan")
    b = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    observed = np.bincount(b, weights=t.astype(np.float64), minlength=n_bins)
    predicted = np.bincount(b, weights=p, minlength=n_bins)
    # sum_b (n_b / n) |sum(t)_b / n_b - sum(p)_b / n_b| = sum_b |sum(t)_b - sum(p)_b| / n
    return float(np.abs(observed - predicted).sum() / p.size)


def brier_score(prob: np.ndarray, true_present: np.ndarray) -> float:
    """Brier score ``mean((prob - truth)^2)`` over ``(n,)`` probabilities and bool truth (Brier, 1950);
    0 is perfect, 0.25 what a constant 0.5 scores; NaN for no images."""
    p, t = _probabilities_and_truth(prob, true_present, "brier_score")
    return float(np.mean((p - t) ** 2)) if p.size else float("nan")


def mask_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected regions of predicted masks: how many, and the largest one's pixel count, per image.

    Regions are 8-connected (``skimage.measure.label(..., connectivity=2)``): pixels that touch
    at a corner belong to one region. A U-Net's thresholded mask often joins an osteophyte's
    pixels only diagonally along a thin edge; 4-connectivity would split one osteophyte into
    several "regions" there, so 8-connectivity counts what a reader would call one outgrowth.

    Args:
        mask: ``(n, H, W)`` (or ``(H, W)``) masks, nonzero = osteophyte.

    Returns:
        ``(n_components, largest_px)``: ``(n,)`` int64 each; both 0 for an empty mask.
    """
    from skimage.measure import label

    mask = np.asarray(mask)
    single = mask.ndim == 2
    if single:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask_components: expected (H, W) or (n, H, W) masks, got shape {mask.shape}")
    n_components = np.zeros(len(mask), np.int64)
    largest = np.zeros(len(mask), np.int64)
    for i, m in enumerate(mask):
        if not m.any():
            continue
        labels, count = label(m != 0, connectivity=2, return_num=True)
        n_components[i] = count
        largest[i] = np.bincount(labels.ravel())[1:].max()
    return n_components, largest
