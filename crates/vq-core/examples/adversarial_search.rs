//! Nearest-code search on adversarial data against the same shape on random data: every row
//! near-tied (all vectors offset by a constant, so cosines crowd near 1 and Euclidean distances
//! differ in their last digits; offsets up to 1e5), codebooks with a wide spread of norms (a
//! dense core with a few far codes, one code scaled far out, norms from 1e-3 to 1e3), and tiny or
//! huge magnitudes. Prints the median time of each case and its ratio to the random case.
//!
//! `cargo run --release -p vq-core --example adversarial_search [-- --threads T]`

use std::time::Instant;

use ndarray::Array2;
use ndarray_rand::RandomExt;
use rand::SeedableRng;
use rand_distr::StandardNormal;
use vq_core::{Metric, nearest_codes};

fn randn(shape: (usize, usize), seed: u64) -> Array2<f32> {
    Array2::random_using(
        shape,
        StandardNormal,
        &mut rand::rngs::StdRng::seed_from_u64(seed),
    )
}

fn median_ms(x: &Array2<f32>, c: &Array2<f32>, metric: Metric) -> f64 {
    let mut ts: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(nearest_codes(x.view(), c.view(), metric).expect("valid input"));
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    ts[ts.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--threads") {
        let n = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .expect("--threads N");
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .expect("one global pool");
    }
    println!("| N×K×D | metric | case | ms | / random |\n|---|---|---|---|---|");
    for (n, k, d) in [
        (8192usize, 1024usize, 32usize),
        (16384, 512, 8),
        (16384, 256, 3),
    ] {
        let (x, c) = (randn((n, d), 1), randn((k, d), 2));
        let spread = |m: &Array2<f32>| {
            let mut m = m.clone();
            for (i, mut row) in m.rows_mut().into_iter().enumerate() {
                row *= 0.05 + 2.0 * (i % 17) as f32 / 17.0;
            }
            m
        };
        let offset = |m: &Array2<f32>, o: f32| m.mapv(|v| v + o);
        // Row i scaled by 10^(−3 + 6·i/(rows − 1)): norms from 1e-3 to 1e3.
        let log_spread = |m: &Array2<f32>| {
            let mut m = m.clone();
            let rows = m.nrows().max(2) as f32;
            for (i, mut row) in m.rows_mut().into_iter().enumerate() {
                row *= 10f32.powf(-3.0 + 6.0 * i as f32 / (rows - 1.0));
            }
            m
        };
        // A dense core (codes and data × 1e-3) with the last 8 codes left at norm ~1.
        let core = |c: &Array2<f32>| {
            let mut c = c.mapv(|v| v * 1e-3);
            let k = c.nrows();
            for i in k.saturating_sub(8)..k {
                c.row_mut(i).mapv_inplace(|v| v * 1e3);
            }
            c
        };
        let mut one_far = c.clone();
        one_far.row_mut(0).mapv_inplace(|v| v * 1e3);
        let cases: Vec<(&str, Array2<f32>, Array2<f32>)> = vec![
            ("random", x.clone(), c.clone()),
            ("offset 10", offset(&x, 10.0), offset(&c, 10.0)),
            ("offset 1e3", offset(&x, 1e3), offset(&c, 1e3)),
            ("offset 1e4", offset(&x, 1e4), offset(&c, 1e4)),
            ("offset 1e5", offset(&x, 1e5), offset(&c, 1e5)),
            ("norm spread 0.05–2", spread(&x), spread(&c)),
            ("norms 1e-3–1e3", log_spread(&x), log_spread(&c)),
            ("dense core + 8 far codes", x.mapv(|v| v * 1e-3), core(&c)),
            ("one code × 1e3", x.clone(), one_far),
            (
                "magnitude 1e-30 / 1e30",
                x.mapv(|v| v * 1e-30),
                c.mapv(|v| v * 1e30),
            ),
        ];
        for metric in [Metric::Euclidean, Metric::Cosine] {
            let _warm = median_ms(&cases[0].1, &cases[0].2, metric);
            let times: Vec<f64> = cases
                .iter()
                .map(|(_, x, c)| median_ms(x, c, metric))
                .collect();
            for ((name, _, _), t) in cases.iter().zip(&times) {
                println!(
                    "| {n}×{k}×{d} | {metric:?} | {name} | {t:.1} | {:.2} |",
                    t / times[0]
                );
            }
        }
    }
}
