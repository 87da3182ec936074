//! # vq-core
//!
//! The maths of vector-quantized autoencoders with the **rotation trick** (Fifty et al.,
//! "Restructuring Vector Quantization with the Rotation Trick", ICLR 2025), in pure `ndarray`:
//!
//! * [`CodebookIndex`] / [`nearest_codes`]: fused, tiled, multi-threaded nearest-code search
//!   (Euclidean or cosine) that never materialises the N×K distance matrix and re-ranks near
//!   ties exactly;
//! * [`Estimator`]: straight-through, rotation trick (`λRᵀg` via two Householder reflections),
//!   the A.9 no-rescale and A.8 reflection variants, with [`RowMap`] exposing the per-row map;
//! * [`vq_loss`]: commitment and codebook losses with their gradients ([`LossWeights`]);
//! * [`EmaCodebook`], [`kmeans`]: codebook learning by EMA with Laplace smoothing, k-means
//!   initialisation, dead-code replacement;
//! * metrics: [`code_counts`], [`codebook_usage`], [`perplexity`], [`quantization_error`];
//! * [`Quantizer`]: a whole VQ layer step, forward and backward;
//! * [`family`]: residual VQ, multi-head VQ, SimVQ and FSQ, built from the one-layer step;
//! * [`gumbel`]: Gumbel-softmax quantization (the paper's Gumbel VQ-VAE / VQGAN baselines);
//! * the quantizers that followed the rotation trick: [`diveq`] (DiVeQ, SF-DiVeQ), [`ibq`]
//!   (index backpropagation), [`lfq`] (LFQ, BSQ and their entropy penalty), [`scq`] (soft
//!   convex quantization), each with the formula, its source and where the rotation trick can
//!   apply;
//! * [`toy`]: the paper's 2-D experiments (Himmelblau simulation, Voronoi push/pull).
//!
//! Data are f32, row-major: encoder outputs `e` are N×D, codebooks K×D. No I/O, no libtorch.
//!
//! ```
//! use ndarray::array;
//! use vq_core::{quantize, Estimator, Metric};
//!
//! let codebook = array![[1.0f32, 0.0], [0.0, 1.0], [-1.0, 0.0]];
//! let e = array![[2.0f32, 0.5], [-0.5, -0.1]];
//! let (idx, q) = quantize(e.view(), codebook.view(), Metric::Euclidean).unwrap();
//! assert_eq!(idx.to_vec(), vec![0, 2]);
//! let grad_q = array![[0.0f32, 1.0], [1.0, 0.0]];
//! let grad_e = Estimator::Rotation.backward(e.view(), q.view(), grad_q.view()).unwrap();
//! // The rotation trick preserves the gradient's angle to the vector and scales by ‖q‖/‖e‖.
//! let norm = |v: ndarray::ArrayView1<f32>| v.dot(&v).sqrt();
//! let lambda = norm(q.row(0)) / norm(e.row(0));
//! assert!((norm(grad_e.row(0)) - lambda * norm(grad_q.row(0))).abs() < 1e-5);
//! ```

// Lane loops index several fixed-size arrays in step; that form is what auto-vectorises.
#![allow(clippy::needless_range_loop)]

mod codebook;
pub mod diveq;
mod error;
mod estimator;
pub mod exact;
pub mod family;
pub mod gumbel;
pub mod ibq;
mod layer;
pub mod lfq;
mod loss;
mod metrics;
pub mod scq;
mod search;
pub mod toy;

pub use codebook::{
    EmaCodebook, EmaConfig, EmaStatistics, EmaUpdate, L2_NORM_EPS, kmeans, l2_normalise_rows,
    replacement_rows, scatter_add_rows,
};
pub use error::{Result, VqError};
pub use estimator::{DIRECTION_EPS, Estimator, NORM_EPS, RowMap};
pub use layer::{Quantizer, QuantizerBackward, QuantizerForward};
pub use loss::{BetaPlacement, CodebookTerm, LossWeights, VqLoss, vq_loss};
pub use metrics::{code_counts, codebook_usage, perplexity, quantization_error};
pub use search::{CodebookIndex, Metric, gather_codes, nearest_codes, quantize};

#[cfg(test)]
mod testutil;
