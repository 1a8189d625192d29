//! Client throughput against a zero-latency fake server (in-process by default,
//! or any OpenAI-compatible URL), to check the client is never the bottleneck.
//!
//! `cargo run --release -p distill-teacher --example throughput -- [samples] [concurrency] [bytes] [chunks] [url]`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use distill_fake_teacher::{FakeConfig, FakeTeacher};
use distill_teacher::{ChatModel, ChatRequest, OpenAiClient, TeacherConfig};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (samples, concurrency, bytes, chunks) =
        (arg(0, 20_000), arg(1, 256), arg(2, 16_384), arg(3, 64));
    let stream = std::env::var("STREAM").map_or(true, |v| v != "0");
    let (_server, url) = match args.get(4) {
        Some(url) => (None, url.clone()),
        None => {
            let s = FakeTeacher::start(FakeConfig::default().response_bytes(bytes).chunks(chunks))
                .await
                .expect("fake starts");
            let url = s.url();
            (Some(s), url)
        }
    };
    let mut cfg = TeacherConfig::new(url.as_str(), "fake-r1");
    cfg.max_concurrency = concurrency;
    cfg.stream = stream;
    let client = Arc::new(OpenAiClient::with_api_key(cfg, None).expect("client"));

    // Warm the connection pool so the measurement is steady state.
    let next = Arc::new(AtomicUsize::new(0));
    let run = |total: usize| {
        let next = next.clone();
        let client = client.clone();
        async move {
            next.store(0, Ordering::SeqCst);
            let workers: Vec<_> = (0..concurrency)
                .map(|_| {
                    let next = next.clone();
                    let client = client.clone();
                    tokio::spawn(async move {
                        let mut received = 0usize;
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= total {
                                return received;
                            }
                            let out = client
                                .chat(&ChatRequest::user(format!(
                                    "Problem {i}: what is {i} squared?"
                                )))
                                .await
                                .expect("chat succeeds");
                            received += out[0].reasoning.len() + out[0].answer.len();
                        }
                    })
                })
                .collect();
            let mut received = 0;
            for w in workers {
                received += w.await.unwrap();
            }
            received
        }
    };
    run(concurrency * 2).await;
    let start = Instant::now();
    let received = run(samples).await;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{samples} samples of ~{bytes} B in {chunks} chunks (stream={stream}) at concurrency {concurrency}: \
         {:.0} samples/s, {:.1} MB/s of text, {:.2}s",
        samples as f64 / secs,
        received as f64 / secs / 1e6,
        secs
    );
}
