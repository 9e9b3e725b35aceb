"""The real Snakefile on a tiny synthetic cohort, run with the local profile.

Each run works in its own temporary directory (`--directory`), with the repository's demo
config (config/demo.yaml, over config/config.yaml which the Snakefile always reads) plus a small
override file (tiny cohort, tiny U-Nets, one epoch). The whole-DAG runs are marked slow; the dry
runs, lint and config checks are quick.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
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


TINY_WITHDRAWN = {**TINY, "inputs": {"withdrawn": "withdrawn.csv"}}


def snakemake(workdir: Path, override: dict | None, *args: str, check: bool = True,
              popen: bool = False, demo: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run the repository's Snakefile in ``workdir`` with the local profile, the demo config
    (unless ``demo`` is false) and ``override`` (unless None)."""
    workdir.mkdir(parents=True, exist_ok=True)
    configfiles = [str(REPO / "config" / "demo.yaml")] if demo else []
    if override is not None:
        (workdir / "override.yaml").write_text(yaml.safe_dump(override))
        configfiles.append(str(workdir / "override.yaml"))
    cmd = [
        sys.executable, "-m", "snakemake", "--profile", str(REPO / "profiles" / "local"),
        "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        *(["--configfile", *configfiles] if configfiles else []),
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
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--configfile", "config/demo.yaml"],
                          cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Congratulations" in lint.stdout + lint.stderr
    # as shipped (config/config.yaml's inputs point at no file yet), as the workflow catalog lints
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0 and "Congratulations" in lint.stdout + lint.stderr, lint.stdout + lint.stderr
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
        ({"patches": {"shards": 130}},
         "config patches.shards: 130, but cohort.participants gives 100 image(s) of side L; use at most 100"),
        ({"cohort": {"synthesize": False}, "inputs": {"images": "nowhere/{eid}_20158_{instance}_{array}.zip"}},
         "config inputs.images: 'nowhere/{eid}_20158_{instance}_{array}.zip' matches no file"),
        ({"training": {"epochs": "many"}},
         "config training.epochs: 'many' is not of type 'integer' (config/README.md describes the key)"),
        ({"training": {"augment": {"knee": {"n_augment": 1}}}}, "config training.augment: unknown sites ['knee']"),
        # a per-image pattern that cannot tell images apart: one file would serve many
        ({"inputs": {"points_auto": "resources/demo/points/auto/one.pts"}},
         "config inputs.points_auto 'resources/demo/points/auto/one.pts' lacks {eid}"),
        ({"inputs": {"masks": "resources/demo/masks/{eid}_{instance}.png"}},
         "config inputs.masks 'resources/demo/masks/{eid}_{instance}.png' lacks {side}: one file would serve both "
         "sides (L, R)"),
        ({"inputs": {"points_manual": "resources/demo/points/manual/{eid}_{side}.pts"}},
         "lacks {instance}: one file would serve every visit"),
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


def _stub_cohort(root: Path, n: int, sides=("L", "R")) -> dict:
    """``n`` empty files named like UKB zips and points: enough for the workflow to plan a run
    (nothing reads them in a dry run). Returns the `inputs` section pointing at them."""
    (root / "ukb" / "20158").mkdir(parents=True, exist_ok=True)
    for k in range(n):
        (root / "ukb" / "20158" / f"{9000001 + k}_20158_2_0.zip").write_bytes(b"")
    for side in sides:  # one annotated image per side: training has something to plan from
        for folder, ext in (("manual", "pts"), ("masks", "png")):
            (root / "ukb" / folder).mkdir(parents=True, exist_ok=True)
            (root / "ukb" / folder / f"9000001_2_{side}.{ext}").write_bytes(b"")
    return {"images": "ukb/20158/{eid}_20158_{instance}_{array}.zip",
            "points_auto": "ukb/points/{eid}_{instance}_{side}.pts",
            "points_manual": "ukb/manual/{eid}_{instance}_{side}.pts",
            "masks": "ukb/masks/{eid}_{instance}_{side}.png"}


def _train_commands(output: str) -> dict[str, str]:
    """Site -> the `hipoa train-unet` command of a dry run with -p."""
    commands = {}
    for line in output.splitlines():
        if " train-unet --site " in line:
            site = line.split(" train-unet --site ", 1)[1].split()[0]
            commands[site] = line
    return commands


@pytest.mark.parametrize("replace_workflow_config", [False, True], ids=["over-config.yaml", "schema-defaults"])
def test_config_with_only_inputs_plans_the_paper_recipe(tmp_path, replace_workflow_config):
    """A user's file with nothing but `inputs` inherits config/config.yaml (the paper's recipe),
    never the demo; with --replace-workflow-config the schema's defaults give the same recipe."""
    run = tmp_path / "run"
    inputs = _stub_cohort(run, 40)
    args = ["--dry-run", "--printshellcmds"]
    if replace_workflow_config:
        args.append("--replace-workflow-config")
    done = snakemake(run, {"inputs": inputs}, *args, demo=False)
    output = done.stdout + done.stderr
    counts = job_counts(output)
    assert "synth_cohort" not in counts and "synth" not in output.split("Job stats:")[0].split()
    assert counts["crop_patches"] == 40  # patches.shards: 40 (one side: sides [L])
    assert counts["ingest"] == 1
    commands = _train_commands(output)
    assert sorted(commands) == sorted(SITES)
    for site, command in commands.items():
        for flag in ("--epochs 15", "--depth 4", "--base-filters 64", "--batch-size 32",
                     "--dropout 0.3", "--rotation 0.1", "--scale 0.1"):
            assert flag in command, (site, flag, command)
    assert "--n-augment 19" in commands["lateral_acetabulum"]
    assert "--displacement 0.05" in commands["lateral_acetabulum"]
    for site in ("inferior_femoral_head", "superior_femoral_head"):
        assert "--n-augment 7 " in commands[site] and "--displacement 0.0 " in commands[site]


def test_config_yaml_holds_the_schema_defaults():
    """config/config.yaml (what every run inherits) and the schema's defaults (what a key left
    out of every file gets) are the same recipe, key by key, except where the data are."""
    from snakemake.utils import validate

    shipped = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    defaults: dict = {}
    validate(defaults, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))

    def leaves(tree, prefix=()):
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, (*prefix, key))
            else:
                yield (*prefix, key), value

    def lookup(tree, path):
        for key in path:
            tree = tree[key]
        return tree

    compared = 0
    for path, value in leaves(shipped):
        if path[0] == "inputs":
            continue
        assert lookup(defaults, path) == value, (".".join(path), value)
        compared += 1
    assert compared >= 30
    # Mappings a user replaces whole are left to the schema (a merge could not remove a site).
    assert "sites" not in shipped and "models" not in shipped and "augment" not in shipped["training"]
    assert sorted(defaults["sites"]) == sorted(SITES)
    assert defaults["training"]["augment"]["lateral_acetabulum"] == {
        "n_augment": 19, "rotation": 0.1, "scale": 0.1, "displacement": 0.05, "appearance": 1.0}


@pytest.mark.parametrize(
    ("config_args", "expected", "absent", "crop_jobs"),
    [
        (["training={epochs: 2, dropout: 0.5, prevalence: 0.2}"],
         ["--epochs 2 ", "--dropout 0.5 ", "--prevalence 0.2 "], [], 4),
        (["predictions={write_masks: false}", "patches={shards: 3}"], [], ["--masks-out "], 6),
        (["sites={lateral_acetabulum: {centre: 77}}"], ['"centre":77,'], ['"centre":78,'], 4),
    ],
)
def test_command_line_config_values_are_coerced_to_the_schema(tmp_path, config_args, expected, absent,
                                                               crop_jobs):
    """Snakemake reads values inside `--config key={...}` as text; hipoa converts them by the
    schema's types, also inside oneOf keys (prevalence) and site mappings."""
    done = snakemake(tmp_path / "run", TINY, "--dry-run", "--printshellcmds", "--config", *config_args)
    output = done.stdout + done.stderr
    for text in expected:
        assert text in output, text
    for text in absent:
        assert text not in output, text
    assert job_counts(output)["crop_patches"] == crop_jobs


@pytest.mark.parametrize(
    ("config_args", "message"),
    [
        (["sides=L"], "config sides: 'L' is not of type 'array'"),
        (["training={dropout: nan}"], "config training.dropout: 'nan' is not of type 'number'"),
        (["training={augment: {lateral_acetabulum: {rotation: inf}}}"],
         "config training.augment.lateral_acetabulum.rotation: 'inf' is not of type 'number'"),
    ],
)
def test_command_line_config_of_the_wrong_shape_says_how_to_pass_it(tmp_path, config_args, message):
    done = snakemake(tmp_path / "run", TINY, "--dry-run", "--config", *config_args, check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert message in output
    assert "--config 'training={epochs: 20}' 'sides=[L, R]'" in output
    assert "rule " not in done.stdout


def test_a_partial_inputs_block_without_annotations_is_refused_before_planning(tmp_path):
    """The user's inputs give images and points only: masks and manual points keep the shipped
    ukb/... patterns, which find nothing; refused while parsing, naming the key and its origin."""
    run = tmp_path / "run"
    inputs = _stub_cohort(run, 3)
    partial = {"images": inputs["images"], "points_auto": inputs["points_auto"]}
    done = snakemake(run, {"inputs": partial, "patches": {"shards": 2}}, "--dry-run", demo=False, check=False)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "rule " not in done.stdout
    # the stub's masks happen to lie where the shipped pattern looks; its manual points do not
    assert ("config inputs.points_manual: 'ukb/points/manual/{eid}_{instance}_{side}.pts' (inherited from config.yaml: "
            "your inputs block does not set it) finds no file of side L, but sites") in out


def test_fewer_image_files_than_shards_are_refused(tmp_path):
    run = tmp_path / "run"
    inputs = _stub_cohort(run, 3)
    (run / "ukb" / "20158" / "9000009_20158_2_0 (1).zip").write_bytes(b"")  # ingest would not parse it
    done = snakemake(run, {"inputs": inputs, "patches": {"shards": 4}}, "--dry-run", demo=False, check=False)
    assert done.returncode != 0
    assert ("config patches.shards: 4, but inputs.images 'ukb/20158/{eid}_20158_{instance}_{array}.zip' "
            "matches 3 image(s) of side L; use at most 3") in done.stdout + done.stderr


def test_right_hips_config_over_config_yaml_plans_no_training(tmp_path):
    """config/ukb_right.yaml sets only what differs from config/config.yaml; with inputs of the
    user's own given first, it plans right hips with the loaded models and no training."""
    run = tmp_path / "run"
    inputs = _stub_cohort(run, 40)
    for site in SITES:
        model = run / "models" / "ukb_left" / site / "unet.keras"
        model.parent.mkdir(parents=True)
        model.write_bytes(b"")
        model.with_suffix(".json").write_text("{}")
    (run / "mine.yaml").write_text(yaml.safe_dump({"inputs": inputs}))
    done = snakemake(run, None, "--dry-run", "--printshellcmds", "--configfile", str(run / "mine.yaml"),
                     str(REPO / "config" / "ukb_right.yaml"), demo=False)
    output = done.stdout + done.stderr
    counts = job_counts(output)
    assert "split_data" not in counts and "evaluate_unet" not in counts
    assert counts["ingest"] == 1 and counts["crop_patches"] == 40 and counts["train_unet"] == 3
    assert "--side R " in output and "--side L " not in output
    assert "--points-manual" not in output and "--masks " not in output


def test_shards_beyond_a_manifest_side_are_refused(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from dryrun_40k import write_manifest
    finally:
        sys.path.pop(0)
    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, 12, ["L", "R"])  # 6 images a side
    override = {"cohort": {"synthesize": False}, "sides": ["L", "R"], "patches": {"shards": 7},
                "inputs": {"manifest": str(manifest)}}
    done = snakemake(tmp_path / "run", override, "--dry-run", check=False)
    assert done.returncode != 0
    assert f"config patches.shards: 7, but inputs.manifest {str(manifest)!r} has 6 image(s) of side L" in (
        done.stdout + done.stderr)
    assert "rule " not in done.stdout


def test_rules_run_the_checkouts_hipoa(tmp_path):
    """Every rule runs the hipoa of the checkout its Snakefile is in, whatever hipoa the Python
    environment (or a rule's conda env) has installed: in a copy of the checkout whose version
    was changed, the jobs record the changed version."""
    import hipoa

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("Snakefile", "workflow", "config", "profiles", "envs", "src"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, checkout / name)
    init = checkout / "src" / "hipoa" / "__init__.py"
    line = f'__version__ = "{hipoa.__version__}"'
    assert line in init.read_text()
    init.write_text(init.read_text().replace(line, '__version__ = "9.9.9+changed"'))
    work = tmp_path / "run"
    work.mkdir()
    small = {**TINY, "cohort": {**TINY["cohort"], "participants": 4, "faults": 0}, "patches": {"shards": 1}}
    (work / "override.yaml").write_text(yaml.safe_dump(small))
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(checkout / "Snakefile"),
         "--directory", str(work), "--configfile", str(checkout / "config" / "demo.yaml"),
         str(work / "override.yaml"), "--cores", "2", "results/manifest/L.parquet"],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    metadata = pq.read_schema(work / "results" / "manifest" / "L.parquet").metadata
    assert metadata[b"hipoa_version"] == b"9.9.9+changed"
    assert hipoa.__version__ != "9.9.9+changed"  # the environment's own hipoa is another

def _job_resources(output: str) -> dict[str, list[str]]:
    """Rule -> the `resources:` lines of its jobs in a dry run's output."""
    found: dict[str, list[str]] = {}
    rule = None
    for line in output.splitlines():
        stripped = line.strip()
        if stripped.startswith(("rule ", "localrule ")) and stripped.endswith(":"):
            rule = stripped.split()[1].rstrip(":")
        elif stripped.startswith("resources:") and rule:
            found.setdefault(rule, []).append(stripped)
    return found


@pytest.mark.parametrize("case", ["generic-profile", "installed-profile"])
def test_profile_slurm_by_name_gets_hipoas_workflow_settings(tmp_path, case):
    """`snakemake --profile slurm` finds a profile named slurm where Snakemake looks names up
    (here a temporary XDG_CONFIG_HOME): (a) a cluster's generic one, (b) hipoa's, installed by
    `hipoa install-profile slurm`. Either way the workflow profile profiles/default adds the
    GPU partition of the GPU rules, and the rules' own GPU, memory and runtime requests stay."""
    config_home = tmp_path / "xdg"
    if case == "generic-profile":
        generic = config_home / "snakemake" / "slurm" / "config.yaml"
        generic.parent.mkdir(parents=True)
        # with set-resources of its own: kept, merged with the GPU rules' partition
        generic.write_text("executor: slurm\njobs: 20\ndefault-resources:\n"
                           "  slurm_account: generic-account\n  slurm_partition: main\n"
                           "set-resources:\n  crop_patches:\n    runtime: 99\n    slurm_qos: long\n"
                           "  predict_masks:\n    mem_mb: 12345\n")
        account = "generic-account"
    else:
        installed = subprocess.run(
            [sys.executable, "-m", "hipoa", "install-profile", "slurm",
             "--dir", str(config_home / "snakemake")], cwd=REPO, capture_output=True, text=True)
        assert installed.returncode == 0, installed.stderr
        account = "env-account"
    env = {**os.environ, "XDG_CONFIG_HOME": str(config_home), "HIPOA_SLURM_GPU_PARTITION": "gpu",
           "HIPOA_SLURM_PARTITION": "main", "SBATCH_ACCOUNT": "env-account"}
    work = tmp_path / "run"
    work.mkdir()
    (work / "override.yaml").write_text(yaml.safe_dump(TINY))
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", "slurm", "--snakefile", str(REPO / "Snakefile"),
         "--directory", str(work), "--configfile", str(REPO / "config" / "demo.yaml"),
         str(work / "override.yaml"), "--dry-run"],
        cwd=REPO, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Using profiles slurm and workflow specific profile profiles/default" in output
    resources = _job_resources(output)
    for rule in ("train_unet", "evaluate_unet", "predict_masks"):
        assert resources[rule], rule
        for line in resources[rule]:
            assert "gpu=1" in line and "slurm_partition=gpu" in line, (rule, line)
            assert f"slurm_account={account}" in line, (rule, line)
    for line in resources["crop_patches"] + resources["ingest"]:
        assert "gpu=" not in line and "slurm_partition=main" in line, line
    if case == "generic-profile":  # the user's own set-resources survive the GPU partition, key by key
        assert all("runtime=99" in line and "slurm_qos=long" in line for line in resources["crop_patches"])
        assert all("mem_mb=12345" in line and "slurm_partition=gpu" in line for line in resources["predict_masks"])


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
    """The Python process running `python -m hipoa SUBCOMMAND` (not the rule's `bash -c`)."""
    argv = _argv(pid)
    return len(argv) > 3 and "python" in Path(argv[0]).name and argv[1:4] == ["-m", "hipoa", subcommand]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The tiny demo, interrupted by killing a training job mid-way, resumed, then the report.

    Returns the working directory and the output of the resumed run.
    """
    work = tmp_path_factory.mktemp("run_a")
    # The cohort first, to pick participants who then withdraw consent (a UKB-style list: a
    # header, one eid per line, an empty line): one annotated, one not, none with a fault.
    snakemake(work, TINY, "resources/demo/truth.parquet")
    truth = pd.read_parquet(work / "resources" / "demo" / "truth.parquet")
    clean = truth[(truth["side"] == "L") & (truth["expected_reason"] == "")]
    withdrawn = [str(clean.loc[clean["annotated"], "eid"].iloc[0]), str(clean.loc[~clean["annotated"], "eid"].iloc[0])]
    (work / "withdrawn.csv").write_text("eid\n" + "\n".join(withdrawn) + "\n\n")
    (work / "withdrawn.txt").write_text("\n".join(withdrawn))  # for the tests, not the workflow
    # --retries 0: the workflow profile's retries would redo the killed job in the same run.
    proc = snakemake(work, TINY_WITHDRAWN, "--retries", "0", popen=True)
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
    resumed = snakemake(work, TINY_WITHDRAWN)
    snakemake(work, TINY_WITHDRAWN, "--report", "results/report.html")
    return work, resumed.stdout + resumed.stderr


@pytest.mark.slow
def test_the_run_ends_with_its_summary_on_the_terminal(demo_run):
    """The last thing a run prints (Snakemake's onsuccess): each side's counts and where the files are."""
    _, output = demo_run
    tail = output[output.rindex("=== hipoa: end of run ==="):]
    for side in ("L", "R"):
        assert f"--- results/phenotypes/osteophytes_{side}.summary.txt" in tail
    assert "withdrawn participants removed at ingest: 2" in tail and "qc failures:" in tail
    assert "present" in tail and "mean area when present" in tail and "results/phenotypes/osteophytes.{parquet" in tail


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
    withdrawn = (demo_run / "withdrawn.txt").read_text().split()
    truth = truth[~truth["eid"].astype(str).isin(withdrawn)]
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
        assert meta[b"withdrawn_participants"] == b"2"
        for kind in ("bt", "qt", "covar"):
            gwas = pd.read_csv(demo_run / "results" / "phenotypes" / f"osteophytes_{side}.{kind}.tsv", sep="\t")
            assert list(gwas.columns[:2]) == ["FID", "IID"]
            assert sorted(gwas["IID"].astype(str)) == sorted(expected["eid"].astype(str).unique())
    both = pd.read_parquet(demo_run / "results" / "phenotypes" / "osteophytes.parquet")
    assert len(both) == truth[["eid", "instance"]].drop_duplicates().shape[0]
    assert {"n_sides_measured", f"{SITES[0]}_present_any", f"{SITES[0]}_area_max_mm2"} <= set(both.columns)
    summary = (demo_run / "results" / "phenotypes" / "osteophytes_L.summary.txt").read_text()
    assert "withdrawn participants removed at ingest: 2" in summary
    assert "removed at ingest before any image was read (not counted above): L: 2, R: 2" in (
        demo_run / "results" / "report" / "qc_counts.html").read_text()


@pytest.mark.slow
def test_withdrawn_participants_leave_no_trace(demo_run):
    """Withdrawn eids appear in no file, file name or log line written from ingest on: text is
    searched byte for byte, Parquet tables and Zarr stores are read (their chunks are compressed)."""
    import zarr

    demo_run, _ = demo_run
    withdrawn = (demo_run / "withdrawn.txt").read_text().split()
    ingest_on = [demo_run / "results", *[p for p in (demo_run / "logs").iterdir() if p.name != "synth_cohort.log"]]
    files = [f for root in ingest_on for f in ([root] if root.is_file() else root.rglob("*")) if f.is_file()]
    assert len(files) > 50
    for f in files:
        for eid in withdrawn:
            assert eid not in str(f.relative_to(demo_run)), f
        if ".zarr" in f.parts[-2] or any(part.endswith(".zarr") for part in f.parts):
            continue
        if f.suffix == ".parquet":
            table = pd.read_parquet(f)
            for column in ("eid", "IID", "FID"):
                if column in table.columns:
                    assert not table[column].astype(str).isin(withdrawn).any(), f
            continue
        data = f.read_bytes()
        if f.suffix == ".html":  # embedded figures: base64 text, where any digit run may occur
            data = re.sub(rb"base64,[A-Za-z0-9+/=]+", b"base64,", data)
        for eid in withdrawn:
            assert eid.encode() not in data, (f, eid)
    stores = [p for p in (demo_run / "results").rglob("*.zarr") if p.is_dir()]
    assert stores
    checked = 0
    for store in stores:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Snakemake's timestamp file and the completion marker
            members = list(zarr.open_group(store, mode="r").members(max_depth=None))
        for name, member in members:
            if name.split("/")[-1] == "eid":
                eids = {str(value) for value in np.asarray(member[:]).tolist()}
                assert not eids & set(withdrawn), (store, name)
                checked += 1
    assert checked >= len(stores) // 2


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
    # Snakemake's per-job benchmark files have their own folder under results/
    assert (demo_run / "results" / "benchmarks" / "train_unet" / f"{SITES[0]}.tsv").stat().st_size > 0
    assert (demo_run / "results" / "benchmarks" / "crop_patches" / "R" / "shard-0001.tsv").exists()
    assert not (demo_run / "benchmarks").exists()


@pytest.mark.slow
def test_right_hips_with_loaded_left_models(demo_run, tmp_path):
    """A second run, from a fresh cohort of the same seed, with the first run's models loaded:
    no training, and the right-hip table equals the first run's (determinism across runs)."""
    demo_run, _ = demo_run
    work = tmp_path / "run_right"
    shutil.copytree(demo_run / "results" / "models", work / "models" / "left")
    shutil.copy2(demo_run / "withdrawn.csv", work / "withdrawn.csv")
    override = {**TINY_WITHDRAWN, "sides": ["R"],
                "models": {s: {"load": f"models/left/{s}/unet.keras"} for s in SITES}}
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
