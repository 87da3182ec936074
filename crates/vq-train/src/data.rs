//! Training data for `vq-train`: image sets held in memory as f32 tensors in [−1, 1], and a
//! deterministic sampler (seeded shuffle per epoch, resumable at any step).
//!
//! Sources: the embedded Fashion-MNIST demo, a Fashion-MNIST IDX folder (as written by
//! `cargo xtask download-data fashion-mnist`), and synthetic images at any model's shape (for
//! throughput runs of presets whose datasets are not read yet).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tch::{Device, Kind, Tensor};
use vq_data::Split;

/// Where images come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// The Fashion-MNIST subset committed under `datasets/fashion-mnist-demo/`.
    FashionMnistDemo,
    /// A folder with the four Fashion-MNIST IDX files (gzipped or not).
    FashionMnist(PathBuf),
    /// Smooth random images of the model's shape, `n` per split, from a fixed seed.
    Synthetic {
        /// Images per split.
        n: usize,
    },
}

impl DataSource {
    /// Parses `fashion-mnist-demo`, `fashion-mnist:<dir>` or `synthetic[:<n>]`.
    ///
    /// # Errors
    /// An unknown name.
    pub fn parse(s: &str) -> Result<Self> {
        match s.split_once(':') {
            None if s == "fashion-mnist-demo" => Ok(Self::FashionMnistDemo),
            None if s == "synthetic" => Ok(Self::Synthetic { n: 512 }),
            Some(("fashion-mnist", dir)) => Ok(Self::FashionMnist(PathBuf::from(dir))),
            Some(("synthetic", n)) => Ok(Self::Synthetic {
                n: n.parse()
                    .with_context(|| format!("synthetic image count {n:?}"))?,
            }),
            _ => bail!(
                "unknown data source {s:?}: expected fashion-mnist-demo, fashion-mnist:<dir> or synthetic[:<n>]"
            ),
        }
    }

    /// A short name for reports.
    pub fn describe(&self) -> String {
        match self {
            Self::FashionMnistDemo => "fashion-mnist-demo (embedded)".into(),
            Self::FashionMnist(dir) => format!("fashion-mnist ({})", dir.display()),
            Self::Synthetic { n } => format!("synthetic ({n} images per split)"),
        }
    }
}

/// A split of images as one f32 tensor `(N, C, R, R)` in [−1, 1] on the CPU.
#[derive(Debug)]
pub struct ImageSet {
    images: Tensor,
}

impl ImageSet {
    /// Loads a split shaped for a model taking `channels` × `resolution`² inputs. Fashion-MNIST
    /// images (1 × 28²) are padded with background to the model's resolution.
    ///
    /// # Errors
    /// Unreadable files, or images that do not fit the model (other channel count, larger than
    /// the model's resolution).
    pub fn load(
        source: &DataSource,
        split: Split,
        channels: usize,
        resolution: usize,
    ) -> Result<Self> {
        let images = match source {
            DataSource::FashionMnistDemo => {
                let (x, _) = vq_data::fashion_mnist_demo(split)
                    .context("reading the embedded Fashion-MNIST demo data")?;
                from_u8(x, channels, resolution)?
            }
            DataSource::FashionMnist(dir) => {
                let (x, _) = read_fashion_mnist(dir, split)?;
                from_u8(x, channels, resolution)?
            }
            DataSource::Synthetic { n } => synthetic(*n, split, channels, resolution),
        };
        Ok(Self { images })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.size()[0] as usize
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The images at `indices`, on `device`.
    pub fn batch(&self, indices: &[i64], device: Device) -> Tensor {
        self.images
            .index_select(0, &Tensor::from_slice(indices))
            .to_device(device)
    }
}

fn read_fashion_mnist(
    dir: &Path,
    split: Split,
) -> Result<(ndarray::Array3<u8>, ndarray::Array1<u8>)> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let find = |kind: &str| -> Result<PathBuf> {
        let name = format!("{prefix}-{kind}");
        [dir.join(&name), dir.join(format!("{name}.gz"))]
            .into_iter()
            .find(|p| p.is_file())
            .with_context(|| format!("no {name} or {name}.gz in {}", dir.display()))
    };
    let images = find("images-idx3-ubyte")?;
    let labels = find("labels-idx1-ubyte")?;
    vq_data::idx::read_pair(&images, &labels)
        .with_context(|| format!("reading Fashion-MNIST from {}", dir.display()))
}

/// u8 images (N, H, W) → (N, 1, R, R) in [−1, 1], centred with background padding.
fn from_u8(x: ndarray::Array3<u8>, channels: usize, resolution: usize) -> Result<Tensor> {
    let (n, h, w) = x.dim();
    if channels != 1 {
        bail!("the model takes {channels}-channel images but Fashion-MNIST is grayscale");
    }
    if h > resolution || w > resolution {
        bail!("{h}×{w} images do not fit the model's {resolution}×{resolution} input");
    }
    let t = Tensor::from_slice(x.as_standard_layout().as_slice().expect("standard layout"))
        .view([n as i64, 1, h as i64, w as i64])
        .to_kind(Kind::Float)
        / 127.5
        - 1.0;
    let (top, left) = ((resolution - h) / 2, (resolution - w) / 2);
    let (bottom, right) = (resolution - h - top, resolution - w - left);
    Ok(
        t.constant_pad_nd([left as i64, right as i64, top as i64, bottom as i64])
            + pad_mask(n, h, w, resolution, top, left),
    )
}

/// −1 outside the original image area, 0 inside (so padding reads as background −1).
fn pad_mask(n: usize, h: usize, w: usize, r: usize, top: usize, left: usize) -> Tensor {
    let mask = Tensor::full([1, 1, r as i64, r as i64], -1.0, (Kind::Float, Device::Cpu));
    let _ = mask
        .narrow(2, top as i64, h as i64)
        .narrow(3, left as i64, w as i64)
        .fill_(0.0);
    mask.expand([n as i64, 1, r as i64, r as i64], false)
}

/// Smooth random images: a few random low-frequency sinusoids per image, in [−1, 1].
fn synthetic(n: usize, split: Split, channels: usize, resolution: usize) -> Tensor {
    let seed = match split {
        Split::Train => 1,
        Split::Test => 2,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let r = resolution as i64;
    let grid = Tensor::arange(r, (Kind::Float, Device::Cpu)) / r as f64 * std::f64::consts::TAU;
    let (yy, xx) = (grid.view([r, 1]), grid.view([1, r]));
    let imgs: Vec<Tensor> = (0..n)
        .map(|_| {
            let chans: Vec<Tensor> = (0..channels)
                .map(|_| {
                    use rand::Rng;
                    let mut img = Tensor::zeros([r, r], (Kind::Float, Device::Cpu));
                    for _ in 0..3 {
                        let (fy, fx): (f64, f64) =
                            (rng.gen_range(0.5..3.0), rng.gen_range(0.5..3.0));
                        let phase: f64 = rng.gen_range(0.0..std::f64::consts::TAU);
                        img += ((&yy * fy + &xx * fx) + phase).sin() / 3.0;
                    }
                    img
                })
                .collect();
            Tensor::stack(&chans, 0)
        })
        .collect();
    Tensor::stack(&imgs, 0).clamp(-1.0, 1.0)
}

/// Which images each step trains on: epoch `e` visits the set in the order of a shuffle seeded
/// by `(seed, e)`; step `s` takes positions `s·B .. (s+1)·B` of that endless sequence. So any
/// step's batch is known without replaying the ones before (exact resume).
#[derive(Debug)]
pub struct Sampler {
    seed: u64,
    n: usize,
    batch: usize,
    cached: Option<(usize, Vec<i64>)>,
}

impl Sampler {
    /// A sampler over `n` images with batches of `batch`.
    ///
    /// # Panics
    /// If `n` or `batch` is 0.
    pub fn new(seed: u64, n: usize, batch: usize) -> Self {
        assert!(n > 0 && batch > 0, "Sampler needs images and a batch size");
        Self {
            seed,
            n,
            batch,
            cached: None,
        }
    }

    fn order(&mut self, epoch: usize) -> &[i64] {
        if self.cached.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut order: Vec<i64> = (0..self.n as i64).collect();
            let mut rng = StdRng::seed_from_u64(
                self.seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            order.shuffle(&mut rng);
            self.cached = Some((epoch, order));
        }
        &self.cached.as_ref().expect("just filled").1
    }

    /// The image indices of batch number `step`.
    pub fn batch_indices(&mut self, step: usize) -> Vec<i64> {
        (0..self.batch)
            .map(|k| {
                let pos = step * self.batch + k;
                let (epoch, at) = (pos / self.n, pos % self.n);
                self.order(epoch)[at]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_is_a_permutation_per_epoch_and_resumable() {
        let mut s = Sampler::new(3, 10, 4);
        let first: Vec<i64> = (0..5).flat_map(|i| s.batch_indices(i)).collect();
        let mut epoch0 = first[..10].to_vec();
        epoch0.sort();
        assert_eq!(epoch0, (0..10).collect::<Vec<_>>());
        assert_ne!(
            first[..10],
            first[10..20],
            "epochs are shuffled differently"
        );
        let mut fresh = Sampler::new(3, 10, 4);
        assert_eq!(fresh.batch_indices(3), first[12..16]);
    }

    #[test]
    fn demo_images_are_padded_into_minus_one_to_one() {
        let set = ImageSet::load(&DataSource::FashionMnistDemo, Split::Test, 1, 32).unwrap();
        assert_eq!(set.len(), 1000);
        let b = set.batch(&[0, 1], Device::Cpu);
        assert_eq!(b.size(), [2, 1, 32, 32]);
        assert!(f64::try_from(b.max()).unwrap() <= 1.0);
        assert_eq!(f64::try_from(b.min()).unwrap(), -1.0);
        // The two-pixel border is background.
        assert_eq!(f64::try_from(b.narrow(2, 0, 2).max()).unwrap(), -1.0);
        assert!(ImageSet::load(&DataSource::FashionMnistDemo, Split::Test, 3, 32).is_err());
        assert!(ImageSet::load(&DataSource::FashionMnistDemo, Split::Test, 1, 16).is_err());
    }

    #[test]
    fn sources_parse() {
        assert_eq!(
            DataSource::parse("fashion-mnist-demo").unwrap(),
            DataSource::FashionMnistDemo
        );
        assert_eq!(
            DataSource::parse("synthetic:8").unwrap(),
            DataSource::Synthetic { n: 8 }
        );
        assert!(DataSource::parse("imagenet").is_err());
    }
}
