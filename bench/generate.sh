#!/usr/bin/env bash
# Throughput of the teacher client and of the `generate` stage against the fake R1
# server at zero latency, with a Python asyncio baseline against the same server.
#
#   bash bench/generate.sh            # ~16 KB responses, 64 and 256 chunks, C = 64 and 512
#
# Loopback only; everything it starts is stopped on exit (trap), scratch files live
# in a temp dir that is removed. Knobs (environment):
#   BENCH_N=20000            prompts (= samples) per stage and aiohttp measurement
#   BENCH_CHUNKS="64 256"    SSE content events per response (one fake server each)
#   BENCH_CONCURRENCY="64 512"
#   BENCH_BYTES=16384        reasoning + answer bytes per sample
#   BENCH_OPENAI_N=1000      samples for the `openai`-package baseline (0: skip)
#   BENCH_STEP_TIMEOUT=240   seconds any single measurement may take
#   BENCH_DIAG=0             1: also run the stage twice more with the job database's
#                            `teacher_cache` table altered before the run (as a rowid
#                            table; as a view that drops writes), to show what the
#                            response cache costs. Diagnostic only, not shipped behaviour.
#
# Per measurement it reports completed samples/s and CPU seconds per 1,000 samples
# (user+sys) of the measured process, and the fake server's CPU per 1,000 samples
# over the same interval: the server shares the same cores, so it caps everything.
set -euo pipefail

N=${BENCH_N:-20000}
CHUNKS=${BENCH_CHUNKS:-"64 256"}
CONCURRENCY=${BENCH_CONCURRENCY:-"64 512"}
BYTES=${BENCH_BYTES:-16384}
OPENAI_N=${BENCH_OPENAI_N:-1000}
STEP_TIMEOUT=${BENCH_STEP_TIMEOUT:-240}
DIAG=${BENCH_DIAG:-0}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/distill-target}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$CARGO_TARGET_DIR/release
PY=${PYTHON:-python3}
TCK=$(getconf CLK_TCK)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/distill-bench-gen.XXXXXX")
SERVER_PID=""
stop_server() {
    if [[ -n $SERVER_PID ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}
cleanup() {
    stop_server
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '%s\n' "$*" >&2; }
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- build ------------------------------------------------------------------
log "== building (release) in $CARGO_TARGET_DIR"
if ! (cd "$ROOT" && cargo build --release --locked -p distill --bin distill \
    && cargo build --release --locked -p distill-fake-teacher --bin fake-teacher \
    && cargo build --release --locked -p distill-teacher --example throughput) > "$WORK/build.log" 2>&1; then
    tail -40 "$WORK/build.log" >&2; exit 1
fi
for b in "$BIN/distill" "$BIN/fake-teacher" "$BIN/examples/throughput"; do
    [[ -x $b ]] || { log "missing $b"; exit 1; }
done
BASELINES="aiohttp"
if ! "$PY" -c 'import aiohttp' 2>/dev/null; then
    log "python aiohttp missing: pip install aiohttp"; exit 1
fi
if [[ $OPENAI_N -gt 0 ]] && "$PY" -c 'import openai' 2>/dev/null; then
    BASELINES="aiohttp openai"
else
    log "(skipping the openai-package baseline: BENCH_OPENAI_N=0 or not installed)"
fi

# ---- inputs -----------------------------------------------------------------
"$PY" - "$WORK/prompts.jsonl" "$N" <<'EOF'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        f.write(json.dumps({"problem": f"Problem {i}: what is {i} squared?", "answer": str(i * i)}) + "\n")
EOF
head -n "$OPENAI_N" "$WORK/prompts.jsonl" > "$WORK/prompts-openai.jsonl"

RESULTS=$WORK/results.tsv
: > "$RESULTS"

server_ticks() { awk '{print $14 + $15}' "/proc/$SERVER_PID/stat"; }

start_server() { # chunks
    "$BIN/fake-teacher" --host 127.0.0.1 --port 0 --response-bytes "$BYTES" \
        --chunks "$1" --format reasoning-content > "$WORK/server.out" 2> "$WORK/server.err" &
    SERVER_PID=$!
    for _ in $(seq 100); do
        URL=$(grep -o 'http://[^ ]*' "$WORK/server.out" 2>/dev/null || true)
        [[ -n $URL ]] && return 0
        sleep 0.05
    done
    log "fake-teacher did not start"; cat "$WORK/server.err" >&2; exit 1
}

# run_timed OUTFILE CMD... : runs CMD under /usr/bin/time and a timeout; sets
# WALL and CPU (user+sys of CMD and its children) and SRV_CPU (server, same interval).
run_timed() {
    local out=$1; shift
    local t0; t0=$(server_ticks)
    if ! /usr/bin/time -f '%e %U %S' -o "$WORK/time" timeout "$STEP_TIMEOUT" "$@" > "$out" 2>&1; then
        log "FAILED (or timed out after ${STEP_TIMEOUT}s): $*"; tail -20 "$out" >&2; exit 1
    fi
    local t1; t1=$(server_ticks)
    read -r WALL U S < <(tail -1 "$WORK/time")
    CPU=$(awk -v u="$U" -v s="$S" 'BEGIN{printf "%.2f", u + s}')
    SRV_CPU=$(awk -v a="$t0" -v b="$t1" -v t="$TCK" 'BEGIN{printf "%.2f", (b - a) / t}')
}

record() { # chunks conc what samples rate cpu srv_cpu_per_1000
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$RESULTS"
    log "   $3: $5 samples/s, $6 CPU s/1000 samples (server $7 CPU s/1000)"
}

per1000() { awk -v c="$1" -v n="$2" 'BEGIN{printf "%.3f", c * 1000 / n}'; }

# run_stage CHUNKS CONC LABEL [rowid|off]: a scratch dir, a load -> generate
# pipeline, one `distill run`; checks the database holds N ok samples.
run_stage() {
    local K=$1 C=$2 LABEL=$3 ALTER=${4:-}
    local D=$WORK/stage-$K-$C
    rm -rf "$D"; mkdir -p "$D"
    if [[ -n $ALTER ]]; then
        # Diagnostic variants: let distill create the job database (migrations),
        # then replace `teacher_cache` before the measured run.
        printf '[run]\nname = "init"\ndb = "bench.db"\n[[stage]]\nname = "p"\nkind = "load"\npath = "%s"\n' \
            "$WORK/prompts-openai.jsonl" > "$D/init.toml"
        (cd "$D" && "$BIN/distill" run init.toml > "$D/init.out" 2>&1)
        "$PY" "$ROOT/bench/generate_check.py" alter "$D/bench.db" "$ALTER"
    fi
    cat > "$D/pipeline.toml" <<EOF
[run]
name = "bench"
db = "bench.db"

[teacher.bench]
base_url = "$URL"
model = "fake-r1"
max_concurrency = $C

[[stage]]
name = "prompts"
kind = "load"
path = "$WORK/prompts.jsonl"

[[stage]]
name = "traces"
kind = "generate"
needs = ["prompts"]
teacher = "bench"
samples_per_prompt = 1
prompt_template = "{prompt}"
EOF
    (cd "$D" && run_timed "$D/run.out" "$BIN/distill" run pipeline.toml
     echo "$WALL $CPU $SRV_CPU" > "$D/measured")
    read -r WALL CPU SRV_CPU < "$D/measured"
    "$BIN/distill" status bench --db "$D/bench.db" --json > "$D/status.json"
    "$PY" "$ROOT/bench/generate_check.py" count "$D/bench.db" "$D/status.json" > "$D/check"
    read -r OK AVG GEN_MS < "$D/check"
    if [[ $OK -ne $N ]]; then log "stage wrote $OK ok rows, expected $N"; exit 1; fi
    local DB_MB=$(( $(stat -c %s "$D/bench.db") / 1000000 ))
    local RATE RATE_WALL
    RATE=$(awk -v n="$N" -v ms="$GEN_MS" 'BEGIN{printf "%.0f", n * 1000 / ms}')
    RATE_WALL=$(awk -v n="$N" -v w="$WALL" 'BEGIN{printf "%.0f", n / w}')
    record "$K" "$C" "$LABEL" "$N" "$RATE" "$(per1000 "$CPU" "$N")" "$(per1000 "$SRV_CPU" "$N")"
    log "      ($OK ok rows of ~$AVG B, db ${DB_MB} MB; generate stage ${GEN_MS} ms;" \
        "whole process ${WALL}s wall = $RATE_WALL samples/s, ${CPU}s CPU incl. load stage)"
    rm -rf "$D"
}

for K in $CHUNKS; do
    start_server "$K"
    log "== fake-teacher $URL: ~$BYTES B per response in $K chunks"
    for C in $CONCURRENCY; do
        log "-- concurrency $C"

        # (a) the client alone: N samples after a warm-up of 2C (counted in CPU).
        run_timed "$WORK/client.out" "$BIN/examples/throughput" "$N" "$C" "$BYTES" "$K" "$URL"
        RATE=$(grep -o '[0-9.]* samples/s' "$WORK/client.out" | awk '{printf "%.0f", $1}')
        record "$K" "$C" client "$N" "$RATE" "$(per1000 "$CPU" $((N + 2 * C)))" \
            "$(per1000 "$SRV_CPU" $((N + 2 * C)))"

        # (b) the whole stage: load -> generate into SQLite, one `distill run`.
        run_stage "$K" "$C" stage
        if [[ $DIAG == 1 ]]; then
            run_stage "$K" "$C" "stage, cache rowid" rowid
            run_stage "$K" "$C" "stage, cache off" off
        fi

        # (c) the Python baselines, same prompts, same server.
        for B in $BASELINES; do
            if [[ $B == openai ]]; then P=$WORK/prompts-openai.jsonl; M=$OPENAI_N; else P=$WORK/prompts.jsonl; M=$N; fi
            rm -f "$WORK/out.jsonl"
            run_timed "$WORK/py.out" "$PY" "$ROOT/bench/generate_baseline.py" --client "$B" \
                "$URL" "$P" "$WORK/out.jsonl" "$C"
            read -r PWALL PCPU < <("$PY" -c 'import json,sys; d=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print(d["wall_s"], d["cpu_s"])' "$WORK/py.out")
            LINES=$(wc -l < "$WORK/out.jsonl")
            if [[ $LINES -ne $M ]]; then log "$B wrote $LINES lines, expected $M"; exit 1; fi
            RATE=$(awk -v n="$M" -v w="$PWALL" 'BEGIN{printf "%.0f", n / w}')
            record "$K" "$C" "python-$B" "$M" "$RATE" "$(per1000 "$PCPU" "$M")" "$(per1000 "$SRV_CPU" "$M")"
        done
        rm -f "$WORK/out.jsonl"
    done
    stop_server
done

# ---- report -----------------------------------------------------------------
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
{
    echo
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (working tree modified)')"
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); load average at start $LOAD_START, at end $LOAD_END"
    echo "python: $("$PY" -c 'import sys, aiohttp; print(sys.version.split()[0], "aiohttp", aiohttp.__version__)')$("$PY" -c 'import openai; print(", openai", openai.__version__)' 2>/dev/null || true)"
}
"$PY" - "$RESULTS" "$BYTES" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print(f"~{sys.argv[2]} B streamed responses, zero latency, loopback; CPU = user+sys of the measured process;")
print("server = the fake teacher's CPU over the same interval (it shares the cores).")
print()
print("| chunks | C | what | samples | samples/s | CPU s / 1k samples | server CPU s / 1k |")
print("|---:|---:|---|---:|---:|---:|---:|")
for k, c, what, n, rate, cpu, srv in rows:
    print(f"| {k} | {c} | {what} | {n} | {rate} | {cpu} | {srv} |")
print()
print("| chunks | C | stage samples/s | ÷ aiohttp samples/s | aiohttp CPU ÷ stage CPU | stage ÷ openai samples/s |")
print("|---:|---:|---:|---:|---:|---:|")
by = {}
for k, c, what, n, rate, cpu, srv in rows:
    by[(k, c, what)] = (float(rate), float(cpu))
for k, c in dict.fromkeys((r[0], r[1]) for r in rows):
    s = by.get((k, c, "stage"))
    a = by.get((k, c, "python-aiohttp"))
    o = by.get((k, c, "python-openai"))
    if not (s and a):
        continue
    oo = f"{s[0] / o[0]:.1f}×" if o else "-"
    print(f"| {k} | {c} | {s[0]:.0f} | {s[0] / a[0]:.2f}× | {a[1] / s[1]:.2f}× | {oo} |")
EOF
