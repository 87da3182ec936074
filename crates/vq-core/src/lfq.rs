//! Lookup-free quantization, LFQ (MAGVIT-v2: Yu et al., "Language Model Beats Diffusion —
//! Tokenizer is Key to Visual Generation", arXiv:2310.05737) and its spherical form, binary
//! spherical quantization, BSQ (Zhao, Xiong, Krähenbühl, arXiv:2406.07548), as lucidrains'
//! `vector_quantize_pytorch.LFQ` computes them (`spherical=True` for BSQ; codebook scale 1).
//!
//! * **LFQ**: `q_i = +1` where `z_i > 0`, else `−1`; the implicit codebook is `{±1}^d`
//!   (K = 2^d codes), index `Σ_i 2^{d−1−i}[z_i > 0]` (dimension 0 is the most significant bit).
//! * **BSQ**: the input is first put on the sphere, `u = z/max(‖z‖, 1e-12)`, and
//!   `q = sign(u)/√d` (codes `{±1/√d}^d`, unit length).
//!
//! The estimator maps the input `x` (`z` for LFQ, `u` for BSQ) to `q` — straight-through in the
//! references; the rotation trick applies as it does to FSQ (for BSQ both are unit vectors, so
//! `λ = 1` and the map is a pure rotation). BSQ's gradient then passes back through the
//! normalisation, `∂L/∂z = (g − (g·u)u)/‖z‖`.
//!
//! **The entropy penalty** over all K codes: logits `l_k = 2τ x·c_k` (τ the inverse
//! temperature, 100), `p = softmax(l)` per row,
//!
//! `aux = mean_rows H(p) − γ H(mean_rows p)`, `H(p) = −Σ_k p_k log max(p_k, 1e-5)`
//!
//! (low entropy per sample: confident codes; high entropy of the batch's average: every code
//! used; γ the diversity weight, 1). The layer's loss is `w_H · aux + β·mean((x − sg(q))²)`
//! (lucidrains: `w_H` = 0.1, β = 0). The explicit softmax costs N×K: the codebook is limited to
//! 2^16 codes here.
//!
//! "Usage" and "perplexity" are over the 2^d implicit codes, the quantization error is
//! `mean((x − q)²)` (in the sphere's units for BSQ).

use ndarray::{Array1, Array2, ArrayView2, Axis};

use crate::error::{Result, VqError, check_same_shape};
use crate::estimator::Estimator;

/// Probabilities below this are clamped inside the entropy's logarithm (lucidrains' `log`).
pub const ENTROPY_EPS: f64 = 1e-5;

/// Largest code dimension d (2^d codes) the explicit entropy penalty takes.
pub const MAX_BITS: usize = 16;

/// Where the binary codes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryCodes {
    /// LFQ: the corners of the cube, `{±1}^d`.
    Cube,
    /// BSQ: the corners on the unit sphere, `{±1/√d}^d`, inputs l2-normalised.
    Sphere,
}

/// LFQ or BSQ with codes of dimension `d` (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lfq {
    dim: usize,
    codes: BinaryCodes,
}

/// Result of [`Lfq::forward`].
#[derive(Debug, Clone, PartialEq)]
pub struct LfqForward {
    /// What the estimator maps: `z` (LFQ) or `u = z/‖z‖` (BSQ), N×d.
    pub input: Array2<f32>,
    /// The codes `q` (N×d).
    pub quantized: Array2<f32>,
    /// The code indices.
    pub indices: Array1<u32>,
}

/// The two entropies of [`Lfq::entropy`] and the penalty's gradient.
#[derive(Debug, Clone, PartialEq)]
pub struct EntropyPenalty {
    /// `mean_rows H(p)`.
    pub per_sample: f64,
    /// `H(mean_rows p)`.
    pub codebook: f64,
    /// `∂(per_sample − γ·codebook)/∂x` (N×d).
    pub grad_input: Array2<f32>,
}

impl Lfq {
    /// Codes of dimension `dim` (1 ..= [`MAX_BITS`]).
    ///
    /// # Errors
    /// [`VqError::InvalidParameter`] outside that range.
    pub fn new(dim: usize, codes: BinaryCodes) -> Result<Self> {
        if !(1..=MAX_BITS).contains(&dim) {
            return Err(VqError::InvalidParameter {
                name: "bits",
                value: dim.to_string(),
                reason: "LFQ / BSQ take 1 to 16 bits (2 to 65,536 codes)",
            });
        }
        Ok(Self { dim, codes })
    }

    /// The code dimension d.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// K = 2^d.
    pub fn codebook_size(&self) -> usize {
        1 << self.dim
    }

    /// The magnitude of a code's entries: 1 (LFQ) or 1/√d (BSQ).
    pub fn scale(&self) -> f32 {
        match self.codes {
            BinaryCodes::Cube => 1.0,
            BinaryCodes::Sphere => (1.0 / (self.dim as f64).sqrt()) as f32,
        }
    }

    /// Quantizes rows `z` (N×d).
    ///
    /// ```
    /// use ndarray::array;
    /// use vq_core::lfq::{BinaryCodes, Lfq};
    /// let lfq = Lfq::new(3, BinaryCodes::Cube).unwrap();
    /// let f = lfq.forward(array![[0.3f32, -2.0, 0.0]].view()).unwrap();
    /// assert_eq!(f.quantized.row(0).to_vec(), vec![1.0, -1.0, -1.0]); // 0 is not > 0
    /// assert_eq!(f.indices[0], 0b100);
    /// assert_eq!(lfq.codes(&[4]).unwrap(), f.quantized);
    /// ```
    ///
    /// # Errors
    /// [`VqError::ShapeMismatch`] for another width; [`VqError::NonFinite`].
    pub fn forward(&self, z: ArrayView2<f32>) -> Result<LfqForward> {
        self.check(z)?;
        let input = match self.codes {
            BinaryCodes::Cube => z.to_owned(),
            BinaryCodes::Sphere => sphere(z).0,
        };
        let s = self.scale();
        let quantized = input.mapv(|v| if v > 0.0 { s } else { -s });
        let indices = input
            .rows()
            .into_iter()
            .map(|r| {
                r.iter()
                    .fold(0u32, |acc, &v| (acc << 1) | u32::from(v > 0.0))
            })
            .collect();
        Ok(LfqForward {
            input,
            quantized,
            indices,
        })
    }

    /// `∂L/∂z` from `g = ∂L/∂q` through the estimator (from `input` to `quantized`), plus
    /// `extra`, a gradient on the input itself (the penalty's, the commitment's), then — for
    /// BSQ — through the normalisation.
    ///
    /// # Errors
    /// Shape errors; the estimator's errors.
    pub fn backward(
        &self,
        z: ArrayView2<f32>,
        fwd: &LfqForward,
        estimator: Estimator,
        g: ArrayView2<f32>,
        extra: Option<ArrayView2<f32>>,
    ) -> Result<Array2<f32>> {
        self.check(z)?;
        let mut gx = estimator.backward(fwd.input.view(), fwd.quantized.view(), g)?;
        if let Some(x) = extra {
            check_same_shape(z, x, "extra gradient vs inputs")?;
            gx += &x;
        }
        Ok(match self.codes {
            BinaryCodes::Cube => gx,
            BinaryCodes::Sphere => {
                let (u, norms) = sphere(z);
                let mut out = gx;
                for ((mut row, u), n) in out.rows_mut().into_iter().zip(u.rows()).zip(norms) {
                    let gu: f64 = row.iter().zip(u).map(|(&a, &b)| a as f64 * b as f64).sum();
                    for (o, &ui) in row.iter_mut().zip(u) {
                        *o = ((*o as f64 - gu * ui as f64) / n) as f32;
                    }
                }
                out
            }
        })
    }

    /// The entropy penalty of inputs `x` (`forward`'s `input`) at inverse temperature `tau`
    /// with diversity weight `gamma` (module docs), in f64.
    ///
    /// # Errors
    /// Shape errors.
    pub fn entropy(&self, x: ArrayView2<f32>, tau: f64, gamma: f64) -> Result<EntropyPenalty> {
        self.check(x)?;
        let codebook = self.codebook().mapv(f64::from);
        let n = x.nrows().max(1) as f64;
        let mut p = x.mapv(f64::from).dot(&codebook.t()) * (2.0 * tau);
        for mut row in p.rows_mut() {
            let m = row.fold(f64::NEG_INFINITY, |a, &v| a.max(v));
            row.mapv_inplace(|v| (v - m).exp());
            let total = row.sum();
            row.mapv_inplace(|v| v / total);
        }
        let avg = p.mean_axis(Axis(0)).expect("K > 0");
        let h = |q: f64| -q * q.max(ENTROPY_EPS).ln();
        let dh = |q: f64| -(q.max(ENTROPY_EPS).ln() + if q >= ENTROPY_EPS { 1.0 } else { 0.0 });
        let per_sample = p.iter().map(|&q| h(q)).sum::<f64>() / n;
        let codebook_entropy = avg.iter().map(|&q| h(q)).sum::<f64>();
        let mut grad_logits = p.clone();
        for mut row in grad_logits.rows_mut() {
            let gp: Vec<f64> = row
                .iter()
                .zip(&avg)
                .map(|(&q, &a)| (dh(q) - gamma * dh(a)) / n)
                .collect();
            let s: f64 = row.iter().zip(&gp).map(|(q, g)| q * g).sum();
            for (q, g) in row.iter_mut().zip(&gp) {
                *q *= g - s;
            }
        }
        let grad_input = (grad_logits.dot(&codebook) * (2.0 * tau)).mapv(|v| v as f32);
        Ok(EntropyPenalty {
            per_sample,
            codebook: codebook_entropy,
            grad_input,
        })
    }

    /// The codes (N×d) of indices.
    ///
    /// # Errors
    /// [`VqError::IndexOutOfRange`].
    pub fn codes(&self, indices: &[u32]) -> Result<Array2<f32>> {
        crate::error::check_indices(indices, self.codebook_size())?;
        let s = self.scale();
        Ok(Array2::from_shape_fn(
            (indices.len(), self.dim),
            |(i, j)| match (indices[i] >> (self.dim - 1 - j)) & 1 {
                1 => s,
                _ => -s,
            },
        ))
    }

    /// Every code, row `k` = `codes(&[k])`.
    pub fn codebook(&self) -> Array2<f32> {
        let all: Vec<u32> = (0..self.codebook_size() as u32).collect();
        self.codes(&all).expect("indices in range")
    }

    fn check(&self, z: ArrayView2<f32>) -> Result<()> {
        if z.ncols() != self.dim {
            return Err(VqError::ShapeMismatch {
                what: "LFQ input dim vs bits",
                expected: self.dim,
                got: z.ncols(),
            });
        }
        crate::search::check_finite(z, "LFQ input")
    }
}

/// `u = z/max(‖z‖, 1e-12)` per row (`F.normalize`), with the clamped norms.
fn sphere(z: ArrayView2<f32>) -> (Array2<f32>, Vec<f64>) {
    let mut u = z.to_owned();
    let mut norms = Vec::with_capacity(z.nrows());
    for mut row in u.rows_mut() {
        let n = row
            .iter()
            .map(|&v| v as f64 * v as f64)
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        row.mapv_inplace(|v| (v as f64 / n) as f32);
        norms.push(n);
    }
    (u, norms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::randn;

    fn penalty(x: &Array2<f64>, lfq: &Lfq, tau: f64, gamma: f64) -> f64 {
        let e = lfq
            .entropy(x.mapv(|v| v as f32).view(), tau, gamma)
            .unwrap();
        e.per_sample - gamma * e.codebook
    }

    #[test]
    fn the_entropy_gradient_matches_finite_differences() {
        for codes in [BinaryCodes::Cube, BinaryCodes::Sphere] {
            let lfq = Lfq::new(3, codes).unwrap();
            // A soft temperature, so that no probability is clamped (the clamp's kink is
            // tested against the reference fixture).
            let x = randn((6, 3), 1) * 0.3;
            let (tau, gamma) = (1.5, 0.7);
            let e = lfq.entropy(x.view(), tau, gamma).unwrap();
            let x64 = x.mapv(f64::from);
            let h = 1e-4;
            for (i, j) in [(0, 0), (3, 1), (5, 2)] {
                let (mut p, mut m) = (x64.clone(), x64.clone());
                p[[i, j]] += h;
                m[[i, j]] -= h;
                let fd =
                    (penalty(&p, &lfq, tau, gamma) - penalty(&m, &lfq, tau, gamma)) / (2.0 * h);
                assert!(
                    (fd - e.grad_input[[i, j]] as f64).abs() < 1e-4,
                    "{codes:?} {i},{j}: {fd}"
                );
            }
        }
    }

    #[test]
    fn bsq_codes_are_unit_and_its_gradient_passes_the_normalisation() {
        let lfq = Lfq::new(4, BinaryCodes::Sphere).unwrap();
        let z = randn((5, 4), 2) * 3.0;
        let f = lfq.forward(z.view()).unwrap();
        for row in f.quantized.rows().into_iter().chain(f.input.rows()) {
            assert!((row.dot(&row) - 1.0).abs() < 1e-6);
        }
        assert_eq!(
            lfq.codes(f.indices.as_slice().unwrap()).unwrap(),
            f.quantized
        );
        // STE: L = Σ w ⊙ u(z), finite differences through the normalisation.
        let w = randn((5, 4), 3);
        let g = lfq
            .backward(z.view(), &f, Estimator::StraightThrough, w.view(), None)
            .unwrap();
        let at = |zz: &Array2<f32>| -> f64 {
            let (u, _) = sphere(zz.view());
            (&u.mapv(f64::from) * &w.mapv(f64::from)).sum()
        };
        let h = 1e-3;
        for (i, j) in [(0, 0), (4, 3)] {
            let (mut p, mut m) = (z.clone(), z.clone());
            p[[i, j]] += h;
            m[[i, j]] -= h;
            let fd = (at(&p) - at(&m)) / (2.0 * h as f64);
            assert!(
                (fd - g[[i, j]] as f64).abs() < 1e-3,
                "{fd} vs {}",
                g[[i, j]]
            );
        }
        // The rotation trick between unit vectors has λ = 1: it keeps ‖g‖ before the sphere.
        let gr = Estimator::Rotation
            .backward(f.input.view(), f.quantized.view(), w.view())
            .unwrap();
        for (a, b) in gr.rows().into_iter().zip(w.rows()) {
            assert!((a.dot(&a) - b.dot(&b)).abs() < 1e-4);
        }
        assert!(
            Lfq::new(0, BinaryCodes::Cube).is_err() && Lfq::new(17, BinaryCodes::Cube).is_err()
        );
    }
}
