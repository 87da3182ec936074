//! `cargo xtask <command>`: project automation (alias defined in `.cargo/config.toml`).

mod setup;

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
    /// data with STE and with the rotation trick and print the comparison table (run folder
    /// runs/compare-demo-fashion-mnist; about 8 minutes on 2 cores). Arguments after `--` go to
    /// `vq-train compare`.
    Demo {
        /// Extra arguments for `vq-train compare` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The paper's 2-D experiments, STE vs rotation trick (tables on stdout, PNGs in runs/toy).
    /// Needs no libtorch.
    Toy,
    /// On a GPU machine: set up, print what libtorch sees, run the vq-tch tests on CPU and CUDA
    /// (feature cuda-tests), and time the op and a whole VQ step on CUDA against torch's ops.
    GpuCheck,
    /// Set up if needed, then time the vq-core kernels against PyTorch on the same shapes.
    Bench {
        /// Threads for both sides (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Only the smallest shape (a quick check).
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = project_root();
    match cli.command {
        Cmd::Setup { force } => setup::run(&root, force).map(|_| ()),
        Cmd::Test { args } => {
            setup::run(&root, false)?;
            test(&root, &args)
        }
        Cmd::Ci => {
            setup::run(&root, false)?;
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
        Cmd::Toy => toy(&root),
        Cmd::GpuCheck => {
            setup::run(&root, false)?;
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
            // A short Table-1 VQ-VAE run on synthetic data: steps/s and memory on the GPU.
            let run = root.join("runs/gpu-check");
            if run.exists() {
                std::fs::remove_dir_all(&run)
                    .with_context(|| format!("removing {}", run.display()))?;
            }
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
                    "vqvae-f16-euclidean",
                    "--data",
                    "synthetic:256",
                    "--device",
                    "cuda",
                    "--steps",
                    "30",
                    "--batch-size",
                    "16",
                    "--log-every",
                    "10",
                    "--out",
                    "runs/gpu-check",
                    "--quiet",
                ],
                &[],
            )
        }
        Cmd::Bench { threads, quick } => {
            let lt = setup::run(&root, false)?;
            bench(&root, &lt, threads, quick)
        }
    }
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

fn demo(root: &Path, extra: &[String]) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .to_string();
    let mut args = vec![
        "run",
        "--release",
        "-p",
        "vq-train",
        "--",
        "compare",
        "--preset",
        "demo-fashion-mnist",
        "--threads",
        &threads,
        // Re-running reuses finished runs and continues interrupted ones.
        "--resume",
    ];
    args.extend(extra.iter().map(String::as_str));
    cargo(root, &args, &[])
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
