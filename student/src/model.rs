//! The decoder shared by Qwen2 and Llama, written against Burn so it runs on any backend.
//!
//! Struct and field names mirror transformers' module tree (`model.layers.N.self_attn.q_proj`), so a
//! Burn parameter path is the HF tensor name (up to RMSNorm's `gamma` = HF `weight`). Burn's `Linear`
//! stores its weight as `[in, out]`, the transpose of PyTorch's; `weights.rs` converts on load/save.
//!
//! RoPE is the HF "rotate-half" convention (first half of each head paired with the second half), not
//! the interleaved pairs of `burn::nn::RotaryEncoding`. Grouped-query attention reshapes the queries
//! into groups sharing one KV head instead of copying K/V, which is the `repeat_interleave` order HF
//! uses (query head `h` reads KV head `h / n_rep`) without the copy.

use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::config::ModelConfig;

/// Added to masked attention scores. Finite so fully masked rows (padding queries) stay NaN-free
/// (a NaN there would reach later layers through the padding slots' keys and values);
/// `exp(-1e30 - max)` is exactly 0, so masked keys contribute nothing. f16 cannot hold -1e30.
fn masked_value(dtype: DType) -> f32 {
    if dtype == DType::F16 { -6.0e4 } else { -1e30 }
}

/// Self-attention with RoPE, optional q/k/v/o biases and grouped-query heads.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection, `[hidden, heads * head_dim]`.
    pub q_proj: Linear<B>,
    /// Key projection, `[hidden, kv_heads * head_dim]`.
    pub k_proj: Linear<B>,
    /// Value projection, `[hidden, kv_heads * head_dim]`.
    pub v_proj: Linear<B>,
    /// Output projection, `[heads * head_dim, hidden]`.
    pub o_proj: Linear<B>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Gate projection, `[hidden, intermediate]`.
    pub gate_proj: Linear<B>,
    /// Up projection, `[hidden, intermediate]`.
    pub up_proj: Linear<B>,
    /// Down projection, `[intermediate, hidden]`.
    pub down_proj: Linear<B>,
}

/// Pre-norm transformer block.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Attention sub-block.
    pub self_attn: Attention<B>,
    /// Feed-forward sub-block.
    pub mlp: Mlp<B>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
}

/// Embedding, decoder stack and final norm (HF `model.*`).
#[derive(Module, Debug)]
pub struct DecoderModel<B: Backend> {
    /// Token embedding, `[vocab, hidden]`.
    pub embed_tokens: Embedding<B>,
    /// The decoder blocks, index = HF layer number.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final RMSNorm.
    pub norm: RmsNorm<B>,
}

/// A causal language model: [`DecoderModel`] plus the LM head (absent when tied to the embedding).
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    /// The decoder (HF prefix `model.`).
    pub model: DecoderModel<B>,
    /// Untied output projection `[hidden, vocab]`; `None` reuses `model.embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    /// The hyper-parameters it was built from (saved back as `config.json`).
    #[module(skip)]
    pub config: ModelConfig,
    /// RoPE inverse frequencies, computed once from the config.
    #[module(skip)]
    inv_freq: Vec<f32>,
}

/// Per-layer key/value tensors of a batch being decoded, with the bookkeeping for left padding.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    /// Per row: which cached slots hold real tokens (false = padding).
    valid: Vec<Vec<bool>>,
    /// Per row: the position id the next real token takes.
    next_pos: Vec<usize>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `batch` rows of a model with `num_layers` layers.
    pub fn new(num_layers: usize, batch: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            valid: vec![Vec::new(); batch],
            next_pos: vec![0; batch],
        }
    }

    /// Slots held per row (padding included).
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    /// True before the first forward.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows in the batch.
    pub fn batch_size(&self) -> usize {
        self.valid.len()
    }
}

/// Rotary position tables for one forward, already broadcastable to `[b, heads, s, head_dim]`.
struct Rope<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
}

impl<B: Backend> Rope<B> {
    /// `positions[row][i]`; rows may share one table when all are equal.
    fn new(inv_freq: &[f32], positions: &[Vec<usize>], device: &B::Device, dtype: DType) -> Self {
        let half = inv_freq.len();
        let hd = 2 * half;
        let rows = positions.len();
        let s = positions.first().map_or(0, Vec::len);
        let mut cos = Vec::with_capacity(rows * s * hd);
        let mut sin = Vec::with_capacity(rows * s * hd);
        for row in positions {
            for &p in row {
                // Same arithmetic as transformers: f32 product, then cos/sin, halves duplicated.
                let start = cos.len();
                for &f in inv_freq {
                    let angle = (p as f32 * f) as f64;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
                cos.extend_from_within(start..start + half);
                sin.extend_from_within(start..start + half);
            }
        }
        let make = |v: Vec<f32>| {
            Tensor::<B, 4>::from_data(TensorData::new(v, [rows, 1, s, hd]), (device, dtype))
        };
        Self {
            cos: make(cos),
            sin: make(sin),
        }
    }

    /// `x * cos + rotate_half(x) * sin` on `[b, heads, s, head_dim]`.
    fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let hd = x.dims()[3];
        let x1 = x.clone().narrow(3, 0, hd / 2);
        let x2 = x.clone().narrow(3, hd / 2, hd / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

impl<B: Backend> Attention<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: Option<&Tensor<B, 4>>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |t: Tensor<B, 3>, n: usize| t.reshape([b, s, n, hd]).swap_dims(1, 2);
        let q = rope.apply(heads(self.q_proj.forward(x.clone()), h));
        let mut k = rope.apply(heads(self.k_proj.forward(x.clone()), kv));
        let mut v = heads(self.v_proj.forward(x), kv);
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.take() {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        // Queries of the heads sharing a KV head become one longer "sequence" against that head:
        // grouped-query attention without materialising repeated K/V.
        let n_rep = h / kv;
        let q = q.reshape([b, kv, n_rep * s, hd]);
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        };
        let ctx = attention(q, k, v, None, mask.cloned(), options)
            .reshape([b, h, s, hd])
            .swap_dims(1, 2)
            .reshape([b, s, h * hd]);
        self.o_proj.forward(ctx)
    }
}

impl<B: Backend> Mlp<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

impl<B: Backend> DecoderLayer<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: Option<&Tensor<B, 4>>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rope, mask, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// transformers' `_init_weights` for these models: weights ~ N(0, `initializer_range`), biases
/// zero. Burn's defaults (Kaiming-uniform linears, N(0, 1) embeddings) would make a tied
/// `lm_head` emit logits with a standard deviation near √hidden, which stalls training from
/// scratch.
fn hf_normal(std: f64) -> burn::nn::Initializer {
    burn::nn::Initializer::Normal { mean: 0.0, std }
}

fn linear<B: Backend>(
    d_in: usize,
    d_out: usize,
    bias: bool,
    std: f64,
    device: &B::Device,
) -> Linear<B> {
    let mut l = LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_initializer(hf_normal(std))
        .init(device);
    l.bias = l
        .bias
        .map(|_| burn::module::Param::from_tensor(Tensor::zeros([d_out], device)));
    l
}

impl<B: Backend> CausalLm<B> {
    /// A randomly initialised model, f32, initialised as transformers does (normal weights with
    /// the config's `initializer_range`, default 0.02; zero biases; unit norms). For training from
    /// scratch, benchmarks and tests; real weights come from [`crate::weights::load_model`].
    pub fn init(config: &ModelConfig, device: &B::Device) -> Self {
        let c = config;
        let std = c
            .raw
            .get("initializer_range")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.02);
        let linear = |d_in, d_out, bias, device| linear(d_in, d_out, bias, std, device);
        let (d, q, kvd) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let norm = || {
            RmsNormConfig::new(d)
                .with_epsilon(c.rms_norm_eps)
                .init(device)
        };
        let layers = (0..c.num_hidden_layers)
            .map(|_| DecoderLayer {
                self_attn: Attention {
                    q_proj: linear(d, q, c.qkv_bias, device),
                    k_proj: linear(d, kvd, c.qkv_bias, device),
                    v_proj: linear(d, kvd, c.qkv_bias, device),
                    o_proj: linear(q, d, c.o_bias, device),
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                },
                mlp: Mlp {
                    gate_proj: linear(d, c.intermediate_size, c.mlp_bias, device),
                    up_proj: linear(d, c.intermediate_size, c.mlp_bias, device),
                    down_proj: linear(c.intermediate_size, d, c.mlp_bias, device),
                },
                input_layernorm: norm(),
                post_attention_layernorm: norm(),
            })
            .collect();
        let model = DecoderModel {
            embed_tokens: EmbeddingConfig::new(c.vocab_size, d)
                .with_initializer(hf_normal(std))
                .init(device),
            layers,
            norm: norm(),
        };
        let lm_head = (!c.tie_word_embeddings).then(|| linear(d, c.vocab_size, false, device));
        Self::from_parts(model, lm_head, config.clone())
    }

    /// Assembles a model from already-built parts (used by the weight loader).
    pub fn from_parts(
        model: DecoderModel<B>,
        lm_head: Option<Linear<B>>,
        config: ModelConfig,
    ) -> Self {
        let inv_freq = config.rope_inv_freq();
        Self {
            model,
            lm_head,
            config,
            inv_freq,
        }
    }

    /// The float dtype the parameters are stored in.
    pub fn dtype(&self) -> DType {
        self.model.embed_tokens.weight.val().dtype()
    }

    /// The device the parameters live on.
    pub fn device(&self) -> B::Device {
        self.model.embed_tokens.weight.val().device()
    }

    /// Logits `[b, s, vocab]` for every position of unpadded sequences (training, scoring).
    /// Right padding is harmless here: causal attention never lets real tokens see later pads.
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.logits(self.forward_hidden(input_ids))
    }

    /// Final-norm hidden states `[b, s, hidden]`, so a trainer can pick target rows before the head.
    pub fn forward_hidden(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [_, s] = input_ids.dims();
        let device = input_ids.device();
        let positions = vec![(0..s).collect::<Vec<_>>()];
        let rope = Rope::new(&self.inv_freq, &positions, &device, self.dtype());
        let mask = (s > 1)
            .then(|| causal_mask::<B>(&[vec![true; s]], 0, s, self.n_rep(), &device, self.dtype()));
        let mut x = self.model.embed_tokens.forward(input_ids);
        for layer in &self.model.layers {
            x = layer.forward(x, &rope, mask.as_ref(), None);
        }
        self.model.norm.forward(x)
    }

    /// Applies the LM head (or the tied embedding) to hidden states of any rank.
    pub fn logits<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => burn::tensor::module::linear(
                hidden,
                self.model.embed_tokens.weight.val().transpose(),
                None,
            ),
        }
    }

    /// Runs `input_ids` `[b, s]` after what `cache` holds and appends to it; returns the final-norm
    /// hidden states `[b, s, hidden]`. `valid[row][i] == false` marks padding (left padding for
    /// batched prompts of different lengths): padding gets no position id and no attention.
    pub fn forward_cached_hidden(
        &self,
        input_ids: Tensor<B, 2, Int>,
        valid: Option<&[Vec<bool>]>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let [b, s] = input_ids.dims();
        assert_eq!(b, cache.batch_size(), "batch size differs from the cache's");
        let device = input_ids.device();
        let all_valid = vec![vec![true; s]; b];
        let valid = valid.unwrap_or(&all_valid);
        assert!(
            valid.len() == b && valid.iter().all(|r| r.len() == s),
            "`valid` must be [batch][seq] like input_ids"
        );
        let past = cache.len();
        let mut positions = Vec::with_capacity(b);
        for (row, row_valid) in valid.iter().enumerate() {
            let mut p = Vec::with_capacity(s);
            for &ok in row_valid {
                p.push(cache.next_pos[row]);
                if ok {
                    cache.next_pos[row] += 1;
                }
            }
            positions.push(p);
            cache.valid[row].extend_from_slice(row_valid);
        }
        let padded = cache.valid.iter().any(|r| r.iter().any(|&ok| !ok));
        let shared = positions.iter().all(|p| *p == positions[0]);
        let rope = if shared {
            Rope::new(&self.inv_freq, &positions[..1], &device, self.dtype())
        } else {
            Rope::new(&self.inv_freq, &positions, &device, self.dtype())
        };
        let mask = if padded {
            Some(causal_mask::<B>(
                &cache.valid,
                past,
                s,
                self.n_rep(),
                &device,
                self.dtype(),
            ))
        } else if s > 1 {
            Some(causal_mask::<B>(
                &cache.valid[..1],
                past,
                s,
                self.n_rep(),
                &device,
                self.dtype(),
            ))
        } else {
            None
        };
        let mut x = self.model.embed_tokens.forward(input_ids);
        for (layer, slot) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(x, &rope, mask.as_ref(), Some(slot));
        }
        self.model.norm.forward(x)
    }

    /// [`Self::forward_cached_hidden`] followed by the head: logits `[b, s, vocab]`.
    pub fn forward_cached(
        &self,
        input_ids: Tensor<B, 2, Int>,
        valid: Option<&[Vec<bool>]>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        self.logits(self.forward_cached_hidden(input_ids, valid, cache))
    }

    /// Like [`Self::forward_cached`] but only the last position's logits `[b, vocab]`: what decoding needs,
    /// without projecting every prompt position onto the vocabulary.
    pub fn forward_cached_last(
        &self,
        input_ids: Tensor<B, 2, Int>,
        valid: Option<&[Vec<bool>]>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 2> {
        let hidden = self.forward_cached_hidden(input_ids, valid, cache);
        let [b, s, d] = hidden.dims();
        self.logits(hidden.narrow(1, s - 1, 1).reshape([b, d]))
    }

    fn n_rep(&self) -> usize {
        self.config.num_attention_heads / self.config.num_key_value_heads
    }

    /// An empty KV cache sized for this model.
    pub fn new_cache(&self, batch: usize) -> KvCache<B> {
        KvCache::new(self.model.layers.len(), batch)
    }
}

/// Additive attention bias `[rows, 1, n_rep * s, past + s]` (rows repeated for each query head
/// sharing a KV head): query `i` (slot `past + i`) sees valid slots `<= past + i`.
fn causal_mask<B: Backend>(
    valid: &[Vec<bool>],
    past: usize,
    s: usize,
    n_rep: usize,
    device: &B::Device,
    dtype: DType,
) -> Tensor<B, 4> {
    let t = past + s;
    let masked = masked_value(dtype);
    let mut m = Vec::with_capacity(valid.len() * n_rep * s * t);
    for row in valid {
        let start = m.len();
        for i in 0..s {
            for (j, &ok) in row.iter().enumerate().take(t) {
                m.push(if ok && j <= past + i { 0.0 } else { masked });
            }
        }
        for _ in 1..n_rep {
            m.extend_from_within(start..start + s * t);
        }
    }
    Tensor::from_data(
        TensorData::new(m, [valid.len(), 1, n_rep * s, t]),
        (device, dtype),
    )
}
