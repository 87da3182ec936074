//! The nearest-code family ([`Family::Nearest`]) and SimVQ ([`Family::SimVq`], whose codes are a
//! frozen codebook through a learned linear map): the lookup, the estimator, the commitment and
//! codebook losses, and — for EMA codebooks — the EMA step ([`super::learning`]).

use rand::SeedableRng;
use rand::rngs::StdRng;
use tch::{Kind, Reduction, Tensor, nn};
use vq_core::{EmaCodebook, Metric};

use super::config::{CodebookInit, CodebookLearning, Family, VectorQuantizerConfig};
use super::learning::EmaState;
use super::pass::{Batch, Rows, Settings, mark_initialised, scalar};
use crate::error::Result;
use crate::estimator::apply_estimator;
use crate::search::nearest_codes_checked;

/// A nearest-code layer's codebook, learned by gradient or by EMA.
#[derive(Debug)]
pub(super) struct NearestCodes {
    pub(super) codebook: Tensor,
    /// The EMA statistics of an EMA codebook ([`CodebookLearning::Ema`]); none when the codebook
    /// learns by gradient.
    ema: Option<EmaState>,
    /// 1 once k-means initialisation has run or was not asked for.
    initialised: Tensor,
}

/// SimVQ's frozen codebook `C` and its learned map `W`: the codes are `C · Wᵀ`.
#[derive(Debug)]
pub(super) struct SimVqCodes {
    pub(super) codebook: Tensor,
    transform: Tensor,
}

impl NearestCodes {
    /// The `codebook` variable drawn as the config's [`CodebookInit`] says, with the EMA state
    /// of an EMA codebook, under `path`.
    pub(super) fn new(path: &nn::Path, config: &VectorQuantizerConfig) -> Result<Self> {
        let device = path.device();
        let init = drawn_codebook(config, config.init, device);
        let (codebook, ema) = match config.learning {
            CodebookLearning::Ema {
                decay,
                laplace_eps,
                dead_code_threshold,
                kmeans_iters,
            } => {
                let ema = EmaState::new(
                    path,
                    &init,
                    vq_core::EmaConfig::new(
                        decay,
                        laplace_eps,
                        dead_code_threshold,
                        config.metric,
                    )?,
                    kmeans_iters,
                );
                (path.add("codebook", init, false), Some(ema))
            }
            CodebookLearning::Gradient { .. } => (path.add("codebook", init, true), None),
        };
        let pending = matches!(&ema, Some(e) if e.kmeans_iters() > 0);
        let initialised = path.add("initialised", scalar(i64::from(!pending), device), false);
        Ok(Self {
            codebook,
            ema,
            initialised,
        })
    }

    /// The codes as the layer uses them ([`used_codes`]).
    pub(super) fn codes(&self, config: &VectorQuantizerConfig) -> Tensor {
        used_codes(self.codebook.shallow_clone(), config)
    }

    /// A copy of the EMA state as vq-core's type (EMA codebooks only).
    pub(super) fn ema(&self) -> Result<Option<EmaCodebook>> {
        self.ema
            .as_ref()
            .map(|ema| ema.to_core(&self.codebook))
            .transpose()
    }

    /// k-means initialisation on the first training batch when asked for, then
    /// [`nearest_rows`] and the EMA step.
    pub(super) fn rows(&mut self, settings: Settings<'_>, batch: Batch<'_>) -> Result<Rows> {
        if let Some(ema) = &mut self.ema
            && batch.train
            && ema.kmeans_pending(&self.initialised)
        {
            ema.kmeans_init(&mut self.codebook, &self.initialised, settings, batch)?;
        }
        let rows = nearest_rows(self.codes(settings.config), settings, batch)?;
        if let Some(ema) = &mut self.ema
            && batch.train
        {
            ema.update(
                &mut self.codebook,
                &batch.e.detach(),
                &rows.idx,
                settings,
                batch,
            )?;
        }
        Ok(rows)
    }
}

impl SimVqCodes {
    /// The frozen codebook, N(0, 1/D) (lucidrains' `SimVQ`), under `path`.
    pub(super) fn frozen_codebook(path: &nn::Path, config: &VectorQuantizerConfig) -> Tensor {
        let device = path.device();
        let codebook = drawn_codebook(config, CodebookInit::Normal, device)
            * f64::from((config.codebook_dim as f32).sqrt().recip());
        let codebook = path.add("codebook", codebook, false);
        mark_initialised(path);
        codebook
    }

    /// `codebook` with the map `W` (D, D), drawn as `nn.Linear(D, D, bias=False)` is.
    pub(super) fn new(path: &nn::Path, config: &VectorQuantizerConfig, codebook: Tensor) -> Self {
        let d = config.codebook_dim as i64;
        let cfg = nn::LinearConfig {
            bias: false,
            ..crate::init::torch_linear()
        };
        Self {
            codebook,
            transform: nn::linear(path / "sim_transform", d, d, cfg).ws,
        }
    }

    /// `C · Wᵀ`, as the layer uses it ([`used_codes`]).
    pub(super) fn codes(&self, config: &VectorQuantizerConfig) -> Tensor {
        used_codes(self.codebook.matmul(&self.transform.tr()), config)
    }

    /// [`nearest_rows`] on `C · Wᵀ`.
    pub(super) fn rows(&self, settings: Settings<'_>, batch: Batch<'_>) -> Result<Rows> {
        nearest_rows(self.codes(settings.config), settings, batch)
    }
}

/// The trainable `codebook` variable under `path`, drawn as the config's [`CodebookInit`] says,
/// with the `initialised` flag set (no k-means start): the codes of the families that learn
/// them by gradient alone (Gumbel, DiVeQ, SF-DiVeQ, IBQ, SCQ).
pub(super) fn learned_codebook(path: &nn::Path, config: &VectorQuantizerConfig) -> Tensor {
    let codebook = path.add(
        "codebook",
        drawn_codebook(config, config.init, path.device()),
        true,
    );
    mark_initialised(path);
    codebook
}

/// A (K, D) codebook drawn by `init` from `StdRng::seed_from_u64(seed)` on the host,
/// l2-normalised for the cosine metric, on `device`.
pub(super) fn drawn_codebook(
    config: &VectorQuantizerConfig,
    init: CodebookInit,
    device: tch::Device,
) -> Tensor {
    let (k, d) = (config.codebook_size, config.codebook_dim);
    let mut rng = StdRng::seed_from_u64(config.seed);
    let codes = Tensor::from_slice(&init.draw(k, d, &mut rng)).view([k as i64, d as i64]);
    let codes = match (config.metric, config.family) {
        (Metric::Cosine, f) if f != Family::SimVq => crate::rows::l2_normalise_rows(&codes),
        _ => codes,
    };
    codes.to_device(device)
}

/// The codes as the layer uses them: `codes`, l2-normalised per row (differentiably) for a
/// cosine codebook learned by gradient, as enhancing-transformers' quantizer does at every use
/// (an EMA cosine codebook is renormalised by each EMA step instead).
fn used_codes(codes: Tensor, config: &VectorQuantizerConfig) -> Tensor {
    match (config.metric, config.learning) {
        (Metric::Cosine, CodebookLearning::Gradient { .. }) => {
            crate::rows::l2_normalise_rows(&codes)
        }
        _ => codes,
    }
}

/// Nearest-code lookup, estimator, and the commitment / codebook losses of rows `e` (N, D)
/// against `codes` (K, D).
fn nearest_rows(codes: Tensor, settings: Settings<'_>, batch: Batch<'_>) -> Result<Rows> {
    let e = batch.e;
    let config = settings.config;
    let (idx, finite_verdict) = nearest_codes_checked(
        &e.detach(),
        &codes.detach(),
        config.metric,
        settings.finite_check,
    )?;
    let idx = idx.to_device(e.device());
    let q_live = codes.index_select(0, &idx);
    let q = q_live.detach();
    let out = apply_estimator(e, &q, config.estimator)?;
    let commit_mse = e.mse_loss(&q, Reduction::Mean);
    let weights = config.loss_weights()?;
    let (wc, wb) = (weights.commitment(), weights.codebook());
    let quantization_error = commit_mse.detach();
    let commitment_loss = commit_mse * f64::from(wc);
    let codebook_loss = if wb > 0.0 {
        q_live.mse_loss(&e.detach(), Reduction::Mean) * f64::from(wb)
    } else {
        Tensor::zeros([], (Kind::Float, e.device()))
    };
    Ok(Rows {
        out,
        codes: q,
        idx,
        commitment_loss,
        codebook_loss,
        quantization_error,
        finite_verdict,
    })
}
