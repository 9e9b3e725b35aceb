"""The real Snakefile on a tiny synthetic cohort, run with the local profile.

Each run works in its own temporary directory (`--directory`), with the repository's
config/config.yaml plus a small override file (tiny cohort, tiny U-Nets, one epoch). The
whole-DAG runs are marked slow; the dry runs, lint and config checks are quick.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SITES = ["inferior_femoral_head", "superior_femoral_head", "lateral_acetabulum"]
CONTRACT_COLUMNS = {
    "eid": "int64",
    "instance": "int16",
    "side": "string",
    "qc_pass": "bool",
    "qc_reason": "string",
    "reference_length_mm": "float64",
    **{f"{s}_present": "Int8" for s in SITES},
    **{f"{s}_area_mm2": "Float64" for s in SITES},
    **{f"{s}_probability": "Float32" for s in SITES},
    "any_present": "Int8",
    "total_area_mm2": "Float64",
    "annotated": "bool",
    "used_in_training": "bool",
}

TINY = {
    "cohort": {"synthesize": True, "dir": "resources/demo", "participants": 24, "seed": 3,
               "annotated_fraction": 0.75, "faults": 6},
    "sides": ["L", "R"],
    "patches": {"shards": 2},
    "training": {
        "epochs": 1, "batch_size": 16, "depth": 2, "base_filters": 4, "seed": 1,
        "val_fraction": 0.25, "test_fraction": 0.25,
        "augment": {s: {"n_augment": 1, "rotation": 0.1, "scale": 0.1, "displacement": 0.0} for s in SITES},
    },
    "predictions": {"batch_size": 32, "write_masks": True},
}


def snakemake(workdir: Path, override: dict, *args: str, check: bool = True,
              popen: bool = False) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run the repository's Snakefile in ``workdir`` with the local profile and ``override``."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "override.yaml").write_text(yaml.safe_dump(override))
    cmd = [
        sys.executable, "-m", "snakemake", "--profile", str(REPO / "profiles" / "local"),
        "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(REPO / "config" / "config.yaml"), str(workdir / "override.yaml"),
        "--cores", "2", *args,
    ]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}")
    return done


def job_counts(output: str) -> dict[str, int]:
    """Rule -> job count from Snakemake's job-stats table."""
    counts: dict[str, int] = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


# ---- quick checks ---------------------------------------------------------------------------


def test_lint_and_format_are_clean():
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Congratulations" in lint.stdout + lint.stderr
    fmt = subprocess.run(["snakefmt", "--check", "Snakefile", "workflow"], cwd=REPO, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_dry_run_of_a_large_manifest_is_sharded(tmp_path):
    """2,000 images, 10 shards a side: jobs scale with shards, not images; no file is read.
    Prediction runs predictions.shards_per_job (here 4) shards per job: 3 jobs a side."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from dryrun_40k import write_manifest
    finally:
        sys.path.pop(0)
    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, 2000, ["L", "R"])
    override = {"cohort": {"synthesize": False}, "sides": ["L", "R"], "patches": {"shards": 10},
                "predictions": {"shards_per_job": 4}, "inputs": {"manifest": str(manifest)}}
    done = snakemake(tmp_path / "run", override, "--dry-run", "--quiet", "rules")
    counts = job_counts(done.stdout + done.stderr)
    assert counts["ingest"] == 2
    assert counts["crop_patches"] == 20 and counts["predict_masks"] == 6
    assert counts["train_unet"] == 3 and counts["evaluate_unet"] == 3
    assert "synth_cohort" not in counts


def test_loaded_models_skip_training_and_evaluation(tmp_path):
    models = {s: {"load": f"models/left/{s}/unet.keras"} for s in SITES}
    for s in SITES:
        (tmp_path / "run" / "models" / "left" / s).mkdir(parents=True)
        (tmp_path / "run" / "models" / "left" / s / "unet.keras").write_bytes(b"")
        (tmp_path / "run" / "models" / "left" / s / "unet.json").write_text("{}")
    override = {"sides": ["R"], "models": models, "patches": {"shards": 3}}
    done = snakemake(tmp_path / "run", override, "--dry-run", "--quiet", "rules")
    counts = job_counts(done.stdout + done.stderr)
    assert "split_data" not in counts and "evaluate_unet" not in counts
    assert counts["train_unet"] == 3  # copies each loaded model into results/models/
    assert counts["crop_patches"] == 3 and counts["ingest"] == 1  # right hips only


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"models": {"knee": {"load": ""}}}, "unknown sites ['knee']"),
        ({"patches": {"shards": 0}}, "shards"),
        ({"models": {"lateral_acetabulum": {"load": "results/models/lateral_acetabulum/unet.keras"}}},
         "is where this run writes the model"),
        ({"sides": ["X"]}, "'X' is not one of"),
        ({"sites": {"lateral_acetabulum": {"centre": 300}}},
         "config sites.lateral_acetabulum.centre: point 300 does not exist in a .pts of n_points 85"),
        ({"sites": {"inferior_femoral_head": {"reference": [12, 85]}}},
         "config sites.inferior_femoral_head.reference: point 85 does not exist"),
        ({"sites": {"inferior_femoral_head": {"reference": [12, 12]}}},
         "config sites.inferior_femoral_head.reference: need two different points, got [12, 12]"),
        ({"sites": {"superior_femoral_head": {"label": 1}}},
         "config sites.superior_femoral_head.label: 1 is also the label of sites.inferior_femoral_head"),
        ({"sides": ["R"], "training": {"side": "L"}}, "config training.side: 'L' is not among sides ['R']"),
        ({"models": {"lateral_acetabulum": {"load": "models/nowhere/unet.keras"}}},
         "config models.lateral_acetabulum.load: 'models/nowhere/unet.keras' does not exist"),
    ],
)
def test_bad_config_is_refused_with_the_key(tmp_path, override, message):
    done = snakemake(tmp_path / "run", override, "--dry-run", check=False)
    assert done.returncode != 0
    assert message in done.stdout + done.stderr
    assert "rule " not in done.stdout  # refused while parsing: no job was planned


def test_loaded_model_without_its_card_is_refused(tmp_path):
    model = tmp_path / "run" / "models" / "left" / "lateral_acetabulum" / "unet.keras"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"")
    override = {"models": {"lateral_acetabulum": {"load": "models/left/lateral_acetabulum/unet.keras"}}}
    done = snakemake(tmp_path / "run", override, "--dry-run", check=False)
    assert done.returncode != 0
    assert ("config models.lateral_acetabulum.load: 'models/left/lateral_acetabulum/unet.keras' has no model "
            "card 'models/left/lateral_acetabulum/unet.json'") in done.stdout + done.stderr


# ---- whole runs -----------------------------------------------------------------------------


def _child_pids(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc), so the test only touches what it started."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _argv(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _is_hipoa(pid: int, subcommand: str) -> bool:
    """The Python process running `hipoa SUBCOMMAND` (not the rule's `bash -c` around it)."""
    argv = _argv(pid)
    return len(argv) > 2 and "python" in Path(argv[0]).name and Path(argv[1]).name == "hipoa" and argv[2] == subcommand


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The tiny demo, interrupted by killing a training job mid-way, resumed, then the report.

    Returns the working directory and the output of the resumed run.
    """
    work = tmp_path_factory.mktemp("run_a")
    proc = snakemake(work, TINY, popen=True)
    killed = None
    try:
        while killed is None and proc.poll() is None:
            for pid in _child_pids(proc.pid):
                if _is_hipoa(pid, "train-unet"):
                    time.sleep(2.0)  # let it get under way
                    if pid in _child_pids(proc.pid):
                        os.kill(pid, signal.SIGKILL)
                        killed = pid
                    break
            time.sleep(0.2)
        output, _ = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=120)
    assert killed is not None, "no train-unet job was seen to kill"
    assert proc.returncode != 0, output[-3000:]
    resumed = snakemake(work, TINY)
    snakemake(work, TINY, "--report", "results/report.html")
    return work, resumed.stdout + resumed.stderr


@pytest.mark.slow
def test_interrupted_run_resumes_where_it_stopped(demo_run):
    work, output = demo_run
    counts = job_counts(output)
    # only the killed training job and what depends on it ran again
    for rule in ("synth_cohort", "ingest", "crop_patches", "split_data"):
        assert rule not in counts, (rule, counts)
    assert 1 <= counts.get("train_unet", 0) <= 3
    assert counts["phenotypes"] == 2
    for side in ("L", "R"):
        assert (work / "results" / "phenotypes" / f"osteophytes_{side}.parquet").exists()


@pytest.mark.slow
def test_phenotype_table_has_one_row_per_image_with_contract_columns(demo_run):
    demo_run, _ = demo_run
    truth = pd.read_parquet(demo_run / "resources" / "demo" / "truth.parquet")
    for side in ("L", "R"):
        table = pd.read_parquet(demo_run / "results" / "phenotypes" / f"osteophytes_{side}.parquet")
        expected = truth[truth["side"] == side]
        # one row per synthesised image of the side, none lost, none duplicated
        assert sorted(table["eid"].astype(str)) == sorted(expected["eid"].astype(str))
        assert not table.duplicated(["eid", "instance", "side"]).any()
        for column, dtype in CONTRACT_COLUMNS.items():
            assert column in table.columns, column
            assert str(table[column].dtype).lower() == dtype.lower(), (column, table[column].dtype)
        # planted faults come out flagged with the expected reason and NA phenotypes
        merged = table.merge(expected[["eid", "expected_reason"]].astype({"eid": "int64"}), on="eid")
        faulty = merged[merged["expected_reason"] != ""]
        assert len(faulty) > 0
        assert (~faulty["qc_pass"]).all()
        assert (faulty["qc_reason"] == faulty["expected_reason"]).all(), faulty[["eid", "qc_reason", "expected_reason"]]
        for s in SITES:
            assert faulty[f"{s}_present"].isna().all()
        passed = table[table["qc_pass"]]
        assert (passed["qc_reason"] == "").all()
        for s in SITES:
            assert passed[f"{s}_present"].notna().all()
            area = passed[f"{s}_area_mm2"]
            assert ((passed[f"{s}_present"] == 1) == (area > 0)).all()
        meta = pq.read_schema(demo_run / "results" / "phenotypes" / f"osteophytes_{side}.parquet").metadata
        keys = {k.decode() for k in meta}
        assert any("config" in k for k in keys) and any("version" in k for k in keys)
        pheno = pd.read_csv(demo_run / "results" / "phenotypes" / f"osteophytes_{side}.pheno.tsv", sep="\t")
        assert list(pheno.columns[:2]) == ["FID", "IID"]


@pytest.mark.slow
def test_report_and_logs(demo_run):
    demo_run, _ = demo_run
    html = (demo_run / "results" / "report.html").read_text()
    assert len(html) > 100_000
    for name in ("evaluation.html", "qc_counts.html", "areas.png", "prevalence.png"):
        assert (demo_run / "results" / "report" / name).stat().st_size > 0
    for log in ("synth_cohort.log", "ingest/L.log", "crop_patches/R/shard-0001.log", "phenotypes/R.log"):
        assert (demo_run / "logs" / log).exists(), log
    masks = list((demo_run / "results" / "masks" / "L").glob("*.png"))
    assert masks


@pytest.mark.slow
def test_right_hips_with_loaded_left_models(demo_run, tmp_path):
    """A second run, from a fresh cohort of the same seed, with the first run's models loaded:
    no training, and the right-hip table equals the first run's (determinism across runs)."""
    demo_run, _ = demo_run
    work = tmp_path / "run_right"
    shutil.copytree(demo_run / "results" / "models", work / "models" / "left")
    override = {**TINY, "sides": ["R"], "models": {s: {"load": f"models/left/{s}/unet.keras"} for s in SITES}}
    done = snakemake(work, override)
    counts = job_counts(done.stdout + done.stderr)
    assert counts["train_unet"] == 3  # each copies its loaded model into results/models/
    assert not (work / "results" / "splits").exists() and not (work / "results" / "evaluation").exists()
    assert not (work / "results" / "phenotypes" / "osteophytes_L.parquet").exists()
    trained = pd.read_parquet(demo_run / "results" / "phenotypes" / "osteophytes_R.parquet")
    loaded = pd.read_parquet(work / "results" / "phenotypes" / "osteophytes_R.parquet")
    assert not loaded["used_in_training"].any()  # this run trained nothing
    columns = [c for c in trained.columns if c != "used_in_training"]
    pd.testing.assert_frame_equal(trained[columns], loaded[columns])
