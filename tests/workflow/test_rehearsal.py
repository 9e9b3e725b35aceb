"""The scale rehearsal (benchmarks/rehearsal.sh) at CI size: 1,000 participants, 2,000 images.

The same script as the 40,000-images-a-side rehearsal of docs/scale.md, with tiny one-epoch
models (tests/workflow/rehearsal_train_tiny.yaml): synthesis, a withdrawal list, training, the
whole workflow of both sides with the models loaded, the measurements, and the counts against
the synthetic truth. The counts are checked here again, from the truth and the tables, rather
than trusted to the script; then the script is shown to resume and to fail on a wrong table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
PARTICIPANTS = 1000
SHARDS = 4


def rehearsal(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    cmd = ["bash", str(REPO / "benchmarks" / "rehearsal.sh"), "--participants", str(PARTICIPANTS),
           "--shards", str(SHARDS), "--dir", str(root), "--cores", "2",
           "--train-config", str(REPO / "tests" / "workflow" / "rehearsal_train_tiny.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    done = rehearsal(root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return root, done


@pytest.mark.slow
def test_every_image_is_in_its_table_once_faults_flagged_withdrawn_absent(rehearsed):
    root, _ = rehearsed
    truth = pd.read_parquet(root / "cohort" / "truth.parquet").astype({"eid": "int64"})
    withdrawn = {int(e) for e in (root / "withdrawn.txt").read_text().split()}
    assert len(withdrawn) == PARTICIPANTS // 200
    kept = truth[~truth["eid"].isin(withdrawn)]
    result = json.loads((root / "rehearsal.json").read_text())
    assert result["errors"] == []
    assert result["images"] == len(kept) == 2 * (PARTICIPANTS - len(withdrawn))
    phen = root / "run" / "results" / "phenotypes"
    for side in ("L", "R"):
        table = pd.read_parquet(phen / f"osteophytes_{side}.parquet")
        expected = kept[kept["side"] == side]
        assert len(table) == len(expected)
        assert not table.duplicated(["eid", "instance"]).any()
        assert set(table["eid"]) == set(expected["eid"])
        assert not set(table["eid"]) & withdrawn
        # QC failures by reason are exactly the planted faults of this side
        failed = table.loc[~table["qc_pass"], "qc_reason"].value_counts().sort_index()
        planted = expected.loc[expected["expected_reason"] != "", "expected_reason"].value_counts().sort_index()
        assert failed.to_dict() == planted.to_dict()
        assert result["counts"]["sides"][side]["qc_failures_by_reason"] == planted.to_dict()
        assert planted.sum() > 0  # a corrupt zip fails both sides
    participants = pd.read_parquet(phen / "osteophytes.parquet")
    visits = kept[["eid", "instance"]].drop_duplicates()
    assert len(participants) == len(visits)
    assert set(zip(participants["eid"], participants["instance"].astype(int))) == set(
        zip(visits["eid"], visits["instance"].astype(int)))
    for name in ("bt.tsv", "qt.tsv", "covar.tsv"):
        ids = pd.read_csv(phen / f"osteophytes.{name}", sep="\t", usecols=["IID"])["IID"]
        assert len(ids) == kept["eid"].nunique() and not set(ids) & withdrawn


@pytest.mark.slow
def test_every_stage_is_measured(rehearsed):
    root, _ = rehearsed
    result = json.loads((root / "rehearsal.json").read_text())
    stages = {row["stage"]: row for row in result["stages"]}
    assert {"ingest", "crop_patches", "predict_masks", "phenotypes", "release", "report_figures"} <= set(stages)
    assert stages["ingest"]["jobs"] == 2
    assert stages["crop_patches"]["jobs"] == 2 * SHARDS
    assert stages["predict_masks"]["jobs"] == 2  # 8 shards per job: one job a side
    assert stages["crop_patches"]["files"] > 2 * SHARDS
    for row in stages.values():
        assert row["wall_s_total"] > 0 and row["rss_mb_max"] > 0
    assert stages["crop_patches"]["written_mb"] > 1
    assert set(result["phases_s"]) == {"synth", "train", "dag", "run", "report"}
    assert result["last_shard_to_participant_table_s"] >= 0
    assert (root / "rehearsal.png").stat().st_size > 10_000
    assert "| predict_masks | 2 |" in (root / "rehearsal.md").read_text()


@pytest.mark.slow
def test_rerun_resumes_and_a_wrong_table_fails_the_counts(rehearsed):
    root, _ = rehearsed
    again = rehearsal(root)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "Nothing to be done" in again.stdout + again.stderr
    phases = [line.split("\t")[0] for line in (root / "timings.tsv").read_text().splitlines()]
    assert phases.count("synth") == phases.count("train") == 1 and phases.count("run") == 2
    # a table that lost an image and gained a withdrawn participant's row
    path = root / "run" / "results" / "phenotypes" / "osteophytes_L.parquet"
    table = pd.read_parquet(path)
    withdrawn = int((root / "withdrawn.txt").read_text().split()[0])
    wrong = pd.concat([table.iloc[1:], table.iloc[[0]].assign(eid=withdrawn)], ignore_index=True)
    wrong.to_parquet(path)
    measured = subprocess.run([sys.executable, str(REPO / "benchmarks" / "rehearsal.py"), "measure", "--dir", str(root)],
                              capture_output=True, text=True)
    assert measured.returncode == 1
    assert "side L: missing = 1" in measured.stderr
    assert "side L: withdrawn_in_table = 1" in measured.stderr
    # a clean image flagged, the participant table losing a visit: both caught too
    clean = table.index[table["qc_pass"]][0]
    flagged = table.copy()
    flagged.loc[clean, ["qc_pass", "qc_reason"]] = [False, "motion"]
    flagged.to_parquet(path)
    participants = root / "run" / "results" / "phenotypes" / "osteophytes.parquet"
    pd.read_parquet(participants).iloc[1:].to_parquet(participants)
    measured = subprocess.run([sys.executable, str(REPO / "benchmarks" / "rehearsal.py"), "measure", "--dir", str(root)],
                              capture_output=True, text=True)
    assert measured.returncode == 1
    assert "side L: images without a fault failed QC: {'motion': 1}" in measured.stderr
    assert "participant table:" in measured.stderr and "not one for each" in measured.stderr
