//! The training objectives: next-code cross-entropy with taming's input corruption (`pkeep`) and
//! LlamaGen's label dropout; MaskGIT's masked-code cross-entropy under the cosine schedule.

use std::f64::consts::FRAC_PI_2;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

use crate::config::PriorKind;
use crate::error::Result;
use crate::model::{Prior, cross_entropy};

/// MaskGIT's cosine schedule: the fraction of a grid masked at ratio `r` ∈ [0, 1]
/// (`cos(π/2 · r)`; `maskgit/libml/mask_schedule.py`).
pub fn cosine_mask_fraction(r: f64) -> f64 {
    (FRAC_PI_2 * r).cos()
}

impl Prior {
    /// The training loss (mean cross-entropy in nats, scalar) of `codes` (B, h, w) with
    /// `labels` (B) for a class-conditional prior. The step's draws (label dropout, `pkeep`
    /// corruption, MaskGIT's masks) come from `StdRng::seed_from_u64(step_seed)` on the host;
    /// with `dropout` > 0 libtorch's generator is seeded with `step_seed` first. So a resumed
    /// run draws what an uninterrupted one does.
    ///
    /// # Errors
    /// As [`Prior::check_input`].
    pub fn training_loss(
        &self,
        codes: &Tensor,
        labels: Option<&Tensor>,
        step_seed: u64,
    ) -> Result<Tensor> {
        let flat = self.check_input(codes, labels)?;
        if self.config().dropout > 0.0 {
            tch::manual_seed(step_seed as i64);
        }
        let mut rng = StdRng::seed_from_u64(step_seed);
        let labels = labels.map(|y| self.drop_labels(y, &mut rng));
        Ok(match self.config().kind {
            PriorKind::Autoregressive => {
                let inputs = self.corrupt(&flat, &mut rng);
                let logits = self.teacher_forced(&inputs, labels.as_ref(), true);
                cross_entropy(&logits, &flat)
            }
            PriorKind::Masked => self.masked_loss(&flat, labels.as_ref(), &mut rng),
        })
    }

    /// LlamaGen's `token_drop`: each label replaced by the "no class" index with the
    /// conditioning's dropout probability.
    fn drop_labels(&self, labels: &Tensor, rng: &mut StdRng) -> Tensor {
        let y = labels.to_kind(Kind::Int64).to_device(self.device());
        match (self.null_class(), self.config().conditioning) {
            (Some(null), crate::Conditioning::Classes { dropout, .. }) => {
                let drop = uniform(rng, &[y.size()[0]], y.device()).lt(dropout);
                y.masked_fill(&drop, null)
            }
            _ => y,
        }
    }

    /// taming's `pkeep`: each input code kept with probability `pkeep`, else a uniform code.
    fn corrupt(&self, codes: &Tensor, rng: &mut StdRng) -> Tensor {
        let pkeep = self.config().pkeep;
        if pkeep >= 1.0 {
            return codes.shallow_clone();
        }
        let keep = uniform(rng, &codes.size(), codes.device()).lt(pkeep);
        let k = self.config().codebook_size as i64;
        let random: Vec<i64> = (0..codes.numel()).map(|_| rng.gen_range(0..k)).collect();
        let random = Tensor::from_slice(&random)
            .view(codes.size().as_slice())
            .to_device(codes.device());
        codes.where_self(&keep, &random)
    }

    /// MaskGIT's loss: per grid a ratio r ~ U(0, 1), `⌈cos(π/2·r)·L⌉` (at least 1) codes at random
    /// positions replaced by the mask token K, cross-entropy on the masked positions.
    fn masked_loss(&self, codes: &Tensor, labels: Option<&Tensor>, rng: &mut StdRng) -> Tensor {
        let (b, l) = (codes.size()[0], codes.size()[1]);
        let dev = codes.device();
        let r = uniform(rng, &[b, 1], dev);
        let count = ((r * FRAC_PI_2).cos() * l as f64)
            .ceil()
            .clamp(1.0, l as f64);
        let scores = uniform(rng, &[b, l], dev);
        let rank = scores.argsort(-1, false).argsort(-1, false);
        let masked = rank.lt_tensor(&count);
        let mask_token = self.config().codebook_size as i64;
        let inputs = codes.masked_fill(&masked, mask_token);
        let logits = self.masked_logits(&inputs, labels, true);
        let targets = codes.masked_fill(&masked.logical_not(), -100);
        let k = logits.size()[2];
        logits.reshape([-1, k]).cross_entropy_loss::<Tensor>(
            &targets.reshape([-1]),
            None,
            tch::Reduction::Mean,
            -100,
            0.0,
        )
    }

    /// A masked prior's logits (B, L, K) for `inputs` (B, L) holding codes and mask tokens.
    pub(crate) fn masked_logits(
        &self,
        inputs: &Tensor,
        labels: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let b = inputs.size()[0];
        let x = Tensor::cat(&[self.condition(labels, b), self.embed(inputs)], 1);
        let logits = self.run(x, 0, train, None);
        // The condition position predicts nothing; a mask token is never a prediction.
        let l = inputs.size()[1];
        logits.narrow(1, 1, l)
    }
}

/// Uniforms in [0, 1) of `shape` drawn from `rng` on the host (f64), on `device`.
fn uniform(rng: &mut StdRng, shape: &[i64], device: Device) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.r#gen::<f64>()).collect();
    Tensor::from_slice(&v).view(shape).to_device(device)
}
