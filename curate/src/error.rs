//! Errors for configuration that cannot work; the algorithms themselves are
//! total over their inputs.

use thiserror::Error;

/// A rejected parameter or configuration value.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CurateError {
    /// A filter setting is out of range (e.g. a share above 1).
    #[error("invalid filter config: {0}")]
    InvalidFilterConfig(String),
    /// MinHash/LSH/n-gram parameters that cannot work together.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
}
