#!/usr/bin/env bash
# Scale rehearsal: a UK Biobank-sized run of both sides, end to end, on this machine
# (issue 14; the figures and the cluster extrapolation are in docs/scale.md).
#
#   benchmarks/rehearsal.sh [--participants N] [--shards S] [--dir DIR] [--cores C]
#                           [--models DIR | --train-config YAML] [--masks]
#                           [--stop-after synth|models|dag]
#
# Defaults: 20,000 participants (40,000 hips, 40,000 images per side), 40 shards per side,
# DIR=rehearsal/ (about 30 GB at the default size). Steps, each skipped when its output exists,
# so rerunning resumes (Snakemake itself skips the jobs that are done):
#
#   1. synthesise the cohort (`hipoa synth`: natural prevalence 0.15, no annotations, one
#      participant in 50 with a planted fault, cycling through the fault kinds): DIR/cohort;
#   2. a withdrawal list (one participant in 200, UKB's format): DIR/withdrawn.txt;
#   3. small U-Nets, trained once on 150 annotated left hips of a cohort of their own
#      (DIR/train; benchmarks/rehearsal_train.yaml over config/demo.yaml, or --train-config)
#      unless --models names a folder with {site}/unet.keras and unet.json: DIR/models;
#   4. the dry run (the DAG build time), then the whole workflow with those models loaded, both
#      sides, the local profile, config/config.yaml's settings otherwise (--masks: also the
#      label PNG of every image, predictions.write_masks): DIR/run;
#   5. the measurements (benchmarks/rehearsal.py measure): per stage wall time, CPU time, peak
#      RSS (max and median over jobs), bytes written, files created; the DAG build time; the time
#      from the last shard to the participant table; and the counts checked against the
#      synthetic truth (rows per side, QC failures by reason, withdrawn participants absent).
#      DIR/rehearsal.json, DIR/rehearsal.md and DIR/rehearsal.png; the exit status is 1 when a
#      count is wrong.
#
# Synthesis and training are timed but are not part of the run's figures. Run from anywhere:
# this checkout's hipoa is used (src/ first on PYTHONPATH), with Snakemake and the packages of
# $PYTHON (default: the `python` on PATH, which the rules also run).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PARTICIPANTS=20000
SHARDS=40
DIR=rehearsal
CORES=all
MODELS=""
TRAIN_CONFIG="$REPO/benchmarks/rehearsal_train.yaml"
WRITE_MASKS=false
STOP_AFTER=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --participants) PARTICIPANTS="$2"; shift 2 ;;
        --shards) SHARDS="$2"; shift 2 ;;
        --dir) DIR="$2"; shift 2 ;;
        --cores) CORES="$2"; shift 2 ;;
        --models) MODELS="$2"; shift 2 ;;
        --train-config) TRAIN_CONFIG="$2"; shift 2 ;;
        --masks) WRITE_MASKS=true; shift ;;
        --stop-after) STOP_AFTER="$2"; shift 2 ;;
        -h|--help) sed -n '2,31p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "rehearsal.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
case "$STOP_AFTER" in
    ""|synth|models|dag) ;;
    *) echo "rehearsal.sh: --stop-after takes synth, models or dag, not $STOP_AFTER" >&2; exit 2 ;;
esac
# This checkout's hipoa, as the workflow's rules run it.
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
TIMINGS="$DIR/timings.tsv"
mapfile -t SITES < <("$PY" -c 'from hipoa.sites import DEFAULT_SITES; print(*(s.name for s in DEFAULT_SITES), sep="\n")')

log() { echo "$(date '+%H:%M:%S') rehearsal: $*" >&2; }
# step NAME COMMAND...: run COMMAND, append "NAME <tab> seconds" to DIR/timings.tsv.
# A failed run's time is recorded too (a resumed phase's time is the sum of its runs).
step() {
    local name="$1" t0 t1 ds rc=0
    shift
    log "$name: $*"
    t0=$(date +%s%N)
    "$@" || rc=$?
    t1=$(date +%s%N)
    ds=$(( (t1 - t0) / 100000000 ))  # tenths of a second
    printf '%s\t%d.%d\n' "$name" $((ds / 10)) $((ds % 10)) >> "$TIMINGS"
    if [[ $rc -ne 0 ]]; then
        log "$name failed (exit $rc) after $((ds / 10)) s; rerun the same command to resume"
        exit "$rc"
    fi
    log "$name done in $((ds / 10)) s"
}

log "$PARTICIPANTS participants ($((2 * PARTICIPANTS)) images), $SHARDS shards per side, in $DIR"

# 1. The cohort. Its stamp is written once synthesis has finished: a cohort without one is
# incomplete and made again (with a new withdrawal list); one of another size is refused.
COHORT="participants=$PARTICIPANTS seed=14 faults=$(( (PARTICIPANTS + 49) / 50 ))"
STAMP="$DIR/cohort/rehearsal-cohort.txt"
if [[ -f "$STAMP" && "$(cat "$STAMP")" != "$COHORT" ]]; then
    echo "rehearsal.sh: $DIR holds a cohort of $(cat "$STAMP"), not $COHORT; give another --dir" >&2
    exit 2
fi
if [[ ! -f "$STAMP" ]]; then
    rm -rf "$DIR/cohort" "$DIR/withdrawn.txt"
    step synth "$PY" -m hipoa synth --out "$DIR/cohort" --participants "$PARTICIPANTS" --seed 14 \
        --annotated-fraction 0 --prevalence 0.15 --faults $(( (PARTICIPANTS + 49) / 50 ))
    echo "$COHORT" > "$STAMP"
fi

[[ "$STOP_AFTER" == synth ]] && exit 0

# 2. The withdrawal list.
if [[ ! -f "$DIR/withdrawn.txt" ]]; then
    "$PY" "$REPO/benchmarks/rehearsal.py" withdraw --truth "$DIR/cohort/truth.parquet" \
        --out "$DIR/withdrawn.txt"
fi

# 3. The models: given, or trained once.
if [[ -n "$MODELS" ]]; then
    for site in "${SITES[@]}"; do
        mkdir -p "$DIR/models/$site"
        # -p: the same times on every rerun, or Snakemake would predict again
        cp -p "$MODELS/$site/unet.keras" "$MODELS/$site/unet.json" "$DIR/models/$site/"
    done
elif [[ ! -f "$DIR/models/${SITES[-1]}/unet.json" ]]; then
    mkdir -p "$DIR/train"
    cp "$TRAIN_CONFIG" "$DIR/train/config.yaml"
    targets=()
    for site in "${SITES[@]}"; do targets+=("results/models/$site/unet.keras"); done
    step train "$PY" -m snakemake --snakefile "$REPO/Snakefile" --profile "$REPO/profiles/local" \
        --directory "$DIR/train" --configfile "$REPO/config/demo.yaml" "$DIR/train/config.yaml" --cores "$CORES" \
        "${targets[@]}" --quiet rules
    for site in "${SITES[@]}"; do
        mkdir -p "$DIR/models/$site"
        cp "$DIR/train/results/models/$site/unet.keras" "$DIR/train/results/models/$site/unet.json" \
            "$DIR/models/$site/"
    done
fi

[[ "$STOP_AFTER" == models ]] && exit 0

# 4. The run: its config, the dry run, the workflow.
mkdir -p "$DIR/run"
"$PY" "$REPO/benchmarks/rehearsal.py" config --dir "$DIR" --shards "$SHARDS" \
    --write-masks "$WRITE_MASKS" --out "$DIR/run/rehearsal.yaml"
snake=("$PY" -m snakemake --snakefile "$REPO/Snakefile" --profile "$REPO/profiles/local"
       --directory "$DIR/run" --configfile "$DIR/run/rehearsal.yaml" --cores "$CORES")
step dag "${snake[@]}" --dry-run --quiet rules
[[ "$STOP_AFTER" == dag ]] && exit 0
step run "${snake[@]}" --quiet rules
step report "${snake[@]}" --quiet rules --report results/report.html

# 5. The measurements and the counts.
"$PY" "$REPO/benchmarks/rehearsal.py" measure --dir "$DIR"
