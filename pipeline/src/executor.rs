//! The DAG executor: reconciles a pipeline with the job database, then runs every
//! stage that is not done, concurrently where the DAG allows.
//!
//! Crash safety comes from the stages (each item commits in its own transaction)
//! and from the database being the only state: a killed process leaves stages
//! `running`, which the next `run`/`resume` treats as unfinished.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use distill_db::runs::{self, Run, RunStatus};
use distill_db::stages::{self, StageRow, StageSpec, StageStatus, SyncReport};
use distill_db::{Db, DbError};
use distill_stages::{Input, Progress, Stage, StageContext, StageError};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Pipeline;

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every stage is done.
    Done,
    /// These stages failed (name, error); stages downstream of them did not run.
    Failed(Vec<(String, String)>),
    /// Stopped on request; `resume` continues.
    Interrupted,
}

/// Why the executor could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The job database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A stage's code panicked: a bug, reported as such.
    #[error("a stage panicked (a bug in distill): {0}")]
    Panicked(String),
}

impl From<sqlx::Error> for ExecError {
    fn from(e: sqlx::Error) -> Self {
        ExecError::Db(DbError::Sqlx(e))
    }
}

/// How often the owner records that it is alive, and flushes progress counters.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Records the pipeline as run `pipeline.run.name` (creating or updating it), then
/// executes every unfinished stage. `cancel` stops it cleanly.
///
/// `fps` are the stages' fingerprints from [`crate::fingerprint::fingerprints`], computed before the
/// database is opened so that unreadable inputs change nothing.
pub async fn execute(
    db: &Db,
    pipeline: &Pipeline,
    fps: &[(String, serde_json::Value)],
    cancel: CancellationToken,
    bars: MultiProgress,
) -> Result<(Run, Outcome), ExecError> {
    let specs: Vec<StageSpec> = pipeline
        .stages
        .iter()
        .zip(fps)
        .enumerate()
        .map(|(i, (s, (fp, identity)))| StageSpec {
            name: s.name.clone(),
            kind: s.kind.clone(),
            position: i as i64,
            needs: serde_json::to_string(&s.needs).expect("strings serialise"),
            params: identity.to_string(),
            fingerprint: fp.clone(),
        })
        .collect();

    let pid = std::process::id() as i64;
    let mut tx = db.write().await?;
    let run = runs::upsert(
        &mut tx,
        &pipeline.run.name,
        &pipeline.path.display().to_string(),
        &pipeline.text,
        &pipeline.workdir.display().to_string(),
    )
    .await?;
    runs::claim(&mut tx, &run, pid, |owner| {
        crate::liveness::is_alive(owner, run.heartbeat_at)
    })
    .await?;
    let report = stages::sync(&mut tx, run.id, &specs).await?;
    tx.commit().await?;
    log_sync(&report);

    let heartbeat = {
        let db = db.clone();
        let run_id = run.id;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                if let Err(e) = runs::heartbeat(&db, run_id, pid).await {
                    warn!("cannot record heartbeat: {e}");
                }
            }
        })
    };
    let outcome = schedule(db, pipeline, &run, cancel, bars).await;
    heartbeat.abort();
    let outcome = outcome?;
    let status = match &outcome {
        Outcome::Done => RunStatus::Done,
        Outcome::Failed(_) => RunStatus::Failed,
        Outcome::Interrupted => RunStatus::Interrupted,
    };
    runs::release(db, run.id, pid, status).await?;
    let run = runs::find(db, &run.id.to_string()).await?;
    Ok((run, outcome))
}

fn log_sync(report: &SyncReport) {
    if !report.reset.is_empty() {
        info!(
            "changed since the last run, redone with everything downstream: {}",
            report.reset.join(", ")
        );
    }
    if !report.removed.is_empty() {
        info!(
            "no longer in the config, removed with their items: {}",
            report.removed.join(", ")
        );
    }
}

/// Runs ready stages until all are done, one fails with nothing else to do, or a
/// stop is requested.
async fn schedule(
    db: &Db,
    pipeline: &Pipeline,
    run: &Run,
    cancel: CancellationToken,
    bars: MultiProgress,
) -> Result<Outcome, ExecError> {
    let rows: HashMap<String, StageRow> = stages::list(db.pool(), run.id)
        .await?
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    let mut status: BTreeMap<String, StageStatus> = rows
        .values()
        .map(|r| {
            // Failed stages get a fresh try: that is what run/resume are for.
            let s = match r.status {
                StageStatus::Done => StageStatus::Done,
                _ => StageStatus::Pending,
            };
            (r.name.clone(), s)
        })
        .collect();
    let mut failures = Vec::new();
    let mut interrupted = false;
    let mut running: JoinSet<(String, StageResult)> = JoinSet::new();
    let artifacts_root = pipeline
        .workdir
        .join(&pipeline.run.artifacts)
        .join(&pipeline.run.name);

    loop {
        if !cancel.is_cancelled() {
            for planned in &pipeline.stages {
                let ready = status[&planned.name] == StageStatus::Pending
                    && planned.needs.iter().all(|n| status[n] == StageStatus::Done);
                if !ready {
                    continue;
                }
                status.insert(planned.name.clone(), StageStatus::Running);
                let row = &rows[&planned.name];
                let inputs = planned
                    .needs
                    .iter()
                    .map(|n| Input {
                        name: n.clone(),
                        kind: rows[n].kind.clone(),
                        stage_id: rows[n].id,
                    })
                    .collect();
                let job = StageJob {
                    db: db.clone(),
                    run_id: run.id,
                    row: row.clone(),
                    stage: planned.stage.clone(),
                    inputs,
                    workdir: pipeline.workdir.clone(),
                    artifacts: artifacts_root.join(&planned.name),
                    cancel: cancel.clone(),
                    bar: bars.add(new_bar(&planned.name)),
                };
                let name = planned.name.clone();
                running.spawn(async move { (name, job.run().await) });
            }
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        let (name, result) = match joined {
            Ok(r) => r,
            Err(e) => return Err(ExecError::Panicked(e.to_string())),
        };
        match result {
            StageResult::Done => {
                status.insert(name, StageStatus::Done);
            }
            StageResult::Interrupted => {
                interrupted = true;
                status.insert(name, StageStatus::Pending);
            }
            StageResult::Failed(err) => {
                status.insert(name.clone(), StageStatus::Failed);
                failures.push((name, err));
            }
            StageResult::DbError(e) => return Err(ExecError::Db(e)),
        }
    }

    if interrupted || (cancel.is_cancelled() && status.values().any(|s| *s != StageStatus::Done)) {
        Ok(Outcome::Interrupted)
    } else if !failures.is_empty() {
        Ok(Outcome::Failed(failures))
    } else {
        Ok(Outcome::Done)
    }
}

fn new_bar(name: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner:.green} {prefix:<14.bold} [{elapsed_precise}] {wide_bar:.cyan/blue} {pos}/{len} ({per_sec}, eta {eta}) {msg}",
        )
        .expect("valid template")
        .progress_chars("█▉▊▋▌▍▎▏ "),
    );
    bar.set_prefix(name.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

enum StageResult {
    Done,
    Interrupted,
    Failed(String),
    DbError(DbError),
}

/// Test builds only: `DISTILL_TEST_SIGKILL_AT=STAGE` makes the process SIGKILL itself
/// as soon as that stage is marked running, so tests can crash a run at any stage,
/// however short the stage is.
#[cfg(feature = "test-stages")]
fn crash_point(stage: &str) {
    if std::env::var("DISTILL_TEST_SIGKILL_AT").is_ok_and(|s| s == stage) {
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// One stage's execution, with its retries.
struct StageJob {
    db: Db,
    run_id: i64,
    row: StageRow,
    stage: Arc<dyn Stage>,
    inputs: Vec<Input>,
    workdir: PathBuf,
    artifacts: PathBuf,
    cancel: CancellationToken,
    bar: ProgressBar,
}

impl StageJob {
    async fn run(self) -> StageResult {
        match self.attempts().await {
            Ok(r) => r,
            Err(e) => StageResult::DbError(e),
        }
    }

    async fn attempts(&self) -> Result<StageResult, DbError> {
        let policy = self.stage.retry_policy();
        let name = &self.row.name;
        let mut tries = 0u32;
        loop {
            tries += 1;
            let attempt = stages::mark_running(&self.db, self.row.id).await?;
            info!(stage = %name, kind = %self.row.kind, attempt, "stage started");
            #[cfg(feature = "test-stages")]
            crash_point(name);
            let started = Instant::now();
            let progress = Progress::new(self.bar.clone());
            let ctx = StageContext {
                db: self.db.clone(),
                run_id: self.run_id,
                stage_id: self.row.id,
                stage_name: name.clone(),
                attempt: attempt as u32,
                inputs: self.inputs.clone(),
                workdir: self.workdir.clone(),
                artifacts: self.artifacts.clone(),
                cancel: self.cancel.clone(),
                progress: progress.clone(),
            };
            let flusher = Flusher::spawn(self.db.clone(), self.row.id, progress.clone());
            let result = self.stage.run(&ctx).await;
            // Joined, not aborted: a write it already handed to SQLite finishes first.
            flusher.stop().await;
            let counts = progress.snapshot();
            let secs = started.elapsed().as_secs_f64();
            match result {
                Ok(summary) => {
                    let summary = summary.to_string();
                    stages::finish(
                        &self.db,
                        self.row.id,
                        StageStatus::Done,
                        counts,
                        None,
                        Some(&summary),
                    )
                    .await?;
                    self.bar.finish_and_clear();
                    info!(stage = %name, "stage done in {secs:.1}s: {summary}");
                    return Ok(StageResult::Done);
                }
                Err(StageError::Interrupted) => {
                    stages::finish(
                        &self.db,
                        self.row.id,
                        StageStatus::Pending,
                        counts,
                        None,
                        None,
                    )
                    .await?;
                    self.bar.abandon();
                    info!(stage = %name, "stage interrupted after {secs:.1}s; `distill resume` continues it");
                    return Ok(StageResult::Interrupted);
                }
                Err(e) => {
                    let msg = e.to_string();
                    stages::finish(
                        &self.db,
                        self.row.id,
                        StageStatus::Failed,
                        counts,
                        Some(&msg),
                        None,
                    )
                    .await?;
                    if e.is_retryable()
                        && tries < policy.max_attempts
                        && !self.cancel.is_cancelled()
                    {
                        let wait = policy.backoff(tries + 1);
                        warn!(stage = %name, "attempt {attempt} failed: {msg}; retrying in {wait:?}");
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => continue,
                            _ = self.cancel.cancelled() => {
                                self.bar.abandon();
                                return Ok(StageResult::Interrupted);
                            }
                        }
                    }
                    self.bar.abandon();
                    warn!(stage = %name, "stage failed: {msg}");
                    return Ok(StageResult::Failed(msg));
                }
            }
        }
    }
}

/// Writes a running stage's counters to the database every heartbeat, so that
/// `distill status` from another process sees progress.
struct Flusher {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Flusher {
    fn spawn(db: Db, stage_id: i64, progress: Progress) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                loop {
                    // Only the wait is cancellable; a write, once started, completes.
                    tokio::select! {
                        _ = tokio::time::sleep(HEARTBEAT) => {}
                        _ = stop.cancelled() => return,
                    }
                    if let Err(e) = stages::set_progress(&db, stage_id, progress.snapshot()).await {
                        warn!("cannot record progress: {e}");
                    }
                }
            }
        });
        Flusher { stop, task }
    }

    /// Stops the flusher and waits for any write in progress to complete.
    async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            warn!("progress flusher ended abnormally: {e}");
        }
    }
}
