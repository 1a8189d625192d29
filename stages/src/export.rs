//! The `export` stage (and `distill export`): a trained student as a Hugging Face
//! folder that transformers and vLLM load as it is, with a model card.
//!
//! The folder holds sharded safetensors in bf16 or f32, `config.json`,
//! `generation_config.json` with DeepSeek's recommended sampling (temperature 0.6,
//! top-p 0.95), the tokenizer files, a chat template whose generation prompt opens
//! `<think>\n` (as R1-distill models expect), and a `README.md` naming the base model,
//! the teacher, the data funnel, the training hyperparameters and the scores.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use distill_db::{Db, evals, stages as db_stages, training, verdicts};
use distill_student::{ChatMessage, DType, SaveOptions, Student, Tokenizer};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{BuildEnv, ParamError, Stage, StageContext, StageError, StageKind, parse_params};

/// Dtype of exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportDtype {
    /// bfloat16, as published checkpoints are.
    #[default]
    Bf16,
    /// 32-bit floats.
    F32,
}

/// What to export and where.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExportParams {
    /// The train stage whose model is exported (list it in `needs`, with any evaluate
    /// stages whose scores belong in the model card).
    pub student: String,
    /// Export the checkpoint at this step instead of the final model.
    #[serde(default)]
    pub step: Option<i64>,
    /// Output folder; default: the stage's folder under the run's artifacts.
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// Dtype on disk.
    #[serde(default)]
    pub dtype: ExportDtype,
    /// Shard weight files above this many GB (transformers' default is 5).
    #[serde(default = "default_shard_gb")]
    pub max_shard_gb: f64,
    /// Write only the (Q)LoRA adapter in PEFT's layout (`adapter_config.json` and
    /// `adapter_model.safetensors`, for `PeftModel.from_pretrained` on the base model) instead
    /// of the merged model. Left out of the identity when false, so existing runs keep their
    /// fingerprints.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adapter: bool,
}

fn default_shard_gb() -> f64 {
    5.0
}

/// The `export` stage kind.
pub struct ExportKind;

impl StageKind for ExportKind {
    fn name(&self) -> &'static str {
        "export"
    }
    fn about(&self) -> &'static str {
        "write a trained student as a Hugging Face folder with a model card"
    }
    fn version(&self) -> u32 {
        1
    }
    fn build(&self, params: toml::Table, env: &BuildEnv) -> Result<Arc<dyn Stage>, ParamError> {
        let mut p: ExportParams = parse_params(params)?;
        if !env
            .stages
            .get(&p.student)
            .is_some_and(|k| crate::grpo::STUDENT_KINDS.contains(&k.as_str()))
        {
            return Err(ParamError::new(
                "student",
                format!("no train or grpo stage named `{}` in the config", p.student),
            ));
        }
        if !env.needs.iter().any(|(n, _)| n == &p.student) {
            return Err(ParamError::new(
                "needs",
                format!("list `{}` in `needs` so it has trained first", p.student),
            ));
        }
        if !(p.max_shard_gb.is_finite() && p.max_shard_gb > 0.0) {
            return Err(ParamError::new("max_shard_gb", "must be a positive number"));
        }
        p.out = p.out.map(|o| env.resolve(&o));
        Ok(Arc::new(Export { params: p }))
    }
}

/// A configured `export` stage.
#[derive(Debug)]
pub struct Export {
    params: ExportParams,
}

#[async_trait]
impl Stage for Export {
    fn identity(&self) -> Result<Value, StageError> {
        Ok(serde_json::to_value(&self.params).expect("params serialise"))
    }

    async fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let out = self
            .params
            .out
            .clone()
            .unwrap_or_else(|| ctx.artifacts.clone());
        export(&ctx.db, ctx.run_id, &self.params, &out).await
    }
}

/// Exports the student of `params` (a train stage of run `run_id`) to `out`.
pub async fn export(
    db: &Db,
    run_id: i64,
    params: &ExportParams,
    out: &Path,
) -> Result<Value, StageError> {
    let stages = db_stages::list(db.pool(), run_id).await?;
    let train = stages
        .iter()
        .find(|s| s.name == params.student && crate::grpo::STUDENT_KINDS.contains(&s.kind.as_str()))
        .ok_or_else(|| {
            StageError::Input(format!(
                "no train or grpo stage `{}` in this run",
                params.student
            ))
        })?;
    let checkpoints = training::checkpoints(db.pool(), train.id).await?;
    let chosen = match params.step {
        Some(step) => checkpoints.iter().find(|c| c.step == step),
        None => checkpoints.iter().find(|c| c.r#final),
    }
    .ok_or_else(|| {
        let have: Vec<String> = checkpoints
            .iter()
            .map(|c| {
                if c.r#final {
                    format!("{} (final)", c.step)
                } else {
                    c.step.to_string()
                }
            })
            .collect();
        StageError::Input(format!(
            "train stage `{}` has no {} (recorded: {})",
            params.student,
            params
                .step
                .map(|s| format!("checkpoint at step {s}"))
                .unwrap_or_else(|| "final model yet".into()),
            if have.is_empty() {
                "none".into()
            } else {
                have.join(", ")
            }
        ))
    })?;
    let source = PathBuf::from(&chosen.path);
    if !source.is_dir() {
        return Err(StageError::Input(format!(
            "checkpoint folder {} is gone",
            source.display()
        )));
    }
    let damage = crate::checkpoint_files::verify_recorded(chosen).await?;
    if !damage.is_empty() {
        return Err(StageError::Input(format!(
            "checkpoint {} is damaged: {}",
            source.display(),
            crate::checkpoint_files::list(&damage)
        )));
    }
    if params.adapter {
        let card = model_card(db, run_id, train, chosen.step).await?;
        let out = out.to_path_buf();
        let written = tokio::task::spawn_blocking(move || write_adapter(&source, &out, &card))
            .await
            .map_err(|e| StageError::Failed(format!("export panicked: {e}")))??;
        return Ok(
            json!({ "step": chosen.step, "out": written.0, "files": written.1, "adapter": true }),
        );
    }
    if !chosen.r#final && source.join(distill_student::train::ADAPTER_FILE).exists() {
        return Err(StageError::Input(format!(
            "{} is an intermediate LoRA checkpoint (adapters only): export the final model, which has them merged",
            source.display()
        )));
    }
    let card = model_card(db, run_id, train, chosen.step).await?;
    let dtype = match params.dtype {
        ExportDtype::Bf16 => DType::BF16,
        ExportDtype::F32 => DType::F32,
    };
    let shard = (params.max_shard_gb * 1e9) as u64;
    let out = out.to_path_buf();
    let written =
        tokio::task::spawn_blocking(move || write_folder(&source, &out, dtype, shard, &card))
            .await
            .map_err(|e| StageError::Failed(format!("export panicked: {e}")))??;
    Ok(json!({ "step": chosen.step, "out": written.0, "files": written.1 }))
}

/// Loads the checkpoint, saves it in HF layout with the recommended generation config
/// and an R1 chat template, and writes the card. Returns the folder and its files.
fn write_folder(
    source: &Path,
    out: &Path,
    dtype: DType,
    max_shard_bytes: u64,
    card: &str,
) -> Result<(String, Vec<String>), StageError> {
    let fail =
        |e: &dyn std::fmt::Display| StageError::Failed(format!("export to {}: {e}", out.display()));
    let device = Default::default();
    let student = Student::<distill_student::CpuBackend>::load(source, &device, DType::F32)
        .map_err(|e| StageError::Input(format!("{}: {e}", source.display())))?;
    let mut generation = student
        .generation_config
        .clone()
        .unwrap_or_else(|| json!({}));
    if let Value::Object(g) = &mut generation {
        // DeepSeek's recommendation for R1-distilled models.
        g.insert("do_sample".into(), json!(true));
        g.insert("temperature".into(), json!(0.6));
        g.insert("top_p".into(), json!(0.95));
    }
    let saved = student
        .save(
            out,
            SaveOptions {
                dtype: Some(dtype),
                max_shard_bytes,
                tokenizer_dir: Some(source.to_path_buf()),
                generation_config: Some(generation),
            },
        )
        .map_err(|e| fail(&e))?;
    ensure_think_generation_prompt(out).map_err(|e| fail(&e))?;
    std::fs::write(out.join("README.md"), card).map_err(|e| fail(&e))?;
    let mut files: Vec<String> = saved
        .files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    files.push("README.md".into());
    Ok((out.display().to_string(), files))
}

/// Copies a (Q)LoRA run's PEFT adapter (from a final export's `adapter/` or an intermediate
/// checkpoint, which holds nothing else) with the tokenizer files and the card. Returns the
/// folder and its files.
fn write_adapter(
    source: &Path,
    out: &Path,
    card: &str,
) -> Result<(String, Vec<String>), StageError> {
    use distill_student::train::{ADAPTER_CONFIG_FILE, ADAPTER_DIR, ADAPTER_FILE};
    let fail =
        |e: &dyn std::fmt::Display| StageError::Failed(format!("export to {}: {e}", out.display()));
    let from = [source.join(ADAPTER_DIR), source.to_path_buf()]
        .into_iter()
        .find(|d| d.join(ADAPTER_FILE).is_file())
        .ok_or_else(|| {
            StageError::Input(format!(
                "{} holds no LoRA adapter (`{ADAPTER_DIR}/{ADAPTER_FILE}`): the train stage trained every weight, so export the merged model (leave `adapter` out)",
                source.display()
            ))
        })?;
    std::fs::create_dir_all(out).map_err(|e| fail(&e))?;
    let mut files = Vec::new();
    for name in [ADAPTER_FILE, ADAPTER_CONFIG_FILE] {
        std::fs::copy(from.join(name), out.join(name))
            .map_err(|e| fail(&format!("copying {}: {e}", from.join(name).display())))?;
        files.push(name.to_string());
    }
    let copied =
        distill_student::weights::copy_tokenizer_files(source, out).map_err(|e| fail(&e))?;
    if !copied.is_empty() {
        ensure_think_generation_prompt(out).map_err(|e| fail(&e))?;
    }
    files.extend(
        copied
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned())),
    );
    let card = card.replacen("library_name: transformers", "library_name: peft", 1);
    std::fs::write(out.join("README.md"), card).map_err(|e| fail(&e))?;
    files.push("README.md".into());
    Ok((out.display().to_string(), files))
}

/// Makes the folder's chat template end a generation prompt with `<think>\n`, as
/// R1-distilled models expect (without it they may skip their reasoning). Templates
/// that already do are left alone; others get the tag appended after the
/// generation prompt, in `chat_template.jinja` and `tokenizer_config.json` alike.
pub fn ensure_think_generation_prompt(dir: &Path) -> Result<(), String> {
    let tokenizer = Tokenizer::from_dir(dir).map_err(|e| e.to_string())?;
    let probe = [ChatMessage::user("1+1?")];
    let rendered = tokenizer
        .apply_chat_template(&probe, true)
        .map_err(|e| e.to_string())?;
    if rendered.ends_with("<think>\n") {
        return Ok(());
    }
    let config_path = dir.join("tokenizer_config.json");
    let mut config: Value = std::fs::read_to_string(&config_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| json!({}));
    let jinja_path = dir.join("chat_template.jinja");
    let template = std::fs::read_to_string(&jinja_path)
        .ok()
        .or_else(|| config["chat_template"].as_str().map(str::to_string))
        .ok_or_else(|| "the tokenizer has no chat template".to_string())?;
    let patched = format!("{template}{{%- if add_generation_prompt %}}<think>\n{{% endif %}}");
    std::fs::write(&jinja_path, &patched).map_err(|e| e.to_string())?;
    config["chat_template"] = Value::String(patched);
    std::fs::write(
        &config_path,
        serde_json::to_string_pretty(&config).expect("json"),
    )
    .map_err(|e| e.to_string())?;
    let check = Tokenizer::from_dir(dir)
        .and_then(|t| t.apply_chat_template(&probe, true))
        .map_err(|e| e.to_string())?;
    if !check.ends_with("<think>\n") {
        return Err("could not make the chat template open <think>".into());
    }
    Ok(())
}

/// The card's scores section (empty without scores): each score with the share of its
/// samples cut by the token budget and their mean length, which explain a low score.
fn scores_table(scores: &[evals::ScoreRow]) -> String {
    if scores.is_empty() {
        return String::new();
    }
    let mut table = String::from(
        "\n## Scores\n\n| model | step | benchmark | metric | score | truncated | mean tokens | protocol |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let known = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map(f).unwrap_or_else(|| "-".into());
    for r in scores {
        let p: Value = serde_json::from_str(&r.protocol).unwrap_or(Value::Null);
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {:.1} ± {:.1} | {} | {} | k={} T={} top-p={} max_tokens={} template {} |",
            r.label,
            r.step.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            r.benchmark,
            r.metric,
            100.0 * r.value,
            100.0 * r.stderr,
            known(r.truncated, &|t| format!("{:.1}%", 100.0 * t)),
            known(r.mean_tokens, &|t| format!("{t:.0}")),
            p["samples"],
            p["temperature"],
            p["top_p"],
            p["max_tokens"],
            p["template_hash"].as_str().unwrap_or("?")
        );
    }
    table
}

/// The model card: base model, teacher, data funnel, hyperparameters, scores.
async fn model_card(
    db: &Db,
    run_id: i64,
    train: &db_stages::StageRow,
    step: i64,
) -> Result<String, StageError> {
    let stages = db_stages::list(db.pool(), run_id).await?;
    let run: (String,) = sqlx::query_as("SELECT name FROM runs WHERE id = ?")
        .bind(run_id)
        .fetch_one(db.pool())
        .await?;
    let identity: Value = serde_json::from_str(&train.params).unwrap_or(Value::Null);
    let base = &identity["base_model"];
    let start = &identity["start"];
    let base = match (base["dir"].as_str(), base["init_seed"].as_u64()) {
        (Some(dir), _) => format!("`{dir}`"),
        (None, Some(seed)) => {
            format!("none: trained from scratch (random initialisation, seed {seed})")
        }
        // A grpo stage starts from a train stage's final model or a folder.
        _ => match (start["stage"].as_str(), start["dir"].as_str()) {
            (Some(stage), _) => format!("the final model of stage `{stage}`"),
            (None, Some(dir)) => format!("`{dir}`"),
            (None, None) => "unknown".into(),
        },
    };
    let mut card = format!(
        "---\nlibrary_name: transformers\ntags:\n- distill\n- reasoning\n- distillation\n---\n\n# {} (step {step})\n\n\
         Distilled with distill from the traces of a reasoning teacher: run `{}`, train stage `{}`.\n\n\
         - **Base model:** {base}\n",
        run.0, run.0, train.name
    );
    for g in stages.iter().filter(|s| s.kind == "generate") {
        let id: Value = serde_json::from_str(&g.params).unwrap_or(Value::Null);
        let _ = writeln!(
            card,
            "- **Teacher:** `{}` (stage `{}`: temperature {}, top-p {}, {} samples per prompt, up to {} tokens)",
            id["model"].as_str().unwrap_or("?"),
            g.name,
            id["temperature"],
            id["top_p"],
            id["samples_per_prompt"],
            id["max_tokens"]
        );
    }
    for g in stages.iter().filter(|s| s.kind == "import") {
        let id: Value = serde_json::from_str(&g.params).unwrap_or(Value::Null);
        let files = id["files"].as_array().map_or(0, Vec::len);
        let _ = writeln!(
            card,
            "- **Teacher:** the published dataset `{}` (stage `{}`: imported from {files} file{}, licence {})",
            id["model"].as_str().unwrap_or("?"),
            g.name,
            if files == 1 { "" } else { "s" },
            id["params"]["license"].as_str().unwrap_or("not stated")
        );
    }
    card.push_str("\n## Data\n\n| stage | kind | in | kept | dropped |\n|---|---|---|---|---|\n");
    for s in &stages {
        if s.kind == "import" {
            let t = distill_db::generations::totals(db.pool(), s.id).await?;
            let id: Value = serde_json::from_str(&s.params).unwrap_or(Value::Null);
            let _ = writeln!(
                card,
                "| {} | import of `{}` | {} | {} | - |",
                s.name,
                id["model"].as_str().unwrap_or("?"),
                t.ok,
                t.ok
            );
        } else if s.kind == "generate" {
            let t = distill_db::generations::totals(db.pool(), s.id).await?;
            let _ = writeln!(
                card,
                "| {} | generate | {} | {} | failed {} |",
                s.name,
                t.ok + t.failed,
                t.ok,
                t.failed
            );
        } else if crate::curation::CURATION_KINDS.contains(&s.kind.as_str()) {
            let c = verdicts::counts(db.pool(), s.id).await?;
            let dropped: i64 = c.dropped.iter().map(|(_, n)| n).sum();
            let why: Vec<String> = c.dropped.iter().map(|(r, n)| format!("{r} {n}")).collect();
            let _ = writeln!(
                card,
                "| {} | {} | {} | {} | {} |",
                s.name,
                s.kind,
                c.kept + dropped,
                c.kept,
                why.join(", ")
            );
        }
    }
    if train.kind == "grpo" {
        let _ = write!(
            card,
            "\n## Training\n\nGRPO (group-relative policy optimisation with verifiable rewards) from the model above:\n\n```json\n{}\n```\n",
            serde_json::to_string_pretty(
                &json!({ "config": identity["config"], "rewards": identity["stage"] })
            )
            .unwrap_or_default()
        );
    } else {
        let _ = write!(
            card,
            "\n## Training\n\nSupervised fine-tuning on the kept traces (loss on `<think>\\n…\\n</think>\\n\\n` + answer only):\n\n```json\n{}\n```\n",
            serde_json::to_string_pretty(&identity["config"]).unwrap_or_default()
        );
    }
    card.push_str(&scores_table(
        &evals::scores_of_run(db.pool(), run_id).await?,
    ));
    card.push_str(
        "\n## Use\n\nSample with temperature 0.6 and top-p 0.95 (the defaults in `generation_config.json`); \
         the chat template opens the assistant turn with `<think>\\n`.\n\n\
         ```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\
         tok = AutoTokenizer.from_pretrained(PATH)\nmodel = AutoModelForCausalLM.from_pretrained(PATH)\n```\n\n\
         or `vllm serve PATH`.\n",
    );
    Ok(card)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_card_scores_table_carries_the_truncated_share_and_mean_tokens() {
        let row = |label: &str, truncated: Option<f64>, mean_tokens: Option<f64>| {
            evals::ScoreRow {
            stage: "eval".into(),
            target: format!("checkpoint:{label}"),
            label: label.into(),
            step: Some(40),
            benchmark: "math500".into(),
            metric: "pass@1".into(),
            value: 0.412,
            stderr: 0.021,
            questions: 500,
            protocol: r#"{"samples":4,"temperature":0.6,"top_p":0.95,"max_tokens":32768,"template_hash":"ab12cd34"}"#.into(),
            protocol_hash: "h".into(),
            truncated,
            mean_tokens,
        }
        };
        let table = scores_table(&[
            row("sft@40", Some(0.187), Some(11234.4)),
            row("old", None, None),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[3],
            "| model | step | benchmark | metric | score | truncated | mean tokens | protocol |"
        );
        assert_eq!(
            lines[5],
            "| sft@40 | 40 | math500 | pass@1 | 41.2 ± 2.1 | 18.7% | 11234 | k=4 T=0.6 top-p=0.95 max_tokens=32768 template ab12cd34 |"
        );
        assert!(lines[6].contains("| 41.2 ± 2.1 | - | - |"), "{table}");
        assert_eq!(scores_table(&[]), "");
    }
}
