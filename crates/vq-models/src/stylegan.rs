//! The StyleGAN2-type discriminator of ViT-VQGAN (enhancing-transformers'
//! `StyleDiscriminator`, after lucidrains' stylegan2-pytorch): residual blocks of
//! equalised-learning-rate convolutions with a [1, 3, 3, 1] blur before each stride-2
//! convolution, then an equalised 3×3 convolution and two equalised linear layers to one logit
//! per image. Also the non-saturating ("vanilla") GAN losses and the R1 penalty it trains with.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};

/// Shape of a [`StyleDiscriminator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StyleDiscriminatorConfig {
    /// Input side length (a power of two ≥ 4).
    pub image_size: usize,
    /// Width multiplier: block `i` has `min(4 · capacity · 2^i, fmap_max)` channels.
    pub network_capacity: usize,
    /// Channel cap.
    pub fmap_max: usize,
}

impl StyleDiscriminatorConfig {
    /// enhancing-transformers' defaults for 256² images: capacity 16, at most 512 channels.
    pub const VIT_VQGAN: Self = Self {
        image_size: 256,
        network_capacity: 16,
        fmap_max: 512,
    };

    /// Channel widths `[3, f₀, …, f_L]` (`L = log₂(size) − 1` downsampling blocks plus one).
    pub fn filters(&self, channels: usize) -> Vec<usize> {
        let layers = self.image_size.trailing_zeros() as usize - 1;
        std::iter::once(channels)
            .chain((0..=layers).map(|i| (self.network_capacity * 4 * (1 << i)).min(self.fmap_max)))
            .collect()
    }

    /// Checks the shape once.
    ///
    /// # Errors
    /// [`ModelError::Config`] naming the bad field.
    pub fn validate(&self) -> Result<()> {
        if !self.image_size.is_power_of_two() || self.image_size < 4 {
            return Err(ModelError::Config {
                field: "image_size",
                why: format!("{} must be a power of two ≥ 4", self.image_size),
            });
        }
        if self.network_capacity == 0 || self.fmap_max == 0 {
            return Err(ModelError::Config {
                field: "network_capacity",
                why: "network_capacity and fmap_max must be > 0".into(),
            });
        }
        Ok(())
    }
}

/// A convolution whose N(0, 1) weights are scaled by `1/√(fan_in)` at run time (equalised
/// learning rate); optional LeakyReLU(0.2)·√2.
#[derive(Debug)]
struct EqualConv {
    weight: Tensor,
    bias: Tensor,
    scale: f64,
    stride: i64,
    padding: i64,
    activation: bool,
}

impl EqualConv {
    fn new(
        p: &nn::Path,
        cin: usize,
        cout: usize,
        k: usize,
        stride: i64,
        padding: i64,
        activation: bool,
    ) -> Self {
        let (cin, cout, k) = (cin as i64, cout as i64, k as i64);
        Self {
            weight: p.var(
                "weight",
                &[cout, cin, k, k],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            ),
            bias: p.var("bias", &[cout], nn::Init::Const(0.0)),
            scale: 1.0 / ((cin * k * k) as f64).sqrt(),
            stride,
            padding,
            activation,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.conv2d(
            &(&self.weight * self.scale),
            Some(&self.bias),
            [self.stride],
            [self.padding],
            [1],
            1,
        );
        if self.activation { leaky(&y) } else { y }
    }
}

/// LeakyReLU(0.2) · √2.
fn leaky(x: &Tensor) -> Tensor {
    x.maximum(&(x * 0.2)) * std::f64::consts::SQRT_2
}

#[derive(Debug)]
struct EqualLinear {
    weight: Tensor,
    bias: Tensor,
    scale: f64,
    activation: bool,
}

impl EqualLinear {
    fn new(p: &nn::Path, din: usize, dout: usize, activation: bool) -> Self {
        Self {
            weight: p.var(
                "weight",
                &[dout as i64, din as i64],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            ),
            bias: p.var("bias", &[dout as i64], nn::Init::Const(0.0)),
            scale: 1.0 / (din as f64).sqrt(),
            activation,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.linear(&(&self.weight * self.scale), Some(&self.bias));
        if self.activation { leaky(&y) } else { y }
    }
}

/// The normalised [1, 3, 3, 1]ᵀ[1, 3, 3, 1] blur, per channel, with reflection padding
/// (1 before, 2 after: kornia's `filter2d(..., border_type="reflect")` for an even kernel).
fn blur(x: &Tensor) -> Tensor {
    let c = x.size()[1];
    let k1 = Tensor::from_slice(&[1f32, 3., 3., 1.]).to_device(x.device());
    let k = (k1.view([4, 1]) * k1.view([1, 4])) / 64.0;
    let k = k.to_kind(x.kind()).view([1, 1, 4, 4]).repeat([c, 1, 1, 1]);
    x.reflection_pad2d([1, 2, 1, 2])
        .conv2d(&k, None::<Tensor>, [1], [0], [1], c)
}

#[derive(Debug)]
struct StyleBlock {
    conv_res: EqualConv,
    conv1: EqualConv,
    conv2: EqualConv,
    down: Option<EqualConv>,
}

impl StyleBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        let res = self.conv_res.forward(x);
        let mut h = self.conv2.forward(&self.conv1.forward(x));
        if let Some(down) = &self.down {
            h = down.forward(&blur(&h));
        }
        (h + res) * std::f64::consts::FRAC_1_SQRT_2
    }
}

/// The StyleGAN2-type discriminator: image `(B, 3, S, S)` → logits `(B)`. Variable names follow
/// enhancing-transformers (`blocks.{i}.conv_res.*`, `blocks.{i}.net.{0,1}.*`,
/// `blocks.{i}.downsample.1.*`, `final_conv.*`, `final_linear.{0,1}.*`).
///
/// ```
/// use tch::{nn, nn::Module, Device, Kind, Tensor};
/// use vq_models::{StyleDiscriminator, StyleDiscriminatorConfig};
/// let vs = nn::VarStore::new(Device::Cpu);
/// let cfg = StyleDiscriminatorConfig { image_size: 16, network_capacity: 2, fmap_max: 32 };
/// let d = StyleDiscriminator::new(&vs.root(), &cfg, 3).unwrap();
/// assert_eq!(d.forward(&Tensor::zeros([5, 3, 16, 16], (Kind::Float, Device::Cpu))).size(), [5]);
/// ```
#[derive(Debug)]
pub struct StyleDiscriminator {
    blocks: Vec<StyleBlock>,
    final_conv: EqualConv,
    linear1: EqualLinear,
    linear2: EqualLinear,
}

impl StyleDiscriminator {
    /// Builds the variables under `p` for `channels`-channel images.
    ///
    /// # Errors
    /// [`ModelError::Config`] for an invalid config.
    pub fn new(p: &nn::Path, cfg: &StyleDiscriminatorConfig, channels: usize) -> Result<Self> {
        cfg.validate()?;
        let filters = cfg.filters(channels);
        let pairs: Vec<(usize, usize)> = filters.windows(2).map(|w| (w[0], w[1])).collect();
        let blocks = pairs
            .iter()
            .enumerate()
            .map(|(i, &(cin, cout))| {
                let b = p / "blocks" / i;
                let downsample = i + 1 != pairs.len();
                StyleBlock {
                    conv_res: EqualConv::new(
                        &(&b / "conv_res"),
                        cin,
                        cout,
                        1,
                        if downsample { 2 } else { 1 },
                        0,
                        false,
                    ),
                    conv1: EqualConv::new(&(&b / "net" / "0"), cin, cout, 3, 1, 1, true),
                    conv2: EqualConv::new(&(&b / "net" / "1"), cout, cout, 3, 1, 1, true),
                    down: downsample.then(|| {
                        EqualConv::new(&(&b / "downsample" / "1"), cout, cout, 3, 2, 1, false)
                    }),
                }
            })
            .collect();
        let last = *filters.last().expect("at least two entries");
        Ok(Self {
            blocks,
            final_conv: EqualConv::new(&(p / "final_conv"), last, last, 3, 1, 1, true),
            linear1: EqualLinear::new(&(p / "final_linear" / "0"), last * 4, last, true),
            linear2: EqualLinear::new(&(p / "final_linear" / "1"), last, 1, false),
        })
    }
}

impl Module for StyleDiscriminator {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for b in &self.blocks {
            h = b.forward(&h);
        }
        let h = self.final_conv.forward(&h);
        let b = h.size()[0];
        self.linear2
            .forward(&self.linear1.forward(&h.reshape([b, -1])))
            .view([b])
    }
}

/// Non-saturating discriminator loss `½(mean softplus(−D(x)) + mean softplus(D(x̃)))`
/// (= `−½(mean log σ(D(x)) + mean log(1 − σ(D(x̃))))`, enhancing-transformers' `vanilla_d_loss`).
pub fn vanilla_d_loss(logits_real: &Tensor, logits_fake: &Tensor) -> Tensor {
    (logits_real.neg().softplus().mean(Kind::Float) + logits_fake.softplus().mean(Kind::Float))
        * 0.5
}

/// Non-saturating generator loss `mean softplus(−D(x̃))` (= `−mean log σ(D(x̃))`).
pub fn vanilla_g_loss(logits_fake: &Tensor) -> Tensor {
    logits_fake.neg().softplus().mean(Kind::Float)
}

/// The R1 penalty `mean_b ‖∇ₓ Σ D(x)‖²` over the batch, differentiable (for the
/// discriminator's step). `x` must require gradients and `logits` come from it.
///
/// # Errors
/// [`ModelError::Config`] if `logits` does not depend on `x`.
pub fn r1_penalty(logits: &Tensor, x: &Tensor) -> Result<Tensor> {
    let g = Tensor::f_run_backward(&[logits.sum(Kind::Float)], &[x], true, true).map_err(|e| {
        ModelError::Config {
            field: "r1",
            why: format!("the logits do not depend on the images: {e}"),
        }
    })?;
    Ok(g[0]
        .square()
        .flatten(1, -1)
        .sum_dim_intlist(1, false, Kind::Float)
        .mean(Kind::Float))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn widths_and_names_follow_the_reference() {
        assert_eq!(
            StyleDiscriminatorConfig::VIT_VQGAN.filters(3),
            [3, 64, 128, 256, 512, 512, 512, 512, 512]
        );
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = StyleDiscriminatorConfig {
            image_size: 8,
            network_capacity: 1,
            fmap_max: 8,
        };
        let d = StyleDiscriminator::new(&vs.root(), &cfg, 3).unwrap();
        let v = vs.variables();
        for n in [
            "blocks.0.conv_res.weight",
            "blocks.0.net.1.bias",
            "blocks.1.downsample.1.weight",
            "final_linear.1.weight",
        ] {
            assert!(v.contains_key(n), "{n}");
        }
        // The last block does not downsample.
        assert!(!v.contains_key("blocks.2.downsample.1.weight"));
        let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let logits = d.forward(&x);
        assert_eq!(logits.size(), [2]);
        let r1 = r1_penalty(&logits, &x).unwrap();
        assert!(f64::try_from(&r1).unwrap() > 0.0);
        r1.backward();
        assert!(v["final_conv.weight"].grad().defined());
    }

    #[test]
    fn blur_keeps_constants_and_the_size() {
        let x = Tensor::full([1, 2, 6, 6], 3.0, (Kind::Float, Device::Cpu));
        let y = blur(&x);
        assert_eq!(y.size(), [1, 2, 6, 6]);
        assert!(f64::try_from((y - 3.0).abs().max()).unwrap() < 1e-6);
    }

    #[test]
    fn vanilla_losses_equal_their_log_sigmoid_forms() {
        let r = Tensor::from_slice(&[0.3f32, -1.2]);
        let f = Tensor::from_slice(&[2.0f32, -0.5]);
        let sig = |t: &Tensor| t.sigmoid();
        let want = -((sig(&r).log().mean(Kind::Float))
            + (sig(&f).neg() + 1.0).log().mean(Kind::Float))
            * 0.5;
        assert!(f64::try_from((vanilla_d_loss(&r, &f) - want).abs()).unwrap() < 1e-6);
        let want = -sig(&f).log().mean(Kind::Float);
        assert!(f64::try_from((vanilla_g_loss(&f) - want).abs()).unwrap() < 1e-6);
    }
}
