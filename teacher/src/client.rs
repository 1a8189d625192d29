//! The OpenAI-compatible [`ChatModel`] over reqwest.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use rand::Rng;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::ChatModel;
use crate::config::{SIMULATION_BODY_KEY, TeacherConfig, redact_url};
use crate::error::TeacherError;
use crate::limiter::Limiter;
use crate::pool::{Endpoint, EndpointStatus, Pool, RestPolicy};
use crate::sim::SimServer;
use crate::sse::SseDecoder;
use crate::types::{ChatRequest, Completion};
use crate::wire::{RawResponse, StreamAcc, WireError, error_details, parse_full};

/// Longest wait for the end of a body after `[DONE]`; reading it lets the
/// connection return to the pool, but a server that never ends it must not pin
/// a task forever.
const DRAIN_AFTER_DONE: Duration = Duration::from_secs(1);
/// Longest server error message kept, in bytes.
const MAX_MESSAGE: usize = 600;

/// An API key that cannot leak through `Debug`.
#[derive(Clone)]
struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

/// Traffic counters of one client, for progress reports and tests.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClientStats {
    /// HTTP attempts started.
    pub attempts: u64,
    /// Attempts that were retries of a failed one.
    pub retries: u64,
    /// Attempts that returned completions.
    pub successes: u64,
    /// Attempts that failed, for any reason.
    pub failures: u64,
    /// Per-endpoint health, in `base_url` order.
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Debug, Default)]
struct Counters {
    attempts: AtomicU64,
    retries: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
}

struct Inner {
    config: TeacherConfig,
    http: reqwest::Client,
    auth: Option<HeaderValue>,
    key: Option<ApiKey>,
    pool: Pool,
    limiter: Option<Limiter>,
    request_timeout: Duration,
    counters: Counters,
    /// The server of a simulated teacher, stopped when the last clone goes.
    _sim: Option<SimServer>,
}

/// Client for OpenAI-compatible chat servers (vLLM, SGLang, DeepSeek API, ...).
///
/// Cheap to clone; clones share the connection pool, limits and endpoint health,
/// so one client per teacher serves all concurrent requests.
#[derive(Clone)]
pub struct OpenAiClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("OpenAiClient")
            .field("model", &i.config.model)
            .field(
                "endpoints",
                &i.pool
                    .endpoints
                    .iter()
                    .map(|e| &e.label)
                    .collect::<Vec<_>>(),
            )
            .field("api_key", &i.key)
            .field("stream", &i.config.stream)
            .field("supports_n", &i.config.supports_n)
            .finish_non_exhaustive()
    }
}

impl OpenAiClient {
    /// Builds a client, reading the API key from the variable `api_key_env` names.
    pub fn new(config: TeacherConfig) -> Result<Self, TeacherError> {
        let key = match &config.api_key_env {
            None => None,
            Some(var) => {
                // Validate first so a pasted key is never used as a variable name in a message.
                config.validate()?;
                match std::env::var(var) {
                    Ok(v) if !v.trim().is_empty() => Some(v),
                    _ => return Err(TeacherError::MissingApiKey { var: var.clone() }),
                }
            }
        };
        Self::with_api_key(config, key)
    }

    /// Builds a client with an explicit key (or none), ignoring `api_key_env`;
    /// for callers that hold keys elsewhere. A simulated teacher needs its server
    /// started first: use [`connect`](crate::connect).
    pub fn with_api_key(
        config: TeacherConfig,
        api_key: Option<String>,
    ) -> Result<Self, TeacherError> {
        config.validate()?;
        let Some(urls) = &config.base_url else {
            return Err(TeacherError::Config(
                "a simulated teacher is served by its own server: build its client with \
                 distill_teacher::connect"
                    .into(),
            ));
        };
        let endpoints = urls
            .as_slice()
            .iter()
            .map(|u| {
                let base = u.trim_end_matches('/');
                let url =
                    reqwest::Url::parse(&format!("{base}/chat/completions")).map_err(|e| {
                        TeacherError::Config(format!("base_url {:?}: {e}", redact_url(u)))
                    })?;
                Ok((redact_url(base), url))
            })
            .collect::<Result<Vec<_>, TeacherError>>()?;
        Self::build(config, api_key, endpoints, None)
    }

    /// Starts the simulator of a simulated teacher and builds a client for it that
    /// keeps the server running until the client and all its clones are dropped.
    pub(crate) async fn simulated(config: TeacherConfig) -> Result<Self, TeacherError> {
        config.validate()?;
        let sim = config
            .simulated
            .clone()
            .ok_or_else(|| TeacherError::Config("not a simulated teacher".into()))?;
        let label = format!("simulated:{}", sim.task.as_str());
        let server = SimServer::start(sim, config.model.clone())
            .await
            .map_err(|e| TeacherError::Connection {
                endpoint: label.clone(),
                message: format!("cannot start the simulator on loopback: {e}"),
            })?;
        let url = reqwest::Url::parse(&format!("{}/chat/completions", server.url()))
            .map_err(|e| TeacherError::Config(format!("simulator URL: {e}")))?;
        Self::build(config, None, vec![(label, url)], Some(server))
    }

    fn build(
        config: TeacherConfig,
        api_key: Option<String>,
        endpoints: Vec<(String, reqwest::Url)>,
        sim: Option<SimServer>,
    ) -> Result<Self, TeacherError> {
        let key = api_key.map(|k| ApiKey(k.trim().to_owned()));
        let auth = match &key {
            None => None,
            Some(k) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {}", k.0)).map_err(|_| {
                    TeacherError::Config(
                        "the API key contains characters not allowed in an HTTP header".into(),
                    )
                })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout())
            .pool_max_idle_per_host(config.max_concurrency)
            .tcp_nodelay(true)
            .user_agent(concat!("distill-teacher/", env!("CARGO_PKG_VERSION")));
        if let Some(r) = config.read_timeout_s {
            builder = builder.read_timeout(Duration::from_secs_f64(r));
        }
        if sim.is_some() {
            // An HTTP_PROXY in the environment must not capture loopback traffic.
            builder = builder.no_proxy();
        }
        let http = builder
            .build()
            .map_err(|e| TeacherError::Config(format!("cannot build HTTP client: {e}")))?;
        let policy = RestPolicy {
            failover_after: config.failover_after,
            rest: Duration::from_secs_f64(config.rest_s),
            rest_max: Duration::from_secs_f64(config.rest_max_s),
        };
        let inner = Inner {
            pool: Pool::new(endpoints, config.max_concurrency, policy),
            limiter: Limiter::new(
                config.requests_per_minute,
                config.tokens_per_minute,
                config.rate_burst_s,
            ),
            request_timeout: config.request_timeout(),
            http,
            auth,
            key,
            config,
            counters: Counters::default(),
            _sim: sim,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The config the client was built from.
    pub fn config(&self) -> &TeacherConfig {
        &self.inner.config
    }

    /// Counters and endpoint health now.
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.counters;
        ClientStats {
            attempts: c.attempts.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            successes: c.successes.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            endpoints: self.inner.pool.status(),
        }
    }
}

/// The completions of one request body and the endpoint that served them.
struct Served {
    endpoint: usize,
    completions: Vec<Completion>,
}

fn check_request(req: &ChatRequest) -> Result<(), TeacherError> {
    if req.messages.is_empty() {
        return Err(TeacherError::InvalidRequest("no messages".into()));
    }
    if req.n == 0 {
        return Err(TeacherError::InvalidRequest("n must be at least 1".into()));
    }
    for (name, v) in [("temperature", req.temperature), ("top_p", req.top_p)] {
        if v.is_some_and(|v| !v.is_finite()) {
            return Err(TeacherError::InvalidRequest(format!(
                "{name} is not a finite number"
            )));
        }
    }
    Ok(())
}

/// Rough prompt size in tokens (4 bytes per token), for reserving budget.
fn prompt_estimate(req: &ChatRequest) -> u64 {
    req.messages
        .iter()
        .map(|m| m.content.len() as u64 / 4 + 4)
        .sum()
}

fn parse_retry_after(h: &HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
    };
    let d = get("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| get("retry-after"))?;
    (d.is_finite() && d >= 0.0).then(|| Duration::from_secs_f64(d.min(86_400.0)))
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The server's explanation from an error body, JSON or not.
fn server_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body)
        && let (_, Some(m)) = error_details(&v)
    {
        return truncate(m);
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".to_owned()
    } else {
        truncate(text.to_owned())
    }
}

/// The error and its sources, without the URL (which could carry credentials).
fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        src = s.source();
    }
    msg
}

impl Inner {
    fn scrub(&self, s: String) -> String {
        match &self.key {
            Some(k) if !k.0.is_empty() && s.contains(&k.0) => s.replace(&k.0, "[redacted]"),
            _ => s,
        }
    }

    fn status_error(
        &self,
        ep: &Endpoint,
        status: u16,
        retry_after: Option<Duration>,
        message: String,
    ) -> TeacherError {
        let endpoint = ep.label.clone();
        let message = self.scrub(message);
        match status {
            401 | 403 => TeacherError::Auth {
                endpoint,
                status,
                message,
            },
            402 => TeacherError::Payment { endpoint, message },
            404 => TeacherError::NotFound { endpoint, message },
            429 => TeacherError::RateLimited {
                endpoint,
                retry_after,
                message,
            },
            408 | 500..=599 => TeacherError::Server {
                endpoint,
                status,
                retry_after,
                message,
            },
            400..=499 => TeacherError::BadRequest {
                endpoint,
                status,
                message,
            },
            _ => TeacherError::Malformed {
                endpoint,
                message: format!("unexpected HTTP status {status}: {message}"),
            },
        }
    }

    fn wire_error(&self, ep: &Endpoint, e: WireError) -> TeacherError {
        let endpoint = ep.label.clone();
        match e {
            WireError::Malformed(m) => TeacherError::Malformed {
                endpoint,
                message: self.scrub(m),
            },
            WireError::Truncated(m) => TeacherError::TruncatedStream {
                endpoint,
                message: m,
            },
            WireError::Api {
                status: Some(s),
                message,
            } if (400..600).contains(&s) => self.status_error(
                ep,
                s,
                None,
                format!("error in response body: {}", truncate(message)),
            ),
            WireError::Api { message, .. } => TeacherError::Server {
                endpoint,
                status: 500,
                retry_after: None,
                message: self.scrub(format!("error in response body: {}", truncate(message))),
            },
        }
    }

    fn transport_error(&self, ep: &Endpoint, e: reqwest::Error, in_body: bool) -> TeacherError {
        let endpoint = ep.label.clone();
        let timeout = e.is_timeout();
        let connect = e.is_connect();
        let chain = self.scrub(error_chain(e));
        if timeout {
            let what = if connect {
                "connect_timeout_s exceeded"
            } else {
                "read_timeout_s exceeded with no data"
            };
            TeacherError::Timeout {
                endpoint,
                message: format!("{what}: {chain}"),
            }
        } else if in_body {
            TeacherError::TruncatedStream {
                endpoint,
                message: format!("connection broke mid-response: {chain}"),
            }
        } else {
            TeacherError::Connection {
                endpoint,
                message: chain,
            }
        }
    }

    fn retry_delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let max = self.config.retry_max_delay_s;
        let mut rng = rand::rng();
        let secs = match retry_after {
            // A little jitter on top keeps clients told the same instant from colliding.
            Some(d) => {
                d.as_secs_f64().min(max)
                    + rng.random_range(0.0..=0.05 * d.as_secs_f64().min(max).max(0.01))
            }
            None => {
                let exp = (self.config.retry_base_delay_s
                    * 2f64.powi(retry.saturating_sub(1).min(30) as i32))
                .min(max);
                exp / 2.0 + rng.random_range(0.0..=exp / 2.0)
            }
        };
        Duration::from_secs_f64(secs)
    }

    fn request_body(&self, req: &ChatRequest) -> Value {
        let mut m = Map::new();
        m.insert("model".into(), Value::String(self.config.model.clone()));
        m.insert(
            "messages".into(),
            serde_json::to_value(&req.messages).expect("messages serialise"),
        );
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_owned(), v);
            }
        };
        put(
            "temperature",
            req.temperature
                .and_then(|t| serde_json::Number::from_f64(t).map(Value::Number)),
        );
        put(
            "top_p",
            req.top_p
                .and_then(|t| serde_json::Number::from_f64(t).map(Value::Number)),
        );
        put("max_tokens", req.max_tokens.map(Value::from));
        put("n", (req.n != 1).then(|| Value::from(req.n)));
        put("seed", req.seed.map(Value::from));
        put(
            "stop",
            (!req.stop.is_empty()).then(|| Value::from(req.stop.clone())),
        );
        for (k, v) in &self.config.extra_body {
            m.insert(k.clone(), v.clone());
        }
        if let Some(sim) = &self.config.simulated {
            m.insert(
                SIMULATION_BODY_KEY.into(),
                serde_json::to_value(sim).expect("settings serialise"),
            );
        }
        m.insert("stream".into(), Value::Bool(self.config.stream));
        if self.config.stream {
            m.insert("stream_options".into(), json!({ "include_usage": true }));
        }
        Value::Object(m)
    }

    /// One HTTP exchange, without retries.
    async fn attempt(
        &self,
        ep: &Endpoint,
        body: Bytes,
        n: u32,
    ) -> Result<RawResponse, TeacherError> {
        let mut rb = self
            .http
            .post(ep.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(
                ACCEPT,
                if self.config.stream {
                    "text/event-stream"
                } else {
                    "application/json"
                },
            )
            .body(body);
        if let Some(a) = &self.auth {
            rb = rb.header(AUTHORIZATION, a.clone());
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| self.transport_error(ep, e, false))?;
        let status = resp.status();
        if !status.is_success() {
            let retry_after = parse_retry_after(resp.headers());
            let body = resp.bytes().await.unwrap_or_default();
            return Err(self.status_error(ep, status.as_u16(), retry_after, server_message(&body)));
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        // Trust the content type over what we asked for: some servers ignore `stream`.
        let is_sse = content_type.contains("event-stream")
            || (self.config.stream && !content_type.contains("json"));
        if !is_sse {
            let body = resp
                .bytes()
                .await
                .map_err(|e| self.transport_error(ep, e, true))?;
            return parse_full(&body).map_err(|e| self.wire_error(ep, e));
        }
        let mut stream = resp.bytes_stream();
        let mut decoder = SseDecoder::default();
        let mut acc = StreamAcc::new(n);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.transport_error(ep, e, true))?;
            decoder
                .feed(&chunk, &mut |d: &[u8]| acc.on_event(d))
                .map_err(|e| self.wire_error(ep, e))?;
            if acc.is_done() {
                break;
            }
        }
        if acc.is_done() {
            loop {
                match stream.next().now_or_never() {
                    Some(Some(Ok(_))) => continue,
                    Some(_) => break,
                    None => {
                        // The body's end is still in flight: wait for it off the
                        // request path, so the connection can be pooled without
                        // this request holding its concurrency slot.
                        tokio::spawn(async move {
                            let rest = async { while let Some(Ok(_)) = stream.next().await {} };
                            let _ = tokio::time::timeout(DRAIN_AFTER_DONE, rest).await;
                        });
                        break;
                    }
                }
            }
        } else {
            decoder
                .finish(&mut |d: &[u8]| acc.on_event(d))
                .map_err(|e| self.wire_error(ep, e))?;
        }
        acc.finish().map_err(|e| self.wire_error(ep, e))
    }

    /// One request (a single HTTP request body) with retries and failover.
    async fn chat_once(&self, req: &ChatRequest) -> Result<Served, TeacherError> {
        let body =
            Bytes::from(serde_json::to_vec(&self.request_body(req)).expect("body serialises"));
        let prompt_tokens = prompt_estimate(req);
        let reserve = prompt_tokens + u64::from(req.max_tokens.unwrap_or(0)) * u64::from(req.n);
        let mut attempts = 0u32;
        let mut avoid = None;
        loop {
            attempts += 1;
            if let Some(l) = &self.limiter {
                l.acquire(reserve).await;
            }
            let (idx, load) = self.pool.pick(avoid);
            let ep = &self.pool.endpoints[idx];
            let permit = ep
                .permits
                .acquire()
                .await
                .expect("endpoint semaphore is never closed");
            self.counters.attempts.fetch_add(1, Ordering::Relaxed);
            if attempts > 1 {
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
            }
            let started = Instant::now();
            let result = match tokio::time::timeout(
                self.request_timeout,
                self.attempt(ep, body.clone(), req.n),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(TeacherError::Timeout {
                    endpoint: ep.label.clone(),
                    message: format!(
                        "request_timeout_s ({}s) exceeded",
                        self.config.request_timeout_s
                    ),
                }),
            };
            let latency = started.elapsed();
            drop(permit);
            drop(load);
            match result {
                Ok(raw) => {
                    self.counters.successes.fetch_add(1, Ordering::Relaxed);
                    self.pool.record_success(idx);
                    let completions = self.completions(ep, raw, started, latency, attempts);
                    if let Some(l) = &self.limiter {
                        l.settle(reserve, used_tokens(&completions, prompt_tokens));
                    }
                    return Ok(Served {
                        endpoint: idx,
                        completions,
                    });
                }
                Err(err) => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    if let Some(l) = &self.limiter {
                        // A failed attempt generated little; keep only the prompt's share.
                        l.settle(reserve, prompt_tokens);
                    }
                    if err.blames_endpoint()
                        && let Some(rest) = self.pool.record_failure(idx)
                    {
                        tracing::warn!(
                            endpoint = %ep.label,
                            rest_s = rest.as_secs_f64(),
                            "teacher endpoint keeps failing; resting it"
                        );
                    }
                    if !err.is_retryable() {
                        return Err(err);
                    }
                    if attempts > self.config.max_retries {
                        return Err(if attempts == 1 {
                            err
                        } else {
                            TeacherError::RetriesExhausted {
                                attempts,
                                last: Box::new(err),
                            }
                        });
                    }
                    let delay = self.retry_delay(attempts, err.retry_after());
                    tracing::warn!(
                        endpoint = %ep.label,
                        attempt = attempts,
                        kind = err.kind(),
                        delay_ms = delay.as_millis() as u64,
                        error = %err,
                        "teacher request failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    avoid = Some(idx);
                }
            }
        }
    }

    /// Choices `indices` of `req`, each its own single-sample request, concurrently.
    async fn chat_each(
        &self,
        req: &ChatRequest,
        indices: Range<u32>,
    ) -> Result<Vec<Completion>, TeacherError> {
        let parts = indices.map(|i| async move {
            let mut v = self.chat_once(&req.single(i)).await?.completions;
            for c in &mut v {
                c.index = i;
            }
            Ok::<_, TeacherError>(v)
        });
        let parts = futures::future::try_join_all(parts).await?;
        Ok(parts.into_iter().flatten().collect())
    }

    fn completions(
        &self,
        ep: &Endpoint,
        raw: RawResponse,
        started: Instant,
        latency: Duration,
        attempts: u32,
    ) -> Vec<Completion> {
        let usage = raw.usage.unwrap_or_default();
        // Usage covers the whole request: with several choices, its completion tokens
        // are shared out by text length (summing to the reported total), so token
        // counts and budgets stay right; reasoning tokens only for a single choice.
        let single = raw.choices.len() == 1;
        let shares = usage.completion_tokens.map(|total| {
            apportion(
                total,
                raw.choices
                    .iter()
                    .map(|c| c.reasoning.len() + c.answer.len()),
            )
        });
        let first_token_ms = raw
            .first_token
            .map(|t| t.saturating_duration_since(started).as_millis() as u64);
        raw.choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| Completion {
                index: c.index,
                reasoning: c.reasoning,
                answer: c.answer,
                finish_reason: c.finish_reason,
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: shares.as_ref().map(|s| s[i]),
                reasoning_tokens: if single {
                    usage.reasoning_tokens()
                } else {
                    None
                },
                latency_ms: latency.as_millis() as u64,
                first_token_ms,
                attempts,
                endpoint: ep.label.clone(),
                model: raw.model.clone(),
                system_fingerprint: raw.system_fingerprint.clone(),
            })
            .collect()
    }
}

/// Splits `total` in proportion to `weights` (largest remainders), summing to `total`;
/// equal shares when every weight is zero.
fn apportion(total: u32, weights: impl Iterator<Item = usize>) -> Vec<u32> {
    let w: Vec<u64> = weights.map(|x| x as u64).collect();
    if w.is_empty() {
        return vec![];
    }
    let w: Vec<u64> = if w.iter().all(|&x| x == 0) {
        vec![1; w.len()]
    } else {
        w
    };
    let sum: u64 = w.iter().sum();
    let exact: Vec<(u64, u64)> = w
        .iter()
        .map(|&x| ((total as u64 * x) / sum, (total as u64 * x) % sum))
        .collect();
    let mut out: Vec<u32> = exact.iter().map(|&(q, _)| q as u32).collect();
    let mut left = total - out.iter().sum::<u32>();
    let mut order: Vec<usize> = (0..w.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(exact[i].1));
    for i in order {
        if left == 0 {
            break;
        }
        out[i] += 1;
        left -= 1;
    }
    out
}

/// Tokens a finished request used: reported usage when there is one, else an
/// estimate from the text (servers without `include_usage`).
fn used_tokens(completions: &[Completion], prompt_estimate: u64) -> u64 {
    let prompt = completions
        .first()
        .and_then(|c| c.prompt_tokens)
        .map_or(prompt_estimate, u64::from);
    let generated: u64 = completions
        .iter()
        .map(|c| {
            c.completion_tokens
                .map_or((c.reasoning.len() + c.answer.len()) as u64 / 4, u64::from)
        })
        .sum();
    prompt + generated
}

#[cfg(test)]
mod apportion_tests {
    use super::apportion;

    #[test]
    fn shares_sum_to_the_total_in_proportion() {
        assert_eq!(apportion(10, [1, 1].into_iter()), vec![5, 5]);
        assert_eq!(apportion(10, [3, 1].into_iter()), vec![8, 2]);
        assert_eq!(apportion(7, [1, 1, 1].into_iter()), vec![3, 2, 2]);
        assert_eq!(apportion(5, [0, 0].into_iter()), vec![3, 2]);
        assert_eq!(apportion(0, [4, 2].into_iter()), vec![0, 0]);
        assert!(apportion(3, std::iter::empty()).is_empty());
    }
}

#[async_trait]
impl ChatModel for OpenAiClient {
    async fn chat(&self, request: &ChatRequest) -> Result<Vec<Completion>, TeacherError> {
        check_request(request)?;
        let inner = &self.inner;
        if request.n > 1 && (!inner.config.supports_n || inner.pool.all_ignore_n()) {
            return inner.chat_each(request, 0..request.n).await;
        }
        let Served {
            endpoint,
            mut completions,
        } = inner.chat_once(request).await?;
        // A server that ignores `n` (`transformers serve`) answers with choice 0
        // alone, every time: a protocol mismatch, not a fault to retry. Keep that
        // choice, ask for the others one by one, and from now on send that endpoint
        // one request per sample.
        if request.n > 1 && completions.len() == 1 && completions[0].index == 0 {
            if inner.pool.mark_ignores_n(endpoint) {
                tracing::warn!(
                    endpoint = %inner.pool.endpoints[endpoint].label,
                    n = request.n,
                    "teacher endpoint ignores `n` (it answered a request for several \
                     choices with one); sending it one request per sample from now on. \
                     Set `supports_n = false` on this teacher to skip this check"
                );
            }
            completions.extend(inner.chat_each(request, 1..request.n).await?);
        }
        Ok(completions)
    }

    fn endpoints_without_n(&self) -> Vec<String> {
        self.inner.pool.ignoring_n()
    }

    fn request_body(&self, request: &ChatRequest) -> Value {
        self.inner.request_body(request)
    }

    fn model(&self) -> &str {
        &self.inner.config.model
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Message;

    fn client(stream: bool) -> OpenAiClient {
        let mut c = TeacherConfig::new("http://127.0.0.1:9/v1/", "deepseek-r1");
        c.stream = stream;
        c.extra_body.insert("top_k".into(), 20.into());
        OpenAiClient::with_api_key(c, Some("sk-test-SECRET".into())).unwrap()
    }

    #[test]
    fn body_has_only_set_fields_and_no_key() {
        let req = ChatRequest {
            messages: vec![Message::system("s"), Message::user("q")],
            temperature: Some(0.6),
            max_tokens: Some(100),
            seed: Some(7),
            ..ChatRequest::default()
        };
        let b = client(true).request_body(&req);
        assert_eq!(
            b,
            json!({
                "model": "deepseek-r1",
                "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                "temperature": 0.6, "max_tokens": 100, "seed": 7, "top_k": 20,
                "stream": true, "stream_options": {"include_usage": true}
            })
        );
        assert!(!b.to_string().contains("SECRET"));
        let b = client(false).request_body(&ChatRequest {
            n: 3,
            stop: vec!["x".into()],
            ..ChatRequest::user("q")
        });
        assert_eq!(b["n"], 3);
        assert_eq!(b["stop"], json!(["x"]));
        assert_eq!(b["stream"], false);
        assert!(b.get("stream_options").is_none());
    }

    #[test]
    fn endpoint_url_appends_chat_completions() {
        let c = client(true);
        assert_eq!(
            c.inner.pool.endpoints[0].url.as_str(),
            "http://127.0.0.1:9/v1/chat/completions"
        );
        assert_eq!(c.inner.pool.endpoints[0].label, "http://127.0.0.1:9/v1");
    }

    #[test]
    fn retry_after_headers() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_millis(250)));
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(parse_retry_after(&h), None);
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut cfg = TeacherConfig::new("http://h/v1", "m");
        cfg.retry_base_delay_s = 1.0;
        cfg.retry_max_delay_s = 5.0;
        let c = OpenAiClient::with_api_key(cfg, None).unwrap();
        for _ in 0..50 {
            let d1 = c.inner.retry_delay(1, None).as_secs_f64();
            assert!((0.5..=1.0).contains(&d1), "{d1}");
            let d3 = c.inner.retry_delay(3, None).as_secs_f64();
            assert!((2.0..=4.0).contains(&d3), "{d3}");
            let d9 = c.inner.retry_delay(9, None).as_secs_f64();
            assert!((2.5..=5.0).contains(&d9), "{d9}");
            let ra = c
                .inner
                .retry_delay(1, Some(Duration::from_secs(3)))
                .as_secs_f64();
            assert!((3.0..=3.15).contains(&ra), "{ra}");
            let capped = c
                .inner
                .retry_delay(1, Some(Duration::from_secs(100)))
                .as_secs_f64();
            assert!((5.0..=5.25).contains(&capped), "{capped}");
        }
    }

    #[test]
    fn server_messages_are_extracted_and_bounded() {
        assert_eq!(
            server_message(br#"{"error":{"message":"Model Not Exist","type":"x"}}"#),
            "Model Not Exist"
        );
        assert_eq!(server_message(br#"{"detail":"bad n"}"#), "bad n");
        assert_eq!(server_message(b""), "(empty body)");
        let long = "é".repeat(1000);
        let m = server_message(long.as_bytes());
        assert!(m.len() <= MAX_MESSAGE + 3 && m.ends_with('…'));
    }

    #[test]
    fn request_checks() {
        assert!(check_request(&ChatRequest::default()).is_err());
        assert!(
            check_request(&ChatRequest {
                n: 0,
                ..ChatRequest::user("q")
            })
            .is_err()
        );
        assert!(
            check_request(&ChatRequest {
                temperature: Some(f64::NAN),
                ..ChatRequest::user("q")
            })
            .is_err()
        );
        assert!(check_request(&ChatRequest::user("q")).is_ok());
    }
}
