"""Agreement of predicted phenotypes with a synthetic cohort's truth: prevalence, sens/spec, areas.

For trained models and the patch stores of one side of a synthetic cohort (``hipoa synth``
writes ``truth.parquet`` beside the cohort), runs the real predict step
(:func:`hipoa.predict.predict_shards`) on every shard and compares, per site, on the measurable
images of participants in no train or val split of any site (the images a model did not learn from):

- prevalence predicted against the truth's;
- sensitivity and specificity at the models' presence rules;
- on true positives, the correlation of predicted and true area (mm^2) and the median ratio.

With ``--rechoose`` the presence rules are first chosen again
(:func:`hipoa.presence.choose_presence_rule`, with ``--prevalence`` and ``--detect-threshold``)
into copies of the models under ``--work``; the models themselves are left as they are. This
compares rules without retraining.

    python benchmarks/agreement.py --truth COHORT/truth.parquet --stores shard-*.zarr \\
        --models DIR (holding SITE/unet.keras) --splits DIR (holding SITE.parquet) \\
        [--rechoose [--prevalence auto|P] [--detect-threshold auto|T]] [--side L]

Figures are printed and written to ``benchmarks/out/agreement.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from hipoa.train_settings import Range, auto_or_number
from hipoa.sites import DEFAULT_SITES

SITES = [s.name for s in DEFAULT_SITES]


def _fmt(value, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``NA`` (no positives, no negatives, < 3 true positives)."""
    return "NA" if value is None else format(value, spec)


def rechoose_rules(models: dict[str, Path], stores: list[Path], splits: Path, work: Path,
                   prevalence, detect_threshold) -> dict[str, Path]:
    """Copies of ``models`` under ``work`` with their presence rules chosen again."""
    from dataclasses import replace

    from hipoa.infer import SiteModel
    from hipoa.modelio import write_model_card
    from hipoa.presence import choose_presence_rule

    out = {}
    for site, src in models.items():
        dst = work / site / "unet.keras"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        engine = SiteModel.load(src, precision="float32")
        presence, scores = choose_presence_rule(engine, stores=stores, splits=splits / f"{site}.parquet", site=site,
                                                prevalence=prevalence, detect_threshold=detect_threshold)
        # presence_info={}: the new rule's dict replaces the old one's whole
        write_model_card(dst, replace(engine.card, presence=presence, presence_info={}, validation=scores))
        out[site] = dst
    return out


def agreement(pred: pd.DataFrame, truth: pd.DataFrame, fitted: set[str]) -> dict:
    """Per site: n, prevalence predicted and true, sensitivity, specificity, area r and ratio."""
    m = pred.merge(truth, on=["eid", "side"], suffixes=("", "_truth"), validate="many_to_one")
    m = m[~m["eid"].isin(fitted)]
    res = {"images_outside_train_val": int(len(m))}
    for s in SITES:
        d = m[m[f"{s}_present"].notna()]
        p = d[f"{s}_present"].astype(int).to_numpy().astype(bool)
        t = d[f"{s}_present_truth"].to_numpy().astype(bool)
        tp = d[p & t]
        pa, ta = tp[f"{s}_area_mm2"].astype(float).to_numpy(), tp[f"{s}_area_mm2_truth"].astype(float).to_numpy()
        res[s] = {
            "n": int(len(d)),
            "prevalence_predicted": float(p.mean()),
            "prevalence_true": float(t.mean()),
            "sensitivity": float(p[t].mean()) if t.any() else None,
            "specificity": float((~p[~t]).mean()) if (~t).any() else None,
            "true_positives": int(len(tp)),
            "area_r": float(np.corrcoef(pa, ta)[0, 1]) if len(tp) > 2 else None,
            "area_median_ratio": float(np.median(pa / ta)) if len(tp) else None,
            "false_positive_area_median_mm2": float(d.loc[p & ~t, f"{s}_area_mm2"].astype(float).median())
            if (p & ~t).any() else None,
        }
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--truth", type=Path, required=True, help="the synthetic cohort's truth.parquet")
    p.add_argument("--stores", type=Path, nargs="+", required=True, help="patch stores of one side")
    p.add_argument("--models", type=Path, required=True, help="folder with SITE/unet.keras (+ unet.json)")
    p.add_argument("--splits", type=Path, required=True, help="folder with SITE.parquet split tables")
    p.add_argument("--side", default="L", choices=["L", "R"])
    p.add_argument("--rechoose", action="store_true", help="choose the presence rules again first")
    p.add_argument("--prevalence", type=auto_or_number(Range(0.0, 1.0, low_open=True, high_open=True)), default="auto")
    p.add_argument("--detect-threshold", type=auto_or_number(Range(0.5, 1.0)), default="auto")
    p.add_argument("--precision", default="float32")
    p.add_argument("--work", type=Path, help="where re-chosen models and predictions go (default: a temp dir)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/agreement.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    work = args.work or Path(tempfile.mkdtemp(prefix="hipoa-agreement-"))
    models = {s: args.models / s / "unet.keras" for s in SITES}
    if args.rechoose:
        models = rechoose_rules(models, args.stores, args.splits, work / "models", args.prevalence,
                                args.detect_threshold)
    from hipoa.modelio import read_presence_rule
    from hipoa.predict import predict_shards

    # every shard in one call: the models are loaded once
    pred = pd.concat(
        predict_shards(stores=args.stores, models=models, outs=[work / f"pred-{k}.parquet" for k in range(len(args.stores))],
                       precision=args.precision),
        ignore_index=True,
    )
    pred["eid"] = pred["eid"].astype(str)
    truth = pd.read_parquet(args.truth)
    truth = truth[truth["side"] == args.side].assign(eid=lambda d: d["eid"].astype(str))
    fitted: set[str] = set()
    for s in SITES:
        sp = pd.read_parquet(args.splits / f"{s}.parquet")
        fitted |= set(sp.loc[sp["split"].isin(["train", "val"]), "eid"].astype(str))
    res = agreement(pred, truth, fitted)
    res["rules"] = {s: read_presence_rule(m).to_dict() for s, m in models.items()}
    res["rechosen"] = bool(args.rechoose)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"{res['images_outside_train_val']} images of side {args.side} outside every train and val split")
    for s in SITES:
        r, rule = res[s], res["rules"][s]
        print(f"{s}: rule >= {rule['min_area_px']} px at p >= {rule['detect_threshold']}; n {r['n']}; prevalence "
              f"predicted {r['prevalence_predicted']:.3f} vs truth {r['prevalence_true']:.3f}; sensitivity "
              f"{_fmt(r['sensitivity'], '.3f')}, specificity {_fmt(r['specificity'], '.3f')}; "
              f"{r['true_positives']} true positives, area r {_fmt(r['area_r'], '.3f')}, "
              f"median predicted/true {_fmt(r['area_median_ratio'], '.2f')}")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
