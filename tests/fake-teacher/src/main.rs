//! `fake-teacher`: serves the fake R1 server on a port, for benchmarks and for
//! comparing the Rust client with Python baselines against the same server.

use std::net::IpAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use distill_fake_teacher::{FakeConfig, FakeTeacher, Fault, ReasoningFormat, When};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    ReasoningContent,
    Reasoning,
    InlineThink,
    InlineThinkNoOpen,
    Plain,
}

/// Fake OpenAI-compatible reasoning server (zero latency unless asked).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to bind (0 picks a free one and prints it).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// How reasoning is delivered.
    #[arg(long, value_enum, default_value = "reasoning-content")]
    format: Format,
    /// Bytes of reasoning plus answer per choice (padded).
    #[arg(long)]
    response_bytes: Option<usize>,
    /// Content events per choice when streaming.
    #[arg(long, default_value_t = 8)]
    chunks: usize,
    /// Reject n > 1 like the DeepSeek API.
    #[arg(long)]
    no_n: bool,
    /// Answer n > 1 with a single choice like `transformers serve`.
    #[arg(long)]
    ignore_n: bool,
    /// End streams without `data: [DONE]` like `transformers serve`.
    #[arg(long)]
    no_done: bool,
    /// Model name to report (default: echo the request's).
    #[arg(long)]
    model: Option<String>,
    /// Delay before each response, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Require this bearer key.
    #[arg(long, env = "FAKE_TEACHER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Answer every Nth request with HTTP 503, to exercise client retries.
    #[arg(long)]
    every_nth_503: Option<u64>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut config = FakeConfig {
        format: match args.format {
            Format::ReasoningContent => ReasoningFormat::ReasoningContent,
            Format::Reasoning => ReasoningFormat::Reasoning,
            Format::InlineThink => ReasoningFormat::InlineThink,
            Format::InlineThinkNoOpen => ReasoningFormat::InlineThinkNoOpen,
            Format::Plain => ReasoningFormat::Plain,
        },
        response_bytes: args.response_bytes,
        supports_n: !args.no_n,
        ignores_n: args.ignore_n,
        done: !args.no_done,
        model: args.model,
        api_key: args.api_key,
        latency: Duration::from_millis(args.latency_ms),
        host: args.host,
        port: args.port,
        ..FakeConfig::default()
    }
    .chunks(args.chunks);
    if let Some(k) = args.every_nth_503 {
        config = config.fault(When::EveryNth(k), Fault::ServerError { status: 503 });
    }
    let server = FakeTeacher::start(config).await?;
    println!("fake-teacher listening on {}", server.url());
    tokio::signal::ctrl_c().await?;
    let stats = server.stats();
    server.shutdown().await;
    eprintln!("{}", serde_json::to_string(&stats).unwrap_or_default());
    Ok(())
}
