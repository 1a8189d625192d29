//! The pipeline config (TOML): parsing and validation into a [`Pipeline`].
//!
//! Validation happens before the job database is opened, so a bad config never
//! changes it. Every problem found is reported at once, each naming its stage and
//! field.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use distill_stages::{BuildEnv, Registry, Stage, parse_params};
use distill_teacher::TeacherConfig;
use serde::{Deserialize, Serialize};

use crate::dag;

/// The `[run]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Name of the run; running the same config again continues this run.
    pub name: String,
    /// Job database; default `./distill.db` (relative to the working directory).
    #[serde(default)]
    pub db: Option<PathBuf>,
    /// Where checkpoints and exports go: `<artifacts>/<run name>/<stage>/`.
    #[serde(default = "default_artifacts")]
    pub artifacts: PathBuf,
    /// Free text shown by `distill runs`.
    #[serde(default)]
    pub description: Option<String>,
}

fn default_artifacts() -> PathBuf {
    PathBuf::from("runs")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    run: RunSection,
    #[serde(default)]
    teacher: BTreeMap<String, toml::Table>,
    #[serde(default)]
    stage: Vec<toml::Table>,
}

/// A stage of a validated pipeline.
#[derive(Debug, Clone)]
pub struct PlannedStage {
    /// Name from the config.
    pub name: String,
    /// Stage kind.
    pub kind: String,
    /// Version of the kind's code.
    pub kind_version: u32,
    /// Names of the stages it needs.
    pub needs: Vec<String>,
    /// The runnable stage.
    pub stage: Arc<dyn Stage>,
}

/// A validated pipeline: stages in a topological order.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The `[run]` table.
    pub run: RunSection,
    /// `[teacher.*]` endpoints by name.
    pub teachers: BTreeMap<String, TeacherConfig>,
    /// Stages, each after everything it needs.
    pub stages: Vec<PlannedStage>,
    /// The config text.
    pub text: String,
    /// The config file.
    pub path: PathBuf,
    /// Directory that relative paths resolve against (the working directory at `run`).
    pub workdir: PathBuf,
}

/// Why a config was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {}: {source}", .path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax, or a wrong key or type outside the stages.
    #[error("invalid config {}: {message}", .path.display())]
    Syntax {
        /// The config file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// One or more problems with the stages.
    #[error("invalid config {}:\n{}", .path.display(), .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Each problem, naming its stage and field.
        problems: Vec<String>,
    },
}

/// Reads and validates the config at `path`; relative paths inside it resolve against `workdir`.
pub fn load(path: &Path, workdir: &Path, registry: &Registry) -> Result<Pipeline, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path, workdir, registry)
}

/// Validates config `text` (read from `path`, named in messages).
pub fn parse(
    text: &str,
    path: &Path,
    workdir: &Path,
    registry: &Registry,
) -> Result<Pipeline, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let invalid = |problems: Vec<String>| ConfigError::Invalid {
        path: path.to_path_buf(),
        problems,
    };

    let mut problems = Vec::new();
    let mut teachers = BTreeMap::new();
    for (name, table) in raw.teacher {
        match parse_params::<TeacherConfig>(table) {
            Ok(t) => match t.validate() {
                Ok(()) => {
                    teachers.insert(name, t);
                }
                Err(e) => problems.push(format!("[teacher.{name}]: {e}")),
            },
            Err(e) => problems.push(format!("[teacher.{name}]: {}: {}", e.field, e.message)),
        }
    }
    if raw.run.name.trim().is_empty() {
        problems.push("[run] name: must not be empty".to_string());
    }
    if raw.stage.is_empty() {
        problems.push("no [[stage]] tables: a pipeline needs at least one stage".to_string());
    }

    // Name, kind and needs of every stage first: the DAG checks need all of them.
    let mut decls = Vec::new();
    for (i, table) in raw.stage.into_iter().enumerate() {
        match split_stage(i, table) {
            Ok(d) => decls.push(d),
            Err(p) => problems.push(p),
        }
    }
    let mut names = BTreeSet::new();
    for d in &decls {
        if !names.insert(d.name.clone()) {
            problems.push(format!("stage `{}`: duplicate name", d.name));
        }
        if registry.get(&d.kind).is_none() {
            let known: Vec<_> = registry.kinds().map(|k| k.name()).collect();
            problems.push(format!(
                "stage `{}`: kind: unknown stage kind `{}` (known: {})",
                d.name,
                d.kind,
                known.join(", ")
            ));
        }
        for need in &d.needs {
            if !decls.iter().any(|o| &o.name == need) {
                problems.push(format!(
                    "stage `{}`: needs: no stage named `{need}`",
                    d.name
                ));
            } else if need == &d.name {
                problems.push(format!(
                    "stage `{}`: needs: a stage cannot need itself",
                    d.name
                ));
            }
        }
    }
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    let edges: Vec<(String, Vec<String>)> = decls
        .iter()
        .map(|d| (d.name.clone(), d.needs.clone()))
        .collect();
    let order = dag::topological_order(&edges).map_err(|cycle| {
        invalid(vec![format!(
            "needs: cycle between stages: {}",
            cycle
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(" → ")
        )])
    })?;

    let kinds: BTreeMap<String, String> = decls
        .iter()
        .map(|d| (d.name.clone(), d.kind.clone()))
        .collect();
    let mut stages = Vec::with_capacity(decls.len());
    for idx in order {
        let d = &decls[idx];
        let kind = registry.get(&d.kind).expect("kinds checked above");
        let env = BuildEnv {
            workdir: workdir.to_path_buf(),
            teachers: teachers.clone(),
            stages: kinds.clone(),
            needs: d
                .needs
                .iter()
                .map(|n| (n.clone(), kinds[n].clone()))
                .collect(),
        };
        match kind.build(d.params.clone(), &env) {
            Ok(stage) => stages.push(PlannedStage {
                name: d.name.clone(),
                kind: d.kind.clone(),
                kind_version: kind.version(),
                needs: d.needs.clone(),
                stage,
            }),
            Err(e) => problems.push(format!(
                "stage `{}` ({}): {}: {}",
                d.name, d.kind, e.field, e.message
            )),
        }
    }
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    Ok(Pipeline {
        run: raw.run,
        teachers,
        stages,
        text: text.to_string(),
        path: path.to_path_buf(),
        workdir: workdir.to_path_buf(),
    })
}

struct StageDecl {
    name: String,
    kind: String,
    needs: Vec<String>,
    params: toml::Table,
}

/// Takes the keys every stage has out of its table; the rest are the kind's parameters.
fn split_stage(i: usize, mut table: toml::Table) -> Result<StageDecl, String> {
    let name = match table.remove("name") {
        Some(toml::Value::String(s)) if !s.trim().is_empty() => s,
        Some(toml::Value::String(_)) => {
            return Err(format!("stage #{}: name: must not be empty", i + 1));
        }
        Some(v) => {
            return Err(format!(
                "stage #{}: name: expected a string, found {}",
                i + 1,
                v.type_str()
            ));
        }
        None => return Err(format!("stage #{}: name: missing", i + 1)),
    };
    let kind = match table.remove("kind") {
        Some(toml::Value::String(s)) => s,
        Some(v) => {
            return Err(format!(
                "stage `{name}`: kind: expected a string, found {}",
                v.type_str()
            ));
        }
        None => return Err(format!("stage `{name}`: kind: missing")),
    };
    let needs = match table.remove("needs") {
        None => Vec::new(),
        Some(toml::Value::String(s)) => vec![s],
        Some(toml::Value::Array(items)) => {
            let mut out = Vec::new();
            for v in items {
                match v {
                    toml::Value::String(s) => out.push(s),
                    other => {
                        return Err(format!(
                            "stage `{name}`: needs: expected stage names, found {}",
                            other.type_str()
                        ));
                    }
                }
            }
            out
        }
        Some(v) => {
            return Err(format!(
                "stage `{name}`: needs: expected a list of stage names, found {}",
                v.type_str()
            ));
        }
    };
    Ok(StageDecl {
        name,
        kind,
        needs,
        params: table,
    })
}
