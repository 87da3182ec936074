//! Soft convex quantization, SCQ (Gautam et al., "Soft Convex Quantization: Revisiting Vector
//! Quantization with Convex Optimization", arXiv:2310.03004, L4DC 2024), in its scalable
//! relaxed form. No reference package exists; the formulas are the paper's relaxation as its
//! Section 3.2 states it (the exact form solves a constrained QP through cvxpylayers).
//!
//! Each input becomes a convex combination of the codewords: with `P_VQ` the one-hot of the
//! nearest code (Euclidean), λ > 0 and the codebook `C` (K×D),
//!
//! `P̃ = (Z Cᵀ + λ P_VQ)(C Cᵀ + λI)⁻¹`  (ridge regression towards the VQ assignment)
//!
//! `P = Π_Δ(P̃)` row by row (Euclidean projection onto the simplex, exact by sorting:
//! Duchi et al. 2008), and `Z_q = P C`. The forward is differentiable: the gradient reaches
//! the encoder and **every** codeword through the solve and the projection (whose Jacobian on a
//! row with support S is `I_S − 1_S 1_Sᵀ/|S|`); `P_VQ` is a constant. There is no estimator, so
//! the rotation trick cannot apply; there is no codebook loss (the codebook learns through
//! `Z_q`) and the commitment term `β·mean((Z − sg(Z_q))²)` is optional.
//!
//! A token is the code of largest weight, `argmax_k P_k` (ties: the lowest index); "usage" and
//! "perplexity" are over those tokens, and the quantization error is `mean((Z − Z_q)²)` of the
//! soft value the decoder sees in training. Decoding a token gives its codeword.
//!
//! Cost: the K×K system per step (K³/3 for the factorisation, K²·N for the solve).

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};

use crate::error::{Result, VqError};

/// Result of [`Scq::forward`].
#[derive(Debug, Clone, PartialEq)]
pub struct ScqForward {
    /// The nearest codes (`P_VQ`'s ones).
    pub nearest: Array1<u32>,
    /// `P̃` before the projection (N×K).
    pub ridge: Array2<f64>,
    /// `P` (N×K), rows on the simplex.
    pub weights: Array2<f64>,
    /// `Z_q = P C` (N×D).
    pub quantized: Array2<f32>,
    /// `argmax_k P_k` per row.
    pub indices: Array1<u32>,
}

/// SCQ with ridge weight `lambda` (> 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scq {
    /// λ.
    pub lambda: f64,
}

impl Scq {
    /// The forward pass (module docs), in f64.
    ///
    /// ```
    /// use ndarray::array;
    /// use vq_core::scq::Scq;
    /// let c = array![[1.0f32, 0.0], [0.0, 1.0], [-1.0, 0.0]];
    /// let f = Scq { lambda: 0.1 }.forward(array![[0.6f32, 0.3]].view(), c.view()).unwrap();
    /// // A convex combination of the codes, mostly the nearest one.
    /// assert!((f.weights.sum() - 1.0).abs() < 1e-12 && f.weights.iter().all(|&w| w >= 0.0));
    /// assert_eq!(f.indices[0], 0);
    /// let zq = f.weights.dot(&c.mapv(f64::from));
    /// assert!((f.quantized[[0, 1]] as f64 - zq[[0, 1]]).abs() < 1e-6 && zq[[0, 1]] > 0.0);
    /// ```
    ///
    /// # Errors
    /// [`VqError::InvalidParameter`] for λ ≤ 0 or not finite; the search's errors.
    pub fn forward(&self, z: ArrayView2<f32>, codebook: ArrayView2<f32>) -> Result<ScqForward> {
        if !(self.lambda.is_finite() && self.lambda > 0.0) {
            return Err(VqError::InvalidParameter {
                name: "lambda",
                value: self.lambda.to_string(),
                reason: "the ridge weight must be finite and > 0",
            });
        }
        let nearest = crate::nearest_codes(z, codebook, crate::Metric::Euclidean)?;
        let c = codebook.mapv(f64::from);
        let mut rhs = z.mapv(f64::from).dot(&c.t());
        for (i, &k) in nearest.iter().enumerate() {
            rhs[[i, k as usize]] += self.lambda;
        }
        let chol = cholesky(&self.system(&c));
        let ridge = solve_rows(&chol, &rhs);
        let mut weights = ridge.clone();
        for mut row in weights.rows_mut() {
            let p = simplex_projection(row.view());
            row.assign(&p);
        }
        let quantized = weights.dot(&c).mapv(|v| v as f32);
        let indices = weights
            .rows()
            .into_iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .fold(
                        (0, f64::NEG_INFINITY),
                        |(b, m), (j, &v)| {
                            if v > m { (j, v) } else { (b, m) }
                        },
                    )
                    .0 as u32
            })
            .collect();
        Ok(ScqForward {
            nearest,
            ridge,
            weights,
            quantized,
            indices,
        })
    }

    /// `(∂L/∂Z, ∂L/∂C)` from `g = ∂L/∂Z_q` (N×D).
    ///
    /// # Errors
    /// [`VqError::ShapeMismatch`] for a gradient of another shape.
    pub fn backward(
        &self,
        z: ArrayView2<f32>,
        codebook: ArrayView2<f32>,
        fwd: &ScqForward,
        g: ArrayView2<f32>,
    ) -> Result<(Array2<f32>, Array2<f32>)> {
        crate::error::check_same_shape(z, g, "gradient vs inputs")?;
        let (z, c, g) = (
            z.mapv(f64::from),
            codebook.mapv(f64::from),
            g.mapv(f64::from),
        );
        let gp = g.dot(&c.t());
        let mut gc = fwd.weights.t().dot(&g);
        // Through the projection: on the support, minus the support's mean.
        let mut gr = Array2::zeros(gp.raw_dim());
        for i in 0..gp.nrows() {
            let support: Vec<usize> = (0..gp.ncols())
                .filter(|&k| fwd.weights[[i, k]] > 0.0)
                .collect();
            let mean = support.iter().map(|&k| gp[[i, k]]).sum::<f64>() / support.len() as f64;
            for &k in &support {
                gr[[i, k]] = gp[[i, k]] - mean;
            }
        }
        // Through the solve: P̃ = B A⁻¹ with B = Z Cᵀ + λP_VQ, A = C Cᵀ + λI.
        let h = solve_rows(&cholesky(&self.system(&c)), &gr);
        let ga = -fwd.ridge.t().dot(&h);
        let gz = h.dot(&c);
        gc = gc + h.t().dot(&z) + (&ga + &ga.t()).dot(&c);
        Ok((gz.mapv(|v| v as f32), gc.mapv(|v| v as f32)))
    }

    /// `A = C Cᵀ + λI`.
    fn system(&self, c: &Array2<f64>) -> Array2<f64> {
        let mut a = c.dot(&c.t());
        a.diag_mut().mapv_inplace(|v| v + self.lambda);
        a
    }
}

/// The Euclidean projection of `v` onto the probability simplex (Duchi et al., "Efficient
/// projections onto the l1-ball", ICML 2008, Fig. 1): `max(v − θ, 0)` with θ from the sorted
/// values.
///
/// ```
/// let p = vq_core::scq::simplex_projection(ndarray::array![0.5, 0.9, -1.0].view());
/// // θ = (0.9 + 0.5 − 1)/2 = 0.2
/// assert!((p[0] - 0.3).abs() < 1e-12 && (p[1] - 0.7).abs() < 1e-12 && p[2] == 0.0);
/// ```
pub fn simplex_projection(v: ArrayView1<f64>) -> Array1<f64> {
    let mut u: Vec<f64> = v.to_vec();
    u.sort_by(|a, b| b.total_cmp(a));
    let (mut cumsum, mut theta) = (0.0, 0.0);
    for (j, &x) in u.iter().enumerate() {
        cumsum += x;
        let t = (cumsum - 1.0) / (j + 1) as f64;
        if x - t > 0.0 {
            theta = t;
        }
    }
    v.mapv(|x| (x - theta).max(0.0))
}

/// The lower Cholesky factor of a symmetric positive-definite matrix.
fn cholesky(a: &Array2<f64>) -> Array2<f64> {
    let k = a.nrows();
    let mut l = Array2::<f64>::zeros((k, k));
    for i in 0..k {
        for j in 0..=i {
            let s: f64 = (0..j).map(|m| l[[i, m]] * l[[j, m]]).sum();
            l[[i, j]] = match i == j {
                true => (a[[i, i]] - s).max(f64::MIN_POSITIVE).sqrt(),
                false => (a[[i, j]] - s) / l[[j, j]],
            };
        }
    }
    l
}

/// `X = B A⁻¹` for `A = L Lᵀ` (each row of B solved).
fn solve_rows(l: &Array2<f64>, b: &Array2<f64>) -> Array2<f64> {
    let k = l.nrows();
    let mut out = b.clone();
    for mut row in out.rows_mut() {
        for i in 0..k {
            let s: f64 = (0..i).map(|m| l[[i, m]] * row[m]).sum();
            row[i] = (row[i] - s) / l[[i, i]];
        }
        for i in (0..k).rev() {
            let s: f64 = (i + 1..k).map(|m| l[[m, i]] * row[m]).sum();
            row[i] = (row[i] - s) / l[[i, i]];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::randn;

    #[test]
    fn scq_gradients_match_finite_differences() {
        let scq = Scq { lambda: 0.5 };
        let z = randn((6, 3), 1);
        let c = randn((5, 3), 2);
        let w = randn((6, 3), 3);
        let f = scq.forward(z.view(), c.view()).unwrap();
        assert!(
            f.weights
                .rows()
                .into_iter()
                .all(|r| (r.sum() - 1.0).abs() < 1e-12)
        );
        let (gz, gc) = scq.backward(z.view(), c.view(), &f, w.view()).unwrap();
        // Finite differences in f64 with P_VQ held (it is piecewise constant).
        let objective = |zz: &Array2<f64>, cc: &Array2<f64>| -> f64 {
            let mut rhs = zz.dot(&cc.t());
            for (i, &k) in f.nearest.iter().enumerate() {
                rhs[[i, k as usize]] += scq.lambda;
            }
            let p = solve_rows(&cholesky(&scq.system(cc)), &rhs);
            let mut q = p.clone();
            for mut r in q.rows_mut() {
                let s = simplex_projection(r.view());
                r.assign(&s);
            }
            (&q.dot(cc) * &w.mapv(f64::from)).sum()
        };
        let (z0, c0) = (z.mapv(f64::from), c.mapv(f64::from));
        let h = 1e-6;
        for (i, j) in [(0, 0), (3, 1), (5, 2)] {
            let (mut p, mut m) = (z0.clone(), z0.clone());
            p[[i, j]] += h;
            m[[i, j]] -= h;
            let fd = (objective(&p, &c0) - objective(&m, &c0)) / (2.0 * h);
            assert!((fd - gz[[i, j]] as f64).abs() < 1e-5, "z {i},{j}: {fd}");
        }
        for k in 0..5 {
            for j in 0..3 {
                let (mut p, mut m) = (c0.clone(), c0.clone());
                p[[k, j]] += h;
                m[[k, j]] -= h;
                let fd = (objective(&z0, &p) - objective(&z0, &m)) / (2.0 * h);
                assert!((fd - gc[[k, j]] as f64).abs() < 1e-5, "c {k},{j}: {fd}");
            }
        }
    }

    #[test]
    fn the_projection_is_the_nearest_point_of_the_simplex() {
        let v = randn((40, 6), 4).mapv(|x| f64::from(x) * 2.0);
        for row in v.rows() {
            let p = simplex_projection(row);
            assert!((p.sum() - 1.0).abs() < 1e-12 && p.iter().all(|&x| x >= 0.0));
            // KKT: v − p = θ on the support, ≤ θ off it.
            let theta = (0..6).find(|&k| p[k] > 0.0).map(|k| row[k] - p[k]).unwrap();
            for k in 0..6 {
                match p[k] > 0.0 {
                    true => assert!((row[k] - p[k] - theta).abs() < 1e-12),
                    false => assert!(row[k] <= theta + 1e-12),
                }
            }
        }
        assert!(
            Scq { lambda: 0.0 }
                .forward(randn((2, 2), 5).view(), randn((3, 2), 6).view())
                .is_err()
        );
    }
}
