//! The error type of `vq-models`.

/// Errors of model construction and use.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// An invalid configuration value.
    #[error("invalid model config: {field}: {why}")]
    Config {
        /// The field.
        field: &'static str,
        /// The rule it breaks.
        why: String,
    },
    /// No preset has this name.
    #[error("unknown preset {name:?}; known: {known}")]
    UnknownPreset {
        /// The name asked for.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
    /// The input does not fit the model.
    #[error("input of shape {got:?} does not fit: {expected}")]
    Input {
        /// What the model takes.
        expected: String,
        /// The input's shape.
        got: Vec<i64>,
    },
    /// A pretrained-weights file could not be used.
    #[error("weights file {file}: {why}")]
    Weights {
        /// The file.
        file: String,
        /// What went wrong.
        why: String,
    },
    /// The quantizer failed.
    #[error(transparent)]
    Quantizer(#[from] vq_tch::VqTchError),
    /// A collective of the data-parallel group failed.
    #[error(transparent)]
    Dist(#[from] vq_dist::DistError),
}

/// `Result` with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// [`ModelError::Config`] for the first field that is zero.
pub(crate) fn require_positive(fields: &[(&'static str, usize)]) -> Result<()> {
    match fields.iter().find(|(_, v)| *v == 0) {
        Some(&(field, _)) => Err(ModelError::Config {
            field,
            why: "must be > 0".into(),
        }),
        None => Ok(()),
    }
}

/// [`ModelError::Config`] unless `image_size` is a positive multiple of `patch_size` (> 0).
pub(crate) fn require_patch_grid(image_size: usize, patch_size: usize) -> Result<()> {
    require_positive(&[("patch_size", patch_size)])?;
    if image_size == 0 || !image_size.is_multiple_of(patch_size) {
        return Err(ModelError::Config {
            field: "image_size",
            why: format!("{image_size} must be a positive multiple of patch_size {patch_size}"),
        });
    }
    Ok(())
}
