//! One error type for the crate. Every variant names what a person must look at to fix it: the file,
//! the tensor, the config field or the data line.

use std::path::{Path, PathBuf};

/// Errors from loading, saving, tokenising and running student models.
#[derive(Debug, thiserror::Error)]
pub enum StudentError {
    /// A file could not be read, written or memory-mapped.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file is not valid JSON.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file that failed to parse.
        path: PathBuf,
        /// The parser's error (with line and column).
        source: serde_json::Error,
    },
    /// A config field is missing, has the wrong type or an unsupported value.
    #[error("{path}: field `{field}`: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The field, dotted for nested ones (`rope_scaling.factor`).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A safetensors file is truncated or otherwise unreadable.
    #[error("{path}: corrupt safetensors file: {message}")]
    CorruptWeights {
        /// The weights file.
        path: PathBuf,
        /// The parser's complaint.
        message: String,
    },
    /// The checkpoint lacks a tensor the architecture needs.
    #[error("{dir}: missing tensor `{name}` (expected shape {expected:?})")]
    MissingTensor {
        /// The checkpoint folder.
        dir: PathBuf,
        /// HF tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// The checkpoint has a tensor the architecture does not use.
    #[error(
        "{path}: unexpected tensor `{name}` with shape {shape:?} (not part of this architecture)"
    )]
    UnexpectedTensor {
        /// The file holding it.
        path: PathBuf,
        /// HF tensor name.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A tensor's shape disagrees with the config.
    #[error("{path}: tensor `{name}` has shape {found:?}, config implies {expected:?}")]
    ShapeMismatch {
        /// The file holding it.
        path: PathBuf,
        /// HF tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype we cannot convert (e.g. an integer or fp8 type).
    #[error("{path}: tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The file holding it.
        path: PathBuf,
        /// HF tensor name.
        name: String,
        /// The dtype as safetensors names it.
        dtype: String,
    },
    /// `tokenizer.json` could not be loaded, or encoding/decoding failed.
    #[error("{path}: tokenizer: {message}")]
    Tokenizer {
        /// The tokenizer file (or folder).
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The chat template failed to compile or render (includes `raise_exception` messages).
    #[error("chat template ({source_name}): {message}")]
    Template {
        /// Where the template came from (`tokenizer_config.json` or `chat_template.jinja`).
        source_name: String,
        /// Minijinja's error, with the template line where it has one.
        message: String,
    },
    /// A line of a data file is unusable.
    #[error("{path}:{line}: {message}")]
    Data {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line (names the field).
        message: String,
    },
    /// Invalid arguments to generation or evaluation.
    #[error("{0}")]
    InvalidArgument(String),
}

/// Result alias used throughout the crate.
pub type Result<T, E = StudentError> = std::result::Result<T, E>;

impl StudentError {
    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub(crate) fn config(
        path: impl AsRef<Path>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Config {
            path: path.as_ref().to_path_buf(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Reads and parses a JSON file, naming the file in either failure.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| StudentError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| StudentError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes pretty JSON with a trailing newline, as `save_pretrained` does.
pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values always serialise");
    text.push('\n');
    std::fs::write(path, text).map_err(|e| StudentError::io(path, e))
}
