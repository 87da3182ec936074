//! Dataset streaming for the VQ models: yields `ndarray` batches (u8 or f32, NCHW / NCTHW).
//!
//! This crate never links libtorch; `vq-train` converts its batches to tensors. Every error
//! names the file (and, where it applies, the byte offset) it comes from.
//!
//! Implemented so far: the IDX format of (Fashion-)MNIST, gzipped or not ([`idx`]), the embedded
//! demo data ([`fashion_mnist_demo`]), TFRecord / `tf.train.Example` ([`tfrecord`]) and BAIR
//! trajectories ([`bair`]).

pub mod archive;
pub mod bair;
mod error;
pub mod idx;
pub mod images;
pub mod loader;
pub mod tfrecord;
pub mod transform;
pub mod ucf101;

pub use error::{DataError, Ignored, LeftOut, Result};

use std::path::PathBuf;

/// The embedded Fashion-MNIST subset committed under `datasets/fashion-mnist-demo/`
/// (4,000 train + 1,000 test images, MIT licence; see `datasets/fashion-mnist-demo.json`).
///
/// ```
/// let (images, labels) = vq_data::fashion_mnist_demo(vq_data::Split::Test).unwrap();
/// assert_eq!(images.dim(), (1000, 28, 28));
/// assert_eq!(labels.len(), 1000);
/// ```
///
/// # Errors
/// As [`idx::read_pair`], e.g. if the files were removed or damaged.
pub fn fashion_mnist_demo(split: Split) -> Result<(ndarray::Array3<u8>, ndarray::Array1<u8>)> {
    let dir = fashion_mnist_demo_dir();
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    idx::read_pair(
        &dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
        &dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
    )
}

/// Folder of the embedded demo data in this source tree.
pub fn fashion_mnist_demo_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../datasets/fashion-mnist-demo"
    ))
}

/// A dataset split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// Training data.
    Train,
    /// Held-out data (test or validation).
    Test,
}
