//! The contract between the run loop and a model kind: the [`Task`] trait, what a step returns
//! ([`StepOutput`]) and may use ([`StepContext`]), where a run starts ([`Start`]) and how the
//! loop runs ([`LoopOptions`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, bail};
use tch::{Device, Kind, Tensor, nn};
use vq_dist::ProcessGroup;

use super::row::{StepRow, StepValues, WindowMeans};
use crate::checkpoint::{Part, last_checkpoint};
use crate::data::{BadSample, Shard};
use crate::dist::Dist;
use crate::optim::{AdamW, LossScale};
use crate::profile::ProfileSteps;
use crate::readback::Readback;

/// What a model kind supplies to the run loop.
pub trait Task {
    /// One line of `metrics.jsonl`: a logging window's numbers, named.
    type Record: serde::Serialize + Clone + std::fmt::Debug;

    /// The networks the loop checkpoints, broadcasts and keeps in sync, each with its
    /// optimiser, in a fixed order (`model` first: its files are `model.safetensors` and
    /// `optimizer.safetensors`).
    fn parts(&self) -> Vec<Part<'_>>;

    /// The same parts, to load a checkpoint into or receive rank 0's state.
    fn parts_mut(&mut self) -> Vec<(&'static str, &mut nn::VarStore, &mut AdamW)>;

    /// Rank 0, for a run that starts at step 0: load pretrained weights, if the run names any.
    ///
    /// # Errors
    /// Unreadable or misfitting weights.
    fn init_fresh(&mut self) -> Result<()> {
        Ok(())
    }

    /// Every rank, once the start step is known: position the data stream, join the group.
    ///
    /// # Errors
    /// The data stream cannot be positioned.
    fn prepare(&mut self, start: &Start) -> Result<()>;

    /// One optimiser step (0-based `step`): micro-batches, the update (skipped on the device
    /// once `cx`'s halt flag is raised), and the step's numbers left on the device.
    ///
    /// # Errors
    /// A failed step (data, a lost rank, an error [`StepContext::stopped`] names).
    fn step(&mut self, cx: &mut StepContext<'_>, step: usize) -> Result<StepOutput>;

    /// A read-back step's numbers (combined over ranks): its stop, if a number that must be
    /// finite is not ([`Stop`]), else the named numbers its window averages.
    ///
    /// # Errors
    /// Why the run stops at this step (the loop names the last good checkpoint).
    fn observe(&self, step: usize, values: &StepValues) -> Result<Vec<(&'static str, f64)>, Stop>;

    /// The record of a closed logging window.
    fn record(&self, window: &WindowMeans) -> Self::Record;

    /// A record's TensorBoard scalars under their tags.
    fn scalars(&self, record: &Self::Record) -> Vec<(&'static str, f64)>;

    /// A record in a few words, for the progress bar.
    fn progress(&self, record: &Self::Record) -> String;

    /// The name of the sample at dataset `index` (its file), for the failed-sample list.
    fn sample_name(&self, index: usize) -> String;

    /// The sample at dataset `index` and why it failed to decode (rank 0 reports another
    /// rank's failures by reading them again).
    fn failure(&self, index: usize) -> BadSample;

    /// After the last step: leave the group, return to eager checks, for evaluation.
    fn finish(&mut self) {}
}

/// Why a step stops the run; the loop adds the last good checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop(pub String);

/// Where a run starts, told to the kind by [`Task::prepare`].
#[derive(Debug, Clone)]
pub struct Start {
    /// Steps already done (0 for a fresh run).
    pub step: usize,
    /// This process's part of the data.
    pub shard: Shard,
    /// The process group (`None`: alone).
    pub group: Option<Arc<ProcessGroup>>,
    /// When numbers come back from the device ([`Readback::Step`] or [`Readback::Window`]).
    pub readback: Readback,
}

/// What one step leaves for the loop.
#[derive(Debug)]
pub struct StepOutput {
    /// The learning rate of the step.
    pub lr: f64,
    /// Its numbers, on the device.
    pub row: StepRow,
    /// Samples of its batches that failed to decode (and were replaced).
    pub bad: Vec<BadSample>,
    /// f16: the update was skipped (decided on the host).
    pub skipped: bool,
    /// The model's loss scale after the step (1 without loss scaling).
    pub loss_scale: f64,
}

/// How the loop runs (none of it changes the numbers).
#[derive(Debug, Clone)]
pub struct LoopOptions {
    /// Run folder.
    pub out: PathBuf,
    /// Device of the step's numbers.
    pub device: Device,
    /// The run's total of optimiser steps.
    pub steps: usize,
    /// Steps between metric lines.
    pub log_every: usize,
    /// Steps between checkpoints (the last step always gets one).
    pub checkpoint_every: usize,
    /// Continue from the run folder's latest checkpoint.
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Stop (with a checkpoint) after this many steps.
    pub stop_after: Option<usize>,
    /// When numbers come back from the device (resolved by the loop).
    pub readback: Readback,
    /// Steps to profile.
    pub profile: Option<ProfileSteps>,
    /// The run is f16 with a dynamic loss scale.
    pub loss_scaling: bool,
    /// Samples per step on one rank (slots of the failed-sample exchange).
    pub samples_per_step: usize,
    /// What checkpoints record and a resume must match.
    pub key: serde_json::Value,
    /// Brings a recorded key of an older version up to date.
    pub upgrade: fn(&mut serde_json::Value),
    /// The configuration as `run.json` holds it (pretty JSON).
    pub config_json: String,
}

/// What a step may use of the loop.
#[derive(Debug)]
pub struct StepContext<'a> {
    /// The process group.
    pub dist: &'a Dist,
    pub(super) halt: &'a mut Tensor,
    pub(super) out: &'a Path,
}

impl StepContext<'_> {
    /// f32 0/1 on the device: a non-finite number was met; every later update is skipped
    /// (`AdamW::step_unless`) until the run stops at the next read.
    pub fn halt(&self) -> &Tensor {
        self.halt
    }

    /// Raises the halt flag if any of `values` is not finite or a deferred finite check failed
    /// (on the device, no read).
    pub fn raise_halt(&mut self, values: &[&Tensor], verdicts: &[Tensor]) {
        let mut bad = Tensor::ne(self.halt, 0.0);
        for v in values {
            bad = bad.logical_or(&v.isfinite().logical_not());
        }
        for v in verdicts {
            bad = bad.logical_or(&v.narrow(0, 0, 2).ne(0).any());
        }
        *self.halt = bad.to_kind(Kind::Float);
    }

    /// The error that stops the run: `what`, then the last good checkpoint.
    #[must_use]
    pub fn stopped(&self, what: &str) -> anyhow::Error {
        match last_checkpoint(self.out) {
            Ok(ckpt) => anyhow::anyhow!("{what}, last good checkpoint: {ckpt}"),
            Err(e) => e,
        }
    }

    /// Loss scaling that has backed off to nothing: every step for a long while overflowed.
    ///
    /// # Errors
    /// The optimiser whose scale fell below [`LossScale::MIN`], named.
    pub fn check_loss_scales(&self, step: usize, opts: &[(&str, &AdamW)]) -> Result<()> {
        for (what, opt) in opts {
            if opt.loss_scale() < LossScale::MIN {
                bail!(
                    "f16 loss scale of the {what} fell to {:e} at step {}: its gradients overflowed \
                     at every step for {} steps in a row (the run diverged or f16's range is too \
                     small for it; try --precision bf16); last good checkpoint: {}",
                    opt.loss_scale(),
                    step + 1,
                    (LossScale::INIT / LossScale::MIN).log2().round(),
                    last_checkpoint(self.out)?
                );
            }
        }
        Ok(())
    }

    /// The backward pass, with libtorch's errors as errors rather than panics; inside a group a
    /// failure is a collective of synchronised BatchNorm that lost a peer, named as such.
    ///
    /// # Errors
    /// The failed backward pass.
    pub fn backward(&self, loss: &Tensor) -> Result<()> {
        loss.f_backward().map_err(|e| match self.dist.group() {
            Some(g) => g
                .lost("all_reduce in the backward pass", &e.to_string())
                .into(),
            None => anyhow::anyhow!("backward pass failed: {e}"),
        })
    }
}
