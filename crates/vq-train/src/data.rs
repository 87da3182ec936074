//! Training data for `vq-train`, always as f32 tensors in [−1, 1]: small sets held in memory
//! with a deterministic sampler (seeded shuffle per epoch, resumable at any step), and image
//! datasets read from disk (ImageNet, image folders such as Imagenette) through `vq-data`'s
//! streaming loader.
//!
//! Sources: the embedded Fashion-MNIST demo, a Fashion-MNIST IDX folder (as written by
//! `cargo xtask download-data fashion-mnist`), `image-folder:<dir>` (`<dir>/train/<class>/…`
//! and `<dir>/val/<class>/…`, e.g. Imagenette), `imagenet:<path>` (the official tars or an
//! extracted tree, see `vq_data::images::ImageDataset::imagenet`), and synthetic images at any
//! model's shape (for throughput runs).
//!
//! The geometric preprocessing is the run's `preprocessing` ([`Pipeline`]; presets take their paper table's, [`Pipeline::for_preset`]);
//! pixel values are always mapped to [−1, 1] (the trainer's losses, LPIPS, FID and plots work
//! in that range), also where the original code normalised otherwise (Table 1: CLIP mean/std;
//! Table 4: [0, 1]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rayon::prelude::*;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};
use vq_data::Split;
use vq_models::Preset;

use ndarray::ArrayD;
use vq_data::bair::{BairDataset, BairSplit, ClipWindow};
use vq_data::images::{ImageDataset, ImageNetSplit, ImageSample};
pub use vq_data::loader::Shard;
use vq_data::loader::{Batches, Dataset, Loader, LoaderConfig, OnError};
use vq_data::transform::{Normalization, Transform};
use vq_data::ucf101::{ClipSpec, Ffmpeg, Ucf101, UcfSplit};

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
    /// `<dir>/train/<class>/…` and `<dir>/val/<class>/…` (Imagenette's layout).
    ImageFolder(PathBuf),
    /// ImageNet: the official tars or an extracted copy.
    ImageNet(PathBuf),
    /// BAIR robot pushing: the official tar or its extracted folder (video models).
    Bair(PathBuf),
    /// UCF-101: a folder holding the videos (`UCF-101/` or `UCF101/`) and `ucfTrainTestlist/`
    /// (video models; split 1).
    Ucf101(PathBuf),
}

/// Every form [`DataSource::parse`] accepts, for help texts and errors.
pub const DATA_SOURCES: &str = "fashion-mnist-demo, fashion-mnist:<dir>, image-folder:<dir>, \
     imagenet:<path>, bair:<path>, ucf101:<dir> or synthetic[:<n>]";

impl DataSource {
    /// Parses one of [`DATA_SOURCES`].
    ///
    /// # Errors
    /// An unknown name.
    pub fn parse(s: &str) -> Result<Self> {
        match s.split_once(':') {
            None if s == "fashion-mnist-demo" => Ok(Self::FashionMnistDemo),
            None if s == "synthetic" => Ok(Self::Synthetic { n: 512 }),
            Some(("fashion-mnist", dir)) => Ok(Self::FashionMnist(PathBuf::from(dir))),
            Some(("image-folder", dir)) => Ok(Self::ImageFolder(PathBuf::from(dir))),
            Some(("imagenet", path)) => Ok(Self::ImageNet(PathBuf::from(path))),
            Some(("bair", path)) => Ok(Self::Bair(PathBuf::from(path))),
            Some(("ucf101", path)) => Ok(Self::Ucf101(PathBuf::from(path))),
            Some(("synthetic", n)) => {
                let n: usize = n
                    .parse()
                    .with_context(|| format!("synthetic image count {n:?}"))?;
                if n == 0 {
                    bail!("synthetic:0 has no images: give a count of at least 1");
                }
                Ok(Self::Synthetic { n })
            }
            _ => bail!("unknown data source {s:?}: expected {DATA_SOURCES}"),
        }
    }

    /// A short name for reports.
    pub fn describe(&self) -> String {
        match self {
            Self::FashionMnistDemo => "fashion-mnist-demo (embedded)".into(),
            Self::FashionMnist(dir) => format!("fashion-mnist ({})", dir.display()),
            Self::Synthetic { n } => format!("synthetic ({n} images per split)"),
            Self::ImageFolder(dir) => format!("image folder ({})", dir.display()),
            Self::ImageNet(path) => format!("ImageNet ({})", path.display()),
            Self::Bair(path) => format!("BAIR ({})", path.display()),
            Self::Ucf101(path) => format!("UCF-101 ({})", path.display()),
        }
    }
}

/// The geometric preprocessing of image datasets, by the paper table a preset reproduces
/// (`preprocessing` in a run's configuration: `center-crop`, `taming`, `vit-vqgan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pipeline {
    /// Table 1 (the rotation-trick repository's loader): a centred crop of the image as stored,
    /// no resize.
    CenterCrop,
    /// Tables 2–3 (taming-transformers): shorter side to the resolution, random crop for
    /// training, centre crop for evaluation.
    Taming,
    /// Table 4 (enhancing-transformers): random-resized crop + flip for training, resize for
    /// evaluation.
    VitVqgan,
}

impl Pipeline {
    /// Every pipeline, in the order of the paper's tables.
    pub const ALL: [Pipeline; 3] = [Self::CenterCrop, Self::Taming, Self::VitVqgan];

    /// The pipeline of the code base a preset reproduces: the VQ-VAEs of Table 1 (and the demo)
    /// crop, the taming / latent-diffusion VQGANs of Tables 2–3 use taming's, ViT-VQGAN and
    /// the TimeSformer tokenizers (enhancing-transformers' code) the ViT-VQGAN one.
    pub fn for_preset(preset: Preset) -> Self {
        match preset {
            Preset::VqVaeF16Euclidean
            | Preset::VqVaeF16Cosine
            | Preset::VqVaeF4Euclidean
            | Preset::VqVaeF4Cosine
            | Preset::DemoFashionMnist
            | Preset::DemoFashionMnistLearned => Self::CenterCrop,
            Preset::VqganF16Imagenet | Preset::VqganF16Faces | Preset::LdmF4 | Preset::LdmF8 => {
                Self::Taming
            }
            Preset::VitVqganSmall | Preset::TimeSformerBair | Preset::TimeSformerUcf101 => {
                Self::VitVqgan
            }
        }
    }

    /// The rule of versions whose run files have no `preprocessing` field: chosen by the
    /// preset's name (`vqvae-*` crop, `vit-*` ViT-VQGAN, any other name taming's). Used only to
    /// read such files, so that an old run evaluates and resumes as it was trained.
    pub fn legacy_for_preset_name(preset: &str) -> Self {
        if preset.starts_with("vqvae-") {
            Self::CenterCrop
        } else if preset.starts_with("vit-") {
            Self::VitVqgan
        } else {
            Self::Taming
        }
    }

    /// The configuration name (`center-crop`, `taming`, `vit-vqgan`).
    pub fn name(self) -> &'static str {
        match self {
            Self::CenterCrop => "center-crop",
            Self::Taming => "taming",
            Self::VitVqgan => "vit-vqgan",
        }
    }

    /// The transform for a split at `size`.
    pub fn transform(self, size: usize, split: Split) -> Transform {
        let train = split == Split::Train;
        match self {
            Self::CenterCrop => Transform::CenterCropNoResize { size },
            Self::Taming => Transform::taming(size, train),
            Self::VitVqgan => Transform::vit_vqgan(size, train),
        }
    }
}

/// Any `vq-data` dataset whose samples are channel-first `u8` pixels (images `(C, H, W)` or
/// clips `(C, T, H, W)`).
#[derive(Clone)]
pub struct PixelSource(Arc<dyn Dataset<Sample = ArrayD<u8>>>);

impl std::fmt::Debug for PixelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PixelSource({} samples)", self.0.len())
    }
}

impl Dataset for PixelSource {
    type Sample = ArrayD<u8>;
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&self, index: usize, rng: &mut StdRng) -> vq_data::Result<ArrayD<u8>> {
        self.0.get(index, rng)
    }
    fn name(&self, index: usize) -> String {
        self.0.name(index)
    }
    fn left_out(&self) -> &[vq_data::LeftOut] {
        self.0.left_out()
    }
    fn ignored(&self) -> &vq_data::Ignored {
        self.0.ignored()
    }
}

/// A dataset with its samples mapped to pixels.
#[derive(Debug)]
struct Pixels<D, F> {
    inner: D,
    map: F,
}

impl<D: Dataset, F> Dataset for Pixels<D, F>
where
    F: Fn(D::Sample) -> ArrayD<u8> + Send + Sync + 'static,
{
    type Sample = ArrayD<u8>;
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn get(&self, index: usize, rng: &mut StdRng) -> vq_data::Result<ArrayD<u8>> {
        self.inner.get(index, rng).map(&self.map)
    }
    fn name(&self, index: usize) -> String {
        self.inner.name(index)
    }
    fn left_out(&self) -> &[vq_data::LeftOut] {
        self.inner.left_out()
    }
    fn ignored(&self) -> &vq_data::Ignored {
        self.inner.ignored()
    }
}

impl PixelSource {
    fn new<D: Dataset>(
        inner: D,
        map: impl Fn(D::Sample) -> ArrayD<u8> + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(Pixels { inner, map }))
    }
}

/// A split of images or clips: one f32 tensor `(N, C, [T,] R, R)` in [−1, 1] on the CPU, or a
/// dataset on disk decoded on demand.
#[derive(Debug)]
pub enum ImageSet {
    /// All samples in memory.
    Memory(Tensor),
    /// Samples read and preprocessed per batch.
    Files(PixelSource),
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
        frames: Option<usize>,
        pipeline: Pipeline,
    ) -> Result<Self> {
        let transform = pipeline.transform(resolution, split);
        let video = matches!(source, DataSource::Bair(_) | DataSource::Ucf101(_));
        let synthetic_source = matches!(source, DataSource::Synthetic { .. });
        if video != frames.is_some() && !synthetic_source {
            bail!(
                "{} holds {} but the model takes {}",
                source.describe(),
                if video { "video clips" } else { "images" },
                if frames.is_some() {
                    "video clips"
                } else {
                    "images"
                }
            );
        }
        let files = |ds: ImageDataset| -> Result<Self> {
            if channels != 3 {
                bail!(
                    "the model takes {channels}-channel images but {} holds RGB images",
                    source.describe()
                );
            }
            Ok(Self::Files(PixelSource::new(ds, |s: ImageSample| {
                s.pixels.into_dyn()
            })))
        };
        let frames_n = frames.unwrap_or(1);
        let images = match source {
            DataSource::Bair(path) => return bair(path, split, frames_n, resolution),
            DataSource::Ucf101(dir) => return ucf101(dir, split, frames_n, resolution),
            DataSource::ImageFolder(dir) => {
                let sub = match split {
                    Split::Train => "train",
                    Split::Test => "val",
                };
                return files(ImageDataset::folder_split(dir, sub, transform)?);
            }
            DataSource::ImageNet(path) => {
                let s = match split {
                    Split::Train => ImageNetSplit::Train,
                    Split::Test => ImageNetSplit::Val,
                };
                return files(ImageDataset::imagenet(path, s, None, transform)?);
            }
            DataSource::FashionMnistDemo => {
                let (x, _) = vq_data::fashion_mnist_demo(split)
                    .context("reading the embedded Fashion-MNIST demo data")?;
                from_u8(x, channels, resolution)?
            }
            DataSource::FashionMnist(dir) => {
                let (x, _) = read_fashion_mnist(dir, split)?;
                from_u8(x, channels, resolution)?
            }
            DataSource::Synthetic { n } => {
                let x = synthetic(*n * frames_n, split, channels, resolution);
                match frames {
                    None => x,
                    // Clips of consecutive synthetic images: (N, C, T, R, R).
                    Some(t) => {
                        let r = resolution as i64;
                        x.view([*n as i64, t as i64, channels as i64, r, r])
                            .permute([0, 2, 1, 3, 4])
                            .contiguous()
                    }
                }
            }
        };
        Ok(Self::Memory(images))
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        match self {
            Self::Memory(t) => t.size()[0] as usize,
            Self::Files(ds) => ds.len(),
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The images at `indices`, on `device` (files are decoded in parallel; random
    /// augmentation, if any, is seeded by the index).
    ///
    /// # Errors
    /// Unreadable or corrupt image files.
    pub fn batch(&self, indices: &[i64], device: Device) -> Result<Tensor> {
        match self {
            Self::Memory(t) => to_device(t.index_select(0, &Tensor::from_slice(indices)), device),
            Self::Files(ds) => {
                let samples = indices
                    .par_iter()
                    .map(|&i| ds.get(i as usize, &mut StdRng::seed_from_u64(i as u64)))
                    .collect::<vq_data::Result<Vec<_>>>()?;
                to_device(to_tensor(&samples)?, device)
            }
        }
    }

    /// The images at `indices` that decode, on `device` (`None` when none does), and the
    /// samples that failed, in the order of `indices` (evaluation: a corrupt file is left out
    /// and reported, as in training).
    ///
    /// # Errors
    /// Decoded samples of different shapes.
    pub fn decodable_batch(
        &self,
        indices: &[i64],
        device: Device,
    ) -> Result<(Option<Tensor>, Vec<BadSample>)> {
        let Self::Files(ds) = self else {
            return Ok((Some(self.batch(indices, device)?), Vec::new()));
        };
        let results: Vec<_> = indices
            .par_iter()
            .map(|&i| ds.get(i as usize, &mut StdRng::seed_from_u64(i as u64)))
            .collect();
        let (mut samples, mut bad) = (Vec::new(), Vec::new());
        for (&i, r) in indices.iter().zip(results) {
            match r {
                Ok(s) => samples.push(s),
                Err(e) => bad.push(BadSample::new(ds, i as usize, e.to_string())),
            }
        }
        let x = match samples.is_empty() {
            true => None,
            false => Some(to_tensor(&samples)?.to_device(device)),
        };
        Ok((x, bad))
    }

    /// The first `n` samples of the set that decode (fewer when the set has fewer), on
    /// `device`, e.g. for a reconstruction grid.
    ///
    /// # Errors
    /// No sample of the set decodes.
    pub fn first_decodable(&self, n: usize, device: Device) -> Result<Tensor> {
        let mut parts = Vec::new();
        let (mut have, mut at, mut first_error) = (0, 0, None);
        while have < n && at < self.len() {
            let take = (n - have).min(self.len() - at);
            let idx: Vec<i64> = (at as i64..(at + take) as i64).collect();
            let (x, bad) = self.decodable_batch(&idx, device)?;
            if let Some(x) = x {
                have += x.size()[0] as usize;
                parts.push(x);
            }
            first_error = first_error.or_else(|| bad.into_iter().next());
            at += take;
        }
        match (parts.is_empty(), first_error) {
            (true, Some(b)) => bail!("no sample of the set decodes (first: {})", b.error),
            (true, None) => bail!("the set is empty"),
            _ => Ok(Tensor::cat(&parts, 0)),
        }
    }

    /// Files left out when the set was indexed (damaged, unreadable), with their errors.
    pub fn left_out(&self) -> &[vq_data::LeftOut] {
        match self {
            Self::Memory(_) => &[],
            Self::Files(ds) => ds.left_out(),
        }
    }

    /// Prints the files left out of the `split` split when it was indexed, one line each.
    pub fn report_left_out(&self, split: Split) {
        let split = match split {
            Split::Train => "training",
            Split::Test => "held-out",
        };
        if let Self::Files(ds) = self
            && ds.ignored().count() > 0
        {
            eprintln!("data: the {split} split passed over {}", ds.ignored());
        }
        for l in self.left_out() {
            eprintln!("data: left out of the {split} split: {l}");
        }
    }

    /// Sample `index`'s name (its file, archive member or video; `#index` in memory).
    pub fn sample_name(&self, index: usize) -> String {
        match self {
            Self::Memory(_) => format!("#{index}"),
            Self::Files(ds) => ds.name(index),
        }
    }

    /// Why sample `index` fails to decode, read again (for a failure another rank saw).
    pub fn failure(&self, index: usize) -> BadSample {
        match self {
            Self::Memory(_) => BadSample {
                index,
                name: format!("#{index}"),
                error: format!("sample #{index} failed"),
            },
            Self::Files(ds) => {
                let error = match ds.get(index, &mut StdRng::seed_from_u64(index as u64)) {
                    Err(e) => e.to_string(),
                    Ok(_) => format!("{} failed to decode on another rank", ds.name(index)),
                };
                BadSample::new(ds, index, error)
            }
        }
    }
}

/// A sample that failed to decode: left out of an evaluation, replaced in training.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BadSample {
    /// Dataset index.
    pub index: usize,
    /// The sample's name (its file, archive member or video).
    pub name: String,
    /// The error, naming the file.
    pub error: String,
}

impl BadSample {
    fn new(ds: &PixelSource, index: usize, error: String) -> Self {
        Self {
            index,
            name: ds.name(index),
            error,
        }
    }
}

/// One training micro-batch: the images, and the samples of its positions that failed to
/// decode (each replaced by the next sample of the epoch that decodes).
#[derive(Debug)]
pub struct MicroBatch {
    /// `(B, C, [T,] R, R)` in [−1, 1] on the run's device.
    pub x: Tensor,
    /// Failed samples, in stream order.
    pub bad: Vec<BadSample>,
}

/// Video batches `(B, C, T, H, W)` as frames `(B·T, C, H, W)` (for the per-frame
/// discriminator, LPIPS, Inception and plots); image batches unchanged.
pub fn frames_as_images(x: &Tensor) -> Tensor {
    let s = x.size();
    if s.len() == 5 {
        x.transpose(1, 2).reshape([s[0] * s[2], s[1], s[3], s[4]])
    } else {
        x.shallow_clone()
    }
}

/// Samples `(C, [T,] R, R)` u8 → `(N, C, [T,] R, R)` f32 in [−1, 1] (`x / 127.5 − 1`).
fn to_tensor(samples: &[ArrayD<u8>]) -> Result<Tensor> {
    let x = Normalization::MinusOneOne.apply(vq_data::loader::stack(samples)?.view());
    let shape: Vec<i64> = x.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::from_slice(x.as_slice().expect("standard layout")).view(shape.as_slice()))
}

/// The training batches of a run: from the [`Sampler`] for sets in memory, from a background
/// [`Loader`] (shuffled per epoch by the seed, resumable at any step; a corrupt file is replaced
/// by the next sample of the epoch that decodes and reported with its micro-batch) for sets on
/// disk.
#[derive(Debug)]
pub enum TrainBatches {
    /// Indices into an in-memory set.
    Memory(Sampler),
    /// A streaming loader.
    Stream(Batches<ArrayD<u8>>),
}

impl TrainBatches {
    /// Batches of `micro_batch` images, starting at micro-batch number `first`, of one
    /// process.
    ///
    /// # Errors
    /// An empty set.
    pub fn new(set: &ImageSet, seed: u64, micro_batch: usize, first: usize) -> Result<Self> {
        Self::sharded(set, seed, micro_batch, first, Shard::ALL)
    }

    /// Batches of `micro_batch` images of this rank's shard, starting at this rank's micro-batch
    /// number `first`: rank r takes every `world`-th sample (in memory: of the one-process
    /// sequence, [`Sampler::sharded`]; streamed: of each epoch's permutation, as vq-data's
    /// loader shards).
    ///
    /// # Errors
    /// An empty set.
    pub fn sharded(
        set: &ImageSet,
        seed: u64,
        micro_batch: usize,
        first: usize,
        shard: Shard,
    ) -> Result<Self> {
        match set {
            ImageSet::Memory(_) => Ok(Self::Memory(Sampler::sharded(
                seed,
                set.len(),
                micro_batch,
                shard,
            ))),
            ImageSet::Files(ds) => {
                let workers = std::thread::available_parallelism()
                    .map_or(2, |n| n.get())
                    .min(8);
                let cfg = LoaderConfig {
                    workers,
                    start: (first * micro_batch) as u64,
                    shard,
                    on_error: OnError::Replace,
                    ..LoaderConfig::train(micro_batch, seed)
                };
                Ok(Self::Stream(Loader::new(ds.clone(), cfg)?.batches()))
            }
        }
    }

    /// Micro-batch number `index` (consecutive calls must ask for consecutive numbers when
    /// streaming).
    ///
    /// # Errors
    /// Unreadable data (no sample of an epoch decodes); a stream asked out of order.
    pub fn get(&mut self, set: &ImageSet, index: usize, device: Device) -> Result<MicroBatch> {
        match self {
            Self::Memory(sampler) => Ok(MicroBatch {
                x: set.batch(&sampler.batch_indices(index), device)?,
                bad: Vec::new(),
            }),
            Self::Stream(it) => {
                let batch = it.next().context("the data stream ended")??;
                // Failures are reported as they happen (per micro-batch), not per epoch.
                it.finished_epochs();
                let bad = match set {
                    ImageSet::Files(ds) => batch
                        .skipped
                        .into_iter()
                        .map(|s| BadSample::new(ds, s.index, s.error))
                        .collect(),
                    ImageSet::Memory(_) => Vec::new(),
                };
                Ok(MicroBatch {
                    x: to_device(to_tensor(&batch.samples)?, device)?,
                    bad,
                })
            }
        }
    }
}

/// A host batch on `device`: on CUDA through page-locked memory and an asynchronous copy, so
/// that the host goes on launching the step's kernels while the batch travels (the copy is
/// ordered before them on the stream; libtorch's caching host allocator keeps the page-locked
/// block until the copy has completed).
fn to_device(t: Tensor, device: Device) -> Result<Tensor> {
    Ok(match device {
        Device::Cuda(_) => crate::ops::pin_memory(&t)?.to_device_(device, t.kind(), true, false),
        _ => t.to_device(device),
    })
}

pub(crate) fn read_fashion_mnist(
    dir: &Path,
    split: Split,
) -> Result<(ndarray::Array3<u8>, ndarray::Array1<u8>)> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    // The files as the dataset's site names them, as MNIST-style mirrors do (`train-images.
    // idx3-ubyte`), gzipped or not; in the folder given, or where torchvision's
    // `FashionMNIST(root, download=True)` puts them (`root/FashionMNIST/raw/`).
    let folders = [
        dir.to_path_buf(),
        dir.join("raw"),
        dir.join("FashionMNIST/raw"),
    ];
    let find = |kind: &str| -> Result<PathBuf> {
        let name = format!("{prefix}-{kind}");
        let dotted = name.replacen("s-idx", "s.idx", 1);
        folders
            .iter()
            .flat_map(|f| {
                [&name, &dotted]
                    .into_iter()
                    .flat_map(move |n| [f.join(n), f.join(format!("{n}.gz"))])
            })
            .find(|p| p.is_file())
            .with_context(|| {
                format!(
                    "no {name} (or {dotted}, gzipped or not) in {} or its raw/ or \
                     FashionMNIST/raw/",
                    dir.display()
                )
            })
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
///
/// A data-parallel rank r of `world` takes positions `(s·B + k)·world + r`, k < B: the ranks'
/// batches of step s together are one process's batch of `world·B` (each rank every
/// `world`-th image of it), whatever the world size, so a run resumes on another world size at
/// the same image.
#[derive(Debug)]
pub struct Sampler {
    seed: u64,
    n: usize,
    batch: usize,
    shard: Shard,
    cached: Option<(usize, Vec<i64>)>,
}

impl Sampler {
    /// A sampler over `n` images with batches of `batch`.
    ///
    /// # Panics
    /// If `n` or `batch` is 0.
    pub fn new(seed: u64, n: usize, batch: usize) -> Self {
        Self::sharded(seed, n, batch, Shard::ALL)
    }

    /// A sampler of one rank's shard (see the type's docs).
    ///
    /// # Panics
    /// If `n` or `batch` is 0, or the shard's rank is outside its world.
    pub fn sharded(seed: u64, n: usize, batch: usize, shard: Shard) -> Self {
        assert!(n > 0 && batch > 0, "Sampler needs images and a batch size");
        assert!(shard.rank < shard.world, "shard rank outside its world");
        Self {
            seed,
            n,
            batch,
            shard,
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
                let pos = (step * self.batch + k) * self.shard.world + self.shard.rank;
                let (epoch, at) = (pos / self.n, pos % self.n);
                self.order(epoch)[at]
            })
            .collect()
    }
}

/// BAIR's clips of `frames` 64×64 frames (a random window in training, the first in testing).
fn bair(path: &Path, split: Split, frames: usize, resolution: usize) -> Result<ImageSet> {
    if resolution != vq_data::bair::SIZE {
        bail!("BAIR frames are 64×64; the model takes {resolution}×{resolution}");
    }
    let (s, window) = match split {
        Split::Train => (BairSplit::Train, ClipWindow::Random),
        Split::Test => (BairSplit::Test, ClipWindow::Fixed(0)),
    };
    let ds = BairDataset::open(path, s, frames, window)?;
    Ok(ImageSet::Files(PixelSource::new(
        ds,
        |c: ndarray::Array4<u8>| c.into_dyn(),
    )))
}

/// UCF-101's clips of `frames` frames at `resolution` (the paper's clip specification), from
/// `dir` holding `UCF-101/` (or `UCF101/`) and `ucfTrainTestlist/`.
fn ucf101(dir: &Path, split: Split, frames: usize, resolution: usize) -> Result<ImageSet> {
    let root = ["UCF-101", "UCF101"]
        .map(|n| dir.join(n))
        .into_iter()
        .find(|p| p.is_dir())
        .with_context(|| format!("no UCF-101/ or UCF101/ folder in {}", dir.display()))?;
    let spec = ClipSpec {
        frames,
        size: resolution,
        ..ClipSpec::PAPER
    };
    let s = match split {
        Split::Train => UcfSplit::Train,
        Split::Test => UcfSplit::Test,
    };
    let lists = dir.join("ucfTrainTestlist");
    let ds = Ucf101::open(&root, &lists, 1, s, spec, None, Ffmpeg::locate()?)?;
    Ok(ImageSet::Files(PixelSource::new(
        ds,
        |(c, _): (ndarray::Array4<u8>, u32)| c.into_dyn(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fashion-MNIST where torchvision downloads it, under the dotted names of MNIST mirrors,
    /// reads as the files of the dataset's own site.
    #[test]
    fn fashion_mnist_is_found_in_torchvisions_folder_and_under_dotted_names() {
        let root = std::env::temp_dir().join(format!("vq-fmnist-{}", std::process::id()));
        let raw = root.join("FashionMNIST/raw");
        std::fs::create_dir_all(&raw).unwrap();
        let demo = vq_data::fashion_mnist_demo_dir();
        for f in ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"] {
            std::fs::copy(demo.join(f), raw.join(f.replacen("s-idx", "s.idx", 1))).unwrap();
        }
        let (x, y) = read_fashion_mnist(&root, Split::Test).unwrap();
        let (x0, y0) = read_fashion_mnist(&demo, Split::Test).unwrap();
        assert_eq!((x, y), (x0, y0));
        let err = read_fashion_mnist(&root, Split::Train)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no train-images-idx3-ubyte"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn every_listed_data_source_parses_and_every_kind_is_listed() {
        let forms: Vec<&str> = DATA_SOURCES
            .split([',', ' '])
            .filter(|f| !f.is_empty() && *f != "or")
            .collect();
        let mut kinds = Vec::new();
        for form in &forms {
            let example = form
                .replace("[:<n>]", ":7")
                .replace("<dir>", "d")
                .replace("<path>", "p");
            let parsed = DataSource::parse(&example).unwrap();
            kinds.push(std::mem::discriminant(&parsed));
        }
        // One form per kind: a new kind not added to the list fails here.
        let all = [
            DataSource::FashionMnistDemo,
            DataSource::FashionMnist("d".into()),
            DataSource::Synthetic { n: 1 },
            DataSource::ImageFolder("d".into()),
            DataSource::ImageNet("p".into()),
            DataSource::Bair("p".into()),
            DataSource::Ucf101("d".into()),
        ];
        for kind in &all {
            // Exhaustive: adding a variant without listing it here does not compile.
            match kind {
                DataSource::FashionMnistDemo
                | DataSource::FashionMnist(_)
                | DataSource::Synthetic { .. }
                | DataSource::ImageFolder(_)
                | DataSource::ImageNet(_)
                | DataSource::Bair(_)
                | DataSource::Ucf101(_) => {}
            }
            assert!(
                kinds.contains(&std::mem::discriminant(kind)),
                "{kind:?} not listed"
            );
        }
        assert_eq!(forms.len(), all.len(), "{forms:?}");
        let err = DataSource::parse("imagenett:x").unwrap_err().to_string();
        assert!(err.contains("ucf101:<dir>"), "{err}");
    }

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
        // Two ranks with batches of 2 deal out one process's batches of 4, interleaved.
        let mut r0 = Sampler::sharded(3, 10, 2, Shard { rank: 0, world: 2 });
        let mut r1 = Sampler::sharded(3, 10, 2, Shard { rank: 1, world: 2 });
        for step in 0..5 {
            let (a, b) = (r0.batch_indices(step), r1.batch_indices(step));
            let whole = &first[step * 4..(step + 1) * 4];
            assert_eq!([a[0], b[0], a[1], b[1]], whole, "step {step}");
        }
    }

    #[test]
    fn demo_images_are_padded_into_minus_one_to_one() {
        let set = ImageSet::load(
            &DataSource::FashionMnistDemo,
            Split::Test,
            1,
            32,
            None,
            Pipeline::Taming,
        )
        .unwrap();
        assert_eq!(set.len(), 1000);
        let b = set.batch(&[0, 1], Device::Cpu).unwrap();
        assert_eq!(b.size(), [2, 1, 32, 32]);
        assert!(f64::try_from(b.max()).unwrap() <= 1.0);
        assert_eq!(f64::try_from(b.min()).unwrap(), -1.0);
        // The two-pixel border is background.
        assert_eq!(f64::try_from(b.narrow(2, 0, 2).max()).unwrap(), -1.0);
        assert!(
            ImageSet::load(
                &DataSource::FashionMnistDemo,
                Split::Test,
                3,
                32,
                None,
                Pipeline::Taming
            )
            .is_err()
        );
        assert!(
            ImageSet::load(
                &DataSource::FashionMnistDemo,
                Split::Test,
                1,
                16,
                None,
                Pipeline::Taming
            )
            .is_err()
        );
    }

    #[test]
    fn synthetic_clips_and_frames() {
        let set = ImageSet::load(
            &DataSource::Synthetic { n: 3 },
            Split::Train,
            3,
            8,
            Some(4),
            Pipeline::Taming,
        )
        .unwrap();
        let b = set.batch(&[0, 2], Device::Cpu).unwrap();
        assert_eq!(b.size(), [2, 3, 4, 8, 8]);
        let f = frames_as_images(&b);
        assert_eq!(f.size(), [8, 3, 8, 8]);
        // Frame t of clip 1 is element (1, :, t).
        assert!(f.get(5).equal(&b.get(1).select(1, 1)));
        // Image sources refuse video models and the other way round.
        assert!(
            ImageSet::load(
                &DataSource::FashionMnistDemo,
                Split::Test,
                1,
                32,
                Some(4),
                Pipeline::Taming
            )
            .is_err()
        );
        assert!(
            ImageSet::load(
                &DataSource::Bair("x".into()),
                Split::Test,
                3,
                64,
                None,
                Pipeline::Taming
            )
            .is_err()
        );
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
        assert!(
            DataSource::parse("synthetic:0")
                .unwrap_err()
                .to_string()
                .contains("at least 1")
        );
    }
}
