//! GRPO (Shao et al. 2024, DeepSeekMath; the RL of DeepSeek-R1): for each prompt the policy
//! samples a group of `group_size` completions, the caller rewards them, advantages are the
//! rewards normalised within each group, and a PPO-style clipped surrogate with an optional
//! KL penalty to the frozen starting model updates the policy; no value model.
//!
//! The loss is TRL's `GRPOTrainer` loss term for term (a committed PyTorch reference checks
//! it, `tests/it/grpo.rs`): per-token log-probabilities of the completion under logits divided
//! by the sampling temperature; ratio `r = exp(logp − logp_old)` (`logp_old` is `logp`
//! detached when each generated batch serves one update); per-token loss
//! `−min(r·A, clip(r, 1 − ε, 1 + ε_high)·A) + β·(exp(ref − logp) − (ref − logp) − 1)`
//! (k3 KL estimator); summed with a per-token weight that is the loss normalisation:
//! `grpo` = 1 / (|o_i| · sequences) (mean over sequences of their token mean), `dapo` =
//! 1 / (tokens in the batch), `dr_grpo` = 1 / (sequences · max_completion_tokens).
//!
//! Randomness is counters only, as in SFT: batch `b` takes prompts from the shuffle of epoch
//! `b·P / n` (seeded by `(seed, epoch)`), and completion `g` of prompt `p` samples from a
//! ChaCha stream seeded by `(seed, b, p, g)`; so a checkpoint (weights, AdamW state, counters)
//! resumes to the same weights as an uninterrupted run.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::log_softmax;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::TrainBackend;
use super::checkpoint;
use super::config::{LoraConfig, LrSchedule, Precision, TrainConfig};
use super::data::mix;
use super::error::{TrainError, TrainResult};
use super::lora::LoraAdapters;
use super::model::{Fwd, TrainModel};
use super::schedule;
use super::trainer::{
    Adam, NamedTensor, SquaredNorms, adam, assemble, compute_dtype, dir_bytes, export_model,
    gpu_reserved_bytes, load_base, load_checkpoint_weights, load_optimizer, merged_record,
    named_gradients, peak_rss_bytes, save_weights_and_optimizer, select_rows, storage_dtype,
    sum_f64, update,
};
use crate::batching::{BatchEvent, BatchGenerator, SequenceRequest};
use crate::generate::{FinishReason, Generation, GenerationConfig};
use crate::model::CausalLm;
use crate::quant::QuantOps;
use crate::tokenizer::Tokenizer;
use crate::weights::{SaveOptions, SavedCheckpoint, load_model};

/// Name of the GRPO state file in a checkpoint folder.
pub const GRPO_STATE_FILE: &str = "grpo_state.json";
const GRPO_STATE_FORMAT: u32 = 1;

/// How the per-token losses of a batch are summed into one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLoss {
    /// GRPO's: each sequence's token mean, averaged over sequences (long completions weigh
    /// less per token).
    Grpo,
    /// DAPO's token-level mean over the whole batch.
    Dapo,
    /// Dr. GRPO's: token sum over sequences × `max_completion_tokens`, a constant, so no
    /// length bias.
    DrGrpo,
}

/// GRPO parameters. Defaults follow TRL's `GRPOConfig` where it has one (ε 0.2, β 0,
/// temperature 1, 8 completions a prompt, lr 1e-6 constant, clipping at norm 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// Optimizer steps in all.
    pub steps: usize,
    /// Prompts sampled per generated batch.
    pub prompts_per_step: usize,
    /// Completions per prompt (G).
    pub group_size: usize,
    /// Optimizer steps each generated batch serves (μ; TRL's `num_iterations`).
    pub updates_per_batch: usize,
    /// Lower clipping range ε.
    pub epsilon: f64,
    /// Upper clipping range (DAPO's ε_high; default ε).
    pub epsilon_high: Option<f64>,
    /// KL coefficient β to the frozen starting model (0: no reference model is kept).
    pub beta: f64,
    /// Loss normalisation.
    pub loss: GrpoLoss,
    /// Divide advantages by the group's standard deviation (Dr. GRPO turns it off).
    pub scale_rewards: bool,
    /// Completion budget in tokens.
    pub max_completion_tokens: usize,
    /// Sampling temperature (the loss divides logits by it, as TRL does).
    pub temperature: f64,
    /// Nucleus sampling.
    pub top_p: f64,
    /// Sequences per forward/backward pass.
    pub micro_batch: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Learning-rate shape after warmup.
    pub schedule: LrSchedule,
    /// Warmup as a fraction of `steps`.
    pub warmup_ratio: f64,
    /// Final learning rate of a decaying schedule, as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// AdamW β1.
    pub adam_beta1: f64,
    /// AdamW β2.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_eps: f64,
    /// Decoupled weight decay on matrices.
    pub weight_decay: f64,
    /// Global gradient-norm clipping.
    pub max_grad_norm: Option<f64>,
    /// Seed of prompt order and sampling.
    pub seed: u64,
    /// Train LoRA adapters on a frozen base instead of every weight.
    pub lora: Option<LoraConfig>,
    /// Compute precision.
    pub precision: Precision,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            prompts_per_step: 16,
            group_size: 8,
            updates_per_batch: 1,
            epsilon: 0.2,
            epsilon_high: None,
            beta: 0.0,
            loss: GrpoLoss::Grpo,
            scale_rewards: true,
            max_completion_tokens: 256,
            temperature: 1.0,
            top_p: 1.0,
            micro_batch: 16,
            learning_rate: 1e-6,
            schedule: LrSchedule::Constant,
            warmup_ratio: 0.0,
            min_lr_ratio: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            seed: 42,
            lora: None,
            precision: Precision::F32,
        }
    }
}

impl GrpoConfig {
    /// Checks every range, naming the field.
    pub fn validate(&self) -> TrainResult<()> {
        let bad = |field: &str, message: String| Err(TrainError::config(field, message));
        for (field, v) in [
            ("steps", self.steps),
            ("prompts_per_step", self.prompts_per_step),
            ("updates_per_batch", self.updates_per_batch),
            ("max_completion_tokens", self.max_completion_tokens),
            ("micro_batch", self.micro_batch),
        ] {
            if v == 0 {
                return bad(field, "must be positive".into());
            }
        }
        if self.group_size < 2 {
            return bad(
                "group_size",
                format!(
                    "{} leaves no group to compare within (at least 2)",
                    self.group_size
                ),
            );
        }
        if !(self.epsilon > 0.0 && self.epsilon < 1.0) {
            return bad("epsilon", format!("{} is not in (0, 1)", self.epsilon));
        }
        if let Some(e) = self.epsilon_high
            && !(e > 0.0 && e.is_finite())
        {
            return bad("epsilon_high", format!("{e} is not > 0"));
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return bad("beta", format!("{} is not >= 0", self.beta));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(
                "temperature",
                format!("{} is not > 0 (GRPO samples)", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} is not in (0, 1]", self.top_p));
        }
        self.optimizer().validate()
    }

    fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }

    /// The optimizer, schedule, LoRA and precision settings in the SFT trainer's form (its
    /// AdamW, schedule and checkpoint code are shared).
    pub fn optimizer(&self) -> TrainConfig {
        TrainConfig {
            learning_rate: self.learning_rate,
            schedule: self.schedule,
            warmup_ratio: self.warmup_ratio,
            warmup_steps: None,
            min_lr_ratio: self.min_lr_ratio,
            epochs: 1,
            max_steps: Some(self.steps),
            adam_beta1: self.adam_beta1,
            adam_beta2: self.adam_beta2,
            adam_eps: self.adam_eps,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            lora: self.lora.clone(),
            precision: self.precision,
            ..TrainConfig::default()
        }
    }

    /// Generated batches the run samples.
    pub fn batches(&self) -> usize {
        self.steps.div_ceil(self.updates_per_batch)
    }
}

/// Group-normalised advantages of `rewards` (groups of `group` consecutive entries), TRL's
/// way: `(r − mean) / (std + 1e-4)` with the unbiased standard deviation, or `r − mean`
/// without `scale`. Also returns the fraction of groups whose rewards are all equal (they
/// teach nothing).
pub fn group_advantages(rewards: &[f64], group: usize, scale: bool) -> (Vec<f64>, f64) {
    let mut out = Vec::with_capacity(rewards.len());
    let (mut flat, mut groups) = (0usize, 0usize);
    for g in rewards.chunks(group) {
        let n = g.len() as f64;
        let mean = g.iter().sum::<f64>() / n;
        let var = g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        let std = var.sqrt();
        groups += 1;
        if std < 1e-6 {
            flat += 1;
        }
        out.extend(g.iter().map(|r| {
            if scale {
                (r - mean) / (std + 1e-4)
            } else {
                r - mean
            }
        }));
    }
    (out, flat as f64 / groups.max(1) as f64)
}

/// One completion to learn from.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Completion token ids, the stop token included when one ended it.
    pub completion: Vec<u32>,
    /// Its advantage.
    pub advantage: f64,
    /// Per-token log-probabilities under the policy that sampled it (computed when `None`
    /// and the batch serves several updates).
    pub old_logps: Option<Vec<f32>>,
    /// Per-token log-probabilities under the reference model (computed when `None` and
    /// β > 0).
    pub ref_logps: Option<Vec<f32>>,
}

/// The prompts of one generated batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptBatch {
    /// Index of the batch (0-based).
    pub index: usize,
    /// Indices into the trainer's prompts, `prompts_per_step` of them.
    pub prompts: Vec<usize>,
}

/// What one GRPO optimizer step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrpoStepMetrics {
    /// Optimizer steps completed, this one included.
    pub step: usize,
    /// The generated batch it learned from.
    pub batch: usize,
    /// The surrogate loss (with the KL term).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Mean per-token KL (k3) to the reference; `None` with β = 0.
    pub kl: Option<f64>,
    /// Fraction of completion tokens whose ratio was clipped (below 1 − ε with a negative
    /// advantage, or above 1 + ε_high with a positive one).
    pub clip_fraction: f64,
    /// Mean per-token entropy of the policy (at the sampling temperature).
    pub entropy: f64,
    /// Mean completion length in tokens.
    pub completion_tokens: f64,
    /// Completion tokens in the batch.
    pub tokens: usize,
    /// Wall time of the update (forward, backward, optimizer).
    pub step_time_s: f64,
    /// Peak memory, as the SFT trainer reports it.
    pub peak_memory_bytes: u64,
}

/// What a checkpoint holds besides weights and optimizer state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrpoState {
    /// Layout version.
    pub format: u32,
    /// Optimizer steps completed.
    pub global_step: usize,
    /// The run's parameters.
    pub config: GrpoConfig,
    /// The model folder the run started from (the reference model, and a LoRA run's base).
    pub base_model: PathBuf,
    /// Prompts the run samples from, by count and FNV-1a of their ids (resume refuses others).
    pub prompts: usize,
    /// Fingerprint of the prompts (hex).
    pub prompts_fingerprint: String,
    /// Parameter paths in visiting order (the optimizer record's ids).
    pub param_names: Vec<String>,
    /// Metrics of the last step.
    pub last_step: Option<GrpoStepMetrics>,
}

/// Reads a checkpoint's `grpo_state.json`.
pub fn read_grpo_state(dir: impl AsRef<Path>) -> TrainResult<GrpoState> {
    let path = dir.as_ref().join(GRPO_STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let state: GrpoState = serde_json::from_str(&text)
        .map_err(|e| TrainError::checkpoint(&path, format!("invalid GRPO state: {e}")))?;
    if state.format != GRPO_STATE_FORMAT {
        return Err(TrainError::checkpoint(
            &path,
            format!(
                "field `format`: layout {} is not the supported {GRPO_STATE_FORMAT}",
                state.format
            ),
        ));
    }
    Ok(state)
}

/// The GRPO learner: policy, optimizer, optional frozen reference, prompt schedule.
pub struct GrpoTrainer<B: TrainBackend> {
    model: Option<TrainModel<B>>,
    opt_decay: Adam<B>,
    opt_plain: Adam<B>,
    decay_ids: HashSet<ParamId>,
    /// The starting model, frozen, for the KL term (β > 0, full fine-tuning; a LoRA run's
    /// reference is its own base without adapters).
    reference: Option<TrainModel<B::InnerBackend>>,
    config: GrpoConfig,
    optim: TrainConfig,
    prompts: Vec<Vec<u32>>,
    tokenizer: Option<Tokenizer>,
    stop_token_ids: Vec<u32>,
    base_dir: PathBuf,
    param_names: Vec<String>,
    global_step: usize,
    device: B::Device,
    last: Option<GrpoStepMetrics>,
}

impl<B: TrainBackend> GrpoTrainer<B> {
    /// Starts from the HF model folder `model_dir` (with its tokenizer, for sampling) on
    /// `prompts` (token ids, chat template applied).
    pub fn new(
        model_dir: impl AsRef<Path>,
        prompts: Vec<Vec<u32>>,
        config: GrpoConfig,
        device: &B::Device,
    ) -> TrainResult<Self> {
        config.validate()?;
        let dir = model_dir.as_ref();
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let optim = config.optimizer();
        let (base, quant) = load_base::<B>(&dir, &optim, device)?;
        Self::build(base, None, quant, dir, prompts, config, device)
    }

    /// Continues the run saved in `checkpoint` (same prompts, checked by fingerprint);
    /// `base_model` overrides the recorded starting folder (for one that moved).
    pub fn resume(
        checkpoint: impl AsRef<Path>,
        base_model: Option<&Path>,
        prompts: Vec<Vec<u32>>,
        device: &B::Device,
    ) -> TrainResult<Self> {
        let ckpt = checkpoint.as_ref();
        let state = read_grpo_state(ckpt)?;
        let state_path = ckpt.join(GRPO_STATE_FILE);
        let config = state.config.clone();
        config.validate()?;
        let optim = config.optimizer();
        let dir = base_model
            .map(Path::to_path_buf)
            .unwrap_or_else(|| state.base_model.clone());
        let (base, adapters, quant) = load_checkpoint_weights::<B>(ckpt, &dir, &optim, device)?;
        let fp = format!("{:016x}", prompts_fingerprint(&prompts));
        if fp != state.prompts_fingerprint || prompts.len() != state.prompts {
            return Err(TrainError::checkpoint(
                &state_path,
                format!(
                    "field `prompts_fingerprint`: the prompts differ from the run's ({} prompts, {fp} vs {} prompts, {})",
                    prompts.len(),
                    state.prompts,
                    state.prompts_fingerprint
                ),
            ));
        }
        let mut t = Self::build(base, adapters, quant, dir, prompts, config, device)?;
        (t.opt_decay, t.opt_plain) = load_optimizer(
            ckpt,
            &state_path,
            (&t.param_names, &state.param_names),
            &t.decay_ids,
            &t.optim,
            device,
        )?;
        t.global_step = state.global_step;
        t.last = state.last_step;
        Ok(t)
    }

    fn build(
        base: CausalLm<B>,
        adapters: Option<LoraAdapters<B>>,
        quant: Vec<super::QuantLayer<B>>,
        base_dir: PathBuf,
        prompts: Vec<Vec<u32>>,
        config: GrpoConfig,
        device: &B::Device,
    ) -> TrainResult<Self> {
        let optim = config.optimizer();
        if prompts.is_empty() {
            return Err(TrainError::NoData("no prompts to sample from".into()));
        }
        let vocab = base.config.vocab_size;
        for (index, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(TrainError::NoData(format!("prompt {index} has no tokens")));
            }
            if let Some(&token) = p.iter().find(|&&t| t as usize >= vocab) {
                return Err(TrainError::TokenOutOfRange {
                    index,
                    token,
                    vocab,
                });
            }
        }
        let tokenizer = if base_dir.join("tokenizer.json").is_file() {
            Some(Tokenizer::from_dir(&base_dir)?)
        } else {
            None
        };
        let mut stop_token_ids = base.config.eos_token_ids.clone();
        stop_token_ids.extend(tokenizer.as_ref().and_then(|t| t.eos_token_id));
        stop_token_ids.sort_unstable();
        stop_token_ids.dedup();
        let reference = match (&optim.lora, config.beta > 0.0) {
            (None, true) => {
                let dtype = storage_dtype(&optim);
                let r = load_model::<B::InnerBackend>(&base_dir, device, dtype)?;
                Some(TrainModel {
                    base: r,
                    lora: None,
                    quant: Vec::new(),
                })
            }
            _ => None,
        };
        let (model, decay_ids, param_names) = assemble(base, adapters, quant, &optim, device);
        Ok(Self {
            opt_decay: adam::<B>(&optim, optim.weight_decay),
            opt_plain: adam::<B>(&optim, 0.0),
            model: Some(model),
            decay_ids,
            reference,
            prompts,
            tokenizer,
            stop_token_ids,
            base_dir,
            param_names,
            global_step: 0,
            device: device.clone(),
            last: None,
            config,
            optim,
        })
    }

    /// The run's parameters.
    pub fn config(&self) -> &GrpoConfig {
        &self.config
    }

    /// Optimizer steps completed.
    pub fn global_step(&self) -> usize {
        self.global_step
    }

    /// True once every step has been taken.
    pub fn is_finished(&self) -> bool {
        self.global_step >= self.config.steps
    }

    /// Metrics of the last step (restored on resume).
    pub fn last_metrics(&self) -> Option<&GrpoStepMetrics> {
        self.last.as_ref()
    }

    /// The tokenizer of the starting folder.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// The policy without autodiff, adapters merged (for sampling and evaluation).
    pub fn merged_model(&self) -> CausalLm<B::InnerBackend> {
        self.model().valid().merged()
    }

    fn model(&self) -> &TrainModel<B> {
        self.model.as_ref().expect("model is present between steps")
    }

    /// The next generated batch's prompts, `None` once the run is complete. A checkpoint is
    /// always at a batch boundary, so the batch is a function of the step alone.
    pub fn next_batch(&self) -> Option<PromptBatch> {
        if self.is_finished() {
            return None;
        }
        let index = self.global_step / self.config.updates_per_batch;
        let per = self.config.prompts_per_step;
        let prompts = prompt_schedule(self.config.seed, self.prompts.len(), index * per, per);
        Some(PromptBatch { index, prompts })
    }

    /// Samples `group_size` completions of each prompt of `batch` from the current policy with
    /// the batched generator; `[prompt][g]`. Each completion's randomness is its own stream
    /// (seed, batch, position, g), so the batch composition changes nothing. Stops early,
    /// returning `None`, when `stop` says so.
    pub fn sample(
        &self,
        batch: &PromptBatch,
        max_batch: usize,
        stop: &dyn Fn() -> bool,
    ) -> TrainResult<Option<Vec<Vec<Generation>>>> {
        let model = self.merged_model();
        let g = self.config.group_size;
        let seed = mix(mix(self.config.seed, 0x5A3B), batch.index as u64);
        let requests: Vec<SequenceRequest> = batch
            .prompts
            .iter()
            .enumerate()
            .flat_map(|(pos, &p)| (0..g).map(move |k| (pos, p, k)))
            .map(|(pos, p, k)| {
                SequenceRequest::new(self.prompts[p].clone(), mix(seed, (pos * g + k) as u64), 0)
            })
            .collect();
        let sampling = GenerationConfig {
            max_new_tokens: self.config.max_completion_tokens,
            temperature: self.config.temperature as f32,
            top_p: self.config.top_p as f32,
            top_k: 0,
            seed: 0,
            stop_token_ids: self.stop_token_ids.clone(),
            stop_strings: Vec::new(),
        };
        let mut out: Vec<Option<Generation>> = vec![None; requests.len()];
        let mut stopped = false;
        BatchGenerator::new(&model, self.tokenizer.as_ref(), sampling)?
            .max_batch(max_batch)
            .run(&requests, |event| {
                if stop() {
                    stopped = true;
                    return ControlFlow::Break(());
                }
                if let BatchEvent::Finished {
                    request,
                    generation,
                } = event
                {
                    out[request] = Some(generation);
                }
                ControlFlow::Continue(())
            })?;
        if stopped {
            return Ok(None);
        }
        let flat: Vec<Generation> = out
            .into_iter()
            .map(|g| g.expect("every request finishes"))
            .collect();
        Ok(Some(flat.chunks(g).map(<[Generation]>::to_vec).collect()))
    }

    /// Learns from one generated batch: `rewards[p][g]` of `completions[p][g]` (as
    /// [`Self::sample`] returned them) become group-normalised advantages, and the batch
    /// serves `updates_per_batch` optimizer steps (fewer at the run's end). Returns each step's
    /// metrics and the batch's fraction of zero-variance groups.
    pub fn learn(
        &mut self,
        batch: &PromptBatch,
        completions: &[Vec<Generation>],
        rewards: &[Vec<f64>],
    ) -> TrainResult<(Vec<GrpoStepMetrics>, f64)> {
        let flat: Vec<f64> = rewards.iter().flatten().copied().collect();
        let (adv, zero_std) =
            group_advantages(&flat, self.config.group_size, self.config.scale_rewards);
        let mut rollouts = Vec::with_capacity(flat.len());
        for (pos, group) in completions.iter().enumerate() {
            for g in group {
                let mut completion = g.token_ids.clone();
                if let FinishReason::StopToken(t) = g.finish_reason {
                    completion.push(t);
                }
                rollouts.push(Rollout {
                    prompt: self.prompts[batch.prompts[pos]].clone(),
                    completion,
                    advantage: adv[rollouts.len()],
                    old_logps: None,
                    ref_logps: None,
                });
            }
        }
        let mut metrics = Vec::new();
        for _ in 0..self.config.updates_per_batch {
            if self.is_finished() {
                break;
            }
            metrics.push(self.update(batch.index, &mut rollouts)?);
        }
        Ok((metrics, zero_std))
    }

    /// One optimizer step on `rollouts`; fills in the old (μ > 1) and reference (β > 0)
    /// log-probabilities on first use.
    pub fn update(
        &mut self,
        batch: usize,
        rollouts: &mut [Rollout],
    ) -> TrainResult<GrpoStepMetrics> {
        let t0 = Instant::now();
        self.fill_fixed_logps(rollouts);
        let model = self.model.take().expect("model is present between steps");
        let (grads, stats) = self.loss_and_grads(&model, rollouts);
        let mut norms = SquaredNorms::<B> {
            grads: std::slice::from_ref(&grads),
            parts: vec![],
        };
        model.visit(&mut norms);
        let grad_norm = sum_f64(norms.parts).sqrt();
        if !(stats.loss.is_finite() && grad_norm.is_finite()) {
            self.model = Some(model);
            return Err(TrainError::NonFinite {
                step: self.global_step + 1,
                loss: stats.loss,
                grad_norm,
            });
        }
        let factor = self
            .optim
            .max_grad_norm
            .map(|max| max / (grad_norm + 1e-6))
            .filter(|&c| c < 1.0);
        let lr = schedule::learning_rate(&self.optim, self.global_step, self.config.steps);
        let model = update(
            model,
            grads,
            factor,
            &self.decay_ids,
            lr,
            &mut self.opt_decay,
            &mut self.opt_plain,
        );
        self.model = Some(model);
        self.global_step += 1;
        let m = GrpoStepMetrics {
            step: self.global_step,
            batch,
            loss: stats.loss,
            lr,
            grad_norm,
            kl: (self.config.beta > 0.0).then_some(stats.kl),
            clip_fraction: stats.clipped as f64 / stats.tokens.max(1) as f64,
            entropy: stats.entropy,
            completion_tokens: stats.tokens as f64 / rollouts.len().max(1) as f64,
            tokens: stats.tokens,
            step_time_s: t0.elapsed().as_secs_f64(),
            peak_memory_bytes: gpu_reserved_bytes::<B>(std::slice::from_ref(&self.device))
                .unwrap_or_else(peak_rss_bytes),
        };
        self.last = Some(m.clone());
        Ok(m)
    }

    /// The loss of `rollouts` (old and reference log-probabilities as given: `None` old means
    /// "the current policy, detached"; `None` reference needs β = 0) and its gradients by HF
    /// name, without updating anything: for checks against other implementations.
    pub fn peek_loss_and_gradients(
        &mut self,
        rollouts: &[Rollout],
    ) -> TrainResult<(f64, Vec<NamedTensor>)> {
        if self.config.beta > 0.0 && rollouts.iter().any(|r| r.ref_logps.is_none()) {
            return Err(TrainError::config(
                "beta",
                "peek needs the reference log-probabilities of every rollout",
            ));
        }
        let model = self.model.take().expect("model is present between steps");
        let (grads, stats) = self.loss_and_grads(&model, rollouts);
        let named = named_gradients(&model, &grads);
        self.model = Some(model);
        Ok((stats.loss, named))
    }

    /// Old (μ > 1) and reference (β > 0) log-probabilities, computed once per batch without
    /// autodiff.
    fn fill_fixed_logps(&self, rollouts: &mut [Rollout]) {
        let need_old =
            self.config.updates_per_batch > 1 && rollouts.iter().any(|r| r.old_logps.is_none());
        let need_ref = self.config.beta > 0.0 && rollouts.iter().any(|r| r.ref_logps.is_none());
        if need_old {
            let policy = self.model().valid();
            let lps = self.logps_no_grad(&policy, rollouts);
            for (r, l) in rollouts.iter_mut().zip(lps) {
                r.old_logps.get_or_insert(l);
            }
        }
        if need_ref {
            let reference = match &self.reference {
                Some(r) => r.clone(),
                None => {
                    let m = self.model().valid();
                    TrainModel {
                        base: m.base,
                        lora: None,
                        quant: m.quant,
                    }
                }
            };
            let lps = self.logps_no_grad(&reference, rollouts);
            for (r, l) in rollouts.iter_mut().zip(lps) {
                r.ref_logps.get_or_insert(l);
            }
        }
    }

    fn logps_no_grad(
        &self,
        model: &TrainModel<B::InnerBackend>,
        rollouts: &[Rollout],
    ) -> Vec<Vec<f32>> {
        let dtype = compute_dtype(&self.optim);
        let mut out = Vec::with_capacity(rollouts.len());
        for chunk in rollouts.chunks(self.config.micro_batch) {
            let mb = MicroBatch::new(chunk);
            let (logp, _) = forward_logps(
                model,
                &mb,
                dtype,
                self.config.temperature,
                0.0,
                0,
                &self.device,
            );
            let flat = logp
                .into_data()
                .to_vec::<f32>()
                .expect("f32 log-probabilities");
            let mut at = 0;
            for r in chunk {
                let n = r.completion.len();
                out.push(flat[at..at + n].to_vec());
                at += n;
            }
        }
        out
    }

    /// Gradients of the batch loss (every micro-batch's backward carries its tokens' share of
    /// the normalisation, so the sum is the whole batch's loss) and the step's statistics.
    fn loss_and_grads(
        &self,
        model: &TrainModel<B>,
        rollouts: &[Rollout],
    ) -> (GradientsParams, Stats) {
        let cfg = &self.config;
        let dtype = compute_dtype(&self.optim);
        let dropout = self.optim.lora.as_ref().map_or(0.0, |l| l.dropout);
        let n_seq = rollouts.len() as f64;
        let total_tokens: usize = rollouts.iter().map(|r| r.completion.len()).sum();
        let weight = |r: &Rollout| -> f32 {
            (match cfg.loss {
                GrpoLoss::Grpo => 1.0 / (r.completion.len().max(1) as f64 * n_seq),
                GrpoLoss::Dapo => 1.0 / total_tokens.max(1) as f64,
                GrpoLoss::DrGrpo => 1.0 / (n_seq * cfg.max_completion_tokens as f64),
            }) as f32
        };
        let (lo, hi) = (1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high());
        let mut acc = GradientsAccumulator::<TrainModel<B>>::new();
        let mut stats = Stats::default();
        let mut loss_parts = Vec::new();
        let mut kl_parts = Vec::new();
        let mut entropy_parts = Vec::new();
        for (m, chunk) in rollouts.chunks(cfg.micro_batch).enumerate() {
            let mb = MicroBatch::new(chunk);
            let n = mb.targets.len();
            if n == 0 {
                continue;
            }
            let seed = mix(mix(cfg.seed, 0xD80F), (self.global_step * 1024 + m) as u64);
            let device = &self.device;
            let (logp, logp_all) =
                forward_logps(model, &mb, dtype, cfg.temperature, dropout, seed, device);
            let vec = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v, [n]), device);
            let adv: Vec<f32> = chunk
                .iter()
                .flat_map(|r| std::iter::repeat_n(r.advantage as f32, r.completion.len()))
                .collect();
            let w: Vec<f32> = chunk
                .iter()
                .flat_map(|r| std::iter::repeat_n(weight(r), r.completion.len()))
                .collect();
            let old = if chunk.iter().all(|r| r.old_logps.is_some()) {
                vec(chunk
                    .iter()
                    .flat_map(|r| r.old_logps.clone().expect("checked"))
                    .collect())
            } else {
                logp.clone().detach()
            };
            let ratio = (logp.clone() - old).exp();
            let adv_t = vec(adv.clone());
            let surrogate =
                (ratio.clone() * adv_t.clone()).min_pair(ratio.clone().clamp(lo, hi) * adv_t);
            let mut per_token = surrogate.neg();
            if cfg.beta > 0.0 {
                let reference = vec(chunk
                    .iter()
                    .flat_map(|r| r.ref_logps.clone().expect("reference log-probabilities"))
                    .collect());
                let d = reference - logp.clone();
                let kl = d.clone().exp() - d - 1.0;
                kl_parts.push(kl.clone().inner().sum());
                per_token = per_token + kl.mul_scalar(cfg.beta);
            }
            let loss = (per_token * vec(w)).sum();
            loss_parts.push(loss.clone().inner());
            // Host-side statistics from values already computed.
            let lp_inner = logp_all.clone().inner();
            entropy_parts.push((lp_inner.clone().exp() * lp_inner).sum().neg());
            let r: Vec<f32> = ratio
                .inner()
                .into_data()
                .to_vec::<f32>()
                .expect("f32 ratios");
            stats.clipped += r
                .iter()
                .zip(&adv)
                .filter(|&(&r, &a)| (r < lo as f32 && a < 0.0) || (r > hi as f32 && a > 0.0))
                .count();
            stats.tokens += n;
            let grads = loss.backward();
            acc.accumulate(model, GradientsParams::from_grads(grads, model));
        }
        stats.loss = sum_f64(loss_parts);
        let tokens = stats.tokens.max(1) as f64;
        stats.kl = sum_f64(kl_parts) / tokens;
        stats.entropy = sum_f64(entropy_parts) / tokens;
        (acc.grads(), stats)
    }

    /// Writes a checkpoint (weights, optimizer, `grpo_state.json`) into `dir` atomically.
    pub fn save_checkpoint(&self, dir: impl AsRef<Path>) -> TrainResult<super::CheckpointInfo> {
        let dir = dir.as_ref();
        let tmp = checkpoint::begin(dir)?;
        let record = merged_record(&self.opt_decay, &self.opt_plain);
        save_weights_and_optimizer(self.model(), Some(record), Some(&self.base_dir), &tmp)?;
        let state = GrpoState {
            format: GRPO_STATE_FORMAT,
            global_step: self.global_step,
            config: self.config.clone(),
            base_model: self.base_dir.clone(),
            prompts: self.prompts.len(),
            prompts_fingerprint: format!("{:016x}", prompts_fingerprint(&self.prompts)),
            param_names: self.param_names.clone(),
            last_step: self.last.clone(),
        };
        let path = tmp.join(GRPO_STATE_FILE);
        let text = serde_json::to_string_pretty(&state).expect("GRPO state serialises");
        std::fs::write(&path, text + "\n").map_err(|e| TrainError::io(&path, e))?;
        let bytes = dir_bytes(&tmp)?;
        checkpoint::commit(&tmp, dir)?;
        Ok(super::CheckpointInfo {
            dir: dir.to_path_buf(),
            step: self.global_step,
            bytes,
        })
    }

    /// Writes the policy as a plain HF folder (adapters merged, PEFT adapter beside), as the
    /// SFT trainer's export does.
    pub fn export(&self, dir: impl AsRef<Path>, opts: SaveOptions) -> TrainResult<SavedCheckpoint> {
        export_model(self.model(), Some(&self.base_dir), dir.as_ref(), opts)
    }
}

/// Figures of one update gathered on the way.
#[derive(Default)]
struct Stats {
    loss: f64,
    kl: f64,
    entropy: f64,
    clipped: usize,
    tokens: usize,
}

/// Rollouts as one right-padded batch: row `r` is prompt ++ completion; the scored rows are
/// the positions whose next token is a completion token.
struct MicroBatch {
    ids: Vec<i64>,
    rows: usize,
    width: usize,
    scored: Vec<i64>,
    targets: Vec<i64>,
}

impl MicroBatch {
    fn new(rollouts: &[Rollout]) -> Self {
        let width = rollouts
            .iter()
            .map(|r| r.prompt.len() + r.completion.len())
            .max()
            .unwrap_or(1);
        let rows = rollouts.len();
        let mut ids = vec![0i64; rows * width];
        let (mut scored, mut targets) = (Vec::new(), Vec::new());
        for (row, r) in rollouts.iter().enumerate() {
            let seq = r.prompt.iter().chain(&r.completion);
            for (j, &t) in seq.enumerate() {
                ids[row * width + j] = i64::from(t);
            }
            for (j, &t) in r.completion.iter().enumerate() {
                scored.push((row * width + r.prompt.len() - 1 + j) as i64);
                targets.push(i64::from(t));
            }
        }
        Self {
            ids,
            rows,
            width,
            scored,
            targets,
        }
    }
}

/// Per-token log-probabilities of every rollout's completion, flattened in order, and the
/// whole log-distribution at those positions `[tokens, vocab]` (logits divided by the
/// sampling temperature).
#[allow(clippy::too_many_arguments)]
fn forward_logps<B: QuantOps>(
    model: &TrainModel<B>,
    mb: &MicroBatch,
    dtype: DType,
    temperature: f64,
    dropout: f64,
    dropout_seed: u64,
    device: &B::Device,
) -> (Tensor<B, 1>, Tensor<B, 2>) {
    let n = mb.targets.len();
    let f = Fwd::<B>::new(
        &model.base.config,
        mb.width,
        dtype,
        dropout,
        dropout_seed,
        device,
    );
    let ids = TensorData::new(mb.ids.clone(), [mb.rows, mb.width]);
    let mut x = model.embed(Tensor::from_data(ids, device), &f);
    for i in 0..model.num_layers() {
        x = model.layer(i, x, &f, None);
    }
    let scored = Tensor::<B, 1, Int>::from_data(TensorData::new(mb.scored.clone(), [n]), device);
    let h = select_rows(model.final_norm(x, &f), scored);
    let logp_all = log_softmax(model.head(h, dtype).div_scalar(temperature), 1);
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(mb.targets.clone(), [n]), device);
    let logp = logp_all
        .clone()
        .gather(1, targets.unsqueeze_dim(1))
        .reshape([n]);
    (logp, logp_all)
}

/// Prompt indices `start..start + count` of the run's endless schedule: epoch `e` visits all
/// `n` prompts in the shuffle seeded by `(seed, e)`.
fn prompt_schedule(seed: u64, n: usize, start: usize, count: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(count);
    let mut order: Option<(usize, Vec<usize>)> = None;
    for k in start..start + count {
        let epoch = k / n;
        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut o: Vec<usize> = (0..n).collect();
            o.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(
                mix(seed, 0x6770),
                epoch as u64,
            )));
            order = Some((epoch, o));
        }
        out.push(order.as_ref().expect("just set").1[k % n]);
    }
    out
}

/// FNV-1a over the prompts' ids and lengths.
fn prompts_fingerprint(prompts: &[Vec<u32>]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: u64| {
        for b in v.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for p in prompts {
        eat(p.len() as u64);
        for &t in p {
            eat(u64::from(t));
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_are_normalised_within_groups() {
        let (a, zero) = group_advantages(&[1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5], 4, true);
        // mean 0.5, unbiased std sqrt(1/3).
        let s = (1.0f64 / 3.0).sqrt() + 1e-4;
        for (got, want) in a
            .iter()
            .zip([0.5 / s, -0.5 / s, 0.5 / s, -0.5 / s, 0.0, 0.0, 0.0, 0.0])
        {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        assert_eq!(zero, 0.5);
        let (b, _) = group_advantages(&[1.0, 0.0, 0.0, 0.0], 4, false);
        assert_eq!(b, vec![0.75, -0.25, -0.25, -0.25]);
    }

    #[test]
    fn batches_cycle_through_every_prompt_each_epoch() {
        let all = prompt_schedule(7, 6, 0, 12);
        for epoch in all.chunks(6) {
            let mut seen = epoch.to_vec();
            seen.sort_unstable();
            assert_eq!(seen, (0..6).collect::<Vec<_>>());
        }
        assert_ne!(all[..6], all[6..], "each epoch has its own shuffle");
        assert_eq!(prompt_schedule(7, 6, 4, 5), all[4..9]);
    }

    #[test]
    fn config_names_the_bad_field() {
        let bad = GrpoConfig {
            group_size: 1,
            ..GrpoConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("group_size")
        );
        let bad = GrpoConfig {
            temperature: 0.0,
            ..GrpoConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("temperature")
        );
    }
}
