#!/usr/bin/env python3
"""Report for `bench/gpu_train.sh`: tokens/s and model FLOPs utilisation (MFU) of Burn and PyTorch.

`peak` times a bf16 8192³ matrix product with PyTorch (the ceiling the GPU reaches in this run),
`matmul` the training shapes `matmul_bench` times in Burn;
`report DIR` reads the logs `gpu_train.sh` wrote and prints one markdown table and one JSON line.

Model FLOPs per trained token follow PaLM's appendix B: 6·N for the matrix-product parameters
(lm_head included, the embedding lookup not) plus 12·L·T·H·Q for attention, with no causal
halving and no credit for recomputation, so both frameworks are scored on the same work.
"""

import glob
import json
import os
import statistics
import sys

DATASHEET_BF16_TFLOPS = 989.4  # H100/H200 SXM dense bf16, NVIDIA's datasheet
WARMUP = 3  # steps left out of each median (autotuning, allocator growth)


def matmul_tflops(m, k, n):
    """bf16 [m, k] x [k, n] in PyTorch: TFLOP/s over 20 products after 3 warm-ups."""
    import time

    import torch

    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * m * k * n / ((time.perf_counter() - t0) / 20) / 1e12


def peak():
    import torch

    print(json.dumps({"gpu": torch.cuda.get_device_name(),
                      "matmul_bf16_tflops": matmul_tflops(8192, 8192, 8192)}))


def timed_tflops(product, flops):
    import time

    import torch

    for _ in range(3):
        product()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        product()
    torch.cuda.synchronize()
    return flops / ((time.perf_counter() - t0) / 20) / 1e12


def matmul_shapes():
    """The products `matmul_bench` (student/examples) times, in PyTorch bf16 (cuBLAS), with the
    same labels: each weight's forward, its two backward products (transposed operands as
    views), and attention's two batched products."""
    import torch

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    cases = []
    for m, k, n in [(4096, 1536, 1536), (4096, 1536, 8960), (4096, 8960, 1536), (4096, 1536, 151936)]:
        cases.append((f"x·W {m}x{k}x{n}", randn(m, k), randn(k, n)))
        cases.append((f"g·Wt {m}x{n}x{k}", randn(m, n), randn(k, n).t()))
        cases.append((f"xt·g {k}x{m}x{n}", randn(m, k).t(), randn(m, n)))
    cases.append(("q·kt 12x4096x128x4096", randn(1, 12, 4096, 128), randn(1, 12, 4096, 128).transpose(2, 3)))
    cases.append(("p·v 12x4096x4096x128", randn(1, 12, 4096, 4096), randn(1, 12, 4096, 128)))
    for what, a, b in cases:
        m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
        batch = a.numel() // (m * k)
        tflops = timed_tflops(lambda: a @ b, 2 * batch * m * k * n)
        print(json.dumps({"device": "torch", "dtype": "BF16", "what": what, "path": "cublas",
                          "m": m, "k": k, "n": n, "batch": batch, "tflops": tflops}))
        del a, b


def flops_per_token(cfg, seq):
    d, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or d // heads
    per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * cfg["intermediate_size"]
    n_matmul = layers * per_layer + d * cfg["vocab_size"]
    return 6 * n_matmul + 12 * layers * seq * heads * hd, n_matmul


def gpu_mem_gib(path):
    try:
        vals = [float(x) for x in open(path).read().split() if x.strip()]
        return max(vals) / 1024 if vals else None
    except OSError:
        return None


def report(out):
    meta = json.load(open(os.path.join(out, "meta.json")))
    cfg = json.load(open(meta["config"]))
    seq, batch = meta["seq"], meta["batch"]
    fpt, n_matmul = flops_per_token(cfg, seq)
    measured = json.load(open(os.path.join(out, "peak.json")))["matmul_bf16_tflops"]
    rows = []
    for log in sorted(glob.glob(os.path.join(out, "*.log"))):
        name = os.path.basename(log)[: -len(".log")]
        lines = []
        for line in open(log):
            line = line.strip()
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        steps = [x for x in lines if "step_time_s" in x]
        if not steps:
            rows.append({"run": name, "error": "no step finished (see the log)"})
            continue
        kept = steps[WARMUP:] or steps
        step_s = statistics.median(x["step_time_s"] for x in kept)
        tps = batch * seq / step_s
        rows.append({
            "run": name,
            "steps": len(steps),
            "step_s": step_s,
            "tokens_per_s": tps,
            "mfu_datasheet": tps * fpt / (DATASHEET_BF16_TFLOPS * 1e12),
            "mfu_measured": tps * fpt / (measured * 1e12),
            "peak_gpu_gib": gpu_mem_gib(os.path.join(out, name + ".mem")),
            "first_loss": steps[0].get("loss"),
            "last_loss": steps[-1].get("loss"),
        })
    base = {r["run"]: r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    print(f"model: {meta['config']} ({n_matmul / 1e9:.2f}B matmul params), {batch} x {seq} tokens per step, "
          f"{fpt / 1e9:.1f} GFLOP per token; bf16 matmul measured {measured:.0f} TFLOP/s "
          f"(datasheet {DATASHEET_BF16_TFLOPS:.0f})\n")
    print("| run | steps | step s | tokens/s | MFU (datasheet) | MFU (measured peak) | peak GPU GiB | vs torch-sdpa same mode |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['run']} | {r['error']} |  |  |  |  |  |  |")
            continue
        mode = "recompute" if "recompute" in r["run"] else "plain"
        ref = base.get(f"torch-sdpa-{mode}")
        ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        mem = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] else "-"
        print(f"| {r['run']} | {r['steps']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{100 * r['mfu_datasheet']:.1f}% | {100 * r['mfu_measured']:.1f}% | {mem} | {ratio} |")
    # Runs of the same model, data and seed that differ only in their kernels should train alike.
    losses = {}
    for log in sorted(glob.glob(os.path.join(out, "burn-*.log"))):
        name = os.path.basename(log)[: -len(".log")]
        seq_losses = []
        for line in open(log):
            if line.startswith("{") and "step_time_s" in line:
                try:
                    seq_losses.append(json.loads(line)["loss"])
                except (json.JSONDecodeError, KeyError):
                    pass
        losses[name] = seq_losses
    for mode in ["recompute", "plain"]:
        ref_name = next((f"burn-cubecl{v}-{mode}" for v in ["-untuned", ""]
                         if losses.get(f"burn-cubecl{v}-{mode}")), None)
        if ref_name is None:
            continue
        ref = losses[ref_name]
        for name, ls in losses.items():
            if name == ref_name or not name.startswith("burn-cublaslt") or not name.endswith(mode) or not ls:
                continue
            n = min(len(ls), len(ref))
            worst = max(abs(a - b) / abs(b) for a, b in zip(ls[:n], ref[:n]))
            print(f"\nloss of {name} against {ref_name} over {n} steps: largest relative difference "
                  f"{worst:.2e} (first {ls[0]:.4f} vs {ref[0]:.4f}, last {ls[n - 1]:.4f} vs {ref[n - 1]:.4f})")
    print(json.dumps({"flops_per_token": fpt, "matmul_tflops": measured, "rows": rows}))


if __name__ == "__main__":
    {"peak": peak, "matmul": matmul_shapes, "report": lambda: report(sys.argv[2])}[sys.argv[1]]()
