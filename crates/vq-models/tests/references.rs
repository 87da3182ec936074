//! LPIPS, the FID Inception network, the Fréchet distance, the Inception score and the
//! TimeSformer encoder against the reference packages' own outputs: fixtures written by
//! `tests/reference/make_fixtures.py` with `lpips` 0.1.4, `pytorch-fid` 0.3.0 (scipy's `sqrtm`),
//! `transformers` 4.46.3, torchvision 0.28.0 and torch 2.13.0 (see that script and
//! `requirements.txt`). The networks get the script's deterministic weights
//! (the pretrained ones cannot be shipped), built here by the same formula. No Python runs here.

use std::path::PathBuf;

use tch::{Device, Kind, Tensor, nn};
use vq_models::timesformer::{TimeSformerConfig, TimeSformerEncoder};
use vq_models::{FidInception, Lpips, frechet_distance, inception_score};

fn fixture(name: &str) -> Vec<(String, Tensor)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/{name}.safetensors"));
    Tensor::read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn get(tensors: &[(String, Tensor)], name: &str) -> Tensor {
    tensors
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("fixture tensor {name} missing"))
        .1
        .shallow_clone()
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `formula` of make_fixtures.py: the value of every element of variable `name`.
fn formula(name: &str, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let phase = (fnv1a(name) % 1_000_003) as f64 / 1_000_003.0 * 2.0 * std::f64::consts::PI;
    let fan_in: i64 = shape[1..].iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| {
            let i = i as f64;
            let v =
                (i * 0.754_877_666_246_692_7 + phase).sin() * (i * 0.569_840_290_998_053_2).cos();
            let v = if name.ends_with("running_var") {
                1.0 + 0.25 * (v + 1.0)
            } else if name.ends_with("running_mean") {
                0.1 * v
            } else if name.contains(".bn.") && name.ends_with("weight") {
                1.0 + 0.1 * v
            } else if name.ends_with("bias") {
                0.1 * v
            } else if name.starts_with("lin") {
                0.5 * (v + 1.0)
            } else {
                v * (2.0 / (fan_in as f64).sqrt())
            };
            v as f32
        })
        .collect();
    Tensor::from_slice(&values).view(shape)
}

/// Sets every variable of `vs` to the formula's values.
fn fill(vs: &nn::VarStore) {
    let _guard = tch::no_grad_guard();
    for (name, mut t) in vs.variables() {
        t.copy_(&formula(&name, &t.size()));
    }
}

/// max |a − b| / max |b|.
fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let b = b.to_kind(Kind::Double);
    let diff = f64::try_from((a.to_kind(Kind::Double) - &b).abs().max()).unwrap();
    diff / f64::try_from(b.abs().max()).unwrap().max(f64::MIN_POSITIVE)
}

#[test]
fn lpips_equals_the_lpips_package() {
    let f = fixture("lpips");
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Lpips::new(&vs.root());
    fill(&vs);
    let _guard = tch::no_grad_guard();
    let (x, y) = (get(&f, "x"), get(&f, "y"));
    let d = net.forward(&x, &y);
    let want = get(&f, "distance");
    let err = relative(&d, &want);
    eprintln!("LPIPS vs lpips 0.1.4: relative error {err:.2e} (distances {want:?})");
    assert!(
        err < 1e-5,
        "LPIPS {d:?} vs lpips {want:?}: relative error {err:.2e}"
    );
    assert_eq!(f64::try_from(net.forward(&x, &x).abs().max()).unwrap(), 0.0);
}

#[test]
fn fid_inception_features_and_logits_equal_pytorch_fid() {
    let f = fixture("fid_inception");
    let vs = nn::VarStore::new(Device::Cpu);
    let net = FidInception::new(&vs.root());
    fill(&vs);
    let _guard = tch::no_grad_guard();
    let (pool, logits) = net.forward(&get(&f, "x"));
    let (ep, el) = (
        relative(&pool, &get(&f, "pool")),
        relative(&logits, &get(&f, "logits")),
    );
    eprintln!("FID Inception vs pytorch-fid 0.3.0: pool {ep:.2e}, logits {el:.2e}");
    assert!(ep < 1e-5 && el < 1e-5, "pool {ep:.2e}, logits {el:.2e}");
}

#[test]
fn frechet_distance_and_inception_score_equal_the_references() {
    let f = fixture("frechet");
    let fid = frechet_distance(&get(&f, "a"), &get(&f, "b"));
    let want = f64::try_from(get(&f, "fid")).unwrap();
    eprintln!("Fréchet distance {fid} vs pytorch-fid/scipy {want}");
    assert!((fid - want).abs() <= 1e-9 * want, "{fid} vs {want}");
    let (mean, std) = inception_score(&get(&f, "logits"), 2);
    let want = Vec::<f64>::try_from(get(&f, "is_mean_std")).unwrap();
    assert!(
        (mean - want[0]).abs() <= 1e-9 * want[0],
        "IS {mean} vs {}",
        want[0]
    );
    assert!(
        (std - want[1]).abs() <= 1e-9 * want[1],
        "IS std {std} vs {}",
        want[1]
    );
}

/// The encoder's tokens (B, hidden, T, g, g) are `TimesformerModel`'s `last_hidden_state`
/// without the CLS token, in its patch-major, frame-minor order (token n·T + t).
#[test]
fn timesformer_encoder_equals_transformers() {
    let f = fixture("timesformer");
    let c = Vec::<i64>::try_from(get(&f, "config")).unwrap();
    let c: Vec<usize> = c.iter().map(|&v| v as usize).collect();
    let config = TimeSformerConfig {
        frames: c[0],
        image_size: c[1],
        patch_size: c[2],
        channels: c[3],
        hidden: c[4],
        layers: c[5],
        heads: c[6],
        intermediate: c[7],
        layer_norm_eps: 1e-6,
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let net = TimeSformerEncoder::new(&vs.root(), &config).unwrap();
    fill(&vs);
    let _guard = tch::no_grad_guard();
    let out = nn::Module::forward(&net, &get(&f, "x"));
    let (b, d) = (out.size()[0], config.hidden as i64);
    let tokens = out.permute([0, 3, 4, 2, 1]).reshape([b, -1, d]);
    let want = get(&f, "last_hidden_state");
    let want = want.narrow(1, 1, want.size()[1] - 1);
    let err = relative(&tokens, &want);
    eprintln!("TimeSformer encoder vs transformers 4.46.3: relative error {err:.2e}");
    assert!(err < 1e-5, "relative error {err:.2e}");
}
