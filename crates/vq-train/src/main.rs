//! `vq-train`: train, evaluate and compare vector-quantized autoencoders.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "vq-train",
    version,
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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Info) {
        Command::Info => {
            let rt = vq_tch::TorchRuntime::query();
            println!("vq-train {}", env!("CARGO_PKG_VERSION"));
            println!("libtorch CPU threads: {}", rt.cpu_threads);
            println!(
                "CUDA available: {} ({} device(s))",
                rt.cuda_available, rt.cuda_devices
            );
            println!("cuDNN available: {}", rt.cudnn_available);
        }
    }
    Ok(())
}
