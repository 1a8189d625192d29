//! Integration tests against the committed Hugging Face fixtures (see `tests/fixtures/make_parity.py`).

mod api;
mod batching;
mod chat;
mod common;
mod cpu_kernels;
#[cfg(feature = "cuda")]
mod cuda;
mod errors;
mod grpo;
mod parity;
mod qlora;
mod train;
mod weights;
