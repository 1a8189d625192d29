#!/usr/bin/env bash
# Near-duplicate detection: distill-curate (Rust) vs datasketch MinHashLSH on the
# same seeded synthetic corpus with planted near-duplicates.
#   bench/dedupe.sh                 # 100k documents
#   DOCS=20000 OUT=/tmp/dd bench/dedupe.sh
# Rust runs twice: on one thread (like-for-like with single-threaded datasketch)
# and on all cores (rayon over documents).
set -euo pipefail
cd "$(dirname "$0")/.."
DOCS=${DOCS:-100000}
OUT=${OUT:-$(mktemp -d -t distill-dedupe-XXXXXX)}
mkdir -p "$OUT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/distill-target}
python3 -c "import datasketch" 2>/dev/null || python3 -m pip install --quiet datasketch
cargo bench -p distill-curate --bench dedupe -- --docs "$DOCS" --out "$OUT" --threads 1 | tee "$OUT/rust-1thread.txt"
cargo bench -p distill-curate --bench dedupe -- --docs "$DOCS" | grep -E '^(rust|RESULT)' | tee "$OUT/rust-all.txt"
python3 bench/dedupe_datasketch.py "$OUT" | tee "$OUT/datasketch.txt"
rate() { grep '^RESULT' "$1" | sed -E 's/.*docs_per_s=([0-9.]+).*/\1/'; }
python3 - "$(rate "$OUT/rust-1thread.txt")" "$(rate "$OUT/rust-all.txt")" "$(rate "$OUT/datasketch.txt")" <<'PY'
import sys
one, allc, py = map(float, sys.argv[1:4])
print(f"throughput ratio vs datasketch: {one / py:.1f}x on one thread, {allc / py:.1f}x on all cores")
PY
echo "corpus and logs in $OUT"
