//! How an EMA codebook learns ([`CodebookLearning::Ema`](super::CodebookLearning::Ema)): the
//! EMA step (vq-core on the CPU, the same step as tensor ops elsewhere, [`crate::ema`]),
//! k-means initialisation on the first batch, and both over a data-parallel [`Collective`].

use rand::SeedableRng;
use rand::rngs::StdRng;
use tch::{Device, Kind, Tensor, nn};
use vq_core::{EmaCodebook, EmaConfig};

use super::pass::{Batch, Settings, read_counter, scalar};
use crate::collective::Collective;
use crate::error::{Result, VqTchError};

/// An EMA codebook's statistics, as variables of the store.
#[derive(Debug)]
pub(super) struct EmaState {
    config: EmaConfig,
    kmeans_iters: usize,
    /// `ema_cluster_size` (K): EMA cluster sizes `N_k`.
    sizes: Tensor,
    /// `ema_running_sum` (K, D): EMA running sums `m_k`.
    sums: Tensor,
    /// `ema_steps` (): EMA updates done.
    steps: Tensor,
}

impl EmaState {
    /// The state of a fresh codebook `init` (sizes 1, sums `init`, no steps) under `path`.
    pub(super) fn new(
        path: &nn::Path,
        init: &Tensor,
        config: EmaConfig,
        kmeans_iters: usize,
    ) -> Self {
        let (k, device) = (init.size()[0], init.device());
        Self {
            config,
            kmeans_iters,
            sizes: path.add(
                "ema_cluster_size",
                Tensor::ones([k], (Kind::Float, device)),
                false,
            ),
            sums: path.add("ema_running_sum", init.copy(), false),
            steps: path.add("ema_steps", scalar(0, device), false),
        }
    }

    /// Lloyd iterations of k-means on the first training batch (0: none).
    pub(super) fn kmeans_iters(&self) -> usize {
        self.kmeans_iters
    }

    /// vq-core's state for `codebook` with these statistics.
    ///
    /// # Errors
    /// [`VqTchError::Core`] if the stored state is not valid (e.g. negative cluster sizes).
    pub(super) fn to_core(&self, codebook: &Tensor) -> Result<EmaCodebook> {
        Ok(EmaCodebook::from_parts(
            to_array(codebook),
            to_array(&self.sums),
            ndarray::Array1::from(
                Vec::<f32>::try_from(self.sizes.to_device(Device::Cpu))
                    .map_err(|err| VqTchError::Torch(err.to_string()))?,
            ),
            self.config,
        )?)
    }

    /// Whether k-means initialisation is asked for and has not run yet (a host read of the
    /// `initialised` flag, made only when k-means is configured).
    pub(super) fn kmeans_pending(&self, initialised: &Tensor) -> bool {
        self.kmeans_iters > 0 && i64::try_from(initialised).unwrap_or(1) == 0
    }

    /// One EMA step of `codebook` from rows `e` assigned to `idx`: vq-core on the CPU, the same
    /// step as tensor ops ([`crate::ema`]) on other devices, statistics summed over the group's
    /// ranks when there is one. Dead-code rows are drawn from `StdRng::seed_from_u64(seed +
    /// step)` either way.
    pub(super) fn update(
        &mut self,
        codebook: &mut Tensor,
        e: &Tensor,
        idx: &Tensor,
        settings: Settings<'_>,
        batch: Batch<'_>,
    ) -> Result<()> {
        let seed = settings.config.seed;
        let seeded = |step: i64| StdRng::seed_from_u64(seed.wrapping_add(step as u64));
        if let Some(group) = settings.group {
            let step = read_counter(&self.steps)?;
            let rows = SyncedRows {
                group,
                e,
                idx,
                per_sample: batch.per_sample,
            };
            return self.update_synced(codebook, rows, &mut seeded(step), step);
        }
        if codebook.device() != Device::Cpu {
            // The step number seeds the dead-code draws only: without them it is not read back
            // from the device (the host does not wait), and advances there.
            let mut rng = match self.config.dead_code_threshold() > 0.0 {
                true => seeded(read_counter(&self.steps)?),
                false => seeded(0),
            };
            let config = self.config;
            crate::ema::ema_step(self.tensors(codebook), e, idx, &config, &mut rng);
            let _ = tch::no_grad(|| self.steps.g_add_scalar_(1));
            return Ok(());
        }
        let step = read_counter(&self.steps)?;
        let mut state = self.to_core(codebook)?;
        state.update(to_array(e).view(), &indices_u32(idx)?, &mut seeded(step))?;
        self.store(codebook, &state, step + 1);
        Ok(())
    }

    /// k-means initialisation of `codebook` from the batch (the union of the ranks' rows,
    /// broadcast from rank 0, in a group); sets `initialised`. With fewer rows than codes it
    /// keeps the random init and tries again on the next batch.
    pub(super) fn kmeans_init(
        &mut self,
        codebook: &mut Tensor,
        initialised: &Tensor,
        settings: Settings<'_>,
        batch: Batch<'_>,
    ) -> Result<()> {
        let e = batch.e.detach();
        let samples = match settings.group {
            Some(g) => to_array(&union_rows(g, &e, batch.per_sample)?),
            None => to_array(&e),
        };
        let k = settings.config.codebook_size;
        if samples.nrows() < k {
            return Ok(());
        }
        let mut rng = StdRng::seed_from_u64(settings.config.seed ^ 0x6b6d_6561_6e73);
        let fresh =
            EmaCodebook::kmeans_init(samples.view(), k, self.kmeans_iters, self.config, &mut rng)?;
        let steps = read_counter(&self.steps)?;
        self.store(codebook, &fresh, steps);
        if let Some(g) = settings.group {
            for t in [&*codebook, &self.sums, &self.sizes] {
                g.broadcast(t, 0)?;
            }
        }
        let _ = tch::no_grad(|| initialised.shallow_clone().fill_(1));
        Ok(())
    }

    /// The EMA step of a data-parallel group: statistics summed over ranks, replacement rows from
    /// the union of the ranks' rows.
    fn update_synced(
        &mut self,
        codebook: &mut Tensor,
        rows: SyncedRows<'_>,
        rng: &mut StdRng,
        step: i64,
    ) -> Result<()> {
        let SyncedRows { group, e, idx, .. } = rows;
        // On the CPU, vq-core's state and statistics (f64 accumulation), as the single-process
        // step uses.
        let cpu_state = match codebook.device() {
            Device::Cpu => Some(self.to_core(codebook)?),
            _ => None,
        };
        let (counts, sums) = match &cpu_state {
            Some(state) => {
                let stats = state.statistics(to_array(e).view(), &indices_u32(idx)?)?;
                (
                    Tensor::from_slice(stats.counts.as_slice().expect("contiguous")),
                    from_array(stats.sums),
                )
            }
            None => crate::ema::batch_statistics(e, idx, self.sizes.size()[0]),
        };
        let (counts, sums) = (
            counts.to_device(group.device()),
            sums.to_device(group.device()),
        );
        group.all_reduce_sum(&counts)?;
        group.all_reduce_sum(&sums)?;
        let pool = match self.config.dead_code_threshold() > 0.0 {
            true => union_rows(group, e, rows.per_sample)?,
            false => e.shallow_clone(),
        };
        let Some(mut state) = cpu_state else {
            let device = codebook.device();
            let config = self.config;
            crate::ema::ema_apply(
                self.tensors(codebook),
                &counts.to_device(device),
                &sums.to_device(device),
                &pool.to_device(device),
                &config,
                rng,
            );
            let _ = tch::no_grad(|| self.steps.fill_(step + 1));
            return Ok(());
        };
        let stats = vq_core::EmaStatistics {
            counts: ndarray::Array1::from(
                Vec::<f32>::try_from(counts.to_device(Device::Cpu))
                    .map_err(|err| VqTchError::Torch(err.to_string()))?,
            ),
            sums: to_array(&sums),
        };
        let pool = state.prepare_rows(to_array(&pool).view());
        state.update_with(&stats, pool.view(), rng)?;
        self.store(codebook, &state, step + 1);
        Ok(())
    }

    /// The codebook and statistics as [`crate::ema`]'s tensor-op step takes them.
    fn tensors<'a>(&'a mut self, codebook: &'a mut Tensor) -> crate::ema::EmaTensorsMut<'a> {
        crate::ema::EmaTensorsMut {
            codes: codebook,
            sums: &mut self.sums,
            sizes: &mut self.sizes,
        }
    }

    /// Writes vq-core's `state` into `codebook` and the statistics, with `steps` done.
    fn store(&mut self, codebook: &mut Tensor, state: &EmaCodebook, steps: i64) {
        let device = codebook.device();
        let sizes = Tensor::from_slice(state.cluster_sizes().as_slice().expect("contiguous"));
        tch::no_grad(|| {
            codebook.copy_(&from_array(state.codebook().to_owned()).to_device(device));
            self.sums
                .copy_(&from_array(state.running_sums().to_owned()).to_device(device));
            self.sizes.copy_(&sizes.to_device(device));
            let _ = self.steps.fill_(steps);
        });
    }
}

/// One rank's rows of a synced EMA step.
struct SyncedRows<'a> {
    group: &'a dyn Collective,
    e: &'a Tensor,
    idx: &'a Tensor,
    per_sample: i64,
}

/// The rows of every rank's `e` (N, D) in the order of the union batch, where `e` holds
/// `per_sample` consecutive rows per sample (H·W latents of an image): rank r's sample j is
/// sample `j·world + r` of the union, the order in which the data-parallel trainer deals a
/// batch out to the ranks. Ranks with fewer rows (samples skipped as unreadable) are padded for
/// the all-gather and their rows then taken rank after rank.
fn union_rows(group: &dyn Collective, e: &Tensor, per_sample: i64) -> Result<Tensor> {
    let (n, d) = (e.size()[0], e.size()[1]);
    let dev = group.device();
    let sizes = group.all_gather(&Tensor::from_slice(&[n]).to_device(dev))?;
    let sizes = Vec::<i64>::try_from(sizes.to_device(Device::Cpu).view([-1]))
        .map_err(|err| VqTchError::Torch(err.to_string()))?;
    let most = sizes.iter().copied().max().unwrap_or(n);
    let world = group.world() as i64;
    let rows = e.to_device(dev).to_kind(Kind::Float);
    let padded = if n < most {
        Tensor::cat(&[rows, Tensor::zeros([most - n, d], (Kind::Float, dev))], 0)
    } else {
        rows
    };
    let all = group.all_gather(&padded.contiguous())?;
    let union = if sizes.iter().all(|&s| s == n) {
        all.view([world, n / per_sample, per_sample, d])
            .transpose(0, 1)
            .reshape([-1, d])
    } else {
        let parts: Vec<Tensor> = sizes
            .iter()
            .enumerate()
            .map(|(r, &s)| all.get(r as i64).narrow(0, 0, s))
            .collect();
        Tensor::cat(&parts, 0)
    };
    Ok(union.to_device(e.device()))
}

fn indices_u32(idx: &Tensor) -> Result<Vec<u32>> {
    Ok(Vec::<i64>::try_from(idx.to_device(Device::Cpu))
        .map_err(|err| VqTchError::Torch(err.to_string()))?
        .into_iter()
        .map(|i| i as u32)
        .collect())
}

/// A 2-D tensor (any dtype; moved to the CPU if needed) as an owned f32 ndarray.
fn to_array(t: &Tensor) -> ndarray::Array2<f32> {
    let cpu = crate::search::f32_contiguous(&t.to_device(Device::Cpu));
    crate::search::view2(&cpu).to_owned()
}

fn from_array(a: ndarray::Array2<f32>) -> Tensor {
    let (k, d) = a.dim();
    Tensor::from_slice(a.as_standard_layout().as_slice().expect("standard layout"))
        .view([k as i64, d as i64])
}
