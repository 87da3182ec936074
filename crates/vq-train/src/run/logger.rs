//! What a run writes as it trains (rank 0): a logging window's means as one line of
//! `metrics.jsonl` and one TensorBoard event, samples that failed to decode in `skipped.jsonl`
//! (each file once, also printed when first seen), the progress bar, and the history returned.
//! Generic over the model kind: the kind names the numbers and turns a window into its record.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use super::row::WindowMeans;
use super::task::{LoopOptions, Task};
use crate::data::BadSample;
use crate::layout::RunDir;

/// One step's numbers as the window sees them.
#[derive(Debug, Clone)]
pub struct StepRecord {
    /// Steps done (1-based).
    pub done: usize,
    /// Learning rate of the step.
    pub lr: f64,
    /// The named numbers the kind averages over the window, in a fixed order.
    pub values: Vec<(&'static str, f64)>,
    /// f16: the update was skipped (the gradients overflowed).
    pub skipped: bool,
    /// The model's loss scale after the step (1 without loss scaling).
    pub loss_scale: f64,
    /// Samples of the step that failed to decode and were replaced (summed over ranks).
    pub bad_samples: u64,
}

/// Sums of the steps of the current window.
#[derive(Debug, Default)]
struct Window {
    n: usize,
    skipped: usize,
    bad_samples: u64,
    loss_scale: f64,
    sums: Vec<(&'static str, f64)>,
}

impl Window {
    fn add(&mut self, r: &StepRecord) {
        if self.sums.is_empty() {
            self.sums = r.values.iter().map(|(n, _)| (*n, 0.0)).collect();
        }
        debug_assert!(
            self.sums
                .iter()
                .map(|s| s.0)
                .eq(r.values.iter().map(|v| v.0))
        );
        self.n += 1;
        for ((_, a), (_, b)) in self.sums.iter_mut().zip(&r.values) {
            *a += b;
        }
        self.skipped += usize::from(r.skipped);
        self.bad_samples += r.bad_samples;
        self.loss_scale = r.loss_scale;
    }

    fn finish(&self, step: usize, lr: f64, secs: f64) -> WindowMeans {
        let n = self.n.max(1) as f64;
        WindowMeans {
            step,
            lr,
            steps_per_s: n / secs.max(1e-9),
            skipped_steps: self.skipped,
            skipped_samples: self.bad_samples,
            loss_scale: self.loss_scale,
            means: self.sums.iter().map(|(k, s)| (*k, s / n)).collect(),
        }
    }
}

/// `skipped.jsonl`: one line `{step, rank, index, file, error}` per file that failed to decode,
/// the first time any rank met it; kept across a resume.
#[derive(Debug, Default)]
struct BadLog {
    file: Option<fs::File>,
    seen: HashSet<String>,
    /// Failed samples since the run (or its resume) started, repeats included.
    total: u64,
}

impl BadLog {
    /// Opens the run's list (rank 0): a fresh run starts it empty, a resumed one keeps it and
    /// does not list its files again.
    fn open(dir: &RunDir, main: bool, start: usize) -> Result<Self> {
        if !main {
            return Ok(Self::default());
        }
        let path = dir.skipped();
        let mut seen = HashSet::new();
        if start > 0 && path.exists() {
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            // A line cut short by a crash only means its file may be listed again.
            seen.extend(text.lines().filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                Some(v.get("file")?.as_str()?.to_owned())
            }));
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(start > 0)
            .truncate(start == 0)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            file: Some(file),
            seen,
            total: 0,
        })
    }
}

/// The run's logs and progress bar; `R` is the model kind's record (one `metrics.jsonl` line).
#[derive(Debug)]
pub(crate) struct Logger<R> {
    file: Option<fs::File>,
    /// The run's TensorBoard event file (rank 0).
    events: Option<crate::tensorboard::EventWriter>,
    log_every: usize,
    window: Window,
    window_start: Instant,
    pub(crate) history: Vec<R>,
    pub(crate) bar: indicatif::ProgressBar,
    bad: BadLog,
}

impl<R: serde::Serialize> Logger<R> {
    /// Opens the logs of the run in `opts.out` (rank 0: `main`) that starts at step `start`.
    pub(crate) fn new(opts: &LoopOptions, main: bool, start: usize) -> Result<Self> {
        let dir = RunDir::new(&opts.out);
        let file = match main {
            true => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.metrics())
                    .with_context(|| format!("opening {}", RunDir::METRICS))?,
            ),
            false => None,
        };
        let events = match main {
            true => Some(open_events(&opts.out, start, &opts.config_json)?),
            false => None,
        };
        Ok(Self {
            file,
            events,
            log_every: opts.log_every.max(1),
            window: Window::default(),
            window_start: Instant::now(),
            history: Vec::new(),
            bar: progress_bar(opts.progress && main, start, opts.steps),
            bad: BadLog::open(&dir, main, start)?,
        })
    }

    /// Whether `skipped.jsonl` lists the file already.
    pub(crate) fn knows_bad(&self, name: &str) -> bool {
        self.bad.seen.contains(name)
    }

    /// Rank 0: lists and prints the samples (of `rank`) not met before.
    pub(crate) fn bad_samples(
        &mut self,
        done: usize,
        rank: usize,
        bad: Vec<BadSample>,
    ) -> Result<()> {
        let Some(file) = &mut self.bad.file else {
            return Ok(());
        };
        for b in bad {
            if !self.bad.seen.insert(b.name.clone()) {
                continue;
            }
            let line = serde_json::json!({
                "step": done, "rank": rank, "index": b.index, "file": b.name, "error": b.error,
            });
            file.write_all(format!("{line}\n").as_bytes())
                .with_context(|| format!("writing {}", RunDir::SKIPPED))?;
            self.bar.suspend(|| {
                eprintln!(
                    "data: step {done}: {} (replaced by the next sample that decodes; listed in {})",
                    b.error,
                    RunDir::SKIPPED
                )
            });
        }
        Ok(())
    }

    /// Adds a step's numbers; closes the window every `log_every` steps (or when `last`): the
    /// kind's record of it goes to `metrics.jsonl`, TensorBoard, the bar and the history.
    pub(crate) fn record<T: Task<Record = R>>(
        &mut self,
        task: &T,
        step: &StepRecord,
        last: bool,
    ) -> Result<()> {
        self.window.add(step);
        self.bad.total += step.bad_samples;
        let done = step.done;
        self.bar.set_position(done as u64);
        if !(done.is_multiple_of(self.log_every) || last) {
            return Ok(());
        }
        let means = self
            .window
            .finish(done, step.lr, self.window_start.elapsed().as_secs_f64());
        let record = task.record(&means);
        let bad = match self.bad.total {
            0 => String::new(),
            n => format!(" skipped {n}"),
        };
        self.bar
            .set_message(format!("{}{bad}", task.progress(&record)));
        if let Some(f) = &mut self.file {
            writeln!(f, "{}", serde_json::to_string(&record)?)
                .with_context(|| format!("writing {}", RunDir::METRICS))?;
        }
        if let Some(w) = &mut self.events {
            w.scalars(done, &task.scalars(&record))?;
        }
        self.history.push(record);
        self.window = Window::default();
        self.window_start = Instant::now();
        Ok(())
    }
}

/// The run's TensorBoard event file: a fresh start keeps only the file's version record (an
/// earlier attempt that never reached a checkpoint leaves nothing behind) and writes the
/// configuration; a resume keeps the events up to its step.
fn open_events(
    out: &Path,
    start: usize,
    config_json: &str,
) -> Result<crate::tensorboard::EventWriter> {
    use crate::tensorboard::{EventWriter, What};
    let mut w = match start {
        0 => EventWriter::open_keeping(out, |e| matches!(e.what, Some(What::FileVersion(_))))?,
        _ => EventWriter::open(out, start)?,
    };
    if start == 0 {
        w.text(0, "config", &format!("```\n{config_json}\n```"))?;
    }
    Ok(w)
}

/// Drops metric lines after `step` (logged after the checkpoint a resume starts from), so that
/// every step appears once. Lines are kept by their `step` field whatever the model kind.
pub(crate) fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Line {
        step: usize,
    }
    if !path.exists() {
        return Ok(());
    }
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<Line>(l).is_ok_and(|m| m.step <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    if kept.len() != text.len() {
        crate::checkpoint::write_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}

/// The project's progress bar (elapsed, bar, position / length, ETA), hidden unless `show`.
pub fn progress_bar(show: bool, start: usize, steps: usize) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} (eta {eta}) {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(start as u64);
    bar
}
