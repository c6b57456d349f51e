#!/usr/bin/env bash
# The benchmark suite on a GPU in one go (issue 7, part 3): each benchmark under its own time limit, its log (progress
# lines, then the JSON result) written to $OUT/<name>.log as it runs, so a benchmark cut short still leaves its figures.
#
#     OUT=gpu-results bash benchmarks/gpu.sh            # on a machine with a GPU, from the repository root
#
# Wheels in .whl/ (packages the GPU image lacks) are installed to /tmp/site first. SUBJECTS, WORKERS, STEPS and
# ROUNDS size the training benchmark; the defaults fit about 7 minutes on one H100/H200 with 16 CPU cores.
set -u
OUT=${OUT:-benchmarks/gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
export LANDMARK_UNET_BENCH_CACHE=${LANDMARK_UNET_BENCH_CACHE:-/tmp/landmark-unet-bench}
SUBJECTS=${SUBJECTS:-24} WORKERS=${WORKERS:-8} STEPS=${STEPS:-80} ROUNDS=${ROUNDS:-2}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c 'import torch, pytorch_lightning as pl; print("torch", torch.__version__, "lightning", pl.__version__)'
  nproc; } > "$OUT/machine.log" 2>&1
cat "$OUT/machine.log"

bench() {  # bench NAME LOG SECONDS ARGS...: one benchmark module under a time limit
    local name=$1 log=$2 limit=$3
    shift 3
    local t0=$SECONDS
    timeout "$limit" python3 -m "benchmarks.$name" "$@" > "$OUT/$log.log" 2>&1
    echo "== $log: exit $? after $((SECONDS - t0)) s"
    grep -E '^(round|cudnn|compiled|multitask|2d|depth5)' "$OUT/$log.log" | tail -40
}

# STEPS steps of 10 slices each: 80 steps are the study's epoch of 800 slices
# ON_DEVICE=1: first the training benchmark with data.on_device (slices gathered in the GPU's memory), the question
# the last GPU run left (is the host loader what the GPU waits for?); skip the rest with ONLY_ON_DEVICE=1
if [ "${ON_DEVICE:-0}" = 1 ]; then
    bench bench_train train_on_device 240 --subjects "$SUBJECTS" --workers "$WORKERS" --steps "$STEPS" \
        --rounds "$ROUNDS" --no-compile --no-multitask --on-device
    [ "${ONLY_ON_DEVICE:-0}" = 1 ] && exit 0
fi
bench bench_train train 380 --subjects "$SUBJECTS" --workers "$WORKERS" --steps "$STEPS" --rounds "$ROUNDS" \
    --compile-precisions bf16-mixed
bench bench_inference inference_bf16 45 --precision bf16-mixed --batch 64
bench bench_models models 60 --steps 3
bench bench_data data 70 --subjects "$SUBJECTS" --workers "$WORKERS"
bench bench_inference inference_fp16 50 --precision 16-mixed --batch 64
