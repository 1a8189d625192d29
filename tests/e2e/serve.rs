//! `evaluate` with `serve`: the stage starts an inference server per model folder, scores
//! through it, and stops it; failures carry the server's log; a SIGKILL of `distill` while
//! scoring leaves no server running after `distill resume`, which re-scores nothing.
//!
//! The server is this test binary run again (the ignored `fake_inference_server`), serving the
//! fake R1 server on the port the stage chose, so the tests need nothing installed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use distill_fake_teacher::{FakeConfig, FakeTeacher, Reply, ReplyInput};
use serde_json::Value;

use crate::common::*;
use crate::evaluate::{benchmark, question_number};

/// A model folder for the stage to hand to the server (the fake ignores its weights).
fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("student/tests/fixtures/parity/qwen2-tied")
}

/// Right answers for even questions, wrong for odd ones.
fn reply(input: &ReplyInput<'_>) -> Reply {
    let i = question_number(input.prompt);
    Reply {
        reasoning: format!("adding {i} to itself"),
        answer: format!("\\boxed{{{}}}", if i % 2 == 0 { 2 * i } else { -1 }),
    }
}

/// Not a test: the server the `serve` commands below start, listening on
/// `DISTILL_E2E_SERVE_PORT`. It records its pid in `DISTILL_E2E_SERVE_RECORD/PID.started`
/// and, on SIGTERM, the requests it answered in `PID.requests`.
#[test]
#[ignore = "started by the serve tests as their inference server"]
fn fake_inference_server() {
    let Ok(port) = std::env::var("DISTILL_E2E_SERVE_PORT") else {
        return;
    };
    let model = std::env::var("DISTILL_E2E_SERVE_MODEL").unwrap();
    assert!(
        Path::new(&model).join("config.json").is_file(),
        "the stage passed {model}, not a model folder"
    );
    let record = PathBuf::from(std::env::var("DISTILL_E2E_SERVE_RECORD").unwrap());
    let latency: u64 = std::env::var("DISTILL_E2E_SERVE_LATENCY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let pid = std::process::id();
    std::fs::write(record.join(format!("{pid}.started")), &model).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        let config = FakeConfig {
            port: port.parse().unwrap(),
            model: Some("served-student".into()),
            latency: Duration::from_millis(latency),
            ..FakeConfig::default()
        }
        .responder(reply);
        let server = FakeTeacher::start(config).await.unwrap();
        term.recv().await;
        let requests = server.stats().requests;
        std::fs::write(record.join(format!("{pid}.requests")), requests.to_string()).unwrap();
        server.shutdown().await;
    });
}

/// The `serve.command` that starts [`fake_inference_server`].
fn serve_command(record: &Path, latency_ms: u64) -> String {
    let exe = std::env::current_exe().unwrap();
    format!(
        "DISTILL_E2E_SERVE_PORT={{port}} DISTILL_E2E_SERVE_MODEL={{model}} \
         DISTILL_E2E_SERVE_RECORD='{}' DISTILL_E2E_SERVE_LATENCY_MS={latency_ms} \
         exec '{}' serve::fake_inference_server --exact --ignored --nocapture",
        record.display(),
        exe.display()
    )
}

fn config(name: &str, command: &str, extra: &str) -> String {
    format!(
        r#"
[run]
name = "{name}"

[[stage]]
name = "score"
kind = "evaluate"
benchmark = "bench.jsonl"
id_field = "id"
model = "{}"
max_tokens = 64
label = "served"
serve = {{ command = '''{command}''', ready_timeout_s = 120, stop_grace_s = 5{extra} }}
"#,
        model_dir().display()
    )
}

/// The pids of the servers started so far.
fn started(record: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir(record)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".started")?
                .parse()
                .ok()
        })
        .collect();
    pids.sort();
    pids
}

/// Whether `pid` still runs (not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// Waits up to 10 s for `pid` to be gone.
fn gone(pid: u32) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if !running(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn requests(record: &Path, pid: u32) -> u64 {
    std::fs::read_to_string(record.join(format!("{pid}.requests")))
        .unwrap_or_else(|e| {
            panic!("server {pid} recorded no requests (not stopped by SIGTERM?): {e}")
        })
        .parse()
        .unwrap()
}

#[test]
fn a_served_model_is_scored_and_its_server_stopped() {
    let w = Workdir::new();
    let record = w.path().join("servers");
    std::fs::create_dir_all(&record).unwrap();
    w.write("bench.jsonl", &benchmark(4));
    w.write(
        "eval.toml",
        &config(
            "served",
            &serve_command(&record, 0),
            ", max_concurrency = 2",
        )
        .replace("max_tokens = 64", "max_tokens = 64\nsamples = 2"),
    );
    w.run(&["run", "eval.toml"]).ok();
    let scores: Value = serde_json::from_str(&w.run(&["scores", "--json"]).ok().stdout()).unwrap();
    let row = &scores["groups"][0]["rows"][0];
    assert_eq!(row["label"], "served", "{scores:#}");
    assert_eq!(row["metrics"]["pass@1"][0], 0.5, "{scores:#}");
    let pids = started(&record);
    assert_eq!(pids.len(), 1, "one server for one model folder");
    assert!(gone(pids[0]), "the server still runs after the stage");
    // n = 2 in one request per question.
    assert_eq!(requests(&record, pids[0]), 4);
}

#[test]
fn a_server_that_exits_fails_the_stage_with_its_log() {
    let w = Workdir::new();
    w.write("bench.jsonl", &benchmark(2));
    w.write(
        "eval.toml",
        &config(
            "exits",
            "echo 'loading {model}'; echo 'torch.OutOfMemoryError: CUDA out of memory' >&2; exit 3 # {port}",
            "",
        ),
    );
    let out = w.run(&["run", "eval.toml"]);
    assert!(!out.0.status.success());
    let text = format!("{}{}", out.stdout(), out.stderr());
    assert!(text.contains("exited"), "{text}");
    assert!(text.contains("CUDA out of memory"), "{text}");
    let status = w.status(Some("exits"));
    assert_eq!(status["stages"][0]["status"], "failed", "{status:#}");
}

#[test]
fn a_server_that_never_answers_is_killed_at_the_timeout() {
    let w = Workdir::new();
    w.write("bench.jsonl", &benchmark(2));
    let pid_file = w.path().join("sleeper.pid");
    let command = format!(
        "echo $$ > '{}'; trap '' TERM; exec sleep 300 # {{model}} {{port}}",
        pid_file.display()
    );
    w.write(
        "eval.toml",
        &config("silent", &command, "").replace(
            "ready_timeout_s = 120, stop_grace_s = 5",
            "ready_timeout_s = 2, stop_grace_s = 1",
        ),
    );
    let out = w.run(&["run", "eval.toml"]);
    assert!(!out.0.status.success());
    let text = format!("{}{}", out.stdout(), out.stderr());
    assert!(text.contains("did not answer"), "{text}");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // It ignored SIGTERM: SIGKILL after the grace period.
    assert!(gone(pid), "the server outlived its failed stage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_while_scoring_leaves_no_server_after_resume() {
    let w = Workdir::new();
    let record = w.path().join("servers");
    std::fs::create_dir_all(&record).unwrap();
    let n = 8;
    w.write("bench.jsonl", &benchmark(n));
    w.write(
        "eval.toml",
        &config(
            "killed",
            &serve_command(&record, 300),
            ", max_concurrency = 1",
        ),
    );
    let db = w
        .run_until_killed(
            &["run", "eval.toml"],
            "SELECT COUNT(*) FROM eval_samples",
            2,
            Duration::from_secs(120),
        )
        .await;
    let first = started(&record);
    assert_eq!(first.len(), 1);
    assert!(
        running(first[0]),
        "the orphaned server should outlive distill"
    );
    let before: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM eval_samples")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(before < n as i64, "everything was scored before the kill");

    let w2 = &w;
    tokio::task::block_in_place(|| {
        w2.run(&["resume", "killed"]).ok();
    });
    assert!(gone(first[0]), "resume left the first server running");
    let all = started(&record);
    assert_eq!(all.len(), 2, "one new server for the resumed attempt");
    assert!(gone(all[1]));
    // The resumed attempt asked only for what was missing.
    assert_eq!(requests(&record, all[1]), n as u64 - before as u64);
    let after: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM eval_samples")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(after, n as i64);
}

/// Whether `transformers serve` can run here (transformers with its serving extras and
/// accelerate, which it needs to place a model).
fn transformers_serve_available() -> bool {
    std::process::Command::new("python3")
        .args([
            "-c",
            "import accelerate\nfrom transformers.utils.import_utils import is_serve_available\nassert is_serve_available()",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A real server: `transformers serve` started by the stage on a tiny random model folder,
/// every sample scored through it, and the server gone when the stage ends.
#[test]
fn a_model_served_by_transformers_serve_is_scored() {
    if !transformers_serve_available() {
        eprintln!(
            "skipped: `transformers serve` is not available \
             (pip install 'transformers[serving]' accelerate)"
        );
        return;
    }
    let w = Workdir::new();
    let model = w.path().join("model");
    tiny_model(&model);
    w.write("bench.jsonl", &benchmark(3));
    w.write(
        "eval.toml",
        r#"
[run]
name = "hf"

[[stage]]
name = "score"
kind = "evaluate"
benchmark = "bench.jsonl"
id_field = "id"
model = "model"
max_tokens = 8
label = "transformers"
serve = { command = "transformers serve {model} --port {port}", ready_timeout_s = 300, stop_grace_s = 10 }
"#,
    );
    w.run(&["run", "eval.toml"]).ok();
    let scores: Value = serde_json::from_str(&w.run(&["scores", "--json"]).ok().stdout()).unwrap();
    let row = &scores["groups"][0]["rows"][0];
    assert_eq!(row["label"], "transformers", "{scores:#}");
    // A random model answers nothing right, but every question got a sample.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let outputs: Vec<(String, i64)> = rt.block_on(async {
        sqlx::query_as("SELECT output, tokens FROM eval_samples ORDER BY item_id")
            .fetch_all(&w.db().await)
            .await
            .unwrap()
    });
    assert_eq!(outputs.len(), 3, "{outputs:?}");
    assert!(
        outputs.iter().all(|(o, t)| !o.is_empty() && *t > 0),
        "{outputs:?}"
    );
    let still = std::process::Command::new("pgrep")
        .args(["-f", &format!("transformers serve {}", model.display())])
        .output()
        .unwrap();
    assert!(
        !still.status.success(),
        "transformers serve still runs: {}",
        String::from_utf8_lossy(&still.stdout)
    );
}
