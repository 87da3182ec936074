//! Index backpropagation quantization, IBQ (Shi et al., "Taming Scalable Visual Tokenizer for
//! Autoregressive Image Generation", arXiv:2412.02692; official code TencentARC/SEED-Voken,
//! `src/IBQ/modules/vqvae/quantize.py`, `IndexPropagationQuantize`; no package on PyPI).
//!
//! With logits `l = z Cᵀ` (inner products, not distances), `p = softmax(l)`, `h` the one-hot
//! of `argmax l` (ties: the lowest index) and the straight-through one-hot `o = h − sg(p) + p`:
//!
//! `z_q = o C`  (value `h C = c_k`)
//!
//! The gradient `g = ∂L/∂z_q` reaches **every** code, through `o`'s value (`∂L/∂C += hᵀg`, the
//! chosen code) and through `p` (`∂L/∂l = p ⊙ (gCᵀ − ⟨gCᵀ, p⟩)`, then `∂L/∂z = (∂L/∂l) C`,
//! `∂L/∂C += (∂L/∂l)ᵀ z`): the "joint optimization of all codebook embeddings" that keeps
//! large codebooks in use. The layer's loss ([`ibq_loss`]) is
//! `mean((z_q − z)²) + mean((sg(hC) − z)²) + β·mean((hC − sg(z))²)`.
//!
//! SEED-Voken trains IBQ with an entropy penalty on the same logits ([`ibq_entropy`], its
//! `compute_entropy_loss`, weight 0.05 in `imagenet_ibqgan_1024.yaml`): with
//! `p = softmax(z Cᵀ / T)` (T = 0.01),
//! `mean_rows H(p) − H(mean_rows p)`, `H(p) = −Σ p log p` per row (exact, through
//! `log_softmax`) and `H(a) = −Σ a log(a + 1e-5)` for the average.
//!
//! The rotation trick cannot apply: the encoder's gradient comes through the categorical
//! distribution, not through a map from `z` to its code. "Usage" and "perplexity" are over the
//! chosen indices, and the quantization error is `mean((z − c_k)²)`.

use ndarray::{Array1, Array2, ArrayView2, Axis};

use crate::error::{Result, VqError, check_same_shape};

/// Result of [`ibq_forward`].
#[derive(Debug, Clone, PartialEq)]
pub struct IbqForward {
    /// `argmax_k z·c_k` per row.
    pub indices: Array1<u32>,
    /// `p = softmax(z Cᵀ)` (N×K).
    pub probs: Array2<f32>,
    /// `z_q`: the chosen codes (N×D).
    pub quantized: Array2<f32>,
}

fn check(z: ArrayView2<f32>, codebook: ArrayView2<f32>) -> Result<()> {
    if codebook.nrows() == 0 || codebook.ncols() == 0 {
        return Err(VqError::EmptyCodebook {
            k: codebook.nrows(),
            d: codebook.ncols(),
        });
    }
    if z.ncols() != codebook.ncols() {
        return Err(VqError::ShapeMismatch {
            what: "codebook dim vs input dim",
            expected: codebook.ncols(),
            got: z.ncols(),
        });
    }
    crate::search::check_finite(z, "input")
}

/// IBQ's forward: logits in f64, softmax, argmax and the chosen codes.
///
/// ```
/// use ndarray::array;
/// let c = array![[1.0f32, 0.0], [0.0, 1.0], [3.0, 0.0]];
/// let f = vq_core::ibq::ibq_forward(array![[1.0f32, 0.5]].view(), c.view()).unwrap();
/// // The largest inner product, not the nearest code: (1, 0.5)·(3, 0) = 3.
/// assert_eq!(f.indices[0], 2);
/// assert_eq!(f.quantized.row(0).to_vec(), vec![3.0, 0.0]);
/// ```
///
/// # Errors
/// [`VqError::EmptyCodebook`], [`VqError::ShapeMismatch`], [`VqError::NonFinite`].
pub fn ibq_forward(z: ArrayView2<f32>, codebook: ArrayView2<f32>) -> Result<IbqForward> {
    check(z, codebook)?;
    let (n, k) = (z.nrows(), codebook.nrows());
    let logits = z.mapv(f64::from).dot(&codebook.mapv(f64::from).t());
    let mut probs = Array2::zeros((n, k));
    let mut indices = Array1::zeros(n);
    for i in 0..n {
        let row = logits.row(i);
        let (best, max) = row
            .iter()
            .enumerate()
            .fold(
                (0, f64::NEG_INFINITY),
                |(b, m), (j, &v)| {
                    if v > m { (j, v) } else { (b, m) }
                },
            );
        let total: f64 = row.iter().map(|&v| (v - max).exp()).sum();
        for j in 0..k {
            probs[[i, j]] = ((row[j] - max).exp() / total) as f32;
        }
        indices[i] = best as u32;
    }
    let quantized = crate::gather_codes(codebook, indices.as_slice().expect("contiguous"))?;
    Ok(IbqForward {
        indices,
        probs,
        quantized,
    })
}

/// `(∂L/∂z, ∂L/∂C)` of the path `z_q = oC` from `g = ∂L/∂z_q` (N×D).
///
/// # Errors
/// Shape errors.
pub fn ibq_backward(
    z: ArrayView2<f32>,
    codebook: ArrayView2<f32>,
    fwd: &IbqForward,
    g: ArrayView2<f32>,
) -> Result<(Array2<f32>, Array2<f32>)> {
    check(z, codebook)?;
    check_same_shape(z, g, "gradient vs inputs")?;
    let (z64, c64, g64) = (
        z.mapv(f64::from),
        codebook.mapv(f64::from),
        g.mapv(f64::from),
    );
    let p = fwd.probs.mapv(f64::from);
    let go = g64.dot(&c64.t()); // ∂L/∂o = ∂L/∂p (N×K)
    let mut gl = Array2::zeros(p.raw_dim());
    for i in 0..p.nrows() {
        let s = go.row(i).dot(&p.row(i));
        for j in 0..p.ncols() {
            gl[[i, j]] = p[[i, j]] * (go[[i, j]] - s);
        }
    }
    let gz = gl.dot(&c64);
    let mut gc = gl.t().dot(&z64);
    for (i, &k) in fwd.indices.iter().enumerate() {
        let mut row = gc.row_mut(k as usize);
        row += &g64.row(i);
    }
    Ok((gz.mapv(|v| v as f32), gc.mapv(|v| v as f32)))
}

/// IBQ's loss `mean((z_q − z)²) + mean((sg(hC) − z)²) + β·mean((hC − sg(z))²)` (means over all
/// N·D elements; `z_q` has the chosen codes' value) and its gradients `(∂/∂z, ∂/∂C)`: the
/// first term's through `z` and through `z_q` ([`ibq_backward`]), the second's into `z`, the
/// third's into the chosen codes.
///
/// # Errors
/// Shape errors.
pub fn ibq_loss(
    z: ArrayView2<f32>,
    codebook: ArrayView2<f32>,
    fwd: &IbqForward,
    beta: f32,
) -> Result<(f64, Array2<f32>, Array2<f32>)> {
    check(z, codebook)?;
    let count = z.len() as f64;
    let diff = &fwd.quantized.mapv(f64::from) - &z.mapv(f64::from);
    let mse = diff.mapv(|v| v * v).sum() / count;
    let loss = mse * (2.0 + f64::from(beta));
    // d/dz_q of the first term, through the path; d/dz of the first two terms directly.
    let g_path = diff.mapv(|v| (2.0 * v / count) as f32);
    let (gz_path, mut gc) = ibq_backward(z, codebook, fwd, g_path.view())?;
    let gz = &gz_path - &diff.mapv(|v| (4.0 * v / count) as f32);
    for (i, &k) in fwd.indices.iter().enumerate() {
        let mut row = gc.row_mut(k as usize);
        row += &diff
            .row(i)
            .mapv(|v| (2.0 * f64::from(beta) * v / count) as f32);
    }
    Ok((loss, gz, gc))
}

/// The entropy penalty of [`ibq_entropy`] and its gradients.
#[derive(Debug, Clone, PartialEq)]
pub struct IbqEntropy {
    /// `mean_rows H(p)`.
    pub sample: f64,
    /// `H(mean_rows p)`.
    pub average: f64,
    /// `∂(sample − average)/∂z` (N×D).
    pub grad_z: Array2<f32>,
    /// `∂(sample − average)/∂C` (K×D).
    pub grad_codebook: Array2<f32>,
}

/// SEED-Voken's entropy penalty on IBQ's logits at temperature `t` (module docs), in f64.
///
/// # Errors
/// [`VqError::InvalidParameter`] for `t` ≤ 0; as [`ibq_forward`].
pub fn ibq_entropy(z: ArrayView2<f32>, codebook: ArrayView2<f32>, t: f64) -> Result<IbqEntropy> {
    check(z, codebook)?;
    if !(t.is_finite() && t > 0.0) {
        return Err(VqError::InvalidParameter {
            name: "temperature",
            value: t.to_string(),
            reason: "the entropy temperature must be finite and > 0",
        });
    }
    const EPS: f64 = 1e-5;
    let (z64, c64) = (z.mapv(f64::from), codebook.mapv(f64::from));
    let n = z.nrows().max(1) as f64;
    let mut logp = z64.dot(&c64.t()) / t;
    for mut row in logp.rows_mut() {
        let m = row.fold(f64::NEG_INFINITY, |a, &v| a.max(v));
        let lse = m + row.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
        row.mapv_inplace(|v| v - lse);
    }
    let p = logp.mapv(f64::exp);
    let h: Vec<f64> = p
        .rows()
        .into_iter()
        .zip(logp.rows())
        .map(|(p, l)| -p.dot(&l))
        .collect();
    let avg = p.mean_axis(Axis(0)).expect("N > 0");
    let sample = h.iter().sum::<f64>() / n;
    let average = -avg.iter().map(|&a| a * (a + EPS).ln()).sum::<f64>();
    // d(−H(avg))/d avg_k = ln(a_k + ε) + a_k/(a_k + ε); through the mean, then the softmax.
    let gavg: Vec<f64> = avg
        .iter()
        .map(|&a| (a + EPS).ln() + a / (a + EPS))
        .collect();
    let mut gl = Array2::zeros(p.raw_dim());
    for i in 0..p.nrows() {
        let gp: Vec<f64> = (0..p.ncols()).map(|k| gavg[k] / n).collect();
        let s: f64 = (0..p.ncols()).map(|k| p[[i, k]] * gp[k]).sum();
        for k in 0..p.ncols() {
            // Sample term: ∂H_i/∂l = −p (log p + H_i).
            let sample_term = -p[[i, k]] * (logp[[i, k]] + h[i]) / n;
            gl[[i, k]] = sample_term + p[[i, k]] * (gp[k] - s);
        }
    }
    let gl = gl / t;
    Ok(IbqEntropy {
        sample,
        average,
        grad_z: gl.dot(&c64).mapv(|v| v as f32),
        grad_codebook: gl.t().dot(&z64).mapv(|v| v as f32),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::randn;

    /// `softmax(z cᵀ) · values`.
    fn softmax_codes(z: &Array2<f64>, c: &Array2<f64>, values: &Array2<f64>) -> Array2<f64> {
        let mut p = z.dot(&c.t());
        for mut r in p.rows_mut() {
            let m = r.fold(f64::NEG_INFINITY, |a, &v| a.max(v));
            r.mapv_inplace(|v| (v - m).exp());
            let s = r.sum();
            r.mapv_inplace(|v| v / s);
        }
        p.dot(values)
    }

    /// `Σ w ⊙ z_q + loss` in f64 with `sg` spelt out: `z_q = hC + (p − sg(p))C` (its value
    /// the codes; the product's derivative in C is h's), the second term's codes and the third's inputs
    /// held at the point.
    #[test]
    fn ibq_gradients_match_finite_differences() {
        let z = randn((5, 4), 1);
        let c = randn((7, 4), 2);
        let w = randn((5, 4), 3).mapv(f64::from);
        let beta = 0.25f32;
        let f = ibq_forward(z.view(), c.view()).unwrap();
        let (gz1, gc1) = ibq_backward(z.view(), c.view(), &f, w.mapv(|v| v as f32).view()).unwrap();
        let (loss, gz2, gc2) = ibq_loss(z.view(), c.view(), &f, beta).unwrap();
        let (gz, gc) = (&gz1 + &gz2, &gc1 + &gc2);
        let (z0, c0) = (z.mapv(f64::from), c.mapv(f64::from));
        let idx = f.indices.to_vec();
        let pc0 = softmax_codes(&z0, &c0, &c0);
        let pick = |cc: &Array2<f64>| {
            Array2::from_shape_fn(z.raw_dim(), |(i, j)| cc[[idx[i] as usize, j]])
        };
        let n = z.len() as f64;
        let objective = |zz: &Array2<f64>, cc: &Array2<f64>| -> f64 {
            let zq = &pick(cc) + &softmax_codes(zz, cc, &c0) - &pc0;
            let sq = |a: Array2<f64>| a.mapv(|v| v * v).sum() / n;
            (&w * &zq).sum()
                + sq(&zq - zz)
                + sq(&pick(&c0) - zz)
                + f64::from(beta) * sq(&pick(cc) - &z0)
        };
        let value = objective(&z0, &c0) - (&w * &pick(&c0)).sum();
        assert!((value - loss).abs() < 1e-9 * loss.abs().max(1.0));
        let h = 1e-6;
        for (i, j) in [(0, 0), (2, 3), (4, 1)] {
            let (mut p, mut m) = (z0.clone(), z0.clone());
            p[[i, j]] += h;
            m[[i, j]] -= h;
            let fd = (objective(&p, &c0) - objective(&m, &c0)) / (2.0 * h);
            assert!((fd - gz[[i, j]] as f64).abs() < 1e-5, "z {i},{j}: {fd}");
        }
        for k in 0..7 {
            for j in [0, 3] {
                let (mut p, mut m) = (c0.clone(), c0.clone());
                p[[k, j]] += h;
                m[[k, j]] -= h;
                let fd = (objective(&z0, &p) - objective(&z0, &m)) / (2.0 * h);
                assert!((fd - gc[[k, j]] as f64).abs() < 1e-5, "c {k},{j}: {fd}");
            }
        }
        // The entropy penalty against finite differences.
        let t = 0.7;
        let penalty = |zz: &Array2<f64>, cc: &Array2<f64>| {
            let e = ibq_entropy(
                zz.mapv(|v| v as f32).view(),
                cc.mapv(|v| v as f32).view(),
                t,
            )
            .unwrap();
            e.sample - e.average
        };
        let e = ibq_entropy(z.view(), c.view(), t).unwrap();
        let h = 1e-3;
        for (i, j) in [(0, 0), (3, 2)] {
            let (mut p, mut m) = (z0.clone(), z0.clone());
            p[[i, j]] += h;
            m[[i, j]] -= h;
            let fd = (penalty(&p, &c0) - penalty(&m, &c0)) / (2.0 * h);
            assert!(
                (fd - e.grad_z[[i, j]] as f64).abs() < 1e-4,
                "entropy z: {fd}"
            );
            let (mut p, mut m) = (c0.clone(), c0.clone());
            p[[i, j]] += h;
            m[[i, j]] -= h;
            let fd = (penalty(&z0, &p) - penalty(&z0, &m)) / (2.0 * h);
            assert!(
                (fd - e.grad_codebook[[i, j]] as f64).abs() < 1e-4,
                "entropy C: {fd}"
            );
        }
        // Every code gets a gradient, not only the chosen ones.
        assert!(gc1.rows().into_iter().all(|r| r.iter().any(|&v| v != 0.0)));
    }
}
