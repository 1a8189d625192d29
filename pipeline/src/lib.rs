//! Pipeline config, DAG executor and the `distill` command line.
//!
//! Data flows one way: a TOML config is parsed and validated ([`config`]), ordered
//! ([`dag`]), fingerprinted ([`fingerprint`]) and executed ([`executor`]) stage by
//! stage against the job database; [`report`] renders what the inspection commands
//! show.

pub mod cli;
pub mod config;
pub mod dag;
pub mod dataset;
pub mod executor;
pub mod fingerprint;
mod liveness;
mod logging;
pub mod model_cmd;
pub mod plot;
pub mod report;
