//! AdamW with its state in tensors that checkpoints can save, the learning-rate schedule, and
//! global gradient-norm clipping. (tch's built-in optimisers keep their state inside libtorch
//! with no way to save it, which would make `--resume` inexact.)

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use tch::{Kind, Tensor, nn};

use crate::ops;

/// How the optimiser's arithmetic is launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Elementary tensor ops per parameter (about 15 launches each): the CPU's path, whose
    /// results every CPU figure in the docs was made with.
    PerTensor,
    /// ATen's multi-tensor kernels (`_fused_adamw_`, `_foreach_norm`, `_foreach_mul_`,
    /// `_foreach_zero_`): a few launches per step for all parameters, as
    /// `torch.optim.AdamW(fused=True)`; the default on CUDA, where one launch per small op
    /// left the GPU idle between kernels. Same formulas; the results differ from
    /// [`PerTensor`](Self::PerTensor)'s by float rounding (tested).
    MultiTensor,
}

/// Decoupled weight-decay Adam (Loshchilov & Hutter), as `torch.optim.AdamW`:
/// `p ← p − lr·wd·p`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
/// `p ← p − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)`.
///
/// With [`with_loss_scaling`](Self::with_loss_scaling) it also owns the dynamic [`LossScale`] of
/// its gradients (f16 training), as `torch.amp.GradScaler` is stepped with its optimiser.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: i64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    loss_scale: Option<LossScale>,
    kernels: Kernels,
}

/// The dynamic loss scale of f16 training, with `torch.amp.GradScaler`'s defaults and rules: the
/// loss is multiplied by `scale` before the backward pass; a step whose gradients hold an inf or
/// NaN is skipped and the scale halved; after 2000 applied steps in a row it doubles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    /// The current scale (a power of two).
    pub scale: f64,
    /// Steps applied since the scale last changed.
    pub growth_tracker: i64,
}

impl Default for LossScale {
    fn default() -> Self {
        Self {
            scale: Self::INIT,
            growth_tracker: 0,
        }
    }
}

impl LossScale {
    /// The first scale, 2¹⁶.
    pub const INIT: f64 = 65536.0;
    /// Factor after `GROWTH_INTERVAL` applied steps.
    pub const GROWTH: f64 = 2.0;
    /// Factor after a skipped step.
    pub const BACKOFF: f64 = 0.5;
    /// Applied steps between growths.
    pub const GROWTH_INTERVAL: i64 = 2000;
    /// Below this scale (f16's smallest subnormal, 2⁻²⁴, reached after 40 skipped steps in a
    /// row from the first scale) no scale can help: the run has diverged.
    pub const MIN: f64 = 5.960_464_477_539_063e-8;

    /// The scale after a step whose gradients were finite (`true`) or not.
    ///
    /// ```
    /// use vq_train::optim::LossScale;
    /// let mut s = LossScale::default();
    /// s.update(false);
    /// assert_eq!(s.scale, 32768.0);
    /// for _ in 0..LossScale::GROWTH_INTERVAL {
    ///     s.update(true);
    /// }
    /// assert_eq!((s.scale, s.growth_tracker), (65536.0, 0));
    /// ```
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.growth_tracker += 1;
            if self.growth_tracker == Self::GROWTH_INTERVAL {
                self.scale *= Self::GROWTH;
                self.growth_tracker = 0;
            }
        } else {
            self.scale *= Self::BACKOFF;
            self.growth_tracker = 0;
        }
    }
}

impl AdamW {
    /// Optimises every trainable variable of `vs` (sorted by name), with the multi-tensor
    /// kernels on CUDA and per-tensor ops elsewhere ([`Kernels`]).
    pub fn new(vs: &nn::VarStore, betas: (f64, f64), weight_decay: f64) -> Self {
        let mut params: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros = |p: &Tensor| p.zeros_like();
        Self {
            m: params.iter().map(|(_, p)| zeros(p)).collect(),
            v: params.iter().map(|(_, p)| zeros(p)).collect(),
            params,
            step: 0,
            betas,
            eps: 1e-8,
            weight_decay,
            loss_scale: None,
            kernels: if vs.device().is_cuda() {
                Kernels::MultiTensor
            } else {
                Kernels::PerTensor
            },
        }
    }

    /// Launches the arithmetic with `kernels` instead of the device's default.
    #[must_use]
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// Trains with a dynamic [`LossScale`] (f16 training).
    #[must_use]
    pub fn with_loss_scaling(mut self) -> Self {
        self.loss_scale = Some(LossScale::default());
        self
    }

    /// The factor the loss is multiplied by before the backward pass (1 without loss scaling).
    pub fn loss_scale(&self) -> f64 {
        self.loss_scale.map_or(1.0, |s| s.scale)
    }

    /// The loss scale's state, if the optimiser has one (to keep ranks in step).
    pub fn loss_scale_mut(&mut self) -> Option<&mut LossScale> {
        self.loss_scale.as_mut()
    }

    /// Steps taken.
    pub fn steps(&self) -> i64 {
        self.step
    }

    /// The gradients of the parameters (in name order; undefined ones left out).
    pub fn gradients(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(Tensor::defined)
            .collect()
    }

    /// The moment tensors (m then v per parameter, in name order), shared with the optimiser:
    /// writing into them changes its state.
    pub fn state_tensors(&self) -> Vec<Tensor> {
        self.m
            .iter()
            .zip(&self.v)
            .flat_map(|(m, v)| [m.shallow_clone(), v.shallow_clone()])
            .collect()
    }

    /// Sets the number of steps taken (the bias correction's t).
    pub fn set_steps(&mut self, steps: i64) {
        self.step = steps;
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        match self.kernels {
            Kernels::PerTensor => {
                for (_, p) in &mut self.params {
                    p.zero_grad();
                }
            }
            Kernels::MultiTensor => {
                ops::foreach_zero(&self.gradients());
            }
        }
    }

    /// The global l2 norm of `grads` (f64).
    fn global_norm(&self, grads: &[Tensor]) -> f64 {
        match self.kernels {
            Kernels::PerTensor => {
                let sq: Vec<Tensor> = grads
                    .iter()
                    .map(|g| g.to_kind(Kind::Double).square().sum(Kind::Double))
                    .collect();
                f64::try_from(Tensor::stack(&sq, 0).sum(Kind::Double).sqrt()).unwrap_or(f64::NAN)
            }
            Kernels::MultiTensor => ops::global_norm(grads),
        }
    }

    /// Unscales the gradients (divides them by [`loss_scale`](Self::loss_scale)) and scales
    /// them so that their global l2 norm is at most `max_norm` (0: no clipping), in one pass;
    /// returns the (unscaled) norm before clipping. A non-finite norm leaves the gradients as
    /// they were.
    pub fn unscale_and_clip(&mut self, max_norm: f64) -> f64 {
        let grads = self.gradients();
        if grads.is_empty() {
            return 0.0;
        }
        let scale = self.loss_scale();
        let norm = self.global_norm(&grads) / scale;
        if !norm.is_finite() {
            return norm;
        }
        let clip = match max_norm > 0.0 && norm > max_norm {
            true => max_norm / (norm + 1e-6),
            false => 1.0,
        };
        let factor = clip / scale;
        if factor != 1.0 {
            match self.kernels {
                Kernels::PerTensor => tch::no_grad(|| {
                    for mut g in grads {
                        let _ = g.g_mul_scalar_(factor);
                    }
                }),
                Kernels::MultiTensor => ops::foreach_mul(&grads, factor),
            }
        }
        norm
    }

    /// [`unscale_and_clip`](Self::unscale_and_clip) without loss scaling, leaving the norm on
    /// the device: returns it as a 0-dim f64 tensor. With the multi-tensor kernels the host
    /// does not wait for the device (the clipping factor `min(1, max_norm / (norm + 1e-6))` is
    /// applied there; a non-finite norm leaves the gradients as they were); the per-tensor path
    /// reads the norm back, as [`unscale_and_clip`](Self::unscale_and_clip) does.
    ///
    /// # Panics
    /// With loss scaling (its scale is updated from the norm on the host).
    pub fn clip_on_device(&mut self, max_norm: f64) -> Tensor {
        assert!(
            self.loss_scale.is_none(),
            "clip_on_device: loss scaling reads the gradient norm on the host"
        );
        let grads = self.gradients();
        let device = self
            .params
            .first()
            .map_or(tch::Device::Cpu, |p| p.1.device());
        if self.kernels == Kernels::PerTensor || grads.is_empty() {
            let norm = self.unscale_and_clip(max_norm);
            return Tensor::from(norm).to_device(device);
        }
        let norm = ops::global_norm_tensor(&grads);
        if max_norm > 0.0 {
            let clip = (&norm + 1e-6).reciprocal() * max_norm;
            let keep = norm.le(max_norm).logical_or(&norm.isfinite().logical_not());
            let factor = clip.where_self(&keep.logical_not(), &clip.ones_like());
            ops::foreach_mul_tensor(&grads, &factor.to_kind(grads[0].kind()));
        }
        norm
    }

    /// [`step`](Self::step) unless `halt` (a 0-dim tensor, nonzero: a non-finite number was
    /// found on the device) — with the multi-tensor kernels decided on the device (the fused
    /// kernel's `found_inf`), so the host does not wait; the per-tensor path reads `halt`.
    /// The step count advances either way (a halted run is stopped by its caller before it is
    /// saved).
    pub fn step_unless(&mut self, lr: f64, halt: &Tensor) {
        match self.kernels {
            Kernels::MultiTensor => self.fused_step(lr, Some(halt)),
            Kernels::PerTensor => {
                let halted = f64::try_from(halt).map_or(true, |h| h != 0.0);
                match halted {
                    true => self.step += 1,
                    false => self.step(lr),
                }
            }
        }
    }

    /// [`step`](Self::step) unless loss scaling is on and `grad_norm` (from
    /// [`unscale_and_clip`](Self::unscale_and_clip)) is not finite; updates the loss scale.
    /// Returns whether the update was applied.
    pub fn step_unless_overflow(&mut self, lr: f64, grad_norm: f64) -> bool {
        let Some(scale) = &mut self.loss_scale else {
            self.step(lr);
            return true;
        };
        let finite = grad_norm.is_finite();
        scale.update(finite);
        if finite {
            self.step(lr);
        }
        finite
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        if self.kernels == Kernels::MultiTensor {
            return self.fused_step(lr, None);
        }
        self.step += 1;
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        tch::no_grad(|| {
            for (((_, p), m), v) in self.params.iter_mut().zip(&mut self.m).zip(&mut self.v) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                if self.weight_decay > 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = m.g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
                let _ = v.g_mul_scalar_(b2).g_add_(&(g.square() * (1.0 - b2)));
                let denom = (&*v / bc2).sqrt() + self.eps;
                let _ = p.g_sub_(&(&*m / denom * (lr / bc1)));
            }
        });
    }

    /// [`step`](Self::step) with ATen's fused AdamW kernel over every parameter that has a
    /// gradient; nothing changes where `skip` holds 1.
    fn fused_step(&mut self, lr: f64, skip: Option<&Tensor>) {
        self.step += 1;
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
        let (mut p, mut g, mut m, mut v) = (vec![], vec![], vec![], vec![]);
        for (i, grad) in grads.iter().enumerate() {
            if grad.defined() {
                p.push(&self.params[i].1);
                g.push(grad);
                m.push(&self.m[i]);
                v.push(&self.v[i]);
            }
        }
        let adam = ops::Adam {
            step: self.step as f64,
            lr,
            betas: self.betas,
            weight_decay: self.weight_decay,
            eps: self.eps,
        };
        let skip = skip.map(|s| s.to_kind(Kind::Float));
        ops::fused_adamw(&p, &g, &m, &v, adam, skip.as_ref());
    }

    /// The state as named tensors: `m.<var>`, `v.<var>` and `step`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len() + 1);
        for ((name, _), (m, v)) in self.params.iter().zip(self.m.iter().zip(&self.v)) {
            out.push((format!("m.{name}"), m.shallow_clone()));
            out.push((format!("v.{name}"), v.shallow_clone()));
        }
        out.push(("step".into(), Tensor::from(self.step)));
        if let Some(s) = self.loss_scale {
            out.push(("loss_scale".into(), Tensor::from(s.scale)));
            out.push((
                "loss_scale_growth_tracker".into(),
                Tensor::from(s.growth_tracker),
            ));
        }
        out
    }

    /// Restores [`state`](Self::state).
    ///
    /// # Errors
    /// Missing entries or shape mismatches (a checkpoint of another model).
    pub fn load_state(&mut self, state: HashMap<String, Tensor>) -> Result<()> {
        let get = |key: &str| {
            state
                .get(key)
                .with_context(|| format!("optimizer state lacks {key}"))
        };
        tch::no_grad(|| -> Result<()> {
            for ((name, p), (m, v)) in self.params.iter().zip(self.m.iter_mut().zip(&mut self.v)) {
                for (slot, key) in [
                    (&mut *m, format!("m.{name}")),
                    (&mut *v, format!("v.{name}")),
                ] {
                    let src = get(&key)?;
                    if src.size() != p.size() {
                        bail!(
                            "optimizer state {key} has shape {:?}, the model {:?}",
                            src.size(),
                            p.size()
                        );
                    }
                    slot.copy_(src);
                }
            }
            Ok(())
        })?;
        self.step = i64::try_from(get("step")?).context("optimizer step")?;
        // A checkpoint written without loss scaling (f32 / bf16) starts the scale afresh.
        if let (Some(s), Some(scale), Some(tracker)) = (
            &mut self.loss_scale,
            state.get("loss_scale"),
            state.get("loss_scale_growth_tracker"),
        ) {
            s.scale = f64::try_from(scale).context("loss scale")?;
            s.growth_tracker = i64::try_from(tracker).context("loss scale growth tracker")?;
        }
        Ok(())
    }
}

/// Linear warm-up from 0 to `peak` over `warmup` steps, cosine decay to `final_fraction`·peak
/// over the next `decay` steps, then constant.
///
/// ```
/// use vq_train::optim::learning_rate;
/// assert_eq!(learning_rate(0, 1.0, 10, 100, 0.5), 0.1);
/// assert_eq!(learning_rate(9, 1.0, 10, 100, 0.5), 1.0);
/// assert!((learning_rate(10 + 50, 1.0, 10, 100, 0.5) - 0.75).abs() < 1e-12);
/// assert_eq!(learning_rate(10_000, 1.0, 10, 100, 0.5), 0.5);
/// ```
pub fn learning_rate(
    step: usize,
    peak: f64,
    warmup: usize,
    decay: usize,
    final_fraction: f64,
) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let t = step - warmup;
    if decay == 0 || t >= decay {
        return peak * final_fraction;
    }
    let cos = 0.5 * (1.0 + (std::f64::consts::PI * t as f64 / decay as f64).cos());
    peak * (final_fraction + (1.0 - final_fraction) * cos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Against the closed form of two AdamW steps on f(p) = ½‖p‖² (g = p), with either kind of
    /// kernels.
    #[test]
    fn adamw_matches_the_formula() {
        for kernels in [Kernels::PerTensor, Kernels::MultiTensor] {
            adamw_matches_the_formula_with(kernels);
        }
    }

    fn adamw_matches_the_formula_with(kernels: Kernels) {
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs
            .root()
            .var_copy("p", &Tensor::from_slice(&[1.0f32, -2.0]));
        let mut opt = AdamW::new(&vs, (0.9, 0.99), 0.1).with_kernels(kernels);
        let (lr, mut expect) = (0.01, [1.0f64, -2.0]);
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            opt.zero_grad();
            (&p * &p).sum(Kind::Float).g_mul_scalar(0.5).backward();
            opt.step(lr);
            for i in 0..2 {
                let g = expect[i];
                expect[i] *= 1.0 - lr * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.99 * v[i] + 0.01 * g * g;
                let (mh, vh) = (
                    m[i] / (1.0 - 0.9f64.powi(t)),
                    v[i] / (1.0 - 0.99f64.powi(t)),
                );
                expect[i] -= lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = Vec::<f32>::try_from(&p).unwrap();
        for (a, b) in got.iter().zip(expect) {
            assert!((f64::from(*a) - b).abs() < 1e-6, "{kernels:?}: {a} vs {b}");
        }
        // State round trip.
        let state: HashMap<String, Tensor> = opt
            .state()
            .into_iter()
            .map(|(k, t)| (k, t.copy()))
            .collect();
        let mut other = AdamW::new(&vs, (0.9, 0.99), 0.1);
        other.load_state(state).unwrap();
        assert_eq!(other.steps(), 2);
        assert!(other.m[0].equal(&opt.m[0]) && other.v[0].equal(&opt.v[0]));
    }

    /// Clipping with the norm left on the device, and updates skipped by a device flag, with
    /// either kind of kernels: the same gradients and steps as the host-side path; a raised
    /// flag leaves parameters and moments exactly as they were; a non-finite norm leaves the
    /// gradients unscaled.
    #[test]
    fn device_side_clipping_and_skipping_match_the_host_path() {
        for kernels in [Kernels::PerTensor, Kernels::MultiTensor] {
            let setup = || {
                let vs = nn::VarStore::new(Device::Cpu);
                let a = vs
                    .root()
                    .var_copy("a", &Tensor::from_slice(&[3.0f32, -4.0, 1.0]));
                let b = vs.root().var_copy("b", &Tensor::from_slice(&[0.5f32, 2.0]));
                let opt = AdamW::new(&vs, (0.9, 0.99), 0.05).with_kernels(kernels);
                (vs, a, b, opt)
            };
            let grads = |a: &Tensor, b: &Tensor, opt: &mut AdamW| {
                opt.zero_grad();
                ((a * a).sum(Kind::Float) * 3.0 + (b * b * b).sum(Kind::Float)).backward();
            };
            for max_norm in [0.0, 1.0, 1e6] {
                let (_v1, a1, b1, mut host) = setup();
                let (_v2, a2, b2, mut dev) = setup();
                for step in 0..3 {
                    grads(&a1, &b1, &mut host);
                    grads(&a2, &b2, &mut dev);
                    let n1 = host.unscale_and_clip(max_norm);
                    let n2 = f64::try_from(dev.clip_on_device(max_norm)).unwrap();
                    assert_eq!(n1, n2, "{kernels:?} {max_norm} {step}");
                    assert!(a1.grad().equal(&a2.grad()) && b1.grad().equal(&b2.grad()));
                    host.step(0.1);
                    dev.step_unless(0.1, &Tensor::from(0.0f32));
                    assert!(
                        a1.equal(&a2) && b1.equal(&b2),
                        "{kernels:?} {max_norm} {step}"
                    );
                }
                // A raised flag: nothing changes.
                grads(&a2, &b2, &mut dev);
                let (before, m, v) = (a2.copy(), dev.m[0].copy(), dev.v[0].copy());
                let _ = dev.clip_on_device(max_norm);
                dev.step_unless(0.1, &Tensor::from(1.0f32));
                assert!(a2.equal(&before) && dev.m[0].equal(&m) && dev.v[0].equal(&v));
            }
            // A non-finite norm: the gradients stay as they were.
            let (_v, a, b, mut opt) = setup();
            grads(&a, &b, &mut opt);
            let _ = a.grad().get(0).fill_(f64::INFINITY);
            let before = b.grad().copy();
            let norm = f64::try_from(opt.clip_on_device(1.0)).unwrap();
            assert!(!norm.is_finite(), "{kernels:?}");
            assert!(b.grad().equal(&before), "{kernels:?}");
        }
    }

    /// The multi-tensor kernels (CUDA's default) take the per-tensor path's steps to float
    /// rounding: several parameters of different shapes, one without a gradient, weight decay,
    /// clipping under a loss scale, ten steps.
    #[test]
    fn multi_tensor_kernels_agree_with_the_per_tensor_ops() {
        let run = |kernels: Kernels| {
            let vs = nn::VarStore::new(Device::Cpu);
            let mut rng = Tensor::zeros([1], (Kind::Float, Device::Cpu));
            let _ = rng.uniform_(0.0, 1.0); // keeps the global generator in use alike
            let init =
                |n: i64, seed: f64| Tensor::arange(n, (Kind::Float, Device::Cpu)).sin() * seed;
            let a = vs.root().var_copy("a", &init(12, 1.5).view([3, 4]));
            let b = vs.root().var_copy("b", &init(5, -0.7));
            let _unused = vs.root().var_copy("c", &init(3, 2.0));
            let mut opt = AdamW::new(&vs, (0.9, 0.99), 0.05)
                .with_kernels(kernels)
                .with_loss_scaling();
            let mut norms = vec![];
            for t in 0..10 {
                opt.zero_grad();
                let loss = (&a * &a).sum(Kind::Float) * (1.0 + f64::from(t))
                    + (&b * &b * &b).sum(Kind::Float);
                (loss * opt.loss_scale()).backward();
                let norm = opt.unscale_and_clip(1.0);
                norms.push(norm);
                assert!(opt.step_unless_overflow(1e-2, norm));
            }
            let mut state: Vec<Vec<f32>> = opt
                .state_tensors()
                .iter()
                .map(|t| Vec::<f32>::try_from(t.view([-1])).unwrap())
                .collect();
            state.push(Vec::<f32>::try_from(a.view([-1])).unwrap());
            state.push(Vec::<f32>::try_from(&b).unwrap());
            (state, norms)
        };
        let (per, per_norms) = run(Kernels::PerTensor);
        let (multi, multi_norms) = run(Kernels::MultiTensor);
        for (x, y) in per_norms.iter().zip(&multi_norms) {
            assert!((x - y).abs() <= 1e-6 * x.abs(), "norms {x} vs {y}");
        }
        for (k, (x, y)) in per.iter().zip(&multi).enumerate() {
            for (a, b) in x.iter().zip(y) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                    "tensor {k}: {a} vs {b}"
                );
            }
        }
        // The unused parameter keeps zero moments in both.
        assert!(multi[4].iter().all(|&v| v == 0.0) && multi[5].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs.root().var_copy("p", &Tensor::from_slice(&[3.0f32, 4.0]));
        let mut opt = AdamW::new(&vs, (0.9, 0.99), 0.0);
        (&p * &p).sum(Kind::Float).g_mul_scalar(0.5).backward();
        assert!((opt.unscale_and_clip(1.0) - 5.0).abs() < 1e-6);
        let g = f64::try_from(p.grad().norm()).unwrap();
        assert!((g - 1.0).abs() < 1e-5, "{g}");
    }

    /// A scaled backward pass gives the unscaled gradients back; an overflow skips the step,
    /// halves the scale and leaves the weights alone; the scale survives a state round trip.
    #[test]
    fn loss_scaling_unscales_skips_and_round_trips() {
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs.root().var_copy("p", &Tensor::from_slice(&[3.0f32, 4.0]));
        let mut opt = AdamW::new(&vs, (0.9, 0.99), 0.0).with_loss_scaling();
        let s = opt.loss_scale();
        ((&p * &p).sum(Kind::Float) * (0.5 * s)).backward();
        assert!((opt.unscale_and_clip(0.0) - 5.0).abs() < 1e-5);
        assert_eq!(Vec::<f32>::try_from(p.grad()).unwrap(), [3.0, 4.0]);
        assert!(opt.step_unless_overflow(0.1, 5.0));
        assert_eq!(opt.steps(), 1);
        let before = p.copy();
        opt.zero_grad();
        (&p * f64::INFINITY).sum(Kind::Float).backward();
        let norm = opt.unscale_and_clip(1.0);
        assert!(!norm.is_finite());
        assert!(!opt.step_unless_overflow(0.1, norm));
        assert!(p.equal(&before), "a skipped step must not move the weights");
        assert_eq!(opt.steps(), 1);
        assert_eq!(opt.loss_scale(), s / 2.0);
        let state: HashMap<String, Tensor> = opt.state().into_iter().collect();
        let mut other = AdamW::new(&vs, (0.9, 0.99), 0.0).with_loss_scaling();
        other.load_state(state).unwrap();
        assert_eq!(other.loss_scale(), s / 2.0);
    }
}
