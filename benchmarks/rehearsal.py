"""Helpers of the scale rehearsal (benchmarks/rehearsal.sh; docs/scale.md).

    python benchmarks/rehearsal.py withdraw --truth T --out LIST [--every 200]
    python benchmarks/rehearsal.py config --dir DIR --shards S [--write-masks true] --out YAML
    python benchmarks/rehearsal.py measure --dir DIR

``measure`` reads the run in DIR/run: Snakemake's benchmark file of every job
(results/benchmarks/), the outputs' sizes and times, the phases timed by rehearsal.sh
(DIR/timings.tsv); it checks the tables against the synthetic truth (DIR/cohort/truth.parquet)
and writes DIR/rehearsal.json, DIR/rehearsal.md (the table of docs/scale.md) and
DIR/rehearsal.png (time and peak RSS per stage). Exit status 1 when a count is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml

from hipoa import qc
from hipoa.ingest import read_withdrawn
from hipoa.patches import POINTS_WINDOW
from hipoa.sites import DEFAULT_SITES

SITES = tuple(site.name for site in DEFAULT_SITES)
# Stages in workflow order; each with the output folders (or file globs) it writes.
STAGES = {
    "ingest": ["results/manifest"],
    "crop_patches": ["results/patches"],
    "show_patches": ["results/qc"],
    "train_unet": ["results/models"],
    "predict_masks": ["results/predictions"],
    "phenotypes": ["results/phenotypes/osteophytes_?.*", "results/masks"],
    "release": ["results/phenotypes/osteophytes.*"],
    "report_figures": ["results/report"],
}


def withdraw(truth: Path, out: Path, every: int) -> None:
    """Every ``every``-th participant (in eid order) withdraws, in UKB's format (one eid a line)."""
    eids = sorted(pd.read_parquet(truth, columns=["eid"])["eid"].astype("int64").unique())
    chosen = eids[every // 2 :: every]
    out.write_text("".join(f"{eid}\n" for eid in chosen))
    print(f"rehearsal: {len(chosen)} of {len(eids)} participants withdrawn -> {out}", file=sys.stderr)


def run_config(root: Path, shards: int, write_masks: bool) -> dict:
    """The rehearsal's config, layered on config/config.yaml: the cohort's files, both sides,
    the rehearsal's models loaded (nothing is trained or evaluated)."""
    cohort = root / "cohort"
    return {
        "cohort": {"synthesize": False, "dir": str(cohort)},
        "inputs": {
            "images": f"{cohort}/ukb/20158/{{eid}}_20158_{{instance}}_{{array}}.zip",
            "points_auto": f"{cohort}/points/auto/{{eid}}_{{instance}}_{{side}}.pts",
            "points_manual": "",
            "masks": "",
            "manifest": "",
            "withdrawn": str(root / "withdrawn.txt"),
        },
        "sides": ["L", "R"],
        "patches": {"shards": shards},
        "models": {site: {"load": str(root / "models" / site / "unet.keras")} for site in SITES},
        "predictions": {"write_masks": write_masks},
    }


def _paths(run: Path, pattern: str) -> list[Path]:
    """The outputs of ``run`` that ``pattern`` (a path, or a glob) names."""
    return sorted(run.glob(pattern)) if any(c in pattern for c in "*?[") else [run / pattern]


def _size(paths: list[Path]) -> tuple[int, int]:
    """Bytes and files under ``paths`` (files or folders)."""
    nbytes = files = 0
    for path in paths:
        for f in [path] if path.is_file() else (path.rglob("*") if path.is_dir() else []):
            if f.is_file():
                nbytes += f.stat().st_size
                files += 1
    return nbytes, files


def stage_table(run: Path) -> pd.DataFrame:
    """One row per stage: jobs, wall and CPU time, peak RSS (max and median over its jobs),
    bytes written and files created."""
    rows = []
    bench = run / "results" / "benchmarks"
    # results/benchmarks/{rule}.tsv or results/benchmarks/{rule}/.../*.tsv
    measured = {p.relative_to(bench).parts[0].removesuffix(".tsv") for p in bench.rglob("*.tsv")}
    for stage in [*STAGES, *sorted(measured - set(STAGES))]:
        files = [bench / f"{stage}.tsv"] if (bench / f"{stage}.tsv").exists() else sorted((bench / stage).rglob("*.tsv"))
        if not files:
            continue
        jobs = pd.concat([pd.read_csv(f, sep="\t") for f in files], ignore_index=True)
        nbytes, nfiles = _size([p for pattern in STAGES.get(stage, []) for p in _paths(run, pattern)])
        rows.append({
            "stage": stage,
            "jobs": len(jobs),
            "wall_s_total": float(jobs["s"].sum()),
            "wall_s_max": float(jobs["s"].max()),
            "wall_s_median": float(jobs["s"].median()),
            "cpu_s_total": float(jobs["cpu_time"].sum()),
            "rss_mb_max": float(jobs["max_rss"].max()),
            "rss_mb_median": float(jobs["max_rss"].median()),
            "written_mb": nbytes / 1e6,
            "files": nfiles,
        })
    return pd.DataFrame(rows)


def _gross_near_site(run: object) -> bool:
    """Whether a truth ``auto_gross_error`` run ("first-last") reaches a site's local outline."""
    if not isinstance(run, str) or not run:
        return False
    first, last = (int(v) for v in run.split("-"))
    return any(first <= s.centre + POINTS_WINDOW and last >= s.centre - POINTS_WINDOW for s in DEFAULT_SITES)


def check_counts(root: Path) -> tuple[dict, list[str]]:
    """Every synthesised image of a participant who did not withdraw is in its side's table
    exactly once, each planted fault with its reason and NA phenotypes; no withdrawn eid in any
    table; the participant table has one row per (eid, instance). Returns (counts, errors)."""
    run = root / "run"
    truth = pd.read_parquet(root / "cohort" / "truth.parquet")
    truth["eid"] = truth["eid"].astype("int64")
    withdrawn = {int(eid) for eid in read_withdrawn(root / "withdrawn.txt")}  # as ingest reads it
    kept = truth[~truth["eid"].isin(withdrawn)]
    errors: list[str] = []
    counts: dict = {"withdrawn_participants": len(withdrawn), "sides": {}}
    phen = run / "results" / "phenotypes"
    for side in ("L", "R"):
        path = phen / f"osteophytes_{side}.parquet"
        table = pd.read_parquet(path)
        expected = kept[kept["side"] == side]
        key = ["eid", "instance"]
        dup = int(table.duplicated(key).sum())
        merged = expected[[*key, "expected_reason"]].merge(
            table[[*key, "qc_reason", *[f"{s}_present" for s in SITES]]].astype({"eid": "int64"}),
            on=key, how="outer", indicator=True)
        missing = int((merged["_merge"] == "left_only").sum())
        extra = int((merged["_merge"] == "right_only").sum())
        both = merged[merged["_merge"] == "both"]
        planted = both[both["expected_reason"] != ""]
        wrong_reason = int((planted["qc_reason"] != planted["expected_reason"]).sum())
        measured_fault = int(planted[[f"{s}_present" for s in SITES]].notna().any(axis=1).sum())
        unplanted = both[(both["expected_reason"] == "") & (both["qc_reason"] != "")]
        # points_implausible is right where the synthetic automatic points have a gross error
        # (a run displaced by 3-7 mm) reaching a site's local outline, and a false flag elsewhere
        gross = expected.get("auto_gross_error", pd.Series("", index=expected.index))  # older cohorts: none
        near = unplanted.merge(expected[key].assign(auto_gross_error=gross), on=key, how="left")
        justified = (near["qc_reason"] == qc.POINTS_IMPLAUSIBLE).to_numpy() & near["auto_gross_error"].map(
            _gross_near_site).to_numpy(bool)
        unplanted = unplanted[~justified]
        meta = pq.read_schema(path).metadata or {}
        side_counts = {
            "images_expected": len(expected),
            "rows": len(table),
            "duplicates": dup,
            "missing": missing,
            "extra": extra,
            "qc_failures_by_reason": {k: int(v) for k, v in table.loc[table["qc_reason"] != "", "qc_reason"].value_counts().sort_index().items()},
            "planted_by_reason": {k: int(v) for k, v in planted["expected_reason"].value_counts().sort_index().items()},
            "planted_with_wrong_reason": wrong_reason,
            "planted_but_measured": measured_fault,
            "unplanted_failures_by_reason": {k: int(v) for k, v in unplanted["qc_reason"].value_counts().sort_index().items()},
            "implausible_points_at_gross_errors": int(justified.sum()),
            "withdrawn_in_table": int(table["eid"].astype("int64").isin(withdrawn).sum()),
            "withdrawn_in_metadata": int(meta.get(b"withdrawn_participants", b"-1")),
        }
        counts["sides"][side] = side_counts
        for name in ("duplicates", "missing", "extra", "planted_with_wrong_reason", "planted_but_measured", "withdrawn_in_table"):
            if side_counts[name]:
                errors.append(f"side {side}: {name} = {side_counts[name]}")
        if side_counts["unplanted_failures_by_reason"]:
            errors.append(f"side {side}: images without a fault failed QC: {side_counts['unplanted_failures_by_reason']}")
        failures = dict(side_counts["qc_failures_by_reason"])
        if justified.sum():
            failures[qc.POINTS_IMPLAUSIBLE] -= int(justified.sum())
            failures = {k: v for k, v in failures.items() if v}
        if failures != side_counts["planted_by_reason"]:
            errors.append(f"side {side}: QC failures {side_counts['qc_failures_by_reason']} are not the planted faults "
                          f"{side_counts['planted_by_reason']}")
        if side_counts["withdrawn_in_metadata"] != len(withdrawn & set(truth.loc[truth["side"] == side, "eid"])):
            errors.append(f"side {side}: metadata says {side_counts['withdrawn_in_metadata']} withdrawn participants")
    participants = pd.read_parquet(phen / "osteophytes.parquet")
    expected_visits = kept[["eid", "instance"]].drop_duplicates()
    counts["participant_table_rows"] = len(participants)
    counts["participant_table_expected"] = len(expected_visits)
    visits = participants[["eid", "instance"]].astype({"eid": "int64", "instance": "int64"})
    if len(visits) != len(expected_visits) or visits.duplicated().any() or set(visits.itertuples(index=False, name=None)) != set(
            expected_visits.astype({"instance": "int64"}).itertuples(index=False, name=None)):
        errors.append(f"participant table: {len(participants)} rows, not one for each of the {len(expected_visits)} visits")
    if visits["eid"].isin(withdrawn).any():
        errors.append("participant table: holds a withdrawn participant")
    for f in sorted(phen.glob("*.tsv")) + sorted(phen.glob("*.txt")):
        if f.name.endswith(".dict.tsv") or f.name.endswith(".summary.txt"):
            continue
        if f.stat().st_size == 0:  # remove.txt of loaded models: nobody was trained on
            continue
        ids = pd.read_csv(f, sep=r"\s+", header=None if f.suffix == ".txt" else 0, dtype=str)
        iid = ids.iloc[:, 1] if f.suffix == ".txt" else ids["IID"]
        if iid.astype("int64").isin(withdrawn).any():
            errors.append(f"{f.name}: holds a withdrawn participant")
    return counts, errors


def measure(root: Path) -> int:
    """Measure the run in ``root``/run, check its counts, write rehearsal.json, .md and .png;
    1 when a count is wrong, else 0."""
    run = root / "run"
    stages = stage_table(run)
    timings = {}
    if (root / "timings.tsv").exists():
        for line in (root / "timings.tsv").read_text().splitlines():
            name, seconds = line.split("\t")
            # A resumed phase's time is the sum of its runs, failed ones included; the DAG build
            # time is the first dry run's (the whole run's plan; a rerun's plans what is left).
            if name == "dag":
                timings.setdefault(name, float(seconds))
            else:
                timings[name] = float(seconds) + timings.get(name, 0.0)
    predictions = sorted((run / "results" / "predictions").rglob("shard-*.parquet"))
    table = run / "results" / "phenotypes" / "osteophytes.parquet"
    last_shard_to_table = table.stat().st_mtime - max(p.stat().st_mtime for p in predictions)
    logs_bytes, logs_files = _size([run / "logs"])
    longest_log = max((sum(1 for _ in f.open(errors="replace")), str(f.relative_to(run)))
                      for f in (run / "logs").rglob("*.log"))
    total_bytes, total_files = _size([run / "results"])
    counts, errors = check_counts(root)
    images = sum(side["images_expected"] for side in counts["sides"].values())
    result = {
        "images": images,
        "shards_per_side": int(yaml.safe_load((run / "rehearsal.yaml").read_text())["patches"]["shards"]),
        "phases_s": timings,
        "last_shard_to_participant_table_s": round(last_shard_to_table, 1),
        "results_mb": total_bytes / 1e6,
        "results_files": total_files,
        "logs_mb": logs_bytes / 1e6,
        "logs_files": logs_files,
        "longest_log_lines": longest_log[0],
        "longest_log": longest_log[1],
        "stages": stages.to_dict(orient="records"),
        "counts": counts,
        "errors": errors,
    }
    (root / "rehearsal.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result, stages)
    (root / "rehearsal.md").write_text(md)
    plot(stages, root / "rehearsal.png", images)
    print(md)
    for error in errors:
        print(f"rehearsal: COUNT WRONG: {error}", file=sys.stderr)
    return 1 if errors else 0


def markdown(result: dict, stages: pd.DataFrame) -> str:
    """The stage table and the counts, as in docs/scale.md."""
    lines = [
        f"{result['images']:,} images ({result['shards_per_side']} shards per side); "
        f"phases (s): " + ", ".join(f"{k} {v:,.0f}" for k, v in result["phases_s"].items()),
        "",
        "| stage | jobs | wall total (s) | wall max / median per job (s) | CPU (s) | peak RSS max / median (MB) | written (MB) | files |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in stages.itertuples():
        lines.append(
            f"| {r.stage} | {r.jobs} | {r.wall_s_total:,.0f} | {r.wall_s_max:,.1f} / {r.wall_s_median:,.1f} | "
            f"{r.cpu_s_total:,.0f} | {r.rss_mb_max:,.0f} / {r.rss_mb_median:,.0f} | {r.written_mb:,.1f} | {r.files:,} |")
    lines += [
        "",
        f"- last shard's predictions to the participant table: {result['last_shard_to_participant_table_s']:,.0f} s",
        f"- results/: {result['results_mb']:,.0f} MB in {result['results_files']:,} files; logs/: "
        f"{result['logs_mb']:,.2f} MB in {result['logs_files']:,} files (longest: {result['longest_log_lines']:,} lines, "
        f"{result['longest_log']})",
    ]
    for side, c in result["counts"]["sides"].items():
        lines.append(
            f"- side {side}: {c['rows']:,} rows for {c['images_expected']:,} images (duplicates {c['duplicates']}, "
            f"missing {c['missing']}, extra {c['extra']}); QC failures {c['qc_failures_by_reason']}; planted "
            f"{c['planted_by_reason']}, wrong reason {c['planted_with_wrong_reason']}, measured "
            f"{c['planted_but_measured']}; not planted {c['unplanted_failures_by_reason']}; withdrawn in table "
            f"{c['withdrawn_in_table']}, in metadata {c['withdrawn_in_metadata']}")
    counts = result["counts"]
    lines.append(f"- participant table: {counts['participant_table_rows']:,} rows for "
                 f"{counts['participant_table_expected']:,} visits; {counts['withdrawn_participants']} participants withdrawn")
    lines.append(f"- counts: {'all as the truth' if not result['errors'] else '; '.join(result['errors'])}")
    return "\n".join(lines) + "\n"


def plot(stages: pd.DataFrame, out: Path, images: int) -> None:
    """Time (wall and CPU, all jobs) and peak RSS (max and median over jobs) per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    y = np.arange(len(stages))[::-1]
    ax_t.barh(y, stages["wall_s_total"] / 60, color="tab:blue", label="wall, all jobs")
    ax_t.barh(y, stages["cpu_s_total"] / 60, height=0.35, color="tab:orange", label="CPU, all jobs")
    ax_t.set(yticks=y, yticklabels=stages["stage"], xlabel="minutes", title=f"time per stage ({images:,} images)")
    ax_t.legend(loc="lower right")
    ax_m.barh(y, stages["rss_mb_max"] / 1000, color="tab:red", label="max over jobs")
    ax_m.scatter(stages["rss_mb_median"] / 1000, y, color="k", zorder=3, label="median over jobs")
    ax_m.axvline(4, color="grey", linestyle="--", label="4 GB")
    ax_m.set(yticks=y, yticklabels=[], xlabel="GB", title="peak RSS per job")
    ax_m.legend(loc="lower right")
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("withdraw")
    w.add_argument("--truth", type=Path, required=True)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--every", type=int, default=200)
    c = sub.add_parser("config")
    c.add_argument("--dir", type=Path, required=True)
    c.add_argument("--shards", type=int, required=True)
    c.add_argument("--write-masks", choices=["true", "false"], default="false")
    c.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("measure")
    m.add_argument("--dir", type=Path, required=True)
    args = p.parse_args()
    if args.command == "withdraw":
        withdraw(args.truth, args.out, args.every)
    elif args.command == "config":
        text = yaml.safe_dump(run_config(args.dir.resolve(), args.shards, args.write_masks == "true"), sort_keys=False)
        if not args.out.exists() or args.out.read_text() != text:  # unchanged: no rerun
            args.out.write_text(text)
    else:
        return measure(args.dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
