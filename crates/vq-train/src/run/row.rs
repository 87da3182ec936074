//! A step's numbers under their names: built on the device by a model kind's step
//! ([`StepRow`]), read back by the run loop in one copy per window ([`StepRow::read`]), combined
//! over the ranks ([`StepValues::over_ranks`]) and looked up by name ([`StepValues::get`]).

use anyhow::{Result, bail};
use tch::{Device, Kind, Tensor};

use crate::dist::{Dist, counts_from_f64, counts_to_f64};

/// How a number is combined over the ranks of a data-parallel run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcrossRanks {
    /// Each rank's own value (a loss over its samples): averaged over the ranks.
    Mean,
    /// The same on every rank (a norm of all-reduced gradients): taken as it is.
    Same,
}

/// The numbers of one step, still on the device: named scalars, the code counts (summed over
/// ranks), and the quantizer's deferred finite-check verdicts (4 values each).
#[derive(Debug, Default)]
pub struct StepRow {
    names: Vec<(&'static str, AcrossRanks)>,
    scalars: Vec<Tensor>,
    counts: Option<Tensor>,
    verdicts: Vec<Tensor>,
}

impl StepRow {
    /// An empty row.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the scalar `value` (any float kind, any device) under `name`.
    #[must_use]
    pub fn scalar(mut self, name: &'static str, across: AcrossRanks, value: &Tensor) -> Self {
        debug_assert!(
            self.names.iter().all(|(n, _)| *n != name),
            "{name} reported twice"
        );
        self.names.push((name, across));
        self.scalars.push(value.shallow_clone());
        self
    }

    /// Sets the code counts of the step (one per code slot).
    #[must_use]
    pub fn counts(mut self, counts: &Tensor) -> Self {
        self.counts = Some(counts.shallow_clone());
        self
    }

    /// Adds deferred finite-check verdicts (4 values each).
    #[must_use]
    pub fn verdicts(mut self, verdicts: &[Tensor]) -> Self {
        self.verdicts
            .extend(verdicts.iter().map(Tensor::shallow_clone));
        self
    }

    /// The row as one f64 vector on the first scalar's device:
    /// `[scalars…, counts…, verdicts…]`.
    fn packed(&self) -> Tensor {
        let device = self.scalars.first().map_or(Device::Cpu, Tensor::device);
        let f = |t: &Tensor| {
            t.detach()
                .to_kind(Kind::Double)
                .to_device(device)
                .reshape([-1])
        };
        let mut all: Vec<Tensor> = self.scalars.iter().map(f).collect();
        all.extend(self.counts.iter().map(f));
        all.extend(self.verdicts.iter().map(f));
        Tensor::cat(&all, 0)
    }

    fn counts_len(&self) -> usize {
        self.counts.as_ref().map_or(0, |c| c.numel())
    }

    /// Reads `rows` (of one layout: the same names, counts and verdicts) back in one copy.
    ///
    /// # Errors
    /// Rows of different layouts, or a failed copy.
    pub fn read(rows: &[&StepRow]) -> Result<Vec<StepValues>> {
        let Some(first) = rows.first() else {
            return Ok(Vec::new());
        };
        let (names, k, v) = (&first.names, first.counts_len(), first.verdicts.len());
        for r in rows {
            if r.names != *names || r.counts_len() != k || r.verdicts.len() != v {
                bail!(
                    "the steps of a window report different numbers ({:?} and {:?})",
                    names,
                    r.names
                );
            }
        }
        let packed: Vec<Tensor> = rows.iter().map(|r| r.packed()).collect();
        let stacked = Tensor::f_stack(&packed, 0)
            .map_err(|e| anyhow::anyhow!("collecting the steps' numbers: {e}"))?;
        let len = stacked.size()[1] as usize;
        let n = names.len();
        if len != n + k + 4 * v {
            bail!("a step's numbers hold {len} values, expected {n} + {k} codes + 4 per check");
        }
        let flat = Vec::<f64>::try_from(stacked.reshape([-1]).to_device(Device::Cpu))
            .map_err(|e| anyhow::anyhow!("reading the steps' numbers: {e}"))?;
        Ok(flat
            .chunks(len)
            .map(|r| StepValues {
                names: names.clone(),
                scalars: r[..n].to_vec(),
                counts: r[n..n + k].iter().map(|&c| c as u64).collect(),
                verdicts: r[n + k..]
                    .chunks(4)
                    .map(|c| [c[0] as i64, c[1] as i64, c[2] as i64, c[3] as i64])
                    .collect(),
            })
            .collect())
    }
}

/// A step's numbers read back.
#[derive(Debug, Clone, PartialEq)]
pub struct StepValues {
    names: Vec<(&'static str, AcrossRanks)>,
    scalars: Vec<f64>,
    /// The code counts (per code slot).
    pub counts: Vec<u64>,
    /// The quantizer's deferred finite-check verdicts.
    pub verdicts: Vec<[i64; 4]>,
}

impl StepValues {
    /// The scalar reported under `name`.
    ///
    /// # Panics
    /// If the step reported no such number (a model kind asking for a name its own step does
    /// not report: a programming error).
    #[must_use]
    pub fn get(&self, name: &str) -> f64 {
        match self.names.iter().position(|(n, _)| *n == name) {
            Some(i) => self.scalars[i],
            None => panic!("the step reported no number named {name:?}"),
        }
    }

    /// The step's numbers over the whole group and its failed samples summed over the ranks,
    /// in one collective: [`AcrossRanks::Mean`] scalars averaged, code counts summed (so usage
    /// and perplexity are the global batch's). Returns the group's count of failed samples.
    ///
    /// # Errors
    /// A lost rank.
    pub fn over_ranks(&mut self, dist: &Dist, bad_samples: u64) -> Result<u64> {
        if dist.world() == 1 {
            return Ok(bad_samples);
        }
        let mean: Vec<usize> = (0..self.names.len())
            .filter(|&i| self.names[i].1 == AcrossRanks::Mean)
            .collect();
        let mut all: Vec<f64> = mean.iter().map(|&i| self.scalars[i]).collect();
        all.push(bad_samples as f64);
        all.extend(counts_to_f64(&self.counts));
        dist.sum(&mut all)?;
        let w = dist.world() as f64;
        for (&i, v) in mean.iter().zip(&all) {
            self.scalars[i] = v / w;
        }
        self.counts = counts_from_f64(&all[mean.len() + 1..]);
        Ok(all[mean.len()] as u64)
    }
}

/// A logging window's means, by name, and what the loop itself counts.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowMeans {
    /// Last step of the window (1-based count of steps done).
    pub step: usize,
    /// Learning rate at the last step.
    pub lr: f64,
    /// Optimiser steps per second in the window.
    pub steps_per_s: f64,
    /// Steps of the window whose update was skipped (f16 overflows).
    pub skipped_steps: usize,
    /// Samples of the window that failed to decode and were replaced.
    pub skipped_samples: u64,
    /// The loss scale at the window's last step.
    pub loss_scale: f64,
    pub(super) means: Vec<(&'static str, f64)>,
}

impl WindowMeans {
    /// The window's mean of the number named `name`.
    ///
    /// # Panics
    /// If the kind's steps report no such number (a programming error).
    #[must_use]
    pub fn get(&self, name: &str) -> f64 {
        match self.means.iter().find(|(n, _)| *n == name) {
            Some((_, v)) => *v,
            None => panic!("the window holds no number named {name:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_back_under_their_names() {
        let row = |a: f64, b: f64| {
            StepRow::new()
                .scalar("loss", AcrossRanks::Mean, &Tensor::from(a))
                .scalar("grad_norm", AcrossRanks::Same, &Tensor::from(b as f32))
                .counts(&Tensor::from_slice(&[3i64, 0, 5]))
                .verdicts(&[Tensor::from_slice(&[0i64, 0, 7, 1])])
        };
        let v = StepRow::read(&[&row(1.5, 2.0), &row(-0.25, 4.0)]).unwrap();
        assert_eq!(v.len(), 2);
        let nan = StepRow::read(&[&row(1.0, f64::NAN)]).unwrap();
        assert!(nan[0].get("grad_norm").is_nan());
        assert!(StepRow::read(&[]).unwrap().is_empty());
        assert_eq!((v[0].get("loss"), v[0].get("grad_norm")), (1.5, 2.0));
        assert_eq!((v[1].get("loss"), v[1].get("grad_norm")), (-0.25, 4.0));
        assert_eq!(v[1].counts, [3, 0, 5]);
        assert_eq!(v[1].verdicts, [[0, 0, 7, 1]]);
        // One process: nothing to combine.
        let mut one = v[0].clone();
        assert_eq!(one.over_ranks(&Dist::single(), 2).unwrap(), 2);
        assert_eq!(one, v[0]);
    }

    #[test]
    fn rows_of_another_layout_are_refused() {
        let a = StepRow::new().scalar("loss", AcrossRanks::Mean, &Tensor::from(1.0));
        let b = StepRow::new().scalar("rec", AcrossRanks::Mean, &Tensor::from(1.0));
        let err = StepRow::read(&[&a, &b]).unwrap_err().to_string();
        assert!(err.contains("different numbers"), "{err}");
    }

    #[test]
    #[should_panic(expected = "no number named \"rec\"")]
    fn asking_for_an_unreported_number_is_a_bug() {
        let a = StepRow::new().scalar("loss", AcrossRanks::Mean, &Tensor::from(1.0));
        let _ = StepRow::read(&[&a]).unwrap()[0].get("rec");
    }
}
