//! The trainable model and the training forward pass.
//!
//! The forward is written here rather than reusing `CausalLm::forward` because training needs
//! three things inference does not: a compute dtype that differs from the stored (master) dtype,
//! LoRA branches `x·W + s·(x·A)·B` beside the frozen base, and a per-layer entry point for
//! activation recomputation. It follows the same HF arithmetic (rotate-half RoPE, GQA in
//! `repeat_interleave` order, RMSNorm statistics in f32, SwiGLU); a test checks it against
//! `CausalLm::forward`.

use burn::module::Param;
use burn::nn::{Linear, RmsNorm};
use burn::prelude::*;
use burn::tensor::module::embedding;
use burn::tensor::{DType, Distribution};

use super::config::LoraTarget;
use super::data::mix;
use super::lora::{LoraAdapters, LoraLayer, LoraPair, target_index};
use super::qlora::{QuantLayer, dequantize_base};
use crate::config::ModelConfig;
use crate::kernels::{self, Kernels, linear};
use crate::model::{Attention, CausalLm, DecoderLayer, Mlp};
use crate::quant::{Nf4Weight, QuantOps};

/// A base model plus (for LoRA runs) its adapters: the module the optimizer updates.
#[derive(Module, Debug)]
pub struct TrainModel<B: Backend> {
    /// The HF-layout model. Frozen (`no_grad`) in LoRA runs.
    pub base: CausalLm<B>,
    /// Adapters, for LoRA runs.
    pub lora: Option<LoraAdapters<B>>,
    /// QLoRA: the NF4 form of every decoder linear weight, one entry per layer (the dense
    /// weights in `base` are then empty placeholders). Empty otherwise.
    pub quant: Vec<QuantLayer<B>>,
}

/// Per-forward constants: RoPE tables, compute dtype, LoRA dropout.
pub(crate) struct Fwd<B: Backend> {
    /// `[seq, head_dim]`.
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    pub dtype: DType,
    dropout: f64,
    dropout_seed: u64,
}

impl<B: Backend> Fwd<B> {
    /// Tables for positions `0..seq` in `dtype`; `dropout` applies to LoRA inputs, its masks
    /// drawn from the backend RNG reseeded per layer with `(dropout_seed, layer)`, so the
    /// recomputation pass redraws exactly the masks of the first pass.
    pub fn new(
        config: &ModelConfig,
        seq: usize,
        dtype: DType,
        dropout: f64,
        dropout_seed: u64,
        device: &B::Device,
    ) -> Self {
        let inv_freq = config.rope_inv_freq();
        let half = inv_freq.len();
        let hd = 2 * half;
        let mut cos = Vec::with_capacity(seq * hd);
        let mut sin = Vec::with_capacity(seq * hd);
        for p in 0..seq {
            let start = cos.len();
            for &f in &inv_freq {
                // transformers' arithmetic: f32 product, then cos/sin.
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
            cos.extend_from_within(start..start + half);
            sin.extend_from_within(start..start + half);
        }
        let table =
            |v: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(v, [seq, hd]), (device, dtype));
        Self {
            cos: table(cos),
            sin: table(sin),
            dtype,
            dropout,
            dropout_seed,
        }
    }
}

impl<B: Kernels> Fwd<B> {
    /// The rotary embedding of `x [b, s, heads, hd]`.
    fn rope(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        kernels::rope(x, self.cos.clone(), self.sin.clone())
    }
}

/// Casts only when the dtype differs (a same-dtype cast would still add a graph node).
pub(crate) fn to_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

/// `x·W + b`, plus `scale·(dropout(x)·A)·B` when an adapter is given. Dropout masks come from
/// the backend RNG reseeded with `seed` (one per layer and module), so any evaluation order —
/// the no-grad pass, the recomputed layer, its staged halves — draws the same masks.
/// Rows of all sequences go through one 2D product: Burn multiplies a `[b, s, d]` input by a
/// broadcast weight as `b` separate products and sums `b` weight gradients afterwards, while
/// `[b·s, d]` is one product each way (and one weight gradient), split across threads by gemm.
fn lin<B: QuantOps>(
    l: &Linear<B>,
    quant: Option<&Nf4Weight<B>>,
    adapter: Option<&LoraPair<B>>,
    scale: f64,
    x: Tensor<B, 3>,
    f: &Fwd<B>,
    seed: u64,
) -> Tensor<B, 3> {
    let [rows, seq, d] = x.dims();
    let x = x.reshape([rows * seq, d]);
    let b = l.bias.as_ref().map(|b| to_dtype(b.val(), f.dtype));
    let base = |x: Tensor<B, 2>| match quant {
        Some(q) => {
            let y = q.matmul(x);
            match b {
                Some(b) => y + b.unsqueeze(),
                None => y,
            }
        }
        None => linear(x, to_dtype(l.weight.val(), f.dtype), b),
    };
    let y = match adapter {
        None => base(x),
        Some(p) => {
            let xa = if f.dropout > 0.0 {
                B::seed(&x.device(), seed);
                let keep = 1.0 - f.dropout;
                let mask =
                    Tensor::<B, 2>::random(x.shape(), Distribution::Bernoulli(keep), &x.device());
                let mask = to_dtype(mask, f.dtype).div_scalar(keep);
                x.clone() * mask
            } else {
                x.clone()
            };
            // Scaling the rank-r intermediate is the cheapest place for `alpha / rank`.
            let low = linear(xa, to_dtype(p.a.val(), f.dtype), None).mul_scalar(scale);
            base(x) + linear(low, to_dtype(p.b.val(), f.dtype), None)
        }
    };
    let out = y.dims()[1];
    y.reshape([rows, seq, out])
}

/// RMSNorm with f32 statistics, result in the compute dtype (as transformers computes it).
pub(crate) fn rms_norm<B: Kernels>(n: &RmsNorm<B>, x: Tensor<B, 3>, dtype: DType) -> Tensor<B, 3> {
    let x = to_dtype(x, DType::F32);
    let gamma = to_dtype(n.gamma.val(), DType::F32);
    to_dtype(kernels::rms_norm(x, gamma, n.epsilon), dtype)
}

/// What one layer's linear layers need besides their weights: adapters, scale, dropout seeds.
struct LayerCtx<'a, B: Backend> {
    lora: Option<&'a LoraLayer<B>>,
    quant: Option<&'a QuantLayer<B>>,
    scale: f64,
    seed: u64,
}

impl<B: QuantOps> LayerCtx<'_, B> {
    fn lin(&self, l: &Linear<B>, t: LoraTarget, x: Tensor<B, 3>, f: &Fwd<B>) -> Tensor<B, 3> {
        let adapter = self.lora.and_then(|a| a.get(t));
        lin(
            l,
            self.quant.map(|q| q.get(t)),
            adapter,
            self.scale,
            x,
            f,
            mix(self.seed, target_index(t)),
        )
    }
}

/// Causal attention of `q` over `k`, `v` (all `[b, h, s, hd]`), in query chunks of `chunk` rows
/// when given: chunk `[a, a + c)` sees keys `[0, a + c)` (Burn aligns the causal mask
/// bottom-right), so each chunk's scores are `[b, h, c, a + c]` instead of `[b, h, s, s]`.
pub(crate) fn causal_attention<B: QuantOps>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    chunk: Option<usize>,
) -> Tensor<B, 4> {
    let s = q.dims()[2];
    match chunk {
        Some(c) if c < s => {
            let parts = (0..s)
                .step_by(c)
                .map(|a| {
                    let n = c.min(s - a);
                    kernels::causal_attention(
                        q.clone().narrow(2, a, n),
                        k.clone().narrow(2, 0, a + n),
                        v.clone().narrow(2, 0, a + n),
                    )
                })
                .collect();
            Tensor::cat(parts, 2)
        }
        _ => kernels::causal_attention(q, k, v),
    }
}

impl<B: QuantOps> TrainModel<B> {
    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.base.model.layers.len()
    }

    /// Token embeddings `[b, s, hidden]` in the compute dtype.
    pub(crate) fn embed(&self, ids: Tensor<B, 2, Int>, f: &Fwd<B>) -> Tensor<B, 3> {
        to_dtype(
            embedding(self.base.model.embed_tokens.weight.val(), ids),
            f.dtype,
        )
    }

    fn layer_ctx(&self, i: usize, f: &Fwd<B>) -> LayerCtx<'_, B> {
        LayerCtx {
            lora: self.lora.as_ref().map(|l| &l.layers[i]),
            quant: self.quant.get(i),
            scale: self.lora.as_ref().map_or(0.0, |l| l.config.scale()),
            seed: mix(f.dropout_seed, i as u64),
        }
    }

    /// Layer `i`'s attention inputs: queries `[b, heads, s, hd]` and keys and values
    /// `[b, kv_heads, s, hd]`, RoPE applied (KV head j serves query heads j·n_rep .., as
    /// `repeat_interleave` orders them; see [`kernels::repeat_kv`]).
    pub(crate) fn attn_inputs(
        &self,
        i: usize,
        x: Tensor<B, 3>,
        f: &Fwd<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let layer: &DecoderLayer<B> = &self.base.model.layers[i];
        let lc = self.layer_ctx(i, f);
        let a: &Attention<B> = &layer.self_attn;
        let x = rms_norm(&layer.input_layernorm, x, f.dtype);
        let [b, s, _] = x.dims();
        let (h, kv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        // RoPE on `[b, s, heads, hd]` (the projection's own layout), then heads to dim 1.
        let split = |t: Tensor<B, 3>, n: usize| t.reshape([b, s, n, hd]);
        let q = f
            .rope(split(lc.lin(&a.q_proj, LoraTarget::QProj, x.clone(), f), h))
            .swap_dims(1, 2);
        let k = f
            .rope(split(
                lc.lin(&a.k_proj, LoraTarget::KProj, x.clone(), f),
                kv,
            ))
            .swap_dims(1, 2);
        let v = split(lc.lin(&a.v_proj, LoraTarget::VProj, x, f), kv).swap_dims(1, 2);
        // Key/value heads stay unrepeated: attention reads each group's shared head.
        (q, k, v)
    }

    /// Layer `i` after attention: o_proj of the context `[b, heads, s, hd]`, the residual to
    /// the layer input `x`, and the MLP block.
    pub(crate) fn layer_post(
        &self,
        i: usize,
        x: Tensor<B, 3>,
        ctx: Tensor<B, 4>,
        f: &Fwd<B>,
    ) -> Tensor<B, 3> {
        let layer: &DecoderLayer<B> = &self.base.model.layers[i];
        let lc = self.layer_ctx(i, f);
        let [b, h, s, hd] = ctx.dims();
        let ctx = ctx.swap_dims(1, 2).reshape([b, s, h * hd]);
        let h1 = x + lc.lin(&layer.self_attn.o_proj, LoraTarget::OProj, ctx, f);
        let m: &Mlp<B> = &layer.mlp;
        let xn = rms_norm(&layer.post_attention_layernorm, h1.clone(), f.dtype);
        let gate = lc.lin(&m.gate_proj, LoraTarget::GateProj, xn.clone(), f);
        let up = lc.lin(&m.up_proj, LoraTarget::UpProj, xn, f);
        let act = kernels::swiglu(gate, up);
        h1 + lc.lin(&m.down_proj, LoraTarget::DownProj, act, f)
    }

    /// Decoder layer `i`; `chunk` splits attention into query chunks (see [`causal_attention`]).
    pub(crate) fn layer(
        &self,
        i: usize,
        x: Tensor<B, 3>,
        f: &Fwd<B>,
        chunk: Option<usize>,
    ) -> Tensor<B, 3> {
        let (q, k, v) = self.attn_inputs(i, x.clone(), f);
        self.layer_post(i, x, causal_attention(q, k, v, chunk), f)
    }

    /// Final norm of the last layer's output.
    pub(crate) fn final_norm(&self, x: Tensor<B, 3>, f: &Fwd<B>) -> Tensor<B, 3> {
        rms_norm(&self.base.model.norm, x, f.dtype)
    }

    /// f32 logits `[rows, vocab]` of hidden rows `[rows, hidden]` (the head runs in the compute
    /// dtype; the loss always sees f32).
    pub(crate) fn head(&self, h: Tensor<B, 2>, dtype: DType) -> Tensor<B, 2> {
        let w = match &self.base.lm_head {
            Some(head) => head.weight.val(),
            None => self.base.model.embed_tokens.weight.val().transpose(),
        };
        to_dtype(linear(h, to_dtype(w, dtype), None), DType::F32)
    }

    /// f32 logits `[b, s, vocab]` of the training forward (no dropout): for checks and scoring.
    pub fn logits(&self, ids: Tensor<B, 2, Int>, dtype: DType) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let f = Fwd::new(&self.base.config, s, dtype, 0.0, 0, &ids.device());
        let mut x = self.embed(ids, &f);
        for i in 0..self.num_layers() {
            x = self.layer(i, x, &f, None);
        }
        let h = self.final_norm(x, &f);
        let d = h.dims()[2];
        self.head(h.reshape([b * s, d]), dtype)
            .reshape([b, s, self.base.config.vocab_size])
    }
}

impl<B: Backend> TrainModel<B> {
    /// The base the forward computes with: a QLoRA base dequantized (in the dtype of the
    /// embeddings), any other base as it is.
    pub fn effective_base(&self) -> CausalLm<B> {
        if self.quant.is_empty() {
            return self.base.clone();
        }
        let dtype = self.base.model.embed_tokens.weight.val().dtype();
        dequantize_base(self.base.clone(), &self.quant, dtype)
    }

    /// The base with the adapters folded in (the base itself for full fine-tuning); a QLoRA
    /// run's adapters go into its dequantized base, the function it trained.
    pub fn merged(&self) -> CausalLm<B> {
        match &self.lora {
            Some(l) => l.merge_into(self.effective_base()),
            None => self.base.clone(),
        }
    }
}

/// Gives every parameter a fixed id (its visiting index), so a model rebuilt from a checkpoint
/// has the ids the saved optimizer state is keyed by.
pub(crate) struct SequentialIds {
    pub next: u64,
}

impl<B: Backend> burn::module::ModuleMapper<B> for SequentialIds {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (_, tensor, mapper) = param.consume();
        let id = burn::module::ParamId::from(self.next);
        self.next += 1;
        Param::from_mapped_value(id, tensor, mapper)
    }
}
