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
use tch::{Device, Kind, Tensor};

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

/// The numbers of one step, on the device until read: one f64 row
/// `[loss, rec, commitment, qe, g_loss, d_weight, d_loss, grad_norm, d_grad_norm,
///   counts (K)…, finite-check verdicts (4 per micro-batch)…]`.
#[derive(Debug)]
pub(crate) struct StepRow(pub Tensor);

/// A step's numbers read back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StepValues {
    /// loss, rec, commitment, quantization error (means over the micro-batches).
    pub sums: [f64; 4],
    /// d_loss, g_loss, d_weight.
    pub adv: [f64; 3],
    pub grad_norm: f64,
    pub d_grad_norm: f64,
    pub counts: Vec<u64>,
    /// The quantizer's finite-check verdicts (4 values each), if deferred.
    pub verdicts: Vec<[i64; 4]>,
}

/// Leading values of a row before the code counts.
const HEAD: usize = 9;

impl StepRow {
    /// The row from its parts (f64 scalars and the K code counts, on one device).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        parts: &Tensor,
        g_loss: &Tensor,
        d_weight: &Tensor,
        d_loss: &Tensor,
        grad_norm: &Tensor,
        d_grad_norm: &Tensor,
        counts: &Tensor,
        verdicts: &[Tensor],
    ) -> Self {
        let device = parts.device();
        let f = |t: &Tensor| {
            t.detach()
                .to_kind(Kind::Double)
                .to_device(device)
                .reshape([-1])
        };
        let mut all = vec![
            f(parts),
            f(g_loss),
            f(d_weight),
            f(d_loss),
            f(grad_norm),
            f(d_grad_norm),
            f(counts),
        ];
        all.extend(verdicts.iter().map(f));
        Self(Tensor::cat(&all, 0))
    }

    /// Reads `rows` (of equal length, `k` code counts each) back in one copy.
    ///
    /// # Errors
    /// Rows of different lengths or a failed copy.
    pub fn read(rows: &[StepRow], k: usize) -> Result<Vec<StepValues>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let stacked = Tensor::f_stack(&rows.iter().map(|r| &r.0).collect::<Vec<_>>(), 0)
            .map_err(|e| anyhow::anyhow!("collecting the steps' numbers: {e}"))?;
        let len = stacked.size()[1] as usize;
        let flat = Vec::<f64>::try_from(stacked.reshape([-1]).to_device(Device::Cpu))
            .map_err(|e| anyhow::anyhow!("reading the steps' numbers: {e}"))?;
        let extra = len.checked_sub(HEAD + k).filter(|e| e % 4 == 0);
        let Some(extra) = extra else {
            bail!("a step's numbers hold {len} values, expected {HEAD} + {k} codes + 4 per check");
        };
        Ok(flat
            .chunks(len)
            .map(|r| StepValues {
                sums: [r[0], r[1], r[2], r[3]],
                adv: [r[6], r[4], r[5]],
                grad_norm: r[7],
                d_grad_norm: r[8],
                counts: r[HEAD..HEAD + k].iter().map(|&c| c as u64).collect(),
                verdicts: r[HEAD + k..]
                    .chunks(4)
                    .take(extra / 4)
                    .map(|v| [v[0] as i64, v[1] as i64, v[2] as i64, v[3] as i64])
                    .collect(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_through_one_read() {
        let s = |v: f64| Tensor::from(v);
        let parts = Tensor::from_slice(&[1.5f32, 0.5, 0.25, 0.125]).to_kind(Kind::Double);
        let counts = Tensor::from_slice(&[3i64, 0, 5]);
        let verdict = Tensor::from_slice(&[1i64, 0, 7, 0]);
        let row = |x: f64| {
            StepRow::new(
                &(&parts * x),
                &s(2.0),
                &s(3.0),
                &s(4.0),
                &s(f64::NAN),
                &s(6.0),
                &counts,
                std::slice::from_ref(&verdict),
            )
        };
        let got = StepRow::read(&[row(1.0), row(2.0)], 3).unwrap();
        assert_eq!(got[1].sums, [3.0, 1.0, 0.5, 0.25]);
        assert_eq!(got[0].adv, [4.0, 2.0, 3.0]);
        assert!(got[0].grad_norm.is_nan());
        assert_eq!(got[0].d_grad_norm, 6.0);
        assert_eq!(got[0].counts, [3, 0, 5]);
        assert_eq!(got[0].verdicts, [[1, 0, 7, 0]]);
        assert!(StepRow::read(&[row(1.0)], 4).is_err());
        assert!(StepRow::read(&[], 4).unwrap().is_empty());
    }

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
