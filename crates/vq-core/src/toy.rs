//! The paper's two-dimensional experiments, as deterministic simulations on top of the library.
//!
//! [`himmelblau`]: App. A.2 (Figs. 7–8). Points are trainable "encoder outputs"; the objective
//! is Himmelblau's function `f(x, y) = (x² + y − 11)² + (x + y² − 7)²` evaluated at the
//! *quantized* point; the codebook follows the points by EMA (decay 0.8); the points take plain
//! gradient steps (learning rate 1e-3, 100 updates). STE and the rotation trick start from the
//! same initialisation.
//!
//! [`voronoi_push_pull`]: §4.3 / Figs. 4, 5, 10. Points of one Voronoi cell take 25 steps along
//! the estimator's image of one constant gradient; the codeword is fixed. STE translates the
//! cloud; the rotation trick pushes it apart or pulls it together depending on the angle φ
//! between the codeword and the update; translated far from the origin it behaves like STE.
//!
//! The paper does not state the number of points, codes or their initialisation; the choices
//! here are documented on [`HimmelblauSetup::paper`] and [`VoronoiSetup::paper`].

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

/// Settings of the Voronoi push/pull simulation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VoronoiSetup {
    /// The (fixed) codeword.
    pub codeword: [f32; 2],
    /// Points on an arc through the codeword at its radius, at angles evenly spread over
    /// `[−max_angle, max_angle]` from it (the paper's hand-placed crescent; `λ = 1` for all).
    pub points: usize,
    /// Largest angle θ between a point and the codeword (radians).
    pub max_angle: f64,
    /// Norm of the constant update.
    pub grad_norm: f32,
    /// Learning rate.
    pub lr: f32,
    /// Updates (the paper: 25).
    pub steps: usize,
    /// Added to every coordinate of the codeword and the points (Fig. 10: +10).
    pub offset: f32,
}

impl VoronoiSetup {
    /// A codeword at (1, 1), 41 points up to 0.6 rad away, ‖∇‖ = 1, lr 0.01, 25 steps.
    pub fn paper() -> Self {
        Self {
            codeword: [1.0, 1.0],
            points: 41,
            max_angle: 0.6,
            grad_norm: 1.0,
            lr: 0.01,
            steps: 25,
            offset: 0.0,
        }
    }
}

/// Outcome of one push/pull run.
#[derive(Debug, Clone, PartialEq)]
pub struct VoronoiOutcome {
    /// Mean pairwise distance of the points after the run divided by before (> 1: pushed
    /// apart, < 1: pulled together, 1: translated).
    pub spread_ratio: f64,
    /// `(θ, change of ‖e − q‖)` per point: the point's initial angle to the codeword and how
    /// much its distance to the (fixed) codeword changed.
    pub by_angle: Vec<(f64, f64)>,
    /// Initial points.
    pub before: Array2<f32>,
    /// Final points.
    pub after: Array2<f32>,
}

fn mean_pairwise(p: &Array2<f32>) -> f64 {
    let n = p.nrows();
    let mut sum = 0.0;
    for i in 0..n {
        for j in i + 1..n {
            sum += f64::from((p[[i, 0]] - p[[j, 0]]).hypot(p[[i, 1]] - p[[j, 1]]));
        }
    }
    sum / (n * n.saturating_sub(1) / 2).max(1) as f64
}

/// Moves the points of one Voronoi cell by the estimator's gradient of a constant `∇_q L`,
/// `setup.steps` descent steps `e ← e − lr·∂L/∂e` with the rotation and scale recomputed every
/// step; the codeword stays fixed.
///
/// `phi` is the angle (radians) between the codeword `q` and the *descent direction*
/// `−∇_q L`, i.e. the arrow of the update drawn in the paper's figures. To first order a pair
/// of points at angles θ₁, θ₂ changes its squared distance by `8 r lr ‖∇‖ sin²((θ₁−θ₂)/2) cos φ`
/// per step: pushed apart for |φ| < π/2, pulled together for π/2 < φ < 3π/2. STE moves every
/// point by the same vector (no change).
///
/// # Errors
/// [`crate::VqError`] from the estimator (not expected for finite setups).
pub fn voronoi_push_pull(
    setup: &VoronoiSetup,
    estimator: Estimator,
    phi: f64,
) -> Result<VoronoiOutcome> {
    let q0 = [f64::from(setup.codeword[0]), f64::from(setup.codeword[1])];
    let radius = q0[0].hypot(q0[1]);
    let base = q0[1].atan2(q0[0]);
    let off = setup.offset;
    let n = setup.points.max(1);
    let angles: Vec<f64> = (0..n)
        .map(|i| {
            if n == 1 {
                0.0
            } else {
                -setup.max_angle + 2.0 * setup.max_angle * i as f64 / (n - 1) as f64
            }
        })
        .collect();
    let mut e = Array2::from_shape_fn((n, 2), |(i, j)| {
        let a = base + angles[i];
        (if j == 0 {
            radius * a.cos()
        } else {
            radius * a.sin()
        }) as f32
            + off
    });
    let before = e.clone();
    let qp = [q0[0] as f32 + off, q0[1] as f32 + off];
    let q = Array2::from_shape_fn((n, 2), |(_, j)| qp[j]);
    // ∇_q L = −‖∇‖ (cos, sin)(base + φ): the descent direction is at angle φ to q.
    let g = Array2::from_shape_fn((n, 2), |(_, j)| {
        let a = base + phi;
        -setup.grad_norm * (if j == 0 { a.cos() } else { a.sin() }) as f32
    });
    for _ in 0..setup.steps {
        let ge = estimator.backward(e.view(), q.view(), g.view())?;
        e.scaled_add(-setup.lr, &ge);
    }
    let dist = |r: ndarray::ArrayView1<f32>| f64::from((r[0] - qp[0]).hypot(r[1] - qp[1]));
    let by_angle = angles
        .iter()
        .zip(before.rows())
        .zip(e.rows())
        .map(|((&t, b), a)| (t, dist(a) - dist(b)))
        .collect();
    Ok(VoronoiOutcome {
        spread_ratio: mean_pairwise(&e) / mean_pairwise(&before),
        by_angle,
        before,
        after: e,
    })
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
    fn ste_translates_and_rotation_pushes_or_pulls_by_phi() {
        use std::f64::consts::PI;
        let setup = VoronoiSetup::paper();
        for phi in [0.0, PI / 4.0, -PI / 3.0, 3.0 * PI / 4.0, PI, 5.0 * PI / 4.0] {
            let ste = voronoi_push_pull(&setup, Estimator::StraightThrough, phi).unwrap();
            assert!(
                (ste.spread_ratio - 1.0).abs() < 1e-5,
                "STE must only translate: {}",
                ste.spread_ratio
            );
            let rot = voronoi_push_pull(&setup, Estimator::Rotation, phi).unwrap();
            if phi.cos() > 0.0 {
                assert!(
                    rot.spread_ratio > 1.0,
                    "φ = {phi}: expected push, ratio {}",
                    rot.spread_ratio
                );
                // Points at a large angle to the codeword end farther from it than with STE.
                let (r_far, s_far) = (rot.by_angle[0].1, ste.by_angle[0].1);
                assert!(r_far > s_far, "φ = {phi}: rotation {r_far} vs STE {s_far}");
            } else {
                assert!(
                    rot.spread_ratio < 1.0,
                    "φ = {phi}: expected pull, ratio {}",
                    rot.spread_ratio
                );
            }
        }
    }

    #[test]
    fn translation_away_from_the_origin_shrinks_the_effect() {
        use std::f64::consts::PI;
        let near = VoronoiSetup::paper();
        let far = VoronoiSetup {
            offset: 10.0,
            ..near
        };
        for phi in [0.0, PI] {
            let a = voronoi_push_pull(&near, Estimator::Rotation, phi)
                .unwrap()
                .spread_ratio;
            let b = voronoi_push_pull(&far, Estimator::Rotation, phi)
                .unwrap()
                .spread_ratio;
            assert!(
                (b - 1.0).abs() < (a - 1.0).abs() / 2.0,
                "φ = {phi}: near {a}, far {b}"
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
