//! The quickstart, shrunk to seconds: `examples/quickstart.toml` itself with fewer
//! problems, steps and tokens. SIGKILLed at the start of every stage, `distill resume`
//! must finish with the funnel and scores of an uninterrupted run. (Kills in the middle
//! of a stage are the subject of the generate, train and evaluate tests.)

use std::path::Path;

use serde_json::Value;

use crate::common::Workdir;

/// Every stage of the quickstart, in config order.
const STAGES: &[&str] = &[
    "problems",
    "traces",
    "formatted",
    "verified",
    "unique",
    "clean",
    "student",
    "eval-student",
    "eval-teacher",
    "export",
];

/// The shipped quickstart config with its files and sizes swapped for small ones.
fn small_quickstart() -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(repo.join("examples/quickstart.toml")).unwrap();
    let data = repo.join("data/quickstart");
    let swaps = [
        (
            "data/quickstart/arithmetic-train.jsonl",
            "train.jsonl".to_string(),
        ),
        (
            "data/quickstart/arithmetic-test.jsonl",
            "test.jsonl".to_string(),
        ),
        (
            "data/quickstart/student-config.json",
            data.join("student-config.json").display().to_string(),
        ),
        (
            "data/quickstart/tokenizer\"",
            format!("{}\"", data.join("tokenizer").display()),
        ),
        ("checkpoint_every = 200", "checkpoint_every = 2".into()),
        ("max_tokens = 160", "max_tokens = 24".into()),
    ];
    let mut text = text;
    for (from, to) in swaps {
        assert!(
            text.contains(from),
            "examples/quickstart.toml no longer has {from}"
        );
        text = text.replace(from, &to);
    }
    text
}

/// A scratch directory holding the small quickstart and its problems.
fn setup() -> Workdir {
    let w = Workdir::new();
    w.write("quickstart.toml", &small_quickstart());
    w.run(&[
        "synth",
        "arithmetic",
        "--n",
        "48",
        "--seed",
        "3",
        "--out",
        "train.jsonl",
        "--test-n",
        "6",
        "--test-out",
        "test.jsonl",
        "--plant",
        "2",
    ])
    .ok();
    w
}

/// What a finished run must agree on: the funnel and the scores, as JSON.
fn outcome(w: &Workdir) -> (Value, Value) {
    let json = |args: &[&str]| -> Value {
        serde_json::from_str(&w.run(args).ok().stdout()).expect("JSON output")
    };
    let funnel = json(&["funnel", "quickstart", "--json"]);
    let scores = json(&["scores", "quickstart", "--json"]);
    assert!(
        w.path()
            .join("runs/quickstart/export/config.json")
            .is_file(),
        "no export"
    );
    (funnel, scores)
}

#[test]
fn the_quickstart_killed_at_any_stage_resumes_to_the_same_funnel_and_scores() {
    let straight = setup();
    straight.run(&["run", "quickstart.toml"]).ok();
    let expected = outcome(&straight);
    // The small run exercises what the real one does: every curation stage removes
    // something, and the student is scored before and after training.
    let funnel = expected.0["stages"].as_array().unwrap();
    for (stage, reason) in [
        ("formatted", "truncated"),
        ("verified", "incorrect"),
        ("unique", "exact_duplicate"),
        ("clean", "contaminated"),
    ] {
        let row = funnel.iter().find(|s| s["name"] == stage).unwrap();
        assert!(
            row["dropped"][reason].as_i64().unwrap_or(0) > 0,
            "{stage} dropped no {reason}: {:#}",
            expected.0
        );
    }
    let rows = expected.1["groups"][0]["rows"].as_array().unwrap();
    let steps: Vec<Option<i64>> = rows.iter().map(|r| r["step"].as_i64()).collect();
    assert!(
        steps.contains(&Some(0)) && steps.iter().flatten().any(|&s| s > 0),
        "{:#}",
        expected.1
    );

    for stage in STAGES {
        let w = setup();
        let killed = w
            .cmd(&["run", "quickstart.toml"])
            .env("DISTILL_TEST_SIGKILL_AT", stage)
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            killed.status.signal(),
            Some(libc::SIGKILL),
            "not killed at {stage}: {}",
            String::from_utf8_lossy(&killed.stderr)
        );
        w.run(&["resume", "quickstart"]).ok();
        assert_eq!(outcome(&w), expected, "killed at the start of {stage}");
    }
}
