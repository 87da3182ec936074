//! Architecture tests: shapes at reduced width, parameter counts of the full presets, variable
//! names, gradient flow through the quantizer, and one optimiser step per preset.

use tch::nn::ModuleT;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use vq_models::{
    Backbone, Discriminator, DiscriminatorKind, PatchDiscriminator, Preset, QuantConv,
    VqAutoencoder, VqAutoencoderConfig,
};
use vq_tch::{Estimator, Mode};

/// The preset at reduced width and input size (same levels, attention, quantizer).
fn reduced(preset: Preset) -> VqAutoencoderConfig {
    let mut cfg = preset.config();
    match &mut cfg.autoencoder {
        Backbone::Taming(a) if a.resolution > 32 => {
            // Keep the attention at the level it is on in the full model.
            let scale = a.resolution / 32;
            a.attn_resolutions = a.attn_resolutions.iter().map(|r| r / scale).collect();
            a.resolution = 32;
            a.ch = 32;
            a.num_res_blocks = 1;
        }
        Backbone::Taming(_) => {}
        Backbone::TimeSformer(t) => {
            // Same patch size, 4 frames of 16², narrow and shallow.
            t.frames = 4;
            t.image_size = 16;
            t.hidden = 32;
            t.layers = 1;
            t.intermediate = 48;
            cfg.quantizer.projection = vq_tch::Projection::Linear { channels: 32 };
        }
        Backbone::Vit(v) => {
            // Same patch size, a 4×4 token grid, narrow and shallow.
            v.image_size = 32;
            v.dim = 32;
            v.depth = 1;
            v.heads = 2;
            v.dim_head = 8;
            v.mlp_dim = 48;
            cfg.quantizer.projection = vq_tch::Projection::Linear { channels: 32 };
        }
    }
    cfg
}

/// `(B, C, R, R)` for images, `(B, C, T, R, R)` for video, with `R` replaced by `r`.
fn input_shape(cfg: &VqAutoencoderConfig, b: i64, r: i64) -> Vec<i64> {
    let c = cfg.autoencoder.in_channels() as i64;
    match cfg.autoencoder.frames() {
        None => vec![b, c, r, r],
        Some(t) => vec![b, c, t as i64, r, r],
    }
}

/// The latent grid shape after the batch: `[T,] h, w`.
fn grid_shape(cfg: &VqAutoencoderConfig) -> Vec<i64> {
    let lr = cfg.autoencoder.latent_resolution() as i64;
    match cfg.autoencoder.frames() {
        None => vec![lr, lr],
        Some(t) => vec![t as i64, lr, lr],
    }
}

fn parameters(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(Tensor::numel)
        .map(|n| n as i64)
        .sum()
}

#[test]
fn every_preset_gives_the_right_shapes_at_reduced_width() {
    for preset in Preset::ALL {
        let cfg = reduced(preset);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut model = VqAutoencoder::new(&vs.root(), &cfg).unwrap();
        let a = &cfg.autoencoder;
        let r = a.resolution() as i64;
        let x = Tensor::randn(input_shape(&cfg, 2, r), (Kind::Float, Device::Cpu));
        let out = model.forward(&x, Mode::Eval).unwrap();
        assert_eq!(
            out.reconstruction.size(),
            input_shape(&cfg, 2, r).as_slice(),
            "{preset:?}"
        );
        let grid = grid_shape(&cfg);
        assert_eq!(out.vq.indices.size()[1..], grid[..], "{preset:?}");
        assert_eq!(
            out.vq.quantized.size(),
            [&[2, cfg.quantizer.input_channels() as i64][..], &grid[..]]
                .concat()
                .as_slice(),
            "{preset:?}"
        );
        let wrong = Tensor::zeros(input_shape(&cfg, 2, r + 1), (Kind::Float, Device::Cpu));
        assert!(matches!(
            model.forward(&wrong, Mode::Eval),
            Err(vq_models::ModelError::Input { .. })
        ));
    }
}

/// Trainable parameters of the full presets (the taming and TimeSformer figures are also checked,
/// name by name, against `tests/fixtures/layouts.json` in `references.rs`). Reference:
/// taming-transformers' Encoder and
/// Decoder (`taming/modules/diffusionmodules/model.py`) instantiated in PyTorch with these
/// settings, `sum(p.numel())`: f16 (ch 128, ch_mult [1,1,2,2,4], 2 blocks, attention at 16,
/// z 256) encoder 29 298 176 + decoder 42 449 795; f4 (ch_mult [1,2,4], no attention, z 3)
/// encoder 22 337 411 + decoder 32 960 771. The Table-1 quantizer adds Linear(256→32) and
/// Linear(32→256) = 16 672 for f16 (+ LayerNorm(32) = 64 for cosine); EMA codebooks are not
/// trainable. latent-diffusion f8 (ch_mult [1,2,2,4], attention at 32, z 4): encoder 27 397 764,
/// decoder 40 253 955. taming's NLayerDiscriminator (ndf 64): 2 765 633 parameters with 3
/// layers, 663 361 with 2. enhancing-transformers' ViT encoder / decoder (image 256, patch 8,
/// dim 512, depth 8, heads 8 × 64, MLP 2048; position embeddings not trainable) rebuilt in
/// PyTorch from its module definitions: 25 306 624 / 25 306 115; its StyleDiscriminator at 256²
/// (capacity 16, at most 512 channels): 38 410 881. transformers' `TimesformerModel` (4.46.3) with
/// Table 11's settings (16 frames, hidden 256, 8 layers, 4 heads, MLP 768, divided space-time):
/// 8 173 824 parameters at 64², patch 2 (BAIR) and 8 183 040 at 128², patch 4 (UCF-101); our
/// decoder is the same trunk with a transposed-convolution head instead of the patch embedding.
#[test]
fn full_presets_have_the_reference_parameter_counts() {
    let f16 = 29_298_176 + 42_449_795 + (256 * 32 + 32) + (32 * 256 + 256);
    let f4 = 22_337_411 + 32_960_771;
    for (preset, expected) in [
        (Preset::VqVaeF16Euclidean, f16),
        (Preset::VqVaeF16Cosine, f16 + 64),
        (Preset::VqVaeF4Euclidean, f4),
        (Preset::VqVaeF4Cosine, f4),
        // VQGANs: + quant_conv and post_quant_conv (1×1, with bias) + the learned codebook.
        (
            Preset::VqganF16Imagenet,
            29_298_176 + 42_449_795 + 2 * (256 * 256 + 256) + 1024 * 256,
        ),
        (Preset::LdmF4, f4 + 2 * (3 * 3 + 3) + 8192 * 3),
        (
            Preset::LdmF8,
            27_397_764 + 40_253_955 + 2 * (4 * 4 + 4) + 16384 * 4,
        ),
        // Encoder = TimesformerModel; decoder = the same minus the patch embedding (3·256·p² +
        // 256) plus the ConvTranspose head (256·3·p² + 3); + Linear(256→32), Linear(32→256), codes.
        (
            Preset::TimeSformerBair,
            8_173_824
                + (8_173_824 - 3_328 + 3_075)
                + (256 * 32 + 32)
                + (32 * 256 + 256)
                + 1024 * 32,
        ),
        (
            Preset::TimeSformerUcf101,
            8_183_040
                + (8_183_040 - 12_544 + 12_291)
                + (256 * 32 + 32)
                + (32 * 256 + 256)
                + 2048 * 32,
        ),
        // + pre_quant Linear(512→32) and post_quant Linear(32→512) + the learned codebook.
        (
            Preset::VitVqganSmall,
            25_306_624 + 25_306_115 + (512 * 32 + 32) + (32 * 512 + 512) + 8192 * 32,
        ),
    ] {
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = VqAutoencoder::new(&vs.root(), &preset.config()).unwrap();
        assert_eq!(parameters(&vs), expected, "{preset:?}");
    }
}

#[test]
fn discriminators_have_the_reference_parameter_counts_and_names() {
    for (preset, expected) in [
        (Preset::VqganF16Imagenet, 2_765_633),
        (Preset::LdmF8, 663_361),
    ] {
        let vs = nn::VarStore::new(Device::Cpu);
        let d = PatchDiscriminator::new(&vs.root(), &preset.gan().unwrap()).unwrap();
        assert_eq!(parameters(&vs), expected, "{preset:?}");
        let v = vs.variables();
        for name in [
            "main.0.weight",
            "main.0.bias",
            "main.2.weight",
            "main.3.running_mean",
        ] {
            assert!(v.contains_key(name), "{name}");
        }
        assert!(!v.contains_key("main.2.bias"), "no bias before BatchNorm");
        let logits = d.forward_t(
            &Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu)),
            true,
        );
        assert_eq!(logits.size()[..2], [2, 1]);
    }
    assert!(Preset::VqVaeF16Euclidean.gan().is_none());
    let gan = Preset::VitVqganSmall.gan().unwrap();
    assert!(matches!(gan.discriminator, DiscriminatorKind::StyleGan(_)));
    let vs = nn::VarStore::new(Device::Cpu);
    let _d = Discriminator::new(&vs.root(), &gan).unwrap();
    assert_eq!(parameters(&vs), 38_410_881);
}

#[test]
fn adaptive_weight_is_the_gradient_norm_ratio() {
    let w = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
    let nll = (&w * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float); // ∇ = (3, 4), norm 5
    let g = (&w * Tensor::from_slice(&[0.0f32, 2.0])).sum(Kind::Float); // ∇ = (0, 2), norm 2
    let a = vq_models::adaptive_weight(&nll, &g, &w, 0.8).unwrap();
    assert!((a - 0.8 * 5.0 / (2.0 + 1e-4)).abs() < 1e-6, "{a}");
    // The graphs are kept: the losses can still be backpropagated.
    (nll + g).backward();
    assert!(w.grad().defined());
}

/// Variable names follow taming's state-dict keys, so converted PyTorch weights load by name.
#[test]
fn variable_names_are_tamings() {
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = Preset::VqVaeF16Euclidean.config();
    let _model = VqAutoencoder::new(&vs.root(), &cfg).unwrap();
    let names = vs.variables();
    for name in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.4.attn.1.q.weight",
        "encoder.down.3.downsample.conv.weight",
        "encoder.mid.attn_1.proj_out.bias",
        "encoder.norm_out.bias",
        "decoder.up.4.block.2.conv2.weight",
        "decoder.up.4.attn.2.k.bias",
        "decoder.up.1.upsample.conv.weight",
        "decoder.mid.block_2.norm2.weight",
        "decoder.conv_out.weight",
        "quantize.codebook",
        "quantize.project_in.weight",
        "quantize.project_out.bias",
    ] {
        assert!(names.contains_key(name), "{name} missing");
    }
    assert!(!names.contains_key("encoder.down.4.downsample.conv.weight"));
    assert!(!names.contains_key("decoder.up.0.upsample.conv.weight"));
}

#[test]
fn gradient_reaches_the_encoder_through_the_quantizer_and_a_step_lowers_nothing_to_nan() {
    for preset in Preset::ALL {
        for estimator in [Estimator::Rotation, Estimator::StraightThrough] {
            let mut cfg = reduced(preset);
            cfg.quantizer.estimator = estimator;
            let vs = nn::VarStore::new(Device::Cpu);
            let mut model = VqAutoencoder::new(&vs.root(), &cfg).unwrap();
            let mut opt = nn::AdamW::default().build(&vs, 1e-3).unwrap();
            let a = &cfg.autoencoder;
            let r = a.resolution() as i64;
            tch::manual_seed(0);
            let x = Tensor::rand(input_shape(&cfg, 2, r), (Kind::Float, Device::Cpu));
            let out = model.forward(&x, Mode::Train).unwrap();
            let loss = out.reconstruction.mse_loss(&x, tch::Reduction::Mean)
                + &out.vq.commitment_loss
                + &out.vq.codebook_loss;
            opt.zero_grad();
            loss.backward();
            // The reconstruction term reaches the encoder only through the estimator.
            let first_layer = match cfg.autoencoder {
                Backbone::Taming(_) => "encoder.conv_in.weight",
                Backbone::Vit(_) => "encoder.to_patch_embedding.0.weight",
                Backbone::TimeSformer(_) => "encoder.embeddings.patch_embeddings.projection.weight",
            };
            let g = vs.variables()[first_layer].grad();
            let norm = f64::try_from(g.norm()).unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{preset:?} {estimator:?}: {norm}"
            );
            opt.step();
            for (name, t) in vs.variables() {
                assert!(
                    f64::try_from(t.isfinite().all().to_kind(Kind::Double)).unwrap() == 1.0,
                    "{preset:?} {estimator:?}: {name} not finite after a step"
                );
            }
        }
    }
}

#[test]
fn estimators_differ_only_in_the_encoder_gradient() {
    // Same weights, same input: same reconstruction and decoder gradient, different encoder
    // gradient (the rotation changes only ∂q̃/∂e).
    let x = Tensor::rand([2, 1, 32, 32], (Kind::Float, Device::Cpu));
    let mut first: Option<nn::VarStore> = None;
    let mut grads = Vec::new();
    for estimator in [Estimator::StraightThrough, Estimator::Rotation] {
        let mut cfg = Preset::DemoFashionMnist.config();
        cfg.quantizer.estimator = estimator;
        let mut vs = nn::VarStore::new(Device::Cpu);
        let mut model = VqAutoencoder::new(&vs.root(), &cfg).unwrap();
        if let Some(src) = &first {
            vs.copy(src).unwrap();
        }
        let out = model.forward(&x, Mode::Eval).unwrap();
        out.reconstruction
            .mse_loss(&x, tch::Reduction::Mean)
            .backward();
        let v = vs.variables();
        grads.push((
            v["decoder.conv_out.weight"].grad(),
            v["encoder.conv_in.weight"].grad(),
        ));
        first.get_or_insert(vs);
    }
    let diff = |a: &Tensor, b: &Tensor| f64::try_from((a - b).abs().max()).unwrap();
    assert!(
        diff(&grads[0].0, &grads[1].0) < 1e-6,
        "decoder gradients equal"
    );
    assert!(
        diff(&grads[0].1, &grads[1].1) > 1e-6,
        "encoder gradients differ"
    );
}

#[test]
fn configs_round_trip_through_json_and_are_validated() {
    for preset in Preset::ALL {
        let cfg = preset.config();
        let json = serde_json::to_string_pretty(&cfg).unwrap();
        let back: VqAutoencoderConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg, "{preset:?}");
        assert_eq!(Preset::from_name(preset.name()).unwrap(), preset);
        let t = serde_json::to_string(&preset.training()).unwrap();
        assert_eq!(
            serde_json::from_str::<vq_models::TrainingConfig>(&t).unwrap(),
            preset.training()
        );
    }
    let mut cfg = Preset::DemoFashionMnist.config();
    cfg.autoencoder.taming_mut().unwrap().norm_groups = 5;
    let vs = nn::VarStore::new(Device::Cpu);
    assert!(matches!(
        VqAutoencoder::new(&vs.root(), &cfg),
        Err(vq_models::ModelError::Config {
            field: "norm_groups",
            ..
        })
    ));
    let mut cfg = Preset::DemoFashionMnist.config();
    cfg.quant_conv = QuantConv::None;
    cfg.autoencoder.taming_mut().unwrap().z_channels = 16;
    assert!(matches!(
        cfg.validate(),
        Err(vq_models::ModelError::Config {
            field: "quantizer",
            ..
        })
    ));
    let json = r#"{"autoencoder": {"ch": 1}}"#;
    assert!(serde_json::from_str::<VqAutoencoderConfig>(json).is_err());
    // A configuration written before the codebook's initialisation was a field (a run folder's
    // run.json) reads as it was trained: N(0, 1).
    let mut old = serde_json::to_value(Preset::VqganF16Imagenet.config()).unwrap();
    assert_eq!(old["quantizer"]["init"], "uniform_inverse_k");
    old["quantizer"].as_object_mut().unwrap().remove("init");
    let back: VqAutoencoderConfig = serde_json::from_value(old).unwrap();
    assert_eq!(back.quantizer.init, vq_tch::CodebookInit::Normal);
}
