//! Errors of the distributed layer.

/// What can go wrong when joining a group or running a collective.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A launcher variable is missing or has a bad value.
    #[error("environment variable {var}={value:?}: {why}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value (empty when unset).
        value: String,
        /// What is wrong.
        why: String,
    },
    /// Rank 0 could not open the rendezvous port.
    #[error(
        "rank 0 cannot listen on {addr}:{port} (MASTER_PORT): the port is already in use — pick another port or stop the process that holds it ({detail})"
    )]
    PortInUse {
        /// Host.
        addr: String,
        /// Port.
        port: u16,
        /// libtorch's message.
        detail: String,
    },
    /// The rendezvous store could not be reached or created.
    #[error("rank {rank}: rendezvous with rank 0 at {addr}:{port} failed: {detail}")]
    Rendezvous {
        /// This rank.
        rank: usize,
        /// Host.
        addr: String,
        /// Port.
        port: u16,
        /// What happened.
        detail: String,
    },
    /// The processes disagree on the group (world size, duplicate ranks, missing ranks).
    #[error("rank {rank}: {why}")]
    Join {
        /// This rank.
        rank: usize,
        /// What is inconsistent.
        why: String,
    },
    /// Ranks hold different values of something that must agree (configuration, model shapes).
    #[error("rank {rank}: {what} differs between ranks: rank(s) {ranks:?} disagree with rank 0")]
    Mismatch {
        /// This rank.
        rank: usize,
        /// What was compared.
        what: String,
        /// The ranks whose value differs from rank 0's.
        ranks: Vec<usize>,
    },
    /// A collective failed: a peer died, hung past the timeout, or reported an error.
    #[error("rank {rank}: {op} failed: {lost}; the backend said: {detail}")]
    Lost {
        /// This rank.
        rank: usize,
        /// The collective.
        op: &'static str,
        /// Which ranks were lost, as far as the heartbeats tell.
        lost: String,
        /// libtorch's message.
        detail: String,
    },
    /// The NCCL backend was asked for but this build has none.
    #[error(
        "NCCL was requested but this build of vq-dist has none (libtorch without CUDA, or nccl.h not found at build time)"
    )]
    NoNccl,
    /// A bad tensor argument (device, layout, dtype).
    #[error("{0}")]
    Tensor(String),
}

/// Result of this crate.
pub type Result<T, E = DistError> = std::result::Result<T, E>;
