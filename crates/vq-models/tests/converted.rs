//! `vq_weights::convert` on files in the exact layouts of the public ones — torchvision's VGG16
//! (legacy pickle, with its ImageNet classifier), the LPIPS v0.1 heads (legacy) and pytorch-fid's
//! FID Inception (zip, with BatchNorm counters) — written by `torch.save` with the reference
//! fixtures' deterministic weights (`reference/write_pth.py`, the torch that `cargo xtask setup`
//! installs). The converted networks must give the reference packages' outputs of the fixtures.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fill, fixture, formula, get, relative};
use serde_json::{Value, json};
use tch::{Device, nn};
use vq_models::{FidInception, Lpips};
use vq_weights::{WeightsError, convert};

fn site() -> Option<PathBuf> {
    let site = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.libtorch/site");
    site.join("torch").is_dir().then_some(site)
}

/// The entries of one file and the values they add to the blob.
#[derive(Default)]
struct File {
    entries: Vec<Value>,
}

impl File {
    /// Entry `key` with the formula's values of variable `var` (same shape).
    fn formula(&mut self, blob: &mut Vec<u8>, key: &str, var: &str, shape: &[i64]) {
        let values = Vec::<f32>::try_from(formula(var, shape).flatten(0, -1)).unwrap();
        let offset = blob.len() / 4;
        blob.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        self.entries
            .push(json!({"key": key, "shape": shape, "values": "blob", "offset": offset}));
    }

    fn other(&mut self, key: &str, shape: &[i64], values: &str) {
        self.entries
            .push(json!({"key": key, "shape": shape, "values": values}));
    }

    fn spec(self, path: &Path, format: &str) -> Value {
        json!({"path": path, "format": format, "entries": self.entries})
    }
}

fn sorted_variables(vs: &nn::VarStore) -> Vec<(String, Vec<i64>)> {
    let mut v: Vec<(String, Vec<i64>)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.size()))
        .collect();
    v.sort();
    v
}

/// Writes vgg16.pth, heads.pth and inception.pth into `dir`.
fn write_sources(site: &Path, dir: &Path) {
    let mut blob = Vec::new();
    let (mut vgg, mut heads, mut inception) = (File::default(), File::default(), File::default());
    let vs = nn::VarStore::new(Device::Cpu);
    Lpips::new(&vs.root());
    for (name, shape) in sorted_variables(&vs) {
        match name
            .strip_suffix(".weight")
            .filter(|n| n.starts_with("lin"))
        {
            Some(lin) => heads.formula(&mut blob, &format!("{lin}.model.1.weight"), &name, &shape),
            None => vgg.formula(&mut blob, &name, &name, &shape),
        }
    }
    for (key, shape) in [
        ("classifier.0.weight", &[4096, 25088][..]),
        ("classifier.0.bias", &[4096]),
        ("classifier.3.weight", &[4096, 4096]),
        ("classifier.3.bias", &[4096]),
        ("classifier.6.weight", &[1000, 4096]),
        ("classifier.6.bias", &[1000]),
    ] {
        vgg.other(key, shape, "expanded-zeros");
    }
    let vs = nn::VarStore::new(Device::Cpu);
    FidInception::new(&vs.root());
    for (name, shape) in sorted_variables(&vs) {
        inception.formula(&mut blob, &name, &name, &shape);
        if let Some(bn) = name.strip_suffix(".running_var") {
            inception.other(&format!("{bn}.num_batches_tracked"), &[], "counter");
        }
    }
    std::fs::write(dir.join("blob.f32"), &blob).unwrap();
    let spec = json!({
        "blob": dir.join("blob.f32"),
        "files": [
            vgg.spec(&dir.join("vgg16.pth"), "legacy"),
            heads.spec(&dir.join("heads.pth"), "legacy"),
            inception.spec(&dir.join("inception.pth"), "zip"),
        ],
    });
    std::fs::write(dir.join("spec.json"), spec.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/write_pth.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(dir.join("spec.json"))
        .env("PYTHONPATH", site)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(dir.join("blob.f32")).unwrap();
}

#[test]
fn converted_public_layouts_give_the_reference_outputs() {
    let Some(site) = site() else {
        eprintln!("skipped: no Python torch in .libtorch/site (libtorch adopted from LIBTORCH)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("vq-models-converted-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write_sources(&site, &dir);
    let _guard = tch::no_grad_guard();

    let out = dir.join("lpips.safetensors");
    let c = convert::lpips(&dir.join("vgg16.pth"), &dir.join("heads.pth"), &out).unwrap();
    assert_eq!((c.tensors, c.dropped), (31, 6));
    let net = Lpips::load(&out, Device::Cpu).unwrap();
    let f = fixture("lpips");
    let (x, y) = (get(&f, "x"), get(&f, "y"));
    let d = net.forward(&x, &y);
    let vs = nn::VarStore::new(Device::Cpu);
    let filled = Lpips::new(&vs.root());
    fill(&vs);
    assert_eq!(
        d,
        filled.forward(&x, &y),
        "converted ≠ the formula's weights"
    );
    let err = relative(&d, &get(&f, "distance"));
    assert!(err < 1e-5, "LPIPS vs lpips 0.1.4: relative error {err:.2e}");

    let out = dir.join("inception.safetensors");
    let c = convert::inception(&dir.join("inception.pth"), &out).unwrap();
    assert_eq!((c.tensors, c.dropped), (472, 94));
    let net = FidInception::load(&out, Device::Cpu).unwrap();
    let f = fixture("fid_inception");
    let (pool, logits) = net.forward(&get(&f, "x"));
    let (ep, el) = (
        relative(&pool, &get(&f, "pool")),
        relative(&logits, &get(&f, "logits")),
    );
    assert!(ep < 1e-5 && el < 1e-5, "pool {ep:.2e}, logits {el:.2e}");

    // Files swapped: refused, naming the file, nothing written.
    let bad = dir.join("bad.safetensors");
    let e = convert::inception(&dir.join("vgg16.pth"), &bad).unwrap_err();
    assert!(matches!(e, WeightsError::Unexpected { .. }), "{e}");
    assert!(e.to_string().contains("vgg16.pth"), "{e}");
    let e = convert::lpips(&dir.join("heads.pth"), &dir.join("vgg16.pth"), &bad).unwrap_err();
    assert!(
        e.to_string()
            .contains("heads.pth is not torchvision's VGG16"),
        "{e}"
    );
    assert!(!bad.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
