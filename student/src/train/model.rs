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
use burn::tensor::activation::silu;
use burn::tensor::module::{attention, embedding, linear};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Distribution};

use super::config::LoraTarget;
use super::data::mix;
use super::lora::{LoraAdapters, LoraLayer, LoraPair};
use crate::config::ModelConfig;
use crate::model::{Attention, CausalLm, DecoderLayer, Mlp};

/// A base model plus (for LoRA runs) its adapters: the module the optimizer updates.
#[derive(Module, Debug)]
pub struct TrainModel<B: Backend> {
    /// The HF-layout model. Frozen (`no_grad`) in LoRA runs.
    pub base: CausalLm<B>,
    /// Adapters, for LoRA runs.
    pub lora: Option<LoraAdapters<B>>,
}

/// Per-forward constants: RoPE tables, compute dtype, LoRA dropout.
pub(crate) struct Fwd<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
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
        let table = |v: Vec<f32>| {
            Tensor::<B, 4>::from_data(TensorData::new(v, [1, 1, seq, hd]), (device, dtype))
        };
        Self {
            cos: table(cos),
            sin: table(sin),
            dtype,
            dropout,
            dropout_seed,
        }
    }

    fn rope(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let hd = x.dims()[3];
        let x1 = x.clone().narrow(3, 0, hd / 2);
        let x2 = x.clone().narrow(3, hd / 2, hd / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

/// Casts only when the dtype differs (a same-dtype cast would still add a graph node).
pub(crate) fn to_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

fn lin<B: Backend>(
    l: &Linear<B>,
    adapter: Option<&LoraPair<B>>,
    scale: f64,
    x: Tensor<B, 3>,
    f: &Fwd<B>,
) -> Tensor<B, 3> {
    let w = to_dtype(l.weight.val(), f.dtype);
    let b = l.bias.as_ref().map(|b| to_dtype(b.val(), f.dtype));
    let Some(p) = adapter else {
        return linear(x, w, b);
    };
    let xa = if f.dropout > 0.0 {
        let keep = 1.0 - f.dropout;
        let mask = Tensor::<B, 3>::random(x.shape(), Distribution::Bernoulli(keep), &x.device());
        let mask = to_dtype(mask, f.dtype).div_scalar(keep);
        x.clone() * mask
    } else {
        x.clone()
    };
    // Scaling the rank-r intermediate is the cheapest place for `alpha / rank`.
    let low = linear(xa, to_dtype(p.a.val(), f.dtype), None).mul_scalar(scale);
    linear(x, w, b) + linear(low, to_dtype(p.b.val(), f.dtype), None)
}

/// RMSNorm with f32 statistics, result in the compute dtype (as transformers computes it).
pub(crate) fn rms_norm<B: Backend>(n: &RmsNorm<B>, x: Tensor<B, 3>, dtype: DType) -> Tensor<B, 3> {
    let x = to_dtype(x, DType::F32);
    let rms = x.clone().square().mean_dim(2).add_scalar(n.epsilon).sqrt();
    let gamma = to_dtype(n.gamma.val(), DType::F32).unsqueeze::<3>();
    to_dtype((x / rms) * gamma, dtype)
}

fn attn<B: Backend>(
    a: &Attention<B>,
    lora: Option<&LoraLayer<B>>,
    scale: f64,
    x: Tensor<B, 3>,
    f: &Fwd<B>,
) -> Tensor<B, 3> {
    let [b, s, _] = x.dims();
    let (h, kv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
    let get = |t: LoraTarget| lora.and_then(|l| l.get(t));
    let heads = |t: Tensor<B, 3>, n: usize| t.reshape([b, s, n, hd]).swap_dims(1, 2);
    let q = f.rope(heads(
        lin(&a.q_proj, get(LoraTarget::QProj), scale, x.clone(), f),
        h,
    ));
    let k = f.rope(heads(
        lin(&a.k_proj, get(LoraTarget::KProj), scale, x.clone(), f),
        kv,
    ));
    let v = heads(lin(&a.v_proj, get(LoraTarget::VProj), scale, x, f), kv);
    let n_rep = h / kv;
    // KV head j serves query heads j·n_rep .. (j+1)·n_rep − 1 (torch.repeat_interleave order);
    // expanding lets the causal flag build the mask instead of a [n_rep·s, s] bias tensor.
    let repeat = |t: Tensor<B, 4>| {
        if n_rep == 1 {
            t
        } else {
            t.unsqueeze_dim::<5>(2)
                .expand([b, kv, n_rep, s, hd])
                .reshape([b, h, s, hd])
        }
    };
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    let ctx = attention(q, repeat(k), repeat(v), None, None, options)
        .swap_dims(1, 2)
        .reshape([b, s, h * hd]);
    lin(&a.o_proj, get(LoraTarget::OProj), scale, ctx, f)
}

fn mlp<B: Backend>(
    m: &Mlp<B>,
    lora: Option<&LoraLayer<B>>,
    scale: f64,
    x: Tensor<B, 3>,
    f: &Fwd<B>,
) -> Tensor<B, 3> {
    let get = |t: LoraTarget| lora.and_then(|l| l.get(t));
    let gate = silu(lin(
        &m.gate_proj,
        get(LoraTarget::GateProj),
        scale,
        x.clone(),
        f,
    ));
    let up = lin(&m.up_proj, get(LoraTarget::UpProj), scale, x, f);
    lin(&m.down_proj, get(LoraTarget::DownProj), scale, gate * up, f)
}

impl<B: Backend> TrainModel<B> {
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

    /// Decoder layer `i` (attention and MLP blocks with their residuals).
    pub(crate) fn layer(&self, i: usize, x: Tensor<B, 3>, f: &Fwd<B>) -> Tensor<B, 3> {
        let layer: &DecoderLayer<B> = &self.base.model.layers[i];
        let lora = self.lora.as_ref().map(|l| &l.layers[i]);
        let scale = self.lora.as_ref().map_or(0.0, |l| l.config.scale());
        if f.dropout > 0.0 && lora.is_some() {
            B::seed(&x.device(), mix(f.dropout_seed, i as u64));
        }
        let h = x.clone()
            + attn(
                &layer.self_attn,
                lora,
                scale,
                rms_norm(&layer.input_layernorm, x, f.dtype),
                f,
            );
        h.clone()
            + mlp(
                &layer.mlp,
                lora,
                scale,
                rms_norm(&layer.post_attention_layernorm, h, f.dtype),
                f,
            )
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
            x = self.layer(i, x, &f);
        }
        let h = self.final_norm(x, &f);
        let d = h.dims()[2];
        self.head(h.reshape([b * s, d]), dtype)
            .reshape([b, s, self.base.config.vocab_size])
    }

    /// The base with the adapters folded in (the base itself for full fine-tuning).
    pub fn merged(&self) -> CausalLm<B> {
        match &self.lora {
            Some(l) => l.merge_into(self.base.clone()),
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
