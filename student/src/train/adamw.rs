//! AdamW with the global-norm clipping coefficient folded in, one pass per parameter where the
//! backend fuses it ([`Kernels::adamw_step`]).
//!
//! Burn's `AdamW` takes about fifteen element-wise passes per parameter (each moment scaled and
//! added, the bias corrections, the square root, the quotient, the decay, the update), each a
//! fresh output on one thread, and the clipping coefficient was one more. The maths, the f32
//! rounding of every constant and the record are Burn's own, so checkpoints written by either
//! load in the other, and with `DISTILL_FUSED=0` a run reproduces Burn's `AdamW` bit for bit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{
    AdamWState, AdaptiveMomentumState, GradientsParams, LearningRate, Optimizer, SimpleOptimizer,
};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn_flex::ops::fused::AdamwStep;

use crate::kernels::Kernels;

/// The gradient factor of the current step, shared between the trainer and its optimizer
/// (Burn's adaptor owns the optimizer and has no per-step arguments beyond the rate).
#[derive(Clone, Debug)]
struct GradScale(Arc<AtomicU64>);

/// Bits that mean "no factor" (a NaN no clipping coefficient can be).
const NO_SCALE: u64 = u64::MAX;

impl GradScale {
    fn new() -> Self {
        Self(Arc::new(AtomicU64::new(NO_SCALE)))
    }
    fn set(&self, factor: Option<f64>) {
        self.0
            .store(factor.map_or(NO_SCALE, f64::to_bits), Ordering::Relaxed);
    }
    fn get(&self) -> Option<f64> {
        let bits = self.0.load(Ordering::Relaxed);
        (bits != NO_SCALE).then(|| f64::from_bits(bits))
    }
}

/// Burn's `AdamW` (no AMSGrad, no cautious decay) as one [`Kernels::adamw_step`] per
/// parameter, the gradient first multiplied by the step's clipping factor.
#[derive(Clone, Debug)]
pub(crate) struct FusedAdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    scale: GradScale,
}

impl<B: Kernels> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let time = state.as_ref().map_or(1, |s| s.momentum.time + 1);
        let t = time as i32;
        // Rounded exactly where Burn rounds them: the betas and corrections in f32, the decay
        // factor and the rate computed in f64 and then converted.
        let decay_rate = lr * f64::from(self.weight_decay);
        let step = AdamwStep {
            grad_scale: self.scale.get().map(|f| f as f32),
            beta_1: self.beta_1,
            one_minus_beta_1: 1.0 - self.beta_1,
            beta_2: self.beta_2,
            one_minus_beta_2: 1.0 - self.beta_2,
            bias_1: 1f32 - self.beta_1.powi(t),
            bias_2: 1f32 - self.beta_2.powi(t),
            epsilon: self.epsilon,
            keep: (decay_rate != 0.0).then_some((1.0 - decay_rate) as f32),
            lr: lr as f32,
        };
        let moments = state.map(|s| {
            (
                s.momentum.moment_1.into_primitive().tensor(),
                s.momentum.moment_2.into_primitive().tensor(),
            )
        });
        let (p, m, v) = B::adamw_step(
            tensor.into_primitive().tensor(),
            grad.into_primitive().tensor(),
            moments,
            step,
        );
        let float = |t| Tensor::<B, D>::from_primitive(burn::tensor::TensorPrimitive::Float(t));
        let momentum = AdaptiveMomentumState::new(time, float(m), float(v));
        (float(p), Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

/// An AdamW optimizer over module `M` whose steps take the clipping factor.
pub(crate) struct Adam<M: AutodiffModule<B>, B: AutodiffBackend<InnerBackend: Kernels>> {
    adaptor: OptimizerAdaptor<FusedAdamW, M, B>,
    scale: GradScale,
}

/// `hashbrown` map of `ParamId` → AdamW state, as Burn's adaptor keeps it (the record of
/// Burn's own `AdamW`, field for field).
pub(crate) type AdamRecord<M, B> = <OptimizerAdaptor<FusedAdamW, M, B> as Optimizer<M, B>>::Record;

impl<M: AutodiffModule<B>, B: AutodiffBackend<InnerBackend: Kernels>> Adam<M, B> {
    /// AdamW with Burn's defaults overridden by these (no clipping inside the optimizer: the
    /// trainer clips by the global norm).
    pub fn new(beta_1: f32, beta_2: f32, epsilon: f32, weight_decay: f32) -> Self {
        let scale = GradScale::new();
        let optim = FusedAdamW {
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
            scale: scale.clone(),
        };
        Self {
            adaptor: OptimizerAdaptor::from(optim),
            scale,
        }
    }

    /// One update of `module` from `grads` multiplied by `factor` (when given).
    pub fn step(
        &mut self,
        lr: LearningRate,
        module: M,
        grads: GradientsParams,
        factor: Option<f64>,
    ) -> M {
        self.scale.set(factor);
        self.adaptor.step(lr, module, grads)
    }

    /// The moments and step counts, per parameter.
    pub fn to_record(&self) -> AdamRecord<M, B> {
        self.adaptor.to_record()
    }

    /// This optimizer with the state `record`.
    pub fn load_record(mut self, record: AdamRecord<M, B>) -> Self {
        self.adaptor = self.adaptor.load_record(record);
        self
    }
}
