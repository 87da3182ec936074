//! The Gumbel-softmax family ([`Family::Gumbel`], the formulas of [`vq_core::gumbel`]): logits
//! `Linear(D → K)` per position, a relaxed one-hot over the codes in training, the hard code in
//! evaluation.

use rand::SeedableRng;
use rand::rngs::StdRng;
use tch::{Kind, Reduction, Tensor, nn};
use vq_core::gumbel::{GumbelForward, gumbel_noise};

use super::config::{Family, VectorQuantizerConfig};
use super::nearest::learned_codebook;
use super::pass::{Batch, Rows, Settings, read_counter, scalar};
use crate::error::Result;

/// The Gumbel family's codebook and logits layer, and the temperature's step.
#[derive(Debug)]
pub(super) struct GumbelCodes {
    pub(super) codebook: Tensor,
    proj: nn::Linear,
    /// Training forwards done (the noise of forward `s` is drawn from `seed + s`).
    draws: Tensor,
    /// The optimizer step the temperature is read at.
    pub(super) step: usize,
}

impl GumbelCodes {
    /// The codebook (learned by gradient), the logits layer (`nn.Linear`'s defaults) and the
    /// draw counter under `path`.
    pub(super) fn new(path: &nn::Path, config: &VectorQuantizerConfig) -> Self {
        let device = path.device();
        let (k, d) = (config.codebook_size as i64, config.codebook_dim as i64);
        let codebook = learned_codebook(path, config);
        Self {
            codebook,
            proj: nn::linear(path / "gumbel_proj", d, k, crate::init::torch_linear()),
            draws: path.add("gumbel_draws", scalar(0, device), false),
            step: 0,
        }
    }

    /// Gumbel-softmax quantization of rows `e` (N, D). Training draws the noise on the host
    /// from `StdRng::seed_from_u64(seed + draws)`, so a resumed run draws what an uninterrupted
    /// one does. The quantization error is `mean((z − q)²)` between the mixture the decoder sees
    /// and the hard code (0 in evaluation and with the hard forward).
    pub(super) fn rows(&mut self, settings: Settings<'_>, batch: Batch<'_>) -> Result<Rows> {
        let config = settings.config;
        let Family::Gumbel {
            kl_weight,
            forward,
            temperature,
        } = config.family
        else {
            unreachable!("the Gumbel state exists for the Gumbel family only")
        };
        let e = batch.e;
        let logits = e.apply(&self.proj);
        let (n, k) = (logits.size()[0], config.codebook_size as i64);
        let (y, idx) = if batch.train {
            let draws = read_counter(&self.draws)?;
            let mut rng = StdRng::seed_from_u64(config.seed.wrapping_add(draws as u64));
            let noise = gumbel_noise(n as usize, k as usize, &mut rng);
            let noise = Tensor::from_slice(noise.as_slice().expect("standard layout"))
                .view([n, k])
                .to_device(e.device());
            let _ = tch::no_grad(|| self.draws.g_add_scalar_(1));
            let tau = temperature.at(self.step);
            let soft = ((&logits + noise) / tau).softmax(-1, Kind::Float);
            let idx = soft.argmax(-1, false);
            let y = match forward {
                GumbelForward::Soft => soft,
                GumbelForward::Hard => {
                    let hard = idx.one_hot(k).to_kind(Kind::Float);
                    hard - soft.detach() + soft
                }
            };
            (y, idx)
        } else {
            let idx = logits.argmax(-1, false);
            (idx.one_hot(k).to_kind(Kind::Float), idx)
        };
        let out = y.matmul(&self.codebook);
        let q = self.codebook.detach().index_select(0, &idx);
        let quantization_error = out.detach().mse_loss(&q, Reduction::Mean);
        let p = logits.softmax(-1, Kind::Float);
        let kl = (&p * (&p * k as f64 + vq_core::gumbel::KL_EPS).log())
            .sum_dim_intlist(-1, false, Kind::Float)
            .mean(Kind::Float);
        Ok(Rows {
            out,
            codes: q,
            idx,
            commitment_loss: Tensor::zeros([], (Kind::Float, e.device())),
            codebook_loss: kl * f64::from(kl_weight),
            quantization_error,
            finite_verdict: None,
        })
    }
}
