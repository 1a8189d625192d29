//! Sampling a model folder locally with Burn, for `evaluate`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::ops::ControlFlow;

use distill_student::{
    BatchEvent, BatchGenerator, ChatMessage, DType, FinishReason, GenerationConfig,
    SequenceRequest, Student,
};
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

/// Generates the missing samples on this machine with continuous batching (each sample's
/// randomness depends only on its own seed, so the batch changes nothing), committing each
/// question's samples once they are all done.
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
    // One request per missing sample; `owner[r]` = (question, sample) of request `r`.
    let mut requests = Vec::new();
    let mut owner = Vec::new();
    let mut think_open = Vec::with_capacity(work.len());
    for (qi, (q, missing)) in work.iter().enumerate() {
        let prompt = tok
            .apply_chat_template(&[ChatMessage::user(&q.message)], true)
            .map_err(fail)?;
        // R1-style templates open the reasoning in the prompt, so the output is inside
        // it from its first token.
        let opens = prompt.trim_end().ends_with("<think>");
        let ids = tok.encode(&prompt, false).map_err(fail)?;
        for &i in missing {
            // Stream 0 of the sample's own seed: the same draws as when samples were
            // generated one at a time, whatever the batch.
            let seed = sample_seed(params.seed, &q.id, i);
            requests.push(SequenceRequest::new(ids.clone(), seed, 0));
            owner.push((qi, i));
        }
        think_open.push(opens);
    }
    let config = GenerationConfig {
        max_new_tokens: params.max_tokens as usize,
        temperature: params.temperature as f32,
        top_p: params.top_p as f32,
        top_k: 0,
        seed: 0,
        stop_token_ids: student.stop_token_ids(),
        stop_strings: Vec::new(),
    };
    let max_batch = params.max_batch.unwrap_or_else(|| {
        let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
        default_max_batch(
            &student.model,
            longest + config.max_new_tokens,
            params.device,
        )
    });
    tracing::info!(
        "generating {} samples with {} model, up to {max_batch} at once",
        requests.len(),
        dir.display()
    );
    // A question's rows go to the database once all its missing samples are done.
    let mut pending: Vec<Vec<super::NewEvalSample>> = vec![Vec::new(); work.len()];
    let mut remaining: Vec<usize> = work.iter().map(|(_, m)| m.len()).collect();
    BatchGenerator::new(&student.model, Some(tok), config)
        .map_err(fail)?
        .max_batch(max_batch)
        .run(&requests, |event| {
            if stop.load(Ordering::Relaxed) {
                return ControlFlow::Break(());
            }
            let BatchEvent::Finished {
                request,
                generation: g,
            } = event
            else {
                return ControlFlow::Continue(());
            };
            let (qi, i) = owner[request];
            let q = &work[qi].0;
            pending[qi].push(score_sample(
                q,
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
                    think_open: think_open[qi],
                },
            ));
            remaining[qi] -= 1;
            if remaining[qi] == 0 && tx.blocking_send(std::mem::take(&mut pending[qi])).is_err() {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })
        .map_err(fail)?;
    Ok(())
}

/// Sequences decoded at once when the stage does not say: as many as 25% of the free memory
/// holds KV caches for (half of a GPU's free memory), at most 32 on a CPU (where larger
/// batches measured slower: `cargo bench -p distill-student --bench generate`) and 64 on a GPU.
fn default_max_batch<B: burn::prelude::Backend>(
    model: &distill_student::CausalLm<B>,
    max_len: usize,
    device: Device,
) -> usize {
    let cap = match device {
        Device::Cpu => 32,
        Device::Cuda => 64,
    };
    let budget = match device {
        Device::Cpu => distill_student::batching::host_memory_available().map(|b| b / 4),
        #[cfg(feature = "cuda")]
        Device::Cuda => distill_student::cuda_memory_free().map(|b| b / 2),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => None,
    }
    .unwrap_or(2 << 30);
    distill_student::batching::max_batch_for_memory(model, max_len, budget, cap)
}
