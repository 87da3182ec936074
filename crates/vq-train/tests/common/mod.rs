//! Run configurations shared by the training test binaries.

use vq_models::Preset;
use vq_train::train::RunConfig;

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
