//! GRPO figures per optimizer step and the rollouts kept for reading.

use serde::Serialize;
use sqlx::{FromRow, SqliteExecutor};

use crate::{Result, WriteTx, now_ms};

/// One GRPO optimizer step's figures.
#[derive(Debug, Clone, PartialEq, FromRow, Serialize)]
pub struct GrpoStep {
    /// Step number, from 1.
    pub step: i64,
    /// The generated batch it learned from (0-based).
    pub batch: i64,
    /// Mean reward of the batch's completions.
    pub reward_mean: f64,
    /// Their standard deviation.
    pub reward_std: f64,
    /// Fraction judged correct by the verifier.
    pub pass_rate: f64,
    /// Fraction of groups whose rewards were all equal.
    pub zero_std_groups: f64,
    /// Mean per-token KL to the reference (with β > 0).
    pub kl: Option<f64>,
    /// Fraction of completion tokens whose ratio was clipped.
    pub clip_fraction: f64,
    /// Mean completion length in tokens.
    pub completion_tokens: f64,
    /// Mean per-token entropy of the policy.
    pub entropy: f64,
    /// The surrogate loss.
    pub loss: f64,
}

/// Records a step (a step redone after a resume replaces its earlier row).
pub async fn record_step(tx: &mut WriteTx, stage_id: i64, s: &GrpoStep) -> Result<()> {
    sqlx::query(
        "INSERT OR REPLACE INTO grpo_steps (stage_id, step, batch, reward_mean, reward_std,
             pass_rate, zero_std_groups, kl, clip_fraction, completion_tokens, entropy, loss,
             created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(stage_id)
    .bind(s.step)
    .bind(s.batch)
    .bind(s.reward_mean)
    .bind(s.reward_std)
    .bind(s.pass_rate)
    .bind(s.zero_std_groups)
    .bind(s.kl)
    .bind(s.clip_fraction)
    .bind(s.completion_tokens)
    .bind(s.entropy)
    .bind(s.loss)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Every step of a stage, in order.
pub async fn steps<'e>(ex: impl SqliteExecutor<'e>, stage_id: i64) -> Result<Vec<GrpoStep>> {
    Ok(sqlx::query_as(
        "SELECT step, batch, reward_mean, reward_std, pass_rate, zero_std_groups, kl,
             clip_fraction, completion_tokens, entropy, loss
         FROM grpo_steps WHERE stage_id = ? ORDER BY step",
    )
    .bind(stage_id)
    .fetch_all(ex)
    .await?)
}

/// A rollout kept for reading.
#[derive(Debug, Clone, PartialEq, FromRow, Serialize)]
pub struct Rollout {
    /// The generated batch.
    pub batch: i64,
    /// Its prompt.
    pub prompt_id: i64,
    /// Completion number within the prompt's group.
    pub sample: i64,
    /// The completion text.
    pub completion: String,
    /// Its reward.
    pub reward: f64,
    /// The verifier's verdict.
    pub verdict: String,
    /// Completion tokens.
    pub tokens: i64,
}

/// Records rollouts (replacing those of a batch redone after a resume).
pub async fn record_rollouts(tx: &mut WriteTx, stage_id: i64, rows: &[Rollout]) -> Result<()> {
    for r in rows {
        sqlx::query(
            "INSERT OR REPLACE INTO grpo_rollouts (stage_id, batch, prompt_id, sample,
                 completion, reward, verdict, tokens)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(stage_id)
        .bind(r.batch)
        .bind(r.prompt_id)
        .bind(r.sample)
        .bind(&r.completion)
        .bind(r.reward)
        .bind(&r.verdict)
        .bind(r.tokens)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// A kept rollout with its prompt, for `distill traces`.
#[derive(Debug, Clone, PartialEq, FromRow, Serialize)]
pub struct RolloutTrace {
    /// The generated batch.
    pub batch: i64,
    /// The prompt's id in its source file.
    pub source_id: String,
    /// The prompt text.
    pub prompt: String,
    /// Reference answer.
    pub reference: Option<String>,
    /// Completion number within the group.
    pub sample: i64,
    /// The completion text.
    pub completion: String,
    /// Its reward.
    pub reward: f64,
    /// The verifier's verdict.
    pub verdict: String,
    /// Completion tokens.
    pub tokens: i64,
}

/// Kept rollouts of a stage, newest batch first, at most `limit`.
pub async fn rollouts<'e>(
    ex: impl SqliteExecutor<'e>,
    stage_id: i64,
    limit: i64,
) -> Result<Vec<RolloutTrace>> {
    Ok(sqlx::query_as(
        "SELECT r.batch, p.source_id, p.prompt, p.answer AS reference, r.sample, r.completion,
             r.reward, r.verdict, r.tokens
         FROM grpo_rollouts r JOIN prompts p ON p.id = r.prompt_id
         WHERE r.stage_id = ? ORDER BY r.batch DESC, r.prompt_id, r.sample LIMIT ?",
    )
    .bind(stage_id)
    .bind(limit)
    .fetch_all(ex)
    .await?)
}
