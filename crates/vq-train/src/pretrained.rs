//! `train --init-from FILE`: start a run from a public checkpoint of the reference code —
//! taming-transformers' and latent-diffusion's VQGANs (Lightning `.ckpt`), enhancing-transformers'
//! ViT-VQGAN — or from a plain state dict in the same layout: PyTorch's (`.pth`), or safetensors
//! (what model hubs distribute). The file is read without Python (PyTorch's zip/pickle format
//! through `pytorch-reader`, safetensors through its crate); the optimizer starts fresh.
//!
//! Names: this project's variables carry the references' state-dict keys, except the quantizer's,
//! which are mapped:
//!
//! | reference key | vq-train variable |
//! |---|---|
//! | `quantize.embedding.weight` (taming, latent-diffusion), `quantizer.embedding.weight` (enhancing-transformers) | `quantize.codebook` (and the EMA running sums of an EMA codebook) |
//! | `pre_quant.*` / `post_quant.*` (enhancing-transformers) | `quantize.project_in.*` / `quantize.project_out.*` |
//! | `loss.discriminator.*` | the discriminator's variables (VQGAN runs; otherwise ignored) |
//! | `loss.*` (perceptual network, loss buffers), `model_ema.*` (latent-diffusion's EMA copy), `*.num_batches_tracked` (BatchNorm's counter, unused with a momentum) | ignored, reported |
//!
//! Every other key must name a variable of the model with the same shape; every trainable
//! variable of the model must be given. Anything else is an error that names the tensors.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail};
use pytorch_reader::{DType, PytorchError, PytorchReader};
use tch::{Kind, Tensor, nn};

/// What [`load`] did, for the run's log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Model variables set.
    pub model: usize,
    /// Discriminator variables set.
    pub discriminator: usize,
    /// Keys of the file that were not used (perceptual network, EMA copies, a discriminator
    /// without one in the run).
    pub ignored: Vec<String>,
}

impl Loaded {
    /// One line for the log.
    pub fn describe(&self, file: &Path) -> String {
        let mut s = format!(
            "initialised from {}: {} model tensors",
            file.display(),
            self.model
        );
        if self.discriminator > 0 {
            s += &format!(", {} discriminator tensors", self.discriminator);
        }
        if !self.ignored.is_empty() {
            s += &format!(
                "; ignored {} ({})",
                self.ignored.len(),
                summarise(&self.ignored)
            );
        }
        s + "; optimizer state fresh"
    }
}

/// Where a key of the file goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Model(String),
    Discriminator(String),
    Ignored,
}

fn target(key: &str) -> Target {
    let model = |s: &str| Target::Model(s.to_owned());
    match key {
        "quantize.embedding.weight" | "quantizer.embedding.weight" => model("quantize.codebook"),
        _ => {
            if key.ends_with(".num_batches_tracked") {
                // BatchNorm's update counter: only used with momentum=None, which no reference sets.
                Target::Ignored
            } else if let Some(rest) = key.strip_prefix("pre_quant.") {
                model(&format!("quantize.project_in.{rest}"))
            } else if let Some(rest) = key.strip_prefix("post_quant.") {
                model(&format!("quantize.project_out.{rest}"))
            } else if let Some(rest) = key.strip_prefix("loss.discriminator.") {
                Target::Discriminator(rest.to_owned())
            } else if key.starts_with("loss.") || key.starts_with("model_ema.") {
                Target::Ignored
            } else {
                model(key)
            }
        }
    }
}

/// The tensors of `file`: a Lightning checkpoint's `state_dict`, or the file itself when it is a
/// plain state dict.
fn open(file: &Path) -> Result<PytorchReader> {
    match PytorchReader::with_top_level_key(file, "state_dict") {
        Ok(r) => Ok(r),
        // The reader's errors repeat their source in their own text: shown once, not chained.
        Err(PytorchError::KeyNotFound(_)) => PytorchReader::new(file).map_err(|e| {
            anyhow::anyhow!("reading {} as a PyTorch state dict: {e}", file.display())
        }),
        Err(e) => Err(anyhow::anyhow!(
            "reading {} as a PyTorch checkpoint: {e}",
            file.display()
        )),
    }
}

/// A weights file as read: PyTorch's formats, or safetensors (its header; each tensor's bytes
/// are read when needed, so memory stays bounded by the model whatever the file claims).
enum Opened {
    Torch(PytorchReader),
    SafeTensors(crate::safetensors_file::Header),
}

/// A safetensors file starts with the little-endian length of its JSON header, then the header.
fn is_safetensors(file: &Path) -> Result<bool> {
    let mut head = [0u8; 9];
    let mut f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let n = std::io::Read::read(&mut f, &mut head).unwrap_or(0);
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let header = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    Ok(n == 9 && head[8] == b'{' && header.saturating_add(8) <= len)
}

fn open_any(file: &Path) -> Result<Opened> {
    if is_safetensors(file)? {
        return crate::safetensors_file::read_header(file).map(Opened::SafeTensors);
    }
    open(file).map(Opened::Torch)
}

/// One tensor of the file: its shape, and its values read on demand (as f32 on the CPU).
type FileTensor<'a> = (Vec<i64>, Box<dyn Fn() -> Result<Tensor> + 'a>);

/// The tensors of an opened file by key.
fn file_tensors<'a>(opened: &'a Opened, file: &'a Path) -> BTreeMap<String, FileTensor<'a>> {
    match opened {
        Opened::Torch(reader) => reader
            .tensors()
            .iter()
            .map(|(key, t)| {
                let shape = t.shape().iter().map(|&d| d as i64).collect();
                let read: Box<dyn Fn() -> Result<Tensor>> = Box::new(move || to_f32(t, key, file));
                (key.clone(), (shape, read))
            })
            .collect(),
        Opened::SafeTensors(header) => header
            .tensors
            .iter()
            .map(|(key, info)| {
                let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
                let at = header.data_start + info.data_offsets.0 as u64;
                let read: Box<dyn Fn() -> Result<Tensor>> =
                    Box::new(move || safetensors_to_f32(info, at, key, file));
                (key.clone(), (shape, read))
            })
            .collect(),
    }
}

/// A safetensors tensor (its header entry; its bytes at `at` in `file`) as f32 on the CPU.
fn safetensors_to_f32(
    info: &safetensors::tensor::TensorInfo,
    at: u64,
    key: &str,
    file: &Path,
) -> Result<Tensor> {
    let kind = match info.dtype {
        safetensors::Dtype::F32 => Kind::Float,
        safetensors::Dtype::F64 => Kind::Double,
        safetensors::Dtype::F16 => Kind::Half,
        safetensors::Dtype::BF16 => Kind::BFloat16,
        other => bail!(
            "{}: tensor {key} holds {other:?} values; weights must be floating point",
            file.display()
        ),
    };
    let (a, b) = info.data_offsets;
    let values = crate::safetensors_file::read_at(file, at, b - a)?;
    let dims: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
    let t = Tensor::f_from_data_size(&values, &dims, kind)
        .with_context(|| format!("{}: tensor {key}", file.display()))?;
    Ok(t.to_kind(Kind::Float))
}

/// The tensor as f32 on the CPU, shaped.
fn to_f32(t: &pytorch_reader::Tensor, key: &str, file: &Path) -> Result<Tensor> {
    let bytes = t
        .read()
        .with_context(|| format!("{}: reading tensor {key}", file.display()))?;
    let kind = match t.dtype() {
        DType::F32 => Kind::Float,
        DType::F64 => Kind::Double,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        other => bail!(
            "{}: tensor {key} holds {other:?} values; weights must be floating point",
            file.display()
        ),
    };
    let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
    let out = Tensor::f_from_data_size(&bytes, &shape, kind)
        .with_context(|| format!("{}: tensor {key}", file.display()))?;
    Ok(out.to_kind(Kind::Float))
}

/// Sets the variables of `model` (and of `discriminator`, if the run has one) from `file`.
/// Nothing is changed unless every check passes.
///
/// # Errors
/// An unreadable file; tensors of the file that name no variable, variables of the model the
/// file does not give, tensors of another shape or a non-float type — each listed by name.
pub fn load(
    file: &Path,
    model: &mut nn::VarStore,
    discriminator: Option<&mut nn::VarStore>,
) -> Result<Loaded> {
    let opened = open_any(file)?;
    let tensors = file_tensors(&opened, file);
    let model_vars = model.variables();
    let disc_vars = discriminator.as_ref().map(|d| d.variables());
    let mut plan: Vec<(String, Tensor, bool)> = Vec::new();
    let (mut extra, mut misshaped, mut ignored) = (Vec::new(), Vec::new(), Vec::new());
    for (key, (shape, read)) in &tensors {
        let (name, vars, is_disc) = match target(key) {
            Target::Ignored => {
                ignored.push(key.clone());
                continue;
            }
            Target::Discriminator(name) => match &disc_vars {
                Some(v) => (name, v, true),
                None => {
                    ignored.push(key.clone());
                    continue;
                }
            },
            Target::Model(name) => (name, &model_vars, false),
        };
        let Some(var) = vars.get(&name) else {
            extra.push(key.clone());
            continue;
        };
        if *shape != var.size() {
            misshaped.push(format!(
                "{key} {shape:?} (the model's {name} is {:?})",
                var.size()
            ));
            continue;
        }
        plan.push((name, read()?, is_disc));
    }
    check_fit(
        file,
        &plan,
        &extra,
        &misshaped,
        &model_vars,
        disc_vars.as_ref(),
    )?;
    let mut loaded = Loaded {
        ignored,
        ..Loaded::default()
    };
    copy_in(&plan, &model_vars, disc_vars.as_ref(), &mut loaded)?;
    Ok(loaded)
}

/// A planned load (`(variable, value, of the discriminator)`) that does not fit the model: the
/// file's tensors that name no variable (`extra`), of another shape (`misshaped`), and the
/// trainable variables it does not give, as one error naming the file.
fn check_fit(
    file: &Path,
    plan: &[(String, Tensor, bool)],
    extra: &[String],
    misshaped: &[String],
    model_vars: &HashMap<String, Tensor>,
    disc_vars: Option<&HashMap<String, Tensor>>,
) -> Result<()> {
    let given: BTreeSet<(bool, &str)> = plan.iter().map(|(n, _, d)| (*d, n.as_str())).collect();
    let missing = |vars: &HashMap<String, Tensor>, disc: bool| -> BTreeSet<String> {
        vars.iter()
            .filter(|(n, t)| t.requires_grad() && !given.contains(&(disc, n.as_str())))
            .map(|(n, _)| match disc {
                true => format!("discriminator {n}"),
                false => n.clone(),
            })
            .collect()
    };
    let mut missing_all = missing(model_vars, false);
    // A checkpoint without a discriminator leaves the run's freshly initialised one.
    if let Some(d) = disc_vars.filter(|_| plan.iter().any(|(_, _, disc)| *disc)) {
        missing_all.extend(missing(d, true));
    }
    let missing_all: Vec<String> = missing_all.into_iter().collect();
    let mut problems = Vec::new();
    for (what, list) in [
        ("tensors that name no variable of the model", extra),
        ("variables the file does not give", &missing_all),
        ("tensors of another shape", misshaped),
    ] {
        if !list.is_empty() {
            problems.push(format!("{} {what}: {}", list.len(), summarise(list)));
        }
    }
    if !problems.is_empty() {
        bail!(
            "{} does not fit this run's model: {}",
            file.display(),
            problems.join("; ")
        );
    }
    Ok(())
}

/// Copies the planned values into the stores' variables (the maps hold shallow copies of them),
/// counting them in `loaded`; an EMA codebook's running sums start at the codes, and a loaded
/// codebook is marked initialised (not replaced by k-means).
fn copy_in(
    plan: &[(String, Tensor, bool)],
    model_vars: &HashMap<String, Tensor>,
    disc_vars: Option<&HashMap<String, Tensor>>,
    loaded: &mut Loaded,
) -> Result<()> {
    // The maps hold shallow copies of the stores' variables: copying into them sets the stores.
    tch::no_grad(|| -> Result<()> {
        for (name, value, is_disc) in plan {
            let vars = match is_disc {
                true => disc_vars.expect("planned for a discriminator"),
                false => model_vars,
            };
            let mut var = vars[name].shallow_clone();
            var.f_copy_(&value.to_device(var.device()).to_kind(var.kind()))?;
            match is_disc {
                true => loaded.discriminator += 1,
                false => loaded.model += 1,
            }
        }
        // An EMA codebook's running sums start at the codes (cluster sizes at 1), and a loaded
        // codebook is not replaced by k-means.
        if let (Some(sums), Some(codes)) = (
            model_vars.get("quantize.ema_running_sum"),
            model_vars.get("quantize.codebook"),
        ) {
            sums.shallow_clone().f_copy_(codes)?;
        }
        if let Some(flag) = model_vars.get("quantize.initialised") {
            let _ = flag.shallow_clone().fill_(1);
        }
        Ok(())
    })
}

/// The first few names and how many more.
fn summarise(names: &[String]) -> String {
    const SHOWN: usize = 6;
    let mut s = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s += &format!(", … ({} more)", names.len() - SHOWN);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_keys_map_to_the_layer_and_the_discriminator() {
        let m = |s: &str| Target::Model(s.to_owned());
        assert_eq!(target("quantize.embedding.weight"), m("quantize.codebook"));
        assert_eq!(target("quantizer.embedding.weight"), m("quantize.codebook"));
        assert_eq!(target("pre_quant.bias"), m("quantize.project_in.bias"));
        assert_eq!(
            target("post_quant.weight"),
            m("quantize.project_out.weight")
        );
        assert_eq!(
            target("encoder.conv_in.weight"),
            m("encoder.conv_in.weight")
        );
        assert_eq!(
            target("loss.discriminator.main.0.weight"),
            Target::Discriminator("main.0.weight".into())
        );
        assert_eq!(
            target("loss.perceptual_loss.net.slice1.0.weight"),
            Target::Ignored
        );
        assert_eq!(target("model_ema.decay"), Target::Ignored);
        let names: Vec<String> = (0..9).map(|i| format!("k{i}")).collect();
        assert_eq!(summarise(&names), "k0, k1, k2, k3, k4, k5, … (3 more)");
    }

    /// A file that is not a checkpoint is named, with the reader's reason said once.
    #[test]
    fn a_file_that_is_not_a_checkpoint_is_named_and_its_reason_said_once() {
        let file = std::env::temp_dir().join(format!("vq-not-a-ckpt-{}.ckpt", std::process::id()));
        std::fs::write(&file, b"PK\x03\x04 not a zip archive at all").unwrap();
        let err = format!("{:#}", open(&file).err().unwrap());
        std::fs::remove_file(&file).unwrap();
        assert!(
            err.starts_with(&format!("reading {}", file.display())),
            "{err}"
        );
        let reason = err.rsplit(": ").next().unwrap();
        assert_eq!(err.matches(reason).count(), 1, "{err}");
    }
}
