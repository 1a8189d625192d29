//! Failures of a teacher request, classified for retry decisions and storage.

use std::time::Duration;

/// Why a request failed. Messages quote the server but never the API key.
#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    /// The config is unusable; nothing was sent.
    #[error("invalid teacher config: {0}")]
    Config(String),
    /// The environment variable named by `api_key_env` is unset or empty.
    #[error("API key missing: environment variable {var} is not set or empty")]
    MissingApiKey {
        /// Name of the variable (never its value).
        var: String,
    },
    /// The request itself is unusable (no messages, `n = 0`); nothing was sent.
    #[error("invalid chat request: {0}")]
    InvalidRequest(String),
    /// HTTP 429: the server or provider throttles us.
    #[error("rate limited (HTTP 429) by {endpoint}: {message}")]
    RateLimited {
        /// Base URL that answered.
        endpoint: String,
        /// Delay the server asked for, if any.
        retry_after: Option<Duration>,
        /// Server's explanation.
        message: String,
    },
    /// HTTP 5xx (or 408), or an error object in a 200 response: the server is
    /// overloaded or broken.
    #[error("server error (HTTP {status}) from {endpoint}: {message}")]
    Server {
        /// Base URL that answered.
        endpoint: String,
        /// HTTP status, or the code of an in-body error.
        status: u16,
        /// Delay the server asked for, if any.
        retry_after: Option<Duration>,
        /// Server's explanation.
        message: String,
    },
    /// The attempt exceeded `request_timeout_s` / `read_timeout_s` / `connect_timeout_s`.
    #[error("timed out talking to {endpoint}: {message}")]
    Timeout {
        /// Base URL being talked to.
        endpoint: String,
        /// Which limit was hit.
        message: String,
    },
    /// Could not connect, or the connection broke before a response arrived.
    #[error("connection to {endpoint} failed: {message}")]
    Connection {
        /// Base URL being talked to.
        endpoint: String,
        /// Transport error chain.
        message: String,
    },
    /// The response body ended before `[DONE]` or a `finish_reason`.
    #[error("response from {endpoint} ended early: {message}")]
    TruncatedStream {
        /// Base URL that answered.
        endpoint: String,
        /// How it ended.
        message: String,
    },
    /// The server sent something that is not an OpenAI chat response.
    #[error("malformed response from {endpoint}: {message}")]
    Malformed {
        /// Base URL that answered.
        endpoint: String,
        /// What was wrong.
        message: String,
    },
    /// HTTP 401 (bad API key) or 403 (key not allowed here).
    #[error("{} (HTTP {status}) from {endpoint}: {message}", if *status == 401 { "bad API key" } else { "access forbidden" })]
    Auth {
        /// Base URL that answered.
        endpoint: String,
        /// 401 or 403.
        status: u16,
        /// Server's explanation.
        message: String,
    },
    /// HTTP 402: the account has run out of credit.
    #[error("insufficient balance (HTTP 402) at {endpoint}: {message}")]
    Payment {
        /// Base URL that answered.
        endpoint: String,
        /// Server's explanation.
        message: String,
    },
    /// HTTP 404: wrong base URL or unknown model.
    #[error("not found (HTTP 404) at {endpoint} (check base_url and model): {message}")]
    NotFound {
        /// Base URL that answered.
        endpoint: String,
        /// Server's explanation.
        message: String,
    },
    /// HTTP 400/422 and other 4xx: the server rejects a request parameter.
    #[error("bad request parameter (HTTP {status}) at {endpoint}: {message}")]
    BadRequest {
        /// Base URL that answered.
        endpoint: String,
        /// HTTP status.
        status: u16,
        /// Server's explanation, usually naming the parameter.
        message: String,
    },
    /// Every attempt failed with a transient error.
    #[error("gave up after {attempts} attempts: {last}")]
    RetriesExhausted {
        /// Attempts made, first one included.
        attempts: u32,
        /// Error of the final attempt.
        last: Box<TeacherError>,
    },
}

impl TeacherError {
    /// Short stable name of the cause, for storing with a failed sample. An
    /// exhausted retry reports the kind of its last error.
    pub fn kind(&self) -> &'static str {
        match self {
            TeacherError::Config(_) => "config",
            TeacherError::MissingApiKey { .. } => "missing_api_key",
            TeacherError::InvalidRequest(_) => "invalid_request",
            TeacherError::RateLimited { .. } => "rate_limited",
            TeacherError::Server { .. } => "server_error",
            TeacherError::Timeout { .. } => "timeout",
            TeacherError::Connection { .. } => "connection",
            TeacherError::TruncatedStream { .. } => "truncated_stream",
            TeacherError::Malformed { .. } => "malformed",
            TeacherError::Auth { .. } => "auth",
            TeacherError::Payment { .. } => "payment",
            TeacherError::NotFound { .. } => "not_found",
            TeacherError::BadRequest { .. } => "bad_request",
            TeacherError::RetriesExhausted { last, .. } => last.kind(),
        }
    }

    /// Whether the cause is transient, so the same request may succeed later.
    /// True for an exhausted retry of a transient error: a later run may retry it,
    /// while non-retryable errors need a config or request change.
    pub fn is_retryable(&self) -> bool {
        match self {
            TeacherError::RateLimited { .. }
            | TeacherError::Server { .. }
            | TeacherError::Timeout { .. }
            | TeacherError::Connection { .. }
            | TeacherError::TruncatedStream { .. }
            | TeacherError::Malformed { .. } => true,
            TeacherError::RetriesExhausted { last, .. } => last.is_retryable(),
            _ => false,
        }
    }

    /// Delay the server asked for with `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TeacherError::RateLimited { retry_after, .. }
            | TeacherError::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// HTTP attempts behind this error (1 unless retries were exhausted).
    pub fn attempts(&self) -> u32 {
        match self {
            TeacherError::RetriesExhausted { attempts, .. } => *attempts,
            TeacherError::Config(_)
            | TeacherError::MissingApiKey { .. }
            | TeacherError::InvalidRequest(_) => 0,
            _ => 1,
        }
    }

    /// Whether the endpoint, rather than the request or the account, is at fault;
    /// such failures count towards resting the endpoint.
    pub(crate) fn blames_endpoint(&self) -> bool {
        matches!(
            self,
            TeacherError::Server { .. }
                | TeacherError::Timeout { .. }
                | TeacherError::Connection { .. }
                | TeacherError::TruncatedStream { .. }
                | TeacherError::Malformed { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_retryability() {
        let ep = || "http://h/v1".to_string();
        let m = || "m".to_string();
        let cases: Vec<(TeacherError, &str, bool)> = vec![
            (
                TeacherError::RateLimited {
                    endpoint: ep(),
                    retry_after: None,
                    message: m(),
                },
                "rate_limited",
                true,
            ),
            (
                TeacherError::Server {
                    endpoint: ep(),
                    status: 503,
                    retry_after: None,
                    message: m(),
                },
                "server_error",
                true,
            ),
            (
                TeacherError::Timeout {
                    endpoint: ep(),
                    message: m(),
                },
                "timeout",
                true,
            ),
            (
                TeacherError::Connection {
                    endpoint: ep(),
                    message: m(),
                },
                "connection",
                true,
            ),
            (
                TeacherError::TruncatedStream {
                    endpoint: ep(),
                    message: m(),
                },
                "truncated_stream",
                true,
            ),
            (
                TeacherError::Malformed {
                    endpoint: ep(),
                    message: m(),
                },
                "malformed",
                true,
            ),
            (
                TeacherError::Auth {
                    endpoint: ep(),
                    status: 401,
                    message: m(),
                },
                "auth",
                false,
            ),
            (
                TeacherError::Payment {
                    endpoint: ep(),
                    message: m(),
                },
                "payment",
                false,
            ),
            (
                TeacherError::NotFound {
                    endpoint: ep(),
                    message: m(),
                },
                "not_found",
                false,
            ),
            (
                TeacherError::BadRequest {
                    endpoint: ep(),
                    status: 422,
                    message: m(),
                },
                "bad_request",
                false,
            ),
            (
                TeacherError::MissingApiKey { var: "X".into() },
                "missing_api_key",
                false,
            ),
        ];
        for (e, kind, retry) in cases {
            assert_eq!(e.kind(), kind, "{e}");
            assert_eq!(e.is_retryable(), retry, "{e}");
        }
        let ex = TeacherError::RetriesExhausted {
            attempts: 3,
            last: Box::new(TeacherError::Timeout {
                endpoint: ep(),
                message: m(),
            }),
        };
        assert_eq!(
            (ex.kind(), ex.is_retryable(), ex.attempts()),
            ("timeout", true, 3)
        );
    }

    #[test]
    fn auth_display_names_the_cause() {
        let e = TeacherError::Auth {
            endpoint: "http://h/v1".into(),
            status: 401,
            message: "nope".into(),
        };
        assert!(e.to_string().starts_with("bad API key (HTTP 401)"), "{e}");
        let e = TeacherError::Payment {
            endpoint: "http://h/v1".into(),
            message: "empty".into(),
        };
        assert!(e.to_string().contains("insufficient balance"));
    }
}
