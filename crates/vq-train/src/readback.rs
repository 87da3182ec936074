//! When the training loop reads a step's numbers (losses, code counts, gradient norms, the
//! quantizer's finite check) back from the device.
//!
//! On a GPU every read makes the host wait until the device has finished all queued work; the
//! device then idles while the host launches the next step's first kernels. A step that reads
//! its numbers after each micro-batch and its gradient norm before the update waits several
//! times per step. [`Readback::Window`] keeps them on the device and reads the steps of a
//! logging window at once; what the loop must decide before an update (no update from a
//! non-finite loss, gradient or encoder output) is decided on the device instead: a flag that,
//! once set, makes every later update a no-op (the fused AdamW kernel's `found_inf`), and the
//! run stops with the same error when the window is read — always before a checkpoint is
//! written, so checkpoints never hold such an update.

use std::str::FromStr;

use anyhow::{Result, bail};
use tch::Device;

/// When a step's numbers come back to the host (`--readback`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Readback {
    /// [`Window`](Self::Window) on CUDA for one process without loss scaling, else
    /// [`Step`](Self::Step).
    #[default]
    Auto,
    /// After every step (on the CPU this costs nothing: there is no device to wait for).
    Step,
    /// At the end of every logging window (`--log-every`), before every checkpoint and at the
    /// end. Not with f16 loss scaling (the scale is updated on the host from each step's
    /// gradient norm) nor with several processes (the ranks' flags would have to meet first).
    Window,
}

impl FromStr for Readback {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "step" => Self::Step,
            "window" => Self::Window,
            _ => bail!("unknown readback {s:?} (expected auto, step or window)"),
        })
    }
}

impl Readback {
    /// [`Step`](Self::Step) or [`Window`](Self::Window) for a run on `device` with `world`
    /// processes, with or without loss scaling.
    ///
    /// ```
    /// use tch::Device;
    /// use vq_train::readback::Readback;
    /// assert_eq!(Readback::Auto.resolve(Device::Cuda(0), 1, false).unwrap(), Readback::Window);
    /// assert_eq!(Readback::Auto.resolve(Device::Cpu, 1, false).unwrap(), Readback::Step);
    /// assert!(Readback::Window.resolve(Device::Cuda(0), 1, true).is_err());
    /// ```
    ///
    /// # Errors
    /// [`Window`](Self::Window) asked for with loss scaling or several processes.
    pub fn resolve(self, device: Device, world: usize, loss_scaling: bool) -> Result<Self> {
        let possible = world == 1 && !loss_scaling;
        Ok(match self {
            Self::Auto if possible && device.is_cuda() => Self::Window,
            Self::Auto | Self::Step => Self::Step,
            Self::Window if possible => Self::Window,
            Self::Window => bail!(
                "--readback window needs one process and no f16 loss scaling (this run: {world} \
                 process(es){}); use --readback step",
                if loss_scaling { ", f16" } else { "" }
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readback_parses_and_resolves() {
        assert_eq!("window".parse::<Readback>().unwrap(), Readback::Window);
        assert!("sometimes".parse::<Readback>().is_err());
        assert_eq!(
            Readback::Auto.resolve(Device::Cuda(0), 2, false).unwrap(),
            Readback::Step
        );
        assert_eq!(
            Readback::Window.resolve(Device::Cpu, 1, false).unwrap(),
            Readback::Window
        );
        let err = Readback::Window.resolve(Device::Cpu, 2, false).unwrap_err();
        assert!(err.to_string().contains("2 process"), "{err}");
    }
}
