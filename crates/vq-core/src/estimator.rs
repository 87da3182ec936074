//! Gradient estimators: how the gradient of a loss at the quantized vector `q` reaches the
//! encoder output `e` through the non-differentiable nearest-code lookup.
//!
//! Notation per row: `ê = e/‖e‖`, `q̂ = q/‖q‖`, `λ = ‖q‖/‖e‖`, `H_a = I − 2aaᵀ` (the Householder
//! reflection across `a⊥`), `g = ∂L/∂q̃`.
//!
//! | estimator | forward | `∂L/∂e` |
//! |---|---|---|
//! | [`StraightThrough`](Estimator::StraightThrough) | `q̃ = e + sg(q − e)` | `g` |
//! | [`Rotation`](Estimator::Rotation) | `q̃ = sg(λR) e` | `λ Rᵀ g` |
//! | [`RotationNoRescale`](Estimator::RotationNoRescale) (A.9) | `q̃ = R e + sg(q − R e)` | `Rᵀ g` |
//! | [`Reflection`](Estimator::Reflection) (A.8) | `q̃ = sg(λR̃) e` | `λ R̃ g` |
//!
//! with the rotation `R = H_q̂ H_w = I − 2wwᵀ + 2q̂êᵀ`, `w = (ê + q̂)/‖ê + q̂‖` (the paper's
//! efficient form: two Householder reflections, never a D×D matrix), and the reflection
//! `R̃ = H_r`, `r = (ê − q̂)/‖ê − q̂‖`. `R` maps `ê` to `q̂`, so `λRe = q`: every estimator's forward
//! value is `q`, and [`Estimator::forward`] returns `q` itself (bit-exact, as the decoder sees it in
//! evaluation). `R`, `λ`, `w`, `q̂` are constants of the backward pass: no gradient reaches the
//! codebook through this path.
//!
//! All per-row geometry is computed in f64 and `R` is always applied in the product form
//! `H_w H_q̂ g`, which is orthogonal for any unit `w` — so `λRᵀ` stays `λ×` orthogonal even where
//! `w` is ill-conditioned.
//!
//! # Degenerate rows (documented behaviour, never NaN or ∞)
//! * `‖e‖ < 1e-6` or `‖q‖ < 1e-6` (a direction is undefined): `R = I` and
//!   `λ = ‖q‖ / max(‖e‖, 1e-6)`. With `‖e‖ → 0` the gradient grows like `1/‖e‖` but stays finite.
//! * `e` and `q` antipodal (`‖ê + q̂‖² < 1e-8`, the rotation plane is undefined): with `D ≥ 2`,
//!   `w` is replaced by a unit vector `p ⊥ ê` (built from the coordinate axis least aligned with
//!   `ê`), giving the proper rotation by π `H_q̂ H_p` (det +1) that maps `ê` to `−ê ≈ q̂`. With
//!   `D = 1` no rotation maps `+1` to `−1`; `R = H_q̂ = −1` (a reflection) is used.
//! * Reflection estimator with `ê ≈ q̂` (`‖ê − q̂‖² < 1e-8`, `r` undefined): `R̃ = I`. This is a
//!   jump (up to `2λ‖g‖`, along `r`), and no choice avoids one: as `ê → q̂` the direction of `r`
//!   follows the direction of approach, so `H_r` has no limit — every `H_r` is a reflection
//!   (det −1) at operator distance 2 from every other one with an orthogonal `r`. Any map that
//!   sends `ê` to `q̂` is exact at `ê = q̂`; the identity (straight-through's gradient) is the one
//!   that changes `g` least, and is taken only where `ê` and `q̂` agree to 1e-4.
//!
//! # Accuracy
//! For finite rows of any magnitude the backward is within ~2e-7 of `λ‖g‖` of the exact map
//! (tested against an f64 evaluation of the formulas above over magnitudes 1e-30 … 1e37 and
//! `‖ê ± q̂‖` down to the thresholds). Well-scaled rows away from the thresholds (norms of `e`, `q`
//! within [2e-6, 2^30], of `g` within 2^±50, `‖ê ± q̂‖² ≥ 0.5`) take an f32 fast path; the others
//! accumulate their dots and form the result in f64, where f32 would overflow, underflow or
//! lose the digits that cancel (`ce·e` and `cq·q` grow like `1/‖ê ± q̂‖`).

use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut2};
use rayon::prelude::*;

use crate::error::{Result, VqError, check_same_shape};

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// Norms below this are treated as zero (as in the reference implementations).
pub const NORM_EPS: f64 = 1e-6;
/// `‖ê ± q̂‖²` below this makes the Householder vector undefined (the fallbacks above apply).
pub const DIRECTION_EPS: f64 = 1e-8;

/// How the gradient passes from `q̃` back to `e`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum Estimator {
    /// Straight-through: `∂L/∂e = ∂L/∂q`.
    #[cfg_attr(feature = "serde", serde(rename = "ste", alias = "straight-through"))]
    StraightThrough,
    /// The rotation trick: `∂L/∂e = λ Rᵀ ∂L/∂q` (paper §4).
    #[default]
    Rotation,
    /// The rotation without the rescale, `q̃ = Re + sg(q − Re)`: `∂L/∂e = Rᵀ ∂L/∂q` (paper A.9).
    RotationNoRescale,
    /// A single Householder reflection mapping `ê` to `q̂`: `∂L/∂e = λ R̃ ∂L/∂q` (paper A.8).
    Reflection,
}

impl Estimator {
    /// All estimators, for iteration in tests and comparisons.
    pub const ALL: [Estimator; 4] = [
        Estimator::StraightThrough,
        Estimator::Rotation,
        Estimator::RotationNoRescale,
        Estimator::Reflection,
    ];

    /// Short stable name (`ste`, `rotation`, `rotation-no-rescale`, `reflection`).
    pub fn name(self) -> &'static str {
        match self {
            Estimator::StraightThrough => "ste",
            Estimator::Rotation => "rotation",
            Estimator::RotationNoRescale => "rotation-no-rescale",
            Estimator::Reflection => "reflection",
        }
    }

    /// Name for figures and tables: "STE", "rotation trick", "rotation trick, no rescaling",
    /// "Householder reflection".
    pub fn label(self) -> &'static str {
        match self {
            Estimator::StraightThrough => "STE",
            Estimator::Rotation => "rotation trick",
            Estimator::RotationNoRescale => "rotation trick, no rescaling",
            Estimator::Reflection => "Householder reflection",
        }
    }

    /// Parses [`name`](Self::name) (also accepts `straight-through`).
    ///
    /// # Errors
    /// [`VqError::InvalidParameter`] for an unknown name.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "ste" | "straight-through" => Ok(Estimator::StraightThrough),
            "rotation" => Ok(Estimator::Rotation),
            "rotation-no-rescale" => Ok(Estimator::RotationNoRescale),
            "reflection" => Ok(Estimator::Reflection),
            other => Err(VqError::InvalidParameter {
                name: "estimator",
                value: other.to_owned(),
                reason: "expected ste, rotation, rotation-no-rescale or reflection",
            }),
        }
    }

    /// Forward value `q̃` of the layer for encoder outputs `e` and their codes `q` (both N×D).
    /// Every estimator's value is `q` (see the module docs), returned bit-exact.
    ///
    /// # Errors
    /// [`VqError::ShapeMismatch`] if the shapes differ.
    pub fn forward(self, e: ArrayView2<f32>, q: ArrayView2<f32>) -> Result<Array2<f32>> {
        check_same_shape(e, q, "codes vs inputs")?;
        Ok(q.to_owned())
    }

    /// `∂L/∂e` from `g = ∂L/∂q̃` (all N×D).
    ///
    /// ```
    /// use ndarray::array;
    /// use vq_core::Estimator;
    ///
    /// let e = array![[1.0f32, 0.0]];
    /// let q = array![[0.0f32, 2.0]]; // 90° away, twice as long: λ = 2
    /// let g = array![[0.0f32, 1.0]]; // gradient along q ...
    /// let ge = Estimator::Rotation.backward(e.view(), q.view(), g.view()).unwrap();
    /// // ... reaches e along e, scaled by λ.
    /// assert!((ge[[0, 0]] - 2.0).abs() < 1e-6 && ge[[0, 1]].abs() < 1e-6);
    /// ```
    ///
    /// # Errors
    /// As [`backward_with_commitment_into`](Self::backward_with_commitment_into).
    pub fn backward(
        self,
        e: ArrayView2<f32>,
        q: ArrayView2<f32>,
        g: ArrayView2<f32>,
    ) -> Result<Array2<f32>> {
        let mut out = Array2::zeros(e.raw_dim());
        self.backward_into(e, q, g, out.view_mut())?;
        Ok(out)
    }

    /// As [`backward`](Self::backward), writing into `out` (N×D). Parallel over rows.
    ///
    /// # Errors
    /// As [`backward_with_commitment_into`](Self::backward_with_commitment_into).
    pub fn backward_into(
        self,
        e: ArrayView2<f32>,
        q: ArrayView2<f32>,
        g: ArrayView2<f32>,
        out: ArrayViewMut2<f32>,
    ) -> Result<()> {
        self.backward_with_commitment_into(e, q, g, 0.0, out)
    }

    /// `out = ∂L/∂e + a·(e − q)`: the estimator's backward fused with a commitment-loss gradient
    /// of scale `a` ([`VqLoss::grad_e_scale`](crate::VqLoss::grad_e_scale)), in one pass over the
    /// rows. With `a = 0` this is [`backward_into`](Self::backward_into).
    ///
    /// # Errors
    /// [`VqError::ShapeMismatch`] if the shapes differ; [`VqError::NonFinite`] naming the first
    /// row whose inputs hold NaN or ∞; [`VqError::Overflow`] naming the first row whose exact
    /// result (finite inputs) is beyond f32's range (`out` then holds ∞ there).
    pub fn backward_with_commitment_into(
        self,
        e: ArrayView2<f32>,
        q: ArrayView2<f32>,
        g: ArrayView2<f32>,
        commitment: f32,
        mut out: ArrayViewMut2<f32>,
    ) -> Result<()> {
        check_same_shape(e, q, "codes vs inputs")?;
        check_same_shape(e, g, "gradient vs inputs")?;
        check_same_shape(e, out.view(), "output vs inputs")?;
        let d = e.ncols().max(1);
        let (e, q, g) = (
            e.as_standard_layout(),
            q.as_standard_layout(),
            g.as_standard_layout(),
        );
        let (es, qs, gs) = (
            e.as_slice().expect("standard layout"),
            q.as_slice().expect("standard layout"),
            g.as_slice().expect("standard layout"),
        );
        let block = ROWS_PER_TASK * d;
        // Each block returns its first row whose result is not finite (checked while the row is
        // in cache), so that such a row becomes a typed error rather than an ∞ in the gradient.
        let run = |(b, (o, ((e, q), g))): BlockTask<'_>| {
            let mut buf = Vec::new();
            let mut bad = None;
            for (i, (((o, e), q), g)) in o
                .chunks_mut(d)
                .zip(e.chunks(d))
                .zip(q.chunks(d))
                .zip(g.chunks(d))
                .enumerate()
            {
                RowMap::backward_row(self, e, q, g, commitment, o, &mut buf);
                if bad.is_none() && !all_finite(o) {
                    bad = Some(b * ROWS_PER_TASK + i);
                }
            }
            bad
        };
        let blocks = || {
            es.par_chunks(block)
                .zip(qs.par_chunks(block))
                .zip(gs.par_chunks(block))
        };
        let bad = match out.as_slice_mut() {
            Some(o) => o
                .par_chunks_mut(block)
                .zip(blocks())
                .enumerate()
                .filter_map(run)
                .min(),
            None => {
                let mut tmp = Array2::from_elem(out.raw_dim(), 0.0);
                let bad = tmp
                    .as_slice_mut()
                    .expect("fresh")
                    .par_chunks_mut(block)
                    .zip(blocks())
                    .enumerate()
                    .filter_map(run)
                    .min();
                out.assign(&tmp);
                bad
            }
        };
        match bad {
            None => Ok(()),
            Some(row) => {
                let finite = |s: &[f32]| s[row * d..(row + 1) * d].iter().all(|v| v.is_finite());
                Err(
                    match [(es, "inputs"), (qs, "codes"), (gs, "gradient")]
                        .into_iter()
                        .find(|(s, _)| !finite(s))
                    {
                        Some((_, what)) => VqError::NonFinite { what, row },
                        None => VqError::Overflow {
                            what: "estimator gradient",
                            row,
                        },
                    },
                )
            }
        }
    }
}

/// One parallel task of the backward: block number, output rows, and the rows of e, q, g.
type BlockTask<'a> = (usize, (&'a mut [f32], ((&'a [f32], &'a [f32]), &'a [f32])));

/// Whether no value is NaN or ±∞ (exponent bits all set), as a branch-free integer reduction
/// that vectorises (an early-exit `all` does not).
fn all_finite(v: &[f32]) -> bool {
    v.iter().fold(0u32, |acc, x| {
        acc | u32::from(x.to_bits() & 0x7f80_0000 == 0x7f80_0000)
    }) == 0
}

/// Smallest `‖ê ± q̂‖²` of the f32 fast path of the backward (rows of random directions in
/// high dimension have ≈ 2 for the rotation).
const FAST_NORM2: f64 = 0.5;

/// Lanes of the f64 row accumulations (one AVX-512 register, two AVX2 ones).
const LANES: usize = 8;

/// `[e·e, q·q, e·q, e·g, q·g]` in f64 (8 independent lanes, then a scalar tail). Products of
/// f32 values are exact in f64 and their sums cannot overflow (|x|² ≤ 1.2e77), so the dots are
/// accurate for rows of any magnitude: the coefficients of the map, which cancel when ê ≈ ±q̂,
/// depend on them to ~1e-16 rather than f32's 6e-8.
fn dots5(e: &[f32], q: &[f32], g: &[f32]) -> [f64; 5] {
    let mut acc = [[0f64; LANES]; 5];
    let n = e.len() / LANES * LANES;
    for ((ec, qc), gc) in e[..n]
        .chunks_exact(LANES)
        .zip(q[..n].chunks_exact(LANES))
        .zip(g[..n].chunks_exact(LANES))
    {
        for l in 0..LANES {
            let (a, b, c) = (f64::from(ec[l]), f64::from(qc[l]), f64::from(gc[l]));
            acc[0][l] += a * a;
            acc[1][l] += b * b;
            acc[2][l] += a * b;
            acc[3][l] += a * c;
            acc[4][l] += b * c;
        }
    }
    let mut out = acc.map(|lanes| lanes.iter().sum::<f64>());
    add_products(&mut out, &e[n..], &q[n..], &g[n..]);
    out
}

/// Adds `[e·e, q·q, e·q, e·g, q·g, g·g]` (as many as `out` holds) of short slices, in f64.
fn add_products(out: &mut [f64], e: &[f32], q: &[f32], g: &[f32]) {
    for ((&a, &b), &c) in e.iter().zip(q).zip(g) {
        let (a, b, c) = (f64::from(a), f64::from(b), f64::from(c));
        for (o, v) in out
            .iter_mut()
            .zip([a * a, b * b, a * b, a * c, b * c, c * c])
        {
            *o += v;
        }
    }
}

/// `[e·e, q·q, e·q, e·g, q·g, g·g]` accumulated in f32 lanes (16, then 8, then a scalar tail in
/// f64), summed in f64: the fast path of well-scaled rows.
fn dots6_f32(e: &[f32], q: &[f32], g: &[f32]) -> [f64; 6] {
    let mut out = [0f64; 6];
    let n16 = dots6_lanes::<16>(e, q, g, &mut out);
    let n8 = n16 + dots6_lanes::<8>(&e[n16..], &q[n16..], &g[n16..], &mut out);
    add_products(&mut out, &e[n8..], &q[n8..], &g[n8..]);
    out
}

/// Adds the dots over the whole L-blocks of the slices to `out`; returns the elements covered.
fn dots6_lanes<const L: usize>(e: &[f32], q: &[f32], g: &[f32], out: &mut [f64; 6]) -> usize {
    let (mut ee, mut qq, mut eq, mut eg, mut qg, mut gg) = (
        [0f32; L], [0f32; L], [0f32; L], [0f32; L], [0f32; L], [0f32; L],
    );
    let n = e.len() / L * L;
    for ((ec, qc), gc) in e[..n]
        .chunks_exact(L)
        .zip(q[..n].chunks_exact(L))
        .zip(g[..n].chunks_exact(L))
    {
        for l in 0..L {
            ee[l] += ec[l] * ec[l];
            qq[l] += qc[l] * qc[l];
            eq[l] += ec[l] * qc[l];
            eg[l] += ec[l] * gc[l];
            qg[l] += qc[l] * gc[l];
            gg[l] += gc[l] * gc[l];
        }
    }
    for (o, lanes) in out.iter_mut().zip([ee, qq, eq, eg, qg, gg]) {
        *o += lanes.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    n
}

/// `‖αe + βq‖²` in f32 lanes (the fast path, where it is not small).
fn combination_norm2_f32(e: &[f32], q: &[f32], alpha: f64, beta: f64) -> f64 {
    const L: usize = 8;
    let (a, b) = (alpha as f32, beta as f32);
    let mut acc = [0f32; L];
    let n = e.len() / L * L;
    for (ec, qc) in e[..n].chunks_exact(L).zip(q[..n].chunks_exact(L)) {
        for l in 0..L {
            let t = a * ec[l] + b * qc[l];
            acc[l] += t * t;
        }
    }
    // The tail (< 8 elements) in f64, exactly as the f64 version computes its own tail.
    acc.iter().map(|&v| f64::from(v)).sum::<f64>()
        + combination_norm2(&e[n..], &q[n..], alpha, beta)
}

/// `‖αe + βq‖²` as a sum of squares in f64 (no cancellation however small it is).
fn combination_norm2(e: &[f32], q: &[f32], alpha: f64, beta: f64) -> f64 {
    let mut acc = [0f64; LANES];
    let n = e.len() / LANES * LANES;
    for (ec, qc) in e[..n].chunks_exact(LANES).zip(q[..n].chunks_exact(LANES)) {
        for l in 0..LANES {
            let t = alpha * f64::from(ec[l]) + beta * f64::from(qc[l]);
            acc[l] += t * t;
        }
    }
    let tail: f64 = e[n..]
        .iter()
        .zip(&q[n..])
        .map(|(&x, &y)| (alpha * f64::from(x) + beta * f64::from(y)).powi(2))
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// The Householder vector of a row map, defined from `e` and `q` without storing it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Householder {
    /// `(ê + q̂)/norm` (rotation) or `(ê − q̂)/norm` (reflection, `sign = −1`).
    Combination { sign: f64, norm: f64 },
    /// `(δ_axis − ê_axis ê)/norm`: a unit vector orthogonal to `ê` (antipodal rotation).
    Orthogonal { axis: usize, norm: f64 },
}

/// Structure of the constant linear map `M` of one row (`q̃ = sg(M) e`, `∂L/∂e = Mᵀ g`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum MapKind {
    /// `M = scale·I`.
    Identity,
    /// `M = scale·H_q̂ H_w` (`w = None`: `M = scale·H_q̂`, the 1-D antipodal case).
    Rotation(Option<Householder>),
    /// `M = scale·H_r`.
    Reflection(Householder),
}

/// The constant linear map of one row for a given estimator, computed in f64 from the row's `e`
/// and `q`. Exposed so that tests and other crates can check the maths on single rows.
///
/// ```
/// use ndarray::array;
/// use vq_core::{Estimator, RowMap};
///
/// let (e, q) = (array![3.0f32, 4.0, 0.0], array![0.0f32, 0.0, -10.0]);
/// let m = RowMap::new(Estimator::Rotation, e.view(), q.view());
/// // The frozen map sends e to q.
/// let mut out = vec![0.0; 3];
/// m.apply(e.view(), q.view(), e.view(), &mut out);
/// assert!((out[2] + 10.0).abs() < 1e-9 && out[0].abs() < 1e-9 && out[1].abs() < 1e-9);
/// assert!((m.scale() - 2.0).abs() < 1e-12);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowMap {
    scale: f64,
    ne: f64,
    nq: f64,
    kind: MapKind,
}

impl RowMap {
    /// The map of `estimator` for one row (`e`, `q` of equal length).
    ///
    /// # Panics
    /// Panics if `e` and `q` differ in length (the batch functions check this first).
    pub fn new(estimator: Estimator, e: ArrayView1<f32>, q: ArrayView1<f32>) -> Self {
        assert_eq!(e.len(), q.len(), "RowMap::new: e and q differ in length");
        let (mut ee, mut qq, mut eq) = (0f64, 0f64, 0f64);
        for (&a, &b) in e.iter().zip(q) {
            let (a, b) = (f64::from(a), f64::from(b));
            ee += a * a;
            qq += b * b;
            eq += a * b;
        }
        Self::from_dots(estimator, e, ee, qq, eq, None)
    }

    /// The map from the row's dot products `e·e`, `q·q`, `e·q` (`e` is read only for the
    /// antipodal fallback).
    ///
    /// `direct_norm2`, when given, computes `‖ê ± q̂‖²` as a sum of squares from `(1/‖e‖, ±1/‖q‖)`
    /// (accurate however small it is); otherwise it comes from `2 ± 2ê·q̂` (f64 dots only).
    fn from_dots(
        estimator: Estimator,
        e: ArrayView1<f32>,
        ee: f64,
        qq: f64,
        eq: f64,
        direct_norm2: Option<&dyn Fn(f64, f64) -> f64>,
    ) -> Self {
        let (ne, nq) = (ee.sqrt(), qq.sqrt());
        let scale = match estimator {
            Estimator::StraightThrough | Estimator::RotationNoRescale => 1.0,
            Estimator::Rotation | Estimator::Reflection => nq / ne.max(NORM_EPS),
        };
        let identity = RowMap {
            scale,
            ne,
            nq,
            kind: MapKind::Identity,
        };
        if estimator == Estimator::StraightThrough || ne < NORM_EPS || nq < NORM_EPS {
            return identity;
        }
        let sign = if estimator == Estimator::Reflection {
            -1.0
        } else {
            1.0
        };
        let norm2 = match direct_norm2 {
            Some(f) => f(1.0 / ne, sign / nq),
            // ‖ê ± q̂‖² = 2 ± 2 ê·q̂ (absolute error ~1e-16 with f64 dots; used where it is ≥ 1e-8).
            None => (2.0 + 2.0 * sign * eq / (ne * nq)).max(0.0),
        };
        let combination = Householder::Combination {
            sign,
            norm: norm2.sqrt(),
        };
        let kind = match estimator {
            Estimator::Reflection if norm2 < DIRECTION_EPS => MapKind::Identity,
            Estimator::Reflection => MapKind::Reflection(combination),
            _ if norm2 >= DIRECTION_EPS => MapKind::Rotation(Some(combination)),
            _ if e.len() == 1 => MapKind::Rotation(None),
            _ => {
                // Antipodal: rotate by π in the plane of ê and the axis least aligned with it.
                let (axis, _) = e
                    .iter()
                    .enumerate()
                    .fold((0, f32::INFINITY), |best, (i, &v)| {
                        if v.abs() < best.1 { (i, v.abs()) } else { best }
                    });
                let ea = f64::from(e[axis]) / ne;
                MapKind::Rotation(Some(Householder::Orthogonal {
                    axis,
                    norm: (1.0 - ea * ea).max(0.0).sqrt(),
                }))
            }
        };
        RowMap { kind, ..identity }
    }

    /// `∂L/∂e` of one row written to `out` (f32): one pass for the dot products `e·e, q·q, e·q,
    /// e·g, q·g`, then `out = λg + a·e + b·q` with the coefficients of `H_w H_q̂` (or `H_r`)
    /// folded into `a`, `b`. Rows whose Householder vector is not in span(e, q) (the antipodal
    /// fallback) take the general path.
    fn backward_row(
        estimator: Estimator,
        e: &[f32],
        q: &[f32],
        g: &[f32],
        commitment: f32,
        out: &mut [f32],
        buf: &mut Vec<f64>,
    ) {
        if estimator == Estimator::StraightThrough {
            let k = f64::from(commitment);
            for (((o, &a), &b), &c) in out.iter_mut().zip(e).zip(q).zip(g) {
                *o = (f64::from(c) + k * (f64::from(a) - f64::from(b))) as f32;
            }
            return;
        }
        if Self::backward_row_fast(estimator, e, q, g, commitment, out) {
            return;
        }
        let [ee, qq, eq, eg, qg] = dots5(e, q, g);
        let norm2 = |alpha, beta| combination_norm2(e, q, alpha, beta);
        let map = Self::from_dots(estimator, ArrayView1::from(e), ee, qq, eq, Some(&norm2));
        let Some((ce, cq)) = map.coefficients(eq, qq, eg, qg) else {
            buf.resize(e.len(), 0.0);
            map.apply_transpose(
                ArrayView1::from(e),
                ArrayView1::from(q),
                ArrayView1::from(g),
                buf,
            );
            let k = f64::from(commitment);
            for (((o, &v), &a), &b) in out.iter_mut().zip(buf.iter()).zip(e).zip(q) {
                *o = (v + k * (f64::from(a) - f64::from(b))) as f32;
            }
            return;
        };
        // The combination in f64: near ê = ±q̂ the terms ce·e and cq·q are ~2/‖ê ± q̂‖ times
        // larger than the result and cancel, so rounding them to f32 first would lose up to
        // 1e-3 of the result at the thresholds.
        let s = map.scale;
        let c = f64::from(commitment);
        let (ce, cq) = (s * ce + c, s * cq - c);
        for (((o, &a), &b), &x) in out.iter_mut().zip(e).zip(q).zip(g) {
            *o = (s * f64::from(x) + ce * f64::from(a) + cq * f64::from(b)) as f32;
        }
    }

    /// The common row in f32 arithmetic: dots in f32 lanes (summed in f64), the combination in
    /// f32 with f64 coefficients. Taken only where that is as accurate as the f64 path to
    /// ~1e-7 of λ‖g‖: norms of e, q within [2·NORM_EPS, 2^30] and of g within 2^±50 (no
    /// overflow, no subnormal products, no row at the NORM_EPS cut-off) and ‖ê ± q̂‖² ≥ [`FAST_NORM2`] (the coefficients amplify the
    /// dots' and the combination's rounding by ~2/‖ê ± q̂‖). Returns false, writing nothing,
    /// otherwise.
    fn backward_row_fast(
        estimator: Estimator,
        e: &[f32],
        q: &[f32],
        g: &[f32],
        commitment: f32,
        out: &mut [f32],
    ) -> bool {
        let [ee, qq, eq, eg, qg, gg] = dots6_f32(e, q, g);
        // e and q clear of the NORM_EPS cut-off (which the f64 path decides), and below 2^30.
        let norm_ok = |v: f64| v >= 4.0 * NORM_EPS * NORM_EPS && v <= 2f64.powi(60);
        if !(norm_ok(ee) && norm_ok(qq) && gg >= 2f64.powi(-100) && gg <= 2f64.powi(100)) {
            return false;
        }
        let norm2 = |alpha, beta| combination_norm2_f32(e, q, alpha, beta);
        let map = Self::from_dots(estimator, ArrayView1::from(e), ee, qq, eq, Some(&norm2));
        let conditioned = match map.kind {
            MapKind::Identity => true,
            MapKind::Rotation(Some(Householder::Combination { norm, .. }))
            | MapKind::Reflection(Householder::Combination { norm, .. }) => {
                norm * norm >= FAST_NORM2
            }
            _ => false,
        };
        let Some((ce, cq)) = map.coefficients(eq, qq, eg, qg).filter(|_| conditioned) else {
            return false;
        };
        let s = map.scale;
        let c = f64::from(commitment);
        let (s32, ce, cq) = (s as f32, (s * ce + c) as f32, (s * cq - c) as f32);
        for (((o, &a), &b), &x) in out.iter_mut().zip(e).zip(q).zip(g) {
            *o = s32 * x + ce * a + cq * b;
        }
        true
    }

    /// `(ce, cq)` of `Mᵀg = λ(g + ce·e + cq·q)` from the row's dots, for maps whose Householder
    /// vectors lie in span(e, q); `None` for the antipodal fallback (a vector off that plane).
    fn coefficients(&self, eq: f64, qq: f64, eg: f64, qg: f64) -> Option<(f64, f64)> {
        let (ne, nq) = (self.ne, self.nq);
        Some(match self.kind {
            MapKind::Identity => (0.0, 0.0),
            MapKind::Reflection(Householder::Combination { sign, norm }) => {
                // r = αe + βq; H_r g = g − 2(r·g) r.
                let (alpha, beta) = (1.0 / (ne * norm), sign / (nq * norm));
                let rg = alpha * eg + beta * qg;
                (-2.0 * rg * alpha, -2.0 * rg * beta)
            }
            MapKind::Rotation(Some(Householder::Combination { sign, norm })) => {
                // t = H_q̂ g = g − 2(q·g)/‖q‖² q; then H_w t with w = αe + βq.
                let (alpha, beta) = (1.0 / (ne * norm), sign / (nq * norm));
                let cq0 = -2.0 * qg / (nq * nq);
                let wt = alpha * (eg + cq0 * eq) + beta * (qg + cq0 * qq);
                (-2.0 * wt * alpha, cq0 - 2.0 * wt * beta)
            }
            MapKind::Rotation(None) => (0.0, -2.0 * qg / (nq * nq)),
            MapKind::Rotation(Some(Householder::Orthogonal { .. }))
            | MapKind::Reflection(Householder::Orthogonal { .. }) => return None,
        })
    }

    /// The scale factor (`λ = ‖q‖/max(‖e‖, 1e-6)`, or 1 for the unscaled estimators).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `out = M v` (the frozen forward map applied to any vector `v`).
    ///
    /// # Panics
    /// Panics if the lengths of `e`, `q`, `v`, `out` differ.
    pub fn apply(
        &self,
        e: ArrayView1<f32>,
        q: ArrayView1<f32>,
        v: ArrayView1<f32>,
        out: &mut [f64],
    ) {
        self.run(e, q, v, out, false);
    }

    /// `out = Mᵀ g` (the backward map).
    ///
    /// # Panics
    /// Panics if the lengths of `e`, `q`, `g`, `out` differ.
    pub fn apply_transpose(
        &self,
        e: ArrayView1<f32>,
        q: ArrayView1<f32>,
        g: ArrayView1<f32>,
        out: &mut [f64],
    ) {
        self.run(e, q, g, out, true);
    }

    fn run(
        &self,
        e: ArrayView1<f32>,
        q: ArrayView1<f32>,
        v: ArrayView1<f32>,
        out: &mut [f64],
        transpose: bool,
    ) {
        let d = e.len();
        assert!(
            q.len() == d && v.len() == d && out.len() == d,
            "RowMap: length mismatch"
        );
        out.iter_mut().zip(v).for_each(|(o, &x)| *o = f64::from(x));
        let (ne, nq) = (self.ne, self.nq);
        let reflect_q = |t: &mut [f64]| {
            let a: f64 = t
                .iter()
                .zip(q)
                .map(|(&t, &b)| t * f64::from(b))
                .sum::<f64>()
                / nq;
            let c = 2.0 * a / nq;
            t.iter_mut()
                .zip(q)
                .for_each(|(t, &b)| *t -= c * f64::from(b));
        };
        let reflect_h = |t: &mut [f64], h: Householder| match h {
            Householder::Combination { sign, norm } => {
                let (alpha, beta) = (1.0 / (ne * norm), sign / (nq * norm));
                let w = |a: f32, b: f32| alpha * f64::from(a) + beta * f64::from(b);
                let a: f64 = t
                    .iter()
                    .zip(e)
                    .zip(q)
                    .map(|((&t, &a), &b)| t * w(a, b))
                    .sum();
                t.iter_mut()
                    .zip(e)
                    .zip(q)
                    .for_each(|((t, &x), &y)| *t -= 2.0 * a * w(x, y));
            }
            Householder::Orthogonal { axis, norm } => {
                // p = (δ_axis − ê_axis ê)/norm
                let ea = f64::from(e[axis]) / ne;
                let te: f64 = t
                    .iter()
                    .zip(e)
                    .map(|(&t, &x)| t * f64::from(x))
                    .sum::<f64>()
                    / ne;
                let a = (t[axis] - ea * te) / norm;
                t.iter_mut()
                    .zip(e)
                    .for_each(|(t, &x)| *t += 2.0 * a * ea * f64::from(x) / ne / norm);
                t[axis] -= 2.0 * a / norm;
            }
        };
        match self.kind {
            MapKind::Identity => {}
            MapKind::Reflection(h) => reflect_h(out, h),
            MapKind::Rotation(w) => {
                // M = H_q̂ H_w: M v = H_q̂ (H_w v); Mᵀ g = H_w (H_q̂ g).
                if transpose {
                    reflect_q(out);
                    if let Some(h) = w {
                        reflect_h(out, h);
                    }
                } else {
                    if let Some(h) = w {
                        reflect_h(out, h);
                    }
                    reflect_q(out);
                }
            }
        }
        out.iter_mut().for_each(|o| *o *= self.scale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{dot64, norm64, randn};
    use ndarray::{Array1, Array2, array};
    use proptest::prelude::*;

    /// Dense reference straight from the paper: λR with R = I − 2rrᵀ + 2q̂êᵀ, r the bisector.
    fn dense_rotation(e: &[f64], q: &[f64], rescale: bool) -> Array2<f64> {
        let d = e.len();
        let ne = dot64(e, e).sqrt();
        let nq = dot64(q, q).sqrt();
        let eh: Vec<f64> = e.iter().map(|v| v / ne).collect();
        let qh: Vec<f64> = q.iter().map(|v| v / nq).collect();
        let s: Vec<f64> = eh.iter().zip(&qh).map(|(a, b)| a + b).collect();
        let ns = dot64(&s, &s).sqrt();
        let r: Vec<f64> = s.iter().map(|v| v / ns).collect();
        let lambda = if rescale { nq / ne } else { 1.0 };
        Array2::from_shape_fn((d, d), |(i, j)| {
            let id = if i == j { 1.0 } else { 0.0 };
            lambda * (id - 2.0 * r[i] * r[j] + 2.0 * qh[i] * eh[j])
        })
    }

    /// Dense reference of the A.8 reflection: λ(I − 2vvᵀ), v = (ê − q̂)/‖ê − q̂‖.
    fn dense_reflection(e: &[f64], q: &[f64]) -> Array2<f64> {
        let (ne, nq) = (dot64(e, e).sqrt(), dot64(q, q).sqrt());
        let v: Vec<f64> = e.iter().zip(q).map(|(a, b)| a / ne - b / nq).collect();
        let nv = dot64(&v, &v).sqrt();
        let v: Vec<f64> = v.iter().map(|x| x / nv).collect();
        Array2::from_shape_fn((e.len(), e.len()), |(i, j)| {
            let id = if i == j { 1.0 } else { 0.0 };
            nq / ne * (id - 2.0 * v[i] * v[j])
        })
    }

    /// The paper's map of one (non-degenerate) row as a dense matrix, sharing no code with `RowMap`.
    fn dense_map(est: Estimator, e: &[f64], q: &[f64]) -> Array2<f64> {
        match est {
            Estimator::StraightThrough => Array2::eye(e.len()),
            Estimator::Rotation => dense_rotation(e, q, true),
            Estimator::RotationNoRescale => dense_rotation(e, q, false),
            Estimator::Reflection => dense_reflection(e, q),
        }
    }

    fn det(mut m: Array2<f64>) -> f64 {
        let n = m.nrows();
        let mut det = 1.0;
        for c in 0..n {
            let p = (c..n)
                .max_by(|&a, &b| m[[a, c]].abs().total_cmp(&m[[b, c]].abs()))
                .unwrap();
            if m[[p, c]] == 0.0 {
                return 0.0;
            }
            if p != c {
                for j in 0..n {
                    m.swap([p, j], [c, j]);
                }
                det = -det;
            }
            det *= m[[c, c]];
            for r in c + 1..n {
                let f = m[[r, c]] / m[[c, c]];
                for j in c..n {
                    m[[r, j]] -= f * m[[c, j]];
                }
            }
        }
        det
    }

    /// The map of one row as a dense matrix, built column by column from `apply`.
    fn as_matrix(map: &RowMap, e: ArrayView1<f32>, q: ArrayView1<f32>) -> Array2<f64> {
        let d = e.len();
        let mut m = Array2::zeros((d, d));
        let mut out = vec![0.0; d];
        for j in 0..d {
            let mut basis = Array1::zeros(d);
            basis[j] = 1.0f32;
            map.apply(e, q, basis.view(), &mut out);
            m.column_mut(j).assign(&Array1::from(out.clone()));
        }
        m
    }

    fn to64(v: ArrayView1<f32>) -> Vec<f64> {
        v.iter().map(|&x| f64::from(x)).collect()
    }

    fn max_abs_diff(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
        (a - b).iter().fold(0.0, |m, v| m.max(v.abs()))
    }

    #[test]
    fn frozen_rotation_maps_e_onto_q() {
        let (e, q) = (randn((50, 7), 1), randn((50, 7), 2) * 3.0);
        for est in [Estimator::Rotation, Estimator::Reflection] {
            for (er, qr) in e.rows().into_iter().zip(q.rows()) {
                let map = RowMap::new(est, er, qr);
                let mut out = vec![0.0; 7];
                map.apply(er, qr, er, &mut out);
                let err: f64 = out
                    .iter()
                    .zip(qr)
                    .map(|(a, &b)| (a - f64::from(b)).powi(2))
                    .sum::<f64>()
                    .sqrt();
                assert!(err <= 1e-5 * norm64(qr), "{est:?}: ‖λRe − q‖ = {err}");
            }
        }
        assert_eq!(Estimator::Rotation.forward(e.view(), q.view()).unwrap(), q);
    }

    #[test]
    fn rotation_matches_dense_reference_and_is_a_scaled_proper_rotation() {
        let (e, q, g) = (
            randn((40, 6), 3),
            randn((40, 6), 4) * 0.5,
            randn((40, 6), 5),
        );
        let grad = Estimator::Rotation
            .backward(e.view(), q.view(), g.view())
            .unwrap();
        let grad_nr = Estimator::RotationNoRescale
            .backward(e.view(), q.view(), g.view())
            .unwrap();
        for i in 0..40 {
            let (er, qr, gr) = (e.row(i), q.row(i), g.row(i));
            let dense = dense_rotation(&to64(er), &to64(qr), true);
            let map = RowMap::new(Estimator::Rotation, er, qr);
            let m = as_matrix(&map, er, qr);
            assert!(
                max_abs_diff(&m, &dense) < 1e-12,
                "efficient form ≠ dense matrix form"
            );
            // λRᵀ orthogonal up to λ: (λR)ᵀ(λR) = λ² I; det R = +1.
            let lambda = map.scale();
            let mtm = m.t().dot(&m) / (lambda * lambda);
            assert!(max_abs_diff(&mtm, &Array2::eye(6)) < 1e-12);
            assert!((det(m.clone() / lambda) - 1.0).abs() < 1e-10);
            // Backward = denseᵀ g, for both scalings.
            let expect = dense.t().dot(&Array1::from(to64(gr)));
            for (j, &v) in grad.row(i).iter().enumerate() {
                assert!((f64::from(v) - expect[j]).abs() <= 1e-5 * (1.0 + expect[j].abs()));
                let nr = f64::from(grad_nr[[i, j]]);
                assert!((nr - expect[j] / lambda).abs() <= 1e-5 * (1.0 + nr.abs()));
            }
            // Angle(e, ∇e) = angle(q, ∇q) and ‖∇e‖ = λ‖∇q‖.
            let ge = to64(grad.row(i));
            let cos_e = dot64(&to64(er), &ge) / (norm64(er) * dot64(&ge, &ge).sqrt());
            let cos_q = dot64(&to64(qr), &to64(gr)) / (norm64(qr) * norm64(gr));
            assert!((cos_e - cos_q).abs() < 1e-5, "angles {cos_e} vs {cos_q}");
            assert!(
                (dot64(&ge, &ge).sqrt() - lambda * norm64(gr)).abs() < 1e-5 * lambda * norm64(gr)
            );
        }
    }

    #[test]
    fn finite_differences_of_the_frozen_map_match_backward() {
        // q̃(v) = sg(λR) v with the map frozen at e (the dense matrix of the paper's formula,
        // no `RowMap` code): ∂⟨g, q̃⟩/∂v_j by central differences.
        let (e, q, g) = (randn((5, 4), 6), randn((5, 4), 7), randn((5, 4), 8));
        for est in Estimator::ALL {
            let grad = est.backward(e.view(), q.view(), g.view()).unwrap();
            for i in 0..5 {
                let m = dense_map(est, &to64(e.row(i)), &to64(q.row(i)));
                let er = e.row(i);
                let objective = |v: &Array1<f32>| {
                    let out = m.dot(&v.mapv(f64::from));
                    dot64(out.as_slice().unwrap(), &to64(g.row(i)))
                };
                for j in 0..4 {
                    let h = 1e-2f32;
                    let (mut plus, mut minus) = (er.to_owned(), er.to_owned());
                    plus[j] += h;
                    minus[j] -= h;
                    let fd = (objective(&plus) - objective(&minus)) / f64::from(2.0 * h);
                    let an = f64::from(grad[[i, j]]);
                    assert!(
                        (fd - an).abs() <= 1e-4 * (1.0 + an.abs()),
                        "{est:?} row {i} dim {j}: fd {fd} vs {an}"
                    );
                }
            }
        }
    }

    #[test]
    fn reflection_is_symmetric_with_determinant_minus_one() {
        let (e, q) = (randn((10, 5), 9), randn((10, 5), 10));
        for i in 0..10 {
            let map = RowMap::new(Estimator::Reflection, e.row(i), q.row(i));
            let dense = dense_reflection(&to64(e.row(i)), &to64(q.row(i)));
            let m = as_matrix(&map, e.row(i), q.row(i));
            assert!(
                max_abs_diff(&m, &dense) < 1e-12,
                "efficient form ≠ dense matrix form"
            );
            let m = m / map.scale();
            assert!(max_abs_diff(&m, &m.t().to_owned()) < 1e-12);
            assert!((det(m) + 1.0).abs() < 1e-10);
        }
    }

    #[test]
    fn straight_through_passes_the_gradient_unchanged() {
        let (e, q, g) = (randn((9, 3), 11), randn((9, 3), 12), randn((9, 3), 13));
        assert_eq!(
            Estimator::StraightThrough
                .backward(e.view(), q.view(), g.view())
                .unwrap(),
            g
        );
    }

    #[test]
    fn antipodal_rows_get_a_proper_rotation_by_pi() {
        let e = array![[1.0f32, 2.0, -0.5], [3.0, 0.0, 0.0]];
        let q = -&e * 2.0;
        let g = randn((2, 3), 14);
        let grad = Estimator::Rotation
            .backward(e.view(), q.view(), g.view())
            .unwrap();
        assert!(grad.iter().all(|v| v.is_finite()));
        for i in 0..2 {
            let map = RowMap::new(Estimator::Rotation, e.row(i), q.row(i));
            let m = as_matrix(&map, e.row(i), q.row(i));
            assert!((map.scale() - 2.0).abs() < 1e-12);
            assert!(
                (det(m.clone() / 2.0) - 1.0).abs() < 1e-10,
                "must stay a rotation"
            );
            let me = m.dot(&Array1::from(to64(e.row(i))));
            for (a, &b) in me.iter().zip(q.row(i)) {
                assert!((a - f64::from(b)).abs() < 1e-9);
            }
        }
        // Nearly antipodal: still finite and orthogonal.
        let e = array![[1.0f32, 1e-5, 0.0]];
        let q = array![[-1.0f32, 0.0, 0.0]];
        let map = RowMap::new(Estimator::Rotation, e.row(0), q.row(0));
        let m = as_matrix(&map, e.row(0), q.row(0));
        assert!(max_abs_diff(&m.t().dot(&m), &Array2::eye(3)) < 1e-9);
    }

    #[test]
    fn one_dimensional_antipodes_fall_back_to_the_sign_flip() {
        let e = array![[2.0f32], [-1.0]];
        let q = array![[-4.0f32], [-3.0]];
        let g = array![[1.0f32], [1.0]];
        let grad = Estimator::Rotation
            .backward(e.view(), q.view(), g.view())
            .unwrap();
        // Row 0: λ = 2, R = −1. Row 1: same sign, R = 1, λ = 3.
        assert_eq!(grad, array![[-2.0], [3.0]]);
    }

    #[test]
    fn zero_norm_rows_are_finite() {
        let e = array![[0.0f32, 0.0], [1e-9, 0.0], [1.0, 1.0], [0.0, 0.0]];
        let q = array![[1.0f32, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]];
        let g = array![[1.0f32, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0]];
        for est in Estimator::ALL {
            let grad = est.backward(e.view(), q.view(), g.view()).unwrap();
            assert!(grad.iter().all(|v| v.is_finite()), "{est:?}: {grad:?}");
        }
        let grad = Estimator::Rotation
            .backward(e.view(), q.view(), g.view())
            .unwrap();
        // ‖e‖ = 0: R = I, λ = ‖q‖/1e-6. ‖q‖ = 0: λ = 0.
        assert!((grad[[0, 0]] - 1e6).abs() < 1.0 && (grad[[0, 1]] - 2e6).abs() < 2.0);
        assert_eq!(grad.row(2).to_vec(), vec![0.0, 0.0]);
        assert_eq!(grad.row(3).to_vec(), vec![0.0, 0.0]);
    }

    #[test]
    fn shape_errors_and_names() {
        let e = randn((3, 2), 0);
        let q = randn((3, 3), 0);
        assert!(matches!(
            Estimator::Rotation.backward(e.view(), q.view(), e.view()),
            Err(VqError::ShapeMismatch { .. })
        ));
        for est in Estimator::ALL {
            assert_eq!(Estimator::from_name(est.name()).unwrap(), est);
        }
        assert!(Estimator::from_name("rot").is_err());
    }

    /// `Mᵀg` in f64 from the paper's formulas, independent of `RowMap`: rotation
    /// `λ(g − 2(w·g)w + 2(q̂·g)ê)` with `w = (ê + q̂)/‖ê + q̂‖`, reflection `λ(g − 2(r·g)r)` with
    /// `r = (ê − q̂)/‖ê − q̂‖`, `λ = 1` without rescaling. `None` inside the fallback zones
    /// (‖ê ± q̂‖² < 1e-8), where only the norm is checked.
    fn reference_backward(est: Estimator, e: &[f32], q: &[f32], g: &[f32]) -> Option<Vec<f64>> {
        let (e, q, g): (Vec<f64>, Vec<f64>, Vec<f64>) = (
            e.iter().map(|&v| f64::from(v)).collect(),
            q.iter().map(|&v| f64::from(v)).collect(),
            g.iter().map(|&v| f64::from(v)).collect(),
        );
        let (ne, nq) = (dot64(&e, &e).sqrt(), dot64(&q, &q).sqrt());
        let lambda = match est {
            Estimator::Rotation | Estimator::Reflection => nq / ne.max(NORM_EPS),
            _ => 1.0,
        };
        if est == Estimator::StraightThrough || ne < NORM_EPS || nq < NORM_EPS {
            return Some(g.iter().map(|v| v * lambda).collect());
        }
        let eh: Vec<f64> = e.iter().map(|v| v / ne).collect();
        let qh: Vec<f64> = q.iter().map(|v| v / nq).collect();
        let sign = if est == Estimator::Reflection {
            -1.0
        } else {
            1.0
        };
        let r: Vec<f64> = eh.iter().zip(&qh).map(|(a, b)| a + sign * b).collect();
        let nr2 = dot64(&r, &r);
        if nr2 < 1.01 * DIRECTION_EPS {
            return None;
        }
        let r: Vec<f64> = r.iter().map(|v| v / nr2.sqrt()).collect();
        let rg = dot64(&r, &g);
        let out = match est {
            Estimator::Reflection => (0..e.len()).map(|i| g[i] - 2.0 * rg * r[i]).collect(),
            _ => {
                let qg = dot64(&qh, &g);
                (0..e.len())
                    .map(|i| lambda * (g[i] - 2.0 * rg * r[i] + 2.0 * qg * eh[i]))
                    .collect::<Vec<_>>()
            }
        };
        Some(match est {
            Estimator::Reflection => out.iter().map(|v: &f64| v * lambda).collect(),
            _ => out,
        })
    }

    /// Every row of the batch path within `1e-6·λ‖g‖` of the f64 reference (only the norm in the
    /// fallback zones, where the reference is undefined).
    fn check_rows(
        est: Estimator,
        e: &Array2<f32>,
        q: &Array2<f32>,
        g: &Array2<f32>,
    ) -> Result<(), String> {
        let out = est.backward(e.view(), q.view(), g.view()).unwrap();
        for i in 0..e.nrows() {
            let (er, qr, gr) = (e.row(i), q.row(i), g.row(i));
            let row = out.row(i);
            if row.iter().any(|v| !v.is_finite()) {
                return Err(format!("{}: row {i} not finite: {row}", est.name()));
            }
            let lambda = match est {
                Estimator::Rotation | Estimator::Reflection => {
                    norm64(qr) / norm64(er).max(NORM_EPS)
                }
                _ => 1.0,
            };
            let bound = lambda * norm64(gr);
            let tol = 1e-6 * bound + f64::from(f32::MIN_POSITIVE);
            match reference_backward(
                est,
                er.as_slice().unwrap(),
                qr.as_slice().unwrap(),
                gr.as_slice().unwrap(),
            ) {
                Some(want) => {
                    let err = row
                        .iter()
                        .zip(&want)
                        .map(|(&a, b)| (f64::from(a) - b).abs())
                        .fold(0.0, f64::max);
                    if err > tol {
                        return Err(format!(
                            "{}: row {i}: error {err:e} > {tol:e} (e {er}, q {qr}, g {gr}, got {row}, want {want:?})",
                            est.name()
                        ));
                    }
                }
                None => {
                    let n = norm64(row);
                    if (n - bound).abs() > tol {
                        return Err(format!(
                            "{}: row {i}: norm {n:e}, want {bound:e}",
                            est.name()
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    const ALL: [Estimator; 4] = [
        Estimator::StraightThrough,
        Estimator::Rotation,
        Estimator::RotationNoRescale,
        Estimator::Reflection,
    ];

    #[test]
    fn near_antipodal_rows_keep_full_accuracy() {
        // ‖ê + q̂‖ = 1.1e-4, just above the antipodal threshold: the exact result is [−1.1e-4, −1, 0].
        let e = array![[-1.0f32, 1.1e-4, 0.0]];
        let q = array![[1.0f32, 0.0, 0.0]];
        let g = array![[0.0f32, 1.0, 0.0]];
        let out = Estimator::Rotation
            .backward(e.view(), q.view(), g.view())
            .unwrap();
        assert!((out[[0, 0]] + 1.1e-4).abs() < 1e-9, "{out}");
        assert!((out[[0, 1]] + 1.0).abs() < 1e-6, "{out}");
        check_rows(Estimator::Rotation, &e, &q, &g).unwrap();
    }

    #[test]
    fn long_ordinary_rows_take_the_fast_path_at_full_accuracy() {
        // Random directions (‖ê ± q̂‖² ≈ 2: the f32 path), codes near e (the reflection's
        // f64 path), and offsets that make the rows nearly parallel.
        for (d, seed) in [(64usize, 1u64), (256, 2), (512, 3), (33, 4)] {
            let (e, q, g) = (
                randn((64, d), seed),
                randn((64, d), seed + 10),
                randn((64, d), seed + 20),
            );
            let near = &e + &randn((64, d), seed + 30).mapv(|v| 0.01 * v);
            let shifted = e.mapv(|v| v + 3.0);
            for est in ALL {
                check_rows(est, &e, &q, &g).unwrap();
                check_rows(est, &e, &near, &g).unwrap();
                check_rows(est, &shifted, &q.mapv(|v| v + 3.0), &g).unwrap();
            }
        }
    }

    #[test]
    fn rows_whose_squares_overflow_f32_are_exact() {
        // D = 16, e = q = [2e19; 16]: e·e = 6.4e39 overflows f32; the map is the identity.
        let e = Array2::from_elem((1, 16), 2e19f32);
        let g = Array2::from_elem((1, 16), 1.0f32);
        for est in ALL {
            let out = est.backward(e.view(), e.view(), g.view()).unwrap();
            for &v in &out {
                assert!((v - 1.0).abs() < 1e-6, "{}: {out}", est.name());
            }
            check_rows(est, &e, &e, &g).unwrap();
        }
        // Largest finite values, opposite signs.
        let e = array![[3e38f32, -3e38, 1.0]];
        let q = array![[-3e38f32, 3e38, 2.0]];
        let g = array![[1.0f32, 2.0, 3.0]];
        for est in ALL {
            check_rows(est, &e, &q, &g).unwrap();
        }
    }

    #[test]
    fn results_beyond_f32_and_non_finite_inputs_are_typed_errors() {
        // λ = ‖q‖/‖e‖ = 1e30, ‖g‖ = 1e10: the exact gradient (1e40) is beyond f32 in row 1.
        let e = array![[1.0f32, 0.0], [1.0, 0.0], [1.0, 0.0]];
        let q = array![[0.0f32, 2.0], [0.0, 1e30], [0.0, 2.0]];
        let g = array![[0.0f32, 1.0], [0.0, 1e10], [1.0, 1.0]];
        let err = Estimator::Rotation
            .backward(e.view(), q.view(), g.view())
            .unwrap_err();
        assert_eq!(
            err,
            VqError::Overflow {
                what: "estimator gradient",
                row: 1
            }
        );
        assert!(err.to_string().contains("row 1"), "{err}");
        // Without the rescale the same rows are representable.
        assert!(
            Estimator::RotationNoRescale
                .backward(e.view(), q.view(), g.view())
                .is_ok()
        );
        // A NaN in an input is named by argument and row (the first bad row, across blocks).
        let mut big = randn((300, 4), 40);
        let q = randn((300, 4), 41);
        let mut g = randn((300, 4), 42);
        g[[250, 1]] = f32::NAN;
        big[[290, 0]] = f32::INFINITY;
        for est in ALL {
            let err = est.backward(big.view(), q.view(), g.view()).unwrap_err();
            assert_eq!(
                err,
                VqError::NonFinite {
                    what: "gradient",
                    row: 250
                },
                "{est:?}"
            );
        }
    }

    /// Unit `u`, and `v = ±u + s·p` with `p ⊥ u`: rows at distance ~s from the thresholds.
    fn near_rows(
        d: usize,
        n: usize,
        s: f64,
        antipodal: bool,
        seed: u64,
    ) -> (Array2<f32>, Array2<f32>) {
        let a = randn((n, d), seed);
        let b = randn((n, d), seed + 1);
        let mut e = Array2::zeros((n, d));
        let mut q = Array2::zeros((n, d));
        for i in 0..n {
            let u: Vec<f64> = a.row(i).iter().map(|&v| f64::from(v)).collect();
            let nu = dot64(&u, &u).sqrt();
            let u: Vec<f64> = u.iter().map(|v| v / nu).collect();
            let p: Vec<f64> = b.row(i).iter().map(|&v| f64::from(v)).collect();
            let pu = dot64(&p, &u);
            let p: Vec<f64> = p.iter().zip(&u).map(|(x, y)| x - pu * y).collect();
            let np = dot64(&p, &p).sqrt().max(1e-300);
            let sign = if antipodal { -1.0 } else { 1.0 };
            for j in 0..d {
                e[[i, j]] = u[j] as f32;
                q[[i, j]] = (sign * u[j] + s * p[j] / np) as f32;
            }
        }
        (e, q)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Any magnitude from 1e-30 to 1e37, any D in 1..=40, fewer or more rows than a lane block.
        #[test]
        fn prop_every_estimator_matches_the_f64_reference_at_any_magnitude(
            n in 1usize..6, d in 1usize..=40, seed in 0u64..10_000,
            le in -30i32..=37, lq in -30i32..=37, lg in -30i32..=30,
        ) {
            // Keep λ‖g‖ representable in f32 (the exact result itself must be finite).
            prop_assume!(lq - le.max(-6) + lg <= 36);
            let scale = |m: &Array2<f32>, l: i32| m.mapv(|v| (f64::from(v) * 10f64.powi(l) / (d as f64).sqrt()) as f32);
            let (e, q, g) = (randn((n, d), seed), randn((n, d), seed + 1), randn((n, d), seed + 2));
            let (e, q, g) = (scale(&e, le), scale(&q, lq), scale(&g, lg));
            for est in ALL {
                check_rows(est, &e, &q, &g).map_err(TestCaseError::fail)?;
            }
        }

        /// Rows from ‖ê ± q̂‖ = 1e-1 down past the thresholds (1e-4), for the rotation (near
        /// antipodes) and the reflection (near-parallel rows, its normal regime).
        #[test]
        fn prop_full_accuracy_down_to_the_thresholds(
            d in 2usize..=40, seed in 0u64..10_000, ls in -4.5f64..-1.0, lm in -20i32..=20,
        ) {
            let s = 10f64.powf(ls);
            let g = randn((4, d), seed + 7);
            for (est, antipodal) in [
                (Estimator::Rotation, true),
                (Estimator::RotationNoRescale, true),
                (Estimator::Reflection, false),
            ] {
                let (e, q) = near_rows(d, 4, s, antipodal, seed);
                let (e, q) = (e.mapv(|v| v * 10f32.powi(lm)), q.mapv(|v| v * 10f32.powi(-lm / 2)));
                check_rows(est, &e, &q, &g).map_err(TestCaseError::fail)?;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn prop_norm_scaling_and_finiteness(n in 1usize..20, d in 1usize..12, seed in 0u64..10_000) {
            let (e, q, g) = (randn((n, d), seed), randn((n, d), seed + 1), randn((n, d), seed + 2));
            let grad = Estimator::Rotation.backward(e.view(), q.view(), g.view()).unwrap();
            for i in 0..n {
                prop_assert!(grad.row(i).iter().all(|v| v.is_finite()));
                let lambda = norm64(q.row(i)) / norm64(e.row(i)).max(NORM_EPS);
                let ge = norm64(grad.row(i));
                prop_assert!((ge - lambda * norm64(g.row(i))).abs() <= 1e-4 * (1.0 + ge));
            }
        }
    }
}
