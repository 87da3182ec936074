//! The VectorQuantizer layer: layouts, gradients and EMA state against vq-core.

use rand::SeedableRng;
use tch::{Device, Kind, Tensor, nn};
use vq_core::{BetaPlacement, EmaCodebook, EmaConfig, Estimator, Metric};
use vq_tch::{
    CodebookInit, CodebookLearning, Mode, Precision, Projection, VectorQuantizer,
    VectorQuantizerConfig, VqVaeLatent, autocast,
};
#[cfg(feature = "cuda-tests")]
use vq_tch::{FiniteCheck, FiniteVerdict};

/// A layer in its own CPU VarStore.
fn layer(cfg: VectorQuantizerConfig) -> (nn::VarStore, VectorQuantizer) {
    layer_on(cfg, Device::Cpu)
}

fn layer_on(cfg: VectorQuantizerConfig, device: Device) -> (nn::VarStore, VectorQuantizer) {
    let vs = nn::VarStore::new(device);
    let vq = VectorQuantizer::new(&vs.root(), cfg).unwrap();
    (vs, vq)
}

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
    let (_vs, mut vq) = layer(small(Metric::Euclidean, Estimator::Rotation));
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
        // The reported errors: mean((e − q)²) and mean(e²) per element.
        let qe = f64::try_from((&x - &out.quantized).square().mean(Kind::Float)).unwrap();
        let power = f64::try_from(x.square().mean(Kind::Float)).unwrap();
        assert!((f64::try_from(&out.quantization_error).unwrap() - qe).abs() < 1e-6 * qe.max(1.0));
        assert!((f64::try_from(&out.latent_power).unwrap() - power).abs() < 1e-6 * power);
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
        let (_vs, mut vq) = layer(small(Metric::Euclidean, estimator));
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

/// The layer's commitment and codebook losses, and the codebook's gradient, equal vq-core's
/// `vq_loss` with the config's `LossWeights`, for both β placements and for EMA codebooks.
#[test]
fn losses_and_codebook_gradient_equal_vq_core() {
    let ema = CodebookLearning::Ema {
        decay: 0.8,
        laplace_eps: 1e-5,
        dead_code_threshold: 0.0,
        kmeans_iters: 0,
    };
    for learning in [
        CodebookLearning::Gradient {
            placement: BetaPlacement::Commitment,
        },
        CodebookLearning::Gradient {
            placement: BetaPlacement::LegacyCodebook,
        },
        ema,
    ] {
        let cfg = VectorQuantizerConfig {
            learning,
            beta: 0.3,
            ..small(Metric::Euclidean, Estimator::Rotation)
        };
        let (_vs, mut vq) = layer(cfg);
        tch::manual_seed(11);
        let x = Tensor::randn([40, 4], (Kind::Float, Device::Cpu));
        let out = vq.forward(&x, Mode::Eval).unwrap();
        let (e, q) = (to_array(&x), to_array(&out.quantized.detach()));
        let weights = cfg.loss_weights().unwrap();
        let want = vq_core::vq_loss(e.view(), q.view(), weights).unwrap();
        let close = |a: f64, b: f32, what: &str| {
            assert!(
                (a - f64::from(b)).abs() <= 1e-6 * (1.0 + f64::from(b).abs()),
                "{learning:?} {what}: layer {a} vs vq-core {b}"
            );
        };
        close(
            f64::try_from(&out.commitment_loss).unwrap(),
            want.commitment,
            "commitment",
        );
        close(
            f64::try_from(&out.codebook_loss).unwrap(),
            want.codebook,
            "codebook",
        );
        if let CodebookLearning::Gradient { .. } = learning {
            out.codebook_loss.backward();
            let idx: Vec<u32> = Vec::<i64>::try_from(out.indices.reshape([-1]))
                .unwrap()
                .into_iter()
                .map(|i| i as u32)
                .collect();
            let expect =
                vq_core::scatter_add_rows(want.grad_q(e.view(), q.view()).view(), &idx, 16)
                    .unwrap();
            let got = to_array(&vq.codebook().grad());
            for (a, b) in got.iter().zip(expect.iter()) {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "{learning:?}: {a} vs {b}"
                );
            }
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
    let (_vs, mut vq) = layer(cfg);
    let mut reference = EmaCodebook::new(
        to_array(vq.codebook()),
        EmaConfig::new(0.8, 1e-5, 0.5, Metric::Euclidean).unwrap(),
    )
    .unwrap();
    for step in 0..4 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed + step as u64);
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
    assert_eq!(vq.ema().unwrap().unwrap(), reference);
}

#[test]
fn learned_codebook_gets_gradient_only_from_the_codebook_loss() {
    let cfg = VectorQuantizerConfig {
        codebook_size: 16,
        codebook_dim: 4,
        ..VectorQuantizerConfig::paper_vqgan(16, 4)
    };
    let (vs, mut vq) = layer(cfg);
    assert_eq!(
        vs.trainable_variables().len(),
        1,
        "the codebook is trainable"
    );
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
    VectorQuantizerConfig::paper_vit_vqgan(8192, 512)
        .validate()
        .unwrap();
    let bad = VectorQuantizerConfig {
        projection: Projection::Linear { channels: 0 },
        ..small(Metric::Euclidean, Estimator::Rotation)
    };
    assert!(matches!(
        bad.validate(),
        Err(vq_tch::VqTchError::Config {
            field: "projection",
            ..
        })
    ));
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
        VectorQuantizer::new(&nn::VarStore::new(Device::Cpu).root(), bad),
        Err(vq_tch::VqTchError::Config { field: "beta", .. })
    ));
}

#[test]
fn half_precision_and_cosine() {
    let (_vs, mut vq) = layer(small(Metric::Cosine, Estimator::Rotation));
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

fn ema_config(dead_code_threshold: f32, kmeans_iters: usize) -> VectorQuantizerConfig {
    VectorQuantizerConfig {
        learning: CodebookLearning::Ema {
            decay: 0.8,
            laplace_eps: 1e-5,
            dead_code_threshold,
            kmeans_iters,
        },
        seed: 11,
        ..small(Metric::Euclidean, Estimator::Rotation)
    }
}

fn batch(step: i64) -> Tensor {
    tch::manual_seed(1000 + step);
    Tensor::randn([48, 4], (Kind::Float, Device::Cpu)) * 3.0
}

#[test]
fn a_saved_and_reloaded_layer_continues_exactly() {
    // k-means on the first batch, dead-code replacement on: all the state must round-trip.
    let cfg = ema_config(0.9, 3);
    let (vs, mut vq) = layer(cfg);
    for step in 0..3 {
        vq.forward(&batch(step), Mode::Train).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("vq-tch-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("vq.safetensors");
    vs.save(&file).unwrap();
    let names: std::collections::BTreeSet<String> = vs.variables().into_keys().collect();
    for name in [
        "codebook",
        "ema_cluster_size",
        "ema_running_sum",
        "ema_steps",
        "initialised",
    ] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }

    let (mut vs2, mut resumed) = layer(cfg);
    assert_ne!(
        resumed.ema().unwrap(),
        vq.ema().unwrap(),
        "fresh layer differs"
    );
    vs2.load(&file).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(resumed.ema().unwrap(), vq.ema().unwrap());
    for step in 3..6 {
        // One batch for both: the global torch seed is shared with tests running in parallel.
        let x = batch(step);
        let a = vq.forward(&x, Mode::Train).unwrap();
        let b = resumed.forward(&x, Mode::Train).unwrap();
        assert!(a.indices.equal(&b.indices), "step {step}");
    }
    // k-means did not rerun on the resumed layer, and dead-code draws followed the saved steps.
    assert_eq!(resumed.ema().unwrap(), vq.ema().unwrap());
}

#[test]
fn projections_map_channels_to_the_code_dimension_and_back() {
    for projection in [
        Projection::Linear { channels: 6 },
        Projection::LinearLayerNorm { channels: 6 },
    ] {
        let cfg = VectorQuantizerConfig {
            projection,
            ..VectorQuantizerConfig::paper_vit_vqgan(16, 6)
        };
        let (vs, mut vq) = layer(cfg);
        let x = Tensor::randn([2, 6, 3, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let out = vq.forward(&x, Mode::Train).unwrap();
        assert_eq!(out.quantized.size(), [2, 6, 3, 3]);
        assert_eq!(out.indices.size(), [2, 3, 3]);
        (out.quantized.square().sum(Kind::Float) + &out.commitment_loss + &out.codebook_loss)
            .backward();
        assert!(f64::try_from(x.grad().abs().sum(Kind::Double)).unwrap() > 0.0);
        let expected = if projection == (Projection::Linear { channels: 6 }) {
            5
        } else {
            7
        };
        assert_eq!(vs.trainable_variables().len(), expected, "{projection:?}");
        for t in vs.trainable_variables() {
            assert!(t.grad().defined(), "every projection parameter is reached");
        }
        // The input must have the projection's channels, not the code dimension.
        assert!(matches!(
            vq.forward(
                &Tensor::randn([2, 32], (Kind::Float, Device::Cpu)),
                Mode::Eval
            ),
            Err(vq_tch::VqTchError::Shape { .. })
        ));
    }
}

/// Inside a bf16 autocast region the layer still runs in f32: its projections, search, losses
/// and gradient give exactly the numbers of a forward outside any region.
#[test]
fn autocast_regions_do_not_reach_the_quantizer() {
    let cfg = VectorQuantizerConfig {
        projection: Projection::Linear { channels: 6 },
        ..VectorQuantizerConfig::paper_vit_vqgan(16, 6)
    };
    let (_vs, mut vq) = layer(cfg);
    let x = Tensor::randn([2, 6, 3, 3], (Kind::Float, Device::Cpu));
    let run = |vq: &mut VectorQuantizer, precision: Precision| {
        let x = x.copy().set_requires_grad(true);
        let out = autocast(Device::Cpu, precision, || vq.forward(&x, Mode::Eval))
            .unwrap()
            .unwrap();
        assert_eq!(out.commitment_loss.kind(), Kind::Float);
        assert_eq!(out.quantized.kind(), Kind::Float);
        (out.quantized.square().sum(Kind::Float) + &out.commitment_loss).backward();
        (out.indices, out.quantized.detach(), x.grad())
    };
    let (i32_, q32, g32) = run(&mut vq, Precision::F32);
    let (i16_, q16, g16) = run(&mut vq, Precision::Bf16);
    assert!(i32_.equal(&i16_) && q32.equal(&q16) && g32.equal(&g16));
    // A bf16 input (an encoder that ran under autocast) is read as f32.
    let out = vq.forward(&x.to_kind(Kind::BFloat16), Mode::Eval).unwrap();
    assert_eq!(out.quantized.kind(), Kind::BFloat16);
    assert_eq!(out.commitment_loss.kind(), Kind::Float);
}

/// Devices beyond the CPU the test bodies also run on (`cuda-tests` feature).
/// The devices other than the CPU that the device tests compare with it. Those tests are
/// compiled only with the `cuda-tests` feature (which requires a usable GPU): on a CPU-only
/// machine their loops would be empty and they would pass having checked nothing.
#[cfg(feature = "cuda-tests")]
fn other_devices() -> Vec<Device> {
    assert!(
        tch::Cuda::is_available(),
        "feature cuda-tests needs a CUDA device"
    );
    vec![Device::Cuda(0)]
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let b = b.to_device(a.device()).to_kind(a.kind());
    f64::try_from((a - b).abs().max().to_kind(Kind::Double)).unwrap()
}

/// Same layer state on every device, same batches: same indices, values, losses, gradients and
/// EMA state as on the CPU (where vq-core computes them).
#[cfg(feature = "cuda-tests")]
#[test]
fn every_device_gives_the_cpu_numbers() {
    let configs = [
        ema_config(0.9, 0),
        VectorQuantizerConfig {
            metric: Metric::Cosine,
            ..ema_config(0.0, 0)
        },
        VectorQuantizerConfig {
            codebook_size: 16,
            codebook_dim: 4,
            ..VectorQuantizerConfig::paper_vqgan(16, 4)
        },
        VectorQuantizerConfig {
            codebook_size: 16,
            ..VectorQuantizerConfig::paper_vit_vqgan(16, 6)
        },
    ];
    for device in other_devices() {
        for cfg in configs {
            let (cpu_vs, mut cpu) = layer(cfg);
            let mut dev_vs = nn::VarStore::new(device);
            let mut dev = VectorQuantizer::new(&dev_vs.root(), cfg).unwrap();
            dev_vs.copy(&cpu_vs).unwrap();
            // The device layer checks its inputs without waiting for the device (the verdict
            // is read below); the numbers must not change.
            dev.set_finite_check(FiniteCheck::Deferred);
            for step in 0..3 {
                tch::manual_seed(step);
                let c = cfg.input_channels() as i64;
                let x = Tensor::randn([4, c, 3, 5], (Kind::Float, Device::Cpu));
                let w = Tensor::randn([4, c, 3, 5], (Kind::Float, Device::Cpu));
                let mut grads = Vec::new();
                let mut outs = Vec::new();
                for (vq, d) in [(&mut cpu, Device::Cpu), (&mut dev, device)] {
                    let xd = x.to_device(d).detach().set_requires_grad(true);
                    let out = vq.forward(&xd, Mode::Train).unwrap();
                    ((&out.quantized * w.to_device(d)).sum(Kind::Float)
                        + &out.commitment_loss
                        + &out.codebook_loss)
                        .backward();
                    grads.push(xd.grad());
                    outs.push(out);
                }
                let what = format!("{cfg:?} on {device:?}, step {step}");
                let verdict = outs[1]
                    .finite_verdict
                    .as_ref()
                    .expect("deferred on a device");
                let values = Vec::<i64>::try_from(verdict.0.to_device(Device::Cpu)).unwrap();
                assert_eq!(values, [0, 0, 0, 0], "{what}");
                assert!(outs[0].finite_verdict.is_none(), "{what}");
                assert!(
                    outs[0]
                        .indices
                        .equal(&outs[1].indices.to_device(Device::Cpu)),
                    "{what}"
                );
                assert!(
                    max_diff(&outs[0].quantized, &outs[1].quantized) < 1e-5,
                    "{what}"
                );
                assert!(
                    max_diff(&outs[0].commitment_loss, &outs[1].commitment_loss) < 1e-5,
                    "{what}"
                );
                assert!(max_diff(&grads[0], &grads[1]) < 1e-5, "{what}");
            }
            assert!(max_diff(cpu.codebook(), dev.codebook()) < 1e-5, "{cfg:?}");
            let steps = |vs: &nn::VarStore| {
                vs.variables()
                    .get("ema_steps")
                    .map(|t| i64::try_from(t.to_device(Device::Cpu)).unwrap())
            };
            assert_eq!(steps(&cpu_vs), steps(&dev_vs), "{cfg:?}");
            if let (Some(a), Some(b)) = (cpu.ema().unwrap(), dev.ema().unwrap()) {
                // The device runs the EMA step as tensor ops with f32 sums (vq-core: f64).
                let close = |x: ndarray::ArrayView2<f32>, y: ndarray::ArrayView2<f32>| {
                    x.iter()
                        .zip(y)
                        .all(|(u, v)| (u - v).abs() <= 1e-5 * (1.0 + v.abs()))
                };
                assert!(close(a.codebook(), b.codebook()), "{cfg:?}");
                assert!(close(a.running_sums(), b.running_sums()), "{cfg:?}");
                let (sa, sb) = (a.cluster_sizes().view(), b.cluster_sizes().view());
                let (sa, sb) = (
                    sa.insert_axis(ndarray::Axis(1)),
                    sb.insert_axis(ndarray::Axis(1)),
                );
                assert!(close(sa, sb), "{cfg:?}");
            }
        }
    }
}

/// `embed` of the indices `forward` returned is its quantized output exactly, in every layout
/// and with output projections; bad indices are typed errors naming the index.
#[test]
fn embedding_the_returned_indices_gives_the_quantized_output() {
    let plain = small(Metric::Euclidean, Estimator::Rotation);
    let projected = VectorQuantizerConfig {
        projection: Projection::LinearLayerNorm { channels: 6 },
        ..VectorQuantizerConfig::paper_vit_vqgan(16, 6)
    };
    for cfg in [plain, projected] {
        let c = cfg.input_channels() as i64;
        let (_vs, mut vq) = layer(cfg);
        for shape in [vec![40, c], vec![2, c, 3, 5], vec![2, c, 2, 3, 3]] {
            let x = Tensor::randn(&shape[..], (Kind::Float, Device::Cpu));
            let out = vq.forward(&x, Mode::Eval).unwrap();
            for kind in [Kind::Int64, Kind::Int, Kind::Int16] {
                let got = vq.embed(&out.indices.to_kind(kind)).unwrap();
                assert!(got.equal(&out.quantized), "{shape:?} {kind:?}");
            }
        }
        let k = vq.codebook().size()[0];
        let bad = Tensor::from_slice(&[0i64, k, 1]).view([1, 1, 3]);
        let err = vq.embed(&bad).unwrap_err();
        assert!(
            matches!(err, vq_tch::VqTchError::Code { index, .. } if index == k),
            "{err}"
        );
        assert!(
            err.to_string().contains(&format!("code index {k}")),
            "{err}"
        );
        let negative = Tensor::from_slice(&[-1i64]);
        assert!(matches!(
            vq.embed(&negative),
            Err(vq_tch::VqTchError::Code { index: -1, .. })
        ));
        assert!(matches!(
            vq.embed(&Tensor::zeros([2, 3], (Kind::Int64, Device::Cpu))),
            Err(vq_tch::VqTchError::Shape { .. })
        ));
        assert!(matches!(
            vq.embed(&Tensor::zeros([4], (Kind::Float, Device::Cpu))),
            Err(vq_tch::VqTchError::IndexKind(Kind::Float))
        ));
    }
}

/// Under a deferred check a non-finite batch on the device gives no error at once; its verdict,
/// read afterwards, is the error the eager check gives (naming the same row).
#[cfg(feature = "cuda-tests")]
#[test]
fn a_deferred_check_reports_what_the_eager_check_reports() {
    for device in other_devices() {
        let cfg = ema_config(0.9, 0);
        let c = cfg.input_channels() as i64;
        let x = Tensor::randn([2, c, 3, 5], (Kind::Float, device));
        let _ = x.get(1).get(0).get(2).get(4).fill_(f64::NAN);
        let (_vs, mut eager) = layer_on(cfg, device);
        let want = eager.forward(&x, Mode::Eval).unwrap_err().to_string();
        let (_vs, mut deferred) = layer_on(cfg, device);
        deferred.set_finite_check(FiniteCheck::Deferred);
        let out = deferred.forward(&x, Mode::Eval).unwrap();
        let verdict = out.finite_verdict.expect("deferred on a device");
        let values = Vec::<i64>::try_from(verdict.0.to_device(Device::Cpu)).unwrap();
        let got = FiniteVerdict::check(&values).unwrap_err().to_string();
        assert_eq!(got, want);
        // Row 29: sample 1 of 15 positions, position 2·5 + 4.
        assert!(got.contains("row 29"), "{got}");
    }
}

/// Each codebook initialisation against its formula: bounds, mean and variance of 32768 draws
/// (uniform: |x| ≤ b, var b²/3; normal: var 1), and the presets' choices (lucidrains'
/// kaiming-uniform for Table 1, taming's U(±1/K) for Tables 2–3, enhancing-transformers' N(0, 1)).
#[test]
fn codebook_inits_follow_their_formulas_and_the_references() {
    use rand::SeedableRng;
    let (k, d) = (512usize, 64usize);
    let moments = |v: &[f32]| {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean, var)
    };
    let kaiming = (6.0 / (k * d) as f64).sqrt();
    for (init, bound) in [
        (CodebookInit::KaimingUniform, Some(kaiming)),
        (CodebookInit::UniformInverseK, Some(1.0 / k as f64)),
        (CodebookInit::Uniform { bound: 0.5 }, Some(0.5)),
        (CodebookInit::Normal, None),
    ] {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let v = init.draw(k, d, &mut rng);
        assert_eq!(v.len(), k * d);
        let (mean, var) = moments(&v);
        let n = (k * d) as f64;
        match bound {
            Some(b) => {
                let max = v.iter().map(|x| f64::from(x.abs())).fold(0.0, f64::max);
                assert!(
                    max <= b * (1.0 + 1e-6) && max > 0.999 * b,
                    "{init:?}: {max} vs {b}"
                );
                assert!(
                    mean.abs() < 5.0 * b / (3.0 * n).sqrt(),
                    "{init:?}: mean {mean}"
                );
                assert!(
                    (var / (b * b / 3.0) - 1.0).abs() < 0.03,
                    "{init:?}: var {var}"
                );
            }
            None => {
                assert!(mean.abs() < 5.0 / n.sqrt(), "{init:?}: mean {mean}");
                assert!((var - 1.0).abs() < 0.03, "{init:?}: var {var}");
            }
        }
    }
    // The layer's codebook is the draw (l2-normalised rows for cosine).
    for metric in [Metric::Euclidean, Metric::Cosine] {
        let cfg = VectorQuantizerConfig {
            codebook_size: 16,
            codebook_dim: 4,
            seed: 9,
            ..VectorQuantizerConfig::paper_vqvae(VqVaeLatent::F16x16x32, metric)
        };
        let (_vs, vq) = layer(cfg);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut want = Tensor::from_slice(&cfg.init.draw(16, 4, &mut rng)).view([16, 4]);
        if metric == Metric::Cosine {
            want = &want / want.norm_scalaropt_dim(2, [1i64].as_slice(), true);
        }
        assert!(max_diff(vq.codebook(), &want) < 1e-6, "{metric:?}");
    }
    assert_eq!(
        VectorQuantizerConfig::paper_vqvae(VqVaeLatent::F64x64x3, Metric::Cosine).init,
        CodebookInit::KaimingUniform
    );
    assert_eq!(
        VectorQuantizerConfig::paper_vqgan(1024, 256).init,
        CodebookInit::UniformInverseK
    );
    assert_eq!(
        VectorQuantizerConfig::paper_vit_vqgan(8192, 512).init,
        CodebookInit::Normal
    );
    let bad = VectorQuantizerConfig {
        init: CodebookInit::Uniform { bound: 0.0 },
        ..small(Metric::Euclidean, Estimator::Rotation)
    };
    assert!(bad.validate().unwrap_err().to_string().contains("init"));
}

/// enhancing-transformers normalises a learned cosine codebook at every use: codes of unit norm
/// whatever the stored rows' norms, and a codebook gradient without a radial part.
#[test]
fn a_learned_cosine_codebook_is_used_normalised() {
    let cfg = VectorQuantizerConfig {
        codebook_size: 8,
        codebook_dim: 4,
        projection: Projection::Identity,
        ..VectorQuantizerConfig::paper_vit_vqgan(8, 4)
    };
    let (vs, mut vq) = layer(cfg);
    let mut codebook = vs.variables()["codebook"].shallow_clone();
    let _ = tch::no_grad(|| codebook.g_mul_scalar_(3.0));
    let x = Tensor::randn([6, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let out = vq.forward(&x, Mode::Train).unwrap();
    let norms = out
        .quantized
        .detach()
        .norm_scalaropt_dim(2, [1i64].as_slice(), false);
    assert!(
        norms.allclose(&norms.ones_like(), 1e-6, 1e-6, false),
        "{norms}"
    );
    // Decoding the indices gives the same codes.
    let embedded = vq.embed(&out.indices).unwrap();
    assert!(embedded.allclose(&out.quantized.detach(), 1e-6, 1e-6, false));
    out.codebook_loss.backward();
    let radial = (codebook.grad() * &codebook).sum_dim_intlist(1, false, Kind::Float);
    assert!(
        f64::try_from(radial.abs().max()).unwrap() < 1e-6,
        "{radial}"
    );
    assert!(f64::try_from(codebook.grad().abs().max()).unwrap() > 0.0);
}
