//! Nearest-code search: a fused, tiled, multi-threaded kernel that never materialises the N×K
//! distance matrix.
//!
//! For Euclidean lookup, `argmin_k ‖x − c_k‖² = argmin_k (½‖c̄_k‖² − x̄·c̄_k)` where `x̄ = x − μ`,
//! `c̄_k = c_k − μ` and `μ` is the per-dimension median of the codes (distances are translation
//! invariant; centring removes most of the cancellation of the `‖x‖² + ‖c‖² − 2x·c` shortcut
//! when data sit far from the origin, and the median, unlike the mean, stays with the bulk of
//! the codes when a few are far away); both sides are also multiplied by one power of two
//! (exact) that brings the largest centred code to a norm in [1, 2), so codebooks of any
//! magnitude score in f32's range. For cosine lookup, `argmax_k x̂·ĉ_k` on l2-normalised vectors,
//! computed as `argmin_k (β_k − (x̂ − m)·(ĉ_k − m))` with `m` the mean normalised code and
//! `β_k = −m·(ĉ_k − m)` (in f64): `x̂·m` is common to all codes, and with both sides centred the
//! f32 dot product's rounding scales with the directions' spread, not with 1, so codes crowded
//! around one direction (data offset by 1e5, say) stay apart.
//!
//! The scores of a tile of rows against a block of codes come from one sgemm into a small
//! per-thread buffer, followed by a branch-free top-2 scan. Each score's rounding error is
//! bounded by its own terms, `(D + 8)·ε·(‖x̄‖‖c̄_k‖ + |bias_k|)`, so a far code's large bound
//! does not reach rows that it cannot win: a code of norm r scores at least `½r² − ‖x̄‖r`, which
//! bounds the norms that can contend with a row's best. A row whose second-best score lies
//! within the band of its contenders' bounds is re-ranked exactly: the codes whose score less
//! their bound is within the best's score plus its bound are compared on the original data with
//! `‖c‖² − 2x·c` from exact f64 products summed in double-double (or `−x·c/‖c‖` in f64 for the
//! cosine), and two of them closer than those values' own error bounds in exact integer
//! arithmetic ([`crate::exact`]). Exact ties — and only they — go to the lowest index, like
//! `torch.argmin`.
//!
//! Finite inputs of any magnitude (1e-30 … 3e38) give a true nearest code: the bounds are
//! computed in f64 with an absolute term for subnormal rounding, and a row whose f32 scores could
//! overflow (‖x̄‖‖c̄‖ + |bias| beyond half of f32's range) is scored exactly against every code.
//!
//! Peak extra memory: the prepared codebook (K×D), per thread one row tile (T×D) and one score
//! block (T×K_b), and the N output indices.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis, s};
use rayon::prelude::*;
use wide::{CmpLt, f32x8};

use crate::error::{Result, VqError, check_indices};

/// How "nearest" is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Metric {
    /// `argmin_k ‖x − c_k‖₂`.
    #[default]
    Euclidean,
    /// `argmax_k x̂·ĉ_k` with `v̂ = v / max(‖v‖, 1e-12)` (l2-normalised lookup).
    Cosine,
}

/// The codebook laid out for the register kernel.
#[derive(Debug)]
struct SmallKernel {
    /// The prepared codes transposed per chunk of CHUNK codes, `[chunk · D + dim][lane]`,
    /// zero-padded (padding codes score +∞ through `bias`).
    cols: Vec<[f32; CHUNK]>,
    /// `bias` per chunk.
    bias: Vec<[f32; CHUNK]>,
}

/// Rows per tile (one rayon task).
const ROW_TILE: usize = 64;
/// Scores per tile block: ROW_TILE × CODE_BLOCK f32 stay in L2.
const CODE_BLOCK: usize = 1024;
/// Lanes of the branch-free top-2 scan.
const LANES: usize = 8;
/// Candidates kept per ambiguous row before falling back to an exact scan of all codes.
const MAX_CANDIDATES: usize = 32;
/// Code dimension up to which the register kernel (no sgemm, no score buffer) is used.
const SMALL_D_MAX: usize = 16;
/// Codes per chunk of the register kernel.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
const CHUNK: usize = 16;
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
const CHUNK: usize = LANES;
/// Floor of vector norms in cosine lookup.
/// Floor of the norm in every l2 normalisation (cosine codebooks, cosine search inputs):
/// `v / max(‖v‖, L2_NORM_EPS)`, as `F.normalize`'s default `eps`.
pub const L2_NORM_EPS: f32 = 1e-12;

const COSINE_EPS: f32 = L2_NORM_EPS;

/// A codebook prepared for nearest-code search (centred or normalised copy plus per-code terms).
/// Build it once per step and search many inputs against it.
///
/// ```
/// use ndarray::array;
/// use vq_core::{CodebookIndex, Metric};
///
/// let codebook = array![[0.0f32, 0.0], [1.0, 1.0], [-2.0, 0.5]];
/// let index = CodebookIndex::new(codebook.view(), Metric::Euclidean).unwrap();
/// let x = array![[0.9f32, 1.2], [-1.5, 0.0], [0.1, -0.1]];
/// assert_eq!(index.search(x.view()).unwrap().to_vec(), vec![1, 2, 0]);
/// ```
#[derive(Debug)]
pub struct CodebookIndex<'a> {
    codebook: ArrayView2<'a, f32>,
    metric: Metric,
    /// Centred and scaled (Euclidean) or normalised and centred (cosine) codes.
    prepared: Array2<f32>,
    /// ½‖c̄_k‖² (Euclidean) or −m·(ĉ_k − m) (cosine), padded to a multiple of LANES with +∞.
    bias: Array1<f32>,
    /// μ (Euclidean) or m (cosine), in f64.
    centre: Vec<f64>,
    /// Power of two the centred Euclidean vectors are multiplied by (exactly) so that the largest
    /// centred code has a norm in [1, 2): scores of codebooks of any magnitude stay in f32's
    /// range, away from overflow and from subnormals. 1 for cosine.
    scale: f64,
    /// ‖c̄_k‖ per code (of the prepared f32 vectors, in f64).
    norms: Vec<f64>,
    /// max_k ‖c̄_k‖.
    max_norm: f64,
    /// max_k |bias_k|.
    max_bias: f64,
    /// Absolute error of the f64 preparation (cosine: the normalisations and `m·(ĉ_k − m)`),
    /// added to every score's bound; 0 for Euclidean.
    abs_err: f64,
    /// For D ≤ SMALL_D_MAX: the register kernel's layout.
    small: Option<SmallKernel>,
    /// Cosine: `max(‖c_k‖, COSINE_EPS)` of the original codes in f64, the divisor of the exact
    /// re-rank (computed once, not per row and candidate). Empty for Euclidean.
    code_norms: Vec<f64>,
}

impl<'a> CodebookIndex<'a> {
    /// Prepares `codebook` (K×D) for search.
    ///
    /// # Errors
    /// [`VqError::EmptyCodebook`] if K = 0 or D = 0; [`VqError::NonFinite`] if a code holds NaN or
    /// an infinity.
    pub fn new(codebook: ArrayView2<'a, f32>, metric: Metric) -> Result<Self> {
        let (k, d) = codebook.dim();
        if k == 0 || d == 0 {
            return Err(VqError::EmptyCodebook { k, d });
        }
        if u32::try_from(k).is_err() {
            return Err(VqError::InvalidParameter {
                name: "codebook size",
                value: k.to_string(),
                reason: "must fit in u32",
            });
        }
        check_finite(codebook, "codebook")?;
        // Cosine: the floored norms of the original codes, for the normalised copy and for the
        // exact re-rank's divisor.
        let code_norms: Vec<f64> = match metric {
            Metric::Euclidean => Vec::new(),
            Metric::Cosine => codebook
                .rows()
                .into_iter()
                .map(|row| norm_f64(row).max(f64::from(COSINE_EPS)))
                .collect(),
        };
        let (prepared, (centre, scale)) = match metric {
            Metric::Euclidean => {
                let mean = coordinate_medians(codebook);
                let centred = |i: usize, j: usize| f64::from(codebook[[i, j]]) - mean[j];
                let max_norm = (0..k)
                    .map(|i| (0..d).map(|j| centred(i, j).powi(2)).sum::<f64>())
                    .fold(0f64, f64::max)
                    .sqrt();
                let scale = match max_norm > 0.0 {
                    true => 2f64.powi(-(max_norm.log2().floor() as i32)),
                    false => 1.0,
                };
                let prepared =
                    Array2::from_shape_fn((k, d), |(i, j)| (centred(i, j) * scale) as f32);
                (prepared, (mean, scale))
            }
            Metric::Cosine => {
                // ĉ_k − m with m the mean of the ĉ_k (in f64 from the original codes, so that
                // each stored difference is exact to f32 rounding of its own size): x̂·m is
                // common to all codes, and codes crowded around one direction (data offset by
                // a constant) no longer all fall inside the rounding bound of x̂·ĉ.
                let unit: Vec<Vec<f64>> = codebook
                    .rows()
                    .into_iter()
                    .zip(&code_norms)
                    .map(|(row, &n)| row.iter().map(|&v| f64::from(v) / n).collect())
                    .collect();
                let mut mean = vec![0f64; d];
                for row in &unit {
                    for (m, v) in mean.iter_mut().zip(row) {
                        *m += v / k as f64;
                    }
                }
                let prepared =
                    Array2::from_shape_fn((k, d), |(i, j)| (unit[i][j] - mean[j]) as f32);
                (prepared, (mean, 1.0))
            }
        };
        let norms: Vec<f64> = prepared.rows().into_iter().map(norm_f64).collect();
        let max_norm = norms.iter().copied().fold(0.0, f64::max);
        // A multiple of both LANES and CHUNK.
        let padded = k.div_ceil(CHUNK) * CHUNK;
        let mut bias = Array1::from_elem(padded, f32::INFINITY);
        for (i, (b, &n)) in bias.iter_mut().zip(&norms).enumerate() {
            *b = match metric {
                Metric::Euclidean => (0.5 * n * n) as f32,
                // x̂·ĉ_k = x̂·m + (x̂ − m)·(ĉ_k − m) + m·(ĉ_k − m): the first term is common to
                // every code, the second is the kernel's dot product of centred vectors (small
                // when the directions crowd), the third this per-code term.
                Metric::Cosine => {
                    let row = codebook.row(i);
                    -(0..d)
                        .map(|j| centre[j] * (f64::from(row[j]) / code_norms[i] - centre[j]))
                        .sum::<f64>() as f32
                }
            };
        }
        let max_bias = bias
            .iter()
            .take(k)
            .map(|b| f64::from(*b).abs())
            .fold(0.0, f64::max);
        // Cosine: x̂, ĉ_k and m·(ĉ_k − m) in f64, each within (D + 3) f64 roundings of
        // magnitude-1 terms.
        let abs_err = match metric {
            Metric::Euclidean => 0.0,
            Metric::Cosine => 4.0 * (d as f64 + 3.0) * f64::EPSILON,
        };
        let small = (d <= SMALL_D_MAX).then(|| {
            let mut cols = vec![[0f32; CHUNK]; k.div_ceil(CHUNK) * d];
            for (j, row) in prepared.rows().into_iter().enumerate() {
                for (dd, &v) in row.iter().enumerate() {
                    cols[(j / CHUNK) * d + dd][j % CHUNK] = v;
                }
            }
            let bias = bias
                .as_slice()
                .expect("contiguous")
                .chunks_exact(CHUNK)
                .map(|c| c.try_into().expect("CHUNK-sized"))
                .collect();
            SmallKernel { cols, bias }
        });
        Ok(Self {
            codebook,
            metric,
            prepared,
            bias,
            centre,
            scale,
            norms,
            max_norm,
            max_bias,
            abs_err,
            small,
            code_norms,
        })
    }

    /// Number of codes K.
    pub fn len(&self) -> usize {
        self.codebook.nrows()
    }

    /// Always false: an index has at least one code.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Code dimension D.
    pub fn dim(&self) -> usize {
        self.codebook.ncols()
    }

    /// The lookup metric.
    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// The original codebook.
    pub fn codebook(&self) -> ArrayView2<'a, f32> {
        self.codebook
    }

    /// Index of the nearest code for every row of `x` (N×D).
    ///
    /// # Errors
    /// [`VqError::ShapeMismatch`] if `x` has another dimension than the codebook;
    /// [`VqError::NonFinite`] if `x` holds NaN or an infinity.
    pub fn search(&self, x: ArrayView2<f32>) -> Result<Array1<u32>> {
        let mut out = Array1::zeros(x.nrows());
        self.search_into(x, out.as_slice_mut().expect("fresh array is contiguous"))?;
        Ok(out)
    }

    /// As [`search`](Self::search), writing into `out` (length N).
    ///
    /// # Errors
    /// As [`search`](Self::search), plus [`VqError::ShapeMismatch`] if `out.len() != N`.
    pub fn search_into(&self, x: ArrayView2<f32>, out: &mut [u32]) -> Result<()> {
        if x.ncols() != self.dim() {
            return Err(VqError::ShapeMismatch {
                what: "input dim vs codebook dim",
                expected: self.dim(),
                got: x.ncols(),
            });
        }
        if out.len() != x.nrows() {
            return Err(VqError::ShapeMismatch {
                what: "output length vs input rows",
                expected: x.nrows(),
                got: out.len(),
            });
        }
        check_finite(x, "inputs")?;
        x.axis_chunks_iter(Axis(0), ROW_TILE)
            .into_par_iter()
            .zip(out.par_chunks_mut(ROW_TILE))
            .for_each_init(
                // The register kernel needs no score block.
                || {
                    Scratch::new(
                        self.dim(),
                        if self.small.is_some() { 0 } else { self.len() },
                    )
                },
                |scratch, (tile, out)| {
                    self.search_tile(tile, out, scratch);
                },
            );
        Ok(())
    }

    /// Rounding bound of the f32 score of a code of prepared norm `r` and bias magnitude
    /// `bias_abs` for a prepared row of norm `n`: |computed − true| ≤ (D + 8)·ε·(n·r + |bias|),
    /// plus the absolute error of up to D + 8 roundings in the subnormal range and of the f64
    /// preparation. (ε = 2u: a factor 2 of margin.)
    fn err_of(&self, n: f64, r: f64, bias_abs: f64) -> f64 {
        let h = self.dim() as f64 + 8.0;
        h * (f64::from(f32::EPSILON) * (n * r + bias_abs) + f64::from(f32::from_bits(1)))
            + self.abs_err
    }

    /// [`err_of`](Self::err_of) for code `j`.
    fn score_err(&self, n: f64, j: u32) -> f64 {
        let j = j as usize;
        self.err_of(n, self.norms[j], f64::from(self.bias[j]).abs())
    }

    /// The band around the best score `best` (code `idx`) of a row of norm `n` within which
    /// another code may still be the nearest: the best's own error plus the largest error of a
    /// code that could contend. Each code's error grows with its norm, so one far code must
    /// not widen every row's band: for Euclidean scores `½r² − x̄·c̄ ≥ ½r² − n·r`, a code of
    /// norm r contends only if `½r² − n·r − 2·err(r) ≤ best + err_best`, which bounds r.
    fn band(&self, n: f64, best: f32, idx: u32) -> f64 {
        if idx as usize >= self.len() || !best.is_finite() {
            return f64::INFINITY;
        }
        let eb = self.score_err(n, idx);
        let (r, bias) = match self.metric {
            Metric::Euclidean => {
                let r = self.contender_radius(n, f64::from(best) + eb);
                (r, 0.5 * r * r)
            }
            Metric::Cosine => (self.max_norm, self.max_bias),
        };
        eb + self.err_of(n, r, bias)
    }

    /// The largest norm r (at most the codebook's) of a code whose Euclidean score can be at
    /// most `limit` within its rounding bound: the root of
    /// `½(1 − 2hε)r² − (1 + 2hε)n·r − 2h·tiny − limit = 0`, h = D + 8.
    fn contender_radius(&self, n: f64, limit: f64) -> f64 {
        let h = self.dim() as f64 + 8.0;
        let he = 2.0 * h * f64::from(f32::EPSILON);
        let a = 0.5 * (1.0 - he);
        if a <= 0.0 {
            return self.max_norm;
        }
        let b = n * (1.0 + he);
        let c = limit + 2.0 * h * f64::from(f32::from_bits(1));
        let disc = b * b + 4.0 * a * c;
        if disc.is_nan() {
            return self.max_norm;
        }
        let r = (b + disc.max(0.0).sqrt()) / (2.0 * a);
        // A relative margin for the f64 evaluation of the root.
        (r * (1.0 + 1e-9)).min(self.max_norm)
    }

    fn search_tile(&self, tile: ArrayView2<f32>, out: &mut [u32], sc: &mut Scratch) {
        let rows = tile.nrows();
        let k = self.len();
        // Prepare the row tile: centred and scaled (Euclidean) or normalised and centred
        // (cosine) copy; per row its norm, and whether its f32 scores could overflow.
        let mut xt = sc.x.slice_mut(s![..rows, ..]);
        for (r, (mut dst, src)) in xt.rows_mut().into_iter().zip(tile.rows()).enumerate() {
            // (x·pre − centre)·post: (x − μ)·scale, or x/‖x‖ − m (the floor on ‖x‖ of the cosine
            // is a factor common to every code, so it does not change the ranking; a zero row
            // ties everywhere).
            let (pre, post) = match self.metric {
                Metric::Euclidean => (1.0, self.scale),
                Metric::Cosine => {
                    let n = norm_f64(src);
                    (if n > 0.0 { 1.0 / n } else { 0.0 }, 1.0)
                }
            };
            dst.iter_mut()
                .zip(src)
                .zip(&self.centre)
                .for_each(|((o, &v), &m)| *o = ((f64::from(v) * pre - m) * post) as f32);
            let n = norm_f64(dst.view());
            sc.n[r] = n;
            // Scores and partial dots are bounded by ‖x̄‖‖c̄‖ + |bias|; beyond half of f32's
            // range they may overflow, and the f32 bounds say nothing.
            sc.exact_all[r] = n * self.max_norm + self.max_bias >= 0.5 * f64::from(f32::MAX);
        }
        if let Some(small) = &self.small {
            self.search_tile_small(tile, out, sc, small);
            return;
        }
        for r in 0..rows {
            sc.state[r] = RowState::default();
            sc.cands[r].clear();
        }
        let xt = sc.x.slice(s![..rows, ..]);
        let mut k0 = 0;
        while k0 < k {
            let k1 = (k0 + CODE_BLOCK).min(k);
            let kb = k1 - k0;
            let kb_pad = kb.div_ceil(LANES) * LANES;
            let mut scores = sc.scores.slice_mut(s![..rows, ..kb]);
            general_mat_mul(
                1.0,
                &xt,
                &self.prepared.slice(s![k0..k1, ..]).t(),
                0.0,
                &mut scores,
            );
            let bias = &self.bias.as_slice().expect("contiguous")[k0..k0 + kb_pad];
            for r in 0..rows {
                let row = &mut sc.scores.row_mut(r).into_slice().expect("contiguous")[..kb_pad];
                // Padding lanes score +∞ through their bias; give them a finite dot product.
                row[kb..].fill(0.0);
                let (bv, bi, sv) = scan_top2(row, bias, k0 as u32);
                let st = &mut sc.state[r];
                let old = (st.best, st.idx);
                if bv < st.best {
                    st.second = st.best.min(sv);
                    st.best = bv;
                    st.idx = bi;
                } else {
                    st.second = st.second.min(bv);
                }
                if sc.exact_all[r] || st.idx as usize >= k {
                    continue;
                }
                let n = sc.n[r];
                let band = self.band(n, st.best, st.idx);
                if f64::from(st.second) - f64::from(st.best) <= band {
                    // Ambiguous so far: remember every code of this block that may still be
                    // the nearest (its score less its error within the best's score plus the
                    // best's error: then, and only then, its true score can be the lowest),
                    // and the previous best if the new one displaced it. Any code's true score
                    // is at least the true nearest one's, so a bound from the current best
                    // never drops the nearest code.
                    let limit = f64::from(st.best) + self.score_err(n, st.idx);
                    let cands = &mut sc.cands[r];
                    let contends = |j: u32, v: f32| f64::from(v) - self.score_err(n, j) <= limit;
                    if old.1 != st.idx && old.0.is_finite() && contends(old.1, old.0) {
                        cands.push((old.1, old.0));
                    }
                    let coarse = f64::from(st.best) + band;
                    for (j, (&s, &b)) in row[..kb].iter().zip(bias).enumerate() {
                        let v = b - s;
                        let j = k0 as u32 + j as u32;
                        if f64::from(v) <= coarse && cands.len() <= MAX_CANDIDATES && contends(j, v)
                        {
                            cands.push((j, v));
                            if cands.len() > MAX_CANDIDATES {
                                // Codes recorded under an earlier, higher best may have left
                                // the band since: drop them before giving up on the list.
                                cands.retain(|c| contends(c.0, c.1));
                            }
                        }
                    }
                }
            }
            k0 = k1;
        }
        for r in 0..rows {
            let st = sc.state[r];
            let n = sc.n[r];
            out[r] = if sc.exact_all[r] || st.idx as usize >= k {
                // Scores that overflowed f32 (|x̄|·|c̄| or ½|c̄|² beyond f32's range): the f32
                // bounds say nothing, so every code is scored exactly.
                self.exact_argmin(tile.row(r), 0..k as u32)
            } else if f64::from(st.second) - f64::from(st.best) <= self.band(n, st.best, st.idx) {
                let cands = &mut sc.cands[r];
                if cands.len() > MAX_CANDIDATES {
                    self.exact_argmin(tile.row(r), 0..k as u32)
                } else {
                    let limit = f64::from(st.best) + self.score_err(n, st.idx);
                    cands.push((st.idx, st.best));
                    cands.retain(|c| f64::from(c.1) - self.score_err(n, c.0) <= limit);
                    cands.sort_unstable_by_key(|c| c.0);
                    cands.dedup_by_key(|c| c.0);
                    self.exact_argmin(tile.row(r), cands.iter().map(|c| c.0))
                }
            } else {
                st.idx
            };
        }
    }

    /// Register kernel for small D: the scores of CHUNK codes at a time live in one vector
    /// register and fold straight into a lane-wise top-2; there is no score matrix. Rows whose
    /// top-2 gap is within the band are re-scored and their contenders re-ranked exactly.
    fn search_tile_small(
        &self,
        tile: ArrayView2<f32>,
        out: &mut [u32],
        sc: &mut Scratch,
        small: &SmallKernel,
    ) {
        let d = self.dim();
        let k = self.len();
        let (chunked, bias) = (&small.cols, &small.bias);
        for (r, o) in out.iter_mut().enumerate().take(tile.nrows()) {
            let x = sc.x.row(r);
            let x = x.as_slice().expect("scratch rows are contiguous");
            let (best, idx, second) = chunk_top2(x, chunked, bias, d);
            let n = sc.n[r];
            let band = self.band(n, best, idx);
            *o = if sc.exact_all[r] || idx as usize >= k || !band.is_finite() {
                // Overflowed scores (see search_tile): every code exactly.
                self.exact_argmin(tile.row(r), 0..k as u32)
            } else if f64::from(second) - f64::from(best) <= band {
                // Cold path: re-score every code (a chunk of CHUNK lanes at a time, as the
                // kernel does, lanes within the band found by one vector compare), keep the
                // contenders and re-rank them exactly; stop collecting once there are more
                // candidates than the exact re-rank takes.
                let cands = &mut sc.cands[r];
                cands.clear();
                let coarse = round_up(f64::from(best) + band);
                chunk_candidates(x, chunked, bias, d, k, coarse, cands);
                if cands.len() > MAX_CANDIDATES {
                    self.exact_argmin(tile.row(r), 0..k as u32)
                } else {
                    let limit = f64::from(best) + self.score_err(n, idx);
                    cands.retain(|c| f64::from(c.1) - self.score_err(n, c.0) <= limit);
                    self.exact_argmin(tile.row(r), cands.iter().map(|c| c.0))
                }
            } else {
                idx
            };
        }
    }

    /// Exact argmin over `candidates` (ascending) on the original vectors; ties go to the
    /// first candidate.
    ///
    /// Euclidean: `‖c‖² − 2x·c` (‖x − c‖² less the common ‖x‖²) from products of f32 values,
    /// which are exact in f64, summed in double-double (error below 2⁻¹⁰⁰ of the terms'
    /// magnitudes), so that codes whose distances differ in the 16th digit — a row far larger
    /// than the codes, say — are still told apart. Cosine: `−x·c / max(‖c‖, ε)` in f64. Two
    /// candidates closer than those values' error bounds are compared in exact arithmetic
    /// ([`crate::exact`]), so exact ties — and only they — go to the lower index.
    fn exact_argmin(&self, x: ArrayView1<f32>, candidates: impl Iterator<Item = u32>) -> u32 {
        let xs = x.to_vec();
        let code = |c: u32| self.codebook.row(c as usize).to_vec();
        // (value, error bound, index) of the best so far.
        let mut best: Option<(f64, f64, u32)> = None;
        for c in candidates {
            let (v, err) = self.approx_score(&xs, c);
            let better = match best {
                None => true,
                Some((bv, be, bi)) => {
                    if v + err < bv - be {
                        true
                    } else if v - err > bv + be {
                        false
                    } else {
                        let (a, b) = (code(c), code(bi));
                        let order = match self.metric {
                            Metric::Euclidean => crate::exact::cmp_squared_distance(&xs, &a, &b),
                            Metric::Cosine => crate::exact::cmp_cosine(&xs, &a, &b, COSINE_EPS),
                        };
                        // Candidates come in ascending order: an exact tie keeps the first.
                        order == std::cmp::Ordering::Less
                    }
                }
            };
            if better {
                best = Some((v, err, c));
            }
        }
        best.map_or(0, |b| b.2)
    }

    /// The score of code `c` for row `x` as the exact re-rank computes it, and a bound on its
    /// error: Euclidean `‖c‖² − 2x·c` in double-double (error ≤ 2⁻¹⁰⁰·Σ|terms|·(2D + 2)),
    /// cosine `−x·c / max(‖c‖, ε)` in f64 (error ≤ (D + 4)·2⁻⁵²·(Σ|x_i c_i| / max(‖c‖, ε))).
    fn approx_score(&self, x: &[f32], c: u32) -> (f64, f64) {
        let row = self.codebook.row(c as usize);
        let d = self.dim() as f64;
        match self.metric {
            Metric::Euclidean => {
                let (mut v, mut mag) = (DoubleDouble::default(), 0f64);
                for (&a, &b) in x.iter().zip(row) {
                    let (a, b) = (f64::from(a), f64::from(b));
                    v.add(b * b);
                    v.add(-2.0 * a * b);
                    mag += b * b + (2.0 * a * b).abs();
                }
                // The double-double's own error, and the rounding of hi + lo to one f64.
                let value = v.hi + v.lo;
                let err = (2.0 * d + 2.0) * mag * 2f64.powi(-100) + value.abs() * f64::EPSILON;
                (value, err)
            }
            Metric::Cosine => {
                let (mut xy, mut mag) = (0f64, 0f64);
                for (&a, &b) in x.iter().zip(row) {
                    let p = f64::from(a) * f64::from(b);
                    xy += p;
                    mag += p.abs();
                }
                let norm = self.code_norms[c as usize];
                let v = -xy / norm;
                let err = (d + 4.0) * f64::EPSILON * (mag / norm + v.abs());
                (v, err)
            }
        }
    }
}

/// An unevaluated sum `hi + lo` accumulated with Knuth's TwoSum (the rounding error of every
/// addition is kept in `lo`).
#[derive(Debug, Clone, Copy, Default)]
struct DoubleDouble {
    hi: f64,
    lo: f64,
}

impl DoubleDouble {
    fn add(&mut self, t: f64) {
        let s = self.hi + t;
        let bb = s - self.hi;
        let err = (self.hi - (s - bb)) + (t - bb);
        self.hi = s;
        self.lo += err;
    }
}

/// Per dimension, the median of the codes (the lower middle value for even K): the Euclidean
/// centre. Distances are translation invariant, so any centre is exact; the median keeps the
/// bulk of the codes — and the rows near them — small after centring, where the mean would move
/// toward a few far codes (a dead or runaway code, norms spread over decades) and leave every
/// near code a large vector whose scores lose their last digits to cancellation.
fn coordinate_medians(codebook: ArrayView2<f32>) -> Vec<f64> {
    let mut column = Vec::with_capacity(codebook.nrows());
    codebook
        .columns()
        .into_iter()
        .map(|c| {
            column.clear();
            column.extend(c.iter().copied());
            let mid = (column.len() - 1) / 2;
            let (_, m, _) = column.select_nth_unstable_by(mid, f32::total_cmp);
            f64::from(*m)
        })
        .collect()
}

/// The smallest f32 at least `v`.
fn round_up(v: f64) -> f32 {
    let f = v as f32;
    if f64::from(f) >= v || !f.is_finite() {
        f
    } else if f >= 0.0 {
        f32::from_bits(f.to_bits() + 1)
    } else {
        f32::from_bits(f.to_bits() - 1)
    }
}

/// ‖v‖ accumulated in f64 (no overflow or underflow of the squares of f32 values).
fn norm_f64(v: ArrayView1<f32>) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// Running top-2 of one row.
#[derive(Debug, Clone, Copy)]
struct RowState {
    best: f32,
    idx: u32,
    second: f32,
}

impl Default for RowState {
    fn default() -> Self {
        Self {
            best: f32::INFINITY,
            idx: 0,
            second: f32::INFINITY,
        }
    }
}

/// Per-thread buffers.
#[derive(Debug)]
struct Scratch {
    x: Array2<f32>,
    scores: Array2<f32>,
    /// Per row of the tile: the prepared row's norm, and whether its scores may overflow.
    n: Vec<f64>,
    exact_all: Vec<bool>,
    state: Vec<RowState>,
    cands: Vec<Vec<(u32, f32)>>,
}

impl Scratch {
    fn new(d: usize, k: usize) -> Self {
        let kb = k.min(CODE_BLOCK).div_ceil(LANES) * LANES;
        Self {
            x: Array2::zeros((ROW_TILE, d)),
            scores: Array2::zeros((ROW_TILE, kb)),
            n: vec![0.0; ROW_TILE],
            exact_all: vec![false; ROW_TILE],
            state: vec![RowState::default(); ROW_TILE],
            cands: vec![Vec::new(); ROW_TILE],
        }
    }
}

/// Lane-wise running top-2 over 8 lanes (value and chunk of the best; value of the second best)
/// in SIMD registers. Lane `l` of chunk `c` is code `8c + l`; chunk numbers are kept as f32
/// (exact below 2²⁴ chunks). Ties keep the lowest index.
#[derive(Debug, Clone, Copy)]
struct LaneTop2 {
    bv: f32x8,
    bc: f32x8,
    sv: f32x8,
}

impl LaneTop2 {
    fn new() -> Self {
        Self {
            bv: f32x8::splat(f32::INFINITY),
            bc: f32x8::splat(0.0),
            sv: f32x8::splat(f32::INFINITY),
        }
    }

    /// Offers the scores `v` of the codes `8·chunk + l`.
    #[inline(always)]
    fn offer(&mut self, v: f32x8, chunk: f32) {
        let lt = v.cmp_lt(self.bv);
        let hi = lt.blend(self.bv, v);
        self.sv = hi.cmp_lt(self.sv).blend(hi, self.sv);
        self.bc = lt.blend(f32x8::splat(chunk), self.bc);
        self.bv = lt.blend(v, self.bv);
    }

    /// (best value, its code index, second-best value) over all lanes.
    fn reduce(&self) -> (f32, u32, f32) {
        reduce_lanes(
            &self.bv.to_array(),
            &self.bc.to_array(),
            &self.sv.to_array(),
        )
    }
}

/// Merges lane-wise top-2 states (best value and chunk per lane, second-best value per lane;
/// lane `l` of chunk `c` is code `c·L + l`) into (best value, its code index, second best).
fn reduce_lanes<const L: usize>(bv: &[f32; L], bc: &[f32; L], sv: &[f32; L]) -> (f32, u32, f32) {
    let index = |l: usize| bc[l] as u32 * L as u32 + l as u32;
    let mut best = 0;
    for l in 1..L {
        if bv[l] < bv[best] || (bv[l] == bv[best] && index(l) < index(best)) {
            best = l;
        }
    }
    let mut second = f32::INFINITY;
    for l in 0..L {
        second = second.min(sv[l]);
        if l != best {
            second = second.min(bv[l]);
        }
    }
    (bv[best], index(best), second)
}

/// Top-2 over all chunks of the register kernel for one prepared row `x` (length D):
/// scores `bias − x·c` of CHUNK codes per vector register, folded into lane-wise top-2 state.
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
fn chunk_top2(
    x: &[f32],
    chunked: &[[f32; CHUNK]],
    bias: &[[f32; CHUNK]],
    d: usize,
) -> (f32, u32, f32) {
    let xs: Vec<f32x8> = x.iter().map(|&v| f32x8::splat(v)).collect();
    let mut top = LaneTop2::new();
    for (c, (cols, b)) in chunked.chunks_exact(d).zip(bias).enumerate() {
        let s = xs.iter().zip(cols).fold(f32x8::new(*b), |s, (&xv, col)| {
            xv.mul_neg_add(f32x8::new(*col), s)
        });
        top.offer(s, c as f32);
    }
    top.reduce()
}

/// As the portable version, with 16-lane AVX-512 registers and mask blends.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
fn chunk_top2(
    x: &[f32],
    chunked: &[[f32; CHUNK]],
    bias: &[[f32; CHUNK]],
    d: usize,
) -> (f32, u32, f32) {
    use std::arch::x86_64::{
        _CMP_LT_OQ, _mm512_cmp_ps_mask, _mm512_fnmadd_ps, _mm512_loadu_ps, _mm512_mask_blend_ps,
        _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
    };
    let (mut bv, mut bc, mut sv) = ([0f32; CHUNK], [0f32; CHUNK], [0f32; CHUNK]);
    // SAFETY: avx512f is enabled for this compilation (the cfg above). Every load and store
    // reads or writes exactly one `[f32; 16]` through a pointer to that array.
    unsafe {
        let (mut vb, mut vc, mut vs) = (
            _mm512_set1_ps(f32::INFINITY),
            _mm512_setzero_ps(),
            _mm512_set1_ps(f32::INFINITY),
        );
        for (c, (cols, b)) in chunked.chunks_exact(d).zip(bias).enumerate() {
            let mut s = _mm512_loadu_ps(b.as_ptr());
            for (col, &xv) in cols.iter().zip(x) {
                s = _mm512_fnmadd_ps(_mm512_set1_ps(xv), _mm512_loadu_ps(col.as_ptr()), s);
            }
            let lt = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(s, vb);
            let hi = _mm512_mask_blend_ps(lt, s, vb); // lt ? best : s
            vs = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(hi, vs), vs, hi);
            vc = _mm512_mask_blend_ps(lt, vc, _mm512_set1_ps(c as f32));
            vb = _mm512_mask_blend_ps(lt, vb, s);
        }
        _mm512_storeu_ps(bv.as_mut_ptr(), vb);
        _mm512_storeu_ps(bc.as_mut_ptr(), vc);
        _mm512_storeu_ps(sv.as_mut_ptr(), vs);
    }
    reduce_lanes(&bv, &bc, &sv)
}

/// The codes whose register-kernel score `bias − x·c` is at most `limit` (padding lanes, index
/// ≥ `k`, excluded), pushed to `cands` as (index, score) in index order; stops once more than
/// [`MAX_CANDIDATES`] are found. The scores are computed as [`chunk_top2`] computes them; one
/// vector compare per chunk finds the lanes within the band, so only those cost a branch.
fn chunk_candidates(
    x: &[f32],
    chunked: &[[f32; CHUNK]],
    bias: &[[f32; CHUNK]],
    d: usize,
    k: usize,
    limit: f32,
    cands: &mut Vec<(u32, f32)>,
) {
    let mut scores = [0f32; CHUNK];
    for (c, (cols, b)) in chunked.chunks_exact(d).zip(bias).enumerate() {
        let mut mask = chunk_scores_at_most(x, cols, b, limit, &mut scores);
        // The last chunk's padding lanes (index ≥ K) are not codes.
        let valid = k - c * CHUNK;
        if valid < CHUNK {
            mask &= (1u32 << valid) - 1;
        }
        while mask != 0 {
            let l = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            cands.push(((c * CHUNK + l) as u32, scores[l]));
            if cands.len() > MAX_CANDIDATES {
                return;
            }
        }
    }
}

/// One chunk's scores `b − Σ x_i·cols_i` (fused multiply-adds, as in [`chunk_top2`]) into
/// `out`, and the bit mask of the lanes whose score is at most `limit`.
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
#[inline]
fn chunk_scores_at_most(
    x: &[f32],
    cols: &[[f32; CHUNK]],
    b: &[f32; CHUNK],
    limit: f32,
    out: &mut [f32; CHUNK],
) -> u32 {
    use wide::CmpLe;
    let s = x.iter().zip(cols).fold(f32x8::new(*b), |s, (&xv, col)| {
        f32x8::splat(xv).mul_neg_add(f32x8::new(*col), s)
    });
    *out = s.to_array();
    s.cmp_le(f32x8::splat(limit)).move_mask() as u32
}

/// As the portable version, with 16-lane AVX-512 registers.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
#[inline]
fn chunk_scores_at_most(
    x: &[f32],
    cols: &[[f32; CHUNK]],
    b: &[f32; CHUNK],
    limit: f32,
    out: &mut [f32; CHUNK],
) -> u32 {
    use std::arch::x86_64::{
        _CMP_LE_OQ, _mm512_cmp_ps_mask, _mm512_fnmadd_ps, _mm512_loadu_ps, _mm512_set1_ps,
        _mm512_storeu_ps,
    };
    // SAFETY: avx512f is enabled for this compilation (the cfg above). Every load and store
    // reads or writes exactly one `[f32; 16]` through a pointer to that array.
    unsafe {
        let mut s = _mm512_loadu_ps(b.as_ptr());
        for (col, &xv) in cols.iter().zip(x) {
            s = _mm512_fnmadd_ps(_mm512_set1_ps(xv), _mm512_loadu_ps(col.as_ptr()), s);
        }
        _mm512_storeu_ps(out.as_mut_ptr(), s);
        u32::from(_mm512_cmp_ps_mask::<_CMP_LE_OQ>(s, _mm512_set1_ps(limit)))
    }
}

/// Top-2 of `bias_k − dot_k` over one block (lengths a multiple of LANES); see [`LaneTop2`].
#[inline]
fn scan_top2(dots: &[f32], bias: &[f32], k0: u32) -> (f32, u32, f32) {
    let mut top = LaneTop2::new();
    for (c, (dc, hc)) in dots
        .chunks_exact(LANES)
        .zip(bias.chunks_exact(LANES))
        .enumerate()
    {
        let v =
            f32x8::new(hc.try_into().expect("LANES")) - f32x8::new(dc.try_into().expect("LANES"));
        top.offer(v, c as f32);
    }
    let (best, idx, second) = top.reduce();
    (best, k0 + idx, second)
}

/// Returns the first row of `a` holding a non-finite value as an error.
pub(crate) fn check_finite(a: ArrayView2<f32>, what: &'static str) -> Result<()> {
    match a
        .rows()
        .into_iter()
        .position(|r| !r.iter().all(|v| v.is_finite()))
    {
        Some(row) => Err(VqError::NonFinite { what, row }),
        None => Ok(()),
    }
}

/// Nearest code of every row of `x` (N×D) in `codebook` (K×D): a one-shot
/// [`CodebookIndex::search`].
///
/// ```
/// use ndarray::array;
/// use vq_core::{nearest_codes, Metric};
///
/// let codebook = array![[1.0f32, 0.0], [0.0, 1.0]];
/// let x = array![[10.0f32, 9.0], [-1.0, 3.0]];
/// assert_eq!(nearest_codes(x.view(), codebook.view(), Metric::Cosine).unwrap().to_vec(), vec![0, 1]);
/// ```
///
/// # Errors
/// See [`CodebookIndex::new`] and [`CodebookIndex::search`].
pub fn nearest_codes(
    x: ArrayView2<f32>,
    codebook: ArrayView2<f32>,
    metric: Metric,
) -> Result<Array1<u32>> {
    CodebookIndex::new(codebook, metric)?.search(x)
}

/// Rows of `codebook` selected by `indices`: the quantized vectors `q_n = c_{i_n}`.
///
/// ```
/// use ndarray::array;
/// let codebook = array![[1.0f32, 2.0], [3.0, 4.0]];
/// let q = vq_core::gather_codes(codebook.view(), &[1, 1, 0]).unwrap();
/// assert_eq!(q, array![[3.0, 4.0], [3.0, 4.0], [1.0, 2.0]]);
/// ```
///
/// # Errors
/// [`VqError::IndexOutOfRange`] if an index is ≥ K.
pub fn gather_codes(codebook: ArrayView2<f32>, indices: &[u32]) -> Result<Array2<f32>> {
    check_indices(indices, codebook.nrows())?;
    let mut out = Array2::zeros((indices.len(), codebook.ncols()));
    out.axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(indices.par_iter())
        .for_each(|(mut row, &i)| row.assign(&codebook.row(i as usize)));
    Ok(out)
}

/// Nearest-code search followed by the gather: returns `(indices, q)`.
///
/// # Errors
/// See [`nearest_codes`].
pub fn quantize(
    x: ArrayView2<f32>,
    codebook: ArrayView2<f32>,
    metric: Metric,
) -> Result<(Array1<u32>, Array2<f32>)> {
    let idx = nearest_codes(x, codebook, metric)?;
    let q = gather_codes(codebook, idx.as_slice().expect("fresh array is contiguous"))?;
    Ok((idx, q))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::randn;
    use ndarray::array;
    use proptest::prelude::*;

    /// `‖c‖² − 2x·c` for ranking codes: the 2D products (exact in f64) summed from the smallest
    /// magnitude up with compensation (Kahan–Babuška), independent of the index's double-double.
    fn exact_score(x: ArrayView1<f32>, c: ArrayView1<f32>) -> f64 {
        let mut terms: Vec<f64> = x
            .iter()
            .zip(c)
            .flat_map(|(&a, &b)| {
                let (a, b) = (f64::from(a), f64::from(b));
                [b * b, -2.0 * a * b]
            })
            .collect();
        terms.sort_by(|p, q| p.abs().total_cmp(&q.abs()));
        let (mut sum, mut comp) = (0f64, 0f64);
        for t in terms {
            let s = sum + t;
            comp += if sum.abs() >= t.abs() {
                (sum - s) + t
            } else {
                (t - s) + sum
            };
            sum = s;
        }
        sum + comp
    }

    /// Exact reference: f64 distances (compensated sums; −x·c/‖c‖ for cosine) to find the
    /// codes within 1e-9 (relative) of the best, then [`crate::exact`]'s integer arithmetic
    /// among those; exact ties to the lowest index.
    fn brute_force(x: ArrayView2<f32>, c: ArrayView2<f32>, metric: Metric) -> Vec<u32> {
        x.rows()
            .into_iter()
            .map(|xr| {
                let values: Vec<f64> = c
                    .rows()
                    .into_iter()
                    .map(|cr| match metric {
                        Metric::Euclidean => exact_score(xr, cr),
                        Metric::Cosine => {
                            let dot: f64 = xr
                                .iter()
                                .zip(cr)
                                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                                .sum();
                            // 1/max(‖x‖, ε) is common to every code: left out.
                            -dot / crate::testutil::norm64(cr).max(1e-12)
                        }
                    })
                    .collect();
                let best = values.iter().copied().fold(f64::INFINITY, f64::min);
                // Distances are ≥ 0 less the common ‖x‖²: scale the window by the terms.
                let scale = xr.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>()
                    + c.rows()
                        .into_iter()
                        .map(|r| r.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>())
                        .fold(0.0, f64::max);
                let window = 1e-9 * (best.abs() + scale.sqrt() + scale);
                let xs = xr.to_vec();
                let mut winner: Option<usize> = None;
                for (k, &v) in values.iter().enumerate() {
                    if v > best + window {
                        continue;
                    }
                    let better = match winner {
                        None => true,
                        Some(w) => {
                            let (a, b) = (c.row(k).to_vec(), c.row(w).to_vec());
                            let order = match metric {
                                Metric::Euclidean => {
                                    crate::exact::cmp_squared_distance(&xs, &a, &b)
                                }
                                Metric::Cosine => crate::exact::cmp_cosine(&xs, &a, &b, 1e-12),
                            };
                            order == std::cmp::Ordering::Less
                        }
                    };
                    if better {
                        winner = Some(k);
                    }
                }
                winner.unwrap_or(0) as u32
            })
            .collect()
    }

    fn check(x: &Array2<f32>, c: &Array2<f32>, metric: Metric) {
        let got = nearest_codes(x.view(), c.view(), metric).unwrap().to_vec();
        assert_eq!(
            got,
            brute_force(x.view(), c.view(), metric),
            "metric {metric:?}"
        );
    }

    #[test]
    fn matches_brute_force_across_tiles_and_code_blocks() {
        for (i, &(n, k, d)) in [
            (200, 37, 5),
            (130, 2500, 3),
            (65, 1025, 16),
            (1, 1, 1),
            (300, 9, 64),
            (150, 1100, 40),
        ]
        .iter()
        .enumerate()
        {
            let x = randn((n, d), 10 + i as u64);
            let c = randn((k, d), 20 + i as u64);
            check(&x, &c, Metric::Euclidean);
            check(&x, &c, Metric::Cosine);
        }
    }

    /// Far from the origin the ‖x‖² + ‖c‖² − 2x·c shortcut cancels catastrophically in f32.
    #[test]
    fn large_offset_is_exact_where_the_naive_shortcut_is_not() {
        let (n, k, d) = (512, 256, 32);
        let x = randn((n, d), 1) + 1000.0;
        let c = randn((k, d), 2) + 1000.0;
        let exact = brute_force(x.view(), c.view(), Metric::Euclidean);
        let naive: Vec<u32> = x
            .rows()
            .into_iter()
            .map(|xr| {
                let xx = xr.dot(&xr);
                let mut best = (f32::INFINITY, 0u32);
                for (j, cr) in c.rows().into_iter().enumerate() {
                    let v = xx + cr.dot(&cr) - 2.0 * xr.dot(&cr);
                    if v < best.0 {
                        best = (v, j as u32);
                    }
                }
                best.1
            })
            .collect();
        let naive_wrong = naive.iter().zip(&exact).filter(|(a, b)| a != b).count();
        assert!(
            naive_wrong > 10,
            "the test data must defeat the naive shortcut (wrong: {naive_wrong})"
        );
        check(&x, &c, Metric::Euclidean);
    }

    #[test]
    fn near_ties_are_re_ranked_exactly_and_exact_ties_go_to_the_lowest_index() {
        // Codes 1 and 3 are duplicates; code 2 differs from code 0 by one ulp.
        let c = ndarray::array![[1.0f32, 0.0], [0.0, 1.0], [1.0, f32::EPSILON], [0.0, 1.0]];
        let x = ndarray::array![[0.0f32, 2.0], [1.0, 1.0], [2.0, 0.5]];
        check(&x, &c, Metric::Euclidean);
        let got = nearest_codes(x.view(), c.view(), Metric::Euclidean).unwrap();
        assert_eq!(got[0], 1);
        // Many exact duplicates overflow the candidate list and take the exact full scan.
        let c = Array2::from_elem((100, 3), 0.5f32);
        let x = randn((10, 3), 5);
        assert!(
            nearest_codes(x.view(), c.view(), Metric::Euclidean)
                .unwrap()
                .iter()
                .all(|&i| i == 0)
        );
        assert!(
            nearest_codes(x.view(), c.view(), Metric::Cosine)
                .unwrap()
                .iter()
                .all(|&i| i == 0)
        );
    }

    /// Pairs of codes mirrored about rows near their bisector: the true gap between the two
    /// nearest codes runs through every size from far below to far above the f32 scores'
    /// rounding error (t log-uniform over eight decades), at several dimensions (the register
    /// kernel and the sgemm path), offsets and magnitudes. Every row must get the exact
    /// reference's code: a band narrower than the true rounding error misranks some of the
    /// rows whose gap falls between the two.
    #[test]
    fn mirrored_near_ties_get_the_exact_nearest_code() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for metric in [Metric::Euclidean, Metric::Cosine] {
            for (d, offset, magnitude) in [
                (3usize, 0.0f64, 1.0f64),
                (8, 30.0, 1.0),
                (32, 0.0, 1e3),
                (24, 1e3, 1e-2),
            ] {
                let k = 48;
                let mut c = randn((k, d), rng.r#gen()) * magnitude as f32 + offset as f32;
                let p: Vec<f64> = (0..d)
                    .map(|_| rng.gen_range(-1.0..1.0) * 20.0 * magnitude + offset)
                    .collect();
                // v ⟂ p (so that for cosine the two codes have nearly equal norms).
                let mut v: Vec<f64> = (0..d)
                    .map(|_| rng.gen_range(-1.0..1.0) * magnitude)
                    .collect();
                let pp: f64 = p.iter().map(|a| a * a).sum();
                let pv: f64 = p.iter().zip(&v).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(&p).for_each(|(b, a)| *b -= pv / pp * a);
                for j in 0..d {
                    c[[5, j]] = (p[j] + v[j]) as f32;
                    c[[17, j]] = (p[j] - v[j]) as f32;
                }
                // The rows gather around the stored codes' own midpoint and half-difference.
                let mid: Vec<f64> = (0..d)
                    .map(|j| (f64::from(c[[5, j]]) + f64::from(c[[17, j]])) / 2.0)
                    .collect();
                let v: Vec<f64> = (0..d)
                    .map(|j| (f64::from(c[[5, j]]) - f64::from(c[[17, j]])) / 2.0)
                    .collect();
                let vv: f64 = v.iter().map(|a| a * a).sum();
                let n = 4000;
                let x = Array2::from_shape_fn((n, d), |_| 0.0f32);
                let mut x = x;
                for mut row in x.rows_mut() {
                    let w: Vec<f64> = (0..d)
                        .map(|_| rng.gen_range(-1.0..1.0) * 0.3 * magnitude)
                        .collect();
                    let wv: f64 = w.iter().zip(&v).map(|(a, b)| a * b).sum();
                    let t = 10f64.powf(rng.gen_range(-12.0..-4.0))
                        * if rng.r#gen() { 1.0 } else { -1.0 };
                    for j in 0..d {
                        row[j] = (mid[j] + w[j] - wv / vv * v[j] + t * v[j]) as f32;
                    }
                }
                let got = nearest_codes(x.view(), c.view(), metric).unwrap().to_vec();
                let want = brute_force(x.view(), c.view(), metric);
                let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                assert!(
                    want.iter().filter(|&&i| i == 5).count() > n / 10
                        && want.iter().filter(|&&i| i == 17).count() > n / 10,
                    "{metric:?} D {d}: the rows are not near the mirrored pair: {:?}",
                    &want[..20]
                );
                assert_eq!(
                    wrong, 0,
                    "{metric:?} D {d} offset {offset} magnitude {magnitude}: {wrong} of {n} rows"
                );
            }
        }
    }

    /// A row equal to a code bit for bit, beside scaled copies of it: exact ×2 copies tie with
    /// it exactly (the lowest index wins), an inexact ×3 copy has a cosine below 1 in exact
    /// arithmetic even when f64 rounds it to 1.
    #[test]
    fn cosine_ties_with_scaled_copies_are_judged_exactly() {
        let base = randn((1, 16), 21);
        let c3 = base.mapv(|v| v * 3.0);
        assert!(
            c3.iter()
                .zip(base.iter())
                .any(|(&a, &b)| f64::from(a) != 3.0 * f64::from(b)),
            "the ×3 copy should round"
        );
        let c2 = base.mapv(|v| v * 2.0);
        let stack = |rows: &[&Array2<f32>]| {
            ndarray::concatenate(Axis(0), &rows.iter().map(|r| r.view()).collect::<Vec<_>>())
                .unwrap()
        };
        // Order: ×3 (inexact), the code, ×2 (exact): the code itself.
        let c = stack(&[&c3, &base, &c2]);
        let got = nearest_codes(base.view(), c.view(), Metric::Cosine).unwrap();
        assert_eq!(
            got[0],
            brute_force(base.view(), c.view(), Metric::Cosine)[0]
        );
        let tie = crate::exact::cmp_cosine(
            base.row(0).as_slice().unwrap(),
            c3.row(0).as_slice().unwrap(),
            base.row(0).as_slice().unwrap(),
            1e-12,
        );
        assert_eq!(
            got[0],
            if tie == std::cmp::Ordering::Equal {
                0
            } else {
                1
            }
        );
        // Order: ×2 (exact), the code: an exact tie, the lower index.
        let c = stack(&[&c2, &base]);
        assert_eq!(
            nearest_codes(base.view(), c.view(), Metric::Cosine).unwrap()[0],
            0
        );
        // Many rows at once, through both kernels' paths.
        for d in [4, 40] {
            let codes = randn((30, d), 3);
            let mut c = Array2::zeros((90, d));
            for i in 0..30 {
                c.row_mut(3 * i).assign(&codes.row(i).mapv(|v| v * 3.0));
                c.row_mut(3 * i + 1).assign(&codes.row(i));
                c.row_mut(3 * i + 2).assign(&codes.row(i).mapv(|v| v * 0.5));
            }
            check(&codes, &c, Metric::Cosine);
        }
    }

    #[test]
    fn zero_vectors_in_cosine_lookup_pick_the_first_code() {
        let c = randn((5, 4), 3);
        let x = Array2::zeros((3, 4));
        assert_eq!(
            nearest_codes(x.view(), c.view(), Metric::Cosine)
                .unwrap()
                .to_vec(),
            vec![0, 0, 0]
        );
    }

    #[test]
    fn bad_input_gives_typed_errors() {
        let c = randn((4, 3), 0);
        let empty = Array2::<f32>::zeros((0, 3));
        assert_eq!(
            CodebookIndex::new(empty.view(), Metric::Euclidean).unwrap_err(),
            VqError::EmptyCodebook { k: 0, d: 3 }
        );
        let x = randn((2, 5), 0);
        assert!(matches!(
            nearest_codes(x.view(), c.view(), Metric::Euclidean),
            Err(VqError::ShapeMismatch {
                expected: 3,
                got: 5,
                ..
            })
        ));
        let mut x = randn((3, 3), 0);
        x[[2, 1]] = f32::NAN;
        assert_eq!(
            nearest_codes(x.view(), c.view(), Metric::Euclidean).unwrap_err(),
            VqError::NonFinite {
                what: "inputs",
                row: 2
            }
        );
        let mut cb = c.clone();
        cb[[1, 0]] = f32::INFINITY;
        assert_eq!(
            CodebookIndex::new(cb.view(), Metric::Cosine).unwrap_err(),
            VqError::NonFinite {
                what: "codebook",
                row: 1
            }
        );
        assert_eq!(
            gather_codes(c.view(), &[0, 4]).unwrap_err(),
            VqError::IndexOutOfRange {
                index: 4,
                position: 1,
                k: 4
            }
        );
    }

    #[test]
    fn non_contiguous_inputs_are_accepted() {
        let x = randn((50, 12), 7);
        let c = randn((30, 12), 8);
        let xs = x.slice(s![..;2, ..;2]);
        let cs = c.slice(s![.., ..;2]);
        let got = nearest_codes(xs, cs, Metric::Euclidean).unwrap().to_vec();
        assert_eq!(got, brute_force(xs, cs, Metric::Euclidean));
    }

    #[test]
    fn crowded_directions_and_magnitudes_far_from_one_are_exact() {
        // Offset data (cosines crowd near 1: the centred cosine scores) and codebooks scaled to
        // 1e±30 (the power-of-two rescaling), on both kernels.
        for d in [8usize, 32] {
            let (x, c) = (randn((300, d), 5), randn((70, d), 6));
            for (xs, cs) in [
                (1.0f32, 1.0f32),
                (1e-30, 1e30),
                (1e30, 1e-30),
                (1e-30, 1e-30),
            ] {
                for offset in [0.0f32, 1000.0] {
                    let x = x.mapv(|v| (v + offset) * xs);
                    let c = c.mapv(|v| (v + offset) * cs);
                    check(&x, &c, Metric::Euclidean);
                    check(&x, &c, Metric::Cosine);
                }
            }
        }
    }

    #[test]
    fn scores_that_overflow_f32_are_searched_exactly() {
        let c = array![[0.0f32, 0.0, 0.0], [1.0, 1.0, 1.0]];
        for metric in [Metric::Euclidean, Metric::Cosine] {
            // An infinite tolerance used to let the padding lanes of the register kernel in.
            check(&array![[1e20f32, 0.0, 0.0]], &c, metric);
            // Scores that overflow to −∞ used to give index u32::MAX.
            check(&array![[3e38f32, 3e38, 3e38]], &c, metric);
            check(
                &array![[-3e38f32, 3e38, -3e38], [1e-30, 0.0, -1e-30]],
                &c,
                metric,
            );
        }
        // A code whose centred squared norm overflows f32 is still chosen when it is nearest.
        let mut c = Array2::zeros((3, 17));
        c.row_mut(1).fill(0.5);
        c[[2, 0]] = 4e19;
        let mut x = Array2::zeros((1, 17));
        x[[0, 0]] = 4e19;
        for metric in [Metric::Euclidean, Metric::Cosine] {
            assert_eq!(nearest_codes(x.view(), c.view(), metric).unwrap()[0], 2);
            check(&x, &c, metric);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Any finite magnitude of the codebook and of the rows (1e-30 … 3e38, independently),
        /// K below and above the register kernel's 16-code chunk, D on both kernels.
        #[test]
        fn prop_any_magnitude_gives_a_true_nearest_code(
            n in 1usize..40, k in 1usize..40, d in 1usize..=40, seed in 0u64..1000,
            lx in -30i32..=38, lc in -30i32..=38,
        ) {
            let mag = |l: i32| (10f64.powi(l) / (d as f64).sqrt()).min(3.4e38) as f32;
            let x = randn((n, d), seed).mapv(|v| (v / 4.0) * mag(lx));
            let c = randn((k, d), seed + 1).mapv(|v| (v / 4.0) * mag(lc));
            for metric in [Metric::Euclidean, Metric::Cosine] {
                let got = nearest_codes(x.view(), c.view(), metric).unwrap().to_vec();
                prop_assert!(got.iter().all(|&i| (i as usize) < k));
                prop_assert_eq!(got, brute_force(x.view(), c.view(), metric));
            }
        }

        #[test]
        fn prop_matches_brute_force(n in 1usize..140, k in 1usize..40, d in 1usize..10, seed in 0u64..1000, offset in prop_oneof![Just(0.0f32), Just(50.0)]) {
            let x = randn((n, d), seed) + offset;
            let c = randn((k, d), seed + 1) + offset;
            for metric in [Metric::Euclidean, Metric::Cosine] {
                let got = nearest_codes(x.view(), c.view(), metric).unwrap().to_vec();
                prop_assert_eq!(got, brute_force(x.view(), c.view(), metric));
            }
        }
    }
}
