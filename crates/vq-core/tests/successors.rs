//! vq-core's DiVeQ, SF-DiVeQ, IBQ, LFQ, BSQ and SCQ against the published implementations:
//! forward values, losses and gradients from `tests/fixtures/successors.safetensors`, written by
//! `tests/reference/make_fixtures.py` (lucidrains' vector-quantize-pytorch 1.32.0, the official
//! DiVeQ and SEED-Voken code, and SCQ's relaxation differentiated by PyTorch's autograd).

use ndarray::{Array1, Array2, ArrayView2};
use safetensors::{Dtype, SafeTensors};
use vq_core::diveq::{SfDiveq, diveq_backward, diveq_forward};
use vq_core::lfq::{BinaryCodes, Lfq};
use vq_core::{Estimator, Metric};

struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn open() -> Self {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/successors.safetensors"
        );
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Self { bytes }
    }

    /// A tensor as f64 values with its shape.
    fn get(&self, name: &str) -> (Vec<usize>, Vec<f64>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture tensor {name} missing"));
        let data = t.data();
        let values = match t.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("{name}: dtype {other:?}"),
        };
        (t.shape().to_vec(), values)
    }

    fn matrix(&self, name: &str) -> Array2<f32> {
        let (shape, v) = self.get(name);
        let cols = if shape.len() == 2 { shape[1] } else { 1 };
        Array2::from_shape_vec((shape[0], cols), v.into_iter().map(|x| x as f32).collect()).unwrap()
    }

    fn indices(&self, name: &str) -> Vec<u32> {
        self.get(name).1.into_iter().map(|v| v as u32).collect()
    }

    fn scalar(&self, name: &str) -> f64 {
        self.get(name).1[0]
    }
}

fn max_abs(a: ArrayView2<f32>, b: ArrayView2<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    (&a - &b).iter().fold(0.0, |m, v| m.max(v.abs()))
}

fn scatter(rows: &Array2<f32>, idx: &[u32], k: usize) -> Array2<f32> {
    let mut out = Array2::zeros((k, rows.ncols()));
    for (r, &i) in rows.rows().into_iter().zip(idx) {
        let mut o = out.row_mut(i as usize);
        o += &r;
    }
    out
}

#[test]
fn diveq_matches_lucidrains_and_the_official_code() {
    let f = Fixture::open();
    for case in [
        "lucidrains-diveq",
        "official-diveq",
        "official-diveq-detach",
    ] {
        let m = |n: &str| f.matrix(&format!("{case}:{n}"));
        let (z, c, w, noise) = (m("z"), m("codebook"), m("w"), m("noise"));
        let idx = vq_core::nearest_codes(z.view(), c.view(), Metric::Euclidean).unwrap();
        if case.starts_with("official") {
            assert_eq!(
                idx.to_vec(),
                f.indices(&format!("{case}:indices")),
                "{case}"
            );
        }
        let q = vq_core::gather_codes(c.view(), idx.as_slice().unwrap()).unwrap();
        let noise = (case != "official-diveq-detach").then_some(noise.view());
        let fwd = diveq_forward(z.view(), q.view(), noise).unwrap();
        assert!(
            max_abs(fwd.quantized.view(), m("out").view()) < 1e-5,
            "{case} value"
        );
        let (gz, gq) = diveq_backward(z.view(), q.view(), fwd.directions.view(), w.view()).unwrap();
        assert!(max_abs(gz.view(), m("grad_z").view()) < 1e-5, "{case} ∂z");
        let gc = scatter(&gq, idx.as_slice().unwrap(), c.nrows());
        assert!(
            max_abs(gc.view(), m("grad_codebook").view()) < 1e-5,
            "{case} ∂C"
        );
    }
}

#[test]
fn sf_diveq_matches_the_official_code() {
    let f = Fixture::open();
    let m = |n: &str| f.matrix(&format!("official-sf-diveq:{n}"));
    let (z, c, w) = (m("z"), m("codebook"), m("w"));
    let dither = Array1::from(m("dither").into_raw_vec_and_offset().0);
    let sf = SfDiveq {
        codebook: c.view(),
        dither: dither.view(),
    };
    let (n1, n2) = (m("noise1"), m("noise2"));
    let fwd = sf.forward(z.view(), Some([n1.view(), n2.view()])).unwrap();
    assert_eq!(fwd.indices.to_vec(), f.indices("official-sf-diveq:indices"));
    assert!(max_abs(fwd.quantized.view(), m("out").view()) < 1e-5);
    let (gz, gc) = sf.backward(z.view(), &fwd, w.view()).unwrap();
    assert!(max_abs(gz.view(), m("grad_z").view()) < 1e-5);
    assert!(max_abs(gc.view(), m("grad_codebook").view()) < 1e-5);
}

#[test]
fn lfq_and_bsq_match_lucidrains_with_their_losses() {
    let f = Fixture::open();
    let (weight, gamma, beta) = (0.1, 0.9, 0.25);
    for (name, codes) in [("lfq", BinaryCodes::Cube), ("bsq", BinaryCodes::Sphere)] {
        for tau in [100.0, 2.0] {
            let case = format!("lucidrains-{name}-tau{tau}");
            let m = |n: &str| f.matrix(&format!("{case}:{n}"));
            let (x, w) = (m("x"), m("w"));
            let lfq = Lfq::new(4, codes).unwrap();
            let fwd = lfq.forward(x.view()).unwrap();
            assert_eq!(fwd.indices.to_vec(), f.indices(&format!("{case}:indices")));
            assert!(
                max_abs(fwd.quantized.view(), m("out").view()) < 1e-6,
                "{case}"
            );
            let e = lfq.entropy(fwd.input.view(), tau, gamma).unwrap();
            let s = |n: &str| f.scalar(&format!("{case}:{n}"));
            assert!((e.per_sample - s("per_sample")).abs() < 1e-5, "{case}");
            assert!((e.codebook - s("codebook_entropy")).abs() < 1e-5, "{case}");
            let n = x.len() as f32;
            let diff = &fwd.input - &fwd.quantized;
            let commit = diff.iter().map(|v| (v * v) as f64).sum::<f64>() / n as f64;
            assert!((commit - s("commitment")).abs() < 1e-6);
            let aux = weight * (e.per_sample - gamma * e.codebook) + beta * commit;
            assert!(
                (aux - s("aux")).abs() < 1e-5,
                "{case}: {aux} vs {}",
                s("aux")
            );
            let extra =
                e.grad_input.mapv(|v| weight as f32 * v) + diff.mapv(|v| beta as f32 * 2.0 * v / n);
            let gx = lfq
                .backward(
                    x.view(),
                    &fwd,
                    Estimator::StraightThrough,
                    w.view(),
                    Some(extra.view()),
                )
                .unwrap();
            assert!(max_abs(gx.view(), m("grad_x").view()) < 1e-5, "{case} ∂x");
        }
    }
}

#[test]
fn ibq_matches_seed_voken_with_and_without_its_entropy_penalty() {
    let f = Fixture::open();
    for case in [
        "seed-voken-ibq",
        "seed-voken-ibq-entropy",
        "seed-voken-ibq-entropy-soft",
    ] {
        let m = |n: &str| f.matrix(&format!("{case}:{n}"));
        let (z, c, w) = (m("z"), m("codebook"), m("w"));
        let fwd = vq_core::ibq::ibq_forward(z.view(), c.view()).unwrap();
        assert_eq!(fwd.indices.to_vec(), f.indices(&format!("{case}:indices")));
        assert!(max_abs(fwd.quantized.view(), m("out").view()) < 1e-6);
        let (gz1, gc1) = vq_core::ibq::ibq_backward(z.view(), c.view(), &fwd, w.view()).unwrap();
        let (mut loss, mut gz, mut gc) =
            vq_core::ibq::ibq_loss(z.view(), c.view(), &fwd, 0.25).unwrap();
        gz += &gz1;
        gc += &gc1;
        if case != "seed-voken-ibq" {
            let t = f.scalar(&format!("{case}:temperature"));
            let e = vq_core::ibq::ibq_entropy(z.view(), c.view(), t).unwrap();
            let s = |n: &str| f.scalar(&format!("{case}:{n}"));
            assert!((e.sample - s("sample")).abs() < 1e-5, "{case}");
            assert!((e.average - s("average")).abs() < 1e-5, "{case}");
            loss += 0.05 * (e.sample - e.average);
            gz += &e.grad_z.mapv(|v| 0.05 * v);
            gc += &e.grad_codebook.mapv(|v| 0.05 * v);
        }
        assert!(
            (loss - f.scalar(&format!("{case}:loss"))).abs() < 1e-5,
            "{case}"
        );
        assert!(max_abs(gz.view(), m("grad_z").view()) < 1e-5, "{case} ∂z");
        assert!(
            max_abs(gc.view(), m("grad_codebook").view()) < 1e-5,
            "{case} ∂C"
        );
    }
}

#[test]
fn scq_matches_its_relaxation_differentiated_by_autograd() {
    let f = Fixture::open();
    let m = |n: &str| f.matrix(&format!("scq:{n}"));
    let (z, c, w) = (m("z"), m("codebook"), m("w"));
    let scq = vq_core::scq::Scq {
        lambda: f.scalar("scq:lambda"),
    };
    let fwd = scq.forward(z.view(), c.view()).unwrap();
    let weights = fwd.weights.mapv(|v| v as f32);
    assert!(max_abs(weights.view(), m("weights").view()) < 1e-6);
    assert!(max_abs(fwd.quantized.view(), m("out").view()) < 1e-6);
    let (gz, gc) = scq.backward(z.view(), c.view(), &fwd, w.view()).unwrap();
    assert!(max_abs(gz.view(), m("grad_z").view()) < 1e-5);
    assert!(max_abs(gc.view(), m("grad_codebook").view()) < 1e-5);
}
