#!/usr/bin/env bash
# GPU training throughput: distill's trainer (Burn, CUDA) against PyTorch + transformers on the
# same GPU, the same model shape and the same step, in one run. Results: bench/RESULTS-gpu-train.md.
#
# Build here (the GPU machine needs no Rust toolchain):
#   cargo build --release -p distill-student --features cuda --example train_step
#   strip -o .device/train_step "$CARGO_TARGET_DIR/release/examples/train_step"
# Then, on the GPU machine, from the repository root:  OUT=somewhere bash bench/gpu_train.sh
# (bench/gpu_kernels_check.sh runs it after the CUDA tests and the matrix-product benchmark).
# Each run trains a randomly initialised DeepSeek-R1-Distill-Qwen-1.5B-shaped model (untied,
# 1.78B parameters, the same seeded weights in every Burn run) on batch x SEQ tokens (SEQ/8 of
# them prompt, masked), bf16 compute with f32 master weights and AdamW state, global-norm
# clipping. Burn runs with cuBLASLt products (with and without per-layer recomputation) and with
# CubeCL's untuned kernel (recomputation; Burn's own autotuned ops with WITH_AUTOTUNED=1);
# PyTorch with SDPA (flash attention) likewise. BUDGET (seconds, default 420) bounds the whole script: a run that would
# not fit in what is left is skipped and said so, and the report is always written.
set -u
BIN=${BIN:-.device/train_step}
CONFIG=tests/fixtures/models/deepseek-r1-distill-qwen-1.5b
SEQ=${SEQ:-4096}
BATCH=1
OUT=${OUT:?set OUT to a folder for the results}
BUDGET=${BUDGET:-420}
LOGS=$(mktemp -d)
export PYTHONUNBUFFERED=1
START=$SECONDS

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOGS/gpu.txt"
printf '{"config": "%s/config.json", "seq": %d, "batch": %d}\n' "$CONFIG" "$SEQ" "$BATCH" > "$LOGS/meta.json"
python3 bench/gpu_train_report.py peak | tee "$LOGS/peak.json"

# run NAME SECONDS COMMAND...: the command's output in NAME.log, GPU memory samples in NAME.mem.
run() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped, ${left} s of the budget left"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit $limit s)"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$LOGS/$name.mem" &
    local sampler=$!
    local t0=$SECONDS
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    echo "exit $? after $((SECONDS - t0)) s"
    kill $sampler 2>/dev/null
    wait $sampler 2>/dev/null
    grep -v '^{"step"' "$LOGS/$name.log" | tail -3
}

P=$((SEQ / 8))
run torch-sdpa-recompute 60 python3 bench/torch_gpu_train.py $CONFIG --seq $SEQ --prompt $P --steps 20 --recompute
run torch-sdpa-plain 60 python3 bench/torch_gpu_train.py $CONFIG --seq $SEQ --prompt $P --steps 20
run burn-cublaslt-recompute 100 env DISTILL_GEMM=cublaslt "$BIN" cuda $CONFIG $SEQ $BATCH 20 bf16 recompute full
run burn-cublaslt-plain 80 env DISTILL_GEMM=cublaslt "$BIN" cuda $CONFIG $SEQ $BATCH 12 bf16 plain full
run burn-cubecl-untuned-recompute 75 env DISTILL_GEMM=cubecl-untuned "$BIN" cuda $CONFIG $SEQ $BATCH 20 bf16 recompute full
# Burn's own autotuned ops: the first step autotunes every shape (over 103 s on 2026-11-30 with
# an empty cache), so only with WITH_AUTOTUNED=1.
if [ "${WITH_AUTOTUNED:-0}" = 1 ]; then
    run burn-cubecl-recompute 240 env DISTILL_GEMM=cubecl "$BIN" cuda $CONFIG $SEQ $BATCH 20 bf16 recompute full
fi

python3 bench/gpu_train_report.py report "$LOGS" | tee "$OUT/report.md"
tar -czf "$OUT/logs.tgz" -C "$LOGS" .
