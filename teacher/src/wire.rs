//! OpenAI chat-completion wire format: tolerant parsing of full and streamed
//! responses into per-choice text, borrowing from the body where JSON allows.

use std::borrow::Cow;
use std::fmt;
use std::time::Instant;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::reasoning::normalize;

/// A JSON string borrowed from the body when it has no escapes. Serde's own
/// `Cow<str>` only borrows as a direct field, not inside `Option`.
#[derive(Debug, Default)]
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Token usage as reported; every field optional because servers differ.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub(crate) struct Usage {
    #[serde(default)]
    pub prompt_tokens: Option<u32>,
    #[serde(default)]
    pub completion_tokens: Option<u32>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u32>,
}

impl Usage {
    pub(crate) fn reasoning_tokens(&self) -> Option<u32> {
        self.completion_tokens_details
            .and_then(|d| d.reasoning_tokens)
    }
}

#[derive(Deserialize)]
struct StreamChunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<StreamChoice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default, borrow)]
    model: Option<Text<'a>>,
    #[serde(default, borrow)]
    system_fingerprint: Option<Text<'a>>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct StreamChoice<'a> {
    #[serde(default)]
    index: u32,
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Text<'a>>,
}

/// Used for both a stream delta and a full response message.
#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Text<'a>>,
    #[serde(default, borrow)]
    reasoning_content: Option<Text<'a>>,
    #[serde(default, borrow)]
    reasoning: Option<Text<'a>>,
}

impl<'a> Delta<'a> {
    /// Prefers `reasoning_content`: vLLM versions in transition send both fields
    /// with the same text, which must not be doubled.
    fn reasoning(&self) -> Option<&str> {
        match (&self.reasoning_content, &self.reasoning) {
            (Some(t), _) if !t.0.is_empty() => Some(&t.0),
            (_, Some(t)) => Some(&t.0),
            (Some(t), None) => Some(&t.0),
            (None, None) => None,
        }
    }
}

#[derive(Deserialize)]
struct FullResponse<'a> {
    #[serde(default, borrow)]
    choices: Vec<FullChoice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default, borrow)]
    model: Option<Text<'a>>,
    #[serde(default, borrow)]
    system_fingerprint: Option<Text<'a>>,
    #[serde(default)]
    error: Option<serde_json::Value>,
    /// vLLM reports errors as a top-level `{"object": "error", ...}`.
    #[serde(default, borrow)]
    object: Option<Text<'a>>,
    #[serde(default, borrow)]
    message: Option<Text<'a>>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct FullChoice<'a> {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default, borrow)]
    message: Option<Delta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Text<'a>>,
}

/// Parsing failure, given an endpoint by the caller.
#[derive(Debug, PartialEq)]
pub(crate) enum WireError {
    Malformed(String),
    Truncated(String),
    /// An error object inside a 200 response; `status` from its code when numeric.
    Api {
        status: Option<u16>,
        message: String,
    },
}

/// One choice before attribution to an endpoint and attempt.
#[derive(Debug, PartialEq)]
pub(crate) struct RawChoice {
    pub index: u32,
    pub reasoning: String,
    pub answer: String,
    pub finish_reason: Option<String>,
}

/// A parsed response before attribution to an endpoint and attempt.
#[derive(Debug)]
pub(crate) struct RawResponse {
    pub choices: Vec<RawChoice>,
    pub usage: Option<Usage>,
    pub model: Option<String>,
    pub system_fingerprint: Option<String>,
    pub first_token: Option<Instant>,
}

/// Message and numeric code of an OpenAI/vLLM/FastAPI style error body.
pub(crate) fn error_details(v: &serde_json::Value) -> (Option<u16>, Option<String>) {
    let obj = v.get("error").filter(|e| e.is_object()).unwrap_or(v);
    let message = match obj
        .get("message")
        .or_else(|| obj.get("detail"))
        .or_else(|| v.get("error"))
    {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(other) if !other.is_null() && !other.is_object() => Some(other.to_string()),
        Some(other) if other.is_object() => Some(other.to_string()),
        _ => None,
    };
    let code = obj.get("code").and_then(code_to_status);
    (code, message)
}

fn code_to_status(c: &serde_json::Value) -> Option<u16> {
    match c {
        serde_json::Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn api_error(v: &serde_json::Value) -> WireError {
    let (status, message) = error_details(v);
    WireError::Api {
        status,
        message: message.unwrap_or_else(|| v.to_string()),
    }
}

/// Parses a non-streamed body (leading blank keep-alive lines are fine).
pub(crate) fn parse_full(body: &[u8]) -> Result<RawResponse, WireError> {
    let r: FullResponse = serde_json::from_slice(body).map_err(|e| {
        WireError::Malformed(format!("response body is not chat-completion JSON: {e}"))
    })?;
    if let Some(e) = &r.error {
        return Err(api_error(&serde_json::json!({ "error": e })));
    }
    if r.object.as_ref().is_some_and(|o| o.0 == "error") {
        let status = r.code.as_ref().and_then(code_to_status);
        let message = r
            .message
            .map(|m| m.0.into_owned())
            .unwrap_or_else(|| "unspecified error".into());
        return Err(WireError::Api { status, message });
    }
    if r.choices.is_empty() {
        return Err(WireError::Malformed("response has no choices".into()));
    }
    let mut choices: Vec<RawChoice> = r
        .choices
        .into_iter()
        .enumerate()
        .map(|(pos, c)| {
            let (reasoning, content) = match &c.message {
                Some(m) => (
                    m.reasoning().unwrap_or(""),
                    m.content.as_ref().map_or("", |t| &t.0),
                ),
                None => ("", ""),
            };
            let (reasoning, answer) = normalize(reasoning, content);
            RawChoice {
                index: c.index.unwrap_or(pos as u32),
                reasoning,
                answer,
                finish_reason: c.finish_reason.map(|f| f.0.into_owned()),
            }
        })
        .collect();
    choices.sort_by_key(|c| c.index);
    Ok(RawResponse {
        choices,
        usage: r.usage,
        model: r.model.map(|m| m.0.into_owned()),
        system_fingerprint: r.system_fingerprint.map(|m| m.0.into_owned()),
        first_token: None,
    })
}

#[derive(Debug, Default)]
struct ChoiceAcc {
    seen: bool,
    reasoning: String,
    content: String,
    finish_reason: Option<String>,
}

/// Accumulates stream events into choices; `n` bounds the choice index so a
/// confused server cannot make us allocate without limit.
#[derive(Debug)]
pub(crate) struct StreamAcc {
    n: usize,
    choices: Vec<ChoiceAcc>,
    usage: Option<Usage>,
    model: Option<String>,
    system_fingerprint: Option<String>,
    first_token: Option<Instant>,
    done: bool,
}

impl StreamAcc {
    pub(crate) fn new(n: u32) -> Self {
        let n = n.max(1) as usize;
        Self {
            n,
            choices: (0..n).map(|_| ChoiceAcc::default()).collect(),
            usage: None,
            model: None,
            system_fingerprint: None,
            first_token: None,
            done: false,
        }
    }

    /// Whether `[DONE]` arrived; later bytes are ignored.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// Applies the data of one SSE event.
    pub(crate) fn on_event(&mut self, data: &[u8]) -> Result<(), WireError> {
        if self.done {
            return Ok(());
        }
        if data.trim_ascii() == b"[DONE]" {
            self.done = true;
            return Ok(());
        }
        let chunk: StreamChunk = serde_json::from_slice(data)
            .map_err(|e| WireError::Malformed(format!("stream event is not valid JSON: {e}")))?;
        if let Some(e) = &chunk.error {
            return Err(api_error(&serde_json::json!({ "error": e })));
        }
        if self.model.is_none() {
            self.model = chunk.model.map(|m| m.0.into_owned());
        }
        if self.system_fingerprint.is_none() {
            self.system_fingerprint = chunk.system_fingerprint.map(|m| m.0.into_owned());
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        for c in chunk.choices {
            let n = self.n;
            let acc = self.choices.get_mut(c.index as usize).ok_or_else(|| {
                WireError::Malformed(format!("choice index {} out of range for n = {n}", c.index))
            })?;
            acc.seen = true;
            if let Some(d) = &c.delta {
                let r = d.reasoning().unwrap_or("");
                let t = d.content.as_ref().map_or("", |t| &t.0);
                if self.first_token.is_none() && !(r.is_empty() && t.is_empty()) {
                    self.first_token = Some(Instant::now());
                }
                acc.reasoning.push_str(r);
                acc.content.push_str(t);
            }
            if let Some(f) = c.finish_reason {
                acc.finish_reason = Some(f.0.into_owned());
            }
        }
        Ok(())
    }

    /// Whether a stream that closed without `[DONE]` still ended cleanly: every
    /// choice got a `finish_reason` (some proxies drop the sentinel), or only choice 0
    /// came and it finished, which is how a server that ignores `n` (`transformers
    /// serve`) answers `n > 1`; the client then asks for the other choices itself.
    fn ended_cleanly(&self) -> bool {
        self.choices.iter().all(|c| c.finish_reason.is_some())
            || (self.choices[0].finish_reason.is_some()
                && self.choices[1..].iter().all(|c| !c.seen))
    }

    /// Ends the stream: complete with `[DONE]`, or as [`ended_cleanly`](Self::ended_cleanly)
    /// says without it.
    pub(crate) fn finish(self) -> Result<RawResponse, WireError> {
        if !self.done && !self.ended_cleanly() {
            let unfinished = self
                .choices
                .iter()
                .filter(|c| c.finish_reason.is_none())
                .count();
            return Err(WireError::Truncated(format!(
                "stream closed without [DONE] with {unfinished} of {} choices unfinished",
                self.n
            )));
        }
        if !self.choices.iter().any(|c| c.seen) {
            return Err(WireError::Malformed("stream carried no choices".into()));
        }
        let choices = self
            .choices
            .into_iter()
            .enumerate()
            .filter(|(_, c)| c.seen)
            .map(|(i, c)| {
                let (reasoning, answer) = normalize(&c.reasoning, &c.content);
                RawChoice {
                    index: i as u32,
                    reasoning,
                    answer,
                    finish_reason: c.finish_reason,
                }
            })
            .collect();
        Ok(RawResponse {
            choices,
            usage: self.usage,
            model: self.model,
            system_fingerprint: self.system_fingerprint,
            first_token: self.first_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(n: u32, events: &[&str]) -> Result<RawResponse, WireError> {
        let mut acc = StreamAcc::new(n);
        for e in events {
            acc.on_event(e.as_bytes())?;
        }
        acc.finish()
    }

    #[test]
    fn full_response_each_reasoning_field() {
        for field in ["reasoning_content", "reasoning"] {
            let body = format!(
                r#"

{{"id":"x","model":"m","system_fingerprint":"fp","unknown":{{"a":1}},
"choices":[{{"index":0,"message":{{"role":"assistant","content":"\n\n\\boxed{{2}}","{field}":"think\n"}},"finish_reason":"stop"}}],
"usage":{{"prompt_tokens":5,"completion_tokens":9,"completion_tokens_details":{{"reasoning_tokens":7}}}}}}"#
            );
            let r = parse_full(body.as_bytes()).unwrap();
            assert_eq!(r.choices[0].reasoning, "think");
            assert_eq!(r.choices[0].answer, "\\boxed{2}");
            assert_eq!(r.choices[0].finish_reason.as_deref(), Some("stop"));
            let u = r.usage.unwrap();
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens, u.reasoning_tokens()),
                (Some(5), Some(9), Some(7))
            );
            assert_eq!(r.model.as_deref(), Some("m"));
            assert_eq!(r.system_fingerprint.as_deref(), Some("fp"));
        }
    }

    #[test]
    fn full_response_both_fields_not_doubled_and_nulls_tolerated() {
        let body = r#"{"choices":[{"index":0,"message":{"content":"a","reasoning_content":"r","reasoning":"r"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2,"completion_tokens_details":null},"system_fingerprint":null}"#;
        let r = parse_full(body.as_bytes()).unwrap();
        assert_eq!(
            (
                r.choices[0].reasoning.as_str(),
                r.choices[0].answer.as_str()
            ),
            ("r", "a")
        );
        assert_eq!(r.usage.unwrap().reasoning_tokens(), None);
        let body = r#"{"choices":[{"message":{"content":null,"reasoning_content":null},"finish_reason":"length"}]}"#;
        let r = parse_full(body.as_bytes()).unwrap();
        assert_eq!(r.choices[0].answer, "");
    }

    #[test]
    fn full_response_errors() {
        assert!(matches!(
            parse_full(b"{\"choices\": ["),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(parse_full(b"{}"), Err(WireError::Malformed(_))));
        assert_eq!(
            parse_full(br#"{"error":{"message":"context too long","code":400}}"#).unwrap_err(),
            WireError::Api {
                status: Some(400),
                message: "context too long".into()
            }
        );
        assert_eq!(
            parse_full(br#"{"object":"error","message":"boom","code":500}"#).unwrap_err(),
            WireError::Api {
                status: Some(500),
                message: "boom".into()
            }
        );
    }

    #[test]
    fn stream_interleaved_choices_and_final_usage() {
        let r = stream(
            2,
            &[
                r#"{"model":"m","choices":[{"index":1,"delta":{"role":"assistant","content":"<think>b1"}}]}"#,
                r#"{"choices":[{"index":0,"delta":{"content":"a1 "}}]}"#,
                r#"{"choices":[{"index":1,"delta":{"content":" b2</think> B"}}]}"#,
                r#"{"choices":[{"index":0,"delta":{"content":"</think>\n\nA"},"finish_reason":null}]}"#,
                r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"},{"index":1,"delta":{},"finish_reason":"length"}]}"#,
                r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":8}}"#,
                "[DONE]",
            ],
        )
        .unwrap();
        assert_eq!(r.choices.len(), 2);
        assert_eq!(
            (
                r.choices[0].reasoning.as_str(),
                r.choices[0].answer.as_str()
            ),
            ("a1", "A")
        );
        assert_eq!(
            (
                r.choices[1].reasoning.as_str(),
                r.choices[1].answer.as_str()
            ),
            ("b1 b2", "B")
        );
        assert_eq!(r.choices[1].finish_reason.as_deref(), Some("length"));
        assert_eq!(r.usage.unwrap().completion_tokens, Some(8));
        assert_eq!(r.model.as_deref(), Some("m"));
        assert!(r.first_token.is_some());
    }

    #[test]
    fn stream_reasoning_fields() {
        for field in ["reasoning_content", "reasoning"] {
            let e1 = format!(r#"{{"choices":[{{"index":0,"delta":{{"{field}":"step \"1\""}}}}]}}"#);
            let e2 = r#"{"choices":[{"index":0,"delta":{"content":"\\boxed{3}","reasoning_content":null},"finish_reason":"stop"}]}"#;
            let r = stream(1, &[&e1, e2, "[DONE]"]).unwrap();
            assert_eq!(r.choices[0].reasoning, "step \"1\"");
            assert_eq!(r.choices[0].answer, "\\boxed{3}");
        }
    }

    #[test]
    fn a_lone_finished_first_choice_of_several_ends_a_stream() {
        let part = r#"{"choices":[{"index":0,"delta":{"content":"x"}}]}"#;
        let fin = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        // A server that ignores `n`: one finished choice, with or without `[DONE]`.
        for events in [&[part, fin][..], &[part, fin, "[DONE]"][..]] {
            let r = stream(3, events).unwrap();
            assert_eq!(r.choices.len(), 1);
            assert_eq!((r.choices[0].index, r.choices[0].answer.as_str()), (0, "x"));
        }
        // Cut before choice 0 finished, or after another choice began: truncated.
        let other = r#"{"choices":[{"index":1,"delta":{"content":"y"}}]}"#;
        for events in [&[part][..], &[part, other, fin][..]] {
            assert!(matches!(stream(3, events), Err(WireError::Truncated(_))));
        }
    }

    #[test]
    fn stream_end_conditions() {
        let part = r#"{"choices":[{"index":0,"delta":{"content":"x"}}]}"#;
        let fin = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        assert!(matches!(stream(1, &[part]), Err(WireError::Truncated(_))));
        assert!(
            stream(1, &[part, fin]).is_ok(),
            "finish_reason without [DONE] is complete"
        );
        assert!(stream(1, &[part, "[DONE]"]).is_ok());
        assert!(matches!(
            stream(1, &["[DONE]"]),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            stream(1, &[r#"{"choices":[{"index":0,"delta":{"content":"#]),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            stream(1, &[r#"{"choices":[{"index":5,"delta":{"content":"x"}}]}"#]),
            Err(WireError::Malformed(_))
        ));
        assert_eq!(
            stream(1, &[part, r#"{"error":{"message":"oom","code":"503"}}"#]).unwrap_err(),
            WireError::Api {
                status: Some(503),
                message: "oom".into()
            }
        );
    }
}
