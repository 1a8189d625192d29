//! The same parity checks on the CUDA backend (`--features cuda`, needs a GPU at run time).

use burn::prelude::*;
use distill_student::{CudaBackend, DType, GenerationConfig, generate, load_model};

use crate::common::{MODELS, fixture, max_abs_diff, reference};

type C = CudaBackend;

const TF32_TOL: f32 = 1e-2;

fn ids(rows: &[Vec<u32>], device: &burn::tensor::Device<C>) -> Tensor<C, 2, Int> {
    let flat: Vec<i64> = rows.iter().flatten().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), rows[0].len()]), device)
}

#[test]
fn cuda_logits_greedy_and_bf16_match_transformers() {
    let device = burn::tensor::Device::<C>::default();
    for name in MODELS {
        let r = reference(name);
        let want: Vec<f32> = r.logits.iter().flatten().flatten().copied().collect();
        let model = load_model::<C>(fixture(name), &device, DType::F32).unwrap();
        let got: Vec<f32> = model
            .forward(ids(&r.input_ids, &device))
            .into_data()
            .to_vec()
            .unwrap();
        let diff = max_abs_diff(&got, &want);
        println!("cuda f32 {name}: max |logit diff| {diff:.2e}");
        // CubeCL runs f32 matmuls on TF32 tensor cores (10-bit mantissa): ~1e-3 relative, not 1e-4.
        assert!(diff < TF32_TOL, "{name}: {diff}");
        let out = generate(
            &model,
            std::slice::from_ref(&r.prompt),
            &GenerationConfig::greedy(r.greedy.len()),
            None,
            |_| {},
        )
        .unwrap();
        println!(
            "cuda greedy {name}: matches transformers = {} (min top-2 margin {:.4})",
            out[0].token_ids == r.greedy,
            r.min_margin
        );
        // Only a continuation without near-ties is stable under TF32 rounding.
        if r.min_margin > 4.0 * TF32_TOL {
            assert_eq!(out[0].token_ids, r.greedy, "{name}");
        }

        let bf = load_model::<C>(fixture(name), &device, DType::BF16).unwrap();
        let got: Vec<f32> = bf
            .forward(ids(&r.input_ids, &device))
            .cast(DType::F32)
            .into_data()
            .to_vec()
            .unwrap();
        let diff = max_abs_diff(&got, &want);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        println!("cuda bf16 {name}: max |logit diff| {diff:.3} (scale {scale:.2})");
        assert!(diff < 0.05 * scale, "{name}: {diff}");
    }
}

/// Data parallelism on CUDA: replicas on the devices `DISTILL_TEST_CUDA_DEVICES` names (default
/// `0,0`: two replicas sharing GPU 0, which runs the threads, the reduce and the replicated
/// updates on one GPU) train like one device.
#[test]
fn cuda_data_parallel_matches_one_device() {
    use burn::backend::Autodiff;
    use burn::backend::cuda::CudaDevice;
    use distill_student::SaveOptions;
    use distill_student::train::{TrainConfig, Trainer};

    use crate::train::{assert_close, random_examples, resume_config, tensors};

    type T = Autodiff<C>;
    let ordinals: Vec<usize> = std::env::var("DISTILL_TEST_CUDA_DEVICES")
        .unwrap_or_else(|_| "0,0".into())
        .split(',')
        .map(|s| s.trim().parse().expect("a CUDA ordinal"))
        .collect();
    let devices: Vec<CudaDevice> = ordinals.iter().map(|&i| CudaDevice::new(i)).collect();
    let dir = fixture("llama-bias-tied");
    let examples = random_examples(13, 512, 8);
    let config = TrainConfig {
        grad_accum: 2 * devices.len(),
        ..resume_config(false)
    };
    let mut one = Trainer::<T>::new(&dir, &examples, config.clone(), &devices[0]).unwrap();
    let mut many = Trainer::<T>::new(&dir, &examples, config, &devices[0]).unwrap();
    many.replicate_on(&devices[1..]).unwrap();
    while let Some(a) = one.step().unwrap() {
        let b = many.step().unwrap().expect("same number of steps");
        println!("step {}: loss {:.6} vs {:.6}", a.step, a.loss, b.loss);
        assert!((a.loss - b.loss).abs() <= 1e-3 * a.loss, "{a:?} vs {b:?}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let export = |t: &Trainer<T>, name: &str| {
        let d = tmp.path().join(name);
        t.export(&d, SaveOptions::default()).unwrap();
        tensors(&d.join("model.safetensors"))
    };
    let (a, b) = (export(&one, "one"), export(&many, "many"));
    let mut worst = 0f32;
    for (name, (_, v)) in &a {
        worst = worst.max(assert_close(name, &b[name].1, v, TF32_TOL));
    }
    println!("cuda data parallel over {ordinals:?}: max |weight diff| {worst:.2e}");
}

/// cuBLASLt products (the default on CUDA; f32 without TF32) equal the CPU's on awkward shapes:
/// vectors, odd sizes, transposed views, batches, and operands that start inside a buffer
/// (narrowed, so not 256-byte aligned), in f32 and bf16.
#[test]
fn cuda_cublaslt_products_match_the_cpu() {
    use burn::tensor::Distribution;
    use distill_student::CpuBackend;
    use distill_student::kernels::cublaslt;

    let cpu = Default::default();
    let gpu = burn::tensor::Device::<C>::default();
    let mut worst = [0f32; 2];
    for (batch, m, k, n) in [
        (1, 1, 1, 1),
        (1, 1, 7, 5),
        (1, 9, 1, 3),
        (1, 17, 33, 9),
        (3, 5, 64, 31),
        (2, 128, 96, 257),
    ] {
        for (tl, tr, offset) in [
            (false, false, 0),
            (true, false, 0),
            (false, true, 1),
            (true, true, 3),
        ] {
            // A margin of `offset` rows starts the operand inside its buffer.
            let buffer = |r: usize, c: usize, t: bool| {
                let (r0, c0) = if t { (c, r) } else { (r, c) };
                let full = Tensor::<CpuBackend, 3>::random(
                    [batch, r0 + offset, c0],
                    Distribution::Normal(0.0, 1.0),
                    &cpu,
                );
                (full, r0, t)
            };
            fn view<B: Backend>(
                full: Tensor<B, 3>,
                offset: usize,
                r0: usize,
                t: bool,
            ) -> Tensor<B, 3> {
                let x = full.narrow(1, offset, r0);
                if t { x.swap_dims(1, 2) } else { x }
            }
            let (lb, rb) = (buffer(m, k, tl), buffer(k, n, tr));
            let want: Vec<f32> = view(lb.0.clone(), offset, lb.1, lb.2)
                .matmul(view(rb.0.clone(), offset, rb.1, rb.2))
                .into_data()
                .to_vec()
                .unwrap();
            for (i, dtype) in [DType::F32, DType::BF16].into_iter().enumerate() {
                let on_gpu = |(full, r0, t): &(Tensor<CpuBackend, 3>, usize, bool)| {
                    let g = Tensor::<C, 3>::from_data(full.to_data(), &gpu).cast(dtype);
                    view(g, offset, *r0, *t)
                };
                let got = Tensor::<C, 3>::from_primitive(burn::tensor::TensorPrimitive::Float(
                    cublaslt::matmul(
                        on_gpu(&lb).into_primitive().tensor(),
                        on_gpu(&rb).into_primitive().tensor(),
                        false,
                    ),
                ));
                assert_eq!(got.dims(), [batch, m, n]);
                let got: Vec<f32> = got.cast(DType::F32).into_data().to_vec().unwrap();
                let scale = want.iter().fold(1e-6f32, |a, v| a.max(v.abs()));
                let err = max_abs_diff(&got, &want) / scale;
                let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                println!(
                    "{batch}x{m}x{k}x{n} t=({tl},{tr}) offset {offset} {dtype:?}: rel err {err:.2e}"
                );
                assert!(
                    err < tol,
                    "{batch}x{m}x{k}x{n} t=({tl},{tr}) offset {offset} {dtype:?}: {err}"
                );
                worst[i] = worst[i].max(err);
            }
        }
    }
    println!(
        "cuBLASLt against the CPU: worst relative error f32 {:.2e}, bf16 {:.2e}",
        worst[0], worst[1]
    );
}

/// Training on CUDA (products through cuBLASLt, exact f32) follows the CPU's trainer: full
/// fine-tuning and LoRA with recomputation, losses and final weights.
#[test]
fn cuda_training_matches_the_cpu() {
    use burn::backend::Autodiff;
    use distill_student::SaveOptions;
    use distill_student::train::Trainer;

    use crate::train::{assert_close, random_examples, resume_config, tensors};

    let dir = fixture("llama-bias-tied");
    let examples = random_examples(13, 512, 8);
    let tmp = tempfile::tempdir().unwrap();
    for lora in [false, true] {
        let config = resume_config(lora);
        let mut gpu =
            Trainer::<Autodiff<C>>::new(&dir, &examples, config.clone(), &Default::default())
                .unwrap();
        let mut cpu = Trainer::<Autodiff<distill_student::CpuBackend>>::new(
            &dir,
            &examples,
            config,
            &Default::default(),
        )
        .unwrap();
        while let Some(a) = cpu.step().unwrap() {
            let b = gpu.step().unwrap().expect("same number of steps");
            println!(
                "lora {lora} step {}: cpu {:.6} cuda {:.6}",
                a.step, a.loss, b.loss
            );
            assert!((a.loss - b.loss).abs() <= 1e-3 * a.loss, "{a:?} vs {b:?}");
        }
        let (dc, dg) = (
            tmp.path().join(format!("cpu{lora}")),
            tmp.path().join(format!("gpu{lora}")),
        );
        cpu.export(&dc, SaveOptions::default()).unwrap();
        gpu.export(&dg, SaveOptions::default()).unwrap();
        let (a, b) = (
            tensors(&dc.join("model.safetensors")),
            tensors(&dg.join("model.safetensors")),
        );
        let mut worst = 0f32;
        for (name, (_, v)) in &a {
            worst = worst.max(assert_close(name, &b[name].1, v, 1e-3));
        }
        println!("cuda vs cpu training (lora {lora}): max |weight diff| {worst:.2e}");
    }
}
