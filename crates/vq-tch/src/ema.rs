//! The EMA codebook step of [`vq_core::EmaCodebook::update`] as tensor ops, for layers on a GPU
//! (the CPU runs vq-core's own). Same formulas, same dead-code rows
//! ([`vq_core::replacement_rows`] from the same generator); sums are accumulated in f32 here
//! (vq-core: f64), so results agree to float rounding. Tested against vq-core on CPU tensors.

use rand::Rng;
use tch::{Kind, Tensor};
use vq_core::{EmaConfig, Metric};

/// The EMA state of one layer: codes (K, D), running sums `m_k` (K, D), cluster sizes `N_k` (K),
/// f32 tensors on one device, updated in place.
pub(crate) struct EmaTensorsMut<'a> {
    pub codes: &'a mut Tensor,
    pub sums: &'a mut Tensor,
    pub sizes: &'a mut Tensor,
}

/// One EMA step from `e` (N, D; already l2-normalised for cosine) and its code indices `idx`
/// (N, i64), then dead-code replacement. Returns the number of codes replaced.
///
/// N_k ← γN_k + (1−γ)n_k, m_k ← γm_k + (1−γ)Σ_{i: idx_i = k} e_i,
/// c_k ← m_k / ((N_k + ε)/(ΣN + Kε)·ΣN), then (cosine) c_k ← c_k/‖c_k‖; codes with N_k below the
/// threshold t get a batch row r: c_k ← r, m_k ← t·r, N_k ← t.
pub(crate) fn ema_step(
    state: EmaTensorsMut<'_>,
    e: &Tensor,
    idx: &Tensor,
    config: &EmaConfig,
    rng: &mut impl Rng,
) -> usize {
    let (counts, batch_sums) = batch_statistics(e, idx, state.sizes.size()[0]);
    ema_apply(state, &counts, &batch_sums, e, config, rng)
}

/// The batch statistics of an EMA step: per-code counts n_k (K) and sums of the assigned rows
/// (K, D), f32 on `e`'s device ([`vq_core::EmaCodebook::statistics`] as tensor ops).
pub(crate) fn batch_statistics(e: &Tensor, idx: &Tensor, k: i64) -> (Tensor, Tensor) {
    let opts = (Kind::Float, e.device());
    let n = e.size()[0];
    tch::no_grad(|| {
        (
            Tensor::zeros([k], opts).index_add(0, idx, &Tensor::ones([n], opts)),
            Tensor::zeros([k, e.size()[1]], opts).index_add(0, idx, &e.to_kind(Kind::Float)),
        )
    })
}

/// The EMA step from batch statistics, then dead-code replacement from the rows of `pool`
/// ([`vq_core::EmaCodebook::update_with`] as tensor ops).
pub(crate) fn ema_apply(
    state: EmaTensorsMut<'_>,
    counts: &Tensor,
    batch_sums: &Tensor,
    pool: &Tensor,
    config: &EmaConfig,
    rng: &mut impl Rng,
) -> usize {
    let EmaTensorsMut { codes, sums, sizes } = state;
    let (k, n) = (sizes.size()[0], pool.size()[0]);
    let g = f64::from(config.decay());
    tch::no_grad(|| {
        let _ = sizes.g_mul_scalar_(g).g_add_(&(counts * (1.0 - g)));
        let _ = sums.g_mul_scalar_(g).g_add_(&(batch_sums * (1.0 - g)));
        let eps = f64::from(config.laplace_eps());
        let n_k = sizes.to_kind(Kind::Double);
        let total = n_k.sum(Kind::Double);
        let smoothed = (n_k + eps) / (&total + k as f64 * eps) * &total;
        let mut fresh = &*sums / smoothed.to_kind(Kind::Float).unsqueeze(1);
        if config.metric() == Metric::Cosine {
            fresh = crate::rows::l2_normalise_rows(&fresh);
        }
        codes.copy_(&fresh);
        let t = config.dead_code_threshold();
        if t <= 0.0 || n == 0 {
            return 0;
        }
        let dead = sizes.lt(f64::from(t)).nonzero().squeeze_dim(1);
        let count = dead.size()[0] as usize;
        if count == 0 {
            return 0;
        }
        let picks: Vec<i64> = vq_core::replacement_rows(n as usize, count, rng)
            .into_iter()
            .map(|r| r as i64)
            .collect();
        let rows = pool
            .index_select(0, &Tensor::from_slice(&picks).to_device(pool.device()))
            .to_kind(Kind::Float);
        let _ = codes.index_copy_(0, &dead, &rows);
        let _ = sums.index_copy_(0, &dead, &(&rows * f64::from(t)));
        let _ = sizes.index_fill_(0, &dead, f64::from(t));
        count
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use tch::Device;
    use vq_core::EmaCodebook;

    fn array(t: &Tensor) -> ndarray::Array2<f32> {
        crate::search::view2(&crate::search::f32_contiguous(t)).to_owned()
    }

    /// Several steps on CPU tensors against vq-core, with dead-code replacement, both metrics.
    #[test]
    fn tensor_ema_step_agrees_with_vq_core() {
        for metric in [Metric::Euclidean, Metric::Cosine] {
            let cfg = EmaConfig::new(0.8, 1e-5, 0.6, metric).unwrap();
            let init = crate::rows::seeded_randn(&[12, 3], 4);
            let mut reference = EmaCodebook::new(array(&init), cfg).unwrap();
            let mut codes =
                Tensor::from_slice(reference.codebook().as_slice().unwrap()).view([12, 3]);
            let mut sums = codes.copy();
            let mut sizes = Tensor::ones([12], (Kind::Float, Device::Cpu));
            let mut replaced = 0;
            for step in 0..5u64 {
                let mut x = crate::rows::seeded_randn(&[40, 3], 100 + step) * 0.3;
                if metric == Metric::Cosine {
                    x = &x / x.norm_scalaropt_dim(2, [1i64].as_slice(), true);
                }
                let xa = array(&x);
                let idx = vq_core::nearest_codes(xa.view(), reference.codebook(), metric).unwrap();
                let upd = reference
                    .update(
                        xa.view(),
                        idx.as_slice().unwrap(),
                        &mut StdRng::seed_from_u64(step),
                    )
                    .unwrap();
                let idx_t =
                    Tensor::from_slice(&idx.iter().map(|&i| i64::from(i)).collect::<Vec<_>>());
                let got = ema_step(
                    EmaTensorsMut {
                        codes: &mut codes,
                        sums: &mut sums,
                        sizes: &mut sizes,
                    },
                    &x,
                    &idx_t,
                    &cfg,
                    &mut StdRng::seed_from_u64(step),
                );
                assert_eq!(got, upd.replaced, "{metric:?} step {step}");
                replaced += got;
                let close = |a: ndarray::ArrayView2<f32>, b: &Tensor| {
                    a.iter()
                        .zip(array(b).iter())
                        .all(|(u, v)| (u - v).abs() <= 1e-5 * (1.0 + u.abs()))
                };
                assert!(
                    close(reference.codebook(), &codes),
                    "{metric:?} step {step}"
                );
                assert!(
                    close(reference.running_sums(), &sums),
                    "{metric:?} step {step}"
                );
                let sz = reference
                    .cluster_sizes()
                    .clone()
                    .insert_axis(ndarray::Axis(1));
                assert!(
                    close(sz.view(), &sizes.unsqueeze(1)),
                    "{metric:?} step {step}"
                );
            }
            assert!(
                replaced > 0,
                "{metric:?}: the test exercises dead-code replacement"
            );
        }
    }
}
