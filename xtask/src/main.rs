//! `cargo xtask <command>`: project automation (alias defined in `.cargo/config.toml`).

mod bench_train;
mod download;
#[cfg(test)]
mod layering;
mod setup;
mod weights;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "vq project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install libtorch 2.13.0 (PyPI `torch` wheel) into `.libtorch/`, or adopt the one named by
    /// the LIBTORCH environment variable. Idempotent.
    Setup {
        /// Reinstall even when a complete installation is present.
        #[arg(long)]
        force: bool,
    },
    /// Set up if needed, then run the whole test suite (`cargo test --workspace`).
    Test {
        /// Extra arguments passed to `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// What CI runs: setup, format check, clippy -D warnings, tests, documentation build.
    Ci,
    /// Run the demo: set up if needed, then train the small VQ-VAE on the embedded Fashion-MNIST
    /// data with STE and with the rotation trick, in two regimes — an EMA codebook (Table-1
    /// style) and a codebook learned with taming's loss (Tables 2–3 style) — and print both
    /// comparison tables and what they show (run folders runs/compare-demo-fashion-mnist and
    /// runs/compare-demo-fashion-mnist-learned; about 12 minutes on 2 cores). Arguments after
    /// `--` go to `vq-train compare`.
    Demo {
        /// Extra arguments for `vq-train compare` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The second stage on the demo: the EMA-codebook tokenizer trained with STE and with the
    /// rotation trick (seed 0, as `demo`), each one's codes, a `demo` prior on them (400 steps),
    /// its held-out likelihood and its samples judged by a classifier trained on the data; prints
    /// reconstruction and generation side by side (run folder runs/demo-prior; about 10 minutes
    /// on 2 cores). Arguments after `--` go to `vq-train downstream` (e.g. `--seeds 0..3`,
    /// `--preset demo-fashion-mnist-learned`).
    DemoPrior {
        /// Extra arguments for `vq-train downstream` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The paper's 2-D experiments, STE vs rotation trick (tables on stdout, PNGs in runs/toy).
    /// Needs no libtorch.
    Toy,
    /// On a GPU machine: set up, print what libtorch sees, run the vq-tch tests on CPU and CUDA
    /// (feature cuda-tests), time the op and a whole VQ step on CUDA against torch's ops, and a
    /// Table-1 VQ-VAE's training step against its PyTorch twin in f32 and bf16.
    GpuCheck,
    /// Download a dataset listed in datasets/ (resumable, verified against the manifest's
    /// checksums, moved into place only when complete; .tgz archives are extracted).
    DownloadData {
        /// Dataset: fashion-mnist, imagenette, bair, ucf101, imagenet.
        name: String,
        /// Folder to put it in (default: `data/<name>`).
        #[arg(long)]
        dest: Option<PathBuf>,
        /// Only these files of the manifest (default: all, except imagenette: the 160 px
        /// variant, and ucf101: the zip mirror and the split lists).
        #[arg(long = "file")]
        files: Vec<String>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Download the pretrained networks of the metrics listed in weights/ (LPIPS: torchvision's
    /// VGG16 + the LPIPS v0.1 heads; inception: pytorch-fid's FID Inception), verified like
    /// download-data, and convert them to the safetensors that vq-train reads — by default into
    /// the folder where it looks for them ($VQ_WEIGHTS, else ~/.cache/vq/weights), so that the
    /// LPIPS, r-FID and r-IS columns fill without flags.
    DownloadWeights {
        /// lpips, inception or all.
        name: String,
        /// Folder for the converted files (sources under DIR/sources/); vq-train finds them
        /// there with VQ_WEIGHTS=DIR.
        #[arg(long)]
        dest: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Set up if needed, then time the vq-core kernels against PyTorch on the same shapes.
    Bench {
        /// Threads for both sides (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Only the smallest shape (a quick check).
        #[arg(long)]
        quick: bool,
    },
    /// Set up if needed, then time N training steps of `vq-train` and of the same model in
    /// PyTorch (crates/vq-train/examples/torch_twin.py), one after the other, and print steps/s,
    /// images/s, peak memory and the step-time ratio.
    BenchTrain(bench_train::BenchTrain),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = project_root();
    match cli.command {
        Cmd::Setup { force } => {
            setup::run(&root, force)?;
            setup::ffmpeg(&root);
            setup::cuda_headers(&root);
            Ok(())
        }
        Cmd::Test { args } => {
            setup::run(&root, false)?;
            setup::ffmpeg(&root);
            setup::cuda_headers(&root);
            test(&root, &args)
        }
        Cmd::Ci => {
            setup::run(&root, false)?;
            setup::ffmpeg(&root);
            setup::cuda_headers(&root);
            cargo(&root, &["fmt", "--all", "--check"], &[])?;
            cargo(
                &root,
                &[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
                &[],
            )?;
            test(&root, &[])?;
            cargo(
                &root,
                &["doc", "--workspace", "--no-deps"],
                &[("RUSTDOCFLAGS", "-D warnings")],
            )
        }
        Cmd::Demo { args } => {
            setup::run(&root, false)?;
            demo(&root, &args)
        }
        Cmd::DemoPrior { args } => {
            setup::run(&root, false)?;
            demo_prior(&root, &args)
        }
        Cmd::Toy => toy(&root),
        Cmd::GpuCheck => {
            setup::run(&root, false)?;
            setup::cuda_headers(&root);
            if let Ok(out) = Command::new("nvidia-smi").output() {
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
            cargo(
                &root,
                &["run", "--release", "-p", "vq-train", "--", "info"],
                &[],
            )?;
            cargo(
                &root,
                &[
                    "test",
                    "--release",
                    "-p",
                    "vq-tch",
                    "--features",
                    "cuda-tests",
                ],
                &[],
            )?;
            cargo(
                &root,
                &[
                    "run",
                    "--release",
                    "-p",
                    "vq-tch",
                    "--example",
                    "bench_op",
                    "--",
                    "--device",
                    "cuda",
                ],
                &[],
            )?;
            gpu_check_distributed(&root)?;
            // Short runs on synthetic data (steps/s and memory on the GPU), in f32 and bf16: a
            // Table-1 VQ-VAE, the Table-2 VQGAN, a Table-3 LDM VQGAN, the Table-4 ViT-VQGAN and
            // the Table-5 BAIR video tokenizer (docs/performance.md has the H200 figures).
            for precision in ["f32", "bf16"] {
                for (preset, batch) in [
                    ("vqvae-f16-euclidean", "16"),
                    ("vqgan-f16-imagenet", "16"),
                    ("ldm-vq-f4", "16"),
                    ("vit-vqgan-small", "32"),
                    ("timesformer-bair", "24"),
                ] {
                    let out = format!("runs/gpu-check/{preset}-{precision}");
                    fresh_run_folder(&root.join(&out))?;
                    cargo(
                        &root,
                        &[
                            "run",
                            "--release",
                            "-p",
                            "vq-train",
                            "--",
                            "train",
                            "--preset",
                            preset,
                            "--data",
                            "synthetic:256",
                            "--device",
                            "cuda",
                            "--precision",
                            precision,
                            "--steps",
                            "30",
                            "--batch-size",
                            batch,
                            "--micro-batch",
                            batch,
                            "--log-every",
                            "10",
                            "--out",
                            &out,
                            "--quiet",
                        ],
                        &[],
                    )?;
                }
            }
            // The twin benchmark (vq-train against the same model in PyTorch) in f32 and bf16
            // at the presets' batch sizes: a Table-1 VQ-VAE, the taming / latent-diffusion
            // VQGANs, ViT-VQGAN and the BAIR TimeSformer (one micro-batch of 12 clips: its batch of
            // 24 took 126 GB on an H200).
            let lt = setup::run(&root, false)?;
            for (preset, batch) in [
                ("vqvae-f16-euclidean", 16),
                ("vqgan-f16-imagenet", 16),
                ("ldm-vq-f4", 16),
                ("vit-vqgan-small", 32),
                ("timesformer-bair", 12),
            ] {
                for precision in ["f32", "bf16"] {
                    bench_train::BenchTrain::cuda(preset, precision, batch)
                        .run(&root, Some(&lt))?;
                }
            }
            Ok(())
        }
        Cmd::DownloadData {
            name,
            dest,
            files,
            quiet,
        } => download_data(&root, &name, dest, &files, !quiet),
        Cmd::DownloadWeights { name, dest, quiet } => download_weights(&root, &name, dest, !quiet),
        Cmd::Bench { threads, quick } => {
            let lt = setup::run(&root, false)?;
            bench(&root, &lt, threads, quick)
        }
        Cmd::BenchTrain(b) => {
            let lt = if b.needs_setup() {
                Some(setup::run(&root, false)?)
            } else {
                None
            };
            b.run(&root, lt.as_ref())
        }
    }
}

/// The NCCL path: vq-dist's tests with `cuda-tests` (a world of one on cuda:0), then the demo trained with one
/// rank per visible GPU (`train --nproc N --device cuda`, micro-batch 64 per rank).
fn gpu_check_distributed(root: &Path) -> Result<()> {
    cargo(
        root,
        &[
            "test",
            "--release",
            "-p",
            "vq-dist",
            "--features",
            "cuda-tests",
        ],
        &[],
    )?;
    let gpus = Command::new("nvidia-smi")
        .arg("--list-gpus")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(1)
        .max(1);
    // The demo's micro-batch of 64 per rank.
    let batch = (64 * gpus).to_string();
    let gpus = gpus.to_string();
    let out = "runs/gpu-check/nccl-demo";
    fresh_run_folder(&root.join(out))?;
    cargo(
        root,
        &[
            "run",
            "--release",
            "-p",
            "vq-train",
            "--",
            "train",
            "--nproc",
            &gpus,
            "--device",
            "cuda",
            "--preset",
            "demo-fashion-mnist",
            "--batch-size",
            &batch,
            "--steps",
            "30",
            "--log-every",
            "10",
            "--out",
            out,
            "--quiet",
        ],
        &[],
    )
}

/// Removes the run folder `run` of an earlier check or benchmark, so that the training starts
/// afresh.
pub(crate) fn fresh_run_folder(run: &Path) -> Result<()> {
    if run.exists() {
        std::fs::remove_dir_all(run).with_context(|| format!("removing {}", run.display()))?;
    }
    Ok(())
}

/// The workspace root (the parent of this crate's folder).
fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    let mut args: Vec<&str> = vec!["test", "--workspace"];
    args.extend(extra.iter().map(String::as_str));
    cargo(root, &args, &[])
}

/// The demo's two regimes: the preset, and what its quantizer is.
const DEMO_REGIMES: [(&str, &str); 2] = [
    (
        "demo-fashion-mnist",
        "EMA codebook, Euclidean lookup (Table-1 style, lucidrains' layer)",
    ),
    (
        "demo-fashion-mnist-learned",
        "codebook learned by gradient with taming's loss (Tables 2–3 style)",
    ),
];

fn demo(root: &Path, extra: &[String]) -> Result<()> {
    for (preset, _) in DEMO_REGIMES {
        demo_command(root, &["compare", "--preset", preset], extra)?;
    }
    if extra.iter().any(|a| a.starts_with("--out")) {
        return Ok(());
    }
    println!("\nWhat the two regimes show (held-out images):");
    for (preset, regime) in DEMO_REGIMES {
        let path = root
            .join("runs")
            .join(format!("compare-{preset}/compare.json"));
        println!("- {regime}: {}", demo_sentence(&path)?);
    }
    Ok(())
}

/// `demo-prior`: `vq-train downstream` on the demo with one seed; the defaults can be
/// overridden after `--` (clap takes the last value given).
fn demo_prior(root: &Path, extra: &[String]) -> Result<()> {
    let args = [
        "downstream",
        "--preset",
        "demo-fashion-mnist",
        "--seeds",
        "0",
        "--prior-steps",
        "400",
        "--out",
        "runs/demo-prior",
    ];
    demo_command(root, &args, extra)
}

/// `cargo run --release -p vq-train -- <command> --threads <all cores> --resume <extra>`: a
/// demo's command, which re-running continues (finished stages are reused, interrupted ones
/// resumed); `extra` comes last, so it overrides.
fn demo_command(root: &Path, command: &[&str], extra: &[String]) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .to_string();
    let mut args = vec!["run", "--release", "-p", "vq-train", "--"];
    args.extend(command);
    args.extend(["--threads", &threads, "--resume"]);
    args.extend(extra.iter().map(String::as_str));
    cargo(root, &args, &[])
}

/// One sentence on STE against the rotation trick from a `compare.json`: usage, quantization
/// error and reconstruction error on the held-out split.
fn demo_sentence(path: &Path) -> Result<String> {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", path.display()))?;
    let val = |estimator: &str, field: &str| -> Result<f64> {
        json["rows"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["estimator"] == estimator))
            .and_then(|r| r["val"][field].as_f64())
            .with_context(|| format!("{}: no {estimator} val.{field}", path.display()))
    };
    let (u_ste, u_rot) = (val("ste", "usage")?, val("rotation", "usage")?);
    let qe = val("ste", "quantization_error")? / val("rotation", "quantization_error")?;
    let mse = val("rotation", "rec_mse")? / val("ste", "rec_mse")? - 1.0;
    let qe_words = match qe >= 1.0 {
        true => format!("{qe:.1}× lower"),
        false => format!("{:.1}× higher", 1.0 / qe),
    };
    Ok(format!(
        "STE uses {:.1}% of the codes, the rotation trick {:.1}%; the rotation trick's \
         quantization error is {qe_words} and its reconstruction MSE {:.0}% {} than STE's.",
        100.0 * u_ste,
        100.0 * u_rot,
        100.0 * mse.abs(),
        if mse >= 0.0 { "higher" } else { "lower" }
    ))
}

fn download_data(
    root: &Path,
    name: &str,
    dest: Option<PathBuf>,
    only: &[String],
    progress: bool,
) -> Result<()> {
    if name == "fashion-mnist-demo" {
        bail!(
            "fashion-mnist-demo is committed under datasets/fashion-mnist-demo: nothing to download"
        );
    }
    let manifest = download::Manifest::load(root, name)?;
    let dir = dest.unwrap_or_else(|| root.join("data").join(name));
    let defaults: &[&str] = match name {
        "imagenette" => &["imagenette2-160.tgz"],
        "ucf101" => &[
            "UCF101_videos.zip",
            "UCF101TrainTestSplits-RecognitionTask.zip",
        ],
        _ => &[],
    };
    let chosen: Vec<&download::FileEntry> = manifest
        .files
        .iter()
        .filter(|f| {
            if only.is_empty() {
                defaults.is_empty() || defaults.contains(&f.name.as_str())
            } else {
                only.contains(&f.name)
            }
        })
        .collect();
    if let Some(missing) = only
        .iter()
        .find(|o| !manifest.files.iter().any(|f| &f.name == *o))
    {
        let names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
        bail!(
            "{name} has no file {missing:?}; its files: {}",
            names.join(", ")
        );
    }
    if manifest.auth != "none" && !manifest.auth.starts_with("none") {
        // Files behind a login (ImageNet): verify what the user put there, or say what to do.
        let absent: Vec<&str> = chosen
            .iter()
            .filter(|f| !dir.join(&f.name).is_file())
            .map(|f| f.name.as_str())
            .collect();
        if !absent.is_empty() {
            bail!(
                "{name} cannot be downloaded anonymously (access: see \"auth\" in datasets/{name}.json). \
                 Download {} yourself (from {}) into {} (or pass --dest <folder holding them>), \
                 then run this command again to verify them against the manifest.",
                absent.join(", "),
                chosen[0].url,
                dir.display()
            );
        }
        for f in &chosen {
            let t = download::Target::of(f, &dir);
            download::verify(&t.dest, &t)?;
            eprintln!("{}: verified", t.dest.display());
        }
        return Ok(());
    }
    for f in &chosen {
        if let Some(n) = f.bytes
            && n > 10 << 30
        {
            eprintln!("{}: {:.1} GB", f.name, n as f64 / 1e9);
        }
        let t = download::Target::of(f, &dir);
        download::fetch(&t, progress)?;
        if f.name.ends_with(".tgz") || f.name.ends_with(".tar.gz") {
            let marker = dir.join(format!(".extracted-{}", f.name));
            if !marker.exists() {
                let n = download::extract(&t.dest, &dir)?;
                std::fs::write(&marker, n.to_string())
                    .with_context(|| format!("writing {}", marker.display()))?;
                eprintln!("{}: extracted {n} entries into {}", f.name, dir.display());
            }
        } else if f.name.ends_with(".zip") || f.name.ends_with(".rar") {
            let marker = dir.join(format!(".extracted-{}", f.name));
            if !marker.exists() {
                let n = if f.name.ends_with(".zip") {
                    download::extract_zip(&t.dest, &dir)?.to_string()
                } else {
                    download::extract_rar(&t.dest, &dir)?;
                    "all".to_owned()
                };
                std::fs::write(&marker, &n)
                    .with_context(|| format!("writing {}", marker.display()))?;
                eprintln!("{}: extracted {n} entries into {}", f.name, dir.display());
            }
        }
    }
    Ok(())
}

fn download_weights(root: &Path, name: &str, dest: Option<PathBuf>, progress: bool) -> Result<()> {
    let networks = if name == "all" {
        vq_weights::Network::ALL.to_vec()
    } else {
        vec![vq_weights::Network::from_name(name).map_err(|e| anyhow::anyhow!("{e} (or all)"))?]
    };
    let Some(dir) = dest.clone().or_else(vq_weights::default_dir) else {
        bail!(
            "no default folder for the weights ({} is set and empty, or no HOME): pass --dest DIR",
            vq_weights::DIR_ENV
        );
    };
    for n in networks {
        let m = weights::WeightsManifest::load(root, n)?;
        weights::download(&m, n, &dir, progress)?;
    }
    if dest.is_some() && vq_weights::default_dir().as_deref() != Some(dir.as_path()) {
        eprintln!(
            "vq-train looks in {} by default; set {}={} to use these",
            vq_weights::default_dir().map_or("no folder".into(), |d| d.display().to_string()),
            vq_weights::DIR_ENV,
            dir.display()
        );
    }
    Ok(())
}

fn toy(root: &Path) -> Result<()> {
    cargo(
        root,
        &[
            "run",
            "--release",
            "-p",
            "vq-core",
            "--example",
            "toy_experiments",
            "--",
            "--out",
            "runs/toy",
        ],
        &[],
    )
}

fn bench(root: &Path, lt: &setup::Libtorch, threads: Option<usize>, quick: bool) -> Result<()> {
    let threads = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .to_string();
    let mut args = vec![
        "run",
        "--release",
        "-p",
        "vq-core",
        "--example",
        "bench_vq",
        "--",
    ];
    args.extend(["--threads", &threads]);
    if quick {
        args.push("--quick");
    }
    let site = lt.python_site.as_ref().map(|p| p.display().to_string());
    let torch_python = site.as_deref().unwrap_or("");
    let bench_script = root
        .join("crates/vq-core/examples/torch_vq_ref.py")
        .display()
        .to_string();
    args.extend([
        "--torch-script",
        &bench_script,
        "--torch-pythonpath",
        torch_python,
    ]);
    cargo(root, &args, &[])
}

/// Runs `cargo <args>` in the workspace root with extra environment variables, failing on a
/// non-zero exit.
pub(crate) fn cargo(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    eprintln!("$ cargo {}", args.join(" "));
    let status = cmd
        .status()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
