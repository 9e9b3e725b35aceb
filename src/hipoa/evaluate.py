"""Test-split evaluation of a site's U-Net, with the measures of Ebsim et al., Table 2 and Fig. 3-4.

The test images are those of the split table's ``test`` split, each seen through its
automatic-point patch (``auto/{site}`` in the patch stores), as the model is used; no augmentation.
Presence uses the model's stored rule (:func:`hipoa.metrics.presence_from_probability` with the
thresholds in the model's card, computed beside the model by :class:`hipoa.infer.SiteModel`); truth is ``positive`` in the split table
(``{site}_true_area_mm2 > 0``).

Dice is reported two ways:

- ``dice_mean`` / ``dice_std``: over the truly positive test images (the paper's segmentation
  score), where a positive image whose prediction is absent counts as Dice 0;
- ``dice_mean_all`` / ``dice_std_all``: over all test images, where an empty prediction on an
  empty truth counts as 1.

Calibration of the per-image probability (:mod:`hipoa.calibration`): ``ece`` (expected calibration
error, :func:`hipoa.metrics.expected_calibration_error`, ``ece_bins`` = 10 equal-width bins weighted
by their image counts) and ``brier`` (:func:`hipoa.metrics.brier_score`) of the calibrated
probability, ``ece_raw`` / ``brier_raw`` of the rule's raw score. The test split is annotated and
enriched like the validation split, so the calibration is scored at the validation split's
prevalence, before the shift to the cohort's (``calibration_prior``). A model without a calibration
scores its raw score under both names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hipoa.atomic import atomic_path, save_figure
from hipoa.infer import SiteModel, read_masks, take_rows
from hipoa.calibration import ECE_BINS, describe
from hipoa.metrics import brier_score, confusion, dice, expected_calibration_error, f1, sensitivity, specificity
from hipoa.modelio import json_safe, model_json_path, read_model_card
from hipoa.paper import PAPER_TABLE2
from hipoa.splits import open_site_patches, patch_indices, read_splits

log = logging.getLogger(__name__)



def evaluate_site(
    *,
    site: str,
    model: str | Path,
    stores: Sequence[str | Path],
    splits,
    out: str | Path,
    figures_dir: str | Path | None = None,
    precision: str = "auto",
    batch_size: int = 64,
) -> dict:
    """Evaluate a site's model on its test split and write the JSON and figures.

    Args:
        site: Site key.
        model: The ``.keras`` model; its presence rule is read from the ``.json`` beside it.
        stores: Patch stores holding the test images.
        splits: Split table (Parquet path or DataFrame).
        out: JSON to write, ``results/evaluation/{site}.json``.
        figures_dir: Where to write ``{site}_confusion.png`` and ``{site}_overlay.png``
            (default: ``out``'s folder).
        precision: ``auto`` or a policy name; ``auto`` matches what prediction uses.
        batch_size: Prediction batch size.

    Returns:
        The dict written: ``n``, ``n_positive``, ``sensitivity``, ``specificity``, ``f1``,
        ``dice_mean``, ``dice_std`` (positives), ``dice_mean_all``, ``dice_std_all``,
        ``confusion_matrix`` ``[[tn, fp], [fn, tp]]`` (rows truth, columns prediction), ``presence``
        (the card's rule, without its calibration), ``paper_table2``, and ``ece``, ``brier``,
        ``ece_raw``, ``brier_raw``, ``ece_bins``, ``calibration_prior``, ``calibration``
        (:func:`hipoa.calibration.describe`), see the module docstring.

    Raises:
        ValueError: when the split table has no test images.
        FileNotFoundError: naming the model or its JSON when missing.
        hipoa.modelio.ModelError: (a ValueError) naming the model or its JSON when either is
            unusable (:func:`hipoa.modelio.load_model`, :func:`hipoa.modelio.read_model_card`).
    """
    model_path, out = Path(model), Path(out)
    figures_dir = Path(figures_dir) if figures_dir is not None else out.parent
    engine, test = _load(site, model_path, splits, precision)
    auto = open_site_patches(stores, site, "auto")
    idx = patch_indices(auto.rows, test, "auto patches")
    # The rule as before; the calibration (knots and all) is summarised under its own key.
    presence = {k: v for k, v in engine.card["presence"].items() if k != "calibration"}
    log.info(
        "evaluate %s: %d test images (%d positive), %s, rule %s",
        site, len(test), int(test["positive"].sum()), engine.policy, presence,
    )
    # Presence, area and the rule's masks are computed beside the model (hipoa.infer).
    pred = engine.predict(auto.image, idx, batch_size=batch_size, masks="all")
    truth_mask = read_masks(auto.mask, idx)
    truth = test["positive"].to_numpy(bool)
    d = dice(pred.mask, truth_mask)  # mask is empty where not present: a missed positive scores 0
    result = _scores(site, model_path, pred.present, truth, d, presence, engine.policy)
    result.update(_calibration_scores(engine.card, pred.probability, truth))
    # Each file appears complete or not at all (hipoa.atomic).
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(json_safe(result), indent=2) + "\n")
    figures_dir.mkdir(parents=True, exist_ok=True)
    confusion_figure(result, figures_dir / f"{site}_confusion.png")
    images = take_rows(auto.image, idx).astype(np.float32)
    overlay_figure(images, truth_mask, pred.mask, d, truth, figures_dir / f"{site}_overlay.png", title=site)
    log.info(
        "evaluate %s: sensitivity %.3f, specificity %.3f, F1 %.3f, Dice %.3f +- %.3f (positives), ECE %.3f "
        "(raw score %.3f); wrote %s",
        site, result["sensitivity"], result["specificity"], result["f1"], result["dice_mean"], result["dice_std"],
        result["ece"], result["ece_raw"], out,
    )
    return result


def _load(site: str, model_path: Path, splits, precision: str):
    """``(engine, test)``: the model with its card (:meth:`hipoa.infer.SiteModel.load`) and the
    split table's test rows; the card and the test split are checked before the model is loaded."""
    info_path = model_json_path(model_path)
    if not info_path.exists():
        raise FileNotFoundError(f"{model_path}: its settings file {info_path} is missing (it holds the presence rule)")
    read_model_card(model_path)
    table = read_splits(splits)
    test = table[table["split"] == "test"].reset_index(drop=True)
    if test.empty:
        raise ValueError(f"site {site}: the split table has no test images")
    return SiteModel.load(model_path, precision=precision), test


def _scores(site: str, model_path: Path, present: np.ndarray, truth: np.ndarray, d: np.ndarray, presence: dict,
            policy: str) -> dict:
    """The evaluation JSON's content (see :func:`evaluate_site`) from per-image calls and Dice."""
    tn, fp, fn, tp = confusion(present, truth)
    return {
        "site": site,
        "model": str(model_path),
        "n": int(len(truth)),
        "n_positive": int(truth.sum()),
        "sensitivity": sensitivity(present, truth),
        "specificity": specificity(present, truth),
        "f1": f1(present, truth),
        "dice_mean": float(d[truth].mean()) if truth.any() else float("nan"),
        "dice_std": float(d[truth].std()) if truth.any() else float("nan"),
        "dice_mean_all": float(d.mean()),
        "dice_std_all": float(d.std()),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "confusion_matrix_layout": "[[tn, fp], [fn, tp]]: rows truth (absent, present), columns prediction",
        "dice_over": "dice_mean/std: truly positive test images, a positive predicted absent counts 0; "
        "_all: every test image, empty prediction on empty truth counts 1",
        "test_patches": "automatic-point patches (auto/) of the split table's test images, no augmentation",
        "presence": presence,
        "precision": policy,
        "paper_table2": PAPER_TABLE2.get(site),
    }


def _calibration_scores(card, raw: np.ndarray, truth: np.ndarray) -> dict:
    """ECE and Brier score of the calibrated probability (at the validation prior) and of the raw score."""
    cal = card.calibration
    calibrated = raw if cal is None else cal.apply(raw, prior="validation")
    return {
        "ece": expected_calibration_error(calibrated, truth, ECE_BINS),
        "brier": brier_score(calibrated, truth),
        "ece_raw": expected_calibration_error(raw, truth, ECE_BINS),
        "brier_raw": brier_score(raw, truth),
        "ece_bins": ECE_BINS,
        "calibration_prior": ("validation split" if cal is not None
                              else "none (uncalibrated: ece and brier are the raw score's)"),
        "calibration": describe(card.presence_info.get("calibration")),
    }


def confusion_figure(result: dict, path: str | Path) -> Path:
    """A 2x2 confusion-matrix PNG like the paper's Fig. 3 (counts and row percentages)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(result["confusion_matrix"], dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, ax = plt.subplots(figsize=(3.6, 3.4), dpi=120)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{int(cm[i, j])}\n{100 * frac[i, j]:.0f}%", ha="center", va="center",
                    color="white" if frac[i, j] > 0.5 else "black", fontsize=11)
    ax.set_xticks([0, 1], ["absent", "present"])
    ax.set_yticks([0, 1], ["absent", "present"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(
        f"{result['site']}\nn={result['n']}, sens {result['sensitivity']:.2f}, spec {result['specificity']:.2f}",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)


def overlay_figure(
    images: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    dice_scores: np.ndarray,
    positive: np.ndarray,
    path: str | Path,
    *,
    n: int = 6,
    title: str = "",
) -> Path:
    """A montage like the paper's Fig. 4: per example, input, truth, prediction and overlap.

    Examples are truly positive test images at evenly spaced ranks of Dice (worst to best), so the
    montage shows the range of results. Overlap = truth + 2 x prediction: 0 background, 1 missed
    (truth only, red), 2 extra (prediction only, blue), 3 agreed (green).

    Args:
        images: ``(n, S, S)`` float patches; ``truth``, ``pred``: ``(n, S, S)`` uint8 masks;
            ``dice_scores``: ``(n,)``; ``positive``: ``(n,)`` bool.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    pool = np.flatnonzero(positive) if np.any(positive) else np.arange(len(images))
    pool = pool[np.argsort(dice_scores[pool], kind="stable")]
    pick = pool[np.unique(np.linspace(0, len(pool) - 1, min(n, len(pool))).round().astype(int))] if len(pool) else pool
    cols = ["input", "truth", "prediction", "overlap"]
    overlap_cmap = ListedColormap(["black", "red", "dodgerblue", "limegreen"])
    fig, axes = plt.subplots(max(len(pick), 1), 4, figsize=(8, 2.1 * max(len(pick), 1)), dpi=100, squeeze=False)
    for r, i in enumerate(pick):
        over = truth[i].astype(np.uint8) + 2 * (pred[i] > 0).astype(np.uint8)
        panels = [
            (images[i], "gray", None),
            (truth[i], "gray", (0, 1)),
            (pred[i], "gray", (0, 1)),
            (over, overlap_cmap, (0, 3)),
        ]
        for c, (data, cmap, lim) in enumerate(panels):
            ax = axes[r, c]
            kw = {"vmin": lim[0], "vmax": lim[1]} if lim else {}
            ax.imshow(data, cmap=cmap, interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=10)
        axes[r, 0].set_ylabel(f"Dice {dice_scores[i]:.2f}", fontsize=9)
    fig.suptitle(f"{title}: overlap red = missed, blue = extra, green = agreed", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)
