//! Validation metrics: reconstruction MSE and L1, codebook usage per 256 inputs (the paper's
//! convention), perplexity, quantization error, and — when the pretrained weights are given —
//! LPIPS, reconstruction FID (images vs their reconstructions, pytorch-fid's Inception) and the
//! reconstruction Inception score.

use anyhow::{Result, bail};
use tch::{Device, Kind, Reduction, Tensor};
use vq_models::{FidInception, Lpips, VqAutoencoder, frechet_distance, inception_score};
use vq_tch::Mode;

use crate::data::{BadSample, ImageSet, frames_as_images};

/// Metrics of a model on an image set.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalMetrics {
    /// Images evaluated.
    pub images: usize,
    /// Mean squared reconstruction error (pixels in [−1, 1]).
    pub rec_mse: f64,
    /// Mean absolute reconstruction error.
    pub rec_l1: f64,
    /// Fraction of the codebook used per group of 256 inputs, averaged over groups (residual
    /// and multi-head quantizers: of the code slots, i.e. the mean over stages / heads).
    pub usage: f64,
    /// Fraction of the codebook used over the whole set (the mean over stages / heads).
    pub usage_total: f64,
    /// Perplexity of the code distribution over the whole set (per stage / head: their
    /// geometric mean, [`vq_core::family::mean_group_perplexity`]).
    pub perplexity: f64,
    /// Residual and multi-head quantizers: usage over the whole set and perplexity of each stage
    /// / head, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupMetrics>,
    /// Quantization error mean((e − q)²) per element, in code space.
    pub quantization_error: f64,
    /// The quantization error relative to the latents' scale, mean((e − q)²) / mean(e²):
    /// comparable between models whose latents have different scales.
    #[serde(default)]
    pub relative_quantization_error: f64,
    /// Mean LPIPS distance between images and reconstructions (when weights were given).
    #[serde(default)]
    pub lpips: Option<f64>,
    /// Reconstruction FID: Fréchet distance between the Inception features of the images and of
    /// their reconstructions (when Inception weights were given).
    #[serde(default)]
    pub rfid: Option<f64>,
    /// Reconstruction Inception score (10 splits; when Inception weights were given).
    #[serde(default)]
    pub ris: Option<f64>,
    /// Samples that failed to decode and were left out (`images` counts only the others).
    #[serde(default)]
    pub skipped: Vec<BadSample>,
    /// Files left out when the set was indexed (a damaged `.tfrecords` file, a video whose
    /// frames cannot be counted), each with its error: their samples are not in the set.
    #[serde(default)]
    pub left_out: Vec<String>,
}

/// The codes of one stage or head over an evaluated set.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupMetrics {
    /// Fraction of its K codes used.
    pub usage: f64,
    /// Perplexity of its codes.
    pub perplexity: f64,
}

/// Which of the available perceptual metrics to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perceptual {
    /// LPIPS and the Inception metrics.
    All,
    /// LPIPS only (the Inception metrics are defined on the held-out set).
    LpipsOnly,
}

/// Pretrained networks for the perceptual columns, each optional.
#[derive(Debug, Default)]
pub struct EvalNets {
    /// LPIPS.
    pub lpips: Option<Lpips>,
    /// FID Inception.
    pub inception: Option<FidInception>,
}

impl EvalNets {
    /// Loads the networks whose weight files are given.
    ///
    /// # Errors
    /// Unreadable or mismatching weight files.
    pub fn load(
        lpips: Option<&std::path::Path>,
        inception: Option<&std::path::Path>,
        device: Device,
    ) -> Result<Self> {
        Ok(Self {
            lpips: lpips.map(|f| Lpips::load(f, device)).transpose()?,
            inception: inception
                .map(|f| FidInception::load(f, device))
                .transpose()?,
        })
    }
}

/// Largest number of images of a training set that [`evaluate`] visits (evenly spaced through
/// the set); held-out sets are evaluated whole.
pub const MAX_TRAIN_EVAL_IMAGES: usize = 10_000;

/// Evaluates `model` on `set` in batches of `batch` (no gradients, EMA frozen): on every image,
/// or on `limit` evenly spaced ones when the set is larger. Samples that fail to decode are left
/// out and listed in [`EvalMetrics::skipped`].
///
/// # Errors
/// Model errors; none of the chosen samples decodes.
pub fn evaluate(
    model: &mut VqAutoencoder,
    set: &ImageSet,
    limit: Option<usize>,
    batch: usize,
    device: Device,
    nets: &EvalNets,
    scope: Perceptual,
) -> Result<EvalMetrics> {
    let inception = match scope {
        Perceptual::All => nets.inception.as_ref(),
        Perceptual::LpipsOnly => None,
    };
    let total = set.len();
    let n = limit.map_or(total, |l| l.min(total));
    let chosen: Vec<i64> = (0..n).map(|i| (i * total / n.max(1)) as i64).collect();
    let _guard = tch::no_grad_guard();
    let mut sums = Sums::default();
    for idx in chosen.chunks(batch.max(1)) {
        let (x, bad) = set.decodable_batch(idx, device)?;
        sums.skipped.extend(bad);
        if let Some(x) = x {
            sums.add(model, &x, nets.lpips.as_ref(), inception)?;
        }
    }
    if sums.decoded == 0 && n > 0 {
        bail!(
            "none of the {n} samples evaluated decodes (first: {})",
            sums.skipped.first().map_or("?", |b| b.error.as_str())
        );
    }
    sums.finish(model, set, nets.lpips.is_some(), inception.is_some())
}

/// What [`evaluate`] sums over its batches.
#[derive(Debug, Default)]
struct Sums {
    mse: f64,
    l1: f64,
    qe: f64,
    lpips: f64,
    power: f64,
    feats_x: Vec<Tensor>,
    feats_r: Vec<Tensor>,
    logits_r: Vec<Tensor>,
    codes: Vec<u32>,
    /// Code slots per image.
    per_image: usize,
    skipped: Vec<BadSample>,
    decoded: usize,
}

impl Sums {
    /// One batch `x` through the model (and the perceptual networks given).
    fn add(
        &mut self,
        model: &mut VqAutoencoder,
        x: &Tensor,
        lpips: Option<&Lpips>,
        inception: Option<&FidInception>,
    ) -> Result<()> {
        let quantizer = model.config().quantizer;
        let b = x.size()[0];
        self.decoded += b as usize;
        let out = model.forward(x, Mode::Eval)?;
        let w = b as f64;
        let stats = Tensor::stack(
            &[
                out.reconstruction.mse_loss(x, Reduction::Mean),
                out.reconstruction.l1_loss(x, Reduction::Mean),
                out.vq.quantization_error.shallow_clone(),
                out.vq.latent_power.shallow_clone(),
            ],
            0,
        )
        .to_kind(Kind::Double)
        .to_device(Device::Cpu);
        let [mse, l1, qe, power] = <[f64; 4]>::try_from(Vec::<f64>::try_from(stats)?)
            .map_err(|v| anyhow::anyhow!("expected 4 batch statistics, got {}", v.len()))?;
        if let Some(net) = lpips {
            let (fx, fr) = (frames_as_images(x), frames_as_images(&out.reconstruction));
            // Per sample: the mean over its frames (one frame for images).
            let per_frame = fx.size()[0] as f64 / x.size()[0] as f64;
            self.lpips += f64::try_from(net.forward(&fx, &fr).sum(Kind::Double))? / per_frame;
        }
        if let Some(net) = inception {
            let (fx, _) = net.forward(&frames_as_images(x));
            let (fr, logits) = net.forward(&frames_as_images(&out.reconstruction));
            self.feats_x.push(fx.to_device(Device::Cpu));
            self.feats_r.push(fr.to_device(Device::Cpu));
            self.logits_r.push(logits.to_device(Device::Cpu));
        }
        self.mse += mse * w;
        self.l1 += l1 * w;
        self.qe += qe * w;
        self.power += power * w;
        let flat = crate::metrics::code_slots(&out.vq.indices, &quantizer).reshape([b, -1]);
        self.per_image = flat.size()[1] as usize;
        self.codes.extend(
            Vec::<i64>::try_from(flat.reshape([-1]).to_device(Device::Cpu))?
                .into_iter()
                .map(|i| i as u32),
        );
        Ok(())
    }

    /// The metrics of the images summed.
    fn finish(
        self,
        model: &VqAutoencoder,
        set: &ImageSet,
        lpips: bool,
        inception: bool,
    ) -> Result<EvalMetrics> {
        let quantizer = model.config().quantizer;
        let k = crate::metrics::code_slot_count(&quantizer);
        let groups = quantizer.family.code_groups();
        let counts = vq_core::code_counts(&self.codes, k)?;
        let nf = self.decoded.max(1) as f64;
        let cat = |t: &[Tensor]| Tensor::cat(t, 0);
        Ok(EvalMetrics {
            images: self.decoded,
            rec_mse: self.mse / nf,
            rec_l1: self.l1 / nf,
            usage: vq_core::codebook_usage(&self.codes, k, 256 * self.per_image.max(1))?,
            usage_total: counts.iter().filter(|&&c| c > 0).count() as f64 / k as f64,
            perplexity: vq_core::family::mean_group_perplexity(&counts, groups),
            groups: match quantizer.family.group_axis() {
                Some(g) => vq_core::family::group_usage(&counts, g)
                    .into_iter()
                    .zip(vq_core::family::group_perplexities(&counts, g))
                    .map(|(usage, perplexity)| GroupMetrics { usage, perplexity })
                    .collect(),
                None => Vec::new(),
            },
            quantization_error: self.qe / nf,
            relative_quantization_error: self.qe / self.power.max(f64::MIN_POSITIVE),
            lpips: lpips.then(|| self.lpips / nf),
            rfid: inception.then(|| frechet_distance(&cat(&self.feats_x), &cat(&self.feats_r))),
            ris: inception.then(|| inception_score(&cat(&self.logits_r), 10).0),
            skipped: self.skipped,
            left_out: set.left_out().iter().map(|l| l.why.clone()).collect(),
        })
    }
}
