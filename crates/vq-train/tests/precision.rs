//! Mixed precision end to end on the CPU (libtorch's CPU autocast): bf16 tracks f32, f16 trains
//! with a dynamic loss scale kept in the checkpoint, and both resume bit for bit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use tch::Tensor;
use vq_tch::Precision;
use vq_train::config::{RunConfig, TrainOptions};
use vq_train::train::train;

mod common;
use common::{options, small_demo, weights};

/// The demo run of [`small_demo`] in `precision`.
fn demo(steps: usize, precision: Precision) -> RunConfig {
    RunConfig {
        precision,
        ..small_demo(steps)
    }
}

/// Training seeds libtorch's global generator; tests that train run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vq-precision-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Trains `config` whole, then stopped half-way and resumed; asserts identical weights and
/// checkpoints. Returns
/// the whole run and the resumed run's folder (the caller removes it).
fn resumes_exactly(config: &RunConfig, name: &str) -> (vq_train::train::Trained, PathBuf) {
    let (a, b) = (tmp(&format!("{name}-whole")), tmp(&format!("{name}-split")));
    let steps = config.training.steps;
    let whole = train(&options(config.clone(), &a)).unwrap();
    train(&TrainOptions {
        stop_after: Some(steps / 2),
        ..options(config.clone(), &b)
    })
    .unwrap();
    let resumed = train(&TrainOptions {
        resume: true,
        ..options(config.clone(), &b)
    })
    .unwrap();
    for ((n, x), (_, y)) in weights(&whole.vs).iter().zip(weights(&resumed.vs)) {
        assert!(x.equal(&y), "{name}: {n} differs after resume");
    }
    // The optimizer moments and the loss scaler's state too.
    let _ = common::assert_same_checkpoints(&a, &b);
    std::fs::remove_dir_all(a).unwrap();
    (whole, b)
}

/// bf16 autocast changes the arithmetic of the convolutions, not the training: over 12 steps
/// every step's loss stays within 5 % of the f32 run's (measured: < 1.5 %), the weights stay
/// f32, and an interrupted bf16 run resumes bit for bit.
#[test]
fn bf16_tracks_f32_and_resumes_exactly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tmp("f32");
    let f32_run = train(&options(demo(12, Precision::F32), &out)).unwrap();
    std::fs::remove_dir_all(out).unwrap();
    let (bf16_run, folder) = resumes_exactly(&demo(12, Precision::Bf16), "bf16");
    std::fs::remove_dir_all(folder).unwrap();
    let mut worst = 0f64;
    for (a, b) in f32_run.history.iter().zip(&bf16_run.history) {
        assert!(b.loss.is_finite());
        worst = worst.max((a.loss - b.loss).abs() / a.loss);
    }
    assert!(worst < 0.05, "bf16 loss deviates {worst:.3} from f32");
    assert!(worst > 0.0, "bf16 gave f32's numbers: autocast was not on");
    for (n, t) in weights(&bf16_run.vs) {
        assert!(
            ![tch::Kind::BFloat16, tch::Kind::Half].contains(&t.kind()),
            "{n} is {:?}",
            t.kind()
        );
    }
    assert!(bf16_run.history.iter().all(|m| m.loss_scale == 1.0));
}

/// f16 on a small VQGAN: both optimisers keep a loss scale (2¹⁶ at the start), saved in their
/// optimizer files and restored on resume, which is exact. (16² images: libtorch's f16 CPU
/// convolutions are slow reference kernels; f16 is meant for GPUs.)
#[test]
fn f16_trains_with_a_loss_scale_kept_in_the_checkpoint() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut config = common::small_vqgan(4, 2);
    config.model.autoencoder.taming_mut().unwrap().resolution = 16;
    config.precision = Precision::F16;
    let (whole, out) = resumes_exactly(&config, "f16");
    for m in &whole.history {
        assert!(m.loss.is_finite(), "{m:?}");
        assert_eq!(m.skipped_steps, 0, "{m:?}");
        assert_eq!(m.loss_scale, 65536.0);
    }
    let ckpt = vq_train::checkpoint::latest(&out).unwrap().unwrap().0;
    // The discriminator starts at step 2 (disc_start 1): three applied steps.
    for (file, steps) in [
        ("optimizer.safetensors", 4),
        ("discriminator_optimizer.safetensors", 3),
    ] {
        let state: HashMap<String, Tensor> = Tensor::read_safetensors(ckpt.join(file))
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(
            f64::try_from(&state["loss_scale"]).unwrap(),
            65536.0,
            "{file}"
        );
        assert_eq!(
            i64::try_from(&state["loss_scale_growth_tracker"]).unwrap(),
            steps,
            "{file}"
        );
    }
    std::fs::remove_dir_all(out).unwrap();
}
