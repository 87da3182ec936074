//! The process group as the [`Collective`] that vq-tch's [`VectorQuantizer`](vq_tch::VectorQuantizer)
//! owns: a data-parallel layer sums its EMA statistics, gathers replacement rows and broadcasts
//! its k-means start through it.

use tch::{Device, Tensor};
use vq_tch::{Collective, CollectiveError};

use crate::ProcessGroup;

impl Collective for ProcessGroup {
    fn world(&self) -> usize {
        ProcessGroup::world(self)
    }

    fn device(&self) -> Device {
        ProcessGroup::device(self)
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<(), CollectiveError> {
        ProcessGroup::all_reduce_sum(self, t).map_err(lift)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<(), CollectiveError> {
        ProcessGroup::broadcast(self, t, root).map_err(lift)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        ProcessGroup::all_gather(self, t).map_err(lift)
    }
}

fn lift(err: crate::DistError) -> CollectiveError {
    CollectiveError(Box::new(err))
}
