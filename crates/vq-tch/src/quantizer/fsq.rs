//! Finite scalar quantization ([`Family::Fsq`](super::Family::Fsq), the formulas of
//! [`vq_core::family::Fsq`]): each dimension bounded and rounded to its levels; the codebook is
//! the frozen grid.

use tch::{Device, Kind, Reduction, Tensor, nn};

use super::config::{FsqLevels, VectorQuantizerConfig};
use super::pass::{Batch, Rows, Settings, mark_initialised};
use crate::error::Result;
use crate::search::{FiniteCheck, FiniteVerdict, check_finite_device, finite_verdict};

/// FSQ's levels and its frozen grid (the `codebook` variable).
#[derive(Debug)]
pub(super) struct FsqGrid {
    pub(super) grid: Tensor,
    levels: FsqLevels,
}

impl FsqGrid {
    /// The grid of `levels` as the frozen `codebook` variable under `path`.
    pub(super) fn new(path: &nn::Path, config: &VectorQuantizerConfig, levels: FsqLevels) -> Self {
        let device = path.device();
        let (k, d) = (config.codebook_size as i64, config.codebook_dim as i64);
        let values = levels.fsq().codebook().into_raw_vec_and_offset().0;
        let grid = Tensor::from_slice(&values).view([k, d]).to_device(device);
        let grid = path.add("codebook", grid, false);
        mark_initialised(path);
        Self { grid, levels }
    }

    /// FSQ: `b = tanh(e + s)·h − o`, `q = round(b)/w`; the estimator maps `b/w` to `q` and the
    /// gradient continues through the bound. No loss terms; the quantization error is
    /// `mean((b/w − q)²)`.
    pub(super) fn rows(&self, settings: Settings<'_>, batch: Batch<'_>) -> Result<Rows> {
        let e = batch.e;
        let device = e.device();
        let finite_verdict = match (settings.finite_check, device) {
            (FiniteCheck::Deferred, d) if d != Device::Cpu => {
                Some(FiniteVerdict(finite_verdict(&e.detach(), &self.grid)))
            }
            _ => {
                check_finite_device(&e.detach(), &self.grid)?;
                None
            }
        };
        let consts = self.levels.fsq().constants();
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
        let out = crate::estimator::apply_estimator(&bounded, &q, settings.config.estimator)?;
        let idx = ((&rounded + &w).to_kind(Kind::Int64) * self.basis(device)).sum_dim_intlist(
            1,
            false,
            Kind::Int64,
        );
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

    /// The mixed-radix place values `Π_{j<i} L_j` (1, d) that turn level digits into an index.
    fn basis(&self, device: Device) -> Tensor {
        let mut basis = Vec::with_capacity(self.levels.as_slice().len());
        let mut b = 1i64;
        for &l in self.levels.as_slice() {
            basis.push(b);
            b *= i64::from(l);
        }
        Tensor::from_slice(&basis).view([1, -1]).to_device(device)
    }
}
