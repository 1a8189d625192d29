//! The `grpo` stage: reinforcement learning with verifiable rewards after distillation
//! (DeepSeek-R1's GRPO), on prompts with reference answers, starting from a train stage's
//! final model or a model folder.
//!
//! Each generated batch: `prompts_per_step` prompts, `group_size` completions each from the
//! current policy (the batched generator), each rewarded by `distill-curate`'s verifier
//! (1 when correct) plus an optional format reward and DAPO's soft overlong penalty; the
//! learner (`distill_student::train::GrpoTrainer`) turns rewards into group-normalised
//! advantages and takes `updates_per_batch` optimizer steps. Every step's figures go to
//! `grpo_steps` (and `train_metrics`, so loss views cover it), a sample of each batch's
//! rollouts to `grpo_rollouts`, and checkpoints to `checkpoints`, so `evaluate` and `export`
//! take a grpo stage as they take a train stage. Resume works as in `train`: from the newest
//! intact checkpoint, to the same weights as an uninterrupted run.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use distill_curate::verify::{Verdict, verify_response};
use distill_db::grpo::{self as db_grpo, GrpoStep, Rollout as RolloutRow};
use distill_db::training::{self, StepMetrics as StepRow};
use distill_student::train::{GrpoConfig, GrpoStepMetrics, GrpoTrainer, TrainBackend, TrainError};
use distill_student::{ChatMessage, FinishReason, Generation, SaveOptions, Tokenizer};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::checkpoint_files;
use crate::curation::{CURATION_KINDS, output_items};
use crate::device::Device;
use crate::generate::{GENERATION_KINDS, rendered_messages};
use crate::train::{SavedCheckpoint, resume_point, role_name};
use crate::{BuildEnv, ParamError, Stage, StageContext, StageError, StageKind, parse_params};

/// Stage kinds whose checkpoints `evaluate` and `export` take as a student.
pub const STUDENT_KINDS: &[&str] = &["train", "grpo"];

/// The `grpo` stage kind.
pub struct GrpoKind;

/// The stage's own parameters; every other key is a [`GrpoConfig`] field (`steps`,
/// `prompts_per_step`, `group_size`, `updates_per_batch`, `epsilon`, `epsilon_high`, `beta`,
/// `loss`, `scale_rewards`, `max_completion_tokens`, `temperature`, `learning_rate`, `lora`,
/// `precision`, ...).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoStageParams {
    /// A train (or grpo) stage to start from: its final model.
    #[serde(default)]
    pub student: Option<String>,
    /// Instead of `student`: a model folder (Hugging Face layout, with its tokenizer).
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// The user turn for a `load` stage's prompts (`{prompt}` is replaced); prompts of a
    /// trace stage are rendered as its teacher saw them, as `train` renders them.
    #[serde(default)]
    pub prompt_template: Option<String>,
    /// Reward added for a well-formed completion (reasoning closed by `</think>`, then a
    /// non-empty answer).
    #[serde(default)]
    pub format_reward: f64,
    /// DAPO's soft overlong punishment: completions longer than `max_completion_tokens −
    /// overlong_buffer` lose up to `overlong_penalty`, linearly over the buffer.
    #[serde(default)]
    pub overlong_buffer: Option<usize>,
    /// See `overlong_buffer`.
    #[serde(default = "one")]
    pub overlong_penalty: f64,
    /// Rollouts of each generated batch kept in the database for `distill traces`.
    #[serde(default = "default_keep_rollouts")]
    pub keep_rollouts: usize,
    /// Save a checkpoint every this many optimizer steps (0: only at the end); rounded up to
    /// a whole generated batch.
    #[serde(default)]
    pub checkpoint_every: usize,
    /// Keep only this many intermediate checkpoints.
    #[serde(default)]
    pub keep_last: Option<usize>,
    /// Where to train and sample.
    #[serde(default)]
    pub device: Device,
    /// Sequences decoded at once while sampling (default 32 on a CPU, 64 on a GPU).
    #[serde(default)]
    pub max_batch: Option<usize>,
}

fn one() -> f64 {
    1.0
}

fn default_keep_rollouts() -> usize {
    16
}

const STAGE_KEYS: &[&str] = &[
    "student",
    "model",
    "prompt_template",
    "format_reward",
    "overlong_buffer",
    "overlong_penalty",
    "keep_rollouts",
    "checkpoint_every",
    "keep_last",
    "device",
    "max_batch",
];

/// Where the policy starts.
#[derive(Debug, Clone)]
enum Start {
    Stage(String),
    Folder(PathBuf),
}

impl StageKind for GrpoKind {
    fn name(&self) -> &'static str {
        "grpo"
    }
    fn about(&self) -> &'static str {
        "reinforcement learning with verifiable rewards (GRPO) on prompts with reference answers"
    }
    fn version(&self) -> u32 {
        1
    }
    fn build(&self, mut params: toml::Table, env: &BuildEnv) -> Result<Arc<dyn Stage>, ParamError> {
        let own: toml::Table = STAGE_KEYS
            .iter()
            .filter_map(|k| params.remove(*k).map(|v| (k.to_string(), v)))
            .collect();
        let stage: GrpoStageParams = parse_params(own)?;
        let config: GrpoConfig = parse_params(params)?;
        config.validate().map_err(|e| match e {
            TrainError::Config { field, message } => ParamError::new(field, message),
            other => ParamError::new("*", other.to_string()),
        })?;
        if !(stage.format_reward >= 0.0 && stage.format_reward.is_finite()) {
            return Err(ParamError::new("format_reward", "must be a number ≥ 0"));
        }
        if let Some(b) = stage.overlong_buffer
            && (b == 0 || b >= config.max_completion_tokens)
        {
            return Err(ParamError::new(
                "overlong_buffer",
                format!(
                    "must be between 1 and max_completion_tokens − 1 ({})",
                    config.max_completion_tokens - 1
                ),
            ));
        }
        if let Some(t) = &stage.prompt_template
            && !t.contains("{prompt}")
        {
            return Err(ParamError::new(
                "prompt_template",
                "must contain `{prompt}`",
            ));
        }
        let start = match (&stage.student, &stage.model) {
            (Some(name), None) => {
                match env.stages.get(name).map(String::as_str) {
                    Some(k) if STUDENT_KINDS.contains(&k) => {}
                    _ => {
                        return Err(ParamError::new(
                            "student",
                            format!("no train or grpo stage named `{name}` in the config"),
                        ));
                    }
                }
                if !env.needs.iter().any(|(n, _)| n == name) {
                    return Err(ParamError::new(
                        "needs",
                        format!("list `{name}` in `needs` so it has trained first"),
                    ));
                }
                Start::Stage(name.clone())
            }
            (None, Some(dir)) => Start::Folder(env.resolve(dir)),
            _ => {
                return Err(ParamError::new(
                    "student",
                    "give exactly one of `student` (a train stage) and `model` (a model folder)",
                ));
            }
        };
        let sources: Vec<&(String, String)> = env
            .needs
            .iter()
            .filter(|(n, _)| !matches!(&start, Start::Stage(s) if s == n))
            .collect();
        match sources.as_slice() {
            [(_, kind)]
                if kind == "load"
                    || GENERATION_KINDS.contains(&kind.as_str())
                    || CURATION_KINDS.contains(&kind.as_str()) =>
            {
                if kind != "load" && stage.prompt_template.is_some() {
                    return Err(ParamError::new(
                        "prompt_template",
                        "only for a load stage's prompts (a trace stage's prompts are rendered as its teacher saw them)",
                    ));
                }
            }
            _ => {
                return Err(ParamError::new(
                    "needs",
                    "a grpo stage needs exactly one prompt source (a load stage, or a generate, import or curation stage whose kept traces' prompts it takes) besides the stage it starts from",
                ));
            }
        }
        Ok(Arc::new(Grpo {
            stage,
            config,
            start,
        }))
    }
}

/// A configured `grpo` stage.
#[derive(Debug)]
pub struct Grpo {
    stage: GrpoStageParams,
    config: GrpoConfig,
    start: Start,
}

/// A prompt to sample for: its row id, chat messages and reference answer.
struct PromptItem {
    id: i64,
    messages: Vec<ChatMessage>,
    reference: String,
}

/// What the learning thread reports.
enum Event {
    Start {
        total_steps: usize,
        done: usize,
    },
    Step {
        metrics: GrpoStepMetrics,
        rewards: RewardStats,
    },
    Rollouts(Vec<RolloutRow>),
    Checkpoint(SavedCheckpoint),
}

/// Reward figures of one generated batch.
#[derive(Debug, Clone, Copy)]
struct RewardStats {
    mean: f64,
    std: f64,
    pass_rate: f64,
    zero_std_groups: f64,
}

#[async_trait]
impl Stage for Grpo {
    fn preflight(&self) -> Result<(), StageError> {
        if let Start::Folder(dir) = &self.start {
            for f in ["config.json", "tokenizer.json"] {
                if !dir.join(f).is_file() {
                    return Err(StageError::Input(format!(
                        "model: {} has no {f}",
                        dir.display()
                    )));
                }
            }
        }
        if self.stage.device == Device::Cuda {
            crate::device::check_cuda_devices(&[0])?;
        }
        Ok(())
    }

    fn identity(&self) -> Result<Value, StageError> {
        let start = match &self.start {
            Start::Stage(name) => json!({ "stage": name }),
            Start::Folder(dir) => crate::evaluate::model_identity(dir)?,
        };
        let mut stage = serde_json::to_value(&self.stage).expect("params serialise");
        // Where it runs and how many it decodes at once change the speed, not the result.
        if let Some(o) = stage.as_object_mut() {
            o.remove("max_batch");
        }
        Ok(json!({ "start": start, "stage": stage, "config": self.config }))
    }

    async fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let start_dir = match &self.start {
            Start::Folder(dir) => dir.clone(),
            Start::Stage(name) => final_model(ctx, name).await?,
        };
        let source = ctx
            .inputs
            .iter()
            .find(|i| !matches!(&self.start, Start::Stage(s) if s == &i.name))
            .ok_or_else(|| StageError::Failed("no prompt source among the inputs".into()))?;
        let prompts = self.prompts(ctx, source).await?;
        let resume_from = resume_point(ctx).await?;
        let (tx, mut rx) = mpsc::channel::<Event>(64);
        let stop = Arc::new(AtomicBool::new(false));
        let job = GrpoJob {
            start: start_dir.clone(),
            config: self.config.clone(),
            stage: self.stage.clone(),
            prompts,
            resume_from,
            artifacts: ctx.artifacts.clone(),
            stop: stop.clone(),
            tx,
        };
        let device = self.stage.device;
        let worker = tokio::task::spawn_blocking(move || job.run(device));
        while let Some(event) = rx.recv().await {
            if ctx.cancel.is_cancelled() {
                stop.store(true, Ordering::Relaxed);
            }
            match event {
                Event::Start { total_steps, done } => {
                    ctx.progress.set_total(total_steps as u64);
                    ctx.progress.set_done(done as u64);
                }
                Event::Step {
                    metrics: m,
                    rewards,
                } => {
                    let mut tx = ctx.db.write().await?;
                    training::record_step(
                        &mut tx,
                        ctx.stage_id,
                        &StepRow {
                            step: m.step as i64,
                            epoch: m.batch as f64,
                            loss: m.loss,
                            lr: m.lr,
                            grad_norm: Some(m.grad_norm),
                            tokens: m.tokens as i64,
                            tokens_per_s: Some(m.tokens as f64 / m.step_time_s.max(1e-9)),
                            peak_memory_bytes: Some(m.peak_memory_bytes as i64),
                        },
                    )
                    .await?;
                    db_grpo::record_step(
                        &mut tx,
                        ctx.stage_id,
                        &GrpoStep {
                            step: m.step as i64,
                            batch: m.batch as i64,
                            reward_mean: rewards.mean,
                            reward_std: rewards.std,
                            pass_rate: rewards.pass_rate,
                            zero_std_groups: rewards.zero_std_groups,
                            kl: m.kl,
                            clip_fraction: m.clip_fraction,
                            completion_tokens: m.completion_tokens,
                            entropy: m.entropy,
                            loss: m.loss,
                        },
                    )
                    .await?;
                    tx.commit().await?;
                    ctx.progress.set_done(m.step as u64);
                    ctx.progress.set_message(format!(
                        "reward {:.3} pass {:.0}% len {:.0}",
                        rewards.mean,
                        100.0 * rewards.pass_rate,
                        m.completion_tokens
                    ));
                }
                Event::Rollouts(rows) => {
                    let mut tx = ctx.db.write().await?;
                    db_grpo::record_rollouts(&mut tx, ctx.stage_id, &rows).await?;
                    tx.commit().await?;
                }
                Event::Checkpoint(saved) => saved.record(ctx, self.stage.keep_last).await?,
            }
        }
        let finished = worker
            .await
            .map_err(|e| StageError::Failed(format!("GRPO panicked: {e}")))??;
        if !finished {
            return Err(StageError::Interrupted);
        }
        let steps = db_grpo::steps(ctx.db.pool(), ctx.stage_id).await?;
        let mean = |f: fn(&GrpoStep) -> f64, part: &[GrpoStep]| {
            part.iter().map(f).sum::<f64>() / part.len().max(1) as f64
        };
        let tenth = (steps.len() / 10).max(1);
        let head = &steps[..tenth.min(steps.len())];
        let tail = &steps[steps.len().saturating_sub(tenth)..];
        Ok(json!({
            "base_model": start_dir.display().to_string(),
            "steps": self.config.steps,
            "reward_first_tenth": mean(|s| s.reward_mean, head),
            "reward_last_tenth": mean(|s| s.reward_mean, tail),
            "pass_rate_first_tenth": mean(|s| s.pass_rate, head),
            "pass_rate_last_tenth": mean(|s| s.pass_rate, tail),
            "completion_tokens_last_tenth": mean(|s| s.completion_tokens, tail),
        }))
    }
}

impl Grpo {
    /// The prompts to sample for, with reference answers (prompts without one are skipped,
    /// and counted in a warning).
    async fn prompts(
        &self,
        ctx: &StageContext,
        source: &crate::Input,
    ) -> Result<Vec<PromptItem>, StageError> {
        let mut out = Vec::new();
        let mut unanswered = 0usize;
        if source.kind == "load" {
            let template = self.stage.prompt_template.as_deref().unwrap_or("{prompt}");
            for p in distill_db::prompts::list(ctx.db.pool(), source.stage_id).await? {
                match p.answer.filter(|a| !a.trim().is_empty()) {
                    Some(reference) => out.push(PromptItem {
                        id: p.id,
                        messages: vec![ChatMessage::user(template.replace("{prompt}", &p.prompt))],
                        reference,
                    }),
                    None => unanswered += 1,
                }
            }
        } else {
            let identities: HashMap<i64, Value> = sqlx::query_as::<_, (i64, String)>(
                "SELECT id, params FROM stages WHERE run_id = ?",
            )
            .bind(ctx.run_id)
            .fetch_all(ctx.db.pool())
            .await?
            .into_iter()
            .map(|(id, p)| (id, serde_json::from_str(&p).unwrap_or(Value::Null)))
            .collect();
            let mut items = output_items(&ctx.db, source.stage_id, &source.kind).await?;
            items.sort_by_key(|it| (it.prompt_idx, it.prompt_id));
            items.dedup_by_key(|it| it.prompt_id);
            for it in items {
                let identity = identities
                    .get(&it.generate_stage_id)
                    .unwrap_or(&Value::Null);
                match it.reference.filter(|a| !a.trim().is_empty()) {
                    Some(reference) => out.push(PromptItem {
                        id: it.prompt_id,
                        messages: rendered_messages(identity, &it.prompt)
                            .into_iter()
                            .map(|m| ChatMessage::new(role_name(&m.role), m.content))
                            .collect(),
                        reference,
                    }),
                    None => unanswered += 1,
                }
            }
        }
        if unanswered > 0 {
            tracing::warn!(
                "{unanswered} prompts of `{}` have no reference answer to reward against; left out",
                source.name
            );
        }
        if out.is_empty() {
            return Err(StageError::Input(format!(
                "stage `{}` gives no prompt with a reference answer: nothing to reward",
                source.name
            )));
        }
        Ok(out)
    }
}

/// The final model folder of train (or grpo) stage `name`, checked against its manifest.
async fn final_model(ctx: &StageContext, name: &str) -> Result<PathBuf, StageError> {
    let input = ctx
        .inputs
        .iter()
        .find(|i| i.name == name)
        .ok_or_else(|| StageError::Failed(format!("`{name}` is not an input")))?;
    let checkpoints = training::checkpoints(ctx.db.pool(), input.stage_id).await?;
    let c = checkpoints
        .iter()
        .find(|c| c.r#final)
        .ok_or_else(|| StageError::Input(format!("stage `{name}` recorded no final model")))?;
    let damage = checkpoint_files::verify_recorded(c).await?;
    if !damage.is_empty() {
        return Err(StageError::Input(format!(
            "the final model of `{name}` is damaged: {}",
            checkpoint_files::list(&damage)
        )));
    }
    Ok(PathBuf::from(&c.path))
}

/// The reward of one completion and the verifier's verdict.
fn reward(
    stage: &GrpoStageParams,
    max_tokens: usize,
    reference: &str,
    think_open: bool,
    g: &Generation,
) -> (f64, Verdict) {
    let length_stop = g.finish_reason == FinishReason::Length;
    let verdict = verify_response(reference, &g.text, think_open, length_stop).verdict;
    let mut r = if verdict == Verdict::Correct {
        1.0
    } else {
        0.0
    };
    if stage.format_reward > 0.0 && well_formed(&g.text, think_open) && !length_stop {
        r += stage.format_reward;
    }
    if let Some(buffer) = stage.overlong_buffer {
        let free = max_tokens - buffer;
        let n = g.token_ids.len();
        if n > free {
            r -= stage.overlong_penalty * ((n - free) as f64 / buffer as f64).min(1.0);
        }
    }
    (r, verdict)
}

/// Reasoning closed by `</think>` (opened by the prompt, or by the completion's start), then
/// a non-empty answer.
fn well_formed(text: &str, think_open: bool) -> bool {
    let body = if think_open {
        Some(text)
    } else {
        text.trim_start().strip_prefix("<think>")
    };
    body.and_then(|b| b.split_once("</think>"))
        .is_some_and(|(reasoning, answer)| {
            !reasoning.trim().is_empty() && !answer.trim().is_empty()
        })
}

/// The learning loop, on a blocking thread.
struct GrpoJob {
    start: PathBuf,
    config: GrpoConfig,
    stage: GrpoStageParams,
    prompts: Vec<PromptItem>,
    resume_from: Option<PathBuf>,
    artifacts: PathBuf,
    stop: Arc<AtomicBool>,
    tx: mpsc::Sender<Event>,
}

impl GrpoJob {
    /// True when the run finished, false when it stopped on request.
    fn run(self, device: Device) -> Result<bool, StageError> {
        match device {
            Device::Cpu => {
                type B = burn::backend::Autodiff<distill_student::CpuBackend>;
                self.learn::<B>(&Default::default(), 32)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda => {
                type B = burn::backend::Autodiff<distill_student::CudaBackend>;
                self.learn::<B>(&Default::default(), 64)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => Err(StageError::Input("built without CUDA".into())),
        }
    }

    fn learn<B: TrainBackend>(
        self,
        device: &B::Device,
        default_batch: usize,
    ) -> Result<bool, StageError> {
        let fail = |e: &dyn std::fmt::Display| StageError::Failed(format!("GRPO: {e}"));
        let tokenizer = Tokenizer::from_dir(&self.start)
            .map_err(|e| StageError::Input(format!("start model: {e}")))?;
        let mut ids = Vec::with_capacity(self.prompts.len());
        let mut think_open = Vec::with_capacity(self.prompts.len());
        for p in &self.prompts {
            let text = tokenizer
                .apply_chat_template(&p.messages, true)
                .map_err(|e| StageError::Input(format!("rendering the prompts: {e}")))?;
            think_open.push(text.trim_end().ends_with("<think>"));
            ids.push(
                tokenizer
                    .encode(&text, false)
                    .map_err(|e| StageError::Input(format!("tokenizing the prompts: {e}")))?,
            );
        }
        let mut trainer = match &self.resume_from {
            Some(ckpt) => GrpoTrainer::<B>::resume(ckpt, Some(&self.start), ids, device),
            None => GrpoTrainer::<B>::new(&self.start, ids, self.config.clone(), device),
        }
        .map_err(|e| fail(&e))?;
        let _ = self.tx.blocking_send(Event::Start {
            total_steps: self.config.steps,
            done: trainer.global_step(),
        });
        let mu = self.config.updates_per_batch;
        // Checkpoints fall on batch boundaries: a batch's rollouts are not saved.
        let every = match self.stage.checkpoint_every {
            0 => 0,
            n => n.div_ceil(mu) * mu,
        };
        let max_batch = self.stage.max_batch.unwrap_or(default_batch);
        let mut last_saved = trainer.global_step();
        let save = |trainer: &GrpoTrainer<B>, last: bool| -> Result<(), StageError> {
            let saved =
                SavedCheckpoint::write(&self.artifacts, trainer.global_step(), last, |path| {
                    if last {
                        trainer.export(path, SaveOptions::default()).map(drop)
                    } else {
                        trainer.save_checkpoint(path).map(drop)
                    }
                    .map_err(|e| fail(&e))
                })?;
            let _ = self.tx.blocking_send(Event::Checkpoint(saved));
            Ok(())
        };
        let stopped = || self.stop.load(Ordering::Relaxed);
        while let Some(batch) = trainer.next_batch() {
            if stopped() {
                if trainer.global_step() > last_saved {
                    save(&trainer, false)?;
                }
                return Ok(false);
            }
            let Some(completions) = trainer
                .sample(&batch, max_batch, &stopped)
                .map_err(|e| fail(&e))?
            else {
                continue;
            };
            let mut rewards = Vec::with_capacity(completions.len());
            let mut rows = Vec::new();
            let (mut correct, mut n) = (0usize, 0usize);
            for (pos, group) in completions.iter().enumerate() {
                let p = batch.prompts[pos];
                let item = &self.prompts[p];
                let mut rs = Vec::with_capacity(group.len());
                for (k, g) in group.iter().enumerate() {
                    let (r, verdict) = reward(
                        &self.stage,
                        self.config.max_completion_tokens,
                        &item.reference,
                        think_open[p],
                        g,
                    );
                    correct += usize::from(verdict == Verdict::Correct);
                    n += 1;
                    rs.push(r);
                    if rows.len() < self.stage.keep_rollouts {
                        rows.push(RolloutRow {
                            batch: batch.index as i64,
                            prompt_id: item.id,
                            sample: k as i64,
                            completion: g.text.clone(),
                            reward: r,
                            verdict: verdict.as_str().to_string(),
                            tokens: g.token_ids.len() as i64,
                        });
                    }
                }
                rewards.push(rs);
            }
            let flat: Vec<f64> = rewards.iter().flatten().copied().collect();
            let mean = flat.iter().sum::<f64>() / flat.len() as f64;
            let std =
                (flat.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / flat.len() as f64).sqrt();
            let (metrics, zero_std_groups) = trainer
                .learn(&batch, &completions, &rewards)
                .map_err(|e| fail(&e))?;
            let stats = RewardStats {
                mean,
                std,
                pass_rate: correct as f64 / n.max(1) as f64,
                zero_std_groups,
            };
            if self.tx.blocking_send(Event::Rollouts(rows)).is_err() {
                return Ok(false);
            }
            for m in metrics {
                if self
                    .tx
                    .blocking_send(Event::Step {
                        metrics: m,
                        rewards: stats,
                    })
                    .is_err()
                {
                    return Ok(false);
                }
            }
            let step = trainer.global_step();
            if every > 0 && step % every == 0 && !trainer.is_finished() {
                save(&trainer, false)?;
                last_saved = step;
            }
        }
        save(&trainer, true)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> GrpoStageParams {
        GrpoStageParams {
            student: None,
            model: Some("m".into()),
            prompt_template: None,
            format_reward: 0.1,
            overlong_buffer: Some(20),
            overlong_penalty: 1.0,
            keep_rollouts: 16,
            checkpoint_every: 0,
            keep_last: None,
            device: Device::Cpu,
            max_batch: None,
        }
    }

    fn generation(text: &str, tokens: usize, finish: FinishReason) -> Generation {
        Generation {
            token_ids: vec![7; tokens],
            text: text.into(),
            finish_reason: finish,
        }
    }

    #[test]
    fn rewards_add_accuracy_format_and_overlong_penalty() {
        let p = params();
        let stop = FinishReason::StopToken(2);
        let right = generation(
            "3 + 4 = 7\n</think>\n\nThe answer is \\boxed{7}",
            30,
            stop.clone(),
        );
        assert_eq!(reward(&p, 100, "7", true, &right), (1.1, Verdict::Correct));
        let wrong = generation("3 + 4 = 8\n</think>\n\n\\boxed{8}", 30, stop.clone());
        assert_eq!(reward(&p, 100, "7", true, &wrong).0, 0.1);
        // 90 tokens with 80 free: half the buffer used, half the penalty.
        let long = generation("…\n</think>\n\n\\boxed{7}", 90, stop);
        let (r, _) = reward(&p, 100, "7", true, &long);
        assert!((r - 0.6).abs() < 1e-12, "{r}");
        // Cut inside the reasoning: no answer, no format reward, the full penalty.
        let cut = generation("3 + 4 = 7 and then", 100, FinishReason::Length);
        assert_eq!(reward(&p, 100, "7", true, &cut), (-1.0, Verdict::Incorrect));
    }

    fn build(needs: &[(&str, &str)], extra: &str) -> Result<(), ParamError> {
        let env = BuildEnv {
            workdir: PathBuf::from("/w"),
            teachers: Default::default(),
            stages: [
                ("p", "load"),
                ("clean", "decontaminate"),
                ("sft", "train"),
                ("ev", "evaluate"),
            ]
            .into_iter()
            .map(|(n, k)| (n.to_string(), k.to_string()))
            .collect(),
            needs: needs
                .iter()
                .map(|(n, k)| (n.to_string(), k.to_string()))
                .collect(),
        };
        let params: toml::Table = toml::from_str(extra).unwrap();
        GrpoKind.build(params, &env).map(drop)
    }

    #[test]
    fn bad_configs_name_their_field() {
        let field = |needs: &[(&str, &str)], extra: &str| build(needs, extra).unwrap_err().field;
        let ok = [("clean", "decontaminate"), ("sft", "train")];
        build(&ok, "student = \"sft\"").unwrap();
        build(
            &[("p", "load")],
            "model = \"m\"\nprompt_template = \"Q: {prompt}\"",
        )
        .unwrap();
        assert_eq!(field(&ok, "student = \"ev\""), "student");
        assert_eq!(field(&ok, "student = \"sft\"\nmodel = \"m\""), "student");
        assert_eq!(
            field(&[("clean", "decontaminate")], "student = \"sft\""),
            "needs"
        );
        assert_eq!(field(&[("sft", "train")], "student = \"sft\""), "needs");
        assert_eq!(
            field(&ok, "student = \"sft\"\ngroup_size = 1"),
            "group_size"
        );
        assert_eq!(field(&ok, "student = \"sft\"\nepsilon = 1.5"), "epsilon");
        assert_eq!(field(&ok, "student = \"sft\"\nloss = \"mean\""), "loss");
        assert_eq!(field(&ok, "student = \"sft\"\nbogus = 1"), "bogus");
        assert_eq!(
            field(&ok, "student = \"sft\"\nprompt_template = \"{prompt}\""),
            "prompt_template"
        );
        assert_eq!(
            field(
                &ok,
                "student = \"sft\"\nmax_completion_tokens = 64\noverlong_buffer = 64"
            ),
            "overlong_buffer"
        );
    }

    #[test]
    fn well_formed_needs_closed_reasoning_and_an_answer() {
        assert!(well_formed("a\n</think>\n\nb", true));
        assert!(well_formed("<think>a</think>b", false));
        assert!(!well_formed("a</think>b", false));
        assert!(!well_formed("a\n</think>\n\n  ", true));
        assert!(!well_formed("</think>b", true));
    }
}
