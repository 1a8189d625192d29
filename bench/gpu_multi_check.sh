#!/usr/bin/env bash
# Data parallelism on a machine with several GPUs: correctness across real devices, then scaling.
# Not yet run: the machines used so far had one GPU (bench/RESULTS-gpu-train.md).
# .devbin/bins.tar.xz must also hold a `distill` built with `--features cuda` (for the processes check).
# Build here and carry .devbin exactly as bench/gpu_parallel_check.sh says, then on the GPU
# machine, from the repository root: OUT=somewhere bash bench/gpu_multi_check.sh
set -u
OUT=${OUT:?set OUT to a folder for the log}
BIN=$(mktemp -d)
tar -xJf .devbin/bins.tar.xz -C "$BIN"
M=tests/fixtures/models/deepseek-r1-distill-qwen-1.5b
N=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
ALL=$(seq -s, 0 $((N - 1)))
{
    nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
    echo "== CUDA test: replicas on GPUs $ALL against one device (tiny model)"
    DISTILL_TEST_CUDA_DEVICES=$ALL DISTILL_STUDENT_DIR=$PWD/student timeout 150 "$BIN/it" cuda_data_parallel --test-threads 1 --nocapture
    echo "exit $?"
    # Scaling: each GPU takes one 4,096-token sequence per step; tokens/s should grow with N.
    for n in 1 2 4 8; do
        [ "$n" -le "$N" ] || break
        devs=$(seq -s, 0 $((n - 1)))
        echo "== train_step: 1.5B shape, 4096 tokens per GPU, GPUs $devs"
        TRAIN_STEP_DEVICES=$devs timeout 150 "$BIN/train_step" cuda $M 4096 1 10 bf16 recompute full \
            | grep -o '"step":[0-9]*\|"tokens_per_s":[0-9.]*' | paste -sd' '
    done
    echo "== processes: one distill process per GPU (torchrun's variables) against one process on GPUs $ALL"
    DEVICE=cuda DISTILL_BIN="$BIN/distill" bash bench/processes_check.sh "$N"
    echo "exit $?"
} 2>&1 | tee "$OUT/gpu_multi_check.log"
