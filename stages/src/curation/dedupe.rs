//! The `dedupe` stage: exact (normalised-text hash) and near-duplicate (MinHash LSH,
//! the datatrove scheme) clusters; one item of each cluster is kept by a stated rule
//! and the others record the id of the one kept in their place.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use distill_curate::dedupe::{Lsh, MinHasher, UnionFind, exact_hash, representative};
use distill_db::verdicts::{Item, NewVerdict};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{check_needs, input_items, keep, summary, write_verdicts};
use crate::{BuildEnv, ParamError, Stage, StageContext, StageError, StageKind, parse_params};

/// The `dedupe` stage kind.
pub struct DedupeKind;

/// Which text is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum On {
    /// The response (reasoning and answer): drops repeated traces.
    Response,
    /// The prompt: near-identical prompts keep the samples of one of them only.
    Prompt,
    /// Prompt and response together.
    Both,
}

/// Which member of a cluster is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepRule {
    /// Verified correct first (by any upstream `verify` stage), then complete
    /// (not cut off at `max_tokens`), then the shortest trace, then the earliest.
    CorrectThenShortest,
    /// The shortest trace, then the earliest.
    Shortest,
    /// The earliest (prompt order, then sample).
    First,
}

/// Parameters of a `dedupe` stage.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DedupeParams {
    /// What is compared.
    #[serde(default = "default_on")]
    pub on: On,
    /// Drop exact duplicates (after lowercasing and stripping punctuation).
    #[serde(default = "yes")]
    pub exact: bool,
    /// Drop near duplicates (MinHash LSH).
    #[serde(default = "yes")]
    pub near: bool,
    /// Word n-gram size of the MinHash shingles.
    #[serde(default = "default_ngram")]
    pub ngram: usize,
    /// LSH bands; `bands * rows` hash functions in all.
    #[serde(default = "default_bands")]
    pub bands: usize,
    /// Rows per band.
    #[serde(default = "default_rows")]
    pub rows: usize,
    /// Seed of the hash functions.
    #[serde(default)]
    pub seed: u64,
    /// Which member of a cluster survives.
    #[serde(default = "default_keep")]
    pub keep: KeepRule,
}

fn default_on() -> On {
    On::Response
}
fn yes() -> bool {
    true
}
fn default_ngram() -> usize {
    5
}
fn default_bands() -> usize {
    14
}
fn default_rows() -> usize {
    8
}
fn default_keep() -> KeepRule {
    KeepRule::CorrectThenShortest
}

impl StageKind for DedupeKind {
    fn name(&self) -> &'static str {
        "dedupe"
    }
    fn about(&self) -> &'static str {
        "drop exact and near-duplicate traces (MinHash LSH), keeping one per cluster by rule"
    }
    fn version(&self) -> u32 {
        1
    }
    fn build(&self, params: toml::Table, env: &BuildEnv) -> Result<Arc<dyn Stage>, ParamError> {
        let p: DedupeParams = parse_params(params)?;
        check_needs(env)?;
        if !p.exact && !p.near {
            return Err(ParamError::new(
                "exact",
                "one of `exact` and `near` must be true",
            ));
        }
        MinHasher::new(p.bands * p.rows, p.ngram, p.seed)
            .map_err(|e| ParamError::new("ngram", e.to_string()))?;
        Lsh::new(p.bands, p.rows).map_err(|e| ParamError::new("bands", e.to_string()))?;
        Ok(Arc::new(Dedupe { params: p }))
    }
}

/// A configured `dedupe` stage.
#[derive(Debug)]
pub struct Dedupe {
    params: DedupeParams,
}

#[async_trait]
impl Stage for Dedupe {
    fn identity(&self) -> Result<Value, StageError> {
        Ok(serde_json::to_value(&self.params).expect("params serialise"))
    }

    async fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        // Clusters depend on every item, so all are clustered even when resuming;
        // verdicts already written are left as they are (the result is the same).
        let items = input_items(ctx).await?;
        ctx.progress.set_total(items.len() as u64);
        let labels = verify_labels(ctx, &items).await?;
        let params = self.params.clone();
        let verdicts = tokio::task::spawn_blocking(move || cluster(&params, &items, &labels))
            .await
            .map_err(|e| StageError::Failed(format!("dedupe task panicked: {e}")))?;
        write_verdicts(ctx, &verdicts).await?;
        summary(ctx).await
    }
}

/// Labels that `verify` stages of this run gave the items (for the keep rule).
async fn verify_labels(
    ctx: &StageContext,
    items: &[Item],
) -> Result<HashMap<i64, String>, StageError> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT v.generation_id, v.label FROM verdicts v JOIN stages s ON s.id = v.stage_id
         WHERE s.run_id = ? AND s.kind = 'verify' AND v.label IS NOT NULL",
    )
    .bind(ctx.run_id)
    .fetch_all(ctx.db.pool())
    .await?;
    let wanted: std::collections::HashSet<i64> = items.iter().map(|i| i.generation_id).collect();
    Ok(rows
        .into_iter()
        .filter(|(g, _)| wanted.contains(g))
        .collect())
}

/// Verdicts for every item: kept, or dropped in favour of its cluster's representative.
pub fn cluster(p: &DedupeParams, items: &[Item], labels: &HashMap<i64, String>) -> Vec<NewVerdict> {
    // Documents: one per item, or one per distinct prompt when comparing prompts.
    let (docs, doc_of_item): (Vec<String>, Vec<usize>) = match p.on {
        On::Prompt => {
            let mut index: HashMap<i64, usize> = HashMap::new();
            let mut docs = Vec::new();
            let doc_of = items
                .iter()
                .map(|it| {
                    *index.entry(it.prompt_id).or_insert_with(|| {
                        docs.push(it.prompt.clone());
                        docs.len() - 1
                    })
                })
                .collect();
            (docs, doc_of)
        }
        On::Response => (
            items
                .iter()
                .map(|i| format!("{}\n{}", i.reasoning, i.answer))
                .collect(),
            (0..items.len()).collect(),
        ),
        On::Both => (
            items
                .iter()
                .map(|i| format!("{}\n{}\n{}", i.prompt, i.reasoning, i.answer))
                .collect(),
            (0..items.len()).collect(),
        ),
    };

    let hashes: Vec<u128> = docs.iter().map(|d| exact_hash(d)).collect();
    let mut uf = UnionFind::new(docs.len());
    if p.exact {
        let mut first: HashMap<u128, usize> = HashMap::new();
        for (d, h) in hashes.iter().enumerate() {
            let f = *first.entry(*h).or_insert(d);
            uf.union(f, d);
        }
    }
    let mut signatures = Vec::new();
    if p.near {
        let hasher = MinHasher::new(p.bands * p.rows, p.ngram, p.seed).expect("checked in build");
        signatures = hasher.signatures(&docs);
        let mut lsh = Lsh::new(p.bands, p.rows).expect("checked in build");
        for (d, s) in signatures.iter().enumerate() {
            lsh.insert(d, s).expect("signature long enough");
        }
        for group in lsh.clusters() {
            for w in group.windows(2) {
                uf.union(w[0], w[1]);
            }
        }
    }

    // Items grouped by their document's cluster.
    let mut clusters: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, &d) in doc_of_item.iter().enumerate() {
        clusters.entry(uf.find(d)).or_default().push(i);
    }
    let rank = |i: usize| {
        let it = &items[i];
        let label = match labels.get(&it.generation_id).map(String::as_str) {
            Some("correct") => 0,
            Some("judge_correct") => 1,
            Some("unknown") | None => 2,
            Some(_) => 3,
        };
        let truncated = it.finish_reason.as_deref() == Some("length");
        let len = it.reasoning.len() + it.answer.len();
        match p.keep {
            KeepRule::CorrectThenShortest => (label, truncated, len, i),
            KeepRule::Shortest => (0, false, len, i),
            KeepRule::First => (0, false, 0, i),
        }
    };

    let mut verdicts = Vec::with_capacity(items.len());
    for members in clusters.values() {
        if p.on == On::Prompt {
            // Keep every sample of the representative prompt.
            let rep = representative(members, |i| (items[i].prompt_idx, i)).expect("non-empty");
            let rep_doc = doc_of_item[rep];
            for &i in members {
                if doc_of_item[i] == rep_doc {
                    verdicts.push(keep(&items[i]));
                } else {
                    verdicts.push(dropped(
                        p,
                        items,
                        &hashes,
                        &signatures,
                        &doc_of_item,
                        i,
                        rep,
                    ));
                }
            }
        } else {
            let rep = representative(members, rank).expect("non-empty");
            for &i in members {
                if i == rep {
                    verdicts.push(keep(&items[i]));
                } else {
                    verdicts.push(dropped(
                        p,
                        items,
                        &hashes,
                        &signatures,
                        &doc_of_item,
                        i,
                        rep,
                    ));
                }
            }
        }
    }
    verdicts.sort_by_key(|v| v.generation_id);
    verdicts
}

fn dropped(
    p: &DedupeParams,
    items: &[Item],
    hashes: &[u128],
    signatures: &[distill_curate::dedupe::Signature],
    doc_of_item: &[usize],
    i: usize,
    rep: usize,
) -> NewVerdict {
    let (d, r) = (doc_of_item[i], doc_of_item[rep]);
    let (reason, detail) = if hashes[d] == hashes[r] {
        (
            "exact_duplicate",
            format!(
                "same normalised {:?} text as generation {}",
                p.on, items[rep].generation_id
            ),
        )
    } else {
        let j = signatures
            .get(d)
            .zip(signatures.get(r))
            .map(|(a, b)| a.jaccard_estimate(b))
            .unwrap_or(0.0);
        (
            "near_duplicate",
            format!(
                "near-duplicate {:?} of generation {} (estimated Jaccard {j:.2})",
                p.on, items[rep].generation_id
            ),
        )
    };
    NewVerdict {
        generation_id: items[i].generation_id,
        kept: false,
        reason: Some(reason.into()),
        detail: Some(detail.to_lowercase()),
        related_id: Some(items[rep].generation_id),
        ..NewVerdict::default()
    }
}
