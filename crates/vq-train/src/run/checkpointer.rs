//! The run loop's checkpoints: resuming a run folder's latest one into the kind's parts, and
//! saving the parts with the run's step, resume key and training time (rank 0 only).

use std::path::PathBuf;

use anyhow::{Result, bail};
use tch::nn;

use crate::checkpoint::{self, Part, TrainState};
use crate::optim::AdamW;

/// Writes checkpoints (rank 0 only) and resumes from them.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    pub(crate) out: PathBuf,
    /// What a checkpoint records and a resume must match.
    pub(crate) key: serde_json::Value,
    /// Brings a recorded key of an older version up to date.
    pub(crate) upgrade: fn(&mut serde_json::Value),
    pub(crate) main: bool,
    /// Training seconds recorded by the checkpoint resumed from (earlier invocations).
    pub(crate) prior_seconds: f64,
}

impl Checkpointer {
    /// Loads the run folder's latest checkpoint into `parts` when resuming; returns the step to
    /// start at (0 when the folder holds no checkpoint yet, with `--resume` too). Refuses a
    /// folder that holds another run, or a run without `--resume`.
    pub(crate) fn resume(
        &mut self,
        resume: bool,
        parts: &mut [(&'static str, &mut nn::VarStore, &mut AdamW)],
    ) -> Result<usize> {
        match checkpoint::latest(&self.out)? {
            Some((ckpt, state)) if resume => {
                let note = super::resume::may_resume(
                    &ckpt,
                    &state.run,
                    &self.key,
                    state.step,
                    self.upgrade,
                )?;
                if let Some(note) = note
                    && self.main
                {
                    eprintln!("note: {note}");
                }
                if let Err(e) = checkpoint::load(&ckpt, parts) {
                    let way = match checkpoint::earlier(&self.out, &ckpt) {
                        Some(old) => format!(
                            "the earlier checkpoint {} is kept beside it: point \
                             checkpoints/latest at it (`ln -sfn {} {}`) and rerun with --resume \
                             to continue from there",
                            old.display(),
                            old.file_name().unwrap_or_default().to_string_lossy(),
                            self.out.join("checkpoints/latest").display(),
                        ),
                        None => "no earlier checkpoint is kept".to_owned(),
                    };
                    return Err(e.context(format!(
                        "the checkpoint {} cannot be read (truncated or damaged); {way}",
                        ckpt.display()
                    )));
                }
                self.prior_seconds = state.train_seconds;
                Ok(state.step)
            }
            Some((ckpt, _)) => bail!(
                "{} already holds a run (checkpoint {}); pass --resume to continue it or choose another --out",
                self.out.display(),
                ckpt.display()
            ),
            // As Lightning's `ckpt_path="last"`: one command serves the first start and every
            // restart (torchrun's --max-restarts), so a folder without a checkpoint starts fresh.
            None => {
                if resume && self.main {
                    eprintln!(
                        "note: --resume: no checkpoint in {} yet; starting a new run",
                        self.out.display()
                    );
                }
                Ok(0)
            }
        }
    }

    /// Saves a checkpoint of `parts` after `done` steps, `seconds` of them in this invocation.
    pub(crate) fn save(&self, done: usize, seconds: f64, parts: &[Part<'_>]) -> Result<()> {
        if !self.main {
            return Ok(());
        }
        let state = TrainState {
            step: done,
            run: self.key.clone(),
            train_seconds: self.prior_seconds + seconds,
        };
        checkpoint::save(&self.out, parts, &state)?;
        Ok(())
    }
}
