//! Quantizer families beyond one nearest-code lookup, as tokenizers in the field use them:
//! residual VQ, multi-head (grouped) VQ, SimVQ and FSQ. Each is built from the one-layer
//! [`Quantizer`] step (search, gather, estimator, losses) and is the reference that `vq-tch`'s
//! layers are tested against.
//!
//! * [`ResidualQuantizer`] (RQ-VAE, SoundStream; lucidrains' `ResidualVQ`): stage `g` quantizes
//!   the residual `r_g = e − Σ_{j<g} q_j` with its own codebook, the output is `q = Σ_g q_g`.
//!   As in lucidrains, `r_{g+1} = r_g − sg(q_g)`, so `∂r_g/∂e = I` and
//!   `∂L/∂e = Σ_g [E_g(∂L/∂q) + ∂ℓ_g/∂r_g]` with `E_g` the estimator's map from `r_g` to `q_g`
//!   (the rotation trick per stage) and `ℓ_g` the stage's commitment / codebook losses, which
//!   are **summed** over the stages.
//! * [`MultiHeadQuantizer`] (lucidrains' `VectorQuantize(heads = H)`): `e` (N×D) is split into H
//!   heads of `D/H` columns, each quantized with its own codebook or one shared codebook; the
//!   estimator acts per head and the losses are the **mean** over all N·D elements (the mean of
//!   the heads' losses).
//! * [`SimVq`] (Zhu et al. 2024; lucidrains' `SimVQ`): a frozen codebook `C` (K×D, drawn
//!   `N(0, 1/D)`) through a learned linear map, `C' = C Wᵀ`; nearest code in `C'`, the estimator
//!   from `e` to `q`, and the losses `‖sg(e) − q‖² + β‖e − sg(q)‖²` (lucidrains'
//!   `input_to_quantize_commit_loss_weight` β = 0.25 on the term that moves `e`, weight 1 on the
//!   term that moves `W` — the placement that fixed the large commitment loss of the rotation
//!   trick with SimVQ): [`BetaPlacement::Commitment`](crate::BetaPlacement) with the codebook
//!   term included. `∂L/∂W = (∂L/∂C')ᵀ C`.
//! * [`Fsq`] (Mentzer et al. 2023, finite scalar quantization; no codebook): each of the D
//!   dimensions is bounded to `L_i` levels and rounded (see [`Fsq::forward`] for the formulas);
//!   the implicit codebook has `Π L_i` codes. The estimator maps the bounded vector `b` to its
//!   rounded `q` (straight-through is FSQ's own choice; the rotation trick rotates `b` onto `q`).
//!
//! Metrics per code group (stage or head): [`group_usage`] and [`group_perplexities`] on the
//! counts of the `G·K` slots `g·K + k`.

use ndarray::{Array1, Array2, ArrayView2, s};

use crate::error::{Result, VqError, check_same_shape};
use crate::estimator::Estimator;
use crate::layer::{Quantizer, QuantizerForward};

/// `∂L/∂e` and the gradients of each codebook of a family's step.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupBackward {
    /// `∂L/∂e` (N×D).
    pub grad_e: Array2<f32>,
    /// `∂L/∂codebook` per codebook (stage / head), `None` when the codebook term is excluded.
    pub grad_codebooks: Vec<Option<Array2<f32>>>,
}

/// A forward pass of several code groups (stages or heads).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupForward {
    /// The rows each group quantized: stage residuals `r_g` (N×D) or head slices (N×D/H).
    pub inputs: Vec<Array2<f32>>,
    /// Each group's step on its rows.
    pub groups: Vec<QuantizerForward>,
    /// The layer's output value `q` (N×D).
    pub quantized: Array2<f32>,
    /// What each group's losses count for in the layer's (1 for residual stages, `1/H` for heads).
    pub loss_scale: f32,
}

impl GroupForward {
    /// The code of every row in every group, N×G.
    pub fn indices(&self) -> Array2<u32> {
        let n = self.quantized.nrows();
        let mut out = Array2::zeros((n, self.groups.len()));
        for (g, f) in self.groups.iter().enumerate() {
            out.column_mut(g).assign(&f.indices);
        }
        out
    }

    /// The layer's commitment loss: the groups' weighted sum.
    pub fn commitment(&self) -> f32 {
        self.groups.iter().map(|f| f.loss.commitment).sum::<f32>() * self.loss_scale
    }

    /// The layer's codebook loss: the groups' weighted sum.
    pub fn codebook_loss(&self) -> f32 {
        self.groups.iter().map(|f| f.loss.codebook).sum::<f32>() * self.loss_scale
    }
}

/// Residual VQ: one [`Quantizer`] step per stage on the residual of the stages before it.
///
/// ```
/// use ndarray::array;
/// use vq_core::family::ResidualQuantizer;
/// use vq_core::{BetaPlacement, CodebookTerm, Estimator, LossWeights, Metric, Quantizer};
/// let stage = Quantizer {
///     metric: Metric::Euclidean,
///     estimator: Estimator::Rotation,
///     loss: LossWeights::new(1.0, BetaPlacement::Commitment, CodebookTerm::Exclude).unwrap(),
/// };
/// let coarse = array![[1.0f32, 0.0], [0.0, 1.0]];
/// let fine = array![[0.1f32, 0.0], [0.0, 0.1], [-0.1, 0.0]];
/// let e = array![[1.12f32, -0.01]];
/// let fwd = ResidualQuantizer { stage }.forward(e.view(), &[coarse.view(), fine.view()]).unwrap();
/// assert_eq!(fwd.indices().row(0).to_vec(), vec![0, 0]);
/// assert!((fwd.quantized[[0, 0]] - 1.1).abs() < 1e-6);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResidualQuantizer {
    /// Metric, estimator and loss weights of every stage.
    pub stage: Quantizer,
}

impl ResidualQuantizer {
    /// Quantizes `e` (N×D) with the stages' codebooks (each K_g×D), in order.
    ///
    /// # Errors
    /// No codebook; the errors of [`Quantizer::forward`].
    pub fn forward(
        &self,
        e: ArrayView2<f32>,
        codebooks: &[ArrayView2<f32>],
    ) -> Result<GroupForward> {
        non_empty(codebooks.len(), "residual stages")?;
        let mut residual = e.to_owned();
        let mut quantized = Array2::zeros(e.raw_dim());
        let (mut inputs, mut groups) = (Vec::new(), Vec::new());
        for cb in codebooks {
            let f = self.stage.forward(residual.view(), *cb)?;
            quantized += &f.quantized;
            let next = &residual - &f.quantized;
            inputs.push(std::mem::replace(&mut residual, next));
            groups.push(f);
        }
        Ok(GroupForward {
            inputs,
            groups,
            quantized,
            loss_scale: 1.0,
        })
    }

    /// Gradients given `grad_out = ∂L/∂q` (N×D): every stage's estimator map of `grad_out` plus its
    /// loss gradients, summed (module docs).
    ///
    /// # Errors
    /// Shape errors of `grad_out`.
    pub fn backward(
        &self,
        codebooks: &[ArrayView2<f32>],
        fwd: &GroupForward,
        grad_out: ArrayView2<f32>,
    ) -> Result<GroupBackward> {
        group_backward(self.stage, codebooks, fwd, Placement::Whole, grad_out)
    }
}

/// Whether the heads of a [`MultiHeadQuantizer`] share one codebook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum HeadCodebooks {
    /// One codebook (K×D/H) for every head (lucidrains' default).
    Shared,
    /// A codebook per head (`separate_codebook_per_head`).
    Separate,
}

/// Multi-head VQ: `e` (N×D) split into `heads` column blocks of D/H, each quantized with
/// [`Quantizer`] (module docs).
///
/// ```
/// use ndarray::array;
/// use vq_core::family::MultiHeadQuantizer;
/// use vq_core::{BetaPlacement, CodebookTerm, Estimator, LossWeights, Metric, Quantizer};
/// let head = Quantizer {
///     metric: Metric::Euclidean,
///     estimator: Estimator::StraightThrough,
///     loss: LossWeights::new(0.25, BetaPlacement::Commitment, CodebookTerm::Include).unwrap(),
/// };
/// let shared = array![[1.0f32], [-1.0]];
/// let e = array![[0.9f32, -2.0]];
/// let fwd = MultiHeadQuantizer { head, heads: 2 }.forward(e.view(), &[shared.view()]).unwrap();
/// assert_eq!(fwd.indices().row(0).to_vec(), vec![0, 1]);
/// assert_eq!(fwd.quantized.row(0).to_vec(), vec![1.0, -1.0]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiHeadQuantizer {
    /// Metric, estimator and loss weights of every head.
    pub head: Quantizer,
    /// Number of heads H (divides D).
    pub heads: usize,
}

impl MultiHeadQuantizer {
    /// Quantizes the heads of `e` (N×D): `codebooks` holds one shared codebook or one per head,
    /// each of dimension D/H.
    ///
    /// # Errors
    /// H = 0 or not dividing D; a codebook count other than 1 or H; errors of
    /// [`Quantizer::forward`].
    pub fn forward(
        &self,
        e: ArrayView2<f32>,
        codebooks: &[ArrayView2<f32>],
    ) -> Result<GroupForward> {
        let h = self.heads;
        if h == 0 || !e.ncols().is_multiple_of(h) {
            return Err(VqError::InvalidParameter {
                name: "heads",
                value: h.to_string(),
                reason: "must be > 0 and divide the code dimension",
            });
        }
        if codebooks.len() != 1 && codebooks.len() != h {
            return Err(VqError::ShapeMismatch {
                what: "codebooks of a multi-head quantizer (1 shared or 1 per head)",
                expected: h,
                got: codebooks.len(),
            });
        }
        let dh = e.ncols() / h;
        let mut quantized = Array2::zeros(e.raw_dim());
        let (mut inputs, mut groups) = (Vec::new(), Vec::new());
        for g in 0..h {
            let rows = e.slice(s![.., g * dh..(g + 1) * dh]).to_owned();
            let f = self
                .head
                .forward(rows.view(), codebooks[g.min(codebooks.len() - 1)])?;
            quantized
                .slice_mut(s![.., g * dh..(g + 1) * dh])
                .assign(&f.quantized);
            inputs.push(rows);
            groups.push(f);
        }
        Ok(GroupForward {
            inputs,
            groups,
            quantized,
            loss_scale: 1.0 / h as f32,
        })
    }

    /// Gradients given `grad_out = ∂L/∂q` (N×D). With a shared codebook, `grad_codebooks` holds
    /// one entry: the heads' gradients summed.
    ///
    /// # Errors
    /// Shape errors of `grad_out`.
    pub fn backward(
        &self,
        codebooks: &[ArrayView2<f32>],
        fwd: &GroupForward,
        grad_out: ArrayView2<f32>,
    ) -> Result<GroupBackward> {
        let mut bwd = group_backward(self.head, codebooks, fwd, Placement::Columns, grad_out)?;
        if codebooks.len() == 1 && bwd.grad_codebooks.len() > 1 {
            let summed = bwd
                .grad_codebooks
                .iter()
                .try_fold(None::<Array2<f32>>, |acc, g| {
                    Ok::<_, VqError>(match (acc, g) {
                        (None, g) => g.clone(),
                        (Some(a), Some(g)) => Some(a + g),
                        (Some(a), None) => Some(a),
                    })
                })?;
            bwd.grad_codebooks = vec![summed];
        }
        Ok(bwd)
    }
}

/// Where a group's rows sit in the layer's input.
#[derive(Clone, Copy)]
enum Placement {
    /// Every group sees (a residual of) the whole input: gradients add.
    Whole,
    /// Group g holds columns `g·w..(g+1)·w`.
    Columns,
}

/// The shared backward of the grouped families: per group, the estimator map of its part of
/// `grad_out` plus its loss gradients scaled by the family's `loss_scale`.
fn group_backward(
    step: Quantizer,
    codebooks: &[ArrayView2<f32>],
    fwd: &GroupForward,
    placement: Placement,
    grad_out: ArrayView2<f32>,
) -> Result<GroupBackward> {
    check_same_shape(fwd.quantized.view(), grad_out, "gradient vs inputs")?;
    let mut grad_e = Array2::<f32>::zeros(grad_out.raw_dim());
    let mut grad_codebooks = Vec::new();
    for (g, (input, f)) in fwd.inputs.iter().zip(&fwd.groups).enumerate() {
        let mut scaled = f.clone();
        scaled.loss.grad_e_scale *= fwd.loss_scale;
        scaled.loss.grad_q_scale *= fwd.loss_scale;
        let w = input.ncols();
        let cb = codebooks[g.min(codebooks.len() - 1)];
        let part = match placement {
            Placement::Whole => grad_out.view(),
            Placement::Columns => grad_out.slice(s![.., g * w..(g + 1) * w]),
        };
        let b = step.backward(input.view(), cb, &scaled, part)?;
        match placement {
            Placement::Whole => grad_e += &b.grad_e,
            Placement::Columns => grad_e
                .slice_mut(s![.., g * w..(g + 1) * w])
                .assign(&b.grad_e),
        }
        grad_codebooks.push(b.grad_codebook);
    }
    Ok(GroupBackward {
        grad_e,
        grad_codebooks,
    })
}

fn non_empty(n: usize, what: &'static str) -> Result<()> {
    match n {
        0 => Err(VqError::InvalidParameter {
            name: what,
            value: "0".into(),
            reason: "at least one is needed",
        }),
        _ => Ok(()),
    }
}

/// SimVQ: nearest code in the implicit codebook `C' = C Wᵀ` of a frozen `C` (K×D) and a learned
/// `W` (D×D); module docs for the losses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimVq {
    /// Metric, estimator and loss weights (the codebook term's gradient reaches `W`).
    pub quantizer: Quantizer,
}

/// Result of [`SimVq::backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct SimVqBackward {
    /// `∂L/∂e`.
    pub grad_e: Array2<f32>,
    /// `∂L/∂W` (D×D), `None` when the codebook term is excluded.
    pub grad_transform: Option<Array2<f32>>,
}

impl SimVq {
    /// `C Wᵀ`.
    pub fn implicit_codebook(frozen: ArrayView2<f32>, transform: ArrayView2<f32>) -> Array2<f32> {
        frozen.dot(&transform.t())
    }

    /// The step on `e` (N×D) with the implicit codebook.
    ///
    /// # Errors
    /// The errors of [`Quantizer::forward`].
    pub fn forward(
        &self,
        e: ArrayView2<f32>,
        frozen: ArrayView2<f32>,
        transform: ArrayView2<f32>,
    ) -> Result<QuantizerForward> {
        self.quantizer
            .forward(e, Self::implicit_codebook(frozen, transform).view())
    }

    /// Gradients given `grad_out = ∂L/∂q`: `∂L/∂W = (∂L/∂C')ᵀ C`.
    ///
    /// # Errors
    /// Shape errors of `grad_out`.
    pub fn backward(
        &self,
        e: ArrayView2<f32>,
        frozen: ArrayView2<f32>,
        transform: ArrayView2<f32>,
        fwd: &QuantizerForward,
        grad_out: ArrayView2<f32>,
    ) -> Result<SimVqBackward> {
        let implicit = Self::implicit_codebook(frozen, transform);
        let b = self.quantizer.backward(e, implicit.view(), fwd, grad_out)?;
        Ok(SimVqBackward {
            grad_e: b.grad_e,
            grad_transform: b.grad_codebook.map(|g| g.t().dot(&frozen)),
        })
    }
}

/// `ε` of FSQ's bound: the half-range is `(L − 1)(1 + ε)/2`, so the extreme levels are reached
/// before `tanh` saturates (the reference implementations' 1e-3).
pub const FSQ_EPS: f32 = 1e-3;

/// Finite scalar quantization with `L_i` levels in dimension `i` (each ≥ 2).
///
/// ```
/// use ndarray::array;
/// use vq_core::family::Fsq;
/// let fsq = Fsq::new(&[8, 5]).unwrap();
/// assert_eq!(fsq.codebook_size(), 40);
/// let fwd = fsq.forward(array![[0.0f32, 0.0], [9.0, -9.0]].view()).unwrap();
/// // 0 maps to the middle level of each dimension: (0 + 4)·1 + (0 + 2)·8 = 20.
/// assert_eq!(fwd.indices.to_vec(), vec![20, 7]);
/// assert_eq!(fwd.quantized.row(1).to_vec(), vec![0.75, -1.0]);
/// assert_eq!(fsq.codes(&[20, 7]).unwrap(), fwd.quantized);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fsq {
    levels: Vec<u32>,
}

/// The constants of one FSQ dimension ([`Fsq::constants`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FsqDim {
    /// `h = (L−1)(1+ε)/2`.
    pub half_range: f32,
    /// `o`: ½ for an even L, else 0.
    pub offset: f32,
    /// `s = atanh(o/h)`.
    pub shift: f32,
    /// `w = ⌊L/2⌋`.
    pub half_width: f32,
}

/// Result of [`Fsq::forward`].
#[derive(Debug, Clone, PartialEq)]
pub struct FsqForward {
    /// The bounded input scaled like the codes, `b / ⌊L/2⌋` (N×D): what the estimator maps to
    /// `quantized`.
    pub bounded: Array2<f32>,
    /// `round(b) / ⌊L/2⌋` (N×D), in [−1, 1].
    pub quantized: Array2<f32>,
    /// `Σ_i (round(b_i) + ⌊L_i/2⌋) · Π_{j<i} L_j` per row.
    pub indices: Array1<u32>,
}

impl Fsq {
    /// FSQ with these levels.
    ///
    /// # Errors
    /// [`VqError::InvalidParameter`] for no levels, a level below 2, or more than `u32::MAX`
    /// codes.
    pub fn new(levels: &[u32]) -> Result<Self> {
        let bad = |reason| {
            Err(VqError::InvalidParameter {
                name: "levels",
                value: format!("{levels:?}"),
                reason,
            })
        };
        if levels.is_empty() || levels.iter().any(|&l| l < 2) {
            return bad("one level count of at least 2 per dimension");
        }
        let total = levels
            .iter()
            .try_fold(1u64, |acc, &l| acc.checked_mul(u64::from(l)));
        if total.is_none_or(|t| t > u64::from(u32::MAX)) {
            return bad("the product of the levels (the number of codes) must fit in u32");
        }
        Ok(Self {
            levels: levels.to_vec(),
        })
    }

    /// Levels per dimension.
    pub fn levels(&self) -> &[u32] {
        &self.levels
    }

    /// The dimension D (number of levels).
    pub fn dim(&self) -> usize {
        self.levels.len()
    }

    /// The number of codes `Π L_i`.
    pub fn codebook_size(&self) -> usize {
        self.levels.iter().map(|&l| l as usize).product()
    }

    /// Per dimension: half-range `h = (L−1)(1+ε)/2`, offset `o` (½ for even L, else 0), shift
    /// `s = atanh(o/h)` and half-width `w = ⌊L/2⌋`, in f32 as the forward pass uses them.
    pub fn constants(&self) -> Vec<FsqDim> {
        self.levels
            .iter()
            .map(|&l| {
                let h = (l as f32 - 1.0) * (1.0 + FSQ_EPS) / 2.0;
                let o = if l.is_multiple_of(2) { 0.5 } else { 0.0 };
                FsqDim {
                    half_range: h,
                    offset: o,
                    shift: (o / h).atanh(),
                    half_width: (l / 2) as f32,
                }
            })
            .collect()
    }

    /// Bounds, rounds and indexes `e` (N×D): `b = tanh(e + s)·h − o`, `q = round(b)/w`
    /// (round half to even, as `torch.round`), constants as in the references.
    ///
    /// # Errors
    /// [`VqError::ShapeMismatch`] unless D matches; [`VqError::NonFinite`] for NaN / ±∞ rows.
    pub fn forward(&self, e: ArrayView2<f32>) -> Result<FsqForward> {
        self.check(e)?;
        let consts: Vec<_> = self
            .constants()
            .into_iter()
            .map(|c| (c.half_range, c.offset, c.shift, c.half_width))
            .collect();
        let mut bounded = e.to_owned();
        let mut quantized = e.to_owned();
        let mut indices = Array1::zeros(e.nrows());
        for ((mut b, mut q), idx) in bounded
            .rows_mut()
            .into_iter()
            .zip(quantized.rows_mut())
            .zip(indices.iter_mut())
        {
            let (mut index, mut basis) = (0u64, 1u64);
            for ((bi, qi), (&(h, o, s, w), &l)) in b
                .iter_mut()
                .zip(q.iter_mut())
                .zip(consts.iter().zip(&self.levels))
            {
                let v = (*bi + s).tanh() * h - o;
                let r = v.round_ties_even();
                *bi = v / w;
                *qi = r / w;
                index += (r + w) as u64 * basis;
                basis *= u64::from(l);
            }
            *idx = index as u32;
        }
        Ok(FsqForward {
            bounded,
            quantized,
            indices,
        })
    }

    /// `∂L/∂e` given `grad_out = ∂L/∂q`: the estimator's map from `bounded` to `quantized`, times
    /// the bound's derivative `h(1 − tanh²(e + s))/w` per element.
    ///
    /// # Errors
    /// Shape errors.
    pub fn backward(
        &self,
        e: ArrayView2<f32>,
        fwd: &FsqForward,
        estimator: Estimator,
        grad_out: ArrayView2<f32>,
    ) -> Result<Array2<f32>> {
        self.check(e)?;
        let mut g = estimator.backward(fwd.bounded.view(), fwd.quantized.view(), grad_out)?;
        let consts: Vec<_> = self
            .constants()
            .into_iter()
            .map(|c| (c.half_range, c.offset, c.shift, c.half_width))
            .collect();
        for (mut row, x) in g.rows_mut().into_iter().zip(e.rows()) {
            for ((gi, &xi), &(h, _, s, w)) in row.iter_mut().zip(&x).zip(&consts) {
                let t = (xi + s).tanh();
                *gi *= h * (1.0 - t * t) / w;
            }
        }
        Ok(g)
    }

    /// The codes (N×D, in [−1, 1]) of indices.
    ///
    /// # Errors
    /// [`VqError::IndexOutOfRange`].
    pub fn codes(&self, indices: &[u32]) -> Result<Array2<f32>> {
        crate::error::check_indices(indices, self.codebook_size())?;
        let consts: Vec<_> = self
            .constants()
            .into_iter()
            .map(|c| (c.half_range, c.offset, c.shift, c.half_width))
            .collect();
        let mut out = Array2::zeros((indices.len(), self.dim()));
        for (mut row, &i) in out.rows_mut().into_iter().zip(indices) {
            let mut rest = i;
            for ((v, &l), &(_, _, _, w)) in row.iter_mut().zip(&self.levels).zip(&consts) {
                *v = ((rest % l) as f32 - w) / w;
                rest /= l;
            }
        }
        Ok(out)
    }

    /// The implicit codebook: every code, row `k` = `codes(&[k])`.
    pub fn codebook(&self) -> Array2<f32> {
        let all: Vec<u32> = (0..self.codebook_size() as u32).collect();
        self.codes(&all).expect("indices in range")
    }

    fn check(&self, e: ArrayView2<f32>) -> Result<()> {
        if e.ncols() != self.dim() {
            return Err(VqError::ShapeMismatch {
                what: "FSQ input dim vs levels",
                expected: self.dim(),
                got: e.ncols(),
            });
        }
        crate::search::check_finite(e, "FSQ input")
    }
}

/// Usage per code group: the fraction of each group's K codes with a nonzero count, where
/// `counts` holds `groups` consecutive blocks of K (slot `g·K + k`).
///
/// ```
/// let u = vq_core::family::group_usage(&[1, 0, 3, 2], 2);
/// assert_eq!(u, vec![0.5, 1.0]);
/// ```
pub fn group_usage(counts: &[u64], groups: usize) -> Vec<f64> {
    blocks(counts, groups)
        .map(|b| b.iter().filter(|&&c| c > 0).count() as f64 / b.len().max(1) as f64)
        .collect()
}

/// [`perplexity`](crate::perplexity) per code group (layout as [`group_usage`]).
///
/// ```
/// let p = vq_core::family::group_perplexities(&[5, 5, 0, 7], 2);
/// assert!((p[0] - 2.0).abs() < 1e-12 && (p[1] - 1.0).abs() < 1e-12);
/// ```
pub fn group_perplexities(counts: &[u64], groups: usize) -> Vec<f64> {
    blocks(counts, groups).map(crate::perplexity).collect()
}

/// The geometric mean of the groups' perplexities over the groups that were used:
/// `exp(mean_g H_g)`, the perplexity per code group (equal to [`perplexity`](crate::perplexity)
/// for one group; 0 when no group was used).
///
/// ```
/// let p = vq_core::family::mean_group_perplexity(&[5, 5, 0, 0, 1, 1, 1, 1], 2);
/// assert!((p - 8f64.sqrt()).abs() < 1e-12);
/// ```
pub fn mean_group_perplexity(counts: &[u64], groups: usize) -> f64 {
    let used: Vec<f64> = group_perplexities(counts, groups)
        .into_iter()
        .filter(|&p| p > 0.0)
        .collect();
    match used.len() {
        0 => 0.0,
        n => (used.iter().map(|p| p.ln()).sum::<f64>() / n as f64).exp(),
    }
}

fn blocks(counts: &[u64], groups: usize) -> std::slice::Chunks<'_, u64> {
    counts.chunks((counts.len() / groups.max(1)).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{BetaPlacement, CodebookTerm, LossWeights};
    use crate::search::Metric;
    use crate::testutil::randn;

    fn step(estimator: Estimator, term: CodebookTerm) -> Quantizer {
        Quantizer {
            metric: Metric::Euclidean,
            estimator,
            loss: LossWeights::new(0.25, BetaPlacement::Commitment, term).unwrap(),
        }
    }

    fn max_abs(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
        (a - b).iter().fold(0.0, |m, v| m.max(v.abs()))
    }

    #[test]
    fn residual_stages_are_layers_on_the_residuals_and_their_gradients_add() {
        let e = randn((64, 4), 1);
        let books = [
            randn((9, 4), 2),
            randn((9, 4), 3) * 0.3,
            randn((9, 4), 4) * 0.1,
        ];
        let views: Vec<_> = books.iter().map(|b| b.view()).collect();
        let g = randn((64, 4), 5);
        for estimator in Estimator::ALL {
            let rq = ResidualQuantizer {
                stage: step(estimator, CodebookTerm::Include),
            };
            let fwd = rq.forward(e.view(), &views).unwrap();
            // By hand: each stage is the one-layer step on what the earlier stages left.
            let mut r = e.clone();
            let mut expect_e = Array2::zeros(e.raw_dim());
            let mut q = Array2::zeros(e.raw_dim());
            for (s, cb) in views.iter().enumerate() {
                let f = rq.stage.forward(r.view(), *cb).unwrap();
                assert_eq!(f.indices, fwd.groups[s].indices);
                let b = rq.stage.backward(r.view(), *cb, &f, g.view()).unwrap();
                expect_e += &b.grad_e;
                let got = rq.backward(&views, &fwd, g.view()).unwrap();
                assert!(
                    max_abs(
                        got.grad_codebooks[s].as_ref().unwrap(),
                        b.grad_codebook.as_ref().unwrap()
                    ) < 1e-6
                );
                q += &f.quantized;
                r = &r - &f.quantized;
            }
            assert!(max_abs(&fwd.quantized, &q) < 1e-6);
            let got = rq.backward(&views, &fwd, g.view()).unwrap();
            assert!(max_abs(&got.grad_e, &expect_e) < 1e-5, "{estimator:?}");
            // The last residual is what the layer leaves unexplained.
            assert!(max_abs(&(&e - &fwd.quantized), &r) < 1e-6);
        }
    }

    #[test]
    fn residual_stages_reduce_the_error_on_average() {
        let e = randn((512, 3), 6);
        let mut books = vec![randn((32, 3), 7)];
        // Later codebooks at the scale of what is left.
        books.push(randn((32, 3), 8) * 0.3);
        let views: Vec<_> = books.iter().map(|b| b.view()).collect();
        let rq = ResidualQuantizer {
            stage: step(Estimator::StraightThrough, CodebookTerm::Exclude),
        };
        let one = rq.forward(e.view(), &views[..1]).unwrap();
        let two = rq.forward(e.view(), &views).unwrap();
        let err = |f: &GroupForward| (&e - &f.quantized).mapv(|v| v * v).mean().unwrap();
        assert!(err(&two) < err(&one), "{} vs {}", err(&two), err(&one));
    }

    #[test]
    fn heads_split_the_columns_and_average_the_losses() {
        let e = randn((40, 6), 9);
        let g = randn((40, 6), 10);
        let shared = randn((5, 2), 11);
        let separate = [randn((5, 2), 12), randn((5, 2), 13), randn((5, 2), 14)];
        for estimator in Estimator::ALL {
            let mh = MultiHeadQuantizer {
                head: step(estimator, CodebookTerm::Include),
                heads: 3,
            };
            // Shared: exactly one layer on the (N·H)×(D/H) rows.
            let fwd = mh.forward(e.view(), &[shared.view()]).unwrap();
            let rows = e.to_shape((120, 2)).unwrap().to_owned();
            let one = mh.head.forward(rows.view(), shared.view()).unwrap();
            assert_eq!(
                fwd.indices().into_shape_with_order(120).unwrap(),
                one.indices
            );
            assert!((fwd.commitment() - one.loss.commitment).abs() < 1e-6);
            assert!((fwd.codebook_loss() - one.loss.codebook).abs() < 1e-6);
            let b = mh.backward(&[shared.view()], &fwd, g.view()).unwrap();
            let gr = g.to_shape((120, 2)).unwrap().to_owned();
            let want = mh
                .head
                .backward(rows.view(), shared.view(), &one, gr.view())
                .unwrap();
            let got_e = b.grad_e.to_shape((120, 2)).unwrap().to_owned();
            assert!(max_abs(&got_e, &want.grad_e) < 1e-5, "{estimator:?}");
            assert_eq!(b.grad_codebooks.len(), 1);
            assert!(
                max_abs(
                    b.grad_codebooks[0].as_ref().unwrap(),
                    want.grad_codebook.as_ref().unwrap()
                ) < 1e-5
            );
            // Separate: head h uses codebook h.
            let views: Vec<_> = separate.iter().map(|c| c.view()).collect();
            let fwd = mh.forward(e.view(), &views).unwrap();
            for h in 0..3 {
                let cols = e.slice(s![.., 2 * h..2 * h + 2]);
                let f = mh.head.forward(cols, views[h]).unwrap();
                assert_eq!(fwd.groups[h].indices, f.indices);
            }
            assert_eq!(
                mh.backward(&views, &fwd, g.view())
                    .unwrap()
                    .grad_codebooks
                    .len(),
                3
            );
        }
        let bad = MultiHeadQuantizer {
            head: step(Estimator::StraightThrough, CodebookTerm::Include),
            heads: 4,
        };
        assert!(matches!(
            bad.forward(e.view(), &[shared.view()]),
            Err(VqError::InvalidParameter { name: "heads", .. })
        ));
    }

    #[test]
    fn simvq_transform_gradient_matches_finite_differences() {
        let e = randn((30, 3), 15);
        let frozen = randn((7, 3), 16) / 3f32.sqrt();
        let w = randn((3, 3), 17);
        let sim = SimVq {
            quantizer: step(Estimator::Rotation, CodebookTerm::Include),
        };
        let fwd = sim.forward(e.view(), frozen.view(), w.view()).unwrap();
        let zero = Array2::zeros(e.raw_dim());
        let got = sim
            .backward(e.view(), frozen.view(), w.view(), &fwd, zero.view())
            .unwrap()
            .grad_transform
            .unwrap();
        // L(W) = codebook loss with the indices held fixed (the search is not differentiable).
        let loss = |w: &Array2<f32>| -> f64 {
            let cb = SimVq::implicit_codebook(frozen.view(), w.view());
            let q = crate::gather_codes(cb.view(), fwd.indices.as_slice().unwrap()).unwrap();
            crate::vq_loss(e.view(), q.view(), sim.quantizer.loss)
                .unwrap()
                .codebook as f64
        };
        let h = 1e-2f32;
        for i in 0..3 {
            for j in 0..3 {
                let (mut p, mut m) = (w.clone(), w.clone());
                p[[i, j]] += h;
                m[[i, j]] -= h;
                let fd = (loss(&p) - loss(&m)) / (2.0 * f64::from(h));
                assert!(
                    (fd - f64::from(got[[i, j]])).abs() < 2e-3 * (1.0 + fd.abs()),
                    "{i},{j}: {fd} vs {}",
                    got[[i, j]]
                );
            }
        }
    }

    #[test]
    fn fsq_indices_codes_and_grid_agree() {
        let fsq = Fsq::new(&[8, 5, 5, 5]).unwrap();
        assert_eq!(fsq.codebook_size(), 1000);
        let grid = fsq.codebook();
        // Every grid point quantizes to itself (mapped back through the bound's inverse).
        let fwd_idx: Vec<u32> = (0..1000).collect();
        let codes = fsq.codes(&fwd_idx).unwrap();
        assert_eq!(codes, grid);
        let e = randn((500, 4), 18) * 2.0;
        let fwd = fsq.forward(e.view()).unwrap();
        assert_eq!(
            fsq.codes(fwd.indices.as_slice().unwrap()).unwrap(),
            fwd.quantized
        );
        // The rounded value is the grid point nearest the bounded vector.
        let nearest =
            crate::nearest_codes(fwd.bounded.view(), grid.view(), Metric::Euclidean).unwrap();
        assert_eq!(nearest, fwd.indices);
        assert!(fwd.quantized.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert!(matches!(
            Fsq::new(&[8, 1]),
            Err(VqError::InvalidParameter { .. })
        ));
        assert!(matches!(
            Fsq::new(&[65536, 65536, 2]),
            Err(VqError::InvalidParameter { .. })
        ));
        assert!(fsq.codes(&[1000]).is_err());
    }

    #[test]
    fn fsq_straight_through_gradient_is_the_bounds_derivative() {
        let fsq = Fsq::new(&[7, 6, 3]).unwrap();
        let e = randn((20, 3), 19);
        let g = randn((20, 3), 20);
        let fwd = fsq.forward(e.view()).unwrap();
        let got = fsq
            .backward(e.view(), &fwd, Estimator::StraightThrough, g.view())
            .unwrap();
        let bounded = |x: &Array2<f32>| fsq.forward(x.view()).unwrap().bounded;
        let h = 1e-3f32;
        for i in 0..20 {
            for j in 0..3 {
                let (mut p, mut m) = (e.clone(), e.clone());
                p[[i, j]] += h;
                m[[i, j]] -= h;
                let d = (bounded(&p)[[i, j]] - bounded(&m)[[i, j]]) / (2.0 * h);
                assert!(
                    (d * g[[i, j]] - got[[i, j]]).abs() < 2e-2 * (1.0 + d.abs()),
                    "{i},{j}"
                );
            }
        }
        // The rotation trick maps the same gradient through R from b to q, then the bound.
        let rot = fsq
            .backward(e.view(), &fwd, Estimator::Rotation, g.view())
            .unwrap();
        let mapped = Estimator::Rotation
            .backward(fwd.bounded.view(), fwd.quantized.view(), g.view())
            .unwrap();
        let ste_of_mapped = fsq
            .backward(e.view(), &fwd, Estimator::StraightThrough, mapped.view())
            .unwrap();
        assert!(max_abs(&rot, &ste_of_mapped) < 1e-6);
    }

    #[test]
    fn group_metrics_split_the_slots() {
        assert_eq!(group_usage(&[1, 0, 0, 0, 2, 2], 3), vec![0.5, 0.0, 1.0]);
        let p = group_perplexities(&[1, 1, 4, 0], 2);
        assert!((p[0] - 2.0).abs() < 1e-12 && (p[1] - 1.0).abs() < 1e-12);
    }
}
