//! What a family's forward reads and returns, shared by the layer and every family's file:
//! the layer's settings, the batch of rows, the rows' result, and the interface of the
//! nearest-code parts that residual and multi-head layers are made of.

use tch::{Device, Kind, Tensor, nn};

use super::config::VectorQuantizerConfig;
use crate::collective::Collective;
use crate::error::{Result, VqTchError};
use crate::search::{FiniteCheck, FiniteVerdict};

/// What a family's rows read from the layer that holds them.
#[derive(Clone, Copy)]
pub(super) struct Settings<'a> {
    pub(super) config: &'a VectorQuantizerConfig,
    pub(super) finite_check: FiniteCheck,
    pub(super) group: Option<&'a dyn Collective>,
}

/// The rows of one forward pass: `e` (N, D) in code space.
#[derive(Clone, Copy)]
pub(super) struct Batch<'a> {
    pub(super) e: &'a Tensor,
    pub(super) train: bool,
    /// Rows per sample: a data-parallel union batch interleaves whole samples.
    pub(super) per_sample: i64,
}

/// The rows' part of a forward pass, before the layout is restored.
pub(super) struct Rows {
    pub(super) out: Tensor,
    /// The codes `q` (detached), (N, D).
    pub(super) codes: Tensor,
    pub(super) idx: Tensor,
    pub(super) commitment_loss: Tensor,
    pub(super) codebook_loss: Tensor,
    pub(super) quantization_error: Tensor,
    pub(super) finite_verdict: Option<FiniteVerdict>,
}

/// A counter variable (EMA steps, Gumbel draws) read back to the host.
pub(super) fn read_counter(t: &Tensor) -> Result<i64> {
    i64::try_from(t).map_err(|err| VqTchError::Torch(err.to_string()))
}

/// The `initialised` flag (1) of a layer with codes of its own that needs no k-means start:
/// every such layer stores it, so the checkpoints of every family have the same layout.
pub(super) fn mark_initialised(path: &nn::Path) {
    let _ = path.add("initialised", scalar(1, path.device()), false);
}

/// A scalar i64 on `device`.
pub(super) fn scalar(v: i64, device: Device) -> Tensor {
    Tensor::from(v).to_device(device)
}

/// The first failing of two deferred verdicts (a verdict whose flags are all 0 gives way).
pub(super) fn merge_verdicts(
    a: Option<FiniteVerdict>,
    b: Option<FiniteVerdict>,
) -> Option<FiniteVerdict> {
    match (a, b) {
        (Some(a), Some(b)) => {
            let bad = a.0.narrow(0, 0, 2).sum(Kind::Int64).gt(0);
            Some(FiniteVerdict(a.0.where_self(&bad, &b.0)))
        }
        (a, None) => a,
        (None, b) => b,
    }
}

/// A nearest-code layer as a residual or multi-head layer uses its parts.
pub(super) trait Part {
    /// Quantizes rows by the part's own codebook.
    fn rows(&mut self, batch: Batch<'_>) -> Result<Rows>;

    /// The codes of indices `idx` (M), detached.
    fn pick(&self, idx: &Tensor) -> Tensor;
}

/// Batch statistics over the ranks of a group: `sums` (1-D tensors of this rank's sums over its
/// rows, differentiable) become tensors whose value is the sum over every rank and whose
/// gradient is the world size × this rank's (so that the trainer's gradient averaging gives one
/// process's gradient on the union batch), with the union's row count `(1)` f32. Alone: `sums`
/// and this rank's `rows`.
pub(super) fn union_sums(
    group: Option<&dyn Collective>,
    sums: &[Tensor],
    rows: i64,
) -> Result<(Vec<Tensor>, Tensor)> {
    let device = sums[0].device();
    let count = Tensor::from_slice(&[rows as f32]).to_device(device);
    let Some(g) = group else {
        return Ok((sums.iter().map(Tensor::shallow_clone).collect(), count));
    };
    let mut parts: Vec<Tensor> = sums.iter().map(Tensor::detach).collect();
    parts.push(count);
    let total = Tensor::cat(&parts, 0).to_device(g.device()).contiguous();
    g.all_reduce_sum(&total)?;
    let total = total.to_device(device);
    let w = g.world() as f64;
    let mut at = 0;
    let mut out = Vec::with_capacity(sums.len());
    for t in sums {
        let n = t.size()[0];
        out.push(t * w - (t * w).detach() + total.narrow(0, at, n));
        at += n;
    }
    Ok((out, total.narrow(0, at, 1)))
}
