//! The library behind the `vq-train` binary: data, optimiser, checkpoints, the run loop
//! ([`run`]: one loop for every model kind) and the autoencoder kind ([`autoencoder`]),
//! evaluation, comparison of estimators and plots. See `vq-train --help`.

pub mod autoencoder;
pub mod checkpoint;
pub mod codes;
pub mod codeset;
pub mod compare;
pub mod config;
pub mod data;
pub mod dist;
pub mod domain;
pub mod downstream;
pub mod eval;
pub mod generation;
pub mod labels;
pub mod layout;
pub mod method;
pub mod metrics;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod pretrained;
pub mod prior;
pub mod profile;
pub mod readback;
pub mod run;
mod safetensors_file;
pub mod stats;
pub mod sweep;
pub mod tensorboard;
pub mod train;
pub mod watch;
