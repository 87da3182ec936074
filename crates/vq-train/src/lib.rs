//! The library behind the `vq-train` binary: data, optimiser, checkpoints, the training loop,
//! evaluation, comparison of estimators and plots. See `vq-train --help`.

pub mod checkpoint;
pub mod codes;
pub mod compare;
pub mod data;
pub mod dist;
pub mod eval;
pub mod method;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod pretrained;
pub mod profile;
pub mod readback;
pub mod stats;
pub mod sweep;
pub mod tensorboard;
pub mod train;
pub mod trainer;
pub mod watch;
