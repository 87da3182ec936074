//! CPU timing of the estimator node's forward + backward against the same maths written with
//! plain tch ops (detach composition, as in the PyTorch reference script), same run, same
//! threads. `cargo run --release -p vq-tch --example bench_op [-- --threads 2]`

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

fn median_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut threads = 2;
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--threads", Some(v)) => threads = v,
            _ => panic!("usage: bench_op [--threads N]"),
        }
    }
    tch::set_num_threads(threads);
    println!("threads: {threads}");
    println!(
        "| N×D | estimator | node fwd+bwd ms | tch composition fwd+bwd ms | node / composition |"
    );
    println!("|---|---|---|---|---|");
    for (n, d) in [(8192i64, 256i64), (65536, 8), (16384, 32)] {
        tch::manual_seed(0);
        let mut e = Tensor::randn([n, d], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let q = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
        for est in [Estimator::StraightThrough, Estimator::Rotation] {
            let node = median_ms(20, || {
                e.zero_grad();
                let y = vq_tch::apply_estimator(&e, &q, est).expect("node");
                (&y * &y).mean(Kind::Float).backward();
            });
            let composed = median_ms(20, || {
                e.zero_grad();
                let y = match est {
                    Estimator::StraightThrough => &e + (&q - &e).detach(),
                    _ => rotate_composed(&e, &q),
                };
                (&y * &y).mean(Kind::Float).backward();
            });
            println!(
                "| {n}×{d} | {} | {node:.2} | {composed:.2} | {:.2} |",
                est.name(),
                node / composed
            );
        }
    }
}
