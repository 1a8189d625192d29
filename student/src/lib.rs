//! Student models for distillation: Qwen2 and Llama decoders in Burn, loaded from and saved to
//! Hugging Face checkpoints, with the HF tokenizer, chat templates, SFT example rendering and
//! KV-cached generation. Backend-generic: `Flex` on CPU, `Cuda` behind the `cuda` feature.
//!
//! This crate knows nothing of the pipeline's database or HTTP; the CLI calls [`api`].

pub mod api;
pub mod batching;
pub mod config;
pub mod error;
pub mod generate;
pub mod kernels;
pub mod model;
pub mod plan;
pub mod quant;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use api::{
    GenerateRequest, GenerateResult, ModelInfo, NllRecord, NllReport, Student, model_info,
    model_nll,
};
pub use batching::{BatchEvent, BatchGenerator, SequenceRequest};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use error::{Result, StudentError};
pub use generate::{FinishReason, Generation, GenerationConfig, TokenEvent, generate};
pub use model::{CausalLm, KvCache, SlotCache};
pub use tokenizer::{ChatMessage, ChatTemplate, SftExample, Tokenizer};
pub use weights::{SaveOptions, SavedCheckpoint, load_model, save_pretrained};

/// Re-exported so callers name dtypes without depending on Burn directly.
pub use burn::tensor::DType;

/// The CPU backend used by tests and the CLI's default.
pub type CpuBackend = burn::backend::Flex;

/// The CUDA backend (`--features cuda`).
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda;

/// How many GPUs the CUDA driver reports, or why none can be used (no driver library, a driver
/// error). Checked before a run starts, so a bad `devices` list fails with a message instead of
/// a panic deep inside the backend.
#[cfg(feature = "cuda")]
pub fn cuda_device_count() -> std::result::Result<usize, String> {
    use cudarc::driver::result;
    // cudarc loads libcuda lazily and panics when it is missing; that panic is the answer
    // "no driver", so it is caught, with the default hook's message silenced meanwhile.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let count = std::panic::catch_unwind(|| {
        result::init().map_err(|e| format!("CUDA driver: {e}"))?;
        result::device::get_count()
            .map(|n| n.max(0) as usize)
            .map_err(|e| format!("CUDA driver: {e}"))
    });
    std::panic::set_hook(hook);
    count.unwrap_or_else(|_| Err("no CUDA driver library (libcuda) on this machine".into()))
}

/// Bytes of free memory on the first CUDA device, if the driver answers.
#[cfg(feature = "cuda")]
pub fn cuda_memory_free() -> Option<u64> {
    use cudarc::driver::result;
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let free = std::panic::catch_unwind(|| {
        result::init().ok()?;
        let dev = result::device::get(0).ok()?;
        // A context must be current to ask; the primary context is the one the backend uses.
        let ctx = unsafe { result::primary_ctx::retain(dev) }.ok()?;
        unsafe { result::ctx::set_current(ctx) }.ok()?;
        result::mem_get_info().ok().map(|(free, _)| free as u64)
    });
    std::panic::set_hook(hook);
    free.ok().flatten()
}
