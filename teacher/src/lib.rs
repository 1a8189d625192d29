//! Client for reasoning (R1-style) teacher servers speaking the OpenAI chat API.
//!
//! [`OpenAiClient`] turns a [`ChatRequest`] into [`Completion`]s whose reasoning
//! is split from the answer however the server delivered it, and absorbs what
//! long generation runs meet in practice: rate limits, overloaded or dead
//! replicas, dropped streams. The pipeline depends only on the object-safe
//! [`ChatModel`] trait, so tests and other backends can stand in.
//!
//! [`connect`] builds the client for a `[teacher.NAME]`; for a simulated teacher
//! ([`sim`], for demos and tests, never a teacher) it first starts the simulator's
//! loopback server, which then lives as long as the client.

mod client;
mod config;
mod error;
mod limiter;
pub mod loopback;
mod pool;
mod reasoning;
pub mod sim;
mod sse;
mod types;
mod wire;

use async_trait::async_trait;

pub use client::{ClientStats, OpenAiClient};
pub use config::{BaseUrls, TeacherConfig};
pub use error::TeacherError;
pub use pool::EndpointStatus;
pub use reasoning::{find, normalize, split_think};
pub use types::{ChatRequest, Completion, Message, Role};

/// The client for `config`: [`OpenAiClient::new`] for a server, or, for a simulated
/// teacher, a client of a simulator started on loopback that stops when the client
/// and its clones are dropped. Must be called inside a Tokio runtime.
pub async fn connect(config: &TeacherConfig) -> Result<OpenAiClient, TeacherError> {
    if config.simulated.is_some() {
        OpenAiClient::simulated(config.clone()).await
    } else {
        OpenAiClient::new(config.clone())
    }
}

/// A source of chat completions.
#[async_trait]
pub trait ChatModel: Send + Sync + std::fmt::Debug {
    /// Samples `request.n` completions, returned in choice-index order. Transient
    /// failures are retried inside; an error means the request as a whole failed.
    async fn chat(&self, request: &ChatRequest) -> Result<Vec<Completion>, TeacherError>;

    /// The JSON body sent for `request`, for hashing into a response-cache key;
    /// it never contains credentials. When `n > 1` goes to a server without `n`
    /// support, each choice `i` is sent as `request_body(&request.single(i))`
    /// (but for choice 0 of the request that found a server ignoring `n`).
    fn request_body(&self, request: &ChatRequest) -> serde_json::Value;

    /// Model name requested from the server.
    fn model(&self) -> &str;

    /// Endpoints found to ignore `n` (answering `n > 1` with one choice), which
    /// therefore get one request per sample; for run summaries.
    fn endpoints_without_n(&self) -> Vec<String> {
        Vec::new()
    }
}
