//! Where a stage runs its model (`device = "cpu" | "cuda"`), and whether a stage that asks for
//! CUDA GPUs can have them, checked before anything runs.

use serde::{Deserialize, Serialize};

use crate::StageError;

/// Where a stage runs its model (training, local evaluation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// Burn's CPU backend.
    #[default]
    Cpu,
    /// CUDA GPUs (a build with `--features cuda`): the first, or those a stage's `devices` names.
    Cuda,
}

/// Fails unless this build has CUDA and every ordinal in `devices` is a GPU the driver reports.
pub(crate) fn check_cuda_devices(devices: &[usize]) -> Result<(), StageError> {
    #[cfg(not(feature = "cuda"))]
    {
        let _ = devices;
        Err(StageError::Input(
            "device: this distill was built without CUDA (cargo build --release --features cuda)"
                .into(),
        ))
    }
    #[cfg(feature = "cuda")]
    {
        let count = distill_student::cuda_device_count()
            .map_err(|e| StageError::Input(format!("device: cuda: {e}")))?;
        match devices.iter().find(|&&d| d >= count) {
            Some(d) => Err(StageError::Input(format!(
                "devices: GPU {d} is named, but the CUDA driver reports {count} GPU(s)"
            ))),
            None => distill_student::kernels::prepare_cuda()
                .map_err(|e| StageError::Input(format!("device: cuda: {e}"))),
        }
    }
}
