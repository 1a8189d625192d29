//! `distill model ...`: inspect, score and sample a model folder in Hugging Face layout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use distill_student::{DType, GenerateRequest, Student, model_info, model_nll};

/// Where model code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// The CPU (Burn's flex backend).
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
}

/// Parameter precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    /// 32-bit floats.
    F32,
    /// bfloat16 (slower than f32 on the CPU backend; meant for GPUs).
    Bf16,
}

impl From<Precision> for DType {
    fn from(p: Precision) -> Self {
        match p {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// Options shared by the commands that load weights.
#[derive(Debug, Clone, Args)]
pub struct Runtime {
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    /// Parameter precision (the checkpoint's dtype is converted on load).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Precision,
}

/// What `distill model plan` trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlanMethod {
    /// Every weight.
    Full,
    /// Low-rank adapters on a frozen base.
    Lora,
    /// Low-rank adapters on a frozen 4-bit (NF4) base: QLoRA, `lora.base_bits = 4`.
    Qlora,
}

/// How `distill model plan`'s GPUs divide the training state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlanShardingArg {
    /// Every GPU a whole replica (the train stage's `sharding = "none"`).
    None,
    /// The AdamW state divided (the train stage's `sharding = "optimizer"`).
    Optimizer,
    /// Weights, gradients and AdamW state divided (ZeRO-3/FSDP; not in distill's trainer yet).
    Full,
}

/// `distill model` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Create a randomly initialised model of any supported architecture and size.
    ///
    /// Writes a Hugging Face folder (weights, config, generation config, tokenizer files)
    /// from a `config.json` (Qwen2ForCausalLM or LlamaForCausalLM) and a tokenizer folder:
    /// small students trained from scratch, or test models.
    Init {
        /// The model's config.json.
        #[arg(long)]
        config: PathBuf,
        /// A folder with tokenizer.json and tokenizer_config.json (its chat template).
        #[arg(long)]
        tokenizer: PathBuf,
        /// The folder to write.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the random initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Dtype on disk.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Precision,
    },
    /// Estimate per-GPU memory of fine-tuning a model and say whether it fits.
    ///
    /// Counts weights (a QLoRA base's linear weights in 4 bits), bf16 compute copies,
    /// gradients, AdamW state and activations (Burn 0.21 keeps attention scores for
    /// backward: they are counted) and, when the run does not fit, which single change
    /// would make it fit.
    Plan {
        /// A model folder or its config.json (or use --published).
        #[arg(required_unless_present = "published")]
        model: Option<PathBuf>,
        /// Full fine-tuning, LoRA or QLoRA.
        #[arg(long, value_enum, default_value = "full")]
        method: PlanMethod,
        /// Adapter rank of LoRA and QLoRA.
        #[arg(long, default_value_t = 16)]
        lora_rank: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 32768)]
        seq_len: usize,
        /// Sequences per micro-batch per GPU.
        #[arg(long, default_value_t = 1)]
        micro_batch: usize,
        /// GPUs of the run.
        #[arg(long, default_value_t = 1)]
        gpus: usize,
        /// How the GPUs divide the state.
        #[arg(long, value_enum, default_value = "full")]
        sharding: PlanShardingArg,
        /// Memory of one GPU, GiB [default: an H200's 141 GB].
        #[arg(long)]
        gpu_mem_gib: Option<f64>,
        /// Without per-layer activation recomputation.
        #[arg(long)]
        no_recompute: bool,
        /// f32 compute instead of bf16.
        #[arg(long)]
        f32: bool,
        /// Query rows per attention chunk under recomputation (the train stage's
        /// `attention_chunk_tokens`).
        #[arg(long, default_value_t = 2048)]
        attention_chunk_tokens: usize,
        /// Print the table for DeepSeek's published R1-Distill students instead.
        #[arg(long)]
        published: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Architecture, parameter count, dtype, context length and memory of a model folder.
    ///
    /// A folder without weights yet, or a config.json alone, is described from the config:
    /// check a plan before downloading the weights.
    Info {
        /// A model folder, or its config.json.
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Mean per-token negative log-likelihood of each line of a JSONL file.
    ///
    /// Lines hold a `text` field, or `messages` rendered with the model's chat template.
    Nll {
        /// A model folder.
        dir: PathBuf,
        /// The JSONL file.
        #[arg(long)]
        data: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        runtime: Runtime,
    },
    /// Sample a continuation of a prompt, streaming it to stdout.
    Generate {
        /// A model folder (with tokenizer.json).
        dir: PathBuf,
        /// The prompt.
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt in the model's chat template as a user turn.
        #[arg(long)]
        chat: bool,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// Sampling temperature; 0 is greedy [default: generation_config.json's, else greedy].
        #[arg(long)]
        temperature: Option<f32>,
        /// Nucleus mass [default: generation_config.json's, else 1].
        #[arg(long)]
        top_p: Option<f32>,
        /// Sample among the k most likely tokens.
        #[arg(long)]
        top_k: Option<usize>,
        /// Seed of the sampler.
        #[arg(long)]
        seed: Option<u64>,
        /// Print a JSON result at the end instead of streaming text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        runtime: Runtime,
    },
}

/// Runs a `distill model` command.
pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Init {
            config,
            tokenizer,
            out,
            seed,
            dtype,
        } => {
            let model_config = distill_student::ModelConfig::from_file(&config)
                .with_context(|| format!("cannot read {}", config.display()))?;
            if out.join("config.json").exists() {
                anyhow::bail!(
                    "{} already holds a model; choose another --out",
                    out.display()
                );
            }
            let saved =
                distill_student::api::init_model(&config, &tokenizer, seed, dtype.into(), &out)
                    .with_context(|| format!("cannot write a random model to {}", out.display()))?;
            eprintln!(
                "wrote a random {} with {} parameters to {} ({} files)",
                model_config.architecture.hf_class(),
                count(model_config.num_parameters()),
                out.display(),
                saved.files.len()
            );
            Ok(())
        }
        ModelCommand::Plan {
            model,
            method,
            lora_rank,
            seq_len,
            micro_batch,
            gpus,
            sharding,
            gpu_mem_gib,
            no_recompute,
            f32,
            attention_chunk_tokens,
            published,
            json,
        } => {
            use distill_student::plan::{
                Method, PlanSettings, PlanSharding, plan_for, r1_distill_table,
            };
            let defaults = PlanSettings::default();
            let gpu_mem_gib = gpu_mem_gib.unwrap_or(defaults.gpu_mem_gib);
            if published {
                crate::cli::out(&r1_distill_table(gpu_mem_gib));
                return Ok(());
            }
            let model = model.expect("clap requires it");
            anyhow::ensure!(
                attention_chunk_tokens > 0,
                "--attention-chunk-tokens must be positive"
            );
            let settings = PlanSettings {
                method: match method {
                    PlanMethod::Full => Method::Full,
                    PlanMethod::Lora => Method::Lora { rank: lora_rank },
                    PlanMethod::Qlora => Method::Qlora { rank: lora_rank },
                },
                seq_len,
                micro_batch,
                gpus,
                sharding: match sharding {
                    PlanShardingArg::None => PlanSharding::None,
                    PlanShardingArg::Optimizer => PlanSharding::Optimizer,
                    PlanShardingArg::Full => PlanSharding::Full,
                },
                gpu_mem_gib,
                recompute: !no_recompute,
                bf16: !f32,
                attention_chunk_tokens,
                ..defaults
            };
            let plan = plan_for(&model, &settings)
                .with_context(|| format!("cannot plan for {}", model.display()))?;
            if json {
                crate::cli::out(&format!("{}\n", serde_json::to_string_pretty(&plan)?));
            } else {
                let mut text = format!(
                    "{} · {} · seq {} · micro-batch {} · {} GPU(s){} of {:.0} GiB · {}{}\n",
                    model.display(),
                    match settings.method {
                        Method::Full => "full fine-tuning".to_string(),
                        Method::Lora { rank } => format!("LoRA rank {rank}"),
                        Method::Qlora { rank } => format!("QLoRA rank {rank} (4-bit NF4 base)"),
                    },
                    seq_len,
                    micro_batch,
                    gpus,
                    match (gpus > 1, sharding) {
                        (false, _) => "",
                        (true, PlanShardingArg::None) => " (replicated)",
                        (true, PlanShardingArg::Optimizer) => " (optimizer state sharded)",
                        (true, PlanShardingArg::Full) => " (ZeRO-3 sharded)",
                    },
                    gpu_mem_gib,
                    if settings.bf16 { "bf16" } else { "f32" },
                    if settings.recompute {
                        format!(" · recompute, attention chunks of {attention_chunk_tokens}")
                    } else {
                        String::new()
                    },
                );
                for (name, b) in [
                    ("weights", plan.weights),
                    ("compute copies", plan.compute_copies),
                    ("dequant scratch", plan.dequant_scratch),
                    ("gradients", plan.gradients),
                    ("optimizer", plan.optimizer),
                    ("activations", plan.activations),
                    ("overhead", plan.overhead),
                    ("total per GPU", plan.total),
                ] {
                    // Only QLoRA dequantizes.
                    if name == "dequant scratch" && b == 0 {
                        continue;
                    }
                    text.push_str(&format!("  {name:<15} {}\n", bytes(b)));
                }
                text.push_str(&format!(
                    "  {}\n",
                    if plan.fits {
                        "fits".to_string()
                    } else {
                        format!("does NOT fit in {}", bytes(plan.gpu_bytes))
                    }
                ));
                for s in &plan.suggestions {
                    text.push_str(&format!("  would fit: {s}\n"));
                }
                crate::cli::out(&text);
            }
            Ok(())
        }
        ModelCommand::Info { dir, json } => {
            let info =
                model_info(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
            if json {
                crate::cli::out(&format!("{}\n", serde_json::to_string_pretty(&info)?));
            } else {
                crate::cli::out(&format!(
                    "{}\n  architecture   {}\n  parameters     {} ({})\n  dtype          {}\n  context        {} tokens\n  layers         {} × hidden {} ({} heads, {} kv heads, head dim {})\n  vocabulary     {}\n  embeddings     {}\n  rope           theta {} ({})\n  memory         {} in f32, {} in bf16, {} in 8-bit, {} in 4-bit (linear weights, a scale per 64; the rest bf16)\n  files          {}; tokenizer {}, chat template {}\n",
                    dir.display(),
                    info.architecture,
                    info.num_parameters,
                    count(info.num_parameters),
                    info.dtype,
                    info.context_length,
                    info.num_layers,
                    info.hidden_size,
                    info.num_heads,
                    info.num_kv_heads,
                    info.head_dim,
                    info.vocab_size,
                    if info.tie_word_embeddings {
                        "tied"
                    } else {
                        "untied"
                    },
                    info.rope_theta,
                    info.rope_scaling,
                    bytes(info.memory_f32_bytes),
                    bytes(info.memory_bf16_bytes),
                    bytes(info.memory_8bit_bytes),
                    bytes(info.memory_4bit_bytes),
                    if info.has_weights {
                        format!(
                            "{} weight file(s), {}",
                            info.weight_files,
                            bytes(info.weights_file_bytes)
                        )
                    } else {
                        "no weights (described from config.json; dtype as it states)".into()
                    },
                    if info.has_tokenizer { "yes" } else { "no" },
                    if info.has_chat_template { "yes" } else { "no" },
                ));
            }
            Ok(())
        }
        ModelCommand::Nll {
            dir,
            data,
            json,
            runtime,
        } => with_backend!(runtime, |B, device| {
            let student = Student::<B>::load(&dir, &device, runtime.dtype.into())
                .with_context(|| format!("cannot load {}", dir.display()))?;
            let report = model_nll(&student, &data)?;
            if json {
                crate::cli::out(&format!("{}\n", serde_json::to_string_pretty(&report)?));
            } else {
                let mut text = String::from("LINE  TOKENS  MEAN NLL\n");
                for r in &report.records {
                    text.push_str(&format!(
                        "{:<4}  {:<6}  {:.4}\n",
                        r.line, r.tokens, r.mean_nll
                    ));
                }
                text.push_str(&format!(
                    "all   {:<6}  {:.4}  (perplexity {:.2})\n",
                    report.total_tokens, report.mean_nll, report.perplexity
                ));
                crate::cli::out(&text);
            }
            Ok(())
        }),
        ModelCommand::Generate {
            dir,
            prompt,
            chat,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            json,
            runtime,
        } => with_backend!(runtime, |B, device| {
            let student = Student::<B>::load(&dir, &device, runtime.dtype.into())
                .with_context(|| format!("cannot load {}", dir.display()))?;
            let req = GenerateRequest {
                prompt,
                chat,
                max_tokens: Some(max_tokens),
                temperature,
                top_p,
                top_k,
                seed,
                stop: Vec::new(),
            };
            let mut stdout = std::io::stdout();
            let result = student.generate_text(&req, |piece| {
                if !json {
                    let _ = stdout.write_all(piece.as_bytes());
                    let _ = stdout.flush();
                }
            })?;
            if json {
                crate::cli::out(&format!("{}\n", serde_json::to_string_pretty(&result)?));
            } else {
                println!();
                eprintln!(
                    "[{} prompt tokens, {} generated, {:?}, {:.1} tokens/s]",
                    result.prompt_tokens,
                    result.completion_tokens.len(),
                    result.finish_reason,
                    result.tokens_per_second
                );
            }
            Ok(())
        }),
    }
}

/// `1.54 B`, `7.2 M`, `223.5 K`.
pub fn count(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} K", n / 1e3)
    } else {
        format!("{n}")
    }
}

/// `3.55 GiB`, `873.1 MiB`, `12.0 KiB`.
pub fn bytes(n: u64) -> String {
    let n = n as f64;
    let k = 1024.0;
    if n >= k * k * k {
        format!("{:.2} GiB", n / (k * k * k))
    } else if n >= k * k {
        format!("{:.1} MiB", n / (k * k))
    } else if n >= k {
        format!("{:.1} KiB", n / k)
    } else {
        format!("{n} B")
    }
}

/// Runs `$body` with `$device` bound to the chosen backend's device, generic code
/// instantiated once per backend compiled in.
macro_rules! with_backend {
    ($runtime:expr, |$b:ident, $device:ident| $body:block) => {
        match $runtime.device {
            Device::Cpu => {
                type $b = distill_student::CpuBackend;
                let $device = burn::tensor::Device::<$b>::default();
                $body
            }
            #[cfg(feature = "cuda")]
            Device::Cuda => {
                type $b = distill_student::CudaBackend;
                let $device = burn::tensor::Device::<$b>::default();
                $body
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => anyhow::bail!(
                "this distill was built without CUDA: rebuild with `cargo build --release --features cuda`"
            ),
        }
    };
}
use with_backend;
