//! load → generate against the fake teacher: every reasoning format, every fault,
//! failures completed by `resume`, SIGKILL mid-generation, the response cache.

use std::collections::BTreeMap;
use std::time::Duration;

use distill_fake_teacher::{
    FakeConfig, FakeTeacher, Fault, ReasoningFormat, ReplyInput, When, default_reply,
};

use crate::common::*;

const N_PROMPTS: usize = 5;

fn prompts_jsonl(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"problem\": \"What is {i} + {i}?\", \"answer\": \"{}\"}}\n",
                2 * i
            )
        })
        .collect()
}

/// A pipeline with one load and one generate stage against `url`.
fn config(url: &str, samples: u32, teacher_extra: &str, generate_extra: &str) -> String {
    format!(
        r#"
[run]
name = "gen"

[teacher.fake]
base_url = "{url}"
model = "fake-r1"
max_concurrency = 4
request_timeout_s = 5
retry_base_delay_s = 0.01
retry_max_delay_s = 0.05
{teacher_extra}

[[stage]]
name = "prompts"
kind = "load"
path = "prompts.jsonl"

[[stage]]
name = "traces"
kind = "generate"
needs = ["prompts"]
teacher = "fake"
samples_per_prompt = {samples}
max_tokens = 256
prompt_template = "{{prompt}}"
{generate_extra}
"#
    )
}

/// (prompt text, sample index, status, reasoning, answer, error_kind) of every generation.
type Row = (
    String,
    i64,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

async fn rows(w: &Workdir) -> Vec<Row> {
    sqlx::query_as(
        "SELECT p.prompt, g.sample_index, g.status, g.reasoning, g.answer, g.error_kind
         FROM generations g JOIN prompts p ON p.id = g.prompt_id
         ORDER BY p.idx, g.sample_index",
    )
    .fetch_all(&w.db().await)
    .await
    .unwrap()
}

/// Asserts every (prompt, sample) is present once, succeeded, and split as the fake
/// sent it. `n_mode`: samples came as choices of one request (else one request each,
/// which the unseeded fake answers alike).
async fn assert_complete(w: &Workdir, n_prompts: usize, samples: i64, n_mode: bool) {
    let rows = rows(w).await;
    assert_eq!(rows.len(), n_prompts * samples as usize, "{rows:#?}");
    let mut seen = BTreeMap::new();
    for (prompt, sample, status, reasoning, answer, kind) in rows {
        assert_eq!(status, "ok", "{prompt} #{sample}: {kind:?}");
        assert!(
            seen.insert((prompt.clone(), sample), ()).is_none(),
            "duplicate"
        );
        let expected = default_reply(&ReplyInput {
            prompt: &prompt,
            choice: if n_mode { sample as u32 } else { 0 },
            seed: None,
        });
        assert_eq!(
            reasoning.as_deref(),
            Some(expected.reasoning.as_str()),
            "{prompt} #{sample}"
        );
        assert_eq!(
            answer.as_deref(),
            Some(expected.answer.as_str()),
            "{prompt} #{sample}"
        );
    }
    for i in 0..n_prompts {
        for s in 0..samples {
            assert!(
                seen.contains_key(&(format!("What is {i} + {i}?"), s)),
                "missing {i}#{s}"
            );
        }
    }
}

fn setup(config: &str) -> Workdir {
    let w = Workdir::new();
    w.write("prompts.jsonl", &prompts_jsonl(N_PROMPTS));
    w.write("pipeline.toml", config);
    w
}

/// Runs `distill` on a blocking thread so the in-process fake server keeps serving.
async fn run(w: &Workdir, args: &[&str]) -> Out {
    let mut cmd = w.cmd(args);
    tokio::task::spawn_blocking(move || Out(cmd.output().unwrap()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reasoning_format_streaming_or_not_is_split_correctly() {
    for format in [
        ReasoningFormat::ReasoningContent,
        ReasoningFormat::Reasoning,
        ReasoningFormat::InlineThink,
        ReasoningFormat::InlineThinkNoOpen,
    ] {
        for (stream, supports_n) in [(true, true), (false, false)] {
            let server =
                FakeTeacher::start(FakeConfig::default().format(format).supports_n(supports_n))
                    .await
                    .unwrap();
            let teacher = format!("stream = {stream}\nsupports_n = {supports_n}");
            let w = setup(&config(&server.url(), 3, &teacher, ""));
            run(&w, &["run", "pipeline.toml"]).await.ok();
            assert_complete(&w, N_PROMPTS, 3, supports_n).await;
            let stats = server.stats();
            let expected_requests = if supports_n { N_PROMPTS } else { N_PROMPTS * 3 } as u64;
            assert_eq!(
                stats.requests, expected_requests,
                "{format:?} stream={stream}"
            );
            server.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transient_fault_is_retried_to_an_exact_outcome() {
    let faults: Vec<(&str, Fault)> = vec![
        (
            "429",
            Fault::RateLimited {
                retry_after: Some(Duration::from_millis(50)),
            },
        ),
        ("500", Fault::ServerError { status: 500 }),
        ("503", Fault::ServerError { status: 503 }),
        ("timeout", Fault::Delay(Duration::from_secs(8))),
        ("drop", Fault::DropMidStream),
        ("no-done", Fault::EndWithoutDone),
        ("malformed", Fault::MalformedJson),
        ("keep-alive", Fault::KeepAlive),
    ];
    for (name, fault) in faults {
        let server = FakeTeacher::start(
            FakeConfig::default()
                .fault(When::Request(2), fault.clone())
                .fault(When::Request(4), fault),
        )
        .await
        .unwrap();
        let timeout = if name == "timeout" {
            "read_timeout_s = 1"
        } else {
            ""
        };
        let w = setup(&config(&server.url(), 2, timeout, ""));
        let out = run(&w, &["run", "pipeline.toml"]).await;
        out.ok();
        assert_complete(&w, N_PROMPTS, 2, true).await;
        let stats = server.stats();
        let retried = if name == "keep-alive" { 0 } else { 2 };
        assert_eq!(
            stats.requests,
            N_PROMPTS as u64 + retried,
            "{name}: {stats:?}"
        );
        assert_eq!(stats.completions, 2 * N_PROMPTS as u64, "{name}: {stats:?}");
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teacher_ignoring_n_is_sent_one_request_per_sample_without_retries() {
    // `transformers serve` answers `n > 1` with one choice, and streams without `[DONE]`.
    for stream in [true, false] {
        let server = FakeTeacher::start(FakeConfig::default().ignore_n().without_done())
            .await
            .unwrap();
        let w = setup(&config(&server.url(), 2, &format!("stream = {stream}"), ""));
        let out = run(&w, &["run", "pipeline.toml"]).await;
        out.ok();
        // The fake answers every request as choice 0 of an unseeded one.
        assert_complete(&w, N_PROMPTS, 2, false).await;
        // Nothing retried, nothing generated twice: a probe's choice 0 is kept.
        let stats = server.stats();
        assert_eq!(stats.requests, 2 * N_PROMPTS as u64, "stream={stream}");
        assert_eq!(stats.completions, 2 * N_PROMPTS as u64, "stream={stream}");
        assert_eq!(
            out.stderr().matches("ignores `n`").count(),
            1,
            "said once: {}",
            out.stderr()
        );
        assert!(
            out.stderr().contains("supports_n = false"),
            "{}",
            out.stderr()
        );
        let status = w.status(None);
        assert_eq!(
            stage(&status, "traces")["summary"]["endpoints_without_n"],
            serde_json::json!([server.url()]),
            "stream={stream}"
        );
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_that_exhaust_retries_are_recorded_and_completed_on_resume() {
    // The first 6 requests fail with 503 and the client gives up after one retry.
    let server = FakeTeacher::start(
        FakeConfig::default().fault(When::FirstN(6), Fault::ServerError { status: 503 }),
    )
    .await
    .unwrap();
    let w = setup(
        &config(&server.url(), 1, "max_retries = 1", "")
            .replace("max_concurrency = 4", "max_concurrency = 1"),
    );
    let out = run(&w, &["run", "pipeline.toml"]).await;
    assert_eq!(out.code(), 1, "{}", out.stderr());
    assert!(
        out.stderr().contains("3 of 5 samples failed"),
        "{}",
        out.stderr()
    );
    let failed: Vec<_> = rows(&w)
        .await
        .into_iter()
        .filter(|r| r.2 == "failed")
        .collect();
    assert_eq!(failed.len(), 3);
    assert!(
        failed
            .iter()
            .all(|r| r.5.as_deref() == Some("server_error")),
        "{failed:?}"
    );
    let status = w.status(None);
    assert_eq!(stage(&status, "traces")["status"], "failed");
    assert_eq!(stage(&status, "traces")["detail"]["failed"], 3);

    let traces = run(&w, &["traces", "gen", "--failed"]).await;
    traces.ok();
    assert!(
        traces.stdout().contains("server_error"),
        "{}",
        traces.stdout()
    );

    run(&w, &["resume", "gen"]).await.ok();
    assert_complete(&w, N_PROMPTS, 1, true).await;
    // Three samples failed twice (6 requests), two succeeded; resume asked only for
    // the three failed ones.
    assert_eq!(server.stats().requests, 6 + 2 + 3);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_key_fails_at_once_naming_the_cause_and_never_leaks_the_key() {
    let server = FakeTeacher::start(FakeConfig::default().api_key("right-key"))
        .await
        .unwrap();
    let w = setup(&config(&server.url(), 1, "api_key_env = \"FAKE_KEY\"", ""));
    let mut cmd = w.cmd(&["run", "pipeline.toml"]);
    cmd.env("FAKE_KEY", "sk-wrong-secret-key");
    let out = tokio::task::spawn_blocking(move || Out(cmd.output().unwrap()))
        .await
        .unwrap();
    assert_eq!(out.code(), 1);
    assert!(
        out.stderr().to_lowercase().contains("api key"),
        "{}",
        out.stderr()
    );
    assert!(!out.stderr().contains("sk-wrong-secret-key"));
    assert!(!out.stdout().contains("sk-wrong-secret-key"));
    // Fatal errors stop the stage instead of failing every request.
    assert!(server.stats().requests <= 4, "{:?}", server.stats());
    let dump: Vec<(String,)> = sqlx::query_as(
        "SELECT COALESCE(error, '') || COALESCE(request_hash, '') FROM generations
         UNION ALL SELECT COALESCE(error, '') || config FROM stages, runs
         UNION ALL SELECT completion FROM teacher_cache",
    )
    .fetch_all(&w.db().await)
    .await
    .unwrap();
    assert!(dump.iter().all(|(s,)| !s.contains("sk-wrong-secret-key")));

    // A missing variable is named (not its value) before any request is sent.
    let out = run(&w, &["resume", "gen"]).await;
    assert!(out.stderr().contains("FAKE_KEY"), "{}", out.stderr());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_generation_then_resume_loses_and_duplicates_nothing() {
    let n = 60;
    let concurrency = 4;
    let server = FakeTeacher::start(FakeConfig::default().latency(Duration::from_millis(40)))
        .await
        .unwrap();
    let w = Workdir::new();
    w.write("prompts.jsonl", &prompts_jsonl(n));
    w.write(
        "pipeline.toml",
        &config(&server.url(), 2, "supports_n = false", ""),
    );
    let db = w
        .run_until_killed(
            &["run", "pipeline.toml"],
            "SELECT COUNT(*) FROM generations",
            30,
            Duration::from_secs(60),
        )
        .await;
    let before: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM generations")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(before < 2 * n as i64, "finished before the kill");

    run(&w, &["resume", "gen"]).await.ok();
    assert_complete(&w, n, 2, false).await;
    let total = 2 * n as u64;
    let served = server.stats().completions;
    assert!(
        served <= total + concurrency,
        "served {served} completions for {total} samples"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_with_the_same_parameters_is_served_from_the_cache() {
    let server = FakeTeacher::start(FakeConfig::default()).await.unwrap();
    let w = setup(&config(&server.url(), 2, "", ""));
    run(&w, &["run", "pipeline.toml"]).await.ok();
    assert_eq!(server.stats().requests, N_PROMPTS as u64);

    // More prompts: load and generate are redone, but old prompts cost nothing.
    w.write("prompts.jsonl", &prompts_jsonl(N_PROMPTS + 2));
    run(&w, &["run", "pipeline.toml"]).await.ok();
    assert_complete(&w, N_PROMPTS + 2, 2, true).await;
    assert_eq!(server.stats().requests, N_PROMPTS as u64 + 2);
    let status = w.status(None);
    assert_eq!(
        stage(&status, "traces")["detail"]["cached"],
        2 * N_PROMPTS as i64
    );

    // A changed sampling parameter is a different request: no cache hit.
    w.write(
        "pipeline.toml",
        &config(&server.url(), 2, "", "temperature = 0.7"),
    );
    run(&w, &["run", "pipeline.toml"]).await.ok();
    assert_eq!(server.stats().requests, 2 * (N_PROMPTS as u64 + 2));

    let json: serde_json::Value = serde_json::from_str(
        &run(&w, &["traces", "gen", "--json", "--limit", "3"])
            .await
            .stdout(),
    )
    .unwrap();
    assert_eq!(json.as_array().unwrap().len(), 3);
    assert_eq!(json[0]["status"], "ok");
    assert_eq!(json[0]["reference"], "0");
    server.shutdown().await;
}

#[tokio::test]
async fn generate_config_errors_name_the_field() {
    let w = setup(&config("http://127.0.0.1:9", 1, "", ""));
    let cases = [
        (
            config("http://127.0.0.1:9", 1, "", "")
                .replace("teacher = \"fake\"", "teacher = \"r1\""),
            "teacher: no [teacher.r1]",
        ),
        (
            config("http://127.0.0.1:9", 0, "", ""),
            "samples_per_prompt: must be at least 1",
        ),
        (config("not a url", 1, "", ""), "[teacher.fake]"),
        (
            config("http://127.0.0.1:9", 1, "max_concurency = 3", ""),
            "max_concurency",
        ),
        (config("http://127.0.0.1:9", 1, "", "top_p = 1.5"), "top_p"),
        (
            config(
                "http://127.0.0.1:9",
                1,
                "simulated = { task = \"arithmetic\" }",
                "",
            ),
            "give base_url (a server) or simulated (the built-in simulator), not both",
        ),
        (
            config(
                "http://127.0.0.1:9",
                1,
                "simulated = { task = \"arithmetic\", wrongg = 0.1 }",
                "",
            ),
            "unknown field `wrongg`",
        ),
    ];
    assert_invalid_configs(&w, &cases);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cache_off_responses_are_stored_once() {
    let server = FakeTeacher::start(FakeConfig::default()).await.unwrap();
    let w = setup(&config(&server.url(), 2, "", "cache = false"));
    run(&w, &["run", "pipeline.toml"]).await.ok();
    assert_complete(&w, N_PROMPTS, 2, true).await;
    let cached: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM teacher_cache")
        .fetch_one(&w.db().await)
        .await
        .unwrap();
    assert_eq!(cached, 0);
    server.shutdown().await;
}

/// A pipeline whose teacher is the built-in simulator, with curation in the order that
/// lets each stage see its fault: the filter drops cut-off samples before verify would
/// count their missing answers as wrong.
const SIMULATED: &str = r#"
[run]
name = "sim"

[teacher.sim]
model = "sim-r1"
simulated = { task = "arithmetic", seed = 7, wrong = 0.2, mixed_language = 0.2, truncated = 0.2, duplicate = 0.5 }

[[stage]]
name = "problems"
kind = "load"
path = "problems.jsonl"
id_field = "id"

[[stage]]
name = "traces"
kind = "generate"
needs = ["problems"]
teacher = "sim"
samples_per_prompt = 2
seed = 1

[[stage]]
name = "filtered"
kind = "filter"
needs = ["traces"]

[[stage]]
name = "verified"
kind = "verify"
needs = ["filtered"]

[[stage]]
name = "unique"
kind = "dedupe"
needs = ["verified"]
"#;

#[test]
fn a_simulated_teacher_gives_every_curation_stage_something_to_remove() {
    let w = Workdir::new();
    let synth = |n: &str| {
        w.run(&[
            "synth",
            "arithmetic",
            "--n",
            n,
            "--seed",
            "5",
            "--out",
            "problems.jsonl",
        ])
        .ok();
    };
    synth("40");
    w.write("pipeline.toml", SIMULATED);
    w.run(&["run", "pipeline.toml"]).ok();

    let funnel: serde_json::Value =
        serde_json::from_str(&w.run(&["funnel", "sim", "--json"]).ok().stdout()).unwrap();
    let row = |name: &str| {
        funnel["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {funnel:#}"))
            .clone()
    };
    let dropped = |name: &str, reason: &str| row(name)["dropped"][reason].as_i64().unwrap_or(0);
    assert_eq!(row("traces")["kept"], 80, "{funnel:#}");
    assert!(dropped("filtered", "truncated") > 0, "{funnel:#}");
    assert!(dropped("filtered", "language_mixing") > 0, "{funnel:#}");
    assert!(dropped("verified", "incorrect") > 0, "{funnel:#}");
    assert!(dropped("unique", "exact_duplicate") > 0, "{funnel:#}");
    assert_eq!(dropped("unique", "near_duplicate"), 0, "{funnel:#}");
    assert!(row("unique")["kept"].as_i64().unwrap() > 20, "{funnel:#}");

    // The teacher saw the R1 instruction after each problem and answered R1-style.
    let traces: serde_json::Value = serde_json::from_str(
        &w.run(&["traces", "sim", "--json", "--limit", "80"])
            .ok()
            .stdout(),
    )
    .unwrap();
    let clean = traces
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["finish_reason"] == "stop")
        .unwrap();
    let answer = clean["answer"].as_str().unwrap();
    assert!(answer.contains("**Answer:** \\boxed{"), "{clean:#}");
    assert!(
        clean["reasoning"].as_str().unwrap().contains(" = "),
        "{clean:#}"
    );

    // The simulator listens on a new port each run, but what it says depends only on
    // its settings: a second run redoes nothing...
    let stages = || async {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT name, fingerprint, attempts FROM stages ORDER BY position")
                .fetch_all(&w.db().await)
                .await
                .unwrap();
        rows
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let before = rt.block_on(stages());
    w.run(&["run", "pipeline.toml"]).ok();
    assert_eq!(rt.block_on(stages()), before);

    // ...and when more problems arrive, the old ones are answered from the cache.
    synth("45");
    w.run(&["run", "pipeline.toml"]).ok();
    let status = w.status(Some("sim"));
    let traces = stage(&status, "traces");
    assert_eq!(traces["summary"]["samples"], 90, "{traces:#}");
    assert_eq!(traces["summary"]["cached"], 80, "{traces:#}");
}
