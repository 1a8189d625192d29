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
use crate::model::CausalLm;
use crate::quant::{Nf4Matrix, Nf4Weight};

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

/// Quantizes every decoder linear weight of `base` to NF4 on `base`'s device, one weight at a
/// time (the host holds one layer's f32 copy at most), and leaves placeholders in their place.
pub fn quantize_base<B: Backend>(mut base: CausalLm<B>) -> (CausalLm<B>, Vec<QuantLayer<B>>) {
    let mut out = Vec::with_capacity(base.model.layers.len());
    for layer in &mut base.model.layers {
        let mut weights = Vec::with_capacity(LoraTarget::ALL.len());
        for t in LoraTarget::ALL {
            let lin = target_linear_mut(layer, t);
            let w = lin.weight.val();
            let device = w.device();
            let [d_in, d_out] = w.dims();
            let values = w
                .cast(DType::F32)
                .into_data()
                .to_vec::<f32>()
                .expect("f32 weight");
            weights.push(Nf4Matrix::quantize(&values, d_in, d_out).to_device::<B>(&device));
            let empty = Tensor::<B, 2>::empty([0, 0], (&device, lin.weight.val().dtype()));
            lin.weight = Param::initialized(lin.weight.id, empty);
        }
        out.push(QuantLayer { weights });
    }
    (base, out)
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
