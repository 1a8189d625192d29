//! Checkpoint folder layout, `trainer_state.json`, and the atomic write (build `NAME.tmp`,
//! fsync, rename over `NAME`).
//!
//! ```text
//! checkpoint-N/
//!   model.safetensors, config.json, generation_config.json, tokenizer files   (full fine-tuning:
//!                                   f32 master weights, loadable by transformers as is)
//!   adapter_model.safetensors, adapter_config.json                            (LoRA: PEFT layout;
//!                                   the frozen base is the folder named in trainer_state.json)
//!   optimizer.mpk                   AdamW moments and step counts (Burn NamedMpk record, f32)
//!   optimizer-R-of-N.mpk            instead, when N processes shard the optimizer: rank R's
//!                                   part, written by that rank (R and N as 00000)
//!   trainer_state.json              step, data position, schedule, seeds, config, data fingerprint
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::data::DataStats;
use super::error::{TrainError, TrainResult};
use super::trainer::StepMetrics;

/// Name of the trainer state file in a checkpoint folder.
pub const STATE_FILE: &str = "trainer_state.json";
/// Stem of the optimizer record (Burn appends `.mpk`).
pub const OPTIMIZER_STEM: &str = "optimizer";
/// Stem of rank `rank`'s part of an optimizer record sharded over `size` processes.
pub fn optimizer_shard_stem(rank: usize, size: usize) -> String {
    format!("{OPTIMIZER_STEM}-{rank:05}-of-{size:05}")
}

/// The number of shards `ckpt` holds the optimizer record in, from its file names (`None`: one
/// `optimizer.mpk`, or no optimizer file at all).
pub fn optimizer_shards(ckpt: &Path) -> Option<usize> {
    let entries = std::fs::read_dir(ckpt).ok()?;
    entries.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let rest = name.strip_prefix(&format!("{OPTIMIZER_STEM}-"))?;
        let (_, n) = rest.strip_suffix(".mpk")?.split_once("-of-")?;
        n.parse().ok()
    })
}

/// Version of the checkpoint layout this crate writes and reads.
pub const STATE_FORMAT: u32 = 1;

/// Where all randomness comes from. There is no generator state to save: data order is drawn
/// from `(seed, epoch)`, LoRA initialisation from `(seed, layer, module)` and LoRA dropout from
/// `(seed, step, micro-batch, layer)`, so these counters are the whole RNG state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The run's seed.
    pub seed: u64,
    /// Epoch whose shuffle the next micro-batch comes from.
    pub epoch: usize,
    /// Optimizer steps taken (the dropout stream's counter).
    pub step: usize,
}

/// Everything besides weights and optimizer moments that a resumed run needs, as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Layout version (`STATE_FORMAT` in `train/checkpoint.rs`).
    pub format: u32,
    /// Optimizer steps completed.
    pub global_step: usize,
    /// Steps the run will take in all.
    pub total_steps: usize,
    /// Epoch of the next micro-batch.
    pub epoch: usize,
    /// Index of the next micro-batch in that epoch's plan.
    pub micro_index: usize,
    /// Micro-batches in that epoch's plan (checked on resume).
    pub epoch_micro_batches: usize,
    /// Learning rate the next step will use.
    pub next_lr: f64,
    /// Random-number state (counters only; see [`RngState`]).
    pub rng: RngState,
    /// The run's parameters (authoritative on resume).
    pub config: TrainConfig,
    /// The model folder training started from (the frozen base of a LoRA run).
    pub base_model: Option<PathBuf>,
    /// `model` (full weights in this folder) or `adapter` (PEFT adapter on `base_model`).
    pub weights: String,
    /// FNV-1a of the kept sequences (hex); resume refuses other data.
    pub data_fingerprint: String,
    /// What the length rule did.
    pub data: DataStats,
    /// Parameter paths in visiting order: the optimizer record's ids are these positions.
    pub param_names: Vec<String>,
    /// Input tokens trained on so far.
    pub tokens_seen: u64,
    /// Target tokens trained on so far.
    pub target_tokens_seen: u64,
    /// Metrics of the last completed step.
    pub last_step: Option<StepMetrics>,
}

/// Reads a checkpoint's `trainer_state.json` (the stage can show progress without a model).
pub fn read_trainer_state(dir: impl AsRef<Path>) -> TrainResult<TrainerState> {
    let path = dir.as_ref().join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| TrainError::checkpoint(&path, format!("invalid trainer state: {e}")))?;
    if state.format != STATE_FORMAT {
        return Err(TrainError::checkpoint(
            &path,
            format!(
                "field `format`: layout {} is not the supported {STATE_FORMAT}",
                state.format
            ),
        ));
    }
    Ok(state)
}

pub(crate) fn write_state(dir: &Path, state: &TrainerState) -> TrainResult<()> {
    let path = dir.join(STATE_FILE);
    let text = serde_json::to_string_pretty(state).expect("trainer state serialises");
    std::fs::write(&path, text + "\n").map_err(|e| TrainError::io(&path, e))
}

/// `NAME.tmp` and `NAME.old` beside `dir`.
fn siblings(dir: &Path) -> TrainResult<(PathBuf, PathBuf)> {
    let name = dir
        .file_name()
        .ok_or_else(|| TrainError::checkpoint(dir, "checkpoint path has no folder name"))?
        .to_string_lossy()
        .to_string();
    Ok((
        dir.with_file_name(format!("{name}.tmp")),
        dir.with_file_name(format!("{name}.old")),
    ))
}

/// An empty `NAME.tmp` to build the checkpoint in (a stale one from a crash is removed).
pub(crate) fn begin(dir: &Path) -> TrainResult<PathBuf> {
    let (tmp, _) = siblings(dir)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    Ok(tmp)
}

fn fsync(path: &Path) -> TrainResult<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| TrainError::io(path, e))
}

/// Makes `tmp` durable and moves it to `dir`. An existing `dir` is first moved aside to
/// `NAME.old` and deleted last, so at every instant one complete checkpoint exists.
pub(crate) fn commit(tmp: &Path, dir: &Path) -> TrainResult<()> {
    let (_, old) = siblings(dir)?;
    let entries = std::fs::read_dir(tmp).map_err(|e| TrainError::io(tmp, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io(tmp, e))?;
        fsync(&entry.path())?;
    }
    fsync(tmp)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
    }
    let replaced = dir.exists();
    if replaced {
        std::fs::rename(dir, &old).map_err(|e| TrainError::io(dir, e))?;
    }
    std::fs::rename(tmp, dir).map_err(|e| TrainError::io(dir, e))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fsync(parent)?;
    }
    if replaced {
        std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
    }
    Ok(())
}
