//! AdamW with its state in tensors that checkpoints can save, the learning-rate schedule, and
//! global gradient-norm clipping. (tch's built-in optimisers keep their state inside libtorch
//! with no way to save it, which would make `--resume` inexact.)

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use tch::{Kind, Tensor, nn};

/// Decoupled weight-decay Adam (Loshchilov & Hutter), as `torch.optim.AdamW`:
/// `p ← p − lr·wd·p`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
/// `p ← p − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)`.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: i64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    /// Optimises every trainable variable of `vs` (sorted by name).
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
        }
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
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// Scales the gradients so that their global l2 norm is at most `max_norm` (0: no clipping);
    /// returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let sq: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(Kind::Double).square().sum(Kind::Double))
            .collect();
        let norm =
            f64::try_from(Tensor::stack(&sq, 0).sum(Kind::Double).sqrt()).unwrap_or(f64::NAN);
        if max_norm > 0.0 && norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            tch::no_grad(|| {
                for mut g in grads {
                    let _ = g.g_mul_scalar_(scale);
                }
            });
        }
        norm
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
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

    /// The state as named tensors: `m.<var>`, `v.<var>` and `step`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len() + 1);
        for ((name, _), (m, v)) in self.params.iter().zip(self.m.iter().zip(&self.v)) {
            out.push((format!("m.{name}"), m.shallow_clone()));
            out.push((format!("v.{name}"), v.shallow_clone()));
        }
        out.push(("step".into(), Tensor::from(self.step)));
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

    /// Against the closed form of two AdamW steps on f(p) = ½‖p‖² (g = p).
    #[test]
    fn adamw_matches_the_formula() {
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs
            .root()
            .var_copy("p", &Tensor::from_slice(&[1.0f32, -2.0]));
        let mut opt = AdamW::new(&vs, (0.9, 0.99), 0.1);
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
            assert!((f64::from(*a) - b).abs() < 1e-6, "{a} vs {b}");
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

    #[test]
    fn clipping_bounds_the_global_norm() {
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs.root().var_copy("p", &Tensor::from_slice(&[3.0f32, 4.0]));
        let mut opt = AdamW::new(&vs, (0.9, 0.99), 0.0);
        (&p * &p).sum(Kind::Float).g_mul_scalar(0.5).backward();
        assert!((opt.clip_grad_norm(1.0) - 5.0).abs() < 1e-6);
        let g = f64::try_from(p.grad().norm()).unwrap();
        assert!((g - 1.0).abs() < 1e-5, "{g}");
    }
}
