//! Samples/s of the quickstart's evaluation workload: the quickstart student's shape
//! (`data/quickstart/student-config.json`, random weights), its tokenizer and chat template, the
//! 100 held-out problems, 160 new tokens each (no stop token, so every run does the same work).
//! The baseline is one sequence at a time (`max_batch = 1`, what `evaluate` did before continuous
//! batching), measured in the same run.
//!
//! `cargo bench -p distill-student --bench generate` (`RAYON_NUM_THREADS=N` to pin threads;
//! `GENERATE_BENCH_ONLY=64` runs greedy at that `max_batch` alone, for a profiler;
//! `GENERATE_BENCH_ONLY=64:sampled` the same with temperature 0.6 and top-p 0.95).

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use distill_student::{
    BatchEvent, BatchGenerator, CausalLm, ChatMessage, CpuBackend, GenerationConfig, ModelConfig,
    SequenceRequest, Tokenizer,
};

/// The allocator the `distill` binary uses, so the figures are the ones users get.
#[path = "support/alloc.rs"]
mod alloc;

type B = CpuBackend;

const NEW_TOKENS: usize = 160;
const REPS: usize = 3;

fn samples_per_sec(
    model: &CausalLm<B>,
    requests: &[SequenceRequest],
    cfg: &GenerationConfig,
    max_batch: usize,
) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..REPS {
        let mut tokens = 0;
        let t0 = Instant::now();
        BatchGenerator::new(model, None, cfg.clone())
            .unwrap()
            .max_batch(max_batch)
            .run(requests, |e| {
                if let BatchEvent::Finished { generation, .. } = e {
                    tokens += generation.token_ids.len();
                }
                ControlFlow::Continue(())
            })
            .unwrap();
        best = best.min(t0.elapsed().as_secs_f64());
        assert_eq!(tokens, requests.len() * NEW_TOKENS);
    }
    requests.len() as f64 / best
}

fn main() {
    alloc::keep_freed_memory();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let data = root.join("data/quickstart");
    let config = ModelConfig::from_file(data.join("student-config.json")).unwrap();
    let tok = Tokenizer::from_dir(data.join("tokenizer")).unwrap();
    let model = CausalLm::<B>::init(&config, &Default::default());
    let text = std::fs::read_to_string(data.join("arithmetic-test.jsonl")).unwrap();
    let requests: Vec<SequenceRequest> = text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let prompt = tok
                .apply_chat_template(&[ChatMessage::user(v["problem"].as_str().unwrap())], true)
                .unwrap();
            SequenceRequest::new(tok.encode(&prompt, false).unwrap(), i as u64, 0)
        })
        .collect();
    let sampled = GenerationConfig {
        temperature: 0.6,
        top_p: 0.95,
        ..GenerationConfig::greedy(NEW_TOKENS)
    };
    if let Ok(only) = std::env::var("GENERATE_BENCH_ONLY") {
        let (n, cfg) = match only.strip_suffix(":sampled") {
            Some(n) => (n, sampled),
            None => (only.as_str(), GenerationConfig::greedy(NEW_TOKENS)),
        };
        let n = n.parse().expect("GENERATE_BENCH_ONLY=N or N:sampled");
        let rate = samples_per_sec(&model, &requests, &cfg, n);
        println!("max_batch {n}: {rate:.1} samples/s");
        return;
    }
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!(
        "quickstart student ({} params), {} prompts x {NEW_TOKENS} new tokens, threads: {threads}, best of {REPS}",
        config.num_parameters(),
        requests.len()
    );
    println!("| sampling | max_batch | samples/s | tokens/s | vs one at a time |");
    println!("|---|---|---|---|---|");
    for (label, cfg) in [
        ("greedy", GenerationConfig::greedy(NEW_TOKENS)),
        ("T=0.6, top-p 0.95", sampled),
    ] {
        let base = samples_per_sec(&model, &requests, &cfg, 1);
        for max_batch in [1, 8, 32, 64] {
            let rate = if max_batch == 1 {
                base
            } else {
                samples_per_sec(&model, &requests, &cfg, max_batch)
            };
            println!(
                "| {label} | {max_batch} | {rate:.1} | {:.0} | {:.2}x |",
                rate * NEW_TOKENS as f64,
                rate / base
            );
        }
    }
}
