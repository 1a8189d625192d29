//! load → generate (fake teacher) → verify → filter → …: exact funnel counts, the
//! reasons recorded, and the exported dataset.

use distill_fake_teacher::{FakeConfig, FakeTeacher, Reply, ReplyInput};
use serde_json::Value;

use crate::common::*;

/// Prompt `i` asks for `i + i`; the reply plan below decides what the teacher says.
fn prompts() -> String {
    let mut out = String::new();
    for i in 0..12 {
        // Prompt 9 has no reference answer: the verifier cannot decide it.
        let answer = if i == 9 {
            String::new()
        } else {
            (2 * i).to_string()
        };
        out.push_str(&format!(
            "{{\"problem\": \"What is {i} + {i}?\", \"answer\": \"{answer}\", \"id\": \"q{i}\"}}\n"
        ));
    }
    out
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
    w.write("pipeline.toml", &config(&server.url(), ""));
    run(&w, &["run", "pipeline.toml"]).await.ok();

    let funnel: Value =
        serde_json::from_str(&run(&w, &["funnel", "curate", "--json"]).await.ok().stdout())
            .unwrap();
    let traces = funnel_row(&funnel, "traces");
    assert_eq!(
        (traces["in"].as_i64(), traces["kept"].as_i64()),
        (Some(12), Some(12))
    );
    let verified = funnel_row(&funnel, "verified");
    assert_eq!(verified["in"], 12);
    assert_eq!(verified["kept"], 9);
    assert_eq!(
        verified["dropped"],
        serde_json::json!({"incorrect": 2, "unverified": 1})
    );
    let filtered = funnel_row(&funnel, "filtered");
    assert_eq!(filtered["in"], 9);
    assert_eq!(filtered["kept"], 7);
    assert_eq!(
        filtered["dropped"],
        serde_json::json!({"language_mixing": 1, "code_block": 1})
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
            "filtered",
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
    assert_eq!(
        ids,
        ["q0#0", "q1#0", "q2#0", "q3#0", "q4#0", "q5#0", "q11#0"]
    );
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
        9,
        "verify kept 9"
    );
    server.shutdown().await;
}

#[test]
fn curation_stages_reject_bad_parameters_and_inputs() {
    let w = Workdir::new();
    w.write("prompts.jsonl", &prompts());
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
    for (text, expected) in cases {
        w.write("bad.toml", &text);
        let out = w.run(&["validate", "bad.toml"]);
        assert_eq!(out.code(), 2, "{expected}");
        assert!(
            out.stderr().contains(expected),
            "{expected}: {}",
            out.stderr()
        );
    }
}
