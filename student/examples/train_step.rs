//! Training steps on a real-sized model, on the CPU or (built with `--features cuda`) a CUDA GPU:
//! step time, tokens/s, loss, and the memory planner's estimate for the same settings.
//!
//! `cargo run --release -p distill-student [--features cuda] --example train_step -- \
//!     DEVICE MODEL SEQ BATCH STEPS PRECISION MODE METHOD`
//! - DEVICE: `cpu` or `cuda`
//! - MODEL: a model folder with weights (loaded), or a folder / `config.json` without (random init)
//! - PRECISION: `f32` or `bf16`; MODE: `plain` or `recompute`; METHOD: `full`, `lora16` (any rank)
//!   or `qlora16` (the same on a 4-bit NF4 base)
//!
//! Prints one JSON line per step (the trainer's metrics) and one with the plan. With
//! `TRAIN_STEP_SAVE=DIR` it also writes `DIR/checkpoint` and `DIR/export` (adapters merged), for
//! `tests/fixtures/train/check_checkpoint.py`; `TRAIN_STEP_LR` overrides the learning rate (1e-5).
//! `TRAIN_STEP_DEVICES=0,1,2,3` trains data parallel on those CUDA ordinals (on the CPU, that many
//! replicas): each device takes one micro-batch of BATCH sequences per step. On CUDA,
//! `DISTILL_GEMM=cublaslt|cubecl|cubecl-untuned` picks the matrix products (`kernels`).

use burn::backend::Autodiff;
use distill_student::plan::{Method, PlanSettings, plan};
use distill_student::train::TrainBackend;
use distill_student::train::{
    LoraConfig, MicroBatch, Precision, TrainConfig, Trainer, init_quantized,
};
use distill_student::{CausalLm, DType, ModelConfig};

#[path = "../benches/support/synthetic.rs"]
mod synthetic;

fn run<B: TrainBackend>(device_of: impl Fn(usize) -> B::Device, args: &[String]) {
    let [_, model, seq, batch, steps, precision, mode, method] = args else {
        panic!("usage: DEVICE MODEL SEQ BATCH STEPS f32|bf16 plain|recompute full|loraR|qloraR");
    };
    let num = |s: &str| s.parse::<usize>().expect("a number");
    let (seq, batch, steps) = (num(seq), num(batch), num(steps));
    // `qloraR`: LoRA of rank R on a 4-bit NF4 base.
    let qlora = method.starts_with("qlora");
    let lora = method.trim_start_matches('q').strip_prefix("lora").map(num);
    let devices: Vec<B::Device> = std::env::var("TRAIN_STEP_DEVICES")
        .unwrap_or_else(|_| "0".into())
        .split(',')
        .map(|s| device_of(num(s.trim())))
        .collect();
    let device = &devices[0];
    let config = TrainConfig {
        grad_accum: devices.len(),
        learning_rate: std::env::var("TRAIN_STEP_LR")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1e-5),
        warmup_ratio: 0.0,
        max_steps: Some(steps),
        micro_batch: MicroBatch::Sequences(batch),
        max_seq_len: seq + 1,
        precision: if precision == "bf16" {
            Precision::Bf16
        } else {
            Precision::F32
        },
        recompute: mode == "recompute",
        lora: lora.map(|rank| LoraConfig {
            rank,
            alpha: 2.0 * rank as f64,
            base_bits: qlora.then_some(4),
            ..LoraConfig::default()
        }),
        ..TrainConfig::default()
    };
    let mc = ModelConfig::from_file(model).expect("config.json");
    let data = synthetic::sft_examples(batch * devices.len(), seq, seq / 8, mc.vocab_size, 11);
    let path = std::path::Path::new(model);
    let mut trainer = if path.join("model.safetensors").is_file()
        || path.join("model.safetensors.index.json").is_file()
    {
        Trainer::<B>::new(path, &data, config.clone(), device).expect("trainer")
    } else if qlora {
        // Made on the device layer by layer, each quantized at once: a 70B shape never
        // exists dense (its bf16 weights alone would fill an H200).
        let dtype = if precision == "bf16" {
            DType::BF16
        } else {
            DType::F32
        };
        let t0 = std::time::Instant::now();
        let (base, quant) = init_quantized::<B>(&mc, device, dtype);
        // Where a large run stops matters (the 70B run's first H200 attempt ran out of memory
        // without saying whether the model or the first step was being made).
        eprintln!(
            "quantized model made in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        Trainer::<B>::from_quantized(base, quant, &data, config.clone(), device).expect("trainer")
    } else {
        // Seeded, so runs that differ only in their kernels start from the same weights.
        B::seed(device, 42);
        let base = CausalLm::<B>::init(&mc, device);
        Trainer::<B>::from_model(base, &data, config.clone(), device).expect("trainer")
    };
    trainer.replicate_on(&devices[1..]).expect("devices");
    while let Some(m) = trainer.step().expect("step") {
        println!("{}", serde_json::to_string(&m).expect("metrics serialise"));
    }
    if let Some(dir) = std::env::var_os("TRAIN_STEP_SAVE") {
        let dir = std::path::PathBuf::from(dir);
        trainer
            .save_checkpoint(dir.join("checkpoint"))
            .expect("checkpoint");
        trainer
            .export(dir.join("export"), distill_student::SaveOptions::default())
            .expect("export");
    }
    let p = plan(
        &mc,
        &PlanSettings {
            method: match lora {
                Some(rank) if qlora => Method::Qlora { rank },
                Some(rank) => Method::Lora { rank },
                None => Method::Full,
            },
            seq_len: seq,
            micro_batch: batch,
            recompute: config.recompute,
            bf16: config.precision == Precision::Bf16,
            ..PlanSettings::default()
        },
    );
    println!(
        "{}",
        serde_json::json!({"plan_total_gib": p.total_gib(), "plan": p})
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("cpu") => run::<Autodiff<distill_student::CpuBackend>>(|_| Default::default(), &args),
        #[cfg(feature = "cuda")]
        Some("cuda") => {
            distill_student::kernels::prepare_cuda().expect("CUDA");
            eprintln!("products: {:?}", distill_student::kernels::gemm_settings());
            run::<Autodiff<distill_student::CudaBackend>>(
                burn::backend::cuda::CudaDevice::new,
                &args,
            )
        }
        other => panic!("device {other:?}: cpu, or cuda with --features cuda"),
    }
}
