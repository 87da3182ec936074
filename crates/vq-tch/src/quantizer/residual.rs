//! Residual VQ ([`Family::Residual`](super::Family::Residual), the formulas of
//! [`vq_core::family`]): stage g quantizes what the stages before it left, with optional stage
//! dropout in training.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Kind, Reduction, Tensor, nn};

use super::config::{Family, STAGE_DROPOUT_SALT, StageDropout, VectorQuantizerConfig};
use super::pass::{Batch, Part, Rows, Settings, merge_verdicts, read_counter, scalar};
use crate::error::Result;

/// The stages (nearest-code layers `stage{g}`) and the stage-dropout draws.
#[derive(Debug)]
pub(super) struct Stages<P> {
    pub(super) stages: Vec<P>,
    /// `stage_draws`: draws done with [`StageDropout::On`]; none without dropout.
    draws: Option<Tensor>,
    /// The layer's own `codebook`: empty (0, D), the codes are the stages'.
    pub(super) no_codes: Tensor,
}

impl<P: Part> Stages<P> {
    /// The stages (built under `path/stage{g}`) and, with dropout, the draw counter.
    pub(super) fn new(
        path: &nn::Path,
        config: &VectorQuantizerConfig,
        dropout: StageDropout,
        stages: Vec<P>,
    ) -> Self {
        let device = path.device();
        let draws = matches!(dropout, StageDropout::On { .. })
            .then(|| path.add("stage_draws", scalar(0, device), false));
        Self {
            stages,
            draws,
            no_codes: Tensor::zeros([0, config.codebook_dim as i64], (Kind::Float, device)),
        }
    }

    /// How many stages this forward runs: all, or a draw of [`StageDropout::On`] in training.
    fn active(&self, settings: Settings<'_>, train: bool) -> Result<usize> {
        let n = self.stages.len();
        let Family::Residual {
            dropout: StageDropout::On { min_stages },
            ..
        } = settings.config.family
        else {
            return Ok(n);
        };
        let (true, Some(draws)) = (train, &self.draws) else {
            return Ok(n);
        };
        let draw = read_counter(draws)?;
        let seed = (settings.config.seed ^ STAGE_DROPOUT_SALT).wrapping_add(draw as u64);
        let _ = tch::no_grad(|| draws.shallow_clone().g_add_scalar_(1));
        Ok(StdRng::seed_from_u64(seed).gen_range(min_stages..=n))
    }

    /// Stage g quantizes `r_g = r_{g−1} − q_{g−1}` (the codes detached, so `∂r_g/∂e = I`); the
    /// outputs and the losses add. Stages past the active ones give index −1.
    // `a += b` on tch tensors is in place (`add_`); these sums build new graph nodes.
    #[allow(clippy::assign_op_pattern)]
    pub(super) fn rows(&mut self, settings: Settings<'_>, batch: Batch<'_>) -> Result<Rows> {
        let active = self.active(settings, batch.train)?;
        let e = batch.e;
        let n = e.size()[0];
        let zero = || Tensor::zeros([], (Kind::Float, e.device()));
        let mut residual = e.shallow_clone();
        let (mut out, mut codes) = (e.zeros_like(), e.zeros_like());
        let (mut commitment_loss, mut codebook_loss) = (zero(), zero());
        let (mut idx, mut verdict) = (Vec::new(), None);
        for (g, stage) in self.stages.iter_mut().enumerate() {
            if g >= active {
                idx.push(Tensor::full([n], -1, (Kind::Int64, e.device())));
                continue;
            }
            let r = stage.rows(Batch {
                e: &residual,
                ..batch
            })?;
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

    /// The codes (M, D) of index rows (M, G): the stages' codes summed.
    pub(super) fn embed(&self, flat: &Tensor) -> Tensor {
        (0..flat.size()[1])
            .map(|i| self.stages[i as usize].pick(&flat.select(1, i)))
            .reduce(|a, b| a + b)
            .expect("at least one stage")
    }
}
