//! Sampling settings, results, and [`generate`]: a batch of prompts through the continuous-batching
//! generator ([`crate::batching`]) with greedy or temperature/top-k/top-p sampling from seeded
//! ChaCha streams, stop tokens, stop strings, a token budget, and a streaming callback.

use std::ops::ControlFlow;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::batching::{BatchEvent, BatchGenerator, SequenceRequest};
use crate::error::{Result, StudentError};
use crate::model::CausalLm;
use crate::tokenizer::Tokenizer;

/// Sampling and stopping settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Upper bound on generated tokens per sequence.
    pub max_new_tokens: usize,
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Seed of the per-sequence ChaCha streams (row `i` uses stream `i`, so a row's sample does not
    /// depend on what else is in the batch).
    pub seed: u64,
    /// Token ids that end a sequence (not included in the output).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end a sequence once decoded text contains them (text is cut before them).
    pub stop_strings: Vec<String>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop_token_ids: vec![],
            stop_strings: vec![],
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding of at most `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            ..Self::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(StudentError::InvalidArgument(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(StudentError::InvalidArgument(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token (e.g. EOS) was sampled.
    StopToken(u32),
    /// The decoded text contained a stop string.
    StopString(String),
    /// `max_new_tokens` was reached.
    Length,
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Generated ids, without the prompt and without a final stop token.
    pub token_ids: Vec<u32>,
    /// Decoded text (empty when no tokenizer was given), cut before a stop string.
    pub text: String,
    /// Why generation ended.
    pub finish_reason: FinishReason,
}

/// A token as it is produced, for streaming.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent<'a> {
    /// Which prompt of the batch.
    pub row: usize,
    /// The new token id.
    pub token_id: u32,
    /// Newly completed text (may be empty while a multi-byte character is incomplete).
    pub text: &'a str,
}

/// Generates continuations of `prompts` (token ids) together: the [`BatchGenerator`] with every
/// prompt in flight at once, row `i` sampling from stream `i` of `cfg.seed`, so a row's output
/// does not depend on what else is in the batch. `tokenizer` is needed for stop strings and for
/// `text`; `on_token` sees every token as it is produced, with its text when a tokenizer is given.
pub fn generate<B: Backend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    mut on_token: impl FnMut(TokenEvent<'_>),
) -> Result<Vec<Generation>> {
    let requests: Vec<SequenceRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| SequenceRequest::new(p.clone(), cfg.seed, i as u64))
        .collect();
    let mut out: Vec<Option<Generation>> = vec![None; prompts.len()];
    BatchGenerator::new(model, tokenizer, cfg.clone())?
        .max_batch(prompts.len())
        .stream_text(tokenizer.is_some())
        .run(&requests, |event| {
            match event {
                BatchEvent::Token {
                    request,
                    token_id,
                    text,
                } => on_token(TokenEvent {
                    row: request,
                    token_id,
                    text,
                }),
                BatchEvent::Finished {
                    request,
                    generation,
                } => out[request] = Some(generation),
            }
            ControlFlow::Continue(())
        })?;
    Ok(out
        .into_iter()
        .map(|g| g.expect("every request finishes"))
        .collect())
}
