//! Exact comparisons of distances and cosines between f32 vectors, for the search's tie
//! decisions: every f32 is `m·2^e` with an integer `m`, so dot products and squared norms of f32
//! vectors are integers times one common power of two (2⁻²⁹⁸, the square of the smallest
//! subnormal), held here as big integers — no rounding anywhere.
//!
//! ```
//! use std::cmp::Ordering;
//! use vq_core::exact::{cmp_cosine, cmp_squared_distance};
//! // ‖x − a‖² = 2⁴⁸ + 1 against ‖x − b‖² = 2⁴⁸: a difference in the 15th digit.
//! let x = [16_777_216.0f32, 0.0];
//! assert_eq!(cmp_squared_distance(&x, &[0.0, 1.0], &[0.0, 0.0]), Ordering::Greater);
//! // A code and an exact scaled copy have the same cosine with any row; a copy one ulp off
//! // the code's direction has a smaller one than the code itself.
//! let x = [1.0f32, 1.0];
//! assert_eq!(cmp_cosine(&x, &[3.0, 3.0], &[1.0, 1.0], 1e-12), Ordering::Equal);
//! assert_eq!(cmp_cosine(&x, &[1.0, 1.0], &[1.0, 1.0 + f32::EPSILON], 1e-12), Ordering::Less);
//! ```

use std::cmp::Ordering;

use num_bigint::BigInt;

/// log₂ of the common scale: 2·149, the exponent of the smallest subnormal, squared.
const SHIFT: i32 = 298;

/// `v = m · 2^e` with `m` an integer (24 bits at most) and `e ≥ −149`.
fn split(v: f32) -> (i64, i32) {
    let bits = v.to_bits();
    let sign = if bits >> 31 == 1 { -1 } else { 1 };
    let exp = ((bits >> 23) & 0xff) as i32;
    let frac = i64::from(bits & 0x7f_ffff);
    match exp {
        0 => (sign * frac, -149),
        _ => (sign * (frac | 0x80_0000), exp - 150),
    }
}

/// `Σ aᵢ·bᵢ · 2^298` exactly (finite inputs).
pub fn dot(a: &[f32], b: &[f32]) -> BigInt {
    a.iter()
        .zip(b)
        .map(|(&p, &q)| {
            let ((mp, ep), (mq, eq)) = (split(p), split(q));
            BigInt::from(mp * mq) << (ep + eq + SHIFT) as usize
        })
        .sum()
}

/// Orders codes `a` and `b` by squared Euclidean distance to `x`, exactly: `Less` when `a` is
/// nearer. (`‖x − c‖² = ‖x‖² + ‖c‖² − 2x·c`; the common `‖x‖²` is left out.)
pub fn cmp_squared_distance(x: &[f32], a: &[f32], b: &[f32]) -> Ordering {
    let score = |c: &[f32]| -> BigInt { dot(c, c) - (dot(x, c) << 1usize) };
    score(a).cmp(&score(b))
}

/// Orders codes `a` and `b` by cosine with `x`, exactly, the code norms floored at `floor`
/// (`x·c / max(‖c‖, floor)`; the row's own norm is common and left out): `Less` when `a` has the
/// larger cosine (is nearer), as [`cmp_squared_distance`] orders.
pub fn cmp_cosine(x: &[f32], a: &[f32], b: &[f32], floor: f32) -> Ordering {
    let floor2 = dot(&[floor], &[floor]);
    let (pa, pb) = (dot(x, a), dot(x, b));
    let (na, nb) = (dot(a, a).max(floor2.clone()), dot(b, b).max(floor2));
    // pa/√na vs pb/√nb: by sign first, then by pa²·nb vs pb²·na.
    let (sa, sb) = (pa.sign(), pb.sign());
    if sa != sb {
        return sb.cmp(&sa);
    }
    let lhs = &pa * &pa * &nb;
    let rhs = &pb * &pb * &na;
    match sa {
        num_bigint::Sign::Plus => rhs.cmp(&lhs),
        num_bigint::Sign::Minus => lhs.cmp(&rhs),
        num_bigint::Sign::NoSign => Ordering::Equal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_recovers_every_kind_of_f32() {
        for v in [
            0.0f32,
            -0.0,
            1.0,
            -3.5,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::MAX,
            -1e-40,
        ] {
            let (m, e) = split(v);
            assert_eq!(m as f64 * 2f64.powi(e), f64::from(v), "{v}");
        }
    }

    /// Against f64 where f64 is exact (small integers), and on a difference f64 rounds away.
    #[test]
    fn comparisons_are_exact() {
        let x = [3.0f32, -1.0, 2.0];
        assert_eq!(
            cmp_squared_distance(&x, &[3.0, -1.0, 1.0], &[3.0, 0.0, 2.0]),
            Ordering::Equal
        );
        assert_eq!(
            cmp_squared_distance(&x, &[3.0, -1.0, 2.0], &[3.0, 0.0, 2.0]),
            Ordering::Less
        );
        // Distances 1e8 apart in the 17th digit: ‖x − a‖² = 2⁴⁸ + 1 against 2⁴⁸ (f64 ties them
        // after adding ‖x‖²).
        let big = 16_777_216.0f32; // 2²⁴
        let (x, a, b) = ([big, 0.0], [0.0, 1.0], [0.0, 0.0]);
        assert_eq!(cmp_squared_distance(&x, &a, &b), Ordering::Greater);
        // Cosine: opposite signs, both negative, the floor.
        let x = [1.0f32, 0.0];
        assert_eq!(
            cmp_cosine(&x, &[1.0, 0.0], &[-1.0, 0.0], 1e-12),
            Ordering::Less
        );
        assert_eq!(
            cmp_cosine(&x, &[-1.0, 1.0], &[-1.0, 0.0], 1e-12),
            Ordering::Less
        );
        assert_eq!(
            cmp_cosine(&x, &[0.0, 0.0], &[0.0, 1.0], 1e-12),
            Ordering::Equal
        );
        // A tiny code under the floor: its cosine is scaled down by ‖c‖ / floor.
        assert_eq!(
            cmp_cosine(&x, &[1e-13, 0.0], &[0.5, 0.5], 1e-12),
            Ordering::Greater
        );
    }
}
