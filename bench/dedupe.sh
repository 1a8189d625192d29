#!/usr/bin/env bash
# Near-duplicate detection: distill-curate (Rust) vs datasketch MinHashLSH on the
# same seeded synthetic corpus with planted near-duplicates.
#   bench/dedupe.sh                 # 100k documents
#   DOCS=20000 OUT=/tmp/dd bench/dedupe.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DOCS=${DOCS:-100000}
OUT=${OUT:-$(mktemp -d -t distill-dedupe-XXXXXX)}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/distill-target}
python3 -c "import datasketch" 2>/dev/null || python3 -m pip install --quiet datasketch
cargo bench -p distill-curate --bench dedupe -- --docs "$DOCS" --out "$OUT" | tee "$OUT/rust.txt"
python3 bench/dedupe_datasketch.py "$OUT" | tee "$OUT/datasketch.txt"
rate() { grep '^RESULT' "$1" | sed -E 's/.*docs_per_s=([0-9.]+).*/\1/'; }
python3 - "$(rate "$OUT/rust.txt")" "$(rate "$OUT/datasketch.txt")" <<'PY'
import sys
rust, py = map(float, sys.argv[1:3])
print(f"throughput ratio (rust / datasketch): {rust / py:.1f}x")
PY
echo "corpus and logs in $OUT"
