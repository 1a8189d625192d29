//! Training metrics and checkpoints.

use serde::Serialize;
use sqlx::{FromRow, SqliteExecutor};

use crate::{Result, WriteTx, now_ms};

/// One optimizer step's figures.
#[derive(Debug, Clone, PartialEq, FromRow, Serialize)]
pub struct StepMetrics {
    /// Step number, from 1.
    pub step: i64,
    /// Epochs completed, fractional.
    pub epoch: f64,
    /// Mean loss per target token over the accumulated batch.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: Option<f64>,
    /// Target tokens in the step.
    pub tokens: i64,
    /// Throughput.
    pub tokens_per_s: Option<f64>,
    /// Peak memory.
    pub peak_memory_bytes: Option<i64>,
}

/// Records a step (a step redone after a resume replaces its earlier row).
pub async fn record_step(tx: &mut WriteTx, stage_id: i64, m: &StepMetrics) -> Result<()> {
    sqlx::query(
        "INSERT OR REPLACE INTO train_metrics (stage_id, step, epoch, loss, lr, grad_norm, tokens,
             tokens_per_s, peak_memory_bytes, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(stage_id)
    .bind(m.step)
    .bind(m.epoch)
    .bind(m.loss)
    .bind(m.lr)
    .bind(m.grad_norm)
    .bind(m.tokens)
    .bind(m.tokens_per_s)
    .bind(m.peak_memory_bytes)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Every step of a stage, in order.
pub async fn steps<'e>(ex: impl SqliteExecutor<'e>, stage_id: i64) -> Result<Vec<StepMetrics>> {
    Ok(sqlx::query_as(
        "SELECT step, epoch, loss, lr, grad_norm, tokens, tokens_per_s, peak_memory_bytes
         FROM train_metrics WHERE stage_id = ? ORDER BY step",
    )
    .bind(stage_id)
    .fetch_all(ex)
    .await?)
}

/// A row of `checkpoints`.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Checkpoint {
    /// Row id.
    pub id: i64,
    /// The train stage.
    pub stage_id: i64,
    /// Step it was saved after.
    pub step: i64,
    /// Its folder.
    pub path: String,
    /// Whether it is the end of training.
    pub r#final: bool,
}

/// Records a checkpoint.
pub async fn record_checkpoint(
    tx: &mut WriteTx,
    stage_id: i64,
    step: i64,
    path: &str,
    is_final: bool,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO checkpoints (stage_id, step, path, final, created_at) VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (stage_id, step) DO UPDATE SET path = excluded.path, final = excluded.final",
    )
    .bind(stage_id)
    .bind(step)
    .bind(path)
    .bind(is_final)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Checkpoints of a stage by step.
pub async fn checkpoints<'e>(
    ex: impl SqliteExecutor<'e>,
    stage_id: i64,
) -> Result<Vec<Checkpoint>> {
    Ok(sqlx::query_as(
        "SELECT id, stage_id, step, path, final FROM checkpoints WHERE stage_id = ? ORDER BY step",
    )
    .bind(stage_id)
    .fetch_all(ex)
    .await?)
}

/// Forgets a checkpoint (its folder is removed by the caller).
pub async fn delete_checkpoint(tx: &mut WriteTx, id: i64) -> Result<()> {
    sqlx::query("DELETE FROM checkpoints WHERE id = ?")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
