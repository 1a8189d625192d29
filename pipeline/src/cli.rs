//! The `distill` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use distill_db::stages::{self, StageRow};
use distill_db::{Db, generations, grpo, runs, verdicts};
use distill_stages::Registry;
use indicatif::{MultiProgress, ProgressDrawTarget};
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigError, Pipeline};
use crate::executor::{self, Outcome};
use crate::fingerprint::fingerprints;
use crate::{dataset, logging, model_cmd, plot, report};

/// Exit status of a config that does not validate (also clap's for bad usage).
pub const EXIT_INVALID: u8 = 2;
/// Exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

#[derive(Debug, Parser)]
#[command(
    name = "distill",
    version,
    about = "Distil a reasoning teacher into small students: generate, curate, train, evaluate, export.",
    long_about = "Distil a reasoning teacher into small students: generate, curate, train, evaluate, export.\n\n\
        A pipeline is a TOML config describing a DAG of stages. Every stage and every item of \
        work is recorded in a SQLite job database, so a run can be stopped at any moment \
        (Ctrl-C, a crash, a reboot) and continued with `distill resume` without losing or \
        redoing anything.\n\n\
        Start with:  distill run examples/quickstart.toml\n\
        Then look:   distill status     (the DAG and its progress)\n\
        \x20            distill runs       (every run in the database)",
    after_help = "Logs go to stderr; set RUST_LOG=debug for more. Inspection commands take --json."
)]
struct Cli {
    /// Job database [default: the config's [run].db, else ./distill.db]
    #[arg(long, global = true, env = "DISTILL_DB", value_name = "PATH")]
    db: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum SynthTask {
    /// Multi-step integer word problems ("Mia has 12 pencils. She buys 5 more. ...").
    ///
    /// Writes N training problems (JSONL: id, problem, answer) and, with --test-out, a
    /// disjoint held-out set, some of whose problems are planted in the training set
    /// so that decontamination has something to find.
    Arithmetic {
        /// Training problems.
        #[arg(long)]
        n: usize,
        /// Seed: the same seed writes the same files.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The training file.
        #[arg(long)]
        out: PathBuf,
        /// Held-out test problems.
        #[arg(long, default_value_t = 0, requires = "test_out")]
        test_n: usize,
        /// The test file.
        #[arg(long)]
        test_out: Option<PathBuf>,
        /// Test problems to plant in the training set.
        #[arg(long, default_value_t = 0)]
        plant: usize,
    },
}

#[derive(Debug, Subcommand)]
enum DatasetCommand {
    /// Write the traces a stage kept (after it and every stage before it) as JSONL, or
    /// as a Hugging Face dataset folder of Parquet shards with a dataset card.
    Export {
        /// The run's name or id.
        run: String,
        /// A generate, import or curation stage of the run.
        stage: String,
        /// The output file (a folder for `parquet`).
        #[arg(long)]
        out: PathBuf,
        /// `messages` (chat SFT format, JSONL), `sft` (the trainer's input form, JSONL)
        /// or `parquet` (`data/train-*.parquet` and `README.md`).
        #[arg(long, value_enum, default_value = "messages")]
        format: dataset::Format,
        /// Columns of a Parquet export: `messages`, or `sft` for TRL's `prompt` and
        /// `completion`.
        #[arg(long, value_enum)]
        form: Option<dataset::Form>,
        /// Start a new Parquet shard above this many MB of text.
        #[arg(long, default_value_t = 500.0)]
        max_shard_mb: f64,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline config; a run of the same name continues where it stopped.
    ///
    /// Stages whose parameters, inputs and upstream are unchanged since they finished
    /// are skipped; a changed stage runs again together with everything downstream.
    Run {
        /// The pipeline config (TOML).
        config: PathBuf,
    },
    /// Continue an interrupted or failed run with the config it was started with.
    Resume {
        /// The run's name or numeric id (see `distill runs`).
        run: String,
    },
    /// Show a run's stages: state, item counts, attempts, durations.
    Status {
        /// The run's name or id [default: the most recent run].
        run: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show generated or imported traces: prompt, reasoning, answer, finish reason, tokens;
    /// or, for a grpo stage, the rollouts it kept: prompt, completion, reward, verdict.
    Traces {
        /// The run's name or id.
        run: String,
        /// Only this generate or import stage, or the kept rollouts of this grpo stage.
        #[arg(long)]
        stage: Option<String>,
        /// At most this many traces.
        #[arg(long, default_value_t = 10)]
        limit: i64,
        /// Only samples that failed (with their error).
        #[arg(long, conflicts_with = "rejected")]
        failed: bool,
        /// Only traces a curation stage dropped, with the reason.
        #[arg(long)]
        rejected: bool,
        /// With --rejected: only this reason (see `distill funnel`).
        #[arg(long, requires = "rejected")]
        reason: Option<String>,
        /// Print whole texts instead of their beginnings.
        #[arg(long)]
        full: bool,
        /// Print JSON (whole texts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show how many traces each curation stage kept, and why it dropped the rest.
    Funnel {
        /// The run's name or id [default: the most recent run].
        run: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Benchmark scores of a run: models × benchmarks, each with its protocol.
    Scores {
        /// The run's name or id [default: the most recent run].
        run: Option<String>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Draw a run's training curves (loss, learning rate; for grpo stages also reward, pass
    /// rate and completion length) or its scores by step, as SVG.
    Plot {
        /// The run's name or id.
        run: String,
        /// The SVG file to write.
        #[arg(long)]
        out: PathBuf,
        /// Draw benchmark scores against training step instead of training curves.
        #[arg(long)]
        scores: bool,
        /// Only this train or grpo stage.
        #[arg(long, conflicts_with = "scores")]
        stage: Option<String>,
    },
    /// Write a trained student as a Hugging Face folder (with a model card).
    Export {
        /// The run's name or id.
        run: String,
        /// The train or grpo stage.
        #[arg(long)]
        student: String,
        /// A checkpoint's step instead of the final model.
        #[arg(long)]
        step: Option<i64>,
        /// The output folder.
        #[arg(long)]
        out: PathBuf,
        /// Dtype of the weights on disk.
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: model_cmd::Precision,
        /// Shard weight files above this many GB.
        #[arg(long, default_value_t = 5.0)]
        max_shard_gb: f64,
        /// Write only a (Q)LoRA run's adapter in PEFT's layout (for `PeftModel` on the base)
        /// instead of the merged model.
        #[arg(long)]
        adapter: bool,
    },
    /// Generate synthetic problems with reference answers (for demos and tests).
    Synth {
        #[command(subcommand)]
        task: SynthTask,
    },
    /// Curated datasets.
    Dataset {
        #[command(subcommand)]
        command: DatasetCommand,
    },
    /// Inspect, score and sample model folders (Hugging Face layout).
    Model {
        #[command(subcommand)]
        command: model_cmd::ModelCommand,
    },
    /// List the runs in the job database.
    Runs {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Benchmark a model folder outside any pipeline (recorded as a run of its own).
    ///
    /// Builds a one-stage pipeline with an `evaluate` stage, so everything `evaluate`
    /// does holds here too: samples are recorded one by one, Ctrl-C or a crash is
    /// continued by `distill resume RUN`, and `distill scores RUN` shows the result.
    Eval {
        /// A model folder in Hugging Face layout.
        model: PathBuf,
        /// The benchmark (JSONL or a JSON array of questions with answers).
        #[arg(long)]
        benchmark: PathBuf,
        /// Run name [default: eval-<model folder>-<benchmark>].
        #[arg(long)]
        run: Option<String>,
        /// Samples per question (k) [default: 1].
        #[arg(long)]
        samples: Option<u32>,
        /// Sampling temperature [default: 0.6].
        #[arg(long)]
        temperature: Option<f64>,
        /// Nucleus mass [default: 0.95].
        #[arg(long)]
        top_p: Option<f64>,
        /// Token budget per sample [default: 32768].
        #[arg(long)]
        max_tokens: Option<u32>,
        /// Only the first N questions.
        #[arg(long)]
        limit: Option<usize>,
        /// Seed of the samples [default: 0].
        #[arg(long)]
        seed: Option<u64>,
        /// Field holding the question [default: problem].
        #[arg(long)]
        prompt_field: Option<String>,
        /// Field holding the reference answer [default: answer].
        #[arg(long)]
        answer_field: Option<String>,
        /// Field holding the question id [default: the record number].
        #[arg(long)]
        id_field: Option<String>,
        /// The user message, `{prompt}` standing for the question [default: the question, then
        /// R1's "Please reason step by step, and put your final answer within \boxed{}."].
        /// A student distilled from bare prompts, like the quickstart's, wants `'{prompt}'`.
        #[arg(long)]
        prompt_template: Option<String>,
        /// Run on the CPU or the first CUDA GPU.
        #[arg(long, value_enum, default_value = "cpu")]
        device: model_cmd::Device,
        /// Sequences decoded at once [default: what a quarter of free memory holds, at most 32 on a CPU, 64 on a GPU].
        #[arg(long)]
        max_batch: Option<usize>,
    },
    /// Check a config without running it: keys, types, stage kinds, needs, cycles.
    Validate {
        /// The pipeline config (TOML).
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let bars = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    logging::init(bars.clone());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli, bars)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(EXIT_INVALID)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes, joined by `: `, skipping a cause whose text the message
/// already holds (library errors often print their source themselves).
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg
}

async fn dispatch(cli: Cli, bars: MultiProgress) -> Result<ExitCode> {
    let registry = Registry::builtin();
    match cli.command {
        Command::Run { config } => {
            as_rank(async {
                let workdir =
                    std::env::current_dir().context("cannot read the working directory")?;
                let pipeline = config::load(&config, &workdir, &registry)?;
                let fps = fingerprints(&pipeline)?;
                let db_path = cli
                    .db
                    .or_else(|| pipeline.run.db.as_ref().map(|p| workdir.join(p)))
                    .unwrap_or_else(default_db);
                let db = open_for_run(&db_path).await?;
                execute(&db, &pipeline, &fps, bars).await
            })
            .await
        }
        Command::Resume { run } => {
            as_rank(async {
                let db = open_existing(cli.db).await?;
                let run = runs::find(&db, &run).await?;
                let pipeline = config::parse(
                    &run.config,
                    Path::new(&run.config_path),
                    Path::new(&run.workdir),
                    &registry,
                )
                .with_context(|| {
                    format!(
                        "the config recorded for run `{}` no longer validates",
                        run.name
                    )
                })?;
                let fps = fingerprints(&pipeline)?;
                execute(&db, &pipeline, &fps, bars).await
            })
            .await
        }
        Command::Status { run, json } => {
            let db = open_existing(cli.db).await?;
            let run = find_or_latest(&db, run).await?;
            let status = report::RunStatusReport::load(&db, run).await?;
            if json {
                out(&format!("{}\n", serde_json::to_string_pretty(&status)?));
            } else {
                out(&status.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Traces {
            run,
            stage,
            limit,
            failed,
            rejected,
            reason,
            full,
            json,
        } => {
            let db = open_existing(cli.db).await?;
            let run = runs::find(&db, &run).await?;
            if let Some(s) = grpo_stage(&db, run.id, stage.as_deref()).await? {
                if failed || rejected {
                    bail!(
                        "stage `{}` is a grpo stage: --failed and --rejected apply to generate, \
                         import and curation stages",
                        s.name
                    );
                }
                let rollouts = grpo::rollouts(db.pool(), s.id, limit).await?;
                if json {
                    out(&format!("{}\n", serde_json::to_string_pretty(&rollouts)?));
                } else {
                    out(&report::render_rollouts(&s.name, &rollouts, full));
                }
                return Ok(ExitCode::SUCCESS);
            }
            if rejected {
                let items = verdicts::rejected(
                    db.pool(),
                    run.id,
                    stage.as_deref(),
                    reason.as_deref(),
                    limit,
                )
                .await?;
                if json {
                    out(&format!("{}\n", serde_json::to_string_pretty(&items)?));
                } else {
                    out(&report::render_rejected(&items, full));
                }
                return Ok(ExitCode::SUCCESS);
            }
            let traces =
                generations::traces(db.pool(), run.id, stage.as_deref(), failed, limit).await?;
            if json {
                out(&format!("{}\n", serde_json::to_string_pretty(&traces)?));
            } else {
                out(&report::render_traces(&traces, full));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Funnel { run, json } => {
            let db = open_existing(cli.db).await?;
            let run = find_or_latest(&db, run).await?;
            let funnel = report::Funnel::load(&db, &run).await?;
            if json {
                out(&format!("{}\n", serde_json::to_string_pretty(&funnel)?));
            } else {
                out(&funnel.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Scores { run, json } => {
            let db = open_existing(cli.db).await?;
            let run = find_or_latest(&db, run).await?;
            let scores = report::Scores::load(&db, &run).await?;
            if json {
                out(&format!("{}\n", serde_json::to_string_pretty(&scores)?));
            } else {
                out(&scores.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plot {
            run,
            out: path,
            scores,
            stage,
        } => {
            let db = open_existing(cli.db).await?;
            let n = if scores {
                plot::scores(&db, &run, &path).await?
            } else {
                plot::training_curves(&db, &run, stage.as_deref(), &path).await?
            };
            eprintln!("drew {n} points into {}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Export {
            run,
            student,
            step,
            out: path,
            dtype,
            max_shard_gb,
            adapter,
        } => {
            let db = open_existing(cli.db).await?;
            let run = runs::find(&db, &run).await?;
            let params = distill_stages::export::ExportParams {
                student,
                step,
                out: Some(path.clone()),
                dtype: match dtype {
                    model_cmd::Precision::F32 => distill_stages::export::ExportDtype::F32,
                    model_cmd::Precision::Bf16 => distill_stages::export::ExportDtype::Bf16,
                },
                max_shard_gb,
                adapter,
            };
            let summary = distill_stages::export::export(&db, run.id, &params, &path).await?;
            eprintln!("exported step {} to {}", summary["step"], path.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Synth {
            task:
                SynthTask::Arithmetic {
                    n,
                    seed,
                    out: path,
                    test_n,
                    test_out,
                    plant,
                },
        } => {
            anyhow::ensure!(plant <= test_n, "--plant {plant} exceeds --test-n {test_n}");
            let (train, test) = distill_teacher::sim::arithmetic::split(seed, n, test_n, plant);
            write_jsonl(&path, &train)?;
            if let Some(t) = &test_out {
                write_jsonl(t, &test)?;
            }
            eprintln!(
                "wrote {} training problems ({plant} planted from the test set) to {}{}",
                train.len(),
                path.display(),
                test_out
                    .map(|t| format!(" and {} test problems to {}", test.len(), t.display()))
                    .unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Dataset {
            command:
                DatasetCommand::Export {
                    run,
                    stage,
                    out: path,
                    format,
                    form,
                    max_shard_mb,
                },
        } => {
            if form.is_some() && format != dataset::Format::Parquet {
                bail!("--form applies to --format parquet only");
            }
            if !(max_shard_mb.is_finite() && max_shard_mb > 0.0) {
                bail!("--max-shard-mb must be a positive number");
            }
            let db = open_existing(cli.db).await?;
            let n = dataset::export(
                &db,
                &run,
                &stage,
                &path,
                format,
                form.unwrap_or_default(),
                (max_shard_mb * 1e6) as u64,
            )
            .await?;
            eprintln!("wrote {n} examples to {}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Model { command } => {
            tokio::task::spawn_blocking(move || model_cmd::run(command))
                .await
                .context("the model command panicked")??;
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs { json } => {
            let db = open_existing(cli.db).await?;
            let list = report::RunList::load(&db).await?;
            if json {
                out(&format!("{}\n", serde_json::to_string_pretty(&list)?));
            } else {
                out(&list.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval {
            model,
            benchmark,
            run,
            samples,
            temperature,
            top_p,
            max_tokens,
            limit,
            seed,
            prompt_field,
            answer_field,
            id_field,
            prompt_template,
            device,
            max_batch,
        } => {
            let workdir = std::env::current_dir().context("cannot read the working directory")?;
            let stem = |p: &Path| {
                p.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            };
            let name = run.unwrap_or_else(|| format!("eval-{}-{}", stem(&model), stem(&benchmark)));
            let mut stage = toml::Table::new();
            stage.insert("name".into(), "evaluate".into());
            stage.insert("kind".into(), "evaluate".into());
            let abs = |p: &Path| workdir.join(p).display().to_string();
            stage.insert("model".into(), abs(&model).into());
            stage.insert("benchmark".into(), abs(&benchmark).into());
            stage.insert(
                "device".into(),
                match device {
                    model_cmd::Device::Cpu => "cpu",
                    model_cmd::Device::Cuda => "cuda",
                }
                .into(),
            );
            let mut set = |k: &str, v: Option<toml::Value>| {
                if let Some(v) = v {
                    stage.insert(k.into(), v);
                }
            };
            set("samples", samples.map(|v| i64::from(v).into()));
            set("temperature", temperature.map(Into::into));
            set("top_p", top_p.map(Into::into));
            set("max_tokens", max_tokens.map(|v| i64::from(v).into()));
            set("limit", limit.map(|v| (v as i64).into()));
            set("seed", seed.map(|v| (v as i64).into()));
            set("prompt_field", prompt_field.map(Into::into));
            set("answer_field", answer_field.map(Into::into));
            set("id_field", id_field.map(Into::into));
            set("prompt_template", prompt_template.map(Into::into));
            set("max_batch", max_batch.map(|v| (v as i64).into()));
            let mut run_table = toml::Table::new();
            run_table.insert("name".into(), name.clone().into());
            let mut doc = toml::Table::new();
            doc.insert("run".into(), run_table.into());
            doc.insert("stage".into(), toml::Value::Array(vec![stage.into()]));
            let text = format!(
                "# written by `distill eval`\n{}",
                toml::to_string(&doc).context("cannot write the evaluation config")?
            );
            let pipeline = config::parse(&text, Path::new("(distill eval)"), &workdir, &registry)?;
            let fps = fingerprints(&pipeline)?;
            let db = open_for_run(&cli.db.unwrap_or_else(default_db)).await?;
            let code = execute(&db, &pipeline, &fps, bars).await?;
            if code == ExitCode::SUCCESS {
                let run = runs::find(&db, &name).await?;
                out(&report::Scores::load(&db, &run).await?.render());
            }
            Ok(code)
        }
        Command::Validate { config, json } => {
            let workdir = std::env::current_dir().context("cannot read the working directory")?;
            let pipeline = config::load(&config, &workdir, &registry)?;
            let plan = report::Plan::new(&pipeline);
            // What this machine lacks (models not downloaded yet, a CPU-only build) does
            // not make the config wrong; `run` refuses it before touching the database.
            for s in &pipeline.stages {
                if let Err(e) = s.stage.preflight() {
                    eprintln!(
                        "warning: stage `{}` ({}): {e} (needed when the run starts)",
                        s.name, s.kind
                    );
                }
            }
            if json {
                out(&format!("{}\n", serde_json::to_string_pretty(&plan)?));
            } else {
                out(&plan.render());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn write_jsonl<T: serde::Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    for r in rows {
        serde_json::to_writer(&mut w, r)?;
        w.write_all(b"\n")?;
    }
    w.flush()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The stage of a run named `name`, when there is one and it is a grpo stage.
async fn grpo_stage(db: &Db, run_id: i64, name: Option<&str>) -> Result<Option<StageRow>> {
    let Some(name) = name else {
        return Ok(None);
    };
    Ok(stages::list(db.pool(), run_id)
        .await?
        .into_iter()
        .find(|s| s.name == name && s.kind == "grpo"))
}

async fn find_or_latest(db: &Db, run: Option<String>) -> Result<runs::Run> {
    Ok(match run {
        Some(key) => runs::find(db, &key).await?,
        None => runs::latest(db)
            .await?
            .context("the job database has no runs yet")?,
    })
}

fn default_db() -> PathBuf {
    PathBuf::from("distill.db")
}

/// Under torchrun or `srun` with several processes (their variables set), ranks other than 0
/// serve rank 0's training jobs and never open the job database; rank 0 waits for them to
/// connect, runs `body`, then lets them exit. A single process just runs `body`.
async fn as_rank(body: impl std::future::Future<Output = Result<ExitCode>>) -> Result<ExitCode> {
    use distill_stages::cluster;
    use distill_student::train::{SharedGroup, World, join_world};
    let Some(world) = World::from_env()? else {
        return body.await;
    };
    let (rank, size) = (world.rank, world.size);
    tracing::info!(rank, size, master = %world.master, "joining the training processes");
    let group = tokio::task::spawn_blocking({
        let world = world.clone();
        move || join_world(&world)
    })
    .await
    .context("joining the training processes")??;
    let group: SharedGroup = std::sync::Arc::new(std::sync::Mutex::new(group));
    if rank > 0 {
        // torchrun and a terminal send Ctrl-C to every process; rank 0 decides what stops
        // (it saves a checkpoint and ends the job), so the others only keep serving it.
        tokio::spawn(async {
            while tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("interrupt: rank 0 decides when training stops");
            }
        });
        tracing::info!(rank, size, "serving rank 0's training jobs");
        tokio::task::spawn_blocking(move || cluster::serve(world, group))
            .await
            .context("serving rank 0")?
            .with_context(|| format!("training process {rank} of {size}"))?;
        return Ok(ExitCode::SUCCESS);
    }
    cluster::install(world, group);
    let result = body.await;
    let error = result.as_ref().err().map(error_chain);
    tokio::task::spawn_blocking(move || cluster::finish(error.as_deref()))
        .await
        .ok();
    result
}

async fn open_for_run(path: &Path) -> Result<Db> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the folder of {}", path.display()))?;
    }
    Ok(Db::open(path).await?)
}

async fn open_existing(db: Option<PathBuf>) -> Result<Db> {
    Ok(Db::open_existing(&db.unwrap_or_else(default_db)).await?)
}

/// Executes a pipeline with Ctrl-C handling and prints where it ended.
async fn execute(
    db: &Db,
    pipeline: &Pipeline,
    fps: &[(String, serde_json::Value)],
    bars: MultiProgress,
) -> Result<ExitCode> {
    let cancel = CancellationToken::new();
    let on_ctrl_c = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!(
                    "\nstopping: in-flight items finish and are recorded (Ctrl-C again to stop at once)"
                );
                cancel.cancel();
                // Transactions keep the database consistent even if we exit mid-item.
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(EXIT_INTERRUPTED as i32);
                }
            }
        })
    };
    let result = executor::execute(db, pipeline, fps, cancel, bars.clone()).await;
    on_ctrl_c.abort();
    let (run, outcome) = result?;
    bars.clear().ok();
    let status = report::RunStatusReport::load(db, run).await?;
    out(&status.render());
    Ok(match outcome {
        Outcome::Done => ExitCode::SUCCESS,
        Outcome::Failed(failures) => {
            for (stage, err) in failures {
                eprintln!("error: stage `{stage}` failed: {err}");
            }
            eprintln!(
                "fix the cause, then `distill resume {}` retries the failed stages",
                status.run.name
            );
            ExitCode::FAILURE
        }
        Outcome::Interrupted => {
            eprintln!(
                "interrupted: `distill resume {}` continues where it stopped",
                status.run.name
            );
            ExitCode::from(EXIT_INTERRUPTED)
        }
    })
}

/// Writes command output to stdout; a closed pipe (`distill runs | head`) ends the
/// process quietly instead of panicking.
pub(crate) fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `distill traces --stage` on a grpo stage reads its kept rollouts with their prompts.
    #[tokio::test]
    async fn traces_of_a_grpo_stage_are_its_rollouts() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        let pool = db.pool();
        sqlx::query(
            "INSERT INTO runs (id, name, config_path, config, workdir, status, created_at, updated_at)
             VALUES (1, 'q', 'q.toml', '', '.', 'done', 0, 0)",
        )
        .execute(pool)
        .await
        .unwrap();
        for (id, name, kind) in [(1, "load", "load"), (2, "rl", "grpo")] {
            sqlx::query(
                "INSERT INTO stages (id, run_id, name, kind, position, needs, params, fingerprint, status)
                 VALUES (?, 1, ?, ?, ?, '[]', '{}', 'f', 'done')",
            )
            .bind(id)
            .bind(name)
            .bind(kind)
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
        }
        sqlx::query(
            "INSERT INTO prompts (id, stage_id, idx, source_id, prompt, answer, content_hash)
             VALUES (7, 1, 0, 'p7', 'What is 2 + 3?', '5', 'h')",
        )
        .execute(pool)
        .await
        .unwrap();
        let mut tx = db.write().await.unwrap();
        let rows: Vec<grpo::Rollout> = [(0, 0, 1.0, "correct"), (1, 1, 0.0, "incorrect")]
            .into_iter()
            .map(|(batch, sample, reward, verdict)| grpo::Rollout {
                batch,
                prompt_id: 7,
                sample,
                completion: format!("2 + 3 = {}", if reward > 0.0 { 5 } else { 6 }),
                reward,
                verdict: verdict.into(),
                tokens: 9,
            })
            .collect();
        grpo::record_rollouts(&mut tx, 2, &rows).await.unwrap();
        tx.commit().await.unwrap();

        assert!(grpo_stage(&db, 1, None).await.unwrap().is_none());
        assert!(grpo_stage(&db, 1, Some("load")).await.unwrap().is_none());
        assert!(grpo_stage(&db, 1, Some("nope")).await.unwrap().is_none());
        let stage = grpo_stage(&db, 1, Some("rl")).await.unwrap().unwrap();
        assert_eq!(stage.id, 2);
        let rollouts = grpo::rollouts(db.pool(), stage.id, 10).await.unwrap();
        let text = report::render_rollouts(&stage.name, &rollouts, false);
        assert_eq!(
            text,
            "── rl · batch 1 · prompt p7 · sample 1 · reward 0 · incorrect · 9 tokens\n\
             PROMPT     What is 2 + 3?\n\
             COMPLETION 2 + 3 = 6\n\
             REFERENCE  5\n\
             \n\
             ── rl · batch 0 · prompt p7 · sample 0 · reward 1 · correct · 9 tokens\n\
             PROMPT     What is 2 + 3?\n\
             COMPLETION 2 + 3 = 5\n\
             REFERENCE  5\n\
             \n"
        );
    }

    #[test]
    fn error_chains_skip_causes_already_in_the_message() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(io).context("config.json: no such file");
        assert_eq!(error_chain(&e), "config.json: no such file");
        let e = anyhow::anyhow!("disk full").context("cannot write x");
        assert_eq!(error_chain(&e), "cannot write x: disk full");
    }
}
