//! The VQGAN adversarial parts (taming-transformers `taming/modules/discriminator/model.py` and
//! `taming/modules/losses/vqperceptual.py`, and enhancing-transformers' variant for ViT-VQGAN):
//! the discriminators, the GAN losses, and the adaptive weight of the generator's adversarial
//! term.

use std::sync::Arc;

use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};
use vq_dist::ProcessGroup;

use crate::error::{ModelError, Result};
use crate::stylegan::{
    StyleDiscriminator, StyleDiscriminatorConfig, vanilla_d_loss, vanilla_g_loss,
};

/// Which discriminator a VQGAN trains against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscriminatorKind {
    /// taming's PatchGAN (`in_channels`, `ndf`, `n_layers` of [`GanConfig`]).
    #[default]
    PatchGan,
    /// enhancing-transformers' StyleGAN2-type discriminator.
    StyleGan(StyleDiscriminatorConfig),
}

/// The GAN objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdversarialLoss {
    /// Hinge loss for D, `−mean D(x̃)` for G (taming).
    #[default]
    Hinge,
    /// Non-saturating log-sigmoid losses (enhancing-transformers' "vanilla").
    Vanilla,
}

/// How the generator's adversarial term is weighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdversarialWeighting {
    /// `disc_weight · ‖∇nll‖ / (‖∇g‖ + 1e-4)` on the decoder's last layer ([`adaptive_weight`]).
    #[default]
    Adaptive,
    /// `disc_weight` alone.
    Fixed,
}

/// The lazy R1 penalty on the discriminator: every `every` discriminator steps,
/// `γ · every / 2 · mean‖∇ₓD(x)‖²` on real images is added to its loss.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct R1Penalty {
    /// γ.
    pub gamma: f64,
    /// Steps between penalties.
    pub every: usize,
}

fn one() -> f64 {
    1.0
}

/// Shape of the discriminator and the weights of the VQGAN loss. The fields after
/// `disc_lr_multiplier` default to taming's choices (PatchGAN, hinge, adaptive weight, L1
/// reconstruction, no R1).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GanConfig {
    /// Image channels.
    pub in_channels: usize,
    /// Base width `ndf`.
    pub ndf: usize,
    /// Stride-2 layers (taming default 3; the latent-diffusion f8 model uses 2).
    pub n_layers: usize,
    /// First optimiser step at which the adversarial terms are on (taming `disc_start`).
    pub disc_start: usize,
    /// Multiplier of the adaptive weight (taming `disc_weight`).
    pub disc_weight: f64,
    /// Weight of the quantizer's loss terms in the generator loss (taming `codebook_weight`).
    pub codebook_weight: f64,
    /// Weight of LPIPS in the reconstruction term (taming `perceptual_weight`; needs weights).
    pub perceptual_weight: f64,
    /// Discriminator learning rate as a multiple of the generator's (taming: 1).
    pub disc_lr_multiplier: f64,
    /// The discriminator architecture.
    #[serde(default)]
    pub discriminator: DiscriminatorKind,
    /// The GAN objective.
    #[serde(default)]
    pub adversarial_loss: AdversarialLoss,
    /// Adaptive or fixed adversarial weight.
    #[serde(default)]
    pub adversarial_weighting: AdversarialWeighting,
    /// Weight of `mean|x − x̃|` in the reconstruction term (enhancing-transformers'
    /// "log-Laplace" term; taming: 1).
    #[serde(default = "one")]
    pub l1_weight: f64,
    /// Weight of `mean (x − x̃)²` (the "log-Gaussian" term; taming: 0).
    #[serde(default)]
    pub l2_weight: f64,
    /// R1 penalty of the discriminator (enhancing-transformers), if any.
    #[serde(default)]
    pub r1: Option<R1Penalty>,
}

impl GanConfig {
    /// Checks the shape once.
    ///
    /// # Errors
    /// [`ModelError::Config`] naming the bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, why: &str| {
            Err(ModelError::Config {
                field,
                why: why.to_owned(),
            })
        };
        if self.in_channels == 0 || self.ndf == 0 {
            return bad("discriminator", "in_channels and ndf must be > 0");
        }
        if self.n_layers == 0 {
            return bad("n_layers", "must be > 0");
        }
        for (field, v) in [
            ("disc_weight", self.disc_weight),
            ("codebook_weight", self.codebook_weight),
            ("perceptual_weight", self.perceptual_weight),
            ("disc_lr_multiplier", self.disc_lr_multiplier),
            ("l1_weight", self.l1_weight),
            ("l2_weight", self.l2_weight),
            ("r1", self.r1.map_or(0.0, |r| r.gamma)),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, "must be finite and >= 0");
            }
        }
        if self.r1.is_some_and(|r| r.every == 0) {
            return bad("r1", "every must be > 0");
        }
        if let DiscriminatorKind::StyleGan(s) = &self.discriminator {
            s.validate()?;
        }
        Ok(())
    }

    /// The discriminator's loss on real and reconstructed logits.
    pub fn d_loss(&self, logits_real: &Tensor, logits_fake: &Tensor) -> Tensor {
        match self.adversarial_loss {
            AdversarialLoss::Hinge => hinge_d_loss(logits_real, logits_fake),
            AdversarialLoss::Vanilla => vanilla_d_loss(logits_real, logits_fake),
        }
    }

    /// The generator's adversarial loss on reconstructed logits.
    pub fn g_loss(&self, logits_fake: &Tensor) -> Tensor {
        match self.adversarial_loss {
            AdversarialLoss::Hinge => generator_loss(logits_fake),
            AdversarialLoss::Vanilla => vanilla_g_loss(logits_fake),
        }
    }

    /// The name of [`Self::pixel_loss`]'s terms: "L1", "L2" or "L1 + L2".
    #[must_use]
    pub fn pixel_loss_name(&self) -> &'static str {
        match (self.l1_weight > 0.0, self.l2_weight > 0.0) {
            (true, true) => "L1 + L2",
            (false, true) => "L2",
            _ => "L1",
        }
    }

    /// The reconstruction term `l1·mean|x − x̃| + l2·mean (x − x̃)²` (perceptual term apart).
    pub fn pixel_loss(&self, x: &Tensor, rec: &Tensor) -> Tensor {
        let d = x - rec;
        let mut loss = d.abs().mean(Kind::Float) * self.l1_weight;
        if self.l2_weight > 0.0 {
            loss += d.square().mean(Kind::Float) * self.l2_weight;
        }
        loss
    }
}

/// A VQGAN discriminator of either kind.
#[derive(Debug)]
pub enum Discriminator {
    /// taming's PatchGAN.
    Patch(PatchDiscriminator),
    /// The StyleGAN2-type one.
    Style(StyleDiscriminator),
}

impl Discriminator {
    /// Builds the configured discriminator under `p`.
    ///
    /// # Errors
    /// [`ModelError::Config`] for an invalid config.
    pub fn new(p: &nn::Path, cfg: &GanConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(match &cfg.discriminator {
            DiscriminatorKind::PatchGan => Self::Patch(PatchDiscriminator::new(p, cfg)?),
            DiscriminatorKind::StyleGan(s) => {
                Self::Style(StyleDiscriminator::new(p, s, cfg.in_channels)?)
            }
        })
    }

    /// Trains data-parallel in `group` (or alone with `None`): the PatchGAN's batch
    /// normalisation then uses the statistics of every rank's batch together (torch's
    /// `SyncBatchNorm`), so N ranks compute what one process computes on the union batch. (The
    /// StyleGAN2-type discriminator has no batch statistics.)
    pub fn set_process_group(&mut self, group: Option<Arc<ProcessGroup>>) {
        if let Self::Patch(d) = self {
            d.group = group;
        }
    }

    /// [`forward_t`](ModuleT::forward_t) that reports a failed collective of synchronised batch
    /// statistics as an error.
    ///
    /// # Errors
    /// [`ModelError::Dist`].
    pub fn try_forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Patch(d) => d.try_forward_t(x, train),
            Self::Style(d) => Ok(d.forward(x)),
        }
    }
}

impl ModuleT for Discriminator {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Self::Patch(d) => d.forward_t(x, train),
            Self::Style(d) => d.forward(x),
        }
    }
}

/// PatchGAN discriminator: Conv4×4/2 + LeakyReLU(0.2), then `n_layers − 1` blocks of
/// Conv4×4/2 (no bias) + BatchNorm + LeakyReLU with widths `ndf·min(2ⁿ, 8)`, one such block with
/// stride 1, and a 4×4 convolution to one logit per patch. Weights N(0, 0.02), BatchNorm scales
/// N(1, 0.02) (taming's `weights_init`). Variable names `main.{i}.*` as taming's `nn.Sequential`.
///
/// ```
/// use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
/// use vq_models::{PatchDiscriminator, Preset};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let d = PatchDiscriminator::new(&vs.root(), &Preset::VqganF16Imagenet.gan().unwrap()).unwrap();
/// let logits = d.forward_t(&Tensor::zeros([1, 3, 64, 64], (Kind::Float, Device::Cpu)), false);
/// assert_eq!(logits.size(), [1, 1, 6, 6]);
/// ```
#[derive(Debug)]
pub struct PatchDiscriminator {
    convs: Vec<nn::Conv2D>,
    norms: Vec<Option<nn::BatchNorm>>,
    group: Option<Arc<ProcessGroup>>,
}

impl PatchDiscriminator {
    /// Builds the discriminator's variables under `p`.
    ///
    /// # Errors
    /// [`ModelError::Config`] for an invalid config.
    pub fn new(p: &nn::Path, cfg: &GanConfig) -> Result<Self> {
        cfg.validate()?;
        let conv_init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let conv = |i: usize, cin: usize, cout: usize, stride: i64, bias: bool| {
            nn::conv2d(
                p / "main" / i,
                cin as i64,
                cout as i64,
                4,
                nn::ConvConfig {
                    stride,
                    padding: 1,
                    bias,
                    ws_init: conv_init,
                    bs_init: nn::Init::Const(0.0),
                    ..Default::default()
                },
            )
        };
        let bn = |i: usize, c: usize| {
            Some(nn::batch_norm2d(
                p / "main" / i,
                c as i64,
                nn::BatchNormConfig {
                    ws_init: nn::Init::Randn {
                        mean: 1.0,
                        stdev: 0.02,
                    },
                    bs_init: nn::Init::Const(0.0),
                    ..Default::default()
                },
            ))
        };
        let ndf = cfg.ndf;
        let mut convs = vec![conv(0, cfg.in_channels, ndf, 2, true)];
        let mut norms = vec![None];
        // Sequential indices: conv, lrelu, then (conv, bn, lrelu) per block, then the last conv.
        let mut idx = 2;
        let mut mult = 1;
        for n in 1..=cfg.n_layers {
            let prev = mult;
            mult = (1 << n).min(8);
            let stride = if n < cfg.n_layers { 2 } else { 1 };
            convs.push(conv(idx, ndf * prev, ndf * mult, stride, false));
            norms.push(bn(idx + 1, ndf * mult));
            idx += 3;
        }
        convs.push(conv(idx, ndf * mult, 1, 1, true));
        norms.push(None);
        Ok(Self {
            convs,
            norms,
            group: None,
        })
    }

    /// The forward pass; in training mode inside a process group the batch statistics are the
    /// group's ([`sync_batch_norm`]).
    ///
    /// # Errors
    /// [`ModelError::Dist`] if a collective fails.
    pub fn try_forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let last = self.convs.len() - 1;
        let mut h = x.shallow_clone();
        for (i, (conv, norm)) in self.convs.iter().zip(&self.norms).enumerate() {
            h = h.apply(conv);
            if let Some(bn) = norm {
                h = match (&self.group, train) {
                    (Some(g), true) => sync_batch_norm(&h, bn, g)?,
                    _ => h.apply_t(bn, train),
                };
            }
            if i != last {
                // LeakyReLU(0.2) = max(x, 0.2x).
                h = h.maximum(&(&h * 0.2));
            }
        }
        Ok(h)
    }
}

/// `BatchNormConfig::default()`'s ε and momentum, which the PatchGAN's layers use (PyTorch's).
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// Training-mode batch normalisation of `x` (B, C, H, W) with the statistics of the whole
/// data-parallel batch, as torch's `SyncBatchNorm`: over all ranks' elements of each channel,
/// n = Σ_r n_r, μ = Σ_r Σ x / n, σ² = Σ_r Σ (x − μ)² / n (two passes, each one differentiable
/// all-reduce, so the backward is the one of the union batch), y = (x − μ)/√(σ² + ε)·γ + β; the
/// running statistics move by the momentum towards μ and the unbiased n/(n−1)·σ², on every rank
/// alike.
///
/// # Errors
/// [`ModelError::Dist`] if a collective fails.
pub fn sync_batch_norm(x: &Tensor, bn: &nn::BatchNorm, group: &ProcessGroup) -> Result<Tensor> {
    let c = x.size()[1];
    let dims = [0i64, 2, 3];
    let local = (x.numel() as i64 / c.max(1)) as f64;
    let to_group = |t: Tensor| t.to_device(group.device());
    let back = |t: Tensor| t.to_device(x.device());
    let counts = Tensor::from_slice(&[local as f32]).to_device(x.device());
    let sums = Tensor::cat(
        &[x.sum_dim_intlist(&dims[..], false, Kind::Float), counts],
        0,
    );
    let sums = back(group.all_reduce_sum_autograd(&to_group(sums))?);
    let n = f64::try_from(sums.get(c)).unwrap_or(f64::NAN);
    let mean = sums.narrow(0, 0, c) / n;
    let centred = x - mean.view([1, c, 1, 1]);
    let m2 = centred
        .square()
        .sum_dim_intlist(&dims[..], false, Kind::Float);
    let var = back(group.all_reduce_sum_autograd(&to_group(m2))?) / n;
    let mut y = &centred * (&var + BN_EPS).rsqrt().view([1, c, 1, 1]);
    if let Some(w) = &bn.ws {
        y = &y * w.view([1, c, 1, 1]);
    }
    if let Some(b) = &bn.bs {
        y = &y + b.view([1, c, 1, 1]);
    }
    tch::no_grad(|| {
        let (mut rm, mut rv) = (
            bn.running_mean.shallow_clone(),
            bn.running_var.shallow_clone(),
        );
        let unbiased = var.detach() * (n / (n - 1.0).max(1.0));
        let _ = rm
            .g_mul_scalar_(1.0 - BN_MOMENTUM)
            .g_add_(&(mean.detach() * BN_MOMENTUM));
        let _ = rv
            .g_mul_scalar_(1.0 - BN_MOMENTUM)
            .g_add_(&(unbiased * BN_MOMENTUM));
    });
    Ok(y)
}

impl ModuleT for PatchDiscriminator {
    /// The forward pass with this rank's own batch statistics (see
    /// [`try_forward_t`](PatchDiscriminator::try_forward_t) for the synchronised one).
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let last = self.convs.len() - 1;
        let mut h = x.shallow_clone();
        for (i, (conv, norm)) in self.convs.iter().zip(&self.norms).enumerate() {
            h = h.apply(conv);
            if let Some(bn) = norm {
                h = h.apply_t(bn, train);
            }
            if i != last {
                // LeakyReLU(0.2) = max(x, 0.2x).
                h = h.maximum(&(&h * 0.2));
            }
        }
        h
    }
}

/// Hinge loss of the discriminator: `½(mean(relu(1 − D(x))) + mean(relu(1 + D(x̃))))`.
///
/// ```
/// use tch::Tensor;
/// let l = vq_models::hinge_d_loss(&Tensor::from_slice(&[2.0f32]), &Tensor::from_slice(&[0.0f32]));
/// assert_eq!(f64::try_from(l).unwrap(), 0.5); // real side 0, fake side 1
/// ```
pub fn hinge_d_loss(logits_real: &Tensor, logits_fake: &Tensor) -> Tensor {
    let real = (logits_real.neg() + 1.0).relu().mean(Kind::Float);
    let fake = (logits_fake + 1.0).relu().mean(Kind::Float);
    (real + fake) * 0.5
}

/// Generator adversarial loss `−mean(D(x̃))`.
pub fn generator_loss(logits_fake: &Tensor) -> Tensor {
    -logits_fake.mean(Kind::Float)
}

/// taming's adaptive weight `disc_weight · ‖∇_w nll‖ / (‖∇_w g‖ + 1e-4)`, clamped to
/// [0, 1e4] before the multiplier, with `w` the decoder's last layer weight. Both losses must
/// still have their graphs (they are kept).
///
/// # Errors
/// [`ModelError::Config`] if `w` is not reached by the losses.
pub fn adaptive_weight(
    nll: &Tensor,
    g_loss: &Tensor,
    last_layer: &Tensor,
    disc_weight: f64,
) -> Result<f64> {
    adaptive_weight_in(None, nll, g_loss, last_layer, disc_weight)
}

/// [`adaptive_weight`] of a data-parallel group: both gradients are averaged over the ranks
/// before their norms are taken, so every rank uses the weight that one process computes on the
/// union batch (taming under DDP uses each GPU's own). `None`: a single process.
///
/// # Errors
/// As [`adaptive_weight`]; [`ModelError::Dist`].
pub fn adaptive_weight_in(
    group: Option<&ProcessGroup>,
    nll: &Tensor,
    g_loss: &Tensor,
    last_layer: &Tensor,
    disc_weight: f64,
) -> Result<f64> {
    let w = adaptive_weight_tensor_in(group, nll, g_loss, last_layer, disc_weight)?;
    Ok(f64::try_from(w).unwrap_or(f64::NAN))
}

/// [`adaptive_weight_in`] as a 0-dim f64 tensor on the losses' device, computed there without
/// a read back to the host (the same f64 arithmetic on the two f32 norms; NaN stays NaN).
///
/// # Errors
/// As [`adaptive_weight_in`].
pub fn adaptive_weight_tensor_in(
    group: Option<&ProcessGroup>,
    nll: &Tensor,
    g_loss: &Tensor,
    last_layer: &Tensor,
    disc_weight: f64,
) -> Result<Tensor> {
    let grad = |loss: &Tensor| -> Result<Tensor> {
        let g = Tensor::f_run_backward(&[loss], &[last_layer], true, false).map_err(|e| {
            ModelError::Config {
                field: "adaptive_weight",
                why: format!("the loss does not reach the decoder's last layer: {e}"),
            }
        })?;
        let norm = match group {
            Some(group) => {
                let g0 = g[0].to_device(group.device()).contiguous();
                group.all_reduce_mean(std::slice::from_ref(&g0), vq_dist::DEFAULT_BUCKET_BYTES)?;
                g0.norm().to_device(last_layer.device())
            }
            None => g[0].norm(),
        };
        Ok(norm.to_kind(Kind::Double))
    };
    let (a, b) = (grad(nll)?, grad(g_loss)?);
    // clamp keeps NaN as f64::clamp does.
    Ok((a / (b + 1e-4)).clamp(0.0, 1e4) * disc_weight)
}
