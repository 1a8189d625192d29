//! `[teacher.NAME]` configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::TeacherError;
use crate::sim::SimulatedTeacher;

/// One base URL or a pool of them; a TOML string or array of strings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BaseUrls {
    /// A single server.
    One(String),
    /// Replicas serving the same model, load-balanced with failover.
    Many(Vec<String>),
}

impl BaseUrls {
    /// The URLs as a slice, whichever form was written.
    pub fn as_slice(&self) -> &[String] {
        match self {
            BaseUrls::One(u) => std::slice::from_ref(u),
            BaseUrls::Many(v) => v,
        }
    }
}

impl From<&str> for BaseUrls {
    fn from(u: &str) -> Self {
        BaseUrls::One(u.to_owned())
    }
}

impl From<String> for BaseUrls {
    fn from(u: String) -> Self {
        BaseUrls::One(u)
    }
}

impl From<Vec<String>> for BaseUrls {
    fn from(v: Vec<String>) -> Self {
        BaseUrls::Many(v)
    }
}

fn default_max_concurrency() -> usize {
    64
}
fn default_connect_timeout_s() -> f64 {
    10.0
}
fn default_request_timeout_s() -> f64 {
    1800.0
}
fn default_rate_burst_s() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}
fn default_max_retries() -> u32 {
    8
}
fn default_retry_base_delay_s() -> f64 {
    1.0
}
fn default_retry_max_delay_s() -> f64 {
    60.0
}
fn default_failover_after() -> u32 {
    3
}
fn default_rest_s() -> f64 {
    10.0
}
fn default_rest_max_s() -> f64 {
    300.0
}

/// A teacher server (or pool of replicas) speaking the OpenAI chat API, or the
/// built-in simulator for demos and tests: exactly one of `base_url` and `simulated`.
///
/// Holds no secret: the API key is read from the environment variable named by
/// `api_key_env`, so configs can be stored and hashed freely.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    /// OpenAI-style base URL including the version prefix (`http://host:8000/v1`,
    /// `https://api.deepseek.com/v1`); `/chat/completions` is appended. A list
    /// load-balances over replicas of the same model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<BaseUrls>,
    /// Instead of a server, a simulator that [`connect`](crate::connect) starts on
    /// loopback for the run: synthetic answers for demos and tests, never a teacher.
    /// `api_key_env` is not used with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulated: Option<SimulatedTeacher>,
    /// Model name sent in every request (required for a simulated teacher too, which
    /// reports it back like a server).
    pub model: String,
    /// Name of the environment variable holding the API key; `None` sends no
    /// `Authorization` header (local vLLM/SGLang).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Most requests in flight per endpoint; match the server's batch capacity.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Limit on establishing a TCP/TLS connection, in seconds.
    #[serde(default = "default_connect_timeout_s")]
    pub connect_timeout_s: f64,
    /// Limit on one HTTP attempt from sending to the end of the body, in seconds;
    /// generous because long reasoning takes many minutes.
    #[serde(default = "default_request_timeout_s")]
    pub request_timeout_s: f64,
    /// Longest silence between received bytes before the attempt is abandoned, in
    /// seconds; catches stalled streams long before `request_timeout_s`. Off by
    /// default. Waiting for the response head counts too, so with `stream = false`
    /// it must exceed the whole generation unless the server sends keep-alives.
    #[serde(default)]
    pub read_timeout_s: Option<f64>,
    /// Request budget across all endpoints (a provider's per-key limit).
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Token budget across all endpoints. Each request reserves its prompt estimate
    /// plus `max_tokens * n` and is corrected by the reported usage when it ends.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Seconds' worth of budget that may be spent in one burst; larger bursts
    /// start faster, smaller ones keep clear of providers that enforce per second.
    #[serde(default = "default_rate_burst_s")]
    pub rate_burst_s: f64,
    /// Use server-sent events; keeps long generations alive through proxies that
    /// cut idle connections and gives time-to-first-token.
    #[serde(default = "default_true")]
    pub stream: bool,
    /// Whether the server accepts `n > 1`; the DeepSeek API does not, so set false
    /// there and the client sends `n` single-sample requests instead. An endpoint
    /// that silently ignores `n` (answering with one choice) is detected on its first
    /// such answer and sent single-sample requests from then on.
    #[serde(default = "default_true")]
    pub supports_n: bool,
    /// Retries after the first attempt for transient failures (429, 5xx, timeouts,
    /// dropped connections, truncated or malformed responses).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// First retry delay in seconds; doubles per retry, with jitter.
    #[serde(default = "default_retry_base_delay_s")]
    pub retry_base_delay_s: f64,
    /// Cap on one retry delay in seconds, `Retry-After` included.
    #[serde(default = "default_retry_max_delay_s")]
    pub retry_max_delay_s: f64,
    /// Consecutive failures after which an endpoint is rested.
    #[serde(default = "default_failover_after")]
    pub failover_after: u32,
    /// First rest of a failing endpoint in seconds; doubles each time it fails again.
    #[serde(default = "default_rest_s")]
    pub rest_s: f64,
    /// Longest rest in seconds.
    #[serde(default = "default_rest_max_s")]
    pub rest_max_s: f64,
    /// Extra JSON fields merged into every request body, for server-specific
    /// sampling options (`top_k`, `min_p`, `chat_template_kwargs`, ...).
    #[serde(default)]
    pub extra_body: serde_json::Map<String, serde_json::Value>,
}

/// Body fields the client owns; letting `extra_body` override them would
/// desynchronise the request from how its response is parsed.
const RESERVED_BODY_KEYS: &[&str] = &["model", "messages", "stream", "stream_options", "n"];

/// The body field in which the client sends a simulated teacher's settings: the server
/// ignores it, but it puts them in the request hash that keys the response cache.
pub(crate) const SIMULATION_BODY_KEY: &str = "simulation";

impl TeacherConfig {
    /// A config for the server(s) at `base_url` with every optional field at its default.
    pub fn new(base_url: impl Into<BaseUrls>, model: impl Into<String>) -> Self {
        Self {
            base_url: Some(base_url.into()),
            ..Self::defaults(model.into())
        }
    }

    /// A config for a simulated teacher (demos and tests) with every optional field at
    /// its default.
    pub fn simulated(model: impl Into<String>, simulated: SimulatedTeacher) -> Self {
        Self {
            simulated: Some(simulated),
            ..Self::defaults(model.into())
        }
    }

    fn defaults(model: String) -> Self {
        Self {
            base_url: None,
            simulated: None,
            model,
            api_key_env: None,
            max_concurrency: default_max_concurrency(),
            connect_timeout_s: default_connect_timeout_s(),
            request_timeout_s: default_request_timeout_s(),
            read_timeout_s: None,
            requests_per_minute: None,
            tokens_per_minute: None,
            rate_burst_s: default_rate_burst_s(),
            stream: true,
            supports_n: true,
            max_retries: default_max_retries(),
            retry_base_delay_s: default_retry_base_delay_s(),
            retry_max_delay_s: default_retry_max_delay_s(),
            failover_after: default_failover_after(),
            rest_s: default_rest_s(),
            rest_max_s: default_rest_max_s(),
            extra_body: serde_json::Map::new(),
        }
    }

    /// Checks values serde cannot, so a bad config fails at load time rather than
    /// on the first request of a long run.
    pub fn validate(&self) -> Result<(), TeacherError> {
        let bad = |m: String| Err(TeacherError::Config(m));
        match (&self.base_url, &self.simulated) {
            (Some(_), Some(_)) => {
                return bad(
                    "give base_url (a server) or simulated (the built-in simulator), \
                            not both"
                        .into(),
                );
            }
            (None, None) => {
                return bad(
                    "base_url is missing: give base_url (a server) or simulated \
                            (the built-in simulator)"
                        .into(),
                );
            }
            (Some(urls), None) => {
                if urls.as_slice().is_empty() {
                    return bad("base_url lists no URL".into());
                }
                for u in urls.as_slice() {
                    match reqwest::Url::parse(u) {
                        Ok(p) if matches!(p.scheme(), "http" | "https") && p.host().is_some() => {}
                        _ => {
                            return bad(format!(
                                "base_url {:?} is not an http(s) URL",
                                redact_url(u)
                            ));
                        }
                    }
                }
            }
            (None, Some(sim)) => {
                sim.validate()?;
                if self.extra_body.contains_key(SIMULATION_BODY_KEY) {
                    return bad(format!(
                        "extra_body may not set {SIMULATION_BODY_KEY:?} for a simulated \
                         teacher; the client sends the simulator settings there"
                    ));
                }
            }
        }
        if self.model.trim().is_empty() {
            return bad("model is empty".into());
        }
        if let Some(var) = &self.api_key_env
            && !is_env_var_name(var)
        {
            // Never echo it: a pasted key is the likely mistake.
            return bad("api_key_env must be the name of an environment variable \
                     (letters, digits, '_'), not the key itself"
                .into());
        }
        if self.max_concurrency == 0 {
            return bad("max_concurrency must be at least 1".into());
        }
        for (name, v) in [
            ("connect_timeout_s", self.connect_timeout_s),
            ("request_timeout_s", self.request_timeout_s),
            ("rate_burst_s", self.rate_burst_s),
            ("rest_s", self.rest_s),
            ("rest_max_s", self.rest_max_s),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{name} must be a positive number of seconds"));
            }
        }
        for (name, v) in [
            ("retry_base_delay_s", self.retry_base_delay_s),
            ("retry_max_delay_s", self.retry_max_delay_s),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} must be a non-negative number of seconds"));
            }
        }
        if let Some(v) = self.read_timeout_s
            && !(v.is_finite() && v > 0.0)
        {
            return bad("read_timeout_s must be a positive number of seconds".into());
        }
        if self.requests_per_minute == Some(0) || self.tokens_per_minute == Some(0) {
            return bad("a requests/tokens per minute budget must be positive".into());
        }
        if self.failover_after == 0 {
            return bad("failover_after must be at least 1".into());
        }
        if let Some(k) = self
            .extra_body
            .keys()
            .find(|k| RESERVED_BODY_KEYS.contains(&k.as_str()))
        {
            return bad(format!(
                "extra_body may not set {k:?}; it is set by the client"
            ));
        }
        Ok(())
    }

    /// Number of endpoints requests are spread over: the base URLs, or the one
    /// simulator. Callers size their concurrency as this times `max_concurrency`.
    pub fn endpoint_count(&self) -> usize {
        self.base_url.as_ref().map_or(1, |u| u.as_slice().len())
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_s)
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout_s)
    }
}

pub(crate) fn is_env_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The URL with any `user:password@` removed, for messages and labels.
pub(crate) fn redact_url(u: &str) -> String {
    match reqwest::Url::parse(u) {
        Ok(mut p) if !p.username().is_empty() || p.password().is_some() => {
            let _ = p.set_username("");
            let _ = p.set_password(None);
            p.to_string()
        }
        Ok(_) => u.to_owned(),
        Err(_) => "<unparseable URL>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_like_json_with_defaults() {
        let c: TeacherConfig =
            serde_json::from_str(r#"{"base_url": "http://localhost:8000/v1", "model": "r1"}"#)
                .unwrap();
        assert_eq!(c, TeacherConfig::new("http://localhost:8000/v1", "r1"));
        assert_eq!(c.max_concurrency, 64);
        assert!(c.stream && c.supports_n);
        assert_eq!(c.max_retries, 8);
        c.validate().unwrap();
    }

    #[test]
    fn base_url_list_and_unknown_fields() {
        let c: TeacherConfig = serde_json::from_str(
            r#"{"base_url": ["http://a/v1", "http://b/v1"], "model": "r1", "supports_n": false}"#,
        )
        .unwrap();
        assert_eq!(c.endpoint_count(), 2);
        assert!(!c.supports_n);
        let err = serde_json::from_str::<TeacherConfig>(
            r#"{"base_url": "http://a/v1", "model": "r1", "api_key": "sk-secret"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `api_key`"), "{err}");
        assert!(!err.contains("sk-secret"));
    }

    #[test]
    fn validate_rejects_bad_values_without_echoing_keys() {
        let mut c = TeacherConfig::new("http://a/v1", "r1");
        c.api_key_env = Some("sk-123-secret".into());
        let msg = c.validate().unwrap_err().to_string();
        assert!(!msg.contains("sk-123-secret"), "{msg}");
        assert!(msg.contains("api_key_env"));

        let mut c = TeacherConfig::new("ftp://a", "r1");
        assert!(c.validate().is_err());
        c.base_url = Some(BaseUrls::Many(vec![]));
        assert!(c.validate().is_err());

        let mut c = TeacherConfig::new("http://a/v1", "r1");
        c.max_concurrency = 0;
        assert!(c.validate().is_err());

        let mut c = TeacherConfig::new("http://a/v1", "r1");
        c.extra_body.insert("stream".into(), false.into());
        assert!(c.validate().unwrap_err().to_string().contains("stream"));

        let mut c = TeacherConfig::new("http://a/v1", "r1");
        c.request_timeout_s = 0.0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn simulated_teachers_parse_and_exclude_base_url() {
        let c: TeacherConfig = serde_json::from_str(
            r#"{"model": "sim-r1", "simulated": {"task": "arithmetic", "seed": 7, "wrong": 0.1}}"#,
        )
        .unwrap();
        let mut sim = SimulatedTeacher::new(crate::sim::SimTask::Arithmetic);
        sim.seed = 7;
        sim.wrong = 0.1;
        assert_eq!(c, TeacherConfig::simulated("sim-r1", sim));
        assert_eq!(c.endpoint_count(), 1);
        c.validate().unwrap();
        // Real teachers serialise as before, so nothing derived from them changes.
        let real = serde_json::to_value(TeacherConfig::new("http://a/v1", "r1")).unwrap();
        assert!(real.get("simulated").is_none());

        let both =
            r#"{"base_url": "http://a/v1", "model": "m", "simulated": {"task": "arithmetic"}}"#;
        let msg = serde_json::from_str::<TeacherConfig>(both)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("base_url") && msg.contains("simulated") && msg.contains("not both"),
            "{msg}"
        );
        let msg = serde_json::from_str::<TeacherConfig>(r#"{"model": "m"}"#)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("base_url is missing") && msg.contains("simulated"),
            "{msg}"
        );

        let err = serde_json::from_str::<TeacherConfig>(
            r#"{"model": "m", "simulated": {"task": "arithmetic", "wrongg": 0.1}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `wrongg`"), "{err}");
        let err = serde_json::from_str::<TeacherConfig>(
            r#"{"model": "m", "simulated": {"task": "algebra"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("algebra"), "{err}");

        let mut c = c;
        c.simulated.as_mut().unwrap().truncated = 1.5;
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("simulated.truncated"), "{msg}");
        c.simulated.as_mut().unwrap().truncated = 0.5;
        c.extra_body.insert("simulation".into(), 1.into());
        assert!(c.validate().unwrap_err().to_string().contains("simulation"));
    }

    #[test]
    fn urls_lose_credentials_in_labels() {
        assert_eq!(redact_url("http://u:pw@h:1/v1"), "http://h:1/v1");
        assert_eq!(redact_url("http://h:1/v1"), "http://h:1/v1");
        assert!(is_env_var_name("DEEPSEEK_API_KEY"));
        assert!(!is_env_var_name("1X"));
        assert!(!is_env_var_name("sk-abc"));
    }
}
