//! Simulated tasks for demos and tests that need no real teacher (and never stand in
//! for one): task families with problems, reference answers and step-by-step working,
//! and a simulated R1 server that answers them over loopback HTTP.
//!
//! A `[teacher.NAME]` with `simulated = { task = "arithmetic", ... }` is served by
//! [`SimServer`], started by [`connect`](crate::connect) and reached through the same
//! [`OpenAiClient`](crate::OpenAiClient) as a real teacher. Its answers are synthetic,
//! deterministic from a seed, and wrong, language-mixed, truncated or duplicated at
//! configured rates so that every curation stage has something to remove. It is a
//! simulator for demos and tests, never a teacher.

pub mod arithmetic;
mod reply;
mod server;

use serde::{Deserialize, Serialize};

use crate::error::TeacherError;

pub use reply::{Sample, reply};
pub use server::SimServer;

/// The task family a simulated teacher answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SimTask {
    /// The multi-step integer word problems of [`arithmetic`].
    Arithmetic,
}

impl SimTask {
    /// The name used in configs and endpoint labels.
    pub fn as_str(self) -> &'static str {
        match self {
            SimTask::Arithmetic => "arithmetic",
        }
    }
}

/// Settings of a simulated teacher (`[teacher.NAME] simulated = {...}`): a simulator
/// for demos and tests, never a teacher.
///
/// Each rate is the probability, drawn independently per sample, that the sample has
/// that fault. They shape the samples, so they are part of the response-cache key and
/// of the generate stage's identity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedTeacher {
    /// Which problems it answers.
    pub task: SimTask,
    /// Seed of every random choice; the same seed gives the same samples.
    #[serde(default)]
    pub seed: u64,
    /// Share of samples with one arithmetic slip, so the boxed answer is wrong.
    #[serde(default)]
    pub wrong: f64,
    /// Share of samples with one or two reasoning lines in Chinese.
    #[serde(default)]
    pub mixed_language: f64,
    /// Share of samples cut off halfway through the reasoning (`finish_reason: length`).
    #[serde(default)]
    pub truncated: f64,
    /// Share of choices after the first that repeat the first choice exactly; needs
    /// `n > 1` requests (`supports_n = true`).
    #[serde(default)]
    pub duplicate: f64,
}

impl SimulatedTeacher {
    /// A simulator for `task` with seed 0 and no faults.
    pub fn new(task: SimTask) -> Self {
        Self {
            task,
            seed: 0,
            wrong: 0.0,
            mixed_language: 0.0,
            truncated: 0.0,
            duplicate: 0.0,
        }
    }

    /// Checks that every rate is a probability.
    pub fn validate(&self) -> Result<(), TeacherError> {
        for (name, v) in [
            ("wrong", self.wrong),
            ("mixed_language", self.mixed_language),
            ("truncated", self.truncated),
            ("duplicate", self.duplicate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(TeacherError::Config(format!(
                    "simulated.{name} must be a probability in [0, 1], not {v}"
                )));
            }
        }
        Ok(())
    }
}
