//! The prior kind: a generative prior ([`vq_prior::Prior`]) trained on a tokenizer's codes
//! through the run loop ([`crate::run::Learner`]) — exact resume, checkpoints, `metrics.jsonl`,
//! TensorBoard, non-finite stops and data-parallel training come from there — and its held-out
//! likelihood.

mod config;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, nn};
use vq_dist::ProcessGroup;
use vq_prior::Prior;

pub use config::{PriorRunConfig, PriorTraining};

use crate::checkpoint::Part;
use crate::codeset::CodeSet;
use crate::data::{BadSample, Sampler};
use crate::dist::Dist;
use crate::optim::{AdamW, learning_rate};
use crate::readback::Readback;
use crate::run::{
    AcrossRanks, Learner, LoopOptions, Start, StepContext, StepOutput, StepRow, StepValues, Stop,
    Task, WindowMeans,
};

/// The names of a prior step's numbers.
pub mod names {
    /// Mean cross-entropy, nats per code.
    pub const LOSS: &str = "loss";
    /// The same in bits per code.
    pub const BITS: &str = "bits_per_token";
    /// Gradient norm before clipping.
    pub const GRAD_NORM: &str = "grad_norm";
}

/// One line of a prior run's `metrics.jsonl`: a logging window's averages.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PriorMetrics {
    /// Steps done at the window's end.
    pub step: usize,
    /// Learning rate of its last step.
    pub lr: f64,
    /// Training cross-entropy, nats per code (with the run's corruption and dropout).
    pub loss: f64,
    /// The same in bits per code.
    pub bits_per_token: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Optimiser steps per second.
    pub steps_per_s: f64,
}

/// How a prior run runs (none of it changes the numbers).
#[derive(Debug, Clone)]
pub struct PriorOptions {
    /// The run.
    pub config: PriorRunConfig,
    /// Run folder.
    pub out: PathBuf,
    /// Device.
    pub device: Device,
    /// Steps between metric lines.
    pub log_every: usize,
    /// Steps between checkpoints.
    pub checkpoint_every: usize,
    /// Continue from the folder's latest checkpoint.
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Stop (with a checkpoint) after this many steps.
    pub stop_after: Option<usize>,
}

/// The prior kind of the run loop.
#[derive(Debug)]
pub struct PriorTask {
    opts: PriorOptions,
    data: CodeSet,
    vs: nn::VarStore,
    prior: Prior,
    opt: AdamW,
    sampler: Option<Sampler>,
    per_rank: usize,
}

impl PriorTask {
    /// Validates the run against its training codes `data` (read from
    /// `opts.config.train_codes`) and builds the prior (a fresh one; the loop resumes a
    /// checkpoint into it) for `world` ranks.
    ///
    /// # Errors
    /// Bad configuration, codes that do not fit, a batch the ranks cannot share.
    pub fn new(opts: PriorOptions, data: CodeSet, world: usize) -> Result<Self> {
        opts.config.validate(&data)?;
        let t = &opts.config.training;
        ensure!(
            t.batch_size.is_multiple_of(world),
            "batch size {} is not a multiple of the {world} ranks",
            t.batch_size
        );
        t.precision.check_available(opts.device)?;
        let vs = nn::VarStore::new(opts.device);
        let prior = Prior::new(&vs.root(), opts.config.prior)?;
        let opt = AdamW::new(&vs, t.betas, t.weight_decay);
        Ok(Self {
            per_rank: t.batch_size / world,
            opts,
            data,
            vs,
            prior,
            opt,
            sampler: None,
        })
    }

    /// How the run loop runs this task.
    ///
    /// # Errors
    /// The configuration cannot be written as JSON.
    pub fn loop_options(&self) -> Result<LoopOptions> {
        let o = &self.opts;
        Ok(LoopOptions {
            out: o.out.clone(),
            device: o.device,
            steps: o.config.training.steps,
            log_every: o.log_every,
            checkpoint_every: o.checkpoint_every,
            resume: o.resume,
            progress: o.progress,
            stop_after: o.stop_after,
            readback: Readback::Auto,
            profile: None,
            loss_scaling: false,
            samples_per_step: self.per_rank,
            key: serde_json::to_value(&o.config)?,
            upgrade: |_| {},
            config_json: serde_json::to_string_pretty(&o.config)?,
        })
    }

    /// The prior (after training: the last step's weights) and its variables.
    pub fn into_prior(self) -> (Prior, nn::VarStore) {
        (self.prior, self.vs)
    }

    /// The seed of the draws of dataset grid `index` at step `step`: the same on whichever
    /// rank the grid lands.
    fn sample_seed(&self, step: usize, index: i64) -> u64 {
        let s = self.opts.config.seed ^ (step as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        s ^ (index as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03)
    }
}

impl Task for PriorTask {
    type Record = PriorMetrics;

    fn parts(&self) -> Vec<Part<'_>> {
        vec![Part {
            name: "model",
            vs: &self.vs,
            opt: &self.opt,
        }]
    }

    fn parts_mut(&mut self) -> Vec<(&'static str, &mut nn::VarStore, &mut AdamW)> {
        vec![("model", &mut self.vs, &mut self.opt)]
    }

    fn prepare(&mut self, start: &Start) -> Result<()> {
        self.sampler = Some(Sampler::sharded(
            self.opts.config.seed,
            self.data.len(),
            self.per_rank,
            start.shard,
        ));
        Ok(())
    }

    fn step(&mut self, cx: &mut StepContext<'_>, step: usize) -> Result<StepOutput> {
        let t = self.opts.config.training;
        let lr = learning_rate(
            step,
            t.learning_rate,
            t.warmup_steps,
            t.steps.saturating_sub(t.warmup_steps),
            t.final_lr_fraction,
        );
        let idx = self
            .sampler
            .as_mut()
            .context("prepare() positions the data first")?
            .batch_indices(step);
        let (codes, labels) = self.data.batch(&idx, self.opts.device);
        self.opt.zero_grad();
        let seeds: Vec<u64> = idx.iter().map(|&i| self.sample_seed(step, i)).collect();
        let loss = vq_tch::autocast(self.opts.device, t.precision, || {
            self.prior.training_loss(&codes, labels.as_ref(), &seeds)
        })??;
        cx.backward(&loss)?;
        cx.dist.average_gradients(&self.opt)?;
        let norm = self.opt.clip_on_device(t.grad_clip);
        let loss = loss.detach();
        cx.raise_halt(&[&loss, &norm], &[]);
        self.opt.step_unless(lr, cx.halt());
        let row = StepRow::new()
            .scalar(names::LOSS, AcrossRanks::Mean, &loss)
            .scalar(names::GRAD_NORM, AcrossRanks::Same, &norm);
        Ok(StepOutput {
            lr,
            row,
            bad: Vec::new(),
            skipped: false,
            loss_scale: 1.0,
        })
    }

    fn observe(&self, step: usize, v: &StepValues) -> Result<Vec<(&'static str, f64)>, Stop> {
        let (loss, norm) = (v.get(names::LOSS), v.get(names::GRAD_NORM));
        if !loss.is_finite() {
            return Err(Stop(format!(
                "non-finite prior loss {loss} at step {}; training stopped",
                step + 1
            )));
        }
        if !norm.is_finite() {
            return Err(Stop(format!(
                "non-finite gradient (norm {norm}) at step {} under a finite loss {loss}; \
                 training stopped before the update",
                step + 1
            )));
        }
        Ok(vec![
            (names::LOSS, loss),
            (names::BITS, loss / std::f64::consts::LN_2),
            (names::GRAD_NORM, norm),
        ])
    }

    fn record(&self, w: &WindowMeans) -> PriorMetrics {
        PriorMetrics {
            step: w.step,
            lr: w.lr,
            loss: w.get(names::LOSS),
            bits_per_token: w.get(names::BITS),
            grad_norm: w.get(names::GRAD_NORM),
            steps_per_s: w.steps_per_s,
        }
    }

    fn scalars(&self, m: &PriorMetrics) -> Vec<(&'static str, f64)> {
        vec![
            ("train/loss", m.loss),
            ("train/bits_per_token", m.bits_per_token),
            ("train/grad_norm", m.grad_norm),
            ("train/lr", m.lr),
        ]
    }

    fn progress(&self, m: &PriorMetrics) -> String {
        format!(
            "loss {:.4} ({:.3} bits/code) {:.1} it/s",
            m.loss, m.bits_per_token, m.steps_per_s
        )
    }

    fn sample_name(&self, index: usize) -> String {
        format!("codes sample {index}")
    }

    fn failure(&self, index: usize) -> BadSample {
        // Codes in memory cannot fail to decode.
        BadSample {
            index,
            name: self.sample_name(index),
            error: "codes samples do not fail".into(),
        }
    }
}

/// What a finished prior run reports.
#[derive(Debug)]
pub struct TrainedPrior {
    /// The prior with the last step's weights.
    pub prior: Prior,
    /// Its variables.
    pub vs: nn::VarStore,
    /// This invocation's metric windows.
    pub history: Vec<PriorMetrics>,
    /// Held-out likelihood, when the run names held-out codes.
    pub eval: Option<Likelihood>,
}

/// Trains (or resumes) a prior run on its training codes `data` as one rank of `group`
/// (`None`: alone), then measures the held-out likelihood and writes it to `eval.json`.
///
/// # Errors
/// As [`PriorTask::new`]; a run folder holding another run; a non-finite loss; I/O.
pub fn train_prior(
    opts: PriorOptions,
    data: CodeSet,
    group: Option<Arc<ProcessGroup>>,
) -> Result<TrainedPrior> {
    let dist = Dist::new(group);
    let task = PriorTask::new(opts.clone(), data, dist.world())?;
    let loop_opts = task.loop_options()?;
    let finished = Learner::new(task, loop_opts, dist.clone())?.run()?;
    let (prior, vs) = finished.task.into_prior();
    let stopped_early = opts
        .stop_after
        .is_some_and(|s| s < opts.config.training.steps);
    let eval = match (
        opts.config.val_codes.is_empty(),
        stopped_early,
        dist.is_main(),
    ) {
        (false, false, true) => {
            let val = CodeSet::open(&opts.config.val_codes)?;
            let l = likelihood(&prior, &val, 64)?;
            let path = crate::layout::RunDir::new(&opts.out).eval();
            crate::checkpoint::write_atomic(&path, serde_json::to_string_pretty(&l)?.as_bytes())?;
            Some(l)
        }
        _ => None,
    };
    Ok(TrainedPrior {
        prior,
        vs,
        history: finished.history,
        eval,
    })
}

/// Held-out negative log-likelihood of a prior.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Likelihood {
    /// Grids measured.
    pub samples: usize,
    /// Mean NLL in bits per code.
    pub bits_per_token: f64,
    /// Mean NLL in bits per grid (bits per code × h·w).
    pub bits_per_image: f64,
}

/// The autoregressive prior's exact held-out NLL over `codes`, `batch` grids at a time (f64
/// accumulation).
///
/// # Errors
/// Codes that do not fit the prior; a masked prior (no likelihood).
pub fn likelihood(prior: &Prior, codes: &CodeSet, batch: usize) -> Result<Likelihood> {
    let n = codes.len();
    let mut total = 0.0;
    for start in (0..n).step_by(batch.max(1)) {
        let idx: Vec<i64> = (start..(start + batch).min(n)).map(|i| i as i64).collect();
        let (c, y) = codes.batch(&idx, prior.device());
        let nll = f64::try_from(prior.nll(&c, y.as_ref())?.to_kind(Kind::Double))?;
        total += nll * idx.len() as f64;
    }
    let nats = total / n as f64;
    let bits = nats / std::f64::consts::LN_2;
    Ok(Likelihood {
        samples: n,
        bits_per_token: bits,
        bits_per_image: bits * prior.config().tokens() as f64,
    })
}

/// The prior of run folder `run` with its latest checkpoint's weights, on `device`.
///
/// # Errors
/// No run.json or checkpoint; weights that do not fit.
pub fn load_prior(run: &Path, device: Device) -> Result<(PriorRunConfig, Prior, nn::VarStore)> {
    let dir = crate::layout::RunDir::new(run);
    let text = std::fs::read_to_string(dir.run())
        .with_context(|| format!("reading {}", dir.run().display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", dir.run().display()))?;
    crate::run::expect_kind(&value, crate::run::RunKind::Prior, &dir.run())?;
    let config: PriorRunConfig =
        crate::config::from_json_value(value, &dir.run()).context("not a prior run's run.json")?;
    let mut vs = nn::VarStore::new(device);
    let prior = Prior::new(&vs.root(), config.prior)?;
    crate::checkpoint::load_model(run, &mut vs)
        .with_context(|| format!("loading the prior of {}", run.display()))?;
    Ok((config, prior, vs))
}
