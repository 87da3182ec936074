//! Row helpers shared by the layer, its EMA and the search (a leaf of the crate).

/// Rows of a 2-D tensor divided by `max(‖row‖, vq_core::L2_NORM_EPS)` (vq-core's
/// [`l2_normalise_rows`](vq_core::l2_normalise_rows) on tensors, differentiable).
pub(crate) fn l2_normalise_rows(t: &tch::Tensor) -> tch::Tensor {
    t / t
        .norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .clamp_min(f64::from(vq_core::L2_NORM_EPS))
}

/// Standard-normal f32 tensor from its own seeded generator: unit tests run in parallel, and
/// libtorch's global generator (`tch::manual_seed` + `Tensor::randn`) would be shared between them.
#[cfg(test)]
pub(crate) fn seeded_randn(shape: &[i64], seed: u64) -> tch::Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.sample(rand_distr::StandardNormal))
        .collect();
    tch::Tensor::from_slice(&v).view(shape)
}
