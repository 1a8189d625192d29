//! Matrix-product throughput of the backend on the 1.5B student's training shapes (4,096 tokens
//! against the q/o, MLP and LM-head weights), to tell slow kernels from slow training code.
//! `bench/gpu_train.sh` runs it beside the same products in PyTorch.
//!
//! `cargo run --release -p distill-student [--features cuda] --example matmul_bench -- [cpu|cuda] [f32|bf16]`
//!
//! Prints one JSON line per shape: TFLOP/s over 20 products after 3 warm-ups (2 on the CPU).
//! On CUDA each shape runs three ways (`path`): CubeCL's untuned kernel (what builds without
//! `autotune` ran), cuBLASLt, and CubeCL autotuned (left out with `MATMUL_SKIP_AUTOTUNE=1`); the
//! backward's transposed operands and the attention products are added, and each result is
//! checked against the untuned kernel's (`rel_err`: largest difference over the largest
//! magnitude).

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

#[cfg(feature = "cuda")]
fn run_cuda(dtype: DType) {
    use burn::tensor::TensorPrimitive;
    use burn_cubecl::kernel::matmul::{MatmulStrategy, matmul};
    use distill_student::CudaBackend as B;
    use distill_student::kernels::cublaslt;
    type Prim = burn::tensor::ops::FloatTensor<B>;

    let device = Default::default();
    let normal = |shape: Vec<usize>| {
        Tensor::<B, 4>::random(pad4(&shape), Distribution::Normal(0.0, 1.0), &device).cast(dtype)
    };
    // (what, lhs, rhs, transpose the lhs view, transpose the rhs view): shapes before the view.
    type Case = (String, Vec<usize>, Vec<usize>, bool, bool);
    let mut cases: Vec<Case> = Vec::new();
    for [m, k, n] in SHAPES {
        cases.push((
            format!("x·W {m}x{k}x{n}"),
            vec![m, k],
            vec![k, n],
            false,
            false,
        ));
        cases.push((
            format!("g·Wt {m}x{n}x{k}"),
            vec![m, n],
            vec![k, n],
            false,
            true,
        ));
        cases.push((
            format!("xt·g {k}x{m}x{n}"),
            vec![m, k],
            vec![m, n],
            true,
            false,
        ));
    }
    cases.push((
        "q·kt 12x4096x128x4096".into(),
        vec![1, 12, 4096, 128],
        vec![1, 12, 4096, 128],
        false,
        true,
    ));
    cases.push((
        "p·v 12x4096x4096x128".into(),
        vec![1, 12, 4096, 4096],
        vec![1, 12, 4096, 128],
        false,
        false,
    ));
    let prim = |t: Tensor<B, 4>| -> Prim { t.into_primitive().tensor() };
    let view = |t: Tensor<B, 4>, transpose: bool| if transpose { t.swap_dims(2, 3) } else { t };
    for (what, ls, rs, tl, tr) in cases {
        let lhs = view(normal(ls), tl);
        let rhs = view(normal(rs), tr);
        let [.., m, k] = lhs.dims();
        let n = rhs.dims()[3];
        let batch: usize = lhs.dims()[..2].iter().product();
        let flops = 2.0 * (batch * m * k * n) as f64;
        let untuned = || {
            matmul(
                prim(lhs.clone()),
                prim(rhs.clone()),
                None,
                MatmulStrategy::Cube,
                dtype,
            )
            .expect("CubeCL matmul")
        };
        let autotuned = || {
            <B as burn::tensor::ops::FloatTensorOps<B>>::float_matmul(
                prim(lhs.clone()),
                prim(rhs.clone()),
            )
        };
        let lt = || cublaslt::matmul(prim(lhs.clone()), prim(rhs.clone()), false);
        // CubeCL's untuned kernel first: it is the reference of `rel_err`. Autotuning a new
        // shape takes seconds, so `MATMUL_SKIP_AUTOTUNE=1` leaves that column out.
        let mut paths: Vec<(&str, &dyn Fn() -> Prim)> =
            vec![("cubecl-untuned", &untuned), ("cublaslt", &lt)];
        if std::env::var("MATMUL_SKIP_AUTOTUNE").as_deref() != Ok("1") {
            paths.push(("cubecl-autotune", &autotuned));
        }
        let mut results = Vec::new();
        for (path, product) in paths {
            for _ in 0..3 {
                let _ = product();
            }
            B::sync(&device).expect("sync");
            let reps = 20;
            let t0 = Instant::now();
            let outs: Vec<_> = (0..reps).map(|_| product()).collect();
            B::sync(&device).expect("sync");
            let secs = t0.elapsed().as_secs_f64() / reps as f64;
            let out = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(
                outs.into_iter().next().expect("an output"),
            ))
            .cast(DType::F32);
            results.push((path, secs, out));
        }
        let reference = &results[0].2;
        let scale: f32 = reference.clone().abs().max().into_scalar();
        for (path, secs, out) in &results {
            let err: f32 = (out.clone() - reference.clone()).abs().max().into_scalar();
            println!(
                "{}",
                serde_json::json!({
                    "device": "cuda", "dtype": format!("{dtype:?}"), "what": what, "path": path,
                    "m": m, "k": k, "n": n, "batch": batch,
                    "tflops": flops / secs / 1e12, "rel_err": err / scale.max(f32::MIN_POSITIVE),
                })
            );
        }
    }
}

#[cfg(feature = "cuda")]
fn pad4(s: &[usize]) -> [usize; 4] {
    let mut out = [1; 4];
    out[4 - s.len()..].copy_from_slice(s);
    out
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
        Some("cuda") => {
            distill_student::kernels::prepare_cuda().expect("CUDA");
            run_cuda(dtype)
        }
        Some(other) => panic!("device {other}: cpu, or cuda with --features cuda"),
    }
}
