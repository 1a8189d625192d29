//! Training across processes as torchrun starts them: two real `distill` processes on
//! loopback, told their place by torchrun's variables, train to the same weights as one
//! process.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::common::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datasets/openr1-math")
}

/// An imported, verified set trained for 4 steps of 2 accumulated micro-batches; `devices`
/// is spliced into the train stage.
fn pipeline(devices: &str) -> String {
    format!(
        r#"
[run]
name = "dist"

[[stage]]
name = "r1math"
kind = "import"
preset = "openr1-math"
path = "published/data/train-*.parquet"

[[stage]]
name = "verified"
kind = "verify"
needs = ["r1math"]

[[stage]]
name = "student"
kind = "train"
needs = ["verified"]
base_model = "model"
max_steps = 4
learning_rate = 1e-3
micro_batch = {{ sequences = 2 }}
grad_accum = 2
max_seq_len = 256
seed = 3
{devices}

# A second student beside the first: the DAG runs both at once, the processes take them in turn.
[[stage]]
name = "student2"
kind = "train"
needs = ["verified"]
base_model = "model"
max_steps = 2
learning_rate = 2e-3
micro_batch = {{ sequences = 2 }}
grad_accum = 2
max_seq_len = 256
seed = 5
{devices}
"#
    )
}

fn workdir(devices: &str) -> Workdir {
    let w = Workdir::new();
    let data = w.path().join("published/data");
    std::fs::create_dir_all(&data).unwrap();
    for entry in std::fs::read_dir(fixtures().join("data")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), data.join(entry.file_name())).unwrap();
    }
    tiny_model(&w.path().join("model"));
    w.write("pipeline.toml", &pipeline(devices));
    w
}

fn final_weights(w: &Workdir) -> Vec<u8> {
    std::fs::read(w.path().join("runs/dist/student/final/model.safetensors")).unwrap()
}

fn final_weights_2(w: &Workdir) -> Vec<u8> {
    std::fs::read(w.path().join("runs/dist/student2/final/model.safetensors")).unwrap()
}

async fn losses(w: &Workdir) -> Vec<f64> {
    sqlx::query_scalar(
        "SELECT m.loss FROM train_metrics m JOIN stages s ON s.id = m.stage_id
         WHERE s.name = 'student' ORDER BY m.step",
    )
    .fetch_all(&w.db().await)
    .await
    .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `distill run pipeline.toml` in `w` as `n` processes with torchrun's variables.
async fn launch(w: &Workdir, n: usize) -> Vec<Out> {
    let port = free_port().to_string();
    let children: Vec<_> = (0..n)
        .map(|rank| {
            let mut c = w.cmd(&["run", "pipeline.toml"]);
            c.env("WORLD_SIZE", n.to_string())
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(|c| Out(c.wait_with_output().unwrap()))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn sharded_processes_checkpoint_and_train_as_sharded_replicas_do() {
    // The optimizer state divided between two processes, a checkpoint every 2 steps (each
    // rank sends rank 0 its part): the same steps, checkpoints and weights as two sharded
    // replicas in one process.
    let keys = "sharding = \"optimizer\"\ncheckpoint_every = 2";
    let replicas = workdir(&format!("devices = [0, 1]\n{keys}"));
    let mut cmd = replicas.cmd(&["run", "pipeline.toml"]);
    tokio::task::spawn_blocking(move || Out(cmd.output().unwrap()))
        .await
        .unwrap()
        .ok();
    let two = workdir(keys);
    for out in launch(&two, 2).await {
        out.ok();
    }
    assert_eq!(losses(&two).await, losses(&replicas).await);
    assert!(final_weights(&two) == final_weights(&replicas));
    // Each rank wrote its part of the optimizer state into rank 0's checkpoint; together
    // they hold what one process's single file does (the same entries, one header each).
    let size = |w: &Workdir, f: &str| {
        std::fs::metadata(w.path().join("runs/dist/student/checkpoint-2").join(f)).map(|m| m.len())
    };
    let whole = size(&replicas, "optimizer.mpk").unwrap();
    let parts: Vec<u64> = [
        "optimizer-00000-of-00002.mpk",
        "optimizer-00001-of-00002.mpk",
    ]
    .iter()
    .map(|f| size(&two, f).unwrap())
    .collect();
    assert!(size(&two, "optimizer.mpk").is_err());
    // (Whole tensors are dealt out: this tiny model's tied embedding makes one part most of it.)
    assert!(
        parts.iter().all(|&p| p > 0 && p < whole),
        "{parts:?} of {whole}"
    );
    assert!(
        parts.iter().sum::<u64>().abs_diff(whole) < 1024,
        "{parts:?} of {whole}"
    );
}

#[tokio::test]
async fn two_processes_on_loopback_train_as_one_process_does() {
    // One process with two replicas, and one with one device: the references.
    let replicas = workdir("devices = [0, 1]");
    let one = workdir("");
    for w in [&replicas, &one] {
        let mut cmd = w.cmd(&["run", "pipeline.toml"]);
        let out = tokio::task::spawn_blocking(move || Out(cmd.output().unwrap()))
            .await
            .unwrap();
        out.ok();
    }

    // Two processes in one folder, as torchrun starts them on one node.
    let two = workdir("");
    let outs = launch(&two, 2).await;
    for out in &outs {
        out.ok();
    }
    // Rank 0 alone reported the run; rank 1 trained and said nothing on stdout.
    assert!(outs[0].stdout().contains("student"), "{}", outs[0].stdout());
    assert!(outs[1].stdout().trim().is_empty(), "{}", outs[1].stdout());

    let (a, b, c) = (
        losses(&two).await,
        losses(&replicas).await,
        losses(&one).await,
    );
    assert_eq!(a.len(), 4);
    assert_eq!(
        a, b,
        "two processes step as two replicas of one process, bit for bit"
    );
    for (x, y) in a.iter().zip(&c) {
        assert!((x - y).abs() <= 1e-5 * y.abs(), "{a:?} vs one device {c:?}");
    }
    assert!(
        final_weights(&two) == final_weights(&replicas),
        "the final weights differ from one process's replicas"
    );
    assert!(
        final_weights_2(&two) == final_weights_2(&replicas),
        "the second student's final weights differ from one process's replicas"
    );
    let devices: String = sqlx::query_scalar(
        "SELECT json_extract(summary, '$.devices') FROM stages WHERE name = 'student'",
    )
    .fetch_one(&two.db().await)
    .await
    .map(|d: i64| d.to_string())
    .unwrap();
    assert_eq!(devices, "2");
}

#[tokio::test]
async fn a_failure_on_rank_0_reaches_every_process() {
    // The base model is missing: rank 0 refuses the run and rank 1, waiting for jobs, exits
    // non-zero with rank 0's error instead of waiting for the rendezvous timeout.
    let w = workdir("");
    std::fs::remove_dir_all(w.path().join("model")).unwrap();
    let outs = launch(&w, 2).await;
    assert_ne!(outs[0].code(), 0, "{}", outs[0].stderr());
    assert_ne!(outs[1].code(), 0, "{}", outs[1].stderr());
    let (e0, e1) = (outs[0].stderr(), outs[1].stderr());
    assert!(e0.contains("model"), "{e0}");
    assert!(
        e1.contains("training process 1 of 2") && e1.contains("training process 0 failed"),
        "{e1}"
    );
}
