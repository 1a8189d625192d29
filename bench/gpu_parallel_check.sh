#!/usr/bin/env bash
# GPU checks of data parallelism and of the matrix products under training, on one GPU.
# Build here (the GPU machine has no Rust toolchain), then carry .devbin:
#   cargo test -p distill-student --features cuda --test it --no-run       # -> target/debug/deps/it-*
#   cargo build --release -p distill-student --features cuda --example train_step --example matmul_bench
#   strip the three into .device/, then: tar -cJf .devbin/bins.tar.xz -C .device it matmul_bench train_step
# On the GPU machine, from the repository root: OUT=somewhere bash bench/gpu_parallel_check.sh
# Results: bench/RESULTS-gpu-train.md.
set -u
OUT=${OUT:?set OUT to a folder for the log}
BIN=$(mktemp -d)
tar -xJf .devbin/bins.tar.xz -C "$BIN"
export PYTHONUNBUFFERED=1
M=tests/fixtures/models/deepseek-r1-distill-qwen-1.5b
{
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    echo "== CUDA test: two replicas sharing GPU 0 against one device (tiny model)"
    DISTILL_STUDENT_DIR=$PWD/student timeout 100 "$BIN/it" cuda_data_parallel --test-threads 1 --nocapture
    echo "exit $?"
    echo "== train_step: 1.5B shape, 2 replicas sharing GPU 0 (the failure of the threaded version)"
    TRAIN_STEP_DEVICES=0,0 timeout 100 "$BIN/train_step" cuda $M 1024 1 8 bf16 recompute full
    echo "exit $?"
    echo "== bf16 matrix products on the 1.5B training shapes, CubeCL autotuning at its fullest"
    CUBECL_AUTOTUNE_LEVEL=full timeout 100 "$BIN/matmul_bench" cuda bf16
    echo "exit $?"
    echo "== train_step: 1.5B shape at 4096 tokens, recompute, CubeCL autotuning at its fullest"
    CUBECL_AUTOTUNE_LEVEL=full timeout 110 "$BIN/train_step" cuda $M 4096 1 8 bf16 recompute full
    echo "exit $?"
} 2>&1 | tee "$OUT/gpu_parallel_check.log"
