#!/usr/bin/env python3
"""PyTorch baseline for `cargo bench -p distill-student --bench throughput`.

Loads the same checkpoint the Rust bench saved, with transformers, on CPU with the same thread count,
and measures the same two things (best of --reps runs): full forward (logits for every position) and KV-cached greedy
decode. Prints one JSON object.
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--threads", type=int, required=True)
p.add_argument("--batch", type=int, required=True)
p.add_argument("--seq", type=int, required=True)
p.add_argument("--prompt", type=int, required=True)
p.add_argument("--decode", type=int, required=True)
p.add_argument("--reps", type=int, default=5)
a = p.parse_args()

torch.set_num_threads(a.threads)
model = AutoModelForCausalLM.from_pretrained(a.dir, dtype=torch.float32).eval()
vocab = model.config.vocab_size
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g)


def forward():
    model(input_ids=ids, use_cache=False).logits


def decode():
    prompt = ids[:1, : a.prompt]
    out = model(input_ids=prompt, use_cache=True)
    past = out.past_key_values
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(a.decode):
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t0


with torch.inference_mode():
    forward()
    decode()
    fwd = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        forward()
        fwd.append(time.perf_counter() - t0)
    dec = [decode() for _ in range(a.reps)]

print(json.dumps({
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "forward_tokens_per_s": a.batch * a.seq / min(fwd),
    "decode_tokens_per_s": a.decode / min(dec),
}))
