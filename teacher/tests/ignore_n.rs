//! A server that ignores `n` (answering `n > 1` with one choice, as `transformers
//! serve` does) is detected on its first answer and sent one request per sample,
//! with no sample lost, none paid for twice and nothing retried.

mod common;

use common::{Captured, client, fake, fast_config};
use distill_fake_teacher::{FakeConfig, ReplyInput, approx_tokens, default_reply};
use distill_teacher::{BaseUrls, ChatModel, ChatRequest};

const PROMPT: &str = "What is 2 + 2?";
const WARNING: &str = "ignores `n`";

#[tokio::test(flavor = "current_thread")]
async fn a_server_ignoring_n_gets_one_request_per_sample_after_its_first_answer() {
    // Streamed with and without `[DONE]` (`transformers serve` sends none), and not.
    for (stream, done) in [(true, false), (true, true), (false, true)] {
        let what = format!("stream = {stream}, [DONE] = {done}");
        let logs = Captured::default();
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let mut fc = FakeConfig::default().ignore_n().record_requests();
        if !done {
            fc = fc.without_done();
        }
        let server = fake(fc).await;
        let mut cfg = fast_config(server.url());
        cfg.stream = stream;
        let c = client(cfg);
        let req = ChatRequest {
            n: 3,
            seed: Some(5),
            ..ChatRequest::user(PROMPT)
        };

        for round in 0..2 {
            let out = c.chat(&req).await.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(out.len(), 3, "{what}");
            for (i, comp) in out.iter().enumerate() {
                assert_eq!(comp.index, i as u32, "{what}");
                // Choice i is the fake's only choice for seed 5 + i: choice 0 from the
                // request with `n`, the others from single requests.
                let expected = default_reply(&ReplyInput {
                    prompt: PROMPT,
                    choice: 0,
                    seed: Some(5 + i as u64),
                });
                assert_eq!(comp.reasoning, expected.reasoning, "{what} #{i}");
                assert_eq!(comp.answer, expected.answer, "{what} #{i}");
                assert_eq!(comp.attempts, 1, "{what} #{i}");
                // Each response carried one choice, so its usage is that choice's own.
                assert_eq!(
                    comp.completion_tokens,
                    Some(approx_tokens(&expected.reasoning) + approx_tokens(&expected.answer)),
                    "{what} #{i}"
                );
                assert_eq!(
                    comp.reasoning_tokens,
                    Some(approx_tokens(&expected.reasoning)),
                    "{what} #{i}"
                );
            }
            let bodies: Vec<_> = server.requests().into_iter().map(|r| r.body).collect();
            if round == 0 {
                // The request with `n` was answered once and its choice kept; only the
                // two missing choices were asked for again.
                assert_eq!(bodies.len(), 3, "{what}");
                assert_eq!(bodies[0], c.request_body(&req), "{what}");
                let mut rest = bodies[1..].to_vec();
                rest.sort_by_key(|b| b["seed"].as_u64());
                let singles: Vec<_> = (1..3).map(|i| c.request_body(&req.single(i))).collect();
                assert_eq!(rest, singles, "{what}");
            } else {
                // Known now: no more `n` is sent to it.
                assert_eq!(bodies.len(), 6, "{what}");
                assert!(bodies[3..].iter().all(|b| b.get("n").is_none()), "{what}");
            }
        }
        let stats = c.stats();
        assert_eq!(
            (stats.attempts, stats.retries, stats.failures),
            (6, 0, 0),
            "{what}"
        );
        assert!(stats.endpoints[0].ignores_n, "{what}");
        assert_eq!(c.endpoints_without_n(), vec![server.url()], "{what}");
        let log = logs.text();
        assert_eq!(log.matches(WARNING).count(), 1, "{what}: said once: {log}");
        assert!(log.contains("supports_n = false"), "{what}: {log}");
        assert!(!log.contains("retrying"), "{what}: {log}");
        server.shutdown().await;
    }
}

#[tokio::test]
async fn in_a_mixed_pool_only_the_endpoint_ignoring_n_is_marked() {
    let honours = fake(FakeConfig::default()).await;
    let ignores = fake(FakeConfig::default().ignore_n().without_done()).await;
    let c = client(fast_config(BaseUrls::Many(vec![
        honours.url(),
        ignores.url(),
    ])));
    let req = ChatRequest {
        n: 2,
        ..ChatRequest::user(PROMPT)
    };
    for _ in 0..6 {
        let out = c.chat(&req).await.unwrap();
        assert_eq!(out.iter().map(|c| c.index).collect::<Vec<_>>(), vec![0, 1]);
    }
    assert_eq!(c.endpoints_without_n(), vec![ignores.url()]);
    let stats = c.stats();
    assert_eq!((stats.retries, stats.failures), (0, 0));
    assert!(!stats.endpoints[0].ignores_n && stats.endpoints[1].ignores_n);
    // The endpoint that honours `n` still gets it: both of its choices per response.
    let h = honours.stats();
    assert!(h.responses > 0 && h.completions > h.responses, "{h:?}");
}

#[tokio::test]
async fn a_server_honouring_n_is_never_marked() {
    let server = fake(FakeConfig::default()).await;
    let c = client(fast_config(server.url()));
    let out = c
        .chat(&ChatRequest {
            n: 2,
            ..ChatRequest::user(PROMPT)
        })
        .await
        .unwrap();
    assert_eq!(out.len(), 2);
    assert!(c.endpoints_without_n().is_empty());
    assert_eq!(server.stats().requests, 1);
}
