#!/usr/bin/env python3
"""Synthetic OpenR1-Math-220k-layout shards for bench/import.sh.

Usage: make_import_data.py OUT_DIR ROWS TRACES_PER_ROW BYTES_PER_TRACE SHARDS

Same columns and nested types as tests/fixtures/datasets/make_fixtures.py writes (the
dataset card's), snappy-compressed as `datasets` writes them; the text is varied so that
compression does not make the files unrealistically small.
"""

import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

out, rows, per_row, size, shards = sys.argv[1], *map(int, sys.argv[2:6])
rng = random.Random(0)
WORDS = "so the sum of both sides gives us then we check that each term is positive and".split()


def text(n):
    words = []
    total = 0
    while total < n:
        w = rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randrange(10**6))
        words.append(w)
        total += len(w) + 1
    return " ".join(words)[:n]


MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
schema = pa.schema([
    ("problem", pa.string()), ("solution", pa.string()), ("answer", pa.string()),
    ("problem_type", pa.string()), ("question_type", pa.string()), ("source", pa.string()),
    ("uuid", pa.string()), ("is_reasoning_complete", pa.list_(pa.bool_())),
    ("generations", pa.list_(pa.string())), ("correctness_math_verify", pa.list_(pa.bool_())),
    ("correctness_llama", pa.list_(pa.bool_())), ("finish_reasons", pa.list_(pa.string())),
    ("correctness_count", pa.int64()), ("messages", MESSAGES),
])
Path(out, "data").mkdir(parents=True, exist_ok=True)
per_shard = (rows + shards - 1) // shards
n = 0
for s in range(shards):
    cols = {f.name: [] for f in schema}
    for _ in range(min(per_shard, rows - n)):
        n += 1
        problem = f"Problem {n}: " + text(200)
        gens = [f"<think>\n{text(size * 3 // 4)}\n</think>\n\n{text(size // 4)} \\boxed{{{n}}}" for _ in range(per_row)]
        cols["problem"].append(problem)
        cols["solution"].append(text(300))
        cols["answer"].append(str(n))
        cols["problem_type"].append("Algebra")
        cols["question_type"].append("math-word-problem")
        cols["source"].append("olympiads")
        cols["uuid"].append(f"bench-{n}")
        cols["is_reasoning_complete"].append([True] * per_row)
        cols["generations"].append(gens)
        cols["correctness_math_verify"].append([True] * per_row)
        cols["correctness_llama"].append([True] * per_row)
        cols["finish_reasons"].append(["stop"] * per_row)
        cols["correctness_count"].append(per_row)
        cols["messages"].append([{"content": problem, "role": "user"}, {"content": gens[0], "role": "assistant"}])
    pq.write_table(pa.table(cols, schema=schema), Path(out, "data", f"train-{s:05d}-of-{shards:05d}.parquet"))
