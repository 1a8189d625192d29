//! What the inspection commands print: each report is one serialisable struct
//! (the `--json` form) with a `render` for people.

use std::fmt::Write;

use distill_db::runs::Run;
use distill_db::stages::{self, StageRow, StageStatus};
use distill_db::{Db, generations, now_ms, runs};
use distill_stages::generate::GENERATION_KINDS;
use serde::Serialize;
use serde_json::Value;

use crate::config::Pipeline;

/// `distill status`: a run and its stages.
#[derive(Debug, Serialize)]
pub struct RunStatusReport {
    /// The run.
    pub run: RunInfo,
    /// Its stages in topological order.
    pub stages: Vec<StageInfo>,
}

/// A run, without its config text.
#[derive(Debug, Serialize)]
pub struct RunInfo {
    /// Numeric id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// running, done, failed or interrupted.
    pub status: runs::RunStatus,
    /// Config file it was last started from.
    pub config_path: String,
    /// Process executing it, if any.
    pub owner_pid: Option<i64>,
    /// Creation time (unix ms).
    pub created_at: i64,
    /// Last change (unix ms).
    pub updated_at: i64,
}

impl From<Run> for RunInfo {
    fn from(r: Run) -> Self {
        RunInfo {
            id: r.id,
            name: r.name,
            status: r.status,
            config_path: r.config_path,
            owner_pid: r.owner_pid,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// A stage as `status` shows it.
#[derive(Debug, Serialize)]
pub struct StageInfo {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: String,
    /// Stages it needs.
    pub needs: Vec<String>,
    /// pending, running, done or failed.
    pub status: StageStatus,
    /// Attempts under the current fingerprint.
    pub attempts: i64,
    /// Last error.
    pub error: Option<String>,
    /// Items it will produce, when known.
    pub items_total: Option<i64>,
    /// Items produced.
    pub items_done: i64,
    /// Items that failed and wait for a resume.
    pub items_failed: i64,
    /// Time spent, over all attempts, including the current one.
    pub elapsed_ms: i64,
    /// Items per second in the current attempt (running stages).
    pub rate_per_s: Option<f64>,
    /// Estimated seconds to finish (running stages with a known total).
    pub eta_s: Option<f64>,
    /// The stage's own summary, when done.
    pub summary: Option<Value>,
    /// Fingerprint of parameters, inputs, code and upstream.
    pub fingerprint: String,
    /// Kind-specific figures (for `generate`: samples, failures, cache hits, tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
}

impl StageInfo {
    fn from_row(r: StageRow, now: i64) -> Self {
        let running_ms = match (r.status, r.started_at) {
            (StageStatus::Running, Some(t)) => (now - t).max(0),
            _ => 0,
        };
        let rate = (running_ms > 0 && r.items_done > 0)
            .then(|| r.items_done as f64 / (running_ms as f64 / 1000.0));
        let eta = match (rate, r.items_total) {
            (Some(rate), Some(total)) if rate > 0.0 => {
                Some(((total - r.items_done).max(0)) as f64 / rate)
            }
            _ => None,
        };
        StageInfo {
            needs: serde_json::from_str(&r.needs).unwrap_or_default(),
            summary: r
                .summary
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok()),
            name: r.name,
            kind: r.kind,
            status: r.status,
            attempts: r.attempts,
            error: r.error,
            items_total: r.items_total,
            items_done: r.items_done,
            items_failed: r.items_failed,
            elapsed_ms: r.elapsed_ms + running_ms,
            rate_per_s: rate,
            eta_s: eta,
            fingerprint: r.fingerprint,
            detail: None,
        }
    }
}

impl RunStatusReport {
    /// Reads a run's stages.
    pub async fn load(db: &Db, run: Run) -> distill_db::Result<Self> {
        let now = now_ms();
        let mut stages = Vec::new();
        for row in stages::list(db.pool(), run.id).await? {
            let id = row.id;
            let mut info = StageInfo::from_row(row, now);
            if GENERATION_KINDS.contains(&info.kind.as_str()) {
                let t = generations::totals(db.pool(), id).await?;
                info.detail = Some(serde_json::to_value(t).unwrap_or(Value::Null));
            }
            stages.push(info);
        }
        Ok(Self {
            run: run.into(),
            stages,
        })
    }

    /// A table for people.
    pub fn render(&self) -> String {
        let r = &self.run;
        let mut out = format!(
            "run {} (#{}): {} · started {} · config {}\n",
            r.name,
            r.id,
            status_word(&r.status),
            ago(r.created_at),
            r.config_path
        );
        let rows: Vec<[String; 6]> = self
            .stages
            .iter()
            .map(|s| {
                let items = match s.items_total {
                    Some(t) if s.status != StageStatus::Done || t != s.items_done => {
                        format!("{}/{}", s.items_done, t)
                    }
                    _ => s.items_done.to_string(),
                };
                let items = if s.items_failed > 0 {
                    format!("{items} ({} failed)", s.items_failed)
                } else {
                    items
                };
                let mut note = s.error.clone().unwrap_or_default();
                if let Some(d) = &s.detail
                    && s.kind == "generate"
                {
                    let toks = d["completion_tokens"].as_i64().unwrap_or(0);
                    let cached = d["cached"].as_i64().unwrap_or(0);
                    note = format!("{toks} tokens, {cached} cached {note}");
                }
                if let Some(eta) = s.eta_s {
                    note = format!(
                        "{:.1}/s, eta {}",
                        s.rate_per_s.unwrap_or(0.0),
                        duration(eta * 1000.0)
                    );
                }
                [
                    s.name.clone(),
                    s.kind.clone(),
                    if s.needs.is_empty() {
                        "-".into()
                    } else {
                        s.needs.join(",")
                    },
                    format!("{:?}", s.status).to_lowercase(),
                    items,
                    format!("{} {}", duration(s.elapsed_ms as f64), note)
                        .trim()
                        .to_string(),
                ]
            })
            .collect();
        out.push_str(&table(
            ["STAGE", "KIND", "NEEDS", "STATUS", "ITEMS", "TIME"],
            &rows,
        ));
        out
    }
}

/// The first `n` characters of `text` and how many more there are, unless `full`.
fn excerpt(text: &str, n: usize, full: bool) -> String {
    let len = text.chars().count();
    if full || len <= n {
        text.to_string()
    } else {
        let head: String = text.chars().take(n).collect();
        format!("{head}… [{} more chars; --full shows all]", len - n)
    }
}

/// `distill traces`: each sample with its prompt, for reading.
pub fn render_traces(traces: &[generations::Trace], full: bool) -> String {
    if traces.is_empty() {
        return "no traces\n".into();
    }
    let cut = |text: &str, n: usize| excerpt(text, n, full);
    let mut out = String::new();
    for t in traces {
        let g = &t.generation;
        let mut facts = vec![g.status.clone()];
        facts.extend(g.finish_reason.clone());
        if let Some(n) = g.completion_tokens {
            facts.push(format!("{n} tokens"));
        }
        if let Some(ms) = g.latency_ms {
            facts.push(duration(ms as f64));
        }
        if g.cached {
            facts.push("cached".into());
        }
        facts.extend(g.endpoint.clone());
        let _ = writeln!(
            out,
            "── {} · prompt {} · sample {} · {}",
            t.stage,
            t.source_id,
            g.sample_index,
            facts.join(" · ")
        );
        let _ = writeln!(out, "PROMPT     {}", cut(&t.prompt, 300));
        if let Some(e) = &g.error {
            let _ = writeln!(
                out,
                "ERROR      {}: {e}",
                g.error_kind.as_deref().unwrap_or("?")
            );
        }
        if let Some(r) = &g.reasoning {
            let _ = writeln!(out, "REASONING  {}", cut(r, 600));
        }
        if let Some(a) = &g.answer {
            let _ = writeln!(out, "ANSWER     {}", cut(a, 300));
        }
        if let Some(r) = &t.reference {
            let _ = writeln!(out, "REFERENCE  {}", cut(r, 200));
        }
        out.push('\n');
    }
    out
}

/// `distill traces --stage GRPO`: the rollouts a grpo stage kept, each with its prompt.
pub fn render_rollouts(
    stage: &str,
    rollouts: &[distill_db::grpo::RolloutTrace],
    full: bool,
) -> String {
    if rollouts.is_empty() {
        return format!("no rollouts kept by stage {stage} yet\n");
    }
    let cut = |text: &str, n: usize| excerpt(text, n, full);
    let mut out = String::new();
    for r in rollouts {
        let _ = writeln!(
            out,
            "── {stage} · batch {} · prompt {} · sample {} · reward {} · {} · {} tokens",
            r.batch,
            r.source_id,
            r.sample,
            reward(r.reward),
            r.verdict,
            r.tokens
        );
        let _ = writeln!(out, "PROMPT     {}", cut(&r.prompt, 300));
        let _ = writeln!(out, "COMPLETION {}", cut(&r.completion, 600));
        if let Some(a) = &r.reference {
            let _ = writeln!(out, "REFERENCE  {}", cut(a, 200));
        }
        out.push('\n');
    }
    out
}

/// A reward with at most three decimals and no trailing zeros: `1`, `0.5`, `-0.125`.
fn reward(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

/// `distill funnel`: items in, kept and dropped (by reason) at each stage that
/// produces or curates traces.
#[derive(Debug, Serialize)]
pub struct Funnel {
    /// The run's name.
    pub run: String,
    /// Generate and curation stages, in topological order.
    pub stages: Vec<FunnelStage>,
}

/// One row of the funnel.
#[derive(Debug, Serialize)]
pub struct FunnelStage {
    /// Stage name.
    pub name: String,
    /// Stage kind.
    pub kind: String,
    /// Stage status.
    pub status: StageStatus,
    /// Items that came in (generate: samples asked for).
    #[serde(rename = "in")]
    pub input: i64,
    /// Items kept (generate: samples produced).
    pub kept: i64,
    /// Items dropped, by reason (generate: failed samples).
    pub dropped: std::collections::BTreeMap<String, i64>,
}

impl Funnel {
    /// Reads the funnel of a run.
    pub async fn load(db: &Db, run: &Run) -> distill_db::Result<Self> {
        let mut out = Vec::new();
        for s in stages::list(db.pool(), run.id).await? {
            let row = if GENERATION_KINDS.contains(&s.kind.as_str()) {
                let t = generations::totals(db.pool(), s.id).await?;
                let mut dropped = std::collections::BTreeMap::new();
                if t.failed > 0 {
                    dropped.insert("failed".to_string(), t.failed);
                }
                FunnelStage {
                    input: s.items_total.unwrap_or(t.ok + t.failed),
                    kept: t.ok,
                    dropped,
                    name: s.name,
                    kind: s.kind,
                    status: s.status,
                }
            } else if distill_stages::curation::CURATION_KINDS.contains(&s.kind.as_str()) {
                let c = distill_db::verdicts::counts(db.pool(), s.id).await?;
                let dropped: std::collections::BTreeMap<String, i64> =
                    c.dropped.into_iter().collect();
                FunnelStage {
                    input: c.kept + dropped.values().sum::<i64>(),
                    kept: c.kept,
                    dropped,
                    name: s.name,
                    kind: s.kind,
                    status: s.status,
                }
            } else {
                continue;
            };
            out.push(row);
        }
        Ok(Funnel {
            run: run.name.clone(),
            stages: out,
        })
    }

    /// A table for people.
    pub fn render(&self) -> String {
        if self.stages.is_empty() {
            return format!("run {} has no generate or curation stages\n", self.run);
        }
        let rows: Vec<[String; 6]> = self
            .stages
            .iter()
            .map(|s| {
                let mut dropped: Vec<_> = s.dropped.iter().collect();
                dropped.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                let pct = if s.input > 0 {
                    format!("{:.1}%", 100.0 * s.kept as f64 / s.input as f64)
                } else {
                    "-".into()
                };
                [
                    s.name.clone(),
                    s.kind.clone(),
                    s.input.to_string(),
                    s.kept.to_string(),
                    pct,
                    dropped
                        .iter()
                        .map(|(r, n)| format!("{r} {n}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                ]
            })
            .collect();
        format!(
            "run {}\n{}",
            self.run,
            table(["STAGE", "KIND", "IN", "KEPT", "KEPT%", "DROPPED"], &rows)
        )
    }
}

/// `distill traces --rejected`: dropped items with the verdict that dropped them.
pub fn render_rejected(items: &[distill_db::verdicts::Judged], full: bool) -> String {
    if items.is_empty() {
        return "no rejected traces\n".into();
    }
    let cut = |text: &str, n: usize| excerpt(text, n, full);
    let mut out = String::new();
    for j in items {
        let i = &j.item;
        let _ = writeln!(
            out,
            "── {} · {} · prompt {} · sample {} · generation {}",
            j.stage,
            j.reason.as_deref().unwrap_or("?"),
            i.source_id,
            i.sample_index,
            i.generation_id
        );
        if let Some(d) = &j.detail {
            let _ = writeln!(out, "WHY        {}", cut(d, 300));
        }
        if let Some(r) = j.related_id {
            let _ = writeln!(out, "KEPT       generation {r} in its place");
        }
        let _ = writeln!(out, "PROMPT     {}", cut(&i.prompt, 300));
        let _ = writeln!(out, "REASONING  {}", cut(&i.reasoning, 600));
        let _ = writeln!(out, "ANSWER     {}", cut(&i.answer, 300));
        if let Some(r) = &i.reference {
            let _ = writeln!(out, "REFERENCE  {}", cut(r, 200));
        }
        out.push('\n');
    }
    out
}

/// `distill scores`: every score of a run, grouped by benchmark and protocol so that
/// numbers measured differently are never in one table.
#[derive(Debug, Serialize)]
pub struct Scores {
    /// The run's name.
    pub run: String,
    /// One group per (benchmark, protocol).
    pub groups: Vec<ScoreGroup>,
}

/// Scores measured under one protocol on one benchmark.
#[derive(Debug, Serialize)]
pub struct ScoreGroup {
    /// Benchmark name.
    pub benchmark: String,
    /// The protocol (samples, temperature, top_p, max_tokens, template hash, ...).
    pub protocol: Value,
    /// Its hash.
    pub protocol_hash: String,
    /// One row per evaluated model (checkpoint, base, teacher, endpoint).
    pub rows: Vec<ScoreLine>,
}

/// A model's scores in a group.
#[derive(Debug, Serialize)]
pub struct ScoreLine {
    /// How the model is named.
    pub label: String,
    /// The evaluate stage.
    pub stage: String,
    /// Training step, for checkpoints.
    pub step: Option<i64>,
    /// metric → (value, standard error), values in [0, 1].
    pub metrics: std::collections::BTreeMap<String, (f64, f64)>,
    /// Share of the samples behind every metric that stopped on the token budget, in
    /// [0, 1] (a sample cut inside its reasoning counts as no answer); `None`: not known.
    pub truncated: Option<f64>,
    /// Mean tokens generated per sample; `None`: not known.
    pub mean_tokens: Option<f64>,
}

impl Scores {
    /// Reads and groups a run's scores.
    pub async fn load(db: &Db, run: &Run) -> distill_db::Result<Self> {
        let rows = distill_db::evals::scores_of_run(db.pool(), run.id).await?;
        Ok(Self::from_rows(&run.name, rows))
    }

    /// Groups score rows (in [`distill_db::evals::scores_of_run`] order).
    pub fn from_rows(run: &str, rows: Vec<distill_db::evals::ScoreRow>) -> Self {
        let mut groups: Vec<ScoreGroup> = Vec::new();
        for r in rows {
            let gi = match groups
                .iter()
                .position(|g| g.benchmark == r.benchmark && g.protocol_hash == r.protocol_hash)
            {
                Some(i) => i,
                None => {
                    groups.push(ScoreGroup {
                        benchmark: r.benchmark.clone(),
                        protocol: serde_json::from_str(&r.protocol).unwrap_or(Value::Null),
                        protocol_hash: r.protocol_hash.clone(),
                        rows: Vec::new(),
                    });
                    groups.len() - 1
                }
            };
            let g = &mut groups[gi];
            let li = match g
                .rows
                .iter()
                .position(|l| l.label == r.label && l.stage == r.stage && l.step == r.step)
            {
                Some(i) => i,
                None => {
                    g.rows.push(ScoreLine {
                        label: r.label.clone(),
                        stage: r.stage.clone(),
                        step: r.step,
                        metrics: Default::default(),
                        truncated: r.truncated,
                        mean_tokens: r.mean_tokens,
                    });
                    g.rows.len() - 1
                }
            };
            g.rows[li].metrics.insert(r.metric, (r.value, r.stderr));
        }
        Scores {
            run: run.to_string(),
            groups,
        }
    }

    /// Tables for people, one per benchmark and protocol.
    pub fn render(&self) -> String {
        if self.groups.is_empty() {
            return format!(
                "run {} has no scores yet (add an evaluate stage)\n",
                self.run
            );
        }
        let mut out = format!("run {}\n", self.run);
        for g in &self.groups {
            let p = &g.protocol;
            let _ = writeln!(
                out,
                "\n{} · {} questions · k={} · temperature {} · top_p {} · max_tokens {} · template {}",
                g.benchmark,
                p["questions"],
                p["samples"],
                p["temperature"],
                p["top_p"],
                p["max_tokens"],
                p["template_hash"].as_str().unwrap_or("?"),
            );
            let mut metric_names: Vec<&String> =
                g.rows.iter().flat_map(|r| r.metrics.keys()).collect();
            metric_names.sort_by_key(|m| {
                (
                    !m.starts_with("pass@1"),
                    m.starts_with("cons"),
                    m.to_string(),
                )
            });
            metric_names.dedup();
            let header: Vec<String> = ["MODEL", "STAGE", "STEP"]
                .iter()
                .map(|s| s.to_string())
                .chain(metric_names.iter().map(|m| m.to_uppercase()))
                .chain(["TRUNCATED".to_string(), "MEAN TOKENS".to_string()])
                .collect();
            let rows: Vec<Vec<String>> = g
                .rows
                .iter()
                .map(|r| {
                    let mut row = vec![
                        r.label.clone(),
                        r.stage.clone(),
                        r.step.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                    ];
                    for m in &metric_names {
                        row.push(match r.metrics.get(*m) {
                            Some((v, se)) => format!("{:.1} ± {:.1}", 100.0 * v, 100.0 * se),
                            None => "-".into(),
                        });
                    }
                    row.push(match r.truncated {
                        Some(t) => format!("{:.1}%", 100.0 * t),
                        None => "-".into(),
                    });
                    row.push(match r.mean_tokens {
                        Some(t) => format!("{t:.0}"),
                        None => "-".into(),
                    });
                    row
                })
                .collect();
            out.push_str(&dyn_table(&header, &rows));
        }
        out
    }
}

/// [`table`] for a column count known only at run time.
fn dyn_table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for cells in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)) {
        let mut l = String::new();
        for (cell, w) in cells.iter().zip(&widths) {
            let _ = write!(l, "{cell:<w$}  ");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    }
    out
}

/// `distill runs`.
#[derive(Debug, Serialize)]
pub struct RunList {
    /// Runs, newest first.
    pub runs: Vec<RunSummary>,
}

/// One line of `distill runs`.
#[derive(Debug, Serialize)]
pub struct RunSummary {
    /// The run.
    #[serde(flatten)]
    pub run: RunInfo,
    /// Stages in the run.
    pub stages: usize,
    /// Stages done.
    pub stages_done: usize,
}

impl RunList {
    /// Reads every run with its stage counts.
    pub async fn load(db: &Db) -> distill_db::Result<Self> {
        let mut out = Vec::new();
        for run in runs::list(db).await? {
            let st = stages::list(db.pool(), run.id).await?;
            out.push(RunSummary {
                stages: st.len(),
                stages_done: st.iter().filter(|s| s.status == StageStatus::Done).count(),
                run: run.into(),
            });
        }
        Ok(Self { runs: out })
    }

    /// A table for people.
    pub fn render(&self) -> String {
        if self.runs.is_empty() {
            return "no runs yet: `distill run CONFIG` starts one\n".into();
        }
        let rows: Vec<[String; 5]> = self
            .runs
            .iter()
            .map(|r| {
                [
                    r.run.id.to_string(),
                    r.run.name.clone(),
                    status_word(&r.run.status).into(),
                    format!("{}/{}", r.stages_done, r.stages),
                    ago(r.run.updated_at),
                ]
            })
            .collect();
        table(["ID", "NAME", "STATUS", "STAGES DONE", "UPDATED"], &rows)
    }
}

/// `distill validate`: the stages a config would run, in order.
#[derive(Debug, Serialize)]
pub struct Plan {
    /// Always true: an invalid config is an error, not a plan.
    pub valid: bool,
    /// The run's name.
    pub run: String,
    /// Stages in execution order.
    pub stages: Vec<PlanStage>,
}

/// A stage of a [`Plan`].
#[derive(Debug, Serialize)]
pub struct PlanStage {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: String,
    /// Stages it needs.
    pub needs: Vec<String>,
    /// What the stage chose that the config does not say ([`distill_stages::Stage::notes`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Plan {
    /// The plan of a validated pipeline.
    pub fn new(p: &Pipeline) -> Self {
        Plan {
            valid: true,
            run: p.run.name.clone(),
            stages: p
                .stages
                .iter()
                .map(|s| PlanStage {
                    name: s.name.clone(),
                    kind: s.kind.clone(),
                    needs: s.needs.clone(),
                    notes: s.stage.notes(),
                })
                .collect(),
        }
    }

    /// Text for people.
    pub fn render(&self) -> String {
        let mut out = format!(
            "config is valid: run `{}`, {} stages\n",
            self.run,
            self.stages.len()
        );
        for (i, s) in self.stages.iter().enumerate() {
            let needs = if s.needs.is_empty() {
                String::new()
            } else {
                format!("  ← {}", s.needs.join(", "))
            };
            let _ = writeln!(out, "  {}. {} ({}){}", i + 1, s.name, s.kind, needs);
            for note in &s.notes {
                let _ = writeln!(out, "     note: {note}");
            }
        }
        out
    }
}

fn status_word(s: &runs::RunStatus) -> &'static str {
    match s {
        runs::RunStatus::Running => "running",
        runs::RunStatus::Done => "done",
        runs::RunStatus::Failed => "failed",
        runs::RunStatus::Interrupted => "interrupted",
    }
}

/// Left-aligned columns separated by two spaces.
pub fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// `850ms`, `12.3s`, `4m05s`, `2h03m`.
pub fn duration(ms: f64) -> String {
    let s = ms / 1000.0;
    if s < 1.0 {
        format!("{ms:.0}ms")
    } else if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

fn ago(t: i64) -> String {
    format!("{} ago", duration((now_ms() - t).max(0) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_db::evals::ScoreRow;
    use distill_db::grpo::RolloutTrace;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(850.0), "850ms");
        assert_eq!(duration(12_340.0), "12.3s");
        assert_eq!(duration(245_000.0), "4m05s");
        assert_eq!(duration(7_380_000.0), "2h03m");
    }

    fn score_row(label: &str, step: Option<i64>, metric: &str, value: f64) -> ScoreRow {
        ScoreRow {
            stage: "eval".into(),
            target: format!("target:{label}"),
            label: label.into(),
            step,
            benchmark: "bench".into(),
            metric: metric.into(),
            value,
            stderr: 0.01,
            questions: 100,
            protocol: r#"{"questions":100,"samples":4,"temperature":0.6,"top_p":0.95,"max_tokens":4096,"template_hash":"ab12cd34"}"#.into(),
            protocol_hash: "h".into(),
            truncated: Some(0.25),
            mean_tokens: Some(3071.6),
        }
    }

    #[test]
    fn scores_show_the_truncated_share_and_mean_tokens_beside_the_metrics() {
        let mut old = score_row("old", None, "pass@1", 0.5);
        (old.truncated, old.mean_tokens) = (None, None);
        let scores = Scores::from_rows(
            "r",
            vec![
                score_row("student@10", Some(10), "pass@1", 0.4),
                score_row("student@10", Some(10), "pass@4", 0.7),
                old,
            ],
        );
        let text = scores.render();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[3].ends_with("PASS@4      TRUNCATED  MEAN TOKENS"),
            "{text}"
        );
        assert!(lines[4].ends_with("70.0 ± 1.0  25.0%      3072"), "{text}");
        assert!(
            lines[5].ends_with("50.0 ± 1.0  -           -          -"),
            "{text}"
        );
        let json = serde_json::to_value(&scores).unwrap();
        let row = &json["groups"][0]["rows"][0];
        assert_eq!(row["truncated"], 0.25);
        assert_eq!(row["mean_tokens"], 3071.6);
        assert_eq!(row["metrics"]["pass@4"][0], 0.7);
        assert!(json["groups"][0]["rows"][1]["truncated"].is_null());
    }

    fn rollout(batch: i64, sample: i64, reward: f64, verdict: &str) -> RolloutTrace {
        RolloutTrace {
            batch,
            source_id: "p17".into(),
            prompt: "Mia has 12 pencils. She buys 5 more. How many does she have?".into(),
            reference: Some("17".into()),
            sample,
            completion: format!(
                "<think>12 + 5 = 17</think> {}",
                "so the answer is 17. ".repeat(40)
            ),
            reward,
            verdict: verdict.into(),
            tokens: 213,
        }
    }

    #[test]
    fn rollouts_show_batch_prompt_reward_verdict_and_the_completion() {
        let mut no_reference = rollout(2, 1, -0.5, "unknown");
        no_reference.reference = None;
        let rows = [rollout(3, 0, 1.0, "correct"), no_reference];
        let text = render_rollouts("rl", &rows, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "── rl · batch 3 · prompt p17 · sample 0 · reward 1 · correct · 213 tokens"
        );
        assert_eq!(
            lines[1],
            "PROMPT     Mia has 12 pencils. She buys 5 more. How many does she have?"
        );
        let completion_len = rows[0].completion.chars().count();
        assert_eq!(
            lines[2],
            format!(
                "COMPLETION {}… [{} more chars; --full shows all]",
                rows[0].completion.chars().take(600).collect::<String>(),
                completion_len - 600
            )
        );
        assert_eq!(lines[3], "REFERENCE  17");
        assert_eq!(lines[4], "");
        assert_eq!(
            lines[5],
            "── rl · batch 2 · prompt p17 · sample 1 · reward -0.5 · unknown · 213 tokens"
        );
        assert!(
            !text[text.find("batch 2").unwrap()..].contains("REFERENCE"),
            "{text}"
        );

        let full = render_rollouts("rl", &rows, true);
        assert!(
            full.contains(&format!("COMPLETION {}\n", rows[0].completion)),
            "{full}"
        );
        assert!(!full.contains("--full shows all"));

        assert_eq!(
            render_rollouts("rl", &[], false),
            "no rollouts kept by stage rl yet\n"
        );
    }

    #[test]
    fn rewards_print_without_trailing_zeros() {
        assert_eq!(reward(1.0), "1");
        assert_eq!(reward(0.0), "0");
        assert_eq!(reward(-0.0001), "0");
        assert_eq!(reward(0.25), "0.25");
        assert_eq!(reward(-0.125), "-0.125");
        assert_eq!(reward(2.0 / 3.0), "0.667");
    }

    #[test]
    fn tables_align() {
        let t = table(["A", "BB"], &[["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    BB\nxyz  1\n");
    }
}
