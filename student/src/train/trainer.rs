//! The SFT trainer the `train` stage drives: construct, `step()` until `None`, `save_checkpoint`
//! whenever, `resume` after a crash, `export` at the end.
//!
//! One optimizer step = up to `grad_accum` micro-batches of the current epoch's plan. The loss is
//! the sum of target-token negative log-likelihoods over the whole step divided by the step's
//! target-token count (each micro-batch's backward is scaled by that global count, so no
//! mean-of-means). Backward is staged:
//! 1. trunk forward to the final-norm hidden states; only the scored rows are kept;
//! 2. the LM head and f32 log-softmax run on chunks of `loss_chunk_tokens` rows, each chunk a
//!    separate graph with its own backward, so at most one chunk of logits exists at a time;
//! 3. the hidden-state gradient is pushed through the trunk with one backward of
//!    `sum(hidden · grad)`.
//!
//! With `recompute`, step 1 runs without autodiff, keeping only each layer's input; backward then
//! re-runs one layer at a time under autodiff and pushes the gradient through it the same way
//! (per-layer activation checkpointing, exact up to float reassociation).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::TrainBackend;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::{DType, TensorPrimitive};
use serde::{Deserialize, Serialize};

use super::checkpoint::{
    self, OPTIMIZER_STEM, RngState, STATE_FORMAT, TrainerState, read_trainer_state,
};
use super::collective::{SharedGroup, lock};
use super::config::{Precision, TrainConfig};
use super::data::{self, Batch, DataStats, Sequence};
use super::error::{TrainError, TrainResult};
use super::lora::LoraAdapters;

/// Subfolder of a LoRA run's export holding its adapter in PEFT's layout (a subfolder, because
/// transformers treats a top-level `adapter_config.json` as a PEFT folder and loads the base).
pub const ADAPTER_DIR: &str = "adapter";
use super::adamw;
use super::model::{Fwd, SequentialIds, TrainModel, causal_attention, to_dtype};
use super::parallel::{self, Replica, ReplicaBytes, Sharding};
use super::qlora::{QuantLayer, load_quantized, quantize_base};
use super::schedule;
use crate::kernels::{Kernels, cross_entropy};
use crate::model::CausalLm;
use crate::tokenizer::SftExample;
use crate::weights::{
    Checkpoint, SaveOptions, SavedCheckpoint, copy_tokenizer_files, load_model, save_pretrained,
    save_pretrained_filled,
};

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps completed, this one included (1-based).
    pub step: usize,
    /// Epochs completed, fractional (2.5 = halfway through the third epoch).
    pub epoch: f64,
    /// Mean negative log-likelihood per target token over the whole accumulated batch.
    pub loss: f64,
    /// Learning rate this step used.
    pub lr: f64,
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// Target (loss) tokens in the step.
    pub tokens: usize,
    /// Real input tokens (prompt + target, no padding) in the step.
    pub input_tokens: usize,
    /// Input tokens including right padding (rows × longest row, summed over micro-batches).
    pub padded_tokens: usize,
    /// Sequences in the step.
    pub sequences: usize,
    /// Micro-batches in the step.
    pub micro_batches: usize,
    /// `input_tokens` per second of this step's wall time.
    pub tokens_per_s: f64,
    /// Wall time of the step (forward, backward, clipping, optimizer).
    pub step_time_s: f64,
    /// Peak memory: on the CPU the process's peak resident set (Linux `VmHWM`); on CUDA the
    /// bytes the GPU allocator holds after the step (its pool, which grows to the step's peak
    /// and is kept), the largest over the run's devices.
    pub peak_memory_bytes: u64,
}

/// A tensor by HF name: name, HF shape (`[out, in]` for linear weights), row-major values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// What [`Trainer::save_checkpoint`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointInfo {
    /// The checkpoint folder.
    pub dir: PathBuf,
    /// Optimizer steps completed at save time.
    pub step: usize,
    /// Bytes of all files in the folder.
    pub bytes: u64,
}

pub(super) type Adam<B> = adamw::Adam<TrainModel<B>, B>;
/// `hashbrown` map of `ParamId` → AdamW state, as Burn's adaptor keeps it.
pub(super) type OptimRecord<B> = adamw::AdamRecord<TrainModel<B>, B>;

/// Supervised fine-tuning of a [`CausalLm`] (full or LoRA) on tokenised examples.
pub struct Trainer<B: TrainBackend> {
    model: Option<TrainModel<B>>,
    /// Matrices (weight decay applies).
    opt_decay: Adam<B>,
    /// Biases and norm weights (never decayed).
    opt_plain: Adam<B>,
    decay_ids: HashSet<ParamId>,
    config: TrainConfig,
    seqs: Vec<Sequence>,
    input_lens: Vec<usize>,
    stats: DataStats,
    fingerprint: u64,
    total_steps: usize,
    global_step: usize,
    epoch: usize,
    micro_index: usize,
    plan: Option<(usize, Vec<Vec<usize>>)>,
    device: B::Device,
    base_dir: Option<PathBuf>,
    param_names: Vec<String>,
    tokens_seen: u64,
    target_tokens_seen: u64,
    last: Option<StepMetrics>,
    /// Data-parallel copies on further devices (empty: one device).
    replicas: Vec<Replica<B>>,
    /// How the replicas divide the optimizer state.
    sharding: Sharding,
    /// Each trainable parameter's owner replica, when the state is sharded over replicas.
    owners: Option<HashMap<ParamId, usize>>,
    /// Gradient bytes each replica received in the last step.
    last_grad_bytes: Vec<u64>,
    /// The other training processes, when this is one of several (one replica each).
    group: Option<SharedGroup>,
}

/// dtype parameters are stored in: f32 masters, except a LoRA run's frozen base, which is kept
/// in the compute dtype (nothing updates it, so it needs no master copy).
pub(super) fn storage_dtype(config: &TrainConfig) -> DType {
    match (config.lora.is_some(), config.precision) {
        (true, Precision::Bf16) => DType::BF16,
        _ => DType::F32,
    }
}

pub(super) fn compute_dtype(config: &TrainConfig) -> DType {
    match config.precision {
        Precision::F32 => DType::F32,
        Precision::Bf16 => DType::BF16,
    }
}

/// The base model of a run: a QLoRA base quantized while it loads, any other dense.
pub(super) fn load_base<B: TrainBackend>(
    dir: &Path,
    config: &TrainConfig,
    device: &B::Device,
) -> TrainResult<(CausalLm<B>, Vec<QuantLayer<B>>)> {
    let dtype = storage_dtype(config);
    if config.lora.as_ref().is_some_and(|l| l.quantized_base()) {
        Ok(load_quantized::<B>(dir, device, dtype)?)
    } else {
        Ok((load_model::<B>(dir, device, dtype)?, Vec::new()))
    }
}

/// Casts every parameter to `dtype`, keeping ids and trainability.
pub(crate) struct CastParams(pub DType);

impl<B: Backend> burn::module::ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let req = tensor.is_require_grad();
        let t = to_dtype(tensor, self.0).detach().set_require_grad(req);
        Param::from_mapped_value(id, t, mapper)
    }
}

/// Parameter paths (`base.model.layers.0.self_attn.q_proj.weight`), ids, ranks, trainability.
#[derive(Default)]
pub(super) struct ParamList {
    path: Vec<String>,
    pub entries: Vec<(String, ParamId, usize, bool)>,
}

impl<B: Backend> ModuleVisitor<B> for ParamList {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        self.entries
            .push((self.path.join("."), p.id, D, p.val().is_require_grad()));
    }
}

/// Sum of squared gradient entries, per tensor in visiting order, in f32: each gradient from
/// the first of `grads` holding it (one set, or the shards of a sharded step, which so give
/// the same sum in the same order).
pub(super) struct SquaredNorms<'a, B: TrainBackend> {
    pub grads: &'a [GradientsParams],
    pub parts: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: TrainBackend> ModuleVisitor<B> for SquaredNorms<'_, B> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        if let Some(g) = self
            .grads
            .iter()
            .find_map(|grads| grads.get::<B::InnerBackend, D>(p.id))
        {
            self.parts
                .push(Tensor::from_primitive(TensorPrimitive::Float(
                    <B::InnerBackend as Kernels>::sum_of_squares(g.into_primitive().tensor()),
                )));
        }
    }
}

/// Splits the gradients into the decay / no-decay groups.
struct Split<'a, B: TrainBackend> {
    all: GradientsParams,
    decay_ids: &'a HashSet<ParamId>,
    decay: GradientsParams,
    plain: GradientsParams,
    _b: std::marker::PhantomData<B>,
}

impl<B: TrainBackend> ModuleVisitor<B> for Split<'_, B> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        if let Some(g) = self.all.remove::<B::InnerBackend, D>(p.id) {
            let dst = if self.decay_ids.contains(&p.id) {
                &mut self.decay
            } else {
                &mut self.plain
            };
            dst.register::<B::InnerBackend, D>(p.id, g);
        }
    }
}

/// Peak resident set size of this process, from `/proc/self/status` (0 where unavailable).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Bytes the CUDA allocator reserves, the largest over `devices`; `None` off CUDA.
pub(super) fn gpu_reserved_bytes<B: Backend>(devices: &[B::Device]) -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        use cubecl::Runtime;
        let mut most = None;
        for device in devices {
            let any: &dyn std::any::Any = device;
            if let Some(cuda) = any.downcast_ref::<burn::backend::cuda::CudaDevice>() {
                let usage = cubecl::cuda::CudaRuntime::client(cuda)
                    .memory_usage()
                    .ok()?;
                most = Some(most.unwrap_or(0).max(usage.bytes_reserved));
            }
        }
        most
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = devices;
        None
    }
}

/// The state of both optimizers (decayed and plain groups) as one record.
pub(super) fn merged_record<B: TrainBackend>(decay: &Adam<B>, plain: &Adam<B>) -> OptimRecord<B> {
    let mut record = decay.to_record();
    record.extend(plain.to_record());
    record
}

pub(super) fn adam<B: TrainBackend>(config: &TrainConfig, weight_decay: f64) -> Adam<B> {
    Adam::new(
        config.adam_beta1 as f32,
        config.adam_beta2 as f32,
        config.adam_eps as f32,
        weight_decay as f32,
    )
}

impl<B: TrainBackend> Trainer<B> {
    /// Loads the HF model folder `model_dir` (f32 masters; a LoRA run's base in the compute
    /// dtype) and prepares `examples` under `config`. Tokenizer files found in `model_dir` are
    /// copied into every checkpoint and export.
    pub fn new(
        model_dir: impl AsRef<Path>,
        examples: &[SftExample],
        config: TrainConfig,
        device: &B::Device,
    ) -> TrainResult<Self> {
        config.validate()?;
        let dir = model_dir.as_ref();
        let (base, quant) = load_base::<B>(dir, &config, device)?;
        // Absolute, so a resume from another working directory finds the base again.
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        Self::build(base, None, quant, Some(dir), examples, config, device)
    }

    /// Trains a model already in memory (benchmarks, tests). Checkpoints hold no tokenizer.
    pub fn from_model(
        base: CausalLm<B>,
        examples: &[SftExample],
        config: TrainConfig,
        device: &B::Device,
    ) -> TrainResult<Self> {
        config.validate()?;
        let base = base.map(&mut CastParams(storage_dtype(&config)));
        Self::build(base, None, Vec::new(), None, examples, config, device)
    }

    /// Trains a QLoRA model already in memory and quantized ([`super::init_quantized`],
    /// benchmarks): `quant` holds its NF4 weights, `base` their placeholders.
    pub fn from_quantized(
        base: CausalLm<B>,
        quant: Vec<QuantLayer<B>>,
        examples: &[SftExample],
        config: TrainConfig,
        device: &B::Device,
    ) -> TrainResult<Self> {
        config.validate()?;
        if !config.lora.as_ref().is_some_and(|l| l.quantized_base()) {
            return Err(TrainError::config(
                "lora.base_bits",
                "a quantized model trains only with QLoRA (lora.base_bits = 4)".to_string(),
            ));
        }
        let base = base.map(&mut CastParams(storage_dtype(&config)));
        Self::build(base, None, quant, None, examples, config, device)
    }

    /// Continues the run saved in `checkpoint` with the same `examples` (checked by
    /// fingerprint). The configuration is the checkpoint's; a LoRA base is re-read from the
    /// folder the run started from.
    pub fn resume(
        checkpoint: impl AsRef<Path>,
        examples: &[SftExample],
        device: &B::Device,
    ) -> TrainResult<Self> {
        Self::resume_with_base(checkpoint, None, examples, device)
    }

    /// [`Self::resume`], reading a LoRA run's frozen base from `base_model` instead of the
    /// recorded folder (for a base that moved).
    pub fn resume_with_base(
        checkpoint: impl AsRef<Path>,
        base_model: Option<&Path>,
        examples: &[SftExample],
        device: &B::Device,
    ) -> TrainResult<Self> {
        let ckpt = checkpoint.as_ref();
        let state = read_trainer_state(ckpt)?;
        let config = state.config.clone();
        config.validate()?;
        let base_dir = base_model
            .map(Path::to_path_buf)
            .or_else(|| state.base_model.clone());
        // A full run's weights are all in the checkpoint; a LoRA run's base is elsewhere.
        let dir = match (&config.lora, base_dir.as_deref()) {
            (Some(_), None) => {
                return Err(TrainError::checkpoint(
                    ckpt.join(checkpoint::STATE_FILE),
                    "field `base_model`: a LoRA checkpoint needs its base model folder",
                ));
            }
            (_, dir) => dir.unwrap_or(ckpt),
        };
        let (base, adapters, quant) = load_checkpoint_weights::<B>(ckpt, dir, &config, device)?;
        let mut t = Self::build(base, adapters, quant, base_dir, examples, config, device)?;
        let state_path = ckpt.join(checkpoint::STATE_FILE);
        let fp = format!("{:016x}", t.fingerprint);
        if fp != state.data_fingerprint || t.stats != state.data {
            return Err(TrainError::checkpoint(
                &state_path,
                format!(
                    "field `data_fingerprint`: the examples differ from the run's ({fp} vs {}, {} vs {} kept)",
                    state.data_fingerprint, t.stats.kept, state.data.kept
                ),
            ));
        }
        (t.opt_decay, t.opt_plain) = load_optimizer(
            ckpt,
            &state_path,
            (&t.param_names, &state.param_names),
            &t.decay_ids,
            &t.config,
            device,
        )?;
        t.global_step = state.global_step;
        t.epoch = state.epoch;
        t.micro_index = state.micro_index;
        t.tokens_seen = state.tokens_seen;
        t.target_tokens_seen = state.target_tokens_seen;
        t.last = state.last_step;
        if t.total_steps != state.total_steps || t.epoch_plan().len() != state.epoch_micro_batches {
            return Err(TrainError::checkpoint(
                &state_path,
                "field `total_steps`: the batch plan differs from the run's",
            ));
        }
        Ok(t)
    }

    /// `quant`: a QLoRA base's NF4 weights when it was loaded quantized (empty: `base` is
    /// dense, and a QLoRA config quantizes it here).
    #[allow(clippy::too_many_arguments)]
    fn build(
        base: CausalLm<B>,
        adapters: Option<LoraAdapters<B>>,
        quant: Vec<QuantLayer<B>>,
        base_dir: Option<PathBuf>,
        examples: &[SftExample],
        config: TrainConfig,
        device: &B::Device,
    ) -> TrainResult<Self> {
        let (seqs, stats) = data::prepare(examples, &config, base.config.vocab_size)?;
        let (model, decay_ids, param_names) = assemble(base, adapters, quant, &config, device);
        let input_lens: Vec<usize> = seqs.iter().map(Sequence::input_len).collect();
        let total_steps = match config.max_steps {
            Some(m) => m,
            None => (0..config.epochs)
                .map(|e| {
                    data::epoch_plan(&input_lens, config.micro_batch, config.seed, e)
                        .len()
                        .div_ceil(config.grad_accum)
                })
                .sum(),
        };
        Ok(Self {
            opt_decay: adam::<B>(&config, config.weight_decay),
            opt_plain: adam::<B>(&config, 0.0),
            model: Some(model),
            decay_ids,
            fingerprint: data::fingerprint(&seqs),
            seqs,
            input_lens,
            stats,
            total_steps,
            global_step: 0,
            epoch: 0,
            micro_index: 0,
            plan: None,
            device: device.clone(),
            base_dir,
            param_names,
            tokens_seen: 0,
            target_tokens_seen: 0,
            last: None,
            replicas: Vec::new(),
            sharding: Sharding::None,
            owners: None,
            last_grad_bytes: Vec::new(),
            group: None,
            config,
        })
    }

    /// The run's parameters.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// What the length rule kept, truncated and dropped.
    pub fn data_stats(&self) -> &DataStats {
        &self.stats
    }

    /// Optimizer steps the run takes in all.
    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    /// Optimizer steps completed.
    pub fn global_step(&self) -> usize {
        self.global_step
    }

    /// True once every step has been taken.
    pub fn is_finished(&self) -> bool {
        self.global_step >= self.total_steps
    }

    /// Metrics of the last completed step (restored on resume).
    pub fn last_metrics(&self) -> Option<&StepMetrics> {
        self.last.as_ref()
    }

    /// The model being trained (base plus adapters).
    pub fn model(&self) -> &TrainModel<B> {
        self.model.as_ref().expect("model is present between steps")
    }

    /// The trained model in plain HF form, adapters merged, without autodiff (for generation
    /// and evaluation). A QLoRA run's adapters are merged into its dequantized base, the
    /// function it trained; [`Self::export`] merges into the original base instead.
    pub fn merged_model(&self) -> CausalLm<B::InnerBackend> {
        self.model().valid().merged()
    }

    /// Learning rate of the next step.
    pub fn next_lr(&self) -> f64 {
        schedule::learning_rate(&self.config, self.global_step, self.total_steps)
    }

    fn epoch_plan(&mut self) -> &[Vec<usize>] {
        let epoch = self.epoch;
        if self.plan.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let plan = data::epoch_plan(
                &self.input_lens,
                self.config.micro_batch,
                self.config.seed,
                epoch,
            );
            self.plan = Some((epoch, plan));
        }
        &self.plan.as_ref().expect("just set").1
    }

    /// Spreads every later step's micro-batches over `devices` as well as the trainer's own:
    /// each gets a copy of the model and optimizer state, gradients are summed across them
    /// before the update (see `train/parallel.rs`), and the result equals a one-device run's up to
    /// float summation order. `grad_accum` counts micro-batches per step across all devices, so
    /// it must be a multiple of the device count. Checkpoints and exports come from the
    /// trainer's own device, so a run may resume on a different number of devices.
    pub fn replicate_on(&mut self, devices: &[B::Device]) -> TrainResult<()> {
        if self.group.is_some() && !devices.is_empty() {
            return Err(TrainError::Config {
                field: "devices".into(),
                message: "with several training processes each trains on one device".into(),
            });
        }
        self.config
            .check_devices(1 + self.replicas.len() + devices.len())?;
        let model = self.model();
        let mut added = Vec::with_capacity(devices.len());
        for device in devices {
            // Empty optimizers: `reshard` hands each replica its state.
            let opt_decay = adam::<B>(&self.config, self.config.weight_decay);
            let opt_plain = adam::<B>(&self.config, 0.0);
            added.push(Replica::fork(model, opt_decay, opt_plain, device));
        }
        self.replicas.extend(added);
        self.reshard();
        Ok(())
    }

    /// Divides the optimizer state over the replicas as `sharding` says (from the next step;
    /// the updates stay the same). Applies to replicas added later too.
    pub fn set_sharding(&mut self, sharding: Sharding) {
        self.sharding = sharding;
        self.reshard();
    }

    /// Trains as one of the processes of `group`, one replica each: every step deals its
    /// micro-batches over the ranks and sums the gradients across them, so all ranks apply the
    /// same update. Every rank must build the same trainer and call [`Trainer::step`] in
    /// lockstep. With [`Sharding::Optimizer`] each rank keeps only its own parameters' AdamW
    /// state: it updates them alone and the ranks exchange the new values; a checkpoint is then
    /// a collective ([`Trainer::save_checkpoint`] on rank 0, [`Trainer::share_checkpoint`] on
    /// the others, at the same step).
    pub fn join_group(&mut self, group: SharedGroup) -> TrainResult<()> {
        if !self.replicas.is_empty() {
            return Err(TrainError::Config {
                field: "devices".into(),
                message: "with several training processes each trains on one device".into(),
            });
        }
        let size = lock(&group).size();
        self.config.check_devices(size)?;
        self.group = Some(group);
        self.reshard();
        Ok(())
    }

    /// This process's rank, when it trains as one of several.
    pub fn group_rank(&self) -> Option<usize> {
        self.group.as_ref().map(|g| lock(g).rank())
    }

    /// Rank other than 0 of a group sharding the optimizer: writes its part of the checkpoint
    /// rank 0 is building with [`Trainer::save_checkpoint`] (nothing to do otherwise).
    pub fn share_checkpoint(&self) -> TrainResult<()> {
        let (Some(group), Some(_)) = (&self.group, &self.owners) else {
            return Ok(());
        };
        let path = lock(group).broadcast(None)?;
        let written = String::from_utf8(path)
            .map_err(|_| TrainError::Config {
                field: "checkpoint".into(),
                message: "rank 0 sent a checkpoint folder path that is not UTF-8".into(),
            })
            .and_then(|tmp| self.write_optimizer_shard(Path::new(&tmp)));
        match written {
            Ok(()) => lock(group).gather(&[]).map(drop).map_err(Into::into),
            Err(e) => {
                lock(group).fail(&e.to_string());
                Err(e)
            }
        }
    }

    /// This rank's optimizer state as `optimizer-R-of-N.mpk` in `dir`. The ranks' records
    /// share their keys: `ParamId`s are visiting positions (`SequentialIds`), the same in
    /// every process, so a resume merges the files whatever the number of processes.
    fn write_optimizer_shard(&self, dir: &Path) -> TrainResult<()> {
        let (rank, size) = match &self.group {
            Some(group) => {
                let g = lock(group);
                (g.rank(), g.size())
            }
            None => (0, 1),
        };
        let stem = checkpoint::optimizer_shard_stem(rank, size);
        let path = dir.join(format!("{stem}.mpk"));
        NamedMpkFileRecorder::<FullPrecisionSettings>::new()
            .record(self.optimizer_record(), dir.join(&stem))
            .map_err(|e| TrainError::checkpoint(&path, e.to_string()))
    }

    /// Loads `record` into the two optimizers (decayed and plain groups).
    fn load_optimizers(&mut self, record: OptimRecord<B>) {
        let decay_ids = &self.decay_ids;
        let (decay, plain): (OptimRecord<B>, OptimRecord<B>) = record
            .into_iter()
            .partition(|(id, _)| decay_ids.contains(id));
        self.opt_decay = adam::<B>(&self.config, self.config.weight_decay).load_record(decay);
        self.opt_plain = adam::<B>(&self.config, 0.0).load_record(plain);
    }

    /// How the replicas divide the optimizer state.
    pub fn sharding(&self) -> Sharding {
        self.sharding
    }

    /// Bytes of weights, last step's gradients and AdamW state each device holds (the
    /// trainer's own first, then its replicas'), measured from the tensors.
    pub fn replica_bytes(&self) -> Vec<ReplicaBytes> {
        let mut out = vec![parallel::held_bytes(
            self.model(),
            &merged_record(&self.opt_decay, &self.opt_plain),
        )];
        for rep in &self.replicas {
            let m = rep.model.as_ref().expect("replica model between steps");
            out.push(parallel::held_bytes(
                m,
                &merged_record(&rep.opt_decay, &rep.opt_plain),
            ));
        }
        out.into_iter()
            .enumerate()
            .map(|(i, (params, optimizer))| ReplicaBytes {
                params,
                grads: self.last_grad_bytes.get(i).copied().unwrap_or(0),
                optimizer,
            })
            .collect()
    }

    /// Every parameter's AdamW state, gathered from the replicas that hold it.
    fn optimizer_record(&self) -> OptimRecord<B> {
        let mut record = merged_record(&self.opt_decay, &self.opt_plain);
        if self.owners.is_some() {
            for rep in &self.replicas {
                record.extend(merged_record(&rep.opt_decay, &rep.opt_plain));
            }
        }
        record
    }

    /// Hands every replica the state it keeps under `self.sharding`: its own parameters'
    /// (sharded) or all of it.
    fn reshard(&mut self) {
        let record = self.optimizer_record();
        if let Some(group) = &self.group {
            // One replica per process: this rank keeps its share (set the sharding before
            // joining: a shard cannot be widened back without the other ranks).
            let (rank, size) = {
                let g = lock(group);
                (g.rank(), g.size())
            };
            self.owners = (self.sharding == Sharding::Optimizer)
                .then(|| parallel::owners(self.model(), size));
            let mine = parallel::split_record::<B>(record, self.owners.as_ref(), size)
                .into_iter()
                .nth(rank)
                .unwrap_or_default();
            self.load_optimizers(mine);
            return;
        }
        let n = 1 + self.replicas.len();
        self.owners = (self.sharding == Sharding::Optimizer && n > 1)
            .then(|| parallel::owners(self.model(), n));
        let mut shares = parallel::split_record::<B>(record, self.owners.as_ref(), n).into_iter();
        let (config, decay_ids) = (&self.config, &self.decay_ids);
        let optimizers = |share: OptimRecord<B>| {
            let (decay, plain): (OptimRecord<B>, OptimRecord<B>) = share
                .into_iter()
                .partition(|(id, _)| decay_ids.contains(id));
            (
                adam::<B>(config, config.weight_decay).load_record(decay),
                adam::<B>(config, 0.0).load_record(plain),
            )
        };
        (self.opt_decay, self.opt_plain) = optimizers(shares.next().unwrap_or_default());
        for rep in &mut self.replicas {
            (rep.opt_decay, rep.opt_plain) = optimizers(shares.next().unwrap_or_default());
        }
    }

    /// Devices training runs on: the trainer's own, then its replicas'.
    pub fn devices(&self) -> Vec<B::Device> {
        std::iter::once(self.device.clone())
            .chain(self.replicas.iter().map(|r| r.device.clone()))
            .collect()
    }

    /// Takes one optimizer step; `None` once the run is complete. On a non-finite loss or
    /// gradient norm the update is not applied and the position does not advance.
    pub fn step(&mut self) -> TrainResult<Option<StepMetrics>> {
        // A rank that blocks inside its step until the others reach theirs blocks only its
        // own thread's pool (`Kernels::on_kernel_thread`), so ranks sharing a process go on.
        B::on_kernel_thread(|| self.step_here())
    }

    fn step_here(&mut self) -> TrainResult<Option<StepMetrics>> {
        if self.is_finished() {
            return Ok(None);
        }
        let t0 = Instant::now();
        let accum = self.config.grad_accum;
        let start = self.micro_index;
        let (members, plan_len) = {
            let plan = self.epoch_plan();
            let end = (start + accum).min(plan.len());
            (plan[start..end].to_vec(), plan.len())
        };
        let denom: usize = members
            .iter()
            .flatten()
            .map(|&i| self.seqs[i].n_targets())
            .sum();
        let step_seed = data::mix(data::mix(self.config.seed, 0xD80F), self.global_step as u64);
        let model = self.model.take().expect("model is present between steps");
        let n = 1 + self.replicas.len();
        // Across processes every rank holds one replica: its share is its rank's.
        let (first, world) = match &self.group {
            Some(g) => {
                let g = lock(g);
                (g.rank(), g.size())
            }
            None => (0, n),
        };
        let shares: Vec<Vec<(usize, &[usize])>> = (0..n)
            .map(|r| {
                parallel::share(first + r, world, members.len())
                    .map(|m| (m, members[m].as_slice()))
                    .collect()
            })
            .collect();
        let worker = |device| Worker::<B> {
            config: &self.config,
            seqs: &self.seqs,
            device,
            denom: denom as f64,
            step_seed,
        };
        // One host thread launches every device's share in turn. Burn queues device work
        // asynchronously and nothing below reads a value back until all shares are launched, so
        // the devices can compute at the same time (not yet measured on several GPUs). (Threads per replica were tried first: CubeCL
        // 0.10 then shares tensors between per-thread streams, which failed on the 1.5B model
        // with "Memory page 0 doesn't exist" even with both replicas on one GPU.)
        let mut outs = vec![worker(&self.device).run(&model, &shares[0])];
        for (rep, share) in self.replicas.iter().zip(&shares[1..]) {
            let m = rep.model.as_ref().expect("replica model between steps");
            outs.push(worker(&rep.device).run(m, share));
        }
        let (mut totals, mut nll) = (Totals::default(), 0.0);
        let mut parts = Vec::with_capacity(n);
        for out in outs {
            totals.add(&out.totals);
            nll += sum_f64(out.nll_parts);
            parts.push(out.grads);
        }
        let mut grads = match (&self.owners, self.replicas.is_empty()) {
            (_, true) => parts,
            (Some(owners), false) => {
                parallel::reduce_scatter(&model, parts, &self.devices(), owners)
            }
            (None, false) => parallel::all_reduce(&model, parts, &self.devices()),
        };
        let grad_norm_of = |grads: &[GradientsParams]| {
            // Plain replicas hold equal totals, so the first set is read; shards are read in
            // turn.
            let mut norms = SquaredNorms::<B> {
                grads,
                parts: vec![],
            };
            model.visit(&mut norms);
            sum_f64(norms.parts).sqrt()
        };
        // Across processes sharded, rank 0 computes the norm of the whole set it summed.
        let mut norm_from_rank_0 = None;
        if let Some(group) = &self.group {
            let mut scalars = vec![
                nll,
                totals.input_tokens as f64,
                totals.padded as f64,
                totals.sequences as f64,
            ];
            let mine = grads.pop().unwrap_or_default();
            let norm = |g: &GradientsParams| grad_norm_of(std::slice::from_ref(g));
            let how = match &self.owners {
                Some(owners) => parallel::Across::ReduceScatter {
                    owners,
                    norm: &norm,
                },
                None => parallel::Across::AllReduce,
            };
            let reduced = {
                let mut g = lock(group);
                parallel::all_reduce_across(&mut *g, &model, mine, &mut scalars, &self.device, how)
            };
            match reduced {
                Ok(total) => grads = vec![total],
                Err(e) => {
                    self.model = Some(model);
                    return Err(e.into());
                }
            }
            nll = scalars[0];
            totals = Totals {
                input_tokens: scalars[1] as usize,
                padded: scalars[2] as usize,
                sequences: scalars[3] as usize,
            };
            norm_from_rank_0 = scalars.get(4).copied();
        }
        self.last_grad_bytes = grads
            .iter()
            .map(|g| parallel::grad_bytes(&model, g))
            .collect();
        let grad_norm = norm_from_rank_0.unwrap_or_else(|| grad_norm_of(&grads));
        let loss = nll / denom as f64;
        if !(loss.is_finite() && grad_norm.is_finite()) {
            self.model = Some(model);
            return Err(TrainError::NonFinite {
                step: self.global_step + 1,
                loss,
                grad_norm,
            });
        }
        // torch.nn.utils.clip_grad_norm_: coefficient max / (norm + 1e-6), applied when below 1.
        let factor = self
            .config
            .max_grad_norm
            .map(|max| max / (grad_norm + 1e-6))
            .filter(|&c| c < 1.0);
        let lr = self.next_lr();
        let own_grads = grads.remove(0);
        let decay_ids = &self.decay_ids;
        let (opt_decay, opt_plain) = (&mut self.opt_decay, &mut self.opt_plain);
        for (rep, g) in self.replicas.iter_mut().zip(grads) {
            let m = rep.model.take().expect("replica model between steps");
            rep.model = Some(update(
                m,
                g,
                factor,
                decay_ids,
                lr,
                &mut rep.opt_decay,
                &mut rep.opt_plain,
            ));
        }
        let mut model = update(
            model, own_grads, factor, decay_ids, lr, opt_decay, opt_plain,
        );
        if let (Some(group), Some(owners)) = (&self.group, &self.owners) {
            let mut g = lock(group);
            model = match parallel::all_gather_across(&mut *g, model, owners, &self.device) {
                Ok(m) => m,
                Err(e) => {
                    // The update is half-applied across ranks: this trainer cannot go on.
                    return Err(e.into());
                }
            };
        } else if let Some(owners) = &self.owners {
            let mut models = vec![model];
            for rep in &mut self.replicas {
                models.push(rep.model.take().expect("replica model between steps"));
            }
            let mut models = parallel::all_gather(models, &self.devices(), owners).into_iter();
            model = models.next().expect("the trainer's own model");
            for (rep, m) in self.replicas.iter_mut().zip(models) {
                rep.model = Some(m);
            }
        }
        self.model = Some(model);

        self.global_step += 1;
        self.micro_index = start + members.len();
        let mut epoch = self.epoch as f64 + self.micro_index as f64 / plan_len as f64;
        if self.micro_index >= plan_len {
            self.epoch += 1;
            self.micro_index = 0;
            epoch = self.epoch as f64;
        }
        self.tokens_seen += totals.input_tokens as u64;
        self.target_tokens_seen += denom as u64;
        let secs = t0.elapsed().as_secs_f64();
        let metrics = StepMetrics {
            step: self.global_step,
            epoch,
            loss,
            lr,
            grad_norm,
            tokens: denom,
            input_tokens: totals.input_tokens,
            padded_tokens: totals.padded,
            sequences: totals.sequences,
            micro_batches: members.len(),
            tokens_per_s: totals.input_tokens as f64 / secs.max(1e-9),
            step_time_s: secs,
            peak_memory_bytes: gpu_reserved_bytes::<B>(&self.devices())
                .unwrap_or_else(peak_rss_bytes),
        };
        self.last = Some(metrics.clone());
        Ok(Some(metrics))
    }

    /// Writes a checkpoint (weights in HF or PEFT layout, optimizer record, trainer state)
    /// into `dir` atomically: built in `dir.tmp`, fsynced, then renamed.
    pub fn save_checkpoint(&self, dir: impl AsRef<Path>) -> TrainResult<CheckpointInfo> {
        let dir = dir.as_ref();
        if self.group_rank().is_some_and(|r| r != 0) {
            return Err(TrainError::Config {
                field: "rank".into(),
                message: "only rank 0 writes checkpoints; the others call share_checkpoint".into(),
            });
        }
        let tmp = checkpoint::begin(dir)?;
        // Sharded across processes, every rank writes its own part of the optimizer state
        // into the folder being built; rank 0 writes the rest once all parts are in.
        let record = match (&self.group, &self.owners) {
            (Some(group), Some(_)) => {
                // Sent as text: a lossy conversion would send the other ranks' parts elsewhere.
                let Some(path) = tmp.to_str() else {
                    let message = format!("{} is not UTF-8", tmp.display());
                    lock(group).fail(&message);
                    return Err(TrainError::Config {
                        field: "checkpoint".into(),
                        message,
                    });
                };
                lock(group).broadcast(Some(path.as_bytes()))?;
                let own = self.write_optimizer_shard(&tmp);
                lock(group).gather(&[])?;
                own?;
                None
            }
            _ => Some(self.optimizer_record()),
        };
        save_weights_and_optimizer(self.model(), record, self.base_dir.as_deref(), &tmp)?;
        let state = self.state();
        checkpoint::write_state(&tmp, &state)?;
        let bytes = dir_bytes(&tmp)?;
        checkpoint::commit(&tmp, dir)?;
        Ok(CheckpointInfo {
            dir: dir.to_path_buf(),
            step: self.global_step,
            bytes,
        })
    }

    /// The state `save_checkpoint` writes as `trainer_state.json`.
    pub fn state(&self) -> TrainerState {
        let plan_len = match &self.plan {
            Some((e, p)) if *e == self.epoch => p.len(),
            _ => data::epoch_plan(
                &self.input_lens,
                self.config.micro_batch,
                self.config.seed,
                self.epoch,
            )
            .len(),
        };
        TrainerState {
            format: STATE_FORMAT,
            global_step: self.global_step,
            total_steps: self.total_steps,
            epoch: self.epoch,
            micro_index: self.micro_index,
            epoch_micro_batches: plan_len,
            next_lr: self.next_lr(),
            rng: RngState {
                seed: self.config.seed,
                epoch: self.epoch,
                step: self.global_step,
            },
            config: self.config.clone(),
            base_model: self.base_dir.clone(),
            weights: if self.config.lora.is_some() {
                "adapter".into()
            } else {
                "model".into()
            },
            data_fingerprint: format!("{:016x}", self.fingerprint),
            data: self.stats.clone(),
            param_names: self.param_names.clone(),
            tokens_seen: self.tokens_seen,
            target_tokens_seen: self.target_tokens_seen,
            last_step: self.last.clone(),
        }
    }

    /// Writes the trained model (adapters merged) as a plain HF folder, atomically, and for a
    /// (Q)LoRA run the adapters alone in PEFT's layout under [`ADAPTER_DIR`]. A QLoRA run's
    /// adapters are folded into the original (unquantized) base re-read from its folder, as
    /// QLoRA's recipe and PEFT's `merge_and_unload` on the 16-bit base do, one weight at a time
    /// while each shard is written, so the dense base is never whole in memory; `opts.dtype`
    /// picks the dtype on disk (e.g. bf16), tokenizer files come from the base folder unless
    /// `opts.tokenizer_dir` says otherwise.
    pub fn export(&self, dir: impl AsRef<Path>, opts: SaveOptions) -> TrainResult<SavedCheckpoint> {
        export_model(self.model(), self.base_dir.as_deref(), dir.as_ref(), opts)
    }

    /// Gradients of the next step's loss (accumulated over its micro-batches, before clipping)
    /// with HF names and `[out, in]` layout, without updating anything: for checks against
    /// other implementations.
    pub fn peek_gradients(&mut self) -> TrainResult<Vec<NamedTensor>> {
        let start = self.micro_index;
        let accum = self.config.grad_accum;
        let members = {
            let plan = self.epoch_plan();
            plan[start..(start + accum).min(plan.len())].to_vec()
        };
        let denom: usize = members
            .iter()
            .flatten()
            .map(|&i| self.seqs[i].n_targets())
            .sum();
        let model = self.model.take().expect("model is present between steps");
        let mut acc = GradientsAccumulator::<TrainModel<B>>::new();
        let worker = Worker::<B> {
            config: &self.config,
            seqs: &self.seqs,
            device: &self.device,
            denom: denom as f64,
            step_seed: 0,
        };
        for idx in &members {
            let batch = data::build_batch(&self.seqs, idx);
            worker.micro_batch(&model, &batch, 0, &mut acc);
        }
        let out = named_gradients(&model, &acc.grads());
        self.model = Some(model);
        Ok(out)
    }
}

/// The module a run trains: `base` as is (full fine-tuning) or frozen with adapters (`adapters`
/// when resuming, else fresh) and, for QLoRA, its NF4 weights (`quant`, quantized here when
/// empty); parameters numbered in visiting order. Also returns the ids AdamW decays (trainable
/// matrices) and the parameter paths.
pub(super) fn assemble<B: TrainBackend>(
    base: CausalLm<B>,
    adapters: Option<LoraAdapters<B>>,
    quant: Vec<QuantLayer<B>>,
    config: &TrainConfig,
    device: &B::Device,
) -> (TrainModel<B>, HashSet<ParamId>, Vec<String>) {
    let (base, lora, quant) = match &config.lora {
        Some(lc) => {
            let base = base.no_grad();
            let adapters =
                adapters.unwrap_or_else(|| LoraAdapters::init(&base, lc, config.seed, device));
            let (base, quant) = if lc.quantized_base() && quant.is_empty() {
                quantize_base(base)
            } else {
                (base, quant)
            };
            (base, Some(adapters), quant)
        }
        None => (base, None, Vec::new()),
    };
    let model = TrainModel { base, lora, quant }.map(&mut SequentialIds { next: 0 });
    let mut list = ParamList::default();
    model.visit(&mut list);
    let decay_ids = list
        .entries
        .iter()
        .filter(|(_, _, rank, trainable)| *trainable && *rank >= 2)
        .map(|(_, id, _, _)| *id)
        .collect();
    let names = list.entries.into_iter().map(|(p, ..)| p).collect();
    (model, decay_ids, names)
}

/// Writes a model's weights (HF layout, or PEFT for (Q)LoRA with tokenizer files from
/// `base_dir`) and the optimizers' state `record` (one file, whatever the sharding, so a run
/// resumes on any number of devices) into the checkpoint folder being built, `tmp`.
pub(super) fn save_weights_and_optimizer<B: TrainBackend>(
    model: &TrainModel<B>,
    record: Option<OptimRecord<B>>,
    base_dir: Option<&Path>,
    tmp: &Path,
) -> TrainResult<()> {
    match &model.lora {
        Some(l) => {
            l.save_peft(tmp, base_dir)?;
            if let Some(src) = base_dir {
                copy_tokenizer_files(src, tmp)?;
            }
        }
        None => {
            let opts = SaveOptions {
                tokenizer_dir: base_dir.map(Path::to_path_buf),
                ..SaveOptions::default()
            };
            save_pretrained(&model.base, tmp, &opts)?;
        }
    }
    // Without a record, the ranks wrote their shards themselves.
    let Some(record) = record else { return Ok(()) };
    let record_path = tmp.join(format!("{OPTIMIZER_STEM}.mpk"));
    NamedMpkFileRecorder::<FullPrecisionSettings>::new()
        .record(record, tmp.join(OPTIMIZER_STEM))
        .map_err(|e| TrainError::checkpoint(&record_path, e.to_string()))
}

/// The weights a checkpoint resumes from: a (Q)LoRA run's base from `base_dir` (quantized
/// while it loads for QLoRA) with the checkpoint's adapters, or a full run's f32 weights from
/// the checkpoint itself.
#[allow(clippy::type_complexity)]
pub(super) fn load_checkpoint_weights<B: TrainBackend>(
    ckpt: &Path,
    base_dir: &Path,
    config: &TrainConfig,
    device: &B::Device,
) -> TrainResult<(CausalLm<B>, Option<LoraAdapters<B>>, Vec<QuantLayer<B>>)> {
    Ok(match &config.lora {
        Some(lora) => {
            let (base, quant) = load_base::<B>(base_dir, config, device)?;
            let adapters = LoraAdapters::load_peft(ckpt, &base, lora, device)?;
            (base, Some(adapters), quant)
        }
        None => (load_model::<B>(ckpt, device, DType::F32)?, None, Vec::new()),
    })
}

/// Both optimizers as a checkpoint saved them (decayed and plain groups split by `decay_ids`),
/// after checking that `names` = (the rebuilt model's parameter paths, the checkpoint's), since
/// the record is keyed by position; `state_path` is named when they differ.
pub(super) fn load_optimizer<B: TrainBackend>(
    ckpt: &Path,
    state_path: &Path,
    names: (&[String], &[String]),
    decay_ids: &HashSet<ParamId>,
    config: &TrainConfig,
    device: &B::Device,
) -> TrainResult<(Adam<B>, Adam<B>)> {
    if names.0 != names.1 {
        return Err(TrainError::checkpoint(
            state_path,
            "field `param_names`: the model's parameters differ from the checkpoint's",
        ));
    }
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    let stems = match checkpoint::optimizer_shards(ckpt) {
        // Written by N processes: every part is needed.
        Some(n) => (0..n)
            .map(|r| checkpoint::optimizer_shard_stem(r, n))
            .collect(),
        None => vec![OPTIMIZER_STEM.to_string()],
    };
    let mut record = OptimRecord::<B>::default();
    for stem in stems {
        let path = ckpt.join(format!("{stem}.mpk"));
        let part: OptimRecord<B> = recorder
            .load(ckpt.join(&stem), device)
            .map_err(|e| TrainError::checkpoint(&path, e.to_string()))?;
        record.extend(part);
    }
    let (decay, plain): (OptimRecord<B>, OptimRecord<B>) = record
        .into_iter()
        .partition(|(id, _)| decay_ids.contains(id));
    Ok((
        adam::<B>(config, config.weight_decay).load_record(decay),
        adam::<B>(config, 0.0).load_record(plain),
    ))
}

/// [`Trainer::export`] of any trained model: merged HF folder (a QLoRA run's adapters folded
/// into the original base re-read from `base_dir`) plus the PEFT adapter of a (Q)LoRA run.
pub(super) fn export_model<B: TrainBackend>(
    model: &TrainModel<B>,
    base_dir: Option<&Path>,
    dir: &Path,
    mut opts: SaveOptions,
) -> TrainResult<SavedCheckpoint> {
    if opts.tokenizer_dir.is_none() {
        opts.tokenizer_dir = base_dir.map(Path::to_path_buf);
    }
    let tmp = checkpoint::begin(dir)?;
    let mut saved = match (&model.lora, base_dir) {
        (Some(lora), Some(base_dir)) if !model.quant.is_empty() => {
            let lora = lora.valid();
            let original = Checkpoint::open(base_dir)?;
            let fill = |name: &str| -> crate::error::Result<Vec<f32>> {
                let (_, mut w) = original.read_f32(name)?;
                if let Some(delta) = lora.delta_hf(name) {
                    for (x, d) in w.iter_mut().zip(delta) {
                        *x += d;
                    }
                }
                Ok(w)
            };
            save_pretrained_filled(&model.valid().base, &tmp, &opts, Some(&fill))?
        }
        _ => save_pretrained(&model.valid().merged(), &tmp, &opts)?,
    };
    if let Some(lora) = &model.lora {
        let adapter = tmp.join(ADAPTER_DIR);
        std::fs::create_dir_all(&adapter).map_err(|e| TrainError::io(&adapter, e))?;
        lora.save_peft(&adapter, base_dir)?;
    }
    checkpoint::commit(&tmp, dir)?;
    for f in &mut saved.files {
        if let Some(name) = f.file_name() {
            *f = dir.join(name);
        }
    }
    Ok(saved)
}

/// `grads` by HF name in `[out, in]` layout, f32, in parameter order (frozen ones left out).
pub(super) fn named_gradients<B: TrainBackend>(
    model: &TrainModel<B>,
    grads: &GradientsParams,
) -> Vec<NamedTensor> {
    let mut list = ParamList::default();
    model.visit(&mut list);
    struct Collect<'a> {
        grads: &'a GradientsParams,
        names: std::vec::IntoIter<String>,
        out: Vec<NamedTensor>,
    }
    impl<B: TrainBackend> ModuleVisitor<B> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let name = self.names.next().expect("one name per parameter");
            let Some(g) = self.grads.get::<B::InnerBackend, D>(p.id) else {
                return;
            };
            let g = to_dtype(g, DType::F32);
            let dims = g.dims().to_vec();
            let values = g.into_data().to_vec::<f32>().expect("f32 gradient");
            let (name, shape, values) = hf_layout(&name, dims, values);
            self.out.push((name, shape, values));
        }
    }
    let mut c = Collect {
        grads,
        names: list
            .entries
            .into_iter()
            .map(|(n, ..)| n)
            .collect::<Vec<_>>()
            .into_iter(),
        out: vec![],
    };
    model.visit(&mut c);
    c.out
}

/// What one device computes for a step: the gradient of its share of the micro-batches.
struct ShareOut<B: TrainBackend> {
    grads: GradientsParams,
    totals: Totals,
    /// Summed NLL of each loss chunk, still on the device (read once every share is launched).
    nll_parts: Vec<Tensor<B::InnerBackend, 1>>,
}

/// Token counts of some micro-batches.
#[derive(Default)]
struct Totals {
    input_tokens: usize,
    padded: usize,
    sequences: usize,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.input_tokens += o.input_tokens;
        self.padded += o.padded;
        self.sequences += o.sequences;
    }
}

/// Forward and backward of micro-batches on one device.
struct Worker<'a, B: TrainBackend> {
    config: &'a TrainConfig,
    seqs: &'a [Sequence],
    device: &'a B::Device,
    /// Target tokens of the whole step (every device's share), the loss denominator.
    denom: f64,
    step_seed: u64,
}

impl<B: TrainBackend> Worker<'_, B> {
    /// Gradients and totals of the step's micro-batches `share` (index in the step, members).
    fn run(&self, model: &TrainModel<B>, share: &[(usize, &[usize])]) -> ShareOut<B> {
        let mut acc = GradientsAccumulator::<TrainModel<B>>::new();
        let mut totals = Totals::default();
        let mut nll_parts = Vec::new();
        for &(m, idx) in share {
            let batch = data::build_batch(self.seqs, idx);
            totals.input_tokens += batch.tokens;
            totals.padded += batch.rows * batch.width;
            totals.sequences += batch.rows;
            let seed = data::mix(self.step_seed, m as u64);
            nll_parts.push(self.micro_batch(model, &batch, seed, &mut acc));
        }
        ShareOut {
            grads: acc.grads(),
            totals,
            nll_parts,
        }
    }

    /// Forward and staged backward of one micro-batch into `acc`; returns the NLL of each of
    /// its loss chunks (on the device, unread).
    fn micro_batch(
        &self,
        model: &TrainModel<B>,
        batch: &Batch,
        dropout_seed: u64,
        acc: &mut GradientsAccumulator<TrainModel<B>>,
    ) -> Tensor<B::InnerBackend, 1> {
        let cfg = self.config;
        let dtype = compute_dtype(cfg);
        let dropout = cfg.lora.as_ref().map_or(0.0, |l| l.dropout);
        let device = self.device;
        let mc = &model.base.config;
        let ids_data = TensorData::new(batch.ids.clone(), [batch.rows, batch.width]);
        let scored = || {
            Tensor::<B, 1, Int>::from_data(
                TensorData::new(batch.scored.clone(), [batch.scored.len()]),
                device,
            )
        };
        let f = Fwd::<B>::new(mc, batch.width, dtype, dropout, dropout_seed, device);
        let n_layers = model.num_layers();
        if !cfg.recompute {
            let mut x = model.embed(Tensor::from_data(ids_data, device), &f);
            for i in 0..n_layers {
                x = model.layer(i, x, &f, None);
            }
            let h = select_rows(model.final_norm(x, &f), scored());
            let (g, nll) = self.head_stage(model, h.clone().inner(), batch, dtype, acc);
            backprop::<B, 2, 2>(model, h, g, None, acc);
            return nll;
        }
        let chunk =
            (batch.width > cfg.attention_chunk_tokens).then_some(cfg.attention_chunk_tokens);
        let inner = model.valid();
        let fi = Fwd::<B::InnerBackend>::new(mc, batch.width, dtype, dropout, dropout_seed, device);
        let mut x = inner.embed(Tensor::from_data(ids_data.clone(), device), &fi);
        let mut inputs = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            inputs.push(x.clone());
            x = inner.layer(i, x, &fi, chunk);
        }
        let leaf = Tensor::<B, 3>::from_inner(x).require_grad();
        let h = select_rows(model.final_norm(leaf.clone(), &f), scored());
        let (g, nll) = self.head_stage(model, h.clone().inner(), batch, dtype, acc);
        let mut g = backprop(model, h, g, Some(&leaf), acc).expect("hidden-state gradient");
        for i in (0..n_layers).rev() {
            let x = inputs.pop().expect("one input per layer");
            g = match chunk {
                None => {
                    let leaf = Tensor::<B, 3>::from_inner(x).require_grad();
                    let out = model.layer(i, leaf.clone(), &f, None);
                    backprop(model, out, g, Some(&leaf), acc)
                }
                Some(c) => layer_backward_chunked(model, &inner, i, x, g, &f, &fi, c, acc),
            }
            .expect("layer input gradient");
        }
        if model.lora.is_none() {
            let e = model.embed(Tensor::from_data(ids_data, device), &f);
            backprop::<B, 3, 3>(model, e, g, None, acc);
        }
        nll
    }

    /// LM head + f32 log-softmax + NLL on chunks of scored rows, each chunk its own graph.
    /// Returns the gradient of `loss` w.r.t. the rows and each chunk's summed NLL.
    fn head_stage(
        &self,
        model: &TrainModel<B>,
        rows: Tensor<B::InnerBackend, 2>,
        batch: &Batch,
        dtype: DType,
        acc: &mut GradientsAccumulator<TrainModel<B>>,
    ) -> (Tensor<B::InnerBackend, 2>, Tensor<B::InnerBackend, 1>) {
        let n = batch.targets.len();
        let chunk = self.config.loss_chunk_tokens;
        let mut grads_in = Vec::with_capacity(n.div_ceil(chunk));
        let mut nll_parts = Vec::with_capacity(n.div_ceil(chunk));
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let leaf =
                Tensor::<B, 2>::from_inner(rows.clone().narrow(0, start, len)).require_grad();
            let targets = Tensor::<B, 1, Int>::from_data(
                TensorData::new(batch.targets[start..start + len].to_vec(), [len]),
                self.device,
            );
            let nll = cross_entropy(model.head(leaf.clone(), dtype), targets).sum();
            nll_parts.push(nll.clone().inner());
            let grads = nll.div_scalar(self.denom).backward();
            grads_in.push(leaf.grad(&grads).expect("head input gradient"));
            acc.accumulate(model, GradientsParams::from_grads(grads, model));
            start += len;
        }
        (Tensor::cat(grads_in, 0), Tensor::cat(nll_parts, 0))
    }
}

/// Sum in f64 of f32 values still on the device (one read-back; 0 for none).
pub(super) fn sum_f64<B: Backend>(parts: Vec<Tensor<B, 1>>) -> f64 {
    if parts.is_empty() {
        return 0.0;
    }
    Tensor::cat(parts, 0)
        .into_data()
        .to_vec::<f32>()
        .expect("f32 values")
        .iter()
        .map(|&v| f64::from(v))
        .sum()
}

/// Applies one AdamW update to the gradients times `factor` (clipping), decayed and plain groups apart.
pub(super) fn update<B: TrainBackend>(
    model: TrainModel<B>,
    grads: GradientsParams,
    factor: Option<f64>,
    decay_ids: &HashSet<ParamId>,
    lr: f64,
    opt_decay: &mut Adam<B>,
    opt_plain: &mut Adam<B>,
) -> TrainModel<B> {
    let mut split = Split::<B> {
        all: grads,
        decay_ids,
        decay: GradientsParams::new(),
        plain: GradientsParams::new(),
        _b: std::marker::PhantomData,
    };
    model.visit(&mut split);
    let mut model = model;
    if !split.decay.is_empty() {
        model = opt_decay.step(lr, model, split.decay, factor);
    }
    if !split.plain.is_empty() {
        model = opt_plain.step(lr, model, split.plain, factor);
    }
    model
}

/// Burn path and `[in, out]` values → HF name and `[out, in]` values (linear weights only).
fn hf_layout(path: &str, dims: Vec<usize>, values: Vec<f32>) -> (String, Vec<usize>, Vec<f32>) {
    let name = path.strip_prefix("base.").unwrap_or(path);
    let name = match name.strip_suffix(".gamma") {
        Some(stem) => format!("{stem}.weight"),
        None => name.to_string(),
    };
    let is_linear = dims.len() == 2 && name.ends_with(".weight") && !name.contains("embed_tokens");
    if !is_linear {
        return (name, dims, values);
    }
    let (rows, cols) = (dims[0], dims[1]);
    let mut t = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = values[r * cols + c];
        }
    }
    (name, vec![cols, rows], t)
}

/// Rows `index` of `[b, s, d]` hidden states flattened to `[b·s, d]`.
pub(super) fn select_rows<B: Backend>(h: Tensor<B, 3>, index: Tensor<B, 1, Int>) -> Tensor<B, 2> {
    let [b, s, d] = h.dims();
    h.reshape([b * s, d]).select(0, index)
}

/// Backward of layer `i` with attention in query chunks, in three graphs: (B) o_proj + MLP from
/// the attention context, (core) each query chunk against its key prefix, (A) norm + q/k/v
/// projections. Only one chunk's attention probabilities exist at a time. Returns the gradient
/// of the layer input.
#[allow(clippy::too_many_arguments)]
fn layer_backward_chunked<B: TrainBackend>(
    model: &TrainModel<B>,
    inner: &TrainModel<B::InnerBackend>,
    i: usize,
    x: Tensor<B::InnerBackend, 3>,
    g_out: Tensor<B::InnerBackend, 3>,
    f: &Fwd<B>,
    fi: &Fwd<B::InnerBackend>,
    chunk: usize,
    acc: &mut GradientsAccumulator<TrainModel<B>>,
) -> Option<Tensor<B::InnerBackend, 3>> {
    let (q, k, v) = inner.attn_inputs(i, x.clone(), fi);
    let ctx = causal_attention(q.clone(), k.clone(), v.clone(), Some(chunk));
    let x_b = Tensor::<B, 3>::from_inner(x.clone()).require_grad();
    let ctx_leaf = Tensor::<B, 4>::from_inner(ctx).require_grad();
    let out = model.layer_post(i, x_b.clone(), ctx_leaf.clone(), f);
    let grads = (out * Tensor::from_inner(g_out)).sum().backward();
    let g_x_b = x_b.grad(&grads)?;
    let g_ctx = ctx_leaf.grad(&grads)?;
    acc.accumulate(model, GradientsParams::from_grads(grads, model));

    let s = q.dims()[2];
    let (mut g_q, mut g_k, mut g_v) = (Vec::new(), k.zeros_like(), v.zeros_like());
    for a in (0..s).step_by(chunk) {
        let n = chunk.min(s - a);
        let qc = Tensor::<B, 4>::from_inner(q.clone().narrow(2, a, n)).require_grad();
        let kc = Tensor::<B, 4>::from_inner(k.clone().narrow(2, 0, a + n)).require_grad();
        let vc = Tensor::<B, 4>::from_inner(v.clone().narrow(2, 0, a + n)).require_grad();
        let out = causal_attention(qc.clone(), kc.clone(), vc.clone(), None);
        let grads = (out * Tensor::from_inner(g_ctx.clone().narrow(2, a, n)))
            .sum()
            .backward();
        g_q.push(qc.grad(&grads)?);
        let pad = |g: Tensor<B::InnerBackend, 4>| {
            if a + n == s {
                g
            } else {
                let [b, h, _, hd] = g.dims();
                let zeros = Tensor::zeros([b, h, s - a - n, hd], (&g.device(), g.dtype()));
                Tensor::cat(vec![g, zeros], 2)
            }
        };
        g_k = g_k + pad(kc.grad(&grads)?);
        g_v = g_v + pad(vc.grad(&grads)?);
    }

    let x_a = Tensor::<B, 3>::from_inner(x).require_grad();
    let (q, k, v) = model.attn_inputs(i, x_a.clone(), f);
    let surrogate = (q * Tensor::from_inner(Tensor::cat(g_q, 2))).sum()
        + (k * Tensor::from_inner(g_k)).sum()
        + (v * Tensor::from_inner(g_v)).sum();
    let grads = surrogate.backward();
    let g_x_a = x_a.grad(&grads)?;
    acc.accumulate(model, GradientsParams::from_grads(grads, model));
    Some(g_x_a + g_x_b)
}

/// Backward of `sum(out · grad)`: pushes an upstream gradient through `out`'s graph into `acc`,
/// returning the gradient of `leaf` when one is given.
fn backprop<B: TrainBackend, const D: usize, const L: usize>(
    model: &TrainModel<B>,
    out: Tensor<B, D>,
    grad: Tensor<B::InnerBackend, D>,
    leaf: Option<&Tensor<B, L>>,
    acc: &mut GradientsAccumulator<TrainModel<B>>,
) -> Option<Tensor<B::InnerBackend, L>> {
    let grads = (out * Tensor::from_inner(grad)).sum().backward();
    let g = leaf.and_then(|l| l.grad(&grads));
    acc.accumulate(model, GradientsParams::from_grads(grads, model));
    g
}

pub(super) fn dir_bytes(dir: &Path) -> TrainResult<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| TrainError::io(dir, e))? {
        let entry = entry.map_err(|e| TrainError::io(dir, e))?;
        total += entry
            .metadata()
            .map_err(|e| TrainError::io(entry.path(), e))?
            .len();
    }
    Ok(total)
}
