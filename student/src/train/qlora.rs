//! QLoRA's frozen base: every decoder linear weight replaced by its NF4 form ([`crate::quant`]).
//!
//! The dense weights leave the model (a `[0, 0]` placeholder keeps each parameter's id and
//! name, so checkpoints and optimizer records line up with a plain LoRA run's); biases, norms,
//! embeddings and the LM head stay as they were.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::DType;

use super::config::LoraTarget;
use super::lora::target_linear_mut;
use crate::model::{CausalLm, DecoderLayer};
use crate::quant::Nf4Weight;

/// The NF4 weights of one decoder layer, by target (all seven are quantized).
#[derive(Module, Debug)]
pub struct QuantLayer<B: Backend> {
    /// One entry per [`LoraTarget::ALL`] member, in that order.
    pub weights: Vec<Nf4Weight<B>>,
}

impl<B: Backend> QuantLayer<B> {
    /// The NF4 weight standing for `target`.
    pub fn get(&self, target: LoraTarget) -> &Nf4Weight<B> {
        let i = LoraTarget::ALL
            .iter()
            .position(|&t| t == target)
            .expect("every target is in ALL");
        &self.weights[i]
    }
}

/// Quantizes every decoder linear weight of a `base` already in memory to NF4 on its device, one
/// weight at a time, and leaves placeholders in their place (the codes [`load_quantized`] makes).
pub fn quantize_base<B: Backend>(mut base: CausalLm<B>) -> (CausalLm<B>, Vec<QuantLayer<B>>) {
    let quant = base
        .model
        .layers
        .iter_mut()
        .map(|layer| quantize_layer(layer))
        .collect();
    (base, quant)
}

/// Replaces `layer`'s seven linear weights by placeholders and returns their NF4 form.
fn quantize_layer<B: Backend>(layer: &mut DecoderLayer<B>) -> QuantLayer<B> {
    let weights = LoraTarget::ALL
        .into_iter()
        .map(|t| {
            let lin = target_linear_mut(layer, t);
            let w = lin.weight.val();
            let empty = Tensor::<B, 2>::empty([0, 0], (&w.device(), w.dtype()));
            lin.weight = Param::initialized(lin.weight.id, empty);
            Nf4Weight::quantize(w)
        })
        .collect();
    QuantLayer { weights }
}

/// A random model (as [`CausalLm::init`]) for QLoRA, each layer quantized as soon as it is made,
/// so a 70B-shaped model can be made on the device that trains it (benchmarks); the rest is
/// cast to `dtype`.
pub fn init_quantized<B: Backend>(
    config: &crate::config::ModelConfig,
    device: &B::Device,
    dtype: DType,
) -> (CausalLm<B>, Vec<QuantLayer<B>>) {
    let mut quant = Vec::with_capacity(config.num_hidden_layers);
    let base = CausalLm::<B>::init_with(config, device, |mut layer| {
        quant.push(quantize_layer(&mut layer));
        layer
    });
    (base.map(&mut super::trainer::CastParams(dtype)), quant)
}

/// Loads the base folder `dir` for QLoRA: every decoder linear weight quantized on the host as
/// it is read ([`crate::weights::load_model_nf4`]), the rest in `dtype`.
pub fn load_quantized<B: Backend>(
    dir: &std::path::Path,
    device: &B::Device,
    dtype: DType,
) -> crate::error::Result<(CausalLm<B>, Vec<QuantLayer<B>>)> {
    let (base, nf4) = crate::weights::load_model_nf4::<B>(dir, device, dtype)?;
    Ok((
        base,
        nf4.into_iter()
            .map(|weights| QuantLayer { weights })
            .collect(),
    ))
}

/// `base` with the placeholders filled by the dequantized NF4 weights in `dtype`: the base the
/// adapters were trained against.
pub fn dequantize_base<B: Backend>(
    mut base: CausalLm<B>,
    quant: &[QuantLayer<B>],
    dtype: DType,
) -> CausalLm<B> {
    for (layer, q) in base.model.layers.iter_mut().zip(quant) {
        for t in LoraTarget::ALL {
            let lin = target_linear_mut(layer, t);
            let w = q.get(t).dequantize(dtype).detach();
            lin.weight = Param::initialized(lin.weight.id, w);
        }
    }
    base
}
