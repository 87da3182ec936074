//! The taming-transformers convolutional encoder and decoder (Esser et al., `taming/modules/
//! diffusionmodules/model.py`), used by the paper's VQ-VAE and VQGAN models.
//!
//! GroupNorm (32 groups, ε = 1e-6) + swish ResNet blocks, stride-2 downsampling after a
//! zero padding of one pixel on the right and bottom only, nearest-neighbour ×2 upsampling followed
//! by a 3×3 convolution, single-head self-attention blocks at chosen resolutions, and a middle
//! block (ResNet, attention, ResNet). Variable names follow the PyTorch module tree
//! (`down.0.block.1.norm1.weight`, `mid.attn_1.q.bias`, ...), so a taming state dict converted to
//! safetensors loads by name.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};

/// Shape of a taming encoder / decoder pair.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TamingConfig {
    /// Base channel count `ch`.
    pub ch: usize,
    /// Channel multiplier per resolution level; the number of levels is its length and the
    /// spatial downsampling factor is `2^(levels − 1)`.
    pub ch_mult: Vec<usize>,
    /// ResNet blocks per level (the decoder uses one more per level, as taming does).
    pub num_res_blocks: usize,
    /// Resolutions (side lengths) at which attention blocks follow the ResNet blocks.
    pub attn_resolutions: Vec<usize>,
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Input side length.
    pub resolution: usize,
    /// Channels of the encoder output / decoder input.
    pub z_channels: usize,
    /// Groups of every GroupNorm (taming: 32; must divide every channel count).
    pub norm_groups: usize,
}

impl TamingConfig {
    /// Spatial downsampling factor `2^(levels − 1)`.
    pub fn downsampling(&self) -> usize {
        1 << self.ch_mult.len().saturating_sub(1)
    }

    /// Latent side length for the configured input resolution.
    pub fn latent_resolution(&self) -> usize {
        self.resolution / self.downsampling()
    }

    /// Checks the shape once.
    ///
    /// # Errors
    /// [`ModelError::Config`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, why: String| Err(ModelError::Config { field, why });
        if self.ch == 0 || self.ch_mult.is_empty() || self.ch_mult.contains(&0) {
            return bad("ch_mult", "ch and every multiplier must be > 0".into());
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.z_channels == 0 {
            return bad("channels", "in, out and z channels must be > 0".into());
        }
        if self.resolution == 0 || !self.resolution.is_multiple_of(self.downsampling()) {
            return bad(
                "resolution",
                format!(
                    "{} is not a multiple of the downsampling factor {}",
                    self.resolution,
                    self.downsampling()
                ),
            );
        }
        let g = self.norm_groups;
        if let Some(c) = std::iter::once(1)
            .chain(self.ch_mult.iter().copied())
            .map(|m| m * self.ch)
            .find(|c| g == 0 || !c.is_multiple_of(g))
        {
            return bad(
                "norm_groups",
                format!("{g} groups do not divide {c} channels"),
            );
        }
        Ok(())
    }
}

/// `nn.Conv2d` with PyTorch's default initialisation, which taming-transformers and
/// latent-diffusion keep ([`vq_tch::init`]).
fn conv(p: nn::Path, cin: usize, cout: usize, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let cfg = vq_tch::init::torch_conv(cin, k as usize, stride, padding);
    nn::conv2d(p, cin as i64, cout as i64, k, cfg)
}

fn norm(p: nn::Path, groups: usize, c: usize) -> nn::GroupNorm {
    let cfg = nn::GroupNormConfig {
        eps: 1e-6,
        ..Default::default()
    };
    nn::group_norm(p, groups as i64, c as i64, cfg)
}

fn swish(x: &Tensor) -> Tensor {
    x * x.sigmoid()
}

/// `x + conv2(swish(norm2(conv1(swish(norm1(x))))))`, with a 1×1 shortcut when the channel
/// count changes.
#[derive(Debug)]
struct ResnetBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    nin_shortcut: Option<nn::Conv2D>,
}

impl ResnetBlock {
    fn new(p: nn::Path, groups: usize, cin: usize, cout: usize) -> Self {
        Self {
            norm1: norm(&p / "norm1", groups, cin),
            conv1: conv(&p / "conv1", cin, cout, 3, 1, 1),
            norm2: norm(&p / "norm2", groups, cout),
            conv2: conv(&p / "conv2", cout, cout, 3, 1, 1),
            nin_shortcut: (cin != cout).then(|| conv(&p / "nin_shortcut", cin, cout, 1, 1, 0)),
        }
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = swish(&x.apply(&self.norm1)).apply(&self.conv1);
        let h = swish(&h.apply(&self.norm2)).apply(&self.conv2);
        match &self.nin_shortcut {
            Some(s) => x.apply(s) + h,
            None => x + h,
        }
    }
}

/// Single-head self-attention over all positions, `x + proj_out(softmax(qkᵀ/√c) v)`.
#[derive(Debug)]
struct AttnBlock {
    norm: nn::GroupNorm,
    q: nn::Conv2D,
    k: nn::Conv2D,
    v: nn::Conv2D,
    proj_out: nn::Conv2D,
}

impl AttnBlock {
    fn new(p: nn::Path, groups: usize, c: usize) -> Self {
        Self {
            norm: norm(&p / "norm", groups, c),
            q: conv(&p / "q", c, c, 1, 1, 0),
            k: conv(&p / "k", c, c, 1, 1, 0),
            v: conv(&p / "v", c, c, 1, 1, 0),
            proj_out: conv(&p / "proj_out", c, c, 1, 1, 0),
        }
    }
}

impl Module for AttnBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("AttnBlock takes (B, C, H, W)");
        let hn = x.apply(&self.norm);
        let q = hn.apply(&self.q).reshape([b, c, h * w]).permute([0, 2, 1]);
        let k = hn.apply(&self.k).reshape([b, c, h * w]);
        let v = hn.apply(&self.v).reshape([b, c, h * w]);
        let attn = (q.bmm(&k) * (c as f64).powf(-0.5)).softmax(2, Kind::Float);
        let out = v.bmm(&attn.permute([0, 2, 1])).reshape([b, c, h, w]);
        x + out.apply(&self.proj_out)
    }
}

/// One resolution level: blocks, optional attention after each block, then resampling.
#[derive(Debug)]
struct Level {
    blocks: Vec<ResnetBlock>,
    attns: Vec<AttnBlock>,
    resample: Option<nn::Conv2D>,
}

/// The middle block: ResNet, attention, ResNet.
#[derive(Debug)]
struct Mid {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl Mid {
    fn new(p: nn::Path, groups: usize, c: usize) -> Self {
        Self {
            block_1: ResnetBlock::new(&p / "block_1", groups, c, c),
            attn_1: AttnBlock::new(&p / "attn_1", groups, c),
            block_2: ResnetBlock::new(&p / "block_2", groups, c, c),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.apply(&self.block_1)
            .apply(&self.attn_1)
            .apply(&self.block_2)
    }
}

fn run_level(level: &Level, mut h: Tensor) -> Tensor {
    for (i, block) in level.blocks.iter().enumerate() {
        h = h.apply(block);
        if let Some(attn) = level.attns.get(i) {
            h = h.apply(attn);
        }
    }
    h
}

/// Image (B, in_channels, R, R) → latent (B, z_channels, R/f, R/f).
#[derive(Debug)]
pub struct Encoder {
    conv_in: nn::Conv2D,
    down: Vec<Level>,
    mid: Mid,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Encoder {
    /// Builds the encoder's variables under `p`.
    ///
    /// # Errors
    /// [`ModelError::Config`] for an invalid config.
    pub fn new(p: &nn::Path, cfg: &TamingConfig) -> Result<Self> {
        cfg.validate()?;
        let g = cfg.norm_groups;
        let conv_in = conv(p / "conv_in", cfg.in_channels, cfg.ch, 3, 1, 1);
        let mut res = cfg.resolution;
        let mut block_in = cfg.ch;
        let mut down = Vec::new();
        for (i, &mult) in cfg.ch_mult.iter().enumerate() {
            let lp = p / "down" / i;
            let block_out = cfg.ch * mult;
            let (mut blocks, mut attns) = (Vec::new(), Vec::new());
            for j in 0..cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(&lp / "block" / j, g, block_in, block_out));
                block_in = block_out;
                if cfg.attn_resolutions.contains(&res) {
                    attns.push(AttnBlock::new(&lp / "attn" / j, g, block_in));
                }
            }
            let resample = (i + 1 != cfg.ch_mult.len()).then(|| {
                res /= 2;
                conv(&lp / "downsample" / "conv", block_in, block_in, 3, 2, 0)
            });
            down.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        Ok(Self {
            conv_in,
            down,
            mid: Mid::new(p / "mid", g, block_in),
            norm_out: norm(p / "norm_out", g, block_in),
            conv_out: conv(p / "conv_out", block_in, cfg.z_channels, 3, 1, 1),
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.apply(&self.conv_in);
        for level in &self.down {
            h = run_level(level, h);
            if let Some(ds) = &level.resample {
                // taming's asymmetric padding: one zero row/column on the bottom/right.
                h = h.constant_pad_nd([0, 1, 0, 1]).apply(ds);
            }
        }
        let h = self.mid.forward(&h);
        swish(&h.apply(&self.norm_out)).apply(&self.conv_out)
    }
}

/// Latent (B, z_channels, r, r) → image (B, out_channels, r·f, r·f).
#[derive(Debug)]
pub struct Decoder {
    conv_in: nn::Conv2D,
    mid: Mid,
    /// Levels from the lowest resolution up (PyTorch index `up.{levels−1−i}`).
    up: Vec<Level>,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    /// Builds the decoder's variables under `p`.
    ///
    /// # Errors
    /// [`ModelError::Config`] for an invalid config.
    pub fn new(p: &nn::Path, cfg: &TamingConfig) -> Result<Self> {
        cfg.validate()?;
        let g = cfg.norm_groups;
        let levels = cfg.ch_mult.len();
        let mut block_in = cfg.ch * cfg.ch_mult[levels - 1];
        let mut res = cfg.latent_resolution();
        let conv_in = conv(p / "conv_in", cfg.z_channels, block_in, 3, 1, 1);
        let mid = Mid::new(p / "mid", g, block_in);
        let mut up = Vec::new();
        for i in (0..levels).rev() {
            let lp = p / "up" / i;
            let block_out = cfg.ch * cfg.ch_mult[i];
            let (mut blocks, mut attns) = (Vec::new(), Vec::new());
            for j in 0..=cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(&lp / "block" / j, g, block_in, block_out));
                block_in = block_out;
                if cfg.attn_resolutions.contains(&res) {
                    attns.push(AttnBlock::new(&lp / "attn" / j, g, block_in));
                }
            }
            let resample = (i != 0).then(|| {
                res *= 2;
                conv(&lp / "upsample" / "conv", block_in, block_in, 3, 1, 1)
            });
            up.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: norm(p / "norm_out", g, block_in),
            conv_out: conv(p / "conv_out", block_in, cfg.out_channels, 3, 1, 1),
        })
    }

    /// The last layer's weight (VQGAN's adaptive discriminator weight uses its gradients).
    pub fn last_layer_weight(&self) -> &Tensor {
        &self.conv_out.ws
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Tensor {
        let h = z.apply(&self.conv_in);
        let mut h = self.mid.forward(&h);
        for level in &self.up {
            h = run_level(level, h);
            if let Some(us) = &level.resample {
                let (_, _, hh, ww) = h.size4().expect("Decoder takes (B, C, H, W)");
                h = h.upsample_nearest2d([hh * 2, ww * 2], None, None).apply(us);
            }
        }
        swish(&h.apply(&self.norm_out)).apply(&self.conv_out)
    }
}
