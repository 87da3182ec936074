//! The paper's Himmelblau simulation (App. A.2): 2-D points are trainable "encoder outputs", the
//! objective is Himmelblau's function evaluated at the QUANTIZED point, the codebook follows the
//! points by EMA (decay 0.8), the points take 100 gradient steps of learning rate 1e-3. The
//! straight-through estimator and the rotation trick start from the same initialisation.
//!
//! `cargo run --release -p vq-core --example himmelblau [-- --seeds 5 --points 1000 --codes 16]`
//!
//! The paper does not state the number of points and codes or their initialisation; here points
//! are uniform on [−6, 6]², codes are a random subset of the points (stated in the output).

use ndarray::{Array1, Array2, Axis};
use ndarray_rand::RandomExt;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand_distr::Uniform;
use vq_core::{
    EmaCodebook, EmaConfig, Estimator, Metric, code_counts, gather_codes, nearest_codes,
    quantization_error,
};

/// f(x, y) = (x² + y − 11)² + (x + y² − 7)²
fn himmelblau(x: f32, y: f32) -> f32 {
    (x * x + y - 11.0).powi(2) + (x + y * y - 7.0).powi(2)
}

fn himmelblau_grad(x: f32, y: f32) -> [f32; 2] {
    let a = x * x + y - 11.0;
    let b = x + y * y - 7.0;
    [4.0 * x * a + 2.0 * b, 2.0 * a + 4.0 * y * b]
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    distortion: f64,
    objective: f64,
    used: usize,
}

fn stats(e: &Array2<f32>, cb: &EmaCodebook) -> Stats {
    let idx = nearest_codes(e.view(), cb.codebook(), Metric::Euclidean).expect("search");
    let idx = idx.as_slice().expect("contiguous");
    let q = gather_codes(cb.codebook(), idx).expect("gather");
    let objective = q
        .rows()
        .into_iter()
        .map(|r| f64::from(himmelblau(r[0], r[1])))
        .sum::<f64>()
        / q.nrows() as f64;
    let used = code_counts(idx, cb.codebook().nrows())
        .expect("counts")
        .iter()
        .filter(|&&c| c > 0)
        .count();
    Stats {
        distortion: quantization_error(e.view(), q.view()).expect("qe"),
        objective,
        used,
    }
}

/// Runs 100 steps; returns the statistics at steps 0, 33, 66, 100.
fn run(
    estimator: Estimator,
    init_points: &Array2<f32>,
    init_codes: &Array2<f32>,
    seed: u64,
) -> Vec<(usize, Stats)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let cfg = EmaConfig::new(0.8, 1e-5, 0.0, Metric::Euclidean).expect("valid EMA config");
    let mut cb = EmaCodebook::new(init_codes.clone(), cfg).expect("codebook");
    let mut e = init_points.clone();
    let mut out = vec![(0, stats(&e, &cb))];
    for step in 1..=100 {
        let idx = nearest_codes(e.view(), cb.codebook(), Metric::Euclidean).expect("search");
        let idx = idx.as_slice().expect("contiguous");
        let q = gather_codes(cb.codebook(), idx).expect("gather");
        let mut g = Array2::zeros(q.raw_dim());
        for (mut gr, qr) in g.rows_mut().into_iter().zip(q.rows()) {
            let [gx, gy] = himmelblau_grad(qr[0], qr[1]);
            gr[0] = gx;
            gr[1] = gy;
        }
        let ge = estimator
            .backward(e.view(), q.view(), g.view())
            .expect("backward");
        cb.update(e.view(), idx, &mut rng).expect("EMA update");
        e.scaled_add(-1e-3, &ge);
        if matches!(step, 33 | 66 | 100) {
            out.push((step, stats(&e, &cb)));
        }
    }
    out
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut seeds, mut points, mut codes) = (5u64, 1000usize, 16usize);
    while let Some(flag) = args.next() {
        let v: usize = args
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs an integer"));
        match flag.as_str() {
            "--seeds" => seeds = v as u64,
            "--points" => points = v,
            "--codes" => codes = v,
            other => panic!("unknown argument {other}"),
        }
    }
    println!(
        "Himmelblau simulation (paper A.2): {points} points ~ U[-6,6]², {codes} codes = random points, EMA decay 0.8, lr 1e-3, 100 steps"
    );
    println!(
        "| seed | step | STE distortion | rotation distortion | STE objective | rotation objective | STE codes used | rotation codes used |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut final_ratio = Array1::<f64>::zeros(seeds as usize);
    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let init = Array2::random_using((points, 2), Uniform::new(-6.0f32, 6.0), &mut rng);
        let pick = sample(&mut rng, points, codes).into_vec();
        let init_codes = init.select(Axis(0), &pick);
        let ste = run(Estimator::StraightThrough, &init, &init_codes, seed);
        let rot = run(Estimator::Rotation, &init, &init_codes, seed);
        for ((step, s), (_, r)) in ste.iter().zip(&rot) {
            println!(
                "| {seed} | {step} | {:.4} | {:.4} | {:.3} | {:.3} | {} | {} |",
                s.distortion, r.distortion, s.objective, r.objective, s.used, r.used
            );
        }
        let (s, r) = (ste.last().expect("steps").1, rot.last().expect("steps").1);
        final_ratio[seed as usize] = r.distortion / s.distortion;
    }
    println!(
        "rotation/STE distortion at step 100, per seed: {:?} (mean {:.3})",
        final_ratio
            .iter()
            .map(|v| format!("{v:.3}"))
            .collect::<Vec<_>>(),
        final_ratio.mean().unwrap_or(f64::NAN)
    );
}
