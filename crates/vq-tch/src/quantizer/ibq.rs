//! IBQ ([`Family::Ibq`](super::Family::Ibq); the formulas of [`vq_core::ibq`]): the code of
//! largest inner product, with a straight-through one-hot over `softmax(z Cᵀ)` so that every
//! code gets a gradient.

use tch::{Kind, Reduction, Tensor, nn};

use super::config::{EntropyPenalty, Family, VectorQuantizerConfig};
use super::nearest::learned_codebook;
use super::pass::{Batch, Rows, Settings, union_sums};
use crate::collective::Collective;
use crate::error::Result;
use crate::search::check_finite_device;

/// IBQ's codebook, learned by gradient.
#[derive(Debug)]
pub(super) struct IbqCodes {
    pub(super) codebook: Tensor,
}

impl IbqCodes {
    /// The codebook, drawn as the config's init says, under `path`.
    pub(super) fn new(path: &nn::Path, config: &VectorQuantizerConfig) -> Self {
        let codebook = learned_codebook(path, config);
        Self { codebook }
    }

    /// `z_q = (h − sg(p) + p) C` in training, `h C` in evaluation; the losses
    /// `mean((z_q − z)²) + mean((sg(hC) − z)²)` (commitment) and `β·mean((hC − sg(z))²)` plus
    /// the weighted entropy penalty in training (codebook), as SEED-Voken's
    /// `IndexPropagationQuantize` and its loss sum them.
    pub(super) fn rows(&self, settings: Settings<'_>, batch: Batch<'_>) -> Result<Rows> {
        let e = batch.e;
        check_finite_device(&e.detach(), &self.codebook.detach())?;
        let c = &self.codebook;
        let k = settings.config.codebook_size as i64;
        let logits = e.matmul(&c.tr());
        let idx = logits.detach().argmax(-1, false);
        let hard = idx.one_hot(k).to_kind(Kind::Float);
        let q_live = c.index_select(0, &idx);
        let q = q_live.detach();
        let out = match batch.train {
            true => {
                let p = logits.softmax(-1, Kind::Float);
                (hard - p.detach() + p).matmul(c)
            }
            false => q.shallow_clone(),
        };
        let Family::Ibq { entropy } = settings.config.family else {
            unreachable!("the IBQ state exists for IBQ only")
        };
        let penalty = match batch.train && entropy.weight > 0.0 {
            true => entropy_penalty(&logits, entropy, settings.group)? * f64::from(entropy.weight),
            false => Tensor::zeros([], (Kind::Float, e.device())),
        };
        let beta = f64::from(settings.config.beta);
        let commitment_loss = match batch.train {
            true => out.mse_loss(e, Reduction::Mean) + e.mse_loss(&q, Reduction::Mean),
            false => e.mse_loss(&q, Reduction::Mean) * 2.0,
        };
        Ok(Rows {
            quantization_error: e.detach().mse_loss(&q, Reduction::Mean),
            codebook_loss: q_live.mse_loss(&e.detach(), Reduction::Mean) * beta + penalty,
            commitment_loss,
            out,
            codes: q,
            idx,
            finite_verdict: None,
        })
    }
}

/// SEED-Voken's `compute_entropy_loss` on `logits` (N, K) at inverse temperature τ:
/// `mean_rows H(p) − γ·H(mean_rows p)` with `p = softmax(τ·logits)`, `H(p)` exact through
/// `log_softmax` and `H(a) = −Σ a log(a + 1e-5)`; over the union of the ranks' rows in a group.
fn entropy_penalty(
    logits: &Tensor,
    penalty: EntropyPenalty,
    group: Option<&dyn Collective>,
) -> Result<Tensor> {
    let l = logits * f64::from(penalty.inv_temperature);
    let (p, logp) = (l.softmax(-1, Kind::Float), l.log_softmax(-1, Kind::Float));
    let per_row = -(&p * logp).sum_dim_intlist(-1, false, Kind::Float);
    let (sums, rows) = union_sums(
        group,
        &[
            per_row.sum(Kind::Float).view([1]),
            p.sum_dim_intlist(0, false, Kind::Float),
        ],
        p.size()[0],
    )?;
    let sample = (&sums[0] / &rows).view([]);
    let avg = &sums[1] / &rows;
    let average = -(&avg * (&avg + 1e-5).log()).sum(Kind::Float);
    Ok(sample - average * f64::from(penalty.diversity))
}
