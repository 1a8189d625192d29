//! The `evaluate` stage: exact metrics against an endpoint with known per-question
//! correctness, and a local Burn model killed mid-evaluation and resumed.

use std::time::Duration;

use distill_fake_teacher::{FakeConfig, FakeTeacher, Fault, Reply, ReplyInput, When};
use serde_json::Value;

use crate::common::*;

/// `n` questions "What is i + i?" with ids `b{i}` and answers `2i`.
pub fn benchmark(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"problem\": \"What is {i} + {i}?\", \"answer\": \"{}\", \"id\": \"b{i}\"}}\n",
                2 * i
            )
        })
        .collect()
}

/// The `i` of a [`benchmark`] question "What is i + i?".
pub fn question_number(prompt: &str) -> i64 {
    prompt.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// The answer sample `choice` gives for question `i`: a plan with known correctness.
fn planned(i: i64, choice: u32) -> i64 {
    let right = 2 * i;
    match (i, choice) {
        (0, _) => right,     // 4/4 correct
        (1, 0 | 1) => right, // 2/4, vote tie 2:2 → first answer, correct
        (1, _) => 99,
        (2, 0) => right, // 1/4, vote 7 wins → wrong
        (2, 1 | 2) => 7,
        (2, _) => 8,
        _ => 1000 + choice as i64, // 0/4
    }
}

fn reply(input: &ReplyInput<'_>) -> Reply {
    let i = question_number(input.prompt);
    Reply {
        reasoning: format!("thinking about {i}"),
        answer: format!("\\boxed{{{}}}", planned(i, input.choice)),
    }
}

fn score<'a>(scores: &'a Value, metric: &str) -> &'a Value {
    &scores["groups"][0]["rows"][0]["metrics"][metric]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_scores_are_exact() {
    let server = FakeTeacher::start(FakeConfig::default().responder(reply))
        .await
        .unwrap();
    let w = Workdir::new();
    w.write("bench.jsonl", &benchmark(4));
    w.write(
        "eval.toml",
        &format!(
            r#"
[run]
name = "eval"

[teacher.endpoint]
base_url = "{}"
model = "fake-distill"

[[stage]]
name = "score"
kind = "evaluate"
benchmark = "bench.jsonl"
id_field = "id"
teacher = "endpoint"
samples = 4
max_tokens = 64
"#,
            server.url()
        ),
    );
    let mut cmd = w.cmd(&["run", "eval.toml"]);
    tokio::task::spawn_blocking(move || Out(cmd.output().unwrap()))
        .await
        .unwrap()
        .ok();

    let out = w.run(&["scores", "--json"]);
    let scores: Value = serde_json::from_str(&out.ok().stdout()).unwrap();
    let close = |v: &Value, want: f64| (v.as_f64().unwrap() - want).abs() < 1e-9;
    assert!(close(&score(&scores, "pass@1")[0], 0.4375), "{scores:#}");
    assert!((score(&scores, "pass@1")[1].as_f64().unwrap() - 0.21347).abs() < 1e-4);
    assert!(close(&score(&scores, "pass@4")[0], 0.75), "{scores:#}");
    assert!(close(&score(&scores, "cons@4")[0], 0.5), "{scores:#}");
    let group = &scores["groups"][0];
    assert_eq!(group["benchmark"], "bench");
    assert_eq!(group["protocol"]["samples"], 4);
    assert_eq!(group["protocol"]["temperature"], 0.6);
    assert_eq!(group["rows"][0]["label"], "endpoint (fake-distill)");

    let table = w.run(&["scores"]).ok().stdout();
    assert!(table.contains("43.8 ± 21.3"), "{table}");
    assert!(table.contains("k=4 · temperature 0.6"), "{table}");
    // One request per question with n = 4.
    assert_eq!(server.stats().requests, 4);
    server.shutdown().await;
}

/// Every question answered right, after reasoning of exactly 40 bytes (10 tokens as the
/// fake counts them) that drafts the right answer too; the answer is 3 tokens.
fn right_after_a_draft(input: &ReplyInput<'_>) -> Reply {
    let i = question_number(input.prompt);
    Reply {
        reasoning: format!("{:<40}", format!("{i} + {i} is \\boxed{{{}}}", 2 * i)),
        answer: format!("\\boxed{{{}}}", 2 * i),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_show_the_share_cut_by_the_token_budget_and_the_mean_tokens() {
    // One response in four runs out of tokens halfway through its reasoning (5 tokens,
    // no answer): it has not answered, whatever its draft says.
    let server = FakeTeacher::start(
        FakeConfig::default()
            .responder(right_after_a_draft)
            .fault(When::Request(2), Fault::FinishLength),
    )
    .await
    .unwrap();
    let w = Workdir::new();
    w.write("bench.jsonl", &benchmark(4));
    w.write(
        "eval.toml",
        &format!(
            r#"
[run]
name = "eval"

[teacher.endpoint]
base_url = "{}"
model = "fake-distill"
max_retries = 0

[[stage]]
name = "score"
kind = "evaluate"
benchmark = "bench.jsonl"
id_field = "id"
teacher = "endpoint"
max_tokens = 64
"#,
            server.url()
        ),
    );
    let mut cmd = w.cmd(&["run", "eval.toml"]);
    tokio::task::spawn_blocking(move || Out(cmd.output().unwrap()))
        .await
        .unwrap()
        .ok();

    let scores: Value = serde_json::from_str(&w.run(&["scores", "--json"]).ok().stdout()).unwrap();
    let row = &scores["groups"][0]["rows"][0];
    assert_eq!(row["metrics"]["pass@1"][0], 0.75, "{scores:#}");
    assert_eq!(row["truncated"], 0.25, "{scores:#}");
    assert_eq!(row["mean_tokens"], (3.0 * 13.0 + 5.0) / 4.0, "{scores:#}");
    let cut: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT verdict, extracted, output FROM eval_samples WHERE finish_reason = 'length'",
    )
    .fetch_all(&w.db().await)
    .await
    .unwrap();
    assert_eq!(cut.len(), 1);
    assert_eq!(
        (cut[0].0.as_str(), cut[0].1.as_deref()),
        ("incorrect", None)
    );
    assert!(
        !cut[0].2.as_deref().unwrap_or("").contains("</think>"),
        "a cut response is recorded as never having closed its reasoning: {cut:?}"
    );

    let table = w.run(&["scores"]).ok().stdout();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[3].ends_with("PASS@1       TRUNCATED  MEAN TOKENS"),
        "{table}"
    );
    assert!(lines[4].ends_with("75.0 ± 25.0  25.0%      11"), "{table}");
    server.shutdown().await;
}

fn local_config() -> &'static str {
    r#"
[run]
name = "local"

[[stage]]
name = "base"
kind = "evaluate"
benchmark = "bench.jsonl"
id_field = "id"
model = "model"
samples = 2
max_tokens = 24
seed = 11
"#
}

async fn outputs(w: &Workdir) -> Vec<(String, i64, String)> {
    sqlx::query_as(
        "SELECT item_id, sample_index, output FROM eval_samples ORDER BY item_id, sample_index",
    )
    .fetch_all(&w.db().await)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_local_evaluation_resumes_to_the_same_samples_and_scores() {
    let n = 8;
    let straight = Workdir::new();
    tiny_model(&straight.path().join("model"));
    straight.write("bench.jsonl", &benchmark(n));
    straight.write("eval.toml", local_config());
    straight.run(&["run", "eval.toml"]).ok();
    let expected = outputs(&straight).await;
    assert_eq!(expected.len(), 2 * n);
    assert!(
        expected.iter().any(|(_, _, o)| !o.is_empty()),
        "the model generated nothing"
    );
    // Different samples of a question differ (each has its own seed).
    assert_ne!(expected[0].2, expected[1].2);

    let w = Workdir::new();
    tiny_model(&w.path().join("model"));
    w.write("bench.jsonl", &benchmark(n));
    w.write("eval.toml", local_config());
    w.run_until_killed(
        &["run", "eval.toml"],
        "SELECT COUNT(*) FROM eval_samples",
        2,
        Duration::from_secs(120),
    )
    .await;
    let partial = outputs(&w).await.len();
    w.run(&["resume", "local"]).ok();
    assert_eq!(
        outputs(&w).await,
        expected,
        "resumed samples differ (partial: {partial})"
    );
    let a: Value =
        serde_json::from_str(&straight.run(&["scores", "--json"]).ok().stdout()).unwrap();
    let b: Value = serde_json::from_str(&w.run(&["scores", "--json"]).ok().stdout()).unwrap();
    assert_eq!(a["groups"], b["groups"]);
}

/// `distill eval` takes the user-message template, so a student distilled from bare prompts
/// (the quickstart's) is scored on the prompts it learnt, not R1's default instruction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distill_eval_uses_the_given_prompt_template() {
    let w = Workdir::new();
    tiny_model(&w.path().join("model"));
    w.write("bench.jsonl", &benchmark(2));
    let eval = |template: Option<&str>, run: &str| {
        let mut args = vec![
            "eval",
            "model",
            "--benchmark",
            "bench.jsonl",
            "--max-tokens",
            "4",
            "--run",
            run,
        ];
        if let Some(t) = template {
            args.extend(["--prompt-template", t]);
        }
        w.run(&args).ok();
    };
    eval(Some("Q: {prompt}"), "bare");
    eval(None, "default");
    // The same template written in a pipeline config.
    w.write(
        "eval.toml",
        &local_config()
            .replace("name = \"local\"", "name = \"config\"")
            .replace(
                "samples = 2",
                "samples = 1\nprompt_template = \"Q: {prompt}\"",
            ),
    );
    w.run(&["run", "eval.toml"]).ok();
    let hashes: Vec<(String, String)> = sqlx::query_as(
        "SELECT r.name, json_extract(s.params, '$.protocol.template_hash') \
         FROM stages s JOIN runs r ON r.id = s.run_id ORDER BY r.name",
    )
    .fetch_all(&w.db().await)
    .await
    .unwrap();
    let [(_, bare), (_, config), (_, default)] = &hashes[..] else {
        panic!("three runs expected: {hashes:?}")
    };
    assert_eq!(bare, config, "{hashes:?}");
    assert_ne!(bare, default, "{hashes:?}");
}

#[test]
fn evaluate_config_errors_name_the_field() {
    let w = Workdir::new();
    w.write("bench.jsonl", &benchmark(2));
    let base = "[run]\nname = \"e\"\n\n[[stage]]\nname = \"s\"\nkind = \"evaluate\"\nbenchmark = \"bench.jsonl\"\n";
    let cases = [
        (base.to_string(), "name exactly one model under test"),
        (format!("{base}teacher = \"t\"\n"), "no [teacher.t]"),
        (
            format!("{base}teacher = \"t\"\nmodel = \"m\"\n"),
            "exactly one",
        ),
        (format!("{base}model = \".\"\nsamples = 0\n"), "samples: "),
    ];
    assert_invalid_configs(&w, &cases);
    // A model folder that is not there yet is this machine's problem, not the config's:
    // `validate` warns, `run` refuses before creating the database.
    w.write("missing.toml", &format!("{base}model = \"nope\"\n"));
    let out = w.run(&["validate", "missing.toml"]);
    out.ok();
    assert!(
        out.stderr()
            .contains("warning: stage `s` (evaluate): model: "),
        "{}",
        out.stderr()
    );
    let out = w.run(&["run", "missing.toml"]);
    assert_eq!(out.code(), 1, "{}", out.stderr());
    assert!(
        out.stderr().contains("is not a model folder"),
        "{}",
        out.stderr()
    );
    assert!(!w.db_path().exists());
}
