//! The named metrics of an autoencoder run: [`StepMetrics`], one line of `metrics.jsonl` (a
//! logging window's means), with the names its step reports them under ([`names`]), and the
//! code slots its usage and perplexity are counted over. A leaf of the crate.

use tch::{Kind, Tensor};

/// The names under which an autoencoder step reports its numbers to the run loop (each the
/// field of [`StepMetrics`] it becomes).
pub mod names {
    /// Total loss.
    pub const LOSS: &str = "loss";
    /// Reconstruction loss.
    pub const REC: &str = "rec";
    /// Weighted commitment loss.
    pub const COMMITMENT: &str = "commitment";
    /// Quantization error.
    pub const QE: &str = "quantization_error";
    /// Fraction of the code slots used by the step's batch.
    pub const USAGE: &str = "usage";
    /// Perplexity of the step's codes (geometric mean over code groups).
    pub const PERPLEXITY: &str = "perplexity";
    /// Model gradient norm before clipping.
    pub const GRAD_NORM: &str = "grad_norm";
    /// VQGAN: discriminator hinge loss.
    pub const D_LOSS: &str = "d_loss";
    /// VQGAN: generator adversarial loss.
    pub const G_LOSS: &str = "g_loss";
    /// VQGAN: adaptive weight.
    pub const D_WEIGHT: &str = "d_weight";
    /// VQGAN: discriminator gradient norm (checked, not logged).
    pub const D_GRAD_NORM: &str = "d_grad_norm";
}

/// Averages over one logging window.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepMetrics {
    /// Last step of the window (1-based count of steps done).
    pub step: usize,
    /// Learning rate at the last step.
    pub lr: f64,
    /// Total loss.
    pub loss: f64,
    /// Reconstruction loss: MSE (VQ-VAE) or L1 (VQGAN).
    pub rec: f64,
    /// Weighted commitment loss.
    pub commitment: f64,
    /// Quantization error, mean((e − q)²) per element.
    pub quantization_error: f64,
    /// Fraction of the codebook used per step's batch (residual and multi-head quantizers: of
    /// all stages' / heads' codes, i.e. their mean usage).
    pub usage: f64,
    /// Perplexity of the codes per step's batch (per stage / head: their geometric mean).
    pub perplexity: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Optimiser steps per second in the window.
    pub steps_per_s: f64,
    /// VQGAN: discriminator hinge loss (0 before `disc_start`).
    #[serde(default)]
    pub d_loss: f64,
    /// VQGAN: generator adversarial loss −mean D(x̃) (0 before `disc_start`).
    #[serde(default)]
    pub g_loss: f64,
    /// VQGAN: adaptive weight of the adversarial term (0 before `disc_start`).
    #[serde(default)]
    pub d_weight: f64,
    /// f16: steps of the window whose update was skipped because the gradients overflowed.
    #[serde(default)]
    pub skipped_steps: usize,
    /// Samples of the window's batches that failed to decode and were replaced by the next
    /// samples of their epoch that decode (each file is listed once in `skipped.jsonl`).
    #[serde(default)]
    pub skipped_samples: u64,
    /// f16: the model's loss scale at the window's last step (1 in f32 and bf16).
    #[serde(default = "one")]
    pub loss_scale: f64,
}

impl StepMetrics {
    /// The scalars of a metric window under their tags: `train/*` (the window's means), `lr`,
    /// `gan/*` with a discriminator, `loss_scale` when the run scales its loss (f16).
    pub fn tensorboard_scalars(&self, gan: bool, scaled: bool) -> Vec<(&'static str, f64)> {
        let m = self;
        let mut v = vec![
            ("train/loss", m.loss),
            ("train/rec", m.rec),
            ("train/commitment", m.commitment),
            ("train/qe", m.quantization_error),
            ("train/usage", m.usage),
            ("train/perplexity", m.perplexity),
            ("train/grad_norm", m.grad_norm),
            ("train/steps_per_s", m.steps_per_s),
            ("train/skipped_steps", m.skipped_steps as f64),
            ("train/skipped_samples", m.skipped_samples as f64),
            ("lr", m.lr),
        ];
        if gan {
            v.extend([
                ("gan/d_loss", m.d_loss),
                ("gan/g_loss", m.g_loss),
                ("gan/d_weight", m.d_weight),
            ]);
        }
        if scaled {
            v.push(("loss_scale", m.loss_scale));
        }
        v
    }
}

fn one() -> f64 {
    1.0
}

/// How many code slots a quantizer has: its tokens per code group (stage or head) — K, or
/// SF-DiVeQ's K − 1 segments.
pub fn code_slot_count(config: &vq_tch::VectorQuantizerConfig) -> usize {
    config.family.code_groups() * config.tokens()
}

/// The indices of a forward pass as flat code slots `g·K + k` (group g's code k); the stages a
/// quantizer dropout left out (index −1) map to the slot after the last,
/// [`code_slot_count`].
pub fn code_slots(indices: &Tensor, config: &vq_tch::VectorQuantizerConfig) -> Tensor {
    let (g, k) = (
        config.family.code_groups() as i64,
        config.codebook_size as i64,
    );
    if config.family.group_axis().is_none() {
        return indices.reshape([-1]);
    }
    let flat = indices.reshape([-1, g]);
    let offsets = Tensor::arange(g, (Kind::Int64, flat.device())) * k;
    let slots = &flat + offsets.view([1, g]);
    slots
        .where_self(&flat.ge(0), &slots.full_like(g * k))
        .reshape([-1])
}
