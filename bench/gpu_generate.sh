#!/usr/bin/env bash
# Decoding throughput on one GPU: distill's continuous-batching generator (Burn, CUDA) beside
# transformers' `generate` on the same GPU, the same model shape and prompts, in one run
# (issue 14: the 1.5B shape at batch 1, 32 and 256; batch 256 should give >= 40x batch 1).
#
# Build here (the GPU machine needs no Rust toolchain):
#   cargo build --release -p distill-student --features cuda --example generation_bench
#   strip -o .device/generation_bench "$CARGO_TARGET_DIR/release/examples/generation_bench"
# Then on the GPU machine, from the repository root:  OUT=somewhere bash bench/gpu_generate.sh
# On a CPU, as a check of the script itself:
#   BIN=$CARGO_TARGET_DIR/release/examples/generation_bench DEVICE=cpu PRESET=tiny \
#     DTYPE=f32 BATCHES="1 8" NEW_TOKENS=16 OUT=/tmp/g bash bench/gpu_generate.sh
set -u
BIN=${BIN:-.device/generation_bench}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-1.5b}
DTYPE=${DTYPE:-bf16}
BATCHES=${BATCHES:-"1 32 256"}
NEW_TOKENS=${NEW_TOKENS:-128}
LIMIT=${LIMIT:-240}
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
fi
echo "== distill ($DEVICE, $PRESET, $DTYPE, batches $BATCHES, $NEW_TOKENS new tokens)"
GEN_BENCH_PREFILL=0 GEN_BENCH_BATCHES="$BATCHES" GEN_BENCH_NEW_TOKENS="$NEW_TOKENS" \
    timeout "$LIMIT" "$BIN" "$DEVICE" "$PRESET" "$DTYPE" | tee "$OUT/distill.jsonl"
echo "exit ${PIPESTATUS[0]}"
echo "== transformers"
timeout "$LIMIT" python3 bench/torch_generate.py "$DEVICE" "$PRESET" "$DTYPE" "$BATCHES" "$NEW_TOKENS" \
    | tee "$OUT/transformers.jsonl"
echo "exit ${PIPESTATUS[0]}"

python3 - "$OUT/distill.jsonl" "$OUT/transformers.jsonl" <<'PY' | tee "$OUT/summary.md"
import json, sys
def rates(path):
    out = {}
    for line in open(path):
        if line.startswith("{"):
            r = json.loads(line)
            if r["phase"] == "decode":
                out[r["batch"]] = r["tokens_per_s"]
    return out
ours, theirs = rates(sys.argv[1]), rates(sys.argv[2])
print("| batch | distill tokens/s | vs distill batch 1 | transformers tokens/s | distill / transformers |")
print("|---|---|---|---|---|")
for b in sorted(set(ours) | set(theirs)):
    o, t = ours.get(b), theirs.get(b)
    scale = f"{o / ours[1]:.1f}x" if o and ours.get(1) else "-"
    ratio = f"{o / t:.2f}x" if o and t else "-"
    print(f"| {b} | {o if o else '-'} | {scale} | {t if t else '-'} | {ratio} |")
PY
