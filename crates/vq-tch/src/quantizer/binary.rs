//! LFQ and BSQ ([`Family::Lfq`], [`Family::Bsq`]; the formulas of [`vq_core::lfq`]): the sign
//! per dimension (on the sphere for BSQ), the estimator from the input to its code, and the
//! entropy penalty over the 2^D implicit codes.

use tch::{Kind, Reduction, Tensor, nn};
use vq_core::lfq::{BinaryCodes, ENTROPY_EPS, Lfq};

use super::config::{EntropyPenalty, Family, VectorQuantizerConfig};
use super::pass::{Batch, Rows, Settings, mark_initialised, union_sums};
use crate::collective::Collective;
use crate::error::Result;
use crate::search::check_finite_device;

/// The frozen implicit codebook (the `codebook` variable, for decoding) and the bits' place
/// values.
#[derive(Debug)]
pub(super) struct BinaryGrid {
    pub(super) grid: Tensor,
    lfq: Lfq,
}

impl BinaryGrid {
    /// The 2^D codes in index order as the frozen `codebook` under `path`.
    pub(super) fn new(path: &nn::Path, config: &VectorQuantizerConfig) -> Result<Self> {
        let codes = match config.family {
            Family::Bsq { .. } => BinaryCodes::Sphere,
            _ => BinaryCodes::Cube,
        };
        let lfq = Lfq::new(config.codebook_dim, codes)?;
        let values = lfq.codebook().into_raw_vec_and_offset().0;
        let (k, d) = (lfq.codebook_size() as i64, lfq.dim() as i64);
        let grid = Tensor::from_slice(&values)
            .view([k, d])
            .to_device(path.device());
        let grid = path.add("codebook", grid, false);
        mark_initialised(path);
        Ok(Self { grid, lfq })
    }

    /// `q = ±s` by sign (of `u = z/‖z‖` for BSQ), the estimator from the input to `q`, the
    /// entropy penalty in training as the codebook loss and β on `mean((x − sg(q))²)`.
    pub(super) fn rows(&self, settings: Settings<'_>, batch: Batch<'_>) -> Result<Rows> {
        let config = settings.config;
        let e = batch.e;
        check_finite_device(&e.detach(), &self.grid)?;
        let (Family::Lfq { entropy } | Family::Bsq { entropy }) = config.family else {
            unreachable!("the binary grid exists for LFQ and BSQ only")
        };
        let x = match config.family {
            Family::Bsq { .. } => {
                e / e
                    .norm_scalaropt_dim(2, [1i64].as_slice(), true)
                    .clamp_min(1e-12)
            }
            _ => e.shallow_clone(),
        };
        let s = f64::from(self.lfq.scale());
        let positive = x.detach().gt(0.0);
        let q = positive.to_kind(Kind::Float) * (2.0 * s) - s;
        let out = crate::estimator::apply_estimator(&x, &q, config.estimator)?;
        let d = self.lfq.dim() as i64;
        let places = Tensor::from_slice(&(0..d).rev().map(|i| 1i64 << i).collect::<Vec<_>>())
            .to_device(e.device());
        let idx = (positive.to_kind(Kind::Int64) * places.view([1, -1])).sum_dim_intlist(
            1,
            false,
            Kind::Int64,
        );
        let mse = x.mse_loss(&q, Reduction::Mean);
        let codebook_loss = match batch.train && entropy.weight > 0.0 {
            true => self.entropy(&x, entropy, settings.group)? * f64::from(entropy.weight),
            false => Tensor::zeros([], (Kind::Float, e.device())),
        };
        Ok(Rows {
            out,
            codes: q,
            idx,
            quantization_error: mse.detach(),
            commitment_loss: mse * f64::from(config.beta),
            codebook_loss,
            finite_verdict: None,
        })
    }

    /// `mean_rows H(p) − γ H(mean_rows p)` with `p = softmax(2τ x·c)` over the codes and
    /// `H(p) = −Σ p log max(p, 1e-5)` (lucidrains' `entropy`). In a group both means run over
    /// the union of the ranks' rows (lucidrains' `maybe_distributed_mean`), and each rank's
    /// gradient is scaled by the world size, so that the trainer's gradient averaging gives one
    /// process's gradient on the union batch.
    fn entropy(
        &self,
        x: &Tensor,
        penalty: EntropyPenalty,
        group: Option<&dyn Collective>,
    ) -> Result<Tensor> {
        let tau = 2.0 * f64::from(penalty.inv_temperature);
        let p = (x.matmul(&self.grid.tr()) * tau).softmax(-1, Kind::Float);
        let h = |p: &Tensor| {
            -(p * p.clamp_min(ENTROPY_EPS).log()).sum_dim_intlist(-1, false, Kind::Float)
        };
        let (sums, rows) = union_sums(
            group,
            &[
                h(&p).sum(Kind::Float).view([1]),
                p.sum_dim_intlist(0, false, Kind::Float),
            ],
            p.size()[0],
        )?;
        let (per_sample_sum, prob_sum) = (&sums[0], &sums[1]);
        let per_sample = (per_sample_sum / &rows).view([]);
        let codebook = h(&(prob_sum / &rows));
        Ok(per_sample - codebook * f64::from(penalty.diversity))
    }
}
