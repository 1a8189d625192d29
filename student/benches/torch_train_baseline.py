#!/usr/bin/env python3
"""PyTorch baseline for `cargo bench -p distill-student --bench train`.

Loads the checkpoint the Rust bench saved, with transformers, on CPU with the same thread count,
and times the same SFT step (best of --reps): forward over the same token ids, mean cross entropy
on the target tokens only (labels -100 on the prompt), backward, clip_grad_norm_, AdamW step.
Prints one JSON object.
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
p.add_argument("--reps", type=int, default=5)
a = p.parse_args()

torch.set_num_threads(a.threads)
model = AutoModelForCausalLM.from_pretrained(a.dir, dtype=torch.float32)
model.train()
vocab = model.config.vocab_size
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g)
labels = ids.clone()
labels[:, : a.prompt] = -100
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def step():
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return time.perf_counter() - t0


step()
times = [step() for _ in range(a.reps)]
print(json.dumps({
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "attention": model.config._attn_implementation,
    "step_s": min(times),
    "tokens_per_s": a.batch * a.seq / min(times),
}))
