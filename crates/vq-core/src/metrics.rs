//! Codebook metrics: per-code counts, usage, perplexity, quantization error.

use std::collections::HashSet;

use ndarray::{ArrayView2, Zip};

use crate::error::{Result, VqError, check_indices, check_same_shape};

/// How many times each of the `k` codes was chosen.
///
/// # Errors
/// [`VqError::IndexOutOfRange`].
pub fn code_counts(indices: &[u32], k: usize) -> Result<Vec<u64>> {
    check_indices(indices, k)?;
    let mut counts = vec![0u64; k];
    for &i in indices {
        counts[i as usize] += 1;
    }
    Ok(counts)
}

/// Perplexity `exp(−Σ_k p_k ln p_k)` of the code distribution `p_k = n_k / Σ n` (between 1 and
/// the number of codes used; 0 for no assignments).
///
/// ```
/// assert!((vq_core::perplexity(&[5, 5, 0, 0]) - 2.0).abs() < 1e-12);
/// ```
pub fn perplexity(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let t = total as f64;
    let h: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / t;
            -p * p.ln()
        })
        .sum();
    h.exp()
}

/// Codebook usage the way the paper reports it: the indices are split into consecutive groups of
/// `group_len` (= codes per input × inputs per group, e.g. 16·16 codes × 256 images), the fraction
/// of the `k` codes used in each group is computed, and the fractions are averaged over groups
/// (a shorter last group counts as one group).
///
/// ```
/// // Two groups of 4 indices with K = 4: {0,1} used, then {0,1,2,3} used.
/// let u = vq_core::codebook_usage(&[0, 1, 0, 1, 0, 1, 2, 3], 4, 4).unwrap();
/// assert!((u - 0.75).abs() < 1e-12);
/// ```
///
/// # Errors
/// [`VqError::IndexOutOfRange`]; [`VqError::InvalidParameter`] if `group_len` = 0 or `k` = 0.
pub fn codebook_usage(indices: &[u32], k: usize, group_len: usize) -> Result<f64> {
    if group_len == 0 || k == 0 {
        return Err(VqError::InvalidParameter {
            name: if k == 0 { "k" } else { "group_len" },
            value: "0".into(),
            reason: "must be > 0",
        });
    }
    check_indices(indices, k)?;
    if indices.is_empty() {
        return Ok(0.0);
    }
    let mut seen = HashSet::with_capacity(k.min(group_len));
    let mut sum = 0.0;
    let mut groups = 0usize;
    for chunk in indices.chunks(group_len) {
        seen.clear();
        seen.extend(chunk.iter().copied());
        sum += seen.len() as f64 / k as f64;
        groups += 1;
    }
    Ok(sum / groups as f64)
}

/// Quantization error: the mean over rows of `‖e − q‖²` (e, q: N×D). Divide by D for the
/// per-element mean.
///
/// ```
/// use ndarray::array;
/// let qe = vq_core::quantization_error(array![[1.0f32, 1.0], [0.0, 0.0]].view(), array![[0.0f32, 0.0], [0.0, 2.0]].view()).unwrap();
/// assert_eq!(qe, 3.0); // (2 + 4) / 2
/// ```
///
/// # Errors
/// [`VqError::ShapeMismatch`] if the shapes differ.
pub fn quantization_error(e: ArrayView2<f32>, q: ArrayView2<f32>) -> Result<f64> {
    check_same_shape(e, q, "codes vs inputs")?;
    if e.nrows() == 0 {
        return Ok(0.0);
    }
    let mut s = 0f64;
    Zip::from(e).and(q).for_each(|&a, &b| {
        let d = f64::from(a) - f64::from(b);
        s += d * d;
    });
    Ok(s / e.nrows() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_perplexity_usage() {
        assert_eq!(code_counts(&[0, 2, 2, 1, 2], 4).unwrap(), vec![1, 1, 3, 0]);
        assert!(matches!(
            code_counts(&[5], 4),
            Err(VqError::IndexOutOfRange { index: 5, .. })
        ));
        // Uniform over K codes: perplexity K.
        assert!((perplexity(&[7; 16]) - 16.0).abs() < 1e-9);
        assert_eq!(perplexity(&[0, 9, 0]), 1.0);
        assert_eq!(perplexity(&[]), 0.0);
        // Groups of 3 with K = 3: {0}, {0,1,2}, last partial group {2}.
        let u = codebook_usage(&[0, 0, 0, 0, 1, 2, 2], 3, 3).unwrap();
        assert!((u - (1.0 / 3.0 + 1.0 + 1.0 / 3.0) / 3.0).abs() < 1e-12);
        // Each zero is named.
        for (k, group, name) in [(3, 0, "group_len"), (0, 3, "k")] {
            match codebook_usage(&[], k, group) {
                Err(VqError::InvalidParameter { name: n, .. }) => assert_eq!(n, name),
                other => panic!("k {k}, group {group}: {other:?}"),
            }
        }
    }
}
