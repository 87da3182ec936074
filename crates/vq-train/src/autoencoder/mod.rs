//! The autoencoder model kind of the run loop: VQ-VAE, VQGAN with its discriminator (taming's
//! PatchGAN or StyleGAN2's), ViT-VQGAN and the video tokenizers, and the paper's decoder-based
//! baselines. [`Autoencoder`] builds the networks and data of a [`TrainOptions`] and implements
//! [`Task`]: its steps (in `steps`) report their numbers under the names of
//! [`crate::metrics::names`], and a logging window becomes a [`StepMetrics`].

mod steps;

use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use tch::nn;
use vq_data::Split;
use vq_dist::ProcessGroup;
use vq_models::{Discriminator, GanConfig, Lpips, VqAutoencoder};

use crate::checkpoint::Part;
use crate::config::{RunConfig, TrainOptions};
use crate::data::{BadSample, DataSource, ImageSet, TrainBatches};
use crate::dist::Dist;
use crate::metrics::{StepMetrics, names};
use crate::optim::AdamW;
use crate::readback::Readback;
use crate::run::{
    LoopOptions, Start, StepContext, StepOutput, StepValues, Stop, Task, WindowMeans,
};

/// The adversarial half of a VQGAN run.
#[derive(Debug)]
struct GanPart {
    config: GanConfig,
    vs: nn::VarStore,
    disc: Discriminator,
    opt: AdamW,
}

/// One autoencoder run's networks, optimisers and data.
#[derive(Debug)]
pub struct Autoencoder<'a> {
    opts: &'a TrainOptions,
    data: ImageSet,
    /// Set by [`Task::prepare`], once the start step is known.
    batches: Option<TrainBatches>,
    vs: nn::VarStore,
    model: VqAutoencoder,
    opt: AdamW,
    gan: Option<GanPart>,
    lpips: Option<Lpips>,
    /// Micro-batches per optimiser step on this rank.
    accum: usize,
}

impl<'a> Autoencoder<'a> {
    /// Validates the run (the same on every rank of `dist`), loads the data and builds the
    /// networks from the run's seed.
    ///
    /// # Errors
    /// Bad configuration (also: different on different ranks), unreadable or empty data.
    pub fn new(opts: &'a TrainOptions, dist: &Dist) -> Result<Self> {
        let accum = check_run(opts, dist)?;
        let data = load_data(opts, dist)?;
        let cfg = &opts.config;
        tch::manual_seed(cfg.seed as i64);
        let vs = nn::VarStore::new(opts.device);
        let model = VqAutoencoder::new(&vs.root(), &cfg.model)?;
        let opt = optimiser(cfg, &vs);
        let gan = match &cfg.gan {
            Some(g) => Some(gan_part(opts, g, dist)?),
            None => None,
        };
        let lpips = match (&cfg.gan, &cfg.lpips_weights) {
            (Some(g), Some(file)) if g.perceptual_weight > 0.0 => {
                Some(Lpips::load(file, opts.device)?)
            }
            _ => None,
        };
        Ok(Self {
            opts,
            data,
            batches: None,
            vs,
            model,
            opt,
            gan,
            lpips,
            accum,
        })
    }

    /// How the run loop runs this run.
    ///
    /// # Errors
    /// Serialisation errors.
    pub fn loop_options(&self) -> Result<LoopOptions> {
        let (o, cfg) = (self.opts, &self.opts.config);
        Ok(LoopOptions {
            out: o.out.clone(),
            device: o.device,
            steps: cfg.training.steps,
            log_every: o.log_every,
            checkpoint_every: o.checkpoint_every,
            resume: o.resume,
            progress: o.progress,
            stop_after: o.stop_after,
            readback: o.readback,
            profile: o.profile,
            loss_scaling: cfg.precision.needs_loss_scaling(),
            samples_per_step: self.accum * cfg.micro_batch,
            key: cfg.resume_key()?,
            upgrade: RunConfig::upgrade_record,
            config_json: serde_json::to_string_pretty(cfg)?,
        })
    }

    /// The model and its variables (after training: the last step's weights).
    #[must_use]
    pub fn into_model(self) -> (VqAutoencoder, nn::VarStore) {
        (self.model, self.vs)
    }
}

/// The model of the run folder `run` (trained under `config`) with the weights of its latest
/// checkpoint (or of a bare `model.safetensors` in it), on `device`.
///
/// # Errors
/// No weights, or weights that do not fit the configuration.
pub fn load_model(
    run: &std::path::Path,
    config: &RunConfig,
    device: tch::Device,
) -> Result<(VqAutoencoder, nn::VarStore)> {
    let mut vs = nn::VarStore::new(device);
    let model = VqAutoencoder::new(&vs.root(), &config.model)?;
    crate::checkpoint::load_model(run, &mut vs)?;
    Ok((model, vs))
}

/// Checks the run as every rank sees it; returns the micro-batches per step on one rank.
fn check_run(opts: &TrainOptions, dist: &Dist) -> Result<usize> {
    let cfg = &opts.config;
    cfg.validate()?;
    dist.check_same(
        "the run configuration (preset, model, training, data, seed)",
        serde_json::to_string(&cfg.resume_key()?)?.as_bytes(),
    )?;
    let t = &cfg.training;
    cfg.precision.check_available(opts.device)?;
    let per_step = dist.world() * cfg.micro_batch;
    ensure!(
        t.batch_size.is_multiple_of(per_step),
        "batch size {} is not a multiple of world size {} × micro-batch {} = {per_step}",
        t.batch_size,
        dist.world(),
        cfg.micro_batch
    );
    ensure!(
        dist.world() == 1 || cfg.model.quantizer.family.is_nearest(),
        "the Gumbel quantizer runs in one process (its noise is drawn per process, so {} \
         ranks would not compute what one process computes)",
        dist.world()
    );
    Ok(t.batch_size / per_step)
}

/// The training split; rank 0 also checks the held-out split now when the run ends with its
/// evaluation, so a missing or empty one is found before training, not after.
fn load_data(opts: &TrainOptions, dist: &Dist) -> Result<ImageSet> {
    let cfg = &opts.config;
    let source = DataSource::parse(&cfg.data)?;
    let load = |split| cfg.load_split(&source, split);
    let data = load(Split::Train)
        .with_context(|| format!("loading training data {}", source.describe()))?;
    ensure!(
        !data.is_empty(),
        "the training split of {} holds no images",
        source.describe()
    );
    if dist.is_main() {
        data.report_left_out(Split::Train);
    }
    if dist.is_main() && opts.stop_after.is_none_or(|s| s >= cfg.training.steps) {
        let held_out = load(Split::Test).with_context(|| {
            format!(
                "loading the held-out split of {} (evaluated after training)",
                source.describe()
            )
        })?;
        ensure!(
            !held_out.is_empty(),
            "the held-out split of {} holds no images (it is evaluated after training)",
            source.describe()
        );
        held_out.report_left_out(Split::Test);
    }
    Ok(data)
}

/// Makes `opts.out` a run from a pretrained checkpoint (`opts.config.init_from`) without
/// training: `run.json` and a step-0 checkpoint holding the file's weights (the model's, and the
/// discriminator's when the run has one) with fresh optimiser state, so that `encode`, `eval`,
/// `decode` and `train --resume` (fine-tuning) take it as any run. Returns the checkpoint.
///
/// # Errors
/// No `init_from`; a folder that already holds a run; a file that does not fit the model
/// ([`crate::pretrained::load`] names the tensors).
pub fn import(opts: &TrainOptions) -> Result<std::path::PathBuf> {
    let cfg = &opts.config;
    let file = cfg
        .init_from
        .as_ref()
        .context("import needs the pretrained checkpoint: --init-from FILE")?;
    if let Some((ckpt, _)) = crate::checkpoint::latest(&opts.out)? {
        anyhow::bail!(
            "{} already holds a run (checkpoint {}); choose another --out",
            opts.out.display(),
            ckpt.display()
        );
    }
    let vs = nn::VarStore::new(opts.device);
    let _model = VqAutoencoder::new(&vs.root(), &cfg.model)?;
    let dvs = nn::VarStore::new(opts.device);
    let _disc = match &cfg.gan {
        Some(g) => Some(Discriminator::new(&dvs.root(), g)?),
        None => None,
    };
    let (mut vs, mut dvs) = (vs, dvs);
    let disc = cfg.gan.is_some().then_some(&mut dvs);
    let loaded = crate::pretrained::load(file, &mut vs, disc)?;
    eprintln!("{}", loaded.describe(file));
    let (opt, dopt) = (optimiser(cfg, &vs), optimiser(cfg, &dvs));
    let mut parts = vec![Part {
        name: "model",
        vs: &vs,
        opt: &opt,
    }];
    if cfg.gan.is_some() {
        parts.push(Part {
            name: "discriminator",
            vs: &dvs,
            opt: &dopt,
        });
    }
    let dir = crate::layout::RunDir::new(&opts.out);
    std::fs::create_dir_all(dir.path())
        .with_context(|| format!("creating {}", dir.path().display()))?;
    crate::checkpoint::write_atomic(&dir.run(), serde_json::to_string_pretty(cfg)?.as_bytes())?;
    let state = crate::checkpoint::TrainState {
        step: 0,
        run: cfg.resume_key()?,
        train_seconds: 0.0,
    };
    crate::checkpoint::save(&opts.out, &parts, &state)
}

/// AdamW over `vs` with the run's betas and weight decay (and a loss scale under f16).
fn optimiser(cfg: &RunConfig, vs: &nn::VarStore) -> AdamW {
    let t = &cfg.training;
    let opt = AdamW::new(vs, t.betas, t.weight_decay);
    match cfg.precision.needs_loss_scaling() {
        true => opt.with_loss_scaling(),
        false => opt,
    }
}

/// The discriminator and its optimiser; warns (rank 0) when the perceptual term is off for want
/// of LPIPS weights.
fn gan_part(opts: &TrainOptions, g: &GanConfig, dist: &Dist) -> Result<GanPart> {
    let cfg = &opts.config;
    let vs = nn::VarStore::new(opts.device);
    let disc = Discriminator::new(&vs.root(), g)?;
    let opt = optimiser(cfg, &vs);
    if g.perceptual_weight > 0.0 && cfg.lpips_weights.is_none() && dist.is_main() {
        let pixel = g.pixel_loss_name();
        eprintln!(
            "WARNING: no LPIPS weights (`cargo xtask download-weights lpips`, or --lpips FILE), so this \
             VQGAN trains WITHOUT its perceptual term (perceptual_weight {} ignored); \
             reconstruction is {pixel} only.",
            g.perceptual_weight
        );
    }
    Ok(GanPart {
        config: g.clone(),
        vs,
        disc,
        opt,
    })
}

impl Task for Autoencoder<'_> {
    type Record = StepMetrics;

    fn parts(&self) -> Vec<Part<'_>> {
        let mut parts = vec![Part {
            name: "model",
            vs: &self.vs,
            opt: &self.opt,
        }];
        if let Some(g) = &self.gan {
            parts.push(Part {
                name: "discriminator",
                vs: &g.vs,
                opt: &g.opt,
            });
        }
        parts
    }

    fn parts_mut(&mut self) -> Vec<(&'static str, &mut nn::VarStore, &mut AdamW)> {
        let mut parts = vec![("model", &mut self.vs, &mut self.opt)];
        if let Some(g) = &mut self.gan {
            parts.push(("discriminator", &mut g.vs, &mut g.opt));
        }
        parts
    }

    fn init_fresh(&mut self) -> Result<()> {
        if let Some(file) = &self.opts.config.init_from {
            let disc = self.gan.as_mut().map(|g| &mut g.vs);
            let loaded = crate::pretrained::load(file, &mut self.vs, disc)?;
            eprintln!("{}", loaded.describe(file));
        }
        Ok(())
    }

    fn prepare(&mut self, start: &Start) -> Result<()> {
        let cfg = &self.opts.config;
        self.batches = Some(TrainBatches::sharded(
            &self.data,
            cfg.seed,
            cfg.micro_batch,
            start.step * self.accum,
            start.shard,
        )?);
        join(&mut self.model, self.gan.as_mut(), start.group.clone());
        if start.readback == Readback::Window {
            self.model.set_finite_check(vq_tch::FiniteCheck::Deferred);
        }
        Ok(())
    }

    fn step(&mut self, cx: &mut StepContext<'_>, step: usize) -> Result<StepOutput> {
        self.train_step(cx, step)
    }

    fn observe(&self, step: usize, v: &StepValues) -> Result<Vec<(&'static str, f64)>, Stop> {
        check_finite(step, v, self.opts.config.precision.needs_loss_scaling())?;
        let k = v.counts.len().max(1);
        let used = v.counts.iter().filter(|&&c| c > 0).count() as f64 / k as f64;
        let groups = self.opts.config.model.quantizer.family.code_groups();
        let perplexity = vq_core::family::mean_group_perplexity(&v.counts, groups);
        let named = |n: &'static str| (n, v.get(n));
        Ok(vec![
            named(names::LOSS),
            named(names::REC),
            named(names::COMMITMENT),
            named(names::QE),
            (names::USAGE, used),
            (names::PERPLEXITY, perplexity),
            named(names::GRAD_NORM),
            named(names::D_LOSS),
            named(names::G_LOSS),
            named(names::D_WEIGHT),
        ])
    }

    fn record(&self, w: &WindowMeans) -> StepMetrics {
        StepMetrics {
            step: w.step,
            lr: w.lr,
            loss: w.get(names::LOSS),
            rec: w.get(names::REC),
            commitment: w.get(names::COMMITMENT),
            quantization_error: w.get(names::QE),
            usage: w.get(names::USAGE),
            perplexity: w.get(names::PERPLEXITY),
            grad_norm: w.get(names::GRAD_NORM),
            steps_per_s: w.steps_per_s,
            d_loss: w.get(names::D_LOSS),
            g_loss: w.get(names::G_LOSS),
            d_weight: w.get(names::D_WEIGHT),
            skipped_steps: w.skipped_steps,
            skipped_samples: w.skipped_samples,
            loss_scale: w.loss_scale,
        }
    }

    fn scalars(&self, m: &StepMetrics) -> Vec<(&'static str, f64)> {
        let cfg = &self.opts.config;
        m.tensorboard_scalars(cfg.gan.is_some(), cfg.precision == vq_tch::Precision::F16)
    }

    fn progress(&self, m: &StepMetrics) -> String {
        format!(
            "loss {:.4} rec {:.4} usage {:.1}% qe {:.2e} {:.1} it/s",
            m.loss,
            m.rec,
            100.0 * m.usage,
            m.quantization_error,
            m.steps_per_s
        )
    }

    fn failure(&self, index: usize) -> BadSample {
        self.data.failure(index)
    }

    fn sample_name(&self, index: usize) -> String {
        self.data.sample_name(index)
    }

    fn finish(&mut self) {
        // Evaluation after training runs in this process alone, and reads no verdicts: its
        // searches check their inputs eagerly again.
        self.model.set_process_group(None);
        self.model.set_finite_check(vq_tch::FiniteCheck::Eager);
    }
}

/// The networks join the process group (`None`: leave it).
fn join(model: &mut VqAutoencoder, gan: Option<&mut GanPart>, group: Option<Arc<ProcessGroup>>) {
    if let Some(g) = gan {
        g.disc.set_process_group(group.clone());
    }
    model.set_process_group(group);
}

/// The stop of a non-finite encoder output at (0-based) `step`, found eagerly by the search or
/// later in a deferred verdict: one message for both.
fn non_finite_encoder_output(step: usize, e: &dyn std::fmt::Display) -> String {
    format!(
        "non-finite encoder output at step {} ({e}); training stopped",
        step + 1
    )
}

/// The stops of a read-back step: a failed deferred check of the encoder output; without loss
/// scaling (under f16 a non-finite number is an overflow, and the step was skipped) a
/// non-finite loss, gradient, or discriminator loss or gradient.
fn check_finite(step: usize, v: &StepValues, scaled: bool) -> Result<(), Stop> {
    for verdict in &v.verdicts {
        if let Err(e) = vq_tch::FiniteVerdict::check(verdict) {
            return Err(Stop(non_finite_encoder_output(step, &e)));
        }
    }
    if scaled {
        return Ok(());
    }
    let (loss, grad_norm) = (v.get(names::LOSS), v.get(names::GRAD_NORM));
    if !loss.is_finite() {
        return Err(Stop(format!(
            "non-finite loss {loss} at step {} (rec {}, commitment {}); training stopped",
            step + 1,
            v.get(names::REC),
            v.get(names::COMMITMENT),
        )));
    }
    // A finite loss can still have non-finite gradients (an overflow inside the backward):
    // that stops the run; the update was not applied.
    if !grad_norm.is_finite() {
        return Err(Stop(format!(
            "non-finite gradient (norm {grad_norm}) at step {} under a finite loss {loss}; \
             training stopped before the update",
            step + 1,
        )));
    }
    let (d_loss, d_norm) = (v.get(names::D_LOSS), v.get(names::D_GRAD_NORM));
    if !(d_loss.is_finite() && d_norm.is_finite()) {
        return Err(Stop(format!(
            "non-finite discriminator loss {d_loss} (gradient norm {d_norm}) at step {}; training \
             stopped before its update",
            step + 1,
        )));
    }
    Ok(())
}
