"""Decoding throughput of transformers' `generate` on a randomly initialised Qwen2.5-shaped
model: the baseline `bench/gpu_generate.sh` runs beside distill's `generation_bench`.

Usage: torch_generate.py DEVICE PRESET DTYPE "BATCHES" NEW_TOKENS
  DEVICE cpu|cuda, PRESET tiny|0.5b|1.5b, DTYPE f32|bf16, BATCHES e.g. "1 32 256".

Same shapes and the same 64-token prompts (token ids from the same formula) as
`student/examples/generation_bench.rs`; greedy; every sequence generates exactly NEW_TOKENS
tokens (EOS disabled). Prints one JSON line per batch size, in generation_bench's format.
"""

import json
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

PRESETS = {
    # vocab, hidden, intermediate, layers, heads, kv heads (tied embeddings)
    "tiny": (6400, 256, 704, 4, 8, 2),
    "0.5b": (151_936, 896, 4864, 24, 14, 2),
    "1.5b": (151_936, 1536, 8960, 28, 12, 2),
}


def main():
    device, preset, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
    batches = [int(b) for b in sys.argv[4].split()]
    new_tokens = int(sys.argv[5])
    vocab, hidden, inter, layers, heads, kv = PRESETS[preset]
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=torch_dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def prompts(batch):
        rows = [[(r * 7919 + i * 104_729) % vocab for i in range(64)] for r in range(batch)]
        return torch.tensor(rows, device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        model.generate(prompts(1), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for batch in batches:
            ids = prompts(batch)
            sync()
            t0 = time.perf_counter()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
            sync()
            secs = time.perf_counter() - t0
            tokens = (out.shape[1] - ids.shape[1]) * batch
            print(
                json.dumps(
                    {
                        "device": device,
                        "model": preset,
                        "dtype": "BF16" if dtype == "bf16" else "F32",
                        "phase": "decode",
                        "impl": "transformers",
                        "batch": batch,
                        "prompt": 64,
                        "new_tokens": tokens,
                        "tokens_per_s": round(tokens / secs, 1),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
