//! The PyTorch twin of `cargo xtask bench-train` (examples/torch_twin.py) builds the network
//! vq-train trains: the same trainable variables under the same names and shapes, and it trains
//! (VQ-VAE, and a VQGAN with its discriminator).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use tch::{Device, nn};
use vq_models::{Discriminator, Preset, VqAutoencoder};
use vq_train::config::RunConfig;

/// Building and training models draws from libtorch's global generator, which the tests of
/// this file would otherwise share while they run in parallel: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

mod common;

fn site() -> Option<PathBuf> {
    let site = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.libtorch/site");
    site.join("torch").is_dir().then_some(site)
}

fn twin(site: &Path, config: &Path, args: &[&str]) -> serde_json::Value {
    python_example(site, "torch_twin.py", config, args)
}

/// `examples/<script> config args…` with the setup's torch; its last stdout line as JSON.
fn python_example(site: &Path, script: &str, config: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples")
                .join(script),
        )
        .arg(config)
        .args(args)
        .env("PYTHONPATH", site)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

fn config_file(name: &str, cfg: &RunConfig) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vq-twin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string(cfg).unwrap()).unwrap();
    path
}

fn preset_config(preset: Preset) -> RunConfig {
    let out = Command::new(env!("CARGO_BIN_EXE_vq-train"))
        .args(["presets", preset.name()])
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_twin_has_vq_trains_variables() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(site) = site() else {
        eprintln!("skipped: no Python torch in .libtorch/site (libtorch adopted from LIBTORCH)");
        return;
    };
    // The taming CNN in every shape the presets use: f/4 and f/16, attention, quant_conv,
    // learned and EMA codebooks, projections; the ViT and TimeSformer with their StyleGAN2-type
    // discriminators.
    for preset in [
        Preset::DemoFashionMnist,
        Preset::VqVaeF16Cosine,
        Preset::VqVaeF4Euclidean,
        Preset::VqganF16Imagenet,
        Preset::LdmF8,
        Preset::VitVqganSmall,
        Preset::TimeSformerBair,
    ] {
        let cfg = preset_config(preset);
        let theirs = twin(&site, &config_file(preset.name(), &cfg), &["--describe"]);
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = VqAutoencoder::new(&vs.root(), &cfg.model).unwrap();
        let trainable = |vs: &nn::VarStore, prefix: &str| {
            vs.variables()
                .into_iter()
                .filter(|(_, t)| t.requires_grad())
                .map(|(n, t)| (format!("{prefix}{n}"), t.size()))
                .collect::<Vec<_>>()
        };
        let mut ours: BTreeMap<String, Vec<i64>> = trainable(&vs, "").into_iter().collect();
        if let Some(gan) = &cfg.gan {
            // The PatchGAN of the taming VQGANs, the StyleGAN2-type one of ViT-VQGAN.
            let dvs = nn::VarStore::new(Device::Cpu);
            let _disc = Discriminator::new(&dvs.root(), gan).unwrap();
            ours.extend(trainable(&dvs, "discriminator."));
        }
        let theirs: BTreeMap<String, Vec<i64>> = serde_json::from_value(theirs).unwrap();
        assert_eq!(ours, theirs, "{}", preset.name());
    }
}

/// Two timed steps after one warm-up of a VQGAN configuration on `images` random images: the
/// loss is finite and positive, and the discriminator took a step at each of the three.
fn trains_generator_and_discriminator(site: &Path, config: &Path, batch: usize, images: usize) {
    let (batch, images) = (batch.to_string(), images.to_string());
    let r = twin(
        site,
        config,
        &[
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch-size",
            &batch,
            "--threads",
            "1",
            "--images",
            &images,
        ],
    );
    let loss = r["loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{r}");
    assert_eq!(r["discriminator_steps"], 3, "{r}");
}

#[test]
fn the_twin_trains_in_f32_and_bf16() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(site) = site() else {
        eprintln!("skipped: no Python torch in .libtorch/site (libtorch adopted from LIBTORCH)");
        return;
    };
    let cfg = preset_config(Preset::DemoFashionMnist);
    let path = config_file("demo", &cfg);
    for precision in ["f32", "bf16"] {
        let r = twin(
            &site,
            &path,
            &[
                "--steps",
                "2",
                "--warmup",
                "1",
                "--batch-size",
                "8",
                "--threads",
                "1",
                "--images",
                "16",
                "--precision",
                precision,
            ],
        );
        let loss = r["loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{precision}: {r}");
        assert!(r["steps_per_s"].as_f64().unwrap() > 0.0, "{precision}: {r}");
        assert_eq!(r["steps"], 2);
    }
}

/// A taming VQGAN configuration (the demo's small network with the f16 ImageNet VQGAN's `gan`
/// section, its discriminator from the first step, two layers at the demo's 32² size): the twin
/// trains generator and discriminator.
#[test]
fn the_twin_trains_a_vqgan_with_its_discriminator() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(site) = site() else {
        eprintln!("skipped: no Python torch in .libtorch/site (libtorch adopted from LIBTORCH)");
        return;
    };
    let mut cfg = preset_config(Preset::DemoFashionMnist);
    let mut gan = preset_config(Preset::VqganF16Imagenet).gan.unwrap();
    gan.in_channels = 1;
    gan.n_layers = 2;
    gan.disc_start = 0;
    cfg.gan = Some(gan);
    let path = config_file("demo-vqgan", &cfg);
    trains_generator_and_discriminator(&site, &path, 4, 8);
}

/// A small TimeSformer-VQGAN configuration (4 frames of 16², two layers): the twin trains the
/// video tokenizer, its discriminator on the clips' frames, R1 included.
#[test]
fn the_twin_trains_a_video_tokenizer() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(site) = site() else {
        eprintln!("skipped: no Python torch in .libtorch/site (libtorch adopted from LIBTORCH)");
        return;
    };
    let cfg = preset_config(Preset::TimeSformerBair);
    let mut json = serde_json::to_value(&cfg).unwrap();
    json["model"]["autoencoder"] = serde_json::json!({
        "frames": 4, "image_size": 16, "patch_size": 4, "channels": 3, "hidden": 32,
        "layers": 2, "heads": 2, "intermediate": 64, "layer_norm_eps": 1e-6
    });
    json["model"]["quantizer"]["codebook_size"] = serde_json::json!(64);
    json["model"]["quantizer"]["projection"] = serde_json::json!({"linear": {"channels": 32}});
    json["gan"]["discriminator"]["style_gan"]["image_size"] = serde_json::json!(16);
    json["gan"]["r1"]["every"] = serde_json::json!(2);
    let cfg: RunConfig = serde_json::from_value(json).unwrap();
    cfg.validate().unwrap();
    trains_generator_and_discriminator(&site, &config_file("small-timesformer", &cfg), 2, 4);
}

/// A small ViT-VQGAN configuration (enhancing-transformers' ViT at 32², the StyleGAN2-type
/// discriminator, non-saturating losses, a fixed weight, R1 every second step): the twin trains
/// generator and discriminator, the penalty included.
#[test]
fn the_twin_trains_a_vit_vqgan_with_r1() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(site) = site() else {
        eprintln!("skipped: no Python torch in .libtorch/site (libtorch adopted from LIBTORCH)");
        return;
    };
    let mut cfg = preset_config(Preset::VitVqganSmall);
    let mut json = serde_json::to_value(&cfg).unwrap();
    json["model"]["autoencoder"] = serde_json::json!({
        "image_size": 32, "patch_size": 8, "channels": 3, "dim": 64, "depth": 1, "heads": 2,
        "dim_head": 32, "mlp_dim": 128
    });
    json["model"]["quantizer"]["codebook_size"] = serde_json::json!(64);
    json["model"]["quantizer"]["projection"] = serde_json::json!({"linear": {"channels": 64}});
    json["gan"]["discriminator"]["style_gan"]["image_size"] = serde_json::json!(32);
    json["gan"]["r1"]["every"] = serde_json::json!(2);
    cfg = serde_json::from_value(json).unwrap();
    // vq-train accepts it (the same configuration both sides read).
    cfg.validate().unwrap();
    let path = config_file("small-vit-vqgan", &cfg);
    trains_generator_and_discriminator(&site, &path, 4, 8);
}

/// The taming and ViT presets start as the reference modules do: every trainable variable's largest
/// |value| and standard deviation at initialisation within a few percent of the same module
/// instantiated in PyTorch (nn.Conv2d / nn.Linear / nn.ConvTranspose2d defaults, GroupNorm and
/// LayerNorm ones and zeros; lucidrains' kaiming-uniform, taming's U(±1/K) or
/// enhancing-transformers' N(0, 1) codebook). Draws differ (two
/// generators); the distributions must not.
#[test]
fn the_presets_start_as_the_pytorch_modules_do() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(site) = site() else {
        eprintln!("skipped: no Python torch in .libtorch/site (libtorch adopted from LIBTORCH)");
        return;
    };
    for preset in [
        Preset::DemoFashionMnist,
        Preset::VqVaeF16Cosine,
        Preset::VqganF16Imagenet,
        Preset::VitVqganSmall,
    ] {
        let mut cfg = preset_config(preset);
        if let Some(vit) = cfg.model.autoencoder.vit_mut() {
            // One block of each transformer is enough to check every kind of layer.
            vit.depth = 1;
        }
        let theirs = twin(&site, &config_file(preset.name(), &cfg), &["--init-stats"]);
        let theirs: BTreeMap<String, (f64, f64)> = serde_json::from_value(theirs).unwrap();
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = VqAutoencoder::new(&vs.root(), &cfg.model).unwrap();
        let mut checked = 0;
        for (name, t) in vs.variables() {
            if !t.requires_grad() {
                continue;
            }
            let &(their_max, their_std) = theirs.get(&name).unwrap_or_else(|| panic!("{name}"));
            let t = t.to_kind(tch::Kind::Double);
            let max = f64::try_from(t.abs().max()).unwrap();
            let std = match t.numel() {
                1 => 0.0,
                _ => f64::try_from(t.std(true)).unwrap(),
            };
            let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * a.abs().max(b.abs());
            let what = format!(
                "{}: {name}: max {max} vs {their_max}, std {std} vs {their_std}",
                preset.name()
            );
            // Sampling error of two independent draws of n values: the maximum of n uniform
            // draws lies within a few 1/n of the bound, a standard deviation within ~0.6/√n
            // (relative; a uniform's kurtosis is 1.8); four of those, plus 2%.
            let n = t.numel() as f64;
            assert!(close(max, their_max, 0.02 + 4.0 / n), "{what}");
            assert!(close(std, their_std, 0.02 + 2.5 / n.sqrt()), "{what}");
            checked += 1;
        }
        assert_eq!(checked, theirs.len(), "{}", preset.name());
    }
}

/// `--init-from` reads Lightning checkpoints written by PyTorch in taming-transformers' layout
/// (with a PatchGAN discriminator and perceptual-loss buffers) and in enhancing-transformers'
/// layout (`quantizer.embedding.weight`, `pre_quant`, `post_quant`): every variable then holds
/// the file's values (checksums of names, values and element order); a run trains from it; a
/// file that does not fit is refused with the tensors named and the model left unchanged.
#[test]
fn init_from_reads_the_references_checkpoints() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(site) = site() else {
        eprintln!("skipped: no Python torch in .libtorch/site (libtorch adopted from LIBTORCH)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("vq-init-from-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let taming = common::small_vqgan(2, 2);
    let mut vit = preset_config(Preset::VitVqganSmall);
    if let Some(v) = vit.model.autoencoder.vit_mut() {
        (
            v.image_size,
            v.patch_size,
            v.dim,
            v.depth,
            v.heads,
            v.dim_head,
            v.mlp_dim,
        ) = (32, 8, 64, 1, 2, 32, 128);
    }
    vit.model.quantizer.codebook_size = 64;
    vit.model.quantizer.projection = vq_tch::Projection::Linear { channels: 64 };
    vit.gan = None;
    for (name, cfg) in [("taming", taming), ("vit", vit)] {
        let file = dir.join(format!("{name}.ckpt"));
        let sums = twin(
            &site,
            &config_file(name, &cfg),
            &["--export-reference", file.to_str().unwrap()],
        );
        let sums: BTreeMap<String, (f64, f64)> = serde_json::from_value(sums).unwrap();
        let mut vs = nn::VarStore::new(Device::Cpu);
        let _model = VqAutoencoder::new(&vs.root(), &cfg.model).unwrap();
        let mut dvs = nn::VarStore::new(Device::Cpu);
        let _disc = cfg
            .gan
            .as_ref()
            .map(|g| Discriminator::new(&dvs.root(), g).unwrap());
        let disc = cfg.gan.is_some().then_some(&mut dvs);
        let loaded = vq_train::pretrained::load(&file, &mut vs, disc).unwrap();
        assert!(
            loaded
                .ignored
                .contains(&"loss.perceptual_loss.scaling_layer.shift".to_owned()),
            "{name}: {:?}",
            loaded.ignored
        );
        common::assert_checksums(name, &sums, &vs, &dvs);
        assert_eq!(loaded.model + loaded.discriminator, sums.len(), "{name}");
    }

    // A run starts from the file (its first loss differs from the random start's) and records it.
    let file = dir.join("taming.ckpt");
    let run = |init: Option<PathBuf>, out: &Path| {
        let cfg = RunConfig {
            init_from: init,
            ..common::small_vqgan(1, 2)
        };
        vq_train::train::train(&common::options(cfg, out))
            .unwrap()
            .history[0]
            .loss
    };
    let (fresh, started) = (
        run(None, &dir.join("fresh")),
        run(Some(file.clone()), &dir.join("init")),
    );
    assert_ne!(fresh, started);
    let record = std::fs::read_to_string(dir.join("init/run.json")).unwrap();
    assert!(record.contains("taming.ckpt"), "{record}");

    // A pretrained file becomes a run without training (`vq-train import`): a step-0
    // checkpoint with the file's weights, which the commands that take a run load.
    let cfg = RunConfig {
        init_from: Some(file.clone()),
        ..common::small_vqgan(1, 2)
    };
    let out = dir.join("imported");
    let ckpt = vq_train::autoencoder::import(&common::options(cfg.clone(), &out)).unwrap();
    assert!(
        ckpt.ends_with("checkpoints/step-00000000"),
        "{}",
        ckpt.display()
    );
    let mut vs = nn::VarStore::new(Device::Cpu);
    let _model = VqAutoencoder::new(&vs.root(), &cfg.model).unwrap();
    let mut dvs = nn::VarStore::new(Device::Cpu);
    let _disc = Discriminator::new(&dvs.root(), cfg.gan.as_ref().unwrap()).unwrap();
    vq_train::pretrained::load(&file, &mut vs, Some(&mut dvs)).unwrap();
    let saved = tch::Tensor::read_safetensors(ckpt.join("model.safetensors")).unwrap();
    let want = vs.variables();
    assert_eq!(saved.len(), want.len());
    for (name, t) in &saved {
        assert!(t.equal(&want[name]), "{name}");
    }
    let loaded = vq_train::codes::LoadedRun::load(&out, Device::Cpu).unwrap();
    assert_eq!(loaded.step, 0);
    assert!(
        vq_train::autoencoder::import(&common::options(cfg, &out)).is_err(),
        "a second import into the same folder is refused"
    );

    // Files that do not fit are refused, naming the tensors, and change nothing.
    let edit = |script: &str| -> PathBuf {
        let bad = dir.join("bad.ckpt");
        let code = format!(
            "import torch; c = torch.load({:?}, weights_only=False); sd = c['state_dict']; {script}; torch.save(c, {:?})",
            file.to_str().unwrap(),
            bad.to_str().unwrap()
        );
        let ok = Command::new("python3")
            .args(["-c", &code])
            .env("PYTHONPATH", &site)
            .status()
            .unwrap()
            .success();
        assert!(ok, "{script}");
        bad
    };
    let cfg = common::small_vqgan(1, 2);
    for (script, expected) in [
        (
            "sd['encoder.extra.weight'] = torch.ones(2)",
            "encoder.extra.weight",
        ),
        ("del sd['decoder.conv_out.bias']", "decoder.conv_out.bias"),
        (
            "sd['quantize.embedding.weight'] = torch.ones(5, 3)",
            "quantize.embedding.weight [5, 3]",
        ),
        (
            "del sd['loss.discriminator.main.0.bias']",
            "discriminator main.0.bias",
        ),
        (
            "sd['encoder.conv_in.bias'] = sd['encoder.conv_in.bias'].long()",
            "encoder.conv_in.bias holds I64",
        ),
    ] {
        let bad = edit(script);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let _model = VqAutoencoder::new(&vs.root(), &cfg.model).unwrap();
        let mut dvs = nn::VarStore::new(Device::Cpu);
        let _disc = Discriminator::new(&dvs.root(), cfg.gan.as_ref().unwrap()).unwrap();
        let before = common::checksum(&vs.variables()["encoder.conv_in.weight"]);
        let err = format!(
            "{:#}",
            vq_train::pretrained::load(&bad, &mut vs, Some(&mut dvs)).unwrap_err()
        );
        assert!(
            err.contains(expected) && err.contains("bad.ckpt"),
            "{script}: {err}"
        );
        assert_eq!(
            common::checksum(&vs.variables()["encoder.conv_in.weight"]),
            before,
            "{script}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The prior's twin (examples/torch_prior_twin.py, `bench-train --prior`) builds vq-prior's
/// variables under LlamaGen's names and shapes — class-conditional and unconditional — and
/// trains and samples.
#[test]
fn the_prior_twin_has_the_priors_variables_and_trains() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(site) = site() else {
        eprintln!("skipped: no Python torch in .libtorch/site (libtorch adopted from LIBTORCH)");
        return;
    };
    let run =
        |config: &Path, args: &[&str]| python_example(&site, "torch_prior_twin.py", config, args);
    let dir = std::env::temp_dir().join(format!("vq-prior-twin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for classes in [10, 0] {
        let prior = vq_prior::PriorConfig::preset("demo", 64, 4, 4, classes).unwrap();
        let training = vq_train::prior::PriorTraining::llamagen(4, 8, 1e-3);
        let path = dir.join(format!("prior-{classes}.json"));
        let json = serde_json::json!({ "prior": prior, "training": training });
        std::fs::write(&path, json.to_string()).unwrap();
        let theirs: BTreeMap<String, Vec<i64>> =
            serde_json::from_value(run(&path, &["--describe"])).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        vq_prior::Prior::new(&vs.root(), prior).unwrap();
        let ours: BTreeMap<String, Vec<i64>> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.size()))
            .collect();
        assert_eq!(ours, theirs, "{classes} classes");
        let r = run(
            &path,
            &[
                "--steps",
                "2",
                "--warmup",
                "1",
                "--batch-size",
                "4",
                "--samples",
                "2",
            ],
        );
        assert!(r["loss"].as_f64().unwrap().is_finite(), "{r}");
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
