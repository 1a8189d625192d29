//! Errors of the trainer and the memory planner. Each names the field, file or step to look at.

use std::path::PathBuf;

use crate::error::StudentError;

/// Why training could not start, continue, save or resume.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Loading or saving model weights, config or tokenizer failed.
    #[error(transparent)]
    Student(#[from] StudentError),
    /// A training parameter is out of range.
    #[error("training config: field `{field}`: {message}")]
    Config {
        /// The [`crate::train::TrainConfig`] field (dotted for nested ones, `lora.rank`).
        field: String,
        /// What is wrong with its value.
        message: String,
    },
    /// Nothing is left to train on after the length rule.
    #[error("no trainable examples: {0}")]
    NoData(String),
    /// An example has a token id the model's vocabulary does not have.
    #[error("example {index}: token id {token} is outside the model's vocabulary ({vocab})")]
    TokenOutOfRange {
        /// Position of the example in the list given to the trainer.
        index: usize,
        /// The offending id.
        token: u32,
        /// The model's vocabulary size.
        vocab: usize,
    },
    /// A file or folder of a checkpoint could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A checkpoint folder is incomplete, corrupt or belongs to another run.
    #[error("{path}: {message}")]
    Checkpoint {
        /// The checkpoint file or folder.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Another training process failed, or the connection to it did.
    #[error(transparent)]
    Collective(#[from] super::collective::CollectiveError),
    /// The loss or the gradient norm stopped being finite; the update was not applied.
    #[error("step {step}: loss {loss} / gradient norm {grad_norm} is not finite (update skipped)")]
    NonFinite {
        /// The optimizer step (1-based) that failed.
        step: usize,
        /// Mean loss of the step.
        loss: f64,
        /// Global gradient norm before clipping.
        grad_norm: f64,
    },
}

/// Result alias of the trainer.
pub type TrainResult<T> = std::result::Result<T, TrainError>;

impl TrainError {
    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}
