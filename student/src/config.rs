//! `config.json` parsing for the supported decoder-only architectures.
//!
//! Fields are read by hand rather than through a serde struct so that every error names the exact
//! field, and so both the transformers 4.x layout (`rope_theta` + `rope_scaling`) and the 5.x layout
//! (`rope_parameters`) are accepted. The original JSON is kept so saving round-trips unknown keys.

use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::error::{Result, StudentError, read_json};

/// The model families this crate can run. Both are the same decoder with different defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Architecture {
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen): q/k/v biases, no o_proj bias.
    Qwen2,
    /// `LlamaForCausalLM` (Llama 2/3/3.1, DeepSeek-R1-Distill-Llama): optional `attention_bias`, `mlp_bias`.
    Llama,
}

impl Architecture {
    /// The class name transformers writes in `architectures`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
        }
    }

    /// The `model_type` transformers uses to pick the config class.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "qwen2",
            Architecture::Llama => "llama",
        }
    }
}

/// RoPE frequency scaling (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE (`rope_type: default`, or no scaling).
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// Divisor applied to all inverse frequencies.
        factor: f64,
    },
    /// Llama 3.1 scaling: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        /// Divisor for the low-frequency band.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled fully.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are untouched.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
}

/// Hyper-parameters of a decoder-only causal LM, as read from `config.json`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    /// Which architecture (from `architectures[0]` or `model_type`).
    pub architecture: Architecture,
    /// Rows of the embedding and of `lm_head`.
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// SwiGLU inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Per-head width (`head_dim`, defaulting to `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// Context length the model supports.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// `lm_head` shares the embedding matrix (no `lm_head.weight` in the checkpoint).
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (always for Qwen2, `attention_bias` for Llama).
    pub qkv_bias: bool,
    /// o_proj has a bias (Llama `attention_bias` only).
    pub o_bias: bool,
    /// gate/up/down projections have biases (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// The checkpoint's dtype name (`torch_dtype` or `dtype`), e.g. `bfloat16`.
    pub torch_dtype: Option<String>,
    /// Beginning-of-sequence token id, when the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids (`eos_token_id` may be an int or a list).
    pub eos_token_ids: Vec<u32>,
    /// The JSON it was parsed from: rewritten on save so unknown keys survive.
    #[serde(skip)]
    pub raw: Value,
}

struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, msg: impl Into<String>) -> StudentError {
        StudentError::config(self.path, format!("{}{}", self.prefix, field), msg)
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.err(field, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }

    fn usize(&self, field: &str) -> Result<usize> {
        self.usize_opt(field)?
            .ok_or_else(|| self.err(field, "missing (required)"))
    }

    fn positive(&self, field: &str) -> Result<usize> {
        let n = self.usize(field)?;
        if n == 0 {
            return Err(self.err(field, "must be positive"));
        }
        Ok(n)
    }

    fn f64_opt(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }

    fn f64(&self, field: &str) -> Result<f64> {
        self.f64_opt(field)?
            .ok_or_else(|| self.err(field, "missing (required)"))
    }

    fn bool_opt(&self, field: &str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected true or false, found {v}"))),
        }
    }

    fn str_opt(&self, field: &str) -> Result<Option<&'a str>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a string, found {v}"))),
        }
    }

    /// An id that may be an int or a list of ints (`eos_token_id`).
    fn ids(&self, field: &str) -> Result<Vec<u32>> {
        let bad = || self.err(field, "expected a token id or a list of token ids");
        match self.get(field) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as u32).ok_or_else(bad))
                .collect(),
            Some(v) => v.as_u64().map(|n| vec![n as u32]).ok_or_else(bad),
        }
    }
}

impl ModelConfig {
    /// Reads `config.json` (pass the file, or the checkpoint folder holding it).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            path = path.join("config.json");
        }
        let value = read_json(&path)?;
        Self::from_value(value, &path)
    }

    /// Parses a config already in memory; `path` is only used in error messages.
    pub fn from_value(value: Value, path: &Path) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| StudentError::config(path, "<root>", "expected a JSON object"))?;
        let f = Fields {
            path,
            obj,
            prefix: "",
        };

        let architecture = Self::parse_architecture(&f)?;
        let hidden_size = f.positive("hidden_size")?;
        let num_attention_heads = f.positive("num_attention_heads")?;
        let num_key_value_heads = f
            .usize_opt("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads={num_attention_heads}"),
            ));
        }
        let head_dim = match f.usize_opt("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(f.err(
                        "hidden_size",
                        format!("{hidden_size} is not a multiple of num_attention_heads={num_attention_heads} (and no head_dim is given)"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(f.err("head_dim", format!("{head_dim} must be even for RoPE")));
        }
        if let Some(act) = f.str_opt("hidden_act")?
            && act != "silu"
        {
            return Err(f.err(
                "hidden_act",
                format!("`{act}` is not supported (only silu)"),
            ));
        }
        if architecture == Architecture::Qwen2 && f.bool_opt("use_sliding_window")? == Some(true) {
            return Err(f.err(
                "use_sliding_window",
                "sliding-window attention is not supported",
            ));
        }
        let (rope_theta, rope_scaling) = Self::parse_rope(&f)?;
        let attention_bias = f.bool_opt("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match architecture {
            Architecture::Qwen2 => (true, false, false),
            Architecture::Llama => (
                attention_bias,
                attention_bias,
                f.bool_opt("mlp_bias")?.unwrap_or(false),
            ),
        };
        let torch_dtype = match f.str_opt("torch_dtype")? {
            Some(s) => Some(s.to_string()),
            None => f.str_opt("dtype")?.map(str::to_string),
        };
        let bos_token_id = f.ids("bos_token_id")?.first().copied();

        Ok(Self {
            architecture,
            vocab_size: f.positive("vocab_size")?,
            hidden_size,
            intermediate_size: f.positive("intermediate_size")?,
            num_hidden_layers: f.positive("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: f.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            rms_norm_eps: f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            // transformers' Qwen2Config and LlamaConfig both default to untied.
            tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            torch_dtype,
            bos_token_id,
            eos_token_ids: f.ids("eos_token_id")?,
            raw: value.clone(),
        })
    }

    fn parse_architecture(f: &Fields) -> Result<Architecture> {
        if let Some(archs) = f.get("architectures") {
            let name = archs
                .as_array()
                .and_then(|a| a.first())
                .and_then(Value::as_str)
                .ok_or_else(|| f.err("architectures", "expected a list of class names"))?;
            return match name {
                "Qwen2ForCausalLM" => Ok(Architecture::Qwen2),
                "LlamaForCausalLM" => Ok(Architecture::Llama),
                other => Err(f.err(
                    "architectures",
                    format!("`{other}` is not supported (Qwen2ForCausalLM, LlamaForCausalLM)"),
                )),
            };
        }
        match f.str_opt("model_type")? {
            Some("qwen2") => Ok(Architecture::Qwen2),
            Some("llama") => Ok(Architecture::Llama),
            Some(other) => Err(f.err(
                "model_type",
                format!("`{other}` is not supported (qwen2, llama)"),
            )),
            None => Err(f.err(
                "architectures",
                "missing (and no model_type to fall back on)",
            )),
        }
    }

    fn parse_rope(f: &Fields) -> Result<(f64, RopeScaling)> {
        // transformers >= 5 nests everything under `rope_parameters`; 4.x uses `rope_theta` + `rope_scaling`.
        let (params, name) = match (f.get("rope_parameters"), f.get("rope_scaling")) {
            (Some(p), _) => (Some(p), "rope_parameters"),
            (None, Some(s)) => (Some(s), "rope_scaling"),
            (None, None) => (None, "rope_scaling"),
        };
        let params = match params {
            None => {
                return Ok((
                    f.f64_opt("rope_theta")?.unwrap_or(10_000.0),
                    RopeScaling::Default,
                ));
            }
            Some(p) => p
                .as_object()
                .ok_or_else(|| f.err(name, "expected an object"))?,
        };
        let prefix = format!("{name}.");
        let p = Fields {
            path: f.path,
            obj: params,
            prefix: &prefix,
        };
        let theta = match p.f64_opt("rope_theta")? {
            Some(t) => t,
            None => f.f64_opt("rope_theta")?.unwrap_or(10_000.0),
        };
        let kind = match p.str_opt("rope_type")? {
            Some(k) => k,
            None => p.str_opt("type")?.unwrap_or("default"),
        };
        let scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: p.f64("factor")?,
            },
            "llama3" => {
                let s = RopeScaling::Llama3 {
                    factor: p.f64("factor")?,
                    low_freq_factor: p.f64("low_freq_factor")?,
                    high_freq_factor: p.f64("high_freq_factor")?,
                    original_max_position_embeddings: p
                        .positive("original_max_position_embeddings")?,
                };
                if let RopeScaling::Llama3 {
                    low_freq_factor,
                    high_freq_factor,
                    ..
                } = s
                    && high_freq_factor <= low_freq_factor
                {
                    return Err(p.err("high_freq_factor", "must exceed low_freq_factor"));
                }
                s
            }
            other => {
                return Err(p.err(
                    "rope_type",
                    format!("`{other}` is not supported (default, linear, llama3)"),
                ));
            }
        };
        Ok((theta, scaling))
    }

    /// Parameters in the model (the tied embedding counted once), as `model.num_parameters()` reports.
    pub fn num_parameters(&self) -> u64 {
        let (d, i, v) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.vocab_size as u64,
        );
        let (q, kv) = self.attention_widths();
        let biases = if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { d } else { 0 }
            + if self.mlp_bias { 2 * i + d } else { 0 };
        // Per layer, besides the linear weights: biases and the two norms.
        let layer_rest = biases + 2 * d;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        self.num_linear_weight_parameters()
            + self.num_hidden_layers as u64 * layer_rest
            + v * d
            + d
            + head
    }

    /// Parameters in the decoder layers' linear weight matrices (biases excluded): what an
    /// 8- or 4-bit base quantizes, the embeddings, norms and `lm_head` staying in bf16.
    pub fn num_linear_weight_parameters(&self) -> u64 {
        let per_layer: usize = self.linear_dims().iter().map(|[i, o]| i * o).sum();
        self.num_hidden_layers as u64 * per_layer as u64
    }

    /// `[in, out]` of each decoder layer's linear weights, in the order `q, k, v, o, gate, up,
    /// down` (the order of `train::LoraTarget::ALL`).
    pub fn linear_dims(&self) -> [[usize; 2]; 7] {
        let (d, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        );
        [[d, q], [d, kv], [d, kv], [q, d], [d, i], [d, i], [i, d]]
    }

    /// Output widths of the query and of each key/value projection.
    fn attention_widths(&self) -> (u64, u64) {
        (
            (self.num_attention_heads * self.head_dim) as u64,
            (self.num_key_value_heads * self.head_dim) as u64,
        )
    }

    /// RoPE inverse frequencies (length `head_dim / 2`), following transformers' rope init functions.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        // transformers computes these in float32; doing the same keeps logits bit-close.
        let base: Vec<f32> = (0..dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / dim as f32;
                1.0 / (self.rope_theta as f32).powf(exponent)
            })
            .collect();
        match self.rope_scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        // Neither high- nor low-frequency (wavelengths are finite, so plain comparisons are exact).
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                        } else {
                            scaled as f32
                        }
                    })
                    .collect()
            }
        }
    }

    /// The JSON to write as `config.json`: the original keys with `dtype` updated, or a fresh
    /// transformers-style config when this one was built in code.
    pub fn to_hf_json(&self, dtype_name: &str) -> Value {
        let mut obj = match &self.raw {
            Value::Object(m) if !m.is_empty() => m.clone(),
            _ => self.fresh_json(),
        };
        // transformers 4.x reads `torch_dtype`, 5.x writes `dtype`: keep whichever is present, or both.
        let has_new = obj.contains_key("dtype");
        let has_old = obj.contains_key("torch_dtype");
        if has_new || !has_old {
            obj.insert("dtype".into(), json!(dtype_name));
        }
        if has_old || !has_new {
            obj.insert("torch_dtype".into(), json!(dtype_name));
        }
        Value::Object(obj)
    }

    fn fresh_json(&self) -> Map<String, Value> {
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::Default => Value::Null,
            other => serde_json::to_value(other).expect("rope scaling serialises"),
        };
        let mut v = json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": true,
        });
        let m = v.as_object_mut().expect("object literal");
        if let Some(b) = self.bos_token_id {
            m.insert("bos_token_id".into(), json!(b));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                m.insert("eos_token_id".into(), json!(one));
            }
            many => {
                m.insert("eos_token_id".into(), json!(many));
            }
        }
        match self.architecture {
            Architecture::Qwen2 => {
                m.insert("use_sliding_window".into(), json!(false));
                m.insert("sliding_window".into(), Value::Null);
                m.insert("max_window_layers".into(), json!(self.num_hidden_layers));
            }
            Architecture::Llama => {
                m.insert("attention_bias".into(), json!(self.qkv_bias));
                m.insert("mlp_bias".into(), json!(self.mlp_bias));
            }
        }
        m.clone()
    }

    /// A Qwen2-shaped config built in code (for benchmarks and tests that need no checkpoint).
    #[allow(clippy::too_many_arguments)]
    pub fn qwen2(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        tie_word_embeddings: bool,
    ) -> Self {
        Self {
            architecture: Architecture::Qwen2,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim: hidden_size / num_attention_heads,
            max_position_embeddings: 32768,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_scaling: RopeScaling::Default,
            tie_word_embeddings,
            qkv_bias: true,
            o_bias: false,
            mlp_bias: false,
            torch_dtype: Some("float32".into()),
            bos_token_id: None,
            eos_token_ids: vec![],
            raw: Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_value(v, Path::new("config.json"))
    }

    fn base() -> Value {
        json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4})
    }

    #[test]
    fn deepseek_distill_qwen_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/deepseek-r1-distill-qwen-1.5b");
        let c = ModelConfig::from_file(&dir).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen2);
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (12, 2, 128)
        );
        assert!(c.qkv_bias && !c.o_bias && !c.tie_word_embeddings);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        assert_eq!(c.eos_token_ids, vec![151643]);
        // Published size of DeepSeek-R1-Distill-Qwen-1.5B: 1,777,088,000 parameters.
        assert_eq!(c.num_parameters(), 1_777_088_000);
    }

    #[test]
    fn llama3_scaling_from_v4_layout() {
        let mut v = base();
        v["rope_theta"] = json!(500000.0);
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        v["eos_token_id"] = json!([128001, 128008, 128009]);
        let c = parse(v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Llama3 { factor: 8.0, .. }
        ));
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        let f = c.rope_inv_freq();
        // Highest frequency untouched, lowest divided by the factor.
        assert_eq!(f[0], 1.0);
        let plain = 1.0 / 500000f32.powf(14.0 / 16.0);
        assert!((f[7] - plain / 8.0).abs() < 1e-12);
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("`hidden_size`") && e.contains("missing"), "{e}");

        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("`num_key_value_heads`"), "{e}");

        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("`rope_scaling.rope_type`") && e.contains("yarn"),
            "{e}"
        );

        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("`rope_scaling.low_freq_factor`"), "{e}");

        let mut v = base();
        v["architectures"] = json!(["MistralForCausalLM"]);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("MistralForCausalLM"), "{e}");

        let mut v = base();
        v["vocab_size"] = json!("big");
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("`vocab_size`") && e.contains("integer"), "{e}");
    }

    #[test]
    fn fresh_config_reparses_identically() {
        let c = ModelConfig::qwen2(6400, 384, 1024, 12, 6, 2, true);
        let again = parse(c.to_hf_json("float32")).unwrap();
        assert_eq!(again.num_parameters(), c.num_parameters());
        assert_eq!(again.rope_theta, c.rope_theta);
        assert!(again.tie_word_embeddings && again.qkv_bias);
    }
}
