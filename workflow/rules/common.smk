# Every Python helper of the workflow: config checks, target lists and input functions.
# Rules live in one .smk per stage and call the `hipoa` CLI; nothing here reads an image, so
# the DAG of a 40,000-image run is built from config alone (shards are known up front:
# shard = blake2b(eid) mod patches.shards, computed by `hipoa ingest`).

import hashlib
import json
import shlex
import sys
from pathlib import Path

import pandas as pd
import yaml

# The checkout's hipoa, as the rules run it (only its light modules are imported here).
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from hipoa.patterns import check_image_patterns, count_images
from hipoa.profiles import gpu_partition_resources
from hipoa.train_settings import TrainSettings


wildcard_constraints:
    side="L|R",
    shard=r"\d{4}",
    group=r"\d{4}",
    site=r"[a-z][a-z0-9_]*",
    source="auto|manual",


# The GPU rules' partition (train_unet, evaluate_unet, predict_masks), from the environment of
# the shell that starts Snakemake; unset: the partition every job gets from the user's profile.
# A rule resource, not the workflow profile's set-resources, so that a user's own set-resources
# (any rule, any key, the GPU rules' partition included) merge with it instead of being replaced.
GPU_PARTITION = gpu_partition_resources()

SIDES = list(config["sides"])
SITES = list(config["sites"])
SHARDS = [f"{k:04d}" for k in range(config["patches"]["shards"])]
# Shards predicted by one predict_masks job, which loads the models once for all of them.
_PER_JOB = config["predictions"]["shards_per_job"]
PREDICT_GROUPS = {
    f"{g:04d}": SHARDS[g * _PER_JOB : (g + 1) * _PER_JOB]
    for g in range(-(-len(SHARDS) // _PER_JOB))
}
COHORT_DIR = config["cohort"]["dir"].rstrip("/")
CONDA_CPU = "../../envs/cpu.yaml"
CONDA_GPU = "../../envs/gpu.yaml"
# Each job runs `python -m hipoa ...` with the checkout's src/ (beside the Snakefile) first on
# PYTHONPATH: the hipoa of this checkout, with the packages of the job's Python environment
# (the one Snakemake was started from, or the job's conda env, which holds hipoa's
# dependencies but not hipoa). So a `git pull` changes what every job runs, in any environment.
_SRC = shlex.quote(str(Path(workflow.basedir) / "src"))
# Snakemake formats the prefix like a command: braces are doubled.
shell.prefix(
    "set -euo pipefail; export PYTHONPATH="
    + _SRC.replace("{", "{{").replace("}", "}}")
    + "${{PYTHONPATH:+:$PYTHONPATH}}; "
)


def check_config():
    """Cross-key checks that the JSON schema cannot express; errors name the key and value."""
    inputs = config["inputs"]
    if not inputs["manifest"] and not (inputs["images"] and inputs["points_auto"]):
        raise ValueError(
            "config inputs: set inputs.manifest, or inputs.images and inputs.points_auto "
            f"(got images={inputs['images']!r}, points_auto={inputs['points_auto']!r})"
        )
    # An entry equal to the paper's default for a contract site is inherited, not a mistake.
    augment_given = config["training"]["augment"]
    unknown = sorted(
        site
        for site in set(augment_given) - set(SITES)
        if augment_given[site] != PAPER_AUGMENT.get(site)
    )
    if unknown:
        raise ValueError(
            f"config training.augment: unknown sites {unknown}; sites are {SITES}"
        )
    unknown = sorted(set(config["models"]) - set(SITES))
    if unknown:
        raise ValueError(f"config models: unknown sites {unknown}; sites are {SITES}")
    for site in SITES:
        load = model_load(site)
        if load and not load.endswith(".keras"):
            raise ValueError(
                f"config models.{site}.load: expected a .keras file, got {load!r}"
            )
        if load and Path(load) == Path(model_path(site)):
            raise ValueError(
                f"config models.{site}.load: {load!r} is where this run writes the model; "
                "copy it elsewhere first (e.g. models/ukb_left/)"
            )
        if load and not Path(load).is_file():
            raise ValueError(
                f"config models.{site}.load: {load!r} does not exist (relative paths are "
                "resolved against the working directory)"
            )
        if load and not Path(load).with_suffix(".json").is_file():
            raise ValueError(
                f"config models.{site}.load: {load!r} has no model card "
                f"{str(Path(load).with_suffix('.json'))!r} beside it (it holds the presence rule)"
            )
    check_sites()
    if TRAINED_SITES and config["training"]["side"] not in SIDES:
        raise ValueError(
            f"config training.side: {config['training']['side']!r} is not among sides {SIDES}; "
            "the trained sites learn from that side's patches"
        )
    if not inputs["manifest"]:
        check_image_patterns(
            inputs["images"],
            {
                f"config inputs.{key}": inputs[key] or ""
                for key in ("points_auto", "points_manual", "masks")
            },
            SIDES,
        )
    if inputs["manifest"] and Path(inputs["manifest"]).exists():
        validate_manifest(inputs["manifest"])
    if inputs["withdrawn"] and not Path(inputs["withdrawn"]).is_file():
        raise ValueError(
            f"config inputs.withdrawn: {inputs['withdrawn']!r} is not a file (relative paths are "
            "resolved against the working directory)"
        )
    check_shards()
    check_annotations()


def check_annotations():
    """Training needs annotated images: when a site is trained from an image layout (not the
    synthetic cohort, not a manifest), its side must have at least one manual mask and one
    manual points file, counted before anything is planned. A user's `inputs` block is merged
    over config/config.yaml, so a key it leaves out keeps the shipped `ukb/...` pattern; the
    error says so instead of failing at split_data after ingest and every crop."""
    inputs = config["inputs"]
    if not TRAINED_SITES or inputs["manifest"] or config["cohort"]["synthesize"]:
        return
    if (
        "--lint" in sys.argv
    ):  # the workflow catalog lints the shipped config, whose inputs hold no file
        return
    side = config["training"]["side"]
    shipped_path = Path(workflow.basedir) / "config" / "config.yaml"
    shipped = (yaml.safe_load(shipped_path.read_text()) or {}).get("inputs", {})
    for key in ("masks", "points_manual"):
        pattern = inputs[key]
        origin = (
            f" (inherited from {shipped_path.name}: your inputs block does not set it)"
            if pattern and pattern == shipped.get(key)
            else ""
        )
        found = count_images(pattern, [side], 1)[side] if pattern else 0
        if not found:
            raise ValueError(
                f"config inputs.{key}: {pattern!r}{origin} finds no file of side {side}, but sites "
                f"{TRAINED_SITES} are trained from annotated images; set inputs.masks and "
                "inputs.points_manual to your annotations, or load trained models (models.<site>.load)"
            )


def check_shards():
    """patches.shards is at most the images of every side: more shards than images would leave
    shards empty. Images are counted from what is known before anything runs: the synthetic
    cohort's participants, the manifest's rows of each side, or the files `inputs.images`
    matches (globbed only until there are enough)."""
    shards = config["patches"]["shards"]
    inputs = config["inputs"]
    if inputs["manifest"]:
        if not Path(inputs["manifest"]).exists():
            return  # ingest waits for it (a file an earlier rule makes)
        table = read_manifest(inputs["manifest"])
        counts = {side: int((table["side"] == side).sum()) for side in SIDES}
        source = f"inputs.manifest {inputs['manifest']!r} has"
    elif config["cohort"]["synthesize"]:
        counts = {side: config["cohort"]["participants"] for side in SIDES}
        source = "cohort.participants gives"
    else:
        try:
            counts = count_images(inputs["images"], SIDES, shards)
        except ValueError as error:
            raise ValueError(f"config inputs.images: {error}") from None
        if not any(counts.values()):
            if "--lint" in sys.argv:
                # `snakemake --lint` (the workflow catalog's check) reads the rules, not the
                # data: config/config.yaml as shipped points at inputs you have yet to give.
                return
            raise ValueError(
                f"config inputs.images: {inputs['images']!r} matches no file (relative "
                "paths are resolved against the working directory); edit inputs in "
                "config/config.yaml or give your own --configfile (the demo: --configfile "
                "config/demo.yaml)"
            )
        source = f"inputs.images {inputs['images']!r} matches"
    for side, count in counts.items():
        if count < shards:
            raise ValueError(
                f"config patches.shards: {shards}, but {source} {count} image(s) of side "
                f"{side}; use at most {max(count, 1)} (about images / 1,000)"
            )


def check_sites():
    """Every site's points exist in a .pts file of n_points, its reference points differ, and
    no two sites share a mask label: errors name the key and the value."""
    n_points = config["n_points"]
    labels = {}
    for site, entry in config["sites"].items():
        for key, points in (
            ("centre", [entry["centre"]]),
            ("reference", list(entry["reference"])),
        ):
            bad = [p for p in points if not 0 <= int(p) < n_points]
            if bad:
                raise ValueError(
                    f"config sites.{site}.{key}: point {bad[0]} does not exist in a .pts of "
                    f"n_points {n_points} (0-based, 0..{n_points - 1})"
                )
        if (
            len(entry["reference"]) != 2
            or entry["reference"][0] == entry["reference"][1]
        ):
            raise ValueError(
                f"config sites.{site}.reference: need two different points, got {list(entry['reference'])}"
            )
        other = labels.setdefault(entry["label"], site)
        if other != site:
            raise ValueError(
                f"config sites.{site}.label: {entry['label']} is also the label of sites.{other}; "
                "each site needs its own mask label"
            )


def read_manifest(path):
    """A manifest table (CSV or Parquet) as text, empty cells as ""."""
    if str(path).endswith(".parquet"):
        return pd.read_parquet(path).astype("string").fillna("")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def validate_manifest(path):
    """Check a manifest table (CSV or Parquet) against workflow/schemas/manifest.schema.yaml.

    The schema's properties are independent of each other, so each column's distinct values
    are validated once (40,000 rows in well under a second, instead of one validation per row).
    Empty cells count as absent.
    """
    import jsonschema

    schema_path = Path(workflow.current_basedir.get_path_or_uri(secret_free=True))
    schema = yaml.safe_load(
        (schema_path / "../schemas/manifest.schema.yaml").read_text()
    )
    table = read_manifest(path)
    withdrawn = config["inputs"]["withdrawn"]
    if withdrawn and Path(withdrawn).is_file() and "eid" in table.columns:
        # Withdrawn participants' rows are not checked (nor quoted in an error): ingest drops
        # them unread. The list is read as ingest reads it (any spelling of an eid), and a list
        # ingest would refuse stops the run here, before anything is submitted.
        from hipoa.ingest import read_withdrawn, withdrawal_key

        try:
            listed = read_withdrawn(withdrawn)
        except ValueError as exc:
            raise ValueError(f"config inputs.withdrawn: {exc}") from None
        table = table[~table["eid"].map(withdrawal_key).isin(listed)]
    errors = []
    for column in schema["required"]:
        if column not in table.columns:
            errors.append(f"missing column {column!r}")
        elif (table[column] == "").any():
            row = int((table[column] == "").to_numpy().argmax())
            errors.append(f"data row {row + 1}: empty {column!r}")
    for column, subschema in schema["properties"].items():
        if column not in table.columns:
            continue
        validator = jsonschema.Draft202012Validator(subschema)
        bad = [
            v for v in table[column].unique() if v != "" and not validator.is_valid(v)
        ]
        if bad:
            row = int(table[column].isin(bad[:1]).to_numpy().argmax())
            expected = (
                subschema.get("enum")
                or subschema.get("pattern")
                or subschema.get("type")
            )
            errors.append(
                f"data row {row + 1}: {column}={bad[0]!r}, expected {expected!r} "
                f"({len(bad)} bad value(s) in {column!r})"
            )
    if errors:
        raise ValueError(f"manifest {path}: " + "; ".join(errors))


def model_load(site):
    """The .keras path configured for ``site`` under models.<site>.load, or "" to train it."""
    return config["models"].get(site, {}).get("load", "")


TRAINED_SITES = [site for site in SITES if not model_load(site)]


def model_path(site):
    """Where the workflow keeps ``site``'s model (trained, or copied from models.<site>.load)."""
    return f"results/models/{site}/unet.keras"


def model_card(site):
    """The JSON written beside a model: settings, counts, validation scores, presence rule."""
    return f"results/models/{site}/unet.json"


def patch_stores(side):
    """Every shard store of one side, in shard order."""
    return expand("results/patches/{side}/shard-{shard}.zarr", side=side, shard=SHARDS)


def patch_stores_of_side(wildcards):
    """Input function: every shard store of ``wildcards.side``."""
    return patch_stores(wildcards.side)


TRAINING_STORES = patch_stores(config["training"]["side"])


_SCHEMA = yaml.safe_load(CONFIG_SCHEMA.read_text())
# The paper's augmentation per contract site (the schema's default of training.augment).
PAPER_AUGMENT = _SCHEMA["properties"]["training"]["properties"]["augment"]["default"]


def augment(site):
    """Augmentation settings for ``site``: training.augment.<site>, each key it leaves out taken
    from the paper's settings for the site (PAPER_AUGMENT), else from $defs/augment."""
    properties = _SCHEMA["$defs"]["augment"]["properties"]
    settings = {key: entry["default"] for key, entry in properties.items()}
    settings.update(PAPER_AUGMENT.get(site, {}))
    settings.update(config["training"]["augment"].get(site, {}))
    return settings


def sites_json():
    """The sites mapping as compact JSON for `--sites` (hipoa.sites.load_sites reads it)."""
    return json.dumps(config["sites"], sort_keys=True, separators=(",", ":"))


def qc_json():
    """The qc limits as compact JSON for `--limits` (hipoa.qc.load_limits reads it)."""
    return json.dumps(config["qc"], sort_keys=True, separators=(",", ":"))


def mask_labels():
    """The sites' mask labels for `hipoa ingest --mask-labels`."""
    return ",".join(str(config["sites"][site]["label"]) for site in SITES)


def config_hash():
    """First 16 hex digits of SHA-256 over the validated config (recorded in the Parquet)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_args(wildcards):
    """`SITE=PATH` pairs for every site's model, for `--model`."""
    return " ".join(f"{site}={model_path(site)}" for site in SITES)


# ---- synth_cohort / ingest ------------------------------------------------------------------


def ingest_input(wildcards):
    """Files ingest waits for: the synthetic cohort or the manifest table (none for patterns),
    and the withdrawal list."""
    files = {}
    if config["inputs"]["manifest"]:
        files["manifest"] = config["inputs"]["manifest"]
    elif config["cohort"]["synthesize"]:
        files["cohort"] = f"{COHORT_DIR}/truth.parquet"
    if config["inputs"]["withdrawn"]:
        files["withdrawn"] = config["inputs"]["withdrawn"]
    return files


def ingest_source(wildcards):
    """`hipoa ingest` flags that say where the inputs are (manifest, else the patterns)."""
    inputs = config["inputs"]
    if inputs["manifest"]:
        return f"--manifest {shlex.quote(inputs['manifest'])}"
    flags = [
        f"--images {shlex.quote(inputs['images'])}",
        f"--points-auto {shlex.quote(inputs['points_auto'])}",
    ]
    if inputs["points_manual"]:
        flags.append(f"--points-manual {shlex.quote(inputs['points_manual'])}")
    if inputs["masks"]:
        flags.append(f"--masks {shlex.quote(inputs['masks'])}")
    return " ".join(flags)


def withdrawn_flag(wildcards):
    """`--withdrawn LIST` for `hipoa ingest` when inputs.withdrawn is set."""
    withdrawn = config["inputs"]["withdrawn"]
    return f"--withdrawn {shlex.quote(withdrawn)}" if withdrawn else ""


def parent_of_truth(wildcards, output):
    """The cohort folder, derived from the truth table's path (`hipoa synth --out`)."""
    return str(Path(output.truth).parent)


def parent_of_scores(wildcards, output):
    """The evaluation folder, derived from the scores JSON's path (`--figures-dir`)."""
    return str(Path(output.scores).parent)


# ---- train_unet / evaluate_unet ---------------------------------------------------------------


def train_unet_input(wildcards):
    """Training data for a trained site; the configured .keras (and its JSON) for a loaded one."""
    load = model_load(wildcards.site)
    if load:
        return {"load": load, "load_card": str(Path(load).with_suffix(".json"))}
    return {
        "stores": TRAINING_STORES,
        "splits": f"results/splits/{wildcards.site}.parquet",
    }


def train_unet_source(wildcards):
    """`hipoa train-unet` flags for the data (trained site) or the model to load (loaded site)."""
    load = model_load(wildcards.site)
    if load:
        return f"--load {shlex.quote(load)}"
    stores = " ".join(TRAINING_STORES)
    return f"--stores {stores} --splits results/splits/{wildcards.site}.parquet"


def train_unet_settings(wildcards):
    """Training and augmentation settings of one site (a param, so a change retrains it), as
    hipoa.train_settings.TrainSettings writes them (a bad value fails here, before submission).
    """
    if model_load(wildcards.site):
        return ""
    values = {**config["training"], **augment(wildcards.site)}
    return TrainSettings.from_mapping(values).command_line()


# ---- predict_masks / phenotypes ---------------------------------------------------------------


def group_dir(side, group):
    """A predict_masks job's output folder: shard-{k}.parquet (and shard-{k}.zarr) of its shards."""
    return f"results/predictions/{side}/group-{group}"


def shard_predictions(side, kind):
    """Every shard's prediction file of ``side`` ("parquet" table or "zarr" masks), in shard order."""
    return [
        f"{group_dir(side, group)}/shard-{shard}.{kind}"
        for group, shards in PREDICT_GROUPS.items()
        for shard in shards
    ]


def predict_group_stores(wildcards):
    """Input function: the patch stores of one predict_masks job's shards."""
    return expand(
        "results/patches/{side}/shard-{shard}.zarr",
        side=wildcards.side,
        shard=PREDICT_GROUPS[wildcards.group],
    )


def predict_group_args(wildcards):
    """`--stores ... --out ... [--masks-out ...]` for the job's shards: one process, models loaded once."""
    shards = PREDICT_GROUPS[wildcards.group]
    out = group_dir(wildcards.side, wildcards.group)
    stores = [f"results/patches/{wildcards.side}/shard-{k}.zarr" for k in shards]
    args = [
        "--stores " + " ".join(stores),
        "--out " + " ".join(f"{out}/shard-{k}.parquet" for k in shards),
    ]
    if config["predictions"]["write_masks"]:
        args.append("--masks-out " + " ".join(f"{out}/shard-{k}.zarr" for k in shards))
    return " ".join(args)


def phenotypes_input(wildcards):
    """Prediction folders, models, the splits of trained sites."""
    return {
        "manifest": f"results/manifest/{wildcards.side}.parquet",
        "predictions": [group_dir(wildcards.side, group) for group in PREDICT_GROUPS],
        "models": [model_path(site) for site in SITES],
        "cards": [model_card(site) for site in SITES],
        "splits": expand("results/splits/{site}.parquet", site=TRAINED_SITES),
    }


def phenotypes_outputs():
    """The label PNG folder, only when predictions.write_masks."""
    if config["predictions"]["write_masks"]:
        return {"masks": directory("results/masks/{side}")}
    return {}


def phenotypes_flags(wildcards):
    """`--predictions` per shard, `--splits` for trained sites, and `--masks-dir --mask-stores`
    when predictions.write_masks."""
    flags = ["--predictions " + " ".join(shard_predictions(wildcards.side, "parquet"))]
    if TRAINED_SITES:
        splits = expand("results/splits/{site}.parquet", site=TRAINED_SITES)
        flags.append("--splits " + " ".join(splits))
    if config["predictions"]["write_masks"]:
        stores = shard_predictions(wildcards.side, "zarr")
        flags.append(f"--masks-dir results/masks/{wildcards.side}")
        flags.append("--mask-stores " + " ".join(stores))
    return " ".join(flags)


# ---- targets ----------------------------------------------------------------------------------


def all_targets():
    """Targets of the default target: phenotype tables per side, evaluations, QC montages, report figures."""
    targets = expand(
        "results/phenotypes/osteophytes_{side}.{ext}", side=SIDES, ext=RELEASE_FILES
    )
    targets += expand("results/phenotypes/osteophytes.{ext}", ext=RELEASE_FILES)
    targets += expand("results/evaluation/{site}.json", site=TRAINED_SITES)
    targets += expand("results/qc/patches_{side}_auto.png", side=SIDES)
    if TRAINED_SITES:
        targets.append(f"results/qc/patches_{config['training']['side']}_manual.png")
    targets += REPORT_FIGURES
    return targets


# What a phenotype table comes with (one side's, or the participants' of both): the Parquet,
# the GWAS files and the dictionary (hipoa.release).
RELEASE_FILES = [
    "parquet",
    "bt.tsv",
    "qt.tsv",
    "covar.tsv",
    "remove.txt",
    "dict.tsv",
]


def release_outputs(stem):
    """The outputs of a phenotype table ``stem`` (results/phenotypes/osteophytes[_{side}])."""
    names = {"parquet": "table", "remove.txt": "remove_list", "dict.tsv": "dictionary"}
    return {names.get(ext, ext.split(".")[0]): f"{stem}.{ext}" for ext in RELEASE_FILES}


REPORT_FIGURES = [
    "results/report/evaluation.html",
    "results/report/qc_counts.html",
    "results/report/areas.png",
    "results/report/prevalence.png",
    "results/report/unfit.png",
]


check_config()


def run_summary():
    """The end-of-run summary Snakemake prints last (the Snakefile's onsuccess): each side's
    phenotype summary (images read, measured, flagged by reason, withdrawn removed, prevalence
    and mean area per site, as `hipoa phenotypes` wrote it) and where the outputs are. Nothing
    when the run built no phenotype table (a partial target)."""
    summaries = [
        Path(f"results/phenotypes/osteophytes_{side}.summary.txt") for side in SIDES
    ]
    summaries = [p for p in summaries if p.is_file()]
    if not summaries:
        return ""
    lines = ["", "=== hipoa: end of run ==="]
    for path in summaries:
        lines += ["", f"--- {path}"] + path.read_text().rstrip("\n").splitlines()
    where = {
        "participant table and GWAS files": "results/phenotypes/osteophytes.{parquet,bt.tsv,qt.tsv,covar.tsv,remove.txt,dict.tsv}",
        "per-side tables": "results/phenotypes/osteophytes_{L,R}.*",
        "evaluation (Table 2 measures)": "results/evaluation/{site}.json",
        "report figures": "results/report/ (snakemake --report results/report.html for the HTML report)",
        "logs": "logs/",
    }
    lines += ["", "outputs:"] + [f"  {what}: {path}" for what, path in where.items()]
    return "\n".join(lines) + "\n"


onsuccess:
    sys.stderr.write(run_summary())
