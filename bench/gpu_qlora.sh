#!/usr/bin/env bash
# QLoRA on one GPU (issue 15): a randomly initialised Llama-3.3-70B-shaped model, made on the
# device layer by layer and quantized to NF4 as it is made (nothing is shipped), trains rank-16
# adapters at 4,096 tokens (bf16 compute, recomputation). Prints each step's tokens/s and the
# GPU allocator's peak beside the memory planner's estimate for the same settings.
#
# Build here (the GPU machine needs no Rust toolchain):
#   cargo build --release -p distill-student --features cuda --example train_step
#   strip -o .device/train_step "$CARGO_TARGET_DIR/release/examples/train_step"
# Then on the GPU machine, from the repository root:  OUT=somewhere bash bench/gpu_qlora.sh
# On a CPU, as a check of the script itself (a small shape):
#   BIN=$CARGO_TARGET_DIR/release/examples/train_step DEVICE=cpu CONFIG=/path/config.json \
#     SEQ=128 STEPS=2 PRECISION=f32 OUT=/tmp/q bash bench/gpu_qlora.sh
set -u
BIN=${BIN:-.device/train_step}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-tests/fixtures/models/llama-3.3-70b/config.json}
SEQ=${SEQ:-4096}
STEPS=${STEPS:-3}
RANK=${RANK:-16}
PRECISION=${PRECISION:-bf16}
LIMIT=${LIMIT:-540}
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"

if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
fi
echo "== distill QLoRA r$RANK ($DEVICE, $CONFIG, $SEQ tokens, $PRECISION, recompute, $STEPS steps)"
if [ "$DEVICE" = cuda ]; then
    # GPU memory over time (the 2026-11-30 run ran out of memory with no figure to show where).
    nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 500 > "$OUT/qlora.mem" &
    SAMPLER=$!
fi
T0=$SECONDS
timeout "$LIMIT" "$BIN" "$DEVICE" "$CONFIG" "$SEQ" 1 "$STEPS" "$PRECISION" recompute "qlora$RANK" \
    2> >(grep -v "backtrace\|RUST_BACKTRACE\|^$" >&2) | tee "$OUT/qlora.jsonl"
echo "exit ${PIPESTATUS[0]} after $((SECONDS - T0)) s"
if [ -n "${SAMPLER:-}" ]; then
    kill "$SAMPLER" 2>/dev/null
    echo "GPU memory: highest $(cut -d, -f2 "$OUT/qlora.mem" | sort -n | tail -1 | tr -d ' '), last samples:"
    tail -3 "$OUT/qlora.mem"
fi

python3 - "$OUT/qlora.jsonl" <<'PY' | tee "$OUT/summary.md"
import json, sys
steps, plan = [], None
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        if "plan_total_gib" in r:
            plan = r
        else:
            steps.append(r)
gib = 2**30
print("| step | loss | step time (s) | tokens/s | peak memory (GiB) |")
print("|---|---|---|---|---|")
for r in steps:
    print(f"| {r['step']} | {r['loss']:.4f} | {r['step_time_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_memory_bytes'] / gib:.2f} |")
if plan and steps:
    peak = max(r["peak_memory_bytes"] for r in steps) / gib
    est = plan["plan_total_gib"]
    print(f"\nplanner estimate {est:.2f} GiB, measured peak {peak:.2f} GiB ({peak / est:.2f}x the estimate)")
PY
