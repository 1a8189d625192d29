//! Request and token budgets, checked by counting what the server saw.

mod common;

use std::time::{Duration, Instant};

use common::{client, fake, fast_config};
use distill_fake_teacher::FakeConfig;
use distill_teacher::{ChatModel, ChatRequest};

#[tokio::test]
async fn requests_per_minute_paces_a_burst() {
    let server = fake(FakeConfig::default()).await;
    let mut cfg = fast_config(server.url());
    cfg.requests_per_minute = Some(600); // 10/s after a burst of 10
    let c = client(cfg);
    let start = Instant::now();
    let reqs: Vec<_> = (0..25)
        .map(|i| ChatRequest::user(format!("q{i}")))
        .collect();
    let all = futures::future::join_all(reqs.iter().map(|r| c.chat(r)));
    tokio::pin!(all);
    // Sample the server while the burst is running.
    let mut samples = Vec::new();
    let outs = loop {
        tokio::select! {
            outs = &mut all => break outs,
            _ = tokio::time::sleep(Duration::from_millis(150)) => {
                let seen = server.stats().requests;
                samples.push((seen, start.elapsed()));
            }
        }
    };
    let total = start.elapsed();
    assert!(outs.iter().all(Result::is_ok));
    assert_eq!(server.stats().requests, 25);
    for (seen, at) in &samples {
        // Never more than the burst plus what the rate allowed by then.
        let allowed = 10.0 + 10.0 * at.as_secs_f64() + 1.0;
        assert!((*seen as f64) <= allowed, "{seen} requests by {at:?}");
    }
    assert!(samples.len() >= 3, "burst finished too fast: {samples:?}");
    assert!(
        total >= Duration::from_millis(1400),
        "25 requests at 10/s after 10 took {total:?}"
    );
}

#[tokio::test]
async fn token_budget_is_refunded_from_reported_usage() {
    let server = fake(FakeConfig::default()).await;
    let mut cfg = fast_config(server.url());
    // 100 tokens/s, bucket of 100. Each request reserves max_tokens = 1000, but
    // uses ~10, so without the refund three sequential requests need ~20 s.
    cfg.tokens_per_minute = Some(6000);
    let c = client(cfg);
    let start = Instant::now();
    for i in 0..3 {
        let req = ChatRequest {
            max_tokens: Some(1000),
            ..ChatRequest::user(format!("q{i}"))
        };
        c.chat(&req).await.unwrap();
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "usage was not refunded: {took:?}"
    );
    // The refund leaves the bucket below full, so requests after the first wait a little.
    assert!(
        took >= Duration::from_millis(100),
        "token budget not applied: {took:?}"
    );
}
