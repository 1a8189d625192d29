//! Prompts produced by `load` stages: the items every later stage descends from.

use serde::Serialize;
use sqlx::{FromRow, SqliteExecutor};

use crate::{Result, WriteTx};

/// A prompt to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct NewPrompt {
    /// Id from the source file, else the record number.
    pub source_id: String,
    /// The prompt text.
    pub prompt: String,
    /// Reference answer, when the file has one.
    pub answer: Option<String>,
    /// Hash of prompt and answer, for deduplication and provenance.
    pub content_hash: String,
    /// The record's other fields, as JSON text.
    pub extra: Option<String>,
}

/// A row of `prompts`.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Prompt {
    /// Row id, referenced by later stages' items.
    pub id: i64,
    /// The stage that produced it.
    pub stage_id: i64,
    /// Position in the stage's output order.
    pub idx: i64,
    /// Id from the source file, else the record number.
    pub source_id: String,
    /// The prompt text.
    pub prompt: String,
    /// Reference answer.
    pub answer: Option<String>,
    /// Hash of prompt and answer.
    pub content_hash: String,
    /// Other fields of the record, as JSON text.
    pub extra: Option<String>,
}

/// Writes one prompt at position `idx` of `stage_id`.
pub async fn insert(tx: &mut WriteTx, stage_id: i64, idx: i64, p: &NewPrompt) -> Result<()> {
    sqlx::query(
        "INSERT INTO prompts (stage_id, idx, source_id, prompt, answer, content_hash, extra)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(stage_id)
    .bind(idx)
    .bind(&p.source_id)
    .bind(&p.prompt)
    .bind(&p.answer)
    .bind(&p.content_hash)
    .bind(&p.extra)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Writes prompts at positions `first_idx..` of `stage_id` (an import's chunk) and returns
/// their row ids in order, one prepared statement stepped per row on the connection's
/// handle (`bulk`).
pub async fn insert_many(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    stage_id: i64,
    first_idx: i64,
    rows: &[NewPrompt],
) -> Result<Vec<i64>> {
    crate::bulk::with_handle(tx, |conn| {
        let mut stmt = conn.prepare(
            "INSERT INTO prompts (stage_id, idx, source_id, prompt, answer, content_hash, extra)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )?;
        let mut ids = Vec::with_capacity(rows.len());
        for (n, p) in rows.iter().enumerate() {
            ids.push(stmt.insert(rusqlite::params![
                stage_id,
                first_idx + n as i64,
                p.source_id,
                p.prompt,
                p.answer,
                p.content_hash,
                p.extra,
            ])?);
        }
        Ok(ids)
    })
    .await
}

/// Number of prompts a stage has written.
pub async fn count<'e>(ex: impl SqliteExecutor<'e>, stage_id: i64) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM prompts WHERE stage_id = ?")
            .bind(stage_id)
            .fetch_one(ex)
            .await?,
    )
}

/// Positions a stage has already written, ascending.
pub async fn indices<'e>(ex: impl SqliteExecutor<'e>, stage_id: i64) -> Result<Vec<i64>> {
    Ok(
        sqlx::query_scalar("SELECT idx FROM prompts WHERE stage_id = ? ORDER BY idx")
            .bind(stage_id)
            .fetch_all(ex)
            .await?,
    )
}

/// Every prompt of a stage in output order.
pub async fn list<'e>(ex: impl SqliteExecutor<'e>, stage_id: i64) -> Result<Vec<Prompt>> {
    Ok(sqlx::query_as::<_, Prompt>(
        "SELECT id, stage_id, idx, source_id, prompt, answer, content_hash, extra
         FROM prompts WHERE stage_id = ? ORDER BY idx",
    )
    .bind(stage_id)
    .fetch_all(ex)
    .await?)
}
