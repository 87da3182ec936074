//! The rows' part of the forward pass per [`Family`]: the residual, multi-head and FSQ layers
//! (the formulas of [`vq_core::family`]); nearest-code and Gumbel rows are in the parent.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Reduction, Tensor};

use super::{
    Family, FsqLevels, HeadCodebooks, Rows, STAGE_DROPOUT_SALT, StageDropout, VectorQuantizer,
    read_counter,
};
use crate::error::Result;
use crate::search::{FiniteCheck, FiniteVerdict, check_finite_device, finite_verdict};

impl VectorQuantizer {
    /// Quantizes rows `e` (N, D) by the layer's family (k-means initialisation first, when an
    /// EMA codebook asks for it).
    pub(super) fn rows(&mut self, e: &Tensor, train: bool, per_sample: i64) -> Result<Rows> {
        match self.config.family {
            Family::Nearest | Family::SimVq => {
                if train && self.kmeans_pending() {
                    self.kmeans_init(e, per_sample)?;
                }
                self.nearest_rows(e, train, per_sample)
            }
            Family::Gumbel { .. } => self.gumbel_rows(e, train),
            Family::Fsq { levels } => self.fsq_rows(e, levels),
            Family::Residual { stages, dropout } => {
                let active = self.active_stages(stages, dropout, train)?;
                self.residual_rows(e, train, per_sample, active)
            }
            Family::MultiHead { heads, codebooks } => {
                self.head_rows(e, train, per_sample, heads, codebooks)
            }
        }
    }

    /// How many stages this forward runs: all, or a draw of [`StageDropout::On`] in training.
    fn active_stages(&self, stages: usize, dropout: StageDropout, train: bool) -> Result<usize> {
        let (StageDropout::On { min_stages }, true, Some(draws)) =
            (dropout, train, &self.stage_draws)
        else {
            return Ok(stages);
        };
        let draw = read_counter(draws)?;
        let seed = (self.config.seed ^ STAGE_DROPOUT_SALT).wrapping_add(draw as u64);
        let _ = tch::no_grad(|| draws.shallow_clone().g_add_scalar_(1));
        Ok(StdRng::seed_from_u64(seed).gen_range(min_stages..=stages))
    }

    /// Residual VQ: stage g quantizes `r_g = r_{g−1} − q_{g−1}` (the codes detached, so
    /// `∂r_g/∂e = I`); the outputs and the losses add. Stages past `active` give index −1.
    // `a += b` on tch tensors is in place (`add_`); these sums build new graph nodes.
    #[allow(clippy::assign_op_pattern)]
    fn residual_rows(
        &mut self,
        e: &Tensor,
        train: bool,
        per_sample: i64,
        active: usize,
    ) -> Result<Rows> {
        let n = e.size()[0];
        let zero = || Tensor::zeros([], (Kind::Float, e.device()));
        let mut residual = e.shallow_clone();
        let (mut out, mut codes) = (e.zeros_like(), e.zeros_like());
        let (mut commitment_loss, mut codebook_loss) = (zero(), zero());
        let (mut idx, mut verdict) = (Vec::new(), None);
        for (g, part) in self.parts.iter_mut().enumerate() {
            if g >= active {
                idx.push(Tensor::full([n], -1, (Kind::Int64, e.device())));
                continue;
            }
            let r = part.rows(&residual, train, per_sample)?;
            residual = &residual - &r.codes;
            out = out + r.out;
            codes = codes + &r.codes;
            commitment_loss = commitment_loss + r.commitment_loss;
            codebook_loss = codebook_loss + r.codebook_loss;
            verdict = merge_verdicts(verdict, r.finite_verdict);
            idx.push(r.idx);
        }
        let quantization_error = e.detach().mse_loss(&codes, Reduction::Mean);
        Ok(Rows {
            out,
            codes,
            idx: Tensor::stack(&idx, 1),
            commitment_loss,
            codebook_loss,
            quantization_error,
            finite_verdict: verdict,
        })
    }

    /// Multi-head VQ: the D columns in `heads` blocks. A shared codebook quantizes the
    /// (N·H, D/H) rows in one pass (whose mean losses are the heads' mean); separate codebooks
    /// take a block each and their losses are averaged.
    fn head_rows(
        &mut self,
        e: &Tensor,
        train: bool,
        per_sample: i64,
        heads: usize,
        codebooks: HeadCodebooks,
    ) -> Result<Rows> {
        let (n, d) = (e.size()[0], e.size()[1]);
        let h = heads as i64;
        let dh = d / h;
        if codebooks == HeadCodebooks::Shared {
            let r = self.parts[0].rows(&e.reshape([n * h, dh]), train, per_sample * h)?;
            return Ok(Rows {
                out: r.out.reshape([n, d]),
                codes: r.codes.reshape([n, d]),
                idx: r.idx.reshape([n, h]),
                ..r
            });
        }
        let mut parts = Vec::new();
        let mut verdict = None;
        for (i, part) in self.parts.iter_mut().enumerate() {
            let block = e.narrow(1, i as i64 * dh, dh).contiguous();
            let mut r = part.rows(&block, train, per_sample)?;
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

    /// FSQ: `b = tanh(e + s)·h − o`, `q = round(b)/w`; the estimator maps `b/w` to `q` and the
    /// gradient continues through the bound. No loss terms; the quantization error is
    /// `mean((b/w − q)²)`.
    fn fsq_rows(&mut self, e: &Tensor, levels: FsqLevels) -> Result<Rows> {
        let device = e.device();
        let finite_verdict = match (self.finite_check, device) {
            (FiniteCheck::Deferred, d) if d != Device::Cpu => {
                Some(FiniteVerdict(finite_verdict(&e.detach(), &self.codebook)))
            }
            _ => {
                check_finite_device(&e.detach(), &self.codebook)?;
                None
            }
        };
        let consts = levels.fsq().constants();
        let row = |f: fn(&vq_core::family::FsqDim) -> f32| {
            let v: Vec<f32> = consts.iter().map(f).collect();
            Tensor::from_slice(&v).view([1, -1]).to_device(device)
        };
        let (h, o, s, w) = (
            row(|c| c.half_range),
            row(|c| c.offset),
            row(|c| c.shift),
            row(|c| c.half_width),
        );
        let v = (e + &s).tanh() * &h - &o;
        let rounded = v.detach().round();
        let bounded = &v / &w;
        let q = &rounded / &w;
        let out = crate::estimator::apply_estimator(&bounded, &q, self.config.estimator)?;
        let mut basis = Vec::with_capacity(consts.len());
        let mut b = 1i64;
        for &l in levels.as_slice() {
            basis.push(b);
            b *= i64::from(l);
        }
        let basis = Tensor::from_slice(&basis).view([1, -1]).to_device(device);
        let idx =
            ((&rounded + &w).to_kind(Kind::Int64) * basis).sum_dim_intlist(1, false, Kind::Int64);
        let zero = || Tensor::zeros([], (Kind::Float, device));
        Ok(Rows {
            quantization_error: bounded.detach().mse_loss(&q, Reduction::Mean),
            out,
            codes: q,
            idx,
            commitment_loss: zero(),
            codebook_loss: zero(),
            finite_verdict,
        })
    }

    /// The codes (M, D) of index rows (M, G) of a residual (summed) or multi-head (placed side
    /// by side) layer.
    pub(super) fn embed_groups(&self, flat: &Tensor) -> Tensor {
        let (m, g) = (flat.size()[0], flat.size()[1]);
        let pick =
            |part: &VectorQuantizer, idx: &Tensor| part.codes().detach().index_select(0, idx);
        match self.config.family {
            Family::MultiHead {
                codebooks: HeadCodebooks::Shared,
                ..
            } => pick(&self.parts[0], &flat.reshape([-1])).reshape([m, -1]),
            Family::MultiHead { .. } => Tensor::cat(
                &(0..g)
                    .map(|i| pick(&self.parts[i as usize], &flat.select(1, i)))
                    .collect::<Vec<_>>(),
                1,
            ),
            _ => (0..g)
                .map(|i| pick(&self.parts[i as usize], &flat.select(1, i)))
                .reduce(|a, b| a + b)
                .expect("at least one stage"),
        }
    }
}

/// The first failing of two deferred verdicts (a verdict whose flags are all 0 gives way).
fn merge_verdicts(a: Option<FiniteVerdict>, b: Option<FiniteVerdict>) -> Option<FiniteVerdict> {
    match (a, b) {
        (Some(a), Some(b)) => {
            let bad = a.0.narrow(0, 0, 2).sum(Kind::Int64).gt(0);
            Some(FiniteVerdict(a.0.where_self(&bad, &b.0)))
        }
        (a, None) => a,
        (None, b) => b,
    }
}
