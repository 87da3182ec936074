//! DiVeQ and SF-DiVeQ ([`Family::Diveq`], [`Family::SfDiveq`]; the formulas of
//! [`vq_core::diveq`]): the reparameterised error `‖c − z‖·sg(d)` as ATen ops, so the
//! gradient reaches the input and the codes; DiVeQ's dead-code replacement and SF-DiVeQ's
//! warm-up and initialisation from the data.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Reduction, Tensor, nn};
use vq_core::Metric;

use super::config::{CodeReplacement, Family, REPLACEMENT_SALT, VectorQuantizerConfig};
use super::nearest::learned_codebook;
use super::pass::{Batch, Rows, Settings, read_counter, scalar};
use crate::error::Result;
use crate::search::nearest_codes_checked;

/// Salt of the direction noise and the dithers (drawn from `seed ^ NOISE_SALT + forwards`).
const NOISE_SALT: u64 = 0x6e6f_6973_6564_6972;

/// The codes of a DiVeQ or SF-DiVeQ layer (learned by gradient) and their counters.
#[derive(Debug)]
pub(super) struct DiveqCodes {
    pub(super) codebook: Tensor,
    /// Training forwards done.
    forwards: Tensor,
    /// DiVeQ: uses of each code in the current replacement window.
    usage: Option<Tensor>,
}

impl DiveqCodes {
    /// The codebook (drawn as the config's init says), the forward counter and — for DiVeQ —
    /// the usage counts, under `path` (`diveq_forwards`, `diveq_usage`).
    pub(super) fn new(path: &nn::Path, config: &VectorQuantizerConfig) -> Self {
        let device = path.device();
        let codebook = learned_codebook(path, config);
        let forwards = path.add("diveq_forwards", scalar(0, device), false);
        let usage = matches!(config.family, Family::Diveq { .. }).then(|| {
            let zeros = Tensor::zeros([config.codebook_size as i64], (Kind::Int64, device));
            path.add("diveq_usage", zeros, false)
        });
        Self {
            codebook,
            forwards,
            usage,
        }
    }

    /// The codes a token decodes to: the codewords (DiVeQ) or the segments' midpoints
    /// (SF-DiVeQ, K − 1 of them), detached.
    pub(super) fn token_codes(&self, config: &VectorQuantizerConfig) -> Tensor {
        let c = self.codebook.detach();
        match config.family {
            Family::SfDiveq { .. } => midpoints(&c),
            _ => c,
        }
    }

    /// The rows' pass: nearest code (DiVeQ) or dithered point (SF-DiVeQ), the reparameterised
    /// value in training, the code itself in evaluation.
    pub(super) fn rows(&mut self, settings: Settings<'_>, batch: Batch<'_>) -> Result<Rows> {
        let config = settings.config;
        let forwards = read_counter(&self.forwards)?;
        if batch.train {
            let _ = tch::no_grad(|| self.forwards.g_add_scalar_(1));
        }
        let rows = match config.family {
            Family::Diveq { noise_std, .. } => {
                self.diveq_rows(settings, batch, noise_std, forwards)
            }
            Family::SfDiveq {
                noise_std,
                warmup_forwards,
            } => self.sf_rows(settings, batch, (noise_std, warmup_forwards), forwards),
            _ => unreachable!("the DiVeQ state exists for DiVeQ and SF-DiVeQ only"),
        }?;
        if let (Family::Diveq { replacement, .. }, true) = (config.family, batch.train) {
            self.count_and_replace(settings, &rows.idx, replacement, forwards + 1)?;
        }
        Ok(rows)
    }

    fn diveq_rows(
        &self,
        settings: Settings<'_>,
        batch: Batch<'_>,
        noise_std: f32,
        forwards: i64,
    ) -> Result<Rows> {
        let e = batch.e;
        let (idx, finite_verdict) = nearest_codes_checked(
            &e.detach(),
            &self.codebook.detach(),
            Metric::Euclidean,
            settings.finite_check,
        )?;
        let idx = idx.to_device(e.device());
        let q_live = self.codebook.index_select(0, &idx);
        let q = q_live.detach();
        let out = match batch.train {
            true => {
                let mut rng = noise_rng(settings.config.seed, forwards);
                let noise = host_normal(e.size(), noise_std, &mut rng, e.device());
                e + reparameterised(e, &q_live, noise.as_ref())
            }
            false => q.shallow_clone(),
        };
        Ok(finish(settings, e, out, q, idx, finite_verdict))
    }

    /// SF-DiVeQ: the warm-up passes the input through; then the codebook is set from the
    /// first batch after it, and each training forward draws dithers and noise.
    fn sf_rows(
        &mut self,
        settings: Settings<'_>,
        batch: Batch<'_>,
        (noise_std, warmup): (f32, u64),
        forwards: i64,
    ) -> Result<Rows> {
        let e = batch.e;
        let device = e.device();
        if batch.train && (forwards as u64) < warmup {
            let zero = || Tensor::zeros([], (Kind::Float, device));
            let n = e.size()[0];
            return Ok(Rows {
                out: e.shallow_clone(),
                codes: e.detach(),
                idx: Tensor::zeros([n], (Kind::Int64, device)),
                commitment_loss: zero(),
                codebook_loss: zero(),
                quantization_error: zero(),
                finite_verdict: None,
            });
        }
        if batch.train && warmup > 0 && forwards as u64 == warmup {
            self.init_from(settings, &e.detach())?;
        }
        let k = settings.config.codebook_size as i64;
        let c = self.codebook.detach();
        let mut rng = noise_rng(settings.config.seed, forwards);
        let dither = match batch.train {
            true => {
                let v: Vec<f32> = (0..k - 1).map(|_| rng.r#gen::<f32>()).collect();
                Tensor::from_slice(&v).to_device(device)
            }
            false => Tensor::full([k - 1], 0.5, (Kind::Float, device)),
        };
        let l = dither.view([-1, 1]);
        let points = c.narrow(0, 0, k - 1) * (1.0 - &l) + c.narrow(0, 1, k - 1) * &l;
        let (idx, finite_verdict) = nearest_codes_checked(
            &e.detach(),
            &points,
            Metric::Euclidean,
            settings.finite_check,
        )?;
        let idx = idx.to_device(device);
        let q = points.index_select(0, &idx);
        let out = match batch.train {
            true => {
                let lam = dither.index_select(0, &idx).view([-1, 1]);
                let first = self.codebook.index_select(0, &idx);
                let second = self.codebook.index_select(0, &(&idx + 1));
                let n1 = host_normal(e.size(), noise_std, &mut rng, device);
                let n2 = host_normal(e.size(), noise_std, &mut rng, device);
                e + reparameterised(e, &first, n1.as_ref()) * (1.0 - &lam)
                    + reparameterised(e, &second, n2.as_ref()) * &lam
            }
            false => q.shallow_clone(),
        };
        Ok(finish(settings, e, out, q, idx, finite_verdict))
    }

    /// The codebook from rows `e` (N, D): code `j` is the mean of rows `j·h … (j+1)·h − 1`,
    /// `h = ⌊N/K⌋` (the official initialisation); with fewer rows than codes, code `j` is row
    /// `j mod N`. In a group, rank 0's result is broadcast.
    fn init_from(&mut self, settings: Settings<'_>, e: &Tensor) -> Result<()> {
        let k = settings.config.codebook_size as i64;
        let n = e.size()[0];
        let init = match n / k {
            0 => {
                let idx = Tensor::arange(k, (Kind::Int64, e.device())).remainder(n.max(1));
                e.index_select(0, &idx)
            }
            h => e.narrow(0, 0, h * k).view([k, h, -1]).mean_dim(
                [1i64].as_slice(),
                false,
                Kind::Float,
            ),
        };
        let init = init.to_device(self.codebook.device()).contiguous();
        if let Some(g) = settings.group {
            let t = init.to_device(g.device());
            g.broadcast(&t, 0)?;
            tch::no_grad(|| self.codebook.copy_(&t.to_device(self.codebook.device())));
        } else {
            tch::no_grad(|| self.codebook.copy_(&init));
        }
        Ok(())
    }

    /// Counts this batch's codes; at the end of a window replaces the codes used less than
    /// `min_usage` per forward by copies of used ones (drawn in proportion to their use).
    fn count_and_replace(
        &mut self,
        settings: Settings<'_>,
        idx: &Tensor,
        replacement: CodeReplacement,
        forwards: i64,
    ) -> Result<()> {
        let usage = self.usage.as_mut().expect("DiVeQ counts its codes");
        let ones = Tensor::ones(idx.size(), (Kind::Int64, idx.device()));
        let _ = tch::no_grad(|| usage.index_add_(0, idx, &ones.to_device(usage.device())));
        if !(forwards as u64).is_multiple_of(replacement.every) {
            return Ok(());
        }
        let mut counts = usage.to_device(Device::Cpu).copy();
        if let Some(g) = settings.group {
            let t = counts.to_device(g.device());
            g.all_reduce_sum(&t)?;
            counts.copy_(&t.to_device(Device::Cpu));
        }
        let counts = Vec::<i64>::try_from(&counts)
            .map_err(|err| crate::error::VqTchError::Torch(err.to_string()))?;
        let _ = tch::no_grad(|| usage.zero_());
        let floor = f64::from(replacement.min_usage) * replacement.every as f64;
        let (unused, used): (Vec<usize>, Vec<usize>) =
            (0..counts.len()).partition(|&k| (counts[k] as f64) < floor);
        if unused.is_empty() || used.is_empty() {
            return Ok(());
        }
        let seed = settings.config.seed ^ REPLACEMENT_SALT;
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(forwards as u64));
        let weights: Vec<f64> = used.iter().map(|&k| counts[k] as f64).collect();
        let pick =
            rand_distr::WeightedIndex::new(&weights).expect("used codes have positive counts");
        let sources: Vec<i64> = unused
            .iter()
            .map(|_| used[rng.sample(&pick)] as i64)
            .collect();
        let device = self.codebook.device();
        let from = Tensor::from_slice(&sources).to_device(device);
        let to = Tensor::from_slice(&unused.iter().map(|&k| k as i64).collect::<Vec<_>>())
            .to_device(device);
        let copies = self.codebook.detach().index_select(0, &from);
        let _ = tch::no_grad(|| self.codebook.index_copy_(0, &to, &copies));
        Ok(())
    }
}

/// `‖c − z‖ · sg(d)` with `d = (c − z + ε)/‖c − z + ε‖` (0 for a zero vector), differentiable
/// in `z` and `c`: the norm is formed as `(c − z)·sg(u)`, whose value is `‖c − z‖` and whose
/// gradient is `u` (0 where the error is 0, with no division by it).
fn reparameterised(z: &Tensor, c: &Tensor, noise: Option<&Tensor>) -> Tensor {
    let err = c - z;
    let fixed = err.detach();
    let unit = |t: &Tensor| {
        let n = t.norm_scalaropt_dim(2, [1i64].as_slice(), true);
        t / n.clamp_min(vq_core::diveq::DIRECTION_FLOOR)
    };
    let u = unit(&fixed);
    let d = match noise {
        Some(n) => unit(&(&fixed + n)),
        None => u.shallow_clone(),
    };
    let norm = (err * u).sum_dim_intlist(1, true, Kind::Float);
    norm * d
}

/// The midpoints of the polyline's segments ((K − 1), D).
fn midpoints(c: &Tensor) -> Tensor {
    let k = c.size()[0];
    (c.narrow(0, 0, k - 1) + c.narrow(0, 1, k - 1)) * 0.5
}

/// The host generator of training forward `forwards`'s noise and dithers.
fn noise_rng(seed: u64, forwards: i64) -> StdRng {
    StdRng::seed_from_u64((seed ^ NOISE_SALT).wrapping_add(forwards as u64))
}

/// `N(0, std²)` of `shape` drawn on the host; `None` for std 0 (no noise).
fn host_normal(shape: Vec<i64>, std: f32, rng: &mut StdRng, device: Device) -> Option<Tensor> {
    if std == 0.0 {
        return None;
    }
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| std * rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect();
    Some(
        Tensor::from_slice(&v)
            .view(shape.as_slice())
            .to_device(device),
    )
}

/// The rows' losses: β on `mean((z − sg(q))²)`, no codebook loss; the quantization error
/// `mean((z − q)²)`.
fn finish(
    settings: Settings<'_>,
    e: &Tensor,
    out: Tensor,
    q: Tensor,
    idx: Tensor,
    finite_verdict: Option<crate::search::FiniteVerdict>,
) -> Rows {
    let mse = e.mse_loss(&q, Reduction::Mean);
    Rows {
        out,
        quantization_error: mse.detach(),
        commitment_loss: mse * f64::from(settings.config.beta),
        codebook_loss: Tensor::zeros([], (Kind::Float, e.device())),
        codes: q,
        idx,
        finite_verdict,
    }
}
