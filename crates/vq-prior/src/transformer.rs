//! The transformer blocks both prior kinds share, in the two styles of [`BlockStyle`]:
//! pre-norm attention through libtorch's fused `scaled_dot_product_attention` (causal for the
//! autoregressive prior, bidirectional for the masked one), with an optional key/value cache,
//! and the feed-forward.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::config::{BlockStyle, PriorConfig};

/// The weights of every linear and embedding layer start at zero here and are then drawn
/// normal(0, 0.02) — LlamaGen's and minGPT's `_init_weights` — from a host generator seeded by
/// the configuration ([`Prior::new`](crate::Prior::new)), which keeps libtorch's global generator
/// out of it.
pub(crate) const INIT: Init = Init::Const(0.0);

/// A bias-free linear layer with [`INIT`] weights.
pub(crate) fn linear_no_bias(p: nn::Path, i: usize, o: usize) -> nn::Linear {
    nn::linear(
        p,
        i as i64,
        o as i64,
        nn::LinearConfig {
            ws_init: INIT,
            bs_init: None,
            bias: false,
        },
    )
}

/// A linear layer with [`INIT`] weights and a zero bias (minGPT).
fn linear_bias(p: nn::Path, i: usize, o: usize) -> nn::Linear {
    nn::linear(
        p,
        i as i64,
        o as i64,
        nn::LinearConfig {
            ws_init: INIT,
            bs_init: Some(Init::Const(0.0)),
            bias: true,
        },
    )
}

/// RMSNorm (ε = 1e-5, computed in f32, LlamaGen) or LayerNorm (ε = 1e-5).
#[derive(Debug)]
pub(crate) enum Norm {
    Rms(Tensor),
    Layer(nn::LayerNorm),
}

impl Norm {
    pub(crate) fn new(p: nn::Path, style: BlockStyle, d: usize) -> Self {
        match style {
            BlockStyle::Llama => Self::Rms(p.var("weight", &[d as i64], Init::Const(1.0))),
            BlockStyle::MinGpt => {
                Self::Layer(nn::layer_norm(p, vec![d as i64], Default::default()))
            }
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Self::Rms(w) => {
                let xf = x.to_kind(Kind::Float);
                let r = (xf.square().mean_dim(-1, true, Kind::Float) + 1e-5).rsqrt();
                (xf * r).to_kind(x.kind()) * w
            }
            Self::Layer(ln) => x.apply(ln),
        }
    }
}

/// The query/key/value projections: LlamaGen's fused `wqkv`, or minGPT's three with bias.
#[derive(Debug)]
enum Qkv {
    Fused(nn::Linear),
    Separate {
        query: nn::Linear,
        key: nn::Linear,
        value: nn::Linear,
    },
}

#[derive(Debug)]
enum FeedForward {
    /// `w2(silu(w1 x) · w3 x)`.
    SwiGlu {
        w1: nn::Linear,
        w2: nn::Linear,
        w3: nn::Linear,
    },
    /// `proj(gelu(fc x))`.
    Gelu { fc: nn::Linear, proj: nn::Linear },
}

/// One key/value cache of a block: (B, H, S_max, head_dim) each, filled up to `len`.
#[derive(Debug)]
pub(crate) struct LayerCache {
    keys: Tensor,
    values: Tensor,
}

/// One pre-norm block: `h = x + attn(norm₁ x)`, `out = h + ffn(norm₂ h)`.
#[derive(Debug)]
pub(crate) struct Block {
    attn_norm: Norm,
    qkv: Qkv,
    out: nn::Linear,
    ffn_norm: Norm,
    ffn: FeedForward,
    heads: i64,
    head_dim: i64,
}

/// What a block's forward reads besides its input.
#[derive(Clone, Copy)]
pub(crate) struct Pass<'a> {
    /// Rotary table rows of the positions (S, head_dim/2, 2), for [`BlockStyle::Llama`].
    pub rope: Option<&'a Tensor>,
    /// Causal (autoregressive) or bidirectional attention.
    pub causal: bool,
    /// Dropout probability (0 outside training).
    pub dropout: f64,
    /// Training (dropout active).
    pub train: bool,
}

impl Block {
    /// The block's layers under `p`, with the reference's variable names
    /// (LlamaGen: `attention.wqkv`, `attention.wo`, `feed_forward.w{1,2,3}`,
    /// `attention_norm`, `ffn_norm`; minGPT: `ln1`, `attn.{query,key,value,proj}`, `ln2`,
    /// `mlp.{0,2}`).
    pub(crate) fn new(p: &nn::Path, c: &PriorConfig) -> Self {
        let (d, hidden) = (c.width, c.hidden());
        let (attn_norm, qkv, out, ffn_norm, ffn) = match c.style {
            BlockStyle::Llama => (
                Norm::new(p / "attention_norm", c.style, d),
                Qkv::Fused(linear_no_bias(p / "attention" / "wqkv", d, 3 * d)),
                linear_no_bias(p / "attention" / "wo", d, d),
                Norm::new(p / "ffn_norm", c.style, d),
                FeedForward::SwiGlu {
                    w1: linear_no_bias(p / "feed_forward" / "w1", d, hidden),
                    w3: linear_no_bias(p / "feed_forward" / "w3", d, hidden),
                    w2: linear_no_bias(p / "feed_forward" / "w2", hidden, d),
                },
            ),
            BlockStyle::MinGpt => (
                Norm::new(p / "ln1", c.style, d),
                Qkv::Separate {
                    key: linear_bias(p / "attn" / "key", d, d),
                    query: linear_bias(p / "attn" / "query", d, d),
                    value: linear_bias(p / "attn" / "value", d, d),
                },
                linear_bias(p / "attn" / "proj", d, d),
                Norm::new(p / "ln2", c.style, d),
                FeedForward::Gelu {
                    fc: linear_bias(p / "mlp" / "0", d, hidden),
                    proj: linear_bias(p / "mlp" / "2", hidden, d),
                },
            ),
        };
        Self {
            attn_norm,
            qkv,
            out,
            ffn_norm,
            ffn,
            heads: c.heads as i64,
            head_dim: c.head_dim() as i64,
        }
    }

    /// The weights initialised normal(0, 0.02), in a fixed order.
    pub(crate) fn normal_weights(&self) -> Vec<&Tensor> {
        let mut w = match &self.qkv {
            Qkv::Fused(l) => vec![&l.ws],
            Qkv::Separate { query, key, value } => vec![&key.ws, &query.ws, &value.ws],
        };
        w.push(&self.out.ws);
        match &self.ffn {
            FeedForward::SwiGlu { w1, w2, w3 } => w.extend([&w1.ws, &w3.ws, &w2.ws]),
            FeedForward::Gelu { fc, proj } => w.extend([&fc.ws, &proj.ws]),
        }
        w
    }

    /// An empty cache for `batch` sequences of up to `len` positions.
    pub(crate) fn cache(&self, batch: i64, len: i64, like: &Tensor) -> LayerCache {
        let shape = [batch, self.heads, len, self.head_dim];
        let opts = (like.kind(), like.device());
        LayerCache {
            keys: Tensor::zeros(shape, opts),
            values: Tensor::zeros(shape, opts),
        }
    }

    /// The block on `x` (B, S, d). With a cache, `x` holds positions `start..start + S` (a
    /// prefill from 0, or one position), whose keys and values are stored; attention reads
    /// every cached position up to the last one.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        pass: Pass<'_>,
        cache: Option<(&mut LayerCache, i64)>,
    ) -> Tensor {
        let a = self.attention(&self.attn_norm.forward(x), pass, cache);
        let h = x + a.dropout(pass.dropout, pass.train);
        let f = self.feed_forward(&self.ffn_norm.forward(&h), pass);
        h + f
    }

    fn attention(
        &self,
        x: &Tensor,
        pass: Pass<'_>,
        cache: Option<(&mut LayerCache, i64)>,
    ) -> Tensor {
        let (b, s, d) = x.size3().expect("(B, S, d) input");
        let split = |t: Tensor| t.view([b, s, self.heads, self.head_dim]);
        let (q, k, v) = match &self.qkv {
            Qkv::Fused(w) => {
                let parts = x.apply(w).split(d, -1);
                let mut it = parts.into_iter().map(split);
                (it.next().unwrap(), it.next().unwrap(), it.next().unwrap())
            }
            Qkv::Separate { query, key, value } => (
                split(x.apply(query)),
                split(x.apply(key)),
                split(x.apply(value)),
            ),
        };
        let (q, k) = match pass.rope {
            Some(table) => (rotate(&q, table), rotate(&k, table)),
            None => (q, k),
        };
        let (q, k, v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
        let (k, v, causal) = match cache {
            None => (k, v, pass.causal),
            Some((c, start)) => {
                c.keys.narrow(2, start, s).copy_(&k);
                c.values.narrow(2, start, s).copy_(&v);
                let end = start + s;
                // A prefill from 0 is causal among its own positions; a single position reads
                // every cached one.
                (
                    c.keys.narrow(2, 0, end),
                    c.values.narrow(2, 0, end),
                    pass.causal && s > 1,
                )
            }
        };
        let o = Tensor::scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, 0.0, causal, None, false,
        );
        o.transpose(1, 2)
            .contiguous()
            .view([b, s, d])
            .apply(&self.out)
    }

    fn feed_forward(&self, x: &Tensor, pass: Pass<'_>) -> Tensor {
        let y = match &self.ffn {
            FeedForward::SwiGlu { w1, w2, w3 } => (x.apply(w1).silu() * x.apply(w3)).apply(w2),
            FeedForward::Gelu { fc, proj } => x.apply(fc).gelu("none").apply(proj),
        };
        y.dropout(pass.dropout, pass.train)
    }
}

/// LlamaGen's 2-D rotary table for a `(h, w)` grid after `prefix` condition positions:
/// rows (prefix + h·w, head_dim/2, 2) of (cos, sin); the head dimension's first half rotates
/// by the row, the second by the column, at frequencies `base^(−2i/(head_dim/2))`; condition
/// rows are zero (as LlamaGen's `precompute_freqs_cis_2d`, which zeroes the class token's query
/// and key).
pub(crate) fn rope_2d(h: usize, w: usize, head_dim: usize, prefix: usize, base: f64) -> Tensor {
    let half = head_dim / 2;
    let freqs: Vec<f64> = (0..half / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f64 / half as f64))
        .collect();
    let mut table = vec![0f32; (prefix + h * w) * half * 2];
    for r in 0..h {
        for c in 0..w {
            let row = prefix + r * w + c;
            for (j, f) in freqs.iter().enumerate() {
                for (slot, t) in [(j, r as f64 * f), (half / 2 + j, c as f64 * f)] {
                    let at = (row * half + slot) * 2;
                    table[at] = t.cos() as f32;
                    table[at + 1] = t.sin() as f32;
                }
            }
        }
    }
    Tensor::from_slice(&table).view([(prefix + h * w) as i64, half as i64, 2])
}

/// Rotates `x` (B, S, H, head_dim) by `table` (S, head_dim/2, 2), adjacent pairs as complex
/// numbers, in f32.
fn rotate(x: &Tensor, table: &Tensor) -> Tensor {
    let (b, s, h, hd) = x.size4().expect("(B, S, H, head_dim)");
    let xs = x.to_kind(Kind::Float).reshape([b, s, h, hd / 2, 2]);
    let t = table.view([1, s, 1, hd / 2, 2]);
    let (x0, x1) = (xs.select(-1, 0), xs.select(-1, 1));
    let (cos, sin) = (t.select(-1, 0), t.select(-1, 1));
    Tensor::stack(&[&x0 * &cos - &x1 * &sin, &x1 * &cos + &x0 * &sin], -1)
        .flatten(3, 4)
        .to_kind(x.kind())
}
