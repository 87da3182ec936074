//! DiVeQ and SF-DiVeQ (Vali et al., "DiVeQ: Differentiable Vector Quantization Using the
//! Reparameterization Trick", arXiv:2509.26469; official code AaltoML/DiVeQ, `diveq.py`,
//! `diveq_detach.py`, `sf_diveq.py`; lucidrains' `directional_reparam`).
//!
//! **DiVeQ.** With `q` the nearest code of `z`, `ε ~ N(0, σ²I)` and
//! `d = (q − z + ε)/‖q − z + ε‖`:
//!
//! `z_q = z + ‖q − z‖ · sg(d)`
//!
//! The value is a point at the quantization error's distance from `z` in (nearly) the code's
//! direction; with `ε = 0` (the *detached* variant, `diveq_detach.py`) it is `q` itself. The
//! gradient reaches both `z` and the code, with `u = (q − z)/‖q − z‖` and `s = g·d`:
//!
//! `∂L/∂z = g − s u`,  `∂L/∂q = s u`
//!
//! so the encoder sees the component of `g` orthogonal to the error (for `ε → 0`) and the code
//! moves along the error: no codebook or commitment loss is needed, and the codebook must be
//! learned by gradient (an EMA codebook gets nothing from this path). The rotation trick does
//! not combine with it: DiVeQ *is* the gradient path (it replaces the estimator).
//!
//! **SF-DiVeQ** (space-filling): the codewords `c_0 … c_{K−1}` are the vertices of a polyline;
//! each training step draws a dither `λ_j ~ U(0, 1)` per segment and the input goes to the
//! nearest *dithered point* `p_j = (1 − λ_j) c_j + λ_j c_{j+1}` (K − 1 segments: the tokens):
//!
//! `z_q = z + (1 − λ)‖c_j − z‖ sg(d_1) + λ‖c_{j+1} − z‖ sg(d_2)`
//!
//! with `d_1`, `d_2` the (noised) unit directions from `z` to `c_j` and `c_{j+1}`; its value
//! is `p_j` when `ε = 0`. Gradients, with `s_1 = (1 − λ) g·d_1`, `s_2 = λ g·d_2`:
//! `∂L/∂z = g − s_1 u_1 − s_2 u_2`, `∂L/∂c_j = s_1 u_1`, `∂L/∂c_{j+1} = s_2 u_2`.
//! (The official `sf_diveq_detach.py` uses `c_j − z` in the second term's direction, so its
//! value is not `p_j`; this follows the paper's formula and `sf_diveq.py`.)
//!
//! A zero error (`z` on a code) has no direction: its `u` is 0 and `d` the noise's direction
//! (0 without noise), so `z_q = z` and the gradient is `g`.
//!
//! "Usage" and "perplexity" are over the codes (DiVeQ) or the segments (SF-DiVeQ); the
//! quantization error is `mean((z − z_q)²)` of the value the decoder sees.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Zip};

use crate::error::{Result, VqError, check_same_shape};

/// Norms below this make a direction undefined (the official code's `clamp_min(1e-12)`).
pub const DIRECTION_FLOOR: f64 = 1e-12;

/// `v/‖v‖` in f64, or zeros when `‖v‖ ≤` [`DIRECTION_FLOOR`].
fn unit(v: &[f64]) -> Vec<f64> {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    match n > DIRECTION_FLOOR {
        true => v.iter().map(|x| x / n).collect(),
        false => vec![0.0; v.len()],
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One reparameterised term of a row: the error `c − z` (its norm and unit direction `u`) and
/// the noised unit direction `d`.
struct Term {
    norm: f64,
    u: Vec<f64>,
    d: Vec<f64>,
}

impl Term {
    fn new(z: ArrayView1<f32>, c: ArrayView1<f32>, noise: Option<ArrayView1<f32>>) -> Self {
        let err: Vec<f64> = c
            .iter()
            .zip(z)
            .map(|(&c, &z)| c as f64 - z as f64)
            .collect();
        let norm = dot(&err, &err).sqrt();
        let noised: Vec<f64> = match noise {
            Some(n) => err.iter().zip(n).map(|(e, &n)| e + n as f64).collect(),
            None => err.clone(),
        };
        Self {
            norm,
            u: unit(&err),
            d: unit(&noised),
        }
    }
}

/// Result of [`diveq_forward`].
#[derive(Debug, Clone, PartialEq)]
pub struct DiveqForward {
    /// `z_q` (N×D).
    pub quantized: Array2<f32>,
    /// The noised unit directions `d` (N×D), constants of the backward pass.
    pub directions: Array2<f32>,
}

/// DiVeQ's value for inputs `z` and their codes `q` (N×D), with the direction noise `ε`
/// (N×D; `None` for the detached variant).
///
/// ```
/// use ndarray::array;
/// let z = array![[0.0f32, 0.0]];
/// let q = array![[3.0f32, 4.0]];
/// let f = vq_core::diveq::diveq_forward(z.view(), q.view(), None).unwrap();
/// assert_eq!(f.quantized, q); // without noise the value is the code
/// ```
///
/// # Errors
/// [`VqError::ShapeMismatch`] if the shapes differ.
pub fn diveq_forward(
    z: ArrayView2<f32>,
    q: ArrayView2<f32>,
    noise: Option<ArrayView2<f32>>,
) -> Result<DiveqForward> {
    check_same_shape(z, q, "codes vs inputs")?;
    if let Some(n) = noise {
        check_same_shape(z, n, "noise vs inputs")?;
    }
    let mut quantized = Array2::zeros(z.raw_dim());
    let mut directions = Array2::zeros(z.raw_dim());
    for i in 0..z.nrows() {
        let t = Term::new(z.row(i), q.row(i), noise.as_ref().map(|n| n.row(i)));
        for j in 0..z.ncols() {
            quantized[[i, j]] = (z[[i, j]] as f64 + t.norm * t.d[j]) as f32;
            directions[[i, j]] = t.d[j] as f32;
        }
    }
    Ok(DiveqForward {
        quantized,
        directions,
    })
}

/// DiVeQ's gradients `(∂L/∂z, ∂L/∂q)` from `g = ∂L/∂z_q` (all N×D; `directions` from the
/// forward). The codebook's gradient is `∂L/∂q` summed into each row's code.
///
/// # Errors
/// [`VqError::ShapeMismatch`] if the shapes differ.
pub fn diveq_backward(
    z: ArrayView2<f32>,
    q: ArrayView2<f32>,
    directions: ArrayView2<f32>,
    g: ArrayView2<f32>,
) -> Result<(Array2<f32>, Array2<f32>)> {
    check_same_shape(z, q, "codes vs inputs")?;
    check_same_shape(z, directions, "directions vs inputs")?;
    check_same_shape(z, g, "gradient vs inputs")?;
    let mut gz = Array2::zeros(z.raw_dim());
    let mut gq = Array2::zeros(z.raw_dim());
    for i in 0..z.nrows() {
        let t = Term::new(z.row(i), q.row(i), None);
        let gi: Vec<f64> = g.row(i).iter().map(|&v| v as f64).collect();
        let d: Vec<f64> = directions.row(i).iter().map(|&v| v as f64).collect();
        let s = dot(&gi, &d);
        for j in 0..z.ncols() {
            gz[[i, j]] = (gi[j] - s * t.u[j]) as f32;
            gq[[i, j]] = (s * t.u[j]) as f32;
        }
    }
    Ok((gz, gq))
}

/// The dithered points `p_j = (1 − λ_j) c_j + λ_j c_{j+1}` ((K−1)×D) of a codebook (K×D,
/// K ≥ 2) for dithers `λ` (K − 1).
///
/// # Errors
/// [`VqError::EmptyCodebook`] for K < 2; [`VqError::ShapeMismatch`] for K − 1 ≠ `λ.len()`.
pub fn dithered_points(codebook: ArrayView2<f32>, dither: ArrayView1<f32>) -> Result<Array2<f32>> {
    let k = codebook.nrows();
    if k < 2 || codebook.ncols() == 0 {
        return Err(VqError::EmptyCodebook {
            k,
            d: codebook.ncols(),
        });
    }
    if dither.len() != k - 1 {
        return Err(VqError::ShapeMismatch {
            what: "dithers vs segments",
            expected: k - 1,
            got: dither.len(),
        });
    }
    let mut out = Array2::zeros((k - 1, codebook.ncols()));
    for (j, mut row) in out.rows_mut().into_iter().enumerate() {
        let l = dither[j];
        Zip::from(&mut row)
            .and(codebook.row(j))
            .and(codebook.row(j + 1))
            .for_each(|p, &a, &b| *p = (1.0 - l) * a + l * b);
    }
    Ok(out)
}

/// Result of [`SfDiveq::forward`].
#[derive(Debug, Clone, PartialEq)]
pub struct SfDiveqForward {
    /// The segment `j` of each row (its nearest dithered point).
    pub indices: Array1<u32>,
    /// `z_q` (N×D).
    pub quantized: Array2<f32>,
    /// `d_1`, `d_2` (N×D each).
    pub directions: [Array2<f32>; 2],
}

/// SF-DiVeQ's forward and backward for one draw of dithers and noise (module docs).
#[derive(Debug, Clone, Copy)]
pub struct SfDiveq<'a> {
    /// The codewords (K×D, K ≥ 2), in polyline order.
    pub codebook: ArrayView2<'a, f32>,
    /// The dithers `λ_j` (K − 1).
    pub dither: ArrayView1<'a, f32>,
}

impl SfDiveq<'_> {
    /// Segments by the nearest dithered point (Euclidean, exact) and the reparameterised value.
    /// `noise` holds `ε_1`, `ε_2` (N×D each) or is `None` (detached).
    ///
    /// ```
    /// use ndarray::array;
    /// use vq_core::diveq::SfDiveq;
    /// let codebook = array![[0.0f32, 0.0], [2.0, 0.0], [2.0, 2.0]];
    /// let dither = array![0.5f32, 0.25];
    /// let sf = SfDiveq { codebook: codebook.view(), dither: dither.view() };
    /// let f = sf.forward(array![[1.0f32, 0.2], [2.1, 0.4]].view(), None).unwrap();
    /// assert_eq!(f.indices.to_vec(), vec![0, 1]); // (1, 0) and (2, 0.5) are the points
    /// assert_eq!(f.quantized.row(1).to_vec(), vec![2.0, 0.5]);
    /// ```
    ///
    /// # Errors
    /// As [`dithered_points`]; [`VqError::ShapeMismatch`] for inputs or noise of other widths;
    /// [`VqError::NonFinite`] as the search reports it.
    pub fn forward(
        &self,
        z: ArrayView2<f32>,
        noise: Option<[ArrayView2<f32>; 2]>,
    ) -> Result<SfDiveqForward> {
        let points = dithered_points(self.codebook, self.dither)?;
        let indices = crate::nearest_codes(z, points.view(), crate::Metric::Euclidean)?;
        if let Some(n) = noise {
            for n in n {
                check_same_shape(z, n, "noise vs inputs")?;
            }
        }
        let mut quantized = Array2::zeros(z.raw_dim());
        let mut directions = [Array2::zeros(z.raw_dim()), Array2::zeros(z.raw_dim())];
        for (i, &j) in indices.iter().enumerate() {
            let (j, l) = (j as usize, self.dither[j as usize] as f64);
            let t1 = Term::new(
                z.row(i),
                self.codebook.row(j),
                noise.as_ref().map(|n| n[0].row(i)),
            );
            let t2 = Term::new(
                z.row(i),
                self.codebook.row(j + 1),
                noise.as_ref().map(|n| n[1].row(i)),
            );
            for c in 0..z.ncols() {
                let v = z[[i, c]] as f64 + (1.0 - l) * t1.norm * t1.d[c] + l * t2.norm * t2.d[c];
                quantized[[i, c]] = v as f32;
                directions[0][[i, c]] = t1.d[c] as f32;
                directions[1][[i, c]] = t2.d[c] as f32;
            }
        }
        Ok(SfDiveqForward {
            indices,
            quantized,
            directions,
        })
    }

    /// `(∂L/∂z, ∂L/∂C)` from `g = ∂L/∂z_q` (N×D); `∂L/∂C` is K×D.
    ///
    /// # Errors
    /// [`VqError::ShapeMismatch`] for a gradient of another shape.
    pub fn backward(
        &self,
        z: ArrayView2<f32>,
        fwd: &SfDiveqForward,
        g: ArrayView2<f32>,
    ) -> Result<(Array2<f32>, Array2<f32>)> {
        check_same_shape(z, g, "gradient vs inputs")?;
        check_same_shape(z, fwd.quantized.view(), "forward vs inputs")?;
        let mut gz = Array2::zeros(z.raw_dim());
        let mut gc = Array2::<f64>::zeros(self.codebook.raw_dim());
        for (i, &j) in fwd.indices.iter().enumerate() {
            let (j, l) = (j as usize, self.dither[j as usize] as f64);
            let gi: Vec<f64> = g.row(i).iter().map(|&v| v as f64).collect();
            let d = |k: usize| -> Vec<f64> {
                fwd.directions[k].row(i).iter().map(|&v| v as f64).collect()
            };
            let u1 = Term::new(z.row(i), self.codebook.row(j), None).u;
            let u2 = Term::new(z.row(i), self.codebook.row(j + 1), None).u;
            let (s1, s2) = ((1.0 - l) * dot(&gi, &d(0)), l * dot(&gi, &d(1)));
            for c in 0..z.ncols() {
                gz[[i, c]] = (gi[c] - s1 * u1[c] - s2 * u2[c]) as f32;
                gc[[j, c]] += s1 * u1[c];
                gc[[j + 1, c]] += s2 * u2[c];
            }
        }
        Ok((gz, gc.mapv(|v| v as f32)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::randn;
    use ndarray::Array1;

    /// `L = Σ w ⊙ z_q` with fixed directions: the backward against central differences of the
    /// forward in f64 (directions held, as `sg` holds them).
    fn loss(z: &Array2<f64>, q: &Array2<f64>, d: &Array2<f64>, w: &Array2<f64>) -> f64 {
        let mut total = 0.0;
        for i in 0..z.nrows() {
            let err = &q.row(i) - &z.row(i);
            let n = err.dot(&err).sqrt();
            total += w.row(i).dot(&(&z.row(i) + &(&d.row(i) * n)));
        }
        total
    }

    #[test]
    fn diveq_gradients_match_finite_differences() {
        let z = randn((6, 5), 1);
        let q = randn((6, 5), 2);
        let noise = randn((6, 5), 3) * 0.05;
        let w = randn((6, 5), 4);
        let f = diveq_forward(z.view(), q.view(), Some(noise.view())).unwrap();
        let (gz, gq) = diveq_backward(z.view(), q.view(), f.directions.view(), w.view()).unwrap();
        let (z64, q64, d64, w64) = (
            z.mapv(f64::from),
            q.mapv(f64::from),
            f.directions.mapv(f64::from),
            w.mapv(f64::from),
        );
        let h = 1e-6;
        for (i, j) in [(0, 0), (2, 3), (5, 4)] {
            for (which, got) in [(0, &gz), (1, &gq)] {
                let mut plus = [z64.clone(), q64.clone()];
                let mut minus = [z64.clone(), q64.clone()];
                plus[which][[i, j]] += h;
                minus[which][[i, j]] -= h;
                let fd = (loss(&plus[0], &plus[1], &d64, &w64)
                    - loss(&minus[0], &minus[1], &d64, &w64))
                    / (2.0 * h);
                assert!(
                    (fd - got[[i, j]] as f64).abs() < 1e-5,
                    "{which} {i},{j}: {fd}"
                );
            }
        }
        // The value sits at the error's distance from z.
        for i in 0..6 {
            let a = &f.quantized.row(i) - &z.row(i);
            let b = &q.row(i) - &z.row(i);
            assert!((a.dot(&a).sqrt() - b.dot(&b).sqrt()).abs() < 1e-5);
        }
    }

    #[test]
    fn without_noise_the_value_is_the_code_and_a_zero_error_passes_the_gradient() {
        let z = randn((4, 3), 5);
        let mut q = randn((4, 3), 6);
        q.row_mut(2).assign(&z.row(2));
        let f = diveq_forward(z.view(), q.view(), None).unwrap();
        assert!((&f.quantized - &q).iter().all(|v| v.abs() < 1e-6));
        let g = randn((4, 3), 7);
        let (gz, gq) = diveq_backward(z.view(), q.view(), f.directions.view(), g.view()).unwrap();
        assert_eq!(gz.row(2), g.row(2));
        assert!(gq.row(2).iter().all(|&v| v == 0.0));
        // Detached: the encoder gets g minus its component along the error.
        let u = {
            let e = &q.row(0) - &z.row(0);
            &e / e.dot(&e).sqrt()
        };
        assert!(gz.row(0).dot(&u).abs() < 1e-5);
    }

    #[test]
    fn sf_diveq_gradients_match_finite_differences() {
        let codebook = randn((5, 3), 8);
        let dither = Array1::from(vec![0.2f32, 0.7, 0.5, 0.9]);
        let sf = SfDiveq {
            codebook: codebook.view(),
            dither: dither.view(),
        };
        let z = randn((7, 3), 9);
        let n = [randn((7, 3), 10) * 0.01, randn((7, 3), 11) * 0.01];
        let f = sf
            .forward(z.view(), Some([n[0].view(), n[1].view()]))
            .unwrap();
        let w = randn((7, 3), 12);
        let (gz, gc) = sf.backward(z.view(), &f, w.view()).unwrap();
        let value = |z: &Array2<f64>, c: &Array2<f64>| -> f64 {
            let mut total = 0.0;
            for (i, &j) in f.indices.iter().enumerate() {
                let (j, l) = (j as usize, dither[j as usize] as f64);
                let mut v = z.row(i).to_owned();
                for (k, lk) in [(j, 1.0 - l), (j + 1, l)] {
                    let e = &c.row(k) - &z.row(i);
                    let d = f.directions[k - j].row(i).mapv(f64::from);
                    v = v + d * (lk * e.dot(&e).sqrt());
                }
                total += v.dot(&w.row(i).mapv(f64::from));
            }
            total
        };
        let (z64, c64) = (z.mapv(f64::from), codebook.mapv(f64::from));
        let h = 1e-6;
        for (i, j) in [(0, 0), (3, 2), (6, 1)] {
            let (mut p, mut m) = (z64.clone(), z64.clone());
            p[[i, j]] += h;
            m[[i, j]] -= h;
            let fd = (value(&p, &c64) - value(&m, &c64)) / (2.0 * h);
            assert!((fd - gz[[i, j]] as f64).abs() < 1e-5);
        }
        for k in 0..5 {
            for j in 0..3 {
                let (mut p, mut m) = (c64.clone(), c64.clone());
                p[[k, j]] += h;
                m[[k, j]] -= h;
                let fd = (value(&z64, &p) - value(&z64, &m)) / (2.0 * h);
                assert!((fd - gc[[k, j]] as f64).abs() < 1e-5, "code {k}: {fd}");
            }
        }
    }

    #[test]
    fn sf_diveq_without_noise_lands_on_the_nearest_dithered_point() {
        let codebook = randn((6, 4), 13);
        let dither = Array1::from(vec![0.1f32, 0.4, 0.5, 0.8, 0.3]);
        let sf = SfDiveq {
            codebook: codebook.view(),
            dither: dither.view(),
        };
        let z = randn((50, 4), 14);
        let f = sf.forward(z.view(), None).unwrap();
        let points = dithered_points(codebook.view(), dither.view()).unwrap();
        for (i, &j) in f.indices.iter().enumerate() {
            let dist = |k: usize| {
                let e = &points.row(k) - &z.row(i);
                e.dot(&e)
            };
            assert!((0..5).all(|k| dist(j as usize) <= dist(k)));
            let e = &f.quantized.row(i) - &points.row(j as usize);
            assert!(e.iter().all(|v| v.abs() < 1e-5));
        }
        assert!(dithered_points(codebook.slice(ndarray::s![..1, ..]), dither.view()).is_err());
    }
}
