//! Training metrics and checkpoints.

use serde::{Deserialize, Serialize};
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
    /// What the folder held when saved (JSON array of [`CheckpointFile`]); `None` for a
    /// checkpoint recorded before files were (it cannot be verified). See [`Self::files`].
    #[serde(skip)]
    pub files: Option<String>,
}

impl Checkpoint {
    /// The files the folder held when it was saved, or `None` where that was not recorded.
    pub fn files(&self) -> Result<Option<Vec<CheckpointFile>>> {
        Ok(self
            .files
            .as_deref()
            .map(serde_json::from_str)
            .transpose()?)
    }
}

/// One file of a saved checkpoint folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointFile {
    /// Path relative to the checkpoint folder, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// xxh3-128 of the contents, 32 hex digits.
    pub xxh3: String,
}

/// Records a checkpoint with the files its folder held (`None`: not known).
pub async fn record_checkpoint(
    tx: &mut WriteTx,
    stage_id: i64,
    step: i64,
    path: &str,
    is_final: bool,
    files: Option<&[CheckpointFile]>,
) -> Result<()> {
    let files = files.map(serde_json::to_string).transpose()?;
    sqlx::query(
        "INSERT INTO checkpoints (stage_id, step, path, final, files, created_at)
         VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT (stage_id, step) DO UPDATE
         SET path = excluded.path, final = excluded.final, files = excluded.files",
    )
    .bind(stage_id)
    .bind(step)
    .bind(path)
    .bind(is_final)
    .bind(files)
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
        "SELECT id, stage_id, step, path, final, files FROM checkpoints
         WHERE stage_id = ? ORDER BY step",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Db;

    #[tokio::test]
    async fn checkpoint_files_round_trip_and_old_rows_have_none() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        sqlx::query(
            "INSERT INTO runs (id, name, config_path, config, workdir, status, created_at, updated_at)
             VALUES (1, 'r', 'p.toml', '', '.', 'running', 0, 0);
             INSERT INTO stages (id, run_id, name, kind, position, needs, params, fingerprint, status)
             VALUES (1, 1, 'train', 'train', 0, '[]', '{}', 'f', 'running');
             INSERT INTO checkpoints (stage_id, step, path, created_at) VALUES (1, 10, 'c10', 0);",
        )
        .execute(db.pool())
        .await
        .unwrap();
        let files = [CheckpointFile {
            path: "model.safetensors".into(),
            size: 12,
            xxh3: "0".repeat(32),
        }];
        let mut tx = db.write().await.unwrap();
        record_checkpoint(&mut tx, 1, 20, "c20", false, Some(&files))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let rows = checkpoints(db.pool(), 1).await.unwrap();
        assert_eq!(rows[0].files().unwrap(), None);
        assert_eq!(rows[1].files().unwrap().as_deref(), Some(&files[..]));
    }
}
