//! Evaluation samples and benchmark scores.

use serde::Serialize;
use sqlx::{FromRow, SqliteExecutor};

use crate::{Result, WriteTx, now_ms};

/// A scored sample to record.
#[derive(Debug, Clone, Default)]
pub struct NewEvalSample {
    /// The question's id.
    pub item_id: String,
    /// Sample number.
    pub sample_index: i64,
    /// The whole response.
    pub output: String,
    /// The answer found in it.
    pub extracted: Option<String>,
    /// correct, incorrect or unknown.
    pub verdict: String,
    /// Normalised answer for majority votes.
    pub vote_key: Option<String>,
    /// Tokens generated.
    pub tokens: Option<i64>,
    /// Why generation stopped.
    pub finish_reason: Option<String>,
}

/// Records a sample (an existing one is left as it is).
pub async fn insert_sample(
    tx: &mut WriteTx,
    stage_id: i64,
    target: &str,
    s: &NewEvalSample,
) -> Result<()> {
    sqlx::query(
        "INSERT OR IGNORE INTO eval_samples (stage_id, target, item_id, sample_index, output,
             extracted, verdict, vote_key, tokens, finish_reason, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(stage_id)
    .bind(target)
    .bind(&s.item_id)
    .bind(s.sample_index)
    .bind(&s.output)
    .bind(&s.extracted)
    .bind(&s.verdict)
    .bind(&s.vote_key)
    .bind(s.tokens)
    .bind(&s.finish_reason)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// `(item_id, sample_index)` already recorded for a target.
pub async fn done_samples<'e>(
    ex: impl SqliteExecutor<'e>,
    stage_id: i64,
    target: &str,
) -> Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT item_id, sample_index FROM eval_samples WHERE stage_id = ? AND target = ?",
    )
    .bind(stage_id)
    .bind(target)
    .fetch_all(ex)
    .await?)
}

/// A recorded sample's outcome.
#[derive(Debug, Clone, FromRow)]
pub struct SampleOutcome {
    /// Question id.
    pub item_id: String,
    /// Sample number.
    pub sample_index: i64,
    /// correct, incorrect or unknown.
    pub verdict: String,
    /// Normalised answer.
    pub vote_key: Option<String>,
    /// Tokens generated.
    pub tokens: Option<i64>,
    /// Why generation stopped.
    pub finish_reason: Option<String>,
}

/// Every sample of a target, by question then sample.
pub async fn outcomes<'e>(
    ex: impl SqliteExecutor<'e>,
    stage_id: i64,
    target: &str,
) -> Result<Vec<SampleOutcome>> {
    Ok(sqlx::query_as(
        "SELECT item_id, sample_index, verdict, vote_key, tokens, finish_reason FROM eval_samples
         WHERE stage_id = ? AND target = ? ORDER BY item_id, sample_index",
    )
    .bind(stage_id)
    .bind(target)
    .fetch_all(ex)
    .await?)
}

/// A score to record.
#[derive(Debug, Clone)]
pub struct NewScore {
    /// What was evaluated.
    pub target: String,
    /// How tables name it.
    pub label: String,
    /// Training step, for checkpoints.
    pub step: Option<i64>,
    /// Benchmark name.
    pub benchmark: String,
    /// pass@1, pass@K, cons@K.
    pub metric: String,
    /// The value in [0, 1].
    pub value: f64,
    /// Standard error across questions.
    pub stderr: f64,
    /// Questions scored.
    pub questions: i64,
    /// Protocol JSON.
    pub protocol: String,
    /// Hash of the protocol.
    pub protocol_hash: String,
    /// Share of the samples that stopped on the token budget, of those whose finish
    /// reason is known.
    pub truncated: Option<f64>,
    /// Mean tokens generated per sample, of those whose count is known.
    pub mean_tokens: Option<f64>,
}

/// Records (or replaces) a score.
pub async fn upsert_score(tx: &mut WriteTx, stage_id: i64, s: &NewScore) -> Result<()> {
    sqlx::query(
        "INSERT INTO scores (stage_id, target, label, step, benchmark, metric, value, stderr,
             questions, protocol, protocol_hash, truncated, mean_tokens, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (stage_id, target, metric) DO UPDATE SET label = excluded.label,
             step = excluded.step, benchmark = excluded.benchmark, value = excluded.value,
             stderr = excluded.stderr, questions = excluded.questions,
             protocol = excluded.protocol, protocol_hash = excluded.protocol_hash,
             truncated = excluded.truncated, mean_tokens = excluded.mean_tokens,
             created_at = excluded.created_at",
    )
    .bind(stage_id)
    .bind(&s.target)
    .bind(&s.label)
    .bind(s.step)
    .bind(&s.benchmark)
    .bind(&s.metric)
    .bind(s.value)
    .bind(s.stderr)
    .bind(s.questions)
    .bind(&s.protocol)
    .bind(&s.protocol_hash)
    .bind(s.truncated)
    .bind(s.mean_tokens)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A row of `scores` with its stage's name.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct ScoreRow {
    /// The evaluate stage.
    pub stage: String,
    /// What was evaluated.
    pub target: String,
    /// How tables name it.
    pub label: String,
    /// Training step.
    pub step: Option<i64>,
    /// Benchmark.
    pub benchmark: String,
    /// Metric.
    pub metric: String,
    /// Value in [0, 1].
    pub value: f64,
    /// Standard error.
    pub stderr: f64,
    /// Questions.
    pub questions: i64,
    /// Protocol JSON.
    pub protocol: String,
    /// Protocol hash.
    pub protocol_hash: String,
    /// Share of samples stopped by the token budget (`None`: not known).
    pub truncated: Option<f64>,
    /// Mean tokens generated per sample (`None`: not known).
    pub mean_tokens: Option<f64>,
}

/// Every score of a run.
pub async fn scores_of_run<'e>(ex: impl SqliteExecutor<'e>, run_id: i64) -> Result<Vec<ScoreRow>> {
    Ok(sqlx::query_as(
        "SELECT s.name AS stage, c.target, c.label, c.step, c.benchmark, c.metric, c.value,
             c.stderr, c.questions, c.protocol, c.protocol_hash, c.truncated, c.mean_tokens
         FROM scores c JOIN stages s ON s.id = c.stage_id
         WHERE s.run_id = ? ORDER BY c.benchmark, c.protocol_hash, s.position, c.step, c.label, c.metric",
    )
    .bind(run_id)
    .fetch_all(ex)
    .await?)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

    use crate::Db;

    /// A database made before migration 0007 gets the truncated share and mean tokens
    /// of its existing scores from their samples.
    #[tokio::test]
    async fn scores_recorded_before_0007_are_backfilled_from_their_samples() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("migrations");
        std::fs::create_dir(&old).unwrap();
        let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        for entry in std::fs::read_dir(&here).unwrap() {
            let name = entry.unwrap().file_name();
            if name.to_string_lossy().as_ref() < "0007" {
                std::fs::copy(here.join(&name), old.join(&name)).unwrap();
            }
        }
        let path = dir.path().join("t.db");
        let pool = SqlitePoolOptions::new()
            .connect_with(
                SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
                    .unwrap()
                    .create_if_missing(true),
            )
            .await
            .unwrap();
        sqlx::migrate::Migrator::new(old.as_path())
            .await
            .unwrap()
            .run(&pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO runs (id, name, config_path, config, workdir, status, created_at, updated_at)
             VALUES (1, 'r', 'r.toml', '', '.', 'done', 0, 0);
             INSERT INTO stages (id, run_id, name, kind, position, needs, params, fingerprint, status)
             VALUES (1, 1, 'eval', 'evaluate', 0, '[]', '{}', 'f', 'done');
             INSERT INTO eval_samples (stage_id, target, item_id, sample_index, output, verdict,
                 tokens, finish_reason, created_at)
             VALUES (1, 'a', 'q1', 0, '', 'incorrect', 160, 'length', 0),
                    (1, 'a', 'q2', 0, '', 'correct', 40, 'stop', 0),
                    (1, 'a', 'q3', 0, '', 'correct', 40, 'stop', 0),
                    (1, 'a', 'q4', 0, '', 'correct', 40, 'stop', 0),
                    (1, 'b', 'q1', 0, '', 'correct', NULL, NULL, 0);
             INSERT INTO scores (stage_id, target, label, step, benchmark, metric, value, stderr,
                 questions, protocol, protocol_hash, created_at)
             VALUES (1, 'a', 'a', NULL, 'bench', 'pass@1', 0.75, 0.25, 4, '{}', 'h', 0),
                    (1, 'b', 'b', NULL, 'bench', 'pass@1', 1.0, 0.0, 1, '{}', 'h', 0);",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let db = Db::open(&path).await.unwrap();
        let rows = super::scores_of_run(db.pool(), 1).await.unwrap();
        let got: Vec<(&str, Option<f64>, Option<f64>)> = rows
            .iter()
            .map(|r| (r.target.as_str(), r.truncated, r.mean_tokens))
            .collect();
        assert_eq!(got, [("a", Some(0.25), Some(70.0)), ("b", None, None)]);
    }
}
