//! `vq-train`: train, evaluate and compare vector-quantized autoencoders (STE vs the rotation
//! trick). `vq-train --help` lists the subcommands.

mod prior_cmd;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tch::Device;
use vq_dist::Launch;
use vq_models::Preset;
use vq_train::compare::{compare, default_out, evaluate_run, markdown};
use vq_train::config::{RunConfig, TrainOptions};
use vq_train::data::{DATA_SOURCES, DataSource, Pipeline};
use vq_train::dist::join_from_env;
use vq_train::method::Method;
use vq_train::train::train_in;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "vq-train",
    version,
    args_override_self = true,
    about = "Train and evaluate VQ autoencoders (STE vs rotation trick)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the linked libtorch's capabilities (CUDA, cuDNN, CPU threads).
    Info,
    /// List the presets, or print one's full configuration as JSON.
    Presets {
        /// Print this preset's run configuration (usable as --config).
        name: Option<String>,
    },
    /// Train one model.
    Train(RunArgs),
    /// Train the same model with several estimators and print the paper-style table.
    Compare(CompareArgs),
    /// Evaluate a trained run (or a weights file) on both splits.
    Eval(EvalArgs),
    /// Write the code indices of every sample of a split (safetensors: codes, codebook, the
    /// run's configuration; shards of --shard-size samples, kept when run again).
    Encode(EncodeArgs),
    /// Turn a codes file of `encode` back into images (PNG per sample; video: per frame).
    Decode(DecodeArgs),
    /// Follow a run while it trains (from another terminal): print its latest metrics, progress
    /// and ETA, and redraw its curves.png, until it has logged its last step.
    Watch(WatchArgs),
    /// Train a generative prior (autoregressive or MaskGIT) on a tokenizer's codes (`encode`),
    /// then measure its held-out likelihood.
    TrainPrior(prior_cmd::TrainPriorArgs),
    /// Sample code grids from a prior and decode them through the tokenizer (codes.safetensors
    /// and PNGs).
    Sample(prior_cmd::SampleArgs),
    /// Make a run from a pretrained checkpoint without training (`--init-from FILE` with the
    /// preset or `--config` it fits): run.json and a step-0 checkpoint, so that `encode`, `eval`,
    /// `decode` and `train --resume` take it as any run.
    Import(ImportArgs),
    /// The downstream comparison: per estimator × seed, tokenizer → codes → prior → held-out
    /// likelihood, reconstruction and generation side by side with paired statistics
    /// (downstream.md); rerun with --resume to continue.
    Downstream(DownstreamArgs),
    /// Summarise the device activity of a Chrome trace (`train --profile-steps`, or
    /// `torch.profiler`'s export): busy time, kernel time and the largest kernels per step.
    TraceSummary(TraceSummaryArgs),
}

#[derive(Debug, Args)]
struct CompareArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Estimators (and baselines: gumbel, hessian-approx, exact-gradients; the quantizers
    /// that followed the rotation trick: diveq, diveq-detach, sf-diveq, sf-diveq-detach, ibq,
    /// lfq, bsq, scq) to compare, comma-separated.
    #[arg(long, default_value = "ste,rotation", value_delimiter = ',')]
    estimators: Vec<String>,
    /// Train every run with each of these seeds (`0..5`, `0..=4` or `0,3,7`) and report
    /// mean ± standard deviation, per-seed numbers and paired tests against the first
    /// estimator (compare.md says the rule).
    #[arg(long)]
    seeds: Option<String>,
    /// Sweep an axis of the quantizer: `family=nearest,residual4,fsq8-5-5-5`,
    /// `codebook-size=64,256`, `ema-decay=0.8,0.99` (repeat for a grid over several axes;
    /// every point runs every estimator and seed).
    #[arg(long)]
    grid: Vec<String>,
}

#[derive(Debug, Args)]
struct EvalArgs {
    /// Run folder written by `train` (its run.json and latest checkpoint are used).
    #[arg(long)]
    run: PathBuf,
    /// Device.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// LPIPS weights (safetensors) for the LPIPS column (default: the run's own, else those of
    /// `cargo xtask download-weights` in their default place).
    #[arg(long)]
    lpips: Option<PathBuf>,
    /// FID Inception weights (safetensors) for the r-FID / r-IS columns (default: as --lpips).
    #[arg(long)]
    inception: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct DownstreamArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Estimators of the tokenizers, comma-separated (the first is the reference).
    #[arg(long, default_value = "ste,rotation", value_delimiter = ',')]
    estimators: Vec<String>,
    /// Seeds (`0..3`, `0,3,7`): each tokenizer and its prior train with each.
    #[arg(long, default_value = "0..3")]
    seeds: String,
    /// Prior preset (demo, demo-maskgit, llamagen-gpt-b, ...).
    #[arg(long, default_value = "demo")]
    prior_preset: String,
    /// Prior optimiser steps.
    #[arg(long, default_value_t = 600)]
    prior_steps: usize,
    /// Prior grids per step.
    #[arg(long, default_value_t = 64)]
    prior_batch_size: usize,
    /// Prior peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    prior_lr: f64,
}

#[derive(Debug, Args)]
struct ImportArgs {
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Args)]
struct EncodeArgs {
    /// Run folder written by `train` (its latest checkpoint is used).
    #[arg(long)]
    run: PathBuf,
    /// Data to encode (default: the run's), as `train --data` takes it.
    #[arg(long)]
    data: Option<String>,
    /// train or val.
    #[arg(long, default_value = "val")]
    split: String,
    /// Output file (`codes.safetensors`; shards are numbered beside it).
    #[arg(long)]
    out: PathBuf,
    /// Samples per file.
    #[arg(long, default_value_t = 50_000)]
    shard_size: usize,
    /// Samples per forward pass (default: the run's micro-batch).
    #[arg(long)]
    batch: Option<usize>,
    /// Device.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct DecodeArgs {
    /// Run folder whose decoder (and codebook) the codes belong to.
    #[arg(long)]
    run: PathBuf,
    /// Codes files of `encode` (one or more shards, e.g. `codes-*.safetensors`).
    #[arg(long, num_args = 1.., required = true)]
    codes: Vec<PathBuf>,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Samples per pass (default: the run's micro-batch).
    #[arg(long)]
    batch: Option<usize>,
    /// Device.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Debug, Args)]
struct WatchArgs {
    /// Run folder written by `train`.
    #[arg(long)]
    run: PathBuf,
    /// Seconds between looks.
    #[arg(long, default_value_t = 30.0)]
    every: f64,
    /// Look once and exit.
    #[arg(long)]
    once: bool,
}

#[derive(Debug, Args)]
struct TraceSummaryArgs {
    /// The trace (JSON).
    trace: PathBuf,
    /// Steps the trace covers (figures per step).
    #[arg(long, default_value_t = 1)]
    steps: usize,
    /// Kernels listed.
    #[arg(long, default_value_t = 30)]
    top: usize,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Preset (see `vq-train presets`).
    #[arg(long, default_value = "demo-fashion-mnist")]
    preset: String,
    /// Run configuration file (JSON, as printed by `vq-train presets <name>`); overrides the preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Start the model (and discriminator) from a checkpoint of the reference code:
    /// taming-transformers / latent-diffusion VQGAN or enhancing-transformers ViT-VQGAN
    /// (Lightning `.ckpt`), or a state dict in the same layout (PyTorch `.pth`/`.pt`, or
    /// `.safetensors`); the optimizer starts fresh. Every tensor must fit the preset's model (errors name those that do not).
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Gradient estimator: ste, rotation, rotation-no-rescale, reflection, or one of the
    /// paper's baselines: gumbel (Gumbel-softmax quantizer), hessian-approx, exact-gradients
    /// (VQ-VAE runs), or a quantizer that followed the rotation trick, with its reference's
    /// settings: diveq, diveq-detach, sf-diveq, sf-diveq-detach, ibq, lfq, bsq, scq.
    #[arg(long)]
    estimator: Option<String>,
    /// Quantizer family: nearest (one codebook), residualN (N stages; residualN-dropout[M]:
    /// quantizer dropout down to M stages), headsN (N heads sharing a codebook;
    /// headsN-separate: one each), simvq (a learned map of a frozen codebook), fsqL1-L2-...
    /// (finite scalar quantization with these levels, e.g. fsq8-5-5-5), or diveq,
    /// diveq-detach, sf-diveq, sf-diveq-detach, ibq, lfq, bsq, scq.
    #[arg(long)]
    family: Option<String>,
    #[arg(long, help = format!("Data source: {DATA_SOURCES} (default: the preset's)"))]
    data: Option<String>,
    /// `cpu`, `cuda` or `cuda:<n>`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Arithmetic of the networks around the quantizer: f32, bf16 (autocast, the paper's
    /// setting; recommended on CUDA) or f16 (autocast with a dynamic loss scale). The quantizer,
    /// the weights and the optimiser state are f32 in every precision.
    #[arg(long)]
    precision: Option<String>,
    /// Optimiser steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Images per optimiser step.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Images per forward pass (gradient accumulation when smaller than the batch).
    #[arg(long)]
    micro_batch: Option<usize>,
    /// Peak learning rate.
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Run folder (default runs/<preset>-<estimator> or runs/compare-<preset>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from the run folder's latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Steps between metric lines.
    #[arg(long, default_value_t = 25)]
    log_every: usize,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 250)]
    checkpoint_every: usize,
    /// libtorch CPU threads (default: libtorch's choice).
    #[arg(long, allow_negative_numbers = true)]
    threads: Option<i32>,
    /// On CUDA, let cuDNN time its convolution algorithms for each new input shape and keep
    /// the fastest (PyTorch's `torch.backends.cudnn.benchmark`): faster steps after the first
    /// few, at the cost of bit-identical repeats of a GPU run.
    #[arg(long)]
    cudnn_benchmark: bool,
    /// When the step's losses, code counts and gradient norm are read back from the device:
    /// `window` (once per --log-every window, before checkpoints and at the end; non-finite
    /// numbers are caught on the device, which skips the update, and stop the run at the read),
    /// `step` (after every step), `auto` (window on CUDA for one process without f16 loss
    /// scaling, else step).
    #[arg(long, default_value = "auto")]
    readback: vq_train::readback::Readback,
    /// Profile these steps (`A..B`, counted from 1, or one step) with libtorch's profiler:
    /// a Chrome trace (chrome://tracing, Perfetto) and a summary of the device's kernels in
    /// `<out>/profile/`.
    #[arg(long)]
    profile_steps: Option<vq_train::profile::ProfileSteps>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Stop with a checkpoint after this many steps (continue later with --resume).
    #[arg(long)]
    stop_after: Option<usize>,
    /// LPIPS weights (safetensors): the perceptual term of VQGAN training and the LPIPS column
    /// of evaluations (default: those of `cargo xtask download-weights lpips` in their default
    /// place, $VQ_WEIGHTS or ~/.cache/vq/weights; a resumed run keeps its own).
    #[arg(long)]
    lpips: Option<PathBuf>,
    /// FID Inception weights (safetensors): the r-FID and r-IS columns of evaluations (default:
    /// those of `cargo xtask download-weights inception` in their default place).
    #[arg(long)]
    inception: Option<PathBuf>,
    /// Data-parallel on this machine: start N processes of this command (ranks 0..N, Gloo on
    /// the CPU, NCCL with `--device cuda`, one GPU each), as `torchrun --nproc-per-node N`
    /// would. Under torchrun or srun leave it out: the ranks come from their environment.
    #[arg(long)]
    nproc: Option<usize>,
    /// Seconds a data-parallel rank waits in a collective (or at the start for the others)
    /// before it gives up and names the rank it lost.
    #[arg(long, default_value_t = 600)]
    dist_timeout: u64,
}

fn parse_device(s: &str) -> Result<Device> {
    let d = match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:") {
            Some(n) => Device::Cuda(n.parse().with_context(|| format!("device {s:?}"))?),
            None => bail!("unknown device {s:?}: expected cpu, cuda or cuda:<n>"),
        },
    };
    if let Device::Cuda(n) = d
        && !(tch::Cuda::is_available() && (n as i64) < tch::Cuda::device_count())
    {
        bail!(
            "device {s} requested but libtorch sees {} CUDA device(s)",
            tch::Cuda::device_count()
        );
    }
    Ok(d)
}

/// A metric that needs pretrained weights: its value, or which option supplies them.
fn show(v: Option<f64>, option: &str) -> String {
    v.map_or_else(
        || format!("needs weights ({option}; cargo xtask download-weights)"),
        |v| format!("{v:.4}"),
    )
}

/// r-FID / r-IS are computed on the held-out split only.
fn inception_column(v: Option<f64>, split: &str, cfg: &RunConfig) -> String {
    if split == "train" && cfg.inception_weights.is_some() {
        "(val only)".to_owned()
    } else {
        show(v, "--inception")
    }
}

fn preset_config(name: &str) -> Result<RunConfig> {
    let preset = Preset::from_name(name)?;
    let training = preset.training();
    let data = match preset {
        Preset::DemoFashionMnist | Preset::DemoFashionMnistLearned => {
            "fashion-mnist-demo".to_owned()
        }
        _ => "synthetic:512".to_owned(),
    };
    // 256² models: at most 16 images per forward pass (the paper's per-GPU batch), accumulated;
    // the largest such micro-batch that divides the batch (Table 5's 24 and 20: 12 and 10).
    let most = match preset {
        Preset::DemoFashionMnist | Preset::DemoFashionMnistLearned => 64,
        _ => 16,
    };
    let micro = (1..=most.min(training.batch_size))
        .rev()
        .find(|m| training.batch_size.is_multiple_of(*m))
        .unwrap_or(1);
    Ok(RunConfig {
        preset: name.to_owned(),
        model: preset.config(),
        micro_batch: micro,
        training,
        data,
        preprocessing: Pipeline::for_preset(preset),
        seed: 0,
        gan: preset.gan(),
        lpips_weights: None,
        inception_weights: None,
        precision: Default::default(),
        encoder_gradient: Default::default(),
        init_from: None,
    })
}

impl RunArgs {
    /// The run's configuration: the preset or `--config` file with the flags applied, validated.
    fn config(&self) -> Result<RunConfig> {
        let mut cfg = match &self.config {
            Some(path) => RunConfig::from_config_file(path)?,
            None => preset_config(&self.preset)?,
        };
        if let Some(d) = &self.data {
            DataSource::parse(d)?;
            cfg.data = d.clone();
        }
        if let Some(p) = &self.precision {
            cfg.precision = p.parse().context("--precision")?;
        }
        if let Some(s) = self.steps {
            cfg.training.steps = s;
        }
        if let Some(b) = self.batch_size {
            cfg.training.batch_size = b;
            cfg.micro_batch = cfg.micro_batch.min(b);
        }
        if let Some(m) = self.micro_batch {
            cfg.micro_batch = m;
        }
        self.apply_files(&mut cfg);
        if let Some(lr) = self.lr {
            cfg.training.learning_rate = lr;
        }
        if let Some(s) = self.seed {
            cfg.seed = s;
            cfg.model.quantizer.seed = s;
        }
        if let Some(f) = &self.family {
            cfg.set_family(vq_tch::Family::from_name(f)?)?;
        }
        // Last: the Gumbel baseline anneals its temperature over the run's steps.
        if let Some(e) = &self.estimator {
            Method::from_name(e)?.apply(&mut cfg)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// `--lpips`, `--inception`, `--init-from`.
    fn apply_files(&self, cfg: &mut RunConfig) {
        if let Some(f) = &self.lpips {
            cfg.lpips_weights = Some(f.clone());
        }
        if let Some(f) = &self.inception {
            cfg.inception_weights = Some(f.clone());
        }
        if let Some(f) = &self.init_from {
            cfg.init_from = Some(f.clone());
        }
    }

    /// libtorch's process-wide settings: `--threads`, `--cudnn-benchmark`.
    fn apply_runtime(&self) -> Result<()> {
        if let Some(t) = self.threads {
            if t < 1 {
                bail!("--threads {t}: libtorch needs at least 1 thread");
            }
            tch::set_num_threads(t);
        }
        if self.cudnn_benchmark {
            tch::Cuda::cudnn_set_benchmark(true);
        }
        Ok(())
    }

    /// The run's options (`default_out` unless `--out`): its configuration with the weights
    /// files of the default place filled in (a resumed run keeps its own), its device.
    fn options(&self, default_out: PathBuf) -> Result<TrainOptions> {
        let mut cfg = self.config()?;
        let device = parse_device(&self.device)?;
        if let (true, Err(why)) = (device.is_cuda(), vq_tch::fused_kernel_status(device)) {
            eprintln!(
                "note: the estimator's fused CUDA backward is unavailable ({why}); its ATen \
                 composition runs instead (same results, slower)"
            );
        }
        let out = self.out.clone().unwrap_or(default_out);
        let resumed = if self.resume {
            recorded_config(&out)
        } else {
            None
        };
        let filled = cfg.fill_weights(resumed.as_ref(), vq_weights::locate);
        // Every rank fills the same files; one of them says so.
        if Launch::from_env()
            .ok()
            .flatten()
            .is_none_or(|l| l.rank == 0)
        {
            filled.iter().for_each(|line| eprintln!("{line}"));
        }
        Ok(TrainOptions {
            config: cfg,
            device,
            out,
            log_every: self.log_every,
            checkpoint_every: self.checkpoint_every,
            resume: self.resume,
            progress: !self.quiet,
            stop_after: self.stop_after,
            readback: self.readback,
            profile: self.profile_steps,
        })
    }
}

/// The configuration a run folder records: `out/run.json`, or for a `compare` folder the first
/// run.json of its runs (they share their weights files).
fn recorded_config(out: &std::path::Path) -> Option<RunConfig> {
    let mut level = vec![out.to_path_buf()];
    for _ in 0..4 {
        if let Some(f) = level
            .iter()
            .map(|d| vq_train::layout::RunDir::new(d).run())
            .find(|f| f.is_file())
        {
            return RunConfig::from_run_file(&f).ok();
        }
        let mut next: Vec<PathBuf> = level
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flat_map(|r| r.filter_map(|e| e.ok()).map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        next.sort();
        level = next;
    }
    None
}

/// `train --nproc N`: starts N ranks of this same command on this machine with the variables
/// torchrun sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
/// `MASTER_PORT` = a free port) and waits for them. When one fails, the others get a few seconds
/// to stop by themselves (their errors name it), then any left are killed, as torchrun does.
fn launch_local(n: usize) -> Result<()> {
    use std::process::Command as Process;
    use std::time::{Duration, Instant};
    if n == 0 {
        bail!("--nproc must be at least 1");
    }
    if Launch::from_env()?.is_some() {
        bail!("--nproc under a launcher (RANK/WORLD_SIZE or SLURM_* are set): leave --nproc out");
    }
    let exe = std::env::current_exe().context("locating the vq-train executable")?;
    let mut args: Vec<String> = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--nproc" {
            it.next();
        } else if !a.starts_with("--nproc=") {
            args.push(a);
        }
    }
    let port =
        vq_dist::launch::free_local_port().context("finding a free port for the rendezvous")?;
    // As torchrun: the ranks share the cores (libtorch reads OMP_NUM_THREADS at start).
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let threads =
        std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| (cores / n).max(1).to_string());
    let mut children = Vec::new();
    for rank in 0..n {
        let child = Process::new(&exe)
            .args(&args)
            .env("OMP_NUM_THREADS", &threads)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .with_context(|| format!("starting rank {rank} ({})", exe.display()))?;
        children.push(Some(child));
    }
    let mut failed: Vec<String> = Vec::new();
    let mut first_failure: Option<Instant> = None;
    // Long enough for a survivor's diagnosis (heartbeats watched for 2.5 s) to be printed.
    let grace = Duration::from_secs(10);
    while children.iter().any(Option::is_some) {
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            if let Some(status) = child.try_wait().context("waiting for a rank")? {
                if !status.success() {
                    failed.push(format!("rank {rank} ({status})"));
                    first_failure.get_or_insert_with(Instant::now);
                }
                *slot = None;
            }
        }
        if first_failure.is_some_and(|t| t.elapsed() > grace) {
            for (rank, slot) in children.iter_mut().enumerate() {
                if let Some(mut child) = slot.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                    failed.push(format!("rank {rank} (stopped: another rank had failed)"));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("data-parallel run failed: {}", failed.join(", "))
    }
}

/// libtorch's CPU tensors come from glibc's `malloc`, which by default serves blocks above
/// 128 KiB (a threshold it raises dynamically) with fresh `mmap`s and trims the top of the heap
/// beyond 128 KiB: a training step's activations go back to the kernel and are faulted in
/// again, zero-filled, at the next step (about 13% of a demo step on 2 cores went to page
/// faults). Keep freed memory instead: blocks up to 32 MiB (glibc's largest threshold) from the
/// heap, and no trimming, so the process stays at its peak resident size, as PyTorch's caching
/// allocators do on the GPU. `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` in the
/// environment take precedence.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |var: &str| std::env::var_os(var).is_some();
        if !set("MALLOC_MMAP_THRESHOLD_") && !set("MALLOC_TRIM_THRESHOLD_") {
            // SAFETY: mallopt only changes glibc's allocator parameters; it is called before
            // any other thread exists.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
            }
        }
    }
}

fn main() -> Result<()> {
    keep_freed_memory();
    match Cli::parse().command.unwrap_or(Command::Info) {
        Command::Info => info(),
        Command::Presets { name } => presets(name),
        Command::Train(args) => train(args),
        Command::Compare(args) => compare_cmd(args),
        Command::TraceSummary(args) => trace_summary(args),
        Command::Watch(args) => watch(args),
        Command::Encode(args) => encode(args),
        Command::Import(ImportArgs { run }) => {
            run.apply_runtime()?;
            let opts = run.options(default_out(&run.preset))?;
            let ckpt = vq_train::autoencoder::import(&opts)?;
            println!(
                "imported into {} (checkpoint {}): encode, eval, decode or train --resume it",
                opts.out.display(),
                ckpt.display()
            );
            Ok(())
        }
        Command::Decode(args) => decode(args),
        Command::Eval(args) => eval(args),
        Command::Downstream(args) => downstream(args),
        Command::TrainPrior(args) => {
            let device = parse_device(&args.device)?;
            prior_cmd::train_prior(args, device)
        }
        Command::Sample(args) => {
            let device = parse_device(&args.device)?;
            prior_cmd::sample(args, device)
        }
    }
}

/// `downstream`: tokenizers × seeds, their codes, priors and the paired table.
fn downstream(args: DownstreamArgs) -> Result<()> {
    let DownstreamArgs {
        run,
        estimators,
        seeds,
        prior_preset,
        prior_steps,
        prior_batch_size,
        prior_lr,
    } = args;
    if run.seed.is_some() || run.estimator.is_some() {
        bail!("downstream takes --estimators and --seeds (not --estimator / --seed)");
    }
    let sweep = vq_train::sweep::Sweep {
        methods: vq_train::sweep::parse_methods(&estimators)?,
        seeds: vq_train::sweep::parse_seeds(&seeds)?,
        ..Default::default()
    };
    run.apply_runtime()?;
    let opts =
        run.options(default_out(&run.preset).with_file_name(format!("downstream-{}", run.preset)))?;
    let plan = vq_train::downstream::PriorPlan {
        preset: prior_preset,
        steps: prior_steps,
        batch_size: prior_batch_size,
        learning_rate: prior_lr,
        device: opts.device,
    };
    vq_train::downstream::downstream(&opts, &sweep, &plan)?;
    let md = opts.out.join("downstream.md");
    println!("{}", std::fs::read_to_string(&md)?);
    println!("written: {}, downstream.json", md.display());
    Ok(())
}

/// `info`: the linked libtorch's capabilities.
fn info() -> Result<()> {
    let rt = vq_tch::TorchRuntime::query();
    println!("vq-train {}", env!("CARGO_PKG_VERSION"));
    println!("libtorch CPU threads: {}", rt.cpu_threads);
    println!(
        "CUDA available: {} ({} device(s))",
        rt.cuda_available, rt.cuda_devices
    );
    println!("cuDNN available: {}", rt.cudnn_available);
    Ok(())
}

/// `presets [NAME]`: the list, or one preset's run configuration as JSON.
fn presets(name: Option<String>) -> Result<()> {
    let Some(name) = name else {
        for p in Preset::ALL {
            let c = p.config();
            let a = &c.autoencoder;
            let (r, lr) = (a.resolution(), a.latent_resolution());
            let t = a.frames().map_or(String::new(), |t| format!("{t}×"));
            println!(
                "{:<22} {t}{r}×{r} → {t}{lr}×{lr}×{}, {} codes, {:?}",
                p.name(),
                c.quantizer.codebook_dim,
                c.quantizer.codebook_size,
                c.quantizer.metric
            );
        }
        return Ok(());
    };
    println!("{}", serde_json::to_string_pretty(&preset_config(&name)?)?);
    Ok(())
}

/// `train`: one run (or `--nproc` ranks of it), then its evaluation.
fn train(args: RunArgs) -> Result<()> {
    if let Some(n) = args.nproc {
        return launch_local(n);
    }
    let est = args.estimator.clone().unwrap_or_else(|| "rotation".into());
    let family = args
        .family
        .as_ref()
        .map(|f| format!("-{f}"))
        .unwrap_or_default();
    args.apply_runtime()?;
    let mut opts =
        args.options(PathBuf::from("runs").join(format!("{}{family}-{est}", args.preset)))?;
    let group = join_launch(&mut opts, args.dist_timeout)?;
    let main_rank = group.as_ref().is_none_or(|g| g.is_main());
    let mut trained = train_in(&opts, group)?;
    if !main_rank {
        return Ok(());
    }
    report_trained(&mut trained, &opts)
}

/// Under a launcher (torchrun, srun, `--nproc`): this rank's device and its process group.
fn join_launch(
    opts: &mut TrainOptions,
    dist_timeout: u64,
) -> Result<Option<Arc<vq_dist::ProcessGroup>>> {
    Ok(match Launch::from_env()? {
        Some(launch) => {
            opts.device = vq_train::dist::rank_device(opts.device, &launch)?;
            let timeout = std::time::Duration::from_secs(dist_timeout.max(1));
            let (_, pg) =
                join_from_env(opts.device, timeout)?.context("the launch environment vanished")?;
            fit_micro_batch(&mut opts.config, pg.world(), pg.is_main());
            if pg.is_main() {
                eprintln!(
                    "data-parallel: {} ranks over {} (from {}), global batch {} = {} × micro-batch {} × {} accumulation",
                    pg.world(),
                    pg.backend().name(),
                    launch.launcher.describe(),
                    opts.config.training.batch_size,
                    pg.world(),
                    opts.config.micro_batch,
                    opts.config.training.batch_size / (pg.world() * opts.config.micro_batch).max(1)
                );
            }
            Some(Arc::new(pg))
        }
        None => None,
    })
}

/// Over `world` ranks each rank takes `batch / world` images per step, in micro-batches of at
/// most the configured size: when that size does not divide a rank's share (a preset's
/// single-process micro-batch on several ranks), the largest one that does is used and said.
/// A batch the ranks cannot share evenly is left for the run's own check to refuse.
fn fit_micro_batch(config: &mut RunConfig, world: usize, main: bool) {
    let batch = config.training.batch_size;
    if world == 0 || !batch.is_multiple_of(world) {
        return;
    }
    let share = batch / world;
    let micro = config.micro_batch;
    if micro > 0 && share.is_multiple_of(micro) {
        return;
    }
    let fitted = (1..=micro.min(share))
        .rev()
        .find(|m| share.is_multiple_of(*m))
        .unwrap_or(1);
    if main {
        eprintln!(
            "note: micro-batch {micro} does not divide the {share} images each of the {world} ranks \
             takes of the batch {batch}: each rank runs micro-batches of {fitted}"
        );
    }
    config.micro_batch = fitted;
}

/// What `train` prints after training, and the evaluation of a run that reached its end.
fn report_trained(trained: &mut vq_train::train::Trained, opts: &TrainOptions) -> Result<()> {
    let steps = trained.history.last().map_or(0, |m| m.step);
    println!(
        "trained to step {steps} in {:.1} s; run folder {}",
        trained.seconds,
        opts.out.display()
    );
    if let Some(m) = trained.history.last() {
        println!(
            "last window: loss {:.5}, rec {:.5}, usage {:.1}%, QE {:.3e}",
            m.loss,
            m.rec,
            100.0 * m.usage,
            m.quantization_error
        );
    }
    if opts
        .stop_after
        .is_none_or(|s| s >= opts.config.training.steps)
    {
        let row = evaluate_run(&mut trained.model, &opts.config, &opts.out, opts.device)?.row;
        // A Gumbel quantizer has no encoder vector to compare with its code.
        let qe = match Method::of(&opts.config) {
            Method::Gumbel => String::new(),
            _ => format!(
                ", QE {:.3e} ({:.1}% of mean e²)",
                row.val.quantization_error,
                100.0 * row.val.relative_quantization_error
            ),
        };
        println!(
            "val: rec MSE {:.5}, usage/{} {:.1}%, perplexity {:.1}{qe}; eval.json, reconstructions.png, curves.png in {}",
            row.val.rec_mse,
            opts.config.model.quantizer.tokens(),
            100.0 * row.val.usage,
            row.val.perplexity,
            opts.out.display()
        );
    }
    Ok(())
}

/// `compare`: every estimator (× seeds × grid points) and the tables.
fn compare_cmd(args: CompareArgs) -> Result<()> {
    let CompareArgs {
        run,
        estimators,
        seeds,
        grid,
    } = args;
    if let Some(e) = &run.estimator {
        bail!(
            "compare trains one run per estimator of --estimators (now {}); \
             --estimator {e} is for train: use --estimators {e} to compare only it",
            estimators.join(",")
        );
    }
    if run.nproc.is_some() || Launch::from_env()?.is_some() {
        bail!(
            "compare runs in one process; for data-parallel runs train each estimator with \
             `vq-train train --nproc N --estimator E` (or under torchrun) and compare the runs' eval.json"
        );
    }
    let estimators = vq_train::sweep::parse_methods(&estimators)?;
    let mut sweep = vq_train::sweep::Sweep {
        methods: estimators.clone(),
        ..Default::default()
    };
    if let Some(s) = &seeds {
        if let Some(one) = run.seed {
            bail!("--seed {one} and --seeds {s}: give the seeds of the sweep in --seeds only");
        }
        sweep.seeds = vq_train::sweep::parse_seeds(s)?;
    }
    for axis in &grid {
        sweep.add_axis(axis)?;
    }
    run.apply_runtime()?;
    let opts = run.options(default_out(&run.preset))?;
    if !sweep.is_methods_only() {
        let (rows, stats) = vq_train::sweep::sweep(&opts, &sweep)?;
        println!();
        println!(
            "{}",
            vq_train::sweep::markdown(&opts.config, &sweep, &rows, &stats)
        );
        println!(
            "written: {}/compare.md, compare.json, compare-<metric>.png",
            opts.out.display()
        );
        return Ok(());
    }
    let rows = compare(&opts, &estimators)?;
    println!();
    println!("{}", markdown(&opts.config, &rows));
    println!(
        "written: {}/compare.md, compare.json, curves.png, reconstructions.png",
        opts.out.display()
    );
    Ok(())
}

/// `trace-summary`: a Chrome trace's device activity.
fn trace_summary(args: TraceSummaryArgs) -> Result<()> {
    let TraceSummaryArgs { trace, steps, top } = args;
    let summary = vq_train::profile::TraceSummary::read(&trace)?;
    print!("{}", summary.markdown(steps, top));
    Ok(())
}

/// `watch`: a training run's progress, until it ends.
fn watch(args: WatchArgs) -> Result<()> {
    let WatchArgs { run, every, once } = args;
    anyhow::ensure!(
        every.is_finite() && every > 0.0,
        "--every must be a positive number of seconds, got {every}"
    );
    loop {
        let status = vq_train::watch::look(&run)?;
        println!("{}", status.line());
        if once || status.finished() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs_f64(every));
    }
    Ok(())
}

/// `encode`: a split's code grids.
fn encode(args: EncodeArgs) -> Result<()> {
    let EncodeArgs {
        run,
        data,
        split,
        out,
        shard_size,
        batch,
        device,
        quiet,
    } = args;
    let split = match split.as_str() {
        "train" => vq_data::Split::Train,
        "val" => vq_data::Split::Test,
        other => bail!("--split {other}: expected train or val"),
    };
    let mut loaded = vq_train::codes::LoadedRun::load(&run, parse_device(&device)?)?;
    let batch = batch.unwrap_or(loaded.config.micro_batch);
    let done = vq_train::codes::encode(
        &mut loaded,
        data.as_deref(),
        split,
        &out,
        shard_size,
        batch,
        !quiet,
    )?;
    println!(
        "{} samples ({} skipped) at step {} in {} file(s) ({} kept from before): {}",
        done.samples,
        done.skipped,
        loaded.step,
        done.files.len(),
        done.kept,
        done.files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// `decode`: codes files back to images.
fn decode(args: DecodeArgs) -> Result<()> {
    let DecodeArgs {
        run,
        codes,
        out,
        batch,
        device,
    } = args;
    let loaded = vq_train::codes::LoadedRun::load(&run, parse_device(&device)?)?;
    let batch = batch.unwrap_or(loaded.config.micro_batch);
    let mut n = 0;
    for file in &codes {
        n += vq_train::codes::decode(&loaded, file, &out, batch)?;
    }
    println!(
        "{n} samples of {} file(s) decoded into {}",
        codes.len(),
        out.display()
    );
    Ok(())
}

/// `eval`: a run's metrics on both splits.
fn eval(args: EvalArgs) -> Result<()> {
    let EvalArgs {
        run,
        device,
        lpips,
        inception,
    } = args;
    let device = parse_device(&device)?;
    let file = vq_train::layout::RunDir::new(&run).run();
    let mut cfg = RunConfig::from_run_file(&file)?;
    if lpips.is_some() {
        cfg.lpips_weights = lpips;
    }
    if inception.is_some() {
        cfg.inception_weights = inception;
    }
    for line in cfg.fill_weights(None, vq_weights::locate) {
        eprintln!("{line}");
    }
    let (mut model, _vs) = vq_train::autoencoder::load_model(&run, &cfg, device)?;
    let row = evaluate_run(&mut model, &cfg, &run, device)?.row;
    for (name, m) in [("train", &row.train), ("val", &row.val)] {
        println!(
            "{name}: {} images, rec MSE {:.5}, L1 {:.5}, usage/{} {:.1}%, perplexity {:.1}, QE {:.3e}, LPIPS {}, r-FID {}, r-IS {}",
            m.images,
            m.rec_mse,
            m.rec_l1,
            cfg.model.quantizer.tokens(),
            100.0 * m.usage,
            m.perplexity,
            m.quantization_error,
            show(m.lpips, "--lpips"),
            inception_column(m.rfid, name, &cfg),
            inception_column(m.ris, name, &cfg),
        );
    }
    println!(
        "written: eval.json, reconstructions.png, curves.png in {}",
        run.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every preset trains as printed: its full run configuration (micro-batch included)
    /// validates.
    #[test]
    fn every_preset_config_validates() {
        for p in Preset::ALL {
            let cfg = preset_config(p.name()).unwrap();
            cfg.validate()
                .unwrap_or_else(|e| panic!("{}: {e:#}", p.name()));
            assert!(cfg.micro_batch <= 64 && cfg.micro_batch >= 1);
        }
        let bair = preset_config("timesformer-bair").unwrap();
        assert_eq!((bair.training.batch_size, bair.micro_batch), (24, 12));
    }
}
