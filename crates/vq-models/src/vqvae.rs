//! A VQ autoencoder: encoder → (1×1 conv) → [`VectorQuantizer`] → (1×1 conv) → decoder, with a
//! taming CNN or a ViT as encoder/decoder. The paper's VQ-VAE (Table 1), the autoencoder of its
//! VQGANs (Tables 2–3) and ViT-VQGAN (Table 4).

use tch::Tensor;
use tch::nn::{self, Module};
use vq_tch::{Mode, Projection, VectorQuantizer, VectorQuantizerConfig, VqOutput};

use crate::error::{ModelError, Result};
use crate::taming::{Decoder, Encoder, TamingConfig};
use crate::timesformer::{TimeSformerConfig, TimeSformerDecoder, TimeSformerEncoder};
use crate::vit::{VitConfig, VitDecoder, VitEncoder};

/// The encoder / decoder architecture. Serialised as the inner configuration (the fields tell
/// which one it is; see [`Backbone::FIELDS`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum Backbone {
    /// taming-transformers' CNN.
    Taming(TamingConfig),
    /// enhancing-transformers' ViT.
    Vit(VitConfig),
    /// TimeSformer for video (inputs `(B, C, T, S, S)`).
    TimeSformer(TimeSformerConfig),
}

impl Backbone {
    /// Each architecture's name and configuration fields. A configuration is read as the
    /// architecture whose fields it names most, so that a misspelt, missing or mistyped field is
    /// reported by that architecture's own error, at its path (`ch_mult[2]: invalid type: …`),
    /// rather than as "no variant matched".
    pub const FIELDS: [(&'static str, &'static [&'static str]); 3] = [
        (
            "taming-transformers' CNN",
            &[
                "ch",
                "ch_mult",
                "num_res_blocks",
                "attn_resolutions",
                "in_channels",
                "out_channels",
                "resolution",
                "z_channels",
                "norm_groups",
            ],
        ),
        (
            "the ViT",
            &[
                "image_size",
                "patch_size",
                "channels",
                "dim",
                "depth",
                "heads",
                "dim_head",
                "mlp_dim",
            ],
        ),
        (
            "TimeSformer",
            &[
                "frames",
                "image_size",
                "patch_size",
                "channels",
                "hidden",
                "layers",
                "heads",
                "intermediate",
                "layer_norm_eps",
            ],
        ),
    ];
}

impl<'de> serde::Deserialize<'de> for Backbone {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(d)?;
        let keys: Vec<&str> = match &value {
            serde_json::Value::Object(map) => map.keys().map(String::as_str).collect(),
            other => {
                return Err(D::Error::custom(format!(
                    "expected the fields of an encoder/decoder, got {other}"
                )));
            }
        };
        let named = |fields: &[&str]| keys.iter().filter(|k| fields.contains(k)).count();
        // The first architecture with the most fields named (ties: the order of FIELDS).
        let (best, count) = (0..Self::FIELDS.len())
            .map(|i| (i, named(Self::FIELDS[i].1)))
            .fold((0, 0), |b, c| if c.1 > b.1 { c } else { b });
        if count == 0 {
            let all: Vec<String> = Self::FIELDS
                .iter()
                .map(|(name, fields)| format!("{name} ({})", fields.join(", ")))
                .collect();
            return Err(D::Error::custom(format!(
                "names none of the fields of {}",
                all.join("; or ")
            )));
        }
        let at = |e: serde_path_to_error::Error<serde_json::Error>| {
            let path = e.path().to_string();
            let name = Self::FIELDS[best].0;
            match path.as_str() {
                "." | "" => D::Error::custom(format!("{} (read as {name})", e.into_inner())),
                _ => D::Error::custom(format!("{path}: {} (read as {name})", e.into_inner())),
            }
        };
        match best {
            0 => serde_path_to_error::deserialize(value).map(Self::Taming),
            1 => serde_path_to_error::deserialize(value).map(Self::Vit),
            _ => serde_path_to_error::deserialize(value).map(Self::TimeSformer),
        }
        .map_err(at)
    }
}

impl Backbone {
    /// Image channels in.
    pub fn in_channels(&self) -> usize {
        match self {
            Self::Taming(t) => t.in_channels,
            Self::Vit(v) => v.channels,
            Self::TimeSformer(s) => s.channels,
        }
    }

    /// Image channels out.
    pub fn out_channels(&self) -> usize {
        match self {
            Self::Taming(t) => t.out_channels,
            Self::Vit(v) => v.channels,
            Self::TimeSformer(s) => s.channels,
        }
    }

    /// Input side length.
    pub fn resolution(&self) -> usize {
        match self {
            Self::Taming(t) => t.resolution,
            Self::Vit(v) => v.image_size,
            Self::TimeSformer(s) => s.image_size,
        }
    }

    /// Channels of the encoder output.
    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Taming(t) => t.z_channels,
            Self::Vit(v) => v.dim,
            Self::TimeSformer(s) => s.hidden,
        }
    }

    /// Side length of the latent grid.
    pub fn latent_resolution(&self) -> usize {
        match self {
            Self::Taming(t) => t.latent_resolution(),
            Self::Vit(v) => v.grid(),
            Self::TimeSformer(s) => s.grid(),
        }
    }

    /// Frames per clip for video backbones, `None` for images.
    pub fn frames(&self) -> Option<usize> {
        match self {
            Self::TimeSformer(s) => Some(s.frames),
            _ => None,
        }
    }

    /// The taming configuration, if it is one.
    pub fn taming_mut(&mut self) -> Option<&mut TamingConfig> {
        match self {
            Self::Taming(t) => Some(t),
            _ => None,
        }
    }

    /// The ViT configuration, if it is one.
    pub fn vit_mut(&mut self) -> Option<&mut VitConfig> {
        match self {
            Self::Vit(v) => Some(v),
            _ => None,
        }
    }

    /// The TimeSformer configuration, if it is one.
    pub fn timesformer_mut(&mut self) -> Option<&mut TimeSformerConfig> {
        match self {
            Self::TimeSformer(s) => Some(s),
            _ => None,
        }
    }

    fn validate(&self) -> Result<()> {
        match self {
            Self::Taming(t) => t.validate(),
            Self::Vit(v) => v.validate(),
            Self::TimeSformer(s) => s.validate(),
        }
    }
}

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
    /// Encoder / decoder architecture and shape.
    pub autoencoder: Backbone,
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
        let z = self.autoencoder.latent_channels();
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
/// (`encoder.*`, `quant_conv.*`, `quantize.*`, `post_quant_conv.*`, `decoder.*`; inside
/// `encoder`/`decoder` the names of the backbone's reference code).
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
    encoder: Box<dyn Module>,
    quant_conv: Option<nn::Conv2D>,
    quantize: VectorQuantizer,
    post_quant_conv: Option<nn::Conv2D>,
    decoder: AnyDecoder,
}

#[derive(Debug)]
enum AnyDecoder {
    Taming(Box<Decoder>),
    Vit(Box<VitDecoder>),
    TimeSformer(Box<TimeSformerDecoder>),
}

impl VqAutoencoder {
    /// Builds the model's variables under `p`.
    ///
    /// # Errors
    /// [`ModelError::Config`] for an invalid config.
    pub fn new(p: &nn::Path, config: &VqAutoencoderConfig) -> Result<Self> {
        config.validate()?;
        let z = config.autoencoder.latent_channels() as i64;
        let d = config.quantizer.codebook_dim as i64;
        // taming's VQModel: nn.Conv2d 1×1 with PyTorch's default initialisation.
        let one = |cin: i64| vq_tch::init::torch_conv(cin as usize, 1, 1, 0);
        let (quant_conv, post_quant_conv) = match config.quant_conv {
            QuantConv::None => (None, None),
            QuantConv::Conv1x1 => (
                Some(nn::conv2d(p / "quant_conv", z, d, 1, one(z))),
                Some(nn::conv2d(p / "post_quant_conv", d, z, 1, one(d))),
            ),
        };
        let (encoder, decoder): (Box<dyn Module>, AnyDecoder) = match &config.autoencoder {
            Backbone::Taming(t) => (
                Box::new(Encoder::new(&(p / "encoder"), t)?),
                AnyDecoder::Taming(Box::new(Decoder::new(&(p / "decoder"), t)?)),
            ),
            Backbone::Vit(v) => (
                Box::new(VitEncoder::new(&(p / "encoder"), v)?),
                AnyDecoder::Vit(Box::new(VitDecoder::new(&(p / "decoder"), v)?)),
            ),
            Backbone::TimeSformer(s) => (
                Box::new(TimeSformerEncoder::new(&(p / "encoder"), s)?),
                AnyDecoder::TimeSformer(Box::new(TimeSformerDecoder::new(&(p / "decoder"), s)?)),
            ),
        };
        Ok(Self {
            encoder,
            quant_conv,
            quantize: VectorQuantizer::new(&(p / "quantize"), config.quantizer)?,
            post_quant_conv,
            decoder,
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

    /// Trains data-parallel in `group` (or alone with `None`): the quantizer's EMA codebook
    /// statistics are summed over the ranks ([`VectorQuantizer::set_process_group`]). The
    /// encoder and decoder need nothing (their gradients are averaged by the trainer).
    pub fn set_process_group(&mut self, group: Option<std::sync::Arc<vq_dist::ProcessGroup>>) {
        self.quantize
            .set_process_group(group.map(|g| g as std::sync::Arc<dyn vq_tch::Collective>));
    }

    /// When the quantizer's device search checks its inputs for NaN / ±∞
    /// ([`VectorQuantizer::set_finite_check`]).
    pub fn set_finite_check(&mut self, check: vq_tch::FiniteCheck) {
        self.quantize.set_finite_check(check);
    }

    /// The weight of the decoder's last layer (VQGAN's adaptive weight is computed on it).
    pub fn last_layer_weight(&self) -> &Tensor {
        match &self.decoder {
            AnyDecoder::Taming(d) => d.last_layer_weight(),
            AnyDecoder::Vit(d) => d.last_layer_weight(),
            AnyDecoder::TimeSformer(d) => d.last_layer_weight(),
        }
    }

    /// Tells the quantizer the optimizer step about to be trained
    /// ([`VectorQuantizer::set_step`]: the Gumbel family's temperature).
    pub fn set_step(&mut self, step: usize) {
        self.quantize.set_step(step);
    }

    /// Image → quantized latents (EMA codebooks learn in [`Mode::Train`]).
    ///
    /// # Errors
    /// [`ModelError::Input`] if `x` is not (B, in_channels, R, R) at the configured resolution
    /// ((B, in_channels, T, R, R) for video backbones);
    /// quantizer errors.
    pub fn encode(&mut self, x: &Tensor, mode: Mode) -> Result<VqOutput> {
        let a = &self.config.autoencoder;
        let size = x.size();
        let (c, r) = (a.in_channels() as i64, a.resolution() as i64);
        let ok = match a.frames() {
            None => size.len() == 4 && size[1..] == [c, r, r],
            Some(t) => size.len() == 5 && size[1..] == [c, t as i64, r, r],
        };
        if !ok {
            return Err(ModelError::Input {
                expected: match a.frames() {
                    None => format!("(B, {c}, {r}, {r})"),
                    Some(t) => format!("(B, {c}, {t}, {r}, {r})"),
                },
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
        match &self.decoder {
            AnyDecoder::Taming(d) => d.forward(&h),
            AnyDecoder::Vit(d) => d.forward(&h),
            AnyDecoder::TimeSformer(d) => d.forward(&h),
        }
    }

    /// Code indices → image: the codebook rows of `indices` ((B, h, w), or (B, t, h, w) for
    /// video backbones; as [`encode`](Self::encode) returns them in `VqOutput::indices`) through
    /// the output projection, `post_quant_conv` and the decoder. For the indices of a batch,
    /// this is [`forward`](Self::forward)'s reconstruction of that batch in [`Mode::Eval`].
    ///
    /// # Errors
    /// The quantizer's errors for indices of another rank or type or outside the codebook.
    pub fn decode_codes(&self, indices: &Tensor) -> Result<Tensor> {
        Ok(self.decode(&self.quantize.embed(indices)?))
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

#[cfg(test)]
mod tests {
    use super::Backbone;
    use crate::Preset;

    fn read(v: serde_json::Value) -> Result<Backbone, String> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let at = e.path().to_string();
            format!("{at}: {}", e.into_inner())
        })
    }

    /// The field lists that pick the architecture are each configuration's own fields: every
    /// preset's backbone serialises to exactly its list and reads back as itself.
    #[test]
    fn every_presets_backbone_names_its_listed_fields_and_reads_back() {
        for preset in Preset::ALL {
            let backbone = preset.config().autoencoder;
            let v = serde_json::to_value(&backbone).unwrap();
            let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
            let i = match &backbone {
                Backbone::Taming(_) => 0,
                Backbone::Vit(_) => 1,
                Backbone::TimeSformer(_) => 2,
            };
            let mut want = Backbone::FIELDS[i].1.to_vec();
            keys.sort_unstable();
            want.sort_unstable();
            assert_eq!(keys, want, "{}", preset.name());
            assert_eq!(read(v).unwrap(), backbone, "{}", preset.name());
        }
    }

    /// A misspelt, mistyped or missing field is named by the architecture the configuration
    /// means, at its path, never as "did not match any variant".
    #[test]
    fn a_bad_field_is_named_by_the_architecture_meant() {
        let with = |preset: Preset, f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
            let mut v = serde_json::to_value(preset.config().autoencoder).unwrap();
            f(v.as_object_mut().unwrap());
            read(v).unwrap_err()
        };
        type Edit<'a> = &'a dyn Fn(&mut serde_json::Map<String, serde_json::Value>);
        let cases: [(Preset, Edit, &[&str]); 5] = [
            (
                Preset::DemoFashionMnist,
                &|m| {
                    m["ch_mult"][2] = "x".into();
                },
                &["ch_mult[2]", "invalid type: string \"x\"", "taming"],
            ),
            (
                Preset::DemoFashionMnist,
                &|m| {
                    let ch = m.remove("ch").unwrap();
                    m.insert("chh".into(), ch);
                },
                &["unknown field `chh`", "taming"],
            ),
            (
                Preset::VitVqganSmall,
                &|m| {
                    m.remove("mlp_dim");
                },
                &["missing field `mlp_dim`", "ViT"],
            ),
            (
                Preset::TimeSformerBair,
                &|m| {
                    m["layer_norm_eps"] = "small".into();
                },
                &["layer_norm_eps", "TimeSformer"],
            ),
            (
                Preset::DemoFashionMnist,
                &|m| {
                    m.clear();
                    m.insert("width".into(), 3.into());
                },
                &[
                    "names none of the fields",
                    "ch_mult",
                    "mlp_dim",
                    "layer_norm_eps",
                ],
            ),
        ];
        for (preset, edit, want) in cases {
            let err = with(preset, edit);
            assert!(!err.contains("variant"), "{err}");
            for w in want {
                assert!(err.contains(w), "{w:?} not in {err}");
            }
        }
    }
}
