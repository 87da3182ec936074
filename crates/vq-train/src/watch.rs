//! A live view of a run that is still training: its latest metric window, progress and ETA, and
//! `curves.png` redrawn from `metrics.jsonl`, read without disturbing the training process.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use crate::compare::write_curves;
use crate::config::RunConfig;
use crate::layout::RunDir;
use crate::metrics::StepMetrics;

/// What one look at a run found.
#[derive(Debug, Clone, PartialEq)]
pub struct RunStatus {
    /// Steps logged so far (the last window's step; 0 before the first).
    pub done: usize,
    /// Steps the run is configured for.
    pub total: usize,
    /// The latest metric window.
    pub last: Option<StepMetrics>,
    /// Seconds left at the latest window's speed.
    pub eta_seconds: Option<f64>,
}

impl RunStatus {
    /// Whether the run has logged its last step.
    pub fn finished(&self) -> bool {
        self.done >= self.total
    }

    /// One line for people: progress, ETA and the latest window's numbers.
    pub fn line(&self) -> String {
        let pct = 100.0 * self.done as f64 / self.total.max(1) as f64;
        let eta = match (self.finished(), self.eta_seconds) {
            (true, _) => "finished".to_owned(),
            (false, Some(s)) => format!("ETA {}", duration(s)),
            (false, None) => "ETA unknown".to_owned(),
        };
        let Some(m) = &self.last else {
            return format!("step 0/{} (no metric window yet)", self.total);
        };
        let mut s = format!(
            "step {}/{} ({pct:.1}%), {eta} | loss {:.5} rec {:.5} usage {:.1}% QE {:.3e} \
             perplexity {:.1} lr {:.2e} | {:.2} it/s",
            self.done,
            self.total,
            m.loss,
            m.rec,
            100.0 * m.usage,
            m.quantization_error,
            m.perplexity,
            m.lr,
            m.steps_per_s
        );
        if m.d_loss != 0.0 || m.d_weight != 0.0 {
            s += &format!(" | D {:.4} G {:.4} w {:.3}", m.d_loss, m.g_loss, m.d_weight);
        }
        s
    }
}

fn duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match (s / 3600, (s / 60) % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m{sec:02}s"),
        (h, min, _) => format!("{h}h{min:02}m"),
    }
}

/// The windows of `metrics.jsonl` as they are on disk now: a last line still being written (no
/// newline yet, or cut short) is left for the next look; any other bad line is an error naming
/// it.
///
/// # Errors
/// An unreadable file; a malformed complete line.
pub fn read_live_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{} line {}", path.display(), i + 1))
        })
        .collect()
}

/// Looks at the run folder `run` once: reads `run.json` and `metrics.jsonl`, and redraws
/// `curves.png` (written beside and renamed into place, so a viewer never sees half a file).
///
/// # Errors
/// A folder without `run.json`; unreadable files; plotting errors.
pub fn look(run: &Path) -> Result<RunStatus> {
    let cfg = RunConfig::from_run_file(&RunDir::new(run).run())
        .with_context(|| format!("{} is not a run folder of vq-train", run.display()))?;
    let history = read_live_metrics(&RunDir::new(run).metrics())?;
    if !history.is_empty() {
        write_curves(run, &cfg, &history)?;
    }
    let total = cfg.training.steps;
    let last = history.last().cloned();
    let done = last.as_ref().map_or(0, |m| m.step);
    let eta_seconds = last
        .as_ref()
        .filter(|m| m.steps_per_s > 0.0)
        .map(|m| total.saturating_sub(done) as f64 / m.steps_per_s);
    Ok(RunStatus {
        done,
        total,
        last,
        eta_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_being_written_is_left_for_the_next_look_and_eta_follows_the_speed() {
        let dir = std::env::temp_dir().join(format!("vq-watch-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let m = |step| StepMetrics {
            step,
            steps_per_s: 2.0,
            ..Default::default()
        };
        let line = |step| serde_json::to_string(&m(step)).unwrap();
        let path = dir.join("metrics.jsonl");
        let partial = line(30);
        fs::write(
            &path,
            format!("{}\n{}\n{}", line(10), line(20), &partial[..9]),
        )
        .unwrap();
        let got = read_live_metrics(&path).unwrap();
        assert_eq!(got.iter().map(|m| m.step).collect::<Vec<_>>(), [10, 20]);
        fs::write(&path, format!("{}\nnot json\n{}\n", line(10), line(20))).unwrap();
        let err = format!("{:#}", read_live_metrics(&path).unwrap_err());
        assert!(err.contains("line 2"), "{err}");
        let status = RunStatus {
            done: 20,
            total: 100,
            last: Some(m(20)),
            eta_seconds: Some(40.0),
        };
        assert!(
            status.line().starts_with("step 20/100 (20.0%), ETA 40s"),
            "{}",
            status.line()
        );
        assert_eq!(duration(3725.0), "1h02m");
        assert_eq!(duration(125.0), "2m05s");
        fs::remove_dir_all(dir).unwrap();
    }
}
