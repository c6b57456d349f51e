#!/usr/bin/env bash
# The benchmark suite on a GPU in one go (issue 7, part 3): each benchmark under its own time limit, its log (progress
# lines, then the JSON result) written to $OUT/<name>.log as it runs, so a benchmark cut short still leaves its figures.
#
#     OUT=gpu-results bash benchmarks/gpu.sh            # on a machine with a GPU, from the repository root
#     PLAN="step train_on_device" OUT=gpu-results bash benchmarks/gpu.sh     # a part of it
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
    grep -E '^(round|cudnn|compiled|multitask|2d|depth5|step|profile|diagnose|Traceback|[A-Za-z]*Error)' "$OUT/$log.log" | tail -40
}

# STEPS steps of 10 slices each: 80 steps are the study's epoch of 800 slices. PLAN names the benchmarks to run, in
# order (default: all of them):
#   step             the training step alone on batches in the GPU's memory (MFU by batch size, CUDA graph, profile)
#   step_compile     the same at batch 10 with torch.compile, eager and captured (profile of the compiled step)
#   step_upconv      batch 10: cuDNN's transposed convolution vs the up-convolution as a 1x1 convolution and a copy
#   train_diagnose   bench_train --diagnose, bf16, data.on_device: synchronising calls and cProfile of both arms
#   train_compiled   bench_train with data.on_device, bf16 only, with the compiled network's Lightning arm
#   train_reduce_overhead  the same in 3 rounds, compiled with mode reduce-overhead (CUDA graphs)
#   train_reduce_overhead_optimizer  the same with the optimiser's update compiled too (model.compile_optimizer)
#   train_reduce_overhead_both  the two above in one run: the compiled network with and without the optimiser's
#                    update compiled, their Lightning arms alternating (optimizer_compile_speedup)
#   train_on_device  bench_train with data.on_device (slices gathered in the GPU's memory), fp32 / bf16 / fp16
#   train            bench_train with the host loader, plus torch.compile (bf16) and the multi-task network
#   train_host       bench_train with the host loader, fp32 and bf16 only, no compile or multi-task (shorter)
#   gradients        bf16 gradient against fp32 (no TF32) on the quick phantom (bench_precision --no-train)
#   inference_bf16, inference_fp16, models, data
PLAN=${PLAN:-step train_on_device train inference_bf16 models data inference_fp16}
for item in $PLAN; do
    case $item in
    step) bench bench_step step 90 --batches 10,20,40 --steps 30 --rounds 2 ;;
    step_compile) bench bench_step step_compile 160 --batches 10 --steps 30 --rounds 2 \
        --variants eager,graph,compiled,compiled_graph ;;
    step_upconv) bench bench_step step_upconv 60 --batches 10 --steps 30 --rounds 3 --no-profile \
        --variants eager,eager_upconv_matrix_product ;;
    train_diagnose) bench bench_train train_diagnose 110 --subjects "$SUBJECTS" --workers "$WORKERS" --steps 40 \
        --on-device --precisions bf16-mixed --diagnose ;;
    train_compiled) bench bench_train train_compiled 150 --subjects "$SUBJECTS" --workers "$WORKERS" \
        --steps "$STEPS" --rounds 1 --no-multitask --on-device --precisions bf16-mixed --compile-precisions bf16-mixed ;;
    train_reduce_overhead) bench bench_train train_reduce_overhead 200 --subjects "$SUBJECTS" --workers "$WORKERS" \
        --steps "$STEPS" --rounds 3 --no-multitask --on-device --precisions bf16-mixed \
        --compile-precisions bf16-mixed --compile-mode reduce-overhead ;;
    train_reduce_overhead_optimizer) bench bench_train train_reduce_overhead_optimizer 260 --subjects "$SUBJECTS" \
        --workers "$WORKERS" --steps "$STEPS" --rounds 3 --no-multitask --on-device --precisions bf16-mixed \
        --compile-precisions bf16-mixed --compile-mode reduce-overhead --compile-optimizer ;;
    train_reduce_overhead_both) bench bench_train train_reduce_overhead_both 300 --subjects "$SUBJECTS" \
        --workers "$WORKERS" --steps "$STEPS" --rounds 3 --no-multitask --on-device --precisions bf16-mixed \
        --compile-precisions bf16-mixed --compile-mode reduce-overhead --compile-optimizer both ;;
    train_on_device) bench bench_train train_on_device 240 --subjects "$SUBJECTS" --workers "$WORKERS" \
        --steps "$STEPS" --rounds "$ROUNDS" --no-compile --no-multitask --on-device ;;
    train) bench bench_train train 380 --subjects "$SUBJECTS" --workers "$WORKERS" --steps "$STEPS" \
        --rounds "$ROUNDS" --compile-precisions bf16-mixed ;;
    train_host) bench bench_train train_host 150 --subjects "$SUBJECTS" --workers "$WORKERS" --steps "$STEPS" \
        --rounds "$ROUNDS" --no-compile --no-multitask --precisions 32-true,bf16-mixed ;;
    inference_bf16) bench bench_inference inference_bf16 120 --precision bf16-mixed --batch 64 ;;  # its compiled arms compile 2 networks
    inference_fp16) bench bench_inference inference_fp16 130 --precision 16-mixed --batch 64 ;;
    gradients) bench bench_precision gradients 90 --no-train ;;
    models) bench bench_models models 60 --steps 3 ;;
    data) bench bench_data data 70 --subjects "$SUBJECTS" --workers "$WORKERS" ;;
    *) echo "unknown PLAN item: $item"; exit 2 ;;
    esac
done
