//! Generative priors over the code grids of a VQ tokenizer, as [`tch`] modules: the second
//! stage of taming-transformers, LlamaGen and MaskGIT.
//!
//! * [`Prior`]: a transformer over the condition token and a grid's codes in raster order —
//!   autoregressive (causal, next-code cross-entropy with taming's `pkeep` corruption) or masked
//!   (bidirectional, MaskGIT's cosine schedule) — in LlamaGen's block style (RMSNorm, SwiGLU,
//!   2-D rotary positions) or minGPT's as taming ships it ([`BlockStyle`]), attention through
//!   libtorch's fused `scaled_dot_product_attention`;
//! * conditioning on a class with LlamaGen's label dropout, or a start token ([`Conditioning`]);
//! * [`PriorConfig::preset`]: a demo prior, LlamaGen's GPT-B and GPT-L, taming's 16×16 shape,
//!   with the references' parameter counts (tested);
//! * [`Prior::sample`]: temperature, top-k, top-p, classifier-free guidance, a key/value cache,
//!   per-sample seeds; MaskGIT's parallel decoding for the masked prior ([`Sampling`]);
//! * [`Prior::nll`]: held-out negative log-likelihood (nats per code; bits = nats / ln 2).
//!
//! The training loop (resume, checkpoints, logging, data-parallel) is vq-train's; this crate
//! holds the model and its maths.

mod config;
mod error;
mod model;
mod objective;
mod sample;
mod transformer;

pub use config::{BlockStyle, Conditioning, PRESETS, PriorConfig, PriorKind, find_multiple};
pub use error::{PriorError, Result};
pub use model::{KvCache, Prior};
pub use objective::cosine_mask_fraction;
pub use sample::{Cache, Sampling};
pub use tch;
