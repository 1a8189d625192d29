//! Stage fingerprints: what decides whether finished work can be reused.

use std::collections::HashMap;

use distill_stages::StageError;
use serde_json::json;

use crate::config::Pipeline;

/// A stage's inputs are unreadable or malformed.
#[derive(Debug, thiserror::Error)]
#[error("stage `{stage}`: {source}")]
pub struct FingerprintError {
    /// The stage.
    pub stage: String,
    /// What is wrong with its input.
    pub source: StageError,
}

/// Fingerprints of every stage, in the pipeline's (topological) order.
///
/// fingerprint = hash(kind, kind's code version, the stage's identity (resolved
/// parameters and input contents), and the fingerprints of the stages it needs).
/// A change anywhere upstream therefore changes every fingerprint below it.
///
/// Stages read and check their inputs here, before anything is written.
/// Returns each stage's fingerprint with the identity it hashed (recorded as the
/// stage's resolved parameters).
pub fn fingerprints(
    pipeline: &Pipeline,
) -> Result<Vec<(String, serde_json::Value)>, FingerprintError> {
    let mut by_name: HashMap<&str, String> = HashMap::new();
    let mut out = Vec::with_capacity(pipeline.stages.len());
    for s in &pipeline.stages {
        s.stage.preflight().map_err(|source| FingerprintError {
            stage: s.name.clone(),
            source,
        })?;
        let identity = s.stage.identity().map_err(|source| FingerprintError {
            stage: s.name.clone(),
            source,
        })?;
        let needs: Vec<_> = s
            .needs
            .iter()
            .map(|n| json!([n, by_name[n.as_str()]]))
            .collect();
        let doc = json!({
            "kind": s.kind,
            "version": s.kind_version,
            "identity": &identity,
            "needs": needs,
        });
        // serde_json maps are ordered by key, so the text is canonical.
        let fp = distill_stages::hash::hex128(doc.to_string().as_bytes());
        by_name.insert(&s.name, fp.clone());
        out.push((fp, identity));
    }
    Ok(out)
}
