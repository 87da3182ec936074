//! The run loop, written once for every model kind.
//!
//! [`Learner`] owns what every training run needs — resume and checkpoints, `metrics.jsonl`,
//! TensorBoard and `skipped.jsonl`, the progress bar, when numbers come back from the device
//! and the non-finite stops, rank agreement and synchronisation, profiling — and a model kind
//! supplies its steps through the small [`Task`] trait: its networks ([`Task::parts`]), one
//! optimiser step ([`Task::step`], returning its numbers under their names), and what a
//! window's numbers become ([`Task::record`]). The autoencoder kind
//! ([`crate::autoencoder::Autoencoder`]) is one such task.
//!
//! Order of a run: the kind builds itself (validation, data, networks); [`Learner::new`] checks
//! that the ranks agree, resumes the latest checkpoint into the parts (rank 0) or lets the kind
//! start from pretrained weights ([`Task::init_fresh`]), broadcasts the parts, writes
//! `run.json`, then tells the kind where it starts ([`Task::prepare`]). [`Learner::run`] then
//! steps, reads back, records and checkpoints until the last step or `--stop-after`.

mod checkpointer;
mod logger;
mod resume;
mod row;
mod task;

use std::fs;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use tch::{Device, Kind, Tensor};

pub use logger::{StepRecord, progress_bar};
pub use resume::{RunKind, expect_kind, may_resume};
pub use row::{AcrossRanks, StepRow, StepValues, WindowMeans};
pub use task::{LoopOptions, Start, StepContext, StepOutput, Stop, Task};

use crate::checkpoint::{last_checkpoint, write_atomic};
use crate::data::{BadSample, Shard};
use crate::dist::Dist;
use crate::layout::RunDir;
use crate::profile::{ProfileSteps, TraceSummary};
use crate::readback::Readback;
use checkpointer::Checkpointer;
use logger::Logger;

/// A step whose numbers are still on the device.
#[derive(Debug)]
struct Pending {
    step: usize,
    out: StepOutput,
    /// Whether this step closes the run (its last step or `--stop-after`).
    last: bool,
}

/// What [`Learner::run`] returns.
#[derive(Debug)]
pub struct Finished<T: Task> {
    /// The kind, with the weights of the last step.
    pub task: T,
    /// The records of this invocation's windows.
    pub history: Vec<T::Record>,
    /// Wall-clock seconds of this invocation's steps.
    pub seconds: f64,
}

/// The run loop of one process of a run.
#[derive(Debug)]
pub struct Learner<T: Task> {
    task: T,
    opts: LoopOptions,
    dist: Dist,
    start: usize,
    checkpointer: Checkpointer,
    logger: Logger<T::Record>,
    readback: Readback,
    pending: Vec<Pending>,
    halt: Tensor,
}

impl<T: Task> Learner<T> {
    /// Checks that the ranks agree on when they communicate, resumes or initialises the
    /// kind's parts, broadcasts them, writes `run.json` and prepares the kind.
    ///
    /// # Errors
    /// Options that differ between ranks, a run folder holding another run, unreadable
    /// checkpoints, a lost rank, `--profile-steps` outside the steps trained.
    pub fn new(mut task: T, opts: LoopOptions, dist: Dist) -> Result<Self> {
        ensure!(
            opts.stop_after != Some(0),
            "--stop-after 0 would stop before the first step, training and evaluating nothing: \
             give at least 1"
        );
        ensure!(
            opts.log_every > 0 && opts.checkpoint_every > 0,
            "--log-every and --checkpoint-every count steps between metric lines and between \
             checkpoints: give at least 1 (got {} and {})",
            opts.log_every,
            opts.checkpoint_every
        );
        // The options that decide when the ranks communicate.
        dist.check_same(
            "--stop-after / --checkpoint-every",
            format!("{:?} {}", opts.stop_after, opts.checkpoint_every).as_bytes(),
        )?;
        let mut checkpointer = Checkpointer {
            out: opts.out.clone(),
            key: opts.key.clone(),
            upgrade: opts.upgrade,
            main: dist.is_main(),
            prior_seconds: 0.0,
        };
        let start = resume_or_init(&mut task, &mut checkpointer, &opts, &dist)?;
        if dist.is_main() {
            open_run_folder(&opts, &dist, start)?;
        }
        let readback = opts
            .readback
            .resolve(opts.device, dist.world(), opts.loss_scaling)?;
        let shard = Shard {
            rank: dist.rank(),
            world: dist.world(),
        };
        task.prepare(&Start {
            step: start,
            shard,
            group: dist.group().cloned(),
            readback,
        })?;
        let logger = Logger::new(&opts, dist.is_main(), start)?;
        if let Some(p) = opts.profile {
            let end = opts.stop_after.unwrap_or(opts.steps).min(opts.steps);
            ensure!(
                p.first > start && p.last <= end,
                "--profile-steps {}..{} lies outside the steps this invocation trains ({}..{end})",
                p.first,
                p.last,
                start + 1
            );
        }
        let halt = Tensor::zeros([], (Kind::Float, opts.device));
        Ok(Self {
            task,
            opts,
            dist,
            start,
            checkpointer,
            logger,
            readback,
            pending: Vec::new(),
            halt,
        })
    }

    /// Trains from the start (or resumed) step to the end or to `stop_after`.
    ///
    /// # Errors
    /// A stop (non-finite numbers; the last good checkpoint stays), the kind's step errors,
    /// I/O errors, a lost rank.
    pub fn run(mut self) -> Result<Finished<T>> {
        let began = Instant::now();
        let steps = self.opts.steps;
        for step in self.start..steps {
            let done = step + 1;
            let stop = self.opts.stop_after == Some(done);
            let save =
                done.is_multiple_of(self.opts.checkpoint_every.max(1)) || done == steps || stop;
            let profile = self
                .opts
                .profile
                .filter(|p| (p.first..=p.last).contains(&done));
            if profile.is_some_and(|p| p.first == done) {
                crate::ops::profile_start(self.opts.device.is_cuda())?;
            }
            self.step(step, done == steps || stop)?;
            if self.readback == Readback::Step
                || done.is_multiple_of(self.opts.log_every.max(1))
                || save
            {
                self.read_back()?;
            }
            if let Some(p) = profile.filter(|p| p.last == done) {
                self.finish_profile(p)?;
            }
            if save {
                self.save(done, began.elapsed().as_secs_f64())?;
            }
            if stop {
                break;
            }
        }
        self.logger.bar.finish_and_clear();
        self.dist.finish()?;
        self.task.finish();
        Ok(Finished {
            task: self.task,
            history: self.logger.history,
            seconds: began.elapsed().as_secs_f64(),
        })
    }

    fn step(&mut self, step: usize, last: bool) -> Result<()> {
        let mut cx = StepContext {
            dist: &self.dist,
            halt: &mut self.halt,
            out: &self.opts.out,
        };
        let out = self.task.step(&mut cx, step)?;
        self.pending.push(Pending { step, out, last });
        Ok(())
    }

    /// Checks that the ranks hold the same weights, then saves the parts (rank 0).
    fn save(&self, done: usize, seconds: f64) -> Result<()> {
        let parts = self.task.parts();
        for p in &parts {
            self.dist.check_in_sync(p.name, p.vs, done)?;
        }
        self.checkpointer.save(done, seconds, &parts)
    }

    /// Reads the pending steps back (one copy), stops the run at the first step that met a
    /// non-finite number (naming it as the step itself would have), and records the others.
    fn read_back(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        let rows: Vec<&StepRow> = pending.iter().map(|p| &p.out.row).collect();
        let values = StepRow::read(&rows)?;
        for (p, v) in pending.into_iter().zip(values) {
            self.check_and_record(p, v)?;
        }
        Ok(())
    }

    /// One read-back step: its numbers over the ranks, its failed samples, the kind's stops,
    /// then the logger.
    fn check_and_record(&mut self, p: Pending, mut v: StepValues) -> Result<()> {
        let step = p.step;
        let bad_samples = v.over_ranks(&self.dist, p.out.bad.len() as u64)?;
        if bad_samples > 0 {
            self.report_bad_samples(step, p.out.bad)?;
        }
        let values = match self.task.observe(step, &v) {
            Ok(values) => values,
            Err(Stop(what)) => bail!(
                "{what}, last good checkpoint: {}",
                last_checkpoint(&self.opts.out)?
            ),
        };
        let record = StepRecord {
            done: step + 1,
            lr: p.out.lr,
            values,
            skipped: p.out.skipped,
            loss_scale: p.out.loss_scale,
            bad_samples,
        };
        self.logger.record(&self.task, &record, p.last)
    }

    /// Rank 0 records the step's failed samples of every rank (each file once): the ranks'
    /// dataset indices meet in one sum (rank r fills its own slots), rank 0 asks the kind for
    /// each new failure of another rank again for its message.
    fn report_bad_samples(&mut self, step: usize, mine: Vec<BadSample>) -> Result<()> {
        let world = self.dist.world();
        if world == 1 {
            return self.logger.bad_samples(step + 1, 0, mine);
        }
        let slots = self.opts.samples_per_step;
        let mut all = vec![0f64; world * slots];
        for (k, b) in mine.iter().enumerate() {
            all[self.dist.rank() * slots + k] = (b.index + 1) as f64;
        }
        self.dist.sum(&mut all)?;
        if !self.dist.is_main() {
            return Ok(());
        }
        self.logger.bad_samples(step + 1, 0, mine)?;
        for (rank, ranks) in all.chunks(slots).enumerate().skip(1) {
            let theirs: Vec<BadSample> = ranks
                .iter()
                .take_while(|&&v| v > 0.0)
                .map(|&v| v as usize - 1)
                .filter(|&i| !self.logger.knows_bad(&self.task.sample_name(i)))
                .map(|i| self.task.failure(i))
                .collect();
            self.logger.bad_samples(step + 1, rank, theirs)?;
        }
        Ok(())
    }

    /// Waits for the device, stops the profiler and writes its trace and a summary into
    /// `<out>/profile/` (one trace per rank).
    fn finish_profile(&self, p: ProfileSteps) -> Result<()> {
        if let Device::Cuda(i) = self.opts.device {
            tch::Cuda::synchronize(i as i64);
        }
        let dir = RunDir::new(&self.opts.out).profile();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let stem = match self.dist.world() {
            1 => "trace".to_owned(),
            _ => format!("trace-rank{}", self.dist.rank()),
        };
        let trace = dir.join(format!("{stem}.json"));
        crate::ops::profile_stop(&trace)?;
        let summary = TraceSummary::read(&trace)?.markdown(p.count(), 30);
        let md = dir.join(format!("{stem}.md"));
        let text = format!("# steps {}..{}\n\n{summary}", p.first, p.last);
        crate::checkpoint::write_atomic(&md, text.as_bytes())?;
        self.logger.bar.suspend(|| {
            eprintln!(
                "profile of steps {}..{}: {} (summary {})",
                p.first,
                p.last,
                trace.display(),
                md.display()
            )
        });
        Ok(())
    }
}

/// Rank 0 resumes the latest checkpoint into the kind's parts (or, for a fresh run, lets the
/// kind load pretrained weights); the start step and every part's state then go to all ranks.
fn resume_or_init<T: Task>(
    task: &mut T,
    checkpointer: &mut Checkpointer,
    opts: &LoopOptions,
    dist: &Dist,
) -> Result<usize> {
    let start = match dist.is_main() {
        true => checkpointer.resume(opts.resume, &mut task.parts_mut())?,
        false => 0,
    };
    if start == 0 && dist.is_main() {
        task.init_fresh()?;
    }
    let start = usize::try_from(dist.broadcast_i64(start as i64)?)?;
    for (name, vs, opt) in task.parts_mut() {
        dist.broadcast_state(name, vs, opt)?;
    }
    Ok(start)
}

/// Rank 0: creates the run folder, drops metric lines a resume trains again, says so, and
/// writes `run.json`.
fn open_run_folder(opts: &LoopOptions, dist: &Dist, start: usize) -> Result<()> {
    let dir = RunDir::new(&opts.out);
    fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    if start > 0 {
        logger::truncate_metrics(&dir.metrics(), start)?;
        eprintln!(
            "resuming {} at step {start}{}",
            opts.out.display(),
            if dist.world() > 1 {
                format!(" on {} ranks", dist.world())
            } else {
                String::new()
            }
        );
    }
    write_atomic(&dir.run(), opts.config_json.as_bytes())
}
