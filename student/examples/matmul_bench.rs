//! Matrix-product throughput of the backend on the 1.5B student's training shapes (4,096 tokens
//! against the q/o, MLP and LM-head weights), to tell slow kernels from slow training code.
//! `bench/gpu_train.sh` runs it beside the same products in PyTorch.
//!
//! `cargo run --release -p distill-student [--features cuda] --example matmul_bench -- [cpu|cuda] [f32|bf16]`
//!
//! Prints one JSON line per shape: TFLOP/s over 20 products after 3 warm-ups (2 on the CPU).

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::{DType, Distribution};

/// `[m, k] × [k, n]`: tokens × hidden against q/o, MLP up, MLP down, LM head.
const SHAPES: [[usize; 3]; 4] = [
    [4096, 1536, 1536],
    [4096, 1536, 8960],
    [4096, 8960, 1536],
    [4096, 1536, 151_936],
];

fn run<B: Backend>(device: &B::Device, dtype: DType, label: &str) {
    for [m, k, n] in SHAPES {
        let a = Tensor::<B, 2>::random([m, k], Distribution::Default, device).cast(dtype);
        let b = Tensor::<B, 2>::random([k, n], Distribution::Default, device).cast(dtype);
        let product = || a.clone().matmul(b.clone());
        for _ in 0..3 {
            let _ = product();
        }
        B::sync(device).expect("sync");
        // Outputs are kept until the sync so no lazy backend can skip a product nobody reads.
        let reps = if label == "cpu" { 2 } else { 20 };
        let t0 = Instant::now();
        let outs: Vec<_> = (0..reps).map(|_| product()).collect();
        B::sync(device).expect("sync");
        let secs = t0.elapsed().as_secs_f64() / reps as f64;
        drop(outs);
        println!(
            "{}",
            serde_json::json!({
                "device": label, "dtype": format!("{dtype:?}"), "m": m, "k": k, "n": n,
                "tflops": 2.0 * (m * k * n) as f64 / secs / 1e12,
            })
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dtype = match args.get(1).map(String::as_str) {
        Some("f32") => DType::F32,
        _ => DType::BF16,
    };
    match args.first().map(String::as_str) {
        Some("cpu") | None => run::<distill_student::CpuBackend>(&Default::default(), dtype, "cpu"),
        #[cfg(feature = "cuda")]
        Some("cuda") => run::<distill_student::CudaBackend>(&Default::default(), dtype, "cuda"),
        Some(other) => panic!("device {other}: cpu, or cuda with --features cuda"),
    }
}
