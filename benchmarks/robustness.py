"""Robustness to the scanner and to the points: Dice and presence against point error and scanner,
for the old training recipe and the new one.

    python benchmarks/robustness.py --dir DIR [--train-participants 150] [--test-participants 160]
        [--recipes before,after] [--errors 0,4,8,16] [--epochs 16] [--depth 3] [--base-filters 16]

What it does (every step is hipoa's own code: synth, ingest, crop, splits, train, evaluate):

1. A training cohort on the first scanner only: ``--train-participants`` participants whose left
   hips all have manual points and masks drawn by two annotators (``annotators=2``: outlines a
   pixel apart, half the small osteophytes missed), as the paper's annotated set.
2. A test cohort, every left hip annotated by the reference annotator (masks = the truth), half of
   the participants on the second scanner (0.30 mm pixels, more noise and banding, another
   response curve: ``hipoa.synth.anatomy.SECOND_SCANNER``).
3. The test cohort is cropped once per point error ``d`` in ``--errors`` (px of the stored image):
   around each site, the run of 5 automatic points centred on the site (13-17, 28-32, 76-80) is
   moved rigidly by ``d`` in a random direction (seeded per image and site); the reference points
   12 and 39 stay, so the patch centre is ``d`` off and its scale unchanged.
4. Each recipe trains one U-Net per site on the training cohort (same splits, same seed):
   ``before`` is the paper's recipe as hipoa ran it (geometric augmentation, plain
   cross-entropy); ``after`` adds the scanner appearance augmentation and the boundary-tolerant
   loss; ``after_disp`` also displaces every site's centre by up to 0.05 of the patch in training.
5. Every model is evaluated (:func:`hipoa.evaluate.evaluate_site`) on the test images measurable
   at each point error: all of them, and per scanner; with the points-plausibility flag applied
   (sites whose local outline scores above ``qc.points_max_z`` against the unperturbed cohort
   dropped, as the workflow would drop them in a shard of otherwise normal hips).

Prints one table per site (rows: recipe x condition; columns: n, sensitivity, specificity, Dice
over positives, ECE) and writes ``DIR/robustness.json`` and ``DIR/robustness.md``. Steps whose
outputs exist are skipped, so a second run only re-evaluates.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hipoa import qc
from hipoa.evaluate import evaluate_site
from hipoa.ingest import build_manifest
from hipoa.geometry import patch_affine
from hipoa.patches import crop_shard, local_outline, points_scores
from hipoa.points import read_pts, write_pts
from hipoa.sites import DEFAULT_SITES
from hipoa.splits import make_splits
from hipoa.store import open_patches
from hipoa.synth import image_stem, make_cohort
from hipoa.train import train_site
from hipoa.train_settings import TrainSettings

log = logging.getLogger("robustness")

RECIPES = {
    "before": {"appearance": 0.0, "boundary_weight": 1.0},
    "after": {"appearance": 1.0, "boundary_weight": 0.5},
    "after_disp": {"appearance": 1.0, "boundary_weight": 0.5, "displacement": 0.05},
}
PAPER_AUGMENT = {  # the schema's training.augment defaults (the paper's recipe)
    "inferior_femoral_head": {"n_augment": 7, "displacement": 0.0},
    "superior_femoral_head": {"n_augment": 7, "displacement": 0.0},
    "lateral_acetabulum": {"n_augment": 19, "displacement": 0.05},
}
RUN = 2
"""Points either side of a site's centre that move with it (a run of 5)."""


def _cohorts(root: Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    train, test = root / "train", root / "test"
    if not (train / "truth.parquet").exists():
        make_cohort(train, participants=n_train, seed=seed, annotated_fraction=1.0, annotators=2, workers=2)
    if not (test / "truth.parquet").exists():
        make_cohort(test, participants=n_test, seed=seed + 1, annotated_fraction=1.0, second_scanner=0.5, workers=2)
    return train, test


def _perturbed_points(test: Path, d: float, seed: int) -> Path:
    """A copy of the test cohort's automatic points with each site's run moved by ``d`` px."""
    out = test / f"points_error_{d:g}"
    if out.exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    truth = pd.read_parquet(test / "truth.parquet")
    for r in truth[truth["side"] == "L"].itertuples(index=False):
        pts = read_pts(test / "points" / "auto" / f"{image_stem(r.eid, r.side)}.pts")
        rng = np.random.default_rng([seed, int(r.eid)])
        for site in DEFAULT_SITES:
            ang = rng.uniform(0.0, 2.0 * np.pi)
            run = slice(site.centre - RUN, site.centre + RUN + 1)
            pts[run] += d * np.array([np.cos(ang), np.sin(ang)])
        pts[:, 0] = np.clip(pts[:, 0], 2.0, r.cols - 3.0)
        pts[:, 1] = np.clip(pts[:, 1], 2.0, r.rows - 3.0)
        write_pts(tmp / f"{image_stem(r.eid, r.side)}.pts", pts)
    tmp.rename(out)
    return out


def _store(cohort: Path, points: Path, out: Path) -> Path:
    if out.exists():
        return out
    manifest = build_manifest(
        images=str(cohort / "ukb/20158/{eid}_20158_{instance}_{array}.zip"),
        points_auto=str(points / "{eid}_{instance}_{side}.pts"),
        points_manual=str(cohort / "points/manual/{eid}_{instance}_{side}.pts"),
        masks=str(cohort / "masks/{eid}_{instance}_{side}.png"),
        side="L", n_shards=1, workers=2,
    )
    crop_shard(manifest=manifest, shard=0, out=out, sites=list(DEFAULT_SITES))
    return out


def _train(root: Path, store: Path, recipe: str, args) -> dict[str, Path]:
    models = {}
    for site in DEFAULT_SITES:
        out = root / "models" / recipe / site.name / "unet.keras"
        models[site.name] = out
        if out.exists():
            continue
        splits = make_splits(stores=[store], site=site.name, seed=args.seed, val_fraction=0.15, test_fraction=0.0)
        settings = {**PAPER_AUGMENT[site.name], **RECIPES[recipe]}
        t0 = time.monotonic()
        train_site(stores=[store], splits=splits, site=site.name, out=out, settings=TrainSettings(
            epochs=args.epochs, batch_size=args.batch_size, depth=args.depth, base_filters=args.base_filters,
            seed=args.seed, rotation=0.1, scale=0.1, prevalence=0.5, **settings))
        log.info("trained %s %s in %.0f s", recipe, site.name, time.monotonic() - t0)
    return models


def _plausible(test: Path, points: Path, site, limits: qc.Limits) -> pd.Series:
    """eid -> whether the site's perturbed points pass the plausibility check as the workflow
    would see them in a shard of otherwise normal hips: each image's perturbed local outline is
    scored against the unperturbed outlines of all the others (:func:`hipoa.patches.points_scores`).
    (Scoring the perturbed store alone would judge every image against equally perturbed ones.)"""
    truth = pd.read_parquet(test / "truth.parquet")
    truth = truth[truth["side"] == "L"]

    def window(folder: Path, r) -> np.ndarray:
        pts = read_pts(folder / f"{image_stem(r.eid, r.side)}.pts")
        sp = 0.30 if r.scanner == "B" else 0.25
        return local_outline(pts, site.centre, patch_affine(pts, site, (sp, sp), r.cols, r.side))

    rows = list(truth.itertuples(index=False))
    base = np.stack([window(test / "points" / "auto", r) for r in rows])
    out = {}
    for j, r in enumerate(rows):
        w = base.copy()
        w[j] = window(points, r)
        out[str(r.eid)] = not points_scores(w, limits.points_min_images)[j] > limits.points_max_z
    return pd.Series(out)


def _recalibrate(store: Path, models: dict[str, Path], seed: int) -> None:
    """Refit the calibration of models whose card predates the leave-one-out choice of
    :func:`hipoa.calibration.fit_calibration` (same splits and rule; only the card changes)."""
    from hipoa.infer import SiteModel
    from hipoa.presence import choose_presence_rule

    for site, model in models.items():
        card_path = model.with_suffix(".json")
        card = json.loads(card_path.read_text())
        if "choice" in card["presence"].get("calibration", {}):
            continue
        splits = make_splits(stores=[store], site=site, seed=seed, val_fraction=0.15, test_fraction=0.0)
        presence, _ = choose_presence_rule(SiteModel.load(model), stores=[store], splits=splits, site=site,
                                           prevalence=0.5)
        if presence["min_area_px"] != card["presence"]["min_area_px"]:
            raise RuntimeError(f"{model}: the presence rule changed on refitting; train it again")
        card["presence"]["calibration"] = presence["calibration"]
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        log.info("recalibrated %s: %s", model, presence["calibration"]["method"])


def _test_table(store: Path, site: str, scanners: pd.Series, plausible: pd.Series) -> pd.DataFrame:
    """The measurable annotated test rows of a store: eid, instance, side, positive, scanner, and
    whether the site's points pass the plausibility check (``plausible``, by eid)."""
    rows = open_patches([store], site, "auto").rows
    rows = rows[rows["qc_reason"].fillna("") == ""].copy()
    rows = rows[rows["annotated"].astype(bool)]
    table = pd.DataFrame({
        "eid": rows["eid"].astype(str).to_numpy(), "instance": rows["instance"].to_numpy(np.int16),
        "side": rows["side"].astype(str).to_numpy(), "split": "test",
        "positive": (rows[f"{site}_true_area_mm2"].to_numpy() > 0),
    })
    table["plausible"] = table["eid"].map(plausible).fillna(True).to_numpy(bool)
    table["scanner"] = table["eid"].map(scanners).to_numpy()
    return table


def _evaluate(root: Path, recipe: str, models: dict[str, Path], stores: dict[float, Path], scanners: pd.Series,
              plausible: dict) -> list[dict]:
    results = []
    for site, model in models.items():
        for d, store in stores.items():
            table = _test_table(store, site, scanners, plausible[site, d])
            conditions = {"all": table, "flag applied": table[table["plausible"]]}
            if d == 0:
                conditions |= {f"scanner {s}": table[table["scanner"] == s] for s in ("A", "B")}
            for name, part in conditions.items():
                if part.empty or not part["positive"].any() or part["positive"].all():
                    continue
                out = root / "evaluation" / recipe / f"{site}_d{d:g}_{name.replace(' ', '_')}.json"
                r = evaluate_site(site=site, model=model, stores=[store], splits=part.drop(columns=["scanner", "plausible"]),
                                  out=out, figures_dir=root / "evaluation" / "figures", precision="float32")
                results.append({"recipe": recipe, "site": site, "point_error_px": d, "condition": name,
                                "n": r["n"], "n_positive": r["n_positive"], "sensitivity": r["sensitivity"],
                                "specificity": r["specificity"], "dice_mean": r["dice_mean"], "ece": r.get("ece"),
                                "flagged": int((~table["plausible"]).sum()) if name == "all" else None})
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--train-participants", type=int, default=150)
    ap.add_argument("--test-participants", type=int, default=160)
    ap.add_argument("--recipes", default="before,after")
    ap.add_argument("--errors", default="0,4,8,16")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--base-filters", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    root = args.dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    limits = qc.Limits()
    train, test = _cohorts(root, args.train_participants, args.test_participants, args.seed)
    train_store = _store(train, train / "points" / "auto", root / "stores" / "train.zarr")
    errors = [float(e) for e in args.errors.split(",")]
    stores = {d: _store(test, _perturbed_points(test, d, args.seed) if d else test / "points" / "auto",
                        root / "stores" / f"test_d{d:g}.zarr") for d in errors}
    truth = pd.read_parquet(test / "truth.parquet")
    scanners = truth[truth["side"] == "L"].assign(eid=lambda t: t["eid"].astype(str)).set_index("eid")["scanner"]
    points = {d: _perturbed_points(test, d, args.seed) if d else test / "points" / "auto" for d in errors}
    plausible = {(site.name, d): _plausible(test, points[d], site, limits) for site in DEFAULT_SITES for d in errors}
    results = []
    for recipe in args.recipes.split(","):
        models = _train(root, train_store, recipe, args)
        _recalibrate(train_store, models, args.seed)
        results += _evaluate(root, recipe, models, stores, scanners, plausible)
    table = pd.DataFrame(results)
    (root / "robustness.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = []
    for site, part in table.groupby("site", sort=False):
        shown = part.drop(columns="site").round(3)
        lines.append(f"\n### {site}\n\n" + shown.to_string(index=False))
    text = "\n".join(lines)
    (root / "robustness.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
