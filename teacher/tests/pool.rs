//! Endpoint pools: failover, resting, recovery, balancing and per-endpoint limits.

mod common;

use std::time::Duration;

use common::{client, closed_url, fake, fast_config};
use distill_fake_teacher::{FakeConfig, Fault, When};
use distill_teacher::{BaseUrls, ChatModel, ChatRequest};

#[tokio::test]
async fn dead_endpoint_fails_over_and_is_rested() {
    let server = fake(FakeConfig::default()).await;
    let dead = closed_url();
    let cfg = fast_config(BaseUrls::Many(vec![dead.clone(), server.url()]));
    let c = client(cfg);
    for i in 0..30 {
        let out = c.chat(&ChatRequest::user(format!("q{i}"))).await.unwrap();
        assert_eq!(out[0].endpoint, server.url());
    }
    let stats = c.stats();
    let (d, live) = (&stats.endpoints[0], &stats.endpoints[1]);
    assert_eq!(d.url, dead);
    // Exactly `failover_after` failures reach the dead endpoint; then it rests.
    assert_eq!(
        (d.failures, d.successes, d.consecutive_failures, d.rests),
        (3, 0, 3, 1)
    );
    assert!(d.resting_for.is_some_and(|r| r > Duration::from_secs(50)));
    assert_eq!((live.successes, live.failures), (30, 0));
    assert_eq!(server.stats().requests, 30);
    assert_eq!(stats.retries, 3);
}

#[tokio::test]
async fn rested_endpoint_is_tried_again_and_recovers() {
    let flaky =
        fake(FakeConfig::default().fault(When::FirstN(3), Fault::ServerError { status: 500 }))
            .await;
    let healthy = fake(FakeConfig::default()).await;
    let mut cfg = fast_config(BaseUrls::Many(vec![flaky.url(), healthy.url()]));
    cfg.rest_s = 0.2;
    let c = client(cfg);
    let mut i = 0;
    while c.stats().endpoints[0].rests == 0 {
        c.chat(&ChatRequest::user(format!("q{i}"))).await.unwrap();
        i += 1;
        assert!(i < 50, "flaky endpoint never rested");
    }
    assert_eq!(flaky.stats().faults["server_error_500"], 3);
    tokio::time::sleep(Duration::from_millis(250)).await;
    for j in 0..10 {
        c.chat(&ChatRequest::user(format!("r{j}"))).await.unwrap();
    }
    let s = &c.stats().endpoints[0];
    assert!(s.successes > 0, "rested endpoint was never retried: {s:?}");
    assert_eq!(
        (s.consecutive_failures, s.rests, s.resting_for),
        (0, 0, None),
        "success clears its record"
    );
    assert!(flaky.stats().completions > 0);
}

#[tokio::test]
async fn rests_grow_while_an_endpoint_stays_down() {
    let mut cfg = fast_config(closed_url());
    cfg.failover_after = 1;
    cfg.rest_s = 0.001;
    cfg.max_retries = 4;
    let c = client(cfg);
    let err = c.chat(&ChatRequest::user("q")).await.unwrap_err();
    assert_eq!(err.kind(), "connection");
    assert_eq!(err.attempts(), 5);
    let s = &c.stats().endpoints[0];
    assert_eq!((s.failures, s.consecutive_failures), (5, 5));
    assert!(
        s.rests >= 2,
        "each failure after a rest rests it again: {s:?}"
    );
}

#[tokio::test]
async fn all_endpoints_down_is_a_connection_error() {
    let c = client(fast_config(BaseUrls::Many(vec![
        closed_url(),
        closed_url(),
    ])));
    let err = c.chat(&ChatRequest::user("q")).await.unwrap_err();
    assert_eq!(err.kind(), "connection");
    assert!(err.is_retryable());
    assert_eq!(err.attempts(), 4);
}

#[tokio::test]
async fn concurrency_is_bounded_per_endpoint() {
    let server = fake(FakeConfig::default().latency(Duration::from_millis(100))).await;
    let mut cfg = fast_config(server.url());
    cfg.max_concurrency = 2;
    let c = client(cfg);
    let reqs: Vec<_> = (0..8).map(|i| ChatRequest::user(format!("q{i}"))).collect();
    let outs = futures::future::join_all(reqs.iter().map(|r| c.chat(r))).await;
    assert!(outs.iter().all(Result::is_ok));
    assert_eq!(server.stats().max_in_flight, 2);
}

#[tokio::test]
async fn load_is_spread_over_replicas() {
    let a = fake(FakeConfig::default().latency(Duration::from_millis(20))).await;
    let b = fake(FakeConfig::default().latency(Duration::from_millis(20))).await;
    let c = client(fast_config(BaseUrls::Many(vec![a.url(), b.url()])));
    let reqs: Vec<_> = (0..40)
        .map(|i| ChatRequest::user(format!("q{i}")))
        .collect();
    let outs = futures::future::join_all(reqs.iter().map(|r| c.chat(r))).await;
    assert!(outs.iter().all(Result::is_ok));
    let (na, nb) = (a.stats().completions, b.stats().completions);
    assert_eq!(na + nb, 40);
    assert!(na >= 15 && nb >= 15, "unbalanced: {na} vs {nb}");
}

#[tokio::test]
async fn server_shut_down_mid_run_fails_over() {
    let a = fake(FakeConfig::default()).await;
    let b = fake(FakeConfig::default()).await;
    let c = client(fast_config(BaseUrls::Many(vec![a.url(), b.url()])));
    for i in 0..4 {
        c.chat(&ChatRequest::user(format!("q{i}"))).await.unwrap();
    }
    assert!(a.stats().completions > 0 && b.stats().completions > 0);
    let a_url = a.url();
    a.shutdown().await;
    for i in 0..10 {
        let out = c.chat(&ChatRequest::user(format!("r{i}"))).await.unwrap();
        assert_ne!(out[0].endpoint, a_url);
    }
}
