//! The description of an autoencoder run: [`RunConfig`] (everything that defines its numbers,
//! saved in `run.json` and in every checkpoint), [`TrainOptions`] (how it runs), and
//! [`EncoderGradient`] (how its encoder gets the decoder's gradient). A leaf of the crate: it
//! reads files but trains nothing.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use tch::Device;
use vq_models::{GanConfig, TrainingConfig, VqAutoencoderConfig};
use vq_tch::Precision;

use crate::data::{DataSource, ImageSet, Pipeline};

/// Everything that defines a run's numbers (saved in `run.json` and in every checkpoint; a
/// resume must match it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Preset the run started from (informational).
    pub preset: String,
    /// The model.
    pub model: VqAutoencoderConfig,
    /// Optimiser and schedule.
    pub training: TrainingConfig,
    /// Data source (`fashion-mnist-demo`, `fashion-mnist:<dir>`, `synthetic:<n>`).
    pub data: String,
    /// Geometric preprocessing of image data (`center-crop`, `taming`, `vit-vqgan`); a preset
    /// takes its paper table's ([`Pipeline::for_preset`]). Required in configuration files;
    /// video clips have their loaders' own geometry.
    pub preprocessing: Pipeline,
    /// Seed of the weights, the data order and the codebook.
    pub seed: u64,
    /// Images per forward pass; `training.batch_size` must be a multiple (gradient accumulation).
    pub micro_batch: usize,
    /// VQGAN adversarial training (PatchGAN, hinge loss, adaptive weight); `None` for a VQ-VAE
    /// (reconstruction MSE + quantizer losses).
    #[serde(default)]
    pub gan: Option<GanConfig>,
    /// LPIPS weights (safetensors, see `vq_models::Lpips`): the perceptual term of VQGAN
    /// training and the LPIPS column of evaluations.
    #[serde(default)]
    pub lpips_weights: Option<PathBuf>,
    /// FID Inception weights (safetensors, see `vq_models::FidInception`): the r-FID and r-IS
    /// columns of evaluations.
    #[serde(default)]
    pub inception_weights: Option<PathBuf>,
    /// Arithmetic of the encoder, decoder, discriminator and perceptual network (autocast);
    /// the quantizer, the optimiser state and the weights stay f32 whatever it is, so
    /// checkpoints are the same for every precision.
    #[serde(default)]
    pub precision: Precision,
    /// How the encoder receives the decoder's gradient: through the quantizer (default) or one
    /// of the paper's decoder-based baselines ([`crate::method`]).
    #[serde(default, skip_serializing_if = "EncoderGradient::is_quantizer")]
    pub encoder_gradient: EncoderGradient,
    /// A checkpoint of the reference code (or a state dict in its layout) the model, and the
    /// discriminator if the file has one, start from instead of their random initialisation
    /// ([`crate::pretrained`]); the optimizer starts fresh. Not read when resuming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
}

impl RunConfig {
    /// Switches the quantizer to `family` ([`vq_tch::VectorQuantizerConfig::with_family`]); a
    /// model with a 1×1 `quant_conv` (taming's VQGAN) makes FSQ's D channels there, so its
    /// quantizer keeps no projection. SF-DiVeQ's warm-up is at most a tenth of the run's steps
    /// (counted in training forwards).
    ///
    /// # Errors
    /// The family's rules, naming the field (e.g. heads that do not divide the code dimension,
    /// residual VQ with a cosine codebook).
    pub fn set_family(&mut self, family: vq_tch::Family) -> Result<()> {
        // SF-DiVeQ's warm-up (1000 forwards in the official code, for runs of 100k+ steps) is
        // kept to a tenth of a shorter run.
        let family = match family {
            vq_tch::Family::SfDiveq {
                noise_std,
                warmup_forwards,
            } => vq_tch::Family::SfDiveq {
                noise_std,
                warmup_forwards: warmup_forwards.min(self.training.steps as u64 / 10),
            },
            f => f,
        };
        let mut q = self.model.quantizer.with_family(family).with_context(|| {
            format!(
                "preset {} with quantizer family {}",
                self.preset,
                family.name()
            )
        })?;
        if self.model.quant_conv == vq_models::QuantConv::Conv1x1 {
            q.projection = vq_tch::Projection::Identity;
        }
        self.model.quantizer = q;
        Ok(())
    }

    /// The `split` of `source`, shaped for this run's model (channels, resolution, frames) and
    /// preprocessed with its pipeline.
    ///
    /// # Errors
    /// As [`ImageSet::load`].
    pub fn load_split(&self, source: &DataSource, split: vq_data::Split) -> Result<ImageSet> {
        let a = &self.model.autoencoder;
        ImageSet::load(
            source,
            split,
            a.in_channels(),
            a.resolution(),
            a.frames(),
            self.preprocessing,
        )
    }

    /// What the logged reconstruction loss `rec` is: "MSE" for a VQ-VAE; for a VQGAN its pixel
    /// terms, "+ LPIPS" when the perceptual term is on.
    #[must_use]
    pub fn reconstruction_loss_name(&self) -> String {
        match &self.gan {
            None => "MSE".into(),
            Some(g) if g.perceptual_weight > 0.0 && self.lpips_weights.is_some() => {
                format!("{} + LPIPS", g.pixel_loss_name())
            }
            Some(g) => g.pixel_loss_name().into(),
        }
    }

    /// Reads a configuration file (`--config`). Every field is required; a file without
    /// `preprocessing` is refused with the choices, so no preprocessing is picked silently.
    ///
    /// # Errors
    /// Unreadable or malformed files, named.
    pub fn from_config_file(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        if v.is_object() && v.get("preprocessing").is_none() {
            let preset = v.get("preset").and_then(|p| p.as_str()).unwrap_or("");
            let hint = vq_models::Preset::from_name(preset).map_or_else(
                |_| String::new(),
                |p| {
                    format!(
                        "; preset {preset} uses \"{}\"",
                        Pipeline::for_preset(p).name()
                    )
                },
            );
            anyhow::bail!(
                "{}: no \"preprocessing\" field: set it to one of {}{hint} (`vq-train presets \
                 NAME` prints a complete configuration)",
                path.display(),
                Pipeline::ALL
                    .map(|p| format!("\"{}\"", p.name()))
                    .join(", ")
            );
        }
        from_json_value(v, path)
    }

    /// Reads a run's own `run.json`. Files written before `preprocessing` was a field get the
    /// pipeline those versions trained with ([`Pipeline::legacy_for_preset_name`]).
    ///
    /// # Errors
    /// Unreadable or malformed files, named.
    pub fn from_run_file(path: &Path) -> Result<Self> {
        let mut v = read_json(path)?;
        crate::run::expect_kind(&v, crate::run::RunKind::Tokenizer, path)?;
        Self::upgrade_record(&mut v);
        from_json_value(v, path)
    }

    /// Fills in what a run record (run.json, a checkpoint's state) of an older version lacks:
    /// `preprocessing`. On image folders and ImageNet, where it acts, it is what those versions
    /// chose from the preset's name; on other sources (embedded, IDX, synthetic, video) it
    /// had no effect and a preset's own pipeline is taken, so such runs resume unchanged.
    pub fn upgrade_record(v: &mut serde_json::Value) {
        let Some(o) = v.as_object_mut() else { return };
        if o.contains_key("preprocessing") {
            return;
        }
        let preset = o.get("preset").and_then(|p| p.as_str()).unwrap_or("");
        let data = o.get("data").and_then(|d| d.as_str()).unwrap_or("");
        let acts = matches!(
            DataSource::parse(data),
            Ok(DataSource::ImageFolder(_) | DataSource::ImageNet(_))
        );
        let pipeline = match vq_models::Preset::from_name(preset) {
            Ok(p) if !acts => Pipeline::for_preset(p),
            _ => Pipeline::legacy_for_preset_name(preset),
        };
        o.insert("preprocessing".into(), pipeline.name().into());
    }

    /// Fills the weights that `--lpips` / `--inception` (or the config file) left unset: a
    /// resumed run (`resumed`: its run.json) keeps the LPIPS file it was started with, or none
    /// (its perceptual term cannot change mid-run), and its Inception file; otherwise
    /// `found(network)` is used — [`vq_weights::locate`], the files of `cargo xtask
    /// download-weights` in their default place. Returns one line per file filled, for the log.
    pub fn fill_weights(
        &mut self,
        resumed: Option<&RunConfig>,
        found: impl Fn(vq_weights::Network) -> Option<PathBuf>,
    ) -> Vec<String> {
        use vq_weights::Network;
        let mut filled = Vec::new();
        let slots = [
            (
                Network::Lpips,
                "--lpips",
                resumed.map(|r| r.lpips_weights.clone()),
            ),
            (
                Network::Inception,
                "--inception",
                resumed.and_then(|r| r.inception_weights.clone()).map(Some),
            ),
        ];
        for (network, flag, kept) in slots {
            let slot = match network {
                Network::Lpips => &mut self.lpips_weights,
                Network::Inception => &mut self.inception_weights,
            };
            if slot.is_some() {
                continue;
            }
            *slot = match kept {
                Some(k) => k,
                None => found(network).inspect(|f| {
                    filled.push(format!(
                        "{} weights: {} (the default place; {flag} FILE to choose others)",
                        network.name(),
                        f.display()
                    ))
                }),
            };
        }
        filled
    }

    /// What a checkpoint records and a resume must match: everything but the evaluation-only
    /// Inception weights and the precision (checkpoints are f32 in every precision, so a run
    /// may continue in another one; only an unchanged precision continues bit for bit).
    ///
    /// # Errors
    /// Serialisation errors.
    pub fn resume_key(&self) -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(self)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("inception_weights");
            o.remove("precision");
        }
        Ok(v)
    }

    /// Checks what the parts cannot check alone.
    ///
    /// # Errors
    /// A bad combination, named.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let t = &self.training;
        ensure!(
            t.batch_size > 0 && self.micro_batch > 0,
            "training.batch_size and micro_batch must be > 0, got {} and {}",
            t.batch_size,
            self.micro_batch
        );
        ensure!(
            t.batch_size.is_multiple_of(self.micro_batch),
            "batch size {} is not a multiple of the micro-batch {}",
            t.batch_size,
            self.micro_batch
        );
        ensure!(
            t.learning_rate.is_finite() && t.learning_rate > 0.0,
            "learning rate must be > 0, got {}",
            t.learning_rate
        );
        ensure!(t.steps > 0, "steps must be > 0");
        ensure!(
            t.grad_clip.is_finite() && t.grad_clip >= 0.0,
            "grad_clip must be >= 0 (0: no clipping), got {}",
            t.grad_clip
        );
        ensure!(
            t.weight_decay.is_finite() && t.weight_decay >= 0.0,
            "weight_decay must be >= 0, got {}",
            t.weight_decay
        );
        ensure!(
            [t.betas.0, t.betas.1]
                .iter()
                .all(|b| b.is_finite() && (0.0..1.0).contains(b)),
            "AdamW betas must be in [0, 1), got ({}, {})",
            t.betas.0,
            t.betas.1
        );
        ensure!(
            t.final_lr_fraction.is_finite() && t.final_lr_fraction >= 0.0,
            "final_lr_fraction must be >= 0, got {}",
            t.final_lr_fraction
        );
        for (flag, file) in [
            ("--lpips", &self.lpips_weights),
            ("--inception", &self.inception_weights),
            ("--init-from", &self.init_from),
        ] {
            if let Some(f) = file {
                ensure!(
                    f.is_file(),
                    "{flag} {}: no such file (the weights are checked before training starts)",
                    f.display()
                );
            }
        }
        if let Some(g) = &self.gan {
            g.validate()?;
            ensure!(
                g.in_channels == self.model.autoencoder.out_channels(),
                "the discriminator takes {} channels but the decoder writes {}",
                g.in_channels,
                self.model.autoencoder.out_channels()
            );
        }
        if self.encoder_gradient != EncoderGradient::Quantizer {
            let name = self.encoder_gradient.name();
            ensure!(
                self.gan.is_none(),
                "{name} is a VQ-VAE baseline (paper Table 1): this run trains a VQGAN"
            );
            ensure!(
                self.model.quantizer.projection == vq_tch::Projection::Identity
                    && matches!(self.model.quantizer.family, vq_tch::Family::Nearest),
                "{name} needs a nearest-code quantizer without projections (the decoder's input \
                 must be the code)"
            );
        }
        DataSource::parse(&self.data)?;
        Ok(())
    }
}

/// How to run (not part of the numbers).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The run.
    pub config: RunConfig,
    /// Device to train on.
    pub device: Device,
    /// Run folder (metrics, checkpoints, plots).
    pub out: PathBuf,
    /// Steps between metric lines.
    pub log_every: usize,
    /// Steps between checkpoints (the last step always gets one).
    pub checkpoint_every: usize,
    /// Continue from the run folder's latest checkpoint.
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Stop (with a checkpoint) once this many steps are done, before the configured total; a
    /// later `resume` continues the same run.
    pub stop_after: Option<usize>,
    /// When the step's numbers are read back from the device ([`Readback`](crate::readback::Readback)).
    pub readback: crate::readback::Readback,
    /// Steps to profile ([`ProfileSteps`](crate::profile::ProfileSteps)): a Chrome trace and its
    /// summary in `<out>/profile/`.
    pub profile: Option<crate::profile::ProfileSteps>,
}

/// How the encoder receives the gradient of the decoder's loss in a VQ-VAE run (part of the run
/// configuration; the default is the quantizer's estimator).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EncoderGradient {
    /// Through the quantizer's output (its estimator, or the Gumbel relaxation).
    #[default]
    Quantizer,
    /// `∇_q L + ∇²_q L (e − q)`.
    HessianApprox,
    /// `∇_e L(D(e))` from a second decoder pass.
    ExactGradients,
}

impl EncoderGradient {
    /// Whether this is the default (run records leave the field out then).
    pub fn is_quantizer(&self) -> bool {
        *self == Self::Quantizer
    }

    /// The name of the baseline (`hessian-approx`, `exact-gradients`; `quantizer`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Quantizer => "quantizer",
            Self::HessianApprox => "hessian-approx",
            Self::ExactGradients => "exact-gradients",
        }
    }
}

/// Whether a run checkpointed in `ckpt` under the resume key `was` (at step `done`) may continue
/// under `now` ([`crate::run::may_resume`], after [`RunConfig::upgrade_record`] of `was`).
///
/// # Errors
/// The settings that differ (at most eight), or a total below the steps done.
pub fn may_resume(
    ckpt: &Path,
    was: &serde_json::Value,
    now: &serde_json::Value,
    done: usize,
) -> Result<Option<String>> {
    crate::run::may_resume(ckpt, was, now, done, RunConfig::upgrade_record)
}

/// A configuration from its JSON, with the path of the offending field in the error
/// (`model.quantizer.beta: invalid type: string "x", expected f32`; `model.quantizer: unknown
/// field `betta``).
pub fn from_json_value<T: serde::de::DeserializeOwned>(
    v: serde_json::Value,
    path: &Path,
) -> Result<T> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let at = e.path().to_string();
        let err = e.into_inner();
        match at.as_str() {
            "." | "" => anyhow::anyhow!("{}: {err}", path.display()),
            _ => anyhow::anyhow!("{}: {at}: {err}", path.display()),
        }
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(steps: usize, lr: f64) -> serde_json::Value {
        config(steps, lr).resume_key().unwrap()
    }

    fn config(steps: usize, lr: f64) -> RunConfig {
        let preset = vq_models::Preset::DemoFashionMnist;
        let mut training = preset.training();
        training.steps = steps;
        training.learning_rate = lr;
        RunConfig {
            preset: preset.name().into(),
            model: preset.config(),
            training,
            data: "fashion-mnist-demo".into(),
            preprocessing: Pipeline::CenterCrop,
            seed: 0,
            micro_batch: 16,
            gan: None,
            lpips_weights: None,
            inception_weights: None,
            precision: Precision::default(),
            encoder_gradient: Default::default(),
            init_from: None,
        }
    }

    /// A misspelt key at any depth is refused, and a value of the wrong type is named by its
    /// path — in the quantizer, its codebook learning (an enum's variant), and the top level.
    #[test]
    fn config_errors_name_the_field_at_any_depth() {
        let dir = std::env::temp_dir().join(format!("vq-config-errors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = serde_json::to_value(config(10, 1e-3)).unwrap();
        type Edit = fn(&mut serde_json::Value);
        let cases: [(&str, Edit, &str); 5] = [
            (
                "quantizer key",
                |v| v["model"]["quantizer"]["betta"] = 0.25.into(),
                "betta",
            ),
            (
                "ema key",
                |v| v["model"]["quantizer"]["learning"]["ema"]["decayy"] = 0.9.into(),
                "decayy",
            ),
            (
                "quantizer type",
                |v| v["model"]["quantizer"]["beta"] = "x".into(),
                "model.quantizer.beta",
            ),
            (
                "ema type",
                |v| v["model"]["quantizer"]["learning"]["ema"]["decay"] = "x".into(),
                "model.quantizer.learning.ema.decay",
            ),
            (
                "training type",
                |v| v["training"]["steps"] = (-3).into(),
                "training.steps",
            ),
        ];
        for (name, edit, want) in cases {
            let mut v = good.clone();
            edit(&mut v);
            let path = dir.join(format!("{}.json", name.replace(' ', "-")));
            std::fs::write(&path, v.to_string()).unwrap();
            let err = format!("{:#}", RunConfig::from_config_file(&path).unwrap_err());
            assert!(err.contains(want), "{name}: {err}");
            assert!(err.contains(&path.display().to_string()), "{name}: {err}");
        }
        let path = dir.join("good.json");
        std::fs::write(&path, good.to_string()).unwrap();
        RunConfig::from_config_file(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unset_weights_come_from_the_default_place_and_resumed_runs_keep_theirs() {
        use vq_weights::Network;
        let found = |n: Network| Some(PathBuf::from(format!("/w/{}", n.file_name())));
        let lpips = || Some(PathBuf::from("/w/lpips-vgg16-v0.1.safetensors"));
        let inception = || Some(PathBuf::from("/w/fid-inception-2015-12-05.safetensors"));
        // A new run: both filled, and said.
        let mut c = config(10, 1e-3);
        let said = c.fill_weights(None, found);
        assert_eq!(
            (c.lpips_weights.clone(), c.inception_weights.clone()),
            (lpips(), inception())
        );
        assert!(
            said.len() == 2 && said[0].contains("--lpips FILE"),
            "{said:?}"
        );
        // Given files stay; nothing found leaves them unset.
        let mut c = config(10, 1e-3);
        c.lpips_weights = Some("/mine.safetensors".into());
        assert_eq!(c.fill_weights(None, |_| None), Vec::<String>::new());
        assert_eq!(c.lpips_weights, Some("/mine.safetensors".into()));
        assert_eq!(c.inception_weights, None);
        // A resumed run started without LPIPS keeps none (its loss cannot change); its
        // evaluation may take the Inception found now, or keep its own.
        let was = config(10, 1e-3);
        let mut c = config(10, 1e-3);
        let said = c.fill_weights(Some(&was), found);
        assert_eq!(
            (c.lpips_weights.clone(), c.inception_weights.clone()),
            (None, inception())
        );
        assert_eq!(said.len(), 1);
        let mut was = config(10, 1e-3);
        was.lpips_weights = Some("/old/lpips.safetensors".into());
        was.inception_weights = Some("/old/inception.safetensors".into());
        let mut c = config(10, 1e-3);
        assert!(c.fill_weights(Some(&was), found).is_empty());
        assert_eq!(c.lpips_weights, was.lpips_weights);
        assert_eq!(c.inception_weights, was.inception_weights);
    }

    #[test]
    fn only_the_total_of_steps_may_change_on_resume() {
        let ckpt = Path::new("runs/x/checkpoints/step-40");
        assert_eq!(
            may_resume(ckpt, &key(100, 1e-3), &key(100, 1e-3), 40).unwrap(),
            None
        );
        let note = may_resume(ckpt, &key(100, 1e-3), &key(300, 1e-3), 40)
            .unwrap()
            .unwrap();
        assert!(
            note.contains("300") && note.contains("100") && note.contains("step 40"),
            "{note}"
        );
        assert!(may_resume(ckpt, &key(100, 1e-3), &key(40, 1e-3), 40).is_ok());
        let err = may_resume(ckpt, &key(100, 1e-3), &key(30, 1e-3), 40)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("step-40") && err.contains("30") && err.contains("40"),
            "{err}"
        );
        let err = may_resume(ckpt, &key(100, 1e-3), &key(300, 2e-3), 40)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("another configuration")
                && err.contains("training.learning_rate")
                && err.contains("training.steps"),
            "{err}"
        );
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vq-train-cfg-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_configuration_file_must_name_its_preprocessing() {
        let dir = scratch("config");
        let mut v = key(10, 1e-3);
        v["preset"] = "my-tokenizer".into();
        v["preprocessing"] = "vit-vqgan".into();
        let file = dir.join("custom.json");
        fs::write(&file, serde_json::to_vec(&v).unwrap()).unwrap();
        let cfg = RunConfig::from_config_file(&file).unwrap();
        assert_eq!(
            cfg.preprocessing,
            Pipeline::VitVqgan,
            "the field, not the name"
        );
        // Without the field: refused, with the choices and the preset's own when it has one.
        v.as_object_mut().unwrap().remove("preprocessing");
        fs::write(&file, serde_json::to_vec(&v).unwrap()).unwrap();
        let err = RunConfig::from_config_file(&file).unwrap_err().to_string();
        assert!(
            err.contains("custom.json")
                && err.contains("\"preprocessing\"")
                && err.contains("\"center-crop\", \"taming\", \"vit-vqgan\""),
            "{err}"
        );
        v["preset"] = "vqgan-f16-imagenet".into();
        fs::write(&file, serde_json::to_vec(&v).unwrap()).unwrap();
        let err = RunConfig::from_config_file(&file).unwrap_err().to_string();
        assert!(err.contains("vqgan-f16-imagenet uses \"taming\""), "{err}");
        v["preprocessing"] = "resize".into();
        fs::write(&file, serde_json::to_vec(&v).unwrap()).unwrap();
        let err = format!("{:#}", RunConfig::from_config_file(&file).unwrap_err());
        assert!(
            err.contains("custom.json") && err.contains("resize"),
            "{err}"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn old_run_records_get_the_pipeline_they_were_trained_with() {
        let old = |preset: &str, data: &str| {
            let mut v = key(10, 1e-3);
            v.as_object_mut().unwrap().remove("preprocessing");
            v["preset"] = preset.into();
            v["data"] = data.into();
            RunConfig::upgrade_record(&mut v);
            v["preprocessing"].as_str().unwrap().to_owned()
        };
        // Where the pipeline acts, the old name rule, for custom names too.
        assert_eq!(old("my-vit", "image-folder:/d"), "taming");
        assert_eq!(old("vit-custom", "imagenet:/d"), "vit-vqgan");
        assert_eq!(old("vqvae-mine", "image-folder:/d"), "center-crop");
        assert_eq!(old("demo-fashion-mnist", "image-folder:/d"), "taming");
        // Where it had no effect, a preset's own, so that the run resumes as it is configured.
        assert_eq!(
            old("demo-fashion-mnist", "fashion-mnist-demo"),
            "center-crop"
        );
        assert_eq!(old("timesformer-bair", "bair:/d"), "vit-vqgan");
        // A present field is kept; a checkpoint of an older version resumes.
        let mut v = key(10, 1e-3);
        v["preprocessing"] = "taming".into();
        RunConfig::upgrade_record(&mut v);
        assert_eq!(v["preprocessing"], "taming");
        let mut was = key(10, 1e-3);
        was.as_object_mut().unwrap().remove("preprocessing");
        assert_eq!(
            may_resume(Path::new("step-4"), &was, &key(10, 1e-3), 4).unwrap(),
            None
        );
    }

    #[test]
    fn every_preset_has_its_tables_pipeline() {
        use vq_models::Preset;
        for p in Preset::ALL {
            let got = Pipeline::for_preset(p);
            let want = if p.name().starts_with("vqvae-") || p.name().starts_with("demo-") {
                Pipeline::CenterCrop
            } else if p.name().starts_with("vit-") || p.name().starts_with("timesformer-") {
                Pipeline::VitVqgan
            } else {
                Pipeline::Taming
            };
            assert_eq!(got, want, "{}", p.name());
            let json = serde_json::to_value(got).unwrap();
            assert_eq!(json, got.name());
            assert_eq!(serde_json::from_value::<Pipeline>(json).unwrap(), got);
        }
    }
}
