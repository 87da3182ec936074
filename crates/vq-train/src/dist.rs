//! Data-parallel training for `vq-train`: what the trainer keeps in sync across the ranks of a
//! [`vq_dist::ProcessGroup`], and the single-process case as the same calls doing nothing.
//!
//! Per optimiser step, in this order on every rank: each rank's micro-batches (rank r takes
//! every `world`-th sample of the global sequence, [`crate::data::Shard`]); the EMA codebook
//! statistics of every forward summed over ranks (inside the quantizer); the step's metrics and
//! code counts summed (one collective); gradients averaged in DDP-sized buckets **before**
//! clipping, so the clip sees the global norm; the discriminator's gradients likewise. At start,
//! every variable and optimiser state is broadcast from rank 0 and checked equal (fingerprints),
//! after the run configurations were checked equal. Only rank 0 touches the run folder.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tch::{Device, Tensor, nn};
use vq_dist::{DEFAULT_BUCKET_BYTES, GroupConfig, Launch, ProcessGroup};

use crate::optim::AdamW;

/// The trainer's view of the group: `None` for a single process (every call is a no-op).
#[derive(Debug, Clone, Default)]
pub struct Dist(Option<Arc<ProcessGroup>>);

impl Dist {
    /// A single process.
    pub fn single() -> Self {
        Self(None)
    }

    /// Membership of `group`.
    pub fn new(group: Option<Arc<ProcessGroup>>) -> Self {
        Self(group)
    }

    /// The group, if any.
    pub fn group(&self) -> Option<&Arc<ProcessGroup>> {
        self.0.as_ref()
    }

    /// This process's rank (0 alone).
    pub fn rank(&self) -> usize {
        self.0.as_ref().map_or(0, |g| g.rank())
    }

    /// Number of processes (1 alone).
    pub fn world(&self) -> usize {
        self.0.as_ref().map_or(1, |g| g.world())
    }

    /// Whether this process writes the run folder.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Fails on every rank unless all ranks hold the same `value`.
    ///
    /// # Errors
    /// A mismatch (naming the ranks) or a lost rank.
    pub fn check_same(&self, what: &str, value: &[u8]) -> Result<()> {
        if let Some(g) = &self.0 {
            g.check_same(what, value)?;
        }
        Ok(())
    }

    /// Rank 0's `value` on every rank.
    ///
    /// # Errors
    /// A lost rank.
    pub fn broadcast_i64(&self, value: i64) -> Result<i64> {
        let Some(g) = &self.0 else {
            return Ok(value);
        };
        let t = Tensor::from_slice(&[value]).to_device(g.device());
        g.broadcast(&t, 0)?;
        Ok(i64::try_from(t.to_device(Device::Cpu).view([]))?)
    }

    /// Sums `values` over ranks, in place (the step's metrics and code counts, in one
    /// collective).
    ///
    /// # Errors
    /// A lost rank.
    pub fn sum(&self, values: &mut [f64]) -> Result<()> {
        let Some(g) = &self.0 else {
            return Ok(());
        };
        let t = Tensor::from_slice(values).to_device(g.device());
        g.all_reduce_sum(&t)?;
        let summed = Vec::<f64>::try_from(t.to_device(Device::Cpu))?;
        values.copy_from_slice(&summed);
        Ok(())
    }

    /// Averages the gradients of `opt`'s parameters over ranks (buckets of 25 MiB, as DDP).
    ///
    /// # Errors
    /// A lost rank.
    pub fn average_gradients(&self, opt: &AdamW) -> Result<()> {
        let Some(g) = &self.0 else {
            return Ok(());
        };
        g.all_reduce_mean(&opt.gradients(), DEFAULT_BUCKET_BYTES)
            .context("averaging gradients over ranks")
    }

    /// Copies rank 0's variables of `vs` and the state of `opt` to every rank, then checks that
    /// every rank holds the same values (fingerprints of names, shapes and values).
    ///
    /// # Errors
    /// Different models on different ranks, or a lost rank.
    pub fn broadcast_state(&self, what: &str, vs: &nn::VarStore, opt: &mut AdamW) -> Result<()> {
        let Some(g) = &self.0 else {
            return Ok(());
        };
        let vars = sorted_variables(vs);
        let layout: String = vars
            .iter()
            .map(|(n, t)| format!("{n}:{:?}:{:?};", t.size(), t.kind()))
            .collect();
        g.check_same(
            &format!("the {what}'s variables (names, shapes)"),
            layout.as_bytes(),
        )?;
        let tensors: Vec<Tensor> = vars.iter().map(|(_, t)| t.shallow_clone()).collect();
        tch::no_grad(|| g.broadcast_all(&tensors, 0, DEFAULT_BUCKET_BYTES))?;
        let state = opt.state_tensors();
        tch::no_grad(|| g.broadcast_all(&state, 0, DEFAULT_BUCKET_BYTES))?;
        opt.set_steps(self.broadcast_i64(opt.steps())?);
        if let Some(s) = opt.loss_scale_mut() {
            // A power of two, sent exactly as its bits.
            s.scale = f64::from_bits(self.broadcast_i64(s.scale.to_bits() as i64)? as u64);
            s.growth_tracker = self.broadcast_i64(s.growth_tracker)?;
        }
        let mut all = tensors;
        all.extend(state);
        g.check_same(
            &format!("the {what}'s values after the broadcast from rank 0"),
            &vq_dist::fingerprint(&all),
        )?;
        Ok(())
    }

    /// Checks that every rank still holds the same variables (fingerprints): the ranks' updates
    /// are identical by construction (every rank applies the same all-reduced numbers), so a
    /// difference means a rank drifted, which is an error rather than a silent divergence.
    ///
    /// # Errors
    /// A rank whose variables differ from rank 0's, or a lost rank.
    pub fn check_in_sync(&self, what: &str, vs: &nn::VarStore, step: usize) -> Result<()> {
        let Some(g) = &self.0 else {
            return Ok(());
        };
        let tensors: Vec<Tensor> = sorted_variables(vs).into_iter().map(|(_, t)| t).collect();
        g.check_same(
            &format!("the {what}'s variables at step {step}"),
            &vq_dist::fingerprint(&tensors),
        )?;
        Ok(())
    }

    /// Tells the other ranks why this one stops (their errors then name it).
    pub fn report_failure(&self, message: &str) {
        if let Some(g) = &self.0 {
            g.report_failure(message);
        }
    }

    /// Waits for every rank at the end of training.
    ///
    /// # Errors
    /// A rank that did not get there.
    pub fn finish(&self) -> Result<()> {
        if let Some(g) = &self.0 {
            g.finish()?;
        }
        Ok(())
    }
}

/// Joins the group that a launcher (torchrun, Slurm, `vq-train train --nproc`) describes, with
/// this rank's tensors on `device` (Gloo for the CPU, NCCL for CUDA; with CUDA each rank uses
/// `cuda:LOCAL_RANK`). `None` when no launcher set the environment.
///
/// # Errors
/// Bad launcher variables, a CUDA device index beyond the machine's, or a failed rendezvous.
pub fn join_from_env(device: Device, timeout: Duration) -> Result<Option<(Launch, ProcessGroup)>> {
    let Some(launch) = Launch::from_env()? else {
        return Ok(None);
    };
    let cfg = GroupConfig {
        timeout,
        ..GroupConfig::new(&launch, device)
    };
    let pg = ProcessGroup::join(&cfg).with_context(|| {
        format!(
            "joining the process group (rank {} of {}, rendezvous {}:{})",
            launch.rank, launch.world, launch.master_addr, launch.master_port
        )
    })?;
    Ok(Some((launch, pg)))
}

/// The device of a rank: `cuda` means `cuda:LOCAL_RANK`.
///
/// # Errors
/// A local rank beyond the visible CUDA devices.
pub fn rank_device(requested: Device, launch: &Launch) -> Result<Device> {
    match requested {
        Device::Cuda(_) => {
            let n = tch::Cuda::device_count();
            anyhow::ensure!(
                (launch.local_rank as i64) < n,
                "LOCAL_RANK {} but this machine shows {n} CUDA device(s): start at most one process per GPU",
                launch.local_rank
            );
            Ok(Device::Cuda(launch.local_rank))
        }
        d => Ok(d),
    }
}

/// The variables of `vs` in name order, the same on every rank.
fn sorted_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Code counts as f64 (for the all-reduce), and back.
pub(crate) fn counts_to_f64(counts: &[u64]) -> Vec<f64> {
    counts.iter().map(|&c| c as f64).collect()
}

pub(crate) fn counts_from_f64(counts: &[f64]) -> Vec<u64> {
    counts.iter().map(|&c| c.round().max(0.0) as u64).collect()
}
