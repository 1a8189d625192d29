#!/usr/bin/env python3
"""datasketch baseline for curate/benches/dedupe.rs.

Reads the corpus and planted truth that the Rust bench wrote (--out DIR), runs
word 5-gram MinHash (num_perm=112) with MinHashLSH(params=(14, 8)), clusters
candidate pairs with union-find exactly as the Rust side does, and prints
documents/s and pair recall/precision. Timing covers shingling, MinHash,
LSH insertion/query and clustering; reading the JSONL is excluded (as corpus
generation is on the Rust side).

Usage: python3 bench/dedupe_datasketch.py DIR
"""

import json
import re
import sys
import time

from datasketch import MinHash, MinHashLSH

NON_WORD = re.compile(r"[^\w]+")


def shingles(text):
    # Same normalisation as distill_curate::dedupe::normalize_into:
    # lowercase, punctuation to spaces, split on whitespace.
    words = NON_WORD.sub(" ", text.lower()).split()
    if len(words) < 5:
        return [" ".join(words).encode()] if words else []
    return [" ".join(words[i : i + 5]).encode() for i in range(len(words) - 4)]


def find(parent, x):
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def main():
    out = sys.argv[1]
    with open(f"{out}/corpus.jsonl") as f:
        docs = [json.loads(line)["text"] for line in f]
    with open(f"{out}/truth.json") as f:
        truth = {tuple(p) for p in json.load(f)["pairs"]}

    start = time.perf_counter()
    sigs = MinHash.bulk([shingles(d) for d in docs], num_perm=112)
    t_sig = time.perf_counter() - start
    lsh = MinHashLSH(num_perm=112, params=(14, 8))
    parent = list(range(len(docs)))
    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            a, b = find(parent, i), find(parent, j)
            if a != b:
                parent[b] = a
        lsh.insert(i, m, check_duplication=False)
    groups = {}
    for i in range(len(docs)):
        groups.setdefault(find(parent, i), []).append(i)
    clusters = [g for g in groups.values() if len(g) > 1]
    total = time.perf_counter() - start

    predicted = hits = 0
    for c in clusters:
        for k, x in enumerate(c):
            for y in c[k + 1 :]:
                predicted += 1
                hits += (min(x, y), max(x, y)) in truth
    recall = hits / max(1, len(truth))
    precision = hits / max(1, predicted)
    rate = len(docs) / total
    print(
        f"datasketch: {len(docs)} docs in {total:.2f}s (signatures {t_sig:.2f}s) = {rate:.0f} docs/s "
        f"on 1 thread; {len(clusters)} clusters, {predicted} predicted pairs; "
        f"recall {recall:.4f} precision {precision:.4f}"
    )
    print(f"RESULT datasketch docs_per_s={rate:.1f} recall={recall:.4f} precision={precision:.4f}")


if __name__ == "__main__":
    main()
