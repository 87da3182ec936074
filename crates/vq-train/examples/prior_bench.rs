//! The prior's side of `cargo xtask bench-train --prior PRESET`: training steps of `train_prior`
//! (the run loop, AdamW, clipping, logging, as `vq-train train-prior` runs them) on random codes
//! of the given shape, then batched sampling with the key/value cache. Writes the prior's
//! configuration to `<out>/prior.json` (the PyTorch twin,
//! `examples/torch_prior_twin.py`, builds the same shapes from it) and prints one JSON line:
//! steps/s over the timed steps, tokens/s of the sampler, the configuration.
//!
//! `cargo run --release -p vq-train --example prior_bench -- --preset demo --out runs/bench-prior`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tch::{Device, Tensor};
use vq_prior::{Cache, Sampling};
use vq_train::codeset::CodeSet;
use vq_train::prior::{PriorOptions, PriorRunConfig, PriorTraining, train_prior};

#[derive(Debug, Parser)]
struct Args {
    /// Prior preset.
    #[arg(long, default_value = "demo")]
    preset: String,
    /// Codes K.
    #[arg(long, default_value_t = 256)]
    codebook_size: usize,
    /// Grid height and width.
    #[arg(long, default_value_t = 8)]
    grid: usize,
    /// Classes (0: unconditional).
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Grids per step.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Untimed steps first (also the logging window).
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Grids sampled in one batch for tokens/s.
    #[arg(long, default_value_t = 64)]
    samples: usize,
    /// libtorch CPU threads.
    #[arg(long)]
    threads: Option<usize>,
    /// cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Folder for the run and prior.json.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let a = Args::parse();
    ensure!(
        a.warmup > 0 && a.steps.is_multiple_of(a.warmup),
        "--steps must be a multiple of --warmup (the logging window)"
    );
    if let Some(t) = a.threads {
        tch::set_num_threads(t as i32);
    }
    let device = match a.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        d => Device::Cuda(
            d.strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("unknown device {d:?}: cpu, cuda or cuda:N"))?,
        ),
    };
    let data = random_codes(&a);
    let total = a.warmup + a.steps;
    let training = PriorTraining::llamagen(total, a.batch_size, 1e-3);
    let config = PriorRunConfig::for_codes(&a.preset, &data, (vec![], vec![]), None, training, 0)?;
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(
        a.out.join("prior.json"),
        serde_json::to_string_pretty(&json!({
            "prior": config.prior,
            "training": config.training,
        }))?,
    )?;
    let run = a.out.join("vq-train");
    if run.exists() {
        std::fs::remove_dir_all(&run).with_context(|| format!("clearing {}", run.display()))?;
    }
    let opts = PriorOptions {
        config,
        out: run.clone(),
        device,
        log_every: a.warmup,
        checkpoint_every: 10 * total,
        resume: false,
        progress: false,
        stop_after: None,
    };
    let trained = train_prior(opts, data, None)?;
    let steps_per_s = timed_steps_per_s(&run, a.warmup, total)?;
    let prior = trained.prior;
    let labels: Option<Vec<i64>> = (a.classes > 0).then(|| {
        (0..a.samples as i64)
            .map(|i| i % a.classes as i64)
            .collect()
    });
    let sampling = Sampling::default();
    // One untimed batch first (allocator, kernels).
    let warm: Option<Vec<i64>> = labels.as_ref().map(|l| l[..2.min(l.len())].to_vec());
    let _ = prior.sample(warm.as_deref(), 2, 0, &sampling, Cache::Kv)?;
    let t = Instant::now();
    let codes = prior.sample(labels.as_deref(), a.samples, 1, &sampling, Cache::Kv)?;
    let _ = codes.to_device(Device::Cpu);
    let seconds = t.elapsed().as_secs_f64();
    let tokens = (a.samples * prior.config().tokens()) as f64;
    println!(
        "{}",
        json!({
            "steps_per_s": steps_per_s,
            "tokens_per_s": tokens / seconds,
            "parameters": trained.vs.trainable_variables().iter().map(Tensor::numel).sum::<usize>(),
        })
    );
    Ok(())
}

/// Uniformly random codes (and labels) of the configured shape, 16 batches' worth.
fn random_codes(a: &Args) -> CodeSet {
    let n = 16 * a.batch_size;
    let mut rng = StdRng::seed_from_u64(0);
    let codes: Vec<i32> = (0..n * a.grid * a.grid)
        .map(|_| rng.gen_range(0..a.codebook_size as i32))
        .collect();
    let g = a.grid as i64;
    let labels = (a.classes > 0).then(|| {
        let y: Vec<i64> = (0..n).map(|_| rng.gen_range(0..a.classes as i64)).collect();
        Tensor::from_slice(&y)
    });
    CodeSet {
        codes: Tensor::from_slice(&codes).view([n as i64, g, g]),
        labels,
        classes: (0..a.classes).map(|c| format!("class {c}")).collect(),
        codebook_size: a.codebook_size,
        codebook: Tensor::zeros([a.codebook_size as i64, 1], tch::kind::FLOAT_CPU),
        run_config: String::new(),
        files: Vec::new(),
    }
}

/// Steps/s over the metric windows after the first (the warm-up).
fn timed_steps_per_s(run: &std::path::Path, warmup: usize, total: usize) -> Result<f64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl"))
        .with_context(|| format!("reading {}/metrics.jsonl", run.display()))?;
    let (mut n, mut seconds, mut last) = (0usize, 0.0, warmup);
    for line in text.lines() {
        let m: Value = serde_json::from_str(line)?;
        let (Some(step), Some(sps)) = (m["step"].as_u64(), m["steps_per_s"].as_f64()) else {
            continue;
        };
        let step = step as usize;
        if step > warmup && step <= total {
            n += step - last;
            seconds += (step - last) as f64 / sps;
            last = step;
        }
    }
    ensure!(
        n == total - warmup,
        "metrics.jsonl covers {n} timed steps, expected {}",
        total - warmup
    );
    Ok(n as f64 / seconds)
}
