//! The loopback OpenAI-compatible server of a simulated teacher: `POST
//! /v1/chat/completions` (JSON or server-sent events, `n` choices, reasoning in
//! `reasoning_content` as SGLang and the DeepSeek API send it) and `GET /v1/models`.
//! A simulator for demos and tests, never a teacher.

use std::convert::Infallible;
use std::io;
use std::net::Ipv4Addr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use xxhash_rust::xxh3::xxh3_64;

use super::SimulatedTeacher;
use super::reply::{Sample, reply, tokens};
use crate::loopback::LoopbackServer;

/// Most choices one request may ask for; more is a client bug, not a workload.
const MAX_N: u32 = 128;
/// A fixed creation time keeps responses byte-for-byte reproducible.
const CREATED: u64 = 1_700_000_000;

struct Shared {
    sim: SimulatedTeacher,
    model: String,
}

/// A running simulated teacher on `127.0.0.1`; stops when shut down or dropped.
/// A simulator for demos and tests, never a teacher.
#[derive(Debug)]
pub struct SimServer {
    server: LoopbackServer,
}

impl SimServer {
    /// Binds a free loopback port and serves `sim` on the current Tokio runtime;
    /// `model` is the name `/v1/models` lists.
    pub async fn start(sim: SimulatedTeacher, model: impl Into<String>) -> io::Result<SimServer> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let shared = Arc::new(Shared {
            sim,
            model: model.into(),
        });
        let server = LoopbackServer::start(listener, move |req| handle(req, shared.clone()))?;
        Ok(SimServer { server })
    }

    /// OpenAI-style base URL, `http://127.0.0.1:PORT/v1`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Stops accepting and drops open connections.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = json!({ "error": {
        "message": message, "type": "invalid_request_error", "code": status.as_u16()
    }});
    respond(status, "application/json", body.to_string().into_bytes())
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().trim_end_matches('/');
    Ok(match (req.method(), path) {
        (&Method::POST, "/v1/chat/completions") => match req.into_body().collect().await {
            Ok(body) => chat(&body.to_bytes(), &shared),
            Err(_) => error(StatusCode::BAD_REQUEST, "could not read the request body"),
        },
        (&Method::GET, "/v1/models") => {
            let body = json!({ "object": "list", "data": [{
                "id": shared.model, "object": "model", "created": CREATED,
                "owned_by": "distill-simulator"
            }]});
            respond(
                StatusCode::OK,
                "application/json",
                body.to_string().into_bytes(),
            )
        }
        _ => error(StatusCode::NOT_FOUND, "no such route"),
    })
}

/// The request fields the simulator reads; the rest (sampling settings, the client's
/// `simulation` echo of the settings) is accepted and ignored.
#[derive(Deserialize)]
struct ChatBody {
    #[serde(default)]
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

fn chat(raw: &[u8], shared: &Shared) -> Response<Full<Bytes>> {
    let body: ChatBody = match serde_json::from_slice(raw) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("invalid request body: {e}"),
            );
        }
    };
    let n = body.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("n must be in 1..={MAX_N}, not {n}"),
        );
    }
    let prompt = body
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .and_then(|m| m.content.as_deref())
        .unwrap_or("");
    let samples: Vec<Sample> = (0..n)
        .map(|choice| reply(&shared.sim, prompt, choice, body.seed, body.max_tokens))
        .collect();
    let prompt_tokens: u32 = body
        .messages
        .iter()
        .map(|m| tokens(m.content.as_deref().unwrap_or("")))
        .sum();
    let reasoning_tokens: u32 = samples.iter().map(|s| tokens(&s.reasoning)).sum();
    let completion_tokens: u32 =
        reasoning_tokens + samples.iter().map(|s| tokens(&s.answer)).sum::<u32>();
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens_details": { "reasoning_tokens": reasoning_tokens },
    });
    // Derived from the request, so equal requests get byte-identical responses.
    let id = format!("chatcmpl-sim-{:016x}", xxh3_64(raw));
    let model = if body.model.is_empty() {
        &shared.model
    } else {
        &body.model
    };
    let fingerprint = format!("distill-sim-{}", shared.sim.task.as_str());
    let envelope = |object: &str, choices: Value| {
        json!({
            "id": id, "object": object, "created": CREATED, "model": model,
            "system_fingerprint": fingerprint, "choices": choices,
        })
    };

    if !body.stream {
        let choices = samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                json!({
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "reasoning_content": s.reasoning,
                        "content": s.answer,
                    },
                    "logprobs": null,
                    "finish_reason": s.finish_reason,
                })
            })
            .collect();
        let mut v = envelope("chat.completion", Value::Array(choices));
        v["usage"] = usage;
        return respond(
            StatusCode::OK,
            "application/json",
            v.to_string().into_bytes(),
        );
    }

    let mut out = Vec::new();
    let mut event = |v: &Value| {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(v.to_string().as_bytes());
        out.extend_from_slice(b"\n\n");
    };
    let chunk = |choice: Value| envelope("chat.completion.chunk", json!([choice]));
    for (i, s) in samples.iter().enumerate() {
        // A line of reasoning per event, then the answer, as a server streams tokens.
        let mut deltas: Vec<Value> = s
            .reasoning
            .split_inclusive('\n')
            .map(|line| json!({ "reasoning_content": line }))
            .collect();
        if !s.answer.is_empty() {
            deltas.push(json!({ "content": s.answer }));
        }
        if let Some(first) = deltas.first_mut() {
            first["role"] = json!("assistant");
        }
        for delta in deltas {
            event(&chunk(
                json!({ "index": i, "delta": delta, "finish_reason": null }),
            ));
        }
        event(&chunk(
            json!({ "index": i, "delta": {}, "finish_reason": s.finish_reason }),
        ));
    }
    if body.stream_options.is_some_and(|o| o.include_usage) {
        let mut v = envelope("chat.completion.chunk", json!([]));
        v["usage"] = usage;
        event(&v);
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    respond(StatusCode::OK, "text/event-stream", out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimTask;
    use crate::{ChatModel, ChatRequest, TeacherConfig, connect};

    const PROMPT: &str = "Mia has 12 pencils. She buys 5 more. She doubles them. How many \
        pencils does Mia have now?\nPlease reason step by step, and put your final answer \
        within \\boxed{}.";

    fn faulty() -> SimulatedTeacher {
        let mut sim = SimulatedTeacher::new(SimTask::Arithmetic);
        sim.seed = 3;
        sim.wrong = 0.3;
        sim.mixed_language = 0.3;
        sim.truncated = 0.3;
        sim.duplicate = 0.3;
        sim
    }

    fn request(n: u32, seed: u64) -> ChatRequest {
        ChatRequest {
            n,
            seed: Some(seed),
            ..ChatRequest::user(PROMPT)
        }
    }

    #[tokio::test]
    async fn streamed_and_whole_responses_parse_into_the_same_completions() {
        let mut config = TeacherConfig::simulated("sim-r1", faulty());
        let streamed = connect(&config).await.unwrap();
        config.stream = false;
        let whole = connect(&config).await.unwrap();
        let mut kinds = std::collections::BTreeSet::new();
        for seed in 0..20 {
            let a = streamed.chat(&request(4, seed)).await.unwrap();
            let b = whole.chat(&request(4, seed)).await.unwrap();
            assert_eq!(a.len(), 4);
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                let expected = reply(
                    &config.simulated.clone().unwrap(),
                    PROMPT,
                    i as u32,
                    Some(seed),
                    None,
                );
                for c in [x, y] {
                    assert_eq!(c.index, i as u32);
                    assert_eq!(c.reasoning, expected.reasoning);
                    assert_eq!(c.answer, expected.answer);
                    assert_eq!(c.finish_reason.as_deref(), Some(expected.finish_reason));
                    assert_eq!(c.model.as_deref(), Some("sim-r1"));
                    assert_eq!(c.endpoint, "simulated:arithmetic");
                    assert!(c.prompt_tokens.is_some());
                }
                kinds.insert(expected.finish_reason);
            }
        }
        assert_eq!(kinds.len(), 2, "both finished and cut samples were seen");
        // A single choice carries its own token counts.
        let one = streamed.chat(&request(1, 0)).await.unwrap();
        let expected = tokens(&one[0].reasoning) + tokens(&one[0].answer);
        assert_eq!(one[0].completion_tokens, Some(expected));
    }

    #[tokio::test]
    async fn the_simulation_settings_key_the_request_and_the_server_stops_with_the_client() {
        let config = TeacherConfig::simulated("sim-r1", faulty());
        let client = connect(&config).await.unwrap();
        let body = client.request_body(&request(2, 1));
        assert_eq!(body["simulation"]["seed"], 3);
        assert_eq!(body["simulation"]["task"], "arithmetic");
        let real = TeacherConfig::new("http://127.0.0.1:9/v1", "sim-r1");
        let real_body = crate::OpenAiClient::new(real)
            .unwrap()
            .request_body(&request(2, 1));
        assert!(real_body.get("simulation").is_none());
        assert!(crate::OpenAiClient::new(config.clone()).is_err());

        // The same bytes from two servers with the same settings, on different ports.
        let raw = |c: &crate::OpenAiClient| c.request_body(&request(3, 8)).to_string().into_bytes();
        let a = SimServer::start(faulty(), "sim-r1").await.unwrap();
        let b = SimServer::start(faulty(), "sim-r1").await.unwrap();
        let http = reqwest::Client::new();
        let post = |url: String, body: Vec<u8>| {
            let http = http.clone();
            async move {
                http.post(format!("{url}/chat/completions"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap()
            }
        };
        let body = raw(&client);
        let from_a = post(a.url(), body.clone()).await;
        assert_eq!(from_a, post(b.url(), body).await);
        assert!(from_a.starts_with(b"data: "));
        let models: Value = serde_json::from_slice(
            &http
                .get(format!("{}/models", a.url()))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(models["data"][0]["id"], "sim-r1");
        let missing = http
            .get(format!("{}/nothing", a.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);

        let url = a.url();
        a.shutdown().await;
        assert!(http.get(format!("{url}/models")).send().await.is_err());
        drop(b);
        drop(client);
    }
}
