//! load → generate (fake teacher) → train on a tiny model: metrics per step,
//! checkpoints recorded, the final model in HF layout, and exact resume after SIGKILL.

use std::path::Path;
use std::time::Duration;

use distill_fake_teacher::{FakeConfig, FakeTeacher, Reply, ReplyInput};

use crate::common::*;

pub(crate) fn prompts(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"problem\": \"What is {i} + {i}?\", \"answer\": \"{}\"}}\n",
                2 * i
            )
        })
        .collect()
}

pub(crate) fn reply(input: &ReplyInput<'_>) -> Reply {
    let i: i64 = input
        .prompt
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    Reply {
        reasoning: format!("{i} plus {i} is {}.", 2 * i),
        answer: format!("\\boxed{{{}}}", 2 * i),
    }
}

fn config(url: &str, max_steps: usize, every: usize, extra: &str) -> String {
    format!(
        r#"
[run]
name = "sft"

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
name = "train"
kind = "train"
needs = ["traces"]
base_model = "model"
max_steps = {max_steps}
checkpoint_every = {every}
keep_last = 2
learning_rate = 3e-3
warmup_ratio = 0.1
micro_batch = {{ sequences = 4 }}
max_seq_len = 256
seed = 7
{extra}
"#
    )
}

/// The base model and every checkpoint of `train`, on the first training prompts.
const EVALS: &str = r#"
[[stage]]
name = "before"
kind = "evaluate"
benchmark = "prompts.jsonl"
model = "model"
limit = 4
temperature = 0.0
max_tokens = 24
prompt_template = "{prompt}"

[[stage]]
name = "after"
kind = "evaluate"
needs = ["train"]
benchmark = "prompts.jsonl"
student = "train"
limit = 4
temperature = 0.0
max_tokens = 24
prompt_template = "{prompt}"

[[stage]]
name = "export"
kind = "export"
needs = ["train", "after"]
student = "train"
"#;

fn setup(url: &str, max_steps: usize, every: usize, extra: &str) -> Workdir {
    let w = Workdir::new();
    tiny_model(&w.path().join("model"));
    w.write("prompts.jsonl", &prompts(16));
    w.write("pipeline.toml", &config(url, max_steps, every, extra));
    w
}

async fn run(w: &Workdir, args: &[&str]) -> Out {
    let mut cmd = w.cmd(args);
    tokio::task::spawn_blocking(move || Out(cmd.output().unwrap()))
        .await
        .unwrap()
}

fn final_weights(w: &Workdir) -> Vec<u8> {
    std::fs::read(w.path().join("runs/sft/train/final/model.safetensors"))
        .expect("final model written")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_records_steps_and_checkpoints_and_lowers_the_loss() {
    let server = FakeTeacher::start(FakeConfig::default().responder(reply))
        .await
        .unwrap();
    let w = setup(&server.url(), 40, 10, EVALS);
    run(&w, &["run", "pipeline.toml"]).await.ok();
    let db = w.db().await;
    let losses: Vec<f64> = sqlx::query_scalar("SELECT loss FROM train_metrics ORDER BY step")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(losses.len(), 40);
    let first = losses[..4].iter().sum::<f64>() / 4.0;
    let last = losses[36..].iter().sum::<f64>() / 4.0;
    assert!(last < first * 0.5, "loss went from {first:.3} to {last:.3}");
    // keep_last = 2: checkpoints 20 and 30 remain (10 was pruned), plus the final model.
    let ckpts: Vec<(i64, bool)> =
        sqlx::query_as("SELECT step, final FROM checkpoints ORDER BY step")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(ckpts, [(20, false), (30, false), (40, true)]);
    assert!(!w.path().join("runs/sft/train/checkpoint-10").exists());
    // The final folder is a model folder distill (and transformers) can load.
    let info = w.run(&["model", "info", "runs/sft/train/final", "--json"]);
    let info: serde_json::Value = serde_json::from_str(&info.ok().stdout()).unwrap();
    assert_eq!(info["architecture"], "Qwen2ForCausalLM");
    assert_eq!(info["has_tokenizer"], true);
    // The base model and each remaining checkpoint are scored under one protocol.
    let scores: serde_json::Value =
        serde_json::from_str(&w.run(&["scores", "--json"]).ok().stdout()).unwrap();
    let rows: Vec<(String, Option<i64>)> = scores["groups"][0]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["label"].as_str().unwrap().to_string(), r["step"].as_i64()))
        .collect();
    assert_eq!(
        rows,
        [
            ("model".to_string(), None),
            ("train@20".to_string(), Some(20)),
            ("train@30".to_string(), Some(30)),
            ("train@40".to_string(), Some(40)),
        ]
    );
    let by_step = w.path().join("scores.svg");
    w.run(&[
        "plot",
        "sft",
        "--scores",
        "--out",
        by_step.to_str().unwrap(),
    ])
    .ok();
    // The export stage wrote a Hugging Face folder with a card; `distill export` does the
    // same for any checkpoint.
    let exported = w.path().join("runs/sft/export");
    for f in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "README.md",
    ] {
        assert!(exported.join(f).is_file(), "export lacks {f}");
    }
    let generation: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(exported.join("generation_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(generation["temperature"], 0.6);
    assert_eq!(generation["top_p"], 0.95);
    let card = std::fs::read_to_string(exported.join("README.md")).unwrap();
    assert!(
        card.contains("**Base model:**") && card.contains("**Teacher:** `fake-r1`"),
        "{card}"
    );
    assert!(card.contains("| traces | generate | 16 | 16 |"), "{card}");
    assert!(
        card.contains("train@40"),
        "the card carries the scores: {card}"
    );
    let info: serde_json::Value = serde_json::from_str(
        &w.run(&["model", "info", "runs/sft/export", "--json"])
            .ok()
            .stdout(),
    )
    .unwrap();
    assert_eq!(info["dtype"], "bfloat16");
    let out = w.run(&[
        "export",
        "sft",
        "--student",
        "train",
        "--step",
        "30",
        "--out",
        "step30",
        "--dtype",
        "f32",
    ]);
    out.ok();
    let info: serde_json::Value =
        serde_json::from_str(&w.run(&["model", "info", "step30", "--json"]).ok().stdout()).unwrap();
    assert_eq!(info["dtype"], "float32");
    let missing = w.run(&[
        "export",
        "sft",
        "--student",
        "train",
        "--step",
        "10",
        "--out",
        "x",
    ]);
    assert!(
        missing.stderr().contains("no checkpoint at step 10"),
        "{}",
        missing.stderr()
    );
    transformers_loads(&exported);

    let svg = w.path().join("loss.svg");
    w.run(&["plot", "sft", "--out", svg.to_str().unwrap()]).ok();
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_training_run_killed_between_checkpoints_resumes_to_the_same_weights() {
    let server = FakeTeacher::start(FakeConfig::default().responder(reply))
        .await
        .unwrap();
    let (steps, every) = (300, 40);
    let straight = setup(&server.url(), steps, every, "");
    run(&straight, &["run", "pipeline.toml"]).await.ok();
    let expected = final_weights(&straight);

    let w = setup(&server.url(), steps, every, "");
    let db = w
        .run_until_killed(
            &["run", "pipeline.toml"],
            "SELECT COUNT(*) FROM train_metrics",
            (every + every / 2) as i64,
            Duration::from_secs(120),
        )
        .await;
    let done = poll_count(&db, "SELECT COUNT(*) FROM train_metrics").await;
    assert!(done < steps as i64, "training finished before the kill");
    let saved = poll_count(&db, "SELECT COUNT(*) FROM checkpoints").await;
    assert!(saved >= 1, "no checkpoint before the kill");

    run(&w, &["resume", "sft"]).await.ok();
    assert_eq!(
        poll_count(&db, "SELECT COUNT(*) FROM train_metrics").await,
        steps as i64
    );
    assert!(
        final_weights(&w) == expected,
        "resumed weights differ from an uninterrupted run"
    );
    server.shutdown().await;
}

/// Where Python has transformers, the exported folder loads with AutoModelForCausalLM
/// and its chat template opens the assistant turn with `<think>`; elsewhere this says
/// it was skipped.
fn transformers_loads(dir: &Path) {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import transformers, torch"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: python3 with transformers and torch is not installed");
        return;
    }
    let script = r#"
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(d)
tok = AutoTokenizer.from_pretrained(d)
text = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True)
assert text.endswith("<think>\n"), repr(text[-40:])
ids = tok(text, return_tensors="pt").input_ids
out = model(ids).logits
print("ok", tuple(out.shape))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "transformers could not load {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_of_an_untrained_student_holds_the_parity_fixture_tensors_exactly() {
    // With a learning rate of 0 the weights cannot move: the export must reproduce the
    // transformers-made fixture tensor for tensor, so it has the fixture's logits
    // (matched against transformers by the student crate's parity test).
    let server = FakeTeacher::start(FakeConfig::default().responder(reply))
        .await
        .unwrap();
    let w = setup(&server.url(), 2, 0, "");
    let text = std::fs::read_to_string(w.path().join("pipeline.toml"))
        .unwrap()
        .replace("learning_rate = 3e-3", "learning_rate = 0.0");
    w.write("pipeline.toml", &text);
    run(&w, &["run", "pipeline.toml"]).await.ok();
    w.run(&[
        "export",
        "sft",
        "--student",
        "train",
        "--out",
        "exported",
        "--dtype",
        "f32",
    ])
    .ok();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixture =
        std::fs::read(root.join("student/tests/fixtures/parity/qwen2-tied/model.safetensors"))
            .unwrap();
    let exported = std::fs::read(w.path().join("exported/model.safetensors")).unwrap();
    let a = safetensors::SafeTensors::deserialize(&fixture).unwrap();
    let b = safetensors::SafeTensors::deserialize(&exported).unwrap();
    let mut names: Vec<String> = a.names().into_iter().map(String::from).collect();
    names.sort();
    let mut exported_names: Vec<String> = b.names().into_iter().map(String::from).collect();
    exported_names.sort();
    assert_eq!(names, exported_names);
    for name in &names {
        let (x, y) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
        assert_eq!(x.shape(), y.shape(), "{name}");
        assert_eq!(x.data(), y.data(), "{name} differs");
    }
    server.shutdown().await;
}

/// Final weights of `train` as f32 tensors by name.
fn final_tensors(w: &Workdir) -> Vec<(String, Vec<f32>)> {
    let bytes = final_weights(w);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, vals)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_parallel_replicas_train_like_one_device_and_bad_devices_are_refused() {
    let server = FakeTeacher::start(FakeConfig::default().responder(reply))
        .await
        .unwrap();
    let one = setup(&server.url(), 12, 0, "grad_accum = 2");
    run(&one, &["run", "pipeline.toml"]).await.ok();
    let two = setup(&server.url(), 12, 0, "grad_accum = 2\ndevices = [0, 1]");
    run(&two, &["run", "pipeline.toml"]).await.ok();
    let losses = |db: sqlx::SqlitePool| async move {
        let v: Vec<f64> = sqlx::query_scalar("SELECT loss FROM train_metrics ORDER BY step")
            .fetch_all(&db)
            .await
            .unwrap();
        v
    };
    let devices = |w: &Workdir| {
        let status = w.status(Some("sft"));
        stage(&status, "train")["summary"]["devices"].clone()
    };
    assert_eq!((devices(&one), devices(&two)), (1.into(), 2.into()));
    let (a, b) = (losses(one.db().await).await, losses(two.db().await).await);
    assert_eq!(a.len(), 12);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * x, "{a:?} vs {b:?}");
    }
    for ((name, x), (_, y)) in final_tensors(&one).iter().zip(&final_tensors(&two)) {
        let d = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-5, "{name}: max |diff| {d:.2e}");
    }

    // The devices are not part of the stage's identity: the same run on one device reuses
    // the two-replica training instead of paying for it again.
    two.write(
        "pipeline.toml",
        &config(&server.url(), 12, 0, "grad_accum = 2"),
    );
    let out = run(&two, &["run", "pipeline.toml"]).await;
    out.ok();
    assert_eq!(devices(&two), serde_json::json!(2), "{}", out.stderr());
    assert_eq!(losses(two.db().await).await, b);

    let base = config(&server.url(), 4, 0, "");
    let cases = [
        (
            format!("{base}devices = []\n"),
            "devices: name at least one device",
        ),
        (
            format!("{base}devices = [0, 0]\n"),
            "devices: device 0 is named twice",
        ),
        (
            format!("{base}devices = [0, 1]\ngrad_accum = 3\n"),
            "grad_accum: 3 micro-batches per step cannot be shared evenly by 2 devices",
        ),
    ];
    assert_invalid_configs(&one, &cases);
    server.shutdown().await;
}

/// A run of `steps` steps SIGKILLed once two checkpoints (`every` apart, `keep_last = 2`)
/// are recorded, with the folders of its recorded intermediate checkpoints, newest last.
async fn killed_after_two_checkpoints(
    url: &str,
    steps: usize,
    every: usize,
) -> (Workdir, Vec<std::path::PathBuf>) {
    let w = setup(url, steps, every, "");
    // Checkpoint events follow their step's metrics on one channel, so once step
    // 2 * every + 1 is recorded, so are the checkpoints at every and 2 * every.
    let db = w
        .run_until_killed(
            &["run", "pipeline.toml"],
            "SELECT COUNT(*) FROM train_metrics",
            (2 * every) as i64 + 1,
            Duration::from_secs(120),
        )
        .await;
    let done = poll_count(&db, "SELECT COUNT(*) FROM train_metrics").await;
    assert!(done < steps as i64, "training finished before the kill");
    let paths: Vec<String> =
        sqlx::query_scalar("SELECT path FROM checkpoints WHERE NOT final ORDER BY step")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(paths.len(), 2, "keep_last = 2 leaves two checkpoints");
    (w, paths.into_iter().map(Into::into).collect())
}

/// Cuts a file to half its length, as a crash before the data reached the disk leaves it.
fn truncate_half(path: &Path) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len / 2).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_newest_checkpoint_is_skipped_and_training_resumes_from_the_one_before() {
    let server = FakeTeacher::start(FakeConfig::default().responder(reply))
        .await
        .unwrap();
    let (steps, every) = (100, 20);
    let straight = setup(&server.url(), steps, every, "");
    run(&straight, &["run", "pipeline.toml"]).await.ok();
    let expected = final_weights(&straight);

    let (w, checkpoints) = killed_after_two_checkpoints(&server.url(), steps, every).await;
    let newest = checkpoints.last().unwrap();
    let model = newest.join("model.safetensors");
    truncate_half(&model);

    let out = run(&w, &["resume", "sft"]).await;
    out.ok();
    let stderr = out.stderr();
    assert!(
        stderr.contains(&format!("checkpoint {} (step", newest.display()))
            && stderr.contains(&format!("{}: ", model.display()))
            && stderr.contains("damaged"),
        "no warning naming the damaged checkpoint and file:\n{stderr}"
    );
    assert!(
        final_weights(&w) == expected,
        "weights resumed past a damaged checkpoint differ from an uninterrupted run"
    );
    // Every step has one metrics row (the redone ones replaced), and the checkpoints are
    // those of an uninterrupted run: the damaged one was redone, not left for pruning or
    // evaluation to find.
    let db = w.db().await;
    let metrics: Vec<i64> = sqlx::query_scalar("SELECT step FROM train_metrics ORDER BY step")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(metrics, (1..=steps as i64).collect::<Vec<_>>());
    let ckpts: Vec<(i64, bool)> =
        sqlx::query_as("SELECT step, final FROM checkpoints ORDER BY step")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(ckpts, [(60, false), (80, false), (100, true)]);
    let folders = |w: &Workdir| {
        let mut names: Vec<String> = std::fs::read_dir(w.path().join("runs/sft/train"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(folders(&w), folders(&straight));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_fails_naming_every_damaged_file_when_no_checkpoint_is_intact() {
    let server = FakeTeacher::start(FakeConfig::default().responder(reply))
        .await
        .unwrap();
    let (steps, every) = (100, 20);
    let (w, checkpoints) = killed_after_two_checkpoints(&server.url(), steps, every).await;
    let (older, newest) = (&checkpoints[0], &checkpoints[1]);
    truncate_half(&newest.join("model.safetensors"));
    std::fs::remove_file(older.join("trainer_state.json")).unwrap();
    let db = w.db().await;
    let metrics_before = poll_count(&db, "SELECT COUNT(*) FROM train_metrics").await;

    let out = run(&w, &["resume", "sft"]).await;
    assert_ne!(out.code(), 0, "resume succeeded with no intact checkpoint");
    let stderr = out.stderr();
    for damaged in [
        newest.join("model.safetensors"),
        older.join("trainer_state.json"),
    ] {
        assert!(
            stderr.contains(&format!("{}: ", damaged.display())),
            "the error does not name {}:\n{stderr}",
            damaged.display()
        );
    }
    assert!(stderr.contains("no intact checkpoint"), "{stderr}");
    // Nothing was trained again from scratch, and the damaged checkpoints are left for
    // the user to restore.
    assert_eq!(
        poll_count(&db, "SELECT COUNT(*) FROM train_metrics").await,
        metrics_before
    );
    assert_eq!(poll_count(&db, "SELECT COUNT(*) FROM checkpoints").await, 2);
    assert!(older.is_dir() && newest.is_dir());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_refuses_a_damaged_final_model_naming_the_file() {
    let server = FakeTeacher::start(FakeConfig::default().responder(reply))
        .await
        .unwrap();
    let w = setup(&server.url(), 2, 0, "");
    run(&w, &["run", "pipeline.toml"]).await.ok();
    let model = w.path().join("runs/sft/train/final/model.safetensors");
    truncate_half(&model);
    let out = w.run(&["export", "sft", "--student", "train", "--out", "x"]);
    assert_ne!(out.code(), 0, "exported a damaged model");
    assert!(
        out.stderr().contains("is damaged")
            && out.stderr().contains(&format!("{}: ", model.display())),
        "{}",
        out.stderr()
    );
    assert!(!w.path().join("x/model.safetensors").exists());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qlora_run_exports_the_merged_model_and_its_peft_adapter() {
    let server = FakeTeacher::start(FakeConfig::default().responder(reply))
        .await
        .unwrap();
    let lora = "lora = { rank = 4, alpha = 8.0, base_bits = 4 }";
    let w = setup(&server.url(), 3, 0, &lora.replace("= 4 }", "= 8 }"));
    let bad = w.run(&["validate", "pipeline.toml"]);
    assert_ne!(bad.code(), 0);
    assert!(
        bad.stderr().contains("lora.base_bits") && bad.stderr().contains("8 is not supported"),
        "{}",
        bad.stderr()
    );
    w.write("pipeline.toml", &config(&server.url(), 3, 0, lora));
    run(&w, &["run", "pipeline.toml"]).await.ok();
    // The final folder is a plain HF model (the adapter in a subfolder, where transformers
    // does not mistake the folder for a PEFT one).
    let fin = w.path().join("runs/sft/train/final");
    assert!(fin.join("model.safetensors").is_file());
    assert!(!fin.join("adapter_config.json").exists());
    assert!(fin.join("adapter/adapter_model.safetensors").is_file());
    w.run(&["export", "sft", "--student", "train", "--out", "merged"])
        .ok();
    transformers_loads(&w.path().join("merged"));
    w.run(&[
        "export",
        "sft",
        "--student",
        "train",
        "--out",
        "peft",
        "--adapter",
    ])
    .ok();
    let peft = w.path().join("peft");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "README.md",
    ] {
        assert!(peft.join(f).is_file(), "{f} missing");
    }
    assert!(!peft.join("model.safetensors").exists());
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (settings["peft_type"].as_str(), settings["r"].as_u64()),
        (Some("LORA"), Some(4))
    );
    let card = std::fs::read_to_string(peft.join("README.md")).unwrap();
    assert!(card.contains("library_name: peft"), "{card}");
    let adapter = std::fs::read(peft.join("adapter_model.safetensors")).unwrap();
    let names = safetensors::SafeTensors::deserialize(&adapter)
        .unwrap()
        .names()
        .len();
    assert_eq!(names, 2 * 7 * 2, "A and B for 7 modules of 2 layers");

    // A fully fine-tuned student has no adapter to export.
    w.write("pipeline.toml", &config(&server.url(), 3, 0, ""));
    run(&w, &["run", "pipeline.toml"]).await.ok();
    let out = w.run(&[
        "export",
        "sft",
        "--student",
        "train",
        "--out",
        "none",
        "--adapter",
    ]);
    assert_ne!(out.code(), 0);
    assert!(
        out.stderr().contains("holds no LoRA adapter"),
        "{}",
        out.stderr()
    );
    assert!(!w.path().join("none/adapter_model.safetensors").exists());
    server.shutdown().await;
}
