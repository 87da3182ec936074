//! The paper's vector-quantization layer for [`tch`] models.
//!
//! The maths is defined once in [`vq_core`]; this crate runs it on libtorch tensors (CPU and CUDA)
//! and is tested to give the same numbers: [`apply_estimator`] (the gradient estimators as one
//! autograd node), [`nearest_codes`], and the [`VectorQuantizer`] layer.

mod collective;
mod ema;
mod error;
mod estimator;
pub mod init;
mod precision;
mod quantizer;
mod rows;
mod search;

pub use collective::{Collective, CollectiveError};
pub use error::{Result, VqTchError};
pub use estimator::{
    DevicePath, apply_estimator, apply_estimator_with, fused_kernel_compiles_for,
    fused_kernel_status,
};
pub use precision::{Autocast, Precision, autocast};
pub use quantizer::{
    CodeReplacement, CodebookInit, CodebookLearning, EntropyPenalty, Family, FsqLevels,
    HeadCodebooks, Mode, Projection, REPLACEMENT_SALT, STAGE_DROPOUT_SALT, StageDropout,
    VectorQuantizer, VectorQuantizerConfig, VqOutput, VqVaeLatent,
};
pub use search::{FiniteCheck, FiniteVerdict, nearest_codes, nearest_codes_checked};
pub use tch;
pub use vq_core::{Estimator, Metric};

/// What the linked libtorch offers at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchRuntime {
    /// Whether a CUDA device is usable (`torch.cuda.is_available()`).
    pub cuda_available: bool,
    /// Number of visible CUDA devices.
    pub cuda_devices: usize,
    /// Whether cuDNN is usable.
    pub cudnn_available: bool,
    /// Intra-op CPU threads libtorch uses.
    pub cpu_threads: i32,
}

impl TorchRuntime {
    /// Queries the linked libtorch.
    ///
    /// ```
    /// let rt = vq_tch::TorchRuntime::query();
    /// assert!(rt.cpu_threads >= 1);
    /// ```
    pub fn query() -> Self {
        Self {
            cuda_available: tch::Cuda::is_available(),
            cuda_devices: usize::try_from(tch::Cuda::device_count()).unwrap_or(0),
            cudnn_available: tch::Cuda::cudnn_is_available(),
            cpu_threads: tch::get_num_threads(),
        }
    }
}
