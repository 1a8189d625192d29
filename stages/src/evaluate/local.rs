//! Sampling a model folder locally with Burn, for `evaluate`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use distill_student::{ChatMessage, DType, FinishReason, GenerationConfig, Student, generate};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{Device, EvaluateParams, Question, Sampled, sample_seed, score_sample, write_samples};
use crate::{StageContext, StageError};

/// What identifies a model folder's weights without reading gigabytes: the config's
/// content and each weight file's name, size and modification time.
pub fn model_identity(dir: &Path) -> Result<Value, StageError> {
    let config = std::fs::read(dir.join("config.json")).map_err(|e| {
        StageError::Input(format!("cannot read {}/config.json: {e}", dir.display()))
    })?;
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| StageError::Input(format!("cannot list {}: {e}", dir.display())))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors")
            || name == "tokenizer.json"
            || name == "tokenizer_config.json"
        {
            let meta = entry
                .metadata()
                .map_err(|e| StageError::Input(e.to_string()))?;
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos() as u64);
            files.push(json!([name, meta.len(), modified]));
        }
    }
    files.sort_by_key(|f| f[0].as_str().unwrap_or_default().to_string());
    Ok(json!({
        "dir": dir.display().to_string(),
        "config": crate::hash::hex128(&config),
        "files": files,
    }))
}

/// Generates the missing samples on this machine, one sequence at a time so that each
/// sample's randomness depends only on its own seed, committing each question's
/// samples as they are done.
pub async fn sample(
    ctx: &StageContext,
    target: &str,
    dir: &Path,
    params: &EvaluateParams,
    work: Vec<(Question, Vec<i64>)>,
) -> Result<(), StageError> {
    if work.is_empty() {
        return Ok(());
    }
    let (tx, mut rx) = mpsc::channel::<Vec<super::NewEvalSample>>(4);
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let dir = dir.to_path_buf();
        let params = params.clone();
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || match params.device {
            Device::Cpu => {
                let device = Default::default();
                run::<distill_student::CpuBackend>(&dir, &device, &params, work, &tx, &stop)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda => {
                let device = Default::default();
                run::<distill_student::CudaBackend>(&dir, &device, &params, work, &tx, &stop)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => Err(StageError::Input("built without CUDA".into())),
        })
    };
    let mut write_error = None;
    while let Some(rows) = rx.recv().await {
        if let Err(e) = write_samples(ctx, target, &rows).await {
            write_error = Some(e);
            stop.store(true, Ordering::Relaxed);
            break;
        }
        if ctx.cancel.is_cancelled() {
            stop.store(true, Ordering::Relaxed);
        }
    }
    drop(rx);
    let result = worker
        .await
        .map_err(|e| StageError::Failed(format!("local generation panicked: {e}")))?;
    if let Some(e) = write_error {
        return Err(e);
    }
    result
}

fn run<B: burn::prelude::Backend>(
    dir: &Path,
    device: &B::Device,
    params: &EvaluateParams,
    work: Vec<(Question, Vec<i64>)>,
    tx: &mpsc::Sender<Vec<super::NewEvalSample>>,
    stop: &AtomicBool,
) -> Result<(), StageError> {
    let fail = |e: distill_student::StudentError| {
        StageError::Input(format!("model {}: {e}", dir.display()))
    };
    let student = Student::<B>::load(dir, device, DType::F32).map_err(fail)?;
    let tok = student.tokenizer().map_err(fail)?;
    let stop_ids = student.stop_token_ids();
    for (q, missing) in work {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let prompt = tok
            .apply_chat_template(&[ChatMessage::user(&q.message)], true)
            .map_err(fail)?;
        // R1-style templates open the reasoning in the prompt, so the output is inside
        // it from its first token.
        let think_open = prompt.trim_end().ends_with("<think>");
        let ids = tok.encode(&prompt, false).map_err(fail)?;
        let mut rows = Vec::with_capacity(missing.len());
        for i in missing {
            let config = GenerationConfig {
                max_new_tokens: params.max_tokens as usize,
                temperature: params.temperature as f32,
                top_p: params.top_p as f32,
                top_k: 0,
                seed: sample_seed(params.seed, &q.id, i),
                stop_token_ids: stop_ids.clone(),
                stop_strings: Vec::new(),
            };
            let mut out = generate(
                &student.model,
                std::slice::from_ref(&ids),
                &config,
                Some(tok),
                |_| {},
            )
            .map_err(fail)?;
            let g = out.pop().expect("one prompt, one generation");
            rows.push(score_sample(
                &q,
                Sampled {
                    sample_index: i,
                    output: g.text,
                    tokens: Some(g.token_ids.len() as i64),
                    finish_reason: Some(
                        match g.finish_reason {
                            FinishReason::Length => "length",
                            _ => "stop",
                        }
                        .into(),
                    ),
                    think_open,
                },
            ));
        }
        if tx.blocking_send(rows).is_err() {
            break;
        }
    }
    Ok(())
}
