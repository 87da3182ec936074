//! How the encoder is trained through the quantizer: the gradient estimators of vq-core and the
//! paper's three baselines (Tables 1 and 3), selectable by name in `train --estimator` and
//! `compare --estimators`.
//!
//! | name | what the encoder's output `e` receives from the decoder's loss `L` |
//! |---|---|
//! | `ste`, `rotation`, `rotation-no-rescale`, `reflection` | the estimator's map of `∇_q L` ([`vq_core::Estimator`]) |
//! | `hessian-approx` | `∇_q L + ∇²_q L (e − q)`: a first-order Taylor step of the gradient from `q` to `e`, the Hessian–vector product taken through the decoder at `q` (double backward) |
//! | `exact-gradients` | `∇_e L(D(e))`: a second decoder pass on the unquantized `e`; the first pass (on `sg(q)`) trains the decoder, the second reaches it scaled by `λ_s = 1e-6` |
//! | `gumbel` | no `e`: the encoder predicts logits and the decoder sees a Gumbel-softmax mixture of codes ([`vq_tch::Family::Gumbel`]) |
//! | `diveq`, `diveq-detach`, `sf-diveq`, `sf-diveq-detach`, `ibq`, `lfq`, `bsq`, `scq` | the quantizers that followed the rotation trick ([`Successor`]): the family's own gradient path (DiVeQ, SF-DiVeQ, IBQ, SCQ) or straight-through onto its implicit codes (LFQ, BSQ), with its reference's settings |
//!
//! The two decoder-based baselines follow the paper's code (`vhp_vqvae`, `dfp_vqvae`), which adds
//! the Hessian term on top of straight-through and removes the first pass's straight-through
//! path; both are defined for VQ-VAE runs (the paper reports them in Table 1 only) with a
//! quantizer without projections, so that the decoder's input is the code. The commitment and
//! codebook losses act as in every run.

use anyhow::{Result, bail};
use tch::Tensor;
use vq_core::gumbel::{GumbelForward, TemperatureSchedule};
use vq_tch::{CodebookInit, CodebookLearning, Estimator, Family, Metric, Projection};

pub use crate::config::EncoderGradient;
use crate::config::RunConfig;

/// `λ_s` of the exact-gradients baseline: the weight of the second pass's loss in the
/// decoder's gradient (the paper's code: `--scale_factor 1e6`, i.e. 1/λ_s).
pub const EXACT_GRADIENTS_SCALE: f64 = 1e-6;

/// One way of training the encoder, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// A gradient estimator of the nearest-code quantizer.
    Estimator(Estimator),
    /// Gumbel-softmax quantization.
    Gumbel,
    /// The Hessian approximation on top of straight-through.
    HessianApprox,
    /// Exact gradients from a second decoder pass.
    ExactGradients,
    /// A quantizer that followed the rotation trick.
    Successor(Successor),
}

/// The quantizers that followed the rotation trick, as methods: each replaces the preset's
/// quantizer family by [`vq_tch::Family::successor`]'s (settings of its reference) through
/// [`RunConfig::set_family`], with the straight-through estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Successor {
    /// DiVeQ, noised directions.
    Diveq,
    /// DiVeQ, exact directions.
    DiveqDetach,
    /// SF-DiVeQ, noised directions.
    SfDiveq,
    /// SF-DiVeQ, exact directions.
    SfDiveqDetach,
    /// Index backpropagation quantization.
    Ibq,
    /// Lookup-free quantization.
    Lfq,
    /// Binary spherical quantization.
    Bsq,
    /// Soft convex quantization.
    Scq,
}

impl Successor {
    /// Every one, in the order of the comparison's tables.
    pub const ALL: [Self; 8] = [
        Self::Diveq,
        Self::DiveqDetach,
        Self::SfDiveq,
        Self::SfDiveqDetach,
        Self::Ibq,
        Self::Lfq,
        Self::Bsq,
        Self::Scq,
    ];

    /// The name (= the family's name).
    pub fn name(self) -> &'static str {
        match self {
            Self::Diveq => "diveq",
            Self::DiveqDetach => "diveq-detach",
            Self::SfDiveq => "sf-diveq",
            Self::SfDiveqDetach => "sf-diveq-detach",
            Self::Ibq => "ibq",
            Self::Lfq => "lfq",
            Self::Bsq => "bsq",
            Self::Scq => "scq",
        }
    }

    /// The label of tables and plots.
    pub fn label(self) -> &'static str {
        match self {
            Self::Diveq => "DiVeQ",
            Self::DiveqDetach => "DiVeQ, detached",
            Self::SfDiveq => "SF-DiVeQ",
            Self::SfDiveqDetach => "SF-DiVeQ, detached",
            Self::Ibq => "IBQ",
            Self::Lfq => "LFQ",
            Self::Bsq => "BSQ",
            Self::Scq => "SCQ",
        }
    }

    /// The one named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The one whose family `family` is.
    pub fn of(family: &Family) -> Option<Self> {
        Self::from_name(&family.name())
    }
}

impl From<Estimator> for Method {
    fn from(e: Estimator) -> Self {
        Self::Estimator(e)
    }
}

impl Method {
    /// The names `from_name` accepts, for help texts and errors.
    pub const NAMES: &'static str = "ste, rotation, rotation-no-rescale, reflection, gumbel, \
                                     hessian-approx, exact-gradients, diveq, diveq-detach, \
                                     sf-diveq, sf-diveq-detach, ibq, lfq, bsq, scq";

    /// Parses a name (the estimators' names and aliases, `gumbel`, `hessian-approx` /
    /// `hessian`, `exact-gradients` / `exact`, the [`Successor`]s' names).
    ///
    /// # Errors
    /// An unknown name, with the list.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "gumbel" => Self::Gumbel,
            "hessian-approx" | "hessian" => Self::HessianApprox,
            "exact-gradients" | "exact" => Self::ExactGradients,
            other => match (Successor::from_name(other), Estimator::from_name(other)) {
                (Some(s), _) => Self::Successor(s),
                (None, Ok(e)) => Self::Estimator(e),
                (None, Err(_)) => {
                    bail!("unknown estimator {other:?}; choose from {}", Self::NAMES)
                }
            },
        })
    }

    /// The name (run folders, tables).
    pub fn name(self) -> &'static str {
        match self {
            Self::Estimator(e) => e.name(),
            Self::Gumbel => "gumbel",
            Self::HessianApprox => "hessian-approx",
            Self::ExactGradients => "exact-gradients",
            Self::Successor(s) => s.name(),
        }
    }

    /// The label of tables and plots.
    pub fn label(self) -> &'static str {
        match self {
            Self::Estimator(e) => e.label(),
            Self::Gumbel => "Gumbel",
            Self::HessianApprox => "Hessian approx.",
            Self::ExactGradients => "exact gradients",
            Self::Successor(s) => s.label(),
        }
    }

    /// The method a configuration trains with.
    pub fn of(config: &RunConfig) -> Self {
        match (config.encoder_gradient, config.model.quantizer.family) {
            (EncoderGradient::HessianApprox, _) => Self::HessianApprox,
            (EncoderGradient::ExactGradients, _) => Self::ExactGradients,
            (_, Family::Gumbel { .. }) => Self::Gumbel,
            // LFQ / BSQ with another estimator than their references' is that estimator.
            (_, family) => {
                let estimator = config.model.quantizer.estimator;
                match Successor::of(&family) {
                    Some(s)
                        if family.own_gradient_path()
                            || estimator == Estimator::StraightThrough =>
                    {
                        Self::Successor(s)
                    }
                    _ => Self::Estimator(estimator),
                }
            }
        }
    }

    /// Sets `config` up for this method (everything else unchanged). Gumbel replaces the
    /// quantizer by taming's `GumbelQuantize` with the paper's settings: for a VQ-VAE
    /// karpathy/deep-vector-quantization's (soft relaxation, KL weight 5e-4) with τ annealed
    /// 1 → 1/16 over the run (geometrically; the paper does not give the shape); for a VQGAN
    /// taming's `GumbelVQ` configuration (straight-through hard one-hots, KL weight 1e-8,
    /// τ = 0.9 → 1e-6 by a cosine over 1,000,001 steps). Its codebook starts N(0, 1) as
    /// `nn.Embedding` does and is learned by gradient.
    ///
    /// # Errors
    /// A method the configuration cannot run (named with the reason).
    pub fn apply(self, config: &mut RunConfig) -> Result<()> {
        let q = &mut config.model.quantizer;
        let family = q.family;
        // A configuration of a Gumbel run goes back to nearest codes; other families stay.
        if let Family::Gumbel { .. } = family {
            q.family = Family::Nearest;
        }
        config.encoder_gradient = EncoderGradient::Quantizer;
        if let Self::Successor(s) = self {
            if !matches!(family, Family::Nearest | Family::Gumbel { .. })
                && Successor::of(&family).is_none()
            {
                bail!(
                    "{}: replaces the quantizer family; it does not combine with the {} family",
                    s.name(),
                    family.name()
                );
            }
            let family = Family::successor(s.name()).expect("every successor is a family");
            config.set_family(family)?;
            config.model.quantizer.estimator = Estimator::StraightThrough;
            return config.validate();
        }
        if !matches!(self, Self::Estimator(_))
            && !matches!(family, Family::Nearest | Family::Gumbel { .. })
        {
            bail!(
                "{}: the paper's baselines replace the plain VQ layer; they do not combine with \
                 the {} quantizer family (use an estimator: ste, rotation, ...)",
                self.name(),
                family.name()
            );
        }
        let q = &mut config.model.quantizer;
        match self {
            Self::Successor(_) => unreachable!("applied above"),
            Self::Estimator(e) => {
                if q.family.own_gradient_path() && e != Estimator::StraightThrough {
                    bail!(
                        "{}: the {} quantizer makes its own gradient path; estimators do not \
                         apply to it (only ste)",
                        e.name(),
                        q.family.name()
                    );
                }
                q.estimator = e
            }
            Self::Gumbel => {
                if q.projection != Projection::Identity {
                    bail!(
                        "gumbel: preset {}'s quantizer projects its input to the codes; the \
                         Gumbel baseline reads logits from a D-channel input (no projection)",
                        config.preset
                    );
                }
                q.metric = Metric::Euclidean;
                q.init = CodebookInit::Normal;
                if let CodebookLearning::Ema { .. } = q.learning {
                    q.learning = CodebookLearning::Gradient {
                        placement: vq_core::BetaPlacement::Commitment,
                    };
                }
                q.family = match config.gan {
                    None => Family::Gumbel {
                        kl_weight: 5e-4,
                        forward: GumbelForward::Soft,
                        temperature: TemperatureSchedule::Geometric {
                            start: 1.0,
                            end: 1.0 / 16.0,
                            steps: config.training.steps,
                        },
                    },
                    Some(_) => Family::Gumbel {
                        kl_weight: 1e-8,
                        forward: GumbelForward::Hard,
                        temperature: TemperatureSchedule::Cosine {
                            start: 0.9,
                            end: 1e-6,
                            steps: 1_000_001,
                        },
                    },
                };
            }
            Self::HessianApprox | Self::ExactGradients => {
                q.estimator = Estimator::StraightThrough;
                config.encoder_gradient = match self {
                    Self::HessianApprox => EncoderGradient::HessianApprox,
                    _ => EncoderGradient::ExactGradients,
                };
            }
        }
        config.validate()
    }
}

/// What a decoder-based baseline gives the encoder, with the loss that trains the decoder.
#[derive(Debug)]
pub struct DecoderGradient {
    /// The decoder's loss with its graph (to be back-propagated into the decoder's weights).
    pub loss: Tensor,
    /// The gradient for the encoder's output, in the decoder input's layout (no graph).
    pub encoder_grad: Tensor,
}

/// The decoder's input `d = sg(point)` (a leaf requiring grad), `L = loss(d)` with its graph
/// kept, and `∇_d L` (with a graph of its own when `create_graph`, for a second derivative).
fn gradient_at(
    loss_of_input: impl FnOnce(&Tensor) -> Result<Tensor>,
    point: &Tensor,
    create_graph: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = point.detach().set_requires_grad(true);
    let loss = loss_of_input(&d)?;
    let g = Tensor::f_run_backward(&[&loss], &[&d], true, create_graph)?
        .pop()
        .expect("one input");
    Ok((d, loss, g))
}

/// The Hessian approximation: with `d = sg(q)` as the decoder's input and `L = loss(d)`,
/// returns `L` and `∇_d L + ∇²_d L v` for `v = e − q` (a Hessian–vector product by double
/// backward: the gradient of `⟨∇_d L, v⟩` w.r.t. `d`). Exact when `L` is quadratic in `d`, where
/// it equals `∇L` at `e`.
///
/// # Errors
/// libtorch's (a decoder without double-backward support).
pub fn hessian_approx(
    loss_of_input: impl FnOnce(&Tensor) -> Result<Tensor>,
    e: &Tensor,
    q: &Tensor,
) -> Result<DecoderGradient> {
    let (d, loss, g) = gradient_at(loss_of_input, q, true)?;
    let v = (e.detach() - q.detach()).to_kind(g.kind());
    let hv = Tensor::f_run_backward(&[(&g * &v).sum(g.kind())], &[&d], true, false)?
        .pop()
        .expect("one input");
    Ok(DecoderGradient {
        loss,
        encoder_grad: (g.detach() + hv).detach(),
    })
}

/// Exact gradients: the decoder's loss `L(D(e))` on the unquantized `e` and its gradient
/// `∇_e L`.
///
/// # Errors
/// libtorch's.
pub fn exact_gradient(
    loss_of_input: impl FnOnce(&Tensor) -> Result<Tensor>,
    e: &Tensor,
) -> Result<DecoderGradient> {
    let (_, loss, g) = gradient_at(loss_of_input, e, false)?;
    Ok(DecoderGradient {
        loss,
        encoder_grad: g.detach(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn t(v: &[f64], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).view(shape)
    }

    #[test]
    fn the_hessian_approximation_is_exact_for_a_quadratic_loss() {
        // L(d) = ½‖A d − b‖²: ∇L(q) + AᵀA(e − q) = Aᵀ(A e − b) = ∇L(e).
        let a = t(&[1.0, 2.0, -1.0, 0.5, 3.0, 1.0], &[3, 2]);
        let b = t(&[0.3, -1.0, 2.0], &[3]);
        let loss = |d: &Tensor| -> Result<Tensor> {
            Ok((a.matmul(d) - &b).square().sum(Kind::Double) * 0.5)
        };
        let (e, q) = (t(&[0.7, -0.2], &[2]), t(&[1.0, 0.5], &[2]));
        let approx = hessian_approx(loss, &e, &q).unwrap();
        let exact = exact_gradient(loss, &e).unwrap();
        let closed = a.transpose(0, 1).matmul(&(a.matmul(&e) - &b));
        assert!(approx.encoder_grad.allclose(&closed, 1e-12, 1e-12, false));
        assert!(exact.encoder_grad.allclose(&closed, 1e-12, 1e-12, false));
        assert!(
            (f64::try_from(&approx.loss).unwrap() - f64::try_from(loss(&q).unwrap()).unwrap())
                .abs()
                < 1e-15
        );
    }

    #[test]
    fn the_hessian_term_matches_finite_differences_of_the_gradient() {
        // A small nonlinear decoder: L(d) = Σ tanh(W d)² · c.
        tch::manual_seed(3);
        let w = Tensor::randn([5, 4], (Kind::Double, Device::Cpu));
        let c = Tensor::randn([5], (Kind::Double, Device::Cpu));
        let loss = |d: &Tensor| -> Result<Tensor> {
            Ok((w.matmul(d).tanh().square() * &c).sum(Kind::Double))
        };
        let grad = |d: &Tensor| exact_gradient(loss, d).unwrap().encoder_grad;
        let q = Tensor::randn([4], (Kind::Double, Device::Cpu));
        let e = &q + Tensor::randn([4], (Kind::Double, Device::Cpu)) * 0.3;
        let v = &e - &q;
        let h = 1e-5;
        let hv = (grad(&(&q + &v * h)) - grad(&(&q - &v * h))) / (2.0 * h);
        let expected = grad(&q) + hv;
        let got = hessian_approx(loss, &e, &q).unwrap().encoder_grad;
        assert!(
            got.allclose(&expected, 1e-7, 1e-8, false),
            "{got} vs {expected}"
        );
        // And it is not the exact gradient at e (the decoder is not quadratic).
        assert!(!got.allclose(&grad(&e), 1e-4, 1e-4, false));
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_the_choices() {
        for name in Method::NAMES.split(", ") {
            assert_eq!(Method::from_name(name).unwrap().name(), name);
        }
        let err = Method::from_name("hessain").unwrap_err().to_string();
        assert!(
            err.contains("hessian-approx") && err.contains("hessain"),
            "{err}"
        );
    }
}
