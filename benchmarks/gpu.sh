#!/usr/bin/env bash
# GPU benchmark (issue 11, item 6), one prepared script for a lent GPU machine, a few minutes on an H200:
#   1. training a paper-size U-Net (depth 4, 64 base filters, mixed_bfloat16) for STEPS steps from the
#      real training input and from a constant batch (the bound): samples/s of each and the ratio
#      (goal >= 0.8);
#   2. predicting N_PREDICT (120,000) patches end to end from a Zarr store with `hipoa predict-masks`
#      (model load, reads, inference, presence, areas, Parquet): seconds (goal <= 60).
# Run from the repository root:  bash benchmarks/gpu.sh
# Tiny CPU check:  STEPS=3 WARMUP=1 IMAGES=16 DEPTH=1 FILTERS=4 N_PREDICT=256 bash benchmarks/gpu.sh
set -euo pipefail

STEPS=${STEPS:-200}          # timed training steps per input
WARMUP=${WARMUP:-10}         # untimed steps per input first (tracing, autotuning)
BATCH=${BATCH:-32}           # train_site's default batch size
IMAGES=${IMAGES:-1500}       # training contexts in memory (a site's training set, ~140 MB)
N_AUGMENT=${N_AUGMENT:-7}
DEPTH=${DEPTH:-4}
FILTERS=${FILTERS:-64}
POLICY=${POLICY:-mixed_bfloat16}
N_PREDICT=${N_PREDICT:-120000}
PREDICT_BATCH=${PREDICT_BATCH:-512}   # patches per model call (config predictions.batch_size)
WORK=${WORK:-$(mktemp -d)}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"
echo "== training: real input vs constant batch"
python benchmarks/gpu_train.py train --steps "$STEPS" --warmup "$WARMUP" --batch-size "$BATCH" --images "$IMAGES" \
    --n-augment "$N_AUGMENT" --depth "$DEPTH" --base-filters "$FILTERS" --policy "$POLICY"

echo "== predict: $N_PREDICT patches end to end"
python benchmarks/gpu_train.py store --n "$N_PREDICT" --out "$WORK/shard-0000.zarr" --model "$WORK/unet.keras" \
    --depth "$DEPTH" --base-filters "$FILTERS"
start=$(date +%s.%N)
hipoa predict-masks --store "$WORK/shard-0000.zarr" --model "lateral_acetabulum=$WORK/unet.keras" \
    --out "$WORK/shard-0000.parquet" --batch-size "$PREDICT_BATCH" 2> "$WORK/predict.log" || { tail -20 "$WORK/predict.log"; exit 1; }
end=$(date +%s.%N)
rows=$(python -c "import pandas as pd, sys; print(len(pd.read_parquet(sys.argv[1])))" "$WORK/shard-0000.parquet")
python -c "import sys; s = float(sys.argv[2]) - float(sys.argv[1]); n = int(sys.argv[3]); \
print(f'predict-masks: {n:,} patches in {s:.1f} s end to end ({n / s:,.0f} patches/s)')" "$start" "$end" "$rows"
tail -3 "$WORK/predict.log"
