//! The training loop: AdamW + warm-up/cosine schedule + clipping + gradient accumulation, EMA or
//! learned codebooks, JSON-lines metrics, atomic checkpoints and exact resume.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use tch::nn::ModuleT;
use tch::{Device, Kind, Reduction, Tensor, nn};
use vq_data::Split;
use vq_models::{
    AdversarialWeighting, Discriminator, GanConfig, Lpips, TrainingConfig, VqAutoencoder,
    VqAutoencoderConfig, adaptive_weight, r1_penalty,
};
use vq_tch::Mode;

use crate::checkpoint::{self, TrainState};
use crate::data::{DataSource, ImageSet, Pipeline, TrainBatches, frames_as_images};
use crate::optim::{AdamW, learning_rate};

/// Everything that defines a run's numbers (saved in `run.json` and in every checkpoint; a
/// resume must match it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Preset the run started from (informational).
    pub preset: String,
    /// The model.
    pub model: VqAutoencoderConfig,
    /// Optimiser and schedule.
    pub training: TrainingConfig,
    /// Data source (`fashion-mnist-demo`, `fashion-mnist:<dir>`, `synthetic:<n>`).
    pub data: String,
    /// Seed of the weights, the data order and the codebook.
    pub seed: u64,
    /// Images per forward pass; `training.batch_size` must be a multiple (gradient accumulation).
    pub micro_batch: usize,
    /// VQGAN adversarial training (PatchGAN, hinge loss, adaptive weight); `None` for a VQ-VAE
    /// (reconstruction MSE + quantizer losses).
    #[serde(default)]
    pub gan: Option<GanConfig>,
    /// LPIPS weights (safetensors, see `vq_models::Lpips`): the perceptual term of VQGAN
    /// training and the LPIPS column of evaluations.
    #[serde(default)]
    pub lpips_weights: Option<PathBuf>,
    /// FID Inception weights (safetensors, see `vq_models::FidInception`): the r-FID and r-IS
    /// columns of evaluations.
    #[serde(default)]
    pub inception_weights: Option<PathBuf>,
}

impl RunConfig {
    /// What a checkpoint records and a resume must match: everything but the evaluation-only
    /// Inception weights.
    ///
    /// # Errors
    /// Serialisation errors.
    pub fn resume_key(&self) -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(self)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("inception_weights");
        }
        Ok(v)
    }

    /// Checks what the parts cannot check alone.
    ///
    /// # Errors
    /// A bad combination, named.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let t = &self.training;
        ensure!(
            t.batch_size > 0 && self.micro_batch > 0,
            "batch sizes must be > 0"
        );
        ensure!(
            t.batch_size.is_multiple_of(self.micro_batch),
            "batch size {} is not a multiple of the micro-batch {}",
            t.batch_size,
            self.micro_batch
        );
        ensure!(
            t.learning_rate.is_finite() && t.learning_rate > 0.0,
            "learning rate must be > 0, got {}",
            t.learning_rate
        );
        ensure!(t.steps > 0, "steps must be > 0");
        if let Some(g) = &self.gan {
            g.validate()?;
            ensure!(
                g.in_channels == self.model.autoencoder.out_channels(),
                "the discriminator takes {} channels but the decoder writes {}",
                g.in_channels,
                self.model.autoencoder.out_channels()
            );
        }
        DataSource::parse(&self.data)?;
        Ok(())
    }
}

/// How to run (not part of the numbers).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The run.
    pub config: RunConfig,
    /// Device to train on.
    pub device: Device,
    /// Run folder (metrics, checkpoints, plots).
    pub out: PathBuf,
    /// Steps between metric lines.
    pub log_every: usize,
    /// Steps between checkpoints (the last step always gets one).
    pub checkpoint_every: usize,
    /// Continue from the run folder's latest checkpoint.
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Stop (with a checkpoint) once this many steps are done, before the configured total; a
    /// later `resume` continues the same run.
    pub stop_after: Option<usize>,
}

/// Averages over one logging window.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepMetrics {
    /// Last step of the window (1-based count of steps done).
    pub step: usize,
    /// Learning rate at the last step.
    pub lr: f64,
    /// Total loss.
    pub loss: f64,
    /// Reconstruction loss: MSE (VQ-VAE) or L1 (VQGAN).
    pub rec: f64,
    /// Weighted commitment loss.
    pub commitment: f64,
    /// Quantization error, mean((e − q)²) per element.
    pub quantization_error: f64,
    /// Fraction of the codebook used per step's batch.
    pub usage: f64,
    /// Perplexity of the codes per step's batch.
    pub perplexity: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Optimiser steps per second in the window.
    pub steps_per_s: f64,
    /// VQGAN: discriminator hinge loss (0 before `disc_start`).
    #[serde(default)]
    pub d_loss: f64,
    /// VQGAN: generator adversarial loss −mean D(x̃) (0 before `disc_start`).
    #[serde(default)]
    pub g_loss: f64,
    /// VQGAN: adaptive weight of the adversarial term (0 before `disc_start`).
    #[serde(default)]
    pub d_weight: f64,
}

/// What [`train`] returns.
#[derive(Debug)]
pub struct Trained {
    /// The model (weights of the last step).
    pub model: VqAutoencoder,
    /// Its variables.
    pub vs: nn::VarStore,
    /// Metric windows of this invocation.
    pub history: Vec<StepMetrics>,
    /// Wall-clock seconds of this invocation's steps.
    pub seconds: f64,
}

/// Trains (or resumes) a run.
///
/// # Errors
/// Bad configuration, unreadable data, a run folder holding another run, a non-finite loss
/// (training stops; the last good checkpoint stays), I/O errors.
pub fn train(opts: &TrainOptions) -> Result<Trained> {
    let cfg = &opts.config;
    cfg.validate()?;
    fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let run_json = cfg.resume_key()?;
    let a = &cfg.model.autoencoder;
    let source = DataSource::parse(&cfg.data)?;
    let data = ImageSet::load(
        &source,
        Split::Train,
        a.in_channels(),
        a.resolution(),
        a.frames(),
        Pipeline::for_preset(&cfg.preset),
    )
    .with_context(|| format!("loading training data {}", source.describe()))?;

    tch::manual_seed(cfg.seed as i64);
    let mut vs = nn::VarStore::new(opts.device);
    let mut model = VqAutoencoder::new(&vs.root(), &cfg.model)?;
    let t = &cfg.training;
    let mut opt = AdamW::new(&vs, t.betas, t.weight_decay);
    let mut gan = match &cfg.gan {
        Some(g) => {
            let dvs = nn::VarStore::new(opts.device);
            let disc = Discriminator::new(&dvs.root(), g)?;
            let dopt = AdamW::new(&dvs, t.betas, t.weight_decay);
            if g.perceptual_weight > 0.0 && cfg.lpips_weights.is_none() {
                eprintln!(
                    "WARNING: no LPIPS weights given (--lpips FILE, see vq_models::Lpips), so this \
                     VQGAN trains WITHOUT its perceptual term (perceptual_weight {} ignored); \
                     reconstruction is L1 only.",
                    g.perceptual_weight
                );
            }
            Some((g.clone(), dvs, disc, dopt))
        }
        None => None,
    };
    let lpips = match (&cfg.gan, &cfg.lpips_weights) {
        (Some(g), Some(file)) if g.perceptual_weight > 0.0 => Some(Lpips::load(file, opts.device)?),
        _ => None,
    };
    let mut start = 0;
    match checkpoint::latest(&opts.out)? {
        Some((ckpt, state)) if opts.resume => {
            if state.run != run_json {
                bail!(
                    "{} was trained with another configuration; resume with the same settings or use another --out",
                    ckpt.display()
                );
            }
            match gan.as_mut() {
                Some((_, dvs, _, dopt)) => checkpoint::load(
                    &ckpt,
                    &mut [("model", &mut vs, &mut opt), ("discriminator", dvs, dopt)],
                )?,
                None => checkpoint::load(&ckpt, &mut [("model", &mut vs, &mut opt)])?,
            }
            start = state.step;
            truncate_metrics(&opts.out.join("metrics.jsonl"), start)?;
            eprintln!("resuming {} at step {start}", opts.out.display());
        }
        Some((ckpt, _)) => bail!(
            "{} already holds a run (checkpoint {}); pass --resume to continue it or choose another --out",
            opts.out.display(),
            ckpt.display()
        ),
        None if opts.resume => bail!("--resume: no checkpoint in {}", opts.out.display()),
        None => {}
    }
    write_atomic(&opts.out.join("run.json"), &serde_json::to_vec_pretty(cfg)?)?;

    let accum = t.batch_size / cfg.micro_batch;
    let mut batches = TrainBatches::new(&data, cfg.seed, cfg.micro_batch, start * accum)?;
    let k = cfg.model.quantizer.codebook_size;
    let mut metrics_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(opts.out.join("metrics.jsonl"))
        .context("opening metrics.jsonl")?;
    let bar = progress_bar(opts.progress, start, t.steps);
    let mut window = Window::default();
    let mut history = Vec::new();
    let began = Instant::now();
    let mut window_start = Instant::now();
    for step in start..t.steps {
        let lr = learning_rate(
            step,
            t.learning_rate,
            t.warmup_steps,
            t.decay_steps,
            t.final_lr_fraction,
        );
        opt.zero_grad();
        let mut codes: Vec<i64> = Vec::new();
        let mut sums = [0f64; 4];
        let mut adv = [0f64; 3];
        let adversarial = gan.as_ref().is_some_and(|(g, ..)| step >= g.disc_start);
        let mut pairs: Vec<(Tensor, Tensor)> = Vec::new();
        for a in 0..accum {
            let x = batches.get(&data, step * accum + a, opts.device)?;
            let out = match model.forward(&x, Mode::Train) {
                Ok(out) => out,
                Err(vq_models::ModelError::Quantizer(vq_tch::VqTchError::Core(
                    e @ vq_core::VqError::NonFinite { .. },
                ))) => bail!(
                    "non-finite encoder output at step {} ({e}); training stopped, last good checkpoint: {}",
                    step + 1,
                    last_checkpoint(&opts.out)?
                ),
                Err(e) => return Err(e.into()),
            };
            let qloss = &out.vq.commitment_loss + &out.vq.codebook_loss;
            let (rec, loss) = match &gan {
                None => {
                    let rec = out.reconstruction.mse_loss(&x, Reduction::Mean);
                    let loss = &rec + &qloss;
                    (rec, loss)
                }
                Some((g, _, disc, _)) => {
                    // taming: nll = mean|x − x̃| (+ LPIPS), loss = nll + λ·g_loss + w_cb·qloss
                    // (ViT-VQGAN: L2 instead of L1, a fixed λ).
                    let mut nll = g.pixel_loss(&x, &out.reconstruction);
                    if let Some(lp) = &lpips {
                        let p = lp
                            .forward(
                                &frames_as_images(&x),
                                &frames_as_images(&out.reconstruction),
                            )
                            .mean(Kind::Float);
                        nll += p * g.perceptual_weight;
                    }
                    let mut loss = &nll + &qloss * g.codebook_weight;
                    if adversarial {
                        let g_loss =
                            g.g_loss(&disc.forward_t(&frames_as_images(&out.reconstruction), true));
                        let w = match g.adversarial_weighting {
                            AdversarialWeighting::Adaptive => adaptive_weight(
                                &nll,
                                &g_loss,
                                model.last_layer_weight(),
                                g.disc_weight,
                            )?,
                            AdversarialWeighting::Fixed => g.disc_weight,
                        };
                        adv[1] += f64::try_from(&g_loss).unwrap_or(f64::NAN) / accum as f64;
                        adv[2] += w / accum as f64;
                        loss += g_loss * w;
                    }
                    pairs.push((
                        frames_as_images(&x),
                        frames_as_images(&out.reconstruction.detach()),
                    ));
                    (nll, loss)
                }
            };
            (&loss / accum as f64).backward();
            let parts = Tensor::stack(
                &[
                    loss.detach(),
                    rec.detach(),
                    out.vq.commitment_loss.detach(),
                    out.vq.quantization_error.shallow_clone(),
                ],
                0,
            )
            .to_kind(Kind::Double)
            .to_device(Device::Cpu);
            let parts = Vec::<f64>::try_from(parts).context("reading losses")?;
            for (s, v) in sums.iter_mut().zip(parts) {
                *s += v / accum as f64;
            }
            codes.extend(Vec::<i64>::try_from(
                out.vq.indices.reshape([-1]).to_device(Device::Cpu),
            )?);
        }
        if !sums[0].is_finite() {
            bail!(
                "non-finite loss {} at step {} (rec {}, commitment {}); training stopped, last good checkpoint: {}",
                sums[0],
                step + 1,
                sums[1],
                sums[2],
                last_checkpoint(&opts.out)?
            );
        }
        let grad_norm = opt.clip_grad_norm(t.grad_clip);
        opt.step(lr);
        if let (true, Some((g, _, disc, dopt))) = (adversarial, gan.as_mut()) {
            // Discriminator step on the same images and the generator's (detached) outputs.
            dopt.zero_grad();
            // The lazy R1 penalty on real images every `every` steps.
            let r1 = g.r1.filter(|r| step % r.every == 0);
            for (x, rec) in &pairs {
                let x = match r1 {
                    Some(_) => x.detach().set_requires_grad(true),
                    None => x.shallow_clone(),
                };
                let real = disc.forward_t(&x, true);
                let mut d_loss = g.d_loss(&real, &disc.forward_t(rec, true));
                adv[0] += f64::try_from(&d_loss).unwrap_or(f64::NAN) / accum as f64;
                if let Some(r) = r1 {
                    d_loss += r1_penalty(&real, &x)? * (r.gamma * r.every as f64 / 2.0);
                }
                (d_loss / accum as f64).backward();
            }
            dopt.step(lr * g.disc_lr_multiplier);
        }
        let idx: Vec<u32> = codes.iter().map(|&i| i as u32).collect();
        let counts = vq_core::code_counts(&idx, k)?;
        let used = counts.iter().filter(|&&c| c > 0).count() as f64 / k as f64;
        window.add(&sums, &adv, used, vq_core::perplexity(&counts), grad_norm);
        let done = step + 1;
        bar.set_position(done as u64);
        if done % opts.log_every.max(1) == 0 || done == t.steps || opts.stop_after == Some(done) {
            let secs = window_start.elapsed().as_secs_f64();
            let m = window.finish(done, lr, secs);
            bar.set_message(format!(
                "loss {:.4} rec {:.4} usage {:.1}% qe {:.2e} {:.1} it/s",
                m.loss,
                m.rec,
                100.0 * m.usage,
                m.quantization_error,
                m.steps_per_s
            ));
            writeln!(metrics_file, "{}", serde_json::to_string(&m)?)
                .context("writing metrics.jsonl")?;
            history.push(m);
            window = Window::default();
            window_start = Instant::now();
        }
        let stop = opts.stop_after == Some(done);
        if done % opts.checkpoint_every.max(1) == 0 || done == t.steps || stop {
            let state = TrainState {
                step: done,
                run: run_json.clone(),
            };
            let mut parts = vec![checkpoint::Part {
                name: "model",
                vs: &vs,
                opt: &opt,
            }];
            if let Some((_, dvs, _, dopt)) = &gan {
                parts.push(checkpoint::Part {
                    name: "discriminator",
                    vs: dvs,
                    opt: dopt,
                });
            }
            checkpoint::save(&opts.out, &parts, &state)?;
        }
        if stop {
            break;
        }
    }
    bar.finish_and_clear();
    Ok(Trained {
        model,
        vs,
        history,
        seconds: began.elapsed().as_secs_f64(),
    })
}

/// Drops metric lines after `step` (logged after the checkpoint a resume starts from), so that
/// every step appears once.
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<StepMetrics>(l).is_ok_and(|m| m.step <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    if kept.len() != text.len() {
        write_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}

fn last_checkpoint(out: &Path) -> Result<String> {
    Ok(checkpoint::latest(out)?
        .map(|(p, s)| format!("{} (step {})", p.display(), s.step))
        .unwrap_or_else(|| "none yet".into()))
}

#[derive(Debug, Default)]
struct Window {
    n: usize,
    sums: [f64; 4],
    adv: [f64; 3],
    usage: f64,
    perplexity: f64,
    grad_norm: f64,
}

impl Window {
    fn add(
        &mut self,
        sums: &[f64; 4],
        adv: &[f64; 3],
        usage: f64,
        perplexity: f64,
        grad_norm: f64,
    ) {
        self.n += 1;
        for (a, b) in self.sums.iter_mut().zip(sums) {
            *a += b;
        }
        for (a, b) in self.adv.iter_mut().zip(adv) {
            *a += b;
        }
        self.usage += usage;
        self.perplexity += perplexity;
        self.grad_norm += grad_norm;
    }

    fn finish(&self, step: usize, lr: f64, secs: f64) -> StepMetrics {
        let n = self.n.max(1) as f64;
        StepMetrics {
            step,
            lr,
            loss: self.sums[0] / n,
            rec: self.sums[1] / n,
            commitment: self.sums[2] / n,
            quantization_error: self.sums[3] / n,
            usage: self.usage / n,
            perplexity: self.perplexity / n,
            grad_norm: self.grad_norm / n,
            steps_per_s: n / secs.max(1e-9),
            d_loss: self.adv[0] / n,
            g_loss: self.adv[1] / n,
            d_weight: self.adv[2] / n,
        }
    }
}

fn progress_bar(show: bool, start: usize, steps: usize) -> indicatif::ProgressBar {
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

/// Writes `bytes` to `path` through a temporary file and a rename.
///
/// # Errors
/// I/O errors, naming the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} into place", tmp.display()))
}
