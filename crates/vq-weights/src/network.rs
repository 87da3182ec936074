//! The pretrained networks of the metrics, by name (a leaf of the crate).

use crate::error::{Result, WeightsError};

/// A pretrained network of the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Network {
    /// LPIPS with VGG16 features, version 0.1 (the `lpips` package's default `net='vgg'`).
    Lpips,
    /// The FID Inception-v3 of pytorch-fid (r-FID and r-IS).
    Inception,
}

impl Network {
    /// Every network.
    pub const ALL: [Self; 2] = [Self::Lpips, Self::Inception];

    /// The name on the command line and in `weights/<name>.json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lpips => "lpips",
            Self::Inception => "inception",
        }
    }

    /// The network of `name` ([`name`](Self::name)).
    ///
    /// # Errors
    /// [`WeightsError::UnknownNetwork`] listing the known names.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|n| n.name() == name)
            .ok_or_else(|| WeightsError::UnknownNetwork {
                name: name.to_owned(),
                known: Self::ALL.map(Self::name).join(", "),
            })
    }

    /// The converted file's name inside [`default_dir`](crate::default_dir).
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Lpips => "lpips-vgg16-v0.1.safetensors",
            Self::Inception => "fid-inception-2015-12-05.safetensors",
        }
    }

    /// Number of tensors of the converted file: LPIPS 13 convolutions × (weight, bias) + 5
    /// heads; the Inception's 472 state-dict entries (566 less the 94 BatchNorm counters).
    pub fn tensors(self) -> usize {
        match self {
            Self::Lpips => 31,
            Self::Inception => 472,
        }
    }
}
