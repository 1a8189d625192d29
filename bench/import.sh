#!/usr/bin/env bash
# Import throughput: OpenR1-Math-layout Parquet shards recorded by an `import` stage
# (every trace committed to SQLite), on 2 cores (taskset), with the release binary.
#
#   bash bench/import.sh                  # 100,000 rows x 2 traces of ~2 KB, 4 shards
#   BENCH_BYTES=16384 bash bench/import.sh
#
# Knobs: BENCH_ROWS (100000), BENCH_TRACES (traces per row, 2), BENCH_BYTES (bytes per
# trace, 2048), BENCH_SHARDS (4), BENCH_CORES (0,1). The figure is traces / wall time of
# the whole `distill run`: reading, checking and hashing the files while fingerprinting,
# then decoding them again and committing every prompt and trace.
set -euo pipefail
ROWS=${BENCH_ROWS:-100000}
TRACES=${BENCH_TRACES:-2}
BYTES=${BENCH_BYTES:-2048}
SHARDS=${BENCH_SHARDS:-4}
CORES=${BENCH_CORES:-0,1}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/distill-target}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/distill-bench-import.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
python3 -c "import pyarrow" 2>/dev/null || python3 -m pip install --quiet pyarrow
(cd "$ROOT" && cargo build --release --locked --bin distill)
python3 "$ROOT/bench/make_import_data.py" "$WORK" "$ROWS" "$TRACES" "$BYTES" "$SHARDS"
cat > "$WORK/pipeline.toml" <<TOML
[run]
name = "bench"

[[stage]]
name = "r1math"
kind = "import"
preset = "openr1-math"
path = "data/train-*.parquet"
TOML
cd "$WORK"
# The shards were just written: flush them first, or their write-back to disk runs during
# the import and competes with its own.
sync
start=$(date +%s.%N)
taskset -c "$CORES" "$CARGO_TARGET_DIR/release/distill" run pipeline.toml >/dev/null 2>"$WORK/log"
end=$(date +%s.%N)
traces=$(sqlite3 distill.db "SELECT COUNT(*) FROM generations" 2>/dev/null \
  || python3 -c "import sqlite3; print(sqlite3.connect('distill.db').execute('SELECT COUNT(*) FROM generations').fetchone()[0])")
python3 - "$traces" "$start" "$end" "$BYTES" "$(du -sh data | cut -f1)" <<'PY'
import sys
n, start, end, size, disk = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
s = end - start
print(f"RESULT import: {n} traces of ~{size} B ({disk} of Parquet) in {s:.2f} s on 2 cores: {n / s:,.0f} traces/s")
PY
