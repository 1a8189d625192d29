//! Bulk inserts on the connection's own SQLite handle.
//!
//! An import writes hundreds of thousands of rows, thousands per transaction. Through
//! sqlx each row's values are copied into owned arguments and sent to the connection's worker
//! thread, and a multi-row `INSERT` makes SQLite keep a statement journal (a copy of
//! every page the statement touches, so the statement alone can be undone). Here the
//! transaction's connection lends its raw handle (`lock_handle`; its worker waits
//! meanwhile) to rusqlite, which steps one prepared single-row `INSERT` per row on this
//! thread: no copies but SQLite's own, and no statement journal. sqlx has no bulk-insert
//! API of its own, so this is the one place that drops below it.

use rusqlite::Connection;
use sqlx::pool::PoolConnection;
use sqlx::{Sqlite, Transaction};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{Db, Result};

/// Runs `f` with a rusqlite connection on the transaction's handle. `f` runs on this
/// thread and blocks it (other tasks of a multi-threaded runtime go on elsewhere):
/// callers pass it a bounded batch (an import's chunk, about 0.1 s of inserts).
pub(crate) async fn with_handle<T>(
    tx: &mut Transaction<'_, Sqlite>,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> Result<T> {
    let mut locked = tx.lock_handle().await?;
    // SAFETY: the handle stays valid and unused by sqlx while `locked` lives (the
    // connection's worker waits on it); `from_handle` does not take ownership, so dropping
    // `conn` finalizes only the statements prepared here and leaves the handle open.
    let conn = unsafe { Connection::from_handle(locked.as_raw_handle().as_ptr()) }?;
    let out = f(&conn);
    drop(conn);
    Ok(out?)
}

/// A connection for one long series of write transactions (an import's chunks) whose WAL
/// checkpoints run beside it instead of inside its commits.
///
/// SQLite checkpoints in the committing connection once the WAL passes 1,000 pages: a
/// commit of a few hundred MB then waited a second while every page was copied into the
/// database file and both files were synced. Here the writer's automatic checkpoints are
/// off, and after each commit a task on another pooled connection runs a `PASSIVE`
/// checkpoint (it never blocks the writer); the writer's next transaction then restarts
/// the WAL from its start, so the WAL stays a few chunks long.
pub struct BulkWriter {
    conn: Option<PoolConnection<Sqlite>>,
    /// Wakes the checkpointer (one pending wake-up at most); dropping it stops the task.
    wake: Option<mpsc::Sender<()>>,
    checkpointer: Option<JoinHandle<()>>,
}

/// The WAL size (pages) at which SQLite checkpoints by default, restored on `finish`.
const AUTOCHECKPOINT_PAGES: u32 = 1000;

impl BulkWriter {
    /// Takes a connection from `db`'s pool and starts its checkpointer.
    pub async fn new(db: &Db) -> Result<Self> {
        let mut conn = db.pool().acquire().await?;
        sqlx::query("PRAGMA wal_autocheckpoint = 0")
            .execute(&mut *conn)
            .await?;
        let (wake, mut woken) = mpsc::channel::<()>(1);
        let pool = db.pool().clone();
        let checkpointer = tokio::spawn(async move {
            while woken.recv().await.is_some() {
                // Busy (another checkpoint, or a reader on an old snapshot) is not an
                // error: the next wake-up, or SQLite's own checkpoints later, catch up.
                if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&pool)
                    .await
                {
                    tracing::debug!("background WAL checkpoint: {e}");
                }
            }
        });
        Ok(Self {
            conn: Some(conn),
            wake: Some(wake),
            checkpointer: Some(checkpointer),
        })
    }

    /// Starts a write transaction (`BEGIN IMMEDIATE`) on the writer's connection.
    pub async fn begin(&mut self) -> Result<Transaction<'_, Sqlite>> {
        let conn = self.conn.as_mut().expect("connection kept until finish");
        Ok(sqlx::Connection::begin_with(&mut **conn, "BEGIN IMMEDIATE").await?)
    }

    /// Has the checkpointer copy into the database file what the last commit wrote; call
    /// after each commit of a transaction from `begin`.
    pub fn committed(&self) {
        if let Some(wake) = &self.wake {
            // Full: a wake-up is already pending, and it will see this commit too.
            let _ = wake.try_send(());
        }
    }

    /// Stops the checkpointer and gives the connection back with SQLite's automatic
    /// checkpoints on again (the next commit on any connection checkpoints what is left).
    pub async fn finish(mut self) -> Result<()> {
        self.wake = None;
        if let Some(task) = self.checkpointer.take() {
            let _ = task.await;
        }
        if let Some(mut conn) = self.conn.take() {
            sqlx::query(&format!(
                "PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES}"
            ))
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}

impl Drop for BulkWriter {
    fn drop(&mut self) {
        // The checkpointer ends by itself once `wake` is dropped. Not finished (an error, a
        // cancellation): the connection is closed rather than returned to the pool with its
        // automatic checkpoints off.
        if let Some(mut conn) = self.conn.take() {
            conn.close_on_drop();
        }
    }
}
