//! Encoder, decoder and discriminator architectures of the paper's training paradigms
//! (VQ-VAE, VQGAN, ViT-VQGAN, TimeSformer-VQGAN) as [`tch`] modules with named presets.
//!
//! The quantizer itself lives in [`vq_tch`].

pub use vq_tch;
