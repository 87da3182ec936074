//! The VQ loss terms and their gradients.
//!
//! * commitment `L_c = mean((e − sg(q))²)`: `∂L_c/∂e = 2(e − q)/(N·D)`, nothing to the codebook;
//! * codebook `L_b = mean((sg(e) − q)²)`: `∂L_b/∂q = 2(q − e)/(N·D)`, nothing to the encoder.
//!
//! Means are over all N·D elements (PyTorch's `F.mse_loss`). The weights follow
//! van den Oord et al.: `β·L_c + L_b` ([`BetaPlacement::Commitment`]); taming-transformers'
//! default `legacy=True` puts β on the codebook term instead, `L_c + β·L_b`
//! ([`BetaPlacement::LegacyCodebook`], the setting of the paper's VQGAN tables). With an EMA
//! codebook the codebook term is dropped ([`CodebookTerm::Exclude`]).

use ndarray::{Array2, ArrayView2, Zip};
use rayon::prelude::*;

use crate::error::{Result, VqError, check_same_shape};

/// Which term β multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum BetaPlacement {
    /// `β·commitment + codebook` (the VQ-VAE paper).
    #[default]
    Commitment,
    /// `commitment + β·codebook` (taming-transformers `legacy=True`).
    LegacyCodebook,
}

/// Whether the codebook is learned by gradient (codebook loss on) or otherwise (EMA: off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CodebookTerm {
    /// The codebook loss is part of the objective.
    #[default]
    Include,
    /// No codebook loss (EMA or fixed codebook).
    Exclude,
}

/// Validated weights of the two loss terms.
///
/// ```
/// use vq_core::{BetaPlacement, CodebookTerm, LossWeights};
/// let w = LossWeights::new(0.25, BetaPlacement::LegacyCodebook, CodebookTerm::Include).unwrap();
/// assert_eq!((w.commitment(), w.codebook()), (1.0, 0.25));
/// let ema = LossWeights::new(0.25, BetaPlacement::Commitment, CodebookTerm::Exclude).unwrap();
/// assert_eq!((ema.commitment(), ema.codebook()), (0.25, 0.0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    commitment: f32,
    codebook: f32,
}

impl LossWeights {
    /// Weights for `beta`, its placement and the codebook term.
    ///
    /// # Errors
    /// [`VqError::InvalidParameter`] if `beta` is negative or not finite.
    pub fn new(beta: f32, placement: BetaPlacement, codebook: CodebookTerm) -> Result<Self> {
        if !(beta.is_finite() && beta >= 0.0) {
            return Err(VqError::InvalidParameter {
                name: "beta",
                value: beta.to_string(),
                reason: "must be finite and >= 0",
            });
        }
        let (c, b) = match placement {
            BetaPlacement::Commitment => (beta, 1.0),
            BetaPlacement::LegacyCodebook => (1.0, beta),
        };
        let b = match codebook {
            CodebookTerm::Include => b,
            CodebookTerm::Exclude => 0.0,
        };
        Ok(Self {
            commitment: c,
            codebook: b,
        })
    }

    /// Weight of the commitment term.
    pub fn commitment(&self) -> f32 {
        self.commitment
    }

    /// Weight of the codebook term (0 when excluded).
    pub fn codebook(&self) -> f32 {
        self.codebook
    }
}

/// Loss values (already weighted) and the scales of their gradients. The gradients are
/// proportional to `e − q`, so they are kept as two scalars and applied where they are consumed
/// (fused into the estimator's backward pass and the codebook scatter), never as N×D arrays.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VqLoss {
    /// `w_c · mean((e − sg(q))²)`.
    pub commitment: f32,
    /// `w_b · mean((sg(e) − q)²)`.
    pub codebook: f32,
    /// `a` in `∂(losses)/∂e = a·(e − q)`: `2 w_c / (N·D)`.
    pub grad_e_scale: f32,
    /// `b` in `∂(losses)/∂q = b·(q − e)`: `2 w_b / (N·D)` (0 when the codebook term is excluded).
    pub grad_q_scale: f32,
}

impl VqLoss {
    /// `∂(losses)/∂e` as an N×D array.
    pub fn grad_e(&self, e: ArrayView2<f32>, q: ArrayView2<f32>) -> Array2<f32> {
        let a = self.grad_e_scale;
        Zip::from(e).and(q).par_map_collect(|&e, &q| a * (e - q))
    }

    /// `∂(losses)/∂q` per row as an N×D array (scatter into the codebook with
    /// [`scatter_add_rows`](crate::scatter_add_rows)).
    pub fn grad_q(&self, e: ArrayView2<f32>, q: ArrayView2<f32>) -> Array2<f32> {
        let b = self.grad_q_scale;
        Zip::from(e).and(q).par_map_collect(|&e, &q| b * (q - e))
    }
}

/// Rows per parallel task (f32 lane sums stay accurate over a block of this size).
const ROWS_PER_TASK: usize = 64;

/// The weighted commitment and codebook losses of `e` and `q` (N×D) and their gradient scales.
///
/// ```
/// use ndarray::array;
/// use vq_core::{vq_loss, BetaPlacement, CodebookTerm, LossWeights};
/// let w = LossWeights::new(0.25, BetaPlacement::Commitment, CodebookTerm::Include).unwrap();
/// let (e, q) = (array![[1.0f32, 3.0]], array![[0.0f32, 1.0]]);
/// let l = vq_loss(e.view(), q.view(), w).unwrap();
/// assert_eq!(l.commitment, 0.25 * 2.5); // mean of 1² and 2²
/// assert_eq!(l.codebook, 2.5);
/// assert_eq!(l.grad_e(e.view(), q.view()), array![[0.25, 0.5]]); // 0.25 · 2(e − q)/2
/// ```
///
/// # Errors
/// [`VqError::ShapeMismatch`] if the shapes differ.
pub fn vq_loss(e: ArrayView2<f32>, q: ArrayView2<f32>, weights: LossWeights) -> Result<VqLoss> {
    check_same_shape(e, q, "codes vs inputs")?;
    let n = (e.len().max(1)) as f64;
    let d = e.ncols().max(1);
    let (e, q) = (e.as_standard_layout(), q.as_standard_layout());
    let (es, qs) = (
        e.as_slice().expect("standard layout"),
        q.as_slice().expect("standard layout"),
    );
    // Σ(e − q)²: f32 lanes within a block of rows, f64 across blocks.
    let block = ROWS_PER_TASK * d;
    let sq: f64 = es
        .par_chunks(block)
        .zip(qs.par_chunks(block))
        .map(|(a, b)| {
            let mut lanes = [0f32; 8];
            let whole = a.len() / 8 * 8;
            for (ac, bc) in a[..whole].chunks_exact(8).zip(b[..whole].chunks_exact(8)) {
                for l in 0..8 {
                    let d = ac[l] - bc[l];
                    lanes[l] += d * d;
                }
            }
            let tail: f64 = a[whole..]
                .iter()
                .zip(&b[whole..])
                .map(|(&a, &b)| f64::from(a - b).powi(2))
                .sum();
            lanes.iter().map(|&v| f64::from(v)).sum::<f64>() + tail
        })
        .sum();
    let mse = sq / n;
    Ok(VqLoss {
        commitment: (f64::from(weights.commitment) * mse) as f32,
        codebook: (f64::from(weights.codebook) * mse) as f32,
        grad_e_scale: (2.0 * f64::from(weights.commitment) / n) as f32,
        grad_q_scale: (2.0 * f64::from(weights.codebook) / n) as f32,
    })
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::randn;

    fn total(e: &Array2<f32>, q: &Array2<f32>, w: LossWeights) -> f64 {
        let l = vq_loss(e.view(), q.view(), w).unwrap();
        f64::from(l.commitment) + f64::from(l.codebook)
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (e, q) = (randn((4, 3), 1), randn((4, 3), 2));
        for (beta, placement) in [
            (0.25, BetaPlacement::Commitment),
            (0.25, BetaPlacement::LegacyCodebook),
            (2.0, BetaPlacement::Commitment),
        ] {
            let w = LossWeights::new(beta, placement, CodebookTerm::Include).unwrap();
            let l = vq_loss(e.view(), q.view(), w).unwrap();
            let (lge, lgq) = (l.grad_e(e.view(), q.view()), l.grad_q(e.view(), q.view()));
            // The commitment part only depends on e through e and the codebook part only on q;
            // finite differences of the commitment term alone (codebook term excluded).
            let wc = LossWeights { codebook: 0.0, ..w };
            let wb = LossWeights {
                commitment: 0.0,
                ..w
            };
            let h = 1e-2f32;
            for i in 0..4 {
                for j in 0..3 {
                    let (mut ep, mut em) = (e.clone(), e.clone());
                    ep[[i, j]] += h;
                    em[[i, j]] -= h;
                    let fd = (total(&ep, &q, wc) - total(&em, &q, wc)) / f64::from(2.0 * h);
                    assert!(
                        (fd - f64::from(lge[[i, j]])).abs() < 1e-4,
                        "∂/∂e {fd} vs {}",
                        lge[[i, j]]
                    );
                    let (mut qp, mut qm) = (q.clone(), q.clone());
                    qp[[i, j]] += h;
                    qm[[i, j]] -= h;
                    let fd = (total(&e, &qp, wb) - total(&e, &qm, wb)) / f64::from(2.0 * h);
                    assert!(
                        (fd - f64::from(lgq[[i, j]])).abs() < 1e-4,
                        "∂/∂q {fd} vs {}",
                        lgq[[i, j]]
                    );
                }
            }
        }
    }

    #[test]
    fn placement_and_exclusion() {
        let e = ndarray::array![[2.0f32, 0.0]];
        let q = ndarray::array![[0.0f32, 0.0]];
        let legacy =
            LossWeights::new(0.25, BetaPlacement::LegacyCodebook, CodebookTerm::Include).unwrap();
        let l = vq_loss(e.view(), q.view(), legacy).unwrap();
        assert_eq!((l.commitment, l.codebook), (2.0, 0.5));
        let ema = LossWeights::new(1.0, BetaPlacement::Commitment, CodebookTerm::Exclude).unwrap();
        let l = vq_loss(e.view(), q.view(), ema).unwrap();
        assert_eq!((l.commitment, l.codebook), (2.0, 0.0));
        assert_eq!(l.grad_q_scale, 0.0);
        assert!(LossWeights::new(-1.0, BetaPlacement::Commitment, CodebookTerm::Include).is_err());
        assert!(
            LossWeights::new(f32::NAN, BetaPlacement::Commitment, CodebookTerm::Include).is_err()
        );
        assert!(vq_loss(e.view(), ndarray::array![[1.0f32]].view(), ema).is_err());
    }
}
