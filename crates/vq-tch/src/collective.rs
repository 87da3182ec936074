//! The collective operations a data-parallel [`VectorQuantizer`](crate::VectorQuantizer) needs,
//! as an interface the layer owns: EMA statistics are summed over the ranks, dead-code
//! replacement and k-means draw from the union of the ranks' rows, and k-means' result is
//! broadcast from rank 0. `vq-dist`'s process group (c10d: Gloo on CPU, NCCL on CUDA) implements
//! it; the layer itself builds and runs without any distributed runtime.

use tch::{Device, Tensor};

/// A failed collective (a lost rank, a timeout), as the implementation reports it.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct CollectiveError(#[from] pub Box<dyn std::error::Error + Send + Sync>);

/// The collectives of a data-parallel group. Every rank calls them in the same order with
/// tensors of the same shape (except [`all_gather`](Self::all_gather)'s padding rule, which the
/// layer handles); tensors live on [`device`](Self::device).
pub trait Collective: std::fmt::Debug + Send + Sync {
    /// Number of ranks.
    fn world(&self) -> usize;

    /// The device the group's collectives read and write (CPU for Gloo, this rank's GPU for
    /// NCCL).
    fn device(&self) -> Device;

    /// Sums contiguous `t` over the ranks, in place.
    ///
    /// # Errors
    /// [`CollectiveError`] when the collective fails.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<(), CollectiveError>;

    /// Copies rank `root`'s contiguous `t` into every rank's `t`, in place.
    ///
    /// # Errors
    /// [`CollectiveError`] when the collective fails.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<(), CollectiveError>;

    /// Every rank's `t` (same shape on every rank), stacked in rank order: `(world, t.shape…)`.
    ///
    /// # Errors
    /// [`CollectiveError`] when the collective fails.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError>;
}
