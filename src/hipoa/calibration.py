"""Calibration of the presence score: from the raw score to a probability of presence in the cohort.

The raw score of an image is the presence rule's per-image probability
(:func:`hipoa.metrics.presence_from_probability`: the ``k``-th largest pixel probability of the
U-Net output, ``k = max(min_area_px, 1)``). It ranks images and decides presence
(``present == score >= detect_threshold``), but it is not a probability: on the synthetic
cohort its expected calibration error was 0.08-0.19. A monotone map fitted on the validation
split turns it into one; being monotone, it keeps the ranking, and presence is still decided on
the raw score, so no call changes.

Processing order (:meth:`Calibration.apply`):

1. the map fitted on the validation split's raw scores and truth (:func:`fit_calibration`):
   isotonic regression by pool-adjacent-violators (:func:`pav`), its knots ``x``/``y``
   interpolated linearly (constant beyond the end knots), or, with fewer than
   :data:`MIN_CLASS_ISOTONIC` images of a class, Platt scaling, a logistic regression on
   ``logit(score)`` (:func:`fit_platt`); with ``method="auto"`` the map is kept only if it
   predicts the validation images better than the raw score does, left out one at a time
   (leave-one-out Brier score, :func:`_loo_brier`), else the identity: on a handful of validation
   images a fitted map mostly adds noise (the demo's 8-image splits made the test ECE 0.2-0.3
   against 0.07-0.15 for the raw score);
2. clipped to ``[eps, 1 - eps]`` with ``eps = 1 / (n + 2)`` for ``n`` validation images (the rule
   of succession's estimate for no event in ``n``): a handful of validation images never says 0 or 1;
3. for the cohort (``prior="cohort"``), the prior shift from the validation split's prevalence
   ``pi_val`` to the cohort's ``pi`` (:func:`prior_shift`): ``odds' = odds * [pi / (1 - pi)] /
   [pi_val / (1 - pi_val)]`` (Saerens et al., 2002). The validation split is enriched (the
   annotated images, about half positive), the cohort is not, so a probability calibrated on
   the split over-states presence in the cohort by that odds ratio. ``prior="validation"`` stops
   before this step: the probability for images drawn like the split's (as the test split is).

Everything is deterministic (no random draws) and NumPy only. The calibration is stored as plain
JSON in the model card's ``presence.calibration`` (:meth:`Calibration.to_dict`), read back by
:meth:`Calibration.from_dict` (through :class:`hipoa.modelio.ModelCard`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from hipoa.metrics import brier_score, expected_calibration_error

METHODS = ("isotonic", "platt", "identity")
"""Calibration maps :func:`fit_calibration` fits; a card's ``method: "none"`` means uncalibrated."""
MIN_CLASS_ISOTONIC = 10
"""Fewest validation images of each class for isotonic regression; below it, Platt scaling.
Isotonic regression has one free step per pooled block and overfits small samples, where
Platt's two parameters do better (Niculescu-Mizil & Caruana, 2005, Fig. 6)."""
ECE_BINS = 10
"""Equal-width bins of the expected calibration error (:func:`hipoa.metrics.expected_calibration_error`)."""
_LOGIT_EPS = 1e-7
"""Raw scores are clipped to [1e-7, 1 - 1e-7] before the logit: a saturated float32 softmax gives 1.0."""
SCORE = "the presence rule's raw score: the k-th largest pixel probability, k = max(min_area_px, 1)"
PRIOR_SHIFT = ("odds' = odds * [pi / (1 - pi)] / [pi_val / (1 - pi_val)], pi = target_prevalence, "
               "pi_val = val_prevalence")


def pav(y: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """Isotonic (non-decreasing) least-squares fit of ``y`` in the order given, by pool-adjacent-violators.

    Minimises ``sum w_i (f_i - y_i)^2`` subject to ``f_0 <= f_1 <= ...`` (Ayer et al., 1955): adjacent
    values that violate the order are pooled into their weighted mean until none does.

    Args:
        y: ``(n,)`` values, in the order of the covariate.
        weight: ``(n,)`` positive weights (default 1).

    Returns:
        ``(n,)`` float64, the fit.
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    w = np.ones_like(y) if weight is None else np.asarray(weight, dtype=np.float64).ravel()
    if w.shape != y.shape or (w <= 0).any():
        raise ValueError(f"pav: need {y.size} positive weights, got shape {w.shape}")
    means: list[float] = []
    weights: list[float] = []
    sizes: list[int] = []
    for value, wt in zip(y.tolist(), w.tolist()):
        means.append(value)
        weights.append(wt)
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m, wt2, size = means.pop(), weights.pop(), sizes.pop()
            total = weights[-1] + wt2
            means[-1] = (means[-1] * weights[-1] + m * wt2) / total
            weights[-1] = total
            sizes[-1] += size
    return np.repeat(np.asarray(means, dtype=np.float64), sizes)


def fit_isotonic(score: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Isotonic regression of ``truth`` on ``score``: the knots of a piecewise-linear, non-decreasing map.

    Images with the same score are pooled first (one point, weight = their number, value = their
    share positive), then :func:`pav` fits the points in score order. Each pooled block of
    points gives two knots at its lowest and highest score (one when they coincide), so the map is
    flat within a block and linear between blocks, as ``sklearn.isotonic.IsotonicRegression``.

    Args:
        score: ``(n,)`` raw scores; truth: ``(n,)`` bool.

    Returns:
        ``(x, y)``: ``(m,)`` float64 knots, ``x`` strictly increasing, ``y`` non-decreasing in [0, 1].
    """
    s = np.asarray(score, dtype=np.float64).ravel()
    t = np.asarray(truth).astype(bool).ravel()
    if s.shape != t.shape or not s.size:
        raise ValueError(f"fit_isotonic: need as many truths as scores (> 0), got {s.size} and {t.size}")
    ux, inverse = np.unique(s, return_inverse=True)
    w = np.bincount(inverse).astype(np.float64)
    mean = np.bincount(inverse, weights=t.astype(np.float64)) / w
    fit = pav(mean, w)
    # Block edges: where the fitted value changes, plus both ends.
    change = np.flatnonzero(np.diff(fit) != 0)
    starts = np.concatenate([[0], change + 1])
    ends = np.concatenate([change, [fit.size - 1]])
    keep = np.unique(np.concatenate([starts, ends]))
    return ux[keep], fit[keep]


def fit_platt(score: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Platt scaling: ``p = sigmoid(a * logit(score) + b)`` by maximum likelihood, with Platt's targets.

    The targets are ``(n_pos + 1) / (n_pos + 2)`` for positives and ``1 / (n_neg + 2)`` for negatives
    (Platt, 1999, eq. 3), which keeps ``a`` finite on separable scores; Newton's method with
    backtracking (Lin, Lin & Weng, 2007), from ``a = 0``, ``b`` = the targets' log odds. A
    decreasing fit (``a < 0``: a score that ranks against the truth) is not monotone
    non-decreasing; ``a`` is then 0 and ``b`` the targets' mean log odds (a constant).

    Args:
        score: ``(n,)`` raw scores in [0, 1]; truth: ``(n,)`` bool with both classes.

    Returns:
        ``(a, b)``, floats, ``a >= 0``.
    """
    s = np.asarray(score, dtype=np.float64).ravel()
    t = np.asarray(truth).astype(bool).ravel()
    if s.shape != t.shape:
        raise ValueError(f"fit_platt: {s.size} scores for {t.size} truths")
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if not (n_pos and n_neg):
        raise ValueError(f"fit_platt needs positive and negative images, got {n_pos} positive of {t.size}")
    z = _logit(s)
    target = np.where(t, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    b_const = float(math.log(target.mean() / (1.0 - target.mean())))

    def nll(a: float, b: float) -> float:
        f = a * z + b
        return float(np.sum(target * np.logaddexp(0.0, -f) + (1.0 - target) * np.logaddexp(0.0, f)))

    a, b = 0.0, float(math.log((n_pos + 1.0) / (n_neg + 1.0)))
    value = nll(a, b)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(a * z + b)))
        g = np.array([np.sum((p - target) * z), np.sum(p - target)])
        if np.abs(g).max() < 1e-9:
            break
        h = p * (1.0 - p)
        hess = np.array([[np.sum(h * z * z), np.sum(h * z)], [np.sum(h * z), np.sum(h)]]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, g)
        size = 1.0
        while size >= 1e-10:
            a_new, b_new = a - size * float(step[0]), b - size * float(step[1])
            new = nll(a_new, b_new)
            if new < value + 1e-4 * size * float(g @ -step):
                a, b, value = a_new, b_new, new
                break
            size /= 2.0
        else:
            break  # no step decreases the likelihood: at the optimum to float precision
    if a < 0:
        return 0.0, b_const
    return float(a), float(b)


def _logit(score: np.ndarray) -> np.ndarray:
    s = np.clip(np.asarray(score, dtype=np.float64), _LOGIT_EPS, 1.0 - _LOGIT_EPS)
    return np.log(s) - np.log1p(-s)


def prior_shift(prob: np.ndarray, from_prevalence: float, to_prevalence: float) -> np.ndarray:
    """Probabilities for a population of prevalence ``to_prevalence``, from one of ``from_prevalence``.

    ``odds' = odds * [to / (1 - to)] / [from / (1 - from)]`` (Bayes' rule with the class-conditional
    score distributions unchanged; Saerens et al., 2002, eq. 2.4).

    Args:
        prob: ``(n,)`` probabilities in [0, 1]; from_prevalence, to_prevalence: in (0, 1).

    Returns:
        ``(n,)`` float64.
    """
    for name, value in (("from_prevalence", from_prevalence), ("to_prevalence", to_prevalence)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"prior_shift: {name} must be in (0, 1), got {value}")
    p = np.asarray(prob, dtype=np.float64)
    ratio = (to_prevalence / (1.0 - to_prevalence)) / (from_prevalence / (1.0 - from_prevalence))
    return p * ratio / (p * ratio + (1.0 - p))


@dataclass(frozen=True)
class Calibration:
    """A fitted map from the raw presence score to a probability of presence (see the module docstring).

    Attributes:
        method: ``"isotonic"`` (knots ``x``, ``y``), ``"platt"`` (``a``, ``b``) or ``"identity"``
            (the raw score, clipped and prior-shifted).
        val_prevalence: Fraction positive of the validation images it was fitted on, in (0, 1).
        target_prevalence: The cohort's prevalence (the presence rule's), in (0, 1), or None: no
            prior shift.
        eps: Probabilities are clipped to ``[eps, 1 - eps]`` before the shift.
        x, y: Isotonic knots (empty for Platt).
        a, b: Platt's slope and intercept on ``logit(score)`` (None for isotonic).
        info: Everything else of the JSON (``n``, ``n_positive``, ``ece_val``, ...), kept as written.
    """

    method: str
    val_prevalence: float
    target_prevalence: float | None
    eps: float
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    a: float | None = None
    b: float | None = None
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"calibration: method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 < self.val_prevalence < 1.0:
            raise ValueError(f"calibration: val_prevalence must be in (0, 1), got {self.val_prevalence}")
        if self.target_prevalence is not None and not 0.0 < self.target_prevalence < 1.0:
            raise ValueError(f"calibration: target_prevalence must be in (0, 1) or null, got {self.target_prevalence}")
        if not 0.0 <= self.eps < 0.5:
            raise ValueError(f"calibration: eps must be in [0, 0.5), got {self.eps}")
        if self.method == "isotonic":
            x, y = np.asarray(self.x, np.float64), np.asarray(self.y, np.float64)
            if x.ndim != 1 or x.shape != y.shape or not x.size:
                raise ValueError(f"calibration: isotonic needs as many knots x as y (> 0), got {x.size} and {y.size}")
            if not (np.isfinite(x).all() and np.isfinite(y).all()):
                raise ValueError("calibration: isotonic knots must be finite numbers")
            if (np.diff(x) <= 0).any() or (np.diff(y) < 0).any() or y.min() < 0 or y.max() > 1:
                raise ValueError("calibration: isotonic knots need x strictly increasing, y non-decreasing in [0, 1]")
        elif self.method == "platt":
            if self.a is None or self.b is None or not (math.isfinite(self.a) and math.isfinite(self.b)) or self.a < 0:
                raise ValueError(f"calibration: platt needs finite a >= 0 and b, got a={self.a}, b={self.b}")

    def apply(self, score: np.ndarray, *, prior: str = "cohort") -> np.ndarray:
        """The probability of presence of raw scores.

        Args:
            score: ``(n,)`` raw scores in [0, 1] (float32 from the model; NaN stays NaN).
            prior: ``"cohort"``: shifted to ``target_prevalence`` (what the phenotype Parquet
                holds; unshifted when it is None); ``"validation"``: at the validation split's
                prevalence (for scoring on the enriched test split).

        Returns:
            ``(n,)`` float64 in ``[0, 1]``, non-decreasing in ``score``.
        """
        if prior not in ("cohort", "validation"):
            raise ValueError(f"calibration: prior must be 'cohort' or 'validation', got {prior!r}")
        s = np.asarray(score, dtype=np.float64)
        if self.method == "identity":
            p = s.copy()
        elif self.method == "isotonic":
            p = np.interp(s, self.x, self.y)
        else:
            p = 1.0 / (1.0 + np.exp(-(self.a * _logit(s) + self.b)))
        p = np.clip(p, self.eps, 1.0 - self.eps)
        if prior == "cohort" and self.target_prevalence is not None:
            p = prior_shift(p, self.val_prevalence, self.target_prevalence)
        return p

    def to_dict(self) -> dict[str, Any]:
        """The model card's ``presence.calibration`` (plain JSON types)."""
        params: dict[str, Any] = (
            {"x": [float(v) for v in self.x], "y": [float(v) for v in self.y], "interpolation": "linear"}
            if self.method == "isotonic" else {"a": float(self.a), "b": float(self.b)} if self.method == "platt" else {}
        )
        return {"method": self.method, **self.info, **params, "eps": float(self.eps),
                "val_prevalence": float(self.val_prevalence),
                "target_prevalence": None if self.target_prevalence is None else float(self.target_prevalence)}

    @classmethod
    def from_dict(cls, d: Any) -> Calibration | None:
        """The calibration of a card's ``presence.calibration``; None for ``method: "none"`` (uncalibrated).

        Raises:
            ValueError: naming the value when it is not a calibration this module writes.
        """
        if not isinstance(d, dict) or "method" not in d:
            raise ValueError(f"calibration: expected an object with a method, got {d!r}")
        if d["method"] == "none":
            return None
        known = {"method", "x", "y", "a", "b", "eps", "val_prevalence", "target_prevalence", "interpolation"}
        try:
            target = d.get("target_prevalence")
            return cls(
                method=d["method"], val_prevalence=float(d["val_prevalence"]),
                target_prevalence=None if target is None else float(target), eps=float(d.get("eps", 0.0)),
                x=tuple(float(v) for v in d.get("x", ())), y=tuple(float(v) for v in d.get("y", ())),
                a=None if d.get("a") is None else float(d["a"]), b=None if d.get("b") is None else float(d["b"]),
                info={k: v for k, v in d.items() if k not in known},
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"calibration: {exc!s} missing or not a number in {sorted(d)}") from None


def fit_calibration(
    score: np.ndarray, truth: np.ndarray, *, target_prevalence: float | None, method: str = "auto"
) -> Calibration:
    """Fit the calibration of raw scores on the validation split (see the module docstring).

    Args:
        score: ``(n,)`` raw scores of the validation images, in [0, 1].
        truth: ``(n,)`` bool, their truth; both classes needed.
        target_prevalence: The cohort's prevalence to shift to (the presence rule's), or None.
        method: ``"auto"`` (isotonic with at least :data:`MIN_CLASS_ISOTONIC` images of each class,
            else Platt), ``"isotonic"`` or ``"platt"``.

    Returns:
        The :class:`Calibration`; its ``info`` holds ``fitted_on`` ("val"), ``n``, ``n_positive``,
        ``score``, ``prior_shift``, and the in-sample ``ece_val``, ``brier_val`` (at the
        validation prior) beside ``ece_val_raw``, ``brier_val_raw`` of the raw score, ``ece_bins``.

    Raises:
        ValueError: when the truth is one class, the sizes differ, or ``method`` is unknown.
    """
    s = np.asarray(score, dtype=np.float64).ravel()
    t = np.asarray(truth).astype(bool).ravel()
    if s.shape != t.shape:
        raise ValueError(f"fit_calibration: {s.size} scores for {t.size} truths")
    n, n_pos = int(t.size), int(t.sum())
    if not 0 < n_pos < n:
        raise ValueError(f"fit_calibration needs positive and negative validation images, got {n_pos} positive of {n}")
    choice = None
    if method == "auto":
        method = "isotonic" if min(n_pos, n - n_pos) >= MIN_CLASS_ISOTONIC else "platt"
        loo, raw = _loo_brier(s, t, method), brier_score(s, t)
        choice = {"rule": "the fitted map if its leave-one-out Brier score on val beats the raw score's, else identity",
                  "candidate": method, "loo_brier": loo, "brier_raw": raw}
        if not loo < raw:
            method = "identity"
    if method not in METHODS:
        raise ValueError(f"fit_calibration: method must be 'auto' or one of {METHODS}, got {method!r}")
    cal = _fit_map(method, s, t, target_prevalence, eps=0.0 if method == "identity" else 1.0 / (n + 2))
    at_val = cal.apply(s, prior="validation")
    info = {
        "fitted_on": "val", "n": n, "n_positive": n_pos, "score": SCORE,
        "prior_shift": PRIOR_SHIFT if target_prevalence is not None else "none (no target prevalence)",
        "ece_bins": ECE_BINS,
        "ece_val": expected_calibration_error(at_val, t, ECE_BINS), "brier_val": brier_score(at_val, t),
        "ece_val_raw": expected_calibration_error(s, t, ECE_BINS), "brier_val_raw": brier_score(s, t),
    }
    if choice is not None:
        info["choice"] = choice
    return replace(cal, info=info)


def _fit_map(method: str, s: np.ndarray, t: np.ndarray, target_prevalence: float | None, eps: float) -> Calibration:
    """The :class:`Calibration` of ``method`` fitted on scores ``s`` and truth ``t`` (no ``info``)."""
    common = {"val_prevalence": float(t.mean()), "target_prevalence": target_prevalence, "eps": eps}
    if method == "identity":
        return Calibration(method=method, **common)
    if method == "isotonic":
        x, y = fit_isotonic(s, t)
        return Calibration(method=method, x=tuple(x.tolist()), y=tuple(y.tolist()), **common)
    a, b = fit_platt(s, t)
    return Calibration(method=method, a=a, b=b, **common)


def _loo_brier(score: np.ndarray, truth: np.ndarray, method: str) -> float:
    """Brier score of ``method`` fitted on all validation images but one and applied to that one,
    over every image (the map's out-of-sample error); ``inf`` when a class has one image only."""
    n = len(score)
    if min(int(truth.sum()), n - int(truth.sum())) < 2:
        return float("inf")
    pred = np.empty(n)
    keep = np.ones(n, bool)
    for i in range(n):
        keep[i] = False
        cal = _fit_map(method, score[keep], truth[keep], None, eps=1.0 / (n + 1))
        pred[i] = cal.apply(score[i: i + 1], prior="validation")[0]
        keep[i] = True
    return brier_score(pred, truth)


UNCALIBRATED = "the model card has no calibration (a model trained before calibration was fitted)"


def describe(calibration: dict[str, Any] | None) -> dict[str, Any]:
    """A card's ``presence.calibration`` without its knots, for logs, the Parquet metadata and the
    evaluation JSON: ``method`` and, when calibrated, ``fitted_on``, ``n``, ``n_positive``,
    ``val_prevalence``, ``target_prevalence``, ``ece_val``, ``brier_val``; else ``reason``.

    Args:
        calibration: The JSON (:meth:`Calibration.to_dict`, or ``{"method": "none", "reason": ...}``),
            or None for a card without one.
    """
    if calibration is None:
        return {"method": "none", "reason": UNCALIBRATED}
    if calibration.get("method") == "none":
        return {"method": "none", "reason": calibration.get("reason", UNCALIBRATED)}
    keys = ("method", "fitted_on", "n", "n_positive", "val_prevalence", "target_prevalence", "ece_val", "brier_val")
    return {k: calibration.get(k) for k in keys}
