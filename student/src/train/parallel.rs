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

use std::collections::HashMap;

use super::TrainBackend;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};

use super::collective::{Collective, CollectiveError, CollectiveResult};
use super::model::TrainModel;
use super::trainer::{Adam, OptimRecord};

/// How data-parallel replicas divide the training state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    /// Every replica holds all weights, gradients and optimizer state (plain data parallelism).
    #[default]
    None,
    /// ZeRO-1 (with ZeRO-2's reduce-scatter): each trainable parameter has one owner replica;
    /// its gradient is reduced onto the owner only, which alone keeps its AdamW moments and
    /// updates it, and the new value is then copied to the other replicas. The AdamW state and
    /// the reduced gradients per replica shrink to about 1/N; the weights stay whole, and each
    /// replica still holds its micro-batches' whole gradients until the reduce. Same updates as
    /// [`Sharding::None`], bit for bit.
    Optimizer,
}

/// The owner replica of every trainable parameter of `model` among `n`: largest first, each to
/// the replica owning the fewest elements so far (ties to the lower index), so the shares
/// differ by at most one tensor.
pub(super) fn owners<B: TrainBackend>(model: &TrainModel<B>, n: usize) -> HashMap<ParamId, usize> {
    struct Sizes(Vec<(ParamId, usize)>);
    impl<B: Backend> ModuleVisitor<B> for Sizes {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let t = p.val();
            if t.is_require_grad() {
                self.0.push((p.id, t.shape().num_elements()));
            }
        }
    }
    let mut sizes = Sizes(Vec::new());
    model.visit(&mut sizes);
    let mut params = sizes.0;
    // Stable: equal sizes keep the visiting order.
    params.sort_by_key(|p| std::cmp::Reverse(p.1));
    let mut load = vec![0usize; n.max(1)];
    params
        .into_iter()
        .map(|(id, numel)| {
            let r = (0..load.len()).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            load[r] += numel;
            (id, r)
        })
        .collect()
}

/// Splits the AdamW records `record` by owner: entry `r` holds replica `r`'s parameters (all
/// of them without `owners`).
pub(super) fn split_record<B: TrainBackend>(
    record: OptimRecord<B>,
    owners: Option<&HashMap<ParamId, usize>>,
    n: usize,
) -> Vec<OptimRecord<B>> {
    let mut out: Vec<OptimRecord<B>> = (0..n).map(|_| OptimRecord::<B>::default()).collect();
    match owners {
        Some(owners) => {
            for (id, r) in record {
                let owner = owners.get(&id).copied().unwrap_or(0);
                out[owner].insert(id, r);
            }
        }
        None => {
            for o in &mut out {
                o.clone_from(&record);
            }
        }
    }
    out
}

/// Sums every parameter's gradient over `parts` (one per replica, in device order) on its
/// owner's device and hands it to the owner alone: entry `r` holds replica `r`'s parameters.
pub(super) fn reduce_scatter<B: TrainBackend>(
    model: &TrainModel<B>,
    parts: Vec<GradientsParams>,
    devices: &[B::Device],
    owners: &HashMap<ParamId, usize>,
) -> Vec<GradientsParams> {
    struct Reduce<'a, B: TrainBackend> {
        parts: Vec<GradientsParams>,
        out: Vec<GradientsParams>,
        devices: &'a [B::Device],
        owners: &'a HashMap<ParamId, usize>,
    }
    impl<B: TrainBackend> ModuleVisitor<B> for Reduce<'_, B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let owner = self.owners.get(&p.id).copied().unwrap_or(0);
            let device = &self.devices[owner];
            let mut total: Option<Tensor<B::InnerBackend, D>> = None;
            for part in &mut self.parts {
                if let Some(g) = part.remove::<B::InnerBackend, D>(p.id) {
                    let g = g.to_device(device);
                    total = Some(match total {
                        Some(t) => t + g,
                        None => g,
                    });
                }
            }
            if let Some(total) = total {
                self.out[owner].register::<B::InnerBackend, D>(p.id, total);
            }
        }
    }
    debug_assert_eq!(parts.len(), devices.len());
    let mut reduce = Reduce::<B> {
        out: devices.iter().map(|_| GradientsParams::new()).collect(),
        parts,
        devices,
        owners,
    };
    model.visit(&mut reduce);
    reduce.out
}

/// After a sharded update: copies each parameter's new value from its owner into every other
/// replica (`models` in device order).
pub(super) fn all_gather<B: TrainBackend>(
    models: Vec<TrainModel<B>>,
    devices: &[B::Device],
    owners: &HashMap<ParamId, usize>,
) -> Vec<TrainModel<B>> {
    /// Replica `me`'s own parameters' values.
    struct Collect<'a> {
        me: usize,
        owners: &'a HashMap<ParamId, usize>,
        values: &'a mut GradientsParams,
    }
    impl<B: TrainBackend> ModuleVisitor<B> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if self.owners.get(&p.id) == Some(&self.me) {
                self.values
                    .register::<B::InnerBackend, D>(p.id, p.val().inner());
            }
        }
    }
    /// Replaces the parameters replica `me` does not own by their owners' values.
    struct Replace<'a, B: TrainBackend> {
        me: usize,
        owners: &'a HashMap<ParamId, usize>,
        values: &'a GradientsParams,
        device: &'a B::Device,
    }
    impl<B: TrainBackend> ModuleMapper<B> for Replace<'_, B> {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            match self.owners.get(&p.id) {
                Some(&owner) if owner != self.me => {
                    let Some(value) = self.values.get::<B::InnerBackend, D>(p.id) else {
                        return p;
                    };
                    let device = self.device;
                    p.map(|old| {
                        let new = Tensor::from_inner(value.to_device(device));
                        if old.is_require_grad() {
                            new.require_grad()
                        } else {
                            new
                        }
                    })
                }
                _ => p,
            }
        }
    }
    let mut values = GradientsParams::new();
    for (me, model) in models.iter().enumerate() {
        model.visit(&mut Collect {
            me,
            owners,
            values: &mut values,
        });
    }
    models
        .into_iter()
        .enumerate()
        .map(|(me, model)| {
            model.map(&mut Replace::<B> {
                me,
                owners,
                values: &values,
                device: &devices[me],
            })
        })
        .collect()
}

/// Bytes one replica holds, measured from its tensors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaBytes {
    /// Weights (every parameter, trainable or frozen).
    pub params: u64,
    /// Gradients it received in the last step (after the reduce).
    pub grads: u64,
    /// AdamW moments.
    pub optimizer: u64,
}

/// Bytes of `model`'s parameters and of the AdamW moments `record` holds for them.
pub(super) fn held_bytes<B: TrainBackend>(
    model: &TrainModel<B>,
    record: &OptimRecord<B>,
) -> (u64, u64) {
    struct Count<'a, B: TrainBackend> {
        record: &'a OptimRecord<B>,
        params: u64,
        optimizer: u64,
    }
    impl<B: TrainBackend> ModuleVisitor<B> for Count<'_, B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let bytes = |t: &Tensor<B::InnerBackend, D>| {
                (t.shape().num_elements() * t.dtype().size()) as u64
            };
            self.params += bytes(&p.val().inner());
            if let Some(r) = self.record.get(&p.id) {
                let state = r.clone().into_state::<D>();
                self.optimizer += bytes(&state.momentum.moment_1) + bytes(&state.momentum.moment_2);
            }
        }
    }
    let mut count = Count::<B> {
        record,
        params: 0,
        optimizer: 0,
    };
    model.visit(&mut count);
    (count.params, count.optimizer)
}

/// Bytes of the gradients in `grads` (those of `model`'s parameters).
pub(super) fn grad_bytes<B: TrainBackend>(model: &TrainModel<B>, grads: &GradientsParams) -> u64 {
    struct Count<'a> {
        grads: &'a GradientsParams,
        bytes: u64,
    }
    impl<B: TrainBackend> ModuleVisitor<B> for Count<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(p.id) {
                self.bytes += (g.shape().num_elements() * g.dtype().size()) as u64;
            }
        }
    }
    let mut count = Count { grads, bytes: 0 };
    model.visit(&mut count);
    count.bytes
}

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

/// Where [`all_reduce_across`] hands the totals.
pub(super) enum Across<'a> {
    /// Every rank gets every total.
    AllReduce,
    /// Each rank gets only the totals of the parameters it owns (ZeRO-2's reduce-scatter), and
    /// rank 0, which holds them all while it sums, appends `norm` of the whole set to the
    /// scalars (so the clipping norm is the unsharded one).
    ReduceScatter {
        owners: &'a HashMap<ParamId, usize>,
        norm: &'a dyn Fn(&GradientsParams) -> f64,
    },
}

/// Sums this process's gradient set `grads`, and `scalars`, over the processes of `group`.
/// Rank 0 adds the ranks' values in rank order with the same tensor additions as
/// [`all_reduce`], so N processes of one replica sum bit for bit as one process of N replicas;
/// the ranks get the totals as `how` says (the gradients on `device`) and the summed scalars.
/// Tensors cross through host memory.
pub(super) fn all_reduce_across<B: TrainBackend>(
    group: &mut dyn Collective,
    model: &TrainModel<B>,
    grads: GradientsParams,
    scalars: &mut Vec<f64>,
    device: &B::Device,
    how: Across<'_>,
) -> CollectiveResult<GradientsParams> {
    /// Takes every parameter's gradient, in visiting order, as host data.
    struct Take {
        grads: GradientsParams,
        out: Vec<Option<TensorData>>,
    }
    impl<B: TrainBackend> ModuleVisitor<B> for Take {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let g = self.grads.remove::<B::InnerBackend, D>(p.id);
            self.out.push(g.map(Tensor::into_data));
        }
    }
    /// Rank 0: sums each parameter's gradient over the ranks, in rank order.
    struct Sum<'a, B: TrainBackend> {
        ranks: Vec<std::vec::IntoIter<Option<TensorData>>>,
        device: &'a B::Device,
        out: GradientsParams,
        totals: Vec<Option<TensorData>>,
    }
    impl<B: TrainBackend> ModuleVisitor<B> for Sum<'_, B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let mut total: Option<Tensor<B::InnerBackend, D>> = None;
            for rank in &mut self.ranks {
                if let Some(data) = rank.next().flatten() {
                    let g = Tensor::<B::InnerBackend, D>::from_data(data, self.device);
                    total = Some(match total {
                        Some(t) => t + g,
                        None => g,
                    });
                }
            }
            self.totals.push(total.as_ref().map(|t| t.to_data()));
            if let Some(total) = total {
                self.out.register::<B::InnerBackend, D>(p.id, total);
            }
        }
    }
    /// The other ranks: registers rank 0's totals.
    struct Put<'a, B: TrainBackend> {
        totals: std::vec::IntoIter<Option<TensorData>>,
        device: &'a B::Device,
        out: GradientsParams,
    }
    impl<B: TrainBackend> ModuleVisitor<B> for Put<'_, B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if let Some(data) = self.totals.next().flatten() {
                let t = Tensor::<B::InnerBackend, D>::from_data(data, self.device);
                self.out.register::<B::InnerBackend, D>(p.id, t);
            }
        }
    }

    let mut take = Take {
        grads,
        out: Vec::new(),
    };
    model.visit(&mut take);
    let mine = wire::encode(scalars, &take.out);
    drop(take);
    match group.gather(&mine)? {
        Some(all) => {
            let mut ranks = Vec::with_capacity(all.len());
            let mut sums: Option<Vec<f64>> = None;
            for (rank, bytes) in all.iter().enumerate() {
                let (s, tensors) = wire::decode(bytes)
                    .map_err(|message| CollectiveError::Protocol { rank, message })?;
                if s.len() != scalars.len() {
                    return Err(CollectiveError::Protocol {
                        rank,
                        message: format!("{} scalars, expected {}", s.len(), scalars.len()),
                    });
                }
                sums = Some(match sums {
                    None => s,
                    Some(acc) => acc.iter().zip(&s).map(|(a, b)| a + b).collect(),
                });
                ranks.push(tensors.into_iter());
            }
            let mut sum = Sum::<B> {
                ranks,
                device,
                out: GradientsParams::new(),
                totals: Vec::new(),
            };
            model.visit(&mut sum);
            let mut sums = sums.unwrap_or_default();
            match how {
                Across::AllReduce => {
                    group.broadcast(Some(&wire::encode(&sums, &sum.totals)))?;
                    *scalars = sums;
                    Ok(sum.out)
                }
                Across::ReduceScatter { owners, norm } => {
                    sums.push(norm(&sum.out));
                    let ids = positions(model);
                    let payloads = (0..group.size())
                        .map(|r| {
                            let mine: Vec<Option<TensorData>> = sum
                                .totals
                                .iter()
                                .zip(&ids)
                                .map(|(t, id)| match owners.get(id) == Some(&r) {
                                    true => t.clone(),
                                    false => None,
                                })
                                .collect();
                            wire::encode(&sums, &mine)
                        })
                        .collect();
                    group.scatter(Some(payloads))?;
                    *scalars = sums;
                    Ok(retain_owned(model, sum.out, owners, 0))
                }
            }
        }
        None => {
            let bytes = match how {
                Across::AllReduce => group.broadcast(None)?,
                Across::ReduceScatter { .. } => group.scatter(None)?,
            };
            let (sums, totals) = wire::decode(&bytes)
                .map_err(|message| CollectiveError::Protocol { rank: 0, message })?;
            let expected = scalars.len() + matches!(how, Across::ReduceScatter { .. }) as usize;
            if sums.len() != expected {
                return Err(CollectiveError::Protocol {
                    rank: 0,
                    message: format!("{} scalars, expected {expected}", sums.len()),
                });
            }
            *scalars = sums;
            let mut put = Put::<B> {
                totals: totals.into_iter(),
                device,
                out: GradientsParams::new(),
            };
            model.visit(&mut put);
            Ok(put.out)
        }
    }
}

/// Every parameter's id, in `model`'s visiting order: the order in which the processes'
/// messages list tensors.
pub(super) fn positions<B: TrainBackend>(model: &TrainModel<B>) -> Vec<ParamId> {
    struct Ids(Vec<ParamId>);
    impl<B: Backend> ModuleVisitor<B> for Ids {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.0.push(p.id);
        }
    }
    let mut ids = Ids(Vec::new());
    model.visit(&mut ids);
    ids.0
}

/// Keeps only the gradients of the parameters rank `me` owns.
pub(super) fn retain_owned<B: TrainBackend>(
    model: &TrainModel<B>,
    mut grads: GradientsParams,
    owners: &HashMap<ParamId, usize>,
    me: usize,
) -> GradientsParams {
    struct Drop<'a> {
        grads: &'a mut GradientsParams,
        owners: &'a HashMap<ParamId, usize>,
        me: usize,
    }
    impl<B: TrainBackend> ModuleVisitor<B> for Drop<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if self.owners.get(&p.id).is_some_and(|&o| o != self.me) {
                self.grads.remove::<B::InnerBackend, D>(p.id);
            }
        }
    }
    model.visit(&mut Drop {
        grads: &mut grads,
        owners,
        me,
    });
    grads
}

/// After a sharded update across processes: every rank sends its own parameters' new values
/// to rank 0, which broadcasts all of them; each rank takes the values it does not own.
pub(super) fn all_gather_across<B: TrainBackend>(
    group: &mut dyn Collective,
    model: TrainModel<B>,
    owners: &HashMap<ParamId, usize>,
    device: &B::Device,
) -> CollectiveResult<TrainModel<B>> {
    let me = group.rank();
    struct Own<'a> {
        me: usize,
        owners: &'a HashMap<ParamId, usize>,
        out: Vec<Option<TensorData>>,
    }
    impl<B: TrainBackend> ModuleVisitor<B> for Own<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let mine = self.owners.get(&p.id) == Some(&self.me);
            self.out.push(mine.then(|| p.val().inner().into_data()));
        }
    }
    struct Replace<'a, B: TrainBackend> {
        me: usize,
        owners: &'a HashMap<ParamId, usize>,
        values: std::vec::IntoIter<Option<TensorData>>,
        device: &'a B::Device,
    }
    impl<B: TrainBackend> ModuleMapper<B> for Replace<'_, B> {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let value = self.values.next().flatten();
            match (self.owners.get(&p.id), value) {
                (Some(&owner), Some(value)) if owner != self.me => {
                    let device = self.device;
                    p.map(|old| {
                        let new = Tensor::from_inner(Tensor::from_data(value, device));
                        if old.is_require_grad() {
                            new.require_grad()
                        } else {
                            new
                        }
                    })
                }
                _ => p,
            }
        }
    }
    let mut own = Own {
        me,
        owners,
        out: Vec::new(),
    };
    model.visit(&mut own);
    let payload = wire::encode(&[], &own.out);
    let all = match group.gather(&payload)? {
        Some(all) => {
            // Position i comes from whichever rank sent it (its owner).
            let mut merged: Vec<Option<TensorData>> = vec![None; own.out.len()];
            for (rank, bytes) in all.iter().enumerate() {
                let (_, values) = wire::decode(bytes)
                    .map_err(|message| CollectiveError::Protocol { rank, message })?;
                for (slot, v) in merged.iter_mut().zip(values) {
                    if v.is_some() {
                        *slot = v;
                    }
                }
            }
            let bytes = wire::encode(&[], &merged);
            group.broadcast(Some(&bytes))?;
            merged
        }
        None => {
            let bytes = group.broadcast(None)?;
            wire::decode(&bytes)
                .map_err(|message| CollectiveError::Protocol { rank: 0, message })?
                .1
        }
    };
    Ok(model.map(&mut Replace::<B> {
        me,
        owners,
        values: all.into_iter(),
        device,
    }))
}

/// Tensors and scalars as bytes: a JSON header (each tensor's dtype and shape, or null for a
/// parameter without a gradient), the scalars as little-endian f64 (NaN survives, which JSON
/// would not carry), then the tensors' bytes.
mod wire {
    use burn::tensor::{DType, TensorData};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    struct Head {
        scalars: usize,
        tensors: Vec<Option<(DType, Vec<usize>, usize)>>,
    }

    pub fn encode(scalars: &[f64], tensors: &[Option<TensorData>]) -> Vec<u8> {
        let head = Head {
            scalars: scalars.len(),
            tensors: tensors
                .iter()
                .map(|t| {
                    t.as_ref()
                        .map(|t| (t.dtype, t.shape.to_vec(), t.as_bytes().len()))
                })
                .collect(),
        };
        let head = serde_json::to_vec(&head).expect("a header serialises");
        let body: usize = tensors.iter().flatten().map(|t| t.as_bytes().len()).sum();
        let mut out = Vec::with_capacity(8 + head.len() + 8 * scalars.len() + body);
        out.extend_from_slice(&(head.len() as u64).to_le_bytes());
        out.extend_from_slice(&head);
        for s in scalars {
            out.extend_from_slice(&s.to_le_bytes());
        }
        for t in tensors.iter().flatten() {
            out.extend_from_slice(t.as_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<(Vec<f64>, Vec<Option<TensorData>>), String> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], String> {
            let end = at.checked_add(n).filter(|&e| e <= bytes.len());
            let end = end.ok_or_else(|| format!("{} bytes end early", bytes.len()))?;
            let s = &bytes[at..end];
            at = end;
            Ok(s)
        };
        let len = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")) as usize;
        let head: Head = serde_json::from_slice(take(len)?).map_err(|e| e.to_string())?;
        let scalars = (0..head.scalars)
            .map(|_| Ok(f64::from_le_bytes(take(8)?.try_into().expect("8 bytes"))))
            .collect::<Result<Vec<f64>, String>>()?;
        let tensors = head
            .tensors
            .into_iter()
            .map(|t| {
                t.map(|(dtype, shape, n)| {
                    Ok(TensorData::from_bytes_vec(take(n)?.to_vec(), shape, dtype))
                })
                .transpose()
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok((scalars, tensors))
    }
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
