//! A fake OpenAI-compatible reasoning server for tests and benchmarks.
//!
//! Serves `/v1/chat/completions` (streamed or not), `/v1/models` and `/stats` on
//! loopback, answering deterministically from the prompt in any of the reasoning
//! formats real servers use, and injecting faults on a request schedule so
//! client retry, failover and parsing paths can be exercised exactly.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use distill_fake_teacher::{FakeConfig, FakeTeacher, Fault, When};
//! let fake = FakeTeacher::start(
//!     FakeConfig::default().fault(When::Request(1), Fault::ServerError { status: 503 }),
//! )
//! .await?;
//! let base_url = fake.url(); // "http://127.0.0.1:PORT/v1"
//! # let _ = base_url;
//! assert_eq!(fake.stats().requests, 0);
//! fake.shutdown().await;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use distill_teacher::loopback::LoopbackServer;
use futures::Stream;
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;

/// How the server delivers reasoning, mirroring the servers in the wild.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReasoningFormat {
    /// `reasoning_content` field (SGLang, DeepSeek API, older vLLM).
    ReasoningContent,
    /// `reasoning` field (current vLLM).
    Reasoning,
    /// `<think>…</think>answer` inline in `content` (no reasoning parser).
    InlineThink,
    /// `…</think>answer` in `content`: R1's template already emitted `<think>`.
    InlineThinkNoOpen,
    /// Only the answer, as a non-reasoning model would send.
    Plain,
}

/// What the responder is asked to answer.
#[derive(Clone, Copy, Debug)]
pub struct ReplyInput<'a> {
    /// Content of the last user message.
    pub prompt: &'a str,
    /// Choice index (0..n).
    pub choice: u32,
    /// Seed from the request.
    pub seed: Option<u64>,
}

/// A reasoning trace and answer for one choice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Chain of thought, without tags.
    pub reasoning: String,
    /// Final answer.
    pub answer: String,
}

/// Maps a prompt to a reply; must be deterministic for tests to predict output.
pub type Responder = Arc<dyn Fn(&ReplyInput<'_>) -> Reply + Send + Sync>;

/// The default answer: reasoning `step 1 for <prompt>\nstep 2 for <prompt>`, plus
/// `\nsample <choice>` and ` seed <seed>` when either is set so samples differ,
/// and answer `\boxed{<prompt length in chars>}`.
pub fn default_reply(input: &ReplyInput<'_>) -> Reply {
    let p = input.prompt;
    let mut reasoning = format!("step 1 for {p}\nstep 2 for {p}");
    if input.choice > 0 || input.seed.is_some() {
        reasoning.push_str(&format!("\nsample {}", input.choice));
        if let Some(s) = input.seed {
            reasoning.push_str(&format!(" seed {s}"));
        }
    }
    Reply {
        reasoning,
        answer: format!("\\boxed{{{}}}", p.chars().count()),
    }
}

/// Token count the fake reports for `text` (a quarter of its bytes, rounded up),
/// exposed so tests can predict `usage`.
pub fn approx_tokens(text: &str) -> u32 {
    (text.len() as u32).div_ceil(4)
}

/// Which requests a fault applies to, counted from 1 in arrival order over
/// `/chat/completions` requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum When {
    /// Exactly request number k.
    Request(u64),
    /// Requests 1..=n.
    FirstN(u64),
    /// Requests n, 2n, 3n, ...
    EveryNth(u64),
    /// Every request.
    Always,
}

impl When {
    fn matches(&self, k: u64) -> bool {
        match *self {
            When::Request(n) => k == n,
            When::FirstN(n) => k <= n,
            When::EveryNth(n) => n > 0 && k.is_multiple_of(n),
            When::Always => true,
        }
    }
}

/// A misbehaviour of real servers.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// HTTP 429 with a `Retry-After` header, if given, in seconds (fractional
    /// below one second, so tests stay fast).
    RateLimited {
        /// Delay to announce in `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// HTTP 5xx (500, 503, ...) with an OpenAI-style error body.
    ServerError {
        /// The status to send.
        status: u16,
    },
    /// Any error status with an OpenAI-style error body (401, 402, 400, 422, ...).
    Status {
        /// The status to send.
        status: u16,
        /// The `error.message` to send.
        message: String,
    },
    /// Waits this long before answering normally (to exceed client timeouts).
    Delay(Duration),
    /// Sends half the response, waits this long, then sends the rest.
    StallMidStream(Duration),
    /// Sends half the response and part of a line, then aborts the connection.
    DropMidStream,
    /// Sends half the response, then ends the body cleanly without a
    /// `finish_reason` or `[DONE]` (a proxy cutting the stream).
    EndWithoutDone,
    /// Sends a response containing invalid JSON.
    MalformedJson,
    /// Answers normally with `: keep-alive` comments and blank lines mixed in
    /// (before the JSON body when not streaming), as DeepSeek does under load.
    KeepAlive,
    /// Stops each choice halfway through its reasoning with `finish_reason: "length"`.
    FinishLength,
}

impl Fault {
    /// HTTP 401 as DeepSeek words it.
    pub fn unauthorized() -> Self {
        Fault::Status {
            status: 401,
            message: "Authentication Fails, Your api key is invalid".into(),
        }
    }

    /// HTTP 402 as DeepSeek words it.
    pub fn insufficient_balance() -> Self {
        Fault::Status {
            status: 402,
            message: "Insufficient Balance".into(),
        }
    }

    /// HTTP 400 with the given message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Fault::Status {
            status: 400,
            message: message.into(),
        }
    }

    /// Key under which [`FakeStats::faults`] counts this fault.
    pub fn label(&self) -> String {
        match self {
            Fault::RateLimited { .. } => "rate_limited".into(),
            Fault::ServerError { status } => format!("server_error_{status}"),
            Fault::Status { status, .. } => format!("status_{status}"),
            Fault::Delay(_) => "delay".into(),
            Fault::StallMidStream(_) => "stall_mid_stream".into(),
            Fault::DropMidStream => "drop_mid_stream".into(),
            Fault::EndWithoutDone => "end_without_done".into(),
            Fault::MalformedJson => "malformed_json".into(),
            Fault::KeepAlive => "keep_alive".into(),
            Fault::FinishLength => "finish_length".into(),
        }
    }
}

/// A fault and the requests it applies to.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultRule {
    /// Requests it applies to.
    pub when: When,
    /// What happens to them.
    pub fault: Fault,
}

/// Server behaviour. Defaults: `reasoning_content` format, [`default_reply`],
/// 8 chunks per choice, `n` supported, streams ending with `[DONE]`, no faults,
/// no latency, any port.
#[derive(Clone)]
pub struct FakeConfig {
    /// How reasoning is delivered.
    pub format: ReasoningFormat,
    /// Prompt → reply.
    pub responder: Responder,
    /// Pads each choice's reasoning with `step k for <prompt>` lines until
    /// reasoning plus answer is this many bytes.
    pub response_bytes: Option<usize>,
    /// Content events per choice in a streamed response.
    pub chunks: usize,
    /// Whether `n > 1` is accepted (DeepSeek rejects it).
    pub supports_n: bool,
    /// Answers `n > 1` with a single choice instead, as `transformers serve` does;
    /// takes precedence over `supports_n`.
    pub ignores_n: bool,
    /// Whether a stream ends with `data: [DONE]` (`transformers serve` omits it).
    pub done: bool,
    /// Fault schedule; the first matching rule applies.
    pub faults: Vec<FaultRule>,
    /// Model name reported; `None` echoes the request's.
    pub model: Option<String>,
    /// `system_fingerprint` reported.
    pub system_fingerprint: Option<String>,
    /// Required bearer key; others get 401.
    pub api_key: Option<String>,
    /// Delay before every response.
    pub latency: Duration,
    /// Address to bind; loopback by default.
    pub host: IpAddr,
    /// Port to bind; 0 picks a free one.
    pub port: u16,
    /// Keep every request's body and `Authorization` header for inspection.
    pub record_requests: bool,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            format: ReasoningFormat::ReasoningContent,
            responder: Arc::new(default_reply),
            response_bytes: None,
            chunks: 8,
            supports_n: true,
            ignores_n: false,
            done: true,
            faults: Vec::new(),
            model: None,
            system_fingerprint: Some("fp_fake".into()),
            api_key: None,
            latency: Duration::ZERO,
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            record_requests: false,
        }
    }
}

impl fmt::Debug for FakeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeConfig")
            .field("format", &self.format)
            .field("response_bytes", &self.response_bytes)
            .field("chunks", &self.chunks)
            .field("supports_n", &self.supports_n)
            .field("ignores_n", &self.ignores_n)
            .field("done", &self.done)
            .field("faults", &self.faults)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("latency", &self.latency)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl FakeConfig {
    /// Sets the reasoning format.
    pub fn format(mut self, format: ReasoningFormat) -> Self {
        self.format = format;
        self
    }

    /// Adds a fault rule after the existing ones.
    pub fn fault(mut self, when: When, fault: Fault) -> Self {
        self.faults.push(FaultRule { when, fault });
        self
    }

    /// Sets the responder.
    pub fn responder(
        mut self,
        f: impl Fn(&ReplyInput<'_>) -> Reply + Send + Sync + 'static,
    ) -> Self {
        self.responder = Arc::new(f);
        self
    }

    /// Answers prompts found in `table`, others with [`default_reply`].
    pub fn table(self, table: impl IntoIterator<Item = (String, Reply)>) -> Self {
        let table: BTreeMap<String, Reply> = table.into_iter().collect();
        self.responder(move |i| {
            table
                .get(i.prompt)
                .cloned()
                .unwrap_or_else(|| default_reply(i))
        })
    }

    /// Sets the padded response size in bytes.
    pub fn response_bytes(mut self, bytes: usize) -> Self {
        self.response_bytes = Some(bytes);
        self
    }

    /// Sets content events per choice.
    pub fn chunks(mut self, chunks: usize) -> Self {
        self.chunks = chunks.max(1);
        self
    }

    /// Sets whether `n > 1` is accepted.
    pub fn supports_n(mut self, yes: bool) -> Self {
        self.supports_n = yes;
        self
    }

    /// Answers `n > 1` with one choice, as `transformers serve` does.
    pub fn ignore_n(mut self) -> Self {
        self.ignores_n = true;
        self
    }

    /// Ends streams without `data: [DONE]`, as `transformers serve` does.
    pub fn without_done(mut self) -> Self {
        self.done = false;
        self
    }

    /// Requires this bearer key.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Sets the delay before every response.
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Sets the port to bind.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Sets the reported model name.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Keeps request bodies and auth headers for [`FakeTeacher::requests`].
    pub fn record_requests(mut self) -> Self {
        self.record_requests = true;
        self
    }

    /// The reply the server sends for `input` before any fault: the responder's,
    /// padded to `response_bytes`. Tests use it to predict completions.
    pub fn reply(&self, input: &ReplyInput<'_>) -> Reply {
        let mut r = (self.responder)(input);
        if let Some(size) = self.response_bytes {
            pad(&mut r, input.prompt, size);
        }
        r
    }
}

/// What the server has served so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FakeStats {
    /// `/chat/completions` requests received.
    pub requests: u64,
    /// Responses whose body was sent to the end with every choice finished.
    pub responses: u64,
    /// Choices in those responses.
    pub completions: u64,
    /// Requests that got each fault, by [`Fault::label`].
    pub faults: BTreeMap<String, u64>,
    /// Requests refused for a missing or wrong key.
    pub unauthorized: u64,
    /// Requests refused as unparseable or asking for unsupported `n`.
    pub rejected: u64,
    /// `/models` requests.
    pub model_requests: u64,
    /// Chat requests being handled now (until their response headers are sent).
    pub in_flight: u64,
    /// Most chat requests handled at once so far.
    pub max_in_flight: u64,
}

/// A request as received.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedRequest {
    /// Arrival number, from 1.
    pub number: u64,
    /// The `Authorization` header, verbatim.
    pub authorization: Option<String>,
    /// The JSON body (`null` if it was not JSON).
    pub body: serde_json::Value,
}

struct Shared {
    config: FakeConfig,
    requests: AtomicU64,
    responses: AtomicU64,
    completions: AtomicU64,
    unauthorized: AtomicU64,
    rejected: AtomicU64,
    model_requests: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    faults: Mutex<BTreeMap<String, u64>>,
    recorded: Mutex<Vec<RecordedRequest>>,
}

impl Shared {
    fn stats(&self) -> FakeStats {
        FakeStats {
            requests: self.requests.load(Ordering::SeqCst),
            responses: self.responses.load(Ordering::SeqCst),
            completions: self.completions.load(Ordering::SeqCst),
            faults: self.faults.lock().unwrap().clone(),
            unauthorized: self.unauthorized.load(Ordering::SeqCst),
            rejected: self.rejected.load(Ordering::SeqCst),
            model_requests: self.model_requests.load(Ordering::SeqCst),
            in_flight: self.in_flight.load(Ordering::SeqCst),
            max_in_flight: self.max_in_flight.load(Ordering::SeqCst),
        }
    }
}

/// A running fake server; stops when shut down or dropped.
pub struct FakeTeacher {
    server: LoopbackServer,
    shared: Arc<Shared>,
}

impl fmt::Debug for FakeTeacher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeTeacher")
            .field("addr", &self.server.addr())
            .finish_non_exhaustive()
    }
}

impl FakeTeacher {
    /// Binds and starts serving on the current Tokio runtime.
    pub async fn start(config: FakeConfig) -> io::Result<FakeTeacher> {
        let listener = TcpListener::bind((config.host, config.port)).await?;
        let shared = Arc::new(Shared {
            config,
            requests: AtomicU64::new(0),
            responses: AtomicU64::new(0),
            completions: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            model_requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            faults: Mutex::new(BTreeMap::new()),
            recorded: Mutex::new(Vec::new()),
        });
        let handler_shared = shared.clone();
        let server =
            LoopbackServer::start(listener, move |req| handle(req, handler_shared.clone()))?;
        Ok(FakeTeacher { server, shared })
    }

    /// OpenAI-style base URL, `http://HOST:PORT/v1`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Bound address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Counters so far.
    pub fn stats(&self) -> FakeStats {
        self.shared.stats()
    }

    /// Requests received, if [`FakeConfig::record_requests`] was set.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.recorded.lock().unwrap().clone()
    }

    /// Stops accepting and drops open connections; the port then refuses connections.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

type Body = BoxBody<Bytes, io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn json_response(status: u16, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(status: u16, message: &str) -> Response<Body> {
    let kind = match status {
        401 => "authentication_error",
        402 => "insufficient_balance",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    let body =
        json!({ "error": { "message": message, "type": kind, "param": null, "code": status } });
    json_response(status, serde_json::to_vec(&body).unwrap())
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().trim_end_matches('/');
    Ok(match (req.method(), path) {
        (&Method::POST, "/v1/chat/completions" | "/chat/completions") => chat(req, &shared).await,
        (&Method::GET, "/v1/models" | "/models") => {
            shared.model_requests.fetch_add(1, Ordering::SeqCst);
            let id = shared
                .config
                .model
                .clone()
                .unwrap_or_else(|| "fake-r1".into());
            let body = json!({"object": "list", "data": [{"id": id, "object": "model", "created": 0, "owned_by": "distill-fake-teacher"}]});
            json_response(200, serde_json::to_vec(&body).unwrap())
        }
        (&Method::GET, "/stats") => {
            json_response(200, serde_json::to_vec(&shared.stats()).unwrap())
        }
        _ => error_response(404, "no such route"),
    })
}

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

/// Counts a chat request as in flight until dropped.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn chat(req: Request<Incoming>, shared: &Arc<Shared>) -> Response<Body> {
    let number = shared.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let _in_flight = InFlight::enter(shared);
    let config = &shared.config;
    let authorization = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let raw = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error_response(400, "could not read the request body"),
    };
    if config.record_requests {
        let body = serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null);
        shared.recorded.lock().unwrap().push(RecordedRequest {
            number,
            authorization: authorization.clone(),
            body,
        });
    }
    if let Some(key) = &config.api_key {
        let ok = authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            == Some(key.as_str());
        if !ok {
            shared.unauthorized.fetch_add(1, Ordering::SeqCst);
            return error_response(401, "Authentication Fails, Your api key is invalid");
        }
    }
    let body: ChatBody = match serde_json::from_slice(&raw) {
        Ok(b) => b,
        Err(e) => {
            shared.rejected.fetch_add(1, Ordering::SeqCst);
            return error_response(400, &format!("invalid request body: {e}"));
        }
    };
    let n = body.n.unwrap_or(1);
    if n == 0 || (n > 1 && !config.supports_n && !config.ignores_n) {
        shared.rejected.fetch_add(1, Ordering::SeqCst);
        return error_response(
            400,
            &format!("invalid n: {n}; this server only supports n = 1"),
        );
    }
    let n = if config.ignores_n { 1 } else { n };
    if !config.latency.is_zero() {
        tokio::time::sleep(config.latency).await;
    }
    let fault = config
        .faults
        .iter()
        .find(|r| r.when.matches(number))
        .map(|r| r.fault.clone());
    if let Some(f) = &fault {
        *shared.faults.lock().unwrap().entry(f.label()).or_insert(0) += 1;
    }
    match &fault {
        Some(Fault::RateLimited { retry_after }) => {
            let mut r = error_response(429, "Rate limit reached, please slow down");
            if let Some(d) = retry_after {
                let secs = d.as_secs_f64().to_string();
                r.headers_mut()
                    .insert("retry-after", HeaderValue::from_str(&secs).unwrap());
            }
            return r;
        }
        Some(Fault::ServerError { status }) => {
            let msg = if *status == 503 {
                "Server overloaded, please retry shortly"
            } else {
                "Internal server error"
            };
            return error_response(*status, msg);
        }
        Some(Fault::Status { status, message }) => return error_response(*status, message),
        Some(Fault::Delay(d)) => tokio::time::sleep(*d).await,
        _ => {}
    }

    let prompt = body
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .and_then(|m| m.content.as_deref())
        .unwrap_or("");
    let cut = fault == Some(Fault::FinishLength);
    let replies: Vec<Reply> = (0..n)
        .map(|choice| {
            let mut r = config.reply(&ReplyInput {
                prompt,
                choice,
                seed: body.seed,
            });
            if cut {
                let half = floor_char_boundary(&r.reasoning, r.reasoning.len() / 2);
                r.reasoning.truncate(half);
                r.answer.clear();
            }
            r
        })
        .collect();
    let prompt_tokens: u32 = body
        .messages
        .iter()
        .map(|m| approx_tokens(m.content.as_deref().unwrap_or("")))
        .sum();
    let out = Render {
        id: format!("chatcmpl-fake-{number}"),
        model: config.model.as_deref().unwrap_or(&body.model),
        fingerprint: config.system_fingerprint.as_deref(),
        format: config.format,
        finish: if cut { "length" } else { "stop" },
        prompt_tokens,
        done: config.done,
    };
    if body.stream {
        let include_usage = body.stream_options.is_some_and(|o| o.include_usage);
        let frames = out.stream(&replies, config.chunks, include_usage, fault.as_ref());
        respond_frames(frames, fault.as_ref(), n, shared, "text/event-stream")
    } else {
        let json = out.full(&replies);
        let frames = match fault {
            Some(Fault::KeepAlive) => {
                vec![Bytes::from_static(b"\n"), Bytes::from_static(b"\n\n"), json]
            }
            Some(Fault::MalformedJson | Fault::EndWithoutDone | Fault::DropMidStream) => {
                vec![json.slice(..json.len() / 2)]
            }
            Some(Fault::StallMidStream(_)) => {
                let half = json.len() / 2;
                vec![json.slice(..half), json.slice(half..)]
            }
            _ => vec![json],
        };
        respond_frames(frames, fault.as_ref(), n, shared, "application/json")
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Pads the reasoning so reasoning plus answer is exactly `size` bytes (when
/// the reply is shorter), keeping it deterministic in the prompt.
fn pad(r: &mut Reply, prompt: &str, size: usize) {
    let target = size.saturating_sub(r.answer.len());
    let mut k = 3;
    while r.reasoning.len() < target {
        r.reasoning.push_str(&format!("\nstep {k} for {prompt}"));
        k += 1;
    }
    if k > 3 {
        let cut = floor_char_boundary(&r.reasoning, target);
        r.reasoning.truncate(cut);
    }
}

/// Splits `s` into `parts` pieces of about equal byte length on char boundaries.
fn split_even(s: &str, parts: usize) -> Vec<&str> {
    if s.is_empty() {
        return Vec::new();
    }
    let size = s.len().div_ceil(parts.max(1)).max(1);
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    while start < s.len() {
        let mut end = (start + size).min(s.len());
        while !s.is_char_boundary(end) {
            end += 1;
        }
        out.push(&s[start..end]);
        start = end;
    }
    out
}

struct Render<'a> {
    id: String,
    model: &'a str,
    fingerprint: Option<&'a str>,
    format: ReasoningFormat,
    finish: &'static str,
    prompt_tokens: u32,
    /// Whether a stream ends with `[DONE]`.
    done: bool,
}

impl Render<'_> {
    /// The `content` field of a choice and its separate reasoning, per format.
    fn fields<'r>(&self, r: &'r Reply) -> (Option<(&'static str, &'r str)>, String) {
        let cut = self.finish == "length";
        match self.format {
            ReasoningFormat::ReasoningContent => {
                (Some(("reasoning_content", &r.reasoning)), r.answer.clone())
            }
            ReasoningFormat::Reasoning => (Some(("reasoning", &r.reasoning)), r.answer.clone()),
            ReasoningFormat::InlineThink if cut => (None, format!("<think>\n{}", r.reasoning)),
            ReasoningFormat::InlineThink => (
                None,
                format!("<think>\n{}\n</think>\n\n{}", r.reasoning, r.answer),
            ),
            ReasoningFormat::InlineThinkNoOpen if cut => (None, r.reasoning.clone()),
            ReasoningFormat::InlineThinkNoOpen => {
                (None, format!("{}\n</think>\n\n{}", r.reasoning, r.answer))
            }
            ReasoningFormat::Plain => (None, r.answer.clone()),
        }
    }

    fn usage(&self, replies: &[Reply]) -> serde_json::Value {
        let reasoning: u32 = replies.iter().map(|r| approx_tokens(&r.reasoning)).sum();
        let completion: u32 = replies
            .iter()
            .map(|r| approx_tokens(&r.reasoning) + approx_tokens(&r.answer))
            .sum();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "completion_tokens_details": { "reasoning_tokens": reasoning },
        })
    }

    fn full(&self, replies: &[Reply]) -> Bytes {
        let choices: Vec<serde_json::Value> = replies
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (reasoning, content) = self.fields(r);
                let mut message = json!({ "role": "assistant", "content": content });
                if let Some((field, text)) = reasoning {
                    message[field] = json!(text);
                }
                json!({ "index": i, "message": message, "logprobs": null, "finish_reason": self.finish })
            })
            .collect();
        let body = json!({
            "id": self.id, "object": "chat.completion", "created": 1_700_000_000u64, "model": self.model,
            "system_fingerprint": self.fingerprint, "choices": choices, "usage": self.usage(replies),
        });
        Bytes::from(serde_json::to_vec(&body).unwrap())
    }

    /// Streamed response as one buffer sliced into per-event frames, choices
    /// interleaved; faults shape it as documented on [`Fault`].
    fn stream(
        &self,
        replies: &[Reply],
        chunks: usize,
        include_usage: bool,
        fault: Option<&Fault>,
    ) -> Vec<Bytes> {
        let mut prefix = Vec::with_capacity(256);
        prefix.extend_from_slice(b"data: {\"id\":");
        serde_json::to_writer(&mut prefix, &self.id).unwrap();
        prefix.extend_from_slice(
            b",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":",
        );
        serde_json::to_writer(&mut prefix, self.model).unwrap();
        prefix.extend_from_slice(b",\"system_fingerprint\":");
        serde_json::to_writer(&mut prefix, &self.fingerprint).unwrap();
        prefix.extend_from_slice(b",\"choices\":[");

        let contents: Vec<(Option<(&'static str, &str)>, String)> =
            replies.iter().map(|r| self.fields(r)).collect();
        let pieces: Vec<Vec<(&str, &str)>> = contents
            .iter()
            .map(|(reasoning, content)| {
                let mut p = Vec::new();
                match reasoning {
                    Some((field, text)) => {
                        let parts = if content.is_empty() {
                            chunks
                        } else {
                            chunks.saturating_sub(1).max(1)
                        };
                        p.extend(split_even(text, parts).into_iter().map(|t| (*field, t)));
                        p.extend(split_even(content, 1).into_iter().map(|t| ("content", t)));
                    }
                    None => p.extend(
                        split_even(content, chunks)
                            .into_iter()
                            .map(|t| ("content", t)),
                    ),
                }
                p
            })
            .collect();
        let total: usize = contents
            .iter()
            .map(|(r, c)| r.map_or(0, |r| r.1.len()) + c.len())
            .sum();
        let mut buf =
            Vec::with_capacity(total + (prefix.len() + 96) * (chunks + 2) * replies.len() + 512);
        let mut ends = Vec::with_capacity((chunks + 2) * replies.len() + 4);
        let keep_alive = fault == Some(&Fault::KeepAlive);
        if keep_alive {
            buf.extend_from_slice(b": keep-alive\n\n\n");
            ends.push(buf.len());
        }
        let steps = pieces.iter().map(Vec::len).max().unwrap_or(0);
        for step in 0..steps {
            for (i, p) in pieces.iter().enumerate() {
                let Some((field, text)) = p.get(step) else {
                    continue;
                };
                buf.extend_from_slice(&prefix);
                buf.extend_from_slice(b"{\"index\":");
                buf.extend_from_slice(i.to_string().as_bytes());
                buf.extend_from_slice(b",\"delta\":{");
                if step == 0 {
                    buf.extend_from_slice(b"\"role\":\"assistant\",");
                }
                buf.push(b'"');
                buf.extend_from_slice(field.as_bytes());
                buf.extend_from_slice(b"\":");
                serde_json::to_writer(&mut buf, text).unwrap();
                buf.extend_from_slice(b"},\"logprobs\":null,\"finish_reason\":null}]}\n\n");
                ends.push(buf.len());
                if keep_alive {
                    buf.extend_from_slice(b": keep-alive\n\n");
                    ends.push(buf.len());
                }
                if fault == Some(&Fault::MalformedJson) && step == 0 && i == 0 {
                    buf.extend_from_slice(
                        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"oops\"}\n\n",
                    );
                    ends.push(buf.len());
                }
            }
        }
        let content_events = ends.len();
        for i in 0..replies.len() {
            buf.extend_from_slice(&prefix);
            buf.extend_from_slice(format!("{{\"index\":{i},\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"{}\"}}]}}\n\n", self.finish).as_bytes());
            ends.push(buf.len());
        }
        if include_usage {
            buf.extend_from_slice(&prefix);
            buf.extend_from_slice(b"],\"usage\":");
            serde_json::to_writer(&mut buf, &self.usage(replies)).unwrap();
            buf.extend_from_slice(b"}\n\n");
            ends.push(buf.len());
        }
        if self.done {
            buf.extend_from_slice(b"data: [DONE]\n\n");
            ends.push(buf.len());
        }

        let all = Bytes::from(buf);
        let mut frames = Vec::with_capacity(ends.len());
        let mut start = 0;
        for end in ends {
            frames.push(all.slice(start..end));
            start = end;
        }
        match fault {
            Some(Fault::DropMidStream | Fault::EndWithoutDone | Fault::StallMidStream(_)) => {
                // Keep half the content events; a drop also sends half of the next line.
                let half = (content_events / 2).max(1);
                if matches!(fault, Some(Fault::StallMidStream(_))) {
                    return frames;
                }
                let partial = frames.get(half).map(|f| f.slice(..f.len() / 2));
                frames.truncate(half);
                if let (Some(Fault::DropMidStream), Some(p)) = (fault, partial) {
                    frames.push(p);
                }
                frames
            }
            _ => frames,
        }
    }
}

/// How a response body ends.
enum End {
    /// Normally: count the response and its choices.
    Complete(u64),
    /// Cleanly but without counting (truncated or malformed on purpose).
    Quiet,
    /// By aborting the connection.
    Abort,
    Done,
}

/// A pause before frame number `at`.
struct Stall {
    at: usize,
    duration: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stall {
    fn before(at: usize, duration: Duration) -> Option<Self> {
        Some(Stall {
            at,
            duration,
            sleep: None,
        })
    }
}

/// Body stream over prepared frames that counts a response only once its last
/// frame has been handed to the connection.
struct Frames {
    frames: std::vec::IntoIter<Bytes>,
    sent: usize,
    stall: Option<Stall>,
    end: End,
    shared: Arc<Shared>,
}

impl Stream for Frames {
    type Item = Result<Frame<Bytes>, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(stall) = &mut this.stall
            && this.sent == stall.at
        {
            let d = stall.duration;
            let s = stall
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(d)));
            if s.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.stall = None;
        }
        if let Some(b) = this.frames.next() {
            this.sent += 1;
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        match std::mem::replace(&mut this.end, End::Done) {
            End::Complete(choices) => {
                this.shared.completions.fetch_add(choices, Ordering::SeqCst);
                this.shared.responses.fetch_add(1, Ordering::SeqCst);
                Poll::Ready(None)
            }
            End::Abort => Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "fake-teacher fault: connection dropped mid-stream",
            )))),
            End::Quiet | End::Done => Poll::Ready(None),
        }
    }
}

fn respond_frames(
    frames: Vec<Bytes>,
    fault: Option<&Fault>,
    n: u32,
    shared: &Arc<Shared>,
    content_type: &'static str,
) -> Response<Body> {
    let stall_at = (frames.len() / 2).max(1);
    let (end, stall) = match fault {
        // Pause before aborting so the partial response is flushed, as when a
        // server dies mid-generation, rather than lost with the connection.
        Some(Fault::DropMidStream) => (
            End::Abort,
            Stall::before(frames.len(), Duration::from_millis(20)),
        ),
        Some(Fault::EndWithoutDone | Fault::MalformedJson) => (End::Quiet, None),
        Some(Fault::StallMidStream(d)) => {
            (End::Complete(u64::from(n)), Stall::before(stall_at, *d))
        }
        _ => (End::Complete(u64::from(n)), None),
    };
    let stream = Frames {
        frames: frames.into_iter(),
        sent: 0,
        stall,
        end,
        shared: shared.clone(),
    };
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matching() {
        assert!(When::Request(3).matches(3) && !When::Request(3).matches(4));
        assert!(When::FirstN(2).matches(2) && !When::FirstN(2).matches(3));
        assert!(When::EveryNth(3).matches(6) && !When::EveryNth(3).matches(7));
        assert!(!When::EveryNth(0).matches(0));
        assert!(When::Always.matches(99));
    }

    #[test]
    fn padding_hits_exact_size_and_is_deterministic() {
        let mut r = default_reply(&ReplyInput {
            prompt: "é2+2",
            choice: 0,
            seed: None,
        });
        pad(&mut r, "é2+2", 1000);
        assert_eq!(r.reasoning.len() + r.answer.len(), 1000);
        assert!(r.reasoning.contains("step 3 for é2+2"));
        let mut short = default_reply(&ReplyInput {
            prompt: "q",
            choice: 0,
            seed: None,
        });
        let before = short.clone();
        pad(&mut short, "q", 5);
        assert_eq!(short, before, "never shortens");
    }

    #[test]
    fn split_even_respects_chars() {
        let s = "aéb€c";
        let parts = split_even(s, 3);
        assert_eq!(parts.concat(), s);
        assert!(parts.len() <= 3);
        assert!(split_even("", 4).is_empty());
        assert_eq!(split_even("abc", 10).concat(), "abc");
    }

    #[test]
    fn default_reply_varies_by_choice_and_seed() {
        let a = default_reply(&ReplyInput {
            prompt: "p",
            choice: 0,
            seed: None,
        });
        assert_eq!(a.reasoning, "step 1 for p\nstep 2 for p");
        assert_eq!(a.answer, "\\boxed{1}");
        let b = default_reply(&ReplyInput {
            prompt: "p",
            choice: 1,
            seed: Some(4),
        });
        assert!(b.reasoning.ends_with("\nsample 1 seed 4"));
    }
}
