//! load → generate (fake teacher) → a brief SFT → GRPO on the same prompts: figures per
//! step, rollouts kept for `distill traces`, checkpoints that `evaluate` and `export` take,
//! and exact resume after SIGKILL.

use std::time::Duration;

use distill_fake_teacher::{FakeConfig, FakeTeacher};

use crate::common::*;
use crate::train::{prompts, reply};

/// `steps` GRPO steps, two per generated batch (old log-probabilities in play), with a KL
/// term (a reference model in play) and a checkpoint every `every` steps.
fn config(url: &str, steps: usize, every: usize) -> String {
    format!(
        r#"
[run]
name = "rl"

[teacher.fake]
base_url = "{url}"
model = "fake-r1"

[[stage]]
name = "prompts"
kind = "load"
path = "prompts.jsonl"

[[stage]]
name = "traces"
kind = "generate"
needs = ["prompts"]
teacher = "fake"
prompt_template = "{{prompt}}"

[[stage]]
name = "sft"
kind = "train"
needs = ["traces"]
base_model = "model"
max_steps = 60
learning_rate = 3e-3
micro_batch = {{ sequences = 4 }}
max_seq_len = 256
seed = 7

[[stage]]
name = "grpo"
kind = "grpo"
needs = ["prompts", "sft"]
student = "sft"
prompt_template = "{{prompt}}"
steps = {steps}
prompts_per_step = 4
group_size = 4
updates_per_batch = 2
beta = 0.04
epsilon_high = 0.28
loss = "dapo"
max_completion_tokens = 24
overlong_buffer = 8
format_reward = 0.2
temperature = 1.0
learning_rate = 1e-3
micro_batch = 8
checkpoint_every = {every}
keep_last = 2
keep_rollouts = 6
seed = 3

[[stage]]
name = "after"
kind = "evaluate"
needs = ["grpo"]
benchmark = "prompts.jsonl"
student = "grpo"
include_base = true
limit = 4
temperature = 0.0
max_tokens = 24
prompt_template = "{{prompt}}"

[[stage]]
name = "export"
kind = "export"
needs = ["grpo", "after"]
student = "grpo"
"#
    )
}

async fn setup(url: &str, steps: usize, every: usize) -> Workdir {
    let w = Workdir::new();
    tiny_model(&w.path().join("model"));
    w.write("prompts.jsonl", &prompts(16));
    w.write("pipeline.toml", &config(url, steps, every));
    w
}

async fn run(w: &Workdir, args: &[&str]) -> Out {
    let mut cmd = w.cmd(args);
    tokio::task::spawn_blocking(move || Out(cmd.output().unwrap()))
        .await
        .unwrap()
}

fn final_weights(w: &Workdir) -> Vec<u8> {
    std::fs::read(w.path().join("runs/rl/grpo/final/model.safetensors"))
        .expect("final model written")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpo_records_its_steps_and_rollouts_and_a_killed_run_resumes_to_the_same_weights() {
    let server = FakeTeacher::start(FakeConfig::default().responder(reply))
        .await
        .unwrap();
    let (steps, every) = (12, 4);
    let straight = setup(&server.url(), steps, every).await;
    let out = run(&straight, &["run", "pipeline.toml"]).await;
    assert!(out.0.status.success(), "{}", out.stderr());
    let db = straight.db().await;
    let rows: Vec<(i64, i64, f64, f64, Option<f64>, f64)> = sqlx::query_as(
        "SELECT step, batch, reward_mean, reward_std, kl, completion_tokens FROM grpo_steps ORDER BY step",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(rows.len(), steps);
    assert_eq!(
        rows.iter().map(|r| r.1).collect::<Vec<_>>(),
        (0..steps as i64).map(|s| s / 2).collect::<Vec<_>>(),
        "two updates per generated batch"
    );
    assert!(
        rows.iter().any(|r| r.3 > 0.0),
        "some batch must have rewards to learn from: {rows:?}"
    );
    assert!(
        rows.iter().all(|r| r.4.is_some()),
        "KL recorded with beta > 0"
    );
    assert!(rows.iter().all(|r| r.5 > 0.0 && r.5 <= 24.0));
    let kept: i64 = poll_count(&db, "SELECT COUNT(*) FROM grpo_rollouts").await;
    assert_eq!(kept, 6 * (steps as i64 / 2), "keep_rollouts per batch");
    // The loss view covers it too.
    assert_eq!(
        poll_count(&db, "SELECT COUNT(*) FROM train_metrics t JOIN stages s ON s.id = t.stage_id WHERE s.name = 'grpo'").await,
        steps as i64
    );
    // The start (the SFT model, as step 0), the intermediate checkpoints and the final
    // policy were all scored.
    let targets: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT label FROM scores ORDER BY label")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(targets, ["grpo@0", "grpo@12", "grpo@4", "grpo@8"]);
    // GRPO moved the weights away from where it started.
    let start = std::fs::read(straight.path().join("runs/rl/sft/final/model.safetensors")).unwrap();
    let expected = final_weights(&straight);
    assert_ne!(start, expected, "GRPO changed nothing");
    let card = std::fs::read_to_string(straight.path().join("runs/rl/export/README.md")).unwrap();
    assert!(card.contains("GRPO"), "{card}");
    let traces = run(
        &straight,
        &["traces", "rl", "--stage", "grpo", "--limit", "3"],
    )
    .await;
    assert!(traces.0.status.success(), "{}", traces.stderr());
    assert!(traces.stdout().contains("reward"), "{}", traces.stdout());
    let plot = run(
        &straight,
        &["plot", "rl", "--stage", "grpo", "--out", "rl.svg"],
    )
    .await;
    assert!(plot.0.status.success(), "{}", plot.stderr());
    let svg = std::fs::read_to_string(straight.path().join("rl.svg")).unwrap();
    assert!(
        svg.contains("reward") && svg.contains("completion"),
        "no reward or length panel"
    );
    let status = run(&straight, &["status", "rl"]).await;
    assert!(status.stdout().contains("grpo"), "{}", status.stdout());

    let w = setup(&server.url(), steps, every).await;
    let db = w
        .run_until_killed(
            &["run", "pipeline.toml"],
            "SELECT COUNT(*) FROM grpo_steps",
            (every + every / 2) as i64,
            Duration::from_secs(180),
        )
        .await;
    let done = poll_count(&db, "SELECT COUNT(*) FROM grpo_steps").await;
    assert!(done < steps as i64, "GRPO finished before the kill");
    assert!(
        poll_count(&db, "SELECT COUNT(*) FROM checkpoints c JOIN stages s ON s.id = c.stage_id WHERE s.name = 'grpo'").await >= 1,
        "no GRPO checkpoint before the kill"
    );
    let out = run(&w, &["resume", "rl"]).await;
    assert!(out.0.status.success(), "{}", out.stderr());
    assert_eq!(
        poll_count(&db, "SELECT COUNT(*) FROM grpo_steps").await,
        steps as i64
    );
    assert!(
        final_weights(&w) == expected,
        "resumed weights differ from an uninterrupted run"
    );
    server.shutdown().await;
}

/// The GRPO quickstart validates as shipped (its run takes about 20 minutes: the README shows
/// its figures, made by the tool).
#[test]
fn the_grpo_quickstart_validates() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let w = Workdir::new();
    std::os::unix::fs::symlink(root.join("data"), w.path().join("data")).unwrap();
    let config = root.join("examples/quickstart-grpo.toml");
    let v = w.run(&["validate", config.to_str().unwrap()]);
    v.ok();
    assert!(!v.stderr().contains("warning"), "{}", v.stderr());
}
