//! A VQ autoencoder: taming encoder → (1×1 conv) → [`VectorQuantizer`] → (1×1 conv) → taming
//! decoder. The paper's VQ-VAE (Table 1) and the autoencoder of its VQGANs (Tables 2–3).

use tch::Tensor;
use tch::nn::{self, Module};
use vq_tch::{Mode, Projection, VectorQuantizer, VectorQuantizerConfig, VqOutput};

use crate::error::{ModelError, Result};
use crate::taming::{Decoder, Encoder, TamingConfig};

/// How the encoder's `z_channels` reach the quantizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantConv {
    /// The quantizer takes the encoder output directly (its own [`Projection`], if any, maps
    /// `z_channels` to the code dimension): the paper's Table-1 code.
    None,
    /// taming / latent-diffusion: `quant_conv` = Conv1×1(z_channels → D) before the quantizer and
    /// `post_quant_conv` = Conv1×1(D → z_channels) after it.
    Conv1x1,
}

/// Configuration of a [`VqAutoencoder`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqAutoencoderConfig {
    /// Encoder / decoder shape.
    pub autoencoder: TamingConfig,
    /// Convolutions around the quantizer.
    pub quant_conv: QuantConv,
    /// The quantizer.
    pub quantizer: VectorQuantizerConfig,
}

impl VqAutoencoderConfig {
    /// Checks the parts and that their channel counts fit together.
    ///
    /// # Errors
    /// [`ModelError::Config`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        self.autoencoder.validate()?;
        self.quantizer.validate()?;
        let z = self.autoencoder.z_channels;
        let q = &self.quantizer;
        let (field, ok, want) = match self.quant_conv {
            QuantConv::None => ("quantizer", q.input_channels() == z, z),
            QuantConv::Conv1x1 => (
                "quantizer",
                q.projection == Projection::Identity,
                q.codebook_dim,
            ),
        };
        if !ok {
            return Err(ModelError::Config {
                field,
                why: format!(
                    "with quant_conv {:?} the quantizer must take {want} channels (got {}, projection {:?})",
                    self.quant_conv,
                    q.input_channels(),
                    q.projection
                ),
            });
        }
        Ok(())
    }
}

/// What [`VqAutoencoder::forward`] returns.
#[derive(Debug)]
pub struct AutoencoderOutput {
    /// Reconstruction, same shape as the input.
    pub reconstruction: Tensor,
    /// The quantizer's output (quantized latents, indices, loss terms).
    pub vq: VqOutput,
}

/// Encoder, quantizer and decoder. Variables live under the given path with taming's names
/// (`encoder.*`, `quant_conv.*`, `quantize.*`, `post_quant_conv.*`, `decoder.*`).
///
/// ```
/// use tch::{nn, Device, Kind, Tensor};
/// use vq_models::{Preset, VqAutoencoder};
/// use vq_tch::Mode;
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let cfg = Preset::DemoFashionMnist.config();
/// let mut model = VqAutoencoder::new(&vs.root(), &cfg).unwrap();
/// let x = Tensor::zeros([2, 1, 32, 32], (Kind::Float, Device::Cpu));
/// let out = model.forward(&x, Mode::Eval).unwrap();
/// assert_eq!(out.reconstruction.size(), [2, 1, 32, 32]);
/// assert_eq!(out.vq.indices.size(), [2, 8, 8]);
/// ```
#[derive(Debug)]
pub struct VqAutoencoder {
    config: VqAutoencoderConfig,
    encoder: Encoder,
    quant_conv: Option<nn::Conv2D>,
    quantize: VectorQuantizer,
    post_quant_conv: Option<nn::Conv2D>,
    decoder: Decoder,
}

impl VqAutoencoder {
    /// Builds the model's variables under `p`.
    ///
    /// # Errors
    /// [`ModelError::Config`] for an invalid config.
    pub fn new(p: &nn::Path, config: &VqAutoencoderConfig) -> Result<Self> {
        config.validate()?;
        let z = config.autoencoder.z_channels as i64;
        let d = config.quantizer.codebook_dim as i64;
        let one = nn::ConvConfig::default();
        let (quant_conv, post_quant_conv) = match config.quant_conv {
            QuantConv::None => (None, None),
            QuantConv::Conv1x1 => (
                Some(nn::conv2d(p / "quant_conv", z, d, 1, one)),
                Some(nn::conv2d(p / "post_quant_conv", d, z, 1, one)),
            ),
        };
        Ok(Self {
            encoder: Encoder::new(&(p / "encoder"), &config.autoencoder)?,
            quant_conv,
            quantize: VectorQuantizer::new(&(p / "quantize"), config.quantizer)?,
            post_quant_conv,
            decoder: Decoder::new(&(p / "decoder"), &config.autoencoder)?,
            config: config.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VqAutoencoderConfig {
        &self.config
    }

    /// The quantizer.
    pub fn quantizer(&self) -> &VectorQuantizer {
        &self.quantize
    }

    /// The decoder (its last layer feeds VQGAN's adaptive weight).
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// Image → quantized latents (EMA codebooks learn in [`Mode::Train`]).
    ///
    /// # Errors
    /// [`ModelError::Input`] if `x` is not (B, in_channels, R, R) at the configured resolution;
    /// quantizer errors.
    pub fn encode(&mut self, x: &Tensor, mode: Mode) -> Result<VqOutput> {
        let a = &self.config.autoencoder;
        let size = x.size();
        let (c, r) = (a.in_channels as i64, a.resolution as i64);
        if size.len() != 4 || size[1] != c || size[2] != r || size[3] != r {
            return Err(ModelError::Input {
                expected: format!("(B, {c}, {r}, {r})"),
                got: size,
            });
        }
        let mut h = self.encoder.forward(x);
        if let Some(conv) = &self.quant_conv {
            h = h.apply(conv);
        }
        Ok(self.quantize.forward(&h, mode)?)
    }

    /// Quantized latents → image.
    pub fn decode(&self, quantized: &Tensor) -> Tensor {
        let h = match &self.post_quant_conv {
            Some(conv) => quantized.apply(conv),
            None => quantized.shallow_clone(),
        };
        self.decoder.forward(&h)
    }

    /// Encode, quantize, decode.
    ///
    /// # Errors
    /// As [`encode`](Self::encode).
    pub fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<AutoencoderOutput> {
        let vq = self.encode(x, mode)?;
        Ok(AutoencoderOutput {
            reconstruction: self.decode(&vq.quantized),
            vq,
        })
    }
}
