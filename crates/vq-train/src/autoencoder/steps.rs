//! The autoencoder's steps: one optimiser step over its micro-batches (VQ-VAE, or the VQGAN
//! generator), with the paper's decoder-based baselines, then the discriminator's step; the
//! numbers are left on the device under their names.

use anyhow::Result;
use tch::{Kind, Reduction, Tensor};
use vq_models::{AdversarialWeighting, Discriminator, adaptive_weight_tensor_in, r1_penalty};
use vq_tch::Mode;

use super::Autoencoder;
use crate::config::EncoderGradient;
use crate::data::frames_as_images;
use crate::method::{EXACT_GRADIENTS_SCALE, exact_gradient, hessian_approx};
use crate::metrics::{code_slot_count, code_slots, names};
use crate::optim::learning_rate;
use crate::run::{AcrossRanks, StepContext, StepOutput, StepRow};

/// What one micro-batch contributes to a step's numbers, still on the device (f64 scalars).
#[derive(Debug)]
struct MicroStats {
    loss: Tensor,
    rec: Tensor,
    commitment: Tensor,
    quantization_error: Tensor,
    /// VQGAN after `disc_start` (zeros otherwise).
    g_loss: Tensor,
    d_weight: Tensor,
    /// Code slots of the micro-batch (flat, i64).
    codes: Tensor,
    /// The quantizer's deferred finite check.
    verdict: Option<Tensor>,
}

/// The micro-batches of one step: their numbers, the (image, detached reconstruction) pairs
/// of a VQGAN's discriminator step, and the samples that failed to decode.
#[derive(Debug, Default)]
struct MicroBatches {
    stats: Vec<MicroStats>,
    pairs: Vec<(Tensor, Tensor)>,
    bad: Vec<crate::data::BadSample>,
}

impl MicroBatches {
    /// The mean of one number over the micro-batches, summed in f64 in their order.
    fn mean(&self, f: fn(&MicroStats) -> &Tensor) -> Tensor {
        let accum = self.stats.len() as f64;
        self.stats
            .iter()
            .fold(Tensor::zeros_like(f(&self.stats[0])), |acc, m| {
                acc + f(m) / accum
            })
    }

    /// The step's code counts per slot. By index_add: CUDA's bincount reads the largest index
    /// back to the host. The last slot takes the stages a quantizer dropout left out, and is
    /// dropped.
    fn counts(&self, slots: i64) -> Tensor {
        let codes = Tensor::cat(&self.stats.iter().map(|m| &m.codes).collect::<Vec<_>>(), 0);
        Tensor::zeros([slots + 1], (Kind::Int64, codes.device()))
            .index_add(0, &codes, &codes.ones_like())
            .narrow(0, 0, slots)
    }

    fn verdicts(&self) -> Vec<Tensor> {
        self.stats
            .iter()
            .filter_map(|m| m.verdict.as_ref().map(Tensor::shallow_clone))
            .collect()
    }
}

impl Autoencoder<'_> {
    /// One optimiser step: the micro-batches (VQ-VAE or generator), gradients averaged and
    /// clipped, the update, then the discriminator's step. Its numbers stay on the device (the
    /// run loop reads and checks them); an update is skipped on the device once a non-finite
    /// number was met.
    pub(super) fn train_step(
        &mut self,
        cx: &mut StepContext<'_>,
        step: usize,
    ) -> Result<StepOutput> {
        let t = &self.opts.config.training;
        let lr = learning_rate(
            step,
            t.learning_rate,
            t.warmup_steps,
            t.decay_steps,
            t.final_lr_fraction,
        );
        self.model.set_step(step);
        self.opt.zero_grad();
        let adversarial = self
            .gan
            .as_ref()
            .is_some_and(|g| step >= g.config.disc_start);
        let micro = self.micro_batches(cx, step, adversarial)?;
        let loss = micro.mean(|m| &m.loss);
        let verdicts = micro.verdicts();
        let (grad_norm, skipped) = self.update(cx, step, lr, &loss, &verdicts)?;
        let zero = || Tensor::zeros([], (Kind::Double, self.opts.device));
        let (d_loss, d_norm) = match adversarial {
            true => self.discriminator_step(cx, &micro.pairs, step, lr)?,
            false => (zero(), zero()),
        };
        let mean = |n| (n, AcrossRanks::Mean);
        let same = |n| (n, AcrossRanks::Same);
        let mut row = StepRow::new();
        for ((name, how), value) in [
            (mean(names::LOSS), &loss),
            (mean(names::REC), &micro.mean(|m| &m.rec)),
            (mean(names::COMMITMENT), &micro.mean(|m| &m.commitment)),
            (mean(names::QE), &micro.mean(|m| &m.quantization_error)),
            (mean(names::G_LOSS), &micro.mean(|m| &m.g_loss)),
            (mean(names::D_WEIGHT), &micro.mean(|m| &m.d_weight)),
            (mean(names::D_LOSS), &d_loss),
            (same(names::GRAD_NORM), &grad_norm),
            (same(names::D_GRAD_NORM), &d_norm),
        ] {
            row = row.scalar(name, how, value);
        }
        let slots = code_slot_count(&self.opts.config.model.quantizer) as i64;
        Ok(StepOutput {
            lr,
            row: row.counts(&micro.counts(slots)).verdicts(&verdicts),
            bad: micro.bad,
            skipped,
            loss_scale: self.opt.loss_scale(),
        })
    }

    /// The step's micro-batches through the VQ-VAE or the generator, gradients accumulated.
    fn micro_batches(
        &mut self,
        cx: &StepContext<'_>,
        step: usize,
        adversarial: bool,
    ) -> Result<MicroBatches> {
        let mut out = MicroBatches::default();
        for a in 0..self.accum {
            let batches = self.batches.as_mut().expect("prepared by the run loop");
            let batch = batches.get(&self.data, step * self.accum + a, self.opts.device)?;
            out.bad.extend(batch.bad);
            let x = batch.x;
            let m = match self.gan.is_some() {
                false => self.vqvae_micro_step(cx, &x, step)?,
                true => {
                    let (m, pair) = self.generator_micro_step(cx, &x, step, adversarial)?;
                    out.pairs.push(pair);
                    m
                }
            };
            out.stats.push(m);
        }
        Ok(out)
    }

    /// The model's update: gradients averaged over ranks and clipped; under f16 an overflow
    /// skips it (decided on the host, which updates the loss scale), otherwise a non-finite
    /// loss, gradient or encoder output raises the halt flag and the update is skipped on the
    /// device. Returns the gradient norm and whether the update was skipped (f16).
    fn update(
        &mut self,
        cx: &mut StepContext<'_>,
        step: usize,
        lr: f64,
        loss: &Tensor,
        verdicts: &[Tensor],
    ) -> Result<(Tensor, bool)> {
        let grad_clip = self.opts.config.training.grad_clip;
        cx.dist.average_gradients(&self.opt)?;
        if self.opts.config.precision.needs_loss_scaling() {
            let norm = self.opt.unscale_and_clip(grad_clip);
            let applied = self.opt.step_unless_overflow(lr, norm);
            self.check_loss_scales(cx, step)?;
            return Ok((Tensor::from(norm), !applied));
        }
        let norm = self.opt.clip_on_device(grad_clip);
        cx.raise_halt(&[loss, &norm], verdicts);
        self.opt.step_unless(lr, cx.halt());
        Ok((norm, false))
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
    fn encode(
        &mut self,
        cx: &StepContext<'_>,
        x: &Tensor,
        step: usize,
    ) -> Result<vq_tch::VqOutput> {
        let (device, precision) = (self.opts.device, self.opts.config.precision);
        match vq_tch::autocast(device, precision, || self.model.encode(x, Mode::Train))? {
            Ok(vq) => Ok(vq),
            Err(vq_models::ModelError::Quantizer(vq_tch::VqTchError::Core(
                e @ vq_core::VqError::NonFinite { .. },
            ))) => Err(cx.stopped(&super::non_finite_encoder_output(step, &e))),
            Err(e) => Err(e.into()),
        }
    }

    /// Encoder → quantizer → decoder on one micro-batch ([`encode`](Self::encode), then the
    /// decoder in the autocast region); the reconstruction comes back in f32.
    fn forward(
        &mut self,
        cx: &StepContext<'_>,
        x: &Tensor,
        step: usize,
    ) -> Result<vq_models::AutoencoderOutput> {
        let vq = self.encode(cx, x, step)?;
        let reconstruction = self
            .autocast(|| self.model.decode(&vq.quantized))?
            .to_kind(Kind::Float);
        Ok(vq_models::AutoencoderOutput { reconstruction, vq })
    }

    /// VQ-VAE: loss = MSE(x̃, x) + quantizer losses; backward of loss / accumulation. With a
    /// decoder-based baseline ([`EncoderGradient`]) the encoder's gradient is computed apart and
    /// enters through the straight-through output as `⟨q̃, sg(grad)⟩`, a term that is
    /// back-propagated but not logged.
    fn vqvae_micro_step(
        &mut self,
        cx: &StepContext<'_>,
        x: &Tensor,
        step: usize,
    ) -> Result<MicroStats> {
        let method = self.opts.config.encoder_gradient;
        if method == EncoderGradient::Quantizer {
            let mut out = self.forward(cx, x, step)?;
            let qloss = &out.vq.commitment_loss + &out.vq.codebook_loss;
            let rec = out.reconstruction.mse_loss(x, Reduction::Mean);
            let loss = &rec + &qloss;
            cx.backward(&(&loss * self.backward_factor()))?;
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
        let vq = self.encode(cx, x, step)?;
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
        cx.backward(&(total * self.backward_factor()))?;
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
        cx: &StepContext<'_>,
        x: &Tensor,
        step: usize,
        adversarial: bool,
    ) -> Result<(MicroStats, (Tensor, Tensor))> {
        let mut out = self.forward(cx, x, step)?;
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
                    cx.dist.group().map(|g| &**g),
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
        cx.backward(&(&loss * self.backward_factor()))?;
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
        cx: &mut StepContext<'_>,
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
            cx.backward(&(d_loss * (g.opt.loss_scale() / accum)))?;
        }
        cx.dist.average_gradients(&g.opt)?;
        let lr = lr * g.config.disc_lr_multiplier;
        if precision.needs_loss_scaling() {
            // f16: an overflow skips the update (the loss scale is updated on the host).
            let norm = g.opt.unscale_and_clip(0.0);
            g.opt.step_unless_overflow(lr, norm);
            return Ok((d_sum, Tensor::from(norm)));
        }
        let norm = g.opt.clip_on_device(0.0);
        cx.raise_halt(&[&d_sum, &norm], &[]);
        let g = self.gan.as_mut().expect("a VQGAN run");
        g.opt.step_unless(lr, cx.halt());
        Ok((d_sum, norm))
    }

    /// Loss scaling (f16) that backed off to nothing, for the model or the discriminator.
    fn check_loss_scales(&self, cx: &StepContext<'_>, step: usize) -> Result<()> {
        let mut opts = vec![("model", &self.opt)];
        if let Some(g) = &self.gan {
            opts.push(("discriminator", &g.opt));
        }
        cx.check_loss_scales(step, &opts)
    }
}

/// The discriminator's logits in f32 (its forward may run under autocast).
fn logits(disc: &Discriminator, x: &Tensor) -> Result<Tensor> {
    Ok(disc.try_forward_t(x, true)?.to_kind(Kind::Float))
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
    let f64_of = |t: &Tensor| t.detach().to_kind(Kind::Double);
    MicroStats {
        loss: f64_of(loss),
        rec: f64_of(rec),
        commitment: f64_of(&out.vq.commitment_loss),
        quantization_error: f64_of(&out.vq.quantization_error),
        g_loss: f64_of(&g_loss),
        d_weight: f64_of(&d_weight),
        codes: code_slots(&out.vq.indices, config),
        verdict: out.vq.finite_verdict.take().map(|v| v.0),
    }
}
