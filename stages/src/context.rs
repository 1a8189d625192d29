use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use distill_db::Db;
use indicatif::ProgressBar;
use tokio_util::sync::CancellationToken;

use crate::StageError;

/// An upstream stage this one needs.
#[derive(Debug, Clone)]
pub struct Input {
    /// Its name in the config.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// Its row id, which its items reference.
    pub stage_id: i64,
}

/// Everything a running stage may use.
#[derive(Debug, Clone)]
pub struct StageContext {
    /// The job database.
    pub db: Db,
    /// The run being executed.
    pub run_id: i64,
    /// This stage's row id; its items reference it.
    pub stage_id: i64,
    /// This stage's name.
    pub stage_name: String,
    /// Attempt number under the current fingerprint, from 1.
    pub attempt: u32,
    /// Upstream stages, in the order of `needs`.
    pub inputs: Vec<Input>,
    /// Directory that relative paths resolve against.
    pub workdir: PathBuf,
    /// This stage's own folder under the run's artifacts (created on demand).
    pub artifacts: PathBuf,
    /// Cancelled on Ctrl-C: stop starting items, let in-flight ones commit, return
    /// [`StageError::Interrupted`].
    pub cancel: CancellationToken,
    /// Item counters shown by the progress bar and stored for `status`.
    pub progress: Progress,
}

impl StageContext {
    /// Fails with [`StageError::Interrupted`] once a stop was requested.
    pub fn check_cancelled(&self) -> Result<(), StageError> {
        if self.cancel.is_cancelled() {
            Err(StageError::Interrupted)
        } else {
            Ok(())
        }
    }

    /// The single upstream stage, for kinds that take exactly one input.
    pub fn single_input(&self) -> Result<&Input, StageError> {
        match self.inputs.as_slice() {
            [one] => Ok(one),
            other => Err(StageError::Failed(format!(
                "stage `{}` needs exactly one input, has {}",
                self.stage_name,
                other.len()
            ))),
        }
    }
}

/// Item counters of a running stage: drawn by its progress bar and flushed to the
/// database by the executor, so `distill status` in another terminal sees them.
#[derive(Debug, Clone)]
pub struct Progress {
    inner: Arc<Counters>,
    bar: ProgressBar,
}

#[derive(Debug, Default)]
struct Counters {
    total: AtomicI64,
    done: AtomicI64,
    failed: AtomicI64,
}

impl Progress {
    /// Counters drawn on `bar` (a hidden bar draws nothing).
    pub fn new(bar: ProgressBar) -> Self {
        let inner = Arc::new(Counters::default());
        inner.total.store(-1, Ordering::Relaxed);
        Self { inner, bar }
    }

    /// Counters with no bar, for tests.
    pub fn hidden() -> Self {
        Self::new(ProgressBar::hidden())
    }

    /// Sets how many items the stage will produce.
    pub fn set_total(&self, total: u64) {
        self.inner.total.store(total as i64, Ordering::Relaxed);
        self.bar.set_length(total);
    }

    /// Sets the count of items already done (resuming).
    pub fn set_done(&self, done: u64) {
        self.inner.done.store(done as i64, Ordering::Relaxed);
        self.bar.set_position(done);
    }

    /// Counts `n` more items done.
    pub fn inc(&self, n: u64) {
        self.inner.done.fetch_add(n as i64, Ordering::Relaxed);
        self.bar.inc(n);
    }

    /// Counts `n` more items failed (recorded and left for the next resume).
    pub fn inc_failed(&self, n: u64) {
        self.inner.failed.fetch_add(n as i64, Ordering::Relaxed);
    }

    /// Shows a short message beside the bar.
    pub fn set_message(&self, msg: impl Into<std::borrow::Cow<'static, str>>) {
        self.bar.set_message(msg);
    }

    /// `(total, done, failed)`; total is `None` until known.
    pub fn snapshot(&self) -> (Option<i64>, i64, i64) {
        let total = self.inner.total.load(Ordering::Relaxed);
        (
            (total >= 0).then_some(total),
            self.inner.done.load(Ordering::Relaxed),
            self.inner.failed.load(Ordering::Relaxed),
        )
    }

    /// The bar, for the executor to finish or clear.
    pub fn bar(&self) -> &ProgressBar {
        &self.bar
    }
}
