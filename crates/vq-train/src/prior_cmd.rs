//! The prior's subcommands: `train-prior` (a prior on a tokenizer's codes) and `sample` (grids
//! from a prior, decoded to images through the tokenizer).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use tch::{Device, Kind, Tensor};
use vq_prior::{Cache, Sampling};
use vq_train::codeset::CodeSet;
use vq_train::prior::{PriorOptions, PriorRunConfig, PriorTraining};

#[derive(Debug, Args)]
pub struct TrainPriorArgs {
    /// Training codes: files or folders of `vq-train encode --split train`.
    #[arg(long, num_args = 1.., required = true)]
    pub codes: Vec<PathBuf>,
    /// Held-out codes (`encode --split val`) for the likelihood after training.
    #[arg(long, num_args = 1..)]
    pub val_codes: Vec<PathBuf>,
    /// The tokenizer run the codes came from (recorded, for `sample`).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Prior preset: demo, demo-maskgit, llamagen-gpt-b, llamagen-gpt-l, taming-16x16.
    #[arg(long, default_value = "demo")]
    pub preset: String,
    /// Optimiser steps.
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    /// Grids per step.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Peak learning rate (AdamW β = (0.9, 0.95), weight decay 0.05, 5% warm-up, cosine).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Arithmetic of the forward: f32, or bf16 (autocast; logits and loss in f32).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// taming's pkeep (autoregressive prior): keep each input code with this probability.
    #[arg(long)]
    pub pkeep: Option<f64>,
    /// Seed of the weights, the data order and the step draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue from the folder's latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Stop (with a checkpoint) after this many steps.
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Steps between metric lines.
    #[arg(long, default_value_t = 50)]
    pub log_every: usize,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Device (cpu, cuda, cuda:N).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seconds a rank waits for the others in a collective before naming the lost one (under
    /// torchrun or srun).
    #[arg(long, default_value_t = 600)]
    pub dist_timeout: u64,
}

/// `train-prior`: alone, or as one rank under torchrun / srun (the global batch split over
/// the ranks; every grid draws what it draws in one process).
pub fn train_prior(args: TrainPriorArgs, device: Device) -> Result<()> {
    let train = CodeSet::open(&args.codes)?;
    let precision: vq_tch::Precision = args.precision.parse()?;
    let training = PriorTraining {
        precision,
        ..PriorTraining::llamagen(args.steps, args.batch_size, args.lr)
    };
    let mut config = PriorRunConfig::for_codes(
        &args.preset,
        &train,
        (args.codes.clone(), args.val_codes.clone()),
        args.tokenizer.clone(),
        training,
        args.seed,
    )?;
    if let Some(p) = args.pkeep {
        config.prior.pkeep = p;
    }
    let mut opts = PriorOptions {
        config,
        out: args.out.clone(),
        device,
        log_every: args.log_every,
        checkpoint_every: args.checkpoint_every,
        resume: args.resume,
        progress: !args.quiet,
        stop_after: args.stop_after,
    };
    let group = match vq_dist::Launch::from_env()? {
        Some(launch) => {
            opts.device = vq_train::dist::rank_device(opts.device, &launch)?;
            let timeout = std::time::Duration::from_secs(args.dist_timeout.max(1));
            let (_, pg) = vq_train::dist::join_from_env(opts.device, timeout)?
                .context("the launch environment vanished")?;
            if pg.is_main() {
                eprintln!(
                    "data-parallel prior: {} ranks over {}, {} grids per rank",
                    pg.world(),
                    pg.backend().name(),
                    opts.config.training.batch_size / pg.world()
                );
            }
            Some(std::sync::Arc::new(pg))
        }
        None => None,
    };
    let main = group.as_ref().is_none_or(|g| g.is_main());
    let done = vq_train::prior::train_prior(opts, train, group)?;
    if !main {
        return Ok(());
    }
    if let Some(m) = done.history.last() {
        println!(
            "step {}: training loss {:.4} nats ({:.3} bits) per code",
            m.step, m.loss, m.bits_per_token
        );
    }
    if let Some(e) = done.eval {
        println!(
            "held-out NLL over {} grids: {:.4} bits per code, {:.1} bits per image",
            e.samples, e.bits_per_token, e.bits_per_image
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    /// Prior run folder (`train-prior`).
    #[arg(long)]
    pub prior: PathBuf,
    /// Tokenizer run folder whose decoder turns the codes into images (default: the one the
    /// prior run names).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Grids per class (class-conditional prior) or in all (unconditional).
    #[arg(long, default_value_t = 8)]
    pub count: usize,
    /// Only these classes (comma-separated indices; default: every class).
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<i64>,
    /// Softmax temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Keep the k most likely codes (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Classifier-free guidance scale (1: none).
    #[arg(long, default_value_t = 1.0)]
    pub cfg_scale: f64,
    /// MaskGIT decoding iterations (masked prior).
    #[arg(long, default_value_t = 12)]
    pub iterations: usize,
    /// Grid i draws from seed + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Grids per pass.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Output folder: codes.safetensors and images/.
    #[arg(long)]
    pub out: PathBuf,
    /// Device (cpu, cuda, cuda:N).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `sample`.
pub fn sample(args: SampleArgs, device: Device) -> Result<()> {
    ensure!(args.count >= 1, "--count must be at least 1");
    ensure!(args.batch >= 1, "--batch must be at least 1");
    let mut listed = std::collections::BTreeSet::new();
    if let Some(c) = args.classes.iter().find(|&&c| !listed.insert(c)) {
        bail!("--classes names class {c} twice");
    }
    let (config, prior, _vs) = vq_train::prior::load_prior(&args.prior, device)?;
    let tokenizer = args
        .tokenizer
        .clone()
        .or(config.tokenizer.clone())
        .context("no tokenizer: give --tokenizer (the run whose codes the prior learned)")?;
    let run = vq_train::codes::LoadedRun::load(&tokenizer, device)?;
    let codebook = run.model.quantizer().codes_table().to_device(Device::Cpu);
    let train = CodeSet::open(&config.train_codes)
        .with_context(|| "reading the prior's training codes (their tokenizer and classes)")?;
    ensure!(
        codebook.size() == train.codebook.size() && codebook.equal(&train.codebook),
        "{} is not the tokenizer the prior learned (its codebook differs from the training codes')",
        tokenizer.display()
    );
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        cfg_scale: args.cfg_scale,
        iterations: args.iterations,
        ..Sampling::default()
    };
    let classes = prior.config().conditioning.classes() as i64;
    ensure!(
        classes > 0 || args.classes.is_empty(),
        "--classes: {} is an unconditional prior (it was trained without labels)",
        args.prior.display()
    );
    if let Some(c) = args.classes.iter().find(|&&c| !(0..classes).contains(&c)) {
        bail!("--classes: class index {c} is outside 0..{classes}");
    }
    let labels: Option<Vec<i64>> = (classes > 0).then(|| {
        let which: Vec<i64> = match args.classes.is_empty() {
            true => (0..classes).collect(),
            false => args.classes.clone(),
        };
        which
            .iter()
            .flat_map(|&c| std::iter::repeat_n(c, args.count))
            .collect()
    });
    let n = labels.as_ref().map_or(args.count, Vec::len);
    let mut grids = Vec::new();
    for start in (0..n).step_by(args.batch) {
        let end = (start + args.batch).min(n);
        let y = labels.as_ref().map(|l| &l[start..end]);
        let seed = args.seed.wrapping_add(start as u64);
        grids.push(prior.sample(y, end - start, seed, &sampling, Cache::Kv)?);
    }
    let codes = Tensor::cat(&grids, 0)
        .to_device(Device::Cpu)
        .to_kind(Kind::Int64);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let path = args.out.join("codes.safetensors");
    let meta = HashMap::from([
        ("run_config".to_owned(), serde_json::to_string(&run.config)?),
        ("step".to_owned(), run.step.to_string()),
        ("split".to_owned(), "sampled".to_owned()),
        ("prior".to_owned(), args.prior.display().to_string()),
        ("sampling".to_owned(), serde_json::to_string(&sampling)?),
        ("seed".to_owned(), args.seed.to_string()),
    ]);
    let label_i32: Option<Vec<i32>> = labels
        .as_ref()
        .map(|l| l.iter().map(|&v| v as i32).collect());
    let with_classes = label_i32.as_deref().map(|l| (l, train.classes.as_slice()));
    vq_train::codes::write_codes_file(&path, &codes, with_classes, &codebook, meta)?;
    let images = args.out.join("images");
    let written = vq_train::codes::decode(&run, &path, &images, args.batch)?;
    let figure = args.out.join("samples.png");
    class_grid(&run, &codes, labels.as_deref(), &train.classes, &figure)?;
    println!(
        "{written} samples: codes in {}, images in {}, grid {}",
        path.display(),
        images.display(),
        figure.display()
    );
    Ok(())
}

/// One labelled row per class (or one row of unconditional samples), at most 16 images a row,
/// decoded through the tokenizer.
fn class_grid(
    run: &vq_train::codes::LoadedRun,
    codes: &Tensor,
    labels: Option<&[i64]>,
    classes: &[String],
    path: &std::path::Path,
) -> Result<()> {
    let device = run.model.quantizer().codebook().device();
    let decode = |rows: &[i64]| -> Result<Tensor> {
        let idx = Tensor::from_slice(&rows[..rows.len().min(16)]);
        let grids = codes.index_select(0, &idx).to_device(device);
        Ok(tch::no_grad(|| run.model.decode_codes(&grids))?.to_device(Device::Cpu))
    };
    let mut rows: Vec<(String, Tensor)> = Vec::new();
    match labels {
        None => rows.push((
            "samples".into(),
            decode(&(0..codes.size()[0]).collect::<Vec<_>>())?,
        )),
        Some(labels) => {
            let mut seen: Vec<i64> = Vec::new();
            for &c in labels {
                if !seen.contains(&c) {
                    seen.push(c);
                }
            }
            for c in seen {
                let mine: Vec<i64> = (0..labels.len() as i64)
                    .filter(|&i| labels[i as usize] == c)
                    .collect();
                let name = classes
                    .get(c as usize)
                    .cloned()
                    .unwrap_or_else(|| c.to_string());
                rows.push((name, decode(&mine)?));
            }
        }
    }
    let shown: Vec<(&str, &Tensor)> = rows.iter().map(|(l, t)| (l.as_str(), t)).collect();
    let zoom = vq_train::plot::zoom_for(&rows[0].1);
    vq_train::plot::reconstruction_grid(
        path,
        "Samples of the prior, decoded by the tokenizer",
        &shown,
        zoom,
    )
}
