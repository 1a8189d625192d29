use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{ParamError, StageContext, StageError};

/// What a stage kind may consult while validating its parameters.
#[derive(Debug, Clone)]
pub struct BuildEnv {
    /// Directory that relative paths resolve against.
    pub workdir: PathBuf,
    /// The `[teacher.*]` endpoints of the config, validated.
    pub teachers: BTreeMap<String, distill_teacher::TeacherConfig>,
    /// Every stage of the config: name → kind.
    pub stages: BTreeMap<String, String>,
    /// The stages this one needs, with their kinds, in config order.
    pub needs: Vec<(String, String)>,
}

impl BuildEnv {
    /// Resolves a path from the config against the working directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.workdir.join(path)
        }
    }
}

/// How the executor retries a failed stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 means no retry.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles after each further failure.
    pub initial_backoff: Duration,
}

impl RetryPolicy {
    /// Run once; a failure is final until the user resumes.
    pub const NONE: RetryPolicy = RetryPolicy {
        max_attempts: 1,
        initial_backoff: Duration::ZERO,
    };

    /// Delay before attempt `attempt` (2 = first retry), capped at five minutes.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(2).min(16);
        (self.initial_backoff * 2u32.pow(doublings)).min(Duration::from_secs(300))
    }
}

/// A kind of stage (`load`, `generate`, ...): validates parameters into a [`Stage`].
pub trait StageKind: Send + Sync + 'static {
    /// The `kind = "..."` name.
    fn name(&self) -> &'static str;
    /// One line for `--help` and `validate`.
    fn about(&self) -> &'static str;
    /// Version of the stage's code: bump it when the same parameters would now produce
    /// different items, so that fingerprints change and finished work is redone.
    fn version(&self) -> u32;
    /// Parses and checks the stage's parameters (the table without name, kind and needs).
    fn build(&self, params: toml::Table, env: &BuildEnv) -> Result<Arc<dyn Stage>, ParamError>;
}

/// A configured stage, ready to run.
#[async_trait]
pub trait Stage: Send + Sync + std::fmt::Debug {
    /// What identifies this stage's output besides its kind, code version and upstream:
    /// its resolved parameters (defaults filled in, so spelling out a default does not
    /// rerun anything) and the content of any input it reads.
    fn identity(&self) -> Result<serde_json::Value, StageError>;

    /// Checks what the stage needs from this machine rather than from its config: model
    /// folders on disk, a CUDA build. `run` calls it before fingerprinting (so a missing
    /// model fails the run with the database untouched); `validate` reports it as a
    /// warning, so a recipe can be checked before its models are downloaded.
    fn preflight(&self) -> Result<(), StageError> {
        Ok(())
    }

    /// Things a user should know about how the stage will run that the config does not
    /// spell out (a default it chose, say); `validate` prints them.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }

    /// How the executor retries it; stages declare themselves retryable.
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::NONE
    }

    /// Does the stage's work, skipping items already recorded. Returns a JSON summary
    /// shown by `status`.
    async fn run(&self, ctx: &StageContext) -> Result<serde_json::Value, StageError>;
}

/// The stage kinds a binary offers.
pub struct Registry {
    kinds: BTreeMap<&'static str, Box<dyn StageKind>>,
}

impl Registry {
    /// Every stage kind distill ships (plus the test-only ones when built for tests).
    pub fn builtin() -> Self {
        let mut r = Registry {
            kinds: BTreeMap::new(),
        };
        r.register(Box::new(crate::load::LoadKind));
        r.register(Box::new(crate::generate::GenerateKind));
        r.register(Box::new(crate::import::ImportKind));
        r.register(Box::new(crate::curation::verify::VerifyKind));
        r.register(Box::new(crate::curation::filter::FilterKind));
        r.register(Box::new(crate::curation::dedupe::DedupeKind));
        r.register(Box::new(crate::curation::decontaminate::DecontaminateKind));
        r.register(Box::new(crate::evaluate::EvaluateKind));
        r.register(Box::new(crate::train::TrainKind));
        r.register(Box::new(crate::grpo::GrpoKind));
        r.register(Box::new(crate::export::ExportKind));
        #[cfg(feature = "test-stages")]
        crate::testing::register(&mut r);
        r
    }

    /// Adds a kind, replacing any of the same name.
    pub fn register(&mut self, kind: Box<dyn StageKind>) {
        self.kinds.insert(kind.name(), kind);
    }

    /// Looks a kind up by name.
    pub fn get(&self, name: &str) -> Option<&dyn StageKind> {
        self.kinds.get(name).map(|k| k.as_ref())
    }

    /// All kinds, by name.
    pub fn kinds(&self) -> impl Iterator<Item = &dyn StageKind> {
        self.kinds.values().map(|k| k.as_ref())
    }
}
