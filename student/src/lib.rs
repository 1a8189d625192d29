//! Student models for distillation: Qwen2 and Llama decoders in Burn, loaded from and saved to
//! Hugging Face checkpoints, with the HF tokenizer, chat templates, SFT example rendering and
//! KV-cached generation. Backend-generic: `Flex` on CPU, `Cuda` behind the `cuda` feature.
//!
//! This crate knows nothing of the pipeline's database or HTTP; the CLI calls [`api`].

pub mod api;
pub mod config;
pub mod error;
pub mod generate;
pub mod model;
pub mod plan;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use api::{
    GenerateRequest, GenerateResult, ModelInfo, NllRecord, NllReport, Student, model_info,
    model_nll,
};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use error::{Result, StudentError};
pub use generate::{FinishReason, Generation, GenerationConfig, TokenEvent, generate};
pub use model::{CausalLm, KvCache};
pub use tokenizer::{ChatMessage, ChatTemplate, SftExample, Tokenizer};
pub use weights::{SaveOptions, SavedCheckpoint, load_model, save_pretrained};

/// Re-exported so callers name dtypes without depending on Burn directly.
pub use burn::tensor::DType;

/// The CPU backend used by tests and the CLI's default.
pub type CpuBackend = burn::backend::Flex;

/// The CUDA backend (`--features cuda`).
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda;
