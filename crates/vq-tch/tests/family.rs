//! Residual, multi-head, SimVQ and FSQ layers against vq-core's formulas
//! (`vq_core::family`): the same codes, outputs, losses and gradients.

use ndarray::{Array2, ArrayView2};
use tch::{Device, Kind, Tensor, nn};
use vq_core::family::{Fsq, MultiHeadQuantizer, ResidualQuantizer, SimVq};
use vq_core::{BetaPlacement, CodebookTerm, Estimator, LossWeights, Quantizer};
use vq_tch::{
    CodebookLearning, Family, FsqLevels, HeadCodebooks, Metric, Mode, StageDropout,
    VectorQuantizer, VectorQuantizerConfig, VqTchError, VqVaeLatent,
};

fn array(t: &Tensor) -> Array2<f32> {
    let s = t.size();
    let v = Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1])).unwrap();
    Array2::from_shape_vec((s[0] as usize, s[1] as usize), v).unwrap()
}

fn max_abs(a: ArrayView2<f32>, b: ArrayView2<f32>) -> f32 {
    (&a - &b).iter().fold(0.0, |m, v| m.max(v.abs()))
}

fn learned(family: Family, estimator: Estimator) -> VectorQuantizerConfig {
    VectorQuantizerConfig {
        codebook_size: 12,
        codebook_dim: 6,
        estimator,
        beta: 0.25,
        learning: CodebookLearning::Gradient {
            placement: BetaPlacement::Commitment,
        },
        seed: 3,
        ..VectorQuantizerConfig::paper_vqvae(VqVaeLatent::F16x16x32, Metric::Euclidean)
    }
    .with_family(family)
    .unwrap()
}

fn core_step(cfg: &VectorQuantizerConfig) -> Quantizer {
    Quantizer {
        metric: Metric::Euclidean,
        estimator: cfg.estimator,
        loss: LossWeights::new(cfg.beta, BetaPlacement::Commitment, CodebookTerm::Include).unwrap(),
    }
}

/// Rows (N, D) with requires-grad, their ndarray copy and a fixed upstream gradient.
fn inputs(n: i64, d: i64, seed: i64) -> (Tensor, Array2<f32>, Array2<f32>) {
    tch::manual_seed(seed);
    let x = Tensor::randn([n, d], (Kind::Float, Device::Cpu)) * 0.8;
    let g = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
    let (xa, ga) = (array(&x), array(&g));
    (x.set_requires_grad(true), xa, ga)
}

/// Forward in training mode, backward of `Σ g ⊙ out + losses`.
fn run(vq: &mut VectorQuantizer, x: &Tensor, g: &Array2<f32>) -> vq_tch::VqOutput {
    let out = vq.forward(x, Mode::Train).unwrap();
    let gt = Tensor::from_slice(g.as_slice().unwrap()).view([g.nrows() as i64, -1]);
    ((&out.quantized * gt).sum(Kind::Float) + &out.commitment_loss + &out.codebook_loss).backward();
    out
}

#[test]
fn residual_layer_is_vq_cores_residual_quantizer() {
    for estimator in [Estimator::StraightThrough, Estimator::Rotation] {
        let family = Family::Residual {
            stages: 3,
            dropout: StageDropout::Off,
        };
        let cfg = learned(family, estimator);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut vq = VectorQuantizer::new(&vs.root(), cfg).unwrap();
        let books: Vec<Array2<f32>> = vq.parts().iter().map(|p| array(p.codebook())).collect();
        assert_eq!(books.len(), 3);
        assert_ne!(books[0], books[1], "stages draw their own codebooks");
        let (x, xa, ga) = inputs(40, 6, 1);
        let out = run(&mut vq, &x, &ga);
        let views: Vec<_> = books.iter().map(|b| b.view()).collect();
        let rq = ResidualQuantizer {
            stage: core_step(&cfg),
        };
        let fwd = rq.forward(xa.view(), &views).unwrap();
        let want_idx = fwd.indices().mapv(i64::from);
        assert_eq!(
            array(&out.indices.to_kind(Kind::Float)),
            want_idx.mapv(|v| v as f32)
        );
        assert!(max_abs(array(&out.quantized.detach()).view(), fwd.quantized.view()) < 1e-5);
        let commit = f64::try_from(&out.commitment_loss).unwrap();
        assert!((commit - f64::from(fwd.commitment())).abs() < 1e-6);
        let bwd = rq.backward(&views, &fwd, ga.view()).unwrap();
        assert!(
            max_abs(array(&x.grad()).view(), bwd.grad_e.view()) < 1e-4,
            "{estimator:?}"
        );
        for (part, want) in vq.parts().iter().zip(&bwd.grad_codebooks) {
            let got = array(&part.codebook().grad());
            assert!(max_abs(got.view(), want.as_ref().unwrap().view()) < 1e-5);
        }
        // Codes out and back in: embed gives the layer's output value.
        let back = vq.embed(&out.indices).unwrap();
        assert!(max_abs(array(&back).view(), fwd.quantized.view()) < 1e-5);
    }
}

#[test]
fn residual_stages_learn_by_their_own_ema() {
    let cfg = VectorQuantizerConfig {
        codebook_size: 8,
        codebook_dim: 4,
        seed: 5,
        ..VectorQuantizerConfig::paper_vqvae(VqVaeLatent::F16x16x32, Metric::Euclidean)
    }
    .with_family(Family::from_name("residual2").unwrap())
    .unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let mut vq = VectorQuantizer::new(&vs.root(), cfg).unwrap();
    let mut emas: Vec<_> = vq
        .parts()
        .iter()
        .map(|p| p.ema().unwrap().unwrap())
        .collect();
    let (x, xa, _) = inputs(64, 4, 2);
    let books: Vec<Array2<f32>> = emas.iter().map(|e| e.codebook().to_owned()).collect();
    let views: Vec<_> = books.iter().map(|b| b.view()).collect();
    let fwd = ResidualQuantizer {
        stage: Quantizer {
            metric: Metric::Euclidean,
            estimator: cfg.estimator,
            loss: cfg.loss_weights().unwrap(),
        },
    }
    .forward(xa.view(), &views)
    .unwrap();
    vq.forward(&x, Mode::Train).unwrap();
    for (s, ema) in emas.iter_mut().enumerate() {
        let idx = fwd.groups[s].indices.as_slice().unwrap();
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5 + s as u64);
        ema.update(fwd.inputs[s].view(), idx, &mut rng).unwrap();
        let got = vq.parts()[s].ema().unwrap().unwrap();
        assert!(max_abs(got.codebook(), ema.codebook()) < 1e-5, "stage {s}");
    }
    let names = vs.variables();
    for v in [
        "stage0.codebook",
        "stage1.ema_running_sum",
        "stage1.initialised",
    ] {
        assert!(names.contains_key(v), "{v} in {:?}", names.keys());
    }
}

#[test]
fn heads_are_vq_cores_multi_head_quantizer() {
    for codebooks in [HeadCodebooks::Shared, HeadCodebooks::Separate] {
        for estimator in [Estimator::StraightThrough, Estimator::Rotation] {
            let cfg = learned(
                Family::MultiHead {
                    heads: 3,
                    codebooks,
                },
                estimator,
            );
            let vs = nn::VarStore::new(Device::Cpu);
            let mut vq = VectorQuantizer::new(&vs.root(), cfg).unwrap();
            let books: Vec<Array2<f32>> = vq.parts().iter().map(|p| array(p.codebook())).collect();
            let views: Vec<_> = books.iter().map(|b| b.view()).collect();
            let (x, xa, ga) = inputs(30, 6, 3);
            let out = run(&mut vq, &x, &ga);
            let mh = MultiHeadQuantizer {
                head: core_step(&cfg),
                heads: 3,
            };
            let fwd = mh.forward(xa.view(), &views).unwrap();
            let idx = array(&out.indices.to_kind(Kind::Float));
            assert_eq!(idx, fwd.indices().mapv(|v| v as f32), "{codebooks:?}");
            let loss = f64::try_from(&out.codebook_loss).unwrap();
            assert!((loss - f64::from(fwd.codebook_loss())).abs() < 1e-6);
            let bwd = mh.backward(&views, &fwd, ga.view()).unwrap();
            assert!(max_abs(array(&x.grad()).view(), bwd.grad_e.view()) < 1e-4);
            for (part, want) in vq.parts().iter().zip(&bwd.grad_codebooks) {
                let got = array(&part.codebook().grad());
                assert!(max_abs(got.view(), want.as_ref().unwrap().view()) < 1e-5);
            }
            let back = vq.embed(&out.indices).unwrap();
            assert!(max_abs(array(&back).view(), fwd.quantized.view()) < 1e-6);
        }
    }
}

#[test]
fn simvq_learns_the_map_of_a_frozen_codebook() {
    let cfg = learned(Family::SimVq, Estimator::Rotation);
    assert_eq!(cfg.beta, 0.25);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut vq = VectorQuantizer::new(&vs.root(), cfg).unwrap();
    let trainable: Vec<String> = vs
        .trainable_variables()
        .iter()
        .map(|t| format!("{:?}", t.size()))
        .collect();
    assert_eq!(trainable, vec!["[6, 6]"], "only W trains");
    let frozen = array(vq.codebook());
    let w = array(&vs.variables()["sim_transform.weight"]);
    let (x, xa, ga) = inputs(25, 6, 4);
    let out = run(&mut vq, &x, &ga);
    let sim = SimVq {
        quantizer: core_step(&cfg),
    };
    let fwd = sim.forward(xa.view(), frozen.view(), w.view()).unwrap();
    let idx: Vec<i64> = Vec::try_from(out.indices.view([-1])).unwrap();
    let want: Vec<i64> = fwd.indices.iter().map(|&i| i64::from(i)).collect();
    assert_eq!(idx, want);
    let bwd = sim
        .backward(xa.view(), frozen.view(), w.view(), &fwd, ga.view())
        .unwrap();
    assert!(max_abs(array(&x.grad()).view(), bwd.grad_e.view()) < 1e-4);
    let gw = array(&vs.variables()["sim_transform.weight"].grad());
    assert!(max_abs(gw.view(), bwd.grad_transform.unwrap().view()) < 1e-4);
    let table = array(&vq.codes_table());
    assert!(
        max_abs(
            table.view(),
            SimVq::implicit_codebook(frozen.view(), w.view()).view()
        ) < 1e-6
    );
}

#[test]
fn fsq_layer_is_vq_cores_fsq() {
    let levels = FsqLevels::new(&[8, 5, 5, 3]).unwrap();
    for estimator in [Estimator::StraightThrough, Estimator::Rotation] {
        let cfg = VectorQuantizerConfig {
            codebook_dim: 4,
            estimator,
            ..VectorQuantizerConfig::paper_vqvae(VqVaeLatent::F16x16x32, Metric::Euclidean)
        }
        .with_family(Family::Fsq { levels })
        .unwrap();
        assert_eq!(cfg.codebook_size, 600);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut vq = VectorQuantizer::new(&vs.root(), cfg).unwrap();
        assert!(vs.trainable_variables().is_empty());
        let (x, xa, ga) = inputs(50, 4, 5);
        let xa = xa * 2.0;
        let x = (x.detach() * 2.0).set_requires_grad(true);
        let out = run(&mut vq, &x, &ga);
        let fsq = Fsq::new(levels.as_slice()).unwrap();
        let fwd = fsq.forward(xa.view()).unwrap();
        let idx: Vec<i64> = Vec::try_from(out.indices.view([-1])).unwrap();
        assert_eq!(
            idx,
            fwd.indices
                .iter()
                .map(|&i| i64::from(i))
                .collect::<Vec<_>>()
        );
        assert!(max_abs(array(&out.quantized.detach()).view(), fwd.quantized.view()) < 1e-6);
        let want = fsq.backward(xa.view(), &fwd, estimator, ga.view()).unwrap();
        assert!(
            max_abs(array(&x.grad()).view(), want.view()) < 1e-4,
            "{estimator:?}"
        );
        assert_eq!(f64::try_from(&out.commitment_loss).unwrap(), 0.0);
        let back = vq.embed(&out.indices).unwrap();
        assert!(max_abs(array(&back).view(), fwd.quantized.view()) < 1e-6);
        let bad =
            Tensor::from_slice(&[0.0f32, 0.0, 0.0, 0.0, 1.0, f32::NAN, 0.0, 0.0]).view([2, 4]);
        let err = vq.forward(&bad, Mode::Train).unwrap_err();
        assert!(err.to_string().contains("row 1"), "{err}");
    }
}

#[test]
fn stage_dropout_is_seeded_resumable_and_off_in_evaluation() {
    let cfg = learned(
        Family::Residual {
            stages: 4,
            dropout: StageDropout::On { min_stages: 1 },
        },
        Estimator::Rotation,
    );
    let (x, _, _) = inputs(8, 6, 6);
    let x = x.detach();
    let active = |vq: &mut VectorQuantizer, mode| {
        let idx = vq.forward(&x, mode).unwrap().indices;
        let row: Vec<i64> = Vec::try_from(idx.get(0)).unwrap();
        row.iter().filter(|&&i| i >= 0).count()
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let mut vq = VectorQuantizer::new(&vs.root(), cfg).unwrap();
    let draws: Vec<usize> = (0..12).map(|_| active(&mut vq, Mode::Train)).collect();
    assert!(draws.iter().all(|&n| (1..=4).contains(&n)));
    assert!(draws.iter().any(|&n| n < 4), "{draws:?}");
    assert_eq!(active(&mut vq, Mode::Eval), 4);
    // A layer restored from the store after 6 draws continues with draws 7..12.
    let fresh = nn::VarStore::new(Device::Cpu);
    let mut again = VectorQuantizer::new(&fresh.root(), cfg).unwrap();
    let first: Vec<usize> = (0..6).map(|_| active(&mut again, Mode::Train)).collect();
    assert_eq!(first, draws[..6]);
    let mut resumed_vs = nn::VarStore::new(Device::Cpu);
    let mut resumed = VectorQuantizer::new(&resumed_vs.root(), cfg).unwrap();
    resumed_vs.copy(&fresh).unwrap();
    let rest: Vec<usize> = (0..6).map(|_| active(&mut resumed, Mode::Train)).collect();
    assert_eq!(rest, draws[6..]);
}

#[test]
fn family_names_and_rules_are_checked() {
    for name in [
        "nearest",
        "residual4",
        "residual4-dropout2",
        "heads2",
        "heads8-separate",
        "simvq",
        "fsq8-5-5-5",
    ] {
        assert_eq!(Family::from_name(name).unwrap().name(), name);
    }
    for bad in [
        "residual",
        "residual0",
        "heads-separate",
        "fsq8-1",
        "fsq",
        "kmeans",
    ] {
        let err = Family::from_name(bad).unwrap_err();
        assert!(matches!(err, VqTchError::UnknownFamily(_)), "{bad}");
        assert!(err.to_string().contains(bad), "{err}");
    }
    let base = VectorQuantizerConfig::paper_vqvae(VqVaeLatent::F16x16x32, Metric::Cosine);
    let err = base
        .with_family(Family::from_name("residual2").unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("metric"), "{err}");
    let err = base
        .with_family(Family::from_name("residual2-dropout3").unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("family"), "{err}");
    let mut fsq = base
        .with_family(Family::from_name("fsq8-5").unwrap())
        .unwrap();
    fsq.codebook_size = 41;
    assert!(
        fsq.validate()
            .unwrap_err()
            .to_string()
            .contains("codebook_size")
    );
    let simvq_ema = VectorQuantizerConfig {
        family: Family::SimVq,
        ..base
    };
    assert!(
        simvq_ema
            .validate()
            .unwrap_err()
            .to_string()
            .contains("learning")
    );
    // Indices of a grouped layer need their group axis.
    let cfg = learned(Family::from_name("heads2").unwrap(), Estimator::Rotation);
    let vs = nn::VarStore::new(Device::Cpu);
    let vq = VectorQuantizer::new(&vs.root(), cfg).unwrap();
    let flat = Tensor::zeros([2, 4, 4], (Kind::Int64, Device::Cpu));
    assert!(matches!(vq.embed(&flat), Err(VqTchError::Shape { .. })));
    let grouped = Tensor::zeros([2, 4, 4, 2], (Kind::Int64, Device::Cpu));
    assert_eq!(vq.embed(&grouped).unwrap().size(), [2, 6, 4, 4]);
    let out_of_range = Tensor::full([1, 2], 12, (Kind::Int64, Device::Cpu));
    assert!(matches!(
        vq.embed(&out_of_range),
        Err(VqTchError::Code { index: 12, .. })
    ));
}
