//! CPU throughput of a ~20M-parameter Qwen2-shaped student, with PyTorch on the same checkpoint
//! (same shapes, same weights, same thread count, same machine) as the baseline, in one run.
//!
//! `cargo bench -p distill-student --bench throughput`
//! Each figure is the best of 5 runs, for both sides. gemm picks AVX-512 kernels at run time where the CPU has them.
//! Environment: `DISTILL_BENCH_PYTHON` (default `python3`; needs torch + transformers, else the
//! baseline is skipped), `RAYON_NUM_THREADS` (threads for both sides; default: all cores).

use std::process::Command;
use std::time::Instant;

use burn::prelude::*;
use distill_student::{CausalLm, CpuBackend, ModelConfig, SaveOptions, save_pretrained};

#[path = "support/synthetic.rs"]
mod synthetic;

/// The allocator the `distill` binary uses, so the figures are the ones users get.
#[path = "support/alloc.rs"]
mod alloc;

type B = CpuBackend;

const BATCH: usize = 4;
const SEQ: usize = 256;
const PROMPT: usize = 32;
const DECODE: usize = 128;
const REPS: usize = 5;

/// Best of the repetitions: on a shared machine the fastest run is the least disturbed one.
fn best(v: Vec<f64>) -> f64 {
    v.into_iter().fold(f64::INFINITY, f64::min)
}

fn ids(rows: usize, len: usize, vocab: usize, seed: u64) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = synthetic::token_ids(rows * len, vocab, seed)
        .into_iter()
        .map(i64::from)
        .collect();
    Tensor::from_data(TensorData::new(data, [rows, len]), &Default::default())
}

fn forward_secs(model: &CausalLm<B>, input: &Tensor<B, 2, Int>) -> f64 {
    let t0 = Instant::now();
    let logits = model.forward(input.clone());
    // Reading one value forces the computation on lazy backends.
    let _ = logits.slice([0..1, 0..1, 0..1]).into_scalar();
    t0.elapsed().as_secs_f64()
}

fn decode_secs(model: &CausalLm<B>, vocab: usize) -> f64 {
    let mut cache = model.new_cache(1);
    let logits = model.forward_cached_last(ids(1, PROMPT, vocab, 1), None, &mut cache);
    let mut tok = logits.argmax(1);
    let t0 = Instant::now();
    for _ in 0..DECODE {
        let logits = model.forward_cached_last(tok, None, &mut cache);
        tok = logits.argmax(1);
    }
    let _ = tok.into_scalar();
    t0.elapsed().as_secs_f64()
}

fn main() {
    alloc::keep_freed_memory();
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let config = ModelConfig::qwen2(6400, 384, 1024, 12, 6, 2, true);
    let device = Default::default();
    let model = CausalLm::<B>::init(&config, &device);
    println!(
        "model: Qwen2-shaped, {} params (vocab 6400, d 384, 12 layers, 6 heads / 2 kv, mlp 1024, tied), f32, {threads} threads",
        config.num_parameters()
    );

    let input = ids(BATCH, SEQ, config.vocab_size, 7);
    forward_secs(&model, &input);
    let fwd = best((0..REPS).map(|_| forward_secs(&model, &input)).collect());
    decode_secs(&model, config.vocab_size);
    let dec = best(
        (0..REPS)
            .map(|_| decode_secs(&model, config.vocab_size))
            .collect(),
    );
    let burn_fwd = (BATCH * SEQ) as f64 / fwd;
    let burn_dec = DECODE as f64 / dec;
    println!("burn-flex forward ({BATCH}x{SEQ} tokens, all logits): {burn_fwd:9.1} tok/s");
    println!(
        "burn-flex decode  (batch 1, {PROMPT}-token prompt, {DECODE} steps, KV cache): {burn_dec:9.1} tok/s"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    save_pretrained(&model, dir.path(), &SaveOptions::default()).expect("save benchmark model");
    let python = std::env::var("DISTILL_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/torch_baseline.py");
    let out = Command::new(&python)
        .arg(script)
        .arg(dir.path())
        .args(["--threads", &threads.to_string()])
        .args(["--batch", &BATCH.to_string(), "--seq", &SEQ.to_string()])
        .args([
            "--prompt",
            &PROMPT.to_string(),
            "--decode",
            &DECODE.to_string(),
        ])
        .args(["--reps", &REPS.to_string()])
        .output();
    let parsed = out.ok().filter(|o| o.status.success()).and_then(|o| {
        let line = String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()?
            .to_string();
        serde_json::from_str::<serde_json::Value>(&line).ok()
    });
    match parsed {
        Some(v) => {
            let tf = v["forward_tokens_per_s"].as_f64().unwrap_or(f64::NAN);
            let td = v["decode_tokens_per_s"].as_f64().unwrap_or(f64::NAN);
            println!(
                "pytorch {} ({} threads) forward: {tf:9.1} tok/s",
                v["torch"], v["threads"]
            );
            println!("pytorch decode: {td:9.1} tok/s");
            println!(
                "ratio burn/pytorch: forward {:.2}x, decode {:.2}x",
                burn_fwd / tf,
                burn_dec / td
            );
        }
        None => println!(
            "pytorch baseline skipped: `{python} {script}` failed (needs torch + transformers)"
        ),
    }
}
