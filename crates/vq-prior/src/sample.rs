//! Sampling code grids from a prior: temperature, top-k, top-p and classifier-free guidance on
//! the logits (LlamaGen's `generate.py` order: temperature, then the filters, then softmax),
//! raster order with a key/value cache for the autoregressive prior, MaskGIT's iterative
//! parallel decoding for the masked one.
//!
//! Reproducible by construction: sample `i` draws its randomness from
//! `StdRng::seed_from_u64(seed + i)` on the host, so a sample is the same whatever the batch it
//! is drawn in.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::config::PriorKind;
use crate::error::{PriorError, Result};
use crate::model::Prior;
use crate::objective::cosine_mask_fraction;

/// How codes are drawn from the logits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    /// Logits are divided by it (> 0; 1 leaves them).
    pub temperature: f64,
    /// Keep the k most likely codes (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely codes whose probability reaches p (1: all).
    pub top_p: f64,
    /// Classifier-free guidance: `uncond + (cond − uncond)·scale` (1: the conditional logits,
    /// computed without the unconditional pass).
    pub cfg_scale: f64,
    /// MaskGIT's decoding iterations (masked prior).
    pub iterations: usize,
    /// MaskGIT's choice temperature, annealed as `t·(1 − ratio)` (masked prior; MaskGIT 4.5).
    pub choice_temperature: f64,
}

impl Default for Sampling {
    /// LlamaGen's and MaskGIT's defaults: temperature 1, no filter, no guidance, 12 iterations,
    /// choice temperature 4.5.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            cfg_scale: 1.0,
            iterations: 12,
            choice_temperature: 4.5,
        }
    }
}

impl Sampling {
    /// Checks every setting.
    ///
    /// # Errors
    /// [`PriorError::Sampling`] naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, why| Err(PriorError::Sampling { field, why });
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad("temperature", "must be finite and > 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if !(self.cfg_scale.is_finite() && self.cfg_scale >= 0.0) {
            return bad("cfg_scale", "must be finite and >= 0");
        }
        if self.iterations == 0 {
            return bad("iterations", "must be at least 1");
        }
        if !(self.choice_temperature.is_finite() && self.choice_temperature >= 0.0) {
            return bad("choice_temperature", "must be finite and >= 0");
        }
        Ok(())
    }

    /// `logits` (B, K) divided by the temperature, with the codes outside top-k and top-p set
    /// to −∞ (the most likely code always stays).
    pub fn filter(&self, logits: &Tensor) -> Tensor {
        let mut l = logits / self.temperature;
        let k = l.size()[1];
        if self.top_k > 0 && (self.top_k as i64) < k {
            let (top, _) = l.topk(self.top_k as i64, -1, true, true);
            let kth = top.narrow(1, self.top_k as i64 - 1, 1);
            l = l.masked_fill(&l.lt_tensor(&kth), f64::NEG_INFINITY);
        }
        if self.top_p < 1.0 {
            let (sorted, order) = l.sort(-1, true);
            let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
            // Drop a code when the codes before it already reach p.
            let before = &cum - sorted.softmax(-1, Kind::Float);
            let drop_sorted = before.ge(self.top_p);
            let drop = drop_sorted.scatter(-1, &order, &drop_sorted);
            l = l.masked_fill(&drop, f64::NEG_INFINITY);
        }
        l
    }
}

/// Draws one code per row of `probs` (B, K) by inverse CDF from `uniforms` (B) in (0, 1]: a
/// code of probability 0 is never drawn.
fn draw(probs: &Tensor, uniforms: &[f64]) -> Tensor {
    let cum = probs.to_kind(Kind::Double).cumsum(-1, Kind::Double);
    let k = cum.size()[1];
    let total = cum.narrow(1, k - 1, 1);
    let u = Tensor::from_slice(uniforms)
        .to_device(probs.device())
        .view([-1, 1])
        * &total;
    cum.lt_tensor(&u)
        .sum_dim_intlist(-1, false, Kind::Int64)
        .clamp_max(k - 1)
}

/// One uniform in (0, 1] per generator.
fn uniforms(rngs: &mut [StdRng]) -> Vec<f64> {
    rngs.iter_mut().map(|r| 1.0 - r.r#gen::<f64>()).collect()
}

/// Whether the key/value cache is used (the uncached path recomputes the whole prefix at every
/// position; it exists as the reference the cached one is tested against).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    /// One position per step through [`crate::KvCache`].
    Kv,
    /// The whole prefix per step.
    Recompute,
}

impl Prior {
    /// Samples `labels.len()` grids (or `count` unconditional ones) as codes (N, h, w) i64; grid
    /// `i` draws from `StdRng::seed_from_u64(seed + i)`.
    ///
    /// # Errors
    /// [`PriorError::Sampling`] for bad settings or guidance without a "no class" row; labels
    /// out of range.
    pub fn sample(
        &self,
        labels: Option<&[i64]>,
        count: usize,
        seed: u64,
        sampling: &Sampling,
        cache: Cache,
    ) -> Result<Tensor> {
        sampling.validate()?;
        let n = labels.map_or(count, <[i64]>::len);
        let dev = self.device();
        let labels = labels.map(|y| Tensor::from_slice(y).to_device(dev));
        let dummy = Tensor::zeros(
            [n as i64, self.config().tokens() as i64],
            (Kind::Int64, dev),
        );
        let _ = self.check_input(&dummy, labels.as_ref())?;
        let guided = sampling.cfg_scale != 1.0;
        if guided && self.null_class().is_none() {
            return Err(PriorError::Sampling {
                field: "cfg_scale",
                why: "guidance needs a class-conditional prior trained with label dropout",
            });
        }
        let mut rngs: Vec<StdRng> = (0..n as u64)
            .map(|i| StdRng::seed_from_u64(seed.wrapping_add(i)))
            .collect();
        let codes = tch::no_grad(|| match self.config().kind {
            PriorKind::Autoregressive => {
                self.sample_raster(labels.as_ref(), n as i64, sampling, cache, &mut rngs)
            }
            PriorKind::Masked => self.sample_masked(labels.as_ref(), n as i64, sampling, &mut rngs),
        });
        let c = self.config();
        Ok(codes.view([n as i64, c.grid_h as i64, c.grid_w as i64]))
    }

    /// The logits (B, K), f32, of the code after `prefix` (B, i) with i < h·w, recomputed from
    /// the whole prefix (no cache, no guidance); `labels` may hold the "no class" index.
    ///
    /// # Errors
    /// [`PriorError::Input`] for a prefix as long as the grid or a masked prior.
    pub fn next_logits(&self, prefix: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        let (b, i) = (prefix.size()[0], prefix.size()[1]);
        if self.config().kind != PriorKind::Autoregressive || i >= self.config().tokens() as i64 {
            return Err(PriorError::Input {
                what: "prefix",
                expected: format!(
                    "(B, i) with i < {} of an autoregressive prior",
                    self.config().tokens()
                ),
                got: prefix.size(),
            });
        }
        let prefix = prefix.to_kind(Kind::Int64).to_device(self.device());
        let x = Tensor::cat(&[self.condition(labels, b), self.embed(&prefix)], 1);
        Ok(tch::no_grad(|| self.run(x, 0, false, None).select(1, i)))
    }

    /// Classifier-free guided logits (B, K) of the code after `prefix` for `labels`: the
    /// conditional and "no class" logits from one doubled batch, `uncond + (cond − uncond)·scale`.
    ///
    /// # Errors
    /// As [`next_logits`](Self::next_logits); [`PriorError::Sampling`] without a "no class" row.
    pub fn guided_logits(&self, prefix: &Tensor, labels: &Tensor, scale: f64) -> Result<Tensor> {
        let Some(null) = self.null_class() else {
            return Err(PriorError::Sampling {
                field: "cfg_scale",
                why: "guidance needs a class-conditional prior trained with label dropout",
            });
        };
        let n = prefix.size()[0];
        let y = Tensor::cat(&[labels, &labels.full_like(null)], 0);
        let logits = self.next_logits(&prefix.repeat([2, 1]), Some(&y))?;
        let sampling = Sampling {
            cfg_scale: scale,
            ..Sampling::default()
        };
        Ok(Self::guide(logits, n, &sampling, true))
    }

    /// The conditions of a (possibly guided) batch: the labels, then the "no class" labels.
    fn guided_labels(&self, labels: Option<&Tensor>, guided: bool) -> Option<Tensor> {
        let y = labels?;
        match (guided, self.null_class()) {
            (true, Some(null)) => Some(Tensor::cat(&[y, &y.full_like(null)], 0)),
            _ => Some(y.shallow_clone()),
        }
    }

    /// Guided logits from a doubled batch's (2B, K) logits, or the logits themselves.
    fn guide(logits: Tensor, n: i64, sampling: &Sampling, guided: bool) -> Tensor {
        if !guided {
            return logits;
        }
        let (cond, uncond) = (logits.narrow(0, 0, n), logits.narrow(0, n, n));
        &uncond + (cond - &uncond) * sampling.cfg_scale
    }

    fn sample_raster(
        &self,
        labels: Option<&Tensor>,
        n: i64,
        sampling: &Sampling,
        cache: Cache,
        rngs: &mut [StdRng],
    ) -> Tensor {
        let guided = sampling.cfg_scale != 1.0;
        let rows = if guided { 2 * n } else { n };
        let y = self.guided_labels(labels, guided);
        let l = self.config().tokens() as i64;
        let mut kv = (cache == Cache::Kv).then(|| self.cache(rows));
        let cond = self.condition(y.as_ref(), rows);
        let mut codes: Vec<Tensor> = Vec::with_capacity(l as usize);
        for i in 0..l {
            let logits = match &mut kv {
                Some(kv) => {
                    let x = match i {
                        0 => cond.shallow_clone(),
                        _ => self.embed(&codes[i as usize - 1].repeat([1 + i64::from(guided), 1])),
                    };
                    self.run(x, i, false, Some(kv)).squeeze_dim(1)
                }
                None => {
                    let mut parts = vec![cond.shallow_clone()];
                    if i > 0 {
                        let prefix = Tensor::cat(&codes, 1).repeat([1 + i64::from(guided), 1]);
                        parts.push(self.embed(&prefix));
                    }
                    self.run(Tensor::cat(&parts, 1), 0, false, None)
                        .select(1, i)
                }
            };
            let logits = Self::guide(logits, n, sampling, guided);
            let probs = sampling.filter(&logits).softmax(-1, Kind::Float);
            codes.push(draw(&probs, &uniforms(rngs)).view([n, 1]));
        }
        Tensor::cat(&codes, 1)
    }

    /// MaskGIT's decoding (`maskgit/libml/parallel_decode.py`): from a fully masked grid, each of
    /// `iterations` steps samples every masked code, keeps the most confident ones
    /// (confidence `log p + t·(1 − ratio)·Gumbel`) and re-masks `⌊L·cos(π/2·ratio)⌋` (at least
    /// 1, fewer than remain; ratio = (step + 1)/iterations) of those it sampled.
    fn sample_masked(
        &self,
        labels: Option<&Tensor>,
        n: i64,
        sampling: &Sampling,
        rngs: &mut [StdRng],
    ) -> Tensor {
        let guided = sampling.cfg_scale != 1.0;
        let y = self.guided_labels(labels, guided);
        let l = self.config().tokens() as i64;
        let dev = self.device();
        let mask_token = self.config().codebook_size as i64;
        let mut grid = Tensor::full([n, l], mask_token, (Kind::Int64, dev));
        let steps = sampling.iterations;
        for step in 0..steps {
            let unknown = grid.eq(mask_token);
            let input = grid.repeat([1 + i64::from(guided), 1]);
            let logits = self.masked_logits(&input, y.as_ref(), false);
            let k = logits.size()[2];
            let logits = Self::guide(logits.reshape([-1, k]), n * l, sampling, guided);
            let probs = sampling.filter(&logits).softmax(-1, Kind::Float);
            let per_row: Vec<f64> = (0..l).flat_map(|_| uniforms(rngs)).collect();
            // Rows of `probs` are (position, sample) in sample-major order: reorder the
            // per-sample draws to match.
            let u = Tensor::from_slice(&per_row)
                .view([l, n])
                .transpose(0, 1)
                .contiguous();
            let u: Vec<f64> = Vec::try_from(u.view([-1])).expect("f64 draws");
            let drawn = draw(&probs, &u).view([n, l]);
            let sampled = grid.where_self(&unknown.logical_not(), &drawn);
            let ratio = (step + 1) as f64 / steps as f64;
            let remaining = i64::try_from(unknown.sum(Kind::Int64)).unwrap_or(0) / n.max(1);
            if step + 1 == steps {
                grid = sampled;
                break;
            }
            let mask_len = ((l as f64 * cosine_mask_fraction(ratio)).floor() as i64)
                .min(remaining - 1)
                .max(1);
            let chosen = probs
                .gather(1, &drawn.view([-1, 1]), false)
                .view([n, l])
                .log();
            let gumbel: Vec<f64> = (0..l)
                .flat_map(|_| uniforms(rngs))
                .map(|u| -(-u.ln()).max(f64::MIN_POSITIVE).ln())
                .collect();
            let g = Tensor::from_slice(&gumbel)
                .view([l, n])
                .transpose(0, 1)
                .to_device(dev);
            let t = sampling.choice_temperature * (1.0 - ratio);
            let confidence = (chosen.to_kind(Kind::Double) + g * t)
                .masked_fill(&unknown.logical_not(), f64::INFINITY);
            // MaskGIT's cut: the codes less confident than the mask_len-th lowest.
            let (lowest, _) = confidence.sort(-1, false);
            let cut = lowest.narrow(1, mask_len, 1);
            let remask = confidence.lt_tensor(&cut);
            grid = sampled.masked_fill(&remask, mask_token);
        }
        grid
    }
}
