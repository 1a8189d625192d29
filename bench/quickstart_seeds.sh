#!/usr/bin/env bash
# The quickstart's spread over seeds: runs examples/quickstart.toml once per SEED with the
# train stage's `seed` and `init.seed` both set to SEED, one run per core on one thread each
# (one thread trains bit for bit as two do), and prints each run's held-out score.
#
#   bench/quickstart_seeds.sh BIN SEED...      e.g. bench/quickstart_seeds.sh target/release/distill 0 1 2 3
#
# Runs go to ${OUT:-/tmp/quickstart-seeds}/s<SEED>/ (each keeps its distill.db and export, which
# bench/quickstart_copying.py reads). Extra train-stage keys: EXTRA='epochs = 1;learning_rate = 3e-3'.
set -euo pipefail
bin=$(realpath "$1"); shift
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/quickstart-seeds}
mkdir -p "$out"

one() {
    local seed=$1 cpu=$2 dir="$out/s$1"
    rm -rf "$dir"; mkdir -p "$dir"; ln -s "$repo/data" "$dir/data"
    python3 - "$repo/examples/quickstart.toml" "$dir/quickstart.toml" "$seed" "${EXTRA:-}" <<'PY'
import re, sys
src, dst, seed, extra = sys.argv[1:5]
s = open(src).read()
start = s.index('name = "student"')
end = s.index('[[stage]]', start)
block = re.sub(r'seed = \d+ \}', f'seed = {seed} }}', s[start:end])
keys = dict(kv.split('=', 1) for kv in extra.split(';') if kv.strip())
keys = {k.strip(): v.strip() for k, v in keys.items()}
keys.setdefault('seed', seed)
lines = block.rstrip('\n').split('\n')
for k, v in keys.items():
    hit = [i for i, l in enumerate(lines) if l.startswith(k + ' =')]
    if hit:
        lines[hit[0]] = f'{k} = {v}'
    else:
        lines.append(f'{k} = {v}')
open(dst, 'w').write(s[:start] + '\n'.join(lines) + '\n\n' + s[end:])
PY
    if ! (cd "$dir" && RAYON_NUM_THREADS=1 taskset -c "$cpu" "$bin" run quickstart.toml >out.txt 2>log.txt); then
        echo "seed $seed: the run failed, see $dir/log.txt"
        return
    fi
    python3 - "$dir/distill.db" "$seed" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
score = {l: round(v * 100) for l, v in c.execute(
    "SELECT label, value FROM scores WHERE metric = 'pass@1' AND label LIKE 'student@%'")}
steps, loss = c.execute(
    "SELECT max(step), avg(loss) FROM (SELECT step, loss FROM train_metrics ORDER BY step DESC LIMIT 50)").fetchone()
train = c.execute("SELECT (finished_at - started_at) / 1000.0 FROM stages WHERE name = 'student'").fetchone()[0]
print(f"seed {sys.argv[2]}: held-out {score}, last-50-step loss {loss:.4f}, {steps} steps, train {train:.0f} s", flush=True)
PY
}
# One queue per core: seeds i, i + cores, ... run one after another on core i.
seeds=("$@")
cores=$(nproc)
for ((c = 0; c < cores && c < ${#seeds[@]}; c++)); do
    (for ((i = c; i < ${#seeds[@]}; i += cores)); do one "${seeds[i]}" "$c"; done) &
done
wait
