//! Curation verdicts and the items that flow between curation stages.

use serde::Serialize;
use sqlx::{FromRow, SqliteExecutor};

use crate::{Result, WriteTx, now_ms};

/// A verdict to record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewVerdict {
    /// The generation judged.
    pub generation_id: i64,
    /// Kept or dropped.
    pub kept: bool,
    /// Why dropped (stable snake_case name).
    pub reason: Option<String>,
    /// Explanation for people.
    pub detail: Option<String>,
    /// A stage-specific label (verify: correct, incorrect, unknown, ...).
    pub label: Option<String>,
    /// Verify: the extracted answer.
    pub extracted: Option<String>,
    /// Dedupe: the generation kept in this one's place.
    pub related_id: Option<i64>,
}

/// Writes a verdict; an existing one for the same item is left as it is.
pub async fn insert(tx: &mut WriteTx, stage_id: i64, v: &NewVerdict) -> Result<()> {
    sqlx::query(
        "INSERT OR IGNORE INTO verdicts (stage_id, generation_id, kept, reason, detail, label,
             extracted, related_id, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(stage_id)
    .bind(v.generation_id)
    .bind(v.kept)
    .bind(&v.reason)
    .bind(&v.detail)
    .bind(&v.label)
    .bind(&v.extracted)
    .bind(v.related_id)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Generations a stage already judged.
pub async fn judged<'e>(ex: impl SqliteExecutor<'e>, stage_id: i64) -> Result<Vec<i64>> {
    Ok(
        sqlx::query_scalar("SELECT generation_id FROM verdicts WHERE stage_id = ?")
            .bind(stage_id)
            .fetch_all(ex)
            .await?,
    )
}

/// A generation with its prompt: what curation stages and the trainer consume.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Item {
    /// The generation's id.
    pub generation_id: i64,
    /// Its prompt's id.
    pub prompt_id: i64,
    /// The prompt's position in its load stage.
    pub prompt_idx: i64,
    /// The prompt's id in its source file.
    pub source_id: String,
    /// Sample number.
    pub sample_index: i64,
    /// The prompt text.
    pub prompt: String,
    /// Reference answer.
    pub reference: Option<String>,
    /// Reasoning.
    pub reasoning: String,
    /// Answer.
    pub answer: String,
    /// Finish reason.
    pub finish_reason: Option<String>,
    /// Completion tokens, when the server counted them.
    pub completion_tokens: Option<i64>,
    /// The generate stage that produced it.
    pub generate_stage_id: i64,
}

const ITEM_COLUMNS: &str = "g.id AS generation_id, g.prompt_id, p.idx AS prompt_idx, p.source_id,
     g.sample_index, p.prompt, p.answer AS reference, COALESCE(g.reasoning, '') AS reasoning,
     COALESCE(g.answer, '') AS answer, g.finish_reason, g.completion_tokens,
     g.stage_id AS generate_stage_id";

/// Successful generations of a generate stage, in prompt order.
pub async fn items_of_generate<'e>(
    ex: impl SqliteExecutor<'e>,
    stage_id: i64,
) -> Result<Vec<Item>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {ITEM_COLUMNS} FROM generations g JOIN prompts p ON p.id = g.prompt_id
         WHERE g.stage_id = ? AND g.status = 'ok' ORDER BY p.idx, g.sample_index"
    ))
    .bind(stage_id)
    .fetch_all(ex)
    .await?)
}

/// Generations a curation stage kept, in prompt order.
pub async fn items_kept_by<'e>(ex: impl SqliteExecutor<'e>, stage_id: i64) -> Result<Vec<Item>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {ITEM_COLUMNS} FROM verdicts v
         JOIN generations g ON g.id = v.generation_id
         JOIN prompts p ON p.id = g.prompt_id
         WHERE v.stage_id = ? AND v.kept = 1 ORDER BY p.idx, g.sample_index"
    ))
    .bind(stage_id)
    .fetch_all(ex)
    .await?)
}

/// Counts of a curation stage's verdicts: kept, and dropped by reason.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// Items kept.
    pub kept: i64,
    /// Items dropped, by reason.
    pub dropped: Vec<(String, i64)>,
}

/// Kept and dropped-by-reason counts of a stage.
pub async fn counts<'e>(ex: impl SqliteExecutor<'e>, stage_id: i64) -> Result<Counts> {
    let rows: Vec<(bool, Option<String>, i64)> = sqlx::query_as(
        "SELECT kept, reason, COUNT(*) FROM verdicts WHERE stage_id = ?
         GROUP BY kept, reason ORDER BY kept DESC, COUNT(*) DESC, reason",
    )
    .bind(stage_id)
    .fetch_all(ex)
    .await?;
    let mut c = Counts::default();
    for (kept, reason, n) in rows {
        if kept {
            c.kept += n;
        } else {
            c.dropped
                .push((reason.unwrap_or_else(|| "unspecified".into()), n));
        }
    }
    Ok(c)
}

/// Labels a verify stage gave, by generation (for keep rules downstream).
pub async fn labels<'e>(ex: impl SqliteExecutor<'e>, stage_id: i64) -> Result<Vec<(i64, String)>> {
    Ok(sqlx::query_as(
        "SELECT generation_id, label FROM verdicts WHERE stage_id = ? AND label IS NOT NULL",
    )
    .bind(stage_id)
    .fetch_all(ex)
    .await?)
}

/// A dropped (or kept) item with its verdict, for `distill traces --rejected`.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Judged {
    /// Stage that judged it.
    pub stage: String,
    /// The verdict's reason.
    pub reason: Option<String>,
    /// The verdict's detail.
    pub detail: Option<String>,
    /// The verify label.
    pub label: Option<String>,
    /// The extracted answer.
    pub extracted: Option<String>,
    /// The generation kept in its place.
    pub related_id: Option<i64>,
    /// The item.
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub item: Item,
}

/// Items dropped by curation stages of a run, optionally for one stage or reason.
pub async fn rejected<'e>(
    ex: impl SqliteExecutor<'e>,
    run_id: i64,
    stage: Option<&str>,
    reason: Option<&str>,
    limit: i64,
) -> Result<Vec<Judged>> {
    Ok(sqlx::query_as(&format!(
        "SELECT s.name AS stage, v.reason, v.detail, v.label, v.extracted, v.related_id,
             {ITEM_COLUMNS}
         FROM verdicts v
         JOIN stages s ON s.id = v.stage_id
         JOIN generations g ON g.id = v.generation_id
         JOIN prompts p ON p.id = g.prompt_id
         WHERE s.run_id = ? AND v.kept = 0 AND (? IS NULL OR s.name = ?)
             AND (? IS NULL OR v.reason = ?)
         ORDER BY s.position, p.idx, g.sample_index LIMIT ?"
    ))
    .bind(run_id)
    .bind(stage)
    .bind(stage)
    .bind(reason)
    .bind(reason)
    .bind(limit)
    .fetch_all(ex)
    .await?)
}
