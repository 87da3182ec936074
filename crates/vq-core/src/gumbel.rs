//! Gumbel-softmax quantization (Jang et al. 2017, Maddison et al. 2017; used as a VQ baseline by
//! Baevski et al. 2019, taming-transformers' and karpathy/deep-vector-quantization's
//! `GumbelQuantize`): the encoder predicts K logits per position instead of a vector, and the
//! quantized vector is a (relaxed) one-hot mixture of the codes.
//!
//! Per row, with logits `l ∈ ℝᴷ`, Gumbel noise `gₖ = −ln(−ln uₖ)`, `uₖ ~ U(0, 1)`, temperature `τ`:
//!
//! * soft one-hot: `y = softmax((l + g)/τ)`; its gradient `∂L/∂l = y ⊙ (γ − ⟨y, γ⟩)/τ` for
//!   `γ = ∂L/∂y` ([`gumbel_softmax_backward`]);
//! * [`GumbelForward::Hard`]: the forward value is `onehot(argmax y)`, the gradient that of `y`
//!   (straight-through, `y_hard − sg(y) + y`);
//! * quantized vector `z = y C` for the codebook `C ∈ ℝᴷˣᴰ`;
//! * the prior term (KL to the uniform distribution over codes, taming's form with its 1e-10):
//!   `KL = mean_rows Σₖ pₖ ln(pₖ K + 1e-10)`, `p = softmax(l)` (no noise, no temperature)
//!   ([`kl_to_uniform`], gradient [`kl_to_uniform_backward`]);
//! * in evaluation the code is `argmax l` (the distribution's mode; taming and karpathy sample
//!   with noise in evaluation too, which makes evaluation random).
//!
//! The temperature is annealed by [`TemperatureSchedule`].

use ndarray::{Array1, Array2, ArrayView2, Axis};
use rand::Rng;
use rand_distr::{Distribution, Gumbel};

use crate::error::{Result, VqError, check_same_shape};

/// Added inside the logarithm of the prior term, as taming's `GumbelQuantize` does.
pub const KL_EPS: f64 = 1e-10;

/// The forward value of the Gumbel quantizer in training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum GumbelForward {
    /// The relaxed one-hot `y` itself (karpathy/deep-vector-quantization's default,
    /// `straight_through=False`).
    #[default]
    Soft,
    /// `onehot(argmax y)` forward, `y`'s gradient backward (taming's `GumbelVQ`,
    /// `straight_through=True`).
    Hard,
}

/// The temperature τ as a function of the optimizer step `s` (0-based), for `s` past `steps`
/// the end value.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(rename_all = "snake_case", deny_unknown_fields)
)]
pub enum TemperatureSchedule {
    /// `τ = value`.
    Constant {
        /// The temperature.
        value: f64,
    },
    /// `τ(s) = start · (end/start)^(min(s, steps)/steps)`: a straight line in log τ (the paper's
    /// Gumbel VQ-VAE anneals 1 → 1/16 without saying the shape; this is ours).
    Geometric {
        /// τ at step 0.
        start: f64,
        /// τ from step `steps` on.
        end: f64,
        /// Length of the annealing.
        steps: usize,
    },
    /// `τ(s) = end + ½(start − end)(1 + cos(π·min(s, steps)/steps))` (taming's
    /// `LambdaWarmUpCosineScheduler` without warm-up, which its Gumbel VQGAN configs use).
    Cosine {
        /// τ at step 0.
        start: f64,
        /// τ from step `steps` on.
        end: f64,
        /// Length of the annealing.
        steps: usize,
    },
}

impl TemperatureSchedule {
    /// τ at optimizer step `step`.
    pub fn at(&self, step: usize) -> f64 {
        let frac = |steps: usize| match steps {
            0 => 1.0,
            n => step.min(n) as f64 / n as f64,
        };
        match *self {
            Self::Constant { value } => value,
            Self::Geometric { start, end, steps } => start * (end / start).powf(frac(steps)),
            Self::Cosine { start, end, steps } => {
                end + 0.5 * (start - end) * (1.0 + (std::f64::consts::PI * frac(steps)).cos())
            }
        }
    }

    /// Checks that every temperature is finite and > 0.
    ///
    /// # Errors
    /// [`VqError::InvalidParameter`] naming the bad value.
    pub fn validate(&self) -> Result<()> {
        let values: &[f64] = match self {
            Self::Constant { value } => &[*value],
            Self::Geometric { start, end, .. } | Self::Cosine { start, end, .. } => &[*start, *end],
        };
        match values.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
            Some(v) => Err(VqError::InvalidParameter {
                name: "temperature",
                value: v.to_string(),
                reason: "every temperature must be finite and > 0",
            }),
            None => Ok(()),
        }
    }
}

/// N×K standard Gumbel noise `−ln(−ln u)` from `rng`.
pub fn gumbel_noise(n: usize, k: usize, rng: &mut impl Rng) -> Array2<f32> {
    let g = Gumbel::new(0.0f64, 1.0).expect("the standard Gumbel distribution");
    Array2::from_shape_simple_fn((n, k), || g.sample(rng) as f32)
}

/// Row-wise `softmax((logits + noise)/τ)`, computed in f64 with the row maximum subtracted.
///
/// # Errors
/// Shapes that differ, a τ that is not finite and > 0, non-finite logits or noise (naming the row).
pub fn gumbel_softmax(
    logits: ArrayView2<f32>,
    noise: ArrayView2<f32>,
    tau: f64,
) -> Result<Array2<f32>> {
    check_same_shape(logits, noise, "Gumbel noise vs logits")?;
    TemperatureSchedule::Constant { value: tau }.validate()?;
    let mut y = Array2::zeros(logits.raw_dim());
    for (r, ((l, g), mut out)) in logits
        .outer_iter()
        .zip(noise.outer_iter())
        .zip(y.outer_iter_mut())
        .enumerate()
    {
        let z: Vec<f64> = l
            .iter()
            .zip(g)
            .map(|(&l, &g)| (f64::from(l) + f64::from(g)) / tau)
            .collect();
        if z.iter().any(|v| !v.is_finite()) {
            return Err(VqError::NonFinite {
                what: "logits + Gumbel noise",
                row: r,
            });
        }
        let z = softmax_row(z);
        for (o, v) in out.iter_mut().zip(&z) {
            *o = *v as f32;
        }
    }
    Ok(y)
}

/// The gradient of a loss w.r.t. the logits through [`gumbel_softmax`], given its output `y` and
/// `γ = ∂L/∂y`: `y ⊙ (γ − ⟨y, γ⟩)/τ` per row.
///
/// # Errors
/// Shapes that differ.
pub fn gumbel_softmax_backward(
    y: ArrayView2<f32>,
    grad_y: ArrayView2<f32>,
    tau: f64,
) -> Result<Array2<f32>> {
    check_same_shape(y, grad_y, "gradient vs soft one-hot")?;
    let mut out = Array2::zeros(y.raw_dim());
    for ((y, g), mut o) in y
        .outer_iter()
        .zip(grad_y.outer_iter())
        .zip(out.outer_iter_mut())
    {
        let dot: f64 = y
            .iter()
            .zip(g)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum();
        for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
            *o = (f64::from(y) * (f64::from(g) - dot) / tau) as f32;
        }
    }
    Ok(out)
}

/// `softmax(z)` of one row in f64, the maximum subtracted first.
fn softmax_row(mut z: Vec<f64>) -> Vec<f64> {
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    z.iter_mut().for_each(|v| *v = (*v - max).exp());
    let sum: f64 = z.iter().sum();
    z.iter_mut().for_each(|v| *v /= sum);
    z
}

/// Row-wise `softmax(logits)` in f64.
fn softmax_f64(logits: ArrayView2<f32>) -> Array2<f64> {
    let mut p = logits.mapv(f64::from);
    for mut row in p.outer_iter_mut() {
        let s = softmax_row(row.to_vec());
        row.iter_mut().zip(s).for_each(|(o, v)| *o = v);
    }
    p
}

/// The prior term `mean_rows Σₖ pₖ ln(pₖ K + 1e-10)`, `p = softmax(logits)`: 0 for uniform `p`,
/// up to ln K for a one-hot `p`.
///
/// # Errors
/// No rows or codes; non-finite logits (naming the row).
pub fn kl_to_uniform(logits: ArrayView2<f32>) -> Result<f64> {
    let (n, k) = logits.dim();
    check_logits(logits)?;
    let p = softmax_f64(logits);
    let per_row: Array1<f64> = p.map_axis(Axis(1), |row| {
        row.iter().map(|&p| p * (p * k as f64 + KL_EPS).ln()).sum()
    });
    Ok(per_row.sum() / n as f64)
}

/// The gradient of [`kl_to_uniform`] w.r.t. the logits: with `aₖ = ln(pₖK + ε) + pₖK/(pₖK + ε)`,
/// `∂KL/∂lⱼ = pⱼ(aⱼ − ⟨p, a⟩)/N`.
///
/// # Errors
/// As [`kl_to_uniform`].
pub fn kl_to_uniform_backward(logits: ArrayView2<f32>) -> Result<Array2<f32>> {
    let (n, k) = logits.dim();
    check_logits(logits)?;
    let p = softmax_f64(logits);
    let mut out = Array2::zeros((n, k));
    for (p, mut o) in p.outer_iter().zip(out.outer_iter_mut()) {
        let a: Vec<f64> = p
            .iter()
            .map(|&p| {
                let pk = p * k as f64;
                (pk + KL_EPS).ln() + pk / (pk + KL_EPS)
            })
            .collect();
        let mean: f64 = p.iter().zip(&a).map(|(p, a)| p * a).sum();
        for ((o, &p), a) in o.iter_mut().zip(p).zip(&a) {
            *o = (p * (a - mean) / n as f64) as f32;
        }
    }
    Ok(out)
}

fn check_logits(logits: ArrayView2<f32>) -> Result<()> {
    let (n, k) = logits.dim();
    if n == 0 || k == 0 {
        return Err(VqError::InvalidParameter {
            name: "logits",
            value: format!("{n}×{k}"),
            reason: "need at least one row and one code",
        });
    }
    match logits
        .outer_iter()
        .position(|r| r.iter().any(|v| !v.is_finite()))
    {
        Some(row) => Err(VqError::NonFinite {
            what: "logits",
            row,
        }),
        None => Ok(()),
    }
}

/// The hard one-hot of each row's largest entry (the first on ties), and those indices.
pub fn hard_one_hot(y: ArrayView2<f32>) -> (Array2<f32>, Vec<u32>) {
    let mut out = Array2::zeros(y.raw_dim());
    let mut idx = Vec::with_capacity(y.nrows());
    for (row, mut o) in y.outer_iter().zip(out.outer_iter_mut()) {
        let (best, _) =
            row.iter().enumerate().fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            );
        o[best] = 1.0;
        idx.push(best as u32);
    }
    (out, idx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn logits(n: usize, k: usize, seed: u64) -> Array2<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        Array2::from_shape_simple_fn((n, k), || rng.gen_range(-3.0f32..3.0))
    }

    #[test]
    fn the_soft_one_hot_is_a_distribution_that_sharpens_as_tau_falls() {
        let l = logits(5, 7, 0);
        let g = gumbel_noise(5, 7, &mut StdRng::seed_from_u64(1));
        let warm = gumbel_softmax(l.view(), g.view(), 1.0).unwrap();
        let cold = gumbel_softmax(l.view(), g.view(), 1.0 / 16.0).unwrap();
        for (w, c) in warm.outer_iter().zip(cold.outer_iter()) {
            assert!((w.sum() - 1.0).abs() < 1e-6 && (c.sum() - 1.0).abs() < 1e-6);
            assert!(c.iter().copied().fold(0.0, f32::max) > w.iter().copied().fold(0.0, f32::max));
        }
        // The argmax does not depend on τ: it is argmax(l + g).
        let (_, iw) = hard_one_hot(warm.view());
        let (_, ic) = hard_one_hot(cold.view());
        assert_eq!(iw, ic);
    }

    #[test]
    fn gumbel_noise_has_the_standard_moments() {
        let g = gumbel_noise(200, 500, &mut StdRng::seed_from_u64(3));
        let n = g.len() as f64;
        let mean = g.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = g
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        // Euler–Mascheroni γ and π²/6; standard errors ~0.003 and ~0.01 here.
        assert!((mean - 0.577_215_664_9).abs() < 0.015, "{mean}");
        assert!(
            (var - std::f64::consts::PI.powi(2) / 6.0).abs() < 0.05,
            "{var}"
        );
    }

    #[test]
    fn the_backward_matches_finite_differences() {
        let (n, k, tau) = (3, 6, 0.7);
        let l = logits(n, k, 4);
        let g = gumbel_noise(n, k, &mut StdRng::seed_from_u64(5));
        let w = logits(n, k, 6);
        // L = Σ w ⊙ y.
        let loss = |l: &Array2<f32>| -> f64 {
            let y = gumbel_softmax(l.view(), g.view(), tau).unwrap();
            y.iter()
                .zip(&w)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum()
        };
        let y = gumbel_softmax(l.view(), g.view(), tau).unwrap();
        let analytic = gumbel_softmax_backward(y.view(), w.view(), tau).unwrap();
        let kl_analytic = kl_to_uniform_backward(l.view()).unwrap();
        let h = 1e-3f32;
        for i in 0..n {
            for j in 0..k {
                let (mut up, mut down) = (l.clone(), l.clone());
                up[[i, j]] += h;
                down[[i, j]] -= h;
                let fd = (loss(&up) - loss(&down)) / (2.0 * f64::from(h));
                assert!(
                    (fd - f64::from(analytic[[i, j]])).abs() < 2e-3,
                    "{i},{j}: {fd}"
                );
                let kl = |l: &Array2<f32>| kl_to_uniform(l.view()).unwrap();
                let fd = (kl(&up) - kl(&down)) / (2.0 * f64::from(h));
                assert!(
                    (fd - f64::from(kl_analytic[[i, j]])).abs() < 2e-3,
                    "{i},{j}: {fd}"
                );
            }
        }
    }

    #[test]
    fn the_prior_term_is_zero_at_uniform_and_ln_k_at_one_hot() {
        let k = 8;
        // ln(1 + 1e-10) at uniform.
        assert!(kl_to_uniform(Array2::zeros((2, k)).view()).unwrap().abs() < 2e-10);
        let mut sharp = Array2::from_elem((1, k), -1e4f32);
        sharp[[0, 3]] = 0.0;
        let kl = kl_to_uniform(sharp.view()).unwrap();
        assert!((kl - (k as f64).ln()).abs() < 1e-8, "{kl}");
        assert!(matches!(
            kl_to_uniform(array![[0.0f32, f32::NAN]].view()),
            Err(VqError::NonFinite { row: 0, .. })
        ));
    }

    #[test]
    fn schedules_start_and_end_where_they_say() {
        for s in [
            TemperatureSchedule::Geometric {
                start: 1.0,
                end: 1.0 / 16.0,
                steps: 100,
            },
            TemperatureSchedule::Cosine {
                start: 1.0,
                end: 1.0 / 16.0,
                steps: 100,
            },
        ] {
            assert_eq!(s.at(0), 1.0);
            assert!((s.at(100) - 1.0 / 16.0).abs() < 1e-15);
            assert_eq!(s.at(100), s.at(1000));
            assert!((1..=100).all(|i| s.at(i) < s.at(i - 1)));
        }
        let geo = TemperatureSchedule::Geometric {
            start: 1.0,
            end: 1.0 / 16.0,
            steps: 100,
        };
        assert!((geo.at(50) - 0.25).abs() < 1e-12);
        assert!(
            TemperatureSchedule::Constant { value: 0.0 }
                .validate()
                .is_err()
        );
        assert!(
            gumbel_softmax(logits(1, 2, 0).view(), Array2::zeros((1, 2)).view(), -1.0).is_err()
        );
    }
}
