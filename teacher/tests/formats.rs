//! Reasoning formats, streaming and not, `n`, usage and request bodies against the fake server.

mod common;

use common::{client, fake, fast_config};
use distill_fake_teacher::{
    FakeConfig, Fault, ReasoningFormat, Reply, ReplyInput, When, approx_tokens, default_reply,
};
use distill_teacher::{ChatModel, ChatRequest, Completion, TeacherError};

const PROMPT: &str = "What is 2+2?";

const FORMATS: [ReasoningFormat; 5] = [
    ReasoningFormat::ReasoningContent,
    ReasoningFormat::Reasoning,
    ReasoningFormat::InlineThink,
    ReasoningFormat::InlineThinkNoOpen,
    ReasoningFormat::Plain,
];

fn input(choice: u32, seed: Option<u64>) -> ReplyInput<'static> {
    ReplyInput {
        prompt: PROMPT,
        choice,
        seed,
    }
}

fn assert_reply(c: &Completion, expected: &Reply, format: ReasoningFormat) {
    let reasoning = if format == ReasoningFormat::Plain {
        ""
    } else {
        expected.reasoning.trim()
    };
    assert_eq!(c.reasoning, reasoning, "{format:?}");
    assert_eq!(c.answer, expected.answer, "{format:?}");
}

#[tokio::test]
async fn every_format_streamed_and_not() {
    for format in FORMATS {
        for stream in [true, false] {
            let server = fake(FakeConfig::default().format(format)).await;
            let mut cfg = fast_config(server.url());
            cfg.stream = stream;
            let out = client(cfg).chat(&ChatRequest::user(PROMPT)).await.unwrap();
            assert_eq!(out.len(), 1);
            let c = &out[0];
            let expected = default_reply(&input(0, None));
            assert_reply(c, &expected, format);
            assert_eq!(c.index, 0);
            assert_eq!(c.finish_reason.as_deref(), Some("stop"));
            assert_eq!(c.prompt_tokens, Some(approx_tokens(PROMPT)));
            let r_tokens = approx_tokens(&expected.reasoning);
            assert_eq!(
                c.completion_tokens,
                Some(r_tokens + approx_tokens(&expected.answer))
            );
            assert_eq!(c.reasoning_tokens, Some(r_tokens));
            assert_eq!(c.model.as_deref(), Some("fake-r1"));
            assert_eq!(c.system_fingerprint.as_deref(), Some("fp_fake"));
            assert_eq!(c.endpoint, server.url());
            assert_eq!(c.attempts, 1);
            assert_eq!(
                c.first_token_ms.is_some(),
                stream,
                "{format:?} stream={stream}"
            );
            let stats = server.stats();
            assert_eq!(
                (stats.requests, stats.responses, stats.completions),
                (1, 1, 1)
            );
        }
    }
}

#[tokio::test]
async fn large_responses_in_many_or_few_chunks() {
    for (chunks, format) in [
        (1, ReasoningFormat::InlineThink),
        (700, ReasoningFormat::ReasoningContent),
    ] {
        let config = FakeConfig::default()
            .format(format)
            .response_bytes(16 * 1024)
            .chunks(chunks);
        let expected = config.reply(&input(0, None));
        assert_eq!(expected.reasoning.len() + expected.answer.len(), 16 * 1024);
        let server = fake(config).await;
        let out = client(fast_config(server.url()))
            .chat(&ChatRequest::user(PROMPT))
            .await
            .unwrap();
        assert_reply(&out[0], &expected, format);
    }
}

#[tokio::test]
async fn n_choices_come_back_in_index_order() {
    for format in [
        ReasoningFormat::Reasoning,
        ReasoningFormat::InlineThinkNoOpen,
    ] {
        for stream in [true, false] {
            let server = fake(FakeConfig::default().format(format).chunks(5)).await;
            let mut cfg = fast_config(server.url());
            cfg.stream = stream;
            let req = ChatRequest {
                n: 3,
                ..ChatRequest::user(PROMPT)
            };
            let out = client(cfg).chat(&req).await.unwrap();
            assert_eq!(out.len(), 3);
            for (i, c) in out.iter().enumerate() {
                assert_eq!(c.index, i as u32);
                assert_reply(c, &default_reply(&input(i as u32, None)), format);
                assert_eq!(c.prompt_tokens, Some(approx_tokens(PROMPT)));
                assert!(c.completion_tokens.is_some_and(|t| t > 0));
            }
            // Usage is one total over the choices: shared out, it still sums to it.
            let total: u32 = (0..3u32)
                .map(|i| {
                    let r = default_reply(&input(i, None));
                    approx_tokens(&r.reasoning) + approx_tokens(&r.answer)
                })
                .sum();
            let shared: u32 = out.iter().filter_map(|c| c.completion_tokens).sum();
            assert!(shared.abs_diff(total) <= 3, "{shared} vs {total}");
            let stats = server.stats();
            assert_eq!((stats.requests, stats.completions), (1, 3));
        }
    }
}

#[tokio::test]
async fn without_n_support_each_choice_is_its_own_request_with_offset_seed() {
    let server = fake(FakeConfig::default().supports_n(false).record_requests()).await;
    let mut cfg = fast_config(server.url());
    cfg.supports_n = false;
    let c = client(cfg);
    let req = ChatRequest {
        n: 3,
        seed: Some(5),
        ..ChatRequest::user(PROMPT)
    };
    let out = c.chat(&req).await.unwrap();
    assert_eq!(out.len(), 3);
    for (i, comp) in out.iter().enumerate() {
        assert_eq!(comp.index, i as u32);
        let expected = default_reply(&input(0, Some(5 + i as u64)));
        assert_eq!(comp.reasoning, expected.reasoning);
        assert!(
            comp.completion_tokens.is_some(),
            "single-choice usage is exact"
        );
    }
    assert_eq!(server.stats().requests, 3);
    let mut bodies: Vec<_> = server.requests().into_iter().map(|r| r.body).collect();
    bodies.sort_by_key(|b| b["seed"].as_u64());
    let expected: Vec<_> = (0..3).map(|i| c.request_body(&req.single(i))).collect();
    assert_eq!(bodies, expected);
    assert!(bodies.iter().all(|b| b.get("n").is_none()));
}

#[tokio::test]
async fn n_sent_to_a_server_without_n_support_is_a_bad_request() {
    let server = fake(FakeConfig::default().supports_n(false)).await;
    let err = client(fast_config(server.url()))
        .chat(&ChatRequest {
            n: 2,
            ..ChatRequest::user(PROMPT)
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "bad_request");
    assert!(!err.is_retryable());
    let msg = err.to_string();
    assert!(
        msg.contains("bad request parameter (HTTP 400)") && msg.contains("invalid n"),
        "{msg}"
    );
    assert_eq!(server.stats().requests, 1);
}

#[tokio::test]
async fn request_body_is_exactly_what_is_sent() {
    let server = fake(
        FakeConfig::default()
            .api_key("sk-body-test")
            .record_requests(),
    )
    .await;
    let mut cfg = fast_config(server.url());
    cfg.extra_body.insert("top_k".into(), 20.into());
    let c = distill_teacher::OpenAiClient::with_api_key(cfg, Some("sk-body-test".into())).unwrap();
    let req = ChatRequest {
        temperature: Some(0.6),
        top_p: Some(0.95),
        max_tokens: Some(512),
        seed: Some(1),
        stop: vec!["<|end|>".into()],
        ..ChatRequest::user(PROMPT)
    };
    c.chat(&req).await.unwrap();
    let seen = server.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, c.request_body(&req));
    assert_eq!(seen[0].body["stream_options"]["include_usage"], true);
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer sk-body-test")
    );
    assert!(!seen[0].body.to_string().contains("sk-body-test"));
}

#[tokio::test]
async fn keep_alives_and_blank_lines_are_tolerated() {
    for stream in [true, false] {
        let server = fake(FakeConfig::default().fault(When::Always, Fault::KeepAlive)).await;
        let mut cfg = fast_config(server.url());
        cfg.stream = stream;
        let out = client(cfg).chat(&ChatRequest::user(PROMPT)).await.unwrap();
        assert_reply(
            &out[0],
            &default_reply(&input(0, None)),
            ReasoningFormat::ReasoningContent,
        );
        assert_eq!(out[0].attempts, 1);
        let stats = server.stats();
        assert_eq!((stats.faults["keep_alive"], stats.completions), (1, 1));
    }
}

#[tokio::test]
async fn length_cut_keeps_partial_reasoning_and_is_not_retried() {
    for format in [
        ReasoningFormat::ReasoningContent,
        ReasoningFormat::InlineThink,
    ] {
        for stream in [true, false] {
            let server = fake(
                FakeConfig::default()
                    .format(format)
                    .fault(When::Always, Fault::FinishLength),
            )
            .await;
            let mut cfg = fast_config(server.url());
            cfg.stream = stream;
            let out = client(cfg).chat(&ChatRequest::user(PROMPT)).await.unwrap();
            let full = default_reply(&input(0, None)).reasoning;
            let c = &out[0];
            assert!(c.is_truncated());
            assert_eq!(c.reasoning, full[..full.len() / 2].trim(), "{format:?}");
            assert_eq!(c.answer, "");
            assert_eq!(server.stats().requests, 1);
        }
    }
}

#[tokio::test]
async fn table_responder_and_reported_model() {
    let reply = Reply {
        reasoning: "Add: 2+2=4.".into(),
        answer: "\\boxed{4}".into(),
    };
    let server = fake(
        FakeConfig::default()
            .format(ReasoningFormat::InlineThinkNoOpen)
            .table([(PROMPT.to_string(), reply.clone())])
            .model("deepseek-reasoner-0528"),
    )
    .await;
    let out = client(fast_config(server.url()))
        .chat(&ChatRequest::user(PROMPT))
        .await
        .unwrap();
    assert_eq!(
        (out[0].reasoning.as_str(), out[0].answer.as_str()),
        ("Add: 2+2=4.", "\\boxed{4}")
    );
    assert_eq!(out[0].model.as_deref(), Some("deepseek-reasoner-0528"));
}

#[tokio::test]
async fn invalid_requests_are_refused_locally() {
    let server = fake(FakeConfig::default()).await;
    let c = client(fast_config(server.url()));
    let err = c
        .chat(&ChatRequest {
            n: 0,
            ..ChatRequest::user(PROMPT)
        })
        .await
        .unwrap_err();
    assert!(matches!(err, TeacherError::InvalidRequest(_)));
    assert_eq!(server.stats().requests, 0);
}
