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
