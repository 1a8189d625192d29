//! The foundation: config validation, the DAG executor, resumability, the CLI.

use std::time::Duration;

use crate::common::*;

const PROMPTS: &str = r#"{"problem": "What is 1+1?", "answer": "2", "id": "a"}
{"problem": "What is 2+3?", "answer": "5", "id": "b"}
{"problem": "What is 7*6?", "answer": "42", "id": "c"}
"#;

/// load → {left, right} → join: a diamond, so that concurrency and partial reruns show.
fn diamond(left_prefix: &str, delay_ms: u64) -> String {
    format!(
        r#"
[run]
name = "diamond"

[[stage]]
name = "prompts"
kind = "load"
path = "prompts.jsonl"
id_field = "id"

[[stage]]
name = "left"
kind = "test_items"
needs = ["prompts"]
count = 6
prefix = "{left_prefix}"
delay_ms = {delay_ms}

[[stage]]
name = "right"
kind = "test_items"
needs = ["prompts"]
count = 4
prefix = "right"
delay_ms = {delay_ms}

[[stage]]
name = "join"
kind = "test_items"
needs = ["left", "right"]
count = 3
prefix = "join"
"#
    )
}

fn setup(config: &str) -> Workdir {
    let w = Workdir::new();
    w.write("prompts.jsonl", PROMPTS);
    w.write("pipeline.toml", config);
    w
}

#[test]
fn a_multi_stage_config_runs_to_done_and_status_reports_each_stage() {
    let w = setup(&diamond("left", 0));
    let out = w.run(&["run", "pipeline.toml"]);
    out.ok();
    assert!(out.stdout().contains("join"), "{}", out.stdout());

    let status = w.status(None);
    assert_eq!(status["run"]["name"], "diamond");
    assert_eq!(status["run"]["status"], "done");
    let expect = [("prompts", 3), ("left", 6), ("right", 4), ("join", 3)];
    assert_eq!(status["stages"].as_array().unwrap().len(), expect.len());
    for (name, items) in expect {
        let s = stage(&status, name);
        assert_eq!(s["status"], "done", "{name}");
        assert_eq!(s["items_done"], items, "{name}");
        assert_eq!(s["attempts"], 1, "{name}");
    }
    // Topological order: prompts first, join last.
    assert_eq!(status["stages"][0]["name"], "prompts");
    assert_eq!(status["stages"][3]["name"], "join");
    assert_eq!(
        stage(&status, "join")["needs"],
        serde_json::json!(["left", "right"])
    );

    let runs: serde_json::Value =
        serde_json::from_str(&w.run(&["runs", "--json"]).ok().stdout()).unwrap();
    assert_eq!(runs["runs"][0]["name"], "diamond");
    assert_eq!(runs["runs"][0]["stages_done"], 4);
    // The run can be named by id as well as by name.
    assert_eq!(w.status(Some("1"))["run"]["name"], "diamond");
}

#[tokio::test]
async fn a_second_run_does_no_work_again() {
    let w = setup(&diamond("left", 0));
    w.run(&["run", "pipeline.toml"]).ok();
    let db = w.db().await;
    let before = prompt_rows(&db, "left").await;
    let first = w.status(None);

    w.run(&["run", "pipeline.toml"]).ok();
    let second = w.status(None);
    for s in ["prompts", "left", "right", "join"] {
        assert_eq!(stage(&second, s)["attempts"], 1, "{s} ran again");
        assert_eq!(
            stage(&second, s)["fingerprint"],
            stage(&first, s)["fingerprint"]
        );
    }
    assert_eq!(
        prompt_rows(&db, "left").await,
        before,
        "items were rewritten"
    );
}

#[tokio::test]
async fn editing_one_parameter_reruns_that_stage_and_its_descendants_only() {
    let w = setup(&diamond("left", 0));
    w.run(&["run", "pipeline.toml"]).ok();
    let db = w.db().await;
    let right_before = prompt_rows(&db, "right").await;
    let first = w.status(None);

    w.write("pipeline.toml", &diamond("LEFT", 0));
    w.run(&["run", "pipeline.toml"]).ok();
    let second = w.status(None);
    for s in ["prompts", "right"] {
        assert_eq!(
            stage(&second, s)["fingerprint"],
            stage(&first, s)["fingerprint"],
            "{s} should be untouched"
        );
    }
    for s in ["left", "join"] {
        assert_ne!(
            stage(&second, s)["fingerprint"],
            stage(&first, s)["fingerprint"],
            "{s} should be redone"
        );
        assert_eq!(stage(&second, s)["status"], "done");
    }
    assert_eq!(prompt_rows(&db, "right").await, right_before);
    let left = prompt_rows(&db, "left").await;
    assert_eq!(left.len(), 6);
    assert!(
        left.iter().all(|(_, _, p)| p.starts_with("LEFT-")),
        "{left:?}"
    );

    // Spelling out a default value changes nothing.
    let explicit = diamond("LEFT", 0).replace(
        "id_field = \"id\"",
        "id_field = \"id\"\nprompt_field = \"problem\"",
    );
    w.write("pipeline.toml", &explicit);
    w.run(&["run", "pipeline.toml"]).ok();
    let third = w.status(None);
    assert_eq!(
        stage(&third, "prompts")["fingerprint"],
        stage(&second, "prompts")["fingerprint"]
    );

    // Changing an input file's content reruns everything below it.
    w.write("prompts.jsonl", &PROMPTS.replace("7*6", "6*7"));
    w.run(&["run", "pipeline.toml"]).ok();
    let fourth = w.status(None);
    for s in ["prompts", "left", "right", "join"] {
        assert_ne!(
            stage(&fourth, s)["fingerprint"],
            stage(&third, s)["fingerprint"]
        );
    }
}

#[tokio::test]
async fn sigkill_mid_stage_then_resume_completes_without_duplicates() {
    let w = setup(
        &diamond("left", 0)
            .replace("count = 6", "count = 40")
            .replace(
                "prefix = \"left\"\ndelay_ms = 0",
                "prefix = \"left\"\ndelay_ms = 25",
            ),
    );
    // Wait for the database, then for `left` to be part-way through.
    let db = w
        .run_until_killed(&["run", "pipeline.toml"], "SELECT COUNT(*) FROM prompts p JOIN stages s ON s.id = p.stage_id WHERE s.name = \'left\'", 8, Duration::from_secs(30))
        .await;

    let partial = prompt_rows(&db, "left").await.len();
    assert!(partial < 40, "the stage finished before the kill");
    let status = w.status(None);
    assert_eq!(stage(&status, "left")["status"], "running");

    let out = w.run(&["resume", "diamond"]);
    out.ok();
    let rows = prompt_rows(&db, "left").await;
    let idx: Vec<i64> = rows.iter().map(|r| r.1).collect();
    assert_eq!(
        idx,
        (0..40).collect::<Vec<_>>(),
        "missing or duplicated items"
    );
    let status = w.status(None);
    assert_eq!(status["run"]["status"], "done");
    for s in ["prompts", "left", "right", "join"] {
        assert_eq!(stage(&status, s)["status"], "done", "{s}");
    }
    // The kill cost one attempt; items written before it were kept.
    assert_eq!(stage(&status, "left")["attempts"], 2);
    assert_eq!(
        stage(&status, "left")["summary"]["reused"]
            .as_i64()
            .unwrap(),
        partial as i64
    );
}

#[tokio::test]
async fn ctrl_c_stops_cleanly_and_resume_finishes() {
    let w = setup(&diamond("left", 40).replace("count = 6", "count = 30"));
    let child = w.spawn(&["run", "pipeline.toml"]);
    wait_until(Duration::from_secs(30), || async { w.db_path().exists() }).await;
    let db = w.db().await;
    wait_until(Duration::from_secs(30), || async {
        poll_count(&db, "SELECT COUNT(*) FROM prompts p JOIN stages s ON s.id = p.stage_id WHERE s.name = \'left\'").await >= 3
    })
    .await;
    interrupt(&child);
    let out = Out(child.wait_with_output().unwrap());
    assert_eq!(out.code(), 130, "stderr:\n{}", out.stderr());
    assert!(
        out.stderr().contains("distill resume diamond"),
        "{}",
        out.stderr()
    );

    let status = w.status(None);
    assert_eq!(status["run"]["status"], "interrupted");
    assert_eq!(stage(&status, "left")["status"], "pending");
    assert_eq!(stage(&status, "join")["status"], "pending");

    w.run(&["resume", "diamond"]).ok();
    let idx: Vec<i64> = prompt_rows(&db, "left").await.iter().map(|r| r.1).collect();
    assert_eq!(idx, (0..30).collect::<Vec<_>>());
    assert_eq!(w.status(None)["run"]["status"], "done");
}

#[test]
fn retryable_stages_are_retried_with_backoff() {
    let w = setup(&diamond("left", 0).replace(
        "prefix = \"right\"",
        "prefix = \"right\"\nfail_attempts = 2\nmax_attempts = 3",
    ));
    w.run(&["run", "pipeline.toml"]).ok();
    let status = w.status(None);
    assert_eq!(stage(&status, "right")["status"], "done");
    assert_eq!(stage(&status, "right")["attempts"], 3);
    assert_eq!(stage(&status, "right")["items_done"], 4);
}

#[test]
fn a_failed_stage_blocks_its_descendants_until_resume() {
    let w = setup(&diamond("left", 0).replace(
        "prefix = \"right\"",
        "prefix = \"right\"\nfail_attempts = 2",
    ));
    let out = w.run(&["run", "pipeline.toml"]);
    assert_eq!(out.code(), 1);
    assert!(
        out.stderr().contains("stage `right` failed"),
        "{}",
        out.stderr()
    );
    let status = w.status(None);
    assert_eq!(status["run"]["status"], "failed");
    assert_eq!(stage(&status, "right")["status"], "failed");
    assert!(
        stage(&status, "right")["error"]
            .as_str()
            .unwrap()
            .contains("planned failure")
    );
    assert_eq!(
        stage(&status, "left")["status"],
        "done",
        "independent stage ran"
    );
    assert_eq!(stage(&status, "join")["status"], "pending");

    assert_eq!(w.run(&["resume", "diamond"]).code(), 1); // attempt 2 fails too
    w.run(&["resume", "diamond"]).ok(); // attempt 3 succeeds
    let status = w.status(None);
    assert_eq!(stage(&status, "right")["attempts"], 3);
    assert_eq!(stage(&status, "join")["status"], "done");
}

#[test]
fn bad_configs_name_the_culprit_and_leave_the_database_unchanged() {
    let w = setup(&diamond("left", 0));
    w.run(&["run", "pipeline.toml"]).ok();
    let good = diamond("left", 0);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown key in a stage",
            good.replace("id_field = \"id\"", "id_feild = \"id\""),
            "stage `prompts` (load): id_feild: unknown field `id_feild`",
        ),
        (
            "unknown top-level table",
            format!("{good}\n[extra]\nx = 1\n"),
            "unknown field `extra`",
        ),
        (
            "unknown key in [run]",
            good.replace(
                "name = \"diamond\"",
                "name = \"diamond\"\ndatabase = \"x.db\"",
            ),
            "unknown field `database`",
        ),
        (
            "unknown stage kind",
            good.replace("kind = \"load\"", "kind = \"lode\""),
            "stage `prompts`: kind: unknown stage kind `lode`",
        ),
        (
            "duplicate names",
            good.replace("name = \"right\"", "name = \"left\""),
            "stage `left`: duplicate name",
        ),
        (
            "needs a missing stage",
            good.replace(
                "needs = [\"left\", \"right\"]",
                "needs = [\"left\", \"rigth\"]",
            ),
            "stage `join`: needs: no stage named `rigth`",
        ),
        (
            "a cycle",
            good.replace(
                "name = \"left\"\nkind = \"test_items\"\nneeds = [\"prompts\"]",
                "name = \"left\"\nkind = \"test_items\"\nneeds = [\"join\"]",
            ),
            "cycle between stages: `left` → `join` → `left`",
        ),
        (
            "a missing required parameter",
            good.replace("path = \"prompts.jsonl\"\n", ""),
            "stage `prompts` (load): path: missing field `path`",
        ),
        (
            "a wrong type",
            good.replace("count = 4", "count = \"four\""),
            "stage `right` (test_items): count: invalid type: string \"four\"",
        ),
        (
            "a missing input file",
            good.replace("prompts.jsonl", "nope.jsonl"),
            "stage `prompts` (load): path: no such file",
        ),
        (
            "TOML syntax",
            good.replace("count = 4", "count = = 4"),
            "line 23",
        ),
    ];
    for (what, config, expected) in cases {
        let before = w.db_snapshot();
        w.write("bad.toml", &config);
        let out = w.run(&["run", "bad.toml"]);
        assert_eq!(
            out.code(),
            2,
            "{what}: exit code; stderr:\n{}",
            out.stderr()
        );
        assert!(
            out.stderr().contains(expected),
            "{what}: expected `{expected}` in:\n{}",
            out.stderr()
        );
        assert!(out.stderr().contains("bad.toml"), "{what}: names the file");
        assert_eq!(w.db_snapshot(), before, "{what}: database changed");

        let v = w.run(&["validate", "bad.toml"]);
        assert_eq!(v.code(), 2, "{what}: validate exit code");
        assert!(
            v.stderr().contains(expected),
            "{what}: validate: {}",
            v.stderr()
        );
    }
}

#[tokio::test]
async fn a_malformed_input_line_fails_before_anything_is_written() {
    let w = setup(&diamond("left", 0));
    w.write(
        "prompts.jsonl",
        "{\"problem\": \"ok\", \"id\": \"a\"}\n{\"problem\": \"broken\", \"id\": \n",
    );
    let out = w.run(&["run", "pipeline.toml"]);
    assert_ne!(out.code(), 0);
    assert!(
        out.stderr().contains("prompts.jsonl:2"),
        "names file and line: {}",
        out.stderr()
    );
    assert!(!w.db_path().exists(), "a database was created");
}

#[test]
fn validate_prints_the_plan() {
    let w = setup(&diamond("left", 0));
    let out = w.run(&["validate", "pipeline.toml"]);
    out.ok();
    assert!(out.stdout().contains("4 stages"), "{}", out.stdout());
    let json: serde_json::Value = serde_json::from_str(
        &w.run(&["validate", "pipeline.toml", "--json"])
            .ok()
            .stdout(),
    )
    .unwrap();
    assert_eq!(json["valid"], true);
    assert_eq!(json["stages"][3]["name"], "join");
    assert!(!w.db_path().exists(), "validate must not create a database");
}

#[test]
fn inspection_commands_explain_a_missing_database_or_run() {
    let w = setup(&diamond("left", 0));
    let out = w.run(&["status"]);
    assert_eq!(out.code(), 1);
    assert!(out.stderr().contains("no job database"), "{}", out.stderr());
    w.run(&["run", "pipeline.toml"]).ok();
    let out = w.run(&["resume", "nonesuch"]);
    assert!(out.stderr().contains("no run named or numbered `nonesuch`"));
}

/// The R1-distill recipes validate without their models (warnings name what is
/// missing), but running one without them stops before the database is created.
#[test]
fn a_recipe_without_its_model_validates_with_a_warning_and_refuses_to_run() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let w = Workdir::new();
    std::os::unix::fs::symlink(root.join("data"), w.path().join("data")).unwrap();
    let config = root.join("examples/r1-distill-qwen-1.5b.toml");
    let config = config.to_str().unwrap();
    let v = w.run(&["validate", config]);
    v.ok();
    assert!(
        v.stderr()
            .contains("warning: stage `sft` (train): base_model:")
            && v.stderr().contains("Qwen2.5-Math-1.5B has no config.json"),
        "{}",
        v.stderr()
    );
    let r = w.run(&["run", config]);
    assert_eq!(r.code(), 1, "{}", r.stderr());
    assert!(
        r.stderr().contains("stage `sft`: base_model:")
            && r.stderr().contains("has no config.json"),
        "{}",
        r.stderr()
    );
    assert!(!w.db_path().exists(), "the database was created");
}

#[test]
fn the_shipped_example_configs_validate() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_distill"))
                .args(["validate", path.to_str().unwrap()])
                .current_dir(root)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
