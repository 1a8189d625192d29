//! Several training processes, as torchrun or `srun` start them: rank 0 runs the pipeline
//! and alone opens the job database; every other rank serves rank 0's train stages.
//!
//! A train stage on rank 0 sends the others its job (the base model's path, the training
//! config, the curated records, the checkpoint to resume from), every rank builds the same
//! trainer on its own device, and before each step rank 0 says whether to take it; the
//! trainer sums the gradients across the ranks. Only rank 0 writes the database and
//! checkpoints (with the optimizer sharded, each rank adds its part to rank 0's checkpoint
//! folder): paths in a job (the base model, a checkpoint, the run's folder) must therefore be
//! shared by every node, as they are for PyTorch jobs on a cluster's shared storage.
//!
//! The group is process-wide, as `torch.distributed`'s default process group is: a process
//! belongs to one set of training processes for its whole life, and the train stages are
//! built long before the CLI knows it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use distill_student::train::{Collective, SharedGroup, TrainBackend, Trainer, World, lock};
use serde::{Deserialize, Serialize};

use crate::StageError;
use crate::device::Device;
use crate::train::{TrainSpec, training_error};

/// What rank 0 tells the other ranks.
#[derive(Debug, Serialize, Deserialize)]
enum Control {
    /// Build this trainer.
    Job {
        spec: Box<TrainSpec>,
        device: Device,
    },
    /// Take one step.
    Step,
    /// Rank 0 writes a checkpoint: send it this rank's part of the state.
    Save,
    /// The job is over (done or interrupted).
    End,
    /// The run is over: exit.
    Finish,
}

/// This process's training group.
pub struct Cluster {
    world: World,
    group: SharedGroup,
    /// A job failed part-way: the ranks may be out of step, so no further job starts.
    broken: AtomicBool,
    /// Held by the train stage whose job the processes are running: stages the DAG runs
    /// concurrently take the processes in turn.
    turn: Mutex<()>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// Makes `group` this process's training group (once, before the pipeline runs).
pub fn install(world: World, group: SharedGroup) {
    let _ = CLUSTER.set(Cluster {
        world,
        group,
        broken: AtomicBool::new(false),
        turn: Mutex::new(()),
    });
}

/// The training group, when this process is one of several.
pub fn current() -> Option<&'static Cluster> {
    CLUSTER.get()
}

/// Rank 0, at the end of its run: tells the other ranks to exit, or that it failed with
/// `error`.
pub fn finish(error: Option<&str>) {
    let Some(c) = current() else { return };
    match error {
        Some(e) => c.abort(e),
        None if c.broken.load(Ordering::Relaxed) => {}
        None => {
            let _ = c.send(&Control::Finish);
        }
    }
}

impl Cluster {
    /// Where this process sits.
    pub fn world(&self) -> &World {
        &self.world
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, dyn Collective + 'static> {
        lock(&self.group)
    }

    fn send(&self, control: &Control) -> Result<(), StageError> {
        let bytes = serde_json::to_vec(control).expect("a control message serialises");
        self.lock()
            .broadcast(Some(&bytes))
            .map(drop)
            .map_err(|e| training_error(&e))
    }

    /// Rank 0: waits until no other train stage has the processes, and holds them until the
    /// guard drops.
    pub(crate) fn turn(&self) -> MutexGuard<'_, ()> {
        if let Ok(guard) = self.turn.try_lock() {
            return guard;
        }
        tracing::info!("waiting for another train stage to finish with the training processes");
        self.turn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rank 0: hands the other ranks the job they build their trainer from.
    pub(crate) fn start(&self, spec: &TrainSpec, device: Device) -> Result<(), StageError> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(StageError::Failed(
                "a training job failed earlier in this run, so the training processes may be \
                 out of step: restart them all (`distill resume` under the launcher)"
                    .into(),
            ));
        }
        self.send(&Control::Job {
            spec: Box::new(spec.clone()),
            device,
        })
    }

    /// Rank 0: waits for every rank's trainer (or its error) and joins `built` to the group.
    pub(crate) fn ready<B: TrainBackend>(
        &self,
        built: Result<Trainer<B>, StageError>,
    ) -> Result<Trainer<B>, StageError> {
        let gathered = self.lock().gather(&[]);
        let joined = gathered.map_err(|e| training_error(&e)).and_then(|_| {
            let mut trainer = built?;
            trainer
                .join_group(self.group.clone())
                .map_err(|e| StageError::Input(e.to_string()))?;
            Ok(trainer)
        });
        if let Err(e) = &joined {
            self.abort(&e.to_string());
        }
        joined
    }

    /// Rank 0: tells the other ranks to take a step (`true`) or that the job ended.
    pub(crate) fn control(&self, step: bool) -> Result<(), StageError> {
        self.send(if step { &Control::Step } else { &Control::End })
    }

    /// Rank 0: the other ranks send their part of the checkpoint it is about to write.
    pub(crate) fn save(&self) -> Result<(), StageError> {
        self.send(&Control::Save)
    }

    /// Rank 0: a job failed; the other ranks stop with `message`.
    pub(crate) fn abort(&self, message: &str) {
        if !self.broken.swap(true, Ordering::Relaxed) {
            self.lock().fail(message);
        }
    }
}

/// A rank other than 0: serves rank 0's train stages until its run ends. Returns an error
/// when a job failed here or rank 0 failed or went away.
pub fn serve(world: World, group: SharedGroup) -> Result<(), StageError> {
    let recv = || -> Result<Control, StageError> {
        let bytes = lock(&group)
            .broadcast(None)
            .map_err(|e| StageError::Failed(e.to_string()))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| StageError::Failed(format!("rank 0 sent a malformed message: {e}")))
    };
    loop {
        match recv()? {
            Control::Finish => return Ok(()),
            Control::Job { spec, device } => {
                tracing::info!(
                    rank = world.rank,
                    records = spec.records.len(),
                    "training job"
                );
                match job(&world, &group, &spec, device, &recv) {
                    Ok(true) => {}
                    Ok(false) => return Ok(()),
                    Err(e) => {
                        // Rank 0 hears of it in place of this rank's next message, then ends
                        // the run; wait for that, so the launcher sees rank 0's outcome first.
                        lock(&group).fail(&e.to_string());
                        while let Ok(c) = recv() {
                            if matches!(c, Control::Finish) {
                                break;
                            }
                        }
                        return Err(e);
                    }
                }
            }
            other => {
                return Err(StageError::Failed(format!(
                    "rank 0 sent {other:?} outside a training job"
                )));
            }
        }
    }
}

/// One job on a rank other than 0; `Ok(false)` when rank 0 ended the run instead.
fn job(
    world: &World,
    group: &SharedGroup,
    spec: &TrainSpec,
    device: Device,
    recv: &dyn Fn() -> Result<Control, StageError>,
) -> Result<bool, StageError> {
    match device {
        Device::Cpu => {
            type B = burn::backend::Autodiff<distill_student::CpuBackend>;
            steps::<B>(group, spec, &[Default::default()], recv)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda => {
            type B = burn::backend::Autodiff<distill_student::CudaBackend>;
            let d = burn::backend::cuda::CudaDevice::new(world.local_rank);
            steps::<B>(group, spec, &[d], recv)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => {
            let _ = world;
            Err(StageError::Input("built without CUDA".into()))
        }
    }
}

fn steps<B: TrainBackend>(
    group: &SharedGroup,
    spec: &TrainSpec,
    devices: &[B::Device],
    recv: &dyn Fn() -> Result<Control, StageError>,
) -> Result<bool, StageError> {
    let mut trainer = spec.build::<B>(devices)?;
    lock(group).gather(&[]).map_err(|e| training_error(&e))?;
    trainer
        .join_group(group.clone())
        .map_err(|e| StageError::Input(e.to_string()))?;
    loop {
        match recv()? {
            Control::Step => {
                trainer.step().map_err(|e| training_error(&e))?;
            }
            Control::Save => trainer.share_checkpoint().map_err(|e| training_error(&e))?,
            Control::End => return Ok(true),
            Control::Finish => return Ok(false),
            Control::Job { .. } => {
                return Err(StageError::Failed(
                    "rank 0 started a job inside another".into(),
                ));
            }
        }
    }
}
