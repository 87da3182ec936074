//! Encoder, decoder and discriminator architectures of the paper's training paradigms as
//! [`tch`] modules with named presets.
//!
//! The encoders/decoders: taming-transformers' CNN ([`taming`]), enhancing-transformers' ViT
//! ([`vit`]) and TimeSformer for video ([`timesformer`]), chosen by [`Backbone`] inside the VQ
//! autoencoder around [`vq_tch::VectorQuantizer`] ([`VqAutoencoder`]). The adversarial parts:
//! taming's PatchGAN with the hinge loss and adaptive weight ([`PatchDiscriminator`]), the
//! StyleGAN2-type discriminator with the non-saturating loss and R1 ([`StyleDiscriminator`]).
//! LPIPS and the FID Inception with user-supplied weights ([`Lpips`], [`FidInception`]).
//! Presets for all eleven paradigms of the paper's Tables 1–5 and a small demo model
//! ([`Preset`]). The quantizer itself lives in [`vq_tch`].

mod error;
mod frozen;
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
    PatchDiscriminator, R1Penalty, adaptive_weight, adaptive_weight_in, adaptive_weight_tensor_in,
    generator_loss, hinge_d_loss, sync_batch_norm,
};
pub use inception::{FidInception, frechet_distance, inception_score, precision_recall};
pub use lpips::Lpips;
pub use presets::{Preset, TrainingConfig};
pub use stylegan::{
    StyleDiscriminator, StyleDiscriminatorConfig, r1_penalty, vanilla_d_loss, vanilla_g_loss,
};
pub use vq_dist;
pub use vq_tch;
pub use vqvae::{AutoencoderOutput, Backbone, QuantConv, VqAutoencoder, VqAutoencoderConfig};
