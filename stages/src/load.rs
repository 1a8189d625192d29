//! The `load` stage: prompts (and reference answers) from a JSONL file, a JSON array or
//! a Parquet file.
//!
//! The whole file is parsed and checked before anything is written, and written in
//! one transaction: a malformed line is an error naming file and line, and nothing
//! from that file is committed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use distill_db::prompts::{self, NewPrompt};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{BuildEnv, ParamError, Stage, StageContext, StageError, StageKind, parse_params};

/// The `load` stage kind.
pub struct LoadKind;

/// Parameters of a `load` stage.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoadParams {
    /// The file: `.jsonl` (one JSON object per line), `.json` (an array of objects) or
    /// `.parquet`.
    pub path: PathBuf,
    /// `auto` (`.parquet` by extension, else by content: a leading `[` means a JSON
    /// array), `jsonl`, `json` or `parquet`.
    #[serde(default)]
    pub format: Format,
    /// Field holding the prompt text.
    #[serde(default = "default_prompt_field")]
    pub prompt_field: String,
    /// Field holding the reference answer; records without it get no answer.
    #[serde(default = "default_answer_field")]
    pub answer_field: String,
    /// Field holding a unique id; by default the record number (from 1).
    #[serde(default)]
    pub id_field: Option<String>,
    /// Keep at most this many records (after shuffling, when a seed is given).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Shuffle the records with this seed before `limit`.
    #[serde(default)]
    pub shuffle_seed: Option<u64>,
}

/// File format of a `load` stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Decide from the first non-blank byte.
    #[default]
    Auto,
    /// One JSON object per line.
    Jsonl,
    /// A JSON array of objects.
    Json,
    /// Apache Parquet: one record per row, nested columns as JSON.
    Parquet,
}

/// Default `prompt_field` (also of `evaluate`).
pub(crate) fn default_prompt_field() -> String {
    "problem".into()
}
/// Default `answer_field` (also of `evaluate`).
pub(crate) fn default_answer_field() -> String {
    "answer".into()
}

impl StageKind for LoadKind {
    fn name(&self) -> &'static str {
        "load"
    }
    fn about(&self) -> &'static str {
        "read prompts and reference answers from a JSONL file, a JSON array or a Parquet file"
    }
    fn version(&self) -> u32 {
        1
    }
    fn build(&self, params: toml::Table, env: &BuildEnv) -> Result<Arc<dyn Stage>, ParamError> {
        let params: LoadParams = parse_params(params)?;
        if !env.needs.is_empty() {
            return Err(ParamError::new(
                "needs",
                "a load stage reads a file and needs no other stage",
            ));
        }
        if params.prompt_field.is_empty() {
            return Err(ParamError::new("prompt_field", "must not be empty"));
        }
        if params.limit == Some(0) {
            return Err(ParamError::new("limit", "must be at least 1"));
        }
        let file = env.resolve(&params.path);
        if !file.is_file() {
            return Err(ParamError::new(
                "path",
                format!("no such file: {}", file.display()),
            ));
        }
        Ok(Arc::new(Load {
            params,
            file,
            loaded: OnceLock::new(),
        }))
    }
}

/// A configured `load` stage.
#[derive(Debug)]
pub struct Load {
    params: LoadParams,
    file: PathBuf,
    /// The parsed file: parsed while fingerprinting, before the database is touched,
    /// so that a malformed file fails the run without changing anything.
    loaded: OnceLock<(String, Arc<Loaded>)>,
}

impl Load {
    fn loaded(&self) -> Result<&(String, Arc<Loaded>), StageError> {
        if let Some(l) = self.loaded.get() {
            return Ok(l);
        }
        let bytes = std::fs::read(&self.file).map_err(|e| read_error(&self.file, e))?;
        let hash = crate::hash::hex128(&bytes);
        let loaded = read_prompts_from(&self.file, &bytes, &self.params)?;
        Ok(self.loaded.get_or_init(|| (hash, Arc::new(loaded))))
    }
}

#[async_trait]
impl Stage for Load {
    fn identity(&self) -> Result<Value, StageError> {
        let (content, _) = self.loaded()?;
        Ok(json!({ "params": self.params, "content": content }))
    }

    async fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let already = prompts::count(ctx.db.pool(), ctx.stage_id).await?;
        if already > 0 {
            // A previous attempt committed the file and died before marking the stage done.
            ctx.progress.set_total(already as u64);
            ctx.progress.set_done(already as u64);
            return Ok(json!({ "prompts": already }));
        }
        let loaded = self.loaded()?.1.clone();
        ctx.progress.set_total(loaded.prompts.len() as u64);
        ctx.check_cancelled()?;

        let mut tx = ctx.db.write().await?;
        for (idx, p) in loaded.prompts.iter().enumerate() {
            prompts::insert(&mut tx, ctx.stage_id, idx as i64, p).await?;
        }
        tx.commit().await?;
        ctx.progress.set_done(loaded.prompts.len() as u64);
        Ok(json!({
            "prompts": loaded.prompts.len(),
            "records_in_file": loaded.records,
            "without_answer": loaded.without_answer,
        }))
    }
}

/// What [`read_prompts`] found in a file.
#[derive(Debug)]
pub struct Loaded {
    /// Prompts to record, in output order.
    pub prompts: Vec<NewPrompt>,
    /// Records in the file.
    pub records: usize,
    /// Kept prompts that have no reference answer.
    pub without_answer: usize,
}

/// Reads, checks, shuffles and limits the records of a prompt file.
pub fn read_prompts(file: &Path, params: &LoadParams) -> Result<Loaded, StageError> {
    let bytes = std::fs::read(file).map_err(|e| read_error(file, e))?;
    read_prompts_from(file, &bytes, params)
}

/// [`read_prompts`] on the file's bytes, already read (`file` names it in errors).
pub fn read_prompts_from(
    file: &Path,
    bytes: &[u8],
    params: &LoadParams,
) -> Result<Loaded, StageError> {
    let parquet = params.format == Format::Parquet
        || (params.format == Format::Auto
            && crate::tabular::FileFormat::Auto.resolve(file)
                == crate::tabular::FileFormat::Parquet);
    let records = if parquet {
        crate::tabular::parquet_records(file, bytes::Bytes::copy_from_slice(bytes))?
            .into_iter()
            .enumerate()
            .map(|(i, r)| (Location::Row(i + 1), Value::Object(r)))
            .collect()
    } else {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| StageError::Input(format!("{}: not UTF-8 text: {e}", file.display())))?;
        parse_records(file, text, params.format)?
    };
    let n_records = records.len();
    if n_records == 0 {
        return Err(StageError::Input(format!(
            "{}: no records in the file",
            file.display()
        )));
    }

    let mut prompts = Vec::with_capacity(n_records);
    let mut seen_ids = std::collections::HashMap::new();
    let mut any_answer = false;
    for (loc, record) in records {
        let at = || loc.describe(file);
        let Value::Object(mut obj) = record else {
            return Err(StageError::Input(format!(
                "{}: expected a JSON object",
                at()
            )));
        };
        let prompt = match obj.remove(&params.prompt_field) {
            Some(Value::String(s)) if !s.trim().is_empty() => s,
            Some(Value::String(_)) => {
                return Err(StageError::Input(format!(
                    "{}: field `{}` is empty",
                    at(),
                    params.prompt_field
                )));
            }
            Some(other) => {
                return Err(StageError::Input(format!(
                    "{}: field `{}` must be a string, found {}",
                    at(),
                    params.prompt_field,
                    type_name(&other)
                )));
            }
            None => {
                return Err(StageError::Input(format!(
                    "{}: field `{}` is missing (set `prompt_field` to the field holding the prompt)",
                    at(),
                    params.prompt_field
                )));
            }
        };
        let answer = match obj.remove(&params.answer_field) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => Some(v.to_string()),
            Some(other) => {
                return Err(StageError::Input(format!(
                    "{}: field `{}` must be a string or a number, found {}",
                    at(),
                    params.answer_field,
                    type_name(&other)
                )));
            }
        };
        any_answer |= answer.is_some();
        let source_id = match &params.id_field {
            None => loc.number().to_string(),
            Some(field) => match obj.remove(field) {
                Some(Value::String(s)) => s,
                Some(v @ Value::Number(_)) => v.to_string(),
                Some(other) => {
                    return Err(StageError::Input(format!(
                        "{}: field `{field}` must be a string or a number, found {}",
                        at(),
                        type_name(&other)
                    )));
                }
                None => {
                    return Err(StageError::Input(format!(
                        "{}: field `{field}` is missing",
                        at()
                    )));
                }
            },
        };
        if let Some(first) = seen_ids.insert(source_id.clone(), loc) {
            return Err(StageError::Input(format!(
                "{}: id `{source_id}` repeats the one at {}",
                at(),
                first.describe(file)
            )));
        }
        let content_hash = crate::hash::hex128(
            format!("{prompt}\u{0}{}", answer.as_deref().unwrap_or("")).as_bytes(),
        );
        let extra = (!obj.is_empty()).then(|| Value::Object(obj).to_string());
        prompts.push(NewPrompt {
            source_id,
            prompt,
            answer,
            content_hash,
            extra,
        });
    }
    if !any_answer && params.answer_field != default_answer_field() {
        return Err(StageError::Input(format!(
            "{}: no record has the answer field `{}`",
            file.display(),
            params.answer_field
        )));
    }

    if let Some(seed) = params.shuffle_seed {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        prompts.shuffle(&mut rng);
    }
    if let Some(limit) = params.limit {
        prompts.truncate(limit);
    }
    let without_answer = prompts.iter().filter(|p| p.answer.is_none()).count();
    Ok(Loaded {
        prompts,
        records: n_records,
        without_answer,
    })
}

/// Where a record sits in its file: a line of a JSONL file, or an element of an array.
#[derive(Debug, Clone, Copy)]
enum Location {
    Line(usize),
    Element(usize),
    Row(usize),
}

impl Location {
    /// The 1-based record number, used as the default id.
    fn number(self) -> usize {
        match self {
            Location::Line(n) | Location::Element(n) | Location::Row(n) => n,
        }
    }

    /// `file:LINE` for JSONL (as compilers print it), `file: record N` for an array,
    /// `file: row N` for Parquet.
    fn describe(self, file: &Path) -> String {
        match self {
            Location::Line(n) => format!("{}:{n}", file.display()),
            Location::Element(n) => format!("{}: record {n}", file.display()),
            Location::Row(n) => format!("{}: row {n}", file.display()),
        }
    }
}

fn parse_records(
    file: &Path,
    text: &str,
    format: Format,
) -> Result<Vec<(Location, Value)>, StageError> {
    let format = match format {
        Format::Auto if text.trim_start().starts_with('[') => Format::Json,
        Format::Auto => Format::Jsonl,
        f => f,
    };
    match format {
        Format::Json => {
            let values: Vec<Value> = serde_json::from_str(text).map_err(|e| {
                StageError::Input(format!(
                    "{}:{}:{}: malformed JSON array: {e}",
                    file.display(),
                    e.line(),
                    e.column()
                ))
            })?;
            Ok(values
                .into_iter()
                .enumerate()
                .map(|(i, v)| (Location::Element(i + 1), v))
                .collect())
        }
        Format::Jsonl | Format::Auto | Format::Parquet => {
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(line).map_err(|e| {
                    StageError::Input(format!(
                        "{}:{}: malformed JSON at column {}: {e}",
                        file.display(),
                        i + 1,
                        e.column()
                    ))
                })?;
                out.push((Location::Line(i + 1), v));
            }
            Ok(out)
        }
    }
}

fn read_error(file: &Path, e: std::io::Error) -> StageError {
    StageError::Input(format!("cannot read {}: {e}", file.display()))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(path: &Path) -> LoadParams {
        LoadParams {
            path: path.to_path_buf(),
            format: Format::Auto,
            prompt_field: "problem".into(),
            answer_field: "answer".into(),
            id_field: None,
            limit: None,
            shuffle_seed: None,
        }
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_jsonl_and_json_arrays_alike() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(
            &dir,
            "a.jsonl",
            "{\"problem\":\"1+1\",\"answer\":\"2\",\"level\":1}\n\n{\"problem\":\"2+2\",\"answer\":4}\n",
        );
        let b = write(
            &dir,
            "b.json",
            "[{\"problem\":\"1+1\",\"answer\":\"2\",\"level\":1},{\"problem\":\"2+2\",\"answer\":4}]",
        );
        for f in [a, b] {
            let got = read_prompts(&f, &params(&f)).unwrap();
            assert_eq!(got.prompts.len(), 2);
            assert_eq!(got.prompts[0].answer.as_deref(), Some("2"));
            assert_eq!(got.prompts[1].answer.as_deref(), Some("4"));
            assert_eq!(got.prompts[0].extra.as_deref(), Some("{\"level\":1}"));
        }
    }

    #[test]
    fn malformed_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(&dir, "x.jsonl", "{\"problem\":\"a\"}\n{\"problem\": \n");
        let err = read_prompts(&f, &params(&f)).unwrap_err().to_string();
        assert!(err.contains("x.jsonl:2"), "{err}");
        let f = write(
            &dir,
            "y.jsonl",
            "{\"problem\":\"a\"}\n{\"question\":\"b\"}\n",
        );
        let err = read_prompts(&f, &params(&f)).unwrap_err().to_string();
        assert!(
            err.contains("y.jsonl:2") && err.contains("`problem` is missing"),
            "{err}"
        );
        let f = write(&dir, "z.json", "[{\"problem\":\"a\"},{\"problem\":7}]");
        let err = read_prompts(&f, &params(&f)).unwrap_err().to_string();
        assert!(
            err.contains("z.json: record 2") && err.contains("a number"),
            "{err}"
        );
    }

    #[test]
    fn ids_must_be_present_and_unique() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            &dir,
            "x.jsonl",
            "{\"problem\":\"a\",\"id\":\"q1\"}\n{\"problem\":\"b\",\"id\":\"q1\"}\n",
        );
        let mut p = params(&f);
        p.id_field = Some("id".into());
        let err = read_prompts(&f, &p).unwrap_err().to_string();
        assert!(
            err.contains("x.jsonl:2") && err.contains("x.jsonl:1"),
            "{err}"
        );
    }

    #[test]
    fn shuffle_is_seeded_and_limit_applies_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..50)
            .map(|i| format!("{{\"problem\":\"p{i}\"}}\n"))
            .collect();
        let f = write(&dir, "x.jsonl", &text);
        let mut p = params(&f);
        p.shuffle_seed = Some(7);
        p.limit = Some(10);
        let a = read_prompts(&f, &p).unwrap();
        let b = read_prompts(&f, &p).unwrap();
        assert_eq!(a.prompts, b.prompts);
        assert_eq!(a.prompts.len(), 10);
        let firsts: Vec<_> = a.prompts.iter().map(|p| p.source_id.as_str()).collect();
        assert_ne!(firsts, ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]);
        p.shuffle_seed = Some(8);
        assert_ne!(read_prompts(&f, &p).unwrap().prompts, a.prompts);
    }

    #[test]
    fn reads_parquet_rows_with_nested_columns_as_json() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let f = root.join("tests/fixtures/datasets/openr1-math/data/train-00001-of-00002.parquet");
        let mut p = params(&f);
        p.id_field = Some("uuid".into());
        let got = read_prompts(&f, &p).unwrap();
        assert_eq!(got.prompts.len(), 2);
        assert_eq!(got.prompts[0].prompt, "What is 6 + 1?");
        assert_eq!(got.prompts[0].answer.as_deref(), Some("7"));
        assert_eq!(
            got.prompts[1].source_id,
            "00000000-0000-4000-8000-000000000005"
        );
        let extra: Value = serde_json::from_str(got.prompts[0].extra.as_deref().unwrap()).unwrap();
        assert_eq!(extra["correctness_math_verify"], json!([true, true]));
        assert_eq!(extra["messages"][0]["role"], "user");

        let cut = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(&f).unwrap();
        let g = cut.path().join("cut.parquet");
        std::fs::write(&g, &bytes[..bytes.len() - 10]).unwrap();
        let err = read_prompts(&g, &params(&g)).unwrap_err().to_string();
        assert!(
            err.contains("cut.parquet") && err.contains("Parquet"),
            "{err}"
        );
        p.prompt_field = "correctness_count".into();
        let err = read_prompts(&f, &p).unwrap_err().to_string();
        assert!(
            err.contains("row 1") && err.contains("`correctness_count` must be a string"),
            "{err}"
        );
    }

    #[test]
    fn reads_the_shipped_prompt_and_benchmark_files() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let math = root.join("data/prompts/math_train.json");
        let got = read_prompts(&math, &params(&math)).unwrap();
        assert_eq!(got.records, 7474);
        let gsm = root.join("data/benchmarks/gsm8k_test.jsonl");
        let mut p = params(&gsm);
        p.prompt_field = "question".into();
        let got = read_prompts(&gsm, &p).unwrap();
        assert_eq!(got.prompts.len(), 1319);
        assert!(got.prompts[0].answer.as_deref().unwrap().contains("####"));
    }
}
