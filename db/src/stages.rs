//! Stages of a run: status, fingerprint, attempts, error, timings and item counts.

use serde::Serialize;
use sqlx::{FromRow, SqliteExecutor};

use crate::{Db, Result, WriteTx, now_ms};

/// Lifecycle of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, sqlx::Type)]
#[sqlx(type_name = "TEXT", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum StageStatus {
    /// Not started, or interrupted and waiting for `resume`.
    Pending,
    /// Being executed (or was, when its process died).
    Running,
    /// Finished; its items are reused while its fingerprint holds.
    Done,
    /// Failed after its retries; `resume` tries again.
    Failed,
}

/// A row of `stages`.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct StageRow {
    /// Row id; item tables reference it.
    pub id: i64,
    /// The run it belongs to.
    pub run_id: i64,
    /// Name from the config.
    pub name: String,
    /// Stage kind (`load`, `generate`, ...).
    pub kind: String,
    /// Topological position, for display.
    pub position: i64,
    /// JSON array of the names this stage needs.
    pub needs: String,
    /// Canonical JSON of its parameters.
    pub params: String,
    /// Hash of kind, parameters, code version and upstream fingerprints.
    pub fingerprint: String,
    /// Lifecycle state.
    pub status: StageStatus,
    /// How many times it was started under this fingerprint.
    pub attempts: i64,
    /// The last error, when it failed.
    pub error: Option<String>,
    /// Items it will produce, when known.
    pub items_total: Option<i64>,
    /// Items produced so far.
    pub items_done: i64,
    /// Items that failed (recorded, to be retried on resume).
    pub items_failed: i64,
    /// JSON summary the stage reported when it finished.
    pub summary: Option<String>,
    /// Start of the latest attempt (unix ms).
    pub started_at: Option<i64>,
    /// End of the latest attempt (unix ms).
    pub finished_at: Option<i64>,
    /// Time spent over all attempts.
    pub elapsed_ms: i64,
}

/// What the config says a stage is, ready to be reconciled with the database.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// Name from the config.
    pub name: String,
    /// Stage kind.
    pub kind: String,
    /// Topological position.
    pub position: i64,
    /// JSON array of needed stage names.
    pub needs: String,
    /// Canonical JSON parameters.
    pub params: String,
    /// Fingerprint under the current config and code.
    pub fingerprint: String,
}

/// How [`sync`] changed the stored stages.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SyncReport {
    /// Stages new to this run.
    pub added: Vec<String>,
    /// Stages whose fingerprint changed: their items were discarded.
    pub reset: Vec<String>,
    /// Stages no longer in the config: removed with their items.
    pub removed: Vec<String>,
}

const COLUMNS: &str = "id, run_id, name, kind, position, needs, params, fingerprint, status, \
     attempts, error, items_total, items_done, items_failed, summary, started_at, finished_at, \
     elapsed_ms";

/// Stages of a run in topological order.
pub async fn list<'e>(ex: impl SqliteExecutor<'e>, run_id: i64) -> Result<Vec<StageRow>> {
    Ok(sqlx::query_as::<_, StageRow>(&format!(
        "SELECT {COLUMNS} FROM stages WHERE run_id = ? ORDER BY position, name"
    ))
    .bind(run_id)
    .fetch_all(ex)
    .await?)
}

/// One stage by id.
pub async fn get<'e>(ex: impl SqliteExecutor<'e>, id: i64) -> Result<StageRow> {
    Ok(
        sqlx::query_as::<_, StageRow>(&format!("SELECT {COLUMNS} FROM stages WHERE id = ?"))
            .bind(id)
            .fetch_one(ex)
            .await?,
    )
}

/// Reconciles the stored stages of a run with the config's.
///
/// A stage whose fingerprint is unchanged keeps its items and status (a stage left
/// `running` by a dead process becomes `pending`); a changed one is deleted with all
/// its items (foreign keys cascade) and recreated `pending`; a stage no longer in the
/// config is removed.
pub async fn sync(tx: &mut WriteTx, run_id: i64, specs: &[StageSpec]) -> Result<SyncReport> {
    let existing = list(&mut **tx, run_id).await?;
    let mut report = SyncReport::default();
    for row in &existing {
        if !specs.iter().any(|s| s.name == row.name) {
            sqlx::query("DELETE FROM stages WHERE id = ?")
                .bind(row.id)
                .execute(&mut **tx)
                .await?;
            report.removed.push(row.name.clone());
        }
    }
    for spec in specs {
        match existing.iter().find(|r| r.name == spec.name) {
            Some(row) if row.fingerprint == spec.fingerprint => {
                sqlx::query(
                    "UPDATE stages SET position = ?, needs = ?, params = ?,
                         status = CASE status WHEN 'running' THEN 'pending' ELSE status END
                     WHERE id = ?",
                )
                .bind(spec.position)
                .bind(&spec.needs)
                .bind(&spec.params)
                .bind(row.id)
                .execute(&mut **tx)
                .await?;
            }
            found => {
                if let Some(row) = found {
                    sqlx::query("DELETE FROM stages WHERE id = ?")
                        .bind(row.id)
                        .execute(&mut **tx)
                        .await?;
                    report.reset.push(spec.name.clone());
                } else {
                    report.added.push(spec.name.clone());
                }
                sqlx::query(
                    "INSERT INTO stages (run_id, name, kind, position, needs, params, fingerprint,
                         status)
                     VALUES (?, ?, ?, ?, ?, ?, ?, 'pending')",
                )
                .bind(run_id)
                .bind(&spec.name)
                .bind(&spec.kind)
                .bind(spec.position)
                .bind(&spec.needs)
                .bind(&spec.params)
                .bind(&spec.fingerprint)
                .execute(&mut **tx)
                .await?;
            }
        }
    }
    Ok(report)
}

/// Marks a stage started: counts the attempt and clears the last error.
pub async fn mark_running(db: &Db, id: i64) -> Result<i64> {
    let attempts: i64 = sqlx::query_scalar(
        "UPDATE stages SET status = 'running', attempts = attempts + 1, error = NULL,
             started_at = ?, finished_at = NULL
         WHERE id = ? RETURNING attempts",
    )
    .bind(now_ms())
    .bind(id)
    .fetch_one(db.pool())
    .await?;
    Ok(attempts)
}

/// A stage's item counts: `(total, done, failed)`, total `None` until known.
pub type Counts = (Option<i64>, i64, i64);

/// Ends the current attempt with `status` and its final item `counts`, adding its
/// duration to `elapsed_ms`.
///
/// Counts and status go in one statement: a progress write still in flight from the
/// attempt (see [`set_progress`]) either lands before it and is overwritten, or lands
/// after it and changes nothing, because it only touches a `running` stage.
pub async fn finish(
    db: &Db,
    id: i64,
    status: StageStatus,
    counts: Counts,
    error: Option<&str>,
    summary: Option<&str>,
) -> Result<()> {
    let now = now_ms();
    let (total, done, failed) = counts;
    sqlx::query(
        "UPDATE stages SET status = ?, error = ?, summary = COALESCE(?, summary),
             items_total = COALESCE(?, items_total), items_done = ?, items_failed = ?,
             finished_at = ?, elapsed_ms = elapsed_ms + (? - COALESCE(started_at, ?))
         WHERE id = ?",
    )
    .bind(status)
    .bind(error)
    .bind(summary)
    .bind(total)
    .bind(done)
    .bind(failed)
    .bind(now)
    .bind(now)
    .bind(now)
    .bind(id)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Stores a running stage's item counts, for `status` while it runs. A stage that is
/// no longer `running` is left alone: its counts are [`finish`]'s to set, and a late
/// write must not overtake them.
pub async fn set_progress(db: &Db, id: i64, counts: Counts) -> Result<()> {
    let (total, done, failed) = counts;
    sqlx::query(
        "UPDATE stages SET items_total = COALESCE(?, items_total), items_done = ?, items_failed = ?
         WHERE id = ? AND status = 'running'",
    )
    .bind(total)
    .bind(done)
    .bind(failed)
    .bind(id)
    .execute(db.pool())
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn one_stage(db: &Db) -> i64 {
        let mut tx = db.write().await.unwrap();
        let run = crate::runs::upsert(&mut tx, "r", "p.toml", "", ".")
            .await
            .unwrap();
        let spec = StageSpec {
            name: "s".into(),
            kind: "k".into(),
            position: 0,
            needs: "[]".into(),
            params: "{}".into(),
            fingerprint: "f".into(),
        };
        sync(&mut tx, run.id, &[spec]).await.unwrap();
        tx.commit().await.unwrap();
        list(db.pool(), run.id).await.unwrap()[0].id
    }

    /// The race behind a done stage shown at 14682/16010: a progress write handed to
    /// SQLite before the stage ended lands after its final write.
    #[tokio::test]
    async fn a_progress_write_landing_after_finish_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        let id = one_stage(&db).await;
        mark_running(&db, id).await.unwrap();
        set_progress(&db, id, (Some(16010), 100, 0)).await.unwrap();
        finish(
            &db,
            id,
            StageStatus::Done,
            (Some(16010), 16010, 0),
            None,
            Some("{}"),
        )
        .await
        .unwrap();
        set_progress(&db, id, (Some(16010), 14682, 0))
            .await
            .unwrap();
        let row = get(db.pool(), id).await.unwrap();
        assert_eq!(row.status, StageStatus::Done);
        assert_eq!(
            (row.items_total, row.items_done, row.items_failed),
            (Some(16010), 16010, 0)
        );
    }

    #[tokio::test]
    async fn progress_is_recorded_while_running() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        let id = one_stage(&db).await;
        mark_running(&db, id).await.unwrap();
        set_progress(&db, id, (None, 7, 1)).await.unwrap();
        let row = get(db.pool(), id).await.unwrap();
        assert_eq!(
            (row.items_total, row.items_done, row.items_failed),
            (None, 7, 1)
        );
    }
}
