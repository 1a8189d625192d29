//! `distill dataset export`: the items a stage kept, as training data: JSONL, or a
//! Hugging Face dataset folder (Parquet shards and a dataset card) that
//! `datasets.load_dataset("parquet", ...)` and TRL's SFTTrainer read as it is.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arrow_array::{ArrayRef, ListArray, RecordBatch, StringArray, StructArray};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field, Fields, Schema};
use clap::ValueEnum;
use distill_db::stages::{self, StageStatus};
use distill_db::{Db, runs};
use distill_stages::curation::output_items;
use distill_stages::generate::{GENERATION_KINDS, rendered_messages};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::{Value, json};

/// Shapes of an exported dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Chat `messages`: the user turn the teacher saw, and the assistant turn
    /// `<think>\n…\n</think>\n\n` + answer (the R1 SFT format).
    Messages,
    /// The trainer's own input: prompt messages, reasoning and answer kept apart,
    /// so the student's chat template renders them (see the trainer's docs).
    Sft,
    /// A Hugging Face dataset folder: `data/train-*.parquet` and `README.md`.
    Parquet,
}

/// Columns of a Parquet export, in TRL's two conversational layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Form {
    /// `messages`: the whole conversation, the assistant turn
    /// `<think>\n…\n</think>\n\n` + answer.
    #[default]
    Messages,
    /// `prompt` (the turns the teacher saw) and `completion` (the assistant turn).
    Sft,
}

/// One exported example.
struct Example {
    id: String,
    prompt: Vec<(String, String)>,
    completion: String,
    reference: Option<String>,
}

/// Writes the items kept by `stage` of `run` to `out` (a JSONL file, or for Parquet a
/// folder) and returns how many.
pub async fn export(
    db: &Db,
    run: &str,
    stage: &str,
    out: &Path,
    format: Format,
    form: Form,
    max_shard_bytes: u64,
) -> Result<usize> {
    let run = runs::find(db, run).await?;
    let rows = stages::list(db.pool(), run.id).await?;
    let Some(row) = rows.iter().find(|s| s.name == stage) else {
        bail!(
            "run `{}` has no stage `{stage}` (stages: {})",
            run.name,
            rows.iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    if row.status != StageStatus::Done {
        bail!(
            "stage `{stage}` is {:?}, not done: finish it first (`distill resume {}`)",
            row.status,
            run.name
        );
    }
    let items = output_items(db, row.id, &row.kind).await?;
    let identities: HashMap<i64, Value> = rows
        .iter()
        .filter(|s| GENERATION_KINDS.contains(&s.kind.as_str()))
        .map(|s| (s.id, serde_json::from_str(&s.params).unwrap_or(Value::Null)))
        .collect();

    if format == Format::Parquet {
        let examples: Vec<Example> = items
            .iter()
            .map(|item| {
                let identity = identities
                    .get(&item.generate_stage_id)
                    .unwrap_or(&Value::Null);
                Example {
                    id: format!("{}#{}", item.source_id, item.sample_index),
                    prompt: rendered_messages(identity, &item.prompt)
                        .into_iter()
                        .map(|m| (role_name(&m), m.content))
                        .collect(),
                    completion: assistant_turn(&item.reasoning, &item.answer),
                    reference: item.reference.clone(),
                }
            })
            .collect();
        let funnel = crate::report::Funnel::load(db, &run).await?;
        let card = dataset_card(
            &run.name,
            stage,
            form,
            examples.len(),
            &funnel,
            &rows,
            &identities,
        );
        write_parquet_folder(out, &examples, form, max_shard_bytes, &card)?;
        return Ok(examples.len());
    }

    let tmp = out.with_extension("jsonl.partial");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for item in &items {
        let identity = identities
            .get(&item.generate_stage_id)
            .unwrap_or(&Value::Null);
        let prompt_messages = rendered_messages(identity, &item.prompt);
        let id = format!("{}#{}", item.source_id, item.sample_index);
        let record = match format {
            Format::Messages => {
                let mut messages: Vec<Value> = prompt_messages
                    .iter()
                    .map(|m| serde_json::to_value(m).expect("messages serialise"))
                    .collect();
                messages.push(json!({
                    "role": "assistant",
                    "content": assistant_turn(&item.reasoning, &item.answer),
                }));
                json!({ "id": id, "messages": messages })
            }
            Format::Sft | Format::Parquet => json!({
                "id": id,
                "messages": prompt_messages,
                "reasoning": item.reasoning.trim(),
                "answer": item.answer.trim(),
                "reference": item.reference,
            }),
        };
        serde_json::to_writer(&mut w, &record)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(items.len())
}

/// The assistant turn of the R1 SFT format.
fn assistant_turn(reasoning: &str, answer: &str) -> String {
    format!(
        "<think>\n{}\n</think>\n\n{}",
        reasoning.trim(),
        answer.trim()
    )
}

/// A message's role as chat templates name it.
fn role_name(m: &distill_teacher::Message) -> String {
    match serde_json::to_value(m) {
        Ok(v) => v["role"].as_str().unwrap_or("user").to_string(),
        Err(_) => "user".into(),
    }
}

/// Splits examples into shards of about `max_bytes` of text each (at least one
/// example per shard), as `datasets` shards what it pushes.
fn shards(examples: &[Example], max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0usize, 0u64);
    for (i, e) in examples.iter().enumerate() {
        let bytes = (e.id.len()
            + e.completion.len()
            + e.reference.as_ref().map_or(0, String::len)
            + e.prompt
                .iter()
                .map(|(r, c)| r.len() + c.len())
                .sum::<usize>()) as u64;
        if i > start && size + bytes > max_bytes {
            out.push(start..i);
            start = i;
            size = 0;
        }
        size += bytes;
    }
    out.push(start..examples.len());
    out
}

/// The turns the teacher saw.
fn prompt(e: &Example) -> Vec<(&str, &str)> {
    e.prompt
        .iter()
        .map(|(r, c)| (r.as_str(), c.as_str()))
        .collect()
}

/// The assistant's turn.
fn completion(e: &Example) -> Vec<(&str, &str)> {
    vec![("assistant", e.completion.as_str())]
}

/// The `list<struct<role, content>>` type of chat columns.
fn turns_type() -> DataType {
    DataType::List(Arc::new(Field::new(
        "item",
        DataType::Struct(turn_fields()),
        true,
    )))
}

fn turn_fields() -> Fields {
    Fields::from(vec![
        Field::new("role", DataType::Utf8, true),
        Field::new("content", DataType::Utf8, true),
    ])
}

/// A chat column from each row's turns.
fn turns_array<'a>(rows: impl Iterator<Item = Vec<(&'a str, &'a str)>>) -> ArrayRef {
    let (mut offsets, mut roles, mut contents) = (vec![0i32], Vec::new(), Vec::new());
    for turns in rows {
        for (r, c) in turns {
            roles.push(r);
            contents.push(c);
        }
        offsets.push(roles.len() as i32);
    }
    let values = StructArray::new(
        turn_fields(),
        vec![
            Arc::new(StringArray::from(roles)) as ArrayRef,
            Arc::new(StringArray::from(contents)) as ArrayRef,
        ],
        None,
    );
    let DataType::List(item) = turns_type() else {
        unreachable!("turns_type is a list")
    };
    Arc::new(ListArray::new(
        item,
        OffsetBuffer::new(offsets.into()),
        Arc::new(values),
        None,
    ))
}

/// The columns of an export in `form`.
fn schema(form: Form) -> Schema {
    let mut fields = vec![Field::new("id", DataType::Utf8, false)];
    match form {
        Form::Messages => fields.push(Field::new("messages", turns_type(), false)),
        Form::Sft => {
            fields.push(Field::new("prompt", turns_type(), false));
            fields.push(Field::new("completion", turns_type(), false));
        }
    }
    fields.push(Field::new("reference", DataType::Utf8, true));
    Schema::new(fields)
}

/// Writes `data/train-NNNNN-of-MMMMM.parquet` shards and `README.md` into `out`.
fn write_parquet_folder(
    out: &Path,
    examples: &[Example],
    form: Form,
    max_shard_bytes: u64,
    card: &str,
) -> Result<()> {
    let data = out.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
    let schema = Arc::new(schema(form));
    let parts = shards(examples, max_shard_bytes);
    for (k, range) in parts.iter().enumerate() {
        let rows = &examples[range.clone()];
        let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from_iter_values(
            rows.iter().map(|e| e.id.as_str()),
        ))];
        match form {
            Form::Messages => columns.push(turns_array(rows.iter().map(|e| {
                let mut t = prompt(e);
                t.extend(completion(e));
                t
            }))),
            Form::Sft => {
                columns.push(turns_array(rows.iter().map(prompt)));
                columns.push(turns_array(rows.iter().map(completion)));
            }
        }
        columns.push(Arc::new(StringArray::from_iter(
            rows.iter().map(|e| e.reference.as_deref()),
        )));
        let batch = RecordBatch::try_new(schema.clone(), columns)?;
        let name = format!("train-{k:05}-of-{:05}.parquet", parts.len());
        let path = data.join(&name);
        let tmp = data.join(format!("{name}.partial"));
        let file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let mut w = ArrowWriter::try_new(file, schema.clone(), Some(props))?;
        w.write(&batch)?;
        w.close()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    // Shards of an earlier, larger export would be read as part of this one.
    for entry in std::fs::read_dir(&data)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let ours =
            (0..parts.len()).any(|k| name == format!("train-{k:05}-of-{:05}.parquet", parts.len()));
        if name.starts_with("train-") && name.ends_with(".parquet") && !ours {
            std::fs::remove_file(&path)?;
        }
    }
    std::fs::write(out.join("README.md"), card)
        .with_context(|| format!("cannot write {}", out.join("README.md").display()))?;
    Ok(())
}

/// The dataset card: YAML front matter (`configs`, `dataset_info.features`, licence)
/// that the Hub and `datasets` read, then the funnel and the sources.
fn dataset_card(
    run: &str,
    stage: &str,
    form: Form,
    n: usize,
    funnel: &crate::report::Funnel,
    stages: &[distill_db::stages::StageRow],
    identities: &HashMap<i64, Value>,
) -> String {
    let mut sources = Vec::new();
    let mut licenses = std::collections::BTreeSet::new();
    for s in stages.iter().filter(|s| identities.contains_key(&s.id)) {
        let id = &identities[&s.id];
        let model = id["model"].as_str().unwrap_or("?");
        if s.kind == "import" {
            let license = id["params"]["license"].as_str().unwrap_or("not stated");
            licenses.insert(license.to_string());
            sources.push(format!(
                "| {} | published dataset `{model}` ({} files) | {license} |",
                s.name,
                id["files"].as_array().map_or(0, Vec::len)
            ));
        } else {
            licenses.insert("other".to_string());
            sources.push(format!(
                "| {} | samples of teacher `{model}` | the teacher's terms of use |",
                s.name
            ));
        }
    }
    let license = match licenses.len() {
        1 => licenses.into_iter().next().unwrap_or_default(),
        _ => "other".to_string(),
    };
    let turns = "    list:\n    - name: role\n      dtype: string\n    - name: content\n      dtype: string\n";
    let features = match form {
        Form::Messages => format!("  - name: messages\n{turns}"),
        Form::Sft => format!("  - name: prompt\n{turns}  - name: completion\n{turns}"),
    };
    let mut card = format!(
        "---\nlicense: {license}\ntags:\n- distill\n- reasoning\n- distillation\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n\
         dataset_info:\n  features:\n  - name: id\n    dtype: string\n{features}  - name: reference\n    dtype: string\n  splits:\n  - name: train\n    num_examples: {n}\n---\n\n\
         # {run}: {stage}\n\nReasoning traces curated by distill (run `{run}`, the items stage `{stage}` kept), {n} examples. \
         The assistant turn is `<think>\\n` + reasoning + `\\n</think>\\n\\n` + answer.\n\n\
         ```python\nfrom datasets import load_dataset\nds = load_dataset(\"parquet\", data_dir=PATH + \"/data\", split=\"train\")\n```\n\n## Funnel\n\n| stage | kind | in | kept | dropped |\n|---|---|---|---|---|\n"
    );
    for f in &funnel.stages {
        let dropped: Vec<String> = f.dropped.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let _ = writeln!(
            card,
            "| {} | {} | {} | {} | {} |",
            f.name,
            f.kind,
            f.input,
            f.kept,
            if dropped.is_empty() {
                "-".into()
            } else {
                dropped.join(", ")
            }
        );
    }
    card.push_str("\n## Sources\n\n| stage | source | licence |\n|---|---|---|\n");
    for s in sources {
        card.push_str(&s);
        card.push('\n');
    }
    card
}
