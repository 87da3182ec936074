//! The error type of `vq-prior`.

/// Errors of prior construction, training and sampling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PriorError {
    /// An invalid configuration value.
    #[error("invalid prior config: {field}: {why}")]
    Config {
        /// The field.
        field: &'static str,
        /// The rule it breaks.
        why: String,
    },
    /// No preset has this name.
    #[error("unknown prior preset {name:?}; known: {known}")]
    UnknownPreset {
        /// The name asked for.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
    /// The input does not fit the prior.
    #[error("{what} of shape {got:?} does not fit the prior: {expected}")]
    Input {
        /// Which input.
        what: &'static str,
        /// What the prior takes.
        expected: String,
        /// The input's shape.
        got: Vec<i64>,
    },
    /// A code or class index outside its range.
    #[error("{what} index {index} is outside 0..{count}")]
    Index {
        /// Code or class.
        what: &'static str,
        /// The offending index.
        index: i64,
        /// The number of valid indices.
        count: i64,
    },
    /// A sampling setting outside its range.
    #[error("sampling setting {field}: {why}")]
    Sampling {
        /// The setting.
        field: &'static str,
        /// The rule it breaks.
        why: &'static str,
    },
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(String),
}

impl From<tch::TchError> for PriorError {
    fn from(e: tch::TchError) -> Self {
        Self::Torch(e.to_string())
    }
}

/// `Result` with [`PriorError`].
pub type Result<T, E = PriorError> = std::result::Result<T, E>;
