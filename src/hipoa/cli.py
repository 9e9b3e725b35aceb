"""The ``hipoa`` command: one subcommand per workflow stage.

Each handler parses its arguments, sets up logging and calls one library function with keyword
arguments, so ``snakemake -p`` prints commands that can be rerun by hand.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from hipoa import __version__
from hipoa.points import N_POINTS

log = logging.getLogger("hipoa")


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is written, not when it was made:
    a caller that swaps stderr (pytest's capture, a notebook) never leaves it writing to a
    closed stream ("--- Logging error ---")."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; sys.stderr is used instead
        pass


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr with timestamps (rules redirect stderr to their log file)."""
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)


Handler = Callable[[argparse.Namespace], int]
_SUBCOMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Handler]] = []


def subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``handler`` as ``hipoa NAME``."""

    def wrap(handler: Handler) -> Handler:
        _SUBCOMMANDS.append((name, help, add_arguments, handler))
        return handler

    return wrap


# ---- synth -----------------------------------------------------------------------------------
def _synth_arguments(p: argparse.ArgumentParser) -> None:
    import os

    p.add_argument("--out", required=True, metavar="DIR", help="cohort directory (UKB layout + truth.parquet)")
    p.add_argument("--participants", type=int, metavar="N",
                   help="participants, two hips each (required unless --preview-only)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed; same seed, same bytes (0)")
    p.add_argument("--annotated-fraction", type=float, default=0.3, metavar="F",
                   help="fraction of participants with manual points and masks (0.3)")
    p.add_argument("--enriched-prevalence", type=float, default=0.5, metavar="P",
                   help="per-site osteophyte probability in annotated images (0.5)")
    p.add_argument("--prevalence", type=float, default=0.15, metavar="P",
                   help="per-site osteophyte probability in the other images (0.15)")
    p.add_argument("--annotate-sides", default="L", choices=["L", "R", "LR"], help="sides that get annotations (L)")
    p.add_argument("--faults", type=int, default=0, metavar="K",
                   help="participants with a planted fault, cycling through the six kinds (0)")
    p.add_argument("--unfit", type=int, default=0, metavar="K",
                   help="participants whose left hip is unfit to measure, cycling through a metal implant, a "
                        "field of view cutting the femoral head and patient motion (0)")
    p.add_argument("--second-scanner", type=float, default=0.0, metavar="F",
                   help="fraction of participants imaged on a second scanner: 0.30 mm pixels, more noise and "
                        "banding, softer detector, another response curve (0)")
    p.add_argument("--annotators", type=int, default=1, choices=[1, 2],
                   help="2: masks from two annotators whose outlines differ by a pixel and who miss some "
                        "small osteophytes (1)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="W",
                   help="processes; the output does not depend on it (all CPUs)")
    p.add_argument("--preview", metavar="PNG", help="also write a montage of hips with points and masks")
    p.add_argument("--preview-only", action="store_true", help="only write --preview from the cohort at --out")


@subcommand("synth", "Write a synthetic UK Biobank hip-DXA cohort (demo and tests).", _synth_arguments)
def _synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hipoa.synth import make_cohort, render_preview

    if args.preview_only:
        if not args.preview:
            raise ValueError("synth: --preview-only needs --preview PNG")
        render_preview(cohort_dir=Path(args.out), out_png=Path(args.preview), seed=args.seed)
        print(f"{args.preview}: preview of {args.out}")
        return 0
    if args.participants is None:
        raise ValueError("synth: --participants is required (unless --preview-only)")
    truth = make_cohort(
        out=Path(args.out),
        participants=args.participants,
        seed=args.seed,
        annotated_fraction=args.annotated_fraction,
        enriched_prevalence=args.enriched_prevalence,
        prevalence=args.prevalence,
        faults=args.faults,
        workers=args.workers,
        annotate_sides=args.annotate_sides,
        unfit=args.unfit,
        second_scanner=args.second_scanner,
        annotators=args.annotators,
    )
    if args.preview:
        render_preview(cohort_dir=Path(args.out), out_png=Path(args.preview), seed=args.seed)
    from hipoa.tables import PRESENT

    present = truth[[c for c in truth.columns if c.endswith(PRESENT)]].any(axis=1)
    print(f"{args.out}: {args.participants} participants, {len(truth)} hip images, "
          f"{int(truth['annotated'].sum())} annotated, {int(present.sum())} with osteophytes, "
          f"{int((truth['fault'] != '').sum())} with planted faults (seed {args.seed})"
          + (f"; preview {args.preview}" if args.preview else ""))
    return 0


# ---- end synth -------------------------------------------------------------------------------

# ---- ingest ----------------------------------------------------------------------------------
def _ingest_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="PAT", help="image zips, e.g. ukb/{eid}_20158_{instance}_{array}.zip")
    source.add_argument("--manifest", metavar="FILE", help="CSV/Parquet: eid, instance, side, image, points_auto, ...")
    p.add_argument("--points-auto", metavar="PAT", help="automatic .pts, e.g. pts/{eid}_{instance}_{side}.pts")
    p.add_argument("--points-manual", metavar="PAT", help="manual .pts (optional)")
    p.add_argument("--masks", metavar="PAT", help="PNG label masks (optional)")
    p.add_argument("--side", required=True, choices=["L", "R"], help="hip side")
    p.add_argument("--shards", required=True, type=int, metavar="N", help="number of shards")
    p.add_argument("--n-points", type=int, default=N_POINTS, metavar="N", help=f"points per .pts file ({N_POINTS})")
    p.add_argument("--workers", type=int, default=1, metavar="W", help="processes reading zips (1)")
    p.add_argument("--limits", metavar="JSON", default=None,
                   help="plausibility ranges and resource caps (config qc): JSON object or YAML/JSON file")
    p.add_argument("--mask-labels", metavar="L,L,...", default=None,
                   help="values a mask may hold besides 0, the sites' labels (default 1,2,3)")
    p.add_argument("--withdrawn", metavar="FILE", default=None,
                   help="UK Biobank withdrawal file, one eid per line: those participants get no row "
                        "and are never named in the log (optional)")
    p.add_argument("--out", required=True, metavar="M.parquet", help="manifest Parquet to write")


@subcommand("ingest", "Build the manifest of one side from the UKB layout or a manifest CSV.", _ingest_arguments)
def _ingest(args: argparse.Namespace) -> int:
    from hipoa.ingest import (
        DEFAULT_LABELS,
        build_manifest,
        read_withdrawn,
        write_manifest,
    )
    from hipoa.labels import MASK_PROBLEMS
    from hipoa.qc import load_limits

    if args.images and not args.points_auto:
        raise ValueError("ingest: --images needs --points-auto")
    if args.manifest and (args.points_auto or args.points_manual or args.masks):
        raise ValueError("ingest: --manifest takes its paths from the file; drop --points-*/--masks")
    withdrawn = read_withdrawn(args.withdrawn) if args.withdrawn else None
    df = build_manifest(
        images=args.images,
        points_auto=args.points_auto,
        points_manual=args.points_manual,
        masks=args.masks,
        manifest=args.manifest,
        side=args.side,
        n_shards=args.shards,
        n_points=args.n_points,
        workers=args.workers,
        limits=load_limits(args.limits),
        labels=_labels(args.mask_labels) if args.mask_labels else DEFAULT_LABELS,
        withdrawn=withdrawn,
    )
    write_manifest(df, args.out)
    counts = df["qc_reason"].replace("", "ok").value_counts().sort_index()
    summary = df.attrs.get("ingest", {})
    print(f"{args.out}: {len(df)} {args.side} images, {int(df['annotated'].sum())} annotated, "
          f"{df['shard'].nunique()} of {args.shards} shards used")
    for reason, n in counts.items():
        print(f"  {reason:<28s} {n}")
    unmatched = summary.get("unmatched", [])
    if unmatched:
        print(f"  found by the glob, not parsed by the pattern (no row; see the log): {len(unmatched)}")
    for problem, n in summary.get("mask_problems", {}).items():
        print(f"  mask not used for training, {problem}: {n} ({MASK_PROBLEMS[problem]})")
    if withdrawn is not None:
        print(f"  withdrawn, removed before ingest (no row): {summary.get('withdrawn_participants', 0)} "
              f"participants, {summary.get('withdrawn_images', 0)} images; "
              f"{summary.get('withdrawn_unmatched_entries', 0)} of the list's {len(withdrawn)} entries match no "
              f"{args.side} image" + (f"; {withdrawn.numeric} entries matched by their integer value (see the "
                                      "warning)" if getattr(withdrawn, "numeric", 0) else ""))
    return 0


def _labels(text: str) -> tuple[int, ...]:
    try:
        labels = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--mask-labels: expected comma-separated integers, got {text!r}") from None
    if not labels or not all(1 <= v <= 255 for v in labels):
        raise ValueError(f"--mask-labels: expected integers in 1..255, got {text!r}")
    return labels


# ---- end ingest ------------------------------------------------------------------------------

# ---- crop-patches / show-patches -------------------------------------------------------------
def _crop_patches_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="the side's manifest Parquet (hipoa ingest)")
    p.add_argument("--shard", required=True, type=int, help="which shard of the manifest to crop")
    p.add_argument("--out", required=True, help="Zarr v3 store to write, e.g. results/patches/L/shard-0000.zarr")
    p.add_argument("--sites", default=None, help="sites: JSON string or YAML/JSON file (default: the contract's three)")
    p.add_argument("--context", type=int, default=176, help="side of the manual-point context crops (default 176)")
    p.add_argument("--min-inside", type=float, default=0.75, help="min fraction of each 128 patch inside the image (default 0.75)")
    p.add_argument("--n-points", type=int, default=N_POINTS, help=f"points per .pts file (default {N_POINTS})")
    p.add_argument("--limits", metavar="JSON", default=None,
                   help="plausibility ranges and resource caps (config qc): JSON object or YAML/JSON file")


@subcommand("crop-patches", "crop landmark-normalised patches of one manifest shard into a Zarr store", _crop_patches_args)
def _crop_patches(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hipoa.patches import crop_shard
    from hipoa.qc import load_limits
    from hipoa.sites import load_sites

    counts = crop_shard(
        manifest=Path(args.manifest),
        shard=args.shard,
        out=Path(args.out),
        sites=load_sites(args.sites),
        context=args.context,
        min_inside=args.min_inside,
        n_points=args.n_points,
        limits=load_limits(args.limits),
    )
    reasons = ", ".join(f"{k} {v}" for k, v in counts["reasons"].items()) or "none"
    print(
        f"crop-patches shard {args.shard}: {counts['rows']} rows, {counts['passed']} passed, "
        f"{counts['flagged']} flagged ({reasons}), {counts['manual']} manual; "
        f"{counts['images_per_s']:.0f} images/s, {counts['bytes'] / max(counts['rows'], 1):,.0f} bytes/image -> {args.out}"
    )
    return 0


def _show_patches_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stores", required=True, nargs="+", help="patch stores (shard-*.zarr)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--n", type=int, default=8, help="patches per site (default 8)")
    p.add_argument("--source", choices=["manual", "auto"], default="auto", help="which points made the patches")
    p.add_argument("--show-eids", action="store_true",
                   help="title patches by eid_instance_side (default: by row of the stores; names no participant)")


@subcommand("show-patches", "QC montage of patches and masks per site (like the paper's Figure 2)", _show_patches_args)
def _show_patches(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hipoa.store import save_montage

    out = save_montage(stores=[Path(s) for s in args.stores], out=Path(args.out), n=args.n, source=args.source,
                       show_eids=args.show_eids)
    print(f"show-patches: {args.source} patches of {len(args.stores)} store(s) -> {out}")
    return 0


# ---- end crop-patches ------------------------------------------------------------------------

# ---- split-data / train-unet / evaluate ------------------------------------------------------
def _split_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stores", required=True, nargs="+", help="patch stores (shard-*.zarr), all sides")
    p.add_argument("--site", required=True, help="site key, e.g. lateral_acetabulum")
    p.add_argument("--seed", required=True, type=int, help="seed of the participant shuffle and negative sampling")
    p.add_argument("--val-fraction", type=float, default=0.15, help="fraction of participants for validation (0.15)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of participants for testing (0.2)")
    p.add_argument("--out", required=True, help="split table to write, e.g. results/splits/SITE.parquet")


@subcommand("split-data", "split a site's annotated images into train/val/test by participant", _split_data_args)
def _split_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hipoa.splits import describe_counts, make_splits, write_splits

    splits = make_splits(stores=[Path(s) for s in args.stores], site=args.site, seed=args.seed,
                         val_fraction=args.val_fraction, test_fraction=args.test_fraction)
    out = write_splits(splits, args.out)
    print(f"{out}: {describe_counts(splits)}")
    return 0


def _train_unet_args(p: argparse.ArgumentParser) -> None:
    from hipoa.train_settings import add_arguments

    p.add_argument("--site", required=True, help="site key")
    p.add_argument("--stores", nargs="+", help="patch stores (shard-*.zarr); required unless --load")
    p.add_argument("--splits", help="split table (hipoa split-data); required unless --load")
    p.add_argument("--out", required=True, help="model to write, results/models/SITE/unet.keras (+ unet.json, history.csv)")
    add_arguments(p)  # one option per training setting, with its default, range and help
    p.add_argument("--load", default=None, metavar="EXISTING.keras",
                   help="use this trained model (and the .json beside it) instead of training")


@subcommand("train-unet", "train a site's U-Net (or load an existing one) and choose its presence rule", _train_unet_args)
def _train_unet(args: argparse.Namespace) -> int:
    from pathlib import Path

    _need_files(("--load", args.load), ("--splits", args.splits))  # before TensorFlow is imported
    from hipoa.modelio import install_model
    from hipoa.train import train_site
    from hipoa.train_settings import TrainSettings

    if args.load:
        card = install_model(Path(args.load), Path(args.out))
        print(f"{args.out}: loaded from {args.load}, presence {card.to_dict()['presence']}")
        return 0
    if not args.stores or not args.splits:
        raise ValueError(f"train-unet {args.site}: --stores and --splits are required unless --load is given")
    info = train_site(stores=[Path(s) for s in args.stores], splits=Path(args.splits), site=args.site,
                      out=Path(args.out), settings=TrainSettings.from_args(args))
    t, v = info["training"], info["validation"]
    print(
        f"{args.out}: best epoch {t['best_epoch']}/{t['epochs_run']} (val_loss {t['best_val_loss']:.4f}), "
        f"{t['seconds_per_epoch']:.1f} s/epoch, {t['patches_per_second']:.1f} patches/s; "
        f"presence: >= {info['presence']['min_area_px']} px at p >= {info['presence']['detect_threshold']}, "
        f"for prevalence {info['presence']['prevalence']} "
        f"({info['presence']['prevalence_source']}), val Dice (positives) {v.get('dice_mean_positive')}"
    )
    return 0


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site", required=True, help="site key")
    p.add_argument("--model", required=True, help="the site's unet.keras (its .json holds the presence rule)")
    p.add_argument("--stores", required=True, nargs="+", help="patch stores (shard-*.zarr)")
    p.add_argument("--splits", required=True, help="split table (hipoa split-data)")
    p.add_argument("--out", required=True, help="JSON to write, results/evaluation/SITE.json")
    p.add_argument("--figures-dir", default=None, help="where the confusion and overlay PNGs go (default: --out's folder)")


@subcommand("evaluate", "evaluate a site's U-Net on its test split (the paper's Table 2 measures)", _evaluate_args)
def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    _need_files(("--model", args.model), ("--splits", args.splits))  # before TensorFlow is imported
    from hipoa.evaluate import evaluate_site

    r = evaluate_site(
        site=args.site,
        model=Path(args.model),
        stores=[Path(s) for s in args.stores],
        splits=Path(args.splits),
        out=Path(args.out),
        figures_dir=Path(args.figures_dir) if args.figures_dir else None,
    )

    def fmt(x):
        return "NA" if x is None or x != x else f"{x:.3f}"

    print(
        f"{args.site}: n {r['n']} ({r['n_positive']} positive), sensitivity {fmt(r['sensitivity'])}, "
        f"specificity {fmt(r['specificity'])}, F1 {fmt(r['f1'])}, Dice {fmt(r['dice_mean'])} +- {fmt(r['dice_std'])} -> {args.out}"
    )
    return 0


# ---- end train -------------------------------------------------------------------------------

# ---- predict-masks / phenotypes --------------------------------------------------------------
def _site_models(values: list[str]) -> dict:
    """``["SITE=PATH", ...]`` -> ``{SITE: Path}`` in the order given."""
    from pathlib import Path

    models: dict = {}
    for v in values:
        site, sep, path = v.partition("=")
        if not sep or not site or not path:
            raise ValueError(f"--model expects SITE=MODEL.keras, got {v!r}")
        if site in models:
            raise ValueError(f"--model: site {site!r} given twice")
        models[site] = Path(path)
    return models


def _need_files(*named: tuple[str, object]) -> None:
    """Refuse an input file that does not exist before any work, naming the option and the path
    as the user gave it (``--phenotypes /x: no such file``), not a path a library derived from it
    (``/x.json`` beside a model, ``/x.parquet``) or a library's own wording. A path that exists
    but is no file (a directory, a FIFO) is left to the reader's own, more specific message.
    ``named``: ``(option, path or paths)``; None and empty lists (an optional input not given)
    are skipped; ``"--model SITE="`` options are written without a space."""
    import os

    for option, paths in named:
        if paths is None:
            continue
        for path in paths if isinstance(paths, (list, tuple)) else [paths]:
            if not os.path.exists(path):
                sep = "" if option.endswith("=") else " "
                raise ValueError(f"{option}{sep}{path}: no such file")


def _predict_args(p: argparse.ArgumentParser) -> None:
    from pathlib import Path

    p.add_argument("--stores", "--store", dest="stores", type=Path, action="extend", nargs="+", required=True,
                   help="shard patch stores (.zarr); the models are loaded once for all of them")
    p.add_argument("--model", action="extend", nargs="+", required=True, metavar="SITE=M.keras",
                   help="site model; its presence rule is read from the .json beside it")
    p.add_argument("--out", type=Path, action="extend", nargs="+", required=True,
                   help="per-shard predictions (.parquet), one per --stores entry, in the same order")
    p.add_argument("--masks-out", type=Path, action="extend", nargs="+",
                   help="also write the predicted patch masks (.zarr), one per --stores entry")
    p.add_argument("--batch-size", type=int, default=64, help="patches per model call (sets memory)")
    p.add_argument("--precision", default="auto", help="auto, float32, mixed_bfloat16 or mixed_float16")


@subcommand("predict-masks", "predict osteophyte presence and area per site for one or more shards", _predict_args)
def _predict_masks(args: argparse.Namespace) -> int:
    models = _site_models(args.model)
    _need_files(*((f"--model {site}=", path) for site, path in models.items()))  # before TensorFlow
    from hipoa.predict import predict_shards

    predict_shards(
        stores=args.stores,
        models=models,
        outs=args.out,
        masks_outs=args.masks_out,
        batch_size=args.batch_size,
        precision=args.precision,
    )
    return 0


def _phenotypes_args(p: argparse.ArgumentParser) -> None:
    from pathlib import Path

    p.add_argument("--manifest", type=Path, required=True, help="results/manifest/{side}.parquet")
    p.add_argument("--predictions", type=Path, action="extend", nargs="+", required=True,
                   help="per-shard predictions (.parquet), every shard of the side")
    p.add_argument("--model", action="extend", nargs="+", required=True, metavar="SITE=M.keras",
                   help="site models (for their SHA-256 and presence rules), in column order")
    p.add_argument("--splits", type=Path, action="extend", nargs="+", default=[],
                   help="split tables, for used_in_training")
    p.add_argument("--side", required=True, choices=["L", "R"])
    p.add_argument("--out", type=Path, required=True, help="results/phenotypes/osteophytes_{side}.parquet")
    p.add_argument("--config-hash", default="", help="recorded in the Parquet metadata")
    p.add_argument("--masks-dir", type=Path, help="write predicted label PNGs in image space here")
    p.add_argument("--mask-stores", "--stores", dest="mask_stores", type=Path, action="extend", nargs="+",
                   default=[], help="predicted-mask stores from predict-masks --masks-out")
    p.add_argument("--instance", default="first_passing", metavar="POLICY",
                   help="instance of each participant in the GWAS files: first_passing (lowest passing "
                        "QC, else lowest), first, or an instance number (first_passing)")


@subcommand("phenotypes", "gather the shards' predictions into the phenotype tables of one side", _phenotypes_args)
def _phenotypes(args: argparse.Namespace) -> int:
    from hipoa.phenotypes import gather, summary

    if (args.masks_dir is None) != (not args.mask_stores):
        raise ValueError("--masks-dir and --mask-stores go together")
    models = _site_models(args.model)
    df = gather(
        manifest=args.manifest,
        predictions=args.predictions,
        models=models,
        side=args.side,
        out=args.out,
        splits=args.splits,
        config_hash=args.config_hash,
        masks_dir=args.masks_dir,
        mask_stores=args.mask_stores,
        instance_policy=args.instance,
    )
    print(f"{args.out}\n{summary(df, list(models))}")
    return 0
# ---- end predict -----------------------------------------------------------------------------


# ---- release ---------------------------------------------------------------------------------
def _release_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phenotypes", type=Path, action="extend", nargs="+", required=True, metavar="P.parquet",
                   help="each side's phenotype table (results/phenotypes/osteophytes_{side}.parquet)")
    p.add_argument("--manifests", type=Path, action="extend", nargs="+", required=True, metavar="M.parquet",
                   help="each side's manifest (results/manifest/{side}.parquet): image size, spacing, scanner")
    p.add_argument("--out", type=Path, required=True, help="results/phenotypes/osteophytes.parquet")
    p.add_argument("--instance", default="first_passing", metavar="POLICY",
                   help="instance of each participant in the GWAS files: first_passing, first, or a number")


def _side_of(path: Path, what: str) -> str:
    """The side a per-side table holds: its ``side`` metadata (a phenotype table, also when it is
    empty), else the one value of its ``side`` column."""
    import pandas as pd
    import pyarrow.parquet as pq

    side = (pq.read_schema(path).metadata or {}).get(b"side")
    if side:
        return side.decode()
    sides = sorted(set(pd.read_parquet(path, columns=["side"])["side"].astype(str)))
    if len(sides) != 1:
        raise ValueError(f"{path}: a {what} of one side expected, found sides {sides}")
    return sides[0]


@subcommand("release", "the participant table of all sides and its plink2 / regenie files", _release_args)
def _release(args: argparse.Namespace) -> int:
    from hipoa.release import parse_instance_policy, release_both_sides

    policy = parse_instance_policy(args.instance)
    _need_files(("--phenotypes", args.phenotypes), ("--manifests", args.manifests))
    tables = {_side_of(p, "phenotype table"): p for p in args.phenotypes}
    manifests = {_side_of(p, "manifest"): p for p in args.manifests}
    if len(tables) != len(args.phenotypes) or len(manifests) != len(args.manifests):
        raise ValueError("--phenotypes and --manifests: one file per side")
    table = release_both_sides(phenotypes=tables, manifests=manifests, out=args.out, policy=policy)
    print(f"{args.out}: {len(table)} participant visits, {table['eid'].nunique()} participants, "
          f"sides {', '.join(sorted(tables))}")
    return 0

# ---- report ----------------------------------------------------------------------------------
from pathlib import Path  # noqa: E402


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phenotypes", nargs="+", required=True, type=Path, metavar="P.parquet",
                   help="phenotype tables, one per side")
    p.add_argument("--scores", nargs="*", default=[], type=Path, metavar="S.json",
                   help="evaluation JSONs of the trained sites (none when every model is loaded)")
    p.add_argument("--evaluation", required=True, type=Path, metavar="HTML",
                   help="table of test-split scores beside the paper's Table 2")
    p.add_argument("--qc", required=True, type=Path, metavar="HTML", help="images by QC outcome; prevalence")
    p.add_argument("--areas", required=True, type=Path, metavar="PNG", help="predicted-area histograms")
    p.add_argument("--prevalence", required=True, type=Path, metavar="PNG", help="prevalence per site and side")
    p.add_argument("--manifests", nargs="*", default=[], type=Path, metavar="M.parquet",
                   help="the sides' manifests (where the flagged images are), for --unfit")
    p.add_argument("--unfit", type=Path, metavar="PNG",
                   help="montage of images flagged implant, head_out_of_view or motion")
    p.add_argument("--show-eids", action="store_true",
                   help="title the montage's images by eid (default: by row of the side's phenotype table)")


@subcommand("report-figures", "tables and figures for the workflow report", _report_arguments)
def _report_figures(args: argparse.Namespace) -> int:
    _need_files(("--phenotypes", args.phenotypes), ("--scores", args.scores), ("--manifests", args.manifests))
    from hipoa.report import write_report_figures

    write_report_figures(
        phenotypes=args.phenotypes,
        scores=args.scores,
        evaluation=args.evaluation,
        qc=args.qc,
        areas=args.areas,
        prevalence_png=args.prevalence,
        manifests=args.manifests,
        unfit=args.unfit,
        show_eids=args.show_eids,
    )
    return 0


# ---- end report ------------------------------------------------------------------------------


# ---- install-profile -------------------------------------------------------------------------
def _install_profile_arguments(p: argparse.ArgumentParser) -> None:
    from hipoa.profiles import PROFILES

    p.add_argument("name", choices=PROFILES, help="hipoa's profile to install (slurm or local)")
    p.add_argument("--workflow", type=Path, metavar="DIR",
                   help="the hipoa checkout whose profiles/NAME is copied (the working directory "
                        "when it is one, else the checkout hipoa runs from)")
    p.add_argument("--as", dest="install_as", metavar="NAME",
                   help="install under this name, e.g. when a profile NAME exists already (NAME)")
    p.add_argument("--dir", type=Path, metavar="DIR",
                   help="profile folder to install into (Snakemake's user folder, "
                        "$XDG_CONFIG_HOME/snakemake or ~/.config/snakemake)")


@subcommand("install-profile",
            "copy a hipoa profile where `snakemake --profile NAME` finds it; never overwrites",
            _install_profile_arguments)
def _install_profile(args: argparse.Namespace) -> int:
    from hipoa.profiles import install_profile

    target = install_profile(args.name, workflow_dir=args.workflow, root=args.dir,
                             install_as=args.install_as)
    print(f"installed {target}; run from the checkout: snakemake --profile {target.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hipoa", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hipoa {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, handler in _SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, KeyError, OSError) as exc:  # OSError: FileNotFoundError, IsADirectoryError, ...
        # One line, no traceback: the message names the file and the problem.
        log.error("%s", error_line(exc))
        return 2


def error_line(exc: BaseException) -> str:
    """One line naming the file and the problem: an ``OSError`` as ``path: strerror`` (some
    libraries raise ``FileNotFoundError(path)`` with the path alone, or a path of their own)."""
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    elif isinstance(exc, FileNotFoundError) and not exc.strerror:
        text = f"{exc}: no such file or directory"
    else:
        text = str(exc)
    return " ".join(text.split()) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
