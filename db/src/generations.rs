//! Teacher samples (`generations`) and the response cache (`teacher_cache`).

use serde::Serialize;
use sqlx::{FromRow, SqliteExecutor};

use crate::{Result, WriteTx, now_ms};

/// A finished or failed sample to record.
#[derive(Debug, Clone, Default)]
pub struct NewGeneration {
    /// The prompt it answers.
    pub prompt_id: i64,
    /// Which of the prompt's samples it is.
    pub sample_index: i64,
    /// `None` for a success; `Some((kind, message))` for a failure.
    pub error: Option<(String, String)>,
    /// Reasoning (chain of thought).
    pub reasoning: Option<String>,
    /// Final answer.
    pub answer: Option<String>,
    /// Why generation stopped (`stop`, `length`, ...).
    pub finish_reason: Option<String>,
    /// Tokens in the prompt, as the server counted them.
    pub prompt_tokens: Option<i64>,
    /// Tokens generated.
    pub completion_tokens: Option<i64>,
    /// Of which reasoning.
    pub reasoning_tokens: Option<i64>,
    /// Time to the full response.
    pub latency_ms: Option<i64>,
    /// Endpoint that served it.
    pub endpoint: Option<String>,
    /// Model name the server returned.
    pub model: Option<String>,
    /// The server's `system_fingerprint`.
    pub system_fingerprint: Option<String>,
    /// Hash of the request body.
    pub request_hash: String,
    /// Served from the cache.
    pub cached: bool,
    /// HTTP attempts made.
    pub attempts: i64,
    /// Other recorded fields of the sample (an imported dataset's own flags), as JSON text.
    pub extra: Option<String>,
}

/// A row of `generations`.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Generation {
    /// Row id.
    pub id: i64,
    /// The generate stage.
    pub stage_id: i64,
    /// The prompt.
    pub prompt_id: i64,
    /// Sample number within the prompt.
    pub sample_index: i64,
    /// `ok` or `failed`.
    pub status: String,
    /// Reasoning.
    pub reasoning: Option<String>,
    /// Answer.
    pub answer: Option<String>,
    /// Finish reason.
    pub finish_reason: Option<String>,
    /// Prompt tokens.
    pub prompt_tokens: Option<i64>,
    /// Completion tokens.
    pub completion_tokens: Option<i64>,
    /// Reasoning tokens.
    pub reasoning_tokens: Option<i64>,
    /// Latency.
    pub latency_ms: Option<i64>,
    /// Endpoint.
    pub endpoint: Option<String>,
    /// Model the server reported.
    pub model: Option<String>,
    /// Server fingerprint.
    pub system_fingerprint: Option<String>,
    /// Request hash.
    pub request_hash: String,
    /// Whether it came from the cache.
    pub cached: bool,
    /// HTTP attempts.
    pub attempts: i64,
    /// Failure kind.
    pub error_kind: Option<String>,
    /// Failure message.
    pub error: Option<String>,
    /// When recorded.
    pub created_at: i64,
    /// Other recorded fields (an imported dataset's own flags), as JSON text.
    pub extra: Option<String>,
}

/// Records a sample, replacing a failed attempt at the same (prompt, sample).
pub async fn upsert(tx: &mut WriteTx, stage_id: i64, g: &NewGeneration) -> Result<()> {
    let (status, kind, message) = match &g.error {
        None => ("ok", None, None),
        Some((k, m)) => ("failed", Some(k.as_str()), Some(m.as_str())),
    };
    sqlx::query(
        "INSERT INTO generations (stage_id, prompt_id, sample_index, status, reasoning, answer,
             finish_reason, prompt_tokens, completion_tokens, reasoning_tokens, latency_ms,
             endpoint, model, system_fingerprint, request_hash, cached, attempts, error_kind,
             error, created_at, extra)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (stage_id, prompt_id, sample_index) DO UPDATE SET
             status = excluded.status, reasoning = excluded.reasoning, answer = excluded.answer,
             finish_reason = excluded.finish_reason, prompt_tokens = excluded.prompt_tokens,
             completion_tokens = excluded.completion_tokens,
             reasoning_tokens = excluded.reasoning_tokens, latency_ms = excluded.latency_ms,
             endpoint = excluded.endpoint, model = excluded.model,
             system_fingerprint = excluded.system_fingerprint,
             request_hash = excluded.request_hash, cached = excluded.cached,
             attempts = generations.attempts + excluded.attempts,
             error_kind = excluded.error_kind, error = excluded.error,
             created_at = excluded.created_at, extra = excluded.extra
         WHERE generations.status = 'failed'",
    )
    .bind(stage_id)
    .bind(g.prompt_id)
    .bind(g.sample_index)
    .bind(status)
    .bind(&g.reasoning)
    .bind(&g.answer)
    .bind(&g.finish_reason)
    .bind(g.prompt_tokens)
    .bind(g.completion_tokens)
    .bind(g.reasoning_tokens)
    .bind(g.latency_ms)
    .bind(&g.endpoint)
    .bind(&g.model)
    .bind(&g.system_fingerprint)
    .bind(&g.request_hash)
    .bind(g.cached)
    .bind(g.attempts)
    .bind(kind)
    .bind(message)
    .bind(now_ms())
    .bind(&g.extra)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Records successful samples of a stage that has none yet (an import): one prepared
/// statement stepped per row on the connection's handle (`bulk`).
pub async fn insert_many(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    stage_id: i64,
    rows: &[NewGeneration],
) -> Result<()> {
    let now = now_ms();
    crate::bulk::with_handle(tx, |conn| {
        let mut stmt = conn.prepare(
            "INSERT INTO generations (stage_id, prompt_id, sample_index, status, reasoning, answer,
                 finish_reason, prompt_tokens, completion_tokens, reasoning_tokens, latency_ms,
                 endpoint, model, system_fingerprint, request_hash, cached, attempts, error_kind,
                 error, created_at, extra)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )?;
        for g in rows {
            let (status, kind, message) = match &g.error {
                None => ("ok", None, None),
                Some((k, m)) => ("failed", Some(k.as_str()), Some(m.as_str())),
            };
            stmt.execute(rusqlite::params![
                stage_id,
                g.prompt_id,
                g.sample_index,
                status,
                g.reasoning,
                g.answer,
                g.finish_reason,
                g.prompt_tokens,
                g.completion_tokens,
                g.reasoning_tokens,
                g.latency_ms,
                g.endpoint,
                g.model,
                g.system_fingerprint,
                g.request_hash,
                g.cached,
                g.attempts,
                kind,
                message,
                now,
                g.extra,
            ])?;
        }
        Ok(())
    })
    .await
}

/// Number of samples (successful or failed) a stage has recorded.
pub async fn count<'e>(ex: impl SqliteExecutor<'e>, stage_id: i64) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM generations WHERE stage_id = ?")
            .bind(stage_id)
            .fetch_one(ex)
            .await?,
    )
}

/// `(prompt_id, sample_index)` of every successful sample of a stage.
pub async fn done_keys<'e>(ex: impl SqliteExecutor<'e>, stage_id: i64) -> Result<Vec<(i64, i64)>> {
    Ok(sqlx::query_as(
        "SELECT prompt_id, sample_index FROM generations WHERE stage_id = ? AND status = 'ok'",
    )
    .bind(stage_id)
    .fetch_all(ex)
    .await?)
}

/// Counts of a stage's samples.
#[derive(Debug, Clone, Default, FromRow, Serialize)]
pub struct Totals {
    /// Successful samples.
    pub ok: i64,
    /// Failed samples (to be retried by `resume`).
    pub failed: i64,
    /// Of the successful, served from the cache.
    pub cached: i64,
    /// Of the successful, cut off at `max_tokens`.
    pub truncated: i64,
    /// Prompt tokens over successful samples.
    pub prompt_tokens: i64,
    /// Completion tokens over successful samples.
    pub completion_tokens: i64,
    /// Reasoning tokens over successful samples.
    pub reasoning_tokens: i64,
}

/// Sums over a stage's samples.
pub async fn totals<'e>(ex: impl SqliteExecutor<'e>, stage_id: i64) -> Result<Totals> {
    Ok(sqlx::query_as(
        "SELECT
             COALESCE(SUM(status = 'ok'), 0) AS ok,
             COALESCE(SUM(status = 'failed'), 0) AS failed,
             COALESCE(SUM(status = 'ok' AND cached), 0) AS cached,
             COALESCE(SUM(status = 'ok' AND finish_reason = 'length'), 0) AS truncated,
             COALESCE(SUM(CASE WHEN status = 'ok' THEN prompt_tokens END), 0) AS prompt_tokens,
             COALESCE(SUM(CASE WHEN status = 'ok' THEN completion_tokens END), 0)
                 AS completion_tokens,
             COALESCE(SUM(CASE WHEN status = 'ok' THEN reasoning_tokens END), 0)
                 AS reasoning_tokens
         FROM generations WHERE stage_id = ?",
    )
    .bind(stage_id)
    .fetch_one(ex)
    .await?)
}

/// A generation joined with its prompt, for `distill traces`.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Trace {
    /// The generation.
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub generation: Generation,
    /// Stage name.
    pub stage: String,
    /// The prompt text.
    pub prompt: String,
    /// The prompt's id in its source file.
    pub source_id: String,
    /// Reference answer.
    pub reference: Option<String>,
}

/// Generations of a run (optionally of one stage, optionally only failed ones).
pub async fn traces<'e>(
    ex: impl SqliteExecutor<'e>,
    run_id: i64,
    stage: Option<&str>,
    failed_only: bool,
    limit: i64,
) -> Result<Vec<Trace>> {
    Ok(sqlx::query_as(
        "SELECT g.id, g.stage_id, g.prompt_id, g.sample_index, g.status, g.reasoning, g.answer,
             g.finish_reason, g.prompt_tokens, g.completion_tokens, g.reasoning_tokens,
             g.latency_ms, g.endpoint, g.model, g.system_fingerprint, g.request_hash, g.cached,
             g.attempts, g.error_kind, g.error, g.created_at, g.extra,
             s.name AS stage, p.prompt, p.source_id, p.answer AS reference
         FROM generations g
         JOIN stages s ON s.id = g.stage_id
         JOIN prompts p ON p.id = g.prompt_id
         WHERE s.run_id = ? AND (? IS NULL OR s.name = ?) AND (? = 0 OR g.status = 'failed')
         ORDER BY s.position, p.idx, g.sample_index
         LIMIT ?",
    )
    .bind(run_id)
    .bind(stage)
    .bind(stage)
    .bind(failed_only)
    .bind(limit)
    .fetch_all(ex)
    .await?)
}

/// Cached completions of a request, by choice index.
pub async fn cache_get<'e>(
    ex: impl SqliteExecutor<'e>,
    request_hash: &str,
) -> Result<Vec<(i64, String)>> {
    Ok(sqlx::query_as(
        "SELECT choice, completion FROM teacher_cache WHERE request_hash = ? ORDER BY choice",
    )
    .bind(request_hash)
    .fetch_all(ex)
    .await?)
}

/// Stores a completion in the cache (first write wins).
pub async fn cache_put(
    tx: &mut WriteTx,
    request_hash: &str,
    choice: i64,
    completion_json: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT OR IGNORE INTO teacher_cache (request_hash, choice, completion, created_at)
         VALUES (?, ?, ?, ?)",
    )
    .bind(request_hash)
    .bind(choice)
    .bind(completion_json)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
