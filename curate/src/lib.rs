//! Pure curation algorithms for distill: answer verification, trace filters,
//! near-duplicate detection and benchmark decontamination.
//!
//! No I/O, no database, no async: the stages crate feeds these functions rows
//! and persists what they return, so each algorithm can be tested and
//! benchmarked on its own.

#![warn(missing_docs)]

pub mod decontaminate;
pub mod dedupe;
pub mod error;
pub mod filter;
pub mod verify;

pub use error::CurateError;
