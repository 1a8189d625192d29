//! QLoRA: NF4 products against the dequantized weight (forward and input gradient, one tile and
//! several), training on a 4-bit base that never changes, the merge into the original base, and
//! PEFT loading the adapter on top of that base (where Python has `peft`).

use std::path::Path;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::prelude::*;
use distill_student::quant::{BLOCK, Nf4Matrix, Nf4Weight};
use distill_student::train::{
    LoraConfig, MicroBatch, TrainConfig, Trainer, dequantize_base, quantize_base,
};
use distill_student::weights::load_model_nf4;
use distill_student::{DType, SaveOptions, load_model, save_pretrained};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::*;
use crate::train::{assert_close, assert_merged_is_base_plus_adapters, random_examples, tensors};

type T = Autodiff<B>;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

#[test]
fn nf4_products_equal_products_with_the_dequantized_weight() {
    // 200 inputs: a partial last block; 70 outputs: uneven tiles of 16.
    let (d_in, d_out, rows) = (200, 70, 5);
    let host = Nf4Matrix::quantize(&random(d_in * d_out, 1), d_in, d_out);
    assert_eq!(host.padded_in(), 4 * BLOCK);
    let dense = host.dequantize();
    let w_dense =
        Tensor::<B, 2>::from_data(TensorData::new(dense.clone(), [d_in, d_out]), &device());
    let x = random(rows * d_in, 2);
    let r = random(rows * d_out, 3);
    // Quantizing on the device gives the host's codes and scales, byte for byte (a zero block
    // included).
    let mut w = random(d_in * d_out, 1);
    for r in 64..128 {
        w[r * d_out + 3] = 0.0;
    }
    let on_device = Nf4Weight::<B>::quantize(Tensor::from_data(
        TensorData::new(w.clone(), [d_in, d_out]),
        &device(),
    ));
    let on_host = Nf4Matrix::quantize(&w, d_in, d_out).to_device::<B>(&device());
    assert!(
        on_device.to_bytes() == on_host.to_bytes(),
        "device and host NF4 differ"
    );
    for tile in [d_out, 16] {
        let q = host.to_device::<B>(&device()).with_tile_columns(tile);
        // The device's dequantization is the host's, bit for bit.
        assert_eq!(to_vec(q.dequantize(DType::F32)), dense, "tile {tile}");
        let xt = Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [rows, d_in]), &device());
        let want = to_vec(xt.clone().matmul(w_dense.clone()));
        assert_close(
            &format!("forward, tile {tile}"),
            &to_vec(q.matmul(xt)),
            &want,
            1e-5,
        );

        // Input gradient through the autodiff node: d(sum(y·r))/dx = r·Wᵀ.
        let qa = host.to_device::<T>(&device()).with_tile_columns(tile);
        let xa = Tensor::<T, 2>::from_data(TensorData::new(x.clone(), [rows, d_in]), &device())
            .require_grad();
        let ra = Tensor::<T, 2>::from_data(TensorData::new(r.clone(), [rows, d_out]), &device());
        let grads = (qa.matmul(xa.clone()) * ra).sum().backward();
        let got = to_vec(xa.grad(&grads).unwrap());
        let rt = Tensor::<B, 2>::from_data(TensorData::new(r.clone(), [rows, d_out]), &device());
        let want = to_vec(rt.matmul(w_dense.clone().transpose()));
        assert_close(&format!("input gradient, tile {tile}"), &got, &want, 1e-5);
    }
}

#[test]
fn loading_quantized_equals_quantizing_the_loaded_model() {
    // The streaming load (each weight quantized on the host as it is read, the dense base never
    // on the device) must give the NF4 weights quantizing the dense model gives.
    for name in ["qwen2-untied", "llama-bias-tied"] {
        let dir = fixture(name);
        let (dense_side, quant) = quantize_base(load(&dir));
        let (streamed_side, nf4) = load_model_nf4::<B>(&dir, &device(), DType::F32).unwrap();
        assert_eq!(nf4.len(), quant.len(), "{name}");
        for (a, b) in quant.iter().zip(&nf4) {
            assert_eq!(a.weights.len(), b.len());
            for (x, y) in a.weights.iter().zip(b) {
                assert!(x.to_bytes() == y.to_bytes(), "{name}: NF4 weights differ");
            }
        }
        // Everything else (embeddings, norms, biases, head) is the same.
        assert_eq!(params(&dense_side), params(&streamed_side), "{name}");
    }
}

fn qlora() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        base_bits: Some(4),
        ..LoraConfig::default()
    }
}

#[test]
fn qlora_trains_on_an_unchanging_4bit_base_and_merges_into_the_original() {
    let dir = fixture("qwen2-untied");
    let base = tensors(&dir.join("model.safetensors"));
    let examples = random_examples(6, 512, 3);
    let lora = qlora();
    let config = TrainConfig {
        learning_rate: 1e-2,
        warmup_ratio: 0.0,
        epochs: 15,
        micro_batch: MicroBatch::Sequences(3),
        recompute: true,
        lora: Some(lora.clone()),
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::<T>::new(&dir, &examples, config, &device()).unwrap();
    let quant_bytes = |t: &Trainer<T>| -> Vec<Vec<u8>> {
        t.model()
            .quant
            .iter()
            .flat_map(|l| l.weights.iter().map(|w| w.to_bytes()))
            .collect()
    };
    let before = quant_bytes(&trainer);
    assert_eq!(
        before.len(),
        3 * 7,
        "every linear weight of every layer is NF4"
    );
    // The dense weights left the model.
    let q_proj = &trainer.model().base.model.layers[0].self_attn.q_proj;
    assert_eq!(q_proj.weight.val().dims(), [0, 0]);
    let mut losses = vec![];
    while let Some(m) = trainer.step().unwrap() {
        losses.push(m.loss);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    println!("QLoRA loss {first:.3} -> {last:.3}");
    assert!(last < 0.7 * first, "{first} -> {last}");
    assert!(quant_bytes(&trainer) == before, "the 4-bit base changed");

    // The in-memory merge is the function that was trained (dequantized base + adapters).
    let ids = ids_tensor(&[examples[0].prompt_ids.clone()]);
    let trained = to_vec(trainer.model().valid().logits(ids.clone(), DType::F32));
    let merged = trainer.merged_model();
    assert_close(
        "merged_model logits",
        &to_vec(merged.forward(ids.clone())),
        &trained,
        1e-4,
    );

    // The export folds the adapters into the original f32 base, not the dequantized one.
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    trainer.save_checkpoint(&ckpt).unwrap();
    let export = tmp.path().join("export");
    trainer.export(&export, SaveOptions::default()).unwrap();
    let checked = assert_merged_is_base_plus_adapters(&export, &ckpt, &base, &lora);
    assert_eq!(checked, 3 * 7);
    // ...which computes something else than the 4-bit base did: the quantization was real.
    let exported = load_model::<B>(&export, &device(), DType::F32).unwrap();
    let d = max_abs_diff(&to_vec(exported.forward(ids)), &trained);
    assert!(d > 1e-3, "export and trained logits differ by only {d:.1e}");

    peft_matches(&dir, &ckpt, &export, &examples[0].prompt_ids);
}

#[test]
fn qlora_is_lora_on_the_dequantized_base() {
    // A QLoRA step must compute exactly what a LoRA step computes on a base whose linear
    // weights are the dequantized NF4 ones: same gradients, same adapters after two steps.
    let dir = fixture("llama3-scaled");
    let tmp = tempfile::tempdir().unwrap();
    let (placeholders, quant) = quantize_base(load(&dir));
    let dequantized = tmp.path().join("dequantized");
    save_pretrained(
        &dequantize_base(placeholders, &quant, DType::F32),
        &dequantized,
        &SaveOptions::default(),
    )
    .unwrap();
    let examples = random_examples(6, 256, 9);
    let config = |base_bits| TrainConfig {
        learning_rate: 1e-2,
        warmup_ratio: 0.0,
        max_steps: Some(2),
        micro_batch: MicroBatch::Sequences(3),
        recompute: true,
        attention_chunk_tokens: 4,
        lora: Some(LoraConfig {
            base_bits,
            ..qlora()
        }),
        ..TrainConfig::default()
    };
    let mut q = Trainer::<T>::new(&dir, &examples, config(Some(4)), &device()).unwrap();
    let mut l = Trainer::<T>::new(&dequantized, &examples, config(None), &device()).unwrap();
    let (gq, gl) = (q.peek_gradients().unwrap(), l.peek_gradients().unwrap());
    assert_eq!(gq.len(), gl.len());
    assert!(!gq.is_empty());
    for ((name, _, a), (name_l, _, b)) in gq.iter().zip(&gl) {
        assert_eq!(name, name_l);
        assert_close(&format!("gradient of {name}"), a, b, 1e-5);
    }
    while q.step().unwrap().is_some() {}
    while l.step().unwrap().is_some() {}
    assert_same_adapters(&q, &l, 1e-5);
}

/// The two trainers' adapters, as their checkpoints write them, agree within `tol`.
fn assert_same_adapters(a: &Trainer<T>, b: &Trainer<T>, tol: f32) {
    let tmp = tempfile::tempdir().unwrap();
    let read = |t: &Trainer<T>, name: &str| {
        let dir = tmp.path().join(name);
        t.save_checkpoint(&dir).unwrap();
        tensors(&dir.join("adapter_model.safetensors"))
    };
    let (a, b) = (read(a, "a"), read(b, "b"));
    assert_eq!(a.len(), b.len());
    assert!(!a.is_empty());
    for (name, (_, v)) in &a {
        assert_close(name, &b[name].1, v, tol);
    }
}

#[test]
fn qlora_resumes_to_the_same_adapters() {
    let dir = fixture("llama-bias-tied");
    let examples = random_examples(9, 512, 5);
    let mut config = crate::train::resume_config(true);
    config.lora.as_mut().unwrap().base_bits = Some(4);
    let mut full = Trainer::<T>::new(&dir, &examples, config.clone(), &device()).unwrap();
    let n = full.total_steps();
    while full.step().unwrap().is_some() {}
    let tmp = tempfile::tempdir().unwrap();
    let mut first = Trainer::<T>::new(&dir, &examples, config, &device()).unwrap();
    for _ in 0..n / 2 {
        first.step().unwrap();
    }
    let ckpt = tmp.path().join("checkpoint");
    first.save_checkpoint(&ckpt).unwrap();
    drop(first);
    let mut second = Trainer::<T>::resume(&ckpt, &examples, &device()).unwrap();
    while second.step().unwrap().is_some() {}
    assert_same_adapters(&full, &second, 1e-6);
}

/// Where Python has `peft`, `transformers` and `torch`: PEFT's model (the checkpoint's adapter on
/// the original base) gives the logits of distill's merged export within 1e-4.
fn peft_matches(base: &Path, ckpt: &Path, export: &Path, ids: &[u32]) {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import peft, transformers, torch"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "skipped the PEFT check: python3 with peft, transformers and torch is not installed"
        );
        return;
    }
    let script = r#"
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
ids = torch.tensor([json.loads(sys.argv[3])])
with torch.no_grad():
    print(json.dumps(model(input_ids=ids).logits[0].flatten().tolist()))
"#;
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            base.to_str().unwrap(),
            ckpt.to_str().unwrap(),
            &serde_json::to_string(ids).unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "PEFT could not load {}: {}",
        ckpt.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let peft: Vec<f32> = serde_json::from_slice(&out.stdout).unwrap();
    let ours = load_model::<B>(export, &device(), DType::F32).unwrap();
    let want = to_vec(ours.forward(ids_tensor(&[ids.to_vec()])));
    let d = assert_close("PEFT logits vs distill's merged export", &peft, &want, 1e-4);
    println!("PEFT (adapter on the original base) vs distill: max |logit diff| {d:.2e}");
}
