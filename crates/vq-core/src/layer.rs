//! One VQ layer step on ndarray data: search + gather + estimator + losses, forward and backward.
//! This is what `vq-tch` runs on tensors and what the benchmarks time.

use ndarray::{Array1, Array2, ArrayView2};

use crate::codebook::scatter_add_rows;
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
/// let bwd = vq.backward(e.view(), &fwd, grad_out.view(), codebook.nrows()).unwrap();
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
    pub fn forward(&self, e: ArrayView2<f32>, codebook: ArrayView2<f32>) -> Result<QuantizerForward> {
        let indices = CodebookIndex::new(codebook, self.metric)?.search(e)?;
        let quantized = gather_codes(codebook, indices.as_slice().expect("contiguous"))?;
        let loss = vq_loss(e, quantized.view(), self.loss)?;
        Ok(QuantizerForward { indices, quantized, loss })
    }

    /// Gradients given `grad_out = ∂L/∂q̃` from the layers above; `k` is the codebook size.
    ///
    /// # Errors
    /// [`crate::VqError::ShapeMismatch`] if `grad_out` does not match `e`.
    pub fn backward(
        &self,
        e: ArrayView2<f32>,
        fwd: &QuantizerForward,
        grad_out: ArrayView2<f32>,
        k: usize,
    ) -> Result<QuantizerBackward> {
        let mut grad_e = self.estimator.backward(e, fwd.quantized.view(), grad_out)?;
        grad_e += &fwd.loss.grad_e;
        let grad_codebook = if self.loss.codebook() > 0.0 {
            Some(scatter_add_rows(fwd.loss.grad_q.view(), fwd.indices.as_slice().expect("contiguous"), k)?)
        } else {
            None
        };
        Ok(QuantizerBackward { grad_e, grad_codebook })
    }
}
