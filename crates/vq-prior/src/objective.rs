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
    /// `labels` (B) for a class-conditional prior. Grid `i`'s draws (its label dropout, `pkeep`
    /// corruption, MaskGIT mask) come from `StdRng::seed_from_u64(sample_seeds[i])` on the
    /// host, so they do not depend on the batch the grid is in (a data-parallel rank draws
    /// what one process draws for it) and a resumed run draws what an uninterrupted one does;
    /// with `dropout` > 0 libtorch's generator is seeded with the first seed first.
    ///
    /// # Panics
    /// If `sample_seeds` has not one seed per grid.
    ///
    /// # Errors
    /// As [`Prior::check_input`].
    pub fn training_loss(
        &self,
        codes: &Tensor,
        labels: Option<&Tensor>,
        sample_seeds: &[u64],
    ) -> Result<Tensor> {
        let flat = self.check_input(codes, labels)?;
        assert_eq!(
            sample_seeds.len() as i64,
            flat.size()[0],
            "one seed per grid"
        );
        if self.config().dropout > 0.0 {
            tch::manual_seed(sample_seeds.first().copied().unwrap_or(0) as i64);
        }
        let mut rngs: Vec<StdRng> = sample_seeds
            .iter()
            .map(|&s| StdRng::seed_from_u64(s))
            .collect();
        let labels = labels.map(|y| self.drop_labels(y, &mut rngs));
        Ok(match self.config().kind {
            PriorKind::Autoregressive => {
                let inputs = self.corrupt(&flat, &mut rngs);
                let logits = self.teacher_forced(&inputs, labels.as_ref(), true);
                cross_entropy(&logits, &flat)
            }
            PriorKind::Masked => self.masked_loss(&flat, labels.as_ref(), &mut rngs),
        })
    }

    /// LlamaGen's `token_drop`: each label replaced by the "no class" index with the
    /// conditioning's dropout probability.
    fn drop_labels(&self, labels: &Tensor, rngs: &mut [StdRng]) -> Tensor {
        let y = labels.to_kind(Kind::Int64).to_device(self.device());
        match (self.null_class(), self.config().conditioning) {
            (Some(null), crate::Conditioning::Classes { dropout, .. }) => {
                let drop = uniform(rngs, 1, y.device()).view([-1]).lt(dropout);
                y.masked_fill(&drop, null)
            }
            _ => y,
        }
    }

    /// taming's `pkeep`: each input code kept with probability `pkeep`, else a uniform code.
    fn corrupt(&self, codes: &Tensor, rngs: &mut [StdRng]) -> Tensor {
        let pkeep = self.config().pkeep;
        if pkeep >= 1.0 {
            return codes.shallow_clone();
        }
        let l = codes.size()[1];
        let keep = uniform(rngs, l, codes.device()).lt(pkeep);
        let k = self.config().codebook_size as i64;
        let random: Vec<i64> = rngs
            .iter_mut()
            .flat_map(|rng| (0..l).map(|_| rng.gen_range(0..k)).collect::<Vec<_>>())
            .collect();
        let random = Tensor::from_slice(&random)
            .view(codes.size().as_slice())
            .to_device(codes.device());
        codes.where_self(&keep, &random)
    }

    /// MaskGIT's loss: per grid a ratio r ~ U(0, 1), `⌈cos(π/2·r)·L⌉` (at least 1) codes at random
    /// positions replaced by the mask token K, cross-entropy on the masked positions.
    fn masked_loss(&self, codes: &Tensor, labels: Option<&Tensor>, rngs: &mut [StdRng]) -> Tensor {
        let l = codes.size()[1];
        let dev = codes.device();
        let r = uniform(rngs, 1, dev);
        let count = ((r * FRAC_PI_2).cos() * l as f64)
            .ceil()
            .clamp(1.0, l as f64);
        let scores = uniform(rngs, l, dev);
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

/// Uniforms in [0, 1) (B, `per_sample`), row i drawn from `rngs[i]` on the host (f64), on
/// `device`.
fn uniform(rngs: &mut [StdRng], per_sample: i64, device: Device) -> Tensor {
    let v: Vec<f64> = rngs
        .iter_mut()
        .flat_map(|rng| {
            (0..per_sample)
                .map(|_| rng.r#gen::<f64>())
                .collect::<Vec<_>>()
        })
        .collect();
    Tensor::from_slice(&v)
        .view([rngs.len() as i64, per_sample])
        .to_device(device)
}
