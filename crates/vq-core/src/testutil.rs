//! Helpers shared by the unit tests.

use ndarray::{Array2, ArrayView1};
use ndarray_rand::RandomExt;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::StandardNormal;

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn randn(shape: (usize, usize), seed: u64) -> Array2<f32> {
    Array2::random_using(shape, StandardNormal, &mut rng(seed))
}

pub fn norm64(v: ArrayView1<f32>) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

pub fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
