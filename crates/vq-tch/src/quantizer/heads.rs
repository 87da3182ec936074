//! Multi-head VQ ([`Family::MultiHead`](super::Family::MultiHead), the formulas of
//! [`vq_core::family`]): the D columns in blocks, quantized by one shared or one codebook per
//! head.

use tch::{Kind, Tensor, nn};

use super::config::{Family, HeadCodebooks, VectorQuantizerConfig};
use super::pass::{Batch, Part, Rows, Settings, merge_verdicts};
use crate::error::Result;

/// The heads' nearest-code layers (`head`, or `head{h}` for separate codebooks).
#[derive(Debug)]
pub(super) struct Heads<P> {
    pub(super) heads: Vec<P>,
    /// The layer's own `codebook`: empty (0, D), the codes are the heads'.
    pub(super) no_codes: Tensor,
}

impl<P: Part> Heads<P> {
    /// The heads' layers (built under `path`).
    pub(super) fn new(path: &nn::Path, config: &VectorQuantizerConfig, heads: Vec<P>) -> Self {
        Self {
            heads,
            no_codes: Tensor::zeros(
                [0, config.codebook_dim as i64],
                (Kind::Float, path.device()),
            ),
        }
    }

    /// How the heads share codebooks.
    fn codebooks(settings: Settings<'_>) -> (usize, HeadCodebooks) {
        match settings.config.family {
            Family::MultiHead { heads, codebooks } => (heads, codebooks),
            _ => unreachable!("the heads' state exists for the multi-head family only"),
        }
    }

    /// A shared codebook quantizes the (N·H, D/H) rows in one pass (whose mean losses are the
    /// heads' mean); separate codebooks take a block each and their losses are averaged.
    pub(super) fn rows(&mut self, settings: Settings<'_>, batch: Batch<'_>) -> Result<Rows> {
        let (heads, codebooks) = Self::codebooks(settings);
        let e = batch.e;
        let (n, d) = (e.size()[0], e.size()[1]);
        let h = heads as i64;
        let dh = d / h;
        if codebooks == HeadCodebooks::Shared {
            let r = self.heads[0].rows(Batch {
                e: &e.reshape([n * h, dh]),
                per_sample: batch.per_sample * h,
                ..batch
            })?;
            return Ok(Rows {
                out: r.out.reshape([n, d]),
                codes: r.codes.reshape([n, d]),
                idx: r.idx.reshape([n, h]),
                ..r
            });
        }
        let mut parts = Vec::new();
        let mut verdict = None;
        for (i, head) in self.heads.iter_mut().enumerate() {
            let block = e.narrow(1, i as i64 * dh, dh).contiguous();
            let mut r = head.rows(Batch { e: &block, ..batch })?;
            verdict = merge_verdicts(verdict, r.finite_verdict.take());
            parts.push(r);
        }
        let mean = |f: fn(&Rows) -> &Tensor| {
            parts
                .iter()
                .fold(Tensor::zeros([], (Kind::Float, e.device())), |acc, r| {
                    acc + f(r)
                })
                / h as f64
        };
        let cat = |f: fn(&Rows) -> &Tensor, dim| {
            Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), dim)
        };
        let stack = Tensor::stack(&parts.iter().map(|r| &r.idx).collect::<Vec<_>>(), 1);
        Ok(Rows {
            out: cat(|r| &r.out, 1),
            codes: cat(|r| &r.codes, 1),
            idx: stack,
            commitment_loss: mean(|r| &r.commitment_loss),
            codebook_loss: mean(|r| &r.codebook_loss),
            quantization_error: mean(|r| &r.quantization_error),
            finite_verdict: verdict,
        })
    }

    /// The codes (M, D) of index rows (M, G): the heads' codes side by side.
    pub(super) fn embed(&self, flat: &Tensor) -> Tensor {
        let m = flat.size()[0];
        match self.heads.as_slice() {
            [shared] if flat.size()[1] > 1 => shared.pick(&flat.reshape([-1])).reshape([m, -1]),
            heads => Tensor::cat(
                &heads
                    .iter()
                    .enumerate()
                    .map(|(i, head)| head.pick(&flat.select(1, i as i64)))
                    .collect::<Vec<_>>(),
                1,
            ),
        }
    }
}
