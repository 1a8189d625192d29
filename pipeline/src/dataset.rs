//! `distill dataset export`: the items a stage kept, as training data.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use distill_db::stages::{self, StageStatus};
use distill_db::{Db, runs};
use distill_stages::curation::output_items;
use distill_stages::generate::rendered_messages;
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
}

/// Writes the items kept by `stage` of `run` to `out` as JSONL; returns how many.
pub async fn export(db: &Db, run: &str, stage: &str, out: &Path, format: Format) -> Result<usize> {
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
        .filter(|s| s.kind == "generate")
        .map(|s| (s.id, serde_json::from_str(&s.params).unwrap_or(Value::Null)))
        .collect();

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
                    "content": format!("<think>\n{}\n</think>\n\n{}", item.reasoning.trim(), item.answer.trim()),
                }));
                json!({ "id": id, "messages": messages })
            }
            Format::Sft => json!({
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
