//! Fault handling: transient faults are retried with exact attempt counts,
//! permanent ones fail at once with the right kind and message.

mod common;

use std::time::{Duration, Instant};

use common::{client, fake, fast_config};
use distill_fake_teacher::{FakeConfig, Fault, ReplyInput, When, default_reply};
use distill_teacher::{ChatModel, ChatRequest, TeacherError};

const PROMPT: &str = "Find x.";

fn expected_reasoning() -> String {
    default_reply(&ReplyInput {
        prompt: PROMPT,
        choice: 0,
        seed: None,
    })
    .reasoning
}

#[tokio::test]
async fn transient_faults_are_retried_until_success() {
    let faults = [
        Fault::RateLimited { retry_after: None },
        Fault::ServerError { status: 500 },
        Fault::ServerError { status: 503 },
        Fault::DropMidStream,
        Fault::EndWithoutDone,
        Fault::MalformedJson,
    ];
    for fault in faults {
        for stream in [true, false] {
            let label = fault.label();
            let server = fake(FakeConfig::default().fault(When::FirstN(2), fault.clone())).await;
            let mut cfg = fast_config(server.url());
            cfg.stream = stream;
            let c = client(cfg);
            let out = c
                .chat(&ChatRequest::user(PROMPT))
                .await
                .unwrap_or_else(|e| panic!("{label} stream={stream}: {e}"));
            assert_eq!(out[0].reasoning, expected_reasoning(), "{label}");
            assert_eq!(out[0].attempts, 3, "{label} stream={stream}");
            let stats = server.stats();
            assert_eq!(stats.requests, 3, "{label} stream={stream}");
            assert_eq!(stats.faults[&label], 2, "{label}");
            assert_eq!(stats.completions, 1, "{label}");
            let cs = c.stats();
            assert_eq!(
                (cs.attempts, cs.retries, cs.successes, cs.failures),
                (3, 2, 1, 2),
                "{label}"
            );
        }
    }
}

#[tokio::test]
async fn each_transient_fault_has_its_kind_when_retries_run_out() {
    let cases = [
        (Fault::RateLimited { retry_after: None }, "rate_limited"),
        (Fault::ServerError { status: 503 }, "server_error"),
        (Fault::DropMidStream, "truncated_stream"),
        (Fault::EndWithoutDone, "truncated_stream"),
        (Fault::MalformedJson, "malformed"),
        (Fault::Delay(Duration::from_secs(5)), "timeout"),
    ];
    for (fault, kind) in cases {
        let server = fake(FakeConfig::default().fault(When::Always, fault)).await;
        let mut cfg = fast_config(server.url());
        cfg.max_retries = 2;
        cfg.request_timeout_s = 0.2;
        let err = client(cfg)
            .chat(&ChatRequest::user(PROMPT))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TeacherError::RetriesExhausted { attempts: 3, .. }),
            "{err}"
        );
        assert_eq!(err.kind(), kind, "{err}");
        assert!(err.is_retryable());
        assert!(
            err.to_string().starts_with("gave up after 3 attempts: "),
            "{err}"
        );
        assert_eq!(server.stats().requests, 3, "{kind}");
    }
}

#[tokio::test]
async fn permanent_errors_fail_at_once_naming_the_cause() {
    let cases = [
        (Fault::unauthorized(), "auth", "bad API key (HTTP 401)"),
        (
            Fault::Status {
                status: 403,
                message: "region".into(),
            },
            "auth",
            "access forbidden (HTTP 403)",
        ),
        (
            Fault::insufficient_balance(),
            "payment",
            "insufficient balance (HTTP 402)",
        ),
        (
            Fault::bad_request("max_tokens must be <= 8192"),
            "bad_request",
            "bad request parameter (HTTP 400)",
        ),
        (
            Fault::Status {
                status: 422,
                message: "temperature out of range".into(),
            },
            "bad_request",
            "HTTP 422",
        ),
        (
            Fault::Status {
                status: 404,
                message: "Model Not Exist".into(),
            },
            "not_found",
            "not found (HTTP 404)",
        ),
    ];
    for (fault, kind, phrase) in cases {
        let message = match &fault {
            Fault::Status { message, .. } => message.clone(),
            _ => unreachable!(),
        };
        for stream in [true, false] {
            let server = fake(FakeConfig::default().fault(When::Always, fault.clone())).await;
            let mut cfg = fast_config(server.url());
            cfg.stream = stream;
            let err = client(cfg)
                .chat(&ChatRequest::user(PROMPT))
                .await
                .unwrap_err();
            assert_eq!(err.kind(), kind, "{err}");
            assert!(!err.is_retryable());
            assert_eq!(err.attempts(), 1);
            let text = err.to_string();
            assert!(text.contains(phrase) && text.contains(&message), "{text}");
            assert_eq!(server.stats().requests, 1);
        }
    }
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let server = fake(FakeConfig::default().fault(
        When::Request(1),
        Fault::RateLimited {
            retry_after: Some(Duration::from_secs(1)),
        },
    ))
    .await;
    let mut cfg = fast_config(server.url());
    cfg.retry_max_delay_s = 5.0;
    let start = Instant::now();
    let out = client(cfg).chat(&ChatRequest::user(PROMPT)).await.unwrap();
    let elapsed = start.elapsed();
    assert_eq!(out[0].attempts, 2);
    assert!(
        elapsed >= Duration::from_secs(1),
        "retried after {elapsed:?}, before Retry-After"
    );
    assert_eq!(server.stats().faults["rate_limited"], 1);
}

#[tokio::test]
async fn slow_response_times_out_and_is_retried() {
    let server =
        fake(FakeConfig::default().fault(When::Request(1), Fault::Delay(Duration::from_secs(3))))
            .await;
    let mut cfg = fast_config(server.url());
    cfg.request_timeout_s = 0.3;
    let out = client(cfg).chat(&ChatRequest::user(PROMPT)).await.unwrap();
    assert_eq!(out[0].attempts, 2);
    assert_eq!(server.stats().requests, 2);
}

#[tokio::test]
async fn stalled_stream_hits_read_timeout() {
    let server = fake(FakeConfig::default().fault(
        When::Request(1),
        Fault::StallMidStream(Duration::from_secs(3)),
    ))
    .await;
    let mut cfg = fast_config(server.url());
    cfg.read_timeout_s = Some(0.3);
    let c = client(cfg);
    let out = c.chat(&ChatRequest::user(PROMPT)).await.unwrap();
    assert_eq!(out[0].attempts, 2);
    assert_eq!(out[0].reasoning, expected_reasoning());
}

#[tokio::test]
async fn stall_shorter_than_timeouts_is_fine() {
    let server = fake(FakeConfig::default().fault(
        When::Always,
        Fault::StallMidStream(Duration::from_millis(100)),
    ))
    .await;
    for stream in [true, false] {
        let mut cfg = fast_config(server.url());
        cfg.stream = stream;
        cfg.read_timeout_s = Some(2.0);
        let out = client(cfg).chat(&ChatRequest::user(PROMPT)).await.unwrap();
        assert_eq!(
            (out[0].attempts, out[0].reasoning.clone()),
            (1, expected_reasoning())
        );
    }
}

#[tokio::test]
async fn every_nth_fault_schedule_with_concurrency() {
    let server =
        fake(FakeConfig::default().fault(When::EveryNth(4), Fault::ServerError { status: 502 }))
            .await;
    let mut cfg = fast_config(server.url());
    // Enough retries that no request can run out, whichever arrivals it lands on.
    cfg.max_retries = 20;
    let c = client(cfg);
    let reqs: Vec<_> = (0..40)
        .map(|i| ChatRequest::user(format!("q{i}")))
        .collect();
    let outs = futures::future::join_all(reqs.iter().map(|r| c.chat(r))).await;
    assert!(outs.iter().all(Result::is_ok));
    let stats = server.stats();
    // Every 4th arrival fails and is retried, so 40 successes need k requests
    // with k - floor(k/4) = 40.
    assert_eq!(stats.completions, 40);
    assert_eq!(stats.requests, 53);
    assert_eq!(stats.faults["server_error_502"], 13);
    assert_eq!(c.stats().retries, 13);
}
