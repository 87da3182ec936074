//! One VQ layer step on ndarray data: search + gather + estimator + losses, forward and backward.
//! This is what `vq-tch` runs on tensors and what the benchmarks time.

use ndarray::{Array1, Array2, ArrayView2};

use crate::error::Result;
use crate::estimator::Estimator;
use crate::loss::{LossWeights, VqLoss, vq_loss};
use crate::search::{CodebookIndex, Metric, gather_codes};

/// A vector-quantization layer: lookup metric, gradient estimator, loss weights.
///
/// ```
/// use ndarray::array;
/// use vq_core::{BetaPlacement, CodebookTerm, Estimator, LossWeights, Metric, Quantizer};
///
/// let vq = Quantizer {
///     metric: Metric::Euclidean,
///     estimator: Estimator::Rotation,
///     loss: LossWeights::new(0.25, BetaPlacement::Commitment, CodebookTerm::Include).unwrap(),
/// };
/// let codebook = array![[1.0f32, 0.0], [0.0, 1.0]];
/// let e = array![[0.9f32, 0.2], [0.1, 2.0]];
/// let fwd = vq.forward(e.view(), codebook.view()).unwrap();
/// assert_eq!(fwd.indices.to_vec(), vec![0, 1]);
/// let grad_out = array![[1.0f32, 0.0], [0.0, 1.0]];
/// let bwd = vq.backward(e.view(), codebook.view(), &fwd, grad_out.view()).unwrap();
/// assert_eq!(bwd.grad_e.dim(), (2, 2));
/// assert_eq!(bwd.grad_codebook.unwrap().dim(), (2, 2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantizer {
    /// Nearest-code metric.
    pub metric: Metric,
    /// Gradient estimator.
    pub estimator: Estimator,
    /// Loss weights.
    pub loss: LossWeights,
}

/// Result of [`Quantizer::forward`].
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizerForward {
    /// Chosen code per row.
    pub indices: Array1<u32>,
    /// `q` = the layer's output value (N×D).
    pub quantized: Array2<f32>,
    /// Loss values and their gradients.
    pub loss: VqLoss,
}

/// Result of [`Quantizer::backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizerBackward {
    /// `∂L/∂e`: the estimator's gradient plus the commitment gradient.
    pub grad_e: Array2<f32>,
    /// `∂L/∂codebook` (K×D) from the codebook loss; `None` when its weight is 0.
    pub grad_codebook: Option<Array2<f32>>,
}

impl Quantizer {
    /// Search, gather and losses for encoder outputs `e` (N×D).
    ///
    /// # Errors
    /// Shape, emptiness and finiteness errors of the inputs.
    pub fn forward(
        &self,
        e: ArrayView2<f32>,
        codebook: ArrayView2<f32>,
    ) -> Result<QuantizerForward> {
        let indices = CodebookIndex::new(codebook, self.metric)?.search(e)?;
        let quantized = gather_codes(codebook, indices.as_slice().expect("contiguous"))?;
        let loss = vq_loss(e, quantized.view(), self.loss)?;
        Ok(QuantizerForward {
            indices,
            quantized,
            loss,
        })
    }

    /// Gradients given `grad_out = ∂L/∂q̃` from the layers above (`e`, `codebook` as passed to
    /// [`forward`](Self::forward)). One fused pass over the rows for `∂L/∂e`; the codebook
    /// gradient comes from per-code sums of `e`, never from an N×D array.
    ///
    /// # Errors
    /// [`crate::VqError::ShapeMismatch`] if `grad_out` does not match `e`.
    pub fn backward(
        &self,
        e: ArrayView2<f32>,
        codebook: ArrayView2<f32>,
        fwd: &QuantizerForward,
        grad_out: ArrayView2<f32>,
    ) -> Result<QuantizerBackward> {
        let k = codebook.nrows();
        let q = fwd.quantized.view();
        let mut grad_e = Array2::from_elem(e.raw_dim(), 0.0);
        self.estimator.backward_with_commitment_into(
            e,
            q,
            grad_out,
            fwd.loss.grad_e_scale,
            grad_e.view_mut(),
        )?;
        let grad_codebook = if self.loss.codebook() > 0.0 {
            // ∂/∂c_k = b·Σ_{i→k}(q_i − e_i) = b·(n_k c_k − Σ_{i→k} e_i).
            let (counts, sums) = crate::codebook::counts_and_sums(
                e,
                fwd.indices.as_slice().expect("contiguous"),
                k,
            )?;
            let b = fwd.loss.grad_q_scale;
            let mut grad = sums;
            for ((mut g, &n), code) in grad
                .rows_mut()
                .into_iter()
                .zip(&counts)
                .zip(codebook.rows())
            {
                g.zip_mut_with(&code, |s, &c| *s = b * (n as f32 * c - *s));
            }
            Some(grad)
        } else {
            None
        };
        Ok(QuantizerBackward {
            grad_e,
            grad_codebook,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{BetaPlacement, CodebookTerm};
    use crate::testutil::randn;

    #[test]
    fn fused_backward_equals_the_sum_of_its_parts() {
        let (e, cb, g) = (randn((300, 6), 1), randn((17, 6), 2), randn((300, 6), 3));
        for estimator in Estimator::ALL {
            for term in [CodebookTerm::Include, CodebookTerm::Exclude] {
                let loss = LossWeights::new(0.25, BetaPlacement::Commitment, term).unwrap();
                let vq = Quantizer {
                    metric: Metric::Euclidean,
                    estimator,
                    loss,
                };
                let fwd = vq.forward(e.view(), cb.view()).unwrap();
                let bwd = vq.backward(e.view(), cb.view(), &fwd, g.view()).unwrap();
                let q = fwd.quantized.view();
                let expect = estimator.backward(e.view(), q, g.view()).unwrap()
                    + fwd.loss.grad_e(e.view(), q);
                assert!(
                    (&bwd.grad_e - &expect).iter().all(|v| v.abs() < 1e-6),
                    "{estimator:?}"
                );
                match term {
                    CodebookTerm::Include => {
                        let idx = fwd.indices.as_slice().unwrap();
                        let expect = scatter_add_rows_ref(&fwd.loss.grad_q(e.view(), q), idx, 17);
                        let got = bwd.grad_codebook.unwrap();
                        assert!((&got - &expect).iter().all(|v| v.abs() < 1e-6));
                    }
                    CodebookTerm::Exclude => assert!(bwd.grad_codebook.is_none()),
                }
            }
        }
    }

    fn scatter_add_rows_ref(rows: &Array2<f32>, idx: &[u32], k: usize) -> Array2<f32> {
        let mut out = Array2::zeros((k, rows.ncols()));
        for (r, &i) in rows.rows().into_iter().zip(idx) {
            let mut o = out.row_mut(i as usize);
            o += &r;
        }
        out
    }
}
