//! The prior against references of its own (the reference implementations: `references.rs`):
//! the cached sampler against recomputation, guidance against its formula, the likelihood against step-by-step log-probabilities, the filters against a plain
//! reading of their definitions, and bad inputs.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor, nn};
use vq_prior::{Cache, Conditioning, Prior, PriorConfig, PriorError, PriorKind, Sampling};

/// A tiny prior whose zero-initialised head (LlamaGen) is replaced by random weights, so that
/// its distributions are not uniform.
fn tiny(kind: PriorKind, conditioning: Conditioning) -> (nn::VarStore, Prior) {
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = PriorConfig {
        kind,
        conditioning,
        ..PriorConfig::preset("demo", 12, 3, 4, 0).unwrap()
    };
    let cfg = PriorConfig {
        width: 32,
        layers: 2,
        heads: 2,
        ..cfg
    };
    let prior = Prior::new(&vs.root(), cfg).unwrap();
    // Drawn on the host: tests run in parallel, and libtorch's generator is global.
    let mut rng = StdRng::seed_from_u64(7);
    let mut names: Vec<_> = vs.variables().into_iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (name, mut t) in names {
            if name.starts_with("output") || name.ends_with("norm.weight") {
                let v: Vec<f32> = (0..t.numel()).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let v = Tensor::from_slice(&v).view(t.size().as_slice());
                t.copy_(&(v + f64::from(name.contains("norm"))));
            }
        }
    });
    (vs, prior)
}

const CLASSES: Conditioning = Conditioning::Classes {
    classes: 5,
    dropout: 0.1,
};

#[test]
fn the_cached_sampler_draws_what_recomputation_draws() {
    for conditioning in [CLASSES, Conditioning::Unconditional] {
        let (_vs, prior) = tiny(PriorKind::Autoregressive, conditioning);
        let labels = [0i64, 4, 2];
        let labels = (conditioning == CLASSES).then_some(&labels[..]);
        for sampling in [
            Sampling::default(),
            Sampling {
                temperature: 0.7,
                top_k: 5,
                top_p: 0.9,
                ..Sampling::default()
            },
        ] {
            let kv = prior.sample(labels, 3, 11, &sampling, Cache::Kv).unwrap();
            let full = prior
                .sample(labels, 3, 11, &sampling, Cache::Recompute)
                .unwrap();
            assert_eq!(kv.size(), [3, 3, 4]);
            assert!(kv.equal(&full), "{conditioning:?} {sampling:?}");
        }
    }
}

#[test]
fn a_sample_does_not_depend_on_its_batch() {
    for kind in [PriorKind::Autoregressive, PriorKind::Masked] {
        let (_vs, prior) = tiny(kind, CLASSES);
        let s = Sampling::default();
        let three = prior
            .sample(Some(&[1, 2, 3]), 0, 40, &s, Cache::Kv)
            .unwrap();
        let last = prior.sample(Some(&[3]), 0, 42, &s, Cache::Kv).unwrap();
        assert!(three.get(2).equal(&last.get(0)), "{kind:?}");
        let again = prior
            .sample(Some(&[1, 2, 3]), 0, 40, &s, Cache::Kv)
            .unwrap();
        assert!(three.equal(&again));
        let (lo, hi) = (
            i64::try_from(three.min()).unwrap(),
            i64::try_from(three.max()).unwrap(),
        );
        assert!(
            lo >= 0 && hi < 12,
            "{kind:?}: codes {lo}..={hi} (no mask token left)"
        );
    }
}

#[test]
fn guidance_follows_its_formula_and_scale_one_is_conditional() {
    let (_vs, prior) = tiny(PriorKind::Autoregressive, CLASSES);
    let codes = Tensor::from_slice(&[3i64, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]).view([1, 12]);
    let y = Tensor::from_slice(&[2i64]);
    let null = Tensor::from_slice(&[5i64]);
    let cond = prior.next_logits(&codes.narrow(1, 0, 5), Some(&y)).unwrap();
    let uncond = prior
        .next_logits(&codes.narrow(1, 0, 5), Some(&null))
        .unwrap();
    for scale in [0.0, 1.0, 2.5] {
        let guided = prior
            .guided_logits(&codes.narrow(1, 0, 5), &y, scale)
            .unwrap();
        let expect = &uncond + (&cond - &uncond) * scale;
        let err = f64::try_from((guided - expect).abs().max()).unwrap();
        assert!(err < 1e-5, "scale {scale}: {err}");
    }
    // Guidance needs the "no class" row.
    let (_vs, plain) = tiny(
        PriorKind::Autoregressive,
        Conditioning::Classes {
            classes: 5,
            dropout: 0.0,
        },
    );
    let s = Sampling {
        cfg_scale: 2.0,
        ..Sampling::default()
    };
    let err = plain.sample(Some(&[1]), 0, 0, &s, Cache::Kv).unwrap_err();
    assert!(
        matches!(
            err,
            PriorError::Sampling {
                field: "cfg_scale",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn the_likelihood_is_the_sum_of_step_log_probabilities() {
    let (_vs, prior) = tiny(PriorKind::Autoregressive, CLASSES);
    let codes = Tensor::from_slice(&[
        3i64, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
    ])
    .remainder(12)
    .view([2, 3, 4]);
    let y = Tensor::from_slice(&[2i64, 0]);
    let nll = f64::try_from(prior.nll(&codes, Some(&y)).unwrap()).unwrap();
    let flat = codes.view([2, 12]);
    let mut total = 0.0;
    for i in 0..12 {
        let logits = prior.next_logits(&flat.narrow(1, 0, i), Some(&y)).unwrap();
        let logp = logits.to_kind(Kind::Double).log_softmax(-1, Kind::Double);
        total -= f64::try_from(
            logp.gather(1, &flat.narrow(1, i, 1), false)
                .sum(Kind::Double),
        )
        .unwrap();
    }
    let expect = total / 24.0;
    assert!((nll - expect).abs() < 1e-5 * expect, "{nll} vs {expect}");
}

#[test]
fn filters_keep_what_their_definitions_keep() {
    let logits = Tensor::from_slice(&[2.0f32, 0.5, 1.0, -1.0, 3.0, 0.0]).view([1, 6]);
    let kept = |s: Sampling| -> Vec<bool> {
        let f = s.filter(&logits);
        Vec::<f32>::try_from(f.view([-1]))
            .unwrap()
            .iter()
            .map(|v| v.is_finite())
            .collect()
    };
    let top2 = Sampling {
        top_k: 2,
        ..Sampling::default()
    };
    assert_eq!(kept(top2), [true, false, false, false, true, false]);
    // Softmax probabilities sorted: 3.0 → 0.61, 2.0 → 0.22, 1.0 → 0.08, ...: p = 0.8 keeps
    // the first two (0.61 < 0.8 ≤ 0.84), p = 0.5 only the first.
    let p = |top_p| Sampling {
        top_p,
        ..Sampling::default()
    };
    assert_eq!(kept(p(0.8)), [true, false, false, false, true, false]);
    assert_eq!(kept(p(0.5)), [false, false, false, false, true, false]);
    assert_eq!(kept(p(0.9)), [true, false, true, false, true, false]);
    let bad = Sampling {
        temperature: 0.0,
        ..Sampling::default()
    };
    assert!(matches!(
        bad.validate(),
        Err(PriorError::Sampling {
            field: "temperature",
            ..
        })
    ));
}

#[test]
fn bad_inputs_are_typed_errors() {
    let (_vs, prior) = tiny(PriorKind::Autoregressive, CLASSES);
    let y = Tensor::from_slice(&[1i64]);
    let out_of_range = Tensor::full([1, 3, 4], 12, (Kind::Int64, Device::Cpu));
    let e = prior.nll(&out_of_range, Some(&y)).unwrap_err();
    assert!(
        matches!(
            e,
            PriorError::Index {
                what: "code",
                index: 12,
                count: 12
            }
        ),
        "{e}"
    );
    let wrong_grid = Tensor::zeros([1, 4, 3], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        prior.nll(&wrong_grid, Some(&y)),
        Err(PriorError::Input { .. })
    ));
    let ok = Tensor::zeros([1, 3, 4], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        prior.nll(&ok, None),
        Err(PriorError::Input { what: "labels", .. })
    ));
    let bad_label = Tensor::from_slice(&[5i64]);
    assert!(matches!(
        prior.nll(&ok, Some(&bad_label)),
        Err(PriorError::Index { what: "class", .. })
    ));
    let cfg = PriorConfig {
        heads: 3,
        ..*prior.config()
    };
    assert!(matches!(
        cfg.validate(),
        Err(PriorError::Config { field: "heads", .. })
    ));
}

#[test]
fn training_lowers_the_loss_and_repeats_exactly() {
    for kind in [PriorKind::Autoregressive, PriorKind::Masked] {
        let run = || {
            let (vs, prior) = tiny(kind, CLASSES);
            let mut opt = nn::AdamW::default().build(&vs, 3e-3).unwrap();
            let codes = Tensor::arange(12, (Kind::Int64, Device::Cpu))
                .view([1, 3, 4])
                .repeat([4, 1, 1]);
            let y = Tensor::from_slice(&[0i64, 1, 2, 3]);
            let mut losses = Vec::new();
            for step in 0..30 {
                let seeds: Vec<u64> = (0..4).map(|i| 100 * step + i).collect();
                let loss = prior.training_loss(&codes, Some(&y), &seeds).unwrap();
                opt.backward_step(&loss);
                losses.push(f64::try_from(loss).unwrap());
            }
            losses
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b, "{kind:?}: the same seeds give the same losses");
        assert!(a[29] < 0.5 * a[0], "{kind:?}: {} → {}", a[0], a[29]);
    }
}
