//! API keys never appear in Debug output, errors, logs or request bodies.

mod common;

use common::{Captured, closed_url, fake, fast_config};
use distill_fake_teacher::{FakeConfig, Fault, When};
use distill_teacher::{ChatModel, ChatRequest, OpenAiClient, TeacherError};

const KEY: &str = "sk-live-0123456789abcdef";

fn assert_clean(what: &str, text: &str) {
    assert!(!text.contains(KEY), "{what} leaks the key: {text}");
    assert!(
        !text.contains("0123456789abcdef"),
        "{what} leaks part of the key: {text}"
    );
}

fn assert_error_clean(e: &TeacherError) {
    assert_clean("error Display", &e.to_string());
    assert_clean("error Debug", &format!("{e:?}"));
}

#[tokio::test(flavor = "current_thread")]
async fn key_stays_out_of_debug_errors_logs_and_bodies() {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // A server that echoes the key in its error messages, then fails for good.
    let echo = format!("your key {KEY} is rate limited");
    let server = fake(
        FakeConfig::default()
            .record_requests()
            .fault(
                When::FirstN(2),
                Fault::Status {
                    status: 503,
                    message: echo.clone(),
                },
            )
            .fault(
                When::Request(3),
                Fault::Status {
                    status: 400,
                    message: format!("bad key {KEY}"),
                },
            )
            .fault(When::Request(4), Fault::unauthorized()),
    )
    .await;
    let mut cfg = fast_config(server.url());
    cfg.api_key_env = Some("TEACHER_TEST_KEY_NOT_READ".into());
    let c = OpenAiClient::with_api_key(cfg.clone(), Some(KEY.into())).unwrap();
    assert_clean("client Debug", &format!("{c:?}"));
    assert_clean("config Debug", &format!("{cfg:?}"));
    assert!(format!("{c:?}").contains("[redacted]"));

    let req = ChatRequest::user("q");
    assert_clean("request body", &c.request_body(&req).to_string());

    // Two 503s echoing the key are retried and logged; the 400 ends it.
    let err = c.chat(&req).await.unwrap_err();
    assert_eq!(err.kind(), "bad_request");
    assert!(err.to_string().contains("bad key [redacted]"), "{err}");
    assert_error_clean(&err);
    let err = c.chat(&req).await.unwrap_err();
    assert_eq!(err.kind(), "auth");
    assert_error_clean(&err);

    let log = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("retrying"), "retries were not logged: {log}");
    assert!(log.contains("[redacted]"), "{log}");
    assert_clean("logs", &log);

    // The key went where it belongs, and only there.
    let seen = server.requests();
    assert!(
        seen.iter()
            .all(|r| r.authorization.as_deref() == Some(&format!("Bearer {KEY}")))
    );
    assert!(seen.iter().all(|r| !r.body.to_string().contains(KEY)));

    // Transport errors and exhausted retries, too.
    let mut cfg = fast_config(closed_url());
    cfg.max_retries = 1;
    let c = OpenAiClient::with_api_key(cfg, Some(KEY.into())).unwrap();
    let err = c.chat(&req).await.unwrap_err();
    assert!(matches!(err, TeacherError::RetriesExhausted { .. }));
    assert_error_clean(&err);
}

#[test]
fn invalid_key_characters_are_reported_without_the_key() {
    let err = OpenAiClient::with_api_key(
        fast_config("http://127.0.0.1:1/v1"),
        Some("sk-bad\u{7}key".into()),
    )
    .unwrap_err();
    assert_eq!(err.kind(), "config");
    assert!(!err.to_string().contains("sk-bad"), "{err}");
}
