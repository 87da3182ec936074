//! Run configurations and helpers shared by the training test binaries (each uses a subset).
#![allow(dead_code)]

use std::path::Path;

use tch::{Device, Tensor};
use vq_models::Preset;
use vq_train::config::{RunConfig, TrainOptions};

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
        preprocessing: vq_train::data::Pipeline::for_preset(preset),
        model: preset.config(),
        training,
        data: "fashion-mnist-demo".into(),
        seed: 5,
        micro_batch: 8,
        gan: None,
        lpips_weights: None,
        inception_weights: None,
        precision: Default::default(),
        encoder_gradient: Default::default(),
        init_from: None,
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
        readback: Default::default(),
        profile: None,
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
        preprocessing: vq_train::data::Pipeline::for_preset(preset),
        model,
        training,
        data: "synthetic:16".into(),
        seed: 2,
        micro_batch,
        gan: Some(gan),
        lpips_weights: None,
        inception_weights: None,
        precision: Default::default(),
        encoder_gradient: Default::default(),
        init_from: None,
    }
}

/// An image folder of the committed JPEG fixtures under `root/data`: `train/` holds `train`
/// images (the four fixtures, repeated under new names), `val/` two; returns the data spec.
pub fn image_folder(root: &Path, train: usize) -> String {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vq-data/tests/fixtures/images");
    let files = ["rgb.JPEG", "gray.JPEG", "cmyk.JPEG", "png_named.JPEG"];
    let copy = |split: &str, class: &str, from: &str, to: String| {
        let d = root.join("data").join(split).join(class);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(fixtures.join(from), d.join(to)).unwrap();
    };
    for i in 0..train {
        let class = ["n01", "n02"][i % 4 / 2];
        let name = match i < 4 {
            true => files[i].to_owned(),
            false => format!("{i}_{}", files[i % 4]),
        };
        copy("train", class, files[i % 4], name);
    }
    copy("val", "n01", "rgb.JPEG", "rgb.JPEG".into());
    copy("val", "n02", "cmyk.JPEG", "cmyk.JPEG".into());
    format!("image-folder:{}", root.join("data").display())
}

/// A tiny taming VQ-VAE (no discriminator) on 16² RGB images from `data`.
pub fn small_rgb(data: String, steps: usize, batch: usize, micro_batch: usize) -> RunConfig {
    let preset = Preset::VqganF16Imagenet;
    let mut model = preset.config();
    let a = model.autoencoder.taming_mut().unwrap();
    a.resolution = 16;
    a.ch = 32;
    a.ch_mult = vec![1, 2];
    a.attn_resolutions = vec![];
    a.num_res_blocks = 1;
    a.z_channels = 8;
    model.quantizer.codebook_dim = 8;
    model.quantizer.codebook_size = 16;
    let mut training = preset.training();
    training.steps = steps;
    training.batch_size = batch;
    training.warmup_steps = 1;
    training.decay_steps = steps;
    RunConfig {
        preset: preset.name().into(),
        preprocessing: vq_train::data::Pipeline::for_preset(preset),
        model,
        training,
        data,
        seed: 2,
        micro_batch,
        gan: None,
        lpips_weights: None,
        inception_weights: None,
        precision: Default::default(),
        encoder_gradient: Default::default(),
        init_from: None,
    }
}

/// The lines of a run's `skipped.jsonl` (none when the file is missing).
pub fn skipped_lines(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("skipped.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Trains `config` straight into `a`, and into `b` stopped after `stop` steps then resumed;
/// asserts both end with the same checkpoint files, the model's among them.
pub fn assert_resumes_exactly(config: &RunConfig, a: &Path, b: &Path, stop: usize) {
    vq_train::train::train(&options(config.clone(), a)).unwrap();
    vq_train::train::train(&TrainOptions {
        stop_after: Some(stop),
        ..options(config.clone(), b)
    })
    .unwrap();
    vq_train::train::train(&TrainOptions {
        resume: true,
        ..options(config.clone(), b)
    })
    .unwrap();
    let files = assert_same_checkpoints(a, b);
    assert!(files.iter().any(|f| f == "model.safetensors"), "{files:?}");
}

/// Every tensor of every file of the latest checkpoints of two runs is identical (model,
/// optimizer moments and step counts, discriminator and its optimizer, EMA buffers), and both
/// checkpoints hold the same files, step and configuration. Returns the files' names.
pub fn assert_same_checkpoints(a: &Path, b: &Path) -> Vec<String> {
    let latest = |run: &Path| {
        vq_train::checkpoint::latest(run)
            .unwrap()
            .unwrap_or_else(|| panic!("{}: no checkpoint", run.display()))
    };
    let ((ca, sa), (cb, sb)) = (latest(a), latest(b));
    assert_eq!(
        (sa.step, &sa.run),
        (sb.step, &sb.run),
        "training states differ"
    );
    let tensor_files = |dir: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".safetensors"))
            .collect();
        v.sort();
        v
    };
    let files = tensor_files(&ca);
    assert_eq!(files, tensor_files(&cb), "checkpoints hold other files");
    assert!(
        files.iter().any(|f| f == "optimizer.safetensors"),
        "{files:?}"
    );
    for file in &files {
        let read = |dir: &Path| {
            let mut t = Tensor::read_safetensors(dir.join(file)).unwrap();
            t.sort_by(|x, y| x.0.cmp(&y.0));
            t
        };
        let (ta, tb) = (read(&ca), read(&cb));
        assert!(!ta.is_empty(), "{file} is empty");
        assert_eq!(
            ta.iter().map(|t| &t.0).collect::<Vec<_>>(),
            tb.iter().map(|t| &t.0).collect::<Vec<_>>(),
            "{file}: other tensor names"
        );
        for ((name, x), (_, y)) in ta.iter().zip(&tb) {
            assert!(x.equal(y), "{file}: {name} differs after resume");
        }
    }
    files
}

/// Runs the `vq-train` binary with `args`; panics with its output if it fails, else returns
/// stdout and stderr.
pub fn vq_train_ok(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vq-train"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "vq-train {args:?}: {text}");
    text
}

/// Sum and index-weighted sum of a tensor's row-major elements in f64: the checksums the
/// Python scripts print (`[sum, sum of (index + 1) * value]`), a check of values and layout.
pub fn checksum(t: &Tensor) -> (f64, f64) {
    let v = t.to_kind(tch::Kind::Double).reshape([-1]);
    let w = Tensor::arange_start(1, v.numel() as i64 + 1, (tch::Kind::Double, Device::Cpu));
    (
        f64::try_from(v.sum(tch::Kind::Double)).unwrap(),
        f64::try_from((&v * w).sum(tch::Kind::Double)).unwrap(),
    )
}

/// Every variable named in `sums` (vq-train's names, the discriminator's under
/// `discriminator.`) has those checksums, to 1e-9 relative.
pub fn assert_checksums(
    label: &str,
    sums: &std::collections::BTreeMap<String, (f64, f64)>,
    model: &tch::nn::VarStore,
    discriminator: &tch::nn::VarStore,
) {
    let (model_vars, disc_vars) = (model.variables(), discriminator.variables());
    for (name, &(sum, weighted)) in sums {
        let t = match name.strip_prefix("discriminator.") {
            Some(d) => &disc_vars[d],
            None => &model_vars[name],
        };
        let (s, w) = checksum(t);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()));
        assert!(
            close(s, sum) && close(w, weighted),
            "{label}: {name}: {s} {w} vs {sum} {weighted}"
        );
    }
}
