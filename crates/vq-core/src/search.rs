//! Nearest-code search: a fused, tiled, multi-threaded kernel that never materialises the N×K
//! distance matrix.
//!
//! For Euclidean lookup, `argmin_k ‖x − c_k‖² = argmin_k (½‖c̄_k‖² − x̄·c̄_k)` where `x̄ = x − μ`,
//! `c̄_k = c_k − μ` and `μ` is the codebook mean (distances are translation invariant; centring
//! removes most of the cancellation of the `‖x‖² + ‖c‖² − 2x·c` shortcut when data sit far from
//! the origin); both sides are also multiplied by one power of two (exact) that brings the
//! largest centred code to a norm in [1, 2), so codebooks of any magnitude score in f32's range.
//! For cosine lookup, `argmax_k x̂·ĉ_k` on l2-normalised vectors, computed as
//! `argmin_k (−x̂·(ĉ_k − m))` with `m` the mean normalised code (the term `x̂·m` is common to all
//! codes; subtracting it keeps codes crowded around one direction apart).
//!
//! The scores of a tile of rows against a block of codes come from one sgemm into a small
//! per-thread buffer, followed by a branch-free top-2 scan. Any row whose best and second-best
//! scores are closer than a rounding-error bound is re-ranked exactly: the candidates within that
//! bound are compared on the original data with `‖c‖² − 2x·c` from exact f64 products summed in
//! double-double (or `−x·c/‖c‖` in f64 for the cosine). Ties then go to the lowest index, like
//! `torch.argmin`.
//!
//! Finite inputs of any magnitude (1e-30 … 3e38) give a true nearest code: the bound is computed
//! in f64 with an absolute term for subnormal rounding, and a row whose f32 scores could overflow
//! (‖x̄‖‖c̄‖ + ½‖c̄‖² beyond half of f32's range) is scored exactly against every code.
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
    /// ½‖c̄_k‖² (Euclidean) or 0 (cosine), padded to a multiple of LANES with +∞.
    bias: Array1<f32>,
    /// μ (Euclidean, f64) or empty (cosine).
    centre: Vec<f64>,
    /// Power of two the centred Euclidean vectors are multiplied by (exactly) so that the largest
    /// centred code has a norm in [1, 2): scores of codebooks of any magnitude stay in f32's
    /// range, away from overflow and from subnormals. 1 for cosine.
    scale: f64,
    /// max_k ‖c̄_k‖.
    max_norm: f64,
    /// max_k bias_k.
    max_bias: f64,
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
                let mut mean = vec![0f64; d];
                for row in codebook.rows() {
                    for (m, &v) in mean.iter_mut().zip(row) {
                        *m += f64::from(v) / k as f64;
                    }
                }
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
                (prepared, (Vec::new(), 1.0))
            }
        };
        let norms: Vec<f64> = prepared.rows().into_iter().map(norm_f64).collect();
        let max_norm = norms.iter().copied().fold(0.0, f64::max);
        // A multiple of both LANES and CHUNK.
        let padded = k.div_ceil(CHUNK) * CHUNK;
        let mut bias = Array1::from_elem(padded, f32::INFINITY);
        for (b, &n) in bias.iter_mut().zip(&norms) {
            *b = match metric {
                Metric::Euclidean => (0.5 * n * n) as f32,
                Metric::Cosine => 0.0,
            };
        }
        let max_bias = match metric {
            Metric::Euclidean => 0.5 * max_norm * max_norm,
            Metric::Cosine => 0.0,
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
            max_norm,
            max_bias,
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

    fn search_tile(&self, tile: ArrayView2<f32>, out: &mut [u32], sc: &mut Scratch) {
        let rows = tile.nrows();
        let d = self.dim();
        let k = self.len();
        // Bound of the f32 score error: relative (D + 8)·u of the terms, plus the absolute error
        // of up to D + 8 roundings in the subnormal range (tiny rows or codes), in f64 so that
        // the bound itself neither underflows nor hides an overflow (an infinite bound sends
        // the row to the exact scan).
        let (eps, tiny) = (f64::from(f32::EPSILON), f64::from(f32::from_bits(1)));
        let slack = 2.0 * (d as f64 + 8.0);
        // Prepare the row tile: centred or normalised copy; per-row tolerance.
        let mut xt = sc.x.slice_mut(s![..rows, ..]);
        for ((mut dst, src), tol) in xt.rows_mut().into_iter().zip(tile.rows()).zip(&mut sc.tol) {
            match self.metric {
                Metric::Euclidean => {
                    let scale = self.scale;
                    dst.iter_mut()
                        .zip(src)
                        .zip(&self.centre)
                        .for_each(|((o, &v), &m)| *o = ((f64::from(v) - m) * scale) as f32);
                    let n = norm_f64(dst.view());
                    // |error of bias_k − x̄·c̄_k| ≤ (D + 8)·u·(‖x̄‖‖c̄_k‖ + bias_k), doubled for
                    // the difference of two scores.
                    // Scores and partial dots are bounded by ‖x̄‖‖c̄‖ + bias; beyond half of
                    // f32's range they may overflow.
                    let bound = n * self.max_norm + self.max_bias;
                    *tol = if bound < 0.5 * f64::from(f32::MAX) {
                        (slack * (eps * bound + tiny)) as f32
                    } else {
                        f32::INFINITY
                    };
                }
                Metric::Cosine => {
                    // x/‖x‖ (the floor on ‖x‖ of the cosine is a factor common to every code,
                    // so it does not change the ranking; a zero row ties everywhere).
                    let n = norm_f64(src);
                    let inv = if n > 0.0 { 1.0 / n } else { 0.0 };
                    dst.iter_mut()
                        .zip(src)
                        .for_each(|(o, &v)| *o = (f64::from(v) * inv) as f32);
                    // |error of x̂·(ĉ_k − m)| ≤ (D + 8)·u·‖ĉ_k − m‖ (‖x̂‖ ≤ 1), doubled.
                    *tol = (slack * (eps * self.max_norm + tiny)) as f32;
                }
            }
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
                let tol = sc.tol[r];
                if st.second - st.best <= tol {
                    // Ambiguous so far: remember every code of this block within tolerance, and
                    // the previous best if the new one displaced it.
                    let cands = &mut sc.cands[r];
                    let limit = st.best + tol;
                    if old.1 != st.idx && old.0 <= limit {
                        cands.push((old.1, old.0));
                    }
                    for (j, (&s, &b)) in row[..kb].iter().zip(bias).enumerate() {
                        let v = b - s;
                        if v <= limit && cands.len() <= MAX_CANDIDATES {
                            cands.push((k0 as u32 + j as u32, v));
                            if cands.len() > MAX_CANDIDATES {
                                // Codes recorded under an earlier, higher best may have left
                                // the band since: drop them before giving up on the list.
                                cands.retain(|c| c.1 <= limit);
                            }
                        }
                    }
                }
            }
            k0 = k1;
        }
        for r in 0..rows {
            let st = sc.state[r];
            out[r] = if !sc.tol[r].is_finite() || st.idx as usize >= k {
                // Scores that overflowed f32 (|x̄|·|c̄| or ½|c̄|² beyond f32's range): the f32
                // bounds say nothing, so every code is scored exactly.
                self.exact_argmin(tile.row(r), 0..k as u32)
            } else if st.second - st.best <= sc.tol[r] {
                let cands = &mut sc.cands[r];
                if cands.len() > MAX_CANDIDATES {
                    self.exact_argmin(tile.row(r), 0..k as u32)
                } else {
                    let limit = st.best + sc.tol[r];
                    cands.push((st.idx, st.best));
                    cands.retain(|c| c.1 <= limit);
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
    /// top-2 gap is within tolerance are re-scored and re-ranked exactly.
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
            let tol = sc.tol[r];
            *o = if !tol.is_finite() || idx as usize >= k {
                // Overflowed scores (see search_tile): every code exactly.
                self.exact_argmin(tile.row(r), 0..k as u32)
            } else if second - best <= tol {
                // Cold path: re-score every code (a chunk of CHUNK lanes at a time, as the
                // kernel does, lanes within the band found by one vector compare) and re-rank
                // the near ties exactly; stop collecting once there are more candidates than
                // the exact re-rank takes.
                let cands = &mut sc.cands[r];
                cands.clear();
                chunk_candidates(x, chunked, bias, d, k, best + tol, cands);
                if cands.len() > MAX_CANDIDATES {
                    self.exact_argmin(tile.row(r), 0..k as u32)
                } else {
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
    /// which are exact in f64, summed in double-double (error ≈ 2⁻¹⁰⁶ of the terms' magnitudes),
    /// so that codes whose distances differ in the 16th digit — a row far larger than the
    /// codes, say — are still told apart. Cosine: `−x·c / ‖c‖` in f64.
    fn exact_argmin(&self, x: ArrayView1<f32>, candidates: impl Iterator<Item = u32>) -> u32 {
        if self.metric == Metric::Euclidean {
            let mut best = (DoubleDouble::default(), u32::MAX);
            for c in candidates {
                let mut v = DoubleDouble::default();
                for (&a, &b) in x.iter().zip(self.codebook.row(c as usize)) {
                    let (a, b) = (f64::from(a), f64::from(b));
                    v.add(b * b);
                    v.add(-2.0 * a * b);
                }
                if best.1 == u32::MAX || v.less_than(&best.0) {
                    best = (v, c);
                }
            }
            return best.1;
        }
        // −x·c/‖c‖: the common positive factor 1/max(‖x‖, ε) does not change the order (and
        // dividing by it would round exact ties apart).
        let mut best = (f64::INFINITY, u32::MAX);
        for c in candidates {
            let xy: f64 = x
                .iter()
                .zip(self.codebook.row(c as usize))
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            let v = -xy / self.code_norms[c as usize];
            if v < best.0 || best.1 == u32::MAX {
                best = (v, c);
            }
        }
        best.1
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

    /// `self < other`, from the difference of the parts (the highs subtract exactly when close).
    fn less_than(&self, other: &Self) -> bool {
        (self.hi - other.hi) + (self.lo - other.lo) < 0.0
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
    tol: Vec<f32>,
    state: Vec<RowState>,
    cands: Vec<Vec<(u32, f32)>>,
}

impl Scratch {
    fn new(d: usize, k: usize) -> Self {
        let kb = k.min(CODE_BLOCK).div_ceil(LANES) * LANES;
        Self {
            x: Array2::zeros((ROW_TILE, d)),
            scores: Array2::zeros((ROW_TILE, kb)),
            tol: vec![0.0; ROW_TILE],
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

    /// Exact reference: f64 distances, ties to the lowest index.
    fn brute_force(x: ArrayView2<f32>, c: ArrayView2<f32>, metric: Metric) -> Vec<u32> {
        x.rows()
            .into_iter()
            .map(|xr| {
                let mut best = (f64::INFINITY, 0u32);
                for (k, cr) in c.rows().into_iter().enumerate() {
                    let v = match metric {
                        Metric::Euclidean => exact_score(xr, cr),
                        Metric::Cosine => {
                            let dot: f64 = xr
                                .iter()
                                .zip(cr)
                                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                                .sum();
                            // 1/max(‖x‖, ε) is common to every code: left out, so that
                            // exact ties stay ties.
                            let nc = crate::testutil::norm64(cr).max(1e-12);
                            -dot / nc
                        }
                    };
                    if v < best.0 {
                        best = (v, k as u32);
                    }
                }
                best.1
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
