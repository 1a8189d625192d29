#!/usr/bin/env bash
# N distill processes started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK,
# MASTER_ADDR, MASTER_PORT), one device each, against one process training on N devices:
# the tiny imported pipeline of tests/e2e/processes.rs, 8 steps. Prints both runs' losses
# and the largest difference between their final weights (0 on the CPU, where both sums are
# the same additions in the same order; on GPUs, autotuned kernels may differ per process).
#
#   bash bench/processes_check.sh [N]                      # CPU, the debug build
#   DEVICE=cuda DISTILL_BIN=path/to/distill bash bench/processes_check.sh 8
set -euo pipefail
N=${1:-2}
DEVICE=${DEVICE:-cpu}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${DISTILL_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/distill-target}/debug/distill}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/distill-processes.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
DEVS=$(seq -s, 0 $((N - 1)))
setup() { # folder, extra train keys
    mkdir -p "$1/published/data" "$1/model"
    cp "$ROOT"/tests/fixtures/datasets/openr1-math/data/*.parquet "$1/published/data/"
    cp "$ROOT"/student/tests/fixtures/parity/qwen2-tied/{config.json,model.safetensors,generation_config.json} "$1/model/"
    cp "$ROOT"/tests/fixtures/tokenizers/minimind/tokenizer{,_config}.json "$1/model/"
    cat > "$1/pipeline.toml" <<TOML
[run]
name = "dist"

[[stage]]
name = "r1math"
kind = "import"
preset = "openr1-math"
path = "published/data/train-*.parquet"

[[stage]]
name = "verified"
kind = "verify"
needs = ["r1math"]

[[stage]]
name = "student"
kind = "train"
needs = ["verified"]
base_model = "model"
device = "$DEVICE"
max_steps = 8
learning_rate = 1e-3
micro_batch = { sequences = 1 }
grad_accum = $N
max_seq_len = 256
seed = 3
$2
TOML
}
setup "$WORK/one" "devices = [$DEVS]"
setup "$WORK/many" ""
(cd "$WORK/one" && "$BIN" run pipeline.toml >/dev/null 2>"$WORK/one.err") || { tail -5 "$WORK/one.err"; exit 1; }
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for r in $(seq 0 $((N - 1))); do
    (cd "$WORK/many" && WORLD_SIZE=$N RANK=$r LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT \
        "$BIN" run pipeline.toml >"$WORK/rank$r.out" 2>"$WORK/rank$r.err") &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
if [ $status -ne 0 ]; then tail -5 "$WORK"/rank*.err; exit 1; fi
python3 - "$WORK" "$N" <<'PY'
import json, sqlite3, struct, sys
work, n = sys.argv[1], sys.argv[2]
def losses(d):
    return [r[0] for r in sqlite3.connect(f"{work}/{d}/distill.db").execute("SELECT loss FROM train_metrics ORDER BY step")]
def tensors(d):
    raw = open(f"{work}/{d}/runs/dist/student/final/model.safetensors", "rb").read()
    k = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + k])
    out = {}
    for name, t in head.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        body = raw[8 + k + a:8 + k + b]
        fmt = {"F32": "f", "F16": "e"}.get(t["dtype"])
        out[name] = struct.unpack(f"<{len(body) // struct.calcsize(fmt)}{fmt}", body) if fmt else body
    return out
a, b = losses("one"), losses("many")
print("losses, one process:", " ".join(f"{x:.6f}" for x in a))
print(f"losses, {n} processes:", " ".join(f"{x:.6f}" for x in b))
ta, tb = tensors("one"), tensors("many")
worst = max(max((abs(x - y) for x, y in zip(ta[k], tb[k])), default=0.0) for k in ta)
print(f"RESULT processes: {n} processes vs one process on {n} devices: max |loss diff| "
      f"{max(abs(x - y) for x, y in zip(a, b)):.2e}, max |weight diff| {worst:.2e}")
PY
