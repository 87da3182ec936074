//! Encoder, decoder and discriminator architectures of the paper's training paradigms as
//! [`tch`] modules with named presets.
//!
//! Implemented: the taming-transformers CNN encoder/decoder ([`taming`]), the VQ autoencoder
//! around [`vq_tch::VectorQuantizer`] ([`VqAutoencoder`]), the PatchGAN discriminator with the
//! hinge loss and taming's adaptive weight ([`PatchDiscriminator`]), and presets for the paper's
//! Table-1 VQ-VAEs, Table-2/3 VQGANs and a small demo model ([`Preset`]), and LPIPS with
//! user-supplied weights ([`Lpips`]). Not yet: the ViT-VQGAN and TimeSformer models. The quantizer itself lives in [`vq_tch`].

mod error;
mod gan;
mod inception;
mod lpips;
mod presets;
mod stylegan;
pub mod taming;
pub mod timesformer;
pub mod vit;
mod vqvae;

pub use error::{ModelError, Result};
pub use gan::{
    AdversarialLoss, AdversarialWeighting, Discriminator, DiscriminatorKind, GanConfig,
    PatchDiscriminator, R1Penalty, adaptive_weight, generator_loss, hinge_d_loss,
};
pub use inception::{FidInception, frechet_distance, inception_score};
pub use lpips::Lpips;
pub use presets::{Preset, TrainingConfig};
pub use stylegan::{
    StyleDiscriminator, StyleDiscriminatorConfig, r1_penalty, vanilla_d_loss, vanilla_g_loss,
};
pub use vq_tch;
pub use vqvae::{AutoencoderOutput, Backbone, QuantConv, VqAutoencoder, VqAutoencoderConfig};
