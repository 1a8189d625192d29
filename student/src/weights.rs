//! Hugging Face safetensors checkpoints in and out: single-file or sharded with
//! `model.safetensors.index.json`, memory-mapped on load, HF tensor names and `[out, in]` layout on disk.
//!
//! The loader builds each module straight from the file (no random init then overwrite), converting
//! the stored dtype (f32/f16/bf16/f64) to the requested one, and checks the checkpoint against the
//! config: every missing, unexpected or mis-shaped tensor is an error naming it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::prelude::*;
use burn::tensor::DType;
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView, View};
use serde_json::{Value, json};

use crate::config::ModelConfig;
use crate::error::{Result, StudentError, read_json, write_json};
use crate::model::{Attention, CausalLm, DecoderLayer, DecoderModel, Mlp};
use crate::quant::{Nf4Matrix, Nf4Weight};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Files a tokenizer may consist of; copied verbatim next to saved weights.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

/// The transformers name of a float dtype (`config.json`'s `torch_dtype`).
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Parses a transformers dtype name (`bfloat16`, `float32`, `bf16`, `f32`, ...).
pub fn parse_dtype(name: &str) -> Option<DType> {
    match name.to_ascii_lowercase().as_str() {
        "float32" | "f32" | "fp32" => Some(DType::F32),
        "bfloat16" | "bf16" => Some(DType::BF16),
        "float16" | "f16" | "fp16" | "half" => Some(DType::F16),
        _ => None,
    }
}

/// The memory-mapped safetensors files of a checkpoint folder.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor names the index assigns to each file (empty for a single-file checkpoint).
    index: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Maps `model.safetensors`, or every shard listed by `model.safetensors.index.json`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index_path = dir.join(INDEX_FILE);
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        if index_path.exists() {
            let v = read_json(&index_path)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    StudentError::config(&index_path, "weight_map", "missing or not an object")
                })?;
            let mut shard_ids: HashMap<String, usize> = HashMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    StudentError::config(
                        &index_path,
                        format!("weight_map.{name}"),
                        "expected a file name",
                    )
                })?;
                let next = shard_ids.len();
                let id = *shard_ids.entry(file.to_string()).or_insert(next);
                index.insert(name.clone(), id);
            }
            let mut names: Vec<(usize, String)> =
                shard_ids.into_iter().map(|(f, i)| (i, f)).collect();
            names.sort();
            for (_, file) in names {
                let path = dir.join(&file);
                files.push((path.clone(), map_file(&path)?));
            }
        } else {
            let path = dir.join(SINGLE_FILE);
            files.push((path.clone(), map_file(&path)?));
        }
        Ok(Self { dir, files, index })
    }

    /// Whether `dir` holds weights (a safetensors index or a single safetensors file).
    pub fn exists(dir: impl AsRef<Path>) -> bool {
        let dir = dir.as_ref();
        dir.join(INDEX_FILE).is_file() || dir.join(SINGLE_FILE).is_file()
    }

    /// The checkpoint folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The weight files, in index order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    /// Bytes of all weight files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|(_, m)| m.len() as u64).sum()
    }

    /// Parses every file's header; the views borrow the mapped memory (no copy).
    fn parse(&self) -> Result<Vec<SafeTensors<'_>>> {
        self.files
            .iter()
            .map(|(path, mmap)| {
                SafeTensors::deserialize(mmap).map_err(|e| StudentError::CorruptWeights {
                    path: path.clone(),
                    message: e.to_string(),
                })
            })
            .collect()
    }

    /// Name -> (file index) for every stored tensor, checking the index against the files.
    fn locate(&self, parsed: &[SafeTensors<'_>]) -> Result<HashMap<String, usize>> {
        let mut out = HashMap::new();
        for (i, st) in parsed.iter().enumerate() {
            for name in st.names() {
                if out.insert(name.to_string(), i).is_some() {
                    return Err(StudentError::CorruptWeights {
                        path: self.files[i].0.clone(),
                        message: format!("tensor `{name}` is stored in more than one shard"),
                    });
                }
            }
        }
        for (name, &i) in &self.index {
            if out.get(name) != Some(&i) {
                return Err(StudentError::CorruptWeights {
                    path: self.files[i].0.clone(),
                    message: format!(
                        "{INDEX_FILE} places `{name}` in this file, but it is not there"
                    ),
                });
            }
        }
        Ok(out)
    }

    /// One stored tensor as f32 values in its stored (HF) layout, with its shape. Only the file
    /// the index names (or the single file) is parsed, so reading every weight of a sharded
    /// checkpoint one at a time parses each header once per tensor, not every header.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let missing = || StudentError::MissingTensor {
            dir: self.dir.clone(),
            name: name.to_string(),
            expected: vec![],
        };
        let i = match self.files.len() {
            1 => 0,
            _ => *self.index.get(name).ok_or_else(missing)?,
        };
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap).map_err(|e| StudentError::CorruptWeights {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let view = st.tensor(name).map_err(|_| missing())?;
        Ok((view.shape().to_vec(), view_to_f32(&view, path, name)?))
    }

    /// Name, dtype and shape of every tensor (for `model info`).
    pub fn tensor_infos(&self) -> Result<Vec<(String, String, Vec<usize>)>> {
        let parsed = self.parse()?;
        let mut out = Vec::new();
        for st in &parsed {
            for (name, view) in st.tensors() {
                out.push((name, format!("{:?}", view.dtype()), view.shape().to_vec()));
            }
        }
        out.sort();
        Ok(out)
    }
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| StudentError::io(path, e))?;
    // SAFETY: the checkpoint is treated as read-only for the lifetime of the map; a file truncated
    // underneath us by another process is outside what any loader can defend against.
    unsafe { Mmap::map(&file) }.map_err(|e| StudentError::io(path, e))
}

/// Decodes a stored tensor to f32, element order unchanged.
fn view_to_f32(view: &TensorView<'_>, path: &Path, name: &str) -> Result<Vec<f32>> {
    let bytes = view.data();
    let out = match view.dtype() {
        StDtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        StDtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StDtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StDtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32)
            .collect(),
        other => {
            return Err(StudentError::UnsupportedDtype {
                path: path.to_path_buf(),
                name: name.to_string(),
                dtype: format!("{other:?}"),
            });
        }
    };
    Ok(out)
}

/// `[rows, cols]` row-major -> `[cols, rows]` row-major.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// Builds model tensors from a parsed checkpoint, remembering which names were used.
struct Loader<'a, B: Backend> {
    ckpt: &'a Checkpoint,
    parsed: Vec<SafeTensors<'a>>,
    located: HashMap<String, usize>,
    used: HashSet<String>,
    device: B::Device,
    dtype: DType,
    /// `Some`: decoder linear weights are quantized to NF4 on the host as they are read and
    /// collected here in load order (an empty placeholder takes their place in the model).
    nf4: Option<Vec<Nf4Weight<B>>>,
}

impl<B: Backend> Loader<'_, B> {
    /// Reads `name` with HF shape `shape`; `transpose` turns a PyTorch `[out, in]` matrix into Burn's `[in, out]`.
    fn read(
        &mut self,
        name: &str,
        shape: &[usize],
        transposed: bool,
    ) -> Result<(Vec<f32>, Vec<usize>)> {
        let Some(&i) = self.located.get(name) else {
            return Err(StudentError::MissingTensor {
                dir: self.ckpt.dir.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
            });
        };
        let path = &self.ckpt.files[i].0;
        let view = self.parsed[i]
            .tensor(name)
            .map_err(|e| StudentError::CorruptWeights {
                path: path.clone(),
                message: format!("tensor `{name}`: {e}"),
            })?;
        if view.shape() != shape {
            return Err(StudentError::ShapeMismatch {
                path: path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let data = view_to_f32(&view, path, name)?;
        self.used.insert(name.to_string());
        if transposed {
            Ok((
                transpose(&data, shape[0], shape[1]),
                vec![shape[1], shape[0]],
            ))
        } else {
            Ok((data, shape.to_vec()))
        }
    }

    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: &[usize],
        transposed: bool,
    ) -> Result<Tensor<B, D>> {
        let (data, shape) = self.read(name, shape, transposed)?;
        Ok(Tensor::from_data(
            TensorData::new(data, shape),
            (&self.device, self.dtype),
        ))
    }

    fn linear(&mut self, prefix: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Linear<B>> {
        let weight = self.tensor::<2>(&format!("{prefix}.weight"), &[d_out, d_in], true)?;
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias: self.bias(prefix, d_out, bias)?,
        })
    }

    fn bias(
        &mut self,
        prefix: &str,
        d_out: usize,
        bias: bool,
    ) -> Result<Option<Param<Tensor<B, 1>>>> {
        if !bias {
            return Ok(None);
        }
        let b = self.tensor::<1>(&format!("{prefix}.bias"), &[d_out], false)?;
        Ok(Some(Param::from_tensor(b)))
    }

    /// A decoder linear layer: as [`Self::linear`], or with its weight quantized to NF4 when
    /// the loader collects NF4 weights, so the dense weight never reaches the device.
    fn decoder_linear(
        &mut self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<Linear<B>> {
        if self.nf4.is_none() {
            return self.linear(prefix, d_in, d_out, bias);
        }
        let (data, _) = self.read(&format!("{prefix}.weight"), &[d_out, d_in], true)?;
        let q = Nf4Matrix::quantize(&data, d_in, d_out).to_device::<B>(&self.device);
        drop(data);
        self.nf4.as_mut().expect("checked above").push(q);
        Ok(Linear {
            weight: Param::from_tensor(Tensor::empty([0, 0], (&self.device, self.dtype))),
            bias: self.bias(prefix, d_out, bias)?,
        })
    }

    fn norm(&mut self, prefix: &str, d: usize, eps: f64) -> Result<RmsNorm<B>> {
        Ok(RmsNorm {
            gamma: Param::from_tensor(self.tensor::<1>(
                &format!("{prefix}.weight"),
                &[d],
                false,
            )?),
            epsilon: eps,
        })
    }
}

/// Whether a stored tensor that the architecture does not use may be ignored, as transformers does.
fn ignorable(name: &str, config: &ModelConfig) -> bool {
    // Old Llama exports carry RoPE buffers; tied checkpoints sometimes store the duplicate head.
    name.ends_with(".rotary_emb.inv_freq")
        || (config.tie_word_embeddings && name == "lm_head.weight")
}

/// Loads `config.json` and the safetensors weights of `dir` onto `device`, converting to `dtype`
/// (`DType::F32`, or `DType::BF16`/`F16` where the backend supports them).
pub fn load_model<B: Backend>(
    dir: impl AsRef<Path>,
    device: &B::Device,
    dtype: DType,
) -> Result<CausalLm<B>> {
    let dir = dir.as_ref();
    let config = ModelConfig::from_file(dir.join("config.json"))?;
    let ckpt = Checkpoint::open(dir)?;
    load_from_checkpoint(&ckpt, config, device, dtype)
}

/// Per decoder layer, its seven NF4 linear weights (`q, k, v, o, gate, up, down`).
pub type Nf4Layers<B> = Vec<Vec<Nf4Weight<B>>>;

/// [`load_model`] for a QLoRA base: each decoder linear weight is read, quantized to NF4 on the
/// host and uploaded packed, one at a time, so neither the host nor the device ever holds the
/// dense base (a 70B model's bf16 weights are 131 GiB). The model's decoder linear weights are
/// empty placeholders; the NF4 weights come back per layer in `q, k, v, o, gate, up, down`
/// order. Biases, norms, embeddings and the head load in `dtype`.
pub fn load_model_nf4<B: Backend>(
    dir: impl AsRef<Path>,
    device: &B::Device,
    dtype: DType,
) -> Result<(CausalLm<B>, Nf4Layers<B>)> {
    let dir = dir.as_ref();
    let config = ModelConfig::from_file(dir.join("config.json"))?;
    let layers = config.num_hidden_layers;
    let ckpt = Checkpoint::open(dir)?;
    let (model, nf4) = load_checkpoint(&ckpt, config, device, dtype, true)?;
    let mut nf4 = nf4.expect("collected").into_iter();
    let per_layer = (0..layers)
        .map(|_| nf4.by_ref().take(7).collect())
        .collect();
    Ok((model, per_layer))
}

/// Loads weights from an opened checkpoint for a given config (lets callers override the config).
pub fn load_from_checkpoint<B: Backend>(
    ckpt: &Checkpoint,
    config: ModelConfig,
    device: &B::Device,
    dtype: DType,
) -> Result<CausalLm<B>> {
    Ok(load_checkpoint(ckpt, config, device, dtype, false)?.0)
}

type Loaded<B> = (CausalLm<B>, Option<Vec<Nf4Weight<B>>>);

fn load_checkpoint<B: Backend>(
    ckpt: &Checkpoint,
    config: ModelConfig,
    device: &B::Device,
    dtype: DType,
    nf4: bool,
) -> Result<Loaded<B>> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(StudentError::InvalidArgument(format!(
            "cannot load a model as {dtype:?} (use f32, bf16 or f16)"
        )));
    }
    let parsed = ckpt.parse()?;
    let located = ckpt.locate(&parsed)?;
    let mut l = Loader::<B> {
        ckpt,
        parsed,
        located,
        used: HashSet::new(),
        device: device.clone(),
        dtype,
        nf4: nf4.then(Vec::new),
    };
    let c = &config;
    let (d, q, kvd, inter) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    );
    let embed = l.tensor::<2>("model.embed_tokens.weight", &[c.vocab_size, d], false)?;
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        layers.push(DecoderLayer {
            self_attn: Attention {
                q_proj: l.decoder_linear(&format!("{p}.self_attn.q_proj"), d, q, c.qkv_bias)?,
                k_proj: l.decoder_linear(&format!("{p}.self_attn.k_proj"), d, kvd, c.qkv_bias)?,
                v_proj: l.decoder_linear(&format!("{p}.self_attn.v_proj"), d, kvd, c.qkv_bias)?,
                o_proj: l.decoder_linear(&format!("{p}.self_attn.o_proj"), q, d, c.o_bias)?,
                num_heads: c.num_attention_heads,
                num_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
            },
            mlp: Mlp {
                gate_proj: l.decoder_linear(&format!("{p}.mlp.gate_proj"), d, inter, c.mlp_bias)?,
                up_proj: l.decoder_linear(&format!("{p}.mlp.up_proj"), d, inter, c.mlp_bias)?,
                down_proj: l.decoder_linear(&format!("{p}.mlp.down_proj"), inter, d, c.mlp_bias)?,
            },
            input_layernorm: l.norm(&format!("{p}.input_layernorm"), d, c.rms_norm_eps)?,
            post_attention_layernorm: l.norm(
                &format!("{p}.post_attention_layernorm"),
                d,
                c.rms_norm_eps,
            )?,
        });
    }
    let norm = l.norm("model.norm", d, c.rms_norm_eps)?;
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        Some(l.linear("lm_head", d, c.vocab_size, false)?)
    };
    // Anything left over means the config and the checkpoint disagree (e.g. more layers stored).
    let mut extra: Vec<(&String, &usize)> = l
        .located
        .iter()
        .filter(|(n, _)| !l.used.contains(*n) && !ignorable(n, c))
        .collect();
    extra.sort();
    if let Some(&(name, &i)) = extra.first() {
        let shape = l.parsed[i]
            .tensor(name)
            .map(|v| v.shape().to_vec())
            .unwrap_or_default();
        return Err(StudentError::UnexpectedTensor {
            path: ckpt.files[i].0.clone(),
            name: name.to_string(),
            shape,
        });
    }
    let model = DecoderModel {
        embed_tokens: Embedding {
            weight: Param::from_tensor(embed),
        },
        layers,
        norm,
    };
    Ok((CausalLm::from_parts(model, lm_head, config), l.nf4))
}

/// How to write a checkpoint.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Dtype on disk; `None` keeps the model's.
    pub dtype: Option<DType>,
    /// Shard when the weights exceed this many bytes (transformers' default is 5 GB).
    pub max_shard_bytes: u64,
    /// Copy these tokenizer files (see [`TOKENIZER_FILES`]) from this folder.
    pub tokenizer_dir: Option<PathBuf>,
    /// `generation_config.json` to write; `None` derives one from the config's bos/eos ids.
    pub generation_config: Option<Value>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            max_shard_bytes: 5_000_000_000,
            tokenizer_dir: None,
            generation_config: None,
        }
    }
}

/// What [`save_pretrained`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SavedCheckpoint {
    /// Every file written or copied.
    pub files: Vec<PathBuf>,
    /// Bytes of tensor data (the index's `total_size`).
    pub weights_bytes: u64,
    /// Number of weight files.
    pub shards: usize,
}

/// One tensor to write: HF name, HF shape and where its values come from.
struct OutTensor<B: Backend> {
    name: String,
    shape: Vec<usize>,
    source: OutSource<B>,
}

enum OutSource<B: Backend> {
    /// Burn `[in, out]` matrix written as `[out, in]`.
    LinearWeight(Tensor<B, 2>),
    /// A linear weight the model holds only as an empty placeholder (a QLoRA base): its
    /// `[out, in]` values come from the caller's [`LinearFill`] when its shard is written.
    Filled,
    Plain2(Tensor<B, 2>),
    Plain1(Tensor<B, 1>),
}

/// The values of a placeholder linear weight by HF tensor name, in HF `[out, in]` layout.
pub type LinearFill<'a> = dyn Fn(&str) -> Result<Vec<f32>> + 'a;

fn out_tensors<B: Backend>(model: &CausalLm<B>) -> Vec<OutTensor<B>> {
    let mut out = Vec::new();
    let c = &model.config;
    let dims = c.linear_dims();
    let lin = |prefix: String, l: &Linear<B>, [i, o]: [usize; 2], out: &mut Vec<OutTensor<B>>| {
        let w = l.weight.val();
        let source = if w.dims() == [0, 0] {
            OutSource::Filled
        } else {
            OutSource::LinearWeight(w)
        };
        out.push(OutTensor {
            name: format!("{prefix}.weight"),
            shape: vec![o, i],
            source,
        });
        if let Some(b) = &l.bias {
            out.push(OutTensor {
                name: format!("{prefix}.bias"),
                shape: vec![o],
                source: OutSource::Plain1(b.val()),
            });
        }
    };
    let norm = |name: String, n: &RmsNorm<B>, out: &mut Vec<OutTensor<B>>| {
        let g = n.gamma.val();
        out.push(OutTensor {
            name,
            shape: g.dims().to_vec(),
            source: OutSource::Plain1(g),
        });
    };
    let e = model.model.embed_tokens.weight.val();
    out.push(OutTensor {
        name: "model.embed_tokens.weight".into(),
        shape: e.dims().to_vec(),
        source: OutSource::Plain2(e),
    });
    for (i, layer) in model.model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let (a, m) = (&layer.self_attn, &layer.mlp);
        let linears = [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.o_proj", &a.o_proj),
            ("mlp.gate_proj", &m.gate_proj),
            ("mlp.up_proj", &m.up_proj),
            ("mlp.down_proj", &m.down_proj),
        ];
        for ((name, l), dims) in linears.into_iter().zip(dims) {
            lin(format!("{p}.{name}"), l, dims, &mut out);
        }
        norm(
            format!("{p}.input_layernorm.weight"),
            &layer.input_layernorm,
            &mut out,
        );
        norm(
            format!("{p}.post_attention_layernorm.weight"),
            &layer.post_attention_layernorm,
            &mut out,
        );
    }
    norm("model.norm.weight".into(), &model.model.norm, &mut out);
    if let Some(head) = &model.lm_head {
        lin(
            "lm_head".into(),
            head,
            [c.hidden_size, c.vocab_size],
            &mut out,
        );
    }
    out
}

/// Encoded bytes of one tensor, in the form `safetensors::serialize_to_file` wants.
struct Encoded {
    dtype: StDtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Encoded {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn encode<B: Backend>(
    t: &OutTensor<B>,
    dtype: DType,
    fill: Option<&LinearFill>,
) -> Result<Encoded> {
    let values: Vec<f32> = match &t.source {
        OutSource::Filled => {
            let fill = fill.ok_or_else(|| {
                StudentError::InvalidArgument(format!(
                    "`{}` is a placeholder (a quantized base) and nothing fills it",
                    t.name
                ))
            })?;
            let v = fill(&t.name)?;
            if v.len() != t.shape.iter().product::<usize>() {
                return Err(StudentError::InvalidArgument(format!(
                    "`{}`: {} values for shape {:?}",
                    t.name,
                    v.len(),
                    t.shape
                )));
            }
            v
        }
        OutSource::LinearWeight(w) => {
            let [i, o] = w.dims();
            let v = w
                .clone()
                .cast(DType::F32)
                .into_data()
                .to_vec::<f32>()
                .expect("f32 data");
            transpose(&v, i, o)
        }
        OutSource::Plain2(w) => w
            .clone()
            .cast(DType::F32)
            .into_data()
            .to_vec::<f32>()
            .expect("f32 data"),
        OutSource::Plain1(w) => w
            .clone()
            .cast(DType::F32)
            .into_data()
            .to_vec::<f32>()
            .expect("f32 data"),
    };
    let (st, bytes) = match dtype {
        DType::BF16 => (
            StDtype::BF16,
            values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            StDtype::F16,
            values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
        _ => (
            StDtype::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    };
    Ok(Encoded {
        dtype: st,
        shape: t.shape.clone(),
        bytes,
    })
}

fn elem_bytes(dtype: DType) -> u64 {
    match dtype {
        DType::BF16 | DType::F16 => 2,
        _ => 4,
    }
}

/// Writes the weights (sharded above `max_shard_bytes`, with the index) and returns the files.
pub fn save_weights<B: Backend>(
    model: &CausalLm<B>,
    dir: &Path,
    opts: &SaveOptions,
) -> Result<SavedCheckpoint> {
    save_weights_filled(model, dir, opts, None)
}

fn save_weights_filled<B: Backend>(
    model: &CausalLm<B>,
    dir: &Path,
    opts: &SaveOptions,
    fill: Option<&LinearFill>,
) -> Result<SavedCheckpoint> {
    let dtype = opts.dtype.unwrap_or_else(|| model.dtype());
    std::fs::create_dir_all(dir).map_err(|e| StudentError::io(dir, e))?;
    remove_old_weights(dir)?;
    let tensors = out_tensors(model);
    // Greedy packing in module order, as transformers' `shard_checkpoint` does.
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut current = 0u64;
    let mut total = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.shape.iter().product::<usize>() as u64 * elem_bytes(dtype);
        if current + size > opts.max_shard_bytes && !shards.last().expect("one shard").is_empty() {
            shards.push(vec![]);
            current = 0;
        }
        shards.last_mut().expect("one shard").push(i);
        current += size;
        total += size;
    }
    let n = shards.len();
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    for (k, members) in shards.iter().enumerate() {
        let file = if n == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
        };
        let path = dir.join(&file);
        // Encode one shard at a time so peak memory is a shard, not the model.
        let encoded: Vec<(String, Encoded)> = members
            .iter()
            .map(|&i| Ok((tensors[i].name.clone(), encode(&tensors[i], dtype, fill)?)))
            .collect::<Result<_>>()?;
        for (name, _) in &encoded {
            weight_map.insert(name.clone(), json!(file));
        }
        safetensors::serialize_to_file(
            encoded.iter().map(|(n, e)| (n.as_str(), e)),
            Some(metadata.clone()),
            &path,
        )
        .map_err(|e| StudentError::Io {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        files.push(path);
    }
    if n > 1 {
        let path = dir.join(INDEX_FILE);
        write_json(
            &path,
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
        files.push(path);
    }
    Ok(SavedCheckpoint {
        files,
        weights_bytes: total,
        shards: n,
    })
}

/// Deletes weights of an earlier save so a stale index or shard cannot shadow the new files.
fn remove_old_weights(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| StudentError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StudentError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let is_shard =
            name.starts_with("model-") && name.ends_with(".safetensors") && name.contains("-of-");
        if name == SINGLE_FILE || name == INDEX_FILE || is_shard {
            std::fs::remove_file(entry.path()).map_err(|e| StudentError::io(entry.path(), e))?;
        }
    }
    Ok(())
}

/// Writes a folder `transformers.AutoModelForCausalLM.from_pretrained` and vLLM load unchanged:
/// weights, `config.json`, `generation_config.json` and (optionally) the tokenizer files.
pub fn save_pretrained<B: Backend>(
    model: &CausalLm<B>,
    dir: impl AsRef<Path>,
    opts: &SaveOptions,
) -> Result<SavedCheckpoint> {
    save_pretrained_filled(model, dir, opts, None)
}

/// [`save_pretrained`] for a model whose decoder linear weights may be empty placeholders (a
/// QLoRA base): their values come from `fill` one shard at a time, so the dense weights are
/// never all in memory at once.
pub fn save_pretrained_filled<B: Backend>(
    model: &CausalLm<B>,
    dir: impl AsRef<Path>,
    opts: &SaveOptions,
    fill: Option<&LinearFill>,
) -> Result<SavedCheckpoint> {
    let dir = dir.as_ref();
    let dtype = opts.dtype.unwrap_or_else(|| model.dtype());
    let mut saved = save_weights_filled(model, dir, opts, fill)?;
    let config_path = dir.join("config.json");
    write_json(&config_path, &model.config.to_hf_json(dtype_name(dtype)))?;
    saved.files.push(config_path);

    let gen_path = dir.join("generation_config.json");
    let generation = match &opts.generation_config {
        Some(v) => v.clone(),
        None => {
            let c = &model.config;
            let mut g = serde_json::Map::new();
            g.insert("_from_model_config".into(), json!(true));
            if let Some(b) = c.bos_token_id {
                g.insert("bos_token_id".into(), json!(b));
            }
            match c.eos_token_ids.as_slice() {
                [] => {}
                [one] => {
                    g.insert("eos_token_id".into(), json!(one));
                }
                many => {
                    g.insert("eos_token_id".into(), json!(many));
                }
            }
            Value::Object(g)
        }
    };
    write_json(&gen_path, &generation)?;
    saved.files.push(gen_path);

    if let Some(src) = &opts.tokenizer_dir {
        saved.files.extend(copy_tokenizer_files(src, dir)?);
    }
    Ok(saved)
}

/// Copies whichever [`TOKENIZER_FILES`] exist in `src` into `dst`; returns the copies.
pub fn copy_tokenizer_files(src: &Path, dst: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for name in TOKENIZER_FILES {
        let from = src.join(name);
        if from.is_file() {
            let to = dst.join(name);
            if from != to {
                std::fs::copy(&from, &to).map_err(|e| StudentError::io(&from, e))?;
            }
            out.push(to);
        }
    }
    Ok(out)
}
