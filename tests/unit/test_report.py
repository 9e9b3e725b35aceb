"""Tests of hipoa.report on tiny hand-made phenotype tables and evaluation JSONs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hipoa import report
from hipoa.tables import write_parquet
from hipoa.provenance import provenance, provenance_json

SITES = ["inferior_femoral_head", "lateral_acetabulum"]


def _table(side: str, present_inf: list, present_ace: list, reasons: list[str]) -> pd.DataFrame:
    n = len(reasons)
    return pd.DataFrame({
        "eid": [str(i) for i in range(n)],
        "instance": np.full(n, 2, dtype=np.int16),
        "side": side,
        "qc_pass": [r == "" for r in reasons],
        "qc_reason": reasons,
        "inferior_femoral_head_present": pd.array(present_inf, dtype="Int8"),
        "inferior_femoral_head_area_mm2": pd.array([5.0 if p == 1 else (0.0 if p == 0 else None) for p in present_inf], dtype="Float64"),
        "lateral_acetabulum_present": pd.array(present_ace, dtype="Int8"),
        "lateral_acetabulum_area_mm2": pd.array([12.0 if p == 1 else (0.0 if p == 0 else None) for p in present_ace], dtype="Float64"),
        "any_present": pd.array([None if a is None else int(bool(a or b)) for a, b in zip(present_inf, present_ace)], dtype="Int8"),
    })


@pytest.fixture
def tables(tmp_path):
    left = _table("L", [1, 0, 0, None], [1, 1, 0, None], ["", "", "", "points_missing"])
    right = _table("R", [0, None, None], [0, None, None], ["", "no_hip_dicom", "points_missing"])
    paths = []
    for side, t in (("L", left), ("R", right)):
        path = tmp_path / f"osteophytes_{side}.parquet"
        write_parquet(t, path, {"side": side, "provenance": provenance_json()})
        paths.append(path)
    return paths


def test_qc_counts_by_reason_and_side(tables):
    counts = report.qc_counts(report.read_phenotypes(tables))
    assert list(counts.index) == ["pass", "points_missing", "no_hip_dicom"]
    assert counts.loc["pass", "L"] == 3 and counts.loc["pass", "R"] == 1
    assert counts.loc["points_missing", "total"] == 2
    assert counts.loc["no_hip_dicom", "L"] == 0
    assert counts["total"].sum() == 7  # every image counted once


def test_prevalence_excludes_na(tables):
    prev = report.prevalence(report.read_phenotypes(tables), SITES).set_index(["side", "site"])
    assert prev.loc[("L", "inferior_femoral_head"), "measured"] == 3
    assert prev.loc[("L", "inferior_femoral_head"), "present"] == 1
    assert prev.loc[("L", "lateral_acetabulum"), "prevalence"] == pytest.approx(2 / 3)
    assert prev.loc[("R", "any"), "prevalence"] == 0.0


def test_evaluation_table_puts_paper_rows_beside_ours(tmp_path):
    path = tmp_path / "lateral_acetabulum.json"
    path.write_text(json.dumps({"site": "lateral_acetabulum", "n": 10, "n_positive": 4,
                                "sensitivity": 0.75, "specificity": 0.5, "f1": None,
                                "dice_mean": 0.6, "dice_std": 0.1}))
    table = report.evaluation_table(report.read_scores([path]))
    assert list(table["model"]) == ["hipoa (this run)", "paper U-Net 3 (no displacement)", "paper U-Net 4 (displacement 0.05)"]
    assert table.loc[0, "sensitivity"] == 0.75 and np.isnan(table.loc[0, "f1"])
    assert table.loc[2, "sensitivity"] == 0.94  # Table 2, U-Net 4


def test_write_report_figures(tables, tmp_path):
    out = tmp_path / "report"
    report.write_report_figures(
        phenotypes=tables, scores=[], evaluation=out / "evaluation.html", qc=out / "qc.html",
        areas=out / "areas.png", prevalence_png=out / "prevalence.png",
    )
    assert "no site was trained" in (out / "evaluation.html").read_text().lower()
    qc = (out / "qc.html").read_text()
    assert "points_missing" in qc and "no_hip_dicom" in qc
    # what made the tables: one line for both (same provenance), with the commit and versions
    record = provenance()
    assert "<h3>Provenance</h3>" in qc and "osteophytes_L.parquet, osteophytes_R.parquet:" in qc
    assert f"git_commit {record['git_commit']}" in qc and f"tensorflow {record['tensorflow']}" in qc
    for png in ("areas.png", "prevalence.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 100 and im.size[1] > 100


def test_montage_titles_name_no_participant_unless_asked():
    from hipoa.report import unfit_rows, image_label

    pheno = pd.DataFrame({"eid": ["9500001", "9500002", "9500003", "9500001"], "instance": [2, 2, 2, 2],
                          "side": ["L", "L", "L", "R"], "qc_reason": ["", "implant", "motion", "implant"]})
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        man = Path(d) / "m.parquet"
        pheno.assign(image="x.zip", member="", points_auto="").to_parquet(man)
        picked = unfit_rows(pheno, [man], per_reason=4)
    titles = {(reason, image_label(row, False, f"osteophytes_{row['side']}.parquet")) for reason, row in picked}
    assert titles == {("implant", "osteophytes_L.parquet row 1"), ("implant", "osteophytes_R.parquet row 0"),
                      ("motion", "osteophytes_L.parquet row 2")}
    assert not any("500000" in t for _, t in titles)  # no eid unless report.show_eids
    assert {image_label(row, True, "") for _, row in picked} == {"9500002_2_L", "9500003_2_L", "9500001_2_R"}


@pytest.mark.parametrize("low, high", [(0.3, 900.0), (2.0, 40.0), (5.0, 6.0)])
def test_area_axis_labels_do_not_run_together(low, high):
    rng = np.random.default_rng(1)
    n = 200
    areas = np.exp(rng.uniform(np.log(low), np.log(high), n))
    table = pd.DataFrame({"side": rng.choice(["L", "R"], n), "inferior_femoral_head_present": 1.0,
                          "inferior_femoral_head_area_mm2": areas})
    fig = report.areas_figure(table, ["inferior_femoral_head"])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    labels = [t for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
              if t.get_text() and lo <= t.get_position()[0] <= hi]
    assert len(labels) >= 2, [t.get_text() for t in labels]  # the axis is labelled
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 < right.x0, [t.get_text() for t in labels]  # no two labels touch
    import matplotlib.pyplot as plt

    plt.close(fig)
