//! What the `distill model ...` subcommands call: each function does the whole job and returns a
//! serialisable result, so the CLI only parses arguments and prints.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::log_softmax;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{Result, StudentError, read_json};
use crate::generate::{FinishReason, GenerationConfig, TokenEvent, generate};
use crate::model::CausalLm;
use crate::tokenizer::{ChatMessage, Tokenizer};
use crate::weights::{Checkpoint, SaveOptions, SavedCheckpoint, load_model, save_pretrained};

/// A checkpoint folder loaded for use: model, tokenizer (if the folder has one) and generation defaults.
#[derive(Debug)]
pub struct Student<B: Backend> {
    /// The network.
    pub model: CausalLm<B>,
    /// `tokenizer.json` + template, when present.
    pub tokenizer: Option<Tokenizer>,
    /// `generation_config.json`, when present.
    pub generation_config: Option<Value>,
    /// Where it was loaded from.
    pub dir: PathBuf,
}

impl<B: Backend> Student<B> {
    /// Loads everything in `dir`, with parameters converted to `dtype`.
    pub fn load(dir: impl AsRef<Path>, device: &B::Device, dtype: DType) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let model = load_model(&dir, device, dtype)?;
        let tokenizer = if dir.join("tokenizer.json").is_file() {
            Some(Tokenizer::from_dir(&dir)?)
        } else {
            None
        };
        let gen_path = dir.join("generation_config.json");
        let generation_config = if gen_path.is_file() {
            Some(read_json(&gen_path)?)
        } else {
            None
        };
        Ok(Self {
            model,
            tokenizer,
            generation_config,
            dir,
        })
    }

    /// The tokenizer, or an error naming the folder that lacks one.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| StudentError::Tokenizer {
                path: self.dir.join("tokenizer.json"),
                message: "file not found (this command needs a tokenizer)".into(),
            })
    }

    /// Token ids that end generation: config and generation-config `eos_token_id`s and the tokenizer's EOS.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids = self.model.config.eos_token_ids.clone();
        if let Some(g) = &self.generation_config {
            match g.get("eos_token_id") {
                Some(Value::Array(a)) => {
                    ids.extend(a.iter().filter_map(|v| v.as_u64().map(|n| n as u32)))
                }
                Some(v) => ids.extend(v.as_u64().map(|n| n as u32)),
                None => {}
            }
        }
        if let Some(id) = self.tokenizer.as_ref().and_then(|t| t.eos_token_id) {
            ids.push(id);
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Saves model, config, generation config and tokenizer files in HF layout.
    pub fn save(&self, dir: impl AsRef<Path>, mut opts: SaveOptions) -> Result<SavedCheckpoint> {
        if opts.tokenizer_dir.is_none() {
            opts.tokenizer_dir = Some(self.dir.clone());
        }
        if opts.generation_config.is_none() {
            opts.generation_config = self.generation_config.clone();
        }
        save_pretrained(&self.model, dir, &opts)
    }
}

/// `distill model info DIR`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The HF class (`Qwen2ForCausalLM`, `LlamaForCausalLM`).
    pub architecture: String,
    /// Parameters (tied embedding counted once).
    pub num_parameters: u64,
    /// Dtype of the stored weights (from the files; the config's `torch_dtype` if they disagree is ignored).
    pub dtype: String,
    /// `max_position_embeddings`.
    pub context_length: usize,
    /// Vocabulary rows.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Whether `lm_head` is the embedding.
    pub tie_word_embeddings: bool,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling kind (`default`, `linear`, `llama3`).
    pub rope_scaling: String,
    /// Bytes to hold the parameters in f32.
    pub memory_f32_bytes: u64,
    /// Bytes to hold the parameters in bf16.
    pub memory_bf16_bytes: u64,
    /// Bytes with the decoder's linear weights in 8 bits (an f32 scale per block of 64), the
    /// rest in bf16.
    pub memory_8bit_bytes: u64,
    /// Bytes with the decoder's linear weights in 4 bits (NF4 as QLoRA stores it: an f32
    /// scale per block of 64, no double quantization), the rest in bf16.
    pub memory_4bit_bytes: u64,
    /// Whether the folder holds weights; without them (a `config.json` alone, to plan
    /// before downloading) `dtype` is the config's and the file fields are 0.
    pub has_weights: bool,
    /// Bytes of the weight files.
    pub weights_file_bytes: u64,
    /// Number of weight files.
    pub weight_files: usize,
    /// Whether a `tokenizer.json` is present.
    pub has_tokenizer: bool,
    /// Whether a chat template is present.
    pub has_chat_template: bool,
}

/// Describes a model from its config and, when it has weights, their file headers (never
/// loading tensors). `path` is a model folder or a `config.json`; a folder or config with no
/// weights yet is described from the config alone, so a plan can be checked before a
/// download.
pub fn model_info(path: impl AsRef<Path>) -> Result<ModelInfo> {
    let path = path.as_ref();
    let (dir, config) = if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new("."));
        (dir, path.to_path_buf())
    } else {
        (path, path.join("config.json"))
    };
    let c = ModelConfig::from_file(&config)?;
    let has_weights = Checkpoint::exists(dir);
    let ckpt = has_weights.then(|| Checkpoint::open(dir)).transpose()?;
    let dtype = match &ckpt {
        Some(ckpt) => {
            let infos = ckpt.tensor_infos()?;
            let mut dtypes: Vec<&str> = infos.iter().map(|(_, d, _)| d.as_str()).collect();
            dtypes.sort_unstable();
            dtypes.dedup();
            match dtypes.as_slice() {
                [one] => match *one {
                    "F32" => "float32".to_string(),
                    "BF16" => "bfloat16".to_string(),
                    "F16" => "float16".to_string(),
                    other => other.to_lowercase(),
                },
                many => many.join("+").to_lowercase(),
            }
        }
        None => c.torch_dtype.clone().unwrap_or_else(|| "unknown".into()),
    };
    let n = c.num_parameters();
    let tok_cfg = dir.join("tokenizer_config.json");
    let has_chat_template = dir.join("chat_template.jinja").is_file()
        || (tok_cfg.is_file()
            && read_json(&tok_cfg)?
                .get("chat_template")
                .is_some_and(|v| !v.is_null()));
    Ok(ModelInfo {
        architecture: c.architecture.hf_class().to_string(),
        num_parameters: n,
        dtype,
        context_length: c.max_position_embeddings,
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        num_layers: c.num_hidden_layers,
        num_heads: c.num_attention_heads,
        num_kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        tie_word_embeddings: c.tie_word_embeddings,
        rope_theta: c.rope_theta,
        rope_scaling: match c.rope_scaling {
            crate::config::RopeScaling::Default => "default".into(),
            crate::config::RopeScaling::Linear { .. } => "linear".into(),
            crate::config::RopeScaling::Llama3 { .. } => "llama3".into(),
        },
        memory_f32_bytes: n * 4,
        memory_bf16_bytes: n * 2,
        memory_8bit_bytes: quantized_bytes(&c, 8),
        memory_4bit_bytes: quantized_bytes(&c, 4),
        has_weights,
        weights_file_bytes: ckpt.as_ref().map_or(0, Checkpoint::total_bytes),
        weight_files: ckpt.as_ref().map_or(0, |c| c.files().count()),
        has_tokenizer: dir.join("tokenizer.json").is_file(),
        has_chat_template,
    })
}

/// Bytes of `c`'s parameters with the decoder's linear weights in `bits` bits plus an f32
/// scale per block of 64, and everything else (embeddings, norms, biases, `lm_head`) in bf16.
fn quantized_bytes(c: &ModelConfig, bits: u64) -> u64 {
    const BLOCK: u64 = 64;
    let linear = c.num_linear_weight_parameters();
    let rest = c.num_parameters() - linear;
    linear * bits / 8 + linear.div_ceil(BLOCK) * 4 + rest * 2
}

/// Writes a randomly initialised model of the architecture and size in `config` (an HF
/// `config.json`) to `out`, with the tokenizer files of `tokenizer_dir`, in `dtype`: a student
/// trained from scratch starts here. The same seed gives the same weights (Burn's CPU backend,
/// seeded before initialisation). Fails when the vocabulary is smaller than the tokenizer's.
pub fn init_model(
    config: &Path,
    tokenizer_dir: &Path,
    seed: u64,
    dtype: DType,
    out: &Path,
) -> Result<SavedCheckpoint> {
    type B = crate::CpuBackend;
    let model_config = ModelConfig::from_file(config)?;
    let tok = Tokenizer::from_dir(tokenizer_dir)?;
    if tok.vocab_size() > model_config.vocab_size {
        return Err(StudentError::InvalidArgument(format!(
            "{}: vocab_size {} is smaller than the tokenizer's {} tokens",
            config.display(),
            model_config.vocab_size,
            tok.vocab_size()
        )));
    }
    let device = burn::tensor::Device::<B>::default();
    B::seed(&device, seed);
    let model = CausalLm::<B>::init(&model_config, &device);
    save_pretrained(
        &model,
        out,
        &SaveOptions {
            dtype: Some(dtype),
            tokenizer_dir: Some(tokenizer_dir.to_path_buf()),
            ..Default::default()
        },
    )
}

/// NLL of one data line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NllRecord {
    /// 1-based line number in the data file.
    pub line: usize,
    /// Tokens scored (all but the first; truncated to the context length).
    pub tokens: usize,
    /// Mean negative log-likelihood per scored token, in nats.
    pub mean_nll: f64,
}

/// `distill model nll DIR --data FILE.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NllReport {
    /// One record per data line.
    pub records: Vec<NllRecord>,
    /// Tokens scored over the file.
    pub total_tokens: usize,
    /// Token-weighted mean NLL over the file.
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
}

/// Mean NLL of `ids[1..]` given their prefixes, and the number of tokens scored.
pub fn sequence_nll<B: Backend>(model: &CausalLm<B>, ids: &[u32]) -> (f64, usize) {
    if ids.len() < 2 {
        return (0.0, 0);
    }
    let n = ids.len();
    let device = model.device();
    let input = Tensor::<B, 2, Int>::from_data(
        TensorData::new(
            ids[..n - 1].iter().map(|&t| t as i64).collect::<Vec<_>>(),
            [1, n - 1],
        ),
        &device,
    );
    let targets = Tensor::<B, 2, Int>::from_data(
        TensorData::new(
            ids[1..].iter().map(|&t| t as i64).collect::<Vec<_>>(),
            [1, n - 1],
        ),
        &device,
    );
    let logp = log_softmax(model.forward(input).cast(DType::F32), 2);
    let picked = logp.gather(2, targets.unsqueeze_dim::<3>(2));
    let total: f64 = picked.sum().neg().into_scalar().elem::<f64>();
    (total / (n - 1) as f64, n - 1)
}

/// Scores each line of a JSONL file: `{"text": ...}` is tokenised with special tokens (BOS where
/// the tokenizer adds one); `{"messages": [...]}` is rendered by the chat template. Sequences longer
/// than the context are truncated to it.
pub fn model_nll<B: Backend>(student: &Student<B>, data: impl AsRef<Path>) -> Result<NllReport> {
    let data = data.as_ref();
    let tok = student.tokenizer()?;
    let file = std::fs::File::open(data).map_err(|e| StudentError::io(data, e))?;
    let max_len = student.model.config.max_position_embeddings;
    let mut records = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|e| StudentError::io(data, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| StudentError::Data {
            path: data.to_path_buf(),
            line: line_no,
            message,
        };
        let v: Value =
            serde_json::from_str(&line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let mut ids = if let Some(text) = v.get("text") {
            let text = text
                .as_str()
                .ok_or_else(|| bad("field `text`: expected a string".into()))?;
            tok.encode(text, true)?
        } else if let Some(messages) = v.get("messages") {
            let messages: Vec<ChatMessage> = serde_json::from_value(messages.clone())
                .map_err(|e| bad(format!("field `messages`: {e}")))?;
            tok.encode_chat(&messages, false)
                .map_err(|e| bad(format!("field `messages`: {e}")))?
        } else {
            return Err(bad("expected a `text` or `messages` field".into()));
        };
        ids.truncate(max_len);
        let (mean_nll, tokens) = sequence_nll(&student.model, &ids);
        records.push(NllRecord {
            line: line_no,
            tokens,
            mean_nll,
        });
    }
    let total_tokens: usize = records.iter().map(|r| r.tokens).sum();
    let sum: f64 = records.iter().map(|r| r.mean_nll * r.tokens as f64).sum();
    let mean_nll = if total_tokens > 0 {
        sum / total_tokens as f64
    } else {
        0.0
    };
    Ok(NllReport {
        records,
        total_tokens,
        mean_nll,
        perplexity: mean_nll.exp(),
    })
}

/// Arguments of `distill model generate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The prompt text (a user message when `chat` is set).
    pub prompt: String,
    /// Wrap the prompt as a user turn with the chat template and its generation prompt.
    pub chat: bool,
    /// Token budget (default 256).
    pub max_tokens: Option<usize>,
    /// Temperature (default: `generation_config.json`'s when it samples, else greedy).
    pub temperature: Option<f32>,
    /// Nucleus threshold (default: `generation_config.json`'s, else 1).
    pub top_p: Option<f32>,
    /// Top-k (default: `generation_config.json`'s, else off).
    pub top_k: Option<usize>,
    /// RNG seed (default 0).
    pub seed: Option<u64>,
    /// Extra stop strings.
    pub stop: Vec<String>,
}

/// Result of `distill model generate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateResult {
    /// The exact text fed to the model (after the chat template).
    pub prompt_text: String,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Generated text.
    pub completion: String,
    /// Generated ids.
    pub completion_tokens: Vec<u32>,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// Decode speed (generated tokens / wall time including prefill).
    pub tokens_per_second: f64,
    /// The settings used.
    pub config: GenerationConfig,
}

impl<B: Backend> Student<B> {
    /// The generation settings a request resolves to (request, then `generation_config.json`, then greedy).
    pub fn generation_settings(&self, req: &GenerateRequest) -> GenerationConfig {
        let g = self.generation_config.as_ref();
        let num = |k: &str| g.and_then(|g| g.get(k)).and_then(Value::as_f64);
        let samples = g
            .and_then(|g| g.get("do_sample"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let temperature = req.temperature.unwrap_or(if samples {
            num("temperature").unwrap_or(1.0) as f32
        } else {
            0.0
        });
        GenerationConfig {
            max_new_tokens: req.max_tokens.unwrap_or(256),
            temperature,
            top_p: req.top_p.unwrap_or(if samples {
                num("top_p").unwrap_or(1.0) as f32
            } else {
                1.0
            }),
            top_k: req.top_k.unwrap_or(if samples {
                num("top_k").unwrap_or(0.0) as usize
            } else {
                0
            }),
            seed: req.seed.unwrap_or(0),
            stop_token_ids: self.stop_token_ids(),
            stop_strings: req.stop.clone(),
        }
    }

    /// Generates one completion, streaming text pieces to `on_text` as they are decoded.
    pub fn generate_text(
        &self,
        req: &GenerateRequest,
        mut on_text: impl FnMut(&str),
    ) -> Result<GenerateResult> {
        let tok = self.tokenizer()?;
        let (prompt_text, ids) = if req.chat {
            let text = tok.apply_chat_template(&[ChatMessage::user(&req.prompt)], true)?;
            let ids = tok.encode(&text, false)?;
            (text, ids)
        } else {
            (req.prompt.clone(), tok.encode(&req.prompt, true)?)
        };
        if ids.is_empty() {
            return Err(StudentError::InvalidArgument(
                "the prompt encodes to no tokens".into(),
            ));
        }
        let config = self.generation_settings(req);
        let start = Instant::now();
        let mut out = generate(
            &self.model,
            std::slice::from_ref(&ids),
            &config,
            Some(tok),
            |e: TokenEvent<'_>| on_text(e.text),
        )?;
        let secs = start.elapsed().as_secs_f64();
        let g = out.pop().expect("one prompt, one generation");
        Ok(GenerateResult {
            prompt_text,
            prompt_tokens: ids.len(),
            tokens_per_second: g.token_ids.len() as f64 / secs.max(1e-9),
            completion: g.text,
            completion_tokens: g.token_ids,
            finish_reason: g.finish_reason,
            config,
        })
    }
}
