use std::path::PathBuf;

/// Errors of the job database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database file could not be opened or created.
    #[error("cannot open job database {}: {source}", .path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        source: sqlx::Error,
    },
    /// An inspection command was pointed at a file that does not exist.
    #[error("no job database at {} (pass --db, or run a pipeline first)", .0.display())]
    Missing(PathBuf),
    /// The schema could not be brought up to date.
    #[error("cannot migrate job database {}: {source}", .path.display())]
    Migrate {
        /// The database file.
        path: PathBuf,
        /// What went wrong.
        source: sqlx::migrate::MigrateError,
    },
    /// A run named by the user does not exist.
    #[error("no run named or numbered `{0}` in this database")]
    NoSuchRun(String),
    /// Another live process is executing the run.
    #[error("run `{run}` is being executed by process {pid}; wait for it or stop it first")]
    RunBusy {
        /// The run's name.
        run: String,
        /// The process holding it.
        pid: i64,
    },
    /// Any other SQLite error.
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    /// An SQLite error on the bulk-insert path (`bulk`).
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// A JSON column could not be encoded or decoded.
    #[error("malformed JSON in the job database: {0}")]
    Json(#[from] serde_json::Error),
}

impl DbError {
    pub(crate) fn open(path: &std::path::Path, source: sqlx::Error) -> Self {
        DbError::Open {
            path: path.to_path_buf(),
            source,
        }
    }
}
