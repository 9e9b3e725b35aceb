"""The presence rule of a trained U-Net, chosen on the validation split for the cohort's prevalence.

:func:`choose_presence_rule` picks ``detect_threshold`` and ``min_area_px`` of
:func:`hipoa.metrics.presence_from_probability` (see :data:`PRESENCE_RULE`); the rule is written
to the model card by :func:`hipoa.train.train_site`, with the calibration of the rule's raw score
(:func:`hipoa.calibration.fit_calibration`, fitted on the same validation images once the rule is
chosen; ``presence["calibration"]``). The model runs through the one inference path
(:class:`hipoa.infer.SiteModel`): the pixel counts at the candidate thresholds, the 0.5 masks and
the raw scores are computed on the device, never the probability maps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from hipoa.calibration import METHODS, fit_calibration
from hipoa.infer import SiteModel, as_site_model, read_masks
from hipoa.metrics import choose_min_area, dice, estimate_prevalence
from hipoa.modelio import PresenceRule
from hipoa.sites import PATCH_SIZE
from hipoa.splits import open_site_patches, patch_indices, read_splits
from hipoa.store import PatchSet

log = logging.getLogger(__name__)

PIXEL_THRESHOLD = 0.5
"""Pixel probability of the osteophyte mask (and area): the argmax of the two-class softmax."""
DETECT_THRESHOLDS = (0.5, 0.7, 0.9)
"""Candidate pixel probabilities a pixel needs to count towards ``min_area_px`` (presence), one
chosen per site on validation (``detect_threshold="auto"``). A confident model separates better
at 0.9: on the 400-participant synthetic cohort, held-out AUC 0.987 / 0.968 / 0.980 at 0.9 against
0.978 / 0.956 / 0.988 at 0.5 (inferior / superior / acetabulum), and less prevalence bias. A
small, less confident model (the demo's) rarely reaches 0.9 and needs 0.5."""
POPULATION_SAMPLE = 4000
"""At most this many unlabelled images are predicted to estimate a site's prevalence."""
PRESENCE_RULE = (
    "an image has an osteophyte if at least min_area_px patch pixels have a probability >= "
    "detect_threshold; its mask (and area) are the pixels >= pixel_threshold. detect_threshold and "
    "min_area_px maximise prevalence * sensitivity + (1 - prevalence) * specificity on the "
    "validation split (ties: the higher detect_threshold, the geometric middle of the best "
    "min_area_px stretch); prevalence is estimated on the cohort's images outside the train and val "
    "splits by adjusted classify-and-count, or set in the config"
)


def choose_presence_rule(
    model,
    *,
    stores: Sequence[str | Path] | str | Path,
    splits: str | Path | pd.DataFrame,
    site: str,
    prevalence: float | str = "auto",
    detect_threshold: float | str = "auto",
    batch_size: int = 32,
    seed: int = 1,
    max_population: int = POPULATION_SAMPLE,
    calibration: str = "auto",
) -> tuple[dict, dict]:
    """Choose a trained model's presence rule on the validation split, for the cohort's prevalence.

    The rule (:func:`hipoa.metrics.presence_from_probability`): present when at least
    ``min_area_px`` patch pixels reach ``detect_threshold``; the mask is the pixels >= 0.5. The
    pair minimises the errors expected at the site's prevalence: for each candidate detection
    threshold (:data:`DETECT_THRESHOLDS`, or the one given) :func:`hipoa.metrics.choose_min_area`
    picks ``min_area_px``, and the candidate with the best prevalence-weighted accuracy wins (ties:
    the higher threshold). The validation split is balanced, so its own balance says nothing
    about the cohort's; with ``prevalence="auto"`` it is estimated where the model will be used:

    1. at the detection threshold with the best Youden's J, ``T0``, the rule at prevalence 0.5,
       and its validation sensitivity ``s`` and specificity ``c``;
    2. ``q``, the fraction called present at ``T0`` among the measurable automatic-point patches
       of participants in no train or val split (a seeded sample of at most ``max_population``);
    3. prevalence ``= (q - (1 - c)) / (s + c - 1)`` (:func:`hipoa.metrics.estimate_prevalence`),
       kept within [0.01, 0.99].

    Once the rule is chosen, the model is run once more on the validation images at that rule for
    their raw scores (the ``k``-th largest pixel probability, ``k = min_area_px``), and
    :func:`hipoa.calibration.fit_calibration` fits their calibration (method ``calibration``),
    shifted to the prevalence. A validation split of one class is not calibrated
    (``{"method": "none", "reason": ...}``).

    When that cannot be done (no such images, or ``s + c - 1 <= 0``) the prevalence is 0.5 and a
    warning says why. Scoring uses the validation images' automatic-point patches (as the model is
    used), or the manual centre crops where the stores have no automatic patches of them.

    Args:
        model: The trained U-Net: a Keras model (run as built) or a :class:`hipoa.infer.SiteModel`.
        stores, splits, site: As for :func:`train_site`.
        prevalence: ``"auto"`` or the expected fraction of images with an osteophyte, in (0, 1).
        detect_threshold: ``"auto"`` (choose among :data:`DETECT_THRESHOLDS`) or a number in [0.5, 1].
        batch_size: Patches per model call.
        seed: Of the population sample.
        max_population: Cap on the images predicted for the estimate.
        calibration: ``"auto"``, ``"isotonic"`` or ``"platt"`` (:func:`hipoa.calibration.fit_calibration`).

    Returns:
        ``(presence, scores)``: ``presence`` is ``unet.json``'s rule (``pixel_threshold``,
        ``detect_threshold``, ``min_area_px``, ``prevalence``, ``prevalence_source``,
        ``candidates`` (per detection threshold: ``min_area_px``, ``weighted_accuracy``,
        ``youden_j``) and, when estimated, ``prevalence_estimate``, ``rule``, ``calibration``
        (:meth:`hipoa.calibration.Calibration.to_dict`)); ``scores`` are the
        validation scores at the rule (:func:`hipoa.metrics.choose_min_area`) plus ``source``,
        ``dice_mean_positive`` and ``dice_mean_all``.
    """
    grid = _candidate_thresholds(detect_threshold, prevalence)
    if calibration not in ("auto", *METHODS):
        raise ValueError(f"calibration must be 'auto' or one of {METHODS}, got {calibration!r}")
    engine = as_site_model(model)
    table = read_splits(splits)
    val_rows = table[table["split"] == "val"]
    val_truth = val_rows["positive"].to_numpy(bool)
    counts, pixels, truth_mask, auto, source, view = _score_validation(engine, stores, site, val_rows, grid, batch_size)
    presence: dict = {"pixel_threshold": PIXEL_THRESHOLD}
    if val_truth.all() or not val_truth.any():
        log.warning("presence rule %s: the validation split is all one class; min_area_px defaults to 1", site)
        detect, min_area = grid[0], 1
        scores = {"n": int(len(val_truth)), "n_positive": int(val_truth.sum())}
        presence.update(prevalence=None, prevalence_source="none (validation split all one class)")
    else:
        detect, min_area, scores = _fit_rule(
            presence, engine, counts, val_truth, grid, auto=auto, table=table, site=site, prevalence=prevalence,
            batch_size=batch_size, seed=seed, max_population=max_population,
        )
    presence["detect_threshold"] = float(detect)
    presence["min_area_px"] = int(min_area)
    presence["rule"] = PRESENCE_RULE
    presence["calibration"] = _calibrate(engine, view, presence, val_truth, site=site, batch_size=batch_size,
                                         method=calibration)
    # The rule's mask: the pixels >= 0.5 of the images with >= min_area_px pixels >= detect
    # (the same as presence_from_probability: the k-th largest pixel reaches detect exactly then).
    present = counts[:, grid.index(detect)] >= min_area
    d = dice(pixels * present[:, None, None].astype(np.uint8), truth_mask)
    scores.update(
        source=source,
        dice_mean_positive=float(d[val_truth].mean()) if val_truth.any() else float("nan"),
        dice_mean_all=float(d.mean()),
    )
    return presence, scores


def _calibrate(engine: SiteModel, view: tuple, presence: dict, val_truth: np.ndarray, *, site: str, batch_size: int,
               method: str) -> dict:
    """``presence["calibration"]``: the raw scores of the validation images at the chosen rule
    (``view`` = ``(image, indices, crop)`` of :func:`_score_validation`), calibrated for the
    rule's prevalence (:func:`hipoa.calibration.fit_calibration`)."""
    if val_truth.all() or not val_truth.any():
        log.warning("presence rule %s: the validation split is all one class; its probability stays uncalibrated", site)
        return {"method": "none", "reason": "validation split all one class"}
    image, idx, crop = view
    rule = PresenceRule(PIXEL_THRESHOLD, presence["min_area_px"], presence["detect_threshold"])
    out = engine.predict(image, idx, batch_size=batch_size, crop=crop, rule=rule)
    cal = fit_calibration(out.probability, val_truth, target_prevalence=presence["prevalence"], method=method)
    log.info("presence rule %s: %s calibration on %d validation images (%d positive), val prevalence %.3f -> %s; "
             "in-sample ECE %.3f (raw score %.3f), Brier %.3f (raw %.3f)", site, cal.method, cal.info["n"],
             cal.info["n_positive"], cal.val_prevalence, cal.target_prevalence, cal.info["ece_val"],
             cal.info["ece_val_raw"], cal.info["brier_val"], cal.info["brier_val_raw"])
    return cal.to_dict()


def _fit_rule(
    presence: dict, engine: SiteModel, counts: np.ndarray, val_truth: np.ndarray, grid: tuple[float, ...], *,
    auto: PatchSet | None, table: pd.DataFrame, site: str, prevalence: float | str, batch_size: int, seed: int,
    max_population: int,
) -> tuple[float, int, dict]:
    """``(detect, min_area, scores)`` on a validation split with both classes; adds the prevalence,
    its source and estimate, and the candidates to ``presence`` (see :func:`choose_presence_rule`)."""
    by_t = {t: counts[:, j] for j, t in enumerate(grid)}
    youden = {t: choose_min_area(by_t[t], val_truth, 0.5) for t in grid}
    t_j = max(grid, key=lambda t: (round(youden[t][1]["youden_j"], 9), t))
    if youden[t_j][1]["youden_j"] <= 0:
        log.warning("presence rule %s: no rule separates the validation images (Youden's J %.3f); the model "
                    "has not learned to detect this site", site, youden[t_j][1]["youden_j"])
    if prevalence == "auto":
        pi, src, detail = _estimate_site_prevalence(
            engine, auto, table, site, t_j, *youden[t_j], batch_size, seed, max_population
        )
    else:
        pi, src, detail = float(prevalence), "config", None
    detect, min_area, scores, candidates = _best_rule(by_t, val_truth, pi, youden, grid)
    presence.update(prevalence=pi, prevalence_source=src)
    if detail is not None:
        presence["prevalence_estimate"] = detail
    presence["candidates"] = candidates
    log.info(
        "presence rule %s: prevalence %.3f (%s); detect_threshold %.2f, min_area_px %d (best stretch %s), "
        "val sensitivity %.3f, specificity %.3f; candidates %s",
        site, pi, src, detect, min_area, scores["stretch"], scores["sensitivity"], scores["specificity"],
        presence["candidates"],
    )
    return detect, min_area, scores


def _candidate_thresholds(detect_threshold: float | str, prevalence: float | str) -> tuple[float, ...]:
    """The detection thresholds to try; checks both settings (ValueError naming the value)."""
    if detect_threshold == "auto":
        grid = DETECT_THRESHOLDS
    elif isinstance(detect_threshold, (int, float)) and PIXEL_THRESHOLD <= detect_threshold <= 1.0:
        grid = (float(detect_threshold),)
    else:
        raise ValueError(f"detect_threshold must be 'auto' or in [{PIXEL_THRESHOLD}, 1], got {detect_threshold!r}")
    if prevalence != "auto" and not (isinstance(prevalence, (int, float)) and 0.0 < prevalence < 1.0):
        raise ValueError(f"prevalence must be 'auto' or a number in (0, 1), got {prevalence!r}")
    return tuple(grid)


def _score_validation(
    engine: SiteModel, stores, site: str, val_rows: pd.DataFrame, grid: tuple[float, ...], batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, PatchSet | None, str]:
    """Run the model on the validation images: per-image pixel counts at each of ``grid`` and the
    ``(n, 128, 128)`` uint8 pixels >= 0.5, computed on the device (no probability maps).

    Returns:
        ``(counts (n, len(grid)) int64, pixels, truth_mask (n, 128, 128) uint8, auto, source, view)``:
        the automatic-point patches (``auto`` their PatchSet, source ``"auto"``), or the manual
        centre crops where the stores have none (``auto`` None, source ``"manual"``); ``view`` is
        ``(image, indices, crop)``, the patches scored, to run the model on them again.
    """
    request = {"batch_size": batch_size, "masks": "pixels", "count_thresholds": grid,
               "rule": PresenceRule(PIXEL_THRESHOLD, 1, PIXEL_THRESHOLD)}
    try:
        auto = open_site_patches(stores, site, "auto")
        idx = patch_indices(auto.rows, val_rows, "auto patches")
        out = engine.predict(auto.image, idx, **request)
        return out.counts, out.mask, read_masks(auto.mask, idx), auto, "auto", (auto.image, idx, 0)
    except KeyError as exc:
        log.warning("presence rule %s: %s; choosing it on manual centre crops", site, exc)
    manual = open_site_patches(stores, site, "manual")
    crop = (int(manual.image.shape[1]) - PATCH_SIZE) // 2
    idx = patch_indices(manual.rows, val_rows, "manual patches")
    out = engine.predict(manual.image, idx, crop=crop, **request)
    return out.counts, out.mask, read_masks(manual.mask, idx, crop=crop), None, "manual", (manual.image, idx, crop)


def _best_rule(by_t: dict, val_truth: np.ndarray, pi: float, youden: dict, grid) -> tuple:
    """``(detect, min_area, scores, candidates)``: per threshold the best ``min_area_px`` at
    prevalence ``pi``, then the threshold with the best weighted accuracy (ties: the higher)."""
    chosen = {t: choose_min_area(by_t[t], val_truth, pi) for t in grid}
    detect = max(grid, key=lambda t: (round(chosen[t][1]["weighted_accuracy"], 9), t))
    min_area, scores = chosen[detect]
    candidates = {
        str(t): {"min_area_px": int(chosen[t][0]), "weighted_accuracy": chosen[t][1]["weighted_accuracy"],
                 "youden_j": youden[t][1]["youden_j"]}
        for t in grid
    }
    return detect, min_area, scores, candidates


def _estimate_site_prevalence(
    engine: SiteModel, auto: PatchSet | None, table: pd.DataFrame, site: str, detect_threshold: float, t0: int,
    youden: dict, batch_size: int, seed: int, max_population: int,
) -> tuple[float, str, dict | None]:
    """``(prevalence, source, detail)`` for :func:`choose_presence_rule`'s ``"auto"``: the rule
    ``detect_threshold``, ``t0`` with validation scores ``youden``, applied to the cohort."""
    from hipoa.predict import measurable
    from hipoa.store import store_attrs

    fallback = 0.5
    if auto is None:
        log.warning("presence rule %s: no automatic patches to estimate the prevalence; using %.2f", site, fallback)
        return fallback, "fallback 0.5 (no automatic-point patches)", None
    min_inside = max(float(store_attrs(s).get("min_inside_fraction", 0.0)) for s in auto.rows["store"].unique())
    ok, _ = measurable(auto.rows, auto.inside, min_inside, auto.affine)
    fitted = set(table.loc[table["split"].isin(["train", "val"]), "eid"].astype(str))
    ok &= ~auto.rows["eid"].astype(str).isin(fitted).to_numpy()
    candidates = np.flatnonzero(ok)
    if candidates.size > max_population:
        candidates = np.sort(np.random.default_rng([seed, 7]).choice(candidates, max_population, replace=False))
    sens, spec = youden["sensitivity"], youden["specificity"]
    if candidates.size == 0 or not sens + spec - 1.0 > 0:
        why = "no measurable images outside train and val" if candidates.size == 0 else "Youden's J <= 0"
        log.warning("presence rule %s: cannot estimate the prevalence (%s); using %.2f", site, why, fallback)
        return fallback, f"fallback 0.5 ({why})", None
    out = engine.predict(auto.image, candidates, batch_size=batch_size, count_thresholds=(detect_threshold,),
                         rule=PresenceRule(PIXEL_THRESHOLD, 1, PIXEL_THRESHOLD),
                         progress=f"presence rule {site}: images outside train and val (prevalence)")
    q = float((out.counts[:, 0] >= t0).mean())
    pi = float(np.clip(estimate_prevalence(q, sens, spec), 0.01, 0.99))
    detail = {
        "method": "adjusted classify-and-count at the Youden rule",
        "n_images": int(candidates.size), "detect_threshold": float(detect_threshold), "min_area_px": int(t0),
        "called_fraction": q, "val_sensitivity": sens, "val_specificity": spec,
    }
    return pi, "estimated", detail
