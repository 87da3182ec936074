//! The statistics of `compare --seeds`: mean ± sample standard deviation over seeds, and the
//! rule that calls the difference between two methods clear.
//!
//! **The rule.** Two methods are compared on the same seeds (same initial weights, codebook and
//! data order per seed; only the method differs), so the per-seed differences `d_s = b_s − a_s`
//! are paired. A difference is **clear** when
//! 1. there are at least [`MIN_SEEDS`] seeds,
//! 2. the two-sided paired t-test on the `d_s` gives `p <` [`ALPHA`]
//!    (`t = mean(d) / (sd(d)/√n)`, Student's t with n − 1 degrees of freedom), and
//! 3. every `d_s` has the same sign (no seed disagrees).
//!
//! Otherwise it is not clear, whatever the means say.

use statrs::distribution::{ContinuousCDF, StudentsT};

/// The significance level of the paired test.
pub const ALPHA: f64 = 0.05;

/// The fewest seeds a clear difference needs.
pub const MIN_SEEDS: usize = 3;

/// Mean and sample standard deviation (n − 1 in the denominator; 0 for one value).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Number of values.
    pub n: usize,
    /// Their mean (NaN for none).
    pub mean: f64,
    /// Their sample standard deviation.
    pub sd: f64,
}

/// The [`Summary`] of `values`.
///
/// ```
/// let s = vq_train::stats::summary(&[1.0, 2.0, 3.0]);
/// assert_eq!((s.n, s.mean, s.sd), (3, 2.0, 1.0));
/// ```
pub fn summary(values: &[f64]) -> Summary {
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    let sd = match n {
        0 | 1 => 0.0,
        _ => (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt(),
    };
    Summary { n, mean, sd }
}

/// What the rule says about `b − a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// `b` is clearly higher.
    ClearlyHigher,
    /// `b` is clearly lower.
    ClearlyLower,
    /// Not clear at this number of seeds.
    NotClear,
    /// Fewer than [`MIN_SEEDS`] seeds.
    TooFewSeeds,
}

impl Verdict {
    /// A short word for tables.
    pub fn word(self) -> &'static str {
        match self {
            Self::ClearlyHigher => "clearly higher",
            Self::ClearlyLower => "clearly lower",
            Self::NotClear => "not clear",
            Self::TooFewSeeds => "too few seeds",
        }
    }
}

/// The paired comparison of `b` against `a` over the same seeds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Paired {
    /// Seeds compared.
    pub n: usize,
    /// Mean of the differences `b − a`.
    pub mean_diff: f64,
    /// Sample standard deviation of the differences.
    pub sd_diff: f64,
    /// Two-sided p-value of the paired t-test (`None` below 2 seeds or when every difference
    /// is 0).
    pub p: Option<f64>,
    /// Whether every seed's difference has the mean's sign (and none is 0).
    pub same_sign: bool,
    /// The rule's verdict (module docs).
    pub verdict: Verdict,
}

/// Compares `b` with `a`, seed by seed (the slices are in the same seed order).
///
/// ```
/// use vq_train::stats::{paired, Verdict};
/// let a = [0.30, 0.31, 0.29, 0.30, 0.32];
/// let b = [0.25, 0.27, 0.24, 0.26, 0.26];
/// assert_eq!(paired(&a, &b).verdict, Verdict::ClearlyLower);
/// let mixed = [0.28, 0.33, 0.27, 0.31, 0.32];
/// assert_eq!(paired(&a, &mixed).verdict, Verdict::NotClear);
/// ```
///
/// # Panics
/// If the slices differ in length (a caller's bug: the seeds are paired).
pub fn paired(a: &[f64], b: &[f64]) -> Paired {
    assert_eq!(a.len(), b.len(), "paired samples");
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    let Summary { n, mean, sd } = summary(&d);
    let same_sign = n > 0 && d.iter().all(|&v| v != 0.0 && v.signum() == mean.signum());
    let p = match (n, sd > 0.0, mean != 0.0) {
        (0 | 1, _, _) | (_, false, false) => None,
        // Every seed moved by the same nonzero amount: no spread left to doubt it.
        (_, false, true) => Some(0.0),
        _ => {
            let t = mean / (sd / (n as f64).sqrt());
            let dist = StudentsT::new(0.0, 1.0, (n - 1) as f64).expect("n > 1 degrees of freedom");
            Some(2.0 * (1.0 - dist.cdf(t.abs())))
        }
    };
    let verdict = match p {
        _ if n < MIN_SEEDS => Verdict::TooFewSeeds,
        Some(p) if p < ALPHA && same_sign => match mean > 0.0 {
            true => Verdict::ClearlyHigher,
            false => Verdict::ClearlyLower,
        },
        _ => Verdict::NotClear,
    };
    Paired {
        n,
        mean_diff: mean,
        sd_diff: sd,
        p,
        same_sign,
        verdict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_t_test_matches_published_values() {
        // t = 2.776 with 4 degrees of freedom is the two-sided 5% point.
        let a = [0.0; 5];
        // Differences with mean m and sd s give t = m / (s/√5).
        let d = [1.0, 2.0, 3.0, 4.0, 5.0];
        let p = paired(&a, &d);
        let t = 3.0 / (summary(&d).sd / 5f64.sqrt());
        assert!((t - 4.2426).abs() < 1e-3);
        // The closed form for 4 degrees of freedom, p = I_{4/(4+t²)}(2, ½), gives 0.0132356.
        assert!((p.p.unwrap() - 0.013_235_6).abs() < 1e-6, "{p:?}");
        assert_eq!(p.verdict, Verdict::ClearlyHigher);
        // At the two-sided 5% point of 4 degrees of freedom (t = 2.7764) p is 0.05.
        let d = [1.0, -1.0, 1.0, -1.0, 0.0];
        let sd = summary(&d).sd;
        let shift = 2.776_445 * sd / 5f64.sqrt();
        let b: Vec<f64> = d.iter().map(|v| v + shift).collect();
        assert!((paired(&[0.0; 5], &b).p.unwrap() - 0.05).abs() < 1e-5);
    }

    /// Both samples vary, so the paired standard error (of the differences) and the unpaired one
    /// (of each sample) differ: scipy 1.17's `ttest_rel(b, a)` gives p = 0.0551252 (t = 2.4905),
    /// `ttest_ind` 0.2429.
    #[test]
    fn the_t_test_is_paired() {
        let a = [0.71, 0.52, 0.93, 0.40, 0.66, 0.85];
        let b = [0.80, 0.49, 1.20, 0.71, 0.70, 1.31];
        let p = paired(&a, &b);
        assert!((p.p.unwrap() - 0.055_125_17).abs() < 1e-6, "{p:?}");
        assert_eq!(p.verdict, Verdict::NotClear);
    }

    #[test]
    fn one_disagreeing_seed_or_too_few_seeds_is_not_clear() {
        let a = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let b = [2.0, 2.1, 1.9, 2.0, 2.2, 2.0, 2.1, 0.99];
        let p = paired(&a, &b);
        assert!(p.p.unwrap() < ALPHA && !p.same_sign);
        assert_eq!(p.verdict, Verdict::NotClear);
        assert_eq!(
            paired(&[1.0, 1.0], &[2.0, 2.0]).verdict,
            Verdict::TooFewSeeds
        );
        assert_eq!(paired(&[1.0; 3], &[1.0; 3]).verdict, Verdict::NotClear);
        assert_eq!(paired(&[1.0; 3], &[1.5; 3]).verdict, Verdict::ClearlyHigher);
        let s = summary(&[]);
        assert_eq!(s.n, 0);
        assert!(s.mean.is_nan());
    }
}
