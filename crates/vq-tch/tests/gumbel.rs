//! The Gumbel family of the VectorQuantizer layer against vq-core's formulas.

use ndarray::Array2;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tch::{Device, Kind, Tensor, nn};
use vq_core::BetaPlacement;
use vq_core::gumbel::{
    GumbelForward, TemperatureSchedule, gumbel_noise, gumbel_softmax, gumbel_softmax_backward,
    kl_to_uniform, kl_to_uniform_backward,
};
use vq_tch::{
    CodebookLearning, Family, Metric, Mode, Projection, VectorQuantizer, VectorQuantizerConfig,
    VqVaeLatent,
};

const K: usize = 6;
const SEED: u64 = 11;

fn config(forward: GumbelForward) -> VectorQuantizerConfig {
    VectorQuantizerConfig {
        codebook_size: K,
        codebook_dim: K,
        learning: CodebookLearning::Gradient {
            placement: BetaPlacement::Commitment,
        },
        seed: SEED,
        family: Family::Gumbel {
            kl_weight: 0.5,
            forward,
            temperature: TemperatureSchedule::Geometric {
                start: 1.0,
                end: 1.0 / 16.0,
                steps: 4,
            },
        },
        ..VectorQuantizerConfig::paper_vqvae(VqVaeLatent::F16x16x32, Metric::Euclidean)
    }
}

fn array(t: &Tensor) -> Array2<f32> {
    let s = t.size();
    let v = Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1])).unwrap();
    Array2::from_shape_vec((s[0] as usize, s[1] as usize), v).unwrap()
}

/// A layer whose codebook is the identity, so its output rows are the (relaxed) one-hots.
fn identity_layer(forward: GumbelForward) -> (nn::VarStore, VectorQuantizer) {
    let vs = nn::VarStore::new(Device::Cpu);
    let vq = VectorQuantizer::new(&vs.root(), config(forward)).unwrap();
    let mut codebook = vs.variables()["codebook"].shallow_clone();
    tch::no_grad(|| codebook.copy_(&Tensor::eye(K as i64, (Kind::Float, Device::Cpu))));
    (vs, vq)
}

#[test]
fn the_layer_computes_vq_cores_soft_one_hot_prior_and_their_gradients() {
    let (vs, mut vq) = identity_layer(GumbelForward::Soft);
    vq.set_step(2);
    let tau = vq.temperature().unwrap();
    assert!((tau - 0.25).abs() < 1e-12);
    let x = Tensor::randn([5, K as i64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let w = vs.variables()["gumbel_proj.weight"].detach();
    let logits = array(&x.detach().apply(&nn::Linear {
        ws: w.shallow_clone(),
        bs: Some(vs.variables()["gumbel_proj.bias"].detach()),
    }));
    let out = vq.forward(&x, Mode::Train).unwrap();
    let noise = gumbel_noise(5, K, &mut StdRng::seed_from_u64(SEED));
    let y = gumbel_softmax(logits.view(), noise.view(), tau).unwrap();
    let got = array(&out.quantized.detach());
    assert!((&got - &y).iter().all(|d| d.abs() < 1e-6), "{got}\n{y}");
    let kl = kl_to_uniform(logits.view()).unwrap() * 0.5;
    assert!((f64::try_from(&out.codebook_loss).unwrap() - kl).abs() < 1e-6);
    assert_eq!(f64::try_from(&out.commitment_loss).unwrap(), 0.0);
    // d/dx of Σ v ⊙ z + KL: (softmax backward + KL backward) · W.
    let v = Array2::from_shape_fn((5, K), |(i, j)| ((i * 7 + j * 3) % 5) as f32 - 2.0);
    let vt = Tensor::from_slice(v.as_slice().unwrap()).view([5, K as i64]);
    ((&out.quantized * &vt).sum(Kind::Float) + &out.codebook_loss).backward();
    let dl = gumbel_softmax_backward(y.view(), v.view(), tau).unwrap()
        + kl_to_uniform_backward(logits.view()).unwrap() * 0.5;
    let expected = dl.dot(&array(&w));
    let grad = array(&x.grad());
    assert!(
        (&grad - &expected).iter().all(|d| d.abs() < 1e-5),
        "{grad}\n{expected}"
    );
    // The next training forward draws the next noise (seed + 1); evaluation draws none.
    vq.forward(&x.detach(), Mode::Eval).unwrap();
    let second = vq.forward(&x.detach(), Mode::Train).unwrap();
    let noise = gumbel_noise(5, K, &mut StdRng::seed_from_u64(SEED + 1));
    let y = gumbel_softmax(logits.view(), noise.view(), tau).unwrap();
    assert!(
        (&array(&second.quantized) - &y)
            .iter()
            .all(|d| d.abs() < 1e-6)
    );
    assert_eq!(i64::try_from(&vs.variables()["gumbel_draws"]).unwrap(), 2);
}

#[test]
fn the_hard_forward_is_one_hot_with_the_soft_gradient_and_evaluation_takes_the_mode() {
    let (soft_vs, mut soft) = identity_layer(GumbelForward::Soft);
    let (mut hard_vs, mut hard) = identity_layer(GumbelForward::Hard);
    tch::no_grad(|| hard_vs.copy(&soft_vs)).unwrap();
    let x = Tensor::randn([4, K as i64, 2, 3], (Kind::Float, Device::Cpu));
    let grads: Vec<Tensor> = [&mut soft, &mut hard]
        .into_iter()
        .map(|vq| {
            let x = x.copy().set_requires_grad(true);
            let out = vq.forward(&x, Mode::Train).unwrap();
            let q = out.quantized.permute([0, 2, 3, 1]).reshape([-1, K as i64]);
            let idx = out.indices.reshape([-1]);
            if vq.config().family == config(GumbelForward::Hard).family {
                let one_hot = idx.one_hot(K as i64).to_kind(Kind::Float);
                assert!(q.detach().allclose(&one_hot, 0.0, 0.0, false));
            }
            (out.quantized * x.detach().cos())
                .sum(Kind::Float)
                .backward();
            x.grad()
        })
        .collect();
    assert!(grads[0].allclose(&grads[1], 1e-6, 1e-6, false));
    // Evaluation: the argmax of the logits, no noise, nothing counted.
    let a = hard.forward(&x, Mode::Eval).unwrap();
    let b = hard.forward(&x, Mode::Eval).unwrap();
    assert!(a.indices.equal(&b.indices));
    assert_eq!(f64::try_from(&a.quantization_error).unwrap(), 0.0);
    assert_eq!(
        i64::try_from(&hard_vs.variables()["gumbel_draws"]).unwrap(),
        1
    );
}

#[test]
fn configurations_the_gumbel_family_cannot_run_are_refused_by_field() {
    let base = config(GumbelForward::Soft);
    let cases = [
        (
            VectorQuantizerConfig {
                metric: Metric::Cosine,
                ..base
            },
            "metric",
        ),
        (
            VectorQuantizerConfig {
                projection: Projection::Linear { channels: 8 },
                ..base
            },
            "projection",
        ),
        (
            VectorQuantizerConfig {
                family: base.family,
                ..VectorQuantizerConfig::paper_vqvae(VqVaeLatent::F16x16x32, Metric::Euclidean)
            },
            "learning",
        ),
        (
            VectorQuantizerConfig {
                family: Family::Gumbel {
                    kl_weight: 1e-3,
                    forward: GumbelForward::Soft,
                    temperature: TemperatureSchedule::Constant { value: 0.0 },
                },
                ..base
            },
            "family",
        ),
        (
            VectorQuantizerConfig {
                family: Family::Gumbel {
                    kl_weight: f32::NAN,
                    forward: GumbelForward::Soft,
                    temperature: TemperatureSchedule::Constant { value: 1.0 },
                },
                ..base
            },
            "family",
        ),
    ];
    for (cfg, field) in cases {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
}
