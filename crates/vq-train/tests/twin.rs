//! The PyTorch twin of `cargo xtask bench-train` (examples/torch_twin.py) builds the network
//! vq-train trains: the same trainable variables under the same names and shapes, and it trains
//! (VQ-VAE, and a VQGAN with its discriminator).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use tch::{Device, nn};
use vq_models::{Preset, VqAutoencoder};
use vq_train::train::RunConfig;

fn site() -> Option<PathBuf> {
    let site = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.libtorch/site");
    site.join("torch").is_dir().then_some(site)
}

fn twin(site: &Path, config: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/torch_twin.py"))
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
    let Some(site) = site() else {
        eprintln!("skipped: no Python torch in .libtorch/site (libtorch adopted from LIBTORCH)");
        return;
    };
    // The taming CNN in every shape the presets use: f/4 and f/16, attention, quant_conv,
    // learned and EMA codebooks, projections.
    for preset in [
        Preset::DemoFashionMnist,
        Preset::VqVaeF16Cosine,
        Preset::VqVaeF4Euclidean,
        Preset::VqganF16Imagenet,
        Preset::LdmF8,
    ] {
        let cfg = preset_config(preset);
        let theirs = twin(&site, &config_file(preset.name(), &cfg), &["--describe"]);
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = VqAutoencoder::new(&vs.root(), &cfg.model).unwrap();
        let ours: BTreeMap<String, Vec<i64>> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(n, t)| (n, t.size()))
            .collect();
        let theirs: BTreeMap<String, Vec<i64>> = serde_json::from_value(theirs).unwrap();
        assert_eq!(ours, theirs, "{}", preset.name());
    }
}

#[test]
fn the_twin_trains_in_f32_and_bf16() {
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
    let r = twin(
        &site,
        &path,
        &[
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch-size",
            "4",
            "--threads",
            "1",
            "--images",
            "8",
        ],
    );
    let loss = r["loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{r}");
    assert_eq!(r["discriminator_steps"], 3, "{r}");
}
