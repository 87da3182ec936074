//! The paper's two-dimensional experiments, as deterministic simulations on top of the library.
//!
//! [`himmelblau`]: App. A.2 (Figs. 7–8). Points are trainable "encoder outputs"; the objective
//! is Himmelblau's function `f(x, y) = (x² + y − 11)² + (x + y² − 7)²` evaluated at the
//! *quantized* point; the codebook follows the points by EMA (decay 0.8); the points take plain
//! gradient steps (learning rate 1e-3, 100 updates). STE and the rotation trick start from the
//! same initialisation.
//!
//! The paper does not state the number of points, codes or their initialisation; the choices
//! here are documented on [`HimmelblauSetup::paper`].

use ndarray::{Array2, ArrayView2, Axis};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand_distr::{Distribution, Uniform};

use crate::codebook::{EmaCodebook, EmaConfig};
use crate::error::Result;
use crate::estimator::Estimator;
use crate::metrics::{code_counts, quantization_error};
use crate::search::{Metric, gather_codes, nearest_codes};

/// Himmelblau's function.
pub fn himmelblau_fn(x: f32, y: f32) -> f32 {
    (x * x + y - 11.0).powi(2) + (x + y * y - 7.0).powi(2)
}

/// Gradient of [`himmelblau_fn`].
pub fn himmelblau_grad(x: f32, y: f32) -> [f32; 2] {
    let a = x * x + y - 11.0;
    let b = x + y * y - 7.0;
    [4.0 * x * a + 2.0 * b, 2.0 * a + 4.0 * y * b]
}

/// Settings of the Himmelblau simulation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HimmelblauSetup {
    /// Number of 2-D points (trainable encoder outputs).
    pub points: usize,
    /// Number of codewords.
    pub codes: usize,
    /// Points start uniform on `[−extent, extent]²`; codes start at a random subset of them.
    pub extent: f32,
    /// Gradient steps.
    pub steps: usize,
    /// Learning rate of the points.
    pub lr: f32,
    /// EMA decay of the codebook.
    pub decay: f32,
    /// Seed of the initialisation (shared by both estimators) and of the EMA's sampling.
    pub seed: u64,
}

impl HimmelblauSetup {
    /// The paper's settings (EMA 0.8, lr 1e-3, 100 updates) with 1000 points and 16 codes on
    /// `[−6, 6]²` (not stated in the paper).
    pub fn paper(seed: u64) -> Self {
        Self {
            points: 1000,
            codes: 16,
            extent: 6.0,
            steps: 100,
            lr: 1e-3,
            decay: 0.8,
            seed,
        }
    }
}

/// State of a Himmelblau run after some step.
#[derive(Debug, Clone, PartialEq)]
pub struct HimmelblauFrame {
    /// Number of updates done.
    pub step: usize,
    /// Mean `‖e − q‖²` over points.
    pub distortion: f64,
    /// Mean objective `f(q)` at the quantized points.
    pub objective: f64,
    /// Codewords with at least one point.
    pub codes_used: usize,
    /// The points (N×2).
    pub points: Array2<f32>,
    /// The codewords (K×2).
    pub codebook: Array2<f32>,
}

fn frame(step: usize, e: &Array2<f32>, cb: ArrayView2<f32>) -> Result<HimmelblauFrame> {
    let idx = nearest_codes(e.view(), cb, Metric::Euclidean)?;
    let idx = idx.as_slice().expect("contiguous");
    let q = gather_codes(cb, idx)?;
    let objective = q
        .rows()
        .into_iter()
        .map(|r| f64::from(himmelblau_fn(r[0], r[1])))
        .sum::<f64>()
        / q.nrows().max(1) as f64;
    let codes_used = code_counts(idx, cb.nrows())?
        .iter()
        .filter(|&&c| c > 0)
        .count();
    Ok(HimmelblauFrame {
        step,
        distortion: quantization_error(e.view(), q.view())?,
        objective,
        codes_used,
        points: e.clone(),
        codebook: cb.to_owned(),
    })
}

/// The initial points and codewords of a setup (identical for every estimator).
pub fn himmelblau_init(setup: &HimmelblauSetup) -> (Array2<f32>, Array2<f32>) {
    let mut rng = StdRng::seed_from_u64(setup.seed);
    let u = Uniform::new(-setup.extent, setup.extent);
    let points = Array2::from_shape_simple_fn((setup.points, 2), || u.sample(&mut rng));
    let pick = sample(&mut rng, setup.points, setup.codes.min(setup.points)).into_vec();
    let codes = points.select(Axis(0), &pick);
    (points, codes)
}

/// Runs the Himmelblau simulation with `estimator`; returns the frames after the steps in
/// `record` (0 = initial state).
///
/// # Errors
/// Invalid setups (no points or codes, decay outside [0, 1)) give the library's typed errors.
pub fn himmelblau(
    setup: &HimmelblauSetup,
    estimator: Estimator,
    record: &[usize],
) -> Result<Vec<HimmelblauFrame>> {
    let (mut e, init_codes) = himmelblau_init(setup);
    let cfg = EmaConfig::new(setup.decay, 1e-5, 0.0, Metric::Euclidean)?;
    let mut cb = EmaCodebook::new(init_codes, cfg)?;
    let mut rng = StdRng::seed_from_u64(setup.seed ^ 0x5eed);
    let mut frames = Vec::new();
    if record.contains(&0) {
        frames.push(frame(0, &e, cb.codebook())?);
    }
    for step in 1..=setup.steps {
        let idx = nearest_codes(e.view(), cb.codebook(), Metric::Euclidean)?;
        let idx = idx.as_slice().expect("contiguous");
        let q = gather_codes(cb.codebook(), idx)?;
        let mut g = Array2::zeros(q.raw_dim());
        for (mut gr, qr) in g.rows_mut().into_iter().zip(q.rows()) {
            let [gx, gy] = himmelblau_grad(qr[0], qr[1]);
            gr[0] = gx;
            gr[1] = gy;
        }
        let ge = estimator.backward(e.view(), q.view(), g.view())?;
        cb.update(e.view(), idx, &mut rng)?;
        e.scaled_add(-setup.lr, &ge);
        if record.contains(&step) {
            frames.push(frame(step, &e, cb.codebook())?);
        }
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn himmelblau_gradient_matches_finite_differences() {
        for &(x, y) in &[(0.5f32, -1.0f32), (3.0, 2.0), (-2.0, 4.0)] {
            let [gx, gy] = himmelblau_grad(x, y);
            let h = 1e-3f32;
            let fx = (himmelblau_fn(x + h, y) - himmelblau_fn(x - h, y)) / (2.0 * h);
            let fy = (himmelblau_fn(x, y + h) - himmelblau_fn(x, y - h)) / (2.0 * h);
            assert!(
                (fx - gx).abs() < 0.05 * (1.0 + gx.abs())
                    && (fy - gy).abs() < 0.05 * (1.0 + gy.abs())
            );
        }
    }

    #[test]
    fn rotation_gives_tighter_clusters_than_ste_on_average_over_seeds() {
        let (mut ste, mut rot) = (0.0, 0.0);
        for seed in 0..8 {
            let setup = HimmelblauSetup::paper(seed);
            let s = himmelblau(&setup, Estimator::StraightThrough, &[100]).unwrap();
            let r = himmelblau(&setup, Estimator::Rotation, &[100]).unwrap();
            ste += s[0].distortion;
            rot += r[0].distortion;
            // Same initialisation for both.
            assert_eq!(
                himmelblau(&setup, Estimator::StraightThrough, &[0]).unwrap()[0].points,
                himmelblau(&setup, Estimator::Rotation, &[0]).unwrap()[0].points
            );
        }
        assert!(
            rot < ste,
            "mean distortion after 100 steps: rotation {rot} vs STE {ste}"
        );
    }
}
