//! Stage kinds of the distill DAG, each behind the [`StageKind`] / [`Stage`] traits.
//!
//! A [`StageKind`] turns the parameters of a `[[stage]]` table into a runnable
//! [`Stage`], rejecting unknown keys, missing ones and wrong types with the field's
//! name. The executor (in `distill-pipeline`) fingerprints each stage from its
//! [`Stage::identity`], decides what to run, and calls [`Stage::run`] with a
//! [`StageContext`]. A stage writes one row per item of work inside a transaction,
//! so an interrupted stage resumes by doing only the missing items.

pub mod checkpoint_files;
pub mod cluster;
mod context;
pub mod curation;
pub mod device;
mod error;
pub mod evaluate;
pub mod export;
pub mod generate;
pub mod grpo;
pub mod hash;
pub mod import;
pub mod load;
mod params;
mod registry;
pub mod tabular;
#[cfg(feature = "test-stages")]
pub mod testing;
pub mod train;

pub use context::{Input, Progress, StageContext};
pub use error::{ParamError, StageError};
pub use params::parse_params;
pub use registry::{BuildEnv, Registry, RetryPolicy, Stage, StageKind};
