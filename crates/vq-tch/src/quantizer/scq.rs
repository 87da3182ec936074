//! Soft convex quantization ([`Family::Scq`](super::Family::Scq); the formulas of
//! [`vq_core::scq`]): a ridge solve towards the nearest code and the exact projection onto the
//! simplex, as ATen ops, so the gradient reaches the input and every code.

use tch::{Kind, Reduction, Tensor, nn};
use vq_core::Metric;

use super::config::{Family, VectorQuantizerConfig};
use super::nearest::learned_codebook;
use super::pass::{Batch, Rows, Settings};
use crate::error::Result;
use crate::search::nearest_codes_checked;

/// SCQ's codebook, learned by gradient.
#[derive(Debug)]
pub(super) struct ScqCodes {
    pub(super) codebook: Tensor,
}

impl ScqCodes {
    /// The codebook, drawn as the config's init says, under `path`.
    pub(super) fn new(path: &nn::Path, config: &VectorQuantizerConfig) -> Self {
        let codebook = learned_codebook(path, config);
        Self { codebook }
    }

    /// `P̃ = (Z Cᵀ + λ P_VQ)(C Cᵀ + λI)⁻¹`, `P = Π_Δ(P̃)`, `Z_q = P C` (in training and in
    /// evaluation); the token is `argmax P`; β on `mean((z − sg(Z_q))²)`.
    pub(super) fn rows(&self, settings: Settings<'_>, batch: Batch<'_>) -> Result<Rows> {
        let config = settings.config;
        let Family::Scq { lambda } = config.family else {
            unreachable!("the SCQ state exists for SCQ only")
        };
        let (e, c) = (batch.e, &self.codebook);
        let (nearest, finite_verdict) = nearest_codes_checked(
            &e.detach(),
            &c.detach(),
            Metric::Euclidean,
            settings.finite_check,
        )?;
        let k = config.codebook_size as i64;
        let lambda = f64::from(lambda);
        let one_hot = nearest
            .to_device(e.device())
            .one_hot(k)
            .to_kind(Kind::Float);
        let system = c.matmul(&c.tr()) + Tensor::eye(k, (Kind::Float, c.device())) * lambda;
        let rhs = e.matmul(&c.tr()) + one_hot * lambda;
        // P̃ᵀ = A⁻¹ B ᵀ (A symmetric).
        let ridge = Tensor::linalg_solve(&system, &rhs.tr(), true).tr();
        let weights = simplex_projection(&ridge);
        let out = weights.matmul(c);
        let idx = weights.detach().argmax(-1, false);
        let mse = e.mse_loss(&out.detach(), Reduction::Mean);
        Ok(Rows {
            codes: out.detach(),
            quantization_error: mse.detach(),
            commitment_loss: mse * f64::from(config.beta),
            codebook_loss: Tensor::zeros([], (Kind::Float, e.device())),
            out,
            idx,
            finite_verdict,
        })
    }
}

/// The rows of `v` (N, K) projected onto the probability simplex (Duchi et al. 2008):
/// `max(v − θ, 0)` with `θ = (Σ_{j≤ρ} u_j − 1)/ρ` over the values sorted descending, ρ the
/// last `j` with `u_j > (Σ_{i≤j} u_i − 1)/j`. Differentiable (through the sort's values).
pub(super) fn simplex_projection(v: &Tensor) -> Tensor {
    let k = v.size()[1];
    let (sorted, _) = v.sort(-1, true);
    let cumsum = sorted.cumsum(-1, Kind::Float) - 1.0;
    let ranks = Tensor::arange_start(1, k + 1, (Kind::Float, v.device())).view([1, -1]);
    let thresholds = &cumsum / &ranks;
    let support = sorted.gt_tensor(&thresholds.detach());
    // ρ: the number of leading entries in the support (the condition holds on a prefix).
    let rho = support.sum_dim_intlist(-1, true, Kind::Int64).clamp_min(1);
    let theta = thresholds.gather(-1, &(rho - 1), false);
    (v - theta).clamp_min(0.0)
}
