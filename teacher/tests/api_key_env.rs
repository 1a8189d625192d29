//! Keys come from the environment variable the config names. Alone in its own
//! test binary because it mutates the process environment.

mod common;

use common::{fake, fast_config};
use distill_fake_teacher::FakeConfig;
use distill_teacher::{ChatModel, ChatRequest, OpenAiClient, TeacherError};

#[tokio::test]
async fn key_is_read_from_the_named_variable() {
    const VAR: &str = "DISTILL_TEACHER_TEST_KEY";
    const KEY: &str = "sk-from-env-42";
    let server = fake(FakeConfig::default().api_key(KEY).record_requests()).await;
    let mut cfg = fast_config(server.url());
    cfg.api_key_env = Some(VAR.into());

    let err = OpenAiClient::new(cfg.clone()).unwrap_err();
    assert!(matches!(&err, TeacherError::MissingApiKey { var } if var == VAR));
    assert!(err.to_string().contains(VAR), "{err}");
    assert_eq!(err.kind(), "missing_api_key");

    // SAFETY: this binary's only test; nothing else reads the environment concurrently.
    unsafe { std::env::set_var(VAR, "   ") };
    assert!(matches!(
        OpenAiClient::new(cfg.clone()),
        Err(TeacherError::MissingApiKey { .. })
    ));

    unsafe { std::env::set_var(VAR, format!("{KEY}\n")) };
    let c = OpenAiClient::new(cfg.clone()).unwrap();
    assert!(!format!("{c:?}").contains(KEY));
    c.chat(&ChatRequest::user("q")).await.unwrap();
    assert_eq!(
        server.requests()[0].authorization.as_deref(),
        Some("Bearer sk-from-env-42")
    );

    // A wrong key is a non-retryable auth error.
    unsafe { std::env::set_var(VAR, "sk-wrong") };
    let err = OpenAiClient::new(cfg)
        .unwrap()
        .chat(&ChatRequest::user("q"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "auth");
    assert!(err.to_string().contains("bad API key"));
    assert!(!err.to_string().contains("sk-wrong"));
    assert_eq!(server.stats().unauthorized, 1);
}
