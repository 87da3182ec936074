//! The gradient estimators of [`vq_core::Estimator`] as one libtorch autograd node.
//!
//! The node is a C++ `torch::autograd::Function` (`csrc/vq_autograd.cpp`, compiled by this
//! crate's build script against the linked libtorch's headers): its forward returns `q`, its
//! backward maps `g = ∂L/∂q̃` to `∂L/∂e` and gives the codebook nothing. It saves only `e` and
//! `q`. For f32 CPU tensors the backward calls [`vq_core::Estimator::backward_into`] on the
//! tensors' memory (through a callback, [`cpu_backward`]); on CUDA it runs one fused kernel
//! (`csrc/vq_fused.cpp`, compiled for the device at first use with the NVRTC that libtorch ships:
//! one warp per row, f64 row geometry, vq-core's formulas and degenerate cases); elsewhere — and
//! on CUDA with [`DevicePath::Composed`] or where the kernel is unavailable
//! ([`fused_kernel_status`] says why) — the same formulas as ATen ops (f64 per-row geometry).
//! All paths are tested to agree with vq-core.

use std::ffi::CStr;
use std::os::raw::c_char;

use tch::{Kind, Tensor};
use torch_sys::C_tensor;
use vq_core::Estimator;

use crate::error::{Result, VqTchError};

unsafe extern "C" {
    fn vq_tch_estimator_apply(
        e: *mut C_tensor,
        q: *mut C_tensor,
        estimator: i64,
        cpu: Option<CpuBackward>,
        norm_eps: f64,
        direction_eps: f64,
        path: i64,
    ) -> *mut C_tensor;
    fn vq_tch_last_error() -> *const c_char;
    fn vq_tch_fused_unavailable(device: i64) -> *const c_char;
    fn vq_tch_fused_compiles_for(major: i64, minor: i64) -> *const c_char;
}

/// How the node computes its backward on CUDA tensors (CPU tensors take vq-core's kernel for
/// f32 and the ATen composition otherwise, whatever this says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DevicePath {
    /// One fused kernel per backward (where it is unavailable, the composition; see
    /// [`fused_kernel_status`]).
    #[default]
    Fused,
    /// The formulas as a composition of ATen ops (about 30 kernels).
    Composed,
}

impl DevicePath {
    fn code(self) -> i64 {
        match self {
            DevicePath::Fused => 0,
            DevicePath::Composed => 1,
        }
    }
}

/// Whether the fused backward kernel runs on `device`: `Ok(())` on a CUDA device where it is
/// compiled and loaded (the first call compiles it), else the reason (`device` is not CUDA, no
/// NVRTC library, an architecture NVRTC does not know, ...), in which case the node takes the
/// ATen composition there.
///
/// # Errors
/// The reason, as text.
pub fn fused_kernel_status(device: tch::Device) -> std::result::Result<(), String> {
    let tch::Device::Cuda(index) = device else {
        return Err(format!("{device:?} is not a CUDA device"));
    };
    // SAFETY: a plain integer in, a NUL-terminated string owned by the C++ side out.
    unsafe { reason(vq_tch_fused_unavailable(index as i64)) }
}

/// `Ok(())` for the empty string the shim returns on success, else the reason it holds.
///
/// # Safety
/// `why` points to a NUL-terminated string that stays valid for the call (it is copied).
unsafe fn reason(why: *const c_char) -> std::result::Result<(), String> {
    // SAFETY: guaranteed by the caller.
    let why = unsafe { CStr::from_ptr(why) }
        .to_string_lossy()
        .into_owned();
    if why.is_empty() { Ok(()) } else { Err(why) }
}

/// Signature of the CPU backward callback handed to the C++ node (the last two arguments: a
/// buffer for the error message and its capacity).
type CpuBackward = unsafe extern "C" fn(
    *const f32,
    *const f32,
    *const f32,
    *mut f32,
    i64,
    i64,
    i64,
    *mut c_char,
    i64,
) -> i32;

/// The CPU backward of the node: `out = ∂L/∂e` for contiguous f32 arrays of `n·d` elements,
/// computed by [`vq_core::Estimator::backward_into`]. Returns 0 on success, 1 for an unknown
/// estimator code or bad sizes, 2 if vq-core panicked (a panic must not cross into C++), 3 for
/// an error of vq-core (a non-finite input, a result beyond f32's range), whose message is
/// written NUL-terminated into `msg` (truncated to `cap` bytes).
///
/// # Safety
/// `e`, `q`, `g` must point to `n·d` readable f32 and `out` to `n·d` writable f32 that do not
/// overlap the inputs, `msg` to `cap` writable bytes (or be null), all valid for the duration
/// of the call.
unsafe extern "C" fn cpu_backward(
    e: *const f32,
    q: *const f32,
    g: *const f32,
    out: *mut f32,
    n: i64,
    d: i64,
    est: i64,
    msg: *mut c_char,
    cap: i64,
) -> i32 {
    let (Ok(n), Ok(d)) = (usize::try_from(n), usize::try_from(d)) else {
        return 1;
    };
    let Some(&(estimator, _)) = CODES.iter().find(|&&(_, c)| c == est) else {
        return 1;
    };
    if n == 0 || d == 0 {
        return 0;
    }
    let run = || {
        // SAFETY: guaranteed by the caller (the C++ node passes the data of contiguous f32
        // tensors of shape (n, d) and a fresh output tensor of the same shape).
        let (e, q, g, out) = unsafe {
            (
                ndarray::ArrayView2::from_shape_ptr((n, d), e),
                ndarray::ArrayView2::from_shape_ptr((n, d), q),
                ndarray::ArrayView2::from_shape_ptr((n, d), g),
                ndarray::ArrayViewMut2::from_shape_ptr((n, d), out),
            )
        };
        estimator.backward_into(e, q, g, out)
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(())) => 0,
        Ok(Err(err)) => {
            let text = err.to_string();
            if let Ok(cap) = usize::try_from(cap)
                && cap > 0
                && !msg.is_null()
            {
                let len = text.len().min(cap - 1);
                // SAFETY: `msg` holds `cap` writable bytes (the caller's contract).
                unsafe {
                    std::ptr::copy_nonoverlapping(text.as_ptr(), msg.cast::<u8>(), len);
                    *msg.add(len) = 0;
                }
            }
            3
        }
        Err(_) => 2,
    }
}

include!(concat!(env!("OUT_DIR"), "/estimator_codes.rs"));

/// `q̃`: the value `q` with the estimator's gradient to `e` (both (N, D), same device and
/// floating dtype). `q` is treated as a constant: no gradient reaches it through this node.
///
/// ```
/// use tch::{Kind, Tensor};
/// use vq_core::Estimator;
///
/// let e = Tensor::from_slice(&[1.0f32, 0.0]).view([1, 2]).set_requires_grad(true);
/// let q = Tensor::from_slice(&[0.0f32, 2.0]).view([1, 2]);
/// let y = vq_tch::apply_estimator(&e, &q, Estimator::Rotation).unwrap();
/// assert_eq!(Vec::<f32>::try_from(y.view([-1])).unwrap(), vec![0.0, 2.0]);
/// (&y * Tensor::from_slice(&[0.0f32, 1.0]).view([1, 2])).sum(Kind::Float).backward();
/// // The gradient along q reaches e along e, scaled by ‖q‖/‖e‖ = 2.
/// let g = Vec::<f32>::try_from(e.grad().view([-1])).unwrap();
/// assert!((g[0] - 2.0).abs() < 1e-6 && g[1].abs() < 1e-6);
/// ```
///
/// # Errors
/// [`VqTchError::Shape`] unless both are 2-D of equal shape, [`VqTchError::Kind`] for
/// non-floating tensors, [`VqTchError::Device`] if they live on different devices,
/// [`VqTchError::Torch`] for an error raised inside libtorch.
pub fn apply_estimator(e: &Tensor, q: &Tensor, estimator: Estimator) -> Result<Tensor> {
    apply_estimator_with(e, q, estimator, DevicePath::Fused)
}

/// Compiles the fused backward kernel (f32 and f64) for CUDA compute capability `major.minor`
/// with the NVRTC of the linked libtorch, without a GPU: `Ok(())`, or why it failed (no NVRTC,
/// an architecture it does not know, a compile error with NVRTC's log).
///
/// # Errors
/// The reason, as text.
pub fn fused_kernel_compiles_for(major: u32, minor: u32) -> std::result::Result<(), String> {
    // SAFETY: plain integers in, a NUL-terminated string owned by the C++ side out.
    unsafe {
        reason(vq_tch_fused_compiles_for(
            i64::from(major),
            i64::from(minor),
        ))
    }
}

/// [`apply_estimator`] with the backward's path on CUDA chosen (the fused kernel, or the ATen
/// composition: for comparisons and benchmarks).
///
/// # Errors
/// As [`apply_estimator`].
pub fn apply_estimator_with(
    e: &Tensor,
    q: &Tensor,
    estimator: Estimator,
    path: DevicePath,
) -> Result<Tensor> {
    if e.dim() != 2 || e.size() != q.size() {
        return Err(VqTchError::Shape {
            what: "e and q must both be (N, D) of one shape",
            e: e.size(),
            q: q.size(),
        });
    }
    for t in [e, q] {
        if !matches!(
            t.kind(),
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        ) {
            return Err(VqTchError::Kind(t.kind()));
        }
    }
    if e.device() != q.device() {
        return Err(VqTchError::Device {
            e: e.device(),
            q: q.device(),
        });
    }
    // SAFETY: both pointers come from live tensors borrowed for the call; the C++ side only
    // reads them and returns either null or a new heap tensor that we take ownership of, as tch
    // does with the tensors its own C API returns.
    unsafe {
        let out = vq_tch_estimator_apply(
            e.as_ptr() as *mut C_tensor,
            q.as_ptr() as *mut C_tensor,
            code(estimator),
            Some(cpu_backward as CpuBackward),
            vq_core::NORM_EPS,
            vq_core::DIRECTION_EPS,
            path.code(),
        );
        if out.is_null() {
            let msg = CStr::from_ptr(vq_tch_last_error())
                .to_string_lossy()
                .into_owned();
            return Err(VqTchError::Torch(msg));
        }
        Ok(Tensor::from_ptr(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `code` is an exhaustive match generated from `csrc/vq_estimator.h`, so `CODES` holds
    /// every variant once; `Estimator::ALL` (which every test of every path iterates) must hold
    /// the same ones, and the codes must be distinct.
    #[test]
    fn every_estimator_has_one_code_and_all_lists_every_estimator() {
        assert_eq!(Estimator::ALL.len(), CODES.len(), "{CODES:?}");
        for (i, (est, c)) in CODES.iter().enumerate() {
            assert_eq!(code(*est), *c);
            assert!(
                Estimator::ALL.contains(est),
                "{est:?} is missing from Estimator::ALL"
            );
            assert!(
                CODES[..i].iter().all(|(e, k)| e != est && k != c),
                "{est:?} / code {c} listed twice"
            );
        }
    }
}
