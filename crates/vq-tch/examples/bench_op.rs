//! Timing of the estimator node's forward + backward against the same maths written with plain
//! tch ops (detach composition, as in the PyTorch reference script), and of the VQ layer step
//! that training runs (`VectorQuantizer`, forward + backward) against torch's own ops
//! (‖e‖² − 2e·cᵀ + ‖c‖², argmin, gather, composition), with the pure vq-core step beside it;
//! same run, same threads / device.
//! `cargo run --release -p vq-tch --example bench_op [-- --threads 2 --device cuda]`

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use vq_core::Estimator;

/// The rotation trick by composition: λ·(e − 2(w·e)w + 2(û·e)q̂) with λ, w, û, q̂ detached.
fn rotate_composed(e: &Tensor, q: &Tensor) -> Tensor {
    let eps = 1e-6;
    let dim = [1i64].as_slice();
    let ne = e.norm_scalaropt_dim(2, dim, true);
    let nq = q.norm_scalaropt_dim(2, dim, true);
    let u = (e / ne.clamp_min(eps)).detach();
    let v = (q / nq.clamp_min(eps)).detach();
    let s = &u + &v;
    let w = (&s / s.norm_scalaropt_dim(2, dim, true).clamp_min(eps)).detach();
    let lambda = (&nq / ne.clamp_min(eps)).detach();
    let we = (e * &w).sum_dim_intlist(dim, true, Kind::Float);
    let ue = (e * &u).sum_dim_intlist(dim, true, Kind::Float);
    (e - 2.0 * we * &w + 2.0 * ue * &v) * lambda
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn median_ms(reps: usize, device: Device, mut f: impl FnMut()) -> f64 {
    f();
    sync(device);
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            sync(device);
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut threads, mut device) = (2, Device::Cpu);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--threads", Some(v)) => threads = v.parse().expect("--threads: integer"),
            ("--device", Some(v)) if v == "cuda" => device = Device::Cuda(0),
            ("--device", Some(v)) if v == "cpu" => device = Device::Cpu,
            _ => panic!("usage: bench_op [--threads N] [--device cpu|cuda]"),
        }
    }
    tch::set_num_threads(threads);
    // vq-core's kernels (the CPU search, the estimator callback, EMA) run on rayon's pool.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1) as usize)
        .build_global();
    println!("threads: {threads}, device: {device:?}");
    // On CUDA the node's backward is the fused kernel; its ATen composition is timed beside it.
    let cuda = device.is_cuda();
    if cuda {
        match vq_tch::fused_kernel_status(device) {
            Ok(()) => println!("fused backward kernel: ready"),
            Err(why) => println!(
                "fused backward kernel unavailable ({why}): both node columns run the composition"
            ),
        }
        println!(
            "| N×D | estimator | node fwd+bwd ms | node with ATen backward ms | tch composition fwd+bwd ms | node / composition |"
        );
        println!("|---|---|---|---|---|---|");
    } else {
        println!(
            "| N×D | estimator | node fwd+bwd ms | tch composition fwd+bwd ms | node / composition |"
        );
        println!("|---|---|---|---|---|");
    }
    for (n, d) in [(8192i64, 256i64), (65536, 8), (16384, 32)] {
        tch::manual_seed(0);
        let mut e = Tensor::randn([n, d], (Kind::Float, device)).set_requires_grad(true);
        let q = Tensor::randn([n, d], (Kind::Float, device));
        for est in [Estimator::StraightThrough, Estimator::Rotation] {
            let mut node_ms = |path| {
                median_ms(20, device, || {
                    e.zero_grad();
                    let y = vq_tch::apply_estimator_with(&e, &q, est, path).expect("node");
                    (&y * &y).mean(Kind::Float).backward();
                })
            };
            let node = node_ms(vq_tch::DevicePath::Fused);
            let aten = cuda.then(|| node_ms(vq_tch::DevicePath::Composed));
            let composed = median_ms(20, device, || {
                e.zero_grad();
                let y = match est {
                    Estimator::StraightThrough => &e + (&q - &e).detach(),
                    _ => rotate_composed(&e, &q),
                };
                (&y * &y).mean(Kind::Float).backward();
            });
            let aten = aten.map_or_else(String::new, |ms| format!(" {ms:.2} |"));
            println!(
                "| {n}×{d} | {} | {node:.2} |{aten} {composed:.2} | {:.2} |",
                est.name(),
                node / composed
            );
        }
    }
    layer_step(device);
}

/// The headline table: one VQ layer step as training runs it — `VectorQuantizer::forward` in
/// `Mode::Train` + backward of `mean(q̃²) + commitment + codebook` (gradient-learned codebook,
/// β = 0.25 on the commitment term, the loss of `torch_vq_ref.py`) — against the same step in
/// torch's own ops (`‖e‖² − 2e·cᵀ + ‖c‖²`, `argmin`, gather, the detach composition) and, beside
/// it, the pure vq-core step (`vq_core::Quantizer`, ndarray, no autograd) and the layer with an
/// EMA codebook (updated by vq-core). Same process, same inputs, same threads.
fn layer_step(device: Device) {
    use vq_core::{BetaPlacement, Metric};
    use vq_tch::{CodebookLearning, Mode, VectorQuantizer, VectorQuantizerConfig};
    println!();
    println!(
        "| N×K×D | estimator | layer step ms | torch-ops step ms | layer / torch-ops | vq-core step ms | layer, EMA codebook ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (n, k, d) in [(8192i64, 1024usize, 256usize), (65536, 8192, 8)] {
        tch::manual_seed(0);
        let e0 = Tensor::randn([n, d as i64], (Kind::Float, Device::Cpu));
        for est in [Estimator::StraightThrough, Estimator::Rotation] {
            let layer = |learning| {
                let vs = tch::nn::VarStore::new(device);
                let cfg = VectorQuantizerConfig {
                    estimator: est,
                    metric: Metric::Euclidean,
                    beta: 0.25,
                    learning,
                    ..VectorQuantizerConfig::paper_vqgan(k, d)
                };
                let vq = VectorQuantizer::new(&vs.root(), cfg).expect("layer");
                (vs, vq)
            };
            let gradient = CodebookLearning::Gradient {
                placement: BetaPlacement::Commitment,
            };
            let ema = CodebookLearning::Ema {
                decay: 0.8,
                laplace_eps: 1e-5,
                dead_code_threshold: 0.0,
                kmeans_iters: 0,
            };
            let mut e = e0.to_device(device).set_requires_grad(true);
            let mut time_layer = |learning| {
                let (_vs, mut vq) = layer(learning);
                median_ms(5, device, || {
                    e.zero_grad();
                    let out = vq.forward(&e, Mode::Train).expect("forward");
                    ((&out.quantized * &out.quantized).mean(Kind::Float)
                        + out.commitment_loss
                        + out.codebook_loss)
                        .backward();
                })
            };
            let ours = time_layer(gradient);
            let ours_ema = time_layer(ema);
            // torch's ops on the same codebook values.
            let (_vs, vq) = layer(gradient);
            let mut cb = vq.codebook().detach().copy().set_requires_grad(true);
            let theirs = median_ms(5, device, || {
                e.zero_grad();
                cb.zero_grad();
                let dist: Tensor = (&e * &e).sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
                    - 2.0 * e.matmul(&cb.transpose(0, 1))
                    + (&cb * &cb)
                        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
                        .unsqueeze(0);
                let idx = dist.argmin(1, false);
                let q_live = cb.index_select(0, &idx);
                let q = q_live.detach();
                let y = match est {
                    Estimator::StraightThrough => &e + (&q - &e).detach(),
                    _ => rotate_composed(&e, &q),
                };
                let loss = (&y * &y).mean(Kind::Float)
                    + e.mse_loss(&q, tch::Reduction::Mean) * 0.25
                    + q_live.mse_loss(&e.detach(), tch::Reduction::Mean);
                loss.backward();
            });
            let core = core_step_ms(&e0, &vq.codebook().to_device(Device::Cpu), est);
            println!(
                "| {n}×{k}×{d} | {} | {ours:.1} | {theirs:.1} | {:.3} | {core:.1} | {ours_ema:.1} |",
                est.name(),
                ours / theirs
            );
        }
    }
}

/// The same step in pure vq-core (`Quantizer::forward` + `backward`, ndarray on the CPU).
fn core_step_ms(e: &Tensor, codebook: &Tensor, estimator: Estimator) -> f64 {
    use vq_core::{BetaPlacement, CodebookTerm, LossWeights, Metric, Quantizer};
    let to_array = |t: &Tensor| {
        let s = t.size();
        let v = Vec::<f32>::try_from(t.contiguous().view([-1])).expect("f32");
        ndarray::Array2::from_shape_vec((s[0] as usize, s[1] as usize), v).expect("shape")
    };
    let (e, cb) = (to_array(e), to_array(codebook));
    let vq = Quantizer {
        metric: Metric::Euclidean,
        estimator,
        loss: LossWeights::new(0.25, BetaPlacement::Commitment, CodebookTerm::Include)
            .expect("weights"),
    };
    median_ms(5, Device::Cpu, || {
        let fwd = vq.forward(e.view(), cb.view()).expect("forward");
        let n = fwd.quantized.len() as f32;
        let grad_out = fwd.quantized.mapv(|v| 2.0 * v / n);
        let bwd = vq
            .backward(e.view(), cb.view(), &fwd, grad_out.view())
            .expect("backward");
        std::hint::black_box(bwd.grad_e[[0, 0]]);
    })
}
