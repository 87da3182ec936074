//! Run configurations and helpers shared by the training test binaries (each uses a subset).
#![allow(dead_code)]

use std::path::Path;

use tch::{Device, Tensor};
use vq_models::Preset;
use vq_train::train::{RunConfig, TrainOptions};

/// The demo model on the embedded Fashion-MNIST images: batch 16 in micro-batches of 8.
pub fn small_demo(steps: usize) -> RunConfig {
    let preset = Preset::DemoFashionMnist;
    let mut training = preset.training();
    training.steps = steps;
    training.batch_size = 16;
    training.warmup_steps = 2;
    training.decay_steps = steps;
    RunConfig {
        preset: preset.name().into(),
        model: preset.config(),
        training,
        data: "fashion-mnist-demo".into(),
        seed: 5,
        micro_batch: 8,
        gan: None,
        lpips_weights: None,
        inception_weights: None,
        precision: Default::default(),
    }
}

/// A CPU run of `config` into `out`, logging every step, no progress bar.
pub fn options(config: RunConfig, out: &Path) -> TrainOptions {
    TrainOptions {
        config,
        device: Device::Cpu,
        out: out.to_path_buf(),
        log_every: 1,
        checkpoint_every: 100,
        resume: false,
        progress: false,
        stop_after: None,
    }
}

/// The variables of a store, sorted by name.
pub fn weights(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A small taming VQGAN: learned codebook, PatchGAN with BatchNorm, adaptive weight from step 1.
pub fn small_vqgan(steps: usize, micro_batch: usize) -> RunConfig {
    let preset = Preset::LdmF4;
    let mut model = preset.config();
    let a = model.autoencoder.taming_mut().unwrap();
    a.ch = 32;
    a.resolution = 32;
    a.num_res_blocks = 1;
    model.quantizer.codebook_size = 64;
    let mut gan = preset.gan().unwrap();
    gan.ndf = 16;
    gan.n_layers = 2;
    gan.disc_start = 1;
    gan.perceptual_weight = 0.0;
    let mut training = preset.training();
    training.steps = steps;
    training.batch_size = 4;
    training.learning_rate = 1e-4;
    RunConfig {
        preset: preset.name().into(),
        model,
        training,
        data: "synthetic:16".into(),
        seed: 2,
        micro_batch,
        gan: Some(gan),
        lpips_weights: None,
        inception_weights: None,
        precision: Default::default(),
    }
}
