//! `import`: published reasoning datasets (tiny made-up copies with the real layouts,
//! written by tests/fixtures/datasets/make_fixtures.py) recorded as a teacher's samples,
//! curated and trained on with no teacher configured, and exported back as a Hugging
//! Face Parquet dataset.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datasets")
}

/// A workdir with the fixture datasets copied in under `published/`.
fn workdir() -> Workdir {
    let w = Workdir::new();
    copy_dir(&fixtures(), &w.path().join("published"));
    w
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

const PRESETS: &str = r#"
[run]
name = "imports"

[[stage]]
name = "openr1"
kind = "import"
preset = "openr1-math"
path = "published/openr1-math/data/train-*.parquet"

[[stage]]
name = "openthoughts"
kind = "import"
preset = "openthoughts"
path = "published/openthoughts/data/train-*.parquet"

[[stage]]
name = "bespoke"
kind = "import"
preset = "bespoke-stratos"
path = "published/bespoke-stratos/data/*.parquet"

[[stage]]
name = "sky"
kind = "import"
preset = "sky-t1"
path = "published/sky-t1/Sky-T1_data_17k.json"

[[stage]]
name = "s1k"
kind = "import"
preset = "s1k-1.1"
path = "published/s1k-1.1/data/train-00000-of-00001.parquet"

[[stage]]
name = "limo"
kind = "import"
preset = "limo"
path = "published/limo/limo.jsonl"
"#;

/// (prompt, reference, sample, reasoning, answer, finish reason, extra) of a stage.
type Sample = (
    String,
    Option<String>,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
);

async fn samples(pool: &sqlx::SqlitePool, stage: &str) -> Vec<Sample> {
    sqlx::query_as(
        "SELECT p.prompt, p.answer, g.sample_index, g.reasoning, g.answer, g.finish_reason, g.extra
         FROM generations g JOIN prompts p ON p.id = g.prompt_id JOIN stages s ON s.id = g.stage_id
         WHERE s.name = ? ORDER BY p.idx, g.sample_index",
    )
    .bind(stage)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn presets_import_exact_counts_and_split_reasoning_from_answers() {
    let w = workdir();
    w.write("pipeline.toml", PRESETS);
    w.run(&["run", "pipeline.toml"]).ok();
    let db = w.db().await;
    // (stage, prompts, samples): OpenR1 rows hold 2, 2, 4 | 2, 3 traces over two shards.
    for (stage, n_prompts, n_samples) in [
        ("openr1", 5, 13),
        ("openthoughts", 3, 3),
        ("bespoke", 2, 2),
        ("sky", 2, 2),
        ("s1k", 2, 2),
        ("limo", 3, 3),
    ] {
        assert_eq!(prompt_rows(&db, stage).await.len(), n_prompts, "{stage}");
        assert_eq!(samples(&db, stage).await.len(), n_samples, "{stage}");
    }

    let r1 = samples(&db, "openr1").await;
    let (prompt, reference, _, reasoning, answer, finish, extra) = &r1[0];
    assert_eq!(prompt, "What is 2 + 2?");
    assert_eq!(reference.as_deref(), Some("4"));
    assert_eq!(reasoning, "I need 2 + 2. Adding, 2 + 2 = 4.");
    assert_eq!(answer, "The sum is \\boxed{4}.");
    assert_eq!(finish.as_deref(), Some("stop"));
    // The dataset's own flags are recorded with each sample, not acted on.
    let extra: Value = serde_json::from_str(extra.as_deref().unwrap()).unwrap();
    assert_eq!(extra["correctness_math_verify"], true);
    assert_eq!(extra["correctness_llama"], true);
    assert_eq!(extra["is_reasoning_complete"], true);
    let wrong: Value = serde_json::from_str(r1[1].6.as_deref().unwrap()).unwrap();
    assert_eq!(wrong["correctness_math_verify"], false);
    // A trace cut off inside its reasoning: all reasoning, no answer, finish `length`.
    let cut = &r1[3];
    assert_eq!((cut.0.as_str(), cut.2), ("What is 3 + 4?", 1));
    assert!(cut.3.ends_with("counting up from"), "{}", cut.3);
    assert_eq!(cut.4, "");
    assert_eq!(cut.5.as_deref(), Some("length"));
    // The second shard follows the first.
    assert_eq!(r1[8].0, "What is 6 + 1?");
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT source_id FROM prompts p JOIN stages s ON s.id = p.stage_id WHERE s.name = 'openr1' ORDER BY idx")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(ids[4], "00000000-0000-4000-8000-000000000005");
    let extra: String = sqlx::query_scalar(
        "SELECT extra FROM prompts p JOIN stages s ON s.id = p.stage_id WHERE s.name = 'openr1' ORDER BY idx LIMIT 1",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    let extra: Value = serde_json::from_str(&extra).unwrap();
    assert_eq!(extra["correctness_count"], 1);
    assert!(extra.get("messages").is_none(), "{extra}");
    // The teacher recorded is the dataset, the endpoint its file.
    let (model, endpoint): (String, String) = sqlx::query_as(
        "SELECT g.model, g.endpoint FROM generations g JOIN stages s ON s.id = g.stage_id
         WHERE s.name = 'openr1' ORDER BY g.id DESC LIMIT 1",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(model, "open-r1/OpenR1-Math-220k");
    assert_eq!(
        endpoint,
        "published/openr1-math/data/train-00001-of-00002.parquet"
    );

    // OpenThoughts-style markers: the thought is the reasoning, the solution the answer;
    // the prompt is the user turn and the shared system prompt is the stage's.
    for stage in ["openthoughts", "bespoke", "sky"] {
        let s = &samples(&db, stage).await[0];
        assert!(
            s.0.starts_with("Return your final response within \\boxed{}. What is"),
            "{}",
            s.0
        );
        assert!(
            s.3.starts_with("Okay, ") && !s.3.contains("<|"),
            "{stage}: {}",
            s.3
        );
        assert!(
            s.4.ends_with("\\boxed{6}.")
                || s.4.ends_with("\\boxed{3}.")
                || s.4.ends_with("\\boxed{2}."),
            "{stage}: {}",
            s.4
        );
        assert!(!s.4.contains("<|"), "{}", s.4);
    }
    let params: String =
        sqlx::query_scalar("SELECT params FROM stages WHERE name = 'openthoughts'")
            .fetch_one(&db)
            .await
            .unwrap();
    let params: Value = serde_json::from_str(&params).unwrap();
    assert!(
        params["system_prompt"]
            .as_str()
            .unwrap()
            .starts_with("Your role as an assistant"),
        "{params}"
    );
    assert_eq!(
        params["files"][0]["path"],
        "published/openthoughts/data/train-00000-of-00001.parquet"
    );

    // s1K: reasoning and answer from their own columns (R1's, not Gemini's).
    let s = &samples(&db, "s1k").await[0];
    assert_eq!(s.3, "Alright, 12 + 30: tens first, then ones. 42.");
    assert_eq!(s.4, "**Answer:** $\\boxed{42}$");
    assert_eq!(s.1.as_deref(), Some("42"));
    // LIMO's solution has no tags: all answer, as the teacher client would read it.
    let s = &samples(&db, "limo").await[0];
    assert_eq!((s.3.as_str(), s.1.as_deref()), ("", Some("42")));
    assert!(s.4.ends_with("$\\boxed{42}$."), "{}", s.4);

    // Rerunning imports nothing again; the traces show under `distill traces`.
    w.run(&["run", "pipeline.toml"]).ok();
    assert_eq!(samples(&db, "openr1").await.len(), 13);
    let traces = w.run(&["traces", "imports", "--stage", "s1k"]);
    assert!(
        traces.ok().stdout().contains("tens first"),
        "{}",
        traces.stdout()
    );
}

/// An explicit column mapping reads a layout no preset knows.
#[tokio::test]
async fn a_resumed_import_continues_after_its_last_committed_chunk() {
    let w = workdir();
    let one = PRESETS
        .split("[[stage]]")
        .take(2)
        .collect::<Vec<_>>()
        .join("[[stage]]");
    w.write("pipeline.toml", &one);
    w.run(&["run", "pipeline.toml"]).ok();
    let db = w.db().await;
    let whole = samples(&db, "openr1").await;
    let ids: Vec<i64> = prompt_rows(&db, "openr1")
        .await
        .iter()
        .map(|r| r.1)
        .collect();
    assert_eq!((ids.len(), whole.len()), (5, 13));

    // As a kill leaves it: the first chunks committed (here two prompts and their
    // samples; the fixture is one chunk), the stage not done.
    sqlx::query(
        "DELETE FROM prompts WHERE idx >= 2 AND stage_id = (SELECT id FROM stages WHERE name = 'openr1')",
    )
    .execute(&db)
    .await
    .unwrap();
    sqlx::query("UPDATE stages SET status = 'failed' WHERE name = 'openr1'")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("UPDATE runs SET status = 'failed'")
        .execute(&db)
        .await
        .unwrap();
    assert!(samples(&db, "openr1").await.len() < whole.len());
    db.close().await;

    w.run(&["resume", "imports"]).ok();
    let db = w.db().await;
    assert_eq!(samples(&db, "openr1").await, whole);
    let resumed: Vec<i64> = prompt_rows(&db, "openr1")
        .await
        .iter()
        .map(|r| r.1)
        .collect();
    assert_eq!(resumed, ids);
}

#[tokio::test]
async fn an_explicit_mapping_reads_any_layout() {
    let w = Workdir::new();
    w.write(
        "traces.jsonl",
        concat!(
            r#"{"q": "1+1?", "ref": 2, "think": "one and one", "final": "\\boxed{2}", "sys": "Be brief.", "ok": true}"#,
            "\n",
            r#"{"q": "2+2?", "ref": 4, "think": "two and two", "final": "\\boxed{4}", "sys": "Be brief.", "ok": false}"#,
            "\n"
        ),
    );
    w.write(
        "pipeline.toml",
        r#"
[run]
name = "mapped"

[[stage]]
name = "mine"
kind = "import"
path = "traces.jsonl"
dataset = "me/my-traces"
license = "cc-by-4.0"
columns = { prompt = "q", reasoning = "think", answer = "final", reference = "ref", system = "sys" }
"#,
    );
    w.run(&["run", "pipeline.toml"]).ok();
    let db = w.db().await;
    let s = samples(&db, "mine").await;
    assert_eq!(s.len(), 2);
    assert_eq!(
        (s[1].3.as_str(), s[1].4.as_str(), s[1].1.as_deref()),
        ("two and two", "\\boxed{4}", Some("4"))
    );
    let extra: String =
        sqlx::query_scalar("SELECT extra FROM prompts ORDER BY idx LIMIT 1 OFFSET 1")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(extra, r#"{"ok":false}"#);
}

const TRAIN: &str = r#"
[run]
name = "imported"

[[stage]]
name = "r1math"
kind = "import"
preset = "openr1-math"
path = "published/openr1-math/data/train-*.parquet"

[[stage]]
name = "formatted"
kind = "filter"
needs = ["r1math"]

[[stage]]
name = "verified"
kind = "verify"
needs = ["formatted"]

[[stage]]
name = "student"
kind = "train"
needs = ["verified"]
base_model = "model"
max_steps = 4
learning_rate = 1e-3
micro_batch = { sequences = 4 }
max_seq_len = 256
seed = 3

[[stage]]
name = "export"
kind = "export"
needs = ["student"]
student = "student"
"#;

/// Python with pyarrow, or `None` (the caller skips with a message).
fn python_with(module: &str) -> Option<&'static str> {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some("python3")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_set_is_curated_trained_and_exported_with_no_teacher() {
    let w = workdir();
    tiny_model(&w.path().join("model"));
    w.write("pipeline.toml", TRAIN);
    let mut cmd = w.cmd(&["run", "pipeline.toml"]);
    let out = tokio::task::spawn_blocking(move || Out(cmd.output().unwrap()))
        .await
        .unwrap();
    out.ok();
    let db = w.db().await;
    // verify drops the traces whose boxed answer is wrong or missing (3 wrong, 1 cut)
    // and keeps the rest: the dataset's own flags played no part.
    let kept: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM verdicts v JOIN stages s ON s.id = v.stage_id WHERE s.name = 'verified' AND v.kept",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(kept, 9);
    let steps: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM train_metrics")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(steps, 4);
    let card = std::fs::read_to_string(w.path().join("runs/imported/export/README.md")).unwrap();
    assert!(
        card.contains("the published dataset `open-r1/OpenR1-Math-220k`")
            && card.contains("| r1math | import of `open-r1/OpenR1-Math-220k` | 13 | 13 | - |")
            && card.contains("licence apache-2.0"),
        "{card}"
    );
    let funnel = w.run(&["funnel", "imported"]);
    assert!(
        funnel.ok().stdout().contains("r1math"),
        "{}",
        funnel.stdout()
    );

    // The curated set as a Hugging Face dataset, read back by pyarrow (and `datasets`).
    w.run(&[
        "dataset",
        "export",
        "imported",
        "verified",
        "--out",
        "curated.jsonl",
    ])
    .ok();
    w.run(&[
        "dataset",
        "export",
        "imported",
        "verified",
        "--out",
        "hf",
        "--format",
        "parquet",
        "--max-shard-mb",
        "0.001",
    ])
    .ok();
    w.run(&[
        "dataset", "export", "imported", "verified", "--out", "hf-sft", "--format", "parquet",
        "--form", "sft",
    ])
    .ok();
    let readme = std::fs::read_to_string(w.path().join("hf/README.md")).unwrap();
    assert!(
        readme.starts_with("---\nlicense: apache-2.0\n")
            && readme.contains("  - split: train\n    path: data/train-*\n")
            && readme.contains("    num_examples: 9\n")
            && readme.contains("| verified | verify | 12 | 9 |")
            && readme.contains("published dataset `open-r1/OpenR1-Math-220k`"),
        "{readme}"
    );
    let shards: Vec<_> = std::fs::read_dir(w.path().join("hf/data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(shards.len() > 1, "tiny --max-shard-mb shards: {shards:?}");
    assert!(
        shards
            .iter()
            .all(|s| s.ends_with(&format!("-of-{:05}.parquet", shards.len()))),
        "{shards:?}"
    );

    let Some(py) = python_with("pyarrow") else {
        eprintln!("SKIPPED: pyarrow is not installed; the Parquet export was not read back");
        return;
    };
    let check = r#"
import json, sys
import pyarrow.parquet as pq
rows = [json.loads(l) for l in open("curated.jsonl")]
t = pq.read_table("hf/data").to_pylist()
got = [{"id": r["id"], "messages": r["messages"]} for r in t]
assert got == rows, (got[:1], rows[:1])
sft = pq.read_table("hf-sft/data").to_pylist()
assert [r["prompt"] + r["completion"] for r in sft] == [r["messages"] for r in rows]
assert all(r["completion"][0]["role"] == "assistant" for r in sft)
try:
    import datasets
except ImportError:
    print("SKIPPED: datasets is not installed; pyarrow read the export")
    sys.exit(0)
ds = datasets.load_dataset("parquet", data_dir="hf/data", split="train")
assert [{"id": r["id"], "messages": r["messages"]} for r in ds] == rows
print("datasets read", len(ds), "rows")
"#;
    let out = Command::new(py)
        .args(["-c", check])
        .current_dir(w.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
}

/// A wrong column type, a missing column, a truncated file and an empty glob each fail
/// the run before anything is written, naming the file and the column.
#[test]
fn bad_inputs_name_file_and_column_and_leave_the_database_unchanged() {
    let w = workdir();
    let stage = |extra: &str| {
        format!(
            "[run]\nname = \"bad\"\n\n[[stage]]\nname = \"r1\"\nkind = \"import\"\npreset = \"openr1-math\"\n{extra}\n"
        )
    };
    w.write(
        "pipeline.toml",
        &stage("path = \"published/openr1-math/data/train-*.parquet\""),
    );
    w.run(&["run", "pipeline.toml"]).ok();

    let shard = w
        .path()
        .join("published/openr1-math/data/train-00001-of-00002.parquet");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::create_dir_all(w.path().join("cut")).unwrap();
    std::fs::write(
        w.path().join("cut/train-00000-of-00001.parquet"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let cases = [
        (
            stage(
                "path = \"published/openr1-math/data/train-*.parquet\"\ncolumns = { prompt = \"correctness_count\" }",
            ),
            vec![
                "train-00000-of-00002.parquet",
                "column `correctness_count`",
                "Int64",
                "expected string",
            ],
        ),
        (
            stage(
                "path = \"published/openr1-math/data/train-*.parquet\"\ncolumns = { prompt = \"question\" }",
            ),
            vec![
                "train-00000-of-00002.parquet",
                "column `question`",
                "is missing",
            ],
        ),
        (
            stage("path = \"cut/*.parquet\""),
            vec![
                "cut/train-00000-of-00001.parquet",
                "not a readable Parquet file",
            ],
        ),
        (
            stage("path = \"published/nothing/*.parquet\""),
            vec!["published/nothing/*.parquet", "no file matches"],
        ),
        (
            stage(
                "path = \"published/limo/limo.jsonl\"\ncolumns = { generations = \"question\", prompt = \"answer\", reference = \"solution\", id = \"nope\" }",
            ),
            vec!["limo.jsonl: row 1: column `nope`", "is missing"],
        ),
    ];
    for (text, expected) in cases {
        w.write("pipeline.toml", &text);
        let before = w.db_snapshot();
        let out = w.run(&["run", "pipeline.toml"]);
        assert_eq!(out.code(), 1, "{expected:?}: {}", out.stderr());
        for e in &expected {
            assert!(out.stderr().contains(e), "{e}: {}", out.stderr());
        }
        assert_eq!(
            w.db_snapshot(),
            before,
            "{expected:?}: the database changed"
        );
    }

    // A mapping that cannot work is a config error, found by `validate`.
    assert_invalid_configs(
        &w,
        &[
            (
                "[run]\nname = \"bad\"\n[[stage]]\nname = \"r1\"\nkind = \"import\"\npath = \"x.parquet\"\npreset = \"nonesuch\"\n".to_string(),
                "preset",
            ),
            (
                "[run]\nname = \"bad\"\n[[stage]]\nname = \"r1\"\nkind = \"import\"\npath = \"x.jsonl\"\ncolumns = { prompt = \"q\" }\n".to_string(),
                "an import needs traces",
            ),
            (
                "[run]\nname = \"bad\"\n[[stage]]\nname = \"r1\"\nkind = \"import\"\npath = \"x.jsonl\"\ncolumns = { prompt = \"q\", generations = \"g\", answer = \"a\" }\n".to_string(),
                "columns.generations",
            ),
        ],
    );
}
