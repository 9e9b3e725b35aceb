"""Figures and tables for the workflow's HTML report (`snakemake --report`).

Reads only the workflow's outputs (phenotype Parquets, evaluation JSONs) and writes small
self-contained files that the Snakemake report embeds: HTML tables (shown inline) and PNGs.
The paper's Table 2 (Ebsim et al., section 4.3) is kept here so each site's test-split scores
can be read beside the published ones.
"""

from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from hipoa.atomic import atomic_path, save_figure  # noqa: E402
from hipoa.paper import PAPER_TABLE2  # noqa: E402
from hipoa.tables import PRESENT  # noqa: E402

log = logging.getLogger(__name__)


_SCORES = ("sensitivity", "specificity", "f1", "dice_mean", "dice_std")
_CSS = (
    "body{font-family:sans-serif;font-size:14px}table{border-collapse:collapse}"
    "th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}"
    "th{background:#eee}td.l,th.l{text-align:left}tr.paper td{color:#666;font-style:italic}"
)


def _number(value: object) -> float:
    """A score as float; None, "" and missing become NaN."""
    if value is None or value == "":
        return math.nan
    return float(value)


def read_scores(paths: list[Path]) -> pd.DataFrame:
    """One row per evaluation JSON written by ``hipoa evaluate``.

    Args:
        paths: ``results/evaluation/{site}.json`` files; the site is the JSON's ``site`` key,
            else the file stem.

    Returns:
        Columns ``site`` (str), ``n``, ``n_positive`` (int), ``sensitivity``, ``specificity``,
        ``f1``, ``dice_mean``, ``dice_std`` (float64, NaN where undefined), in path order.
    """
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        row = {"site": str(data.get("site") or Path(path).stem), "n": int(data.get("n", 0)),
               "n_positive": int(data.get("n_positive", 0))}
        row.update({key: _number(data.get(key)) for key in _SCORES})
        rows.append(row)
    return pd.DataFrame(rows, columns=["site", "n", "n_positive", *_SCORES])


def evaluation_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Our test-split rows, each followed by the paper's Table 2 row(s) of the same site.

    Returns:
        Columns ``site``, ``model`` ("hipoa" or the paper's U-Net), ``n``, ``n_positive`` (NaN
        for the paper's rows) and the scores.
    """
    rows = []
    for record in scores.to_dict("records"):
        rows.append({"model": "hipoa (this run)", **record})
        rows.extend(
            {"n": math.nan, "n_positive": math.nan, **paper, "site": record["site"],
             "model": f"paper {paper['model']}"}
            for paper in PAPER_TABLE2.get(record["site"], [])
        )
    return pd.DataFrame(rows, columns=["site", "model", "n", "n_positive", *_SCORES])


def read_phenotypes(paths: list[Path]) -> pd.DataFrame:
    """The phenotype tables of all sides, concatenated (``side`` tells them apart)."""
    frames = [pd.read_parquet(path) for path in paths]
    if not frames:
        raise ValueError("report: no phenotype tables given (--phenotypes)")
    return pd.concat(frames, ignore_index=True)


def phenotype_sites(table: pd.DataFrame) -> list[str]:
    """Site keys from the ``{site}_present`` columns, in column order (``any`` excluded)."""
    return [c[: -len(PRESENT)] for c in table.columns if c.endswith(PRESENT) and c != "any_present"]


def qc_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Images per side and QC outcome.

    Returns:
        Index ``qc_reason`` ("pass" for images that passed, else the reason), one int column per
        side plus ``total``, rows sorted by total (largest first), ``pass`` first.
    """
    reason = table["qc_reason"].fillna("").astype(str).where(~table["qc_pass"].astype(bool), "")
    reason = reason.where(reason != "", "pass")
    counts = pd.crosstab(reason.rename("qc_reason"), table["side"].rename("side"))
    counts["total"] = counts.sum(axis=1)
    order = sorted(counts.index, key=lambda r: (r != "pass", -counts.loc[r, "total"], r))
    return counts.loc[order]


def withdrawn_note(phenotypes: list[Path]) -> str:
    """One paragraph: participants removed at ingest as withdrawn, per side (Parquet metadata)."""
    import pyarrow.parquet as pq

    counts = []
    for path in phenotypes:
        meta = pq.read_schema(path).metadata or {}
        side = meta.get(b"side", b"?").decode()
        counts.append(f"{side}: {meta.get(b'withdrawn_participants', b'0').decode()}")
    return ("<p>Participants who withdrew consent, removed at ingest before any image was read "
            f"(not counted above): {', '.join(counts)}.</p>")


def provenance_note(phenotypes: list[Path]) -> str:
    """What made the tables reported on: each table's ``provenance`` metadata (git commit and the
    versions of Python, hipoa, TensorFlow, Keras, Snakemake, the SLURM plugin), one line per
    distinct record, so a report says which release it shows."""
    import html
    import json

    import pyarrow.parquet as pq

    seen: dict[str, list[str]] = {}
    for path in phenotypes:
        meta = pq.read_schema(path).metadata or {}
        raw = meta.get(b"provenance", b"").decode()
        seen.setdefault(raw, []).append(Path(path).name)
    lines = []
    for raw, names in seen.items():
        try:
            record = json.loads(raw) if raw else {}
        except ValueError:
            record = {}
        text = ", ".join(f"{k} {v}" for k, v in sorted(record.items())) or "none recorded"
        lines.append(f"<li>{html.escape(', '.join(names))}: {html.escape(text)}</li>")
    return f"<h3>Provenance</h3><ul>{''.join(lines)}</ul>"


def prevalence(table: pd.DataFrame, sites: list[str]) -> pd.DataFrame:
    """Measured images, positives and prevalence per side and site (NA phenotypes excluded)."""
    rows = []
    for side, part in table.groupby("side", sort=True):
        for site in [*sites, "any"]:
            present = part[f"{site}_present"].dropna().astype(int)
            rows.append({"side": side, "site": site, "measured": len(present),
                         "present": int(present.sum()),
                         "prevalence": present.mean() if len(present) else math.nan})
    return pd.DataFrame(rows, columns=["side", "site", "measured", "present", "prevalence"])


def _html_page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h3>{html.escape(title)}</h3>{body}</body></html>\n")


def _html_table(frame: pd.DataFrame, left: set[str], row_class: list[str] | None = None) -> str:
    def cell(column: str, value: object) -> str:
        if isinstance(value, float):
            text = "" if math.isnan(value) else (f"{value:.0f}" if column in {"n", "n_positive"} else f"{value:.2f}")
        else:
            text = str(value)
        cls = " class='l'" if column in left else ""
        return f"<td{cls}>{html.escape(text)}</td>"

    head = "".join(f"<th{' class=l' if c in left else ''}>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for i, record in enumerate(frame.to_dict("records")):
        cls = f" class='{row_class[i]}'" if row_class and row_class[i] else ""
        rows.append(f"<tr{cls}>" + "".join(cell(c, record[c]) for c in frame.columns) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def plot_areas(table: pd.DataFrame, sites: list[str], out: Path) -> None:
    """Histograms of predicted area (mm^2, log scale) where present, one panel per site, per side."""
    save_figure(areas_figure(table, sites), out, dpi=100)


def areas_figure(table: pd.DataFrame, sites: list[str]):
    """The figure of :func:`plot_areas`. The log-scale area axis is labelled at every integer
    within one decade, at 1, 2 and 5 over up to 2.5 decades and at the decades beyond, so that
    its labels never run together (as every minor tick's label did)."""
    fig, axes = plt.subplots(1, len(sites), figsize=(4 * len(sites), 3.2), squeeze=False)
    for ax, site in zip(axes[0], sites):
        present = table[f"{site}_present"].fillna(0).astype(int) == 1
        for side, part in table[present].groupby("side", sort=True):
            areas = part[f"{site}_area_mm2"].dropna().to_numpy(dtype=float)
            areas = areas[areas > 0]
            if len(areas):
                bins = np.geomspace(max(areas.min() * 0.9, 0.1), areas.max() * 1.1, 20)
                ax.hist(areas, bins=bins, alpha=0.6, label=f"{side} (n={len(areas)})")
        ax.set_xscale("log")
        lo, hi = ax.get_xlim()
        decades = np.log10(hi / lo) if lo > 0 and hi > lo else 1.0
        subs = tuple(range(1, 10)) if decades < 1 else (1.0, 2.0, 5.0) if decades < 2.5 else (1.0,)
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs, numticks=12))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs="auto"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(site.replace("_", " "))
        ax.set_xlabel("predicted area (mm$^2$)")
        ax.set_ylabel("images")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, complete or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def plot_prevalence(prev: pd.DataFrame, out: Path) -> None:
    """Bars of prevalence per site, side by side for each hip, labelled with present/measured."""
    sites = list(dict.fromkeys(prev["site"]))
    sides = sorted(prev["side"].unique())
    width = 0.8 / max(len(sides), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(sites) + 2, 3.4))
    for k, side in enumerate(sides):
        part = prev[prev["side"] == side].set_index("site").reindex(sites)
        x = np.arange(len(sites)) + k * width
        values = part["prevalence"].fillna(0).to_numpy() * 100
        ax.bar(x, values, width=width, label=side)
        for xi, v, p, m in zip(x, values, part["present"], part["measured"]):
            ax.text(xi, v, f"{int(p)}/{int(m)}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(sites)) + width * (len(sides) - 1) / 2)
    ax.set_xticklabels([s.replace("_", "\n") for s in sites], fontsize=8)
    ax.set_ylabel("prevalence (% of measured images)")
    ax.legend(title="side")
    fig.tight_layout()
    save_figure(fig, out, dpi=100)


UNFIT_PER_REASON = 4
"""Images per unfit reason in the report's montage."""


def unfit_rows(pheno: pd.DataFrame, manifests: list[Path], per_reason: int) -> list[tuple[str, pd.Series]]:
    """Up to ``per_reason`` flagged images per unfit reason (lowest eids first), with their
    manifest rows (image, member, points_auto)."""
    from hipoa import qc as qc_vocabulary

    frames = [pd.read_parquet(m) for m in manifests]
    if not frames:
        return []
    man = pd.concat(frames, ignore_index=True)
    man["_key"] = man["eid"].astype(str) + "_" + man["instance"].astype(str) + "_" + man["side"].astype(str)
    man = man.drop_duplicates("_key").set_index("_key")
    picked = []
    pheno = pheno.assign(_row=pheno.groupby("side").cumcount())  # the row in that side's table
    for reason in qc_vocabulary.UNFIT:
        rows = pheno[pheno["qc_reason"] == reason].copy()
        rows["_key"] = rows["eid"].astype(str) + "_" + rows["instance"].astype(str) + "_" + rows["side"].astype(str)
        rows = rows[rows["_key"].isin(man.index)].sort_values(["eid", "instance", "side"]).head(per_reason)
        for key, row in zip(rows["_key"], rows["_row"]):
            entry = man.loc[key].copy()
            entry["_row"] = row
            picked.append((reason, entry))
    return picked


def _table(row: pd.Series) -> str:
    return f"osteophytes_{row['side']}.parquet"


def image_label(row: pd.Series, show_eids: bool, table: str) -> str:
    """How a montage titles an image: ``eid_instance_side`` when the user asks for eids
    (config ``report.show_eids``), else its row in ``table``, which leads back to the eid in the
    user's own results: a report shared with collaborators names no participant."""
    if show_eids:
        return f"{row['eid']}_{row['instance']}_{row['side']}"
    return f"{table} row {int(row['_row'])}"


def plot_unfit(pheno: pd.DataFrame, manifests: list[Path], out: Path, per_reason: int = UNFIT_PER_REASON,
               show_eids: bool = False) -> int:
    """A montage of images flagged unfit to measure (``implant``, ``head_out_of_view``,
    ``motion``), up to ``per_reason`` of each, read from their DICOMs with the automatic points
    overlaid, for visual confirmation, titled by :func:`image_label`. Returns the number of
    images shown."""
    from hipoa.dicom import read_image
    from hipoa.points import read_pts

    picked = unfit_rows(pheno, manifests, per_reason)
    if not picked:
        fig, ax = plt.subplots(figsize=(5, 1.2))
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no image was flagged implant, head_out_of_view or motion", ha="center", va="center")
        save_figure(fig, out, dpi=100)
        return 0
    ncol = min(4, len(picked))
    nrow = -(-len(picked) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.2 * nrow), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, (reason, row) in zip(axes.ravel(), picked):
        member = str(row.get("member") or "") or None
        try:
            hip = read_image(str(row["image"]), member)
        except Exception as exc:  # noqa: BLE001 - the montage must not fail the report
            ax.set_title(f"{reason}\n{image_label(row, show_eids, _table(row))} unreadable: {type(exc).__name__}",
                         fontsize=7)
            continue
        ax.imshow(hip.pixels, cmap="gray", interpolation="bilinear")
        path = str(row.get("points_auto") or "")
        if path:
            try:
                pts = read_pts(path)
                ax.plot(pts[:, 0], pts[:, 1], ".", ms=1.5, color=(1.0, 0.85, 0.1))
            except Exception:  # noqa: BLE001
                pass
        ax.set_title(f"{reason}\n{image_label(row, show_eids, _table(row))}", fontsize=8)
    fig.suptitle("Images flagged unfit to measure (automatic points in yellow)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out, dpi=100)
    return len(picked)


def write_report_figures(
    *,
    phenotypes: list[Path],
    scores: list[Path],
    evaluation: Path,
    qc: Path,
    areas: Path,
    prevalence_png: Path,
    manifests: list[Path] = (),
    unfit: Path | None = None,
    show_eids: bool = False,
) -> None:
    """Write the report's tables and figures.

    Args:
        phenotypes: ``results/phenotypes/osteophytes_{side}.parquet`` of every side.
        scores: ``results/evaluation/{site}.json`` of every evaluated site (may be empty when
            every model was loaded).
        evaluation: HTML table of our test-split scores beside the paper's Table 2.
        qc: HTML table of images per QC outcome and side, and prevalence per site and side.
        areas: PNG of predicted-area histograms per site.
        prevalence_png: PNG of prevalence per site and side.
        manifests: ``results/manifest/{side}.parquet`` (where the flagged images are), for ``unfit``.
        unfit: PNG montage of the images flagged unfit to measure (:func:`plot_unfit`).
        show_eids: Title the montage's images by eid (config ``report.show_eids``), else by row.
    """
    for path in (evaluation, qc, areas, prevalence_png):
        Path(path).parent.mkdir(parents=True, exist_ok=True)

    table = evaluation_table(read_scores(list(scores)))
    if len(table):
        classes = ["" if m.startswith("hipoa") else "paper" for m in table["model"]]
        body = _html_table(table, left={"site", "model"}, row_class=classes)
        body += ("<p>Test split, patches cropped from automatic points. Dice over the test images "
                 "with the site's osteophyte in the reference mask. Paper rows: Ebsim et al., "
                 "Table 2.</p>")
    else:
        body = "<p>No site was trained in this run (all models loaded), so none was evaluated.</p>"
    _write_text(Path(evaluation), _html_page("Per-site evaluation beside the paper's Table 2", body))

    pheno = read_phenotypes(list(phenotypes))
    sites = phenotype_sites(pheno)
    counts = qc_counts(pheno).reset_index()
    prev = prevalence(pheno, sites)
    shown = prev.assign(prevalence=(prev["prevalence"] * 100).round(1))
    body = _html_table(counts, left={"qc_reason"}) + withdrawn_note(list(phenotypes))
    body += "<h3>Prevalence (% of measured images)</h3>"
    body += _html_table(shown, left={"side", "site"})
    body += provenance_note(list(phenotypes))
    _write_text(Path(qc), _html_page("Images by QC outcome and side", body))

    plot_areas(pheno, sites, Path(areas))
    plot_prevalence(prev, Path(prevalence_png))
    if unfit is not None:
        Path(unfit).parent.mkdir(parents=True, exist_ok=True)
        shown = plot_unfit(pheno, list(manifests), Path(unfit), show_eids=show_eids)
        log.info("report figures: %d images flagged unfit shown in %s", shown, unfit)
    log.info("report figures: %d images, %d sites, %d evaluations", len(pheno), len(sites), len(scores))
