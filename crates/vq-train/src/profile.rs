//! Profiling a few training steps (`train --profile-steps A..B`) with libtorch's Kineto
//! profiler, and a summary of a Chrome trace's device activity (`vq-train trace-summary`),
//! which reads traces written by `torch.profiler` as well (the PyTorch twin's `--profile`), so
//! the two sides are summed up by the same code.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, Result, bail};

/// Steps `first..=last` (counted from 1, as the logs count them) to profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileSteps {
    /// First profiled step.
    pub first: usize,
    /// Last profiled step.
    pub last: usize,
}

impl FromStr for ProfileSteps {
    type Err = anyhow::Error;

    /// `A..B` (both included, 1 ≤ A ≤ B) or a single step `A`.
    ///
    /// ```
    /// use vq_train::profile::ProfileSteps;
    /// let s: ProfileSteps = "11..20".parse().unwrap();
    /// assert_eq!((s.first, s.last, s.count()), (11, 20, 10));
    /// assert!("0..3".parse::<ProfileSteps>().is_err());
    /// assert!("5..4".parse::<ProfileSteps>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        let (a, b) = s.split_once("..").unwrap_or((s, s));
        let parse = |v: &str| {
            v.trim()
                .parse::<usize>()
                .with_context(|| format!("profile steps {s:?}: {v:?} is not a step number"))
        };
        let (first, last) = (parse(a)?, parse(b)?);
        if first == 0 || last < first {
            bail!("profile steps {s:?}: expected A..B with 1 ≤ A ≤ B (steps count from 1)");
        }
        Ok(Self { first, last })
    }
}

impl ProfileSteps {
    /// Number of profiled steps.
    pub fn count(&self) -> usize {
        self.last - self.first + 1
    }
}

/// One kernel (or copy) name's device time in a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    /// Kernel name as the trace gives it.
    pub name: String,
    /// Launches.
    pub calls: usize,
    /// Summed duration, µs.
    pub total_us: f64,
}

/// What the device did in a trace: busy time (the union of kernel and copy intervals), the
/// trace's span, and the time per kernel name, largest first.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSummary {
    /// From the first event's start to the last event's end (host and device), µs.
    pub span_us: f64,
    /// Time during which at least one kernel or copy ran, µs.
    pub busy_us: f64,
    /// Summed durations of all kernels and copies (overlaps counted twice), µs.
    pub device_us: f64,
    /// Kernel and copy launches.
    pub launches: usize,
    /// Per name, largest total first.
    pub kernels: Vec<KernelTime>,
}

/// Event categories that are device work in Kineto's traces.
const DEVICE_CATEGORIES: [&str; 3] = ["kernel", "gpu_memcpy", "gpu_memset"];

impl TraceSummary {
    /// Reads the Chrome trace at `path` (Kineto's JSON: `traceEvents` with `cat`, `name`, `ts`
    /// and `dur` in µs).
    ///
    /// # Errors
    /// Unreadable file, not JSON, no `traceEvents` list.
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a JSON trace", path.display()))?;
        Self::from_json(&json).with_context(|| format!("summarising {}", path.display()))
    }

    /// [`read`](Self::read) from parsed JSON.
    ///
    /// # Errors
    /// No `traceEvents` list.
    pub fn from_json(json: &serde_json::Value) -> Result<Self> {
        let Some(events) = json.get("traceEvents").and_then(|e| e.as_array()) else {
            bail!("no traceEvents list (not a Chrome trace)");
        };
        let (mut start, mut end) = (f64::INFINITY, f64::NEG_INFINITY);
        let mut intervals = Vec::new();
        let mut by_name: HashMap<&str, (usize, f64)> = HashMap::new();
        for e in events {
            let (Some(ts), Some(dur)) = (
                e.get("ts").and_then(|v| v.as_f64()),
                e.get("dur").and_then(|v| v.as_f64()),
            ) else {
                continue;
            };
            start = start.min(ts);
            end = end.max(ts + dur);
            let cat = e.get("cat").and_then(|v| v.as_str()).unwrap_or("");
            if !DEVICE_CATEGORIES.contains(&cat) {
                continue;
            }
            intervals.push((ts, ts + dur));
            let name = e.get("name").and_then(|v| v.as_str()).unwrap_or("?");
            let slot = by_name.entry(name).or_default();
            slot.0 += 1;
            slot.1 += dur;
        }
        intervals.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut busy = 0.0;
        let mut current: Option<(f64, f64)> = None;
        for (a, b) in intervals.iter().copied() {
            current = match current {
                Some((s, e)) if a <= e => Some((s, e.max(b))),
                Some((s, e)) => {
                    busy += e - s;
                    Some((a, b))
                }
                None => Some((a, b)),
            };
        }
        if let Some((s, e)) = current {
            busy += e - s;
        }
        let mut kernels: Vec<KernelTime> = by_name
            .into_iter()
            .map(|(name, (calls, total_us))| KernelTime {
                name: name.to_owned(),
                calls,
                total_us,
            })
            .collect();
        kernels.sort_by(|a, b| b.total_us.total_cmp(&a.total_us).then(a.name.cmp(&b.name)));
        Ok(Self {
            span_us: if end > start { end - start } else { 0.0 },
            busy_us: busy,
            device_us: kernels.iter().fold(0.0, |acc, k| acc + k.total_us),
            launches: intervals.len(),
            kernels,
        })
    }

    /// A markdown report: per-step figures over `steps` profiled steps and the `top` kernels.
    pub fn markdown(&self, steps: usize, top: usize) -> String {
        let n = steps.max(1) as f64;
        let ms = |us: f64| us / 1000.0 / n;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{steps} step(s): per step {:.2} ms span, device busy {:.2} ms ({:.1}%), kernel time \
             {:.2} ms, {:.0} launches\n",
            ms(self.span_us),
            ms(self.busy_us),
            100.0 * self.busy_us / self.span_us.max(1e-9),
            ms(self.device_us),
            self.launches as f64 / n,
        );
        if self.launches == 0 {
            let _ = writeln!(
                s,
                "No device kernels in the trace (a CPU run): open it in Perfetto or \
                 chrome://tracing for the host's ops."
            );
            return s;
        }
        let _ = writeln!(s, "| kernel | calls / step | ms / step | share |");
        let _ = writeln!(s, "|---|---|---|---|");
        for k in self.kernels.iter().take(top) {
            let mut name: String = k.name.chars().take(90).collect();
            if name.len() < k.name.len() {
                name.push('…');
            }
            let _ = writeln!(
                s,
                "| `{}` | {:.1} | {:.3} | {:.1}% |",
                name.replace('|', "\\|"),
                k.calls as f64 / n,
                ms(k.total_us),
                100.0 * k.total_us / self.device_us.max(1e-9)
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_is_the_union_of_device_intervals() {
        let json = serde_json::json!({"traceEvents": [
            {"ph": "X", "cat": "cpu_op", "name": "aten::mul", "ts": 0.0, "dur": 100.0},
            {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 10.0, "dur": 20.0},
            {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 25.0, "dur": 10.0},
            {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 50.0, "dur": 5.0},
            {"ph": "X", "cat": "kernel", "name": "relu", "ts": 60.0, "dur": 1.0},
            {"ph": "i", "name": "marker", "ts": 5.0},
        ]});
        let s = TraceSummary::from_json(&json).unwrap();
        assert_eq!(s.span_us, 100.0);
        assert_eq!(s.busy_us, 25.0 + 5.0 + 1.0);
        assert_eq!(s.device_us, 36.0);
        assert_eq!(s.launches, 4);
        assert_eq!(s.kernels[0].name, "gemm");
        assert_eq!((s.kernels[0].calls, s.kernels[0].total_us), (2, 30.0));
        let md = s.markdown(2, 2);
        assert!(md.contains("busy 0.02 ms (31.0%)"), "{md}");
        assert!(md.contains("| `gemm` | 1.0 | 0.015 |"), "{md}");
        assert!(!md.contains("relu"), "{md}");
        assert!(TraceSummary::from_json(&serde_json::json!({})).is_err());
    }
}
