//! The job database: one SQLite file holding every run, stage and item of work.
//!
//! The database is the source of truth for resumability: a stage writes each item
//! inside a write transaction, so after a crash an item is either fully recorded
//! or absent. This crate knows nothing of Burn or HTTP; it only stores rows.
//!
//! Connections use WAL (readers never block the writer), a busy timeout (several
//! processes may inspect a running job), foreign keys, and `BEGIN IMMEDIATE` for
//! writes so that two writers fail fast on the lock instead of deadlocking on an
//! upgrade from a read transaction.

mod bulk;
mod error;
pub mod evals;
pub mod generations;
pub mod grpo;
pub mod prompts;
pub mod runs;
pub mod stages;
pub mod training;
pub mod verdicts;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

pub use bulk::BulkWriter;
pub use error::DbError;

/// Result type of this crate.
pub type Result<T, E = DbError> = std::result::Result<T, E>;

/// A write transaction opened with `BEGIN IMMEDIATE`; dropped without `commit` it rolls back.
pub type WriteTx = Transaction<'static, Sqlite>;

/// How long a connection waits for another process's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A handle on the job database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Db {
    pool: SqlitePool,
    path: PathBuf,
}

impl Db {
    /// Opens the database at `path`, creating it and applying migrations as needed.
    pub async fn open(path: &Path) -> Result<Self> {
        Self::connect(path, true).await
    }

    /// Opens an existing database; a missing file is an error rather than a new empty database,
    /// because inspection commands pointed at the wrong path should say so.
    pub async fn open_existing(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(DbError::Missing(path.to_path_buf()));
        }
        Self::connect(path, false).await
    }

    async fn connect(path: &Path, create: bool) -> Result<Self> {
        let url = format!("sqlite://{}", path.display());
        let options = SqliteConnectOptions::from_str(&url)
            .map_err(|e| DbError::open(path, e))?
            .create_if_missing(create)
            // Reasoning traces are kilobytes each: with SQLite's default 4 KB pages a 2 KB
            // trace took a page of its own (915 MB for a 348 MB import, written twice
            // through the WAL); 16 KB pages hold seven. Only a new database takes it.
            .page_size(16384)
            // 64 MiB of page cache (default 2 MiB): a long write transaction (an import)
            // spills and rewrites far fewer pages.
            .pragma("cache_size", "-65536")
            // Statement journals (a multi-row INSERT inside a transaction keeps one) in memory
            // rather than in a temporary file: 4% of an import's time went to writing them.
            .pragma("temp_store", "memory")
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(|e| DbError::open(path, e))?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| DbError::Migrate {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            pool,
            path: path.to_path_buf(),
        })
    }

    /// The underlying pool, for read queries.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The file this database lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts a write transaction with `BEGIN IMMEDIATE`.
    pub async fn write(&self) -> Result<WriteTx> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Closes every connection, checkpointing the WAL into the main file.
    pub async fn close(self) {
        self.pool.close().await;
    }
}

/// Milliseconds since the Unix epoch: the time unit of every timestamp column.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn opens_with_wal_and_foreign_keys() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(fk, 1);
        // New databases hold ~2 KB traces several to a page (4 KB pages held one each).
        let page: i64 = sqlx::query_scalar("PRAGMA page_size")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(page, 16384);
    }

    #[tokio::test]
    async fn open_existing_refuses_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.db");
        let err = Db::open_existing(&path).await.unwrap_err();
        assert!(err.to_string().contains("absent.db"), "{err}");
        assert!(!path.exists());
    }
}
