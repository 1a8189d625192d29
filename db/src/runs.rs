//! Runs: one per pipeline name, holding the config it was last started with.

use serde::Serialize;
use sqlx::{FromRow, SqliteExecutor};

use crate::{Db, DbError, Result, WriteTx, now_ms};

/// Lifecycle of a run as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, sqlx::Type)]
#[sqlx(type_name = "TEXT", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// A process is (or was, until it crashed) executing the run.
    Running,
    /// Every stage finished.
    Done,
    /// A stage failed after its retries.
    Failed,
    /// Stopped on request (Ctrl-C); `resume` continues it.
    Interrupted,
}

/// A row of `runs`.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Run {
    /// Numeric id, accepted wherever a run name is.
    pub id: i64,
    /// The `[run].name` of the config.
    pub name: String,
    /// The config file the run was last started from.
    pub config_path: String,
    /// The config text, so that `resume` does not depend on the file.
    pub config: String,
    /// Directory that relative paths in the config resolve against.
    pub workdir: String,
    /// Lifecycle state.
    pub status: RunStatus,
    /// Process executing the run, if any.
    pub owner_pid: Option<i64>,
    /// Last sign of life of that process (unix ms).
    pub heartbeat_at: Option<i64>,
    /// Creation time (unix ms).
    pub created_at: i64,
    /// Last change (unix ms).
    pub updated_at: i64,
}

const COLUMNS: &str = "id, name, config_path, config, workdir, status, owner_pid, heartbeat_at, \
                       created_at, updated_at";

/// Finds a run by numeric id or by name.
pub async fn find(db: &Db, key: &str) -> Result<Run> {
    let by_id = match key.parse::<i64>() {
        Ok(id) => {
            sqlx::query_as::<_, Run>(&format!("SELECT {COLUMNS} FROM runs WHERE id = ?"))
                .bind(id)
                .fetch_optional(db.pool())
                .await?
        }
        Err(_) => None,
    };
    match by_id {
        Some(run) => Ok(run),
        None => find_by_name(db.pool(), key)
            .await?
            .ok_or_else(|| DbError::NoSuchRun(key.to_string())),
    }
}

/// Finds a run by name.
pub async fn find_by_name<'e>(ex: impl SqliteExecutor<'e>, name: &str) -> Result<Option<Run>> {
    Ok(
        sqlx::query_as::<_, Run>(&format!("SELECT {COLUMNS} FROM runs WHERE name = ?"))
            .bind(name)
            .fetch_optional(ex)
            .await?,
    )
}

/// The most recently started run, if any.
pub async fn latest(db: &Db) -> Result<Option<Run>> {
    Ok(sqlx::query_as::<_, Run>(&format!(
        "SELECT {COLUMNS} FROM runs ORDER BY updated_at DESC, id DESC LIMIT 1"
    ))
    .fetch_optional(db.pool())
    .await?)
}

/// Every run, newest first.
pub async fn list(db: &Db) -> Result<Vec<Run>> {
    Ok(sqlx::query_as::<_, Run>(&format!(
        "SELECT {COLUMNS} FROM runs ORDER BY updated_at DESC, id DESC"
    ))
    .fetch_all(db.pool())
    .await?)
}

/// Creates the run `name`, or points the existing one at a new config text.
pub async fn upsert(
    tx: &mut WriteTx,
    name: &str,
    config_path: &str,
    config: &str,
    workdir: &str,
) -> Result<Run> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO runs (name, config_path, config, workdir, status, created_at, updated_at)
         VALUES (?, ?, ?, ?, 'running', ?, ?)
         ON CONFLICT (name) DO UPDATE SET config_path = excluded.config_path,
             config = excluded.config, workdir = excluded.workdir, updated_at = excluded.updated_at",
    )
    .bind(name)
    .bind(config_path)
    .bind(config)
    .bind(workdir)
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(find_by_name(&mut **tx, name)
        .await?
        .expect("row inserted in this transaction"))
}

/// Makes `pid` the run's owner, unless another live process already is.
///
/// `is_alive` tells whether a recorded owner still exists; a crashed owner
/// (killed, power loss) leaves its pid behind, which must not lock the run forever.
pub async fn claim(
    tx: &mut WriteTx,
    run: &Run,
    pid: i64,
    is_alive: impl Fn(i64) -> bool,
) -> Result<()> {
    let current: Option<i64> = sqlx::query_scalar("SELECT owner_pid FROM runs WHERE id = ?")
        .bind(run.id)
        .fetch_one(&mut **tx)
        .await?;
    if let Some(owner) = current
        && owner != pid
        && is_alive(owner)
    {
        return Err(DbError::RunBusy {
            run: run.name.clone(),
            pid: owner,
        });
    }
    let now = now_ms();
    sqlx::query(
        "UPDATE runs SET owner_pid = ?, heartbeat_at = ?, status = 'running', updated_at = ?
         WHERE id = ?",
    )
    .bind(pid)
    .bind(now)
    .bind(now)
    .bind(run.id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Records that the owner is still alive.
pub async fn heartbeat(db: &Db, run_id: i64, pid: i64) -> Result<()> {
    sqlx::query("UPDATE runs SET heartbeat_at = ? WHERE id = ? AND owner_pid = ?")
        .bind(now_ms())
        .bind(run_id)
        .bind(pid)
        .execute(db.pool())
        .await?;
    Ok(())
}

/// Gives up ownership and records how the run ended.
pub async fn release(db: &Db, run_id: i64, pid: i64, status: RunStatus) -> Result<()> {
    let now = now_ms();
    sqlx::query(
        "UPDATE runs SET owner_pid = NULL, heartbeat_at = NULL, status = ?, updated_at = ?
         WHERE id = ? AND owner_pid = ?",
    )
    .bind(status)
    .bind(now)
    .bind(run_id)
    .bind(pid)
    .execute(db.pool())
    .await?;
    Ok(())
}
