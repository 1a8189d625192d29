//! Data parallelism: replicas of the model and optimizer on other devices, and the gradient
//! all-reduce that keeps them identical.
//!
//! Every replica holds the whole model (same `ParamId`s, forked from the primary) and its own
//! AdamW state. A step's micro-batches are dealt round-robin over the replicas, each computes
//! the gradient of its share, [`all_reduce`] sums the shares and hands every replica the same
//! total, and every replica applies the same update. One host thread drives all devices: Burn
//! queues device work asynchronously, and the trainer reads nothing back until every share is
//! launched. The step's mathematics therefore do not
//! depend on the number of devices (only the float summation order does), so a run can resume on
//! a different number of GPUs.
//!
//! The reduce is written here, centralised on the primary device through Burn's device-to-device
//! copies, rather than taken from `burn-collective` or `burn`'s `distributed` feature: the former
//! does the same centralised reduce for local peers but pulls in axum and websockets for the
//! multi-node case; the latter (NCCL all-reduce on CUDA; it does build beside `flex`) could not
//! be run here, since NCCL refuses two ranks on one GPU and only one-GPU machines were available.

use super::TrainBackend;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;

use super::model::TrainModel;
use super::trainer::Adam;

/// A copy of the model and its optimizer state on another device.
pub(super) struct Replica<B: TrainBackend> {
    pub device: B::Device,
    /// Taken only while its update is applied.
    pub model: Option<TrainModel<B>>,
    pub opt_decay: Adam<B>,
    pub opt_plain: Adam<B>,
}

impl<B: TrainBackend> Replica<B> {
    /// Forks `model` (ids and trainability kept) and copies both optimizers' state to `device`.
    pub fn fork(
        model: &TrainModel<B>,
        opt_decay: Adam<B>,
        opt_plain: Adam<B>,
        device: &B::Device,
    ) -> Self {
        Self {
            device: device.clone(),
            model: Some(model.clone().fork(device)),
            opt_decay,
            opt_plain,
        }
    }
}

/// Indices into a step's micro-batches that replica `r` of `n` computes: `r, r + n, ...`.
pub(super) fn share(r: usize, n: usize, micro_batches: usize) -> impl Iterator<Item = usize> {
    (r..micro_batches).step_by(n)
}

/// Sums every parameter's gradient over `parts` (one per replica, in device order) on
/// `devices[0]` and returns, for each replica, the total on its own device.
pub(super) fn all_reduce<B: TrainBackend>(
    model: &TrainModel<B>,
    parts: Vec<GradientsParams>,
    devices: &[B::Device],
) -> Vec<GradientsParams> {
    struct Reduce<'a, B: TrainBackend> {
        parts: Vec<GradientsParams>,
        out: Vec<GradientsParams>,
        devices: &'a [B::Device],
    }
    impl<B: TrainBackend> ModuleVisitor<B> for Reduce<'_, B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let mut total: Option<Tensor<B::InnerBackend, D>> = None;
            for part in &mut self.parts {
                if let Some(g) = part.remove::<B::InnerBackend, D>(p.id) {
                    let g = g.to_device(&self.devices[0]);
                    total = Some(match total {
                        Some(t) => t + g,
                        None => g,
                    });
                }
            }
            if let Some(total) = total {
                for (out, device) in self.out.iter_mut().zip(self.devices) {
                    out.register::<B::InnerBackend, D>(p.id, total.clone().to_device(device));
                }
            }
        }
    }
    debug_assert_eq!(parts.len(), devices.len());
    let mut reduce = Reduce::<B> {
        out: devices.iter().map(|_| GradientsParams::new()).collect(),
        parts,
        devices,
    };
    model.visit(&mut reduce);
    reduce.out
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn shares_deal_every_micro_batch_once() {
        let all: Vec<Vec<usize>> = (0..3).map(|r| share(r, 3, 7).collect()).collect();
        assert_eq!(all, vec![vec![0, 3, 6], vec![1, 4], vec![2, 5]]);
        assert_eq!(share(1, 2, 1).count(), 0);
    }
}
