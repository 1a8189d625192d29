//! The `decontaminate` stage: drops items whose prompt shares a word n-gram (default
//! 8, as open-r1) with a benchmark problem, recording which benchmark item matched.
//! Without a `benchmarks` list it protects the standard math benchmarks shipped in
//! `data/benchmarks/`, compiled into the binary so the default works from any folder.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use distill_curate::decontaminate::NgramIndex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{check_needs, drop, keep, pending_items, summary, write_verdicts};
use crate::{BuildEnv, ParamError, Stage, StageContext, StageError, StageKind, parse_params};

/// Fields tried, in order, for a benchmark's problem text when none is named.
const PROBLEM_FIELDS: &[&str] = &["problem", "question", "prompt"];

/// The benchmarks protected when a stage names none: every evaluation set in
/// `data/benchmarks/` (open-r1 decontaminates against the standard math benchmarks by
/// default too). Embedded rather than read from the repository, which an installed
/// binary does not have.
const DEFAULT_BENCHMARKS: &[(&str, &[u8])] = &[
    (
        "math500",
        include_bytes!("../../../data/benchmarks/math500.jsonl"),
    ),
    (
        "aime24",
        include_bytes!("../../../data/benchmarks/aime24.jsonl"),
    ),
    (
        "aime25",
        include_bytes!("../../../data/benchmarks/aime25.jsonl"),
    ),
    (
        "amc23",
        include_bytes!("../../../data/benchmarks/amc23.jsonl"),
    ),
    (
        "gsm8k_test",
        include_bytes!("../../../data/benchmarks/gsm8k_test.jsonl"),
    ),
];

/// The `decontaminate` stage kind.
pub struct DecontaminateKind;

/// A benchmark file: a path, or a table naming the fields.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum BenchmarkSpec {
    /// A JSONL file whose problem field is found automatically.
    Path(PathBuf),
    /// A JSONL file with explicit fields.
    Table {
        /// The file.
        path: PathBuf,
        /// Name reported on a match; default: the file stem.
        #[serde(default)]
        name: Option<String>,
        /// Field holding the problem text.
        #[serde(default)]
        field: Option<String>,
        /// Field holding the item id; default: the line number.
        #[serde(default)]
        id_field: Option<String>,
    },
}

/// Parameters of a `decontaminate` stage.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DecontaminateParams {
    /// Benchmark JSONL files to protect; absent: the shipped math benchmarks
    /// (`DEFAULT_BENCHMARKS`).
    #[serde(default)]
    pub benchmarks: Option<Vec<BenchmarkSpec>>,
    /// Words per n-gram.
    #[serde(default = "default_ngram")]
    pub ngram: usize,
}

fn default_ngram() -> usize {
    8
}

impl StageKind for DecontaminateKind {
    fn name(&self) -> &'static str {
        "decontaminate"
    }
    fn about(&self) -> &'static str {
        "drop traces whose prompt shares a word n-gram with a benchmark problem"
    }
    fn version(&self) -> u32 {
        1
    }
    fn build(&self, params: toml::Table, env: &BuildEnv) -> Result<Arc<dyn Stage>, ParamError> {
        let p: DecontaminateParams = parse_params(params)?;
        check_needs(env)?;
        NgramIndex::new(p.ngram).map_err(|e| ParamError::new("ngram", e.to_string()))?;
        let files = match &p.benchmarks {
            None => DEFAULT_BENCHMARKS
                .iter()
                .map(|&(name, bytes)| BenchmarkFile {
                    source: Source::Embedded(bytes),
                    name: name.to_string(),
                    field: None,
                    id_field: None,
                })
                .collect(),
            Some(list) if list.is_empty() => {
                return Err(ParamError::new(
                    "benchmarks",
                    "list at least one benchmark file, or leave `benchmarks` out for the \
                     shipped math benchmarks",
                ));
            }
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(i, b)| benchmark_file(i, b, env))
                .collect::<Result<_, _>>()?,
        };
        Ok(Arc::new(Decontaminate {
            params: p,
            files,
            index: OnceLock::new(),
        }))
    }
}

fn benchmark_file(
    i: usize,
    b: &BenchmarkSpec,
    env: &BuildEnv,
) -> Result<BenchmarkFile, ParamError> {
    let (path, name, field, id_field) = match b {
        BenchmarkSpec::Path(p) => (p, None, None, None),
        BenchmarkSpec::Table {
            path,
            name,
            field,
            id_field,
        } => (path, name.clone(), field.clone(), id_field.clone()),
    };
    let resolved = env.resolve(path);
    if !resolved.is_file() {
        return Err(ParamError::new(
            format!("benchmarks[{i}]"),
            format!("no such file: {}", resolved.display()),
        ));
    }
    let name = name.unwrap_or_else(|| {
        resolved
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("benchmark{i}"))
    });
    Ok(BenchmarkFile {
        source: Source::File(resolved),
        name,
        field,
        id_field,
    })
}

/// Where a benchmark's lines come from.
#[derive(Debug)]
enum Source {
    /// A file named in the config.
    File(PathBuf),
    /// One of [`DEFAULT_BENCHMARKS`].
    Embedded(&'static [u8]),
}

#[derive(Debug)]
struct BenchmarkFile {
    source: Source,
    name: String,
    field: Option<String>,
    id_field: Option<String>,
}

/// A configured `decontaminate` stage.
#[derive(Debug)]
pub struct Decontaminate {
    params: DecontaminateParams,
    files: Vec<BenchmarkFile>,
    /// Built while fingerprinting, so an unreadable benchmark fails the run before
    /// anything is written; with the files' content hashes.
    index: OnceLock<(Vec<String>, NgramIndex)>,
}

impl Decontaminate {
    fn index(&self) -> Result<&(Vec<String>, NgramIndex), StageError> {
        if let Some(i) = self.index.get() {
            return Ok(i);
        }
        let mut index =
            NgramIndex::new(self.params.ngram).map_err(|e| StageError::Input(e.to_string()))?;
        let mut hashes = Vec::new();
        for f in &self.files {
            let (bytes, origin) = match &f.source {
                Source::File(path) => (
                    std::borrow::Cow::Owned(std::fs::read(path).map_err(|e| {
                        StageError::Input(format!("cannot read {}: {e}", path.display()))
                    })?),
                    path.display().to_string(),
                ),
                Source::Embedded(bytes) => (
                    std::borrow::Cow::Borrowed(*bytes),
                    format!("(shipped benchmark {})", f.name),
                ),
            };
            hashes.push(crate::hash::hex128(&bytes));
            let text = std::str::from_utf8(&bytes)
                .map_err(|e| StageError::Input(format!("{origin}: not UTF-8: {e}")))?;
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let at = || format!("{origin}:{}", n + 1);
                let v: Value = serde_json::from_str(line)
                    .map_err(|e| StageError::Input(format!("{}: malformed JSON: {e}", at())))?;
                let field = match &f.field {
                    Some(field) => field.as_str(),
                    None => PROBLEM_FIELDS
                        .iter()
                        .copied()
                        .find(|k| v.get(k).is_some())
                        .ok_or_else(|| {
                            StageError::Input(format!(
                                "{}: no problem field (tried {}; set `field`)",
                                at(),
                                PROBLEM_FIELDS.join(", ")
                            ))
                        })?,
                };
                let problem = v.get(field).and_then(Value::as_str).ok_or_else(|| {
                    StageError::Input(format!(
                        "{}: field `{field}` is missing or not a string",
                        at()
                    ))
                })?;
                let id = match &f.id_field {
                    Some(k) => match v.get(k) {
                        Some(Value::String(s)) => s.clone(),
                        Some(other @ Value::Number(_)) => other.to_string(),
                        _ => {
                            return Err(StageError::Input(format!(
                                "{}: field `{k}` is missing",
                                at()
                            )));
                        }
                    },
                    None => (n + 1).to_string(),
                };
                index.add(&f.name, &id, problem);
            }
        }
        Ok(self.index.get_or_init(|| (hashes, index)))
    }
}

#[async_trait]
impl Stage for Decontaminate {
    fn identity(&self) -> Result<Value, StageError> {
        let (hashes, _) = self.index()?;
        Ok(json!({ "ngram": self.params.ngram, "benchmarks": hashes }))
    }

    async fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let (_, index) = self.index()?;
        let (items, _) = pending_items(ctx).await?;
        let mut by_prompt: HashMap<i64, Option<String>> = HashMap::new();
        let verdicts: Vec<_> = items
            .iter()
            .map(|item| {
                let hit = by_prompt.entry(item.prompt_id).or_insert_with(|| {
                    index.find(&item.prompt).map(|m| {
                        format!(
                            "matches {} item {}: \"{}\"",
                            m.benchmark, m.item_id, m.ngram
                        )
                    })
                });
                match hit {
                    Some(detail) => drop(item, "contaminated", detail.clone()),
                    None => keep(item),
                }
            })
            .collect();
        write_verdicts(ctx, &verdicts).await?;
        let mut out = summary(ctx).await?;
        out["benchmarks"] = self.files.iter().map(|f| f.name.clone()).collect();
        if self.params.benchmarks.is_none() {
            out["default_benchmarks"] = true.into();
        }
        Ok(out)
    }

    fn notes(&self) -> Vec<String> {
        if self.params.benchmarks.is_some() {
            return Vec::new();
        }
        let names: Vec<&str> = DEFAULT_BENCHMARKS.iter().map(|(n, _)| *n).collect();
        vec![format!(
            "no `benchmarks` listed: protecting the shipped math benchmarks ({}); list files in \
             `benchmarks` to choose others",
            names.join(", ")
        )]
    }
}
