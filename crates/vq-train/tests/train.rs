//! End-to-end training tests on small settings: exact resume, non-finite loss handling, run
//! folder protection, and the comparison outputs.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tch::Device;
use vq_models::Preset;
use vq_tch::Estimator;
use vq_train::config::{RunConfig, TrainOptions};
use vq_train::readback::Readback;
use vq_train::train::train;

mod common;
use common::{image_folder, options, skipped_lines, small_demo, small_rgb, weights};

/// Training seeds libtorch's global generator; tests that train run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vq-train-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Steps of the scalar `tag` in the run's TensorBoard file (read back through the project's
/// TFRecord reader, CRCs checked); also checks the file's version record and the one config text.
fn tensorboard_steps(run: &Path, tag: &str) -> Vec<i64> {
    use vq_train::tensorboard::{Kind, What, event_file, read_events, scalars_of};
    let events = read_events(&event_file(run).unwrap().expect("an event file")).unwrap();
    assert_eq!(
        events[0].what,
        Some(What::FileVersion("brain.Event:2".into()))
    );
    let texts = events
        .iter()
        .filter(|e| match &e.what {
            Some(What::Summary(s)) => s
                .value
                .iter()
                .any(|v| v.tag == "config" && matches!(v.kind, Some(Kind::Tensor(_)))),
            _ => false,
        })
        .count();
    assert_eq!(texts, 1, "one config text");
    events
        .iter()
        .filter(|e| scalars_of(e).iter().any(|(t, v)| t == tag && v.is_finite()))
        .map(|e| e.step)
        .collect()
}

#[test]
fn an_interrupted_and_resumed_run_equals_an_uninterrupted_one() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b) = (tmp("resume-a"), tmp("resume-b"));
    let whole = train(&options(small_demo(6), &a)).unwrap();

    let first = train(&TrainOptions {
        stop_after: Some(3),
        ..options(small_demo(6), &b)
    })
    .unwrap();
    assert_eq!(first.history.last().unwrap().step, 3);
    // A crash after step 3's checkpoint but after logging step 4: the line goes on resume.
    let metrics = b.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text.push_str(
        &text
            .lines()
            .last()
            .unwrap()
            .replace("\"step\":3", "\"step\":4"),
    );
    text.push('\n');
    std::fs::write(&metrics, text).unwrap();
    // Without --resume the folder is protected.
    let err = train(&options(small_demo(6), &b)).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    // Resuming with other numbers is refused.
    let mut other = small_demo(6);
    other.training.learning_rate *= 2.0;
    let err = train(&TrainOptions {
        resume: true,
        ..options(other, &b)
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("another configuration"), "{err}");

    let resumed = train(&TrainOptions {
        resume: true,
        ..options(small_demo(6), &b)
    })
    .unwrap();
    let (wa, wb) = (
        whole.history.last().unwrap(),
        resumed.history.last().unwrap(),
    );
    assert_eq!(wb.step, 6);
    assert_eq!(wa.loss, wb.loss, "same step-6 loss");
    assert_eq!(wa.usage, wb.usage);
    for ((na, ta), (nb, tb)) in weights(&whole.vs).iter().zip(weights(&resumed.vs).iter()) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs after resume");
    }
    let _ = common::assert_same_checkpoints(&a, &b);
    // Every step logged once across the two invocations, in metrics.jsonl and in the
    // TensorBoard file (the crash's extra step 4 dropped from both).
    let lines = vq_train::compare::read_metrics(&b.join("metrics.jsonl")).unwrap();
    assert_eq!(
        lines.iter().map(|m| m.step).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(tensorboard_steps(&b, "train/rec"), [1, 2, 3, 4, 5, 6]);
    assert_eq!(tensorboard_steps(&a, "train/rec"), [1, 2, 3, 4, 5, 6]);
    // More steps (the one setting that may change; the schedule does not depend on it): the
    // continued run equals one started with the larger total.
    let longer = || {
        let mut c = small_demo(6);
        c.training.steps = 8;
        c
    };
    let c = tmp("resume-c");
    let straight = train(&options(longer(), &c)).unwrap();
    let extended = train(&TrainOptions {
        resume: true,
        ..options(longer(), &b)
    })
    .unwrap();
    assert_eq!(extended.history.last().unwrap().step, 8);
    for ((na, ta), (_, tb)) in weights(&straight.vs)
        .iter()
        .zip(weights(&extended.vs).iter())
    {
        assert!(ta.equal(tb), "{na} differs after resuming with more steps");
    }
    let _ = common::assert_same_checkpoints(&c, &b);
    for d in [a, b, c] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// A run that diverges stops with a non-finite loss and keeps its last checkpoint, whether the
/// steps are read back one by one or per logging window (then the update of the diverged step
/// and every later one is skipped on the device until the read): both name the same step.
#[test]
fn a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut named = Vec::new();
    for (readback, checkpoint_every, log_every) in
        [(Readback::Step, 1, 1), (Readback::Window, 100, 5)]
    {
        let out = tmp(&format!("nan-{readback:?}"));
        let mut cfg = small_demo(20);
        cfg.training.learning_rate = 1e30;
        cfg.training.warmup_steps = 0;
        cfg.training.grad_clip = 0.0;
        let err = train(&TrainOptions {
            checkpoint_every,
            log_every,
            readback,
            ..options(cfg, &out)
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("non-finite"), "{err}");
        assert!(err.contains("training stopped"), "{err}");
        match vq_train::checkpoint::latest(&out).unwrap() {
            Some((ckpt, state)) => {
                assert!(state.step >= 1 && state.step < 20, "{state:?}");
                assert!(err.contains(&ckpt.display().to_string()), "{err}");
                assert_checkpoint_finite(&ckpt, 2);
            }
            // Diverged before step 3's read: no checkpoint was written.
            None => assert!(
                readback == Readback::Window && err.contains("none yet"),
                "{err}"
            ),
        }
        named.push(err.replace(&out.display().to_string(), "RUN"));
        std::fs::remove_dir_all(out).unwrap();
    }
    // Both name the same step.
    let step_of = |e: &str| {
        e.split(" at step ")
            .nth(1)
            .map(|r| r.split([' ', ';']).next().unwrap().to_owned())
    };
    assert_eq!(step_of(&named[0]), step_of(&named[1]), "{named:?}");
}

/// Every floating-point tensor of the checkpoint's `files` safetensors files is finite.
fn assert_checkpoint_finite(ckpt: &Path, files: usize) {
    let mut found = 0;
    for f in std::fs::read_dir(ckpt).unwrap() {
        let path = f.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            found += 1;
            for (name, t) in tch::Tensor::read_safetensors(&path).unwrap() {
                if t.is_floating_point() {
                    let finite = bool::try_from(t.isfinite().all()).unwrap();
                    assert!(finite, "{name} of {} is not finite", path.display());
                }
            }
        }
    }
    assert_eq!(found, files, "{}", ckpt.display());
}

/// Reading the steps back per logging window gives the run that reading every step gives:
/// the same metrics lines and weights, for a VQ-VAE and a VQGAN with its discriminator.
#[test]
fn reading_back_per_window_changes_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut gan = small_gan(4);
    gan.gan.as_mut().unwrap().disc_start = 1;
    for (what, cfg) in [("vq-vae", small_demo(7)), ("vqgan", gan)] {
        let steps = cfg.training.steps;
        let mut runs = Vec::new();
        for readback in [Readback::Step, Readback::Window] {
            let out = tmp(&format!("readback-{what}-{readback:?}"));
            let trained = train(&TrainOptions {
                log_every: 3,
                readback,
                ..options(cfg.clone(), &out)
            })
            .unwrap();
            let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    v.as_object_mut().unwrap().remove("steps_per_s");
                    v
                })
                .collect();
            runs.push((lines, weights(&trained.vs)));
            std::fs::remove_dir_all(out).unwrap();
        }
        let ((l0, w0), (l1, w1)) = (&runs[0], &runs[1]);
        assert_eq!(
            l0.len(),
            steps.div_ceil(3),
            "{what}: windows of 3 steps and the last"
        );
        assert_eq!(l0, l1, "{what}");
        for ((n0, t0), (n1, t1)) in w0.iter().zip(w1) {
            assert!(n0 == n1 && t0.equal(t1), "{what}: {n0}");
        }
    }
}

#[test]
fn non_finite_discriminator_gradients_stop_training_before_a_checkpoint_holds_them() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (readback, checkpoint_every, log_every) in
        [(Readback::Step, 1, 1), (Readback::Window, 2, 5)]
    {
        let out = tmp(&format!("nan-disc-{readback:?}"));
        let mut cfg = small_gan(12);
        let gan = cfg.gan.as_mut().unwrap();
        // An R1 penalty whose weight overflows f32: the discriminator's gradients are non-finite
        // while every loss the step reports is finite (the hinge loss is logged without R1).
        gan.r1 = Some(vq_models::R1Penalty {
            gamma: 1e38,
            every: 2,
        });
        // The discriminator trains from step 2 (index 1), the penalty first applies at step 3.
        gan.disc_start = 1;
        let err = train(&TrainOptions {
            checkpoint_every,
            log_every,
            readback,
            ..options(cfg, &out)
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("non-finite") && err.contains("training stopped"),
            "{err}"
        );
        let (ckpt, state) = vq_train::checkpoint::latest(&out).unwrap().unwrap();
        assert_eq!(state.step, 2, "{err}");
        assert!(
            err.contains("discriminator") && err.contains("step 3"),
            "{err}"
        );
        assert!(err.contains(&ckpt.display().to_string()), "{err}");
        // Model, discriminator and their optimizers.
        assert_checkpoint_finite(&ckpt, 4);
        std::fs::remove_dir_all(out).unwrap();
    }
}

#[test]
fn compare_writes_the_table_json_and_plots() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tmp("compare");
    let mut cfg = small_demo(3);
    cfg.data = "synthetic:64".into();
    cfg.model.autoencoder.taming_mut().unwrap().in_channels = 1;
    let rows = vq_train::compare::compare(
        &options(cfg.clone(), &out),
        &[Estimator::StraightThrough, Estimator::Rotation],
    )
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].estimator, "ste");
    for r in &rows {
        assert_eq!(r.val.images, 64);
        assert!(r.val.usage > 0.0 && r.val.usage <= 1.0);
        assert!(r.val.rec_mse.is_finite() && r.val.quantization_error.is_finite());
        // Its exact value is checked against the quantizer in the image-folder test.
        assert!(r.val.relative_quantization_error > 0.0);
    }
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert!(
        md.contains("| ste |") && md.contains("| rotation |"),
        "{md}"
    );
    // Without perceptual weights: empty cells, and what they need said once per table.
    assert_eq!(md.matches("needs weights (--lpips").count(), 1, "{md}");
    assert_eq!(md.matches("need weights (--inception").count(), 1, "{md}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("compare.json")).unwrap()).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 2);
    for f in [
        "curves.png",
        "reconstructions.png",
        "ste/reconstructions.png",
        "rotation/eval.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // The compare's grid has a row per estimator below the originals; a run's has one.
    let height = |f: &str| image::image_dimensions(out.join(f)).unwrap().1;
    let (one, both) = (
        height("ste/reconstructions.png"),
        height("reconstructions.png"),
    );
    assert!(both > one && both < 2 * one, "{one} {both}");
    // Each estimator's TensorBoard file: the training series, the evaluation at the last step
    // (once, also after the evaluation below runs again) and the reconstruction grid.
    let check_events = |run: &Path| {
        use vq_train::tensorboard::{Kind, What, event_file, read_events};
        assert_eq!(tensorboard_steps(run, "train/usage"), [1, 2, 3]);
        assert_eq!(tensorboard_steps(run, "val/rec_mse"), [3]);
        let events = read_events(&event_file(run).unwrap().unwrap()).unwrap();
        let images: Vec<_> = events
            .iter()
            .filter_map(|e| match &e.what {
                Some(What::Summary(s)) => s.value.iter().find_map(|v| match &v.kind {
                    Some(Kind::Image(i)) => Some((e.step, v.tag.clone(), i.clone())),
                    _ => None,
                }),
                _ => None,
            })
            .collect();
        assert_eq!(images.len(), 1, "{}", run.display());
        let (step, tag, img) = &images[0];
        assert_eq!((*step, tag.as_str()), (3, "reconstructions"));
        let png = std::fs::read(run.join("reconstructions.png")).unwrap();
        assert_eq!(img.encoded_image_string, png);
        assert!(img.height > 0 && img.width > 0);
    };
    check_events(&out.join("ste"));
    check_events(&out.join("rotation"));
    // Re-running with --resume reuses the finished runs; other settings are refused.
    let again = vq_train::compare::compare(
        &TrainOptions {
            resume: true,
            ..options(cfg.clone(), &out)
        },
        &[Estimator::StraightThrough],
    )
    .unwrap();
    // The reused run reports the time it was trained for, from its checkpoint.
    assert!(rows[0].train_seconds > 0.0, "{:?}", rows[0].train_seconds);
    assert_eq!(again[0].train_seconds, rows[0].train_seconds);
    assert_eq!(again[0].val, rows[0].val);
    check_events(&out.join("ste"));
    let mut other = cfg;
    other.training.learning_rate *= 3.0;
    let err = vq_train::compare::compare(
        &TrainOptions {
            resume: true,
            ..options(other, &out)
        },
        &[Estimator::StraightThrough],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("another configuration"), "{err}");
    std::fs::remove_dir_all(out).unwrap();
}

/// The paper's baselines train through `compare` under their own names and change what the
/// encoder learns; the Gumbel run (noise drawn on the host per forward) resumes exactly.
#[test]
fn the_papers_baselines_compare_and_the_gumbel_run_resumes_exactly() {
    use vq_train::method::Method;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tmp("baselines");
    let mut cfg = small_demo(3);
    cfg.data = "synthetic:32".into();
    cfg.model.autoencoder.taming_mut().unwrap().in_channels = 1;
    let methods = [
        Method::Estimator(Estimator::StraightThrough),
        Method::Gumbel,
        Method::HessianApprox,
        Method::ExactGradients,
    ];
    let rows = vq_train::compare::compare(&options(cfg.clone(), &out), &methods).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.estimator.as_str()).collect();
    assert_eq!(
        names,
        ["ste", "gumbel", "hessian-approx", "exact-gradients"]
    );
    for r in &rows[1..] {
        assert!(r.val.rec_mse.is_finite(), "{r:?}");
        assert_ne!(
            r.val.rec_mse, rows[0].val.rec_mse,
            "{} trains as STE",
            r.estimator
        );
    }
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    let gumbel = md.lines().find(|l| l.starts_with("| gumbel |")).unwrap();
    assert!(gumbel.contains("| — | — |"), "{gumbel}");
    let record = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(out.join(name).join("run.json")).unwrap()).unwrap()
    };
    assert_eq!(
        record("hessian-approx")["encoder_gradient"],
        "hessian-approx"
    );
    assert_eq!(
        record("exact-gradients")["model"]["quantizer"]["estimator"],
        "ste"
    );
    // Records of plain runs are as before the baselines existed.
    assert!(record("ste").get("encoder_gradient").is_none());
    assert!(record("ste")["model"]["quantizer"].get("family").is_none());
    assert!(record("gumbel")["model"]["quantizer"]["family"]["gumbel"].is_object());

    let b = tmp("gumbel-resumed");
    let mut gumbel_cfg = cfg.clone();
    Method::Gumbel.apply(&mut gumbel_cfg).unwrap();
    train(&TrainOptions {
        stop_after: Some(2),
        ..options(gumbel_cfg.clone(), &b)
    })
    .unwrap();
    train(&TrainOptions {
        resume: true,
        ..options(gumbel_cfg, &b)
    })
    .unwrap();
    let files = common::assert_same_checkpoints(&out.join("gumbel"), &b);
    assert!(files.iter().any(|f| f == "model.safetensors"), "{files:?}");

    // The decoder-based baselines are VQ-VAE ones.
    let mut gan = small_gan(2);
    let err = Method::HessianApprox
        .apply(&mut gan)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("VQ-VAE") && err.contains("hessian-approx"),
        "{err}"
    );
    // compare refuses it before training anything.
    let c = tmp("baselines-refused");
    let err = vq_train::compare::compare(
        &options(small_gan(2), &c),
        &[
            Method::Estimator(Estimator::StraightThrough),
            Method::HessianApprox,
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("VQ-VAE"), "{err}");
    assert!(!c.join("ste").exists());
    for d in [out, b] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

fn small_gan(steps: usize) -> RunConfig {
    common::small_vqgan(steps, 2)
}

#[test]
fn vqgan_training_alternates_and_resumes_exactly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b) = (tmp("gan-a"), tmp("gan-b"));
    let whole = train(&options(small_gan(4), &a)).unwrap();
    let h = &whole.history;
    assert_eq!(h.len(), 4);
    assert_eq!(
        (h[0].d_loss, h[0].d_weight),
        (0.0, 0.0),
        "before disc_start"
    );
    for m in &h[1..] {
        assert!(m.d_loss > 0.0 && m.d_loss.is_finite(), "{m:?}");
        assert!(m.d_weight > 0.0 && m.d_weight.is_finite(), "{m:?}");
    }
    train(&TrainOptions {
        stop_after: Some(2),
        ..options(small_gan(4), &b)
    })
    .unwrap();
    let ckpt = vq_train::checkpoint::latest(&b).unwrap().unwrap().0;
    assert!(ckpt.join("discriminator_optimizer.safetensors").is_file());
    let resumed = train(&TrainOptions {
        resume: true,
        ..options(small_gan(4), &b)
    })
    .unwrap();
    let (x, y) = (h.last().unwrap(), resumed.history.last().unwrap());
    assert_eq!((x.loss, x.d_loss), (y.loss, y.d_loss), "same step-4 losses");
    let files = common::assert_same_checkpoints(&a, &b);
    assert!(
        files
            .iter()
            .any(|f| f == "discriminator_optimizer.safetensors"),
        "{files:?}"
    );
    for d in [a, b] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// ViT-VQGAN (Table 4) at toy size: ViT encoder/decoder, StyleGAN2-type discriminator with the
/// non-saturating loss and the lazy R1 penalty, fixed adversarial weight, L2 reconstruction.
#[test]
fn vit_vqgan_trains_with_the_style_discriminator_and_resumes_exactly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let preset = Preset::VitVqganSmall;
    let mut model = preset.config();
    let v = model.autoencoder.vit_mut().unwrap();
    v.image_size = 16;
    v.patch_size = 4;
    v.dim = 32;
    v.depth = 1;
    v.heads = 2;
    v.dim_head = 8;
    v.mlp_dim = 48;
    model.quantizer.projection = vq_tch::Projection::Linear { channels: 32 };
    model.quantizer.codebook_size = 32;
    let mut gan = preset.gan().unwrap();
    gan.discriminator =
        vq_models::DiscriminatorKind::StyleGan(vq_models::StyleDiscriminatorConfig {
            image_size: 16,
            network_capacity: 2,
            fmap_max: 16,
        });
    gan.perceptual_weight = 0.0;
    gan.r1 = Some(vq_models::R1Penalty {
        gamma: 40.0,
        every: 2,
    });
    let mut training = preset.training();
    training.steps = 4;
    training.batch_size = 4;
    let cfg = RunConfig {
        preset: preset.name().into(),
        preprocessing: vq_train::data::Pipeline::for_preset(preset),
        model,
        training,
        data: "synthetic:16".into(),
        seed: 3,
        micro_batch: 2,
        gan: Some(gan),
        lpips_weights: None,
        inception_weights: None,
        precision: Default::default(),
        encoder_gradient: Default::default(),
        init_from: None,
    };
    let (a, b) = (tmp("vit-a"), tmp("vit-b"));
    let whole = train(&options(cfg.clone(), &a)).unwrap();
    for m in &whole.history {
        assert!(m.d_loss > 0.0 && m.d_loss.is_finite(), "{m:?}");
        assert_eq!(m.d_weight, 0.1, "fixed adversarial weight");
    }
    train(&TrainOptions {
        stop_after: Some(1),
        ..options(cfg.clone(), &b)
    })
    .unwrap();
    let resumed = train(&TrainOptions {
        resume: true,
        ..options(cfg, &b)
    })
    .unwrap();
    let (x, y) = (
        whole.history.last().unwrap(),
        resumed.history.last().unwrap(),
    );
    assert_eq!((x.loss, x.d_loss), (y.loss, y.d_loss), "same step-4 losses");
    let files = common::assert_same_checkpoints(&a, &b);
    assert!(
        files
            .iter()
            .any(|f| f == "discriminator_optimizer.safetensors"),
        "{files:?}"
    );
    for d in [a, b] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Random LPIPS weights in the network's own layout (the real ones cannot be shipped), with
/// non-negative heads as the trained ones have.
fn lpips_file(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("lpips.safetensors");
    let vs = tch::nn::VarStore::new(Device::Cpu);
    vq_models::Lpips::new(&vs.root());
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.starts_with("lin") {
                let _ = t.abs_();
            }
        }
    });
    vs.save(&file).unwrap();
    file
}

#[test]
fn lpips_weights_add_the_perceptual_term_and_the_eval_column() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tmp("lpips");
    let weights = lpips_file(&tmp("lpips-weights"));
    let mut with = small_gan(2);
    with.gan.as_mut().unwrap().perceptual_weight = 1.0;
    with.lpips_weights = Some(weights.clone());
    let without = small_gan(2);
    let a = train(&options(with.clone(), &out.join("with"))).unwrap();
    let b = train(&options(without, &out.join("without"))).unwrap();
    // Same weights and data: the perceptual term makes the step-1 loss larger.
    assert!(
        a.history[0].loss > b.history[0].loss,
        "{:?} vs {:?}",
        a.history[0],
        b.history[0]
    );
    let rows = vq_train::compare::compare(
        &TrainOptions {
            resume: true,
            ..options(with, &out.join("cmp"))
        },
        &[Estimator::Rotation],
    )
    .unwrap();
    let lp = rows[0].val.lpips.expect("LPIPS column");
    assert!(lp.is_finite() && lp > 0.0, "{lp}");
    let md = std::fs::read_to_string(out.join("cmp/compare.md")).unwrap();
    assert!(!md.contains("needs weights (--lpips"), "{md}");
    std::fs::remove_dir_all(out).unwrap();
    std::fs::remove_dir_all(weights.parent().unwrap()).unwrap();
}

/// Random FID-Inception weights with pytorch-fid's tensor names, from the network itself.
fn inception_file(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("inception.safetensors");
    // The structure is vq-models'; its names and parameter count are tested there against
    // torchvision's. Build it once with random values through a VarStore save.
    let vs = tch::nn::VarStore::new(Device::Cpu);
    vq_models::FidInception::new(&vs.root());
    vs.save(&file).unwrap();
    file
}

#[test]
fn inception_weights_fill_the_rfid_and_ris_columns() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tmp("inception");
    let weights = inception_file(&tmp("inception-weights"));
    let mut cfg = small_demo(1);
    cfg.data = "synthetic:8".into();
    cfg.inception_weights = Some(weights.clone());
    let rows = vq_train::compare::compare(&options(cfg, &out), &[Estimator::Rotation]).unwrap();
    let v = &rows[0].val;
    let (fid, is) = (v.rfid.expect("r-FID"), v.ris.expect("r-IS"));
    assert!(fid.is_finite() && fid >= -1e-6, "{fid}");
    assert!(is.is_finite() && is >= 1.0 - 1e-9, "{is}");
    assert!(rows[0].train.rfid.is_none(), "r-FID is the held-out set's");
    std::fs::remove_dir_all(out).unwrap();
    std::fs::remove_dir_all(weights.parent().unwrap()).unwrap();
}

/// An `image-folder:` source (Imagenette's layout) trains through the streaming loader, resumes
/// exactly, and evaluates on its `val/` images.
#[test]
fn an_image_folder_trains_streams_and_resumes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let root = tmp("image-folder");
    let cfg = small_rgb(image_folder(&root, 4), 4, 3, 3);
    let (a, b) = (root.join("a"), root.join("b"));
    let whole = train(&options(cfg.clone(), &a)).unwrap();
    train(&TrainOptions {
        stop_after: Some(2),
        ..options(cfg.clone(), &b)
    })
    .unwrap();
    let resumed = train(&TrainOptions {
        resume: true,
        ..options(cfg.clone(), &b)
    })
    .unwrap();
    assert_eq!(
        whole.history.last().unwrap().loss,
        resumed.history.last().unwrap().loss
    );
    let _ = common::assert_same_checkpoints(&a, &b);
    let mut trained = whole;
    let row = vq_train::compare::evaluate_run(&mut trained.model, &cfg, &a, Device::Cpu)
        .unwrap()
        .row;
    assert!(
        row.val.rec_mse.is_finite() && row.val.images == 2 && row.val.skipped.is_empty(),
        "{row:?}"
    );
    // QE and relative QE equal the quantizer's own on the two held-out images in one batch
    // (mean((e − q)²) and mean((e − q)²) / mean(e²); batches of equal size average exactly).
    let set = vq_train::data::ImageSet::load(
        &vq_train::data::DataSource::parse(&cfg.data).unwrap(),
        vq_data::Split::Test,
        3,
        cfg.model.autoencoder.resolution(),
        None,
        cfg.preprocessing,
    )
    .unwrap();
    let (x, _) = set.decodable_batch(&[0, 1], Device::Cpu).unwrap();
    let vq = {
        let _g = tch::no_grad_guard();
        trained
            .model
            .encode(&x.unwrap(), vq_tch::Mode::Eval)
            .unwrap()
    };
    let qe = f64::try_from(&vq.quantization_error).unwrap();
    let rel = qe / f64::try_from(&vq.latent_power).unwrap();
    assert!(
        qe > 0.0 && (row.val.quantization_error - qe).abs() <= 1e-5 * qe,
        "{qe} {row:?}"
    );
    assert!(
        (row.val.relative_quantization_error - rel).abs() <= 1e-5 * rel,
        "{rel} {row:?}"
    );
    assert!(skipped_lines(&a).is_empty());

    // A corrupt training image is replaced by the next one of its epoch, counted at every visit
    // (4 steps of 3 over 4 images: 3 epochs) and listed once; a corrupt held-out image is left
    // out of the evaluation and reported, as in training.
    std::fs::write(root.join("data/train/n01/gray.JPEG"), b"\xff\xd8 truncated").unwrap();
    std::fs::write(root.join("data/val/n02/cmyk.JPEG"), b"not an image").unwrap();
    let c = root.join("c");
    train(&TrainOptions {
        stop_after: Some(2),
        ..options(cfg.clone(), &c)
    })
    .unwrap();
    let listed = skipped_lines(&c);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(
        listed[0]["file"].as_str().unwrap().ends_with("gray.JPEG"),
        "{listed:?}"
    );
    assert!(
        listed[0]["error"].as_str().unwrap().contains("gray.JPEG"),
        "{listed:?}"
    );
    // Resumed, the run keeps its list and does not list the file again.
    let mut again = train(&TrainOptions {
        resume: true,
        ..options(cfg.clone(), &c)
    })
    .unwrap();
    assert_eq!(again.history.last().unwrap().step, 4);
    assert_eq!(skipped_lines(&c), listed);
    let metrics = vq_train::compare::read_metrics(&c.join("metrics.jsonl")).unwrap();
    let skipped: u64 = metrics.iter().map(|m| m.skipped_samples).sum();
    assert_eq!(skipped, 3, "{metrics:?}");
    let row = vq_train::compare::evaluate_run(&mut again.model, &cfg, &c, Device::Cpu)
        .unwrap()
        .row;
    assert_eq!(
        (row.train.images, row.train.skipped.len()),
        (3, 1),
        "{row:?}"
    );
    assert_eq!((row.val.images, row.val.skipped.len()), (1, 1), "{row:?}");
    assert!(row.val.skipped[0].name.ends_with("cmyk.JPEG"), "{row:?}");
    assert!(row.val.rec_mse.is_finite());
    let written: vq_train::compare::CompareRow =
        serde_json::from_slice(&std::fs::read(c.join("eval.json")).unwrap()).unwrap();
    assert_eq!(written.val.skipped, row.val.skipped);
    // A set where nothing decodes is an error naming a file, not a panic.
    for f in ["rgb.JPEG", "cmyk.JPEG", "png_named.JPEG"] {
        let class = if f == "rgb.JPEG" { "n01" } else { "n02" };
        std::fs::write(root.join("data/train").join(class).join(f), b"junk").unwrap();
    }
    let err = format!("{:#}", train(&options(cfg, &root.join("d"))).unwrap_err());
    assert!(err.contains("JPEG"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// A TimeSformer video tokenizer (Table 5, at toy size) trains on BAIR clips read from
/// `.tfrecords` files through the streaming loader, with the per-frame StyleGAN discriminator,
/// and evaluates on the test split's fixed windows.
#[test]
fn a_video_tokenizer_trains_on_bair_clips() {
    use vq_data::tfrecord::{Example, write_record};
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let root = tmp("bair");
    for (split, n) in [("train", 3u8), ("test", 1)] {
        let dir = root.join("softmotion30_44k").join(split);
        std::fs::create_dir_all(&dir).unwrap();
        let mut bytes = Vec::new();
        for s in 0..n {
            let frames: Vec<Vec<u8>> = (0..30)
                .map(|t| {
                    (0..64 * 64 * 3)
                        .map(|i| ((i / 3 + 7 * t + 50 * s as usize) % 256) as u8)
                        .collect()
                })
                .collect();
            let ex = Example::from_bytes_features(
                frames
                    .iter()
                    .enumerate()
                    .map(|(t, f)| (format!("{t}/image_aux1/encoded"), f.as_slice())),
            );
            write_record(&mut bytes, &ex.encode_payload()).unwrap();
        }
        std::fs::write(dir.join("traj_0_to_255.tfrecords"), bytes).unwrap();
    }
    let preset = Preset::TimeSformerBair;
    let mut model = preset.config();
    let t = model.autoencoder.timesformer_mut().unwrap();
    t.frames = 4;
    t.patch_size = 16;
    t.hidden = 32;
    t.layers = 1;
    t.intermediate = 48;
    model.quantizer.projection = vq_tch::Projection::Linear { channels: 32 };
    model.quantizer.codebook_size = 16;
    let mut gan = preset.gan().unwrap();
    gan.discriminator =
        vq_models::DiscriminatorKind::StyleGan(vq_models::StyleDiscriminatorConfig {
            image_size: 64,
            network_capacity: 1,
            fmap_max: 8,
        });
    gan.perceptual_weight = 0.0;
    let mut training = preset.training();
    training.steps = 2;
    training.batch_size = 2;
    let cfg = RunConfig {
        preset: preset.name().into(),
        preprocessing: vq_train::data::Pipeline::for_preset(preset),
        model,
        training,
        data: format!("bair:{}", root.display()),
        seed: 4,
        micro_batch: 2,
        gan: Some(gan),
        lpips_weights: None,
        inception_weights: None,
        precision: Default::default(),
        encoder_gradient: Default::default(),
        init_from: None,
    };
    let out = root.join("run");
    let mut trained = train(&options(cfg.clone(), &out)).unwrap();
    assert!(
        trained
            .history
            .iter()
            .all(|m| m.loss.is_finite() && m.d_loss > 0.0)
    );
    let row = vq_train::compare::evaluate_run(&mut trained.model, &cfg, &out, Device::Cpu)
        .unwrap()
        .row;
    assert_eq!((row.train.images, row.val.images), (3, 1), "{row:?}");
    assert!(out.join("reconstructions.png").is_file());
    // A video model refuses image data.
    let mut images = cfg;
    images.data = "fashion-mnist-demo".into();
    let err = format!(
        "{:#}",
        train(&options(images, &root.join("wrong"))).unwrap_err()
    );
    assert!(err.contains("video clips"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_missing_held_out_split_is_found_before_the_first_step() {
    let root = tmp("no-val");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vq-data/tests/fixtures/images");
    let d = root.join("data/train/n01");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(fixtures.join("rgb.JPEG"), d.join("rgb.JPEG")).unwrap();
    let mut cfg = small_demo(2);
    cfg.data = format!("image-folder:{}", root.join("data").display());
    cfg.model.autoencoder.taming_mut().unwrap().in_channels = 3;
    cfg.model.autoencoder.taming_mut().unwrap().out_channels = 3;
    cfg.training.batch_size = 1;
    cfg.micro_batch = 1;
    let out = root.join("run");
    let began = std::time::Instant::now();
    let err = format!("{:#}", train(&options(cfg, &out)).unwrap_err());
    assert!(err.contains("held-out split"), "{err}");
    assert!(
        vq_train::checkpoint::latest(&out).unwrap().is_none(),
        "trained first"
    );
    assert!(began.elapsed().as_secs() < 30);
}

#[test]
fn quantizer_families_train_report_per_group_and_resume_exactly() {
    use vq_tch::Family;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut cfg = small_demo(4);
    cfg.data = "synthetic:32".into();
    cfg.model.autoencoder.taming_mut().unwrap().in_channels = 1;
    // Residual VQ with quantizer dropout: the dropout draws are state, so a resumed run draws
    // what an uninterrupted one does.
    cfg.set_family(Family::from_name("residual2-dropout").unwrap())
        .unwrap();
    let (a, b) = (tmp("rq-straight"), tmp("rq-resumed"));
    common::assert_resumes_exactly(&cfg, &a, &b, 2);
    let mut vs = tch::nn::VarStore::new(Device::Cpu);
    let mut model = vq_models::VqAutoencoder::new(&vs.root(), &cfg.model).unwrap();
    vq_train::checkpoint::load_model(&a, &mut vs).unwrap();
    assert!(vs.variables().contains_key("quantize.stage_draws"));
    let row = vq_train::compare::evaluate_run(&mut model, &cfg, &a, Device::Cpu)
        .unwrap()
        .row;
    assert_eq!(row.val.groups.len(), 2, "{:?}", row.val);
    let mean_usage = row.val.groups.iter().map(|g| g.usage).sum::<f64>() / 2.0;
    assert!((mean_usage - row.val.usage_total).abs() < 1e-12);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("eval.json")).unwrap()).unwrap();
    assert_eq!(json["val"]["groups"].as_array().unwrap().len(), 2);
    // Training logs usage over the stages' slots.
    let log = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    assert!(log.lines().count() >= 4);
    // Every family trains from the demo preset; the baselines refuse the families.
    for name in ["heads4-separate", "simvq", "fsq8-6-5"] {
        let mut c = small_demo(1);
        c.data = "synthetic:32".into();
        c.model.autoencoder.taming_mut().unwrap().in_channels = 1;
        c.set_family(Family::from_name(name).unwrap()).unwrap();
        let out = tmp(name);
        let trained = train(&options(c, &out)).unwrap();
        assert!(trained.history.last().unwrap().loss.is_finite(), "{name}");
        std::fs::remove_dir_all(out).unwrap();
    }
    let err = vq_train::method::Method::Gumbel
        .apply(&mut cfg.clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("residual2-dropout"), "{err}");
    // A family that does not fit the preset is refused with the field named.
    let mut c = small_demo(1);
    let err = c
        .set_family(Family::from_name("heads5").unwrap())
        .unwrap_err();
    assert!(format!("{err:#}").contains("codebook_dim"), "{err:#}");
    for d in [a, b] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn compare_over_seeds_reports_statistics_and_keeps_finished_runs() {
    use vq_train::method::Method;
    use vq_train::sweep::{Sweep, sweep};
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tmp("sweep");
    let mut cfg = small_demo(2);
    cfg.data = "synthetic:32".into();
    cfg.model.autoencoder.taming_mut().unwrap().in_channels = 1;
    let mut axes = Sweep {
        methods: vec![
            Method::Estimator(Estimator::StraightThrough),
            Method::Estimator(Estimator::Rotation),
        ],
        seeds: vec![0, 1, 2],
        ..Default::default()
    };
    axes.add_axis("family=residual2").unwrap();
    let (rows, stats) = sweep(&options(cfg.clone(), &out), &axes).unwrap();
    assert_eq!(rows.len(), 6);
    let seed_dir = out.join("residual2/rotation/seed2");
    assert!(seed_dir.join("eval.json").is_file());
    assert_eq!(stats.len(), 2);
    let (_, usage, paired) = &stats[1].metrics[0];
    assert_eq!(usage.n, 3);
    let want = rows[3..].iter().map(|r| r.row.val.usage).sum::<f64>() / 3.0;
    assert!((usage.mean - want).abs() < 1e-12);
    assert_eq!(paired.unwrap().n, 3);
    assert!(
        stats[0].metrics.iter().all(|m| m.2.is_none()),
        "the reference has no test"
    );
    // Runs that differ only in the seed differ.
    assert_ne!(rows[0].row.val.rec_mse, rows[1].row.val.rec_mse);
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert!(
        md.contains("| residual2 | rotation |") && md.contains(" ± "),
        "{md}"
    );
    assert!(md.contains("p = ") && md.contains("Every run"), "{md}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("compare.json")).unwrap()).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 6);
    assert_eq!(json["axes"]["seeds"], serde_json::json!([0, 1, 2]));
    for m in ["usage", "val-mse", "quantization-error", "perplexity"] {
        assert!(out.join(format!("compare-{m}.png")).is_file(), "{m}");
    }
    // Again with --resume: the finished runs are evaluated, not trained again.
    let stamp = |d: &Path| {
        std::fs::metadata(d.join("metrics.jsonl"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = stamp(&seed_dir);
    let (again, _) = sweep(
        &TrainOptions {
            resume: true,
            ..options(cfg.clone(), &out)
        },
        &axes,
    )
    .unwrap();
    assert_eq!(stamp(&seed_dir), before);
    assert_eq!(again[5].row.val.rec_mse, rows[5].row.val.rec_mse);
    // A combination that cannot run is refused before any run trains.
    let refused = tmp("sweep-refused");
    let mut bad = axes.clone();
    bad.families.clear();
    bad.add_axis("family=nearest,simvq").unwrap();
    bad.add_axis("ema-decay=0.9").unwrap();
    let err = format!("{:#}", sweep(&options(cfg, &refused), &bad).unwrap_err());
    assert!(err.contains("simvq") && err.contains("EMA"), "{err}");
    assert!(!refused.exists());
    std::fs::remove_dir_all(out).unwrap();
}

/// Codebook usage, perplexity and the per-image means come from every evaluated batch, not the
/// last one: the same model on the same 64 images in one batch and in batches of 7 (the last
/// holding one image) gives the same numbers, and one image alone gives other ones.
#[test]
fn evaluation_metrics_cover_every_batch() {
    use vq_train::eval::{EvalNets, Perceptual, evaluate};
    let cfg = small_demo(1);
    let source = vq_train::data::DataSource::parse(&cfg.data).unwrap();
    let set = cfg.load_split(&source, vq_data::Split::Test).unwrap();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let mut model = vq_models::VqAutoencoder::new(&vs.root(), &cfg.model).unwrap();
    let nets = EvalNets {
        lpips: None,
        inception: None,
    };
    let mut run = |limit: usize, batch: usize| {
        evaluate(
            &mut model,
            &set,
            Some(limit),
            batch,
            Device::Cpu,
            &nets,
            Perceptual::All,
        )
        .unwrap()
    };
    let (whole, split, one) = (run(64, 64), run(64, 7), run(1, 1));
    assert_eq!(whole.images, 64);
    assert_eq!(split.images, 64);
    assert_eq!(whole.usage, split.usage);
    assert_eq!(whole.usage_total, split.usage_total);
    assert_eq!(whole.perplexity, split.perplexity);
    assert!((whole.rec_mse - split.rec_mse).abs() <= 1e-6 * whole.rec_mse);
    assert!(
        (whole.quantization_error - split.quantization_error).abs()
            <= 1e-6 * whole.quantization_error
    );
    assert!(
        whole.usage_total > one.usage_total && whole.perplexity > one.perplexity,
        "64 images use more codes than one: {} vs {}",
        whole.usage_total,
        one.usage_total
    );
}
