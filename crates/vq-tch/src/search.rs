//! Nearest-code search on tensors, under `no_grad`.
//!
//! * CPU: [`vq_core::CodebookIndex`] runs on the tensors' memory (no copy for contiguous f32;
//!   other layouts and dtypes are converted to contiguous f32 first): the fused, tiled kernel with
//!   exact re-ranking of near ties.
//! * CUDA (any other device): rows in chunks of at most `CHUNK_SCORES / K`, scores
//!   `½‖c̄‖² − x̄·c̄ᵀ` on codebook-centred f32 data (cosine: `−x̂·ĉᵀ`), `argmin` per chunk, so that
//!   memory stays bounded for large N×K. Near ties are not re-ranked there.

use ndarray::ArrayView2;
use tch::{Device, Kind, Tensor};
use vq_core::{CodebookIndex, Metric};

use crate::error::{Result, VqTchError};

/// Largest score block on the device path (elements).
const CHUNK_SCORES: i64 = 1 << 26;

/// When the device search checks its inputs for NaN and ±∞ (on the CPU, vq-core's search always
/// checks them as it reads them, at no extra cost).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FiniteCheck {
    /// Before the search, by one read of two flags back to the host: the call fails with
    /// [`vq_core::VqError::NonFinite`] naming the first bad row. The host waits for the device
    /// there, once per search.
    #[default]
    Eager,
    /// On the device, without waiting: the search returns the verdict as a tensor
    /// ([`FiniteVerdict`]) that the caller reads when it next synchronises anyway (a training loop
    /// that reads its metrics every few steps), and turns into the same error with
    /// [`FiniteVerdict::check`]. The indices of a search over non-finite rows are meaningless.
    Deferred,
}

/// The verdict of a deferred finite check, still on the device: an i64 tensor
/// `[inputs bad, codebook bad, first bad input row, first bad codebook row]` (flags 0/1).
#[derive(Debug)]
pub struct FiniteVerdict(pub Tensor);

impl FiniteVerdict {
    /// Number of i64 values in the verdict tensor.
    pub const LEN: usize = 4;

    /// The verdict as the error [`FiniteCheck::Eager`] would have returned, from its values read
    /// back to the host (several verdicts can be stacked and read at once).
    ///
    /// ```
    /// use vq_tch::FiniteVerdict;
    /// assert!(FiniteVerdict::check(&[0, 0, 0, 0]).is_ok());
    /// let err = FiniteVerdict::check(&[1, 0, 7, 0]).unwrap_err();
    /// assert!(err.to_string().contains("inputs at row 7"), "{err}");
    /// ```
    ///
    /// # Errors
    /// [`vq_core::VqError::NonFinite`] naming the inputs' (then the codebook's) first bad row;
    /// [`VqTchError::Torch`] for a slice that is not a verdict.
    pub fn check(values: &[i64]) -> Result<()> {
        if values.len() != Self::LEN {
            return Err(VqTchError::Torch(format!(
                "a finite-check verdict has {} values, got {}",
                Self::LEN,
                values.len()
            )));
        }
        for (k, what) in ["inputs", "codebook"].into_iter().enumerate() {
            if values[k] != 0 {
                let row = values[2 + k].max(0) as usize;
                return Err(vq_core::VqError::NonFinite { what, row }.into());
            }
        }
        Ok(())
    }
}

/// Index (i64) of the nearest code of every row of `x` (N, D) in `codebook` (K, D).
///
/// ```
/// use tch::Tensor;
/// use vq_core::Metric;
/// let cb = Tensor::from_slice(&[0.0f32, 0.0, 1.0, 1.0]).view([2, 2]);
/// let x = Tensor::from_slice(&[0.9f32, 0.8, 0.1, -0.2]).view([2, 2]);
/// let idx = vq_tch::nearest_codes(&x, &cb, Metric::Euclidean).unwrap();
/// assert_eq!(Vec::<i64>::try_from(idx).unwrap(), vec![1, 0]);
/// ```
///
/// # Errors
/// [`VqTchError::Shape`] for non-2-D inputs or differing D, [`VqTchError::Kind`],
/// [`VqTchError::Device`], and vq-core's errors (empty codebook, NaN/∞ inputs) as
/// [`VqTchError::Core`].
pub fn nearest_codes(x: &Tensor, codebook: &Tensor, metric: Metric) -> Result<Tensor> {
    Ok(nearest_codes_checked(x, codebook, metric, FiniteCheck::Eager)?.0)
}

/// [`nearest_codes`] with the device path's finite check as `check` says: with
/// [`FiniteCheck::Deferred`] on a device other than the CPU, the verdict comes back beside the
/// indices instead of an error (`None` otherwise).
///
/// # Errors
/// As [`nearest_codes`] (non-finite device inputs only under [`FiniteCheck::Eager`]).
pub fn nearest_codes_checked(
    x: &Tensor,
    codebook: &Tensor,
    metric: Metric,
    check: FiniteCheck,
) -> Result<(Tensor, Option<FiniteVerdict>)> {
    if x.dim() != 2 || codebook.dim() != 2 || x.size()[1] != codebook.size()[1] {
        return Err(VqTchError::Shape {
            what: "x (N, D) and codebook (K, D)",
            e: x.size(),
            q: codebook.size(),
        });
    }
    for t in [x, codebook] {
        if !t.is_floating_point() {
            return Err(VqTchError::Kind(t.kind()));
        }
    }
    if x.device() != codebook.device() {
        return Err(VqTchError::Device {
            e: x.device(),
            q: codebook.device(),
        });
    }
    tch::no_grad(|| match (x.device(), check) {
        (Device::Cpu, _) => Ok((search_cpu(x, codebook, metric)?, None)),
        (_, FiniteCheck::Eager) => {
            check_finite_device(x, codebook)?;
            Ok((search_device(x, codebook, metric, CHUNK_SCORES), None))
        }
        (_, FiniteCheck::Deferred) => {
            let verdict = FiniteVerdict(finite_verdict(x, codebook));
            Ok((
                search_device(x, codebook, metric, CHUNK_SCORES),
                Some(verdict),
            ))
        }
    })
}

/// A contiguous f32 version of `t` (the same tensor when it already is one).
pub(crate) fn f32_contiguous(t: &Tensor) -> Tensor {
    if t.kind() == Kind::Float && t.is_contiguous() {
        t.shallow_clone()
    } else {
        t.to_kind(Kind::Float).contiguous()
    }
}

/// Borrows a contiguous f32 CPU tensor as an ndarray view.
pub(crate) fn view2(t: &Tensor) -> ArrayView2<'_, f32> {
    let s = t.size();
    let (n, d) = (s[0] as usize, s[1] as usize);
    if n * d == 0 {
        return ArrayView2::from_shape((n, d), &[]).expect("empty view");
    }
    // SAFETY: `t` is a contiguous f32 CPU tensor of n·d elements (f32_contiguous) that outlives
    // the returned view (tied to `t`'s borrow) and is not written while borrowed.
    unsafe { ArrayView2::from_shape_ptr((n, d), t.data_ptr() as *const f32) }
}

fn search_cpu(x: &Tensor, codebook: &Tensor, metric: Metric) -> Result<Tensor> {
    let (xc, cc) = (f32_contiguous(x), f32_contiguous(codebook));
    let index = CodebookIndex::new(view2(&cc), metric)?;
    let idx = index.search(view2(&xc))?;
    Ok(Tensor::from_slice(
        &idx.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(),
    ))
}

/// The verdict of the finite check as a device tensor ([`FiniteVerdict`]'s layout), computed
/// without any read back to the host.
pub(crate) fn finite_verdict(x: &Tensor, codebook: &Tensor) -> Tensor {
    let part = |t: &Tensor| {
        let bad = t
            .isfinite()
            .logical_not()
            .any_dim(1, false)
            .to_kind(Kind::Int64);
        match bad.numel() {
            0 => (
                t.new_zeros([], (Kind::Int64, t.device())),
                t.new_zeros([], (Kind::Int64, t.device())),
            ),
            // argmax gives the first maximal index: the first bad row when there is one.
            _ => (bad.max(), bad.argmax(0, false)),
        }
    };
    let ((bx, rx), (bc, rc)) = (part(x), part(codebook));
    Tensor::stack(&[bx, bc, rx, rc], 0)
}

/// The device path's version of vq-core's input check: the first row of `x` (then of the
/// codebook) holding NaN or ±∞ is [`vq_core::VqError::NonFinite`], as on the CPU. One host
/// read of the verdict.
pub(crate) fn check_finite_device(x: &Tensor, codebook: &Tensor) -> Result<()> {
    let values = Vec::<i64>::try_from(finite_verdict(x, codebook).to_device(Device::Cpu))
        .map_err(|_| VqTchError::Kind(x.kind()))?;
    FiniteVerdict::check(&values)
}

/// The device path with at most `chunk_scores` scores alive at a time.
fn search_device(x: &Tensor, codebook: &Tensor, metric: Metric, chunk_scores: i64) -> Tensor {
    let (x, c) = (x.to_kind(Kind::Float), codebook.to_kind(Kind::Float));
    let (x, c, bias) = match metric {
        Metric::Euclidean => {
            let mu = c.mean_dim([0i64].as_slice(), true, Kind::Float);
            let c = &c - &mu;
            let bias = (&c * &c).sum_dim_intlist([1i64].as_slice(), false, Kind::Float) * 0.5;
            (&x - &mu, c, Some(bias))
        }
        Metric::Cosine => {
            let unit = crate::rows::l2_normalise_rows;
            (unit(&x), unit(&c), None)
        }
    };
    let k = c.size()[0].max(1);
    let rows = (chunk_scores / k).max(1);
    let ct = c.transpose(0, 1);
    let parts: Vec<Tensor> = x
        .split(rows, 0)
        .iter()
        .map(|chunk| {
            let dots = chunk.matmul(&ct);
            match &bias {
                Some(b) => (b.unsqueeze(0) - dots).argmin(1, false),
                None => (-dots).argmin(1, false),
            }
        })
        .collect();
    Tensor::cat(&parts, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device path's logic, with chunks of 100 rows, checked on CPU tensors against vq-core
    /// (Euclidean far from the origin, where centring matters; cosine on zero-mean data, since
    /// this path does not re-rank near ties).
    #[test]
    fn chunked_device_path_agrees_with_vq_core() {
        let x = crate::rows::seeded_randn(&[1000, 6], 3);
        let c = crate::rows::seeded_randn(&[70, 6], 4);
        for (metric, offset) in [(Metric::Euclidean, 50.0), (Metric::Cosine, 0.0)] {
            let (x, c) = (&x + offset, &c + offset);
            let expect = search_cpu(&x, &c, metric).unwrap();
            check_finite_device(&x, &c).unwrap();
            let got = search_device(&x, &c, metric, 70 * 100);
            assert_eq!(
                Vec::<i64>::try_from(got).unwrap(),
                Vec::<i64>::try_from(expect).unwrap(),
                "{metric:?}"
            );
        }
    }

    /// The deferred verdict's values: clean inputs, a bad input row, a bad codebook row, no rows.
    #[test]
    fn the_verdict_holds_flags_and_first_rows() {
        let read = |t: Tensor| Vec::<i64>::try_from(t).unwrap();
        let x = crate::rows::seeded_randn(&[20, 3], 7);
        let c = crate::rows::seeded_randn(&[5, 3], 8);
        assert_eq!(read(finite_verdict(&x, &c)), [0, 0, 0, 0]);
        let _ = x.get(12).get(1).fill_(f64::NAN);
        let _ = x.get(17).get(0).fill_(f64::INFINITY);
        let _ = c.get(3).get(2).fill_(f64::NEG_INFINITY);
        assert_eq!(read(finite_verdict(&x, &c)), [1, 1, 12, 3]);
        let empty = Tensor::zeros([0, 3], (Kind::Float, Device::Cpu));
        assert_eq!(read(finite_verdict(&empty, &c)), [0, 1, 0, 3]);
        assert!(FiniteVerdict::check(&[1, 1]).is_err());
    }

    /// NaN and ∞ are named by the first row holding one, for inputs and codebook, as vq-core
    /// names them on the CPU.
    #[test]
    fn the_device_path_names_the_first_non_finite_row() {
        let x = crate::rows::seeded_randn(&[50, 4], 5);
        let c = crate::rows::seeded_randn(&[8, 4], 6);
        let _ = x.get(31).get(2).fill_(f64::NAN);
        let _ = x.get(40).get(0).fill_(f64::INFINITY);
        let err = check_finite_device(&x, &c).unwrap_err();
        let cpu = search_cpu(&x, &c, Metric::Euclidean).unwrap_err();
        assert_eq!(err.to_string(), cpu.to_string());
        assert!(err.to_string().contains("inputs at row 31"), "{err}");
        let x = crate::rows::seeded_randn(&[50, 4], 5);
        let _ = c.get(6).get(1).fill_(f64::NEG_INFINITY);
        let err = check_finite_device(&x, &c).unwrap_err().to_string();
        assert!(err.contains("codebook at row 6"), "{err}");
    }
}
