//! A prior run's description: the prior model, the codes it trains on, how it trains.

use std::path::PathBuf;

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};
use vq_prior::{Conditioning, PriorConfig};
use vq_tch::Precision;

use crate::codeset::CodeSet;

/// How a prior trains: AdamW with warm-up then cosine decay (LlamaGen: β = (0.9, 0.95),
/// weight decay 0.05, gradient clip 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorTraining {
    /// Grids per optimiser step (over all ranks).
    pub batch_size: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW's (β₁, β₂).
    pub betas: (f64, f64),
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// The learning rate after the cosine decay, as a fraction of the peak.
    pub final_lr_fraction: f64,
    /// Gradient norm clip.
    pub grad_clip: f64,
    /// Arithmetic of the forward: f32, or bf16 autocast (the logits and the loss stay f32).
    /// Absent from run.json when f32, so runs written before it resume.
    #[serde(default, skip_serializing_if = "is_f32")]
    pub precision: Precision,
}

fn is_f32(p: &Precision) -> bool {
    *p == Precision::F32
}

/// A prior run: `run.json` of its folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorRunConfig {
    /// The preset the prior was made from (informative).
    pub preset: String,
    /// The model.
    pub prior: PriorConfig,
    /// Training codes: files or folders of `vq-train encode`.
    pub train_codes: Vec<PathBuf>,
    /// Held-out codes for the likelihood (may be empty).
    pub val_codes: Vec<PathBuf>,
    /// The tokenizer run the codes came from (to decode samples), if known.
    pub tokenizer: Option<PathBuf>,
    /// Training.
    pub training: PriorTraining,
    /// Seed of the data order and of every draw of a step.
    pub seed: u64,
}

impl PriorTraining {
    /// Checks the optimiser settings.
    ///
    /// # Errors
    /// A bad value, named.
    pub fn validate(&self) -> Result<()> {
        let t = self;
        ensure!(
            t.batch_size > 0 && t.steps > 0,
            "batch_size and steps must be > 0"
        );
        ensure!(
            t.learning_rate.is_finite() && t.learning_rate > 0.0,
            "learning_rate must be finite and > 0"
        );
        ensure!(
            (0.0..1.0).contains(&t.betas.0) && (0.0..1.0).contains(&t.betas.1),
            "betas must be in [0, 1)"
        );
        ensure!(t.grad_clip > 0.0, "grad_clip must be > 0");
        ensure!(
            t.precision != Precision::F16,
            "precision f16 is not offered for priors (its loss scaling is the autoencoder's); use \
             bf16, which needs none"
        );
        Ok(())
    }

    /// LlamaGen's optimiser settings for `steps` steps of `batch_size` grids at `learning_rate`,
    /// 5% warm-up, decay to 10%.
    pub fn llamagen(steps: usize, batch_size: usize, learning_rate: f64) -> Self {
        Self {
            batch_size,
            learning_rate,
            weight_decay: 0.05,
            betas: (0.9, 0.95),
            warmup_steps: steps / 20,
            steps,
            final_lr_fraction: 0.1,
            grad_clip: 1.0,
            precision: Precision::F32,
        }
    }
}

impl PriorRunConfig {
    /// The prior preset `preset` ([`vq_prior::PRESETS`]) shaped for the codes of `train`:
    /// their codebook size, grid and classes (class-conditional when they have labels).
    ///
    /// # Errors
    /// An unknown preset.
    pub fn for_codes(
        preset: &str,
        train: &CodeSet,
        paths: (Vec<PathBuf>, Vec<PathBuf>),
        tokenizer: Option<PathBuf>,
        training: PriorTraining,
        seed: u64,
    ) -> Result<Self> {
        let (h, w) = train.grid();
        let prior = PriorConfig::preset(preset, train.codebook_size, h, w, train.classes.len())?;
        Ok(Self {
            preset: preset.into(),
            prior: PriorConfig { seed, ..prior },
            train_codes: paths.0,
            val_codes: paths.1,
            tokenizer,
            training,
            seed,
        })
    }

    /// Checks the configuration against itself and the codes it trains on.
    ///
    /// # Errors
    /// A bad value or codes that do not fit the prior, named.
    pub fn validate(&self, train: &CodeSet) -> Result<()> {
        self.prior.validate()?;
        self.training.validate()?;
        let p = &self.prior;
        ensure!(
            train.codebook_size == p.codebook_size && train.grid() == (p.grid_h, p.grid_w),
            "the codes ({} codes on a {:?} grid) do not fit the prior ({} codes on {}×{})",
            train.codebook_size,
            train.grid(),
            p.codebook_size,
            p.grid_h,
            p.grid_w
        );
        if let Conditioning::Classes { classes, .. } = p.conditioning {
            ensure!(
                train.labels.is_some() && train.classes.len() == classes,
                "the prior is conditioned on {classes} classes but the codes have {}",
                match train.labels {
                    Some(_) => format!("{} classes", train.classes.len()),
                    None => "no labels".into(),
                }
            );
        }
        Ok(())
    }
}
