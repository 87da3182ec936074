//! ATen calls that tch cannot make as vq-train needs them, through a small C++ shim
//! (`csrc/vq_ops.cpp`, compiled against the linked libtorch's headers): the multi-tensor
//! optimiser kernels (`_fused_adamw_`, `_foreach_norm`, `_foreach_mul_`, `_foreach_zero_`; tch
//! has no bindings for ATen's list-taking ops) and pinning host memory without naming a device
//! (tch's binding passes one, which libtorch deprecates with a warning per call).
//!
//! The multi-tensor functions take the optimiser's own tensors: a failure there is a bug or an
//! out-of-memory, and panics with libtorch's message, as a failing tch op does.

use anyhow::{Result, bail};
use tch::Tensor;
use torch_sys::C_tensor;

unsafe extern "C" {
    fn vq_train_foreach_zero(t: *const *mut C_tensor, n: i64) -> i32;
    fn vq_train_foreach_mul(t: *const *mut C_tensor, n: i64, factor: f64) -> i32;
    fn vq_train_global_norm(t: *const *mut C_tensor, n: i64, out: *mut f64) -> i32;
    fn vq_train_global_norm_tensor(t: *const *mut C_tensor, n: i64, out: *mut *mut C_tensor)
    -> i32;
    fn vq_train_foreach_mul_tensor(t: *const *mut C_tensor, n: i64, factor: *const C_tensor)
    -> i32;
    fn vq_train_fused_adamw(
        p: *const *mut C_tensor,
        g: *const *mut C_tensor,
        m: *const *mut C_tensor,
        v: *const *mut C_tensor,
        n: i64,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        skip: *const C_tensor,
    ) -> i32;
    fn vq_train_pin_memory(t: *const C_tensor, out: *mut *mut C_tensor) -> i32;
    fn vq_train_profile_start(cuda: i32) -> i32;
    fn vq_train_profile_stop(path: *const std::os::raw::c_char) -> i32;
    fn vq_train_ops_last_error() -> *const std::os::raw::c_char;
}

/// The message of the shim's last failure on this thread.
fn last_error() -> String {
    // SAFETY: a NUL-terminated string owned by the C++ side, copied at once.
    unsafe { std::ffi::CStr::from_ptr(vq_train_ops_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// The raw pointers of `ts` (the tensors outlive the call they are passed to).
fn pointers<T: std::borrow::Borrow<Tensor>>(ts: &[T]) -> Vec<*mut C_tensor> {
    ts.iter()
        .map(|t| t.borrow().as_ptr() as *mut C_tensor)
        .collect()
}

fn check(status: i32, what: &str) {
    if status != 0 {
        panic!("{what}: {}", last_error());
    }
}

/// `t_i ← 0` for every tensor, in one multi-tensor launch.
pub fn foreach_zero(ts: &[Tensor]) {
    let p = pointers(ts);
    // SAFETY: pointers to live tensors, borrowed for the call.
    check(
        unsafe { vq_train_foreach_zero(p.as_ptr(), p.len() as i64) },
        "zeroing the gradients",
    );
}

/// `t_i ← factor·t_i` for every tensor, in one multi-tensor launch.
pub fn foreach_mul(ts: &[Tensor], factor: f64) {
    let p = pointers(ts);
    // SAFETY: pointers to live tensors, borrowed for the call.
    check(
        unsafe { vq_train_foreach_mul(p.as_ptr(), p.len() as i64, factor) },
        "scaling the gradients",
    );
}

/// The global l2 norm `√(Σ_i ‖t_i‖²)` (f64, from the per-tensor norms of one `_foreach_norm`);
/// 0 for no tensors. Reads one number back to the host.
pub fn global_norm(ts: &[Tensor]) -> f64 {
    let p = pointers(ts);
    let mut norm = f64::NAN;
    // SAFETY: pointers to live tensors and a local f64, borrowed for the call.
    check(
        unsafe { vq_train_global_norm(p.as_ptr(), p.len() as i64, &mut norm) },
        "the gradient norm",
    );
    norm
}

/// `t_i ← factor·t_i` for every tensor, `factor` a 0-dim tensor on their device (read there,
/// so the host does not wait for it), in one multi-tensor launch.
pub fn foreach_mul_tensor(ts: &[Tensor], factor: &Tensor) {
    let p = pointers(ts);
    // SAFETY: pointers to live tensors, borrowed for the call.
    check(
        unsafe { vq_train_foreach_mul_tensor(p.as_ptr(), p.len() as i64, factor.as_ptr()) },
        "scaling the gradients",
    );
}

/// The global l2 norm of [`global_norm`] as a 0-dim f64 tensor on the tensors' device, without
/// a read back to the host.
pub fn global_norm_tensor(ts: &[Tensor]) -> Tensor {
    let p = pointers(ts);
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: pointers to live tensors, borrowed for the call; on success `out` is a new heap
    // tensor that we own.
    check(
        unsafe { vq_train_global_norm_tensor(p.as_ptr(), p.len() as i64, &mut out) },
        "the gradient norm",
    );
    // SAFETY: a valid, uniquely owned tensor pointer (checked above).
    unsafe { Tensor::from_ptr(out) }
}

/// The numbers of one AdamW update.
#[derive(Debug, Clone, Copy)]
pub struct Adam {
    /// The step being taken, counted from 1 (the bias correction's t).
    pub step: f64,
    /// Learning rate.
    pub lr: f64,
    /// (β₁, β₂).
    pub betas: (f64, f64),
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// ε.
    pub eps: f64,
}

/// One AdamW update of parameters `p` with gradients `g` and moments `m`, `v` (equal counts,
/// one device and dtype), in place, with ATen's fused kernel:
/// `p ← p(1 − lr·wd)`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
/// `p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`. With `skip` (a 0-dim f32 tensor on the
/// parameters' device) nothing changes where it holds 1 — decided on the device.
///
/// # Panics
/// Unequal counts, or libtorch's error (tensors of different devices or dtypes).
pub fn fused_adamw(
    p: &[&Tensor],
    g: &[&Tensor],
    m: &[&Tensor],
    v: &[&Tensor],
    a: Adam,
    skip: Option<&Tensor>,
) {
    assert!(
        g.len() == p.len() && m.len() == p.len() && v.len() == p.len(),
        "fused_adamw: unequal tensor counts"
    );
    let [p, g, m, v] = [p, g, m, v].map(pointers);
    // SAFETY: pointers to live tensors of equal count, borrowed for the call; the kernel updates
    // parameters and moments in place.
    let status = unsafe {
        vq_train_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            p.len() as i64,
            a.step,
            a.lr,
            a.betas.0,
            a.betas.1,
            a.weight_decay,
            a.eps,
            skip.map_or(std::ptr::null(), |t| t.as_ptr()),
        )
    };
    check(status, "the fused AdamW step");
}

/// A page-locked copy of the host tensor `t` (for asynchronous copies to a GPU).
///
/// # Errors
/// libtorch's message (no CUDA, or the memory cannot be locked).
pub fn pin_memory(t: &Tensor) -> Result<Tensor> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: a live tensor borrowed for the call; on success `out` is a new heap tensor that we
    // own, as tch owns the tensors its C API returns.
    let status = unsafe { vq_train_pin_memory(t.as_ptr(), &mut out) };
    if status != 0 || out.is_null() {
        bail!("pinning a host batch: {}", last_error());
    }
    // SAFETY: `out` is a valid, uniquely owned tensor pointer (see above).
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Starts libtorch's Kineto profiler (the one `torch.profiler` drives): host-side ops, and with
/// `cuda` the GPU's kernels and copies (through CUPTI).
///
/// # Errors
/// libtorch's message (e.g. a profiler already running).
pub fn profile_start(cuda: bool) -> Result<()> {
    // SAFETY: no arguments borrowed.
    if unsafe { vq_train_profile_start(i32::from(cuda)) } != 0 {
        bail!("starting the profiler: {}", last_error());
    }
    Ok(())
}

/// Stops the profiler and writes what it recorded as a Chrome trace (JSON) to `path`.
///
/// # Errors
/// No profiler running, or the file cannot be written (libtorch's message).
pub fn profile_stop(path: &std::path::Path) -> Result<()> {
    let c = std::ffi::CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| anyhow::anyhow!("a NUL byte in {}", path.display()))?;
    // SAFETY: a NUL-terminated string that outlives the call.
    if unsafe { vq_train_profile_stop(c.as_ptr()) } != 0 {
        bail!("writing the profile {}: {}", path.display(), last_error());
    }
    Ok(())
}
