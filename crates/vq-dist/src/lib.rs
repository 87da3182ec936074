//! Data-parallel training on libtorch's own distributed engine, c10d: a `TCPStore` rendezvous
//! hosted by rank 0, one process group — `ProcessGroupGloo` for CPU tensors, `ProcessGroupNCCL`
//! for CUDA tensors — and the collectives a trainer needs (all-reduce, broadcast, all-gather,
//! barrier, a differentiable all-reduce for synchronised batch statistics), reached through a
//! small C++ shim (`csrc/vq_dist.cpp`, compiled by `build.rs` against the linked libtorch).
//!
//! On top: [`Launch`] (the environments of `torchrun` and Slurm), gradient buckets
//! ([`ProcessGroup::all_reduce_mean`]: flattened, DDP-sized, one collective per bucket),
//! consistency checks between ranks ([`ProcessGroup::check_same`]) and fault reports: every rank
//! beats a heartbeat into the store, so when a collective fails (a peer died, or hung past the
//! timeout) the survivors name the lost rank in the error instead of hanging.
//!
//! ```no_run
//! use std::time::Duration;
//! use tch::{Device, Tensor};
//! use vq_dist::{GroupConfig, Launch, ProcessGroup};
//!
//! // Under `torchrun --nproc-per-node 2 --no-python <binary>`:
//! let launch = Launch::from_env().unwrap().expect("started by torchrun");
//! let pg = ProcessGroup::join(&GroupConfig::new(&launch, Device::Cpu)).unwrap();
//! let t = Tensor::from_slice(&[pg.rank() as f32]);
//! pg.all_reduce_sum(&t).unwrap();
//! assert_eq!(f64::try_from(&t).unwrap(), 1.0); // 0 + 1
//! pg.finish().unwrap();
//! ```

pub mod error;
pub mod launch;
mod layer;

use std::ffi::{CStr, CString, c_void};
use std::os::raw::c_char;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

pub use error::{DistError, Result};
pub use launch::{Launch, Launcher};

unsafe extern "C" {
    fn vq_dist_last_error() -> *const c_char;
    fn vq_dist_store_connect(
        host: *const c_char,
        port: i32,
        is_server: i32,
        prefix: *const c_char,
        rank: i32,
        world: i32,
        timeout_ms: i64,
    ) -> *mut c_void;
    fn vq_dist_store_set(g: *mut c_void, key: *const c_char, value: *const u8, len: i64) -> i32;
    fn vq_dist_store_get(
        g: *mut c_void,
        key: *const c_char,
        value: *mut *mut u8,
        len: *mut i64,
    ) -> i32;
    fn vq_dist_free_bytes(p: *mut u8);
    fn vq_dist_store_check(g: *mut c_void, key: *const c_char, found: *mut i32) -> i32;
    fn vq_dist_store_add(g: *mut c_void, key: *const c_char, delta: i64, value: *mut i64) -> i32;
    fn vq_dist_init_backend(
        g: *mut c_void,
        backend: i32,
        cuda_device: i32,
        heartbeat_ms: i64,
    ) -> i32;
    fn vq_dist_allreduce_sum(g: *mut c_void, t: *mut C_tensor) -> i32;
    fn vq_dist_broadcast(g: *mut c_void, t: *mut C_tensor, root: i32) -> i32;
    fn vq_dist_allgather(g: *mut c_void, out: *mut C_tensor, t: *mut C_tensor) -> i32;
    fn vq_dist_barrier(g: *mut c_void) -> i32;
    fn vq_dist_allreduce_sum_autograd(g: *mut c_void, t: *mut C_tensor) -> *mut C_tensor;
    fn vq_dist_destroy(g: *mut c_void, graceful: i32);
    fn vq_dist_quiet_warnings();
    fn vq_dist_stop_heartbeat(g: *mut c_void);
}

fn last_error() -> String {
    // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated message.
    unsafe { CStr::from_ptr(vq_dist_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// DDP's default gradient bucket size (`bucket_cap_mb = 25`).
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Seconds between heartbeats; a rank whose counter does not move for [`LOST_AFTER`] is lost.
const HEARTBEAT: Duration = Duration::from_millis(500);
/// How long survivors watch the heartbeats after a failed collective.
const LOST_AFTER: Duration = Duration::from_millis(2500);

/// The communication backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo: CPU tensors.
    Gloo,
    /// NCCL: CUDA tensors (one GPU per process).
    Nccl,
}

impl Backend {
    /// Gloo for CPU, NCCL for CUDA (as `torch.distributed` picks them).
    pub fn for_device(device: Device) -> Self {
        match device {
            Device::Cuda(_) => Self::Nccl,
            _ => Self::Gloo,
        }
    }

    /// Whether this build can create the backend (NCCL needs a CUDA libtorch and nccl.h).
    pub fn compiled(self) -> bool {
        match self {
            Self::Gloo => true,
            Self::Nccl => cfg!(vq_dist_nccl),
        }
    }

    /// `gloo` or `nccl`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gloo => "gloo",
            Self::Nccl => "nccl",
        }
    }
}

/// How to join a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// This process's rank.
    pub rank: usize,
    /// Number of processes.
    pub world: usize,
    /// Host of rank 0's rendezvous store.
    pub master_addr: String,
    /// Its port.
    pub master_port: u16,
    /// Where this rank's tensors live: CPU (Gloo) or its GPU (NCCL).
    pub device: Device,
    /// Timeout of the rendezvous and of every collective: a rank that hangs longer makes the
    /// others fail with an error naming it.
    pub timeout: Duration,
    /// Whether rank 0 hosts the store (false when a launcher's agent already does: torchrun's
    /// `TORCHELASTIC_USE_AGENT_STORE`).
    pub host_store: bool,
    /// Prefix of every store key of this group (one per launch attempt: torchrun restarts a
    /// failed group on the same store).
    pub prefix: String,
}

impl GroupConfig {
    /// From a launch environment, with a 10-minute timeout.
    pub fn new(launch: &Launch, device: Device) -> Self {
        Self {
            rank: launch.rank,
            world: launch.world,
            master_addr: launch.master_addr.clone(),
            master_port: launch.master_port,
            device,
            timeout: Duration::from_secs(600),
            host_store: !launch.agent_store,
            prefix: format!("vq/attempt_{}", launch.attempt),
        }
    }

    /// The backend for the device: Gloo on the CPU, NCCL on CUDA.
    pub fn backend(&self) -> Backend {
        Backend::for_device(self.device)
    }
}

/// One process's membership of a c10d process group.
///
/// Collectives block until every rank has called them (in the same order on every rank, as with
/// `torch.distributed`). After a failed collective the group is poisoned: later calls fail at
/// once, and dropping it does not wait for the lost peers.
#[derive(Debug)]
pub struct ProcessGroup {
    raw: *mut c_void,
    rank: usize,
    world: usize,
    device: Device,
    timeout: Duration,
    healthy: AtomicBool,
    finished: AtomicBool,
}

// SAFETY: c10d's TCPStore and process groups are used from several threads by torch itself (the
// heartbeat thread of the shim has its own store connection); the Rust side only passes the
// pointer to the shim.
unsafe impl Send for ProcessGroup {}
// SAFETY: as above.
unsafe impl Sync for ProcessGroup {}

fn key(k: &str) -> CString {
    CString::new(k).expect("store keys have no NUL")
}

impl ProcessGroup {
    /// Joins the group: rendezvous at rank 0's store, checks that every rank agrees on the world
    /// size and that each rank is taken once, creates the backend and starts the heartbeat.
    ///
    /// # Errors
    /// [`DistError::PortInUse`] when rank 0 cannot listen; [`DistError::Rendezvous`] when rank 0
    /// cannot be reached within the timeout; [`DistError::Join`] for a world-size mismatch, a
    /// duplicate rank or ranks that never joined; [`DistError::NoNccl`].
    pub fn join(cfg: &GroupConfig) -> Result<Self> {
        if cfg.world == 0 || cfg.rank >= cfg.world {
            return Err(DistError::Join {
                rank: cfg.rank,
                why: format!("rank outside the world of {} processes", cfg.world),
            });
        }
        let backend = cfg.backend();
        if !backend.compiled() {
            return Err(DistError::NoNccl);
        }
        if backend == Backend::Nccl
            && let Device::Cuda(i) = cfg.device
            && !(tch::Cuda::is_available() && (i as i64) < tch::Cuda::device_count())
        {
            return Err(DistError::Join {
                rank: cfg.rank,
                why: format!(
                    "the nccl backend runs on cuda:{i}, but libtorch sees {} CUDA device(s)",
                    tch::Cuda::device_count()
                ),
            });
        }
        let host = CString::new(cfg.master_addr.as_str()).map_err(|_| DistError::Env {
            var: "MASTER_ADDR",
            value: cfg.master_addr.clone(),
            why: "contains a NUL byte".into(),
        })?;
        let timeout_ms = i64::try_from(cfg.timeout.as_millis()).unwrap_or(i64::MAX);
        let prefix = CString::new(cfg.prefix.as_str()).map_err(|_| DistError::Join {
            rank: cfg.rank,
            why: "the store prefix contains a NUL byte".into(),
        })?;
        let is_server = i32::from(cfg.rank == 0 && cfg.host_store);
        // SAFETY: host and prefix are valid C strings for the call.
        let raw = unsafe {
            vq_dist_store_connect(
                host.as_ptr(),
                i32::from(cfg.master_port),
                is_server,
                prefix.as_ptr(),
                cfg.rank as i32,
                cfg.world as i32,
                timeout_ms,
            )
        };
        if raw.is_null() {
            let detail = last_error();
            let in_use = detail.contains("in use") || detail.contains("EADDRINUSE");
            return Err(if is_server == 1 && in_use {
                DistError::PortInUse {
                    addr: cfg.master_addr.clone(),
                    port: cfg.master_port,
                    detail: first_line(&detail),
                }
            } else {
                DistError::Rendezvous {
                    rank: cfg.rank,
                    addr: cfg.master_addr.clone(),
                    port: cfg.master_port,
                    detail: first_line(&detail),
                }
            });
        }
        let pg = Self {
            raw,
            rank: cfg.rank,
            world: cfg.world,
            device: cfg.device,
            timeout: cfg.timeout,
            healthy: AtomicBool::new(true),
            finished: AtomicBool::new(false),
        };
        pg.check_membership()?;
        let heartbeat_ms = HEARTBEAT.as_millis() as i64;
        let cuda_device = match cfg.device {
            Device::Cuda(i) => i as i32,
            _ => -1,
        };
        // SAFETY: raw is the live group returned above.
        if unsafe { vq_dist_init_backend(pg.raw, backend_code(backend), cuda_device, heartbeat_ms) }
            != 0
        {
            let detail = last_error();
            pg.poison();
            return Err(DistError::Join {
                rank: cfg.rank,
                why: format!(
                    "creating the {} process group failed: {}",
                    backend.name(),
                    first_line(&detail)
                ),
            });
        }
        Ok(pg)
    }

    /// Every rank registers its rank and world size; each waits (up to the timeout) for the
    /// others, then compares.
    fn check_membership(&self) -> Result<()> {
        let join_err = |why: String| DistError::Join {
            rank: self.rank,
            why,
        };
        let claims = self
            .store_add(&format!("vq/claim/{}", self.rank), 1)
            .map_err(|e| join_err(format!("registering with the store: {e}")))?;
        if claims > 1 {
            return Err(join_err(format!(
                "two processes were started as rank {} (check RANK / SLURM_PROCID)",
                self.rank
            )));
        }
        self.store_set(
            &format!("vq/world/{}", self.rank),
            self.world.to_string().as_bytes(),
        )
        .map_err(|e| join_err(format!("registering with the store: {e}")))?;
        let began = Instant::now();
        loop {
            let mut missing = Vec::new();
            for r in 0..self.world {
                if !self
                    .store_check(&format!("vq/world/{r}"))
                    .map_err(|e| join_err(format!("waiting for the others: {e}")))?
                {
                    missing.push(r);
                }
            }
            if missing.is_empty() {
                break;
            }
            if began.elapsed() > self.timeout {
                return Err(join_err(format!(
                    "waited {:.0} s for rank(s) {missing:?} of WORLD_SIZE={} to join; were fewer processes started than WORLD_SIZE says?",
                    self.timeout.as_secs_f64(),
                    self.world
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for r in 0..self.world {
            let v = self
                .store_get(&format!("vq/world/{r}"))
                .map_err(|e| join_err(format!("reading rank {r}'s world size: {e}")))?;
            let theirs = String::from_utf8_lossy(&v).into_owned();
            if theirs != self.world.to_string() {
                return Err(join_err(format!(
                    "rank {r} was started with WORLD_SIZE={theirs}, this rank with {}: every process must get the same world size",
                    self.world
                )));
            }
        }
        Ok(())
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        Backend::for_device(self.device)
    }

    /// The device of this rank's tensors.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The collective timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether this is rank 0 (the one that writes files).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    fn poison(&self) {
        self.healthy.store(false, Ordering::SeqCst);
    }

    /// After a failed collective: poisons the group and silences libtorch's warnings (each store
    /// request to a dead peer logs one with a stack trace), so that our error is what is read.
    fn fail(&self) {
        self.poison();
        // SAFETY: sets an integer flag of c10's logging.
        unsafe { vq_dist_quiet_warnings() };
    }

    fn ready(&self, op: &'static str) -> Result<()> {
        if self.healthy.load(Ordering::SeqCst) {
            return Ok(());
        }
        let finished = self.finished.load(Ordering::SeqCst);
        Err(DistError::Lost {
            rank: self.rank,
            op,
            lost: if finished {
                "the group was finished".into()
            } else {
                "the group already failed".into()
            },
            detail: if finished {
                "no collective may follow finish()".into()
            } else {
                "an earlier collective failed".into()
            },
        })
    }

    /// Runs a collective; on failure poisons the group and names the lost ranks.
    fn collective(&self, op: &'static str, f: impl FnOnce() -> i32) -> Result<()> {
        self.ready(op)?;
        if f() == 0 {
            return Ok(());
        }
        let detail = first_line(&last_error());
        self.fail();
        Err(DistError::Lost {
            rank: self.rank,
            op,
            lost: self.diagnose(),
            detail,
        })
    }

    /// Which ranks stopped: reported failures first, else the ranks whose heartbeat did not
    /// move while we watched.
    fn diagnose(&self) -> String {
        let mut reported = Vec::new();
        for r in (0..self.world).filter(|&r| r != self.rank) {
            let k = format!("vq/error/{r}");
            if self.store_check(&k).unwrap_or(false)
                && let Ok(msg) = self.store_get(&k)
            {
                reported.push(format!(
                    "rank {r} failed: {}",
                    String::from_utf8_lossy(&msg)
                ));
            }
        }
        if !reported.is_empty() {
            return reported.join("; ");
        }
        let beats = |pg: &Self| -> Option<Vec<i64>> {
            (0..pg.world)
                .map(|r| pg.store_add(&format!("vq/alive/{r}"), 0).ok())
                .collect()
        };
        let Some(before) = beats(self) else {
            return if self.rank == 0 {
                "the rendezvous store stopped answering".into()
            } else {
                "rank 0 is gone (its rendezvous store stopped answering): killed, crashed or hung"
                    .into()
            };
        };
        std::thread::sleep(LOST_AFTER);
        let Some(after) = beats(self) else {
            return "rank 0 is gone (its rendezvous store stopped answering): killed, crashed or hung"
                .into();
        };
        let lost: Vec<usize> = (0..self.world)
            .filter(|&r| r != self.rank && before[r] == after[r])
            .collect();
        if lost.is_empty() {
            "every other rank still beats; one of them may be stuck outside communication, or the timeout is too short".into()
        } else {
            format!(
                "rank(s) {lost:?} stopped (no heartbeat for {:.1} s): killed, crashed or hung",
                LOST_AFTER.as_secs_f64()
            )
        }
    }

    /// The error for a collective that failed outside this type's own calls (the backward of
    /// [`all_reduce_sum_autograd`](Self::all_reduce_sum_autograd) runs inside libtorch's
    /// autograd engine): poisons the group and names the lost ranks.
    pub fn lost(&self, op: &'static str, detail: &str) -> DistError {
        self.fail();
        DistError::Lost {
            rank: self.rank,
            op,
            lost: self.diagnose(),
            detail: first_line(detail),
        }
    }

    /// Tells the other ranks (through the store) why this rank is about to stop, so that their
    /// errors name the cause; best effort.
    pub fn report_failure(&self, message: &str) {
        let _ = self.store_set(&format!("vq/error/{}", self.rank), message.as_bytes());
    }

    /// Sums `t` over ranks, in place. `t` must be contiguous (CPU for Gloo, this rank's GPU for
    /// NCCL).
    ///
    /// # Errors
    /// [`DistError::Tensor`] for a non-contiguous tensor; [`DistError::Lost`].
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        contiguous(t)?;
        // SAFETY: raw is live; t is a live tensor borrowed for the call.
        self.collective("all_reduce", || unsafe {
            vq_dist_allreduce_sum(self.raw, t.as_ptr() as *mut C_tensor)
        })
    }

    /// Copies rank `root`'s `t` into every rank's `t`, in place.
    ///
    /// # Errors
    /// As [`all_reduce_sum`](Self::all_reduce_sum).
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        contiguous(t)?;
        // SAFETY: as in all_reduce_sum.
        self.collective("broadcast", || unsafe {
            vq_dist_broadcast(self.raw, t.as_ptr() as *mut C_tensor, root as i32)
        })
    }

    /// Every rank's `t`, stacked in rank order: shape `(world, t.shape…)`.
    ///
    /// # Errors
    /// As [`all_reduce_sum`](Self::all_reduce_sum).
    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.contiguous();
        let mut shape = vec![self.world as i64];
        shape.extend(t.size());
        let out = Tensor::empty(shape.as_slice(), (t.kind(), t.device()));
        // SAFETY: as in all_reduce_sum; out is a fresh contiguous tensor of world × t.
        self.collective("all_gather", || unsafe {
            vq_dist_allgather(
                self.raw,
                out.as_ptr() as *mut C_tensor,
                t.as_ptr() as *mut C_tensor,
            )
        })?;
        Ok(out)
    }

    /// Waits until every rank got here.
    ///
    /// # Errors
    /// [`DistError::Lost`].
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: raw is live.
        self.collective("barrier", || unsafe { vq_dist_barrier(self.raw) })
    }

    /// The sum of `t` over ranks as a differentiable op: the backward sums the incoming
    /// gradients over ranks too (`torch.distributed.nn.functional.all_reduce`). Every rank must
    /// run the backward through it.
    ///
    /// # Errors
    /// [`DistError::Lost`] (in the forward; a failure in the backward surfaces as a libtorch
    /// error of `backward()`).
    pub fn all_reduce_sum_autograd(&self, t: &Tensor) -> Result<Tensor> {
        self.ready("all_reduce (autograd)")?;
        // SAFETY: raw is live; t is borrowed; the shim returns null or a new tensor we own.
        let out = unsafe { vq_dist_allreduce_sum_autograd(self.raw, t.as_ptr() as *mut C_tensor) };
        if out.is_null() {
            let detail = first_line(&last_error());
            self.fail();
            return Err(DistError::Lost {
                rank: self.rank,
                op: "all_reduce (autograd)",
                lost: self.diagnose(),
                detail,
            });
        }
        // SAFETY: out is a new heap tensor handed over to us.
        Ok(unsafe { Tensor::from_ptr(out) })
    }

    /// Averages `tensors` (e.g. gradients) over ranks in place, in buckets of at most
    /// `bucket_bytes` (one flattened all-reduce per bucket of same-dtype, same-device tensors, as
    /// DDP's reducer), then divides by the world size. Undefined tensors are skipped (every rank
    /// must have the same ones defined).
    ///
    /// # Errors
    /// [`DistError::Lost`].
    pub fn all_reduce_mean(&self, tensors: &[Tensor], bucket_bytes: usize) -> Result<()> {
        for bucket in buckets(tensors, bucket_bytes) {
            let mut flat = flatten(&bucket);
            self.all_reduce_sum(&flat)?;
            let _ = flat.g_div_scalar_(self.world as f64);
            unflatten(&flat, &bucket);
        }
        Ok(())
    }

    /// Copies rank `root`'s values of `tensors` (parameters, buffers) into every rank's, in
    /// buckets like [`all_reduce_mean`](Self::all_reduce_mean).
    ///
    /// # Errors
    /// [`DistError::Lost`].
    pub fn broadcast_all(
        &self,
        tensors: &[Tensor],
        root: usize,
        bucket_bytes: usize,
    ) -> Result<()> {
        for bucket in buckets(tensors, bucket_bytes) {
            let flat = flatten(&bucket);
            self.broadcast(&flat, root)?;
            unflatten(&flat, &bucket);
        }
        Ok(())
    }

    /// Checks that every rank holds the same `value` (a configuration, a list of shapes, a
    /// fingerprint); compares a 64-bit FNV-1a hash, so the values themselves never travel.
    ///
    /// # Errors
    /// [`DistError::Mismatch`] naming the ranks that differ from rank 0 (every rank fails);
    /// [`DistError::Lost`].
    pub fn check_same(&self, what: &str, value: &[u8]) -> Result<()> {
        let h = fnv1a(value) as i64;
        let all = self.all_gather(&Tensor::from_slice(&[h]).to_device(self.device))?;
        let all = Vec::<i64>::try_from(all.to_device(Device::Cpu).view([-1]))
            .map_err(|e| DistError::Tensor(e.to_string()))?;
        let ranks: Vec<usize> = (0..self.world).filter(|&r| all[r] != all[0]).collect();
        if ranks.is_empty() {
            Ok(())
        } else {
            Err(DistError::Mismatch {
                rank: self.rank,
                what: what.to_owned(),
                ranks,
            })
        }
    }

    /// Ends membership cleanly: waits for every rank; dropping the group afterwards stops the
    /// heartbeat and releases the backend and the store (rank 0 stops hosting it). No
    /// collective may follow.
    ///
    /// # Errors
    /// [`DistError::Lost`] if a rank did not get to the end.
    pub fn finish(&self) -> Result<()> {
        // No rank talks to the store after the barrier, so rank 0 may stop hosting it at once.
        // SAFETY: raw is live; the heartbeat thread is joined (destroy handles a stopped one).
        unsafe { vq_dist_stop_heartbeat(self.raw) };
        self.barrier()?;
        self.finished.store(true, Ordering::SeqCst);
        self.poison();
        Ok(())
    }

    fn store_set(&self, k: &str, value: &[u8]) -> Result<(), String> {
        let k = key(k);
        // SAFETY: raw is live; k and value are valid for the call.
        match unsafe { vq_dist_store_set(self.raw, k.as_ptr(), value.as_ptr(), value.len() as i64) }
        {
            0 => Ok(()),
            _ => Err(first_line(&last_error())),
        }
    }

    fn store_get(&self, k: &str) -> Result<Vec<u8>, String> {
        let k = key(k);
        let (mut p, mut len) = (std::ptr::null_mut(), 0i64);
        // SAFETY: raw is live; on success the shim hands over a malloc'd buffer of len bytes.
        unsafe {
            if vq_dist_store_get(self.raw, k.as_ptr(), &mut p, &mut len) != 0 {
                return Err(first_line(&last_error()));
            }
            let v = std::slice::from_raw_parts(p, len as usize).to_vec();
            vq_dist_free_bytes(p);
            Ok(v)
        }
    }

    fn store_check(&self, k: &str) -> Result<bool, String> {
        let k = key(k);
        let mut found = 0;
        // SAFETY: raw is live; k valid for the call.
        match unsafe { vq_dist_store_check(self.raw, k.as_ptr(), &mut found) } {
            0 => Ok(found != 0),
            _ => Err(first_line(&last_error())),
        }
    }

    fn store_add(&self, k: &str, delta: i64) -> Result<i64, String> {
        let k = key(k);
        let mut v = 0;
        // SAFETY: raw is live; k valid for the call.
        match unsafe { vq_dist_store_add(self.raw, k.as_ptr(), delta, &mut v) } {
            0 => Ok(v),
            _ => Err(first_line(&last_error())),
        }
    }
}

impl Drop for ProcessGroup {
    /// After [`finish`](ProcessGroup::finish): releases everything. Without it (an error path):
    /// stops the heartbeat but leaves the backend and the store to the process's exit, since
    /// their destructors may wait for peers that are gone.
    fn drop(&mut self) {
        let graceful = i32::from(self.finished.load(Ordering::SeqCst));
        // SAFETY: raw is live and dropped once; the shim frees it only when graceful = 1.
        unsafe { vq_dist_destroy(self.raw, graceful) };
    }
}

fn backend_code(b: Backend) -> i32 {
    match b {
        Backend::Gloo => 0,
        Backend::Nccl => 1,
    }
}

fn contiguous(t: &Tensor) -> Result<()> {
    if t.is_contiguous() {
        Ok(())
    } else {
        Err(DistError::Tensor(
            "collectives need contiguous tensors".into(),
        ))
    }
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        s.trim().to_owned()
    } else {
        line.to_owned()
    }
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Consecutive defined tensors of one dtype and device, up to `bytes` per bucket (a tensor
/// larger than `bytes` gets a bucket of its own).
fn buckets(tensors: &[Tensor], bytes: usize) -> Vec<Vec<Tensor>> {
    let mut out: Vec<Vec<Tensor>> = Vec::new();
    let mut size = 0usize;
    for t in tensors.iter().filter(|t| t.defined()) {
        let b = t.numel() * t.kind().elt_size_in_bytes();
        let fits = out.last().is_some_and(|last| {
            let head = &last[0];
            head.kind() == t.kind() && head.device() == t.device() && size + b <= bytes
        });
        if fits {
            size += b;
            out.last_mut().expect("checked").push(t.shallow_clone());
        } else {
            size = b;
            out.push(vec![t.shallow_clone()]);
        }
    }
    out
}

fn flatten(bucket: &[Tensor]) -> Tensor {
    tch::no_grad(|| {
        let views: Vec<Tensor> = bucket.iter().map(|t| t.detach().reshape([-1])).collect();
        Tensor::cat(&views, 0)
    })
}

fn unflatten(flat: &Tensor, bucket: &[Tensor]) {
    tch::no_grad(|| {
        let mut at = 0i64;
        for t in bucket {
            let n = t.numel() as i64;
            let mut t = t.shallow_clone();
            t.copy_(&flat.narrow(0, at, n).view_as(&t));
            at += n;
        }
    });
}

/// A fingerprint of tensors' values (per tensor: the sum, the sum of squares and a
/// position-weighted sum, in f64) for [`ProcessGroup::check_same`]: equal values give equal bytes.
pub fn fingerprint(tensors: &[Tensor]) -> Vec<u8> {
    let mut out = Vec::new();
    tch::no_grad(|| {
        for t in tensors {
            let x = t
                .detach()
                .to_device(Device::Cpu)
                .to_kind(Kind::Double)
                .reshape([-1]);
            let w = Tensor::arange(x.numel() as i64, (Kind::Double, Device::Cpu)).sin();
            for v in [
                x.sum(Kind::Double),
                x.square().sum(Kind::Double),
                (&x * w).sum(Kind::Double),
            ] {
                out.extend(f64::try_from(v).unwrap_or(f64::NAN).to_le_bytes());
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_respect_size_dtype_and_order() {
        let f = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        let d = Tensor::zeros([2], (Kind::Double, Device::Cpu));
        let ts = vec![f(4), f(4), f(10), d, f(1), Tensor::new()];
        let b = buckets(&ts, 32);
        let sizes: Vec<Vec<i64>> = b
            .iter()
            .map(|b| b.iter().map(|t| t.numel() as i64).collect())
            .collect();
        assert_eq!(sizes, vec![vec![4, 4], vec![10], vec![2], vec![1]]);
    }

    #[test]
    fn flatten_round_trips() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
        let b = Tensor::from_slice(&[5.0f32]);
        let bucket = vec![a.shallow_clone(), b.shallow_clone()];
        let flat = flatten(&bucket) * 2.0;
        unflatten(&flat, &bucket);
        assert_eq!(
            Vec::<f32>::try_from(a.view([-1])).unwrap(),
            [2.0, 4.0, 6.0, 8.0]
        );
        assert_eq!(Vec::<f32>::try_from(b).unwrap(), [10.0]);
    }

    #[test]
    fn fingerprints_tell_values_apart() {
        let a = Tensor::from_slice(&[1.0f32, 2.0]);
        let b = Tensor::from_slice(&[2.0f32, 1.0]);
        assert_eq!(fingerprint(&[a.copy()]), fingerprint(&[a.shallow_clone()]));
        assert_ne!(fingerprint(&[a]), fingerprint(&[b]));
        assert_ne!(fnv1a(b"x"), fnv1a(b"y"));
    }
}
