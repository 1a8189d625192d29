use distill_db::DbError;

/// A stage's parameters were rejected; the message names the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ParamError {
    /// Dotted path of the offending field (`limit`, `rules.max_chars`, ...), or `*` for the table.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ParamError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Why a stage did not finish.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Stopped on request (Ctrl-C): what was committed stays, `resume` continues.
    #[error("interrupted")]
    Interrupted,
    /// An input file is unreadable or malformed; the message names file and line.
    #[error("{0}")]
    Input(String),
    /// The job database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Anything else that went wrong while running; retried when the stage allows.
    #[error("{0}")]
    Failed(String),
}

impl From<sqlx::Error> for StageError {
    fn from(e: sqlx::Error) -> Self {
        StageError::Db(DbError::Sqlx(e))
    }
}

impl StageError {
    /// Whether another attempt may succeed: bad input will not get better by itself.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StageError::Failed(_) | StageError::Db(_))
    }
}
