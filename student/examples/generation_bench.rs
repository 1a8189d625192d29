//! Generation throughput of a randomly initialised Qwen2-shaped model, on the CPU or
//! (built with `--features cuda`) a CUDA GPU: prefill tokens/s, and decode tokens/s
//! with the KV cache at several batch sizes, through the same `generate` the
//! evaluator uses.
//!
//! `cargo run --release -p distill-student --example generation_bench -- [cpu|cuda] [tiny|0.5b|1.5b] [f32|bf16]`
//!
//! Prints one JSON line per measurement, so a script can collect them. Decoding runs at the
//! batch sizes in `GEN_BENCH_BATCHES` (default `1 8 32`), each sequence generating
//! `GEN_BENCH_NEW_TOKENS` tokens (default 128) after a 64-token prompt; `GEN_BENCH_PREFILL=0`
//! skips the prefill measurements. `bench/gpu_generate.sh` runs it beside transformers.

use std::time::Instant;

use burn::prelude::*;
use distill_student::{
    CausalLm, DType, GenerationConfig, ModelConfig, SaveOptions, generate, load_model,
    save_pretrained,
};

/// Shapes of Qwen2.5 models (public configs), and a tiny one for a quick check.
fn preset(name: &str) -> ModelConfig {
    match name {
        "tiny" => ModelConfig::qwen2(6400, 256, 704, 4, 8, 2, true),
        "0.5b" => ModelConfig::qwen2(151_936, 896, 4864, 24, 14, 2, true),
        "1.5b" => ModelConfig::qwen2(151_936, 1536, 8960, 28, 12, 2, true),
        other => panic!("unknown preset {other}: tiny, 0.5b or 1.5b"),
    }
}

fn run<B: Backend>(device: &B::Device, preset_name: &str, dtype: DType, label: &str) {
    let config = preset(preset_name);
    let model: CausalLm<B> = CausalLm::init(&config, device);
    // Other dtypes go through a checkpoint, as a real model would: the loader converts.
    let model = if dtype == DType::F32 {
        model
    } else {
        let dir = std::env::temp_dir().join(format!("distill-genbench-{}", std::process::id()));
        let opts = SaveOptions {
            dtype: Some(dtype),
            ..SaveOptions::default()
        };
        save_pretrained(&model, &dir, &opts).expect("save");
        drop(model);
        let m = load_model::<B>(&dir, device, dtype).expect("load");
        let _ = std::fs::remove_dir_all(&dir);
        m
    };
    let vocab = config.vocab_size as u32;
    let prompt = |row: usize, len: usize| -> Vec<u32> {
        (0..len)
            .map(|i| ((row * 7919 + i * 104_729) as u32) % vocab)
            .collect()
    };
    let env = |k: &str| std::env::var(k).ok();
    let prefill = env("GEN_BENCH_PREFILL").is_none_or(|v| v != "0");
    let batches: Vec<usize> = env("GEN_BENCH_BATCHES")
        .unwrap_or_else(|| "1 8 32".into())
        .split_whitespace()
        .map(|b| b.parse().expect("GEN_BENCH_BATCHES: batch sizes"))
        .collect();
    let new_tokens: usize = env("GEN_BENCH_NEW_TOKENS")
        .map_or(128, |n| n.parse().expect("GEN_BENCH_NEW_TOKENS: a count"));
    // Prefill: one forward over a batch of long prompts.
    let prefills: &[(usize, usize)] = if prefill { &[(1, 512), (8, 512)] } else { &[] };
    for &(batch, len) in prefills {
        let rows: Vec<Vec<i64>> = (0..batch)
            .map(|r| prompt(r, len).into_iter().map(i64::from).collect())
            .collect();
        let flat: Vec<i64> = rows.concat();
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [batch, len]), device);
        let _ = model
            .forward(input.clone())
            .slice([0..1, 0..1, 0..1])
            .into_scalar(); // warm-up
        let t0 = Instant::now();
        let reps = 3;
        for _ in 0..reps {
            let _ = model
                .forward(input.clone())
                .slice([0..1, 0..1, 0..1])
                .into_scalar();
        }
        let secs = t0.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{{\"device\":\"{label}\",\"model\":\"{preset_name}\",\"dtype\":\"{dtype:?}\",\"phase\":\"prefill\",\"batch\":{batch},\"prompt\":{len},\"tokens_per_s\":{:.1}}}",
            (batch * len) as f64 / secs
        );
    }
    // Decode: generate with the KV cache, greedy, a fixed number of new tokens.
    for &batch in &batches {
        let prompts: Vec<Vec<u32>> = (0..batch).map(|r| prompt(r, 64)).collect();
        let cfg = GenerationConfig::greedy(new_tokens);
        let _ = generate(
            &model,
            &prompts[..1],
            &GenerationConfig::greedy(4),
            None,
            |_| {},
        ); // warm-up
        let t0 = Instant::now();
        let out = generate(&model, &prompts, &cfg, None, |_| {}).expect("generation runs");
        let secs = t0.elapsed().as_secs_f64();
        let tokens: usize = out.iter().map(|g| g.token_ids.len()).sum();
        println!(
            "{{\"device\":\"{label}\",\"model\":\"{preset_name}\",\"dtype\":\"{dtype:?}\",\"phase\":\"decode\",\"batch\":{batch},\"prompt\":64,\"new_tokens\":{tokens},\"tokens_per_s\":{:.1}}}",
            tokens as f64 / secs
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let device = args.first().map(String::as_str).unwrap_or("cpu");
    let preset_name = args.get(1).map(String::as_str).unwrap_or("tiny");
    let dtype = match args.get(2).map(String::as_str).unwrap_or("f32") {
        "bf16" => DType::BF16,
        _ => DType::F32,
    };
    match device {
        "cpu" => run::<distill_student::CpuBackend>(&Default::default(), preset_name, dtype, "cpu"),
        #[cfg(feature = "cuda")]
        "cuda" => {
            run::<distill_student::CudaBackend>(&Default::default(), preset_name, dtype, "cuda")
        }
        other => panic!("unknown device {other} (cuda needs --features cuda)"),
    }
}
