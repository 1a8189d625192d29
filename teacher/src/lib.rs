//! Client for reasoning (R1-style) teacher servers speaking the OpenAI chat API.
//!
//! [`OpenAiClient`] turns a [`ChatRequest`] into [`Completion`]s whose reasoning
//! is split from the answer however the server delivered it, and absorbs what
//! long generation runs meet in practice: rate limits, overloaded or dead
//! replicas, dropped streams. The pipeline depends only on the object-safe
//! [`ChatModel`] trait, so tests and other backends can stand in.

mod client;
mod config;
mod error;
mod limiter;
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
pub use reasoning::{normalize, split_think};
pub use types::{ChatRequest, Completion, Message, Role};

/// A source of chat completions.
#[async_trait]
pub trait ChatModel: Send + Sync + std::fmt::Debug {
    /// Samples `request.n` completions, returned in choice-index order. Transient
    /// failures are retried inside; an error means the request as a whole failed.
    async fn chat(&self, request: &ChatRequest) -> Result<Vec<Completion>, TeacherError>;

    /// The JSON body sent for `request`, for hashing into a response-cache key;
    /// it never contains credentials. When `n > 1` goes to a server without `n`
    /// support, each choice `i` is sent as `request_body(&request.single(i))`.
    fn request_body(&self, request: &ChatRequest) -> serde_json::Value;

    /// Model name requested from the server.
    fn model(&self) -> &str;
}
