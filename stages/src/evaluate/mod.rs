//! The `evaluate` stage: benchmark a model with the DeepSeek-R1 protocol (k samples
//! per question at temperature 0.6, top-p 0.95, a long token budget, no system
//! prompt, the "reason step by step" instruction) and record pass@1, pass@K and
//! cons@K with their protocol.
//!
//! The model under test is a model folder (`model = "DIR"`, generated locally with
//! Burn) or an OpenAI-compatible endpoint (`teacher = "NAME"`). Every sample is its
//! own row, so a killed evaluation resumes where it stopped, and each sample's
//! randomness depends only on (seed, question, sample), so the resumed scores equal
//! an uninterrupted run's.

mod local;
pub mod serve;

pub use local::model_identity;
pub mod metrics;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use distill_curate::verify::{Verdict, normalize, verify_response};
pub use distill_db::evals::NewEvalSample;
use distill_db::evals::{self, NewScore};
use distill_teacher::{ChatModel, ChatRequest, Message, TeacherConfig};
use futures::StreamExt;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::generate::{DEFAULT_TEMPLATE, check_sampling};
use crate::load::{Format, LoadParams, read_prompts_from};
use crate::{BuildEnv, ParamError, Stage, StageContext, StageError, StageKind, parse_params};

/// The `evaluate` stage kind.
pub struct EvaluateKind;

pub use crate::device::Device;

/// Parameters of an `evaluate` stage.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateParams {
    /// The benchmark: JSONL (or a JSON array) of questions with reference answers.
    pub benchmark: PathBuf,
    /// Name in score tables; default: the file stem.
    #[serde(default)]
    pub name: Option<String>,
    /// Field holding the question.
    #[serde(default = "crate::load::default_prompt_field")]
    pub prompt_field: String,
    /// Field holding the reference answer (for multiple choice: the correct choice's text).
    #[serde(default = "crate::load::default_answer_field")]
    pub answer_field: String,
    /// Field holding a unique id; default: the record number.
    #[serde(default)]
    pub id_field: Option<String>,
    /// Multiple choice: field holding the list of choices, shown as lettered options in
    /// an order shuffled per question with `seed`; the reference becomes the letter.
    #[serde(default)]
    pub choices_field: Option<String>,
    /// Evaluate only the first N questions (quick runs).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Samples per question (k).
    #[serde(default = "one")]
    pub samples: u32,
    /// Sampling temperature.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Nucleus mass.
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// Token budget per sample.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// The user message; `{prompt}` is replaced by the question.
    #[serde(default = "default_template")]
    pub prompt_template: String,
    /// Seed of the samples (and of multiple-choice shuffles).
    #[serde(default)]
    pub seed: u64,
    /// A model folder in Hugging Face layout, generated locally.
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// An OpenAI-compatible `[teacher.NAME]` endpoint.
    #[serde(default)]
    pub teacher: Option<String>,
    /// A `train` stage of this run (listed in `needs`): its checkpoints are evaluated.
    #[serde(default)]
    pub student: Option<String>,
    /// With `student`: `all` recorded checkpoints, or only the `final` model.
    #[serde(default)]
    pub checkpoints: CheckpointChoice,
    /// With `student`: also evaluate the model training started from (as step 0), the
    /// "before" row; for a from-scratch (`init`) train stage, the random model.
    #[serde(default)]
    pub include_base: bool,
    /// How tables name the model; default: the folder name or the endpoint's model.
    #[serde(default)]
    pub label: Option<String>,
    /// Where a local model runs.
    #[serde(default)]
    pub device: Device,
    /// Local models: sequences decoded at once (continuous batching); default: as many as a
    /// quarter of the free memory holds KV caches for (half of a GPU's), at most 32 on a CPU and 64 on a GPU. Not part
    /// of the stage's identity: samples do not depend on it.
    #[serde(default)]
    pub max_batch: Option<usize>,
    /// Local models: score through an inference server started for each model folder
    /// (`{ command = "vllm serve {model} --port {port}", ready_timeout_s = 900 }`) instead
    /// of generating with Burn.
    #[serde(default)]
    pub serve: Option<serve::ServeParams>,
}

fn one() -> u32 {
    1
}
fn default_temperature() -> f64 {
    0.6
}
fn default_top_p() -> f64 {
    0.95
}
fn default_max_tokens() -> u32 {
    32768
}
fn default_template() -> String {
    DEFAULT_TEMPLATE.into()
}

/// Which checkpoints of a train stage to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointChoice {
    /// Every checkpoint still on disk, and the final model.
    #[default]
    All,
    /// Only the final model.
    Final,
}

/// Version of the grading of local samples, part of their stages' identity: 2 grades
/// a sample cut by the token budget inside its reasoning as no answer.
const LOCAL_GRADING: u32 = 2;

/// What a stage evaluates.
#[derive(Debug, Clone)]
enum Target {
    Model(PathBuf),
    Teacher(String, Box<TeacherConfig>),
    Student(String),
}

impl StageKind for EvaluateKind {
    fn name(&self) -> &'static str {
        "evaluate"
    }
    fn about(&self) -> &'static str {
        "benchmark a model folder or an endpoint: pass@1, pass@k, cons@k with their protocol"
    }
    fn version(&self) -> u32 {
        1
    }
    fn build(&self, params: toml::Table, env: &BuildEnv) -> Result<Arc<dyn Stage>, ParamError> {
        let p: EvaluateParams = parse_params(params)?;
        if p.include_base && p.student.is_none() {
            return Err(ParamError::new(
                "include_base",
                "only with `student` (the base of a train stage)",
            ));
        }
        let target = match (&p.model, &p.teacher) {
            (None, None) if p.student.is_some() => {
                let name = p.student.clone().expect("checked");
                if !env
                    .stages
                    .get(&name)
                    .is_some_and(|k| crate::grpo::STUDENT_KINDS.contains(&k.as_str()))
                {
                    return Err(ParamError::new(
                        "student",
                        format!("no train or grpo stage named `{name}` in the config"),
                    ));
                }
                if !env.needs.iter().any(|(n, _)| n == &name) {
                    return Err(ParamError::new(
                        "needs",
                        format!("list `{name}` in `needs` so its checkpoints exist first"),
                    ));
                }
                Target::Student(name)
            }
            _ if p.student.is_some() => {
                return Err(ParamError::new(
                    "student",
                    "name exactly one model under test: `model`, `teacher` or `student`",
                ));
            }
            (Some(dir), None) => Target::Model(env.resolve(dir)),
            (None, Some(name)) => Target::Teacher(
                name.clone(),
                Box::new(env.teachers.get(name).cloned().ok_or_else(|| {
                    ParamError::new("teacher", format!("no [teacher.{name}] in the config"))
                })?),
            ),
            _ => {
                return Err(ParamError::new(
                    "model",
                    "name exactly one model under test: `model = \"DIR\"`, `teacher = \"NAME\"` or `student = \"STAGE\"`",
                ));
            }
        };
        let file = env.resolve(&p.benchmark);
        if !file.is_file() {
            return Err(ParamError::new(
                "benchmark",
                format!("no such file: {}", file.display()),
            ));
        }
        if p.samples == 0 {
            return Err(ParamError::new("samples", "must be at least 1"));
        }
        if p.max_batch == Some(0) {
            return Err(ParamError::new("max_batch", "must be at least 1"));
        }
        if let Some(serve) = &p.serve {
            if p.teacher.is_some() {
                return Err(ParamError::new(
                    "serve",
                    "only for local models (`model` or `student`): an endpoint is already served",
                ));
            }
            if p.max_batch.is_some() {
                return Err(ParamError::new(
                    "max_batch",
                    "not with `serve`: the server batches (set `serve.max_concurrency`)",
                ));
            }
            serve.check().map_err(|m| ParamError::new("serve", m))?;
        }
        if p.max_batch.is_some() && p.teacher.is_some() {
            return Err(ParamError::new(
                "max_batch",
                "only for local models (an endpoint's concurrency is the teacher's `max_concurrency`)",
            ));
        }
        check_sampling(p.temperature, p.top_p, p.max_tokens, &p.prompt_template)?;
        let name = p.name.clone().unwrap_or_else(|| {
            file.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "benchmark".into())
        });
        Ok(Arc::new(Evaluate {
            params: p,
            file,
            name,
            target,
            questions: OnceLock::new(),
        }))
    }
}

/// A benchmark question as asked.
#[derive(Debug, Clone)]
pub struct Question {
    /// Its id.
    pub id: String,
    /// The user message sent.
    pub message: String,
    /// The reference answer (a letter for multiple choice).
    pub gold: String,
}

/// A configured `evaluate` stage.
#[derive(Debug)]
pub struct Evaluate {
    params: EvaluateParams,
    file: PathBuf,
    name: String,
    target: Target,
    /// Parsed while fingerprinting, so a malformed benchmark fails before any write.
    questions: OnceLock<(String, Vec<Question>)>,
}

impl Evaluate {
    fn questions(&self) -> Result<&(String, Vec<Question>), StageError> {
        if let Some(q) = self.questions.get() {
            return Ok(q);
        }
        let p = &self.params;
        let bytes = std::fs::read(&self.file)
            .map_err(|e| StageError::Input(format!("cannot read {}: {e}", self.file.display())))?;
        let loaded = read_prompts_from(
            &self.file,
            &bytes,
            &LoadParams {
                path: self.file.clone(),
                format: Format::Auto,
                prompt_field: p.prompt_field.clone(),
                answer_field: p.answer_field.clone(),
                id_field: p.id_field.clone(),
                limit: p.limit,
                shuffle_seed: None,
            },
        )?;
        let mut questions = Vec::with_capacity(loaded.prompts.len());
        for r in loaded.prompts {
            let Some(answer) = r.answer.filter(|a| !a.trim().is_empty()) else {
                return Err(StageError::Input(format!(
                    "{}: question `{}` has no reference answer in `{}`",
                    self.file.display(),
                    r.source_id,
                    p.answer_field
                )));
            };
            let (text, gold) = match &p.choices_field {
                None => (r.prompt, answer),
                Some(field) => {
                    let extra: Value = r
                        .extra
                        .as_deref()
                        .and_then(|e| serde_json::from_str(e).ok())
                        .unwrap_or(Value::Null);
                    let choices: Vec<String> = extra
                        .get(field)
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|c| c.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    multiple_choice(&r.source_id, &r.prompt, &answer, choices, p.seed).map_err(
                        |m| {
                            StageError::Input(format!(
                                "{}: question `{}`: {m}",
                                self.file.display(),
                                r.source_id
                            ))
                        },
                    )?
                }
            };
            questions.push(Question {
                message: p.prompt_template.replace("{prompt}", &text),
                id: r.source_id,
                gold,
            });
        }
        Ok(self
            .questions
            .get_or_init(|| (crate::hash::hex128(&bytes), questions)))
    }

    /// The protocol a score follows: two scores are comparable iff these are equal.
    fn protocol(&self) -> Result<Value, StageError> {
        let p = &self.params;
        let (hash, questions) = self.questions()?;
        Ok(json!({
            "benchmark": self.name,
            "benchmark_hash": hash,
            "questions": questions.len(),
            "samples": p.samples,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "max_tokens": p.max_tokens,
            "template_hash": &crate::hash::hex128(p.prompt_template.as_bytes())[..8],
            "choices_seed": p.choices_field.as_ref().map(|_| p.seed),
        }))
    }

    fn target_key_and_label(&self) -> (String, String) {
        match &self.target {
            Target::Student(name) => (format!("student:{name}"), name.clone()),
            Target::Model(dir) => (
                format!("model:{}", dir.display()),
                self.params.label.clone().unwrap_or_else(|| {
                    dir.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| dir.display().to_string())
                }),
            ),
            Target::Teacher(name, config) => (
                format!("teacher:{name}"),
                self.params
                    .label
                    .clone()
                    .unwrap_or_else(|| format!("{name} ({})", config.model)),
            ),
        }
    }
}

/// Lettered options in a per-question shuffled order, and the correct letter.
fn multiple_choice(
    id: &str,
    question: &str,
    answer: &str,
    mut choices: Vec<String>,
    seed: u64,
) -> Result<(String, String), String> {
    if choices.len() < 2 || choices.len() > 26 {
        return Err(format!("needs 2 to 26 choices, has {}", choices.len()));
    }
    if !choices.iter().any(|c| c.trim() == answer.trim()) {
        return Err("the answer is not one of the choices".into());
    }
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ xxhash_rust::xxh3::xxh3_64(id.as_bytes()));
    choices.shuffle(&mut rng);
    let mut text = format!("{question}\n");
    let mut gold = String::new();
    for (i, c) in choices.iter().enumerate() {
        let letter = (b'A' + i as u8) as char;
        text.push_str(&format!("\n{letter}) {c}"));
        if c.trim() == answer.trim() {
            gold = letter.to_string();
        }
    }
    Ok((text, gold))
}

/// A generated sample before scoring.
#[derive(Debug, Clone)]
pub struct Sampled {
    /// Which sample of the question.
    pub sample_index: i64,
    /// The whole response (reasoning, `</think>`, answer).
    pub output: String,
    /// Tokens generated.
    pub tokens: Option<i64>,
    /// Why it stopped.
    pub finish_reason: Option<String>,
    /// Whether the reasoning was already open where `output` begins (the prompt ended
    /// with `<think>`, or the endpoint's reasoning was split out of its content).
    pub think_open: bool,
}

/// Scores a sample against its question's reference: the answer follows the
/// reasoning, and a sample cut by the token budget inside its reasoning has none.
pub fn score_sample(question: &Question, s: Sampled) -> NewEvalSample {
    let length_stop = s.finish_reason.as_deref() == Some("length");
    let outcome = verify_response(&question.gold, &s.output, s.think_open, length_stop);
    let extracted = outcome.extracted.map(|e| e.text);
    NewEvalSample {
        item_id: question.id.clone(),
        sample_index: s.sample_index,
        vote_key: extracted.as_deref().map(normalize),
        extracted,
        verdict: match outcome.verdict {
            Verdict::Correct => "correct",
            Verdict::Incorrect => "incorrect",
            Verdict::Unknown => "unknown",
        }
        .into(),
        output: s.output,
        tokens: s.tokens,
        finish_reason: s.finish_reason,
    }
}

/// An endpoint's completion as one output beginning inside the reasoning the client
/// split out: `reasoning</think>answer`, or the bare reasoning when the token budget
/// ran out before any answer, so that no `</think>` is invented for it.
fn endpoint_sample(sample_index: i64, c: distill_teacher::Completion) -> Sampled {
    let cut = c.is_truncated() && c.answer.is_empty();
    let think_open = !c.reasoning.is_empty();
    let output = if !think_open {
        c.answer
    } else if cut {
        c.reasoning
    } else {
        format!("{}\n</think>\n\n{}", c.reasoning, c.answer)
    };
    Sampled {
        sample_index,
        output,
        tokens: c.completion_tokens.map(i64::from),
        finish_reason: c.finish_reason,
        think_open,
    }
}

/// The seed of one sample: a function of (stage seed, question, sample) only.
pub fn sample_seed(seed: u64, question: &str, sample: i64) -> u64 {
    xxhash_rust::xxh3::xxh3_64(format!("{seed}\u{0}{question}\u{0}{sample}").as_bytes())
}

#[async_trait]
impl Stage for Evaluate {
    fn preflight(&self) -> Result<(), StageError> {
        if let Target::Model(dir) = &self.target
            && !dir.join("config.json").is_file()
        {
            return Err(StageError::Input(format!(
                "model: {} is not a model folder (no config.json)",
                dir.display()
            )));
        }
        // A served model runs in the server, which brings its own GPU stack.
        let local = !matches!(self.target, Target::Teacher(..)) && self.params.serve.is_none();
        if local && self.params.device == Device::Cuda {
            crate::device::check_cuda_devices(&[0])?;
        }
        Ok(())
    }

    fn identity(&self) -> Result<Value, StageError> {
        let target = match &self.target {
            Target::Model(dir) => json!({ "model": local::model_identity(dir)? }),
            // A simulator's settings only when simulated, so real teachers keep
            // their fingerprints.
            Target::Teacher(_, config) => match &config.simulated {
                None => json!({ "teacher_model": config.model }),
                Some(sim) => json!({ "teacher_model": config.model, "teacher_simulated": sim }),
            },
            // The train stage's fingerprint (upstream) stands for its weights.
            Target::Student(name) if self.params.include_base => json!({
                "student": name,
                "checkpoints": self.params.checkpoints,
                "include_base": true,
            }),
            Target::Student(name) => {
                json!({ "student": name, "checkpoints": self.params.checkpoints })
            }
        };
        let mut identity = json!({
            "protocol": self.protocol()?,
            "seed": self.params.seed,
            "target": target,
        });
        // Local samples cut inside the reasoning a chat template opened used to be
        // graded on their drafts; the marker reruns evaluations recorded that way.
        // Endpoint samples already were graded as no answer (the client splits their
        // reasoning out), so their fingerprints, and their paid-for samples, are kept.
        if !matches!(self.target, Target::Teacher(..)) {
            identity["grading"] = json!(LOCAL_GRADING);
        }
        // Samples from a server come from another engine (and are graded as an endpoint's):
        // switching between local and served generation starts over. The command itself is
        // left out, so flags that change nothing (a port, a log level) keep what was scored.
        if self.params.serve.is_some() {
            identity["served"] = json!(true);
        }
        Ok(identity)
    }

    async fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let (_, questions) = self.questions()?;
        // (target key, label, training step, model folder or None for the endpoint)
        let mut targets: Vec<(String, String, Option<i64>, Option<PathBuf>)> = Vec::new();
        match &self.target {
            Target::Student(name) => {
                let input = ctx
                    .inputs
                    .iter()
                    .find(|i| &i.name == name)
                    .ok_or_else(|| StageError::Failed(format!("`{name}` is not an input")))?;
                if self.params.include_base {
                    let summary: Option<String> =
                        sqlx::query_scalar("SELECT summary FROM stages WHERE id = ?")
                            .bind(input.stage_id)
                            .fetch_one(ctx.db.pool())
                            .await?;
                    let base = summary
                        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
                        .and_then(|v| v["base_model"].as_str().map(PathBuf::from))
                        .filter(|p| p.join("config.json").is_file())
                        .ok_or_else(|| {
                            StageError::Input(format!(
                                "train stage `{name}` recorded no base model on disk to evaluate"
                            ))
                        })?;
                    targets.push((
                        format!("base:{name}"),
                        format!("{name}@0"),
                        Some(0),
                        Some(base),
                    ));
                }
                for c in distill_db::training::checkpoints(ctx.db.pool(), input.stage_id).await? {
                    let wanted = c.r#final || self.params.checkpoints == CheckpointChoice::All;
                    if !wanted || !Path::new(&c.path).is_dir() {
                        continue;
                    }
                    let damage = crate::checkpoint_files::verify_recorded(&c).await?;
                    if !damage.is_empty() {
                        let files = crate::checkpoint_files::list(&damage);
                        if c.r#final {
                            return Err(StageError::Input(format!(
                                "the final model of train stage `{name}` is damaged: {files}"
                            )));
                        }
                        tracing::warn!(
                            "not evaluating checkpoint {} (step {}): damaged: {files}",
                            c.path,
                            c.step
                        );
                        continue;
                    }
                    targets.push((
                        format!("checkpoint:{name}@{}", c.step),
                        format!("{name}@{}", c.step),
                        Some(c.step),
                        Some(PathBuf::from(&c.path)),
                    ));
                }
                if !targets.iter().any(|t| t.0.starts_with("checkpoint:")) {
                    return Err(StageError::Input(format!(
                        "train stage `{name}` has no checkpoint on disk to evaluate"
                    )));
                }
            }
            Target::Model(dir) => {
                let (key, label) = self.target_key_and_label();
                targets.push((key, label, None, Some(dir.clone())));
            }
            Target::Teacher(..) => {
                let (key, label) = self.target_key_and_label();
                targets.push((key, label, None, None));
            }
        }
        let k = self.params.samples as i64;
        ctx.progress
            .set_total(targets.len() as u64 * questions.len() as u64 * k as u64);
        let mut summaries = Vec::new();
        for (target, label, step, dir) in &targets {
            let done: HashSet<(String, i64)> =
                evals::done_samples(ctx.db.pool(), ctx.stage_id, target)
                    .await?
                    .into_iter()
                    .collect();
            ctx.progress.inc(done.len() as u64);
            let work: Vec<(Question, Vec<i64>)> = questions
                .iter()
                .filter_map(|q| {
                    let missing: Vec<i64> = (0..k)
                        .filter(|i| !done.contains(&(q.id.clone(), *i)))
                        .collect();
                    (!missing.is_empty()).then(|| (q.clone(), missing))
                })
                .collect();
            match (&self.target, dir) {
                (Target::Teacher(name, config), _) => {
                    let client = distill_teacher::connect(config)
                        .await
                        .map_err(|e| StageError::Input(format!("teacher `{name}`: {e}")))?;
                    let concurrency = config.max_concurrency * config.endpoint_count();
                    self.sample_endpoint(
                        ctx,
                        target,
                        &client,
                        config.supports_n,
                        concurrency,
                        work,
                    )
                    .await?;
                }
                (_, Some(_)) if work.is_empty() => {}
                (_, Some(dir)) => match &self.params.serve {
                    Some(serve) => self.sample_served(ctx, target, dir, serve, work).await?,
                    None => local::sample(ctx, target, dir, &self.params, work).await?,
                },
                (_, None) => unreachable!("local targets carry their folder"),
            }
            ctx.check_cancelled()?;
            summaries.push(
                self.record_scores(ctx, target, label, *step, questions)
                    .await?,
            );
        }
        Ok(if summaries.len() == 1 {
            summaries.remove(0)
        } else {
            Value::Array(summaries)
        })
    }
}

impl Evaluate {
    /// Starts a server for `dir`, samples from it like from an endpoint, and stops it.
    async fn sample_served(
        &self,
        ctx: &StageContext,
        target: &str,
        dir: &Path,
        serve: &serve::ServeParams,
        work: Vec<(Question, Vec<i64>)>,
    ) -> Result<(), StageError> {
        if !dir.join("config.json").is_file() {
            return Err(StageError::Input(format!(
                "{} has no config.json for a server to load (an intermediate LoRA checkpoint holds adapters only: evaluate `checkpoints = \"final\"`)",
                dir.display()
            )));
        }
        let log = format!(
            "serve-{}.log",
            target
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect::<String>()
        );
        let server = serve::Server::start(serve, dir, &ctx.artifacts, &log, &ctx.cancel).await?;
        let mut config = TeacherConfig::new(server.base_url(), server.model());
        config.max_concurrency = serve.max_concurrency;
        let result = async {
            let client = distill_teacher::connect(&config)
                .await
                .map_err(|e| StageError::Input(format!("server for {}: {e}", dir.display())))?;
            self.sample_endpoint(
                ctx,
                target,
                &client,
                config.supports_n,
                serve.max_concurrency,
                work,
            )
            .await
        }
        .await;
        server.stop().await;
        result
    }

    /// Samples from an OpenAI-compatible endpoint, committing each question's samples.
    async fn sample_endpoint(
        &self,
        ctx: &StageContext,
        target: &str,
        model: &dyn ChatModel,
        supports_n: bool,
        concurrency: usize,
        work: Vec<(Question, Vec<i64>)>,
    ) -> Result<(), StageError> {
        let p = &self.params;
        let ask = |(q, missing): (Question, Vec<i64>)| async move {
            let base = ChatRequest {
                temperature: Some(p.temperature),
                top_p: Some(p.top_p),
                max_tokens: Some(p.max_tokens),
                n: missing.len() as u32,
                seed: Some(sample_seed(p.seed, &q.id, 0)),
                ..ChatRequest::new(vec![Message::user(q.message.clone())])
            };
            let mut out = Vec::new();
            if supports_n && missing.len() > 1 {
                let completions = model.chat(&base).await?;
                out.extend(completions.into_iter().zip(&missing).map(|(c, &i)| (i, c)));
            } else {
                for &i in &missing {
                    let mut req = base.single(0);
                    req.seed = Some(sample_seed(p.seed, &q.id, i));
                    let mut c = model.chat(&req).await?;
                    out.push((i, c.remove(0)));
                }
            }
            Ok::<_, distill_teacher::TeacherError>((q, out))
        };
        let mut results = futures::stream::iter(work)
            .map(ask)
            .buffer_unordered(concurrency.max(1));
        while let Some(result) = results.next().await {
            let (q, completions) =
                result.map_err(|e| StageError::Failed(format!("evaluating: {e}")))?;
            let rows: Vec<NewEvalSample> = completions
                .into_iter()
                .map(|(i, c)| score_sample(&q, endpoint_sample(i, c)))
                .collect();
            write_samples(ctx, target, &rows).await?;
            if ctx.cancel.is_cancelled() {
                break;
            }
        }
        Ok(())
    }

    /// Computes and records the metrics of `target` from its samples.
    async fn record_scores(
        &self,
        ctx: &StageContext,
        target: &str,
        label: &str,
        step: Option<i64>,
        questions: &[Question],
    ) -> Result<Value, StageError> {
        let outcomes = evals::outcomes(ctx.db.pool(), ctx.stage_id, target).await?;
        let mut by_question: BTreeMap<&str, metrics::Question> = BTreeMap::new();
        for o in &outcomes {
            let q = by_question.entry(o.item_id.as_str()).or_default();
            q.correct.push(o.verdict == "correct");
            q.votes.push(o.vote_key.clone());
        }
        let asked: HashSet<&str> = questions.iter().map(|q| q.id.as_str()).collect();
        let scored: Vec<metrics::Question> = by_question
            .into_iter()
            .filter(|(id, _)| asked.contains(id))
            .map(|(_, q)| q)
            .collect();
        if scored.len() != questions.len()
            || scored
                .iter()
                .any(|q| q.correct.len() != self.params.samples as usize)
        {
            return Err(StageError::Failed(format!(
                "{} of {} questions have all {} samples; `distill resume` finishes the rest",
                scored
                    .iter()
                    .filter(|q| q.correct.len() == self.params.samples as usize)
                    .count(),
                questions.len(),
                self.params.samples
            )));
        }
        let protocol = self.protocol()?;
        let protocol_text = protocol.to_string();
        let protocol_hash = crate::hash::hex128(protocol_text.as_bytes());
        let scores = metrics::score(&scored);
        let (truncated, mean_tokens) = metrics::lengths(
            outcomes
                .iter()
                .filter(|o| asked.contains(o.item_id.as_str()))
                .map(|o| (o.finish_reason.as_deref(), o.tokens)),
        );
        let mut tx = ctx.db.write().await?;
        for s in &scores {
            evals::upsert_score(
                &mut tx,
                ctx.stage_id,
                &NewScore {
                    target: target.to_string(),
                    label: label.to_string(),
                    step,
                    benchmark: self.name.clone(),
                    metric: s.metric.clone(),
                    value: s.value,
                    stderr: s.stderr,
                    questions: s.questions as i64,
                    protocol: protocol_text.clone(),
                    protocol_hash: protocol_hash.clone(),
                    truncated,
                    mean_tokens,
                },
            )
            .await?;
        }
        tx.commit().await?;
        let summary: serde_json::Map<String, Value> = scores
            .iter()
            .map(|s| (s.metric.clone(), json!((s.value * 1000.0).round() / 10.0)))
            .collect();
        Ok(json!({ "target": label, "benchmark": self.name, "scores_percent": summary }))
    }
}

/// Records one question's samples in a transaction.
pub(crate) async fn write_samples(
    ctx: &StageContext,
    target: &str,
    rows: &[NewEvalSample],
) -> Result<(), StageError> {
    let mut tx = ctx.db.write().await?;
    for r in rows {
        evals::insert_sample(&mut tx, ctx.stage_id, target, r).await?;
    }
    tx.commit().await?;
    ctx.progress.inc(rows.len() as u64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiple_choice_shuffles_by_seed_and_tracks_the_letter() {
        let choices = || {
            vec![
                "red".to_string(),
                "green".into(),
                "blue".into(),
                "black".into(),
            ]
        };
        let (text, gold) = multiple_choice("q1", "Which colour?", "blue", choices(), 7).unwrap();
        let line = text.lines().find(|l| l.ends_with(") blue")).unwrap();
        assert_eq!(&line[..1], gold);
        let again = multiple_choice("q1", "Which colour?", "blue", choices(), 7).unwrap();
        assert_eq!((text.clone(), gold.clone()), again);
        assert!(multiple_choice("q1", "?", "pink", choices(), 7).is_err());
    }

    #[test]
    fn samples_are_scored_on_the_answer_after_the_reasoning() {
        let q = Question {
            id: "1".into(),
            message: "m".into(),
            gold: "4".into(),
        };
        let s = |out: &str| Sampled {
            sample_index: 0,
            output: out.into(),
            tokens: None,
            finish_reason: None,
            think_open: true,
        };
        // A boxed 3 in the reasoning does not count; the answer's 4 does.
        let r = score_sample(&q, s("maybe \\boxed{3}?</think>\n\nSo \\boxed{4}."));
        assert_eq!(r.verdict, "correct");
        assert_eq!(r.vote_key.as_deref(), Some("4"));
        let r = score_sample(&q, s("\\boxed{5}"));
        assert_eq!(r.verdict, "incorrect");
        assert_ne!(sample_seed(0, "1", 0), sample_seed(0, "1", 1));
    }

    #[test]
    fn a_sample_cut_inside_its_reasoning_is_graded_as_no_answer() {
        let q = Question {
            id: "1".into(),
            message: "m".into(),
            gold: "4".into(),
        };
        // A local student whose template opened <think>: the budget ran out mid-thought,
        // after a draft that happens to box the right number.
        let local = |finish: &str| Sampled {
            sample_index: 0,
            output: "2 + 2 = \\boxed{4}, or is it".into(),
            tokens: Some(12),
            finish_reason: Some(finish.into()),
            think_open: true,
        };
        let r = score_sample(&q, local("length"));
        assert_eq!(
            (r.verdict.as_str(), r.extracted, r.vote_key),
            ("incorrect", None, None)
        );
        assert_eq!(r.finish_reason.as_deref(), Some("length"));
        assert_eq!(score_sample(&q, local("stop")).verdict, "correct");

        // An endpoint cut in its reasoning: the client split the reasoning out and
        // there is no answer; the stored output invents no `</think>`.
        let completion =
            |reasoning: &str, answer: &str, finish: &str| distill_teacher::Completion {
                index: 0,
                reasoning: reasoning.into(),
                answer: answer.into(),
                finish_reason: Some(finish.into()),
                prompt_tokens: None,
                completion_tokens: Some(40),
                reasoning_tokens: None,
                latency_ms: 0,
                first_token_ms: None,
                attempts: 1,
                endpoint: String::new(),
                model: None,
                system_fingerprint: None,
            };
        let cut = endpoint_sample(0, completion("so \\boxed{4} maybe", "", "length"));
        assert_eq!(cut.output, "so \\boxed{4} maybe");
        let r = score_sample(&q, cut);
        assert_eq!((r.verdict.as_str(), r.tokens), ("incorrect", Some(40)));
        let done = endpoint_sample(0, completion("so \\boxed{3}", "\\boxed{4}", "stop"));
        assert_eq!(done.output, "so \\boxed{3}\n</think>\n\n\\boxed{4}");
        assert_eq!(score_sample(&q, done).verdict, "correct");
        // A model that does not think and ran out mid-answer keeps its complete box.
        let plain = endpoint_sample(0, completion("", "\\boxed{4} because", "length"));
        assert_eq!(score_sample(&q, plain).verdict, "correct");
    }
}
