//! Request and response types shared by every [`ChatModel`](crate::ChatModel).

use serde::{Deserialize, Serialize};

/// Who speaks a [`Message`]; serialised in lowercase as OpenAI expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation (R1 recommends none; kept for other teachers).
    System,
    /// The prompt.
    User,
    /// A previous model turn, for few-shot or multi-turn prompts.
    Assistant,
}

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// Speaker of the turn.
    pub role: Role,
    /// Text of the turn.
    pub content: String,
}

impl Message {
    /// A system turn.
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
        }
    }

    /// A user turn.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }

    /// An assistant turn.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

fn one() -> u32 {
    1
}

/// What to ask the teacher; sampling fields left `None` use the server's defaults
/// and are then omitted from the request body, so they do not perturb its hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// The conversation, ending with the prompt.
    pub messages: Vec<Message>,
    /// Sampling temperature (R1 recommends 0.6).
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass (R1 recommends 0.95).
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Cap on generated tokens, reasoning included.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Number of samples wanted; servers without `n` support get `n` separate requests.
    #[serde(default = "one")]
    pub n: u32,
    /// Sampling seed; servers that honour it make responses reproducible.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop sequences.
    #[serde(default)]
    pub stop: Vec<String>,
}

impl Default for ChatRequest {
    fn default() -> Self {
        Self {
            messages: Vec::new(),
            temperature: None,
            top_p: None,
            max_tokens: None,
            n: 1,
            seed: None,
            stop: Vec::new(),
        }
    }
}

impl ChatRequest {
    /// A request for one sample of `messages` with server-default sampling.
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            messages,
            ..Self::default()
        }
    }

    /// A request with a single user turn, the usual shape for R1 prompts.
    pub fn user(prompt: impl Into<String>) -> Self {
        Self::new(vec![Message::user(prompt)])
    }

    /// The single-sample request the client sends for choice `index` when the
    /// server cannot take `n > 1`. The seed is offset by the index, because n
    /// requests with one seed would return n copies of one sample.
    pub fn single(&self, index: u32) -> ChatRequest {
        ChatRequest {
            n: 1,
            seed: self.seed.map(|s| s.wrapping_add(u64::from(index))),
            ..self.clone()
        }
    }
}

/// One sampled answer, with its reasoning split out whatever way the server sent it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Choice index within the request (0..n).
    pub index: u32,
    /// The chain of thought, without `<think>` tags or surrounding whitespace.
    pub reasoning: String,
    /// The final answer after the reasoning, trimmed.
    pub answer: String,
    /// Why generation stopped as the server said it ("stop", "length", ...).
    pub finish_reason: Option<String>,
    /// Prompt tokens, when the server reported usage.
    pub prompt_tokens: Option<u32>,
    /// Generated tokens (reasoning included) of this choice. Servers report one total
    /// for `n > 1`; it is then shared out by text length, so choices sum to the total.
    pub completion_tokens: Option<u32>,
    /// Reasoning tokens of this choice, when reported (same caveat for `n > 1`).
    pub reasoning_tokens: Option<u32>,
    /// Wall time of the successful HTTP attempt, from sending to the end of the body.
    pub latency_ms: u64,
    /// Time to the first reasoning or answer text of a streamed response.
    pub first_token_ms: Option<u64>,
    /// HTTP attempts it took, 1 when nothing was retried.
    pub attempts: u32,
    /// Base URL of the endpoint that served it.
    pub endpoint: String,
    /// Model name the server reported, which may differ from the one requested.
    pub model: Option<String>,
    /// Server build fingerprint, when reported; changes explain changed outputs.
    pub system_fingerprint: Option<String>,
}

impl Completion {
    /// Whether generation hit `max_tokens`, so the reasoning or answer is cut off.
    pub fn is_truncated(&self) -> bool {
        self.finish_reason.as_deref() == Some("length")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_offsets_seed_and_drops_n() {
        let req = ChatRequest {
            n: 4,
            seed: Some(10),
            ..ChatRequest::user("q")
        };
        let s = req.single(3);
        assert_eq!(s.n, 1);
        assert_eq!(s.seed, Some(13));
        assert_eq!(s.messages, req.messages);
        let unseeded = ChatRequest {
            n: 2,
            ..ChatRequest::user("q")
        }
        .single(1);
        assert_eq!(unseeded.seed, None);
    }

    #[test]
    fn request_defaults_to_one_sample_when_deserialised() {
        let req: ChatRequest =
            serde_json::from_str(r#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(req.n, 1);
        assert_eq!(req.messages[0].role, Role::User);
    }
}
