//! Mixed precision: the arithmetic a network runs in, and autocast regions as `torch.autocast`
//! opens them (`csrc/vq_autocast.cpp`).
//!
//! Inside an [`Autocast`] region of [`Precision::Bf16`] or [`Precision::F16`], libtorch runs the
//! ops of its lower-precision list (convolutions, matrix products, attention) in that dtype on
//! casts of their f32 inputs, and keeps the precision-sensitive ones (norms, softmax, losses,
//! reductions) in f32; parameters stay f32 (the master weights) and gradients reach them in f32.
//! [`VectorQuantizer::forward`](crate::VectorQuantizer::forward) closes any region around itself:
//! the search, the estimator, the EMA statistics and the quantizer's losses always run in f32, as
//! the paper's code disables autocast around its lookup.

use std::marker::PhantomData;
use std::str::FromStr;

use tch::{Device, Kind, Tensor};

use crate::error::{Result, VqTchError};

unsafe extern "C" {
    fn vq_tch_autocast_available(device_type: i32) -> i32;
    fn vq_tch_autocast_enter(
        device_type: i32,
        enabled: i32,
        dtype: i32,
        prev_enabled: *mut i32,
        prev_dtype: *mut i32,
    );
    fn vq_tch_autocast_exit(device_type: i32, prev_enabled: i32, prev_dtype: i32);
}

/// The arithmetic of the networks around the quantizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Precision {
    /// Everything in float32.
    #[default]
    F32,
    /// Autocast to bfloat16 (f32's exponent range: no loss scaling needed). The paper's setting.
    Bf16,
    /// Autocast to float16 (a 5-bit exponent: trained with a dynamic loss scale).
    F16,
}

impl Precision {
    /// Every precision.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Bf16, Precision::F16];

    /// The name on the command line and in configurations.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    /// The lower-precision dtype autocast casts to (`None` for f32).
    pub fn autocast_kind(self) -> Option<Kind> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(Kind::BFloat16),
            Precision::F16 => Some(Kind::Half),
        }
    }

    /// Whether training needs a dynamic loss scale (f16's gradients underflow without one).
    pub fn needs_loss_scaling(self) -> bool {
        self == Precision::F16
    }

    /// Checks that libtorch can autocast to this precision on `device`: opens a region and
    /// verifies that a matrix product comes out in the lower dtype.
    ///
    /// ```
    /// use vq_tch::Precision;
    /// Precision::Bf16.check_available(tch::Device::Cpu).unwrap();
    /// ```
    ///
    /// # Errors
    /// [`VqTchError::Precision`] naming the device and the precision.
    pub fn check_available(self, device: Device) -> Result<()> {
        let Some(kind) = self.autocast_kind() else {
            return Ok(());
        };
        let unsupported = |why: String| VqTchError::Precision {
            precision: self.name(),
            device,
            why,
        };
        let code = device_type(device).map_err(|_| unsupported("no autocast for it".into()))?;
        // SAFETY: a plain query of libtorch's registry.
        if unsafe { vq_tch_autocast_available(code) } == 0 {
            return Err(unsupported(
                "libtorch has no autocast for this device".into(),
            ));
        }
        let probe = autocast(device, self, || -> Result<Kind> {
            let a = Tensor::f_ones([2, 2], (Kind::Float, device))
                .map_err(|e| VqTchError::Torch(e.to_string()))?;
            let p = a
                .f_matmul(&a)
                .map_err(|e| VqTchError::Torch(e.to_string()))?;
            Ok(p.kind())
        })?;
        match probe? {
            k if k == kind => Ok(()),
            k => Err(unsupported(format!(
                "a matrix product under autocast came out as {k:?}, not {kind:?}"
            ))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = VqTchError;

    /// `f32`, `bf16` or `f16`.
    fn from_str(s: &str) -> Result<Self> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| VqTchError::UnknownPrecision(s.to_owned()))
    }
}

fn device_type(device: Device) -> Result<i32> {
    match device {
        Device::Cpu => Ok(0),
        Device::Cuda(_) => Ok(1),
        other => Err(VqTchError::Precision {
            precision: "autocast",
            device: other,
            why: "only CPU and CUDA are supported".into(),
        }),
    }
}

/// An open autocast region for one device type, closed (and the previous state restored) when
/// dropped. Regions nest; they belong to the thread that opened them.
#[derive(Debug)]
pub struct Autocast {
    device_type: i32,
    prev_enabled: i32,
    prev_dtype: i32,
    /// Autocast state is thread-local in libtorch.
    _not_send: PhantomData<*const ()>,
}

impl Autocast {
    /// Opens a region of `precision` on `device`'s type; [`Precision::F32`] opens one with
    /// autocast off (full precision inside, whatever encloses it).
    ///
    /// # Errors
    /// A device type other than CPU or CUDA.
    pub fn enter(device: Device, precision: Precision) -> Result<Self> {
        let device_type = device_type(device)?;
        let (enabled, dtype) = match precision.autocast_kind() {
            Some(Kind::BFloat16) => (1, 15),
            Some(_) => (1, 5),
            None => (0, 0),
        };
        let (mut prev_enabled, mut prev_dtype) = (0, 0);
        // SAFETY: sets libtorch's thread-local autocast flags; the outputs are valid locals.
        unsafe {
            vq_tch_autocast_enter(
                device_type,
                enabled,
                dtype,
                &mut prev_enabled,
                &mut prev_dtype,
            )
        };
        Ok(Self {
            device_type,
            prev_enabled,
            prev_dtype,
            _not_send: PhantomData,
        })
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        // SAFETY: restores the state `enter` saved on this thread.
        unsafe { vq_tch_autocast_exit(self.device_type, self.prev_enabled, self.prev_dtype) };
    }
}

/// Runs `f` inside an autocast region of `precision` on `device`.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use vq_tch::{Precision, autocast};
/// let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
/// let p = autocast(Device::Cpu, Precision::Bf16, || a.matmul(&a)).unwrap();
/// assert_eq!(p.kind(), Kind::BFloat16);
/// assert_eq!(a.matmul(&a).kind(), Kind::Float);
/// ```
///
/// # Errors
/// A device type other than CPU or CUDA.
pub fn autocast<T>(device: Device, precision: Precision, f: impl FnOnce() -> T) -> Result<T> {
    let _region = Autocast::enter(device, precision)?;
    Ok(f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_nest_and_restore() {
        let a = Tensor::ones([3, 3], (Kind::Float, Device::Cpu));
        let outer = Autocast::enter(Device::Cpu, Precision::Bf16).unwrap();
        assert_eq!(a.matmul(&a).kind(), Kind::BFloat16);
        {
            let _inner = Autocast::enter(Device::Cpu, Precision::F32).unwrap();
            assert_eq!(a.matmul(&a).kind(), Kind::Float);
        }
        assert_eq!(a.matmul(&a).kind(), Kind::BFloat16);
        drop(outer);
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
    }

    #[test]
    fn names_round_trip_and_bad_names_are_refused() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
        }
        let e = "fp8".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("fp8") && e.contains("bf16"), "{e}");
    }

    #[test]
    fn cpu_autocast_is_available_for_bf16() {
        Precision::Bf16.check_available(Device::Cpu).unwrap();
        Precision::F32.check_available(Device::Cpu).unwrap();
    }
}
