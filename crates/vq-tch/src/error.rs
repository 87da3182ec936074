//! The error type of `vq-tch`.

/// Errors of the libtorch VQ operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VqTchError {
    /// Tensor shapes do not fit the operation.
    #[error("shape error: {what} (e: {e:?}, q: {q:?})")]
    Shape {
        /// What was expected.
        what: &'static str,
        /// Shape of the encoder output.
        e: Vec<i64>,
        /// Shape of the codes.
        q: Vec<i64>,
    },
    /// A tensor is not floating point.
    #[error("expected a floating-point tensor (f32, f64, f16 or bf16), got {0:?}")]
    Kind(tch::Kind),
    /// Code indices are not integers.
    #[error("expected integer code indices, got {0:?}")]
    IndexKind(tch::Kind),
    /// A code index outside the codebook.
    #[error("code index {index} is outside the codebook of {codes} codes")]
    Code {
        /// The index.
        index: i64,
        /// The codebook size.
        codes: i64,
    },
    /// The tensors live on different devices.
    #[error("e is on {e:?} but q is on {q:?}")]
    Device {
        /// Device of the encoder output.
        e: tch::Device,
        /// Device of the codes.
        q: tch::Device,
    },
    /// vq-core rejected the data (empty codebook, NaN/∞, ...).
    #[error(transparent)]
    Core(#[from] vq_core::VqError),
    /// An invalid configuration value.
    #[error("invalid VectorQuantizer config: {field} {why}")]
    Config {
        /// The field.
        field: &'static str,
        /// The rule it breaks.
        why: &'static str,
    },
    /// A quantizer family name that is not one of [`crate::Family::name`]'s forms.
    #[error(
        "unknown quantizer family {0:?}: expected nearest, residualN[-dropout[M]], headsN[-separate], simvq, fsqL1-L2-... (levels >= 2), diveq, diveq-detach, sf-diveq, sf-diveq-detach, ibq, lfq, bsq or scq"
    )]
    UnknownFamily(String),
    /// libtorch raised an error.
    #[error("libtorch: {0}")]
    Torch(String),
    /// A precision libtorch cannot autocast to on a device.
    #[error("precision {precision} is not available on {device:?}: {why}")]
    Precision {
        /// The precision asked for.
        precision: &'static str,
        /// The device.
        device: tch::Device,
        /// What failed.
        why: String,
    },
    /// A precision name that is not one of `f32`, `bf16`, `f16`.
    #[error("unknown precision {0:?}: expected f32, bf16 or f16")]
    UnknownPrecision(String),
    /// A collective of the data-parallel group failed (a rank was lost).
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
}

/// `Result` with [`VqTchError`].
pub type Result<T, E = VqTchError> = std::result::Result<T, E>;
