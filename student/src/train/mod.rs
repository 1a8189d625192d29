//! Supervised fine-tuning of students on curated reasoning traces (the R1-distill recipe): loss
//! on the assistant target only, AdamW, warmup + cosine schedule, global-norm clipping,
//! gradient accumulation, length-grouped batches, optional LoRA and per-layer recomputation,
//! bf16 compute with f32 masters, atomic checkpoints and bit-exact resume.
//!
//! ```no_run
//! # use distill_student::train::*;
//! # fn run(examples: Vec<distill_student::SftExample>) -> TrainResult<()> {
//! type B = burn::backend::Autodiff<distill_student::CpuBackend>;
//! let device = Default::default();
//! let mut trainer = Trainer::<B>::new("models/Qwen2.5-Math-1.5B", &examples, TrainConfig::default(), &device)?;
//! while let Some(m) = trainer.step()? {
//!     println!("step {} loss {:.4} lr {:.2e}", m.step, m.loss, m.lr);
//!     if m.step % 500 == 0 {
//!         trainer.save_checkpoint(format!("runs/x/checkpoint-{}", m.step))?;
//!     }
//! }
//! trainer.export("runs/x/final", distill_student::SaveOptions::default())?;
//! # Ok(()) }
//! ```
//!
//! The backend decides the device: `Autodiff<Flex>` on CPU, `Autodiff<Cuda>` on a GPU;
//! [`Trainer::replicate_on`] adds devices for data parallelism (every device a whole replica).

mod adamw;
mod checkpoint;
mod collective;
mod config;
mod data;
mod error;
mod grpo;
mod lora;
mod model;
mod parallel;
mod qlora;
mod schedule;
mod trainer;

pub use checkpoint::{RngState, STATE_FILE, TrainerState, read_trainer_state};
pub use collective::{
    Collective, CollectiveError, CollectiveResult, SharedGroup, TcpGroup, World, join_world, lock,
};
pub use config::{
    LoraConfig, LoraTarget, LrSchedule, MicroBatch, Overlong, Precision, TrainConfig,
};
pub use data::{DataStats, SftRecord, examples_from_records};
pub use error::{TrainError, TrainResult};
pub use grpo::{
    GRPO_STATE_FILE, GrpoConfig, GrpoLoss, GrpoState, GrpoStepMetrics, GrpoTrainer, PromptBatch,
    Rollout, group_advantages, read_grpo_state,
};
pub use lora::{ADAPTER_CONFIG_FILE, ADAPTER_FILE, LoraAdapters, LoraLayer, LoraPair};
pub use model::TrainModel;
pub use parallel::{ReplicaBytes, Sharding};
pub use qlora::{QuantLayer, dequantize_base, init_quantized, load_quantized, quantize_base};
pub use schedule::{learning_rate, warmup_steps};
pub use trainer::{ADAPTER_DIR, CheckpointInfo, NamedTensor, StepMetrics, Trainer, peak_rss_bytes};

/// What the trainer runs on: an autodiff backend whose both levels have the NF4 products
/// QLoRA needs (Flex and CUDA do, through [`crate::quant::QuantOps`]' defaults).
pub trait TrainBackend:
    burn::tensor::backend::AutodiffBackend<InnerBackend: crate::quant::QuantOps>
    + crate::quant::QuantOps
{
}

impl<B> TrainBackend for B where
    B: burn::tensor::backend::AutodiffBackend<InnerBackend: crate::quant::QuantOps>
        + crate::quant::QuantOps
{
}

/// The CPU training backend.
pub type CpuTrainBackend = burn::backend::Autodiff<crate::CpuBackend>;

/// The CUDA training backend (`--features cuda`).
#[cfg(feature = "cuda")]
pub type CudaTrainBackend = burn::backend::Autodiff<crate::CudaBackend>;
