//! The quantizer in a data-parallel group (two ranks as threads, Gloo on 127.0.0.1): EMA steps,
//! k-means initialisation and dead-code replacement from the ranks' halves equal one layer's on
//! the whole batch; ranks with unequal batches (skipped samples) still agree with each other;
//! LFQ's and BSQ's entropy penalty over the ranks equals one layer's on the whole batch, value and
//! (averaged) gradients.

use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tch::{Device, Tensor, nn};
use vq_core::Metric;
use vq_dist::{GroupConfig, ProcessGroup};
use vq_tch::{CodebookLearning, Mode, VectorQuantizer, VectorQuantizerConfig, VqVaeLatent};

fn config(metric: Metric) -> VectorQuantizerConfig {
    VectorQuantizerConfig {
        codebook_size: 16,
        codebook_dim: 4,
        learning: CodebookLearning::Ema {
            decay: 0.8,
            laplace_eps: 1e-5,
            dead_code_threshold: 0.9,
            kmeans_iters: 2,
        },
        ..VectorQuantizerConfig::paper_vqvae(VqVaeLatent::F16x16x32, metric)
    }
}

/// Batches of `n` images (B, 4, 2, 2) from a seeded generator (not libtorch's global one).
fn images(seed: u64, n: usize) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * 16).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Tensor::from_slice(&v).view([n as i64, 4, 2, 2])
}

fn state(vq: &VectorQuantizer) -> Vec<f32> {
    let e = vq.ema().unwrap().unwrap();
    let mut v: Vec<f32> = e.codebook().iter().copied().collect();
    v.extend(e.running_sums().iter());
    v.extend(e.cluster_sizes().iter());
    v
}

fn port() -> u16 {
    vq_dist::launch::free_local_port().unwrap()
}

/// Runs `steps` training forwards on each rank's images; rank r of `sizes.len()` gets
/// `sizes[r]` images of the batch of each step.
fn ranks(metric: Metric, sizes: Vec<usize>, steps: u64) -> Vec<Vec<f32>> {
    let world = sizes.len();
    let port = port();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let sizes = sizes.clone();
            std::thread::spawn(move || {
                let pg = ProcessGroup::join(&GroupConfig {
                    rank,
                    world,
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                    device: Device::Cpu,
                    timeout: Duration::from_secs(30),
                    host_store: true,
                    prefix: "t".into(),
                })
                .unwrap();
                let vs = nn::VarStore::new(Device::Cpu);
                let mut vq = VectorQuantizer::new(&vs.root(), config(metric)).unwrap();
                vq.set_process_group(Some(Arc::new(pg)));
                for step in 0..steps {
                    let total: usize = sizes.iter().sum();
                    let all = images(step, total);
                    // Rank r's images: every world-th one, as the trainer deals them out.
                    let mine: Vec<i64> = (0..sizes[rank])
                        .map(|j| (j * world + rank) as i64)
                        .collect();
                    let x = all.index_select(0, &Tensor::from_slice(&mine));
                    vq.forward(&x, Mode::Train).unwrap();
                }
                state(&vq)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn two_ranks_hold_the_codebook_of_one_layer_on_the_whole_batch() {
    for metric in [Metric::Euclidean, Metric::Cosine] {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut one = VectorQuantizer::new(&vs.root(), config(metric)).unwrap();
        for step in 0..4 {
            one.forward(&images(step, 8), Mode::Train).unwrap();
        }
        let reference = state(&one);
        let got = ranks(metric, vec![4, 4], 4);
        for (rank, s) in got.iter().enumerate() {
            let worst = reference
                .iter()
                .zip(s)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{metric:?} rank {rank}: differs by {worst}");
        }
    }
}

#[test]
fn ranks_with_unequal_batches_still_agree() {
    let got = ranks(Metric::Euclidean, vec![3, 2], 3);
    assert_eq!(got[0], got[1]);
}

/// One training forward of LFQ / BSQ with the entropy penalty: the penalty and `∂/∂x` of it.
fn entropy_step(vq: &mut VectorQuantizer, x: &Tensor) -> (f64, Vec<f32>) {
    let x = x.detach().copy().set_requires_grad(true);
    let out = vq.forward(&x, Mode::Train).unwrap();
    out.codebook_loss.backward();
    let g = Vec::<f32>::try_from(x.grad().view([-1])).unwrap();
    (f64::try_from(&out.codebook_loss).unwrap(), g)
}

#[test]
fn the_entropy_penalty_spans_the_ranks() {
    for name in ["lfq", "bsq"] {
        let cfg = VectorQuantizerConfig {
            codebook_size: 16,
            codebook_dim: 4,
            ..VectorQuantizerConfig::paper_vqvae(VqVaeLatent::F16x16x32, Metric::Euclidean)
        }
        .with_family(vq_tch::Family::from_name(name).unwrap())
        .unwrap();
        let all = images(9, 8);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut one = VectorQuantizer::new(&vs.root(), cfg).unwrap();
        let (loss, grad) = entropy_step(&mut one, &all);
        let port = port();
        let handles: Vec<_> = (0..2usize)
            .map(|rank| {
                let mine = all.narrow(0, 4 * rank as i64, 4).copy();
                std::thread::spawn(move || {
                    let pg = ProcessGroup::join(&GroupConfig {
                        rank,
                        world: 2,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        device: Device::Cpu,
                        timeout: Duration::from_secs(30),
                        host_store: true,
                        prefix: "e".into(),
                    })
                    .unwrap();
                    let vs = nn::VarStore::new(Device::Cpu);
                    let mut vq = VectorQuantizer::new(&vs.root(), cfg).unwrap();
                    vq.set_process_group(Some(Arc::new(pg)));
                    entropy_step(&mut vq, &mine)
                })
            })
            .collect();
        // Each image holds 2×2 positions of 4 channels: 64 gradient entries per rank's half.
        for (rank, h) in handles.into_iter().enumerate() {
            let (l, g) = h.join().unwrap();
            assert!((l - loss).abs() < 1e-5, "{name} rank {rank}: {l} vs {loss}");
            for (a, b) in g.iter().zip(&grad[64 * rank..64 * (rank + 1)]) {
                assert!(
                    (a / 2.0 - b).abs() < 1e-6,
                    "{name} rank {rank}: {a}/2 vs {b}"
                );
            }
        }
    }
}
