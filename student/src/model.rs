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

/// Which keys each query may attend to.
enum Mask<B: Backend> {
    /// Added to the scores ([`masked_value`] where hidden): safe for fully masked rows.
    Bias(Tensor<B, 4>),
    /// True where hidden. Only for rows that always see at least one key (decoding), where it
    /// tells the backend exactly which keys need no work: Flex skips a slot's unwritten tail.
    Hide(Tensor<B, 4, Bool>),
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

/// Keys and values of up to `slots` sequences, each with room for `max_len` positions, allocated
/// once: what continuous batching decodes with. A slot is reused by writing over it; positions
/// past a sequence's length get no attention weight (the mask), so nothing is cleared.
#[derive(Debug)]
pub struct SlotCache<B: Backend> {
    /// Per layer `[slots, kv_heads, max_len, head_dim]` keys and values (taken out while a
    /// layer writes to them).
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    /// RoPE cos/sin for every position `< max_len`, `[1, 1, max_len, head_dim]`.
    rope: Rope<B>,
    slots: usize,
    max_len: usize,
}

impl<B: Backend> SlotCache<B> {
    /// Keeps only the slots `keep` (in that order, renumbered from 0): a batch whose queue ran
    /// dry stops computing rows for finished sequences.
    pub fn retain(&mut self, keep: &[usize]) {
        assert!(!keep.is_empty() && keep.iter().all(|&s| s < self.slots));
        let device = self.rope.cos.device();
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(
                keep.iter().map(|&s| s as i64).collect::<Vec<_>>(),
                [keep.len()],
            ),
            &device,
        );
        for layer in self.layers.iter_mut() {
            let (k, v) = layer.take().expect("slot cache layer present");
            *layer = Some((k.select(0, idx.clone()), v.select(0, idx.clone())));
        }
        self.slots = keep.len();
    }

    /// Sequences it holds at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Positions each slot has room for (prompt and generated tokens).
    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

/// Rotary position tables for one forward, already broadcastable to `[b, heads, s, head_dim]`.
#[derive(Debug, Clone)]
struct Rope<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
}

/// cos and sin of every position in `positions`, each `[positions, head_dim]` flattened.
/// Same arithmetic as transformers: f32 product, then cos/sin, halves duplicated.
fn rope_values(inv_freq: &[f32], positions: impl Iterator<Item = usize>) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in positions {
        let start = cos.len();
        for &f in inv_freq {
            let angle = (p as f32 * f) as f64;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
        cos.extend_from_within(start..start + half);
        sin.extend_from_within(start..start + half);
    }
    (cos, sin)
}

impl<B: Backend> Rope<B> {
    /// `positions[row][i]`; rows may share one table when all are equal.
    fn new(inv_freq: &[f32], positions: &[Vec<usize>], device: &B::Device, dtype: DType) -> Self {
        let hd = 2 * inv_freq.len();
        let rows = positions.len();
        let s = positions.first().map_or(0, Vec::len);
        let (cos, sin) = rope_values(inv_freq, positions.iter().flatten().copied());
        let make = |v: Vec<f32>| {
            Tensor::<B, 4>::from_data(TensorData::new(v, [rows, 1, s, hd]), (device, dtype))
        };
        Self {
            cos: make(cos),
            sin: make(sin),
        }
    }

    /// Positions `start..start + s` of a table `[max_len, head_dim]`, for one row.
    fn span(table: &Rope<B>, start: usize, s: usize) -> Self {
        let take = |t: &Tensor<B, 4>| t.clone().narrow(2, start, s);
        Self {
            cos: take(&table.cos),
            sin: take(&table.sin),
        }
    }

    /// One position per row (`positions[row]`) of a table, for one decoding step.
    fn rows(table: &Rope<B>, positions: &[usize]) -> Self {
        let device = table.cos.device();
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(
                positions.iter().map(|&p| p as i64).collect::<Vec<_>>(),
                [positions.len()],
            ),
            &device,
        );
        let take = |t: &Tensor<B, 4>| {
            let [_, _, _, hd] = t.dims();
            t.clone()
                .select(2, idx.clone())
                .reshape([positions.len(), 1, 1, hd])
        };
        Self {
            cos: take(&table.cos),
            sin: take(&table.sin),
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

/// Where one layer's keys and values go and where attention reads them from.
enum Kv<'a, B: Backend> {
    /// Nothing cached: attention over this call's tokens only (training, scoring).
    Fresh,
    /// A [`KvCache`] layer that grows by concatenation.
    Concat(&'a mut Option<(Tensor<B, 4>, Tensor<B, 4>)>),
    /// A [`SlotCache`] layer: this call's keys and values are written in place at `at`, then
    /// attention reads the slots' first `at.read_len` positions.
    Slots {
        layer: &'a mut Option<(Tensor<B, 4>, Tensor<B, 4>)>,
        at: &'a SlotWrite,
    },
}

/// How a call into a [`SlotCache`] writes and reads it.
enum SlotWrite {
    /// Prefill: the call's `s` tokens are one sequence, written to `slot` at positions
    /// `start..start + s`; attention reads that slot's first `start + s` positions.
    Prefill { slot: usize, start: usize },
    /// Decoding: row `i` is slot `i`, its token written at `positions[i]` (nothing for a free
    /// slot); attention is given every slot's whole length, a boolean mask hiding what a row has
    /// not reached, so the cache is read as it is stored (on Flex a length prefix of the slots
    /// would be a strided copy). Flex's attention skips each slot's hidden tail itself.
    Decode { positions: Vec<Option<usize>> },
}

impl<B: Backend> Attention<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: Option<&Mask<B>>,
        kv_store: Kv<'_, B>,
    ) -> Tensor<B, 3> {
        let x_dims = x.dims();
        // A decoding step arrives as `[1, slots, hidden]`, one token per slot laid out as a
        // sequence, so every projection is one matrix product (Flex runs `[slots, 1, hidden]`
        // as `slots` separate ones); attention then treats each slot as its own sequence.
        let (b, s) = match &kv_store {
            Kv::Slots {
                at: SlotWrite::Decode { .. },
                ..
            } => (x_dims[1], 1),
            _ => (x_dims[0], x_dims[1]),
        };
        let (h, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // One token per row is already `[b, n, 1, hd]` in memory: reshape, not a strided view.
        let heads = |t: Tensor<B, 3>, n: usize| match s {
            1 => t.reshape([b, n, 1, hd]),
            _ => t.reshape([b, s, n, hd]).swap_dims(1, 2),
        };
        let q = rope.apply(heads(self.q_proj.forward(x.clone()), h));
        let mut k = rope.apply(heads(self.k_proj.forward(x.clone()), kv));
        let mut v = heads(self.v_proj.forward(x), kv);
        match kv_store {
            Kv::Fresh => {}
            Kv::Concat(slot) => {
                if let Some((pk, pv)) = slot.take() {
                    k = Tensor::cat(vec![pk, k], 2);
                    v = Tensor::cat(vec![pv, v], 2);
                }
                *slot = Some((k.clone(), v.clone()));
            }
            Kv::Slots { layer, at } => {
                let (ck, cv) = layer.take().expect("slot cache layer present");
                let (ck, cv) = match at {
                    SlotWrite::Prefill { slot, start } => {
                        let ranges = [*slot..slot + 1, 0..kv, *start..start + s, 0..hd];
                        let ck = ck.slice_assign(ranges.clone(), k);
                        let cv = cv.slice_assign(ranges, v);
                        let read = |t: &Tensor<B, 4>| {
                            t.clone().narrow(0, *slot, 1).narrow(2, 0, start + s)
                        };
                        k = read(&ck);
                        v = read(&cv);
                        (ck, cv)
                    }
                    SlotWrite::Decode { positions } => {
                        // One in-place write per row (the slots sit at different positions).
                        let (mut ck, mut cv) = (ck, cv);
                        for (i, p) in positions.iter().enumerate() {
                            if let Some(p) = *p {
                                let ranges = [i..i + 1, 0..kv, p..p + 1, 0..hd];
                                ck = ck.slice_assign(ranges.clone(), k.clone().narrow(0, i, 1));
                                cv = cv.slice_assign(ranges, v.clone().narrow(0, i, 1));
                            }
                        }
                        k = ck.clone();
                        v = cv.clone();
                        (ck, cv)
                    }
                };
                *layer = Some((ck, cv));
            }
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
        let (hide, bias) = match mask {
            Some(Mask::Hide(m)) => (Some(m.clone()), None),
            Some(Mask::Bias(m)) => (None, Some(m.clone())),
            None => (None, None),
        };
        let ctx = attention(q, k, v, hide, bias, options)
            .reshape([b, h, s, hd])
            .swap_dims(1, 2)
            .reshape([x_dims[0], x_dims[1], h * hd]);
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
        mask: Option<&Mask<B>>,
        kv: Kv<'_, B>,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rope, mask, kv);
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
        Self::init_with(config, device, |layer| layer)
    }

    /// [`Self::init`], passing each decoder layer through `each_layer` as soon as it is made,
    /// so a caller that shrinks layers (QLoRA quantizes them) never holds the dense model.
    pub fn init_with(
        config: &ModelConfig,
        device: &B::Device,
        mut each_layer: impl FnMut(DecoderLayer<B>) -> DecoderLayer<B>,
    ) -> Self {
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
            .map(&mut each_layer)
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
            x = layer.forward(x, &rope, mask.as_ref(), Kv::Fresh);
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
            x = layer.forward(x, &rope, mask.as_ref(), Kv::Concat(slot));
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

    /// A [`SlotCache`] for `slots` sequences of up to `max_len` positions, in the model's dtype.
    pub fn new_slot_cache(&self, slots: usize, max_len: usize) -> SlotCache<B> {
        let c = &self.config;
        let device = self.device();
        let shape = [slots, c.num_key_value_heads, max_len, c.head_dim];
        let layers = (0..self.model.layers.len())
            .map(|_| {
                let zeros = || Tensor::<B, 4>::zeros(shape, (&device, self.dtype()));
                Some((zeros(), zeros()))
            })
            .collect();
        let (cos, sin) = rope_values(&self.inv_freq, 0..max_len);
        let make = |v: Vec<f32>| {
            Tensor::<B, 4>::from_data(
                TensorData::new(v, [1, 1, max_len, c.head_dim]),
                (&device, self.dtype()),
            )
        };
        SlotCache {
            layers,
            rope: Rope {
                cos: make(cos),
                sin: make(sin),
            },
            slots,
            max_len,
        }
    }

    /// Bytes a [`SlotCache`] takes per slot and position (keys and values of every layer).
    pub fn slot_cache_bytes_per_token(&self) -> usize {
        let c = &self.config;
        2 * self.model.layers.len() * c.num_key_value_heads * c.head_dim * self.dtype().size()
    }

    /// Prefills `tokens` of the sequence in `slot`, whose first `start` positions are already
    /// cached, and returns the last token's logits
    /// `[1, vocab]`. Long prompts go in chunks.
    pub fn forward_slot_prefill(
        &self,
        slot: usize,
        tokens: &[u32],
        start: usize,
        cache: &mut SlotCache<B>,
    ) -> Tensor<B, 2> {
        let s = tokens.len();
        assert!(s > 0, "nothing to prefill");
        assert!(slot < cache.slots, "slot {slot} out of {}", cache.slots);
        assert!(start + s <= cache.max_len, "prefill past the slot's length");
        let device = self.device();
        let total = start + s;
        let at = SlotWrite::Prefill { slot, start };
        let rope = Rope::span(&cache.rope, start, s);
        // Query `i` (position `start + i`) sees positions `<= start + i`; built on the device so a
        // long context's `[s, total]` bias is never uploaded.
        let mask = (s > 1).then(|| {
            let rows = Tensor::<B, 1, Int>::arange(start as i64..total as i64, &device)
                .reshape([s, 1])
                .expand([s, total]);
            let cols = Tensor::<B, 1, Int>::arange(0..total as i64, &device)
                .reshape([1, total])
                .expand([s, total]);
            let bias = Tensor::<B, 2>::zeros([s, total], (&device, self.dtype()))
                .mask_fill(cols.greater(rows), masked_value(self.dtype()));
            let n_rep = self.n_rep();
            Mask::Bias(
                bias.reshape([1, 1, s, total])
                    .expand([n_rep, 1, s, total])
                    .reshape([1, 1, n_rep * s, total]),
            )
        });
        let x = self.forward_slots(tokens, &rope, mask.as_ref(), &at, cache);
        let [_, _, d] = x.dims();
        self.logits(
            self.model
                .norm
                .forward(x.narrow(1, s - 1, 1))
                .reshape([1, d]),
        )
    }

    /// Embeds `tokens` as one row `[1, len]` and runs every layer over `cache` as `at` says;
    /// returns the hidden states before the final norm.
    fn forward_slots(
        &self,
        tokens: &[u32],
        rope: &Rope<B>,
        mask: Option<&Mask<B>>,
        at: &SlotWrite,
        cache: &mut SlotCache<B>,
    ) -> Tensor<B, 3> {
        let input = Tensor::<B, 2, Int>::from_data(
            TensorData::new(
                tokens.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                [1, tokens.len()],
            ),
            &self.device(),
        );
        let mut x = self.model.embed_tokens.forward(input);
        for (layer, slot) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(x, rope, mask, Kv::Slots { layer: slot, at });
        }
        x
    }

    /// One decoding step of every slot: a slot holding a sequence (`positions[i] = Some(p)`, its
    /// cached length) feeds `tokens[i]` at position `p`; a free slot (`None`) computes a row
    /// that is ignored and writes nothing. Returns next-token logits `[slots, vocab]`.
    pub fn forward_slots_decode(
        &self,
        tokens: &[u32],
        positions: &[Option<usize>],
        cache: &mut SlotCache<B>,
    ) -> Tensor<B, 2> {
        let n = cache.slots;
        let max_len = cache.max_len;
        assert!(
            tokens.len() == n && positions.len() == n,
            "one token and position per slot"
        );
        assert!(
            positions.iter().flatten().all(|&p| p < max_len),
            "decoding past the slots' length"
        );
        let device = self.device();
        let at_pos: Vec<usize> = positions.iter().map(|p| p.unwrap_or(0)).collect();
        let rope = Rope::rows(&cache.rope, &at_pos);
        let int = |v: Vec<i64>| {
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), &device)
                .reshape([n, 1])
                .expand([n, max_len])
        };
        let cols = Tensor::<B, 1, Int>::arange(0..max_len as i64, &device)
            .reshape([1, max_len])
            .expand([n, max_len]);
        // Each row attends to its cached positions and the new one, so no row is fully masked
        // and a boolean mask is safe (a free slot reads position 0).
        let n_rep = self.n_rep();
        let seen = int(at_pos.iter().map(|&p| p as i64).collect());
        let mask = Mask::Hide(
            cols.greater(seen)
                .reshape([n, 1, 1, max_len])
                .expand([n, 1, n_rep, max_len]),
        );
        let at = SlotWrite::Decode {
            positions: positions.to_vec(),
        };
        // `[1, slots]`: the slots' tokens side by side (see `Attention::forward`).
        let x = self.forward_slots(tokens, &rope, Some(&mask), &at, cache);
        let [_, _, d] = x.dims();
        self.logits(self.model.norm.forward(x).reshape([n, d]))
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
) -> Mask<B> {
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
    Mask::Bias(Tensor::from_data(
        TensorData::new(m, [valid.len(), 1, n_rep * s, t]),
        (device, dtype),
    ))
}
