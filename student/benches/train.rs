//! CPU training throughput of a ~21M-parameter Qwen2-shaped student (the `throughput` bench's
//! model), with PyTorch on the same checkpoint (same shapes, same token count, same thread count,
//! same machine) as the baseline, in one run.
//!
//! `cargo bench -p distill-student --bench train`
//! One SFT step = 4 sequences × 256 input tokens (32 prompt + 224 target), loss on the targets,
//! backward, global-norm clipping, AdamW. Each figure is the best of 5 steps after a warm-up step.
//! The two sides alternate over `DISTILL_BENCH_ROUNDS` rounds (default 3), best step of each.
//! Environment: `DISTILL_BENCH_PYTHON` (default `python3`; needs torch + transformers, else the
//! baseline is skipped), `RAYON_NUM_THREADS` (threads for both sides; default: all cores).

use std::process::Command;

use burn::backend::Autodiff;
use distill_student::train::{MicroBatch, TrainConfig, Trainer};
use distill_student::{CausalLm, CpuBackend, ModelConfig, SaveOptions, save_pretrained};

#[path = "support/synthetic.rs"]
mod synthetic;

/// The allocator the `distill` binary uses, so the figures are the ones users get.
#[path = "support/alloc.rs"]
mod alloc;

type B = Autodiff<CpuBackend>;

const BATCH: usize = 4;
const SEQ: usize = 256;
const PROMPT: usize = 32;
const REPS: usize = 5;

/// Best step time of `REPS` steps after one warm-up step.
fn burn_step_secs(model: &CausalLm<B>, recompute: bool) -> (f64, u64) {
    let config = TrainConfig {
        learning_rate: 1e-4,
        warmup_ratio: 0.0,
        max_steps: Some(REPS + 1),
        micro_batch: MicroBatch::Sequences(BATCH),
        max_grad_norm: Some(1.0),
        max_seq_len: SEQ + 1,
        recompute,
        ..TrainConfig::default()
    };
    let device = Default::default();
    let mut trainer = Trainer::<B>::from_model(
        model.clone(),
        &synthetic::sft_examples(BATCH, SEQ, PROMPT, model.config.vocab_size, 7),
        config,
        &device,
    )
    .expect("trainer");
    let mut best = f64::INFINITY;
    let mut peak = 0;
    let mut first = true;
    while let Some(m) = trainer.step().expect("step") {
        assert_eq!(m.input_tokens, BATCH * SEQ);
        if !first {
            best = best.min(m.step_time_s);
        }
        first = false;
        peak = m.peak_memory_bytes;
    }
    (best, peak)
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
    println!(
        "step: {BATCH} x {SEQ} tokens ({PROMPT} prompt + {} target per sequence), AdamW, clip 1.0",
        SEQ - PROMPT
    );

    // This VM's speed drifts by tens of percent over a minute; alternating the two sides over
    // several rounds, best step of each, keeps a slow spell from landing on one side only.
    let rounds: usize = std::env::var("DISTILL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let dir = tempfile::tempdir().expect("temp dir");
    save_pretrained(&model, dir.path(), &SaveOptions::default()).expect("save benchmark model");
    let python = std::env::var("DISTILL_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let (mut secs, mut peak) = (f64::INFINITY, 0);
    let mut torch: Option<(f64, serde_json::Value)> = None;
    let mut torch_ok = true;
    for round in 1..=rounds {
        let (s, p) = burn_step_secs(&model, false);
        (secs, peak) = (secs.min(s), peak.max(p));
        let t = if torch_ok {
            torch_step(&python, dir.path(), threads)
        } else {
            None
        };
        torch_ok = t.is_some();
        let t_s = t
            .as_ref()
            .map_or(f64::NAN, |v| v["step_s"].as_f64().unwrap_or(f64::NAN));
        println!("round {round}: burn-flex {s:.3} s, pytorch {t_s:.3} s");
        if let Some(v) = t
            && torch.as_ref().is_none_or(|(best, _)| t_s < *best)
        {
            torch = Some((t_s, v));
        }
    }
    let burn_tps = (BATCH * SEQ) as f64 / secs;
    println!(
        "burn-flex train step: {secs:.3} s, {burn_tps:8.1} tok/s (peak RSS {:.0} MiB)",
        peak as f64 / (1 << 20) as f64
    );
    let (rsecs, rpeak) = burn_step_secs(&model, true);
    println!(
        "burn-flex train step, per-layer recompute: {rsecs:.3} s, {:8.1} tok/s (peak RSS {:.0} MiB, process-wide)",
        (BATCH * SEQ) as f64 / rsecs,
        rpeak as f64 / (1 << 20) as f64
    );
    match torch {
        Some((step_s, v)) => {
            let t = (BATCH * SEQ) as f64 / step_s;
            println!(
                "pytorch {} ({} threads, {} attention) train step: {step_s:.3} s, {t:8.1} tok/s",
                v["torch"],
                v["threads"],
                v["attention"].as_str().unwrap_or("?"),
            );
            println!("ratio burn/pytorch: {:.2}x", burn_tps / t);
        }
        None => println!(
            "pytorch baseline skipped: `{python} {TORCH_SCRIPT}` failed (needs torch + transformers)"
        ),
    }
}

const TORCH_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/benches/torch_train_baseline.py"
);

/// PyTorch's best step on the checkpoint in `dir` (its JSON report), `None` when it cannot run.
fn torch_step(python: &str, dir: &std::path::Path, threads: usize) -> Option<serde_json::Value> {
    let out = Command::new(python)
        .arg(TORCH_SCRIPT)
        .arg(dir)
        .args(["--threads", &threads.to_string()])
        .args(["--batch", &BATCH.to_string(), "--seq", &SEQ.to_string()])
        .args(["--prompt", &PROMPT.to_string()])
        .args(["--reps", &REPS.to_string()])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()?
        .to_string();
    serde_json::from_str(&line).ok()
}
