//! load → generate (fake teacher) → verify → filter → …: exact funnel counts, the
//! reasons recorded, and the exported dataset.

use distill_fake_teacher::{FakeConfig, FakeTeacher, Reply, ReplyInput};
use serde_json::Value;

use crate::common::*;

/// A benchmark problem that prompt 3 overlaps with by more than 8 words.
const BENCHMARK_PROBLEM: &str =
    "Tom has three red apples and buys three more red apples at the store today. How many?";

/// Prompt `i` asks for `i + i`; the reply plan below decides what the teacher says.
/// q12 repeats q1 under another id, so its trace is an exact duplicate.
fn prompts() -> String {
    let mut out = String::new();
    for i in 0..13 {
        let n = if i == 12 { 1 } else { i };
        // Prompt 9 has no reference answer: the verifier cannot decide it.
        let answer = if i == 9 {
            String::new()
        } else {
            (2 * n).to_string()
        };
        let story = if i == 3 {
            " Tom has three red apples and buys three more red apples at the store today."
        } else {
            ""
        };
        out.push_str(&format!(
            "{{\"problem\": \"What is {n} + {n}?{story}\", \"answer\": \"{answer}\", \"id\": \"q{i}\"}}\n"
        ));
    }
    out
}

/// A long derivation shared by the traces of prompts 4 and 5: near duplicates.
fn shared_derivation() -> String {
    (0..40)
        .map(|k| format!("Step {k} restates that addition of equal numbers doubles them."))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the fake teacher answers for prompt `i`.
fn reply(input: &ReplyInput<'_>) -> Reply {
    let i: i64 = input
        .prompt
        .split_whitespace()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .expect("prompt of the form `What is i + i?`");
    let right = format!("The answer is \\boxed{{{}}}.", 2 * i);
    let (reasoning, answer) = match i {
        6 => (
            format!("I add {i} and {i}. Hmm, 999."),
            "\\boxed{999}".to_string(),
        ),
        7 => (
            "I am not sure how to add these.".to_string(),
            "I don't know.".to_string(),
        ),
        8 => (format!("I add {i} and {i}, 这个 is easy."), right),
        4 | 5 => (
            format!(
                "{} I add {i} and {i} to get {}.",
                shared_derivation(),
                2 * i
            ),
            right,
        ),
        10 => (
            format!("Let me check with code:\n```python\nprint({i}+{i})\n```"),
            right,
        ),
        _ => (format!("I add {i} and {i} to get {}.", 2 * i), right),
    };
    Reply { reasoning, answer }
}

fn config(url: &str, extra_stages: &str) -> String {
    format!(
        r#"
[run]
name = "curate"

[teacher.fake]
base_url = "{url}"
model = "fake-r1"

[[stage]]
name = "prompts"
kind = "load"
path = "prompts.jsonl"
id_field = "id"

[[stage]]
name = "traces"
kind = "generate"
needs = ["prompts"]
teacher = "fake"
prompt_template = "{{prompt}}"

[[stage]]
name = "verified"
kind = "verify"
needs = ["traces"]

[[stage]]
name = "filtered"
kind = "filter"
needs = ["verified"]

[[stage]]
name = "unique"
kind = "dedupe"
needs = ["filtered"]

[[stage]]
name = "clean"
kind = "decontaminate"
needs = ["unique"]
benchmarks = [{{ path = "bench.jsonl", name = "tinybench", id_field = "id" }}]
{extra_stages}
"#
    )
}

async fn run(w: &Workdir, args: &[&str]) -> Out {
    let mut cmd = w.cmd(args);
    tokio::task::spawn_blocking(move || Out(cmd.output().unwrap()))
        .await
        .unwrap()
}

fn funnel_row<'a>(funnel: &'a Value, name: &str) -> &'a Value {
    funnel["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {funnel:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_funnel_counts_every_item_and_reason_exactly() {
    let server = FakeTeacher::start(FakeConfig::default().responder(reply))
        .await
        .unwrap();
    let w = Workdir::new();
    w.write("prompts.jsonl", &prompts());
    w.write(
        "bench.jsonl",
        &format!("{{\"problem\": \"{BENCHMARK_PROBLEM}\", \"answer\": \"6\", \"id\": \"b7\"}}\n"),
    );
    w.write("pipeline.toml", &config(&server.url(), ""));
    run(&w, &["run", "pipeline.toml"]).await.ok();

    let funnel: Value =
        serde_json::from_str(&run(&w, &["funnel", "curate", "--json"]).await.ok().stdout())
            .unwrap();
    let traces = funnel_row(&funnel, "traces");
    assert_eq!(
        (traces["in"].as_i64(), traces["kept"].as_i64()),
        (Some(13), Some(13))
    );
    let verified = funnel_row(&funnel, "verified");
    assert_eq!(verified["in"], 13);
    assert_eq!(verified["kept"], 10);
    assert_eq!(
        verified["dropped"],
        serde_json::json!({"incorrect": 2, "unverified": 1})
    );
    let filtered = funnel_row(&funnel, "filtered");
    assert_eq!(filtered["in"], 10);
    assert_eq!(filtered["kept"], 8);
    assert_eq!(
        filtered["dropped"],
        serde_json::json!({"language_mixing": 1, "code_block": 1})
    );
    let unique = funnel_row(&funnel, "unique");
    assert_eq!(unique["in"], 8);
    assert_eq!(unique["kept"], 6);
    assert_eq!(
        unique["dropped"],
        serde_json::json!({"exact_duplicate": 1, "near_duplicate": 1})
    );
    let clean = funnel_row(&funnel, "clean");
    assert_eq!(clean["in"], 6);
    assert_eq!(clean["kept"], 5);
    assert_eq!(clean["dropped"], serde_json::json!({"contaminated": 1}));

    // Dropped duplicates name the item kept in their place; contamination names the
    // benchmark item.
    let dups: Value = serde_json::from_str(
        &run(
            &w,
            &[
                "traces",
                "curate",
                "--rejected",
                "--stage",
                "unique",
                "--json",
            ],
        )
        .await
        .ok()
        .stdout(),
    )
    .unwrap();
    let pairs: Vec<(String, String)> = dups
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["source_id"].as_str().unwrap().to_string(),
                d["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            ("q5".to_string(), "near_duplicate".to_string()),
            ("q12".to_string(), "exact_duplicate".to_string())
        ]
    );
    let kept_ids: Vec<i64> = dups
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["related_id"].as_i64().unwrap())
        .collect();
    let q4_q1: Vec<i64> = sqlx::query_scalar(
        "SELECT g.id FROM generations g JOIN prompts p ON p.id = g.prompt_id
         WHERE p.source_id IN ('q4', 'q1') ORDER BY p.source_id DESC",
    )
    .fetch_all(&w.db().await)
    .await
    .unwrap();
    assert_eq!(kept_ids, q4_q1);
    let contaminated = run(
        &w,
        &["traces", "curate", "--rejected", "--reason", "contaminated"],
    )
    .await;
    assert!(
        contaminated
            .ok()
            .stdout()
            .contains("matches tinybench item b7"),
        "{}",
        contaminated.stdout()
    );

    // The table for people says the same.
    let table = run(&w, &["funnel"]).await.ok().stdout();
    assert!(table.contains("incorrect 2"), "{table}");

    // Rejected traces can be read back by reason.
    let rejected: Value = serde_json::from_str(
        &run(
            &w,
            &[
                "traces",
                "curate",
                "--rejected",
                "--reason",
                "incorrect",
                "--json",
            ],
        )
        .await
        .ok()
        .stdout(),
    )
    .unwrap();
    let ids: Vec<&str> = rejected
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["source_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["q6", "q7"]);
    assert_eq!(rejected[0]["extracted"], "999");
    assert_eq!(rejected[1]["detail"], "no answer found");

    // The curated dataset holds exactly the survivors, in the R1 SFT format.
    let out = w.path().join("sft.jsonl");
    run(
        &w,
        &[
            "dataset",
            "export",
            "curate",
            "clean",
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .await
    .ok();
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["q0#0", "q1#0", "q2#0", "q4#0", "q11#0"]);
    let m = &lines[1]["messages"];
    assert_eq!(m[0]["role"], "user");
    assert_eq!(m[0]["content"], "What is 1 + 1?");
    assert_eq!(
        m[1]["content"],
        "<think>\nI add 1 and 1 to get 2.\n</think>\n\nThe answer is \\boxed{2}."
    );

    // The trainer's form keeps reasoning and answer apart.
    let out = w.path().join("train.jsonl");
    run(
        &w,
        &[
            "dataset",
            "export",
            "curate",
            "verified",
            "--out",
            out.to_str().unwrap(),
            "--format",
            "sft",
        ],
    )
    .await
    .ok();
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["reasoning"], "I add 0 and 0 to get 0.");
    assert_eq!(first["answer"], "The answer is \\boxed{0}.");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap().lines().count(),
        10,
        "verify kept 10"
    );
    server.shutdown().await;
}

#[test]
fn curation_stages_reject_bad_parameters_and_inputs() {
    let w = Workdir::new();
    w.write("prompts.jsonl", &prompts());
    w.write("bench.jsonl", "{\"problem\": \"x\", \"id\": \"1\"}\n");
    let good = config("http://127.0.0.1:9", "");
    let cases = [
        (
            good.replace("needs = [\"verified\"]", "needs = [\"prompts\"]"),
            "stage `filtered` (filter): needs: `prompts` is a load stage",
        ),
        (
            good.replace(
                "kind = \"filter\"\nneeds = [\"verified\"]",
                "kind = \"filter\"\nneeds = [\"verified\"]\nmax_foreign_letter_share = 2.0",
            ),
            "max_foreign_letter_share",
        ),
        (
            good.replace(
                "kind = \"verify\"\nneeds = [\"traces\"]",
                "kind = \"verify\"\nneeds = [\"traces\"]\non_unknown = \"judge\"",
            ),
            "stage `verified` (verify): judge",
        ),
        (
            good.replace(
                "kind = \"verify\"\nneeds = [\"traces\"]",
                "kind = \"verify\"\nneeds = [\"traces\"]\njudge = \"nobody\"",
            ),
            "no [teacher.nobody]",
        ),
        (
            good.replace(
                "kind = \"verify\"\nneeds = [\"traces\"]",
                "kind = \"verify\"\nneeds = [\"traces\"]\non_unknown = \"maybe\"",
            ),
            "on_unknown",
        ),
    ];
    assert_invalid_configs(&w, &cases);
}

/// A gsm8k test question, copied into a prompt below: the shipped default benchmarks must catch it.
const GSM8K_FIRST: &str = "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends every day with four.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decontaminate_without_benchmarks_protects_the_shipped_math_benchmarks() {
    let server = FakeTeacher::start(FakeConfig::default().responder(reply))
        .await
        .unwrap();
    let w = Workdir::new();
    w.write(
        "prompts.jsonl",
        &format!(
            "{{\"problem\": \"What is 1 + 1? {GSM8K_FIRST}\", \"answer\": \"2\", \"id\": \"q1\"}}\n\
             {{\"problem\": \"What is 2 + 2?\", \"answer\": \"4\", \"id\": \"q2\"}}\n"
        ),
    );
    let url = server.url();
    w.write(
        "pipeline.toml",
        &format!(
            r#"
[run]
name = "defaults"

[teacher.fake]
base_url = "{url}"
model = "fake-r1"

[[stage]]
name = "prompts"
kind = "load"
path = "prompts.jsonl"
id_field = "id"

[[stage]]
name = "traces"
kind = "generate"
needs = ["prompts"]
teacher = "fake"
prompt_template = "{{prompt}}"

[[stage]]
name = "clean"
kind = "decontaminate"
needs = ["traces"]
"#
        ),
    );
    let validate = run(&w, &["validate", "pipeline.toml"]).await;
    assert!(
        validate.ok().stdout().contains(
            "note: no `benchmarks` listed: protecting the shipped math benchmarks \
             (math500, aime24, aime25, amc23, gsm8k_test)"
        ),
        "{}",
        validate.stdout()
    );
    run(&w, &["run", "pipeline.toml"]).await.ok();

    let funnel: Value = serde_json::from_str(
        &run(&w, &["funnel", "defaults", "--json"])
            .await
            .ok()
            .stdout(),
    )
    .unwrap();
    let clean = funnel_row(&funnel, "clean");
    assert_eq!(
        (clean["in"].as_i64(), clean["kept"].as_i64()),
        (Some(2), Some(1))
    );
    let rejected = run(&w, &["traces", "defaults", "--rejected", "--json"]).await;
    let rejected: Value = serde_json::from_str(&rejected.ok().stdout()).unwrap();
    assert_eq!(rejected[0]["source_id"], "q1");
    assert!(
        rejected[0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("matches gsm8k_test item 1:"),
        "{rejected:#}"
    );
    let status = w.status(Some("defaults"));
    let summary = &stage(&status, "clean")["summary"];
    assert_eq!(summary["default_benchmarks"], true, "{summary:#}");
    assert_eq!(
        summary["benchmarks"],
        serde_json::json!(["math500", "aime24", "aime25", "amc23", "gsm8k_test"])
    );
    server.shutdown().await;
}
