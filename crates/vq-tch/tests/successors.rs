//! DiVeQ, SF-DiVeQ, IBQ, LFQ, BSQ and SCQ layers against vq-core's formulas
//! (`vq_core::{diveq, ibq, lfq, scq}`): the same codes, values, losses and gradients (to the
//! input and to every code), and the settings that are refused.

use ndarray::{Array1, Array2, ArrayView2};
use tch::{Device, Kind, Tensor, nn};
use vq_core::diveq::{SfDiveq, SfDiveqForward, diveq_backward};
use vq_core::lfq::{BinaryCodes, Lfq};
use vq_core::{BetaPlacement, Estimator};
use vq_tch::{
    CodeReplacement, CodebookLearning, EntropyPenalty, Family, Metric, Mode, VectorQuantizer,
    VectorQuantizerConfig, VqVaeLatent,
};

fn array(t: &Tensor) -> Array2<f32> {
    let s = t.size();
    let v = Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1])).unwrap();
    Array2::from_shape_vec((s[0] as usize, s[1] as usize), v).unwrap()
}

fn max_abs(a: ArrayView2<f32>, b: ArrayView2<f32>) -> f32 {
    (&a - &b).iter().fold(0.0, |m, v| m.max(v.abs()))
}

fn config(family: Family, k: usize, d: usize) -> VectorQuantizerConfig {
    VectorQuantizerConfig {
        codebook_size: k,
        codebook_dim: d,
        learning: CodebookLearning::Gradient {
            placement: BetaPlacement::Commitment,
        },
        seed: 5,
        ..VectorQuantizerConfig::paper_vqvae(VqVaeLatent::F16x16x32, Metric::Euclidean)
    }
    .with_family(family)
    .unwrap()
}

/// A layer, rows `x` (N, D) requiring grad, their copy and an upstream gradient.
fn setup(
    cfg: VectorQuantizerConfig,
    n: i64,
    seed: i64,
) -> (
    nn::VarStore,
    VectorQuantizer,
    Tensor,
    Array2<f32>,
    Array2<f32>,
) {
    let vs = nn::VarStore::new(Device::Cpu);
    let vq = VectorQuantizer::new(&vs.root(), cfg).unwrap();
    tch::manual_seed(seed);
    let d = cfg.input_channels() as i64;
    let x = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
    let g = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
    let xa = array(&x);
    (vs, vq, x.set_requires_grad(true), xa, array(&g))
}

/// Training forward; backward of `Σ g ⊙ out + losses`.
fn run(vq: &mut VectorQuantizer, x: &Tensor, g: &Array2<f32>) -> vq_tch::VqOutput {
    let out = vq.forward(x, Mode::Train).unwrap();
    let gt = Tensor::from_slice(g.as_slice().unwrap()).view([g.nrows() as i64, -1]);
    ((&out.quantized * gt).sum(Kind::Float) + &out.commitment_loss + &out.codebook_loss).backward();
    out
}

fn indices(t: &Tensor) -> Vec<u32> {
    Vec::<i64>::try_from(t.view([-1]))
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect()
}

/// The codebook's gradient from per-row code gradients.
fn scatter(rows: &Array2<f32>, idx: &[u32], k: usize) -> Array2<f32> {
    let mut out = Array2::zeros((k, rows.ncols()));
    for (r, &i) in rows.rows().into_iter().zip(idx) {
        let mut o = out.row_mut(i as usize);
        o += &r;
    }
    out
}

#[test]
fn diveq_layer_is_vq_cores_diveq_with_and_without_noise() {
    for name in ["diveq", "diveq-detach"] {
        let cfg = config(Family::from_name(name).unwrap(), 9, 4);
        assert_eq!((cfg.beta, cfg.estimator), (0.0, Estimator::StraightThrough));
        let (_vs, mut vq, x, xa, ga) = setup(cfg, 40, 1);
        let codebook = array(vq.codebook());
        let out = run(&mut vq, &x, &ga);
        let idx = indices(&out.indices);
        let want = vq_core::nearest_codes(xa.view(), codebook.view(), Metric::Euclidean).unwrap();
        assert_eq!(idx, want.to_vec());
        let q = vq_core::gather_codes(codebook.view(), &idx).unwrap();
        let value = array(&out.quantized.detach());
        // The value is at the error's distance from z; its direction is d (noised or not).
        let mut directions = Array2::zeros(xa.raw_dim());
        for i in 0..40 {
            let (step, err) = (&value.row(i) - &xa.row(i), &q.row(i) - &xa.row(i));
            let n = err.dot(&err).sqrt();
            assert!((step.dot(&step).sqrt() - n).abs() < 1e-5);
            directions.row_mut(i).assign(&(&step / n));
        }
        let exact = max_abs(value.view(), q.view());
        match name {
            "diveq" => assert!(exact > 1e-5 && exact < 0.1, "noise moved the value {exact}"),
            _ => assert!(exact < 1e-5),
        }
        let (gz, gq) = diveq_backward(xa.view(), q.view(), directions.view(), ga.view()).unwrap();
        assert!(max_abs(array(&x.grad()).view(), gz.view()) < 1e-4, "{name}");
        let gc = scatter(&gq, &idx, 9);
        assert!(max_abs(array(&vq.codebook().grad()).view(), gc.view()) < 1e-4);
        // Evaluation gives the code itself.
        let eval = vq.forward(&x.detach(), Mode::Eval).unwrap();
        assert_eq!(array(&eval.quantized), q);
    }
}

#[test]
fn diveq_replaces_unused_codes_by_copies_of_used_ones() {
    let family = Family::Diveq {
        noise_std: 1e-3,
        replacement: CodeReplacement {
            every: 2,
            min_usage: 0.5,
        },
    };
    let cfg = config(family, 16, 3);
    let (_vs, mut vq, x, _, _) = setup(cfg, 30, 2);
    // Only a few codes are used: inputs near the first code.
    let first = vq.codebook().detach().get(0).view([1, 3]);
    let x = (x.detach() * 1e-3 + first).set_requires_grad(true);
    let before = array(vq.codebook());
    let used: Vec<u32> = indices(&vq.forward(&x, Mode::Train).unwrap().indices);
    assert_eq!(
        array(vq.codebook()),
        before,
        "no replacement inside a window"
    );
    vq.forward(&x, Mode::Train).unwrap();
    let after = array(vq.codebook());
    for k in 0..16u32 {
        let row = after.row(k as usize);
        if used.contains(&k) {
            assert_eq!(row, before.row(k as usize));
        } else {
            assert!(
                used.iter().any(|&u| row == before.row(u as usize)),
                "code {k} is not a copy of a used code"
            );
        }
    }
}

#[test]
fn sf_diveq_warms_up_starts_from_the_data_and_matches_vq_core() {
    let family = Family::SfDiveq {
        noise_std: 0.0,
        warmup_forwards: 2,
    };
    let cfg = config(family, 6, 3);
    assert_eq!(cfg.tokens(), 5);
    let (_vs, mut vq, x, xa, ga) = setup(cfg, 24, 3);
    for _ in 0..2 {
        let out = vq.forward(&x, Mode::Train).unwrap();
        assert_eq!(
            array(&out.quantized.detach()),
            xa,
            "the warm-up passes through"
        );
    }
    let out = run(&mut vq, &x, &ga);
    // The codebook: means of runs of 24/6 = 4 consecutive rows.
    let codebook = array(vq.codebook());
    for k in 0..6 {
        let rows = xa.slice(ndarray::s![4 * k..4 * k + 4, ..]);
        let mean = rows.mean_axis(ndarray::Axis(0)).unwrap();
        let diff = &codebook.row(k) - &mean;
        assert!(diff.iter().all(|v| v.abs() < 1e-6), "code {k}");
    }
    // The value is the dithered point of its segment; recover the dithers and check the
    // gradients against vq-core's.
    let idx = indices(&out.indices);
    let value = array(&out.quantized.detach());
    let mut dither = Array1::from_elem(5, 0.5f32);
    for (i, &j) in idx.iter().enumerate() {
        let (a, b) = (codebook.row(j as usize), codebook.row(j as usize + 1));
        let seg = &b - &a;
        dither[j as usize] = (&value.row(i) - &a).dot(&seg) / seg.dot(&seg);
    }
    let sf = SfDiveq {
        codebook: codebook.view(),
        dither: dither.view(),
    };
    let unit = |c: usize| {
        let mut d = Array2::zeros(xa.raw_dim());
        for (i, &j) in idx.iter().enumerate() {
            let e = &codebook.row(j as usize + c) - &xa.row(i);
            d.row_mut(i).assign(&(&e / e.dot(&e).sqrt()));
        }
        d
    };
    let fwd = SfDiveqForward {
        indices: Array1::from(idx.clone()),
        quantized: value.clone(),
        directions: [unit(0), unit(1)],
    };
    let (gz, gc) = sf.backward(xa.view(), &fwd, ga.view()).unwrap();
    assert!(max_abs(array(&x.grad()).view(), gz.view()) < 1e-4);
    assert!(max_abs(array(&vq.codebook().grad()).view(), gc.view()) < 1e-4);
    // Evaluation: the nearest midpoint, which a token decodes to.
    let eval = vq.forward(&x.detach(), Mode::Eval).unwrap();
    let back = vq.embed(&eval.indices).unwrap();
    assert_eq!(array(&back), array(&eval.quantized));
    assert!(
        vq.embed(&Tensor::from_slice(&[5i64])).is_err(),
        "5 codes, 5 segments: 0..5"
    );
}

#[test]
fn ibq_layer_is_vq_cores_ibq() {
    let entropy = EntropyPenalty {
        weight: 0.3,
        diversity: 1.0,
        inv_temperature: 2.0,
    };
    let cfg = config(Family::Ibq { entropy }, 11, 5);
    assert_eq!(cfg.beta, 0.25);
    let (_vs, mut vq, x, xa, ga) = setup(cfg, 30, 4);
    let codebook = array(vq.codebook());
    let out = run(&mut vq, &x, &ga);
    let f = vq_core::ibq::ibq_forward(xa.view(), codebook.view()).unwrap();
    assert_eq!(indices(&out.indices), f.indices.to_vec());
    assert!(max_abs(array(&out.quantized.detach()).view(), f.quantized.view()) < 1e-6);
    let (gz1, gc1) = vq_core::ibq::ibq_backward(xa.view(), codebook.view(), &f, ga.view()).unwrap();
    let (loss, gz2, gc2) = vq_core::ibq::ibq_loss(xa.view(), codebook.view(), &f, 0.25).unwrap();
    let h = vq_core::ibq::ibq_entropy(xa.view(), codebook.view(), 0.5).unwrap();
    let loss = loss + 0.3 * (h.sample - h.average);
    let total = f64::try_from(&out.commitment_loss + &out.codebook_loss).unwrap();
    assert!(
        (total - loss).abs() < 1e-5 * loss.max(1.0),
        "{total} vs {loss}"
    );
    let gz = &gz1 + &gz2 + h.grad_z.mapv(|v| 0.3 * v);
    let gc = &gc1 + &gc2 + h.grad_codebook.mapv(|v| 0.3 * v);
    assert!(max_abs(array(&x.grad()).view(), gz.view()) < 1e-4);
    assert!(max_abs(array(&vq.codebook().grad()).view(), gc.view()) < 1e-4);
}

#[test]
fn lfq_and_bsq_layers_are_vq_cores_with_the_entropy_penalty() {
    for (name, codes) in [("lfq", BinaryCodes::Cube), ("bsq", BinaryCodes::Sphere)] {
        for estimator in [Estimator::StraightThrough, Estimator::Rotation] {
            let penalty = EntropyPenalty {
                weight: 0.3,
                diversity: 0.8,
                inv_temperature: 2.0,
            };
            let family = match codes {
                BinaryCodes::Cube => Family::Lfq { entropy: penalty },
                BinaryCodes::Sphere => Family::Bsq { entropy: penalty },
            };
            let cfg = VectorQuantizerConfig {
                estimator,
                beta: 0.2,
                ..config(family, 16, 4)
            };
            let (_vs, mut vq, x, xa, ga) = setup(cfg, 25, 5);
            let out = run(&mut vq, &x, &ga);
            let lfq = Lfq::new(4, codes).unwrap();
            let f = lfq.forward(xa.view()).unwrap();
            assert_eq!(indices(&out.indices), f.indices.to_vec(), "{name}");
            assert!(max_abs(array(&out.quantized.detach()).view(), f.quantized.view()) < 1e-6);
            let e = lfq.entropy(f.input.view(), 2.0, 0.8).unwrap();
            let want = 0.3 * (e.per_sample - 0.8 * e.codebook);
            let got = f64::try_from(&out.codebook_loss).unwrap();
            assert!((got - want).abs() < 1e-5, "{name}: {got} vs {want}");
            let n = xa.len() as f32;
            let extra = e.grad_input.mapv(|v| 0.3 * v)
                + (&f.input - &f.quantized).mapv(|v| 0.2 * 2.0 * v / n);
            let gz = lfq
                .backward(xa.view(), &f, estimator, ga.view(), Some(extra.view()))
                .unwrap();
            assert!(
                max_abs(array(&x.grad()).view(), gz.view()) < 1e-4,
                "{name} {estimator:?}"
            );
            assert_eq!(array(&vq.embed(&out.indices).unwrap()), f.quantized);
        }
    }
}

#[test]
fn scq_layer_is_vq_cores_scq() {
    let cfg = VectorQuantizerConfig {
        family: Family::Scq { lambda: 0.7 },
        ..config(Family::Scq { lambda: 0.7 }, 8, 3)
    };
    let (_vs, mut vq, x, xa, ga) = setup(cfg, 20, 6);
    let codebook = array(vq.codebook());
    let out = run(&mut vq, &x, &ga);
    let scq = vq_core::scq::Scq { lambda: 0.7 };
    let f = scq.forward(xa.view(), codebook.view()).unwrap();
    assert_eq!(indices(&out.indices), f.indices.to_vec());
    assert!(max_abs(array(&out.quantized.detach()).view(), f.quantized.view()) < 1e-4);
    let (gz, gc) = scq
        .backward(xa.view(), codebook.view(), &f, ga.view())
        .unwrap();
    assert!(max_abs(array(&x.grad()).view(), gz.view()) < 1e-3);
    assert!(max_abs(array(&vq.codebook().grad()).view(), gc.view()) < 1e-3);
}

#[test]
fn bad_settings_are_refused_naming_the_setting() {
    let base = VectorQuantizerConfig::paper_vqvae(VqVaeLatent::F16x16x32, Metric::Euclidean);
    let lfq = Family::from_name("lfq").unwrap();
    let err = VectorQuantizerConfig {
        codebook_size: 1000,
        ..base
    }
    .with_family(lfq)
    .unwrap_err();
    assert!(
        err.to_string().contains("codebook_size") && err.to_string().contains("power of two"),
        "{err}"
    );
    // DiVeQ with an EMA codebook (the preset's) set by hand, not through with_family.
    for name in ["diveq", "sf-diveq", "ibq", "scq"] {
        let cfg = VectorQuantizerConfig {
            family: Family::from_name(name).unwrap(),
            estimator: Estimator::StraightThrough,
            ..base
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("learning") && err.contains("EMA"),
            "{name}: {err}"
        );
        let cfg = base.with_family(Family::from_name(name).unwrap()).unwrap();
        let err = VectorQuantizerConfig {
            estimator: Estimator::Rotation,
            ..cfg
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("estimator") && err.contains("rotation"),
            "{name}: {err}"
        );
    }
    let cfg = base.with_family(lfq).unwrap();
    let err = VectorQuantizerConfig {
        metric: Metric::Cosine,
        ..base.with_family(Family::from_name("ibq").unwrap()).unwrap()
    }
    .validate()
    .unwrap_err();
    assert!(err.to_string().contains("metric"), "{err}");
    assert_eq!((cfg.codebook_dim, cfg.codebook_size), (10, 1024));
    assert!(Family::from_name("scq").unwrap().name() == "scq");
}
