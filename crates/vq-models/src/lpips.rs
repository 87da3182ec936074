//! LPIPS (Zhang et al. 2018, the `lpips` package, `net='vgg'`, version 0.1), the perceptual
//! distance of the VQGAN losses and of the evaluation tables.
//!
//! The pretrained weights cannot be shipped; load them from a safetensors file holding
//! torchvision's VGG16 `features.{i}.{weight,bias}` (i = 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24,
//! 26, 28) and the five linear heads `lin{k}.weight` (shape (1, C_k, 1, 1)), float32, nothing
//! else. `cargo xtask download-weights lpips` downloads the public files and writes it without
//! Python (`vq_weights::convert::lpips`); or, from PyTorch (with the `lpips`, `torchvision` and
//! `safetensors` packages):
//!
//! ```text
//! import lpips, torchvision
//! from safetensors.torch import save_file
//! m = lpips.LPIPS(net="vgg")
//! sd = {f"features.{k}": v for k, v in
//!       torchvision.models.vgg16(weights="IMAGENET1K_V1").features.state_dict().items()}
//! sd.update({f"lin{i}.weight": getattr(m, f"lin{i}").model[1].weight for i in range(5)})
//! save_file({k: v.contiguous() for k, v in sd.items()}, "lpips_vgg.safetensors")
//! ```

use std::path::Path;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// VGG16 convolutions: (features index, in, out); a ReLU follows each, max-pooling after the
/// convolutions at indices 2, 7, 14, 21.
const VGG: [(usize, i64, i64); 13] = [
    (0, 3, 64),
    (2, 64, 64),
    (5, 64, 128),
    (7, 128, 128),
    (10, 128, 256),
    (12, 256, 256),
    (14, 256, 256),
    (17, 256, 512),
    (19, 512, 512),
    (21, 512, 512),
    (24, 512, 512),
    (26, 512, 512),
    (28, 512, 512),
];
/// Feature taps (after the ReLU of these convolutions) and their channels.
const TAPS: [(usize, i64); 5] = [(2, 64), (7, 128), (14, 256), (21, 512), (28, 512)];

/// The LPIPS network.
#[derive(Debug)]
pub struct Lpips {
    convs: Vec<(usize, nn::Conv2D)>,
    lins: Vec<nn::Conv2D>,
}

impl Lpips {
    /// Builds the network on `device` and loads `weights` (see the module docs for the layout);
    /// the weights are frozen.
    ///
    /// # Errors
    /// [`ModelError::Weights`](crate::ModelError::Weights) naming the file when it cannot be read, or naming the tensors
    /// that are missing, unexpected, mis-shaped or not float32.
    pub fn load(weights: &Path, device: Device) -> Result<Self> {
        let mut vs = nn::VarStore::new(device);
        let net = Self::new(&vs.root());
        crate::frozen::load(&mut vs, weights)?;
        Ok(net)
    }

    /// The network with its variables declared under `p` (tch's default initialisation; load
    /// pretrained values into the store, as [`load`](Self::load) does). Also gives the exact
    /// variable layout a weights file must have.
    pub fn new(p: &nn::Path) -> Self {
        let cfg = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let convs = VGG
            .iter()
            .map(|&(i, cin, cout)| (i, nn::conv2d(p / "features" / i, cin, cout, 3, cfg)))
            .collect();
        let lin_cfg = nn::ConvConfig {
            bias: false,
            ..Default::default()
        };
        let lins = TAPS
            .iter()
            .enumerate()
            .map(|(k, &(_, c))| nn::conv2d(p / format!("lin{k}"), c, 1, 1, lin_cfg))
            .collect();
        Self { convs, lins }
    }

    /// The device the network lives on.
    pub fn device(&self) -> Device {
        self.lins[0].ws.device()
    }

    /// Distance per image, (B,), between `x` and `y` (B, 3 or 1, H, W) in [−1, 1] (grayscale is
    /// repeated to RGB): Σ_k mean_{h,w} lin_k((f̂_k(x) − f̂_k(y))²) with f̂ the channel-normalised
    /// VGG features after the scaling layer `(x − shift)/scale`.
    pub fn forward(&self, x: &Tensor, y: &Tensor) -> Tensor {
        let (fx, fy) = (self.features(x), self.features(y));
        let mut total: Option<Tensor> = None;
        for ((a, b), lin) in fx.iter().zip(&fy).zip(&self.lins) {
            let d = (normalise(a) - normalise(b)).square().apply(lin);
            let d = d
                .mean_dim([2i64, 3].as_slice(), false, Kind::Float)
                .squeeze_dim(1);
            total = Some(match total {
                Some(t) => t + d,
                None => d,
            });
        }
        total.expect("five taps")
    }

    fn features(&self, x: &Tensor) -> Vec<Tensor> {
        let x = if x.size()[1] == 1 {
            x.repeat([1, 3, 1, 1])
        } else {
            x.shallow_clone()
        };
        let opts = (Kind::Float, x.device());
        let shift = Tensor::from_slice(&[-0.030f32, -0.088, -0.188])
            .to_device(opts.1)
            .view([1, 3, 1, 1]);
        let scale = Tensor::from_slice(&[0.458f32, 0.448, 0.450])
            .to_device(opts.1)
            .view([1, 3, 1, 1]);
        let mut h = (x.to_kind(Kind::Float) - shift) / scale;
        let mut taps = Vec::with_capacity(TAPS.len());
        for (i, conv) in &self.convs {
            h = conv.forward(&h).relu();
            if TAPS.iter().any(|&(t, _)| t == *i) {
                taps.push(h.shallow_clone());
                if *i != 28 {
                    h = h.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
                }
            }
        }
        taps
    }
}

fn normalise(f: &Tensor) -> Tensor {
    f / (f
        .square()
        .sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
        .sqrt()
        + 1e-10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, tensors: &[(String, Tensor)]) -> std::path::PathBuf {
        let file =
            std::env::temp_dir().join(format!("lpips-{}-{name}.safetensors", std::process::id()));
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        Tensor::write_safetensors(&named, &file).unwrap();
        file
    }

    /// Random weights with the documented names, written to a file.
    fn weights_file(name: &str) -> std::path::PathBuf {
        let opts = (Kind::Float, Device::Cpu);
        let mut t = Vec::new();
        for &(i, cin, cout) in &VGG {
            t.push((
                format!("features.{i}.weight"),
                Tensor::randn([cout, cin, 3, 3], opts) * 0.1,
            ));
            t.push((
                format!("features.{i}.bias"),
                Tensor::full([cout], 0.01, opts),
            ));
        }
        for (k, &(_, c)) in TAPS.iter().enumerate() {
            t.push((
                format!("lin{k}.weight"),
                Tensor::rand([1, c, 1, 1], opts) * 0.1,
            ));
        }
        write(name, &t)
    }

    #[test]
    fn distance_is_zero_on_equal_images_symmetric_and_positive() {
        let file = weights_file("props");
        let lp = Lpips::load(&file, Device::Cpu).unwrap();
        std::fs::remove_file(&file).unwrap();
        let x = Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let y = Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let d_xx = lp.forward(&x, &x);
        assert_eq!(d_xx.size(), [2]);
        assert!(f64::try_from(d_xx.abs().max()).unwrap() < 1e-6);
        let (a, b) = (lp.forward(&x, &y), lp.forward(&y, &x));
        assert!(f64::try_from((&a - &b).abs().max()).unwrap() < 1e-5);
        assert!(f64::try_from(a.min()).unwrap() > 0.0);
        // Grayscale is repeated to RGB.
        let g = x.narrow(1, 0, 1);
        let d = lp.forward(&g, &g.repeat([1, 3, 1, 1]));
        assert!(f64::try_from(d.abs().max()).unwrap() < 1e-6);
        // Gradients reach the input (it is used as a training loss).
        let z = y.set_requires_grad(true);
        lp.forward(&x, &z).sum(Kind::Float).backward();
        assert!(f64::try_from(z.grad().abs().sum(Kind::Float)).unwrap() > 0.0);
    }

    #[test]
    fn a_file_without_the_heads_is_refused_with_its_name() {
        let file = write(
            "bad",
            &[(
                "features.0.weight".to_owned(),
                Tensor::zeros([64, 3, 3, 3], (Kind::Float, Device::Cpu)),
            )],
        );
        let err = Lpips::load(&file, Device::Cpu).unwrap_err().to_string();
        std::fs::remove_file(&file).unwrap();
        assert!(
            err.contains("lpips-") && err.contains("bad.safetensors"),
            "{err}"
        );
    }
}
