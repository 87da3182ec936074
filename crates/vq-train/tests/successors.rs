//! The quantizers that followed the rotation trick (DiVeQ, SF-DiVeQ, IBQ, LFQ, BSQ, SCQ) as
//! methods: each trains on a tiny version of every preset family (taming VQ-VAE, VQGAN with
//! its discriminator, ViT-VQGAN, the TimeSformer video tokenizer) without NaN, the stateful
//! ones resume exactly, and bad combinations are refused before training.

use std::path::PathBuf;
use std::sync::Mutex;

use vq_models::Preset;
use vq_train::codes::{LoadedRun, encode};
use vq_train::codeset::CodeSet;
use vq_train::config::RunConfig;
use vq_train::method::{Method, Successor};
use vq_train::train::train;

mod common;
use common::{options, small_demo, small_vqgan};

/// Training seeds libtorch's global generator; tests that train run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn tmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("vq-successors-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn tiny(preset: Preset, data: &str) -> RunConfig {
    let mut model = preset.config();
    let mut training = preset.training();
    training.steps = 2;
    training.batch_size = 2;
    model.quantizer.codebook_size = 16;
    if let Some(v) = model.autoencoder.vit_mut() {
        (
            v.image_size,
            v.patch_size,
            v.dim,
            v.depth,
            v.heads,
            v.dim_head,
            v.mlp_dim,
        ) = (16, 4, 32, 1, 2, 8, 48);
        model.quantizer.projection = vq_tch::Projection::Linear { channels: 32 };
    }
    if let Some(t) = model.autoencoder.timesformer_mut() {
        (t.frames, t.patch_size, t.hidden, t.layers, t.intermediate) = (4, 16, 32, 1, 48);
        model.quantizer.projection = vq_tch::Projection::Linear { channels: 32 };
    }
    RunConfig {
        preset: preset.name().into(),
        preprocessing: vq_train::data::Pipeline::for_preset(preset),
        model,
        training,
        data: data.into(),
        seed: 7,
        micro_batch: 2,
        gan: None,
        lpips_weights: None,
        inception_weights: None,
        precision: Default::default(),
        encoder_gradient: Default::default(),
        init_from: None,
    }
}

/// Tiny configurations of every preset family.
fn families() -> Vec<(&'static str, RunConfig)> {
    let mut demo = small_demo(2);
    demo.data = "synthetic:8".into();
    demo.model.autoencoder.taming_mut().unwrap().in_channels = 1;
    demo.model.quantizer.codebook_size = 16;
    vec![
        ("vq-vae", demo),
        ("vqgan", small_vqgan(2, 2)),
        ("vit-vqgan", tiny(Preset::VitVqganSmall, "synthetic:4")),
        ("video", tiny(Preset::TimeSformerBair, "synthetic:2")),
    ]
}

#[test]
fn every_new_quantizer_trains_on_every_preset_family() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (family, base) in families() {
        for s in Successor::ALL {
            // The detached variants share their code with the noised ones (σ = 0; tested in
            // vq-tch and trained in the demo comparison).
            if matches!(s, Successor::DiveqDetach | Successor::SfDiveqDetach) {
                continue;
            }
            let mut cfg = base.clone();
            Method::Successor(s)
                .apply(&mut cfg)
                .unwrap_or_else(|e| panic!("{family} {}: {e:#}", s.name()));
            assert_eq!(Method::of(&cfg), Method::Successor(s));
            let out = tmp(&format!("{family}-{}", s.name()));
            let tokens = cfg.model.quantizer.tokens();
            let trained = train(&options(cfg, &out)).unwrap();
            let last = trained.history.last().unwrap();
            assert!(
                last.loss.is_finite() && last.rec.is_finite(),
                "{family} {}: {last:?}",
                s.name()
            );
            if family == "vq-vae" {
                // Codes files hold the tokens a prior may sample, and each one decodes.
                let mut run = LoadedRun::load(&out, tch::Device::Cpu).unwrap();
                let file = out.join("codes.safetensors");
                encode(&mut run, None, vq_data::Split::Test, &file, 100, 4, false).unwrap();
                let set = CodeSet::open(std::slice::from_ref(&file)).unwrap();
                assert_eq!(set.codebook_size, tokens, "{}", s.name());
                let all = tch::Tensor::arange(tokens as i64, (tch::Kind::Int64, tch::Device::Cpu));
                let back = run.model.quantizer().embed(&all).unwrap();
                assert_eq!(back.size()[0], tokens as i64);
            }
            std::fs::remove_dir_all(out).unwrap();
        }
    }
}

#[test]
fn diveq_replacement_and_sf_diveq_warm_up_resume_exactly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut base = small_demo(6);
    base.data = "synthetic:16".into();
    base.model.autoencoder.taming_mut().unwrap().in_channels = 1;
    let diveq = vq_tch::Family::Diveq {
        noise_std: 1e-3,
        replacement: vq_tch::CodeReplacement {
            every: 2,
            min_usage: 4.0,
        },
    };
    for family in [diveq, vq_tch::Family::from_name("sf-diveq").unwrap()] {
        let mut cfg = base.clone();
        cfg.set_family(family).unwrap();
        if let vq_tch::Family::SfDiveq {
            warmup_forwards, ..
        } = cfg.model.quantizer.family
        {
            assert_eq!(warmup_forwards, 0, "a tenth of 6 steps");
            cfg.model.quantizer.family = vq_tch::Family::SfDiveq {
                noise_std: 1e-3,
                warmup_forwards: 3,
            };
        }
        let (a, b) = (tmp("resume-a"), tmp("resume-b"));
        common::assert_resumes_exactly(&cfg, &a, &b, 3);
        for d in [a, b] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}

#[test]
fn bad_combinations_are_refused_before_training() {
    // LFQ needs a power-of-two codebook.
    let mut cfg = small_demo(1);
    cfg.model.quantizer.codebook_size = 1000;
    let err = format!(
        "{:#}",
        Method::from_name("lfq")
            .unwrap()
            .apply(&mut cfg)
            .unwrap_err()
    );
    assert!(
        err.contains("codebook_size") && err.contains("power of two"),
        "{err}"
    );
    // The rotation trick on top of DiVeQ.
    let mut cfg = small_demo(1);
    Method::from_name("diveq").unwrap().apply(&mut cfg).unwrap();
    let err = format!(
        "{:#}",
        Method::from_name("rotation")
            .unwrap()
            .apply(&mut cfg)
            .unwrap_err()
    );
    assert!(err.contains("own gradient path"), "{err}");
    // Straight-through is what it runs with: accepted.
    Method::from_name("ste").unwrap().apply(&mut cfg).unwrap();
    assert_eq!(Method::of(&cfg).name(), "diveq");
    // A new quantizer on top of residual VQ.
    let mut cfg = small_demo(1);
    cfg.set_family(vq_tch::Family::from_name("residual2").unwrap())
        .unwrap();
    let err = format!(
        "{:#}",
        Method::from_name("ibq")
            .unwrap()
            .apply(&mut cfg)
            .unwrap_err()
    );
    assert!(err.contains("residual2"), "{err}");
    // An EMA codebook written into a DiVeQ configuration by hand is refused by validation.
    let mut cfg = small_demo(1);
    cfg.model.quantizer.family = vq_tch::Family::from_name("diveq").unwrap();
    cfg.model.quantizer.estimator = vq_tch::Estimator::StraightThrough;
    let err = format!("{:#}", cfg.validate().unwrap_err());
    assert!(err.contains("learning") && err.contains("EMA"), "{err}");
    // LFQ with the rotation trick is allowed: the estimator maps the input to its code.
    let mut cfg = small_demo(1);
    Method::from_name("lfq").unwrap().apply(&mut cfg).unwrap();
    Method::from_name("rotation")
        .unwrap()
        .apply(&mut cfg)
        .unwrap();
    assert_eq!(Method::of(&cfg).name(), "rotation");
}
