//! The `generate` stage: samples reasoning traces from a teacher for every prompt.
//!
//! Producing hundreds of thousands of traces takes days and costs money, so:
//! - every finished sample is committed as its own row keyed by (prompt, sample);
//!   a writer task commits whatever has arrived in one transaction (group commit),
//!   so a kill loses at most the requests in flight;
//! - `resume` sends only the missing and the failed samples;
//! - a response cache keyed by the hash of the exact request body lets a rerun with
//!   the same parameters (for example after the prompt set grew) pay nothing again;
//! - requests are fed to the client as fast as its concurrency allows, so the teacher
//!   stays saturated.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use distill_db::generations::{self, NewGeneration};
use distill_db::prompts::{self, Prompt};
use distill_teacher::{ChatModel, ChatRequest, Completion, Message, TeacherConfig};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::warn;

use crate::{BuildEnv, ParamError, Stage, StageContext, StageError, StageKind, parse_params};

/// The DeepSeek-R1 recommendation: no system prompt, the instruction appended.
pub const DEFAULT_TEMPLATE: &str =
    "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}.";

/// Stage kinds whose items are prompts a generate stage can consume.
pub const PROMPT_KINDS: &[&str] = &["load"];

/// Stage kinds that record traces (prompts and their samples) the way a generate stage
/// does: what curation, `train` and `dataset export` accept as a source, and whose
/// recorded identity rebuilds the prompt each sample answered.
pub const GENERATION_KINDS: &[&str] = &["generate", "import"];

/// The `generate` stage kind.
pub struct GenerateKind;

/// Parameters of a `generate` stage.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateParams {
    /// Name of the `[teacher.NAME]` endpoint.
    pub teacher: String,
    /// Samples per prompt.
    #[serde(default = "one")]
    pub samples_per_prompt: u32,
    /// Sampling temperature (DeepSeek recommends 0.6 for R1).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// Generation budget per sample, reasoning included.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Optional system message (R1 works best without one).
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// The user message; `{prompt}` is replaced by the prompt text.
    #[serde(default = "default_template")]
    pub prompt_template: String,
    /// Seed sent with each request (offset per prompt and sample), for servers that
    /// honour it.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Vec<String>,
    /// Keep every response in the response cache and reuse cached responses to
    /// identical requests: a rerun after the stage is redone (say, the prompt set grew)
    /// pays only for new requests, at the price of storing each response twice.
    #[serde(default = "yes")]
    pub cache: bool,
    /// Requests in flight at once; default: the teacher's `max_concurrency` times
    /// its number of endpoints.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    /// Share of samples allowed to fail (after the client's retries) with the stage
    /// still counted done; above it the stage fails and `resume` retries them.
    #[serde(default)]
    pub max_failed_fraction: f64,
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_temperature() -> f64 {
    0.6
}
fn default_top_p() -> f64 {
    0.95
}
fn default_max_tokens() -> u32 {
    32768
}
fn default_template() -> String {
    DEFAULT_TEMPLATE.into()
}

impl StageKind for GenerateKind {
    fn name(&self) -> &'static str {
        "generate"
    }
    fn about(&self) -> &'static str {
        "sample reasoning traces from a teacher endpoint for every prompt"
    }
    fn version(&self) -> u32 {
        1
    }
    fn build(&self, params: toml::Table, env: &BuildEnv) -> Result<Arc<dyn Stage>, ParamError> {
        let p: GenerateParams = parse_params(params)?;
        let teacher = env.teachers.get(&p.teacher).ok_or_else(|| {
            let known: Vec<_> = env.teachers.keys().cloned().collect();
            ParamError::new(
                "teacher",
                format!(
                    "no [teacher.{}] in the config (defined: {})",
                    p.teacher,
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            )
        })?;
        match env.needs.as_slice() {
            [(_, kind)] if PROMPT_KINDS.contains(&kind.as_str()) => {}
            _ => {
                return Err(ParamError::new(
                    "needs",
                    format!(
                        "a generate stage needs exactly one stage of kind {}",
                        PROMPT_KINDS.join(" or ")
                    ),
                ));
            }
        }
        if p.samples_per_prompt == 0 {
            return Err(ParamError::new("samples_per_prompt", "must be at least 1"));
        }
        check_sampling(p.temperature, p.top_p, p.max_tokens, &p.prompt_template)?;
        if p.max_in_flight == Some(0) {
            return Err(ParamError::new("max_in_flight", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&p.max_failed_fraction) {
            return Err(ParamError::new("max_failed_fraction", "must be in [0, 1]"));
        }
        Ok(Arc::new(Generate {
            params: p,
            teacher: teacher.clone(),
        }))
    }
}

/// A configured `generate` stage.
#[derive(Debug)]
pub struct Generate {
    params: GenerateParams,
    teacher: TeacherConfig,
}

#[async_trait]
impl Stage for Generate {
    fn identity(&self) -> Result<Value, StageError> {
        let p = &self.params;
        // What shapes the samples; not where they come from (URLs, concurrency, keys).
        let mut identity = json!({
            "model": self.teacher.model,
            "extra_body": self.teacher.extra_body,
            "samples_per_prompt": p.samples_per_prompt,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "max_tokens": p.max_tokens,
            "system_prompt": p.system_prompt,
            "prompt_template": p.prompt_template,
            "seed": p.seed,
            "stop": p.stop,
        });
        // A simulator's settings shape its samples; the key is absent for real teachers
        // so their fingerprints stay as they were.
        if let Some(sim) = &self.teacher.simulated {
            identity["simulated"] = json!(sim);
        }
        Ok(identity)
    }

    async fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        // A simulated teacher's server lives as long as this client, i.e. this run.
        let client = distill_teacher::connect(&self.teacher)
            .await
            .map_err(|e| StageError::Input(format!("teacher `{}`: {e}", self.params.teacher)))?;
        let supports_n = self.teacher.supports_n;
        let in_flight = self
            .params
            .max_in_flight
            .unwrap_or(self.teacher.max_concurrency * self.teacher.endpoint_count());
        self.run_with(ctx, Arc::new(client), supports_n, in_flight)
            .await
    }
}

/// One request to send: a prompt and the sample indices its choices fill.
struct Job {
    prompt: Arc<Prompt>,
    samples: Vec<i64>,
    request: ChatRequest,
    request_hash: String,
    /// Cache choice index of the first sample: requests without `n` are identical
    /// across samples when unseeded, so the sample index tells their answers apart.
    choice_base: i64,
}

/// What a job produced, for the writer.
struct Finished {
    rows: Vec<NewGeneration>,
    cache: Vec<(String, i64, String)>,
    fatal: Option<String>,
}

impl Generate {
    /// Runs the stage against any [`ChatModel`]; `in_flight` bounds concurrent requests.
    pub async fn run_with(
        &self,
        ctx: &StageContext,
        model: Arc<dyn ChatModel>,
        supports_n: bool,
        in_flight: usize,
    ) -> Result<Value, StageError> {
        let input = ctx.single_input()?;
        let prompts = prompts::list(ctx.db.pool(), input.stage_id).await?;
        let done: HashSet<(i64, i64)> = generations::done_keys(ctx.db.pool(), ctx.stage_id)
            .await?
            .into_iter()
            .collect();
        let k = self.params.samples_per_prompt as i64;
        let total = prompts.len() as u64 * k as u64;
        ctx.progress.set_total(total);
        ctx.progress.set_done(done.len() as u64);

        let jobs = prompts
            .iter()
            .flat_map(|p| self.jobs_for(p, &done, model.as_ref(), supports_n));
        let (tx, rx) = mpsc::channel::<Finished>(in_flight.max(1) * 2);
        let writer = tokio::spawn(write_loop(ctx.clone(), rx));

        let permits = Arc::new(Semaphore::new(in_flight.max(1)));
        let mut tasks = JoinSet::new();
        let stop = tokio_util::sync::CancellationToken::new();
        for job in jobs {
            let permit = tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => break,
                _ = stop.cancelled() => break,
                p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            let model = model.clone();
            let tx = tx.clone();
            let stop = stop.clone();
            let use_cache = self.params.cache;
            let db = ctx.db.clone();
            tasks.spawn(async move {
                let finished = run_job(&db, model.as_ref(), job, use_cache).await;
                if finished.fatal.is_some() {
                    stop.cancel();
                }
                let _ = tx.send(finished).await;
                drop(permit);
            });
            // Reap finished tasks as we go so the set does not grow with the job count.
            while tasks.try_join_next().is_some() {}
        }
        if ctx.cancel.is_cancelled() && !tasks.is_empty() {
            ctx.progress.set_message(format!(
                "waiting for {} requests in flight (Ctrl-C again abandons them)",
                tasks.len()
            ));
        }
        while tasks.join_next().await.is_some() {}
        drop(tx);
        let fatal = writer
            .await
            .map_err(|e| StageError::Failed(format!("writer task failed: {e}")))??;

        if let Some(msg) = fatal {
            return Err(StageError::Input(format!(
                "teacher `{}`: {msg}",
                self.params.teacher
            )));
        }
        ctx.check_cancelled()?;
        let totals = generations::totals(ctx.db.pool(), ctx.stage_id).await?;
        let summary = json!({
            "samples": totals.ok,
            "failed": totals.failed,
            "cached": totals.cached,
            "truncated": totals.truncated,
            "prompt_tokens": totals.prompt_tokens,
            "completion_tokens": totals.completion_tokens,
            "reasoning_tokens": totals.reasoning_tokens,
            // Endpoints that ignored `n` and were sent one request per sample instead.
            "endpoints_without_n": model.endpoints_without_n(),
        });
        if totals.failed as f64 > self.params.max_failed_fraction * total as f64 {
            let first: Option<(String, String)> = sqlx::query_as(
                "SELECT error_kind, error FROM generations WHERE stage_id = ? AND status = 'failed'
                 ORDER BY id LIMIT 1",
            )
            .bind(ctx.stage_id)
            .fetch_optional(ctx.db.pool())
            .await?;
            let (kind, msg) = first.unwrap_or_default();
            return Err(StageError::Failed(format!(
                "{} of {total} samples failed (first: {kind}: {msg}); `distill resume` retries them",
                totals.failed
            )));
        }
        Ok(summary)
    }

    /// The requests a prompt still needs: one with `n` choices where the server takes
    /// `n`, else one per missing sample. Built lazily, prompt by prompt, so that a
    /// million-sample stage does not hold a million request bodies at once.
    fn jobs_for(
        &self,
        prompt: &Prompt,
        done: &HashSet<(i64, i64)>,
        model: &dyn ChatModel,
        supports_n: bool,
    ) -> Vec<Job> {
        let missing: Vec<i64> = (0..self.params.samples_per_prompt as i64)
            .filter(|i| !done.contains(&(prompt.id, *i)))
            .collect();
        if missing.is_empty() {
            return Vec::new();
        }
        let prompt = Arc::new(prompt.clone());
        let base = self.request(&prompt, missing.len() as u32);
        if supports_n && missing.len() > 1 {
            let request_hash = hash_body(&model.request_body(&base));
            return vec![Job {
                prompt,
                samples: missing,
                request: base,
                request_hash,
                choice_base: 0,
            }];
        }
        missing
            .into_iter()
            .map(|i| {
                let request = base.single(i as u32);
                let request_hash = hash_body(&model.request_body(&request));
                Job {
                    prompt: prompt.clone(),
                    samples: vec![i],
                    request,
                    request_hash,
                    choice_base: i,
                }
            })
            .collect()
    }

    fn request(&self, prompt: &Prompt, n: u32) -> ChatRequest {
        let p = &self.params;
        let mut messages = Vec::with_capacity(2);
        if let Some(system) = &p.system_prompt {
            messages.push(Message::system(system.clone()));
        }
        messages.push(Message::user(
            p.prompt_template.replace("{prompt}", &prompt.prompt),
        ));
        // The seed follows the prompt's content, not its row id, so reloading the same
        // prompts sends the same requests (and hits the cache).
        let seed = p.seed.map(|s| {
            let h = u64::from_str_radix(&prompt.content_hash[..16], 16).unwrap_or(0);
            s ^ h
        });
        ChatRequest {
            messages,
            temperature: Some(p.temperature),
            top_p: Some(p.top_p),
            max_tokens: Some(p.max_tokens),
            n,
            seed,
            stop: p.stop.clone(),
        }
    }
}

/// The messages a generate stage sent for `prompt`, rebuilt from the stage's recorded
/// identity: what an SFT example's prompt side must be, so the student learns the
/// same instruction the teacher answered.
pub fn rendered_messages(identity: &Value, prompt: &str) -> Vec<Message> {
    let template = identity["prompt_template"].as_str().unwrap_or("{prompt}");
    let mut messages = Vec::with_capacity(2);
    if let Some(system) = identity["system_prompt"].as_str() {
        messages.push(Message::system(system));
    }
    messages.push(Message::user(template.replace("{prompt}", prompt)));
    messages
}

/// Checks the sampling parameters that generate and evaluate share.
pub(crate) fn check_sampling(
    temperature: f64,
    top_p: f64,
    max_tokens: u32,
    template: &str,
) -> Result<(), ParamError> {
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ParamError::new("temperature", "must be a number ≥ 0"));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ParamError::new("top_p", "must be in (0, 1]"));
    }
    if max_tokens == 0 {
        return Err(ParamError::new("max_tokens", "must be at least 1"));
    }
    if !template.contains("{prompt}") {
        return Err(ParamError::new(
            "prompt_template",
            "must contain `{prompt}`",
        ));
    }
    Ok(())
}

fn hash_body(body: &Value) -> String {
    crate::hash::hex128(body.to_string().as_bytes())
}

/// Serves a job from the cache or the teacher.
async fn run_job(
    db: &distill_db::Db,
    model: &dyn ChatModel,
    job: Job,
    use_cache: bool,
) -> Finished {
    let want = job.samples.len() as i64;
    if use_cache {
        match generations::cache_get(db.pool(), &job.request_hash).await {
            Ok(hits) => {
                let hits: BTreeMap<i64, String> = hits.into_iter().collect();
                let needed: Vec<_> = (0..want)
                    .map(|j| hits.get(&(job.choice_base + j)))
                    .collect();
                if needed.iter().all(Option::is_some) {
                    let completions: Result<Vec<Completion>, _> = needed
                        .iter()
                        .map(|s| serde_json::from_str::<Completion>(s.unwrap()))
                        .collect();
                    if let Ok(completions) = completions {
                        return finished_ok(&job, completions, true, true);
                    }
                }
            }
            Err(e) => warn!("response cache unreadable, asking the teacher: {e}"),
        }
    }
    match model.chat(&job.request).await {
        Ok(completions) if completions.len() as i64 == want => {
            finished_ok(&job, completions, false, use_cache)
        }
        Ok(completions) => failed(
            &job,
            "malformed",
            format!(
                "asked for {want} choices, the server returned {}",
                completions.len()
            ),
            1,
            None,
        ),
        Err(e) => {
            // A bad key or an empty balance fails every request alike: stop at once.
            let fatal = matches!(
                e.kind(),
                "auth" | "payment" | "missing_api_key" | "config" | "not_found"
            )
            .then(|| e.to_string());
            failed(
                &job,
                e.kind(),
                e.to_string(),
                e.attempts().max(1) as i64,
                fatal,
            )
        }
    }
}

fn finished_ok(job: &Job, completions: Vec<Completion>, cached: bool, use_cache: bool) -> Finished {
    let mut rows = Vec::with_capacity(completions.len());
    let mut cache = Vec::new();
    for (j, (c, &sample)) in completions.iter().zip(&job.samples).enumerate() {
        // With the cache off, nothing is written to it either: it doubles the storage.
        if use_cache
            && !cached
            && let Ok(text) = serde_json::to_string(c)
        {
            cache.push((job.request_hash.clone(), job.choice_base + j as i64, text));
        }
        rows.push(NewGeneration {
            prompt_id: job.prompt.id,
            sample_index: sample,
            error: None,
            reasoning: Some(c.reasoning.clone()),
            answer: Some(c.answer.clone()),
            finish_reason: c.finish_reason.clone(),
            prompt_tokens: c.prompt_tokens.map(i64::from),
            completion_tokens: c.completion_tokens.map(i64::from),
            reasoning_tokens: c.reasoning_tokens.map(i64::from),
            latency_ms: Some(c.latency_ms as i64),
            endpoint: Some(c.endpoint.clone()),
            model: c.model.clone(),
            system_fingerprint: c.system_fingerprint.clone(),
            request_hash: job.request_hash.clone(),
            cached,
            attempts: if cached { 0 } else { c.attempts as i64 },
            extra: None,
        });
    }
    Finished {
        rows,
        cache,
        fatal: None,
    }
}

fn failed(
    job: &Job,
    kind: &str,
    message: String,
    attempts: i64,
    fatal: Option<String>,
) -> Finished {
    let rows = job
        .samples
        .iter()
        .map(|&sample| NewGeneration {
            prompt_id: job.prompt.id,
            sample_index: sample,
            error: Some((kind.to_string(), message.clone())),
            request_hash: job.request_hash.clone(),
            attempts,
            ..NewGeneration::default()
        })
        .collect();
    Finished {
        rows,
        cache: Vec::new(),
        fatal,
    }
}

/// Commits finished samples as they arrive: whatever is waiting goes into one
/// transaction, so commits keep up with any request rate without holding a finished
/// sample back. Returns the first fatal teacher error, if any.
async fn write_loop(
    ctx: StageContext,
    mut rx: mpsc::Receiver<Finished>,
) -> Result<Option<String>, StageError> {
    let mut fatal = None;
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let mut tx = ctx.db.write().await?;
        let (mut ok, mut bad) = (0u64, 0u64);
        for f in &batch {
            for (hash, choice, text) in &f.cache {
                generations::cache_put(&mut tx, hash, *choice, text).await?;
            }
            for row in &f.rows {
                generations::upsert(&mut tx, ctx.stage_id, row).await?;
                if row.error.is_none() {
                    ok += 1;
                } else {
                    bad += 1;
                }
            }
            if fatal.is_none() {
                fatal.clone_from(&f.fatal);
            }
        }
        tx.commit().await?;
        ctx.progress.inc(ok);
        ctx.progress.inc_failed(bad);
        batch.clear();
    }
    Ok(fatal)
}
