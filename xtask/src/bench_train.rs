//! `cargo xtask bench-train`: N training steps of `vq-train` and, in the same run, of the same
//! model in PyTorch (`crates/vq-train/examples/torch_twin.py`), one after the other on the same
//! machine, with steps/s, images/s, peak memory and the step-time ratio.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::setup::Libtorch;

/// What to time.
#[derive(Debug, clap::Args)]
pub struct BenchTrain {
    /// Preset (any: the twin rebuilds the taming CNN, the ViT and TimeSformer with their
    /// discriminators).
    #[arg(long, default_value = "demo-fashion-mnist")]
    preset: String,
    /// Gradient estimator of both sides: ste or rotation.
    #[arg(long, default_value = "rotation")]
    estimator: String,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Images per step (default: the preset's).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Timed steps (rounded up to a multiple of --warmup).
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// libtorch CPU threads for both sides (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Alternating runs of each side; the median steps/s is reported.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// cuDNN benchmark mode on both sides (CUDA).
    #[arg(long)]
    cudnn_benchmark: bool,
    /// A vq-train binary built beforehand (e.g. on another machine), used instead of building
    /// `target/release/vq-train`.
    #[arg(long)]
    vq_train: Option<PathBuf>,
    /// Run the twin with the `python3` on the PATH and its own torch, instead of the torch that
    /// `cargo xtask setup` installs (for machines that bring their own PyTorch).
    #[arg(long)]
    system_python: bool,
    /// After the timed steps, profile 3 more on each side (libtorch's and torch's profiler,
    /// both Kineto) and print both summaries of the device's kernels; the Chrome traces stay in
    /// `runs/bench-train/<preset>/`.
    #[arg(long)]
    profile: bool,
    /// Time a prior instead (preset demo, llamagen-gpt-b, llamagen-gpt-l): training steps of
    /// `train_prior` on random codes and the sampler's tokens/s, against the PyTorch twin
    /// (crates/vq-train/examples/torch_prior_twin.py). --batch-size is grids per step
    /// (default 64).
    #[arg(long)]
    prior: Option<String>,
    /// The prior's codes: codebook size, grid side, classes (default: the demo tokenizer's
    /// 256,8,10 for demo; ImageNet's 16384,16,1000 for the LlamaGen presets).
    #[arg(long, value_delimiter = ',', num_args = 3)]
    prior_codes: Option<Vec<usize>>,
    /// Grids the sampler draws in one batch.
    #[arg(long, default_value_t = 64)]
    samples: usize,
}

/// Steps each side profiles with `--profile`.
const PROFILED_STEPS: usize = 3;

/// One timed run of one side.
#[derive(Debug, Clone, Copy)]
struct Timing {
    steps_per_s: f64,
    peak_memory: Option<u64>,
}

impl BenchTrain {
    /// A CUDA run of `preset` at batch `batch` in `precision` (30 timed steps).
    pub fn cuda(preset: &str, precision: &str, batch: usize) -> Self {
        Self {
            preset: preset.into(),
            estimator: "rotation".into(),
            device: "cuda".into(),
            precision: precision.into(),
            batch_size: Some(batch),
            steps: 30,
            warmup: 10,
            threads: None,
            repeats: 1,
            cudnn_benchmark: false,
            vq_train: None,
            system_python: false,
            profile: false,
            prior: None,
            prior_codes: None,
            samples: 64,
        }
    }

    /// Whether the run needs the libtorch and Python torch of `cargo xtask setup`.
    pub fn needs_setup(&self) -> bool {
        !self.system_python
    }

    /// Runs both sides; `lt` is the setup's libtorch (`None` with `--system-python`).
    pub fn run(&self, root: &Path, lt: Option<&Libtorch>) -> Result<()> {
        if self.warmup == 0 || self.steps == 0 || self.repeats == 0 {
            bail!("--steps, --warmup and --repeats must be at least 1");
        }
        let site = match lt {
            _ if self.system_python => None,
            Some(lt) => Some(lt.python_site.as_deref().context(
                "the PyTorch twin needs the Python torch that `cargo xtask setup` installs from PyPI; \
                 with LIBTORCH pointing at another libtorch there is none (unset LIBTORCH, or pass \
                 --system-python)",
            )?),
            None => bail!("the PyTorch twin needs a torch: run `cargo xtask setup` or pass --system-python"),
        };
        let bin = match &self.vq_train {
            Some(bin) => bin.clone(),
            None => {
                crate::cargo(root, &["build", "--release", "-p", "vq-train"], &[])?;
                root.join("target/release/vq-train")
            }
        };
        if let Some(prior) = &self.prior {
            return self.run_prior(root, site, prior);
        }
        let dir = root.join("runs/bench-train").join(&self.preset);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = self.write_config(&bin, &dir)?;
        let steps = self.steps.div_ceil(self.warmup) * self.warmup;
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let batch = match self.batch_size {
            Some(b) => b,
            None => config_batch(&config)?,
        };
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for r in 0..self.repeats {
            eprintln!("repeat {}/{}: vq-train", r + 1, self.repeats);
            ours.push(self.time_vq_train(&bin, &config, &dir, steps, threads)?);
            eprintln!("repeat {}/{}: PyTorch", r + 1, self.repeats);
            theirs.push(self.time_torch(root, site, &config, steps, threads)?);
        }
        let (ours, theirs) = (median(&ours), median(&theirs));
        let mem = |t: &Timing| {
            t.peak_memory.map_or("n/a".to_owned(), |b| {
                format!("{:.0} MiB", b as f64 / 1048576.0)
            })
        };
        println!(
            "\n{} ({} estimator), {} {}{}, batch {batch}, {threads} threads, {steps} timed steps after {} warm-up, median of {}",
            self.preset,
            self.estimator,
            self.device,
            self.precision,
            if self.cudnn_benchmark {
                ", cuDNN benchmark mode"
            } else {
                ""
            },
            self.warmup,
            self.repeats
        );
        println!("| | steps/s | images/s | peak memory |\n|---|---|---|---|");
        for (name, t) in [("vq-train", &ours), ("PyTorch", &theirs)] {
            println!(
                "| {name} | {:.3} | {:.1} | {} |",
                t.steps_per_s,
                t.steps_per_s * batch as f64,
                mem(t)
            );
        }
        println!(
            "step time vq-train / PyTorch: {:.3}",
            theirs.steps_per_s / ours.steps_per_s
        );
        if self.profile {
            for (name, trace) in [
                ("vq-train", dir.join("vq-train/profile/trace.json")),
                ("PyTorch", dir.join("torch-trace.json")),
            ] {
                println!("\n### {name}: {}\n", trace.display());
                let out = Command::new(&bin)
                    .arg("trace-summary")
                    .arg(&trace)
                    .args(["--steps", &PROFILED_STEPS.to_string(), "--top", "20"])
                    .output()
                    .with_context(|| format!("running {} trace-summary", bin.display()))?;
                if !out.status.success() {
                    bail!(
                        "trace-summary {}: {}",
                        trace.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                print!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        Ok(())
    }

    /// The preset's run configuration with the chosen estimator, as the file both sides read.
    fn write_config(&self, bin: &Path, dir: &Path) -> Result<PathBuf> {
        let out = Command::new(bin)
            .args(["presets", &self.preset])
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "vq-train presets {}: {}",
                self.preset,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let mut cfg: Value =
            serde_json::from_slice(&out.stdout).context("the preset's JSON from vq-train")?;
        cfg["model"]["quantizer"]["estimator"] = Value::String(self.estimator.clone());
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&cfg)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// `vq-train train` for warmup + steps steps, logging every `warmup` steps; steps/s over
    /// the windows after the first.
    fn time_vq_train(
        &self,
        bin: &Path,
        config: &Path,
        dir: &Path,
        steps: usize,
        threads: usize,
    ) -> Result<Timing> {
        let run = dir.join("vq-train");
        crate::fresh_run_folder(&run)?;
        let timed_end = self.warmup + steps;
        let profiled = if self.profile { PROFILED_STEPS } else { 0 };
        let total = (timed_end + profiled).to_string();
        let mut cmd = Command::new(bin);
        cmd.arg("train")
            .arg("--config")
            .arg(config)
            .args(["--data", "synthetic:512", "--device", &self.device])
            .args(["--precision", &self.precision, "--stop-after", &total])
            .args(["--log-every", &self.warmup.to_string()])
            .args([
                "--checkpoint-every",
                &(10 * (self.warmup + steps)).to_string(),
            ])
            .args(["--threads", &threads.to_string(), "--quiet", "--out"])
            .arg(&run);
        if let Some(b) = self.batch_size {
            cmd.args(["--batch-size", &b.to_string()]);
        }
        if self.cudnn_benchmark {
            cmd.arg("--cudnn-benchmark");
        }
        if profiled > 0 {
            cmd.arg("--profile-steps")
                .arg(format!("{}..{}", timed_end + 1, timed_end + profiled));
        }
        let (status, peak, _) = watch(cmd, &self.device)?;
        if !status.success() {
            bail!("vq-train train failed ({status})");
        }
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl"))
            .with_context(|| format!("reading {}/metrics.jsonl", run.display()))?;
        let (mut n, mut seconds) = (0usize, 0.0);
        let mut last = self.warmup;
        for line in metrics.lines() {
            let m: Value = serde_json::from_str(line).context("a metrics.jsonl line")?;
            let (Some(step), Some(sps)) = (m["step"].as_u64(), m["steps_per_s"].as_f64()) else {
                continue;
            };
            let step = step as usize;
            // The profiled steps (after the timed ones) close their own window.
            if step > self.warmup && step <= timed_end {
                n += step - last;
                seconds += (step - last) as f64 / sps;
                last = step;
            }
        }
        if n != steps {
            bail!("metrics.jsonl covers {n} timed steps, expected {steps}");
        }
        Ok(Timing {
            steps_per_s: n as f64 / seconds,
            peak_memory: peak,
        })
    }

    fn time_torch(
        &self,
        root: &Path,
        site: Option<&Path>,
        config: &Path,
        steps: usize,
        threads: usize,
    ) -> Result<Timing> {
        let script = root.join("crates/vq-train/examples/torch_twin.py");
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .arg(config)
            .args(["--steps", &steps.to_string()])
            .args(["--warmup", &self.warmup.to_string()])
            .args(["--device", &self.device, "--precision", &self.precision])
            .args(["--threads", &threads.to_string()]);
        if let Some(site) = site {
            cmd.env("PYTHONPATH", site);
        }
        if let Some(b) = self.batch_size {
            cmd.args(["--batch-size", &b.to_string()]);
        }
        if self.cudnn_benchmark {
            cmd.arg("--cudnn-benchmark");
        }
        if self.profile {
            let trace = config.with_file_name("torch-trace.json");
            cmd.arg("--profile")
                .arg(trace)
                .args(["--profile-steps", &PROFILED_STEPS.to_string()]);
        }
        let (status, peak, stdout) = watch(cmd, &self.device)?;
        if !status.success() {
            bail!("{} failed ({status})", script.display());
        }
        let line = stdout.lines().last().unwrap_or_default();
        let r: Value = serde_json::from_str(line)
            .with_context(|| format!("the twin's result line {line:?}"))?;
        Ok(Timing {
            steps_per_s: r["steps_per_s"]
                .as_f64()
                .context("steps_per_s in the twin's result")?,
            peak_memory: peak,
        })
    }
}

/// One timed run of each side of a prior bench.
#[derive(Debug, Clone, Copy)]
struct PriorTiming {
    steps_per_s: f64,
    tokens_per_s: f64,
    peak_memory: Option<u64>,
}

impl BenchTrain {
    /// `--prior`: `examples/prior_bench.rs` and `examples/torch_prior_twin.py`, alternately,
    /// `--repeats` times; medians of each figure.
    fn run_prior(&self, root: &Path, site: Option<&Path>, preset: &str) -> Result<()> {
        if self.profile || self.precision != "f32" {
            bail!("--prior times f32 training without --profile");
        }
        let codes = match (&self.prior_codes, preset) {
            (Some(c), _) => [c[0], c[1], c[2]],
            (None, "demo") => [256, 8, 10],
            (None, p) if p.starts_with("llamagen") => [16384, 16, 1000],
            (None, p) => bail!("--prior {p}: give its codes with --prior-codes K,GRID,CLASSES"),
        };
        crate::cargo(
            root,
            &[
                "build",
                "--release",
                "-p",
                "vq-train",
                "--example",
                "prior_bench",
            ],
            &[],
        )?;
        let bin = root.join("target/release/examples/prior_bench");
        let dir = root
            .join("runs/bench-train")
            .join(format!("prior-{preset}"));
        let warmup = self.warmup.to_string();
        let steps = (self.steps.div_ceil(self.warmup) * self.warmup).to_string();
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .to_string();
        let batch = self.batch_size.unwrap_or(64).to_string();
        let samples = self.samples.to_string();
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for r in 0..self.repeats {
            eprintln!("repeat {}/{}: vq-train", r + 1, self.repeats);
            let mut cmd = Command::new(&bin);
            cmd.args(["--preset", preset, "--device", &self.device])
                .args(["--codebook-size", &codes[0].to_string()])
                .args(["--grid", &codes[1].to_string()])
                .args(["--classes", &codes[2].to_string()])
                .args([
                    "--batch-size",
                    &batch,
                    "--steps",
                    &steps,
                    "--warmup",
                    &warmup,
                ])
                .args(["--samples", &samples, "--threads", &threads, "--out"])
                .arg(&dir);
            ours.push(prior_side(cmd, &self.device, "prior_bench")?);
            eprintln!("repeat {}/{}: PyTorch", r + 1, self.repeats);
            let script = root.join("crates/vq-train/examples/torch_prior_twin.py");
            let mut cmd = Command::new("python3");
            cmd.arg(&script)
                .arg(dir.join("prior.json"))
                .args([
                    "--batch-size",
                    &batch,
                    "--steps",
                    &steps,
                    "--warmup",
                    &warmup,
                ])
                .args(["--samples", &samples, "--threads", &threads])
                .args(["--device", &self.device]);
            if let Some(site) = site {
                cmd.env("PYTHONPATH", site);
            }
            theirs.push(prior_side(cmd, &self.device, "torch_prior_twin.py")?);
        }
        let median = |v: &[PriorTiming], f: fn(&PriorTiming) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        println!(
            "\nprior {preset} (codes K {}, {}×{} grid, {} classes), {}, batch {batch}, {threads} threads, \
             {steps} timed steps after {warmup} warm-up, {samples} grids sampled, median of {}",
            codes[0], codes[1], codes[1], codes[2], self.device, self.repeats
        );
        println!("| | steps/s | sampling tokens/s | peak memory |\n|---|---|---|---|");
        for (name, t) in [("vq-train", &ours), ("PyTorch", &theirs)] {
            let peak = t.iter().filter_map(|t| t.peak_memory).max();
            println!(
                "| {name} | {:.3} | {:.0} | {} |",
                median(t, |t| t.steps_per_s),
                median(t, |t| t.tokens_per_s),
                peak.map_or("n/a".to_owned(), |b| format!(
                    "{:.0} MiB",
                    b as f64 / 1048576.0
                ))
            );
        }
        println!(
            "step time vq-train / PyTorch: {:.3}; sampling tokens/s vq-train / PyTorch: {:.3}",
            median(&theirs, |t| t.steps_per_s) / median(&ours, |t| t.steps_per_s),
            median(&ours, |t| t.tokens_per_s) / median(&theirs, |t| t.tokens_per_s)
        );
        Ok(())
    }
}

/// One side of the prior bench: its result line and peak memory.
fn prior_side(cmd: Command, device: &str, name: &str) -> Result<PriorTiming> {
    let (status, peak, stdout) = watch(cmd, device)?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    let line = stdout.lines().last().unwrap_or_default();
    let r: Value =
        serde_json::from_str(line).with_context(|| format!("{name}'s result line {line:?}"))?;
    let get = |k: &str| {
        r[k].as_f64()
            .with_context(|| format!("{k} in {name}'s result"))
    };
    Ok(PriorTiming {
        steps_per_s: get("steps_per_s")?,
        tokens_per_s: get("tokens_per_s")?,
        peak_memory: peak,
    })
}

fn config_batch(config: &Path) -> Result<usize> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(config)?)?;
    v["training"]["batch_size"]
        .as_u64()
        .map(|b| b as usize)
        .context("training.batch_size in the configuration")
}

/// Runs `cmd` (stdout captured, stderr shown) and samples its peak memory the same way for
/// both sides: the kernel's high-water mark of resident memory (`VmHWM`) on CPU, the largest
/// `nvidia-smi` reading for the process on CUDA.
fn watch(
    mut cmd: Command,
    device: &str,
) -> Result<(std::process::ExitStatus, Option<u64>, String)> {
    let mut child: Child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let pid = child.id();
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let mut peak: Option<u64> = None;
    let status = loop {
        let now = if device.starts_with("cuda") {
            gpu_memory(pid)
        } else {
            resident_high_water(pid)
        };
        peak = match (peak, now) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = reader.join().unwrap_or_default();
    Ok((status, peak, out))
}

fn resident_high_water(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn gpu_memory(pid: u32) -> Option<u64> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (p, mib) = l.split_once(',')?;
        (p.trim().parse::<u32>().ok()? == pid).then_some(mib.trim().parse::<u64>().ok()? << 20)
    })
}

fn median(ts: &[Timing]) -> Timing {
    let mut v = ts.to_vec();
    v.sort_by(|a, b| a.steps_per_s.total_cmp(&b.steps_per_s));
    v[v.len() / 2]
}
