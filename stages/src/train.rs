//! The `train` stage: supervised fine-tuning of a student on the traces a curation (or
//! generate) stage kept, with the `distill-student` trainer.
//!
//! Every optimizer step's metrics become a row; checkpoints (model in Hugging Face
//! layout plus optimizer, scheduler, data-order and RNG state) are written atomically
//! every `checkpoint_every` steps, on Ctrl-C, and at the end, and recorded in the job
//! database with each file's size and xxh3-128. After a kill, the stage resumes from the
//! newest recorded checkpoint whose files are still as saved (a damaged newer one is
//! warned about, removed and redone) and, because data order and randomness are functions
//! of the seed and step, reaches the same weights as an uninterrupted run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use distill_db::training::{self, CheckpointFile, StepMetrics as StepRow};
use distill_student::train::{
    Precision, SftRecord, Sharding, TrainConfig, TrainError, Trainer, examples_from_records,
};
use distill_student::{ChatMessage, SaveOptions, Tokenizer};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::checkpoint_files;
use crate::curation::{CURATION_KINDS, output_items};
use crate::generate::{GENERATION_KINDS, rendered_messages};
use crate::{BuildEnv, ParamError, Stage, StageContext, StageError, StageKind, parse_params};

/// The `train` stage kind.
pub struct TrainKind;

pub use crate::device::Device;

/// The stage's own parameters; every other key is a [`TrainConfig`] field
/// (`learning_rate`, `schedule`, `epochs`, `max_steps`, `micro_batch`, `grad_accum`,
/// `max_seq_len`, `overlong`, `weight_decay`, `max_grad_norm`, `seed`, `lora`,
/// `precision`, `recompute`, ...).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainStageParams {
    /// The base model folder (Hugging Face layout, with its tokenizer).
    #[serde(default)]
    pub base_model: Option<PathBuf>,
    /// Instead of `base_model`: train from scratch, from a random model made at run time
    /// (as `distill model init` does) in the stage's artifacts as `base/`.
    #[serde(default)]
    pub init: Option<InitModel>,
    /// Save a checkpoint every this many optimizer steps (0: only at the end).
    #[serde(default)]
    pub checkpoint_every: usize,
    /// Keep only this many intermediate checkpoints (the final model is always kept).
    #[serde(default)]
    pub keep_last: Option<usize>,
    /// Where to train.
    #[serde(default)]
    pub device: Device,
    /// Data parallelism: the CUDA GPUs to train on (ordinals, default `[0]`), each holding a
    /// whole replica and working on its share of every step's `grad_accum` micro-batches. On
    /// the CPU each entry is one more in-process replica (no faster; it runs the data-parallel
    /// path without GPUs). Not part of the stage's identity: the devices change the speed, not
    /// the result, so a run may resume on another set.
    #[serde(default)]
    pub devices: Option<Vec<usize>>,
    /// How the `devices` divide the training state: `"none"` (every device a whole replica)
    /// or `"optimizer"` (ZeRO-1: each parameter's summed gradient and AdamW state on one
    /// device).
    /// Not part of the stage's identity: the updates are the same.
    #[serde(default)]
    pub sharding: Sharding,
    /// Memory of the GPU, for the memory planner (default: an H200's 141 GB).
    #[serde(default)]
    pub gpu_mem_gib: Option<f64>,
}

/// A randomly initialised base model: `init = { config = "config.json", tokenizer = "DIR" }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InitModel {
    /// An HF `config.json` giving the architecture and size.
    pub config: PathBuf,
    /// A folder with `tokenizer.json` and `tokenizer_config.json` (its chat template).
    pub tokenizer: PathBuf,
    /// Seed of the initialisation.
    #[serde(default)]
    pub seed: u64,
}

/// Where the weights training starts from come from.
#[derive(Debug, Clone)]
enum Base {
    Folder(PathBuf),
    Init(InitModel),
}

const STAGE_KEYS: &[&str] = &[
    "base_model",
    "init",
    "checkpoint_every",
    "keep_last",
    "device",
    "devices",
    "sharding",
    "gpu_mem_gib",
];

impl StageKind for TrainKind {
    fn name(&self) -> &'static str {
        "train"
    }
    fn about(&self) -> &'static str {
        "fine-tune a student model on curated traces (SFT, optional LoRA), with exact resume"
    }
    fn version(&self) -> u32 {
        1
    }
    fn build(&self, mut params: toml::Table, env: &BuildEnv) -> Result<Arc<dyn Stage>, ParamError> {
        let own: toml::Table = STAGE_KEYS
            .iter()
            .filter_map(|k| params.remove(*k).map(|v| (k.to_string(), v)))
            .collect();
        let stage: TrainStageParams = parse_params(own)?;
        let config: TrainConfig = parse_params(params)?;
        config
            .validate()
            .map_err(|e| ParamError::new("*", e.to_string()))?;
        check_devices(&stage, &config)?;
        match env.needs.as_slice() {
            [(_, kind)]
                if GENERATION_KINDS.contains(&kind.as_str())
                    || CURATION_KINDS.contains(&kind.as_str()) => {}
            _ => {
                return Err(ParamError::new(
                    "needs",
                    "a train stage needs exactly one generate, import or curation stage (its traces are the data)",
                ));
            }
        }
        let base = match (&stage.base_model, &stage.init) {
            (Some(dir), None) => Base::Folder(env.resolve(dir)),
            (None, Some(init)) => {
                let init = InitModel {
                    config: env.resolve(&init.config),
                    tokenizer: env.resolve(&init.tokenizer),
                    seed: init.seed,
                };
                distill_student::ModelConfig::from_file(&init.config)
                    .map_err(|e| ParamError::new("init.config", e.to_string()))?;
                for f in ["tokenizer.json", "tokenizer_config.json"] {
                    if !init.tokenizer.join(f).is_file() {
                        return Err(ParamError::new(
                            "init.tokenizer",
                            format!("{} has no {f}", init.tokenizer.display()),
                        ));
                    }
                }
                Base::Init(init)
            }
            _ => {
                return Err(ParamError::new(
                    "base_model",
                    "give exactly one of `base_model` (a model folder) and `init` (train from scratch)",
                ));
            }
        };
        Ok(Arc::new(Train {
            stage,
            config,
            base,
        }))
    }
}

/// Devices named once each, and a `grad_accum` they can share evenly.
fn check_devices(stage: &TrainStageParams, config: &TrainConfig) -> Result<(), ParamError> {
    let Some(devices) = &stage.devices else {
        return Ok(());
    };
    if devices.is_empty() {
        return Err(ParamError::new("devices", "name at least one device"));
    }
    for (i, d) in devices.iter().enumerate() {
        if devices[..i].contains(d) {
            return Err(ParamError::new(
                "devices",
                format!("device {d} is named twice"),
            ));
        }
    }
    config.check_devices(devices.len()).map_err(|e| match e {
        TrainError::Config { field, message } => ParamError::new(field, message),
        other => ParamError::new("devices", other.to_string()),
    })
}

/// Refuses a GPU run the memory planner says cannot fit, naming what would. Each of `gpus`
/// data-parallel GPUs is planned with the state `sharding` leaves it.
fn check_plan(
    base: &Path,
    config: &TrainConfig,
    gpu_mem_gib: Option<f64>,
    gpus: usize,
    sharding: Sharding,
) -> Result<(), ParamError> {
    use distill_student::plan::{Method, PlanSettings, PlanSharding, plan_for};
    let defaults = PlanSettings::default();
    let settings = PlanSettings {
        method: match &config.lora {
            Some(l) if l.quantized_base() => Method::Qlora { rank: l.rank },
            Some(l) => Method::Lora { rank: l.rank },
            None => Method::Full,
        },
        seq_len: config.max_seq_len,
        micro_batch: match config.micro_batch {
            distill_student::train::MicroBatch::Sequences(n) => n,
            distill_student::train::MicroBatch::Tokens(t) => t.div_ceil(config.max_seq_len).max(1),
        },
        gpus,
        sharding: match sharding {
            Sharding::None => PlanSharding::None,
            Sharding::Optimizer => PlanSharding::Optimizer,
        },
        gpu_mem_gib: gpu_mem_gib.unwrap_or(defaults.gpu_mem_gib),
        recompute: config.recompute,
        bf16: config.precision == Precision::Bf16,
        loss_chunk_tokens: config.loss_chunk_tokens,
        attention_chunk_tokens: config.attention_chunk_tokens,
    };
    let plan =
        plan_for(base, &settings).map_err(|e| ParamError::new("base_model", e.to_string()))?;
    if !plan.fits {
        return Err(ParamError::new(
            "*",
            format!(
                "the memory planner estimates {:.1} GiB per GPU, more than {:.0} GiB; would fit: {}",
                plan.total_gib(),
                settings.gpu_mem_gib,
                plan.suggestions.join("; ")
            ),
        ));
    }
    Ok(())
}

/// A configured `train` stage.
#[derive(Debug)]
pub struct Train {
    stage: TrainStageParams,
    config: TrainConfig,
    base: Base,
}

/// What the training thread reports.
enum Event {
    Start { total_steps: usize, done: usize },
    Step(distill_student::train::StepMetrics),
    Checkpoint(SavedCheckpoint),
}

#[async_trait]
impl Stage for Train {
    fn preflight(&self) -> Result<(), StageError> {
        let param = |e: ParamError| StageError::Input(format!("{}: {}", e.field, e.message));
        if let Base::Folder(dir) = &self.base {
            for f in ["config.json", "tokenizer.json"] {
                if !dir.join(f).is_file() {
                    return Err(StageError::Input(format!(
                        "base_model: {} has no {f}",
                        dir.display()
                    )));
                }
            }
        }
        if self.stage.device == Device::Cuda {
            crate::device::check_cuda_devices(self.stage.devices.as_deref().unwrap_or(&[0]))?;
            let config = match &self.base {
                Base::Folder(dir) => dir.as_path(),
                Base::Init(init) => init.config.as_path(),
            };
            let gpus = self.stage.devices.as_ref().map_or(1, Vec::len);
            check_plan(
                config,
                &self.config,
                self.stage.gpu_mem_gib,
                gpus,
                self.stage.sharding,
            )
            .map_err(param)?;
        }
        Ok(())
    }

    fn identity(&self) -> Result<Value, StageError> {
        let base = match &self.base {
            Base::Folder(dir) => crate::evaluate::model_identity(dir)?,
            Base::Init(init) => {
                let read = |p: &Path| {
                    std::fs::read(p)
                        .map_err(|e| StageError::Input(format!("cannot read {}: {e}", p.display())))
                };
                let mut tokenizer = read(&init.tokenizer.join("tokenizer.json"))?;
                tokenizer.extend(read(&init.tokenizer.join("tokenizer_config.json"))?);
                json!({
                    "init_config": crate::hash::hex128(&read(&init.config)?),
                    "init_tokenizer": crate::hash::hex128(&tokenizer),
                    "init_seed": init.seed,
                    "init_code": INIT_CODE_VERSION,
                })
            }
        };
        Ok(json!({
            "base_model": base,
            "config": self.config,
            "device": self.stage.device,
        }))
    }

    async fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let input = ctx.single_input()?;
        let items = output_items(&ctx.db, input.stage_id, &input.kind).await?;
        if items.is_empty() {
            return Err(StageError::Input(format!(
                "stage `{}` kept no traces: nothing to train on",
                input.name
            )));
        }
        // The user turns the teacher saw, rebuilt from each generate (or import) stage's
        // identity.
        let identities: HashMap<i64, Value> = sqlx::query_as::<_, (i64, String, String)>(
            "SELECT id, kind, params FROM stages WHERE run_id = ?",
        )
        .bind(ctx.run_id)
        .fetch_all(ctx.db.pool())
        .await?
        .into_iter()
        .filter(|(_, kind, _)| GENERATION_KINDS.contains(&kind.as_str()))
        .map(|(id, _, p)| (id, serde_json::from_str(&p).unwrap_or(Value::Null)))
        .collect();
        let records: Vec<SftRecord> = items
            .iter()
            .map(|it| {
                let identity = identities
                    .get(&it.generate_stage_id)
                    .unwrap_or(&Value::Null);
                let messages = rendered_messages(identity, &it.prompt)
                    .into_iter()
                    .map(|m| ChatMessage::new(role_name(&m.role), m.content))
                    .collect();
                SftRecord {
                    messages,
                    reasoning: it.reasoning.trim().to_string(),
                    answer: it.answer.trim().to_string(),
                }
            })
            .collect();

        let resume_from = resume_point(ctx).await?;

        let base = match &self.base {
            Base::Folder(dir) => dir.clone(),
            Base::Init(init) => init_base(init, &ctx.artifacts).await?,
        };
        let (tx, mut rx) = mpsc::channel::<Event>(64);
        let stop = Arc::new(AtomicBool::new(false));
        let job = TrainJob {
            spec: TrainSpec {
                base: base.clone(),
                config: self.config.clone(),
                records,
                resume_from,
                sharding: self.stage.sharding,
            },
            artifacts: ctx.artifacts.clone(),
            checkpoint_every: self.stage.checkpoint_every,
            stop: stop.clone(),
            tx,
        };
        let device = self.stage.device;
        let devices = self.stage.devices.clone().unwrap_or_else(|| vec![0]);
        let worker = tokio::task::spawn_blocking(move || job.run(device, &devices));

        let mut last_step = 0usize;
        let mut last_loss = f64::NAN;
        // Real and padded input tokens of the steps this attempt ran, for the padding figure.
        let (mut real_tokens, mut padded_tokens) = (0usize, 0usize);
        while let Some(event) = rx.recv().await {
            if ctx.cancel.is_cancelled() {
                stop.store(true, Ordering::Relaxed);
            }
            match event {
                Event::Start { total_steps, done } => {
                    ctx.progress.set_total(total_steps as u64);
                    ctx.progress.set_done(done as u64);
                }
                Event::Step(m) => {
                    let mut tx = ctx.db.write().await?;
                    training::record_step(
                        &mut tx,
                        ctx.stage_id,
                        &StepRow {
                            step: m.step as i64,
                            epoch: m.epoch,
                            loss: m.loss,
                            lr: m.lr,
                            grad_norm: Some(m.grad_norm),
                            tokens: m.tokens as i64,
                            tokens_per_s: Some(m.tokens_per_s),
                            peak_memory_bytes: Some(m.peak_memory_bytes as i64),
                        },
                    )
                    .await?;
                    tx.commit().await?;
                    ctx.progress.set_done(m.step as u64);
                    ctx.progress
                        .set_message(format!("loss {:.4} lr {:.2e}", m.loss, m.lr));
                    last_step = m.step;
                    last_loss = m.loss;
                    real_tokens += m.input_tokens;
                    padded_tokens += m.padded_tokens;
                }
                Event::Checkpoint(saved) => saved.record(ctx, self.stage.keep_last).await?,
            }
        }
        let outcome = worker
            .await
            .map_err(|e| StageError::Failed(format!("training panicked: {e}")))??;
        if padded_tokens > 0 {
            tracing::info!(
                real_tokens,
                padded_tokens,
                "padding: {:.1}% of the batches' input tokens",
                100.0 * (padded_tokens - real_tokens) as f64 / padded_tokens as f64
            );
        }
        match outcome {
            Finished::Interrupted => Err(StageError::Interrupted),
            Finished::Done {
                total_steps,
                data,
                devices,
            } => Ok(json!({
                "base_model": base.display().to_string(),
                "devices": devices,
                "steps": total_steps,
                "last_step": last_step,
                "final_loss": last_loss,
                "examples": data,
            })),
        }
    }
}

/// Bumped when `CausalLm::init` changes what a seed produces, so from-scratch runs redo.
const INIT_CODE_VERSION: u32 = 1;

/// The random base model of a from-scratch run, made once in `artifacts/base` (written to a
/// temporary folder and renamed, so a kill never leaves half a model to resume from).
async fn init_base(init: &InitModel, artifacts: &Path) -> Result<PathBuf, StageError> {
    let dir = artifacts.join("base");
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    let tmp = artifacts.join("base.partial");
    let init = init.clone();
    let (out, tmp2) = (dir.clone(), tmp.clone());
    tokio::task::spawn_blocking(move || -> Result<(), StageError> {
        let _ = std::fs::remove_dir_all(&tmp2);
        std::fs::create_dir_all(&tmp2)
            .map_err(|e| StageError::Failed(format!("cannot create {}: {e}", tmp2.display())))?;
        distill_student::api::init_model(
            &init.config,
            &init.tokenizer,
            init.seed,
            distill_student::DType::F32,
            &tmp2,
        )
        .map_err(|e| StageError::Input(format!("init: {e}")))?;
        std::fs::rename(&tmp2, &out)
            .map_err(|e| StageError::Failed(format!("cannot create {}: {e}", out.display())))
    })
    .await
    .map_err(|e| StageError::Failed(format!("init: {e}")))??;
    tracing::info!("initialised a random base model in {}", dir.display());
    Ok(dir)
}

/// The newest recorded intermediate checkpoint whose files are as saved, or `None` when
/// none was recorded (a fresh start). Damaged newer ones are warned about and forgotten,
/// rows and folders (their steps are trained again, so neither pruning nor evaluation may
/// see them). When every recorded checkpoint is damaged the stage fails naming each
/// damaged file, rather than silently training from scratch.
pub(crate) async fn resume_point(ctx: &StageContext) -> Result<Option<PathBuf>, StageError> {
    let recorded = training::checkpoints(ctx.db.pool(), ctx.stage_id).await?;
    let mut damaged = Vec::new();
    let mut intact = None;
    for c in recorded.iter().rev().filter(|c| !c.r#final) {
        let damage = checkpoint_files::verify_recorded(c).await?;
        if damage.is_empty() {
            intact = Some(c);
            break;
        }
        tracing::warn!(
            "checkpoint {} (step {}) is damaged: {}",
            c.path,
            c.step,
            checkpoint_files::list(&damage)
        );
        damaged.push((c, damage));
    }
    let Some(intact) = intact else {
        if damaged.is_empty() {
            return Ok(None);
        }
        let all: Vec<_> = damaged.into_iter().flat_map(|(_, d)| d).collect();
        return Err(StageError::Input(format!(
            "no intact checkpoint to resume from; damaged: {} (restore them and resume)",
            checkpoint_files::list(&all)
        )));
    };
    for (c, _) in &damaged {
        let mut tx = ctx.db.write().await?;
        training::delete_checkpoint(&mut tx, c.id).await?;
        tx.commit().await?;
        let _ = std::fs::remove_dir_all(&c.path);
    }
    if !damaged.is_empty() {
        tracing::warn!(
            "resuming from {} (step {}); removed the damaged checkpoint{} after it",
            intact.path,
            intact.step,
            if damaged.len() == 1 { "" } else { "s" }
        );
    }
    Ok(Some(PathBuf::from(&intact.path)))
}

/// A checkpoint the training thread wrote and hashed, for the async side to record.
pub(crate) struct SavedCheckpoint {
    step: usize,
    path: PathBuf,
    last: bool,
    files: Vec<CheckpointFile>,
}

impl SavedCheckpoint {
    /// Runs `write` on `artifacts/final` (`last`) or `artifacts/checkpoint-STEP`, then hashes
    /// what it wrote (right after the save, while the files are likely still cached).
    pub(crate) fn write(
        artifacts: &Path,
        step: usize,
        last: bool,
        write: impl FnOnce(&Path) -> Result<(), StageError>,
    ) -> Result<Self, StageError> {
        let path = if last {
            artifacts.join("final")
        } else {
            artifacts.join(format!("checkpoint-{step}"))
        };
        write(&path)?;
        let files = checkpoint_files::manifest(&path)
            .map_err(|e| StageError::Failed(format!("hashing {}: {e}", path.display())))?;
        Ok(Self {
            step,
            path,
            last,
            files,
        })
    }

    /// Records it in the job database, then drops intermediate checkpoints beyond `keep_last`.
    pub(crate) async fn record(
        self,
        ctx: &StageContext,
        keep_last: Option<usize>,
    ) -> Result<(), StageError> {
        let mut tx = ctx.db.write().await?;
        training::record_checkpoint(
            &mut tx,
            ctx.stage_id,
            self.step as i64,
            &self.path.display().to_string(),
            self.last,
            Some(&self.files),
        )
        .await?;
        tx.commit().await?;
        if let Some(keep) = keep_last {
            prune(ctx, keep).await?;
        }
        Ok(())
    }
}

/// Drops the oldest intermediate checkpoints beyond `keep`, folders and rows alike.
pub(crate) async fn prune(ctx: &StageContext, keep: usize) -> Result<(), StageError> {
    let all = training::checkpoints(ctx.db.pool(), ctx.stage_id).await?;
    let intermediate: Vec<_> = all.iter().filter(|c| !c.r#final).collect();
    if intermediate.len() <= keep {
        return Ok(());
    }
    for old in &intermediate[..intermediate.len() - keep] {
        let mut tx = ctx.db.write().await?;
        training::delete_checkpoint(&mut tx, old.id).await?;
        tx.commit().await?;
        // The row goes first: a crash in between leaves an orphan folder, never a row
        // pointing at nothing.
        let _ = std::fs::remove_dir_all(&old.path);
    }
    Ok(())
}

pub(crate) fn role_name(role: &distill_teacher::Role) -> &'static str {
    match role {
        distill_teacher::Role::System => "system",
        distill_teacher::Role::User => "user",
        distill_teacher::Role::Assistant => "assistant",
    }
}

enum Finished {
    Done {
        total_steps: usize,
        data: Value,
        /// Devices the last session trained on (replicas included).
        devices: usize,
    },
    Interrupted,
}

/// What every training process needs to build the same trainer: the train stage's job, as
/// rank 0 sends it to the others when several processes train together.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TrainSpec {
    pub base: PathBuf,
    pub config: TrainConfig,
    pub records: Vec<SftRecord>,
    pub resume_from: Option<PathBuf>,
    pub sharding: Sharding,
}

impl TrainSpec {
    /// The trainer this spec describes, on `devices` (the first its own, the rest replicas).
    pub(crate) fn build<B: distill_student::train::TrainBackend>(
        &self,
        devices: &[B::Device],
    ) -> Result<Trainer<B>, StageError> {
        let device = &devices[0];
        let tokenizer = Tokenizer::from_dir(&self.base)
            .map_err(|e| StageError::Input(format!("base model: {e}")))?;
        let examples = examples_from_records(&tokenizer, &self.records)
            .map_err(|e| StageError::Input(format!("rendering the training examples: {e}")))?;
        let mut trainer = match &self.resume_from {
            Some(ckpt) => Trainer::<B>::resume_with_base(ckpt, Some(&self.base), &examples, device),
            None => Trainer::<B>::new(&self.base, &examples, self.config.clone(), device),
        }
        .map_err(|e| training_error(&e))?;
        trainer.set_sharding(self.sharding);
        trainer
            .replicate_on(&devices[1..])
            .map_err(|e| StageError::Input(e.to_string()))?;
        Ok(trainer)
    }
}

pub(crate) fn training_error(e: &dyn std::fmt::Display) -> StageError {
    StageError::Failed(format!("training: {e}"))
}

/// The training loop, on a blocking thread.
struct TrainJob {
    spec: TrainSpec,
    artifacts: PathBuf,
    checkpoint_every: usize,
    stop: Arc<AtomicBool>,
    tx: mpsc::Sender<Event>,
}

impl TrainJob {
    fn run(self, device: Device, devices: &[usize]) -> Result<Finished, StageError> {
        let cluster = crate::cluster::current();
        // One device per process when several train together: this process's LOCAL_RANK.
        let devices = match cluster {
            Some(c) if devices.len() > 1 => {
                return Err(StageError::Input(format!(
                    "`devices`: {} processes train together, each on one device (its LOCAL_RANK); \
                     list at most one device",
                    c.world().size
                )));
            }
            Some(c) => vec![c.world().local_rank],
            None => devices.to_vec(),
        };
        match device {
            Device::Cpu => {
                type B = burn::backend::Autodiff<distill_student::CpuBackend>;
                self.train::<B>(&vec![Default::default(); devices.len()], device)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda => {
                type B = burn::backend::Autodiff<distill_student::CudaBackend>;
                let devices: Vec<_> = devices
                    .iter()
                    .map(|&i| burn::backend::cuda::CudaDevice::new(i))
                    .collect();
                self.train::<B>(&devices, device)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => Err(StageError::Input("built without CUDA".into())),
        }
    }

    fn train<B: distill_student::train::TrainBackend>(
        self,
        devices: &[B::Device],
        kind: Device,
    ) -> Result<Finished, StageError> {
        let cluster = crate::cluster::current();
        // One job at a time on the processes, whatever the DAG runs concurrently.
        let _turn = cluster.map(|c| c.turn());
        let built = match cluster {
            // Every rank builds the same trainer; a failure anywhere fails the stage.
            Some(c) => c.start(&self.spec, kind).and_then(|()| {
                let built = self.spec.build::<B>(devices);
                c.ready(built)
            }),
            None => self.spec.build::<B>(devices),
        };
        let mut trainer = built?;
        let result = self.steps(&mut trainer, cluster);
        if let (Some(c), Err(e)) = (cluster, &result) {
            c.abort(&e.to_string());
        }
        result
    }

    fn steps<B: distill_student::train::TrainBackend>(
        &self,
        trainer: &mut Trainer<B>,
        cluster: Option<&crate::cluster::Cluster>,
    ) -> Result<Finished, StageError> {
        let sharding = self.spec.sharding;
        let processes = cluster.map_or(1, |c| c.world().size);
        tracing::info!(devices = trainer.devices().len(), processes, sharding = ?sharding, "training");
        let mut last_saved = trainer.global_step();
        let _ = self.tx.blocking_send(Event::Start {
            total_steps: trainer.total_steps(),
            done: last_saved,
        });
        let save = |trainer: &Trainer<B>, last: bool| -> Result<(), StageError> {
            // A checkpoint holds the whole optimizer state: sharded ranks send theirs.
            if let (Some(c), false) = (cluster, last) {
                c.save()?;
            }
            let saved =
                SavedCheckpoint::write(&self.artifacts, trainer.global_step(), last, |path| {
                    if last {
                        trainer.export(path, SaveOptions::default()).map(drop)
                    } else {
                        trainer.save_checkpoint(path).map(drop)
                    }
                    .map_err(|e| training_error(&e))
                })?;
            let _ = self.tx.blocking_send(Event::Checkpoint(saved));
            Ok(())
        };
        // Rank 0 tells the other processes whether to step before each step.
        let control = |step: bool| -> Result<(), StageError> {
            match cluster {
                Some(c) => c.control(step),
                None => Ok(()),
            }
        };
        loop {
            if self.stop.load(Ordering::Relaxed) {
                if trainer.global_step() > last_saved {
                    save(trainer, false)?;
                }
                control(false)?;
                return Ok(Finished::Interrupted);
            }
            control(true)?;
            match trainer.step().map_err(|e| training_error(&e))? {
                Some(m) => {
                    let step = m.step;
                    if self.tx.blocking_send(Event::Step(m)).is_err() {
                        control(false)?;
                        return Ok(Finished::Interrupted);
                    }
                    if self.checkpoint_every > 0
                        && step % self.checkpoint_every == 0
                        && !trainer.is_finished()
                    {
                        save(trainer, false)?;
                        last_saved = step;
                    }
                }
                None => break,
            }
        }
        control(false)?;
        save(trainer, true)?;
        let data = serde_json::to_value(trainer.data_stats()).unwrap_or(Value::Null);
        Ok(Finished::Done {
            total_steps: trainer.total_steps(),
            data,
            devices: trainer.devices().len() * processes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_student::train::LoraConfig;

    /// `sharding` takes "none" and "optimizer"; anything else is refused naming the key.
    #[test]
    fn sharding_is_a_stage_key_and_names_itself_when_wrong() {
        let parse = |v: &str| {
            let table: toml::Table = toml::from_str(&format!("sharding = \"{v}\"")).unwrap();
            parse_params::<TrainStageParams>(table)
        };
        assert_eq!(parse("optimizer").unwrap().sharding, Sharding::Optimizer);
        assert_eq!(parse("none").unwrap().sharding, Sharding::None);
        let err = parse("full").unwrap_err();
        assert_eq!(err.field, "sharding", "{err:?}");
        assert!(err.message.contains("optimizer"), "{}", err.message);
        assert!(STAGE_KEYS.contains(&"sharding"));
    }

    /// R1-Distill-Llama-70B's shape (Llama-3.3-70B) on one H200 at 4k tokens, bf16 with
    /// recomputation: `lora.base_bits = 4` is planned as QLoRA and fits; the same LoRA on a
    /// bf16 base is refused, naming QLoRA.
    #[test]
    fn check_plan_plans_a_quantized_base_as_qlora() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/llama-3.3-70b");
        let config = |base_bits| TrainConfig {
            lora: Some(LoraConfig {
                base_bits,
                ..LoraConfig::default()
            }),
            max_seq_len: 4096,
            precision: Precision::Bf16,
            recompute: true,
            ..TrainConfig::default()
        };
        check_plan(&dir, &config(Some(4)), None, 1, Sharding::None).unwrap();
        let err = check_plan(&dir, &config(None), None, 1, Sharding::None).unwrap_err();
        assert!(
            err.message
                .contains("would fit: QLoRA (4-bit base, rank 16"),
            "{}",
            err.message
        );
    }
}
