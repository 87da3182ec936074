//! Shared by the tests that compare with the reference packages: the fixtures of
//! `reference/make_fixtures.py` and the deterministic weights of its `formula`.

#![allow(dead_code)]

use std::path::PathBuf;

use tch::{Kind, Tensor, nn};

pub fn fixture(name: &str) -> Vec<(String, Tensor)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/{name}.safetensors"));
    Tensor::read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn get(tensors: &[(String, Tensor)], name: &str) -> Tensor {
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
pub fn formula(name: &str, shape: &[i64]) -> Tensor {
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
pub fn fill(vs: &nn::VarStore) {
    let _guard = tch::no_grad_guard();
    for (name, mut t) in vs.variables() {
        t.copy_(&formula(&name, &t.size()));
    }
}

/// max |a − b| / max |b|.
pub fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let b = b.to_kind(Kind::Double);
    let diff = f64::try_from((a.to_kind(Kind::Double) - &b).abs().max()).unwrap();
    diff / f64::try_from(b.abs().max()).unwrap().max(f64::MIN_POSITIVE)
}
