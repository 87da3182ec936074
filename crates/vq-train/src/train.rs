//! Training an autoencoder run: [`train`] / [`train_in`] build the [`Autoencoder`] kind of a
//! [`TrainOptions`] and run it through the run loop ([`crate::run::Learner`]).

use std::fs;
use std::sync::Arc;

use anyhow::Result;
use tch::nn;
use vq_dist::ProcessGroup;
use vq_models::VqAutoencoder;

use crate::autoencoder::Autoencoder;
use crate::config::TrainOptions;
use crate::dist::Dist;
use crate::metrics::StepMetrics;
use crate::run::Learner;

/// What [`train`] returns.
#[derive(Debug)]
pub struct Trained {
    /// The model (weights of the last step).
    pub model: VqAutoencoder,
    /// Its variables.
    pub vs: nn::VarStore,
    /// Metric windows of this invocation.
    pub history: Vec<StepMetrics>,
    /// Wall-clock seconds of this invocation's steps.
    pub seconds: f64,
}

/// Trains (or resumes) a run in this process alone.
///
/// # Errors
/// Bad configuration, unreadable data, a run folder holding another run, a non-finite loss
/// (training stops; the last good checkpoint stays), I/O errors.
pub fn train(opts: &TrainOptions) -> Result<Trained> {
    train_in(opts, None)
}

/// Trains (or resumes) a run as one rank of a data-parallel `group` (`None`: alone). Every
/// rank calls this with the same configuration; the global batch `training.batch_size` is split
/// as world × micro-batch × accumulation; only rank 0 writes the run folder (see
/// [`crate::dist`] for what is kept in sync). When a rank fails it tells the others why, so
/// their errors name it.
///
/// # Errors
/// As [`train`]; a mismatch between the ranks' configurations; a lost rank (the others stop
/// with an error naming it, within the group's timeout).
pub fn train_in(opts: &TrainOptions, group: Option<Arc<ProcessGroup>>) -> Result<Trained> {
    let dist = Dist::new(group);
    let fresh = !opts.out.exists();
    let result = run(opts, &dist);
    if let Err(e) = &result {
        dist.report_failure(&format!("{e:#}"));
        if fresh && dist.is_main() {
            // A run that failed before writing anything leaves no empty folder behind
            // (remove_dir refuses a folder that holds anything).
            let _ = fs::remove_dir(&opts.out);
        }
    }
    result
}

fn run(opts: &TrainOptions, dist: &Dist) -> Result<Trained> {
    let task = Autoencoder::new(opts, dist)?;
    let loop_options = task.loop_options()?;
    let finished = Learner::new(task, loop_options, dist.clone())?.run()?;
    let (model, vs) = finished.task.into_model();
    Ok(Trained {
        model,
        vs,
        history: finished.history,
        seconds: finished.seconds,
    })
}
