//! Curation stages (`verify`, `filter`, `dedupe`, `decontaminate`) and what they share.
//!
//! Items are generations. A curation stage reads the items its inputs produced (all
//! successful samples of a `generate` stage, or the items another curation stage
//! kept) and writes one verdict per item: kept, or dropped with a reason. Its output
//! is what it kept, so a chain of curation stages narrows the set step by step, and
//! `distill funnel` can say at each step how many went in, stayed, and why the rest
//! left.

pub mod decontaminate;
pub mod dedupe;
pub mod filter;
pub mod verify;

use distill_db::Db;
use distill_db::verdicts::{self, Item, NewVerdict};

use crate::generate::GENERATION_KINDS;
use crate::{BuildEnv, ParamError, StageContext, StageError};

/// Stage kinds that write verdicts.
pub const CURATION_KINDS: &[&str] = &["verify", "filter", "dedupe", "decontaminate"];

/// Verdicts per write transaction: large enough to be fast, small enough that an
/// interrupted stage keeps most of its work.
const BATCH: usize = 1000;

/// Checks that every stage a curation stage needs produces generations.
pub fn check_needs(env: &BuildEnv) -> Result<(), ParamError> {
    if env.needs.is_empty() {
        return Err(ParamError::new(
            "needs",
            "a curation stage needs a generate or import stage or another curation stage",
        ));
    }
    for (name, kind) in &env.needs {
        if !GENERATION_KINDS.contains(&kind.as_str()) && !CURATION_KINDS.contains(&kind.as_str()) {
            return Err(ParamError::new(
                "needs",
                format!(
                    "`{name}` is a {kind} stage; a curation stage needs generate, import or curation stages"
                ),
            ));
        }
    }
    Ok(())
}

/// The items a stage hands downstream: a generate (or import) stage's successful
/// samples, or what a curation stage kept (and so everything before it kept too).
pub async fn output_items(db: &Db, stage_id: i64, kind: &str) -> Result<Vec<Item>, StageError> {
    if GENERATION_KINDS.contains(&kind) {
        Ok(verdicts::items_of_generate(db.pool(), stage_id).await?)
    } else if CURATION_KINDS.contains(&kind) {
        Ok(verdicts::items_kept_by(db.pool(), stage_id).await?)
    } else {
        Err(StageError::Input(format!(
            "a {kind} stage produces no traces: name a generate, import or curation stage"
        )))
    }
}

/// The items flowing into this stage from all its inputs, in prompt order.
pub async fn input_items(ctx: &StageContext) -> Result<Vec<Item>, StageError> {
    let mut items = Vec::new();
    for input in &ctx.inputs {
        let mut got = output_items(&ctx.db, input.stage_id, &input.kind).await?;
        items.append(&mut got);
    }
    if ctx.inputs.len() > 1 {
        items.sort_by_key(|i| (i.generate_stage_id, i.prompt_idx, i.sample_index));
        items.dedup_by_key(|i| i.generation_id);
    }
    Ok(items)
}

/// The input items this stage has not judged yet, and the count of those it has.
pub async fn pending_items(ctx: &StageContext) -> Result<(Vec<Item>, usize), StageError> {
    let items = input_items(ctx).await?;
    let judged: std::collections::HashSet<i64> = verdicts::judged(ctx.db.pool(), ctx.stage_id)
        .await?
        .into_iter()
        .collect();
    ctx.progress.set_total(items.len() as u64);
    let done = items
        .iter()
        .filter(|i| judged.contains(&i.generation_id))
        .count();
    ctx.progress.set_done(done as u64);
    let pending = items
        .into_iter()
        .filter(|i| !judged.contains(&i.generation_id))
        .collect();
    Ok((pending, done))
}

/// Writes verdicts in batches, one transaction each, stopping between batches on Ctrl-C.
pub async fn write_verdicts(ctx: &StageContext, verdicts: &[NewVerdict]) -> Result<(), StageError> {
    for chunk in verdicts.chunks(BATCH) {
        ctx.check_cancelled()?;
        let mut tx = ctx.db.write().await?;
        for v in chunk {
            verdicts::insert(&mut tx, ctx.stage_id, v).await?;
        }
        tx.commit().await?;
        ctx.progress.inc(chunk.len() as u64);
    }
    Ok(())
}

/// The stage summary: items in, kept, and dropped by reason.
pub async fn summary(ctx: &StageContext) -> Result<serde_json::Value, StageError> {
    let c = verdicts::counts(ctx.db.pool(), ctx.stage_id).await?;
    let dropped: serde_json::Map<String, serde_json::Value> = c
        .dropped
        .iter()
        .map(|(r, n)| (r.clone(), (*n).into()))
        .collect();
    let total_dropped: i64 = c.dropped.iter().map(|(_, n)| n).sum();
    Ok(serde_json::json!({
        "in": c.kept + total_dropped,
        "kept": c.kept,
        "dropped": dropped,
    }))
}

/// A dropped verdict.
pub fn drop(item: &Item, reason: &str, detail: impl Into<String>) -> NewVerdict {
    NewVerdict {
        generation_id: item.generation_id,
        kept: false,
        reason: Some(reason.to_string()),
        detail: Some(detail.into()),
        ..NewVerdict::default()
    }
}

/// A kept verdict.
pub fn keep(item: &Item) -> NewVerdict {
    NewVerdict {
        generation_id: item.generation_id,
        kept: true,
        ..NewVerdict::default()
    }
}
