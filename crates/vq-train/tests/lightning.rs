//! Checkpoints written by the real PyTorch Lightning trainer of the versions the references pin
//! (taming-transformers: 1.0.8, latent-diffusion: 1.4.2) load through `--init-from`: those
//! versions key the checkpoint's `callbacks` dict by the callback's class and pickle the model's
//! hyperparameters as an `AttributeDict`. The files come from
//! `tests/reference/make_lightning_checkpoints.py`: a taming VQGAN (`fixtures/lightning/run.json`)
//! trained two steps by `Trainer.fit`, with the checksums of its trained weights beside it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{Device, nn};
use vq_models::{Discriminator, VqAutoencoder};
use vq_train::config::RunConfig;

mod common;

const VERSIONS: [&str; 2] = ["1.0.8", "1.4.2"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lightning")
}

fn config() -> RunConfig {
    let path = fixtures().join("run.json");
    let value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    vq_train::config::from_json_value(value, &path).unwrap()
}

#[test]
fn old_lightning_checkpoints_give_their_trained_weights() {
    let cfg = config();
    for version in VERSIONS {
        let file = fixtures().join(format!("lightning-{version}.ckpt"));
        let sums: BTreeMap<String, (f64, f64)> = serde_json::from_slice(
            &std::fs::read(fixtures().join(format!("lightning-{version}.json"))).unwrap(),
        )
        .unwrap();
        let mut vs = nn::VarStore::new(Device::Cpu);
        let _model = VqAutoencoder::new(&vs.root(), &cfg.model).unwrap();
        let mut dvs = nn::VarStore::new(Device::Cpu);
        let _disc = Discriminator::new(&dvs.root(), cfg.gan.as_ref().unwrap()).unwrap();
        let loaded = vq_train::pretrained::load(&file, &mut vs, Some(&mut dvs))
            .unwrap_or_else(|e| panic!("{version}: {e:#}"));
        assert_eq!(loaded.model + loaded.discriminator, sums.len(), "{version}");
        assert_eq!(
            loaded.ignored,
            [
                "loss.discriminator.main.3.num_batches_tracked",
                "loss.perceptual_loss.scaling_layer.shift"
            ],
            "{version}"
        );
        common::assert_checksums(version, &sums, &vs, &dvs);
    }
}

/// The same state dict as a safetensors file (how model hubs distribute weights), in f32 and
/// in bf16, gives the same weights as the checkpoint (bf16: to its precision).
#[test]
fn a_safetensors_state_dict_gives_the_checkpoints_weights() {
    use pytorch_reader::DType;
    use safetensors::Dtype;
    let cfg = config();
    let ckpt = fixtures().join("lightning-1.0.8.ckpt");
    let reader = pytorch_reader::PytorchReader::with_top_level_key(&ckpt, "state_dict").unwrap();
    let dir = std::env::temp_dir().join(format!("vq-safetensors-init-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let load = |file: &Path| {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let _model = VqAutoencoder::new(&vs.root(), &cfg.model).unwrap();
        let mut dvs = nn::VarStore::new(Device::Cpu);
        let _disc = Discriminator::new(&dvs.root(), cfg.gan.as_ref().unwrap()).unwrap();
        let loaded = vq_train::pretrained::load(file, &mut vs, Some(&mut dvs))
            .unwrap_or_else(|e| panic!("{}: {e:#}", file.display()));
        (loaded, vs, dvs)
    };
    let (want, vs, dvs) = load(&ckpt);
    for half in [false, true] {
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for key in reader.keys() {
            let t = reader.get(&key).unwrap();
            let (dtype, mut bytes) = match t.dtype() {
                DType::F32 => (Dtype::F32, t.read().unwrap()),
                DType::I64 => (Dtype::I64, t.read().unwrap()),
                other => panic!("{key}: {other:?}"),
            };
            let dtype = match (dtype, half) {
                (Dtype::F32, true) => {
                    // bf16: the upper half of each f32 (truncation).
                    bytes = bytes.chunks(4).flat_map(|c| [c[2], c[3]]).collect();
                    Dtype::BF16
                }
                (d, _) => d,
            };
            tensors.push((key, dtype, t.shape().to_vec(), bytes));
        }
        let views = tensors.iter().map(|(k, d, s, b)| {
            (
                k.as_str(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        });
        let file = dir.join(format!("state-{half}.safetensors"));
        safetensors::tensor::serialize_to_file(views, &None, &file).unwrap();
        let (got, gvs, gdvs) = load(&file);
        assert_eq!(
            (got.model, got.discriminator),
            (want.model, want.discriminator)
        );
        assert_eq!(got.ignored, want.ignored);
        for (a, b) in [(&vs, &gvs), (&dvs, &gdvs)] {
            for (name, t) in a.variables() {
                let u = &b.variables()[&name];
                let err = (&t - u).abs().max().double_value(&[]);
                let tol = if half {
                    1e-2 * t.abs().max().double_value(&[])
                } else {
                    0.0
                };
                assert!(err <= tol, "{name} (bf16: {half}): {err} > {tol}");
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What a stage-2 user does first with a public file: import it as a run and encode a dataset.
#[test]
fn an_old_lightning_checkpoint_becomes_a_run_that_encodes() {
    let dir = std::env::temp_dir().join(format!("vq-lightning-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = dir.join("run");
    let ckpt = fixtures().join("lightning-1.0.8.ckpt");
    let config = fixtures().join("run.json");
    common::vq_train_ok(&[
        "import",
        "--config",
        config.to_str().unwrap(),
        "--init-from",
        ckpt.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--threads",
        "1",
    ]);
    let codes = dir.join("codes.safetensors");
    common::vq_train_ok(&[
        "encode",
        "--run",
        run.to_str().unwrap(),
        "--out",
        codes.to_str().unwrap(),
    ]);
    let tensors = tch::Tensor::read_safetensors(&codes).unwrap();
    assert!(
        tensors.iter().any(|(name, _)| name == "codes"),
        "{:?}",
        tensors.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Keys of every hashable type are read under Python's `str()` of the key; where that text is
/// also a str key of the dict, both values are kept (the str key under its own text).
#[test]
fn dict_keys_of_any_hashable_type_are_read_and_none_is_lost() {
    let reader = pytorch_reader::PytorchReader::new(fixtures().join("keys.pt")).unwrap();
    let want = [
        ("None", 0.0f32),
        ("None#2", 1.0),
        ("False", 2.0),
        ("1#2", 3.0),
        ("1", 4.0),
        ("1.5", 5.0),
        ("(1, 'a')", 6.0),
        ("b'k\\x00'", 7.0),
        (
            "<class 'pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint'>",
            8.0,
        ),
        ("frozenset({3})", 9.0),
    ];
    let mut keys = reader.keys();
    keys.sort();
    assert_eq!(keys.len(), want.len() + 1, "{keys:?}");
    for (key, value) in want {
        let t = reader
            .get(&format!("extra.{key}"))
            .unwrap_or_else(|| panic!("extra.{key} not in {keys:?}"));
        assert_eq!(t.read().unwrap(), value.to_le_bytes(), "{key}");
    }
}

/// What a checkpoint holds besides its state dict is not read: a sparse tensor, a complex one
/// and a user object holding a tensor elsewhere in the file leave the state dict readable, and
/// are an error naming where they are only when that part is asked for.
#[test]
fn values_the_reader_cannot_represent_matter_only_where_they_are_read() {
    let file = fixtures().join("extras.pt");
    let reader = pytorch_reader::PytorchReader::with_top_level_key(&file, "state_dict").unwrap();
    assert_eq!(reader.keys(), ["w"]);
    for key in ["callbacks", "hyper_parameters"] {
        let err = pytorch_reader::PytorchReader::with_top_level_key(&file, key)
            .err()
            .unwrap_or_else(|| panic!("{key} read"))
            .to_string();
        assert!(err.contains(" (at '"), "{key}: {err}");
    }
    let err = pytorch_reader::PytorchReader::new(&file).err().unwrap();
    assert!(err.to_string().contains(" (at '"), "{err}");
}
