#!/usr/bin/env python3
"""PyTorch baseline for `bench/gpu_train.sh`: the same SFT step as distill's trainer, on the GPU.

Builds a randomly initialised model from a config.json (transformers, same shapes as the Rust
side), keeps f32 master weights and optimizer state, runs the forward and backward under bf16
autocast (what distill's `precision = "bf16"` does), and times whole optimizer steps: forward,
cross entropy on the target tokens only (labels -100 on the prompt), backward, global-norm
clipping, AdamW with PyTorch's defaults. Prints one JSON object per step and one summary line.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("model_dir", help="folder with config.json (weights are not read)")
p.add_argument("--seq", type=int, required=True, help="input tokens per sequence")
p.add_argument("--batch", type=int, default=1)
p.add_argument("--prompt", type=int, required=True, help="masked prompt tokens per sequence")
p.add_argument("--steps", type=int, default=20)
p.add_argument("--warmup", type=int, default=3, help="steps left out of the summary")
p.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
p.add_argument("--recompute", action="store_true", help="per-layer activation checkpointing")
a = p.parse_args()

torch.manual_seed(0)
config = AutoConfig.from_pretrained(a.model_dir)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation=a.attention, dtype=torch.float32
    )
if a.recompute:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.train()
ids = torch.randint(0, config.vocab_size, (a.batch, a.seq), device="cuda")
labels = ids.clone()
labels[:, : a.prompt] = -100
opt = torch.optim.AdamW(
    model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
)
torch.cuda.reset_peak_memory_stats()

times = []
for step in range(1, a.steps + 1):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    times.append(dt)
    print(json.dumps({"step": step, "loss": loss.item(), "grad_norm": norm.item(),
                      "step_time_s": dt, "tokens_per_s": a.batch * a.seq / dt}), flush=True)

kept = times[a.warmup:] or times
median = statistics.median(kept)
print(json.dumps({
    "summary": True,
    "torch": torch.__version__,
    "attention": model.config._attn_implementation,
    "recompute": a.recompute,
    "params": sum(t.numel() for t in model.parameters()),
    "step_s": median,
    "tokens_per_s": a.batch * a.seq / median,
    "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
}), flush=True)
