//! The VectorQuantizer layer: layouts, gradients and EMA state against vq-core.

use rand::SeedableRng;
use tch::{Device, Kind, Tensor};
use vq_core::{BetaPlacement, EmaCodebook, EmaConfig, Estimator, Metric};
use vq_tch::{CodebookLearning, Mode, VectorQuantizer, VectorQuantizerConfig, VqVaeLatent};

fn to_array(t: &Tensor) -> ndarray::Array2<f32> {
    let s = t.size();
    let v = Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1])).unwrap();
    ndarray::Array2::from_shape_vec((s[0] as usize, s[1] as usize), v).unwrap()
}

fn small(metric: Metric, estimator: Estimator) -> VectorQuantizerConfig {
    VectorQuantizerConfig {
        codebook_size: 16,
        codebook_dim: 4,
        estimator,
        ..VectorQuantizerConfig::paper_vqvae(VqVaeLatent::F16x16x32, metric)
    }
}

#[test]
fn image_and_video_layouts_round_trip_to_codewords() {
    let mut vq =
        VectorQuantizer::new(small(Metric::Euclidean, Estimator::Rotation), Device::Cpu).unwrap();
    for shape in [vec![2i64, 4, 3, 5], vec![2, 4, 2, 3, 3], vec![7, 4]] {
        let x = Tensor::randn(&shape[..], (Kind::Float, Device::Cpu));
        let out = vq.forward(&x, Mode::Eval).unwrap();
        assert_eq!(out.quantized.size(), shape);
        let mut lead = vec![shape[0]];
        lead.extend_from_slice(&shape[2..]);
        assert_eq!(out.indices.size(), lead);
        // Every output vector is the codeword of its index.
        let flat = if shape.len() == 2 {
            out.quantized.shallow_clone()
        } else {
            out.quantized
                .movedim(&[1i64][..], &[-1i64][..])
                .reshape([-1, 4])
        };
        let expect = vq.codebook().index_select(0, &out.indices.reshape([-1]));
        assert!(f64::try_from((flat - expect).abs().max()).unwrap() < 1e-6);
    }
    let bad = Tensor::randn([2, 3, 4, 4], (Kind::Float, Device::Cpu));
    assert!(matches!(
        vq.forward(&bad, Mode::Eval),
        Err(vq_tch::VqTchError::Shape { .. })
    ));
}

#[test]
fn input_gradient_is_the_estimator_plus_the_commitment_term() {
    for estimator in [Estimator::Rotation, Estimator::StraightThrough] {
        let mut vq =
            VectorQuantizer::new(small(Metric::Euclidean, estimator), Device::Cpu).unwrap();
        tch::manual_seed(5);
        let x = Tensor::randn([3, 4, 2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let w = Tensor::randn([3, 4, 2, 2], (Kind::Float, Device::Cpu));
        let out = vq.forward(&x, Mode::Eval).unwrap();
        ((&out.quantized * &w).sum(Kind::Float) + &out.commitment_loss).backward();
        let flat = |t: &Tensor| to_array(&t.movedim(&[1i64][..], &[-1i64][..]).reshape([-1, 4]));
        let (e, g, q) = (flat(&x.detach()), flat(&w), flat(&out.quantized.detach()));
        let beta = vq.config().beta;
        let expect = estimator.backward(e.view(), q.view(), g.view()).unwrap()
            + (&e - &q) * (2.0 * beta / e.len() as f32);
        let got = flat(&x.grad());
        for (a, b) in got.iter().zip(expect.iter()) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{estimator:?}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn ema_state_after_several_steps_equals_vq_core() {
    let cfg = VectorQuantizerConfig {
        learning: CodebookLearning::Ema {
            decay: 0.8,
            laplace_eps: 1e-5,
            dead_code_threshold: 0.5,
            kmeans_iters: 0,
        },
        ..small(Metric::Euclidean, Estimator::Rotation)
    };
    let mut vq = VectorQuantizer::new(cfg, Device::Cpu).unwrap();
    let mut reference = EmaCodebook::new(
        to_array(vq.codebook()),
        EmaConfig::new(0.8, 1e-5, 0.5, Metric::Euclidean).unwrap(),
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    for step in 0..4 {
        tch::manual_seed(100 + step);
        let x = Tensor::randn([64, 4], (Kind::Float, Device::Cpu)) * 2.0;
        let e = to_array(&x);
        let idx =
            vq_core::nearest_codes(e.view(), reference.codebook(), Metric::Euclidean).unwrap();
        reference
            .update(e.view(), idx.as_slice().unwrap(), &mut rng)
            .unwrap();
        let out = vq.forward(&x, Mode::Train).unwrap();
        let got: Vec<u32> = Vec::<i64>::try_from(out.indices)
            .unwrap()
            .into_iter()
            .map(|i| i as u32)
            .collect();
        assert_eq!(got, idx.to_vec(), "step {step}: same assignments");
    }
    assert_eq!(to_array(vq.codebook()), reference.codebook().to_owned());
    assert_eq!(vq.ema().unwrap(), &reference);
}

#[test]
fn learned_codebook_gets_gradient_only_from_the_codebook_loss() {
    let cfg = VectorQuantizerConfig {
        codebook_size: 16,
        codebook_dim: 4,
        ..VectorQuantizerConfig::paper_vqgan(16, 4)
    };
    let mut vq = VectorQuantizer::new(cfg, Device::Cpu).unwrap();
    let x = Tensor::randn([10, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let out = vq.forward(&x, Mode::Train).unwrap();
    // Legacy placement: commitment weight 1, codebook weight β = 0.25; both equal mse(e, q).
    let (c, b) = (
        f64::try_from(&out.commitment_loss).unwrap(),
        f64::try_from(&out.codebook_loss).unwrap(),
    );
    assert!((b - 0.25 * c).abs() < 1e-6 * c.max(1.0));
    out.quantized.sum(Kind::Float).backward();
    let g = vq.codebook().grad();
    assert!(
        !g.defined() || f64::try_from(g.abs().sum(Kind::Double)).unwrap() == 0.0,
        "no gradient through the estimator"
    );
    out.codebook_loss.backward();
    assert!(f64::try_from(vq.codebook().grad().abs().sum(Kind::Double)).unwrap() > 0.0);
    assert_eq!(
        cfg.learning,
        CodebookLearning::Gradient {
            placement: BetaPlacement::LegacyCodebook
        }
    );
}

#[test]
fn configs_are_validated_and_presets_are_valid() {
    for latent in [VqVaeLatent::F16x16x32, VqVaeLatent::F64x64x3] {
        for metric in [Metric::Euclidean, Metric::Cosine] {
            VectorQuantizerConfig::paper_vqvae(latent, metric)
                .validate()
                .unwrap();
        }
    }
    VectorQuantizerConfig::paper_vqgan(1024, 256)
        .validate()
        .unwrap();
    let bad = VectorQuantizerConfig {
        codebook_size: 0,
        ..small(Metric::Euclidean, Estimator::Rotation)
    };
    assert!(matches!(
        bad.validate(),
        Err(vq_tch::VqTchError::Config {
            field: "codebook_size",
            ..
        })
    ));
    let bad = VectorQuantizerConfig {
        beta: -1.0,
        ..small(Metric::Euclidean, Estimator::Rotation)
    };
    assert!(matches!(
        VectorQuantizer::new(bad, Device::Cpu),
        Err(vq_tch::VqTchError::Config { field: "beta", .. })
    ));
}

#[test]
fn half_precision_and_cosine() {
    let mut vq =
        VectorQuantizer::new(small(Metric::Cosine, Estimator::Rotation), Device::Cpu).unwrap();
    let x = Tensor::randn([2, 4, 3, 3], (Kind::BFloat16, Device::Cpu)).set_requires_grad(true);
    let out = vq.forward(&x, Mode::Train).unwrap();
    assert_eq!(out.quantized.kind(), Kind::BFloat16);
    out.quantized
        .to_kind(Kind::Float)
        .sum(Kind::Float)
        .backward();
    assert_eq!(x.grad().kind(), Kind::BFloat16);
    // Cosine codebooks stay normalised through EMA updates.
    let norms = vq
        .codebook()
        .norm_scalaropt_dim(2, [1i64].as_slice(), false);
    assert!(f64::try_from((norms - 1.0).abs().max()).unwrap() < 1e-5);
}
