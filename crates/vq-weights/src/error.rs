//! The error type of `vq-weights`.

/// Errors of locating and converting the pretrained networks' files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WeightsError {
    /// No network has this name.
    #[error("unknown network {name:?}; known: {known}")]
    UnknownNetwork {
        /// The name asked for.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
    /// The file could not be read as a PyTorch file, or one of its tensors could not be read.
    #[error("{file}: {why}")]
    Read {
        /// The file.
        file: String,
        /// What went wrong.
        why: String,
    },
    /// The file holds entries the expected file does not have (it is another network's file).
    #[error("{file} is not {what}: unexpected entries {keys}")]
    Unexpected {
        /// The file.
        file: String,
        /// What it should be.
        what: &'static str,
        /// The first unexpected entries and their count.
        keys: String,
    },
    /// The file has another number of the tensors to keep than the expected file.
    #[error(
        "{file} is not {what}: it has {got} of the tensors to keep, where that file has {want}"
    )]
    Count {
        /// The file.
        file: String,
        /// What it should be.
        what: &'static str,
        /// Tensors expected.
        want: usize,
        /// Tensors found.
        got: usize,
    },
    /// A weight is not stored as float32.
    #[error("{file}: tensor {key} holds {dtype} values; the converted weights are float32")]
    DType {
        /// The file.
        file: String,
        /// The tensor.
        key: String,
        /// Its element type.
        dtype: String,
    },
    /// The converted file could not be written (nothing is left at its name).
    #[error("writing {file}: {why}")]
    Write {
        /// The file.
        file: String,
        /// What went wrong.
        why: String,
    },
}

/// `Result` with [`WeightsError`].
pub type Result<T, E = WeightsError> = std::result::Result<T, E>;
