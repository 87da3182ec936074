//! The one error type of `vq-core`.

/// Errors returned by `vq-core` for bad user data or parameters. The maths never panics on user
/// input; every check happens once, at the API boundary.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum VqError {
    /// Two arrays that must agree in one dimension do not.
    #[error("shape mismatch: {what}: expected {expected}, got {got}")]
    ShapeMismatch {
        /// Which quantity disagrees (e.g. "codebook dim vs input dim").
        what: &'static str,
        /// The size implied by the other argument.
        expected: usize,
        /// The size that was passed.
        got: usize,
    },
    /// The codebook has no codes (K = 0) or codes of zero dimension.
    #[error("empty codebook: {k} codes of dimension {d}")]
    EmptyCodebook {
        /// Number of codes.
        k: usize,
        /// Code dimension.
        d: usize,
    },
    /// An input contains NaN or an infinity.
    #[error("non-finite value in {what} at row {row}")]
    NonFinite {
        /// Which argument.
        what: &'static str,
        /// First row holding a non-finite value.
        row: usize,
    },
    /// A result whose exact value is finite but beyond f32's range (e.g. a rotation-trick
    /// gradient λ‖g‖ > 3.4e38 from finite inputs): reported instead of an infinity.
    #[error("{what} at row {row} exceeds f32's range (its exact value is larger than {max:e})", max = f32::MAX)]
    Overflow {
        /// Which result.
        what: &'static str,
        /// First row whose result overflows.
        row: usize,
    },
    /// A code index is out of range for the codebook.
    #[error("code index {index} at position {position} is out of range for {k} codes")]
    IndexOutOfRange {
        /// The offending index.
        index: u32,
        /// Its position in the index array.
        position: usize,
        /// Codebook size.
        k: usize,
    },
    /// A hyper-parameter is outside its valid range.
    #[error("invalid parameter {name} = {value}: {reason}")]
    InvalidParameter {
        /// Parameter name.
        name: &'static str,
        /// Offending value, formatted.
        value: String,
        /// What the valid range is.
        reason: &'static str,
    },
}

/// `Result` with [`VqError`].
pub type Result<T, E = VqError> = std::result::Result<T, E>;

/// `Err(IndexOutOfRange)` for the first index that is not below `k`.
pub(crate) fn check_indices(indices: &[u32], k: usize) -> Result<()> {
    match indices.iter().enumerate().find(|(_, i)| **i as usize >= k) {
        Some((position, &index)) => Err(VqError::IndexOutOfRange { index, position, k }),
        None => Ok(()),
    }
}

/// `Err(ShapeMismatch)` unless `a` and `b` have the same rows and columns (rows checked first).
pub(crate) fn check_same_shape(
    a: ndarray::ArrayView2<f32>,
    b: ndarray::ArrayView2<f32>,
    what: &'static str,
) -> Result<()> {
    for (expected, got) in [(a.nrows(), b.nrows()), (a.ncols(), b.ncols())] {
        if expected != got {
            return Err(VqError::ShapeMismatch {
                what,
                expected,
                got,
            });
        }
    }
    Ok(())
}
