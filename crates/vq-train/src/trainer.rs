//! The training loop as a type: [`Trainer`] owns the model, its optimiser, the discriminator
//! and its optimiser, the data stream, the process group, a [`Logger`] and a [`Checkpointer`];
//! one method per step kind (VQ-VAE micro-step, VQGAN generator micro-step, discriminator step).

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use tch::{Device, Kind, Reduction, Tensor, nn};
use vq_data::Split;
use vq_models::{
    AdversarialWeighting, Discriminator, GanConfig, Lpips, VqAutoencoder,
    adaptive_weight_tensor_in, r1_penalty,
};
use vq_tch::Mode;

use crate::checkpoint::{self, TrainState};
use crate::data::{BadSample, DataSource, ImageSet, Shard, TrainBatches, frames_as_images};
use crate::dist::{Dist, counts_from_f64, counts_to_f64};
use crate::method::{EXACT_GRADIENTS_SCALE, EncoderGradient, exact_gradient, hessian_approx};
use crate::optim::{AdamW, LossScale, learning_rate};
use crate::profile::{ProfileSteps, TraceSummary};
use crate::readback::{Readback, StepRow, StepValues};
use crate::train::{
    StepMetrics, TrainOptions, Trained, last_checkpoint, may_resume, truncate_metrics, write_atomic,
};

/// The adversarial half of a VQGAN run.
#[derive(Debug)]
struct GanPart {
    config: GanConfig,
    vs: nn::VarStore,
    disc: Discriminator,
    opt: AdamW,
}

/// What one micro-batch contributes to a step's metrics, still on the device.
#[derive(Debug)]
struct MicroStats {
    /// f64 (4): loss, rec, commitment, quantization error.
    parts: Tensor,
    /// g_loss, d_weight (VQGAN after `disc_start`; zeros otherwise), f64 scalars.
    g_loss: Tensor,
    d_weight: Tensor,
    /// Code indices of the micro-batch (flat, i64).
    codes: Tensor,
    /// The quantizer's deferred finite check.
    verdict: Option<Tensor>,
}

/// A step whose numbers are still on the device.
#[derive(Debug)]
struct PendingStep {
    step: usize,
    lr: f64,
    row: StepRow,
    bad: Vec<BadSample>,
    /// f16: whether the update was skipped (decided on the host), and the scale after it.
    skipped: bool,
    loss_scale: f64,
    /// Whether this step closes the run (its last step or `--stop-after`).
    last: bool,
}

/// A step's metrics summed over micro-batches (and ranks).
#[derive(Debug)]
struct StepStats {
    sums: [f64; 4],
    adv: [f64; 3],
    counts: Vec<u64>,
    /// The update was skipped (f16: the gradients overflowed).
    skipped: bool,
    /// The model's loss scale after the step (1 without loss scaling).
    loss_scale: f64,
    /// Samples of the step that failed to decode and were replaced (summed over ranks).
    bad_samples: u64,
}

impl StepStats {
    /// The step's numbers over the whole group, in one collective: metrics averaged over ranks,
    /// code counts and failed samples summed (so usage and perplexity are the global batch's).
    fn over_ranks(mut self, dist: &Dist) -> Result<Self> {
        if dist.world() == 1 {
            return Ok(self);
        }
        let mut all: Vec<f64> = self.sums.iter().chain(&self.adv).copied().collect();
        all.push(self.bad_samples as f64);
        all.extend(counts_to_f64(&self.counts));
        dist.sum(&mut all)?;
        let w = dist.world() as f64;
        for (s, v) in self.sums.iter_mut().chain(self.adv.iter_mut()).zip(&all) {
            *s = v / w;
        }
        self.bad_samples = all[7] as u64;
        self.counts = counts_from_f64(&all[8..]);
        Ok(self)
    }
}

/// Runs one training job (one process of it when data-parallel).
#[derive(Debug)]
pub struct Trainer<'a> {
    opts: &'a TrainOptions,
    dist: Dist,
    data: ImageSet,
    batches: TrainBatches,
    vs: nn::VarStore,
    model: VqAutoencoder,
    opt: AdamW,
    gan: Option<GanPart>,
    lpips: Option<Lpips>,
    /// Micro-batches per optimiser step on this rank.
    accum: usize,
    start: usize,
    checkpointer: Checkpointer,
    logger: Logger,
    /// [`Readback::Step`] or [`Readback::Window`].
    readback: Readback,
    /// Steps not read back yet (at most one with [`Readback::Step`]).
    pending: Vec<PendingStep>,
    /// f32 0/1 on the device: a non-finite loss, gradient or encoder output was met; every
    /// later update is then skipped until the run stops at the next read.
    halt: Tensor,
}

impl<'a> Trainer<'a> {
    /// Validates, loads the data, builds the networks, resumes (rank 0 reads the run folder, the
    /// others receive its state) and synchronises the ranks.
    ///
    /// # Errors
    /// Bad configuration (also: different on different ranks), unreadable data, a run folder
    /// holding another run, a lost rank.
    pub fn new(opts: &'a TrainOptions, dist: Dist) -> Result<Self> {
        let cfg = &opts.config;
        cfg.validate()?;
        let run_json = cfg.resume_key()?;
        dist.check_same(
            "the run configuration (preset, model, training, data, seed)",
            serde_json::to_string(&run_json)?.as_bytes(),
        )?;
        // The options that decide when the ranks communicate.
        dist.check_same(
            "--stop-after / --checkpoint-every",
            format!("{:?} {}", opts.stop_after, opts.checkpoint_every).as_bytes(),
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
        let accum = t.batch_size / per_step;
        ensure!(
            dist.world() == 1 || cfg.model.quantizer.family.is_nearest(),
            "the Gumbel quantizer runs in one process (its noise is drawn per process, so {} \
             ranks would not compute what one process computes)",
            dist.world()
        );
        if dist.is_main() {
            fs::create_dir_all(&opts.out)
                .with_context(|| format!("creating {}", opts.out.display()))?;
        }
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
        if dist.is_main() && opts.stop_after.is_none_or(|s| s >= t.steps) {
            // The held-out split is evaluated after the last step: find a missing or empty one
            // now, not after training.
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

        tch::manual_seed(cfg.seed as i64);
        let mut vs = nn::VarStore::new(opts.device);
        let mut model = VqAutoencoder::new(&vs.root(), &cfg.model)?;
        let optimiser = |vs: &nn::VarStore| {
            let opt = AdamW::new(vs, t.betas, t.weight_decay);
            match cfg.precision.needs_loss_scaling() {
                true => opt.with_loss_scaling(),
                false => opt,
            }
        };
        let mut opt = optimiser(&vs);
        let mut gan = match &cfg.gan {
            Some(g) => {
                let dvs = nn::VarStore::new(opts.device);
                let disc = Discriminator::new(&dvs.root(), g)?;
                let dopt = optimiser(&dvs);
                if g.perceptual_weight > 0.0 && cfg.lpips_weights.is_none() && dist.is_main() {
                    let pixel = g.pixel_loss_name();
                    eprintln!(
                        "WARNING: no LPIPS weights (`cargo xtask download-weights lpips`, or --lpips FILE), so this \
                         VQGAN trains WITHOUT its perceptual term (perceptual_weight {} ignored); \
                         reconstruction is {pixel} only.",
                        g.perceptual_weight
                    );
                }
                Some(GanPart {
                    config: g.clone(),
                    vs: dvs,
                    disc,
                    opt: dopt,
                })
            }
            None => None,
        };
        let lpips = match (&cfg.gan, &cfg.lpips_weights) {
            (Some(g), Some(file)) if g.perceptual_weight > 0.0 => {
                Some(Lpips::load(file, opts.device)?)
            }
            _ => None,
        };
        let mut checkpointer = Checkpointer {
            out: opts.out.clone(),
            run: run_json,
            main: dist.is_main(),
            prior_seconds: 0.0,
        };
        let start = if dist.is_main() {
            checkpointer.resume(opts.resume, &mut vs, &mut opt, gan.as_mut())?
        } else {
            0
        };
        if let (0, true, Some(file)) = (start, dist.is_main(), &cfg.init_from) {
            let loaded = crate::pretrained::load(file, &mut vs, gan.as_mut().map(|g| &mut g.vs))?;
            eprintln!("{}", loaded.describe(file));
        }
        let start = usize::try_from(dist.broadcast_i64(start as i64)?)?;
        dist.broadcast_state("model", &vs, &mut opt)?;
        if let Some(g) = gan.as_mut() {
            dist.broadcast_state("discriminator", &g.vs, &mut g.opt)?;
            g.disc.set_process_group(dist.group().cloned());
        }
        model.set_process_group(dist.group().cloned());
        if dist.is_main() {
            if start > 0 {
                truncate_metrics(&opts.out.join("metrics.jsonl"), start)?;
                eprintln!(
                    "resuming {} at step {start}{}",
                    opts.out.display(),
                    if dist.world() > 1 {
                        format!(" on {} ranks", dist.world())
                    } else {
                        String::new()
                    }
                );
            }
            write_atomic(&opts.out.join("run.json"), &serde_json::to_vec_pretty(cfg)?)?;
        }
        let shard = Shard {
            rank: dist.rank(),
            world: dist.world(),
        };
        let batches =
            TrainBatches::sharded(&data, cfg.seed, cfg.micro_batch, start * accum, shard)?;
        let logger = Logger::new(opts, dist.is_main(), start)?;
        let readback = opts.readback.resolve(
            opts.device,
            dist.world(),
            cfg.precision.needs_loss_scaling(),
        )?;
        if readback == Readback::Window {
            model.set_finite_check(vq_tch::FiniteCheck::Deferred);
        }
        if let Some(p) = opts.profile {
            let end = opts.stop_after.unwrap_or(t.steps).min(t.steps);
            ensure!(
                p.first > start && p.last <= end,
                "--profile-steps {}..{} lies outside the steps this invocation trains ({}..{end})",
                p.first,
                p.last,
                start + 1
            );
        }
        let halt = Tensor::zeros([], (Kind::Float, opts.device));
        Ok(Self {
            opts,
            dist,
            data,
            batches,
            vs,
            model,
            opt,
            gan,
            lpips,
            accum,
            start,
            checkpointer,
            logger,
            readback,
            pending: Vec::new(),
            halt,
        })
    }

    /// Trains from the start (or resumed) step to the end or to `stop_after`.
    ///
    /// # Errors
    /// A non-finite loss (training stops; the last good checkpoint stays), unreadable data, I/O
    /// errors, a lost rank.
    pub fn run(mut self) -> Result<Trained> {
        let began = Instant::now();
        let steps = self.opts.config.training.steps;
        for step in self.start..steps {
            let done = step + 1;
            let stop = self.opts.stop_after == Some(done);
            let save =
                done.is_multiple_of(self.opts.checkpoint_every.max(1)) || done == steps || stop;
            let profile = self
                .opts
                .profile
                .filter(|p| (p.first..=p.last).contains(&done));
            if profile.is_some_and(|p| p.first == done) {
                crate::ops::profile_start(self.opts.device.is_cuda())?;
            }
            self.step(step, done == steps || stop)?;
            if self.readback == Readback::Step
                || done.is_multiple_of(self.opts.log_every.max(1))
                || save
            {
                self.read_back()?;
            }
            if let Some(p) = profile.filter(|p| p.last == done) {
                self.finish_profile(p)?;
            }
            if save {
                self.dist.check_in_sync("model", &self.vs, done)?;
                if let Some(g) = &self.gan {
                    self.dist.check_in_sync("discriminator", &g.vs, done)?;
                }
                let seconds = began.elapsed().as_secs_f64();
                self.checkpointer
                    .save(done, seconds, &self.vs, &self.opt, self.gan.as_ref())?;
            }
            if stop {
                break;
            }
        }
        self.logger.bar.finish_and_clear();
        self.dist.finish()?;
        // Evaluation after training runs in this process alone.
        self.model.set_process_group(None);
        // Evaluation reads no verdicts: its searches check their inputs eagerly again.
        self.model.set_finite_check(vq_tch::FiniteCheck::Eager);
        Ok(Trained {
            model: self.model,
            vs: self.vs,
            history: self.logger.history,
            seconds: began.elapsed().as_secs_f64(),
        })
    }

    /// Waits for the device, stops the profiler and writes its trace and a summary into
    /// `<out>/profile/` (one trace per rank).
    fn finish_profile(&self, p: ProfileSteps) -> Result<()> {
        if let Device::Cuda(i) = self.opts.device {
            tch::Cuda::synchronize(i as i64);
        }
        let dir = self.opts.out.join("profile");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let stem = match self.dist.world() {
            1 => "trace".to_owned(),
            _ => format!("trace-rank{}", self.dist.rank()),
        };
        let trace = dir.join(format!("{stem}.json"));
        crate::ops::profile_stop(&trace)?;
        let summary = TraceSummary::read(&trace)?.markdown(p.count(), 30);
        let md = dir.join(format!("{stem}.md"));
        fs::write(&md, format!("# steps {}..{}\n\n{summary}", p.first, p.last))
            .with_context(|| format!("writing {}", md.display()))?;
        self.logger.bar.suspend(|| {
            eprintln!(
                "profile of steps {}..{}: {} (summary {})",
                p.first,
                p.last,
                trace.display(),
                md.display()
            )
        });
        Ok(())
    }

    /// One optimiser step: the micro-batches (VQ-VAE or generator), gradients averaged and
    /// clipped, the update, then the discriminator's step. Its numbers stay on the device as a
    /// pending step ([`read_back`](Self::read_back) checks and records them); an update is
    /// skipped on the device once a non-finite number was met.
    fn step(&mut self, step: usize, last: bool) -> Result<()> {
        let t = &self.opts.config.training;
        let lr = learning_rate(
            step,
            t.learning_rate,
            t.warmup_steps,
            t.decay_steps,
            t.final_lr_fraction,
        );
        let grad_clip = t.grad_clip;
        self.model.set_step(step);
        self.opt.zero_grad();
        let adversarial = self
            .gan
            .as_ref()
            .is_some_and(|g| step >= g.config.disc_start);
        let accum = self.accum as f64;
        let mut micro = Vec::with_capacity(self.accum);
        let mut pairs = Vec::new();
        let mut bad = Vec::new();
        for a in 0..self.accum {
            let batch = self
                .batches
                .get(&self.data, step * self.accum + a, self.opts.device)?;
            bad.extend(batch.bad);
            let x = batch.x;
            let m = match self.gan.is_some() {
                false => self.vqvae_micro_step(&x, step)?,
                true => {
                    let (m, pair) = self.generator_micro_step(&x, step, adversarial)?;
                    pairs.push(pair);
                    m
                }
            };
            micro.push(m);
        }
        // Means over the micro-batches, summed in f64 in their order.
        let mean = |f: fn(&MicroStats) -> &Tensor| {
            micro
                .iter()
                .fold(Tensor::zeros_like(f(&micro[0])), |acc, m| {
                    acc + f(m) / accum
                })
        };
        let (parts, g_loss, d_weight) = (
            mean(|m| &m.parts),
            mean(|m| &m.g_loss),
            mean(|m| &m.d_weight),
        );
        let slots = code_slot_count(&self.opts.config.model.quantizer) as i64;
        let codes = Tensor::cat(&micro.iter().map(|m| &m.codes).collect::<Vec<_>>(), 0);
        // Counts by index_add: CUDA's bincount reads the largest index back to the host. The
        // last slot takes the stages a quantizer dropout left out, and is dropped.
        let counts = Tensor::zeros([slots + 1], (Kind::Int64, codes.device()))
            .index_add(0, &codes, &codes.ones_like())
            .narrow(0, 0, slots);
        let verdicts: Vec<Tensor> = micro
            .iter()
            .filter_map(|m| m.verdict.as_ref().map(Tensor::shallow_clone))
            .collect();
        self.dist.average_gradients(&self.opt)?;
        let scaled = self.opts.config.precision.needs_loss_scaling();
        let (grad_norm, skipped) = match scaled {
            // f16: the loss scale is updated on the host from the norm (read now).
            true => {
                let norm = self.opt.unscale_and_clip(grad_clip);
                let applied = self.opt.step_unless_overflow(lr, norm);
                self.check_loss_scale(step)?;
                (Tensor::from(norm), !applied)
            }
            false => {
                let norm = self.opt.clip_on_device(grad_clip);
                self.raise_halt(&[&parts.get(0), &norm], &verdicts);
                self.opt.step_unless(lr, &self.halt);
                (norm, false)
            }
        };
        let zero = || Tensor::zeros([], (Kind::Double, self.opts.device));
        let (d_loss, d_norm) = match adversarial {
            true => self.discriminator_step(&pairs, step, lr)?,
            false => (zero(), zero()),
        };
        let row = StepRow::new(
            &parts, &g_loss, &d_weight, &d_loss, &grad_norm, &d_norm, &counts, &verdicts,
        );
        self.pending.push(PendingStep {
            step,
            lr,
            row,
            bad,
            skipped,
            loss_scale: self.opt.loss_scale(),
            last,
        });
        Ok(())
    }

    /// Sets the halt flag if any of `values` is not finite or a deferred finite check failed
    /// (on the device, no read).
    fn raise_halt(&mut self, values: &[&Tensor], verdicts: &[Tensor]) {
        let mut bad = self.halt.ne(0.0);
        for v in values {
            bad = bad.logical_or(&v.isfinite().logical_not());
        }
        for v in verdicts {
            bad = bad.logical_or(&v.narrow(0, 0, 2).ne(0).any());
        }
        self.halt = bad.to_kind(Kind::Float);
    }

    /// Reads the pending steps back (one copy), stops the run at the first step that met a
    /// non-finite number (naming it as the step itself would have), and records the others.
    fn read_back(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        let k = code_slot_count(&self.opts.config.model.quantizer);
        let rows: Vec<StepRow> = pending
            .iter()
            .map(|p| StepRow(p.row.0.shallow_clone()))
            .collect();
        let values = StepRow::read(&rows, k)?;
        for (p, v) in pending.into_iter().zip(values) {
            self.check_and_record(p, v)?;
        }
        Ok(())
    }

    /// One read-back step: its metrics over the ranks, failed samples, the non-finite stops,
    /// then the logger.
    fn check_and_record(&mut self, p: PendingStep, v: StepValues) -> Result<()> {
        let step = p.step;
        for verdict in &v.verdicts {
            if let Err(e) = vq_tch::FiniteVerdict::check(verdict) {
                bail!(
                    "non-finite encoder output at step {} ({e}); training stopped, last good checkpoint: {}",
                    step + 1,
                    last_checkpoint(&self.opts.out)?
                );
            }
        }
        let StepStats {
            sums,
            adv,
            counts,
            bad_samples,
            ..
        } = StepStats {
            sums: v.sums,
            adv: v.adv,
            counts: v.counts,
            skipped: false,
            loss_scale: 1.0,
            bad_samples: p.bad.len() as u64,
        }
        .over_ranks(&self.dist)?;
        if bad_samples > 0 {
            self.report_bad_samples(step, p.bad)?;
        }
        let scaled = self.opts.config.precision.needs_loss_scaling();
        // Under loss scaling a non-finite loss is an overflow: the step was skipped.
        if !sums[0].is_finite() && !scaled {
            bail!(
                "non-finite loss {} at step {} (rec {}, commitment {}); training stopped, last good checkpoint: {}",
                sums[0],
                step + 1,
                sums[1],
                sums[2],
                last_checkpoint(&self.opts.out)?
            );
        }
        let grad_norm = v.grad_norm;
        // A finite loss can still have non-finite gradients (an overflow inside the backward):
        // without loss scaling that stops the run; the update was not applied.
        if !grad_norm.is_finite() && !scaled {
            bail!(
                "non-finite gradient (norm {grad_norm}) at step {} under a finite loss {}; \
                 training stopped before the update, last good checkpoint: {}",
                step + 1,
                sums[0],
                last_checkpoint(&self.opts.out)?
            );
        }
        let finite_d = adv[0].is_finite() && v.d_grad_norm.is_finite();
        if !finite_d && !scaled {
            bail!(
                "non-finite discriminator loss {} (gradient norm {}) at step {}; training \
                 stopped before its update, last good checkpoint: {}",
                adv[0],
                v.d_grad_norm,
                step + 1,
                last_checkpoint(&self.opts.out)?
            );
        }
        let stats = StepStats {
            sums,
            adv,
            counts,
            skipped: p.skipped,
            loss_scale: p.loss_scale,
            bad_samples,
        };
        self.logger
            .record(step + 1, p.lr, &stats, grad_norm, p.last)
    }

    /// Rank 0 records the step's failed samples of every rank (each file once): the ranks'
    /// dataset indices meet in one sum (rank r fills its own slots), rank 0 reads each new
    /// failure of another rank again for its message.
    fn report_bad_samples(&mut self, step: usize, mine: Vec<BadSample>) -> Result<()> {
        let world = self.dist.world();
        if world == 1 {
            return self.logger.bad_samples(step + 1, 0, mine);
        }
        let slots = self.accum * self.opts.config.micro_batch;
        let mut all = vec![0f64; world * slots];
        for (k, b) in mine.iter().enumerate() {
            all[self.dist.rank() * slots + k] = (b.index + 1) as f64;
        }
        self.dist.sum(&mut all)?;
        if !self.dist.is_main() {
            return Ok(());
        }
        self.logger.bad_samples(step + 1, 0, mine)?;
        for (rank, ranks) in all.chunks(slots).enumerate().skip(1) {
            let indices = ranks.iter().take_while(|&&v| v > 0.0);
            let theirs = indices
                .map(|&v| v as usize - 1)
                .filter(|&i| !self.logger.knows_bad(&self.data.sample_name(i)))
                .map(|i| self.data.failure(i))
                .collect();
            self.logger.bad_samples(step + 1, rank, theirs)?;
        }
        Ok(())
    }

    /// Loss scaling that has backed off to nothing: every step for a long while overflowed.
    fn check_loss_scale(&self, step: usize) -> Result<()> {
        let scales = [Some(&self.opt), self.gan.as_ref().map(|g| &g.opt)];
        for (what, opt) in ["model", "discriminator"].iter().zip(scales) {
            let Some(opt) = opt else { continue };
            if opt.loss_scale() < LossScale::MIN {
                bail!(
                    "f16 loss scale of the {what} fell to {:e} at step {}: its gradients overflowed \
                     at every step for {} steps in a row (the run diverged or f16's range is too \
                     small for it; try --precision bf16); last good checkpoint: {}",
                    opt.loss_scale(),
                    step + 1,
                    (LossScale::INIT / LossScale::MIN).log2().round(),
                    last_checkpoint(&self.opts.out)?
                );
            }
        }
        Ok(())
    }

    /// Runs `f` in the run's autocast region (nothing changes in f32).
    fn autocast<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        Ok(vq_tch::autocast(
            self.opts.device,
            self.opts.config.precision,
            f,
        )?)
    }

    /// Encoder → quantizer on one micro-batch, with the error of a non-finite encoder output
    /// named; inside the run's autocast region.
    fn encode(&mut self, x: &Tensor, step: usize) -> Result<vq_tch::VqOutput> {
        let (device, precision) = (self.opts.device, self.opts.config.precision);
        match vq_tch::autocast(device, precision, || self.model.encode(x, Mode::Train))? {
            Ok(vq) => Ok(vq),
            Err(vq_models::ModelError::Quantizer(vq_tch::VqTchError::Core(
                e @ vq_core::VqError::NonFinite { .. },
            ))) => bail!(
                "non-finite encoder output at step {} ({e}); training stopped, last good checkpoint: {}",
                step + 1,
                last_checkpoint(&self.opts.out)?
            ),
            Err(e) => Err(e.into()),
        }
    }

    /// Encoder → quantizer → decoder on one micro-batch ([`encode`](Self::encode), then the
    /// decoder in the autocast region); the reconstruction comes back in f32.
    fn forward(&mut self, x: &Tensor, step: usize) -> Result<vq_models::AutoencoderOutput> {
        let vq = self.encode(x, step)?;
        let reconstruction = self
            .autocast(|| self.model.decode(&vq.quantized))?
            .to_kind(Kind::Float);
        Ok(vq_models::AutoencoderOutput { reconstruction, vq })
    }

    /// VQ-VAE: loss = MSE(x̃, x) + quantizer losses; backward of loss / accumulation. With a
    /// decoder-based baseline ([`EncoderGradient`]) the encoder's gradient is computed apart and
    /// enters through the straight-through output as `⟨q̃, sg(grad)⟩`, a term that is
    /// back-propagated but not logged.
    fn vqvae_micro_step(&mut self, x: &Tensor, step: usize) -> Result<MicroStats> {
        let method = self.opts.config.encoder_gradient;
        if method == EncoderGradient::Quantizer {
            let mut out = self.forward(x, step)?;
            let qloss = &out.vq.commitment_loss + &out.vq.codebook_loss;
            let rec = out.reconstruction.mse_loss(x, Reduction::Mean);
            let loss = &rec + &qloss;
            backward(&(&loss * self.backward_factor()), &self.dist)?;
            let zero = || Tensor::zeros([], (Kind::Double, x.device()));
            return Ok(finish_micro(
                &loss,
                &rec,
                &mut out,
                zero(),
                zero(),
                &self.opts.config.model.quantizer,
            ));
        }
        let vq = self.encode(x, step)?;
        let model = &self.model;
        let (device, precision) = (self.opts.device, self.opts.config.precision);
        let loss_of = |d: &Tensor| -> Result<Tensor> {
            let rec = vq_tch::autocast(device, precision, || model.decode(d))?;
            Ok(rec.to_kind(Kind::Float).mse_loss(x, Reduction::Mean))
        };
        let qloss = &vq.commitment_loss + &vq.codebook_loss;
        let (rec, surrogate, second) = match method {
            EncoderGradient::HessianApprox => {
                let g = hessian_approx(loss_of, &vq.latents, &vq.quantized)?;
                (
                    g.loss,
                    (&vq.quantized * g.encoder_grad).sum(Kind::Float),
                    None,
                )
            }
            _ => {
                // The first pass trains the decoder on sg(q); the second gives the encoder ∇_e L.
                let rec = loss_of(&vq.quantized.detach())?;
                let g = exact_gradient(loss_of, &vq.latents)?;
                let surrogate = (&vq.quantized * g.encoder_grad).sum(Kind::Float);
                (rec, surrogate, Some(g.loss * EXACT_GRADIENTS_SCALE))
            }
        };
        let loss = &rec + &qloss;
        let mut total = &loss + surrogate;
        if let Some(second) = second {
            total += second;
        }
        backward(&(total * self.backward_factor()), &self.dist)?;
        let mut out = vq_models::AutoencoderOutput {
            reconstruction: Tensor::zeros([0], (Kind::Float, x.device())),
            vq,
        };
        let zero = || Tensor::zeros([], (Kind::Double, x.device()));
        Ok(finish_micro(
            &loss,
            &rec,
            &mut out,
            zero(),
            zero(),
            &self.opts.config.model.quantizer,
        ))
    }

    /// VQGAN generator (taming): nll = mean|x − x̃| (+ LPIPS), loss = nll + λ·g_loss +
    /// w_cb·qloss (ViT-VQGAN: L2 instead of L1, a fixed λ); returns the pair (x, sg(x̃)) for the
    /// discriminator step.
    fn generator_micro_step(
        &mut self,
        x: &Tensor,
        step: usize,
        adversarial: bool,
    ) -> Result<(MicroStats, (Tensor, Tensor))> {
        let mut out = self.forward(x, step)?;
        let g = self.gan.as_ref().expect("a VQGAN run");
        let qloss = &out.vq.commitment_loss + &out.vq.codebook_loss;
        let mut nll = g.config.pixel_loss(x, &out.reconstruction);
        if let Some(lp) = &self.lpips {
            let p = self
                .autocast(|| {
                    lp.forward(&frames_as_images(x), &frames_as_images(&out.reconstruction))
                })?
                .to_kind(Kind::Float)
                .mean(Kind::Float);
            nll += p * g.config.perceptual_weight;
        }
        let mut loss = &nll + &qloss * g.config.codebook_weight;
        let zero = || Tensor::zeros([], (Kind::Double, x.device()));
        let (mut g_value, mut w) = (zero(), zero());
        if adversarial {
            let g_loss = g.config.g_loss(
                &self.autocast(|| logits(&g.disc, &frames_as_images(&out.reconstruction)))??,
            );
            w = match g.config.adversarial_weighting {
                AdversarialWeighting::Adaptive => adaptive_weight_tensor_in(
                    self.dist.group().map(|g| &**g),
                    &nll,
                    &g_loss,
                    self.model.last_layer_weight(),
                    g.config.disc_weight,
                )?,
                AdversarialWeighting::Fixed => Tensor::from(g.config.disc_weight),
            };
            g_value = g_loss.detach();
            // The weight enters in f32, as an f64 number multiplying an f32 loss does.
            loss += g_loss * w.to_kind(Kind::Float).to_device(x.device());
        }
        let pair = (
            frames_as_images(x),
            frames_as_images(&out.reconstruction.detach()),
        );
        backward(&(&loss * self.backward_factor()), &self.dist)?;
        Ok((
            finish_micro(
                &loss,
                &nll,
                &mut out,
                g_value,
                w,
                &self.opts.config.model.quantizer,
            ),
            pair,
        ))
    }

    /// What a micro-batch's loss is multiplied by before its backward pass: 1 / accumulation,
    /// times the loss scale under f16.
    fn backward_factor(&self) -> f64 {
        self.opt.loss_scale() / self.accum as f64
    }

    /// Discriminator step on the step's images and the generator's (detached) outputs, with the
    /// lazy R1 penalty on real images every `every` steps; gradients averaged over ranks.
    /// Returns the hinge loss averaged over micro-batches (f64 scalar, on the device) and the
    /// gradient norm; the update is skipped (on the device) if either is not finite.
    fn discriminator_step(
        &mut self,
        pairs: &[(Tensor, Tensor)],
        step: usize,
        lr: f64,
    ) -> Result<(Tensor, Tensor)> {
        let accum = self.accum as f64;
        let (device, precision) = (self.opts.device, self.opts.config.precision);
        let g = self.gan.as_mut().expect("a VQGAN run");
        g.opt.zero_grad();
        let r1 = g.config.r1.filter(|r| step.is_multiple_of(r.every));
        let mut d_sum = Tensor::zeros([], (Kind::Double, device));
        for (x, rec) in pairs {
            let x = match r1 {
                Some(_) => x.detach().set_requires_grad(true),
                None => x.shallow_clone(),
            };
            let (real, fake) = vq_tch::autocast(device, precision, || {
                Ok::<_, anyhow::Error>((logits(&g.disc, &x)?, logits(&g.disc, rec)?))
            })??;
            let mut d_loss = g.config.d_loss(&real, &fake);
            d_sum += d_loss.detach().to_kind(Kind::Double) / accum;
            if let Some(r) = r1 {
                d_loss += r1_penalty(&real, &x)? * (r.gamma * r.every as f64 / 2.0);
            }
            backward(&(d_loss * (g.opt.loss_scale() / accum)), &self.dist)?;
        }
        self.dist.average_gradients(&g.opt)?;
        let lr = lr * g.config.disc_lr_multiplier;
        if precision.needs_loss_scaling() {
            // f16: an overflow skips the update (the loss scale is updated on the host).
            let norm = g.opt.unscale_and_clip(0.0);
            g.opt.step_unless_overflow(lr, norm);
            return Ok((d_sum, Tensor::from(norm)));
        }
        let norm = g.opt.clip_on_device(0.0);
        self.raise_halt(&[&d_sum, &norm], &[]);
        let g = self.gan.as_mut().expect("a VQGAN run");
        g.opt.step_unless(lr, &self.halt);
        Ok((d_sum, norm))
    }
}

/// The discriminator's logits in f32 (its forward may run under autocast).
fn logits(disc: &Discriminator, x: &Tensor) -> Result<Tensor> {
    Ok(disc.try_forward_t(x, true)?.to_kind(Kind::Float))
}

/// The backward pass, with libtorch's errors as errors rather than panics; inside a group a
/// failure is a collective of synchronised BatchNorm that lost a peer, named as such.
fn backward(loss: &Tensor, dist: &Dist) -> Result<()> {
    loss.f_backward().map_err(|e| match dist.group() {
        Some(g) => g
            .lost("all_reduce in the backward pass", &e.to_string())
            .into(),
        None => anyhow::anyhow!("backward pass failed: {e}"),
    })
}

/// The numbers of a micro-batch, left on the device.
fn finish_micro(
    loss: &Tensor,
    rec: &Tensor,
    out: &mut vq_models::AutoencoderOutput,
    g_loss: Tensor,
    d_weight: Tensor,
    config: &vq_tch::VectorQuantizerConfig,
) -> MicroStats {
    let parts = Tensor::stack(
        &[
            loss.detach(),
            rec.detach(),
            out.vq.commitment_loss.detach(),
            out.vq.quantization_error.shallow_clone(),
        ],
        0,
    )
    .to_kind(Kind::Double);
    MicroStats {
        parts,
        g_loss: g_loss.detach().to_kind(Kind::Double),
        d_weight: d_weight.detach().to_kind(Kind::Double),
        codes: code_slots(&out.vq.indices, config),
        verdict: out.vq.finite_verdict.take().map(|v| v.0),
    }
}

/// How many code slots a quantizer has: K per code group (stage or head).
pub(crate) fn code_slot_count(config: &vq_tch::VectorQuantizerConfig) -> usize {
    config.family.code_groups() * config.codebook_size
}

/// The indices of a forward pass as flat code slots `g·K + k` (group g's code k); the stages a
/// quantizer dropout left out (index −1) map to the slot after the last,
/// [`code_slot_count`].
pub(crate) fn code_slots(indices: &Tensor, config: &vq_tch::VectorQuantizerConfig) -> Tensor {
    let (g, k) = (
        config.family.code_groups() as i64,
        config.codebook_size as i64,
    );
    if config.family.group_axis().is_none() {
        return indices.reshape([-1]);
    }
    let flat = indices.reshape([-1, g]);
    let offsets = Tensor::arange(g, (Kind::Int64, flat.device())) * k;
    let slots = &flat + offsets.view([1, g]);
    slots
        .where_self(&flat.ge(0), &slots.full_like(g * k))
        .reshape([-1])
}

/// Writes checkpoints (rank 0 only) and resumes from them.
#[derive(Debug)]
pub struct Checkpointer {
    out: PathBuf,
    run: serde_json::Value,
    main: bool,
    /// Training seconds recorded by the checkpoint resumed from (earlier invocations).
    prior_seconds: f64,
}

impl Checkpointer {
    /// Loads the run folder's latest checkpoint when resuming; returns the step to start at.
    /// Refuses a folder that holds another run or a run without `--resume`.
    fn resume(
        &mut self,
        resume: bool,
        vs: &mut nn::VarStore,
        opt: &mut AdamW,
        gan: Option<&mut GanPart>,
    ) -> Result<usize> {
        match checkpoint::latest(&self.out)? {
            Some((ckpt, state)) if resume => {
                if let Some(note) = may_resume(&ckpt, &state.run, &self.run, state.step)?
                    && self.main
                {
                    eprintln!("note: {note}");
                }
                match gan {
                    Some(g) => checkpoint::load(
                        &ckpt,
                        &mut [("model", vs, opt), ("discriminator", &mut g.vs, &mut g.opt)],
                    )?,
                    None => checkpoint::load(&ckpt, &mut [("model", vs, opt)])?,
                }
                self.prior_seconds = state.train_seconds;
                Ok(state.step)
            }
            Some((ckpt, _)) => bail!(
                "{} already holds a run (checkpoint {}); pass --resume to continue it or choose another --out",
                self.out.display(),
                ckpt.display()
            ),
            None if resume => bail!("--resume: no checkpoint in {}", self.out.display()),
            None => Ok(0),
        }
    }

    /// Saves a checkpoint after `done` steps, `seconds` of them in this invocation.
    fn save(
        &self,
        done: usize,
        seconds: f64,
        vs: &nn::VarStore,
        opt: &AdamW,
        gan: Option<&GanPart>,
    ) -> Result<()> {
        if !self.main {
            return Ok(());
        }
        let state = TrainState {
            step: done,
            run: self.run.clone(),
            train_seconds: self.prior_seconds + seconds,
        };
        let mut parts = vec![checkpoint::Part {
            name: "model",
            vs,
            opt,
        }];
        if let Some(g) = gan {
            parts.push(checkpoint::Part {
                name: "discriminator",
                vs: &g.vs,
                opt: &g.opt,
            });
        }
        checkpoint::save(&self.out, &parts, &state)?;
        Ok(())
    }
}

/// Metric windows → `metrics.jsonl` and the TensorBoard event file (rank 0), samples that failed to decode → `skipped.jsonl`
/// (rank 0, each file once, also printed when first seen), the progress bar, and the history
/// returned.
#[derive(Debug)]
pub struct Logger {
    file: Option<fs::File>,
    /// The run's TensorBoard event file (rank 0).
    events: Option<crate::tensorboard::EventWriter>,
    gan: bool,
    /// f16: the loss scale is a series of its own.
    scaled: bool,
    log_every: usize,
    /// Code groups of the quantizer (perplexity is per group).
    code_groups: usize,
    window: Window,
    window_start: Instant,
    history: Vec<StepMetrics>,
    bar: indicatif::ProgressBar,
    bad: BadLog,
}

/// `skipped.jsonl`: one line `{step, rank, index, file, error}` per file that failed to decode,
/// the first time any rank met it; kept across a resume.
#[derive(Debug, Default)]
struct BadLog {
    file: Option<fs::File>,
    seen: HashSet<String>,
    /// Failed samples since the run (or its resume) started, repeats included.
    total: u64,
}

impl BadLog {
    const FILE: &str = "skipped.jsonl";

    /// Opens the run's list (rank 0): a fresh run starts it empty, a resumed one keeps it and
    /// does not list its files again.
    fn open(out: &Path, main: bool, start: usize) -> Result<Self> {
        if !main {
            return Ok(Self::default());
        }
        let path = out.join(Self::FILE);
        let mut seen = HashSet::new();
        if start > 0 && path.exists() {
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            // A line cut short by a crash only means its file may be listed again.
            seen.extend(text.lines().filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                Some(v.get("file")?.as_str()?.to_owned())
            }));
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(start > 0)
            .truncate(start == 0)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            file: Some(file),
            seen,
            total: 0,
        })
    }
}

impl Logger {
    fn new(opts: &TrainOptions, main: bool, start: usize) -> Result<Self> {
        let file = match main {
            true => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(opts.out.join("metrics.jsonl"))
                    .context("opening metrics.jsonl")?,
            ),
            false => None,
        };
        let events = match main {
            true => {
                use crate::tensorboard::{EventWriter, What};
                // A fresh start keeps only the file's version record (an earlier attempt that
                // never reached a checkpoint leaves nothing behind).
                let mut w = match start {
                    0 => EventWriter::open_keeping(&opts.out, |e| {
                        matches!(e.what, Some(What::FileVersion(_)))
                    })?,
                    _ => EventWriter::open(&opts.out, start)?,
                };
                if start == 0 {
                    let json = serde_json::to_string_pretty(&opts.config)?;
                    w.text(0, "config", &format!("```\n{json}\n```"))?;
                }
                Some(w)
            }
            false => None,
        };
        Ok(Self {
            file,
            events,
            gan: opts.config.gan.is_some(),
            scaled: opts.config.precision == vq_tch::Precision::F16,
            log_every: opts.log_every.max(1),
            code_groups: opts.config.model.quantizer.family.code_groups(),
            window: Window::default(),
            window_start: Instant::now(),
            history: Vec::new(),
            bar: progress_bar(opts.progress && main, start, opts.config.training.steps),
            bad: BadLog::open(&opts.out, main, start)?,
        })
    }

    /// Whether `skipped.jsonl` lists the file already.
    fn knows_bad(&self, name: &str) -> bool {
        self.bad.seen.contains(name)
    }

    /// Rank 0: lists and prints the samples (of `rank`) not met before.
    fn bad_samples(&mut self, done: usize, rank: usize, bad: Vec<BadSample>) -> Result<()> {
        let Some(file) = &mut self.bad.file else {
            return Ok(());
        };
        for b in bad {
            if !self.bad.seen.insert(b.name.clone()) {
                continue;
            }
            let line = serde_json::json!({
                "step": done, "rank": rank, "index": b.index, "file": b.name, "error": b.error,
            });
            file.write_all(format!("{line}\n").as_bytes())
                .context("writing skipped.jsonl")?;
            self.bar.suspend(|| {
                eprintln!(
                    "data: step {done}: {} (replaced by the next sample that decodes; listed in {})",
                    b.error,
                    BadLog::FILE
                )
            });
        }
        Ok(())
    }

    /// Adds step `done`'s numbers; closes the window every `log_every` steps (or when `last`).
    fn record(
        &mut self,
        done: usize,
        lr: f64,
        stats: &StepStats,
        grad_norm: f64,
        last: bool,
    ) -> Result<()> {
        let k = stats.counts.len().max(1);
        let used = stats.counts.iter().filter(|&&c| c > 0).count() as f64 / k as f64;
        self.window.add(
            &stats.sums,
            &stats.adv,
            used,
            vq_core::family::mean_group_perplexity(&stats.counts, self.code_groups),
            grad_norm,
        );
        self.window.skipped += usize::from(stats.skipped);
        self.window.bad_samples += stats.bad_samples;
        self.bad.total += stats.bad_samples;
        self.window.loss_scale = stats.loss_scale;
        self.bar.set_position(done as u64);
        if !(done.is_multiple_of(self.log_every) || last) {
            return Ok(());
        }
        let m = self
            .window
            .finish(done, lr, self.window_start.elapsed().as_secs_f64());
        let bad = match self.bad.total {
            0 => String::new(),
            n => format!(" skipped {n}"),
        };
        self.bar.set_message(format!(
            "loss {:.4} rec {:.4} usage {:.1}% qe {:.2e} {:.1} it/s{bad}",
            m.loss,
            m.rec,
            100.0 * m.usage,
            m.quantization_error,
            m.steps_per_s
        ));
        if let Some(f) = &mut self.file {
            writeln!(f, "{}", serde_json::to_string(&m)?).context("writing metrics.jsonl")?;
        }
        if let Some(w) = &mut self.events {
            w.scalars(
                done,
                &crate::tensorboard::window_scalars(&m, self.gan, self.scaled),
            )?;
        }
        self.history.push(m);
        self.window = Window::default();
        self.window_start = Instant::now();
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Window {
    n: usize,
    skipped: usize,
    bad_samples: u64,
    loss_scale: f64,
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
            skipped_steps: self.skipped,
            skipped_samples: self.bad_samples,
            loss_scale: self.loss_scale,
        }
    }
}

/// The project's progress bar (elapsed, bar, position / length, ETA), hidden unless `show`.
pub(crate) fn progress_bar(show: bool, start: usize, steps: usize) -> indicatif::ProgressBar {
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
