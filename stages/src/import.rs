//! The `import` stage: published reasoning traces (Parquet, JSON, JSONL, a glob over
//! shards) recorded as a `generate` stage records its teacher's samples, so every stage
//! downstream runs on them unchanged.
//!
//! Each row becomes one prompt and one sample per trace it holds (a `generations` list
//! of several traces gives several samples of one prompt). Reasoning is split from the
//! answer as the teacher client splits it (`<think>` inline, or a separate reasoning
//! column); Sky-T1-style `<|begin_of_thought|>` / `<|begin_of_solution|>` markers are
//! split the same way. The "teacher" recorded on each sample is the dataset (its name
//! in `model`, the file in `endpoint`, the file's hash in `request_hash`). A dataset's
//! own per-trace columns (OpenR1-Math's `correctness_math_verify`, ...) are kept in the
//! sample's `extra`, never used in place of `verify`; other columns go to the prompt's
//! `extra`, as `load` keeps them.
//!
//! Every file is read, checked and converted while fingerprinting, before the database
//! is opened; the rows are then written in chunks of thousands, a transaction each (a
//! killed import resumes after its last committed chunk). A missing column, a column
//! of the wrong type, a truncated file or a glob matching nothing fails the run with the
//! file and column named and the database unchanged.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arrow_array::{Array, RecordBatch, RecordBatchReader};
use arrow_schema::{DataType, Schema};
use async_trait::async_trait;
use distill_db::BulkWriter;
use distill_db::generations::{self, NewGeneration};
use distill_db::prompts::{self, NewPrompt};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::tabular::{self, FileFormat, ListOf, Text, Turns};
use crate::{BuildEnv, ParamError, Stage, StageContext, StageError, StageKind, parse_params};

/// The `import` stage kind.
pub struct ImportKind;

/// Parameters of an `import` stage.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImportParams {
    /// A file or a glob over shards (`data/train-*.parquet`), relative to the config.
    pub path: String,
    /// `auto` (by extension; `.json` by content), `parquet`, `jsonl` or `json`.
    #[serde(default)]
    pub format: FileFormat,
    /// A published dataset's layout: `openr1-math`, `openthoughts`, `bespoke-stratos`,
    /// `sky-t1`, `s1k-1.1` or `limo`.
    #[serde(default)]
    pub preset: Option<Preset>,
    /// Which column holds what; each key given overrides the preset's.
    #[serde(default)]
    pub columns: Columns,
    /// Columns not to record at all (large duplicates, other teachers' traces).
    #[serde(default)]
    pub ignore: Option<Vec<String>>,
    /// The dataset's name, recorded as the samples' teacher; default: the preset's Hub
    /// name, else the path.
    #[serde(default)]
    pub dataset: Option<String>,
    /// The dataset's licence, for model and dataset cards; default: the preset's.
    #[serde(default)]
    pub license: Option<String>,
    /// Import at most this many rows (in file order, files in name order).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// Which column holds what. A row needs a prompt (`prompt`, or the first user turn of
/// `messages`) and traces: `generations` (one completion or a list of them, each split
/// like a teacher's content), `answer` with an optional separate `reasoning`, or the
/// last assistant turn of `messages`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Columns {
    /// The prompt text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Reasoning kept apart from the answer (s1K's `deepseek_thinking_trajectory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// The answer (with `reasoning`), or the whole completion (without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Chat turns: `{role, content}` or `{from, value}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<String>,
    /// The reference answer `verify` compares with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// A completion, or a list of completions (several samples of one prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generations: Option<String>,
    /// The system prompt the teacher was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Why each completion ended (`stop`, `length`), one or a list beside `generations`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// A unique id per row; default: the row number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl Columns {
    /// `self` with every key it leaves unset taken from `base`.
    fn over(&self, base: &Columns) -> Columns {
        let pick = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());
        Columns {
            prompt: pick(&self.prompt, &base.prompt),
            reasoning: pick(&self.reasoning, &base.reasoning),
            answer: pick(&self.answer, &base.answer),
            messages: pick(&self.messages, &base.messages),
            reference: pick(&self.reference, &base.reference),
            generations: pick(&self.generations, &base.generations),
            system: pick(&self.system, &base.system),
            finish_reason: pick(&self.finish_reason, &base.finish_reason),
            id: pick(&self.id, &base.id),
        }
    }

    /// The mapped columns as (key, column name).
    fn named(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("prompt", &self.prompt),
            ("reasoning", &self.reasoning),
            ("answer", &self.answer),
            ("messages", &self.messages),
            ("reference", &self.reference),
            ("generations", &self.generations),
            ("system", &self.system),
            ("finish_reason", &self.finish_reason),
            ("id", &self.id),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
    }
}

/// Published datasets whose layout distill knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Preset {
    /// open-r1/OpenR1-Math-220k.
    #[serde(rename = "openr1-math")]
    OpenR1Math,
    /// open-thoughts/OpenThoughts-114k.
    #[serde(rename = "openthoughts")]
    OpenThoughts,
    /// bespokelabs/Bespoke-Stratos-17k.
    #[serde(rename = "bespoke-stratos")]
    BespokeStratos,
    /// NovaSky-AI/Sky-T1_data_17k.
    #[serde(rename = "sky-t1")]
    SkyT1,
    /// simplescaling/s1K-1.1.
    #[serde(rename = "s1k-1.1")]
    S1k11,
    /// GAIR/LIMO.
    #[serde(rename = "limo")]
    Limo,
}

fn col(name: &str) -> Option<String> {
    Some(name.to_string())
}

impl Preset {
    /// Hub name, licence, column mapping and ignored columns, from each dataset's card
    /// (`dataset_info.features` on the Hugging Face Hub, checked 2026-11):
    /// - OpenR1-Math-220k (apache-2.0): problem, solution, answer, problem_type,
    ///   question_type, source, uuid: string; is_reasoning_complete,
    ///   correctness_math_verify, correctness_llama: list<bool>; generations,
    ///   finish_reasons: list<string>; correctness_count: int64; messages:
    ///   list<struct<content, role>> (a copy of one correct generation: ignored).
    /// - OpenThoughts-114k, Bespoke-Stratos-17k (apache-2.0, Parquet) and
    ///   Sky-T1_data_17k (apache-2.0, one JSON file): system: string; conversations:
    ///   list<struct<from, value>>, the assistant value holding
    ///   `<|begin_of_thought|>`…`<|end_of_thought|>` and
    ///   `<|begin_of_solution|>`…`<|end_of_solution|>`.
    /// - s1K-1.1: solution, question, cot_type, source_type, metadata,
    ///   gemini_thinking_trajectory, gemini_attempt, deepseek_thinking_trajectory,
    ///   deepseek_attempt: string (+ messages); R1's reasoning and answer are the
    ///   deepseek_* columns, Gemini's traces are ignored.
    /// - LIMO (apache-2.0, limo.jsonl): question, solution, answer; the solution is the
    ///   whole trace.
    fn info(self) -> (&'static str, &'static str, Columns, &'static [&'static str]) {
        let sharegpt = Columns {
            messages: col("conversations"),
            system: col("system"),
            ..Columns::default()
        };
        match self {
            Preset::OpenR1Math => (
                "open-r1/OpenR1-Math-220k",
                "apache-2.0",
                Columns {
                    prompt: col("problem"),
                    reference: col("answer"),
                    generations: col("generations"),
                    finish_reason: col("finish_reasons"),
                    id: col("uuid"),
                    ..Columns::default()
                },
                &["messages"],
            ),
            Preset::OpenThoughts => (
                "open-thoughts/OpenThoughts-114k",
                "apache-2.0",
                sharegpt,
                &[],
            ),
            Preset::BespokeStratos => (
                "bespokelabs/Bespoke-Stratos-17k",
                "apache-2.0",
                sharegpt,
                &[],
            ),
            Preset::SkyT1 => ("NovaSky-AI/Sky-T1_data_17k", "apache-2.0", sharegpt, &[]),
            Preset::S1k11 => (
                "simplescaling/s1K-1.1",
                "mit",
                Columns {
                    prompt: col("question"),
                    reasoning: col("deepseek_thinking_trajectory"),
                    answer: col("deepseek_attempt"),
                    reference: col("solution"),
                    ..Columns::default()
                },
                &["gemini_thinking_trajectory", "gemini_attempt", "messages"],
            ),
            Preset::Limo => (
                "GAIR/LIMO",
                "apache-2.0",
                Columns {
                    prompt: col("question"),
                    generations: col("solution"),
                    reference: col("answer"),
                    ..Columns::default()
                },
                &[],
            ),
        }
    }
}

impl StageKind for ImportKind {
    fn name(&self) -> &'static str {
        "import"
    }
    fn about(&self) -> &'static str {
        "record published reasoning traces (Parquet, JSON, JSONL; presets for OpenR1-Math, OpenThoughts, s1K, ...) as a teacher's samples"
    }
    fn version(&self) -> u32 {
        1
    }
    fn build(&self, params: toml::Table, env: &BuildEnv) -> Result<Arc<dyn Stage>, ParamError> {
        let p: ImportParams = parse_params(params)?;
        if !env.needs.is_empty() {
            return Err(ParamError::new(
                "needs",
                "an import stage reads files and needs no other stage",
            ));
        }
        Ok(Arc::new(Import::new(p, &env.workdir)?))
    }
}

/// Checks that the mapping names a prompt and traces, without contradictions.
fn check_columns(c: &Columns) -> Result<(), ParamError> {
    if c.prompt.is_none() && c.messages.is_none() {
        return Err(ParamError::new(
            "columns",
            "name the prompt column (`columns.prompt`, or `columns.messages` for chat turns) or pick a `preset`",
        ));
    }
    if c.generations.is_some() && (c.answer.is_some() || c.reasoning.is_some()) {
        return Err(ParamError::new(
            "columns.generations",
            "give either `generations` (whole completions) or `answer` with an optional `reasoning`, not both",
        ));
    }
    if c.reasoning.is_some() && c.answer.is_none() {
        return Err(ParamError::new(
            "columns.answer",
            "a `reasoning` column needs the `answer` column beside it",
        ));
    }
    if c.generations.is_none() && c.answer.is_none() && c.messages.is_none() {
        return Err(ParamError::new(
            "columns",
            "an import needs traces: name `generations`, `answer` or `messages` (to read prompts alone, use a load stage)",
        ));
    }
    if c.finish_reason.is_some() && c.generations.is_none() && c.answer.is_none() {
        return Err(ParamError::new(
            "columns.finish_reason",
            "goes with `generations` or `answer`",
        ));
    }
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for (key, name) in c.named() {
        if name.is_empty() {
            return Err(ParamError::new(
                format!("columns.{key}"),
                "must not be empty",
            ));
        }
        if let Some((other, _)) = seen.iter().find(|(_, n)| *n == name) {
            return Err(ParamError::new(
                format!("columns.{key}"),
                format!("column `{name}` is already mapped as `{other}`"),
            ));
        }
        seen.push((key, name));
    }
    Ok(())
}

/// `pattern` resolved against the working directory.
fn full_pattern(workdir: &Path, pattern: &str) -> String {
    if Path::new(pattern).is_absolute() {
        pattern.to_string()
    } else {
        workdir.join(pattern).to_string_lossy().into_owned()
    }
}

/// The files `pattern` names now, sorted (shards in order). Files are inputs, checked
/// with the other inputs when the stage is fingerprinted: a glob matching nothing is an
/// input error, like a malformed file, not a config error.
fn expand(pattern: &str) -> Result<Vec<PathBuf>, StageError> {
    if !pattern.contains(['*', '?', '[']) {
        let file = PathBuf::from(pattern);
        if !file.is_file() {
            return Err(StageError::Input(format!("{pattern}: no such file")));
        }
        return Ok(vec![file]);
    }
    let paths =
        glob::glob(pattern).map_err(|e| StageError::Input(format!("{pattern}: bad glob: {e}")))?;
    let mut files: Vec<PathBuf> = paths
        .filter_map(Result::ok)
        .filter(|p| p.is_file())
        .collect();
    if files.is_empty() {
        return Err(StageError::Input(format!("{pattern}: no file matches")));
    }
    files.sort();
    Ok(files)
}

/// A configured `import` stage.
#[derive(Debug)]
pub struct Import {
    params: ImportParams,
    /// `path`, resolved against the working directory.
    pattern: String,
    /// Files are named relative to it in identities and on samples, so moving the
    /// project does not change them.
    workdir: PathBuf,
    /// The files' hashes and what they hold, found while fingerprinting.
    scanned: OnceLock<Arc<Scanned>>,
}

/// What a dry pass over the files found.
#[derive(Debug)]
struct Scanned {
    /// `(path as shown, content hash)` per file.
    files: Vec<(String, String)>,
    prompts: usize,
    samples: usize,
    /// The one system prompt every row shares, if the rows have one.
    system: Option<String>,
}

/// A row's prompt and its samples (prompt ids filled in at insert time).
pub type Record = (NewPrompt, Vec<NewGeneration>);

impl Import {
    /// Resolves `p` (the preset's defaults, the glob) into a stage.
    pub fn new(mut p: ImportParams, workdir: &Path) -> Result<Import, ParamError> {
        if p.limit == Some(0) {
            return Err(ParamError::new("limit", "must be at least 1"));
        }
        let (dataset, license, base, ignore) = match p.preset {
            Some(preset) => {
                let (d, l, c, i) = preset.info();
                (
                    Some(d),
                    Some(l),
                    c,
                    i.iter().map(|s| s.to_string()).collect(),
                )
            }
            None => (None, None, Columns::default(), Vec::new()),
        };
        p.columns = p.columns.over(&base);
        check_columns(&p.columns)?;
        p.ignore = Some(p.ignore.take().unwrap_or(ignore));
        p.dataset = p
            .dataset
            .or(dataset.map(str::to_string))
            .or(Some(p.path.clone()));
        p.license = p.license.or(license.map(str::to_string));
        let pattern = full_pattern(workdir, &p.path);
        glob::Pattern::new(&pattern)
            .map_err(|e| ParamError::new("path", format!("bad glob `{}`: {e}", p.path)))?;
        Ok(Import {
            params: p,
            pattern,
            workdir: workdir.to_path_buf(),
            scanned: OnceLock::new(),
        })
    }

    /// The resolved parameters.
    pub fn params(&self) -> &ImportParams {
        &self.params
    }

    fn scanned(&self) -> Result<&Arc<Scanned>, StageError> {
        if let Some(s) = self.scanned.get() {
            return Ok(s);
        }
        let scanned = self.scan(None)?;
        Ok(self.scanned.get_or_init(|| Arc::new(scanned)))
    }

    /// Reads every file: checks all rows, and hands each converted row to `emit` when
    /// one is given (a dry pass converts nothing).
    fn scan(
        &self,
        mut emit: Option<&mut dyn FnMut(Record) -> Result<(), StageError>>,
    ) -> Result<Scanned, StageError> {
        let ignore = self.ignored();
        let paths = expand(&self.pattern)?;
        if emit.is_none()
            && self.params.limit.is_none()
            && paths.len() > 1
            && let Some(scanned) = self.dry_scan_in_parallel(&paths, &ignore)
        {
            return Ok(scanned);
        }
        let mut conv = self.converter();
        let mut files = Vec::with_capacity(paths.len());
        for file in &paths {
            if conv.rows >= conv.limit {
                break;
            }
            files.push(self.scan_file(&mut conv, file, &ignore, &mut emit)?);
        }
        Ok(Scanned {
            files,
            prompts: conv.rows.min(conv.limit),
            samples: conv.samples,
            system: conv.system.map(|(s, _)| s),
        })
    }

    /// The dry pass with the files spread over the cores, each checked on its own and the
    /// results joined in file order. `None` when any file or the join finds a problem: the
    /// sequential pass then reports the first one in row order, exactly as before.
    fn dry_scan_in_parallel(&self, paths: &[PathBuf], ignore: &[&str]) -> Option<Scanned> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(paths.len());
        if threads < 2 {
            return None;
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut results: Vec<Option<(String, String, Converter<'_>)>> =
            (0..paths.len()).map(|_| None).collect();
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(file) = paths.get(i) else { break };
                            let mut conv = self.converter();
                            let scanned = self.scan_file(&mut conv, file, ignore, &mut None);
                            done.push((i, scanned.ok().map(|(shown, hash)| (shown, hash, conv))));
                        }
                        done
                    })
                })
                .collect();
            for w in workers {
                for (i, r) in w.join().unwrap_or_default() {
                    results[i] = r;
                }
            }
        });
        let mut files = Vec::with_capacity(paths.len());
        let (mut prompts, mut samples) = (0, 0);
        let mut system: Option<String> = None;
        let mut seen: HashMap<String, String> = HashMap::new();
        for r in results {
            let (shown, hash, conv) = r?;
            prompts += conv.rows;
            samples += conv.samples;
            if let Some((s, _)) = conv.system {
                match &system {
                    Some(first) if *first != s => return None,
                    Some(_) => {}
                    None => system = Some(s),
                }
            }
            for (id, at) in conv.seen_ids {
                if seen.insert(id, at).is_some() {
                    return None;
                }
            }
            files.push((shown, hash));
        }
        Some(Scanned {
            files,
            prompts,
            samples,
            system,
        })
    }

    fn ignored(&self) -> Vec<&str> {
        self.params
            .ignore
            .iter()
            .flatten()
            .map(String::as_str)
            .collect()
    }

    fn converter(&self) -> Converter<'_> {
        Converter {
            columns: &self.params.columns,
            model: self.params.dataset.as_deref().unwrap_or(""),
            seen_ids: HashMap::new(),
            system: None,
            rows: 0,
            file_rows: 0,
            samples: 0,
            limit: self.params.limit.unwrap_or(usize::MAX),
        }
    }

    /// Reads one file through `conv`; returns its name as shown and its content hash.
    fn scan_file(
        &self,
        conv: &mut Converter<'_>,
        file: &Path,
        ignore: &[&str],
        emit: &mut Emit<'_>,
    ) -> Result<(String, String), StageError> {
        let cannot =
            |e: std::io::Error| StageError::Input(format!("cannot read {}: {e}", file.display()));
        let opened = std::fs::File::open(file).map_err(cannot)?;
        // Mapped, not read: a dataset is read twice (checked, then written), and copying it
        // into fresh memory each time (page faults, zeroing, the copy) was a sixth of an
        // import's time. A file cut short while mapped stops the process (SIGBUS), as it
        // does for every memory-mapped reader; its hash changes too, so a resumed run sees it.
        // SAFETY: the map is read-only and lives as long as the bytes handed out from it.
        let bytes = unsafe { memmap2::Mmap::map(&opened) }.map_err(cannot)?;
        let hash = crate::hash::hex128(&bytes);
        let shown = file
            .strip_prefix(&self.workdir)
            .unwrap_or(file)
            .display()
            .to_string();
        conv.file_rows = 0;
        let origin = Origin {
            file,
            shown: &shown,
            hash: &hash,
        };
        match self.params.format.resolve(file) {
            FileFormat::Parquet => {
                conv.parquet(&origin, bytes::Bytes::from_owner(bytes), ignore, emit)?
            }
            format => conv.json(&origin, &bytes, format, ignore, emit)?,
        }
        Ok((shown, hash))
    }
}

#[async_trait]
impl Stage for Import {
    fn identity(&self) -> Result<Value, StageError> {
        let s = self.scanned()?;
        // `prompt_template` and `system_prompt` as a generate stage records them, so
        // train and `dataset export` rebuild the prompt each trace answered.
        Ok(json!({
            "params": self.params,
            "files": s.files.iter().map(|(f, h)| json!({ "path": f, "hash": h })).collect::<Vec<_>>(),
            "model": self.params.dataset,
            "prompt_template": "{prompt}",
            "system_prompt": s.system,
        }))
    }

    async fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let scanned = self.scanned()?.clone();
        let summary = json!({
            "dataset": self.params.dataset,
            "files": scanned.files.len(),
            "prompts": scanned.prompts,
            "samples": scanned.samples,
        });
        ctx.progress.set_total(scanned.samples as u64);
        // Each chunk of rows commits on its own, prompts with their samples, so a killed
        // import resumes after the last committed prompt: the files are read in the same
        // order (their hashes are in the fingerprint), and the rows already recorded skipped.
        let skip = prompts::count(ctx.db.pool(), ctx.stage_id).await? as usize;
        let already = generations::count(ctx.db.pool(), ctx.stage_id).await? as usize;
        ctx.progress.set_done(already as u64);
        if skip >= scanned.prompts {
            return Ok(summary);
        }
        ctx.check_cancelled()?;

        // Files are decoded on a blocking thread while this task writes what it has converted.
        let (tx, mut rx) = mpsc::channel::<Vec<Record>>(4);
        let this = Import {
            params: self.params.clone(),
            pattern: self.pattern.clone(),
            workdir: self.workdir.clone(),
            scanned: OnceLock::new(),
        };
        let reader = tokio::task::spawn_blocking(move || {
            let mut chunk: Vec<Record> = Vec::new();
            let (mut bytes, mut skipped) = (0, 0);
            let mut send = |r: Record| -> Result<(), StageError> {
                if skipped < skip {
                    skipped += 1;
                    return Ok(());
                }
                bytes += record_bytes(&r);
                chunk.push(r);
                if chunk.len() >= CHUNK_ROWS || bytes >= CHUNK_BYTES {
                    bytes = 0;
                    tx.blocking_send(std::mem::take(&mut chunk))
                        .map_err(|_| StageError::Interrupted)?;
                }
                Ok(())
            };
            this.scan(Some(&mut send))?;
            if !chunk.is_empty() {
                let _ = tx.blocking_send(chunk);
            }
            Ok::<(), StageError>(())
        });

        let mut writer = BulkWriter::new(&ctx.db).await?;
        let mut idx = skip as i64;
        let mut written = already;
        while let Some(records) = rx.recv().await {
            if ctx.cancel.is_cancelled() {
                // Dropping the receiver stops the reader; what was committed stays.
                drop(rx);
                let _ = reader.await;
                return Err(StageError::Interrupted);
            }
            let (ps, gs): (Vec<NewPrompt>, Vec<Vec<NewGeneration>>) = records.into_iter().unzip();
            let mut db = writer.begin().await?;
            let ids = prompts::insert_many(&mut db, ctx.stage_id, idx, &ps).await?;
            idx += ps.len() as i64;
            let mut rows: Vec<NewGeneration> = Vec::with_capacity(gs.iter().map(Vec::len).sum());
            for (id, samples) in ids.into_iter().zip(gs) {
                rows.extend(samples.into_iter().map(|mut g| {
                    g.prompt_id = id;
                    g
                }));
            }
            generations::insert_many(&mut db, ctx.stage_id, &rows).await?;
            db.commit().await?;
            writer.committed();
            written += rows.len();
            ctx.progress.set_done(written as u64);
        }
        writer.finish().await?;
        reader
            .await
            .map_err(|e| StageError::Failed(format!("import reader failed: {e}")))??;
        if written != scanned.samples {
            return Err(StageError::Input(format!(
                "the files changed while importing: {written} samples read, {} when checked",
                scanned.samples
            )));
        }
        Ok(summary)
    }
}

/// Rows per chunk: a chunk is one message to the writer and one transaction. Large
/// chunks commit less often (each commit rewrites the b-trees' right edges and syncs
/// nothing but costs a WAL append): 8,000 rows of 2 KB traces per commit took the
/// writer's commits from 0.8 s to 0.5 s per 200,000 traces against 1,000 rows.
const CHUNK_ROWS: usize = 8000;
/// Text bytes per chunk at most, so that long traces keep the chunks in flight (four
/// queued, so the reader runs ahead of the writer, one being written, one being filled)
/// to about 400 MB.
const CHUNK_BYTES: usize = 64 << 20;

/// The text a record carries, as counted against `CHUNK_BYTES`.
fn record_bytes((p, gs): &Record) -> usize {
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    p.prompt.len()
        + text(&p.extra)
        + gs.iter()
            .map(|g| text(&g.reasoning) + text(&g.answer) + text(&g.extra))
            .sum::<usize>()
}

/// The file a row came from.
struct Origin<'a> {
    file: &'a Path,
    shown: &'a str,
    hash: &'a str,
}

/// One row, borrowed from its file.
#[derive(Default)]
struct Row<'a> {
    id: Option<Cow<'a, str>>,
    prompt: Option<&'a str>,
    system: Option<&'a str>,
    reference: Option<Cow<'a, str>>,
    samples: Vec<Sample<'a>>,
    /// Other columns, recorded with the prompt.
    extra: Map<String, Value>,
    /// Other list columns with one element per sample, recorded with each sample.
    per_sample: Vec<(&'a str, Vec<Value>)>,
}

struct Sample<'a> {
    reasoning: Option<&'a str>,
    text: &'a str,
    finish_reason: Option<&'a str>,
}

/// Turns rows into prompts and samples, checking them across files.
struct Converter<'c> {
    columns: &'c Columns,
    model: &'c str,
    /// Ids seen so far, with the file and row that had each.
    seen_ids: HashMap<String, String>,
    /// The system prompt and the file and row it was first seen in.
    system: Option<(String, String)>,
    /// Rows so far, in all files and in this file.
    rows: usize,
    file_rows: usize,
    samples: usize,
    limit: usize,
}

type Emit<'e> = Option<&'e mut dyn FnMut(Record) -> Result<(), StageError>>;

/// What a mapped column must hold in a Parquet file, and how it is described.
fn expected(key: &str) -> (&'static str, fn(&DataType) -> bool) {
    fn text(dt: &DataType) -> bool {
        Text::accepts(dt)
    }
    fn text_or_list(dt: &DataType) -> bool {
        Text::accepts(dt) || ListOf::item(dt).is_some_and(Text::accepts)
    }
    fn scalar(dt: &DataType) -> bool {
        Text::accepts(dt) || dt.is_integer()
    }
    fn turns(dt: &DataType) -> bool {
        Turns::accepts(dt)
    }
    match key {
        "generations" | "finish_reason" => ("string or list<string>", text_or_list),
        "reference" | "id" => ("string or integer", scalar),
        "messages" => (
            "list<struct<role, content>> or list<struct<from, value>>",
            turns,
        ),
        _ => ("string", text),
    }
}

impl Converter<'_> {
    fn parquet(
        &mut self,
        origin: &Origin<'_>,
        bytes: bytes::Bytes,
        ignore: &[&str],
        emit: &mut Emit<'_>,
    ) -> Result<(), StageError> {
        let file = origin.file;
        // Ignored columns (OpenR1-Math's `messages` repeats a generation) are not decoded.
        let mapped: Vec<&str> = self.columns.named().map(|(_, name)| name).collect();
        let keep = |name: &str| mapped.contains(&name) || !ignore.contains(&name);
        let (schema, reader) = tabular::parquet_reader(file, bytes, keep)?;
        // Checked against the whole schema (its errors list every column), then planned
        // against the columns read.
        self.plan(file, &schema, ignore)?;
        let plan = self.plan(file, &reader.schema(), ignore)?;
        for batch in reader {
            if self.rows >= self.limit {
                break;
            }
            let batch = batch.map_err(|e| tabular::batch_error(file, e))?;
            self.batch(origin, &batch, &plan, emit)?;
        }
        Ok(())
    }

    /// Checks the schema against the mapping: which column feeds which key, and which
    /// other columns are recorded.
    fn plan(&self, file: &Path, schema: &Schema, ignore: &[&str]) -> Result<Plan, StageError> {
        let mut plan = Plan::default();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        for (key, name) in self.columns.named() {
            let Some(i) = names.iter().position(|n| *n == name) else {
                return Err(StageError::Input(format!(
                    "{}: column `{name}` (mapped as `{key}`) is missing; the file has: {}",
                    file.display(),
                    names.join(", ")
                )));
            };
            let dt = schema.field(i).data_type();
            let (want, ok) = expected(key);
            if !ok(dt) {
                return Err(StageError::Input(format!(
                    "{}: column `{name}` (mapped as `{key}`) has type {dt}, expected {want}",
                    file.display()
                )));
            }
            plan.mapped.insert(key, i);
        }
        let many = plan
            .mapped
            .get("generations")
            .is_some_and(|&i| ListOf::item(schema.field(i).data_type()).is_some());
        for (i, f) in schema.fields().iter().enumerate() {
            if plan.mapped.values().any(|&m| m == i) || ignore.contains(&f.name().as_str()) {
                continue;
            }
            if !tabular::json_supported(f.data_type()) {
                return Err(StageError::Input(format!(
                    "{}: column `{}` has type {}, which distill cannot record: add it to `ignore`",
                    file.display(),
                    f.name(),
                    f.data_type()
                )));
            }
            let per_sample = many && ListOf::item(f.data_type()).is_some();
            plan.extra.push((i, per_sample));
        }
        Ok(plan)
    }

    fn batch(
        &mut self,
        origin: &Origin<'_>,
        batch: &RecordBatch,
        plan: &Plan,
        emit: &mut Emit<'_>,
    ) -> Result<(), StageError> {
        let column = |key: &str| plan.mapped.get(key).map(|&i| batch.column(i).as_ref());
        let text = |key: &str| column(key).and_then(Text::of);
        let (prompt, system, reasoning, answer) = (
            text("prompt"),
            text("system"),
            text("reasoning"),
            text("answer"),
        );
        let turns = column("messages").and_then(Turns::of);
        let gens = column("generations");
        let (gens_text, gens_list) = (gens.and_then(Text::of), gens.and_then(ListOf::of));
        let gens_items = gens_list.and_then(|l| Text::of(l.values().as_ref()));
        let finish = column("finish_reason");
        let (finish_text, finish_list) = (finish.and_then(Text::of), finish.and_then(ListOf::of));
        let finish_items = finish_list.and_then(|l| Text::of(l.values().as_ref()));
        let schema = batch.schema();
        for i in 0..batch.num_rows() {
            if self.rows >= self.limit {
                break;
            }
            let n = self.file_rows + 1;
            let at = |col: &str| format!("{}: row {n}: column `{col}`", origin.shown);
            let mut row = Row {
                id: scalar(column("id"), i),
                prompt: prompt.and_then(|t| t.get(i)),
                system: system.and_then(|t| t.get(i)),
                reference: scalar(column("reference"), i),
                ..Row::default()
            };
            if let Some(t) = &turns {
                let name = self.columns.messages.as_deref().unwrap_or_default();
                let Some(ts) = t.get(i) else {
                    return Err(StageError::Input(format!("{} is null", at(name))));
                };
                self.chat(&mut row, ts, &at(name))?;
            }
            if let Some(t) = gens_text {
                if let Some(text) = t.get(i) {
                    row.samples.push(Sample {
                        reasoning: None,
                        text,
                        finish_reason: finish_text.and_then(|f| f.get(i)),
                    });
                }
            } else if let (Some(l), Some(items)) = (gens_list, gens_items) {
                let name = self.columns.generations.as_deref().unwrap_or_default();
                let Some(r) = l.range(i) else {
                    return Err(StageError::Input(format!("{} is null", at(name))));
                };
                let reasons = finish_list.and_then(|f| f.range(i));
                for (k, j) in r.enumerate() {
                    let Some(text) = items.get(j) else {
                        return Err(StageError::Input(format!(
                            "{}: trace {} is null",
                            at(name),
                            k + 1
                        )));
                    };
                    let finish_reason = match (&reasons, finish_items) {
                        (Some(fr), Some(fi)) if fr.len() == l.range(i).map_or(0, |r| r.len()) => {
                            fi.get(fr.start + k)
                        }
                        _ => None,
                    };
                    row.samples.push(Sample {
                        reasoning: None,
                        text,
                        finish_reason,
                    });
                }
            } else if let Some(text) = answer.and_then(|a| a.get(i)) {
                row.samples.push(Sample {
                    reasoning: reasoning.and_then(|r| r.get(i)),
                    text,
                    finish_reason: finish_text.and_then(|f| f.get(i)),
                });
            }
            // Recorded columns are only converted for the write; a dry pass skips them.
            for &(c, per_sample) in plan.extra.iter().filter(|_| emit.is_some()) {
                let name = schema.field(c).name().as_str();
                let v = tabular::json_at(batch.column(c).as_ref(), i);
                match v {
                    Value::Array(items) if per_sample && items.len() == row.samples.len() => {
                        row.per_sample.push((name, items))
                    }
                    v => {
                        row.extra.insert(name.to_string(), v);
                    }
                }
            }
            self.row(origin, row, emit)?;
        }
        Ok(())
    }

    /// Fills prompt, system and trace from chat turns, where the mapping takes them
    /// from there: the first user turn, the system turn, the last assistant turn.
    fn chat<'a>(
        &self,
        row: &mut Row<'a>,
        turns: impl Iterator<Item = (Option<&'a str>, Option<&'a str>)>,
        at: &str,
    ) -> Result<(), StageError> {
        let c = self.columns;
        let (mut user, mut system, mut assistant) = (None, None, None);
        for (k, (role, content)) in turns.enumerate() {
            let (Some(role), Some(content)) = (role, content) else {
                return Err(StageError::Input(format!(
                    "{at}: turn {} has a null role or content",
                    k + 1
                )));
            };
            match role {
                "user" | "human" => {
                    user.get_or_insert(content);
                }
                "system" => system = Some(content),
                "assistant" | "gpt" => assistant = Some(content),
                _ => {}
            }
        }
        if c.prompt.is_none() {
            row.prompt = Some(user.ok_or_else(|| {
                StageError::Input(format!("{at}: no user turn to take the prompt from"))
            })?);
        }
        if c.system.is_none() {
            row.system = system;
        }
        if c.generations.is_none() && c.answer.is_none() {
            let text = assistant.ok_or_else(|| {
                StageError::Input(format!("{at}: no assistant turn holds a trace"))
            })?;
            row.samples.push(Sample {
                reasoning: None,
                text,
                finish_reason: None,
            });
        }
        Ok(())
    }

    fn json(
        &mut self,
        origin: &Origin<'_>,
        bytes: &[u8],
        format: FileFormat,
        ignore: &[&str],
        emit: &mut Emit<'_>,
    ) -> Result<(), StageError> {
        let shown = origin.shown;
        let text = std::str::from_utf8(bytes)
            .map_err(|e| StageError::Input(format!("{shown}: not UTF-8 text: {e}")))?;
        let array = match format {
            FileFormat::Json => true,
            FileFormat::Jsonl => false,
            _ => text.trim_start().starts_with('['),
        };
        if array {
            let values: Vec<Value> = serde_json::from_str(text).map_err(|e| {
                StageError::Input(format!(
                    "{shown}:{}:{}: malformed JSON array: {e}",
                    e.line(),
                    e.column()
                ))
            })?;
            for v in &values {
                if self.rows >= self.limit {
                    break;
                }
                self.json_row(origin, v, ignore, emit)?;
            }
        } else {
            for (k, line) in text.lines().enumerate() {
                if self.rows >= self.limit {
                    break;
                }
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(line).map_err(|e| {
                    StageError::Input(format!(
                        "{shown}:{}: malformed JSON at column {}: {e}",
                        k + 1,
                        e.column()
                    ))
                })?;
                self.json_row(origin, &v, ignore, emit)?;
            }
        }
        Ok(())
    }

    fn json_row(
        &mut self,
        origin: &Origin<'_>,
        v: &Value,
        ignore: &[&str],
        emit: &mut Emit<'_>,
    ) -> Result<(), StageError> {
        let n = self.file_rows + 1;
        let shown = origin.shown;
        let Value::Object(obj) = v else {
            return Err(StageError::Input(format!(
                "{shown}: row {n}: expected a JSON object"
            )));
        };
        let c = self.columns;
        let at = |col: &str| format!("{shown}: row {n}: column `{col}`");
        let get =
            |key: &'static str, name: &Option<String>| -> Result<Option<&Value>, StageError> {
                let Some(name) = name else { return Ok(None) };
                match obj.get(name) {
                    Some(Value::Null) => Ok(None),
                    Some(v) => Ok(Some(v)),
                    None => Err(StageError::Input(format!(
                        "{} (mapped as `{key}`) is missing",
                        at(name)
                    ))),
                }
            };
        let text = |key: &'static str, name: &Option<String>| -> Result<Option<&str>, StageError> {
            match get(key, name)? {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(other) => Err(StageError::Input(format!(
                    "{} (mapped as `{key}`) must be a string, found {}",
                    at(name.as_deref().unwrap_or_default()),
                    json_type(other)
                ))),
            }
        };
        let scalar = |key: &'static str,
                      name: &Option<String>|
         -> Result<Option<Cow<'_, str>>, StageError> {
            match get(key, name)? {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(Cow::Borrowed(s.as_str()))),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => {
                    Ok(Some(Cow::Owned(v.to_string())))
                }
                Some(other) => Err(StageError::Input(format!(
                    "{} (mapped as `{key}`) must be a string or a number, found {}",
                    at(name.as_deref().unwrap_or_default()),
                    json_type(other)
                ))),
            }
        };
        let mut row = Row {
            id: scalar("id", &c.id)?,
            prompt: text("prompt", &c.prompt)?,
            system: text("system", &c.system)?,
            reference: scalar("reference", &c.reference)?,
            ..Row::default()
        };
        if let Some(name) = &c.messages {
            let turns = match get("messages", &c.messages)? {
                Some(Value::Array(items)) => items,
                None => return Err(StageError::Input(format!("{} is null", at(name)))),
                Some(other) => {
                    return Err(StageError::Input(format!(
                        "{} (mapped as `messages`) must be an array of turns, found {}",
                        at(name),
                        json_type(other)
                    )));
                }
            };
            let turns: Vec<(Option<&str>, Option<&str>)> = turns
                .iter()
                .map(|t| {
                    let f =
                        |a: &str, b: &str| t.get(a).or_else(|| t.get(b)).and_then(Value::as_str);
                    (f("role", "from"), f("content", "value"))
                })
                .collect();
            self.chat(&mut row, turns.into_iter(), &at(name))?;
        }
        let finish = get("finish_reason", &c.finish_reason)?;
        match get("generations", &c.generations)? {
            None => {}
            Some(Value::String(s)) => row.samples.push(Sample {
                reasoning: None,
                text: s,
                finish_reason: finish.and_then(Value::as_str),
            }),
            Some(Value::Array(items)) => {
                let reasons = finish
                    .and_then(Value::as_array)
                    .filter(|r| r.len() == items.len());
                for (k, item) in items.iter().enumerate() {
                    let Value::String(s) = item else {
                        return Err(StageError::Input(format!(
                            "{}: trace {} must be a string, found {}",
                            at(c.generations.as_deref().unwrap_or_default()),
                            k + 1,
                            json_type(item)
                        )));
                    };
                    row.samples.push(Sample {
                        reasoning: None,
                        text: s,
                        finish_reason: reasons.and_then(|r| r[k].as_str()),
                    });
                }
            }
            Some(other) => {
                return Err(StageError::Input(format!(
                    "{} (mapped as `generations`) must be a string or an array of strings, found {}",
                    at(c.generations.as_deref().unwrap_or_default()),
                    json_type(other)
                )));
            }
        }
        if let Some(answer) = text("answer", &c.answer)? {
            row.samples.push(Sample {
                reasoning: text("reasoning", &c.reasoning)?,
                text: answer,
                finish_reason: finish.and_then(Value::as_str),
            });
        }
        let mapped: Vec<&str> = c.named().map(|(_, n)| n).collect();
        let many = matches!(
            c.generations.as_ref().and_then(|g| obj.get(g)),
            Some(Value::Array(_))
        );
        for (k, v) in obj {
            if mapped.contains(&k.as_str()) || ignore.contains(&k.as_str()) {
                continue;
            }
            match v {
                Value::Array(items) if many && items.len() == row.samples.len() => {
                    row.per_sample.push((k.as_str(), items.clone()))
                }
                v => {
                    row.extra.insert(k.clone(), v.clone());
                }
            }
        }
        self.row(origin, row, emit)
    }

    /// Checks a row (always) and converts it (when `emit` is given).
    fn row(
        &mut self,
        origin: &Origin<'_>,
        row: Row<'_>,
        emit: &mut Emit<'_>,
    ) -> Result<(), StageError> {
        self.rows += 1;
        self.file_rows += 1;
        let n = self.file_rows;
        let at = |col: &str| format!("{}: row {n}: column `{col}`", origin.shown);
        let c = self.columns;
        let prompt_col = c
            .prompt
            .as_deref()
            .or(c.messages.as_deref())
            .unwrap_or_default();
        let prompt = match row.prompt {
            Some(p) if !p.trim().is_empty() => p,
            Some(_) => {
                return Err(StageError::Input(format!(
                    "{}: the prompt is empty",
                    at(prompt_col)
                )));
            }
            None => {
                return Err(StageError::Input(format!(
                    "{}: the prompt is null",
                    at(prompt_col)
                )));
            }
        };
        if row.samples.is_empty() {
            let col = c
                .generations
                .as_deref()
                .or(c.answer.as_deref())
                .or(c.messages.as_deref())
                .unwrap_or_default();
            return Err(StageError::Input(format!("{} holds no trace", at(col))));
        }
        if let Some(system) = row.system {
            match &self.system {
                None => {
                    self.system = Some((system.to_string(), format!("{}: row {n}", origin.shown)))
                }
                Some((first, _)) if first == system => {}
                Some((_, first_row)) => {
                    return Err(StageError::Input(format!(
                        "{}: the system prompt differs from the one at {first_row}; distill records one system prompt per stage: import such rows in separate stages, or `ignore` the column",
                        at(c.system
                            .as_deref()
                            .or(c.messages.as_deref())
                            .unwrap_or_default())
                    )));
                }
            }
        }
        let source_id = match &row.id {
            Some(id) => {
                if let Some(first) = self
                    .seen_ids
                    .insert(id.to_string(), format!("{}: row {n}", origin.shown))
                {
                    return Err(StageError::Input(format!(
                        "{}: id `{id}` repeats the one at {first}",
                        at(c.id.as_deref().unwrap_or_default())
                    )));
                }
                id.to_string()
            }
            None => self.rows.to_string(),
        };
        self.samples += row.samples.len();
        let Some(emit) = emit else {
            return Ok(());
        };
        let reference = row.reference.map(Cow::into_owned);
        let content_hash = crate::hash::hex128(
            format!("{prompt}\u{0}{}", reference.as_deref().unwrap_or("")).as_bytes(),
        );
        let prompt = NewPrompt {
            source_id,
            prompt: prompt.to_string(),
            answer: reference,
            content_hash,
            extra: (!row.extra.is_empty()).then(|| Value::Object(row.extra).to_string()),
        };
        let samples = row
            .samples
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let (reasoning, answer) = split(s.reasoning, s.text);
                let extra = (!row.per_sample.is_empty()).then(|| {
                    let m: Map<String, Value> = row
                        .per_sample
                        .iter()
                        .map(|(name, items)| (name.to_string(), items[k].clone()))
                        .collect();
                    Value::Object(m).to_string()
                });
                NewGeneration {
                    sample_index: k as i64,
                    reasoning: Some(reasoning),
                    answer: Some(answer),
                    finish_reason: s.finish_reason.map(str::to_string),
                    endpoint: Some(origin.shown.to_string()),
                    model: Some(self.model.to_string()),
                    request_hash: origin.hash.to_string(),
                    attempts: 0,
                    extra,
                    ..NewGeneration::default()
                }
            })
            .collect();
        emit((prompt, samples))
    }
}

/// Row `i` of a text or number column as text, `None` when null.
fn scalar(a: Option<&dyn Array>, i: usize) -> Option<Cow<'_, str>> {
    let a = a?;
    match Text::of(a) {
        Some(t) => t.get(i).map(Cow::Borrowed),
        None => match tabular::json_at(a, i) {
            Value::Null => None,
            v => Some(Cow::Owned(v.to_string())),
        },
    }
}

/// Which column of a Parquet file feeds which key, and the other columns recorded
/// (`true`: a list holding one element per sample when the row has several).
#[derive(Default)]
struct Plan {
    mapped: HashMap<&'static str, usize>,
    extra: Vec<(usize, bool)>,
}

const BEGIN_THOUGHT: &str = "<|begin_of_thought|>";
const END_THOUGHT: &str = "<|end_of_thought|>";
const BEGIN_SOLUTION: &str = "<|begin_of_solution|>";
const END_SOLUTION: &str = "<|end_of_solution|>";

/// Splits a completion into trimmed (reasoning, answer) as the teacher client does: a
/// separate reasoning field combined with the content, `<think>` inline; and the
/// Sky-T1 / OpenThoughts markers, whose solution block is the answer.
pub fn split(reasoning: Option<&str>, text: &str) -> (String, String) {
    use distill_teacher::find;
    if let Some(r) = reasoning {
        return distill_teacher::normalize(r, text);
    }
    if let Some(start) = find(text, BEGIN_THOUGHT) {
        let body = &text[start + BEGIN_THOUGHT.len()..];
        let (thought, rest) = match find(body, END_THOUGHT) {
            Some(end) => (&body[..end], &body[end + END_THOUGHT.len()..]),
            // Cut off while thinking: all reasoning, no answer.
            None => (body, ""),
        };
        let answer = match find(rest, BEGIN_SOLUTION) {
            Some(s) => {
                let sol = &rest[s + BEGIN_SOLUTION.len()..];
                find(sol, END_SOLUTION).map_or(sol, |e| &sol[..e])
            }
            None => rest,
        };
        return (thought.trim().to_string(), answer.trim().to_string());
    }
    let (r, a) = distill_teacher::split_think(text);
    (r.to_string(), a.to_string())
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Every record an import stage with `params` would write, for tests and the
/// benchmark.
pub fn read_all(params: ImportParams, workdir: &Path) -> Result<Vec<Record>, StageError> {
    let import = Import::new(params, workdir).map_err(|e| StageError::Input(e.to_string()))?;
    let mut out = Vec::new();
    import.scan(Some(&mut |r| {
        out.push(r);
        Ok(())
    }))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/datasets")
    }

    fn params(path: &str, preset: Option<Preset>) -> ImportParams {
        ImportParams {
            path: path.into(),
            format: FileFormat::Auto,
            preset,
            columns: Columns::default(),
            ignore: None,
            dataset: None,
            license: None,
            limit: None,
        }
    }

    #[test]
    fn splits_think_tags_thought_markers_and_separate_reasoning() {
        assert_eq!(
            split(None, "<think>\nr\n</think>\n\na"),
            ("r".into(), "a".into())
        );
        assert_eq!(
            split(None, "plain answer"),
            ("".into(), "plain answer".into())
        );
        assert_eq!(
            split(
                None,
                "<|begin_of_thought|>\n\nt\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\ns\n\n<|end_of_solution|>"
            ),
            ("t".into(), "s".into())
        );
        assert_eq!(
            split(None, "<|begin_of_thought|>\ncut while thinking"),
            ("cut while thinking".into(), "".into())
        );
        assert_eq!(
            split(Some("field"), "<think>inline</think>ans"),
            ("field\n\ninline".into(), "ans".into())
        );
    }

    #[test]
    fn one_row_of_several_generations_is_several_samples_of_one_prompt() {
        let got = read_all(
            params("openr1-math/data/train-*.parquet", Some(Preset::OpenR1Math)),
            &fixtures(),
        )
        .unwrap();
        let counts: Vec<usize> = got.iter().map(|(_, g)| g.len()).collect();
        assert_eq!(counts, [2, 2, 4, 2, 3]);
        assert_eq!(got[2].1[3].sample_index, 3);
        assert_eq!(got[0].0.answer.as_deref(), Some("4"));
    }

    #[test]
    fn the_parallel_dry_pass_agrees_with_the_sequential_one_and_defers_errors_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let rows = |ids: [u32; 2], system: &str| {
            ids.iter()
                .map(|i| {
                    format!(
                        "{{\"q\":\"p{i}\",\"g\":[\"x\",\"y\"],\"id\":{i},\"s\":\"{system}\"}}\n"
                    )
                })
                .collect::<String>()
        };
        let mut p = params("*.jsonl", None);
        p.columns = Columns {
            prompt: col("q"),
            generations: col("g"),
            id: col("id"),
            system: col("s"),
            ..Columns::default()
        };
        let scan = |a: String, b: String| {
            std::fs::write(dir.path().join("a.jsonl"), a).unwrap();
            std::fs::write(dir.path().join("b.jsonl"), b).unwrap();
            let imp = Import::new(p.clone(), dir.path()).unwrap();
            let dry = imp.scan(None);
            let full = imp.scan(Some(&mut |_| Ok(())));
            (dry, full)
        };
        let (dry, full) = scan(rows([1, 2], "S"), rows([3, 4], "S"));
        let (dry, full) = (dry.unwrap(), full.unwrap());
        assert_eq!(
            (dry.prompts, dry.samples, &dry.files, &dry.system),
            (4, 8, &full.files, &Some("S".to_string()))
        );
        assert_eq!((full.prompts, full.samples), (4, 8));
        // An id repeated across files, and system prompts that differ across files: the
        // error the sequential pass gives, naming the later row and the earlier one.
        let (dry, _) = scan(rows([1, 2], "S"), rows([3, 2], "S"));
        let err = dry.unwrap_err().to_string();
        assert!(
            err.contains("b.jsonl: row 2: column `id`") && err.contains("a.jsonl: row 2"),
            "{err}"
        );
        let (dry, _) = scan(rows([1, 2], "S"), rows([3, 4], "T"));
        let err = dry.unwrap_err().to_string();
        assert!(
            err.contains("b.jsonl: row 1")
                && err.contains("differs from the one at a.jsonl: row 1"),
            "{err}"
        );
    }

    #[test]
    fn limit_stops_across_shards_and_ids_must_be_unique() {
        let mut p = params("openr1-math/data/train-*.parquet", Some(Preset::OpenR1Math));
        p.limit = Some(4);
        assert_eq!(read_all(p, &fixtures()).unwrap().len(), 4);

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("t.jsonl"),
            "{\"q\":\"a\",\"g\":\"x\",\"id\":1}\n{\"q\":\"b\",\"g\":\"y\",\"id\":1}\n",
        )
        .unwrap();
        let mut p = params("t.jsonl", None);
        p.columns = Columns {
            prompt: col("q"),
            generations: col("g"),
            id: col("id"),
            ..Columns::default()
        };
        let err = read_all(p, dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("t.jsonl: row 2: column `id`") && err.contains("t.jsonl: row 1"),
            "{err}"
        );
    }
}
