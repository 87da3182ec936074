//! Encoder, decoder and discriminator architectures of the paper's training paradigms as
//! [`tch`] modules with named presets.
//!
//! Implemented: the taming-transformers CNN encoder/decoder ([`taming`]), the VQ autoencoder
//! around [`vq_tch::VectorQuantizer`] ([`VqAutoencoder`]), and presets for the paper's Table-1
//! VQ-VAEs plus a small demo model ([`Preset`]). The quantizer itself lives in [`vq_tch`].

mod error;
mod presets;
pub mod taming;
mod vqvae;

pub use error::{ModelError, Result};
pub use presets::{Preset, TrainingConfig};
pub use vq_tch;
pub use vqvae::{AutoencoderOutput, QuantConv, VqAutoencoder, VqAutoencoderConfig};
