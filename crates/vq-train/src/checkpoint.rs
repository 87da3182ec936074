//! Checkpoints: `<run>/checkpoints/step-NNNNNNNN/{model,optimizer}.safetensors` + `state.json`,
//! and `<run>/checkpoints/latest` pointing at the newest (a relative symbolic link on Unix, so
//! `checkpoints/latest/model.safetensors` opens; a text file naming the folder elsewhere and in
//! runs written before). Each checkpoint is written into a hidden
//! temporary folder and renamed into place, and `latest` is replaced by rename, so a crash at any
//! point leaves the previous checkpoint intact and `latest` pointing at a complete one.
//!
//! Crash model: every file is fsynced before its folder is renamed, and the `checkpoints` folder
//! is fsynced after each rename, so this holds for an operating-system crash or power loss as
//! well as for a killed process (on file systems that honour fsync). A checkpoint of a step that
//! already has a folder (saved again after a resume) moves the old folder aside before the new
//! one is renamed in, and deletes it only once `latest` is durable; [`latest`] restores a folder
//! left aside by a crash in between.
//!
//! `model.safetensors` holds the model's variables under taming's names (e.g.
//! `encoder.down.0.block.0.conv1.weight`), f32; PyTorch reads it with
//! `safetensors.torch.load_file(path)` and `model.load_state_dict(..., strict=False)`.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tch::{Kind, Tensor, nn};

use crate::optim::AdamW;

/// What a checkpoint records beside the tensors.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Optimiser steps done.
    pub step: usize,
    /// The run's configuration, to refuse resuming with another one.
    pub run: serde_json::Value,
    /// Wall-clock seconds of the training steps up to this checkpoint, summed over the
    /// invocations that trained them (time after a crash's last checkpoint is not counted;
    /// 0 in checkpoints of versions that did not record it).
    #[serde(default)]
    pub train_seconds: f64,
}

/// Checkpoints kept (older ones are deleted after a new one is complete).
const KEEP: usize = 2;

fn dir_of(run: &Path) -> PathBuf {
    crate::layout::RunDir::new(run).checkpoints()
}

/// A set of variables and its optimiser, saved as `<name>.safetensors` and
/// `<name>_optimizer.safetensors` (the model part: `model.safetensors`, `optimizer.safetensors`).
#[derive(Debug)]
pub struct Part<'a> {
    /// `model` or `discriminator`.
    pub name: &'static str,
    /// The variables.
    pub vs: &'a nn::VarStore,
    /// Their optimiser.
    pub opt: &'a AdamW,
}

fn files(name: &str) -> (String, String) {
    if name == "model" {
        ("model.safetensors".into(), "optimizer.safetensors".into())
    } else {
        (
            format!("{name}.safetensors"),
            format!("{name}_optimizer.safetensors"),
        )
    }
}

/// Writes a checkpoint of the parts and `state`; returns its folder.
///
/// # Errors
/// File-system and serialisation errors (the previous checkpoint is left as it was).
pub fn save(run: &Path, parts: &[Part<'_>], state: &TrainState) -> Result<PathBuf> {
    let dir = dir_of(run);
    let name = format!("step-{:08}", state.step);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    match save_into(&dir, &tmp, &name, parts, state) {
        Ok(done) => Ok(done),
        Err(e) => {
            // Nothing half-written stays behind; the last complete checkpoint is untouched.
            let _ = fs::remove_dir_all(&tmp);
            let kept = match latest(run) {
                Ok(Some((ckpt, st))) => format!(
                    "the last checkpoint ({}, step {}) is intact: once the cause is fixed (disk \
                     space, quota, permissions), rerun the same command with --resume to \
                     continue from it",
                    ckpt.display(),
                    st.step
                ),
                _ => "no earlier checkpoint exists: rerun the command once the cause is fixed"
                    .to_owned(),
            };
            Err(e.context(format!(
                "saving the checkpoint of step {} into {} failed; {kept}",
                state.step,
                dir.display()
            )))
        }
    }
}

/// [`save`]'s work: every file into `tmp`, synced, then renamed into place and `latest` moved.
fn save_into(
    dir: &Path,
    tmp: &Path,
    name: &str,
    parts: &[Part<'_>],
    state: &TrainState,
) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if tmp.exists() {
        fs::remove_dir_all(tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    fs::create_dir(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for part in parts {
        let (weights, optim) = files(part.name);
        let vars = part.vs.variables();
        let mut named: Vec<(&str, &Tensor)> = vars.iter().map(|(k, t)| (k.as_str(), t)).collect();
        named.sort_by_key(|(k, _)| *k);
        write_tensors(&tmp.join(&weights), &named)?;
        let opt_state = part.opt.state();
        let named: Vec<(&str, &Tensor)> = opt_state.iter().map(|(k, t)| (k.as_str(), t)).collect();
        write_tensors(&tmp.join(&optim), &named)?;
    }
    write_synced(&tmp.join("state.json"), &serde_json::to_vec_pretty(state)?)?;
    sync_dir(tmp)?;
    let final_dir = dir.join(name);
    let aside = dir.join(format!(".{name}.old-{}", std::process::id()));
    if final_dir.exists() {
        fs::rename(&final_dir, &aside)
            .with_context(|| format!("moving the earlier {} aside", final_dir.display()))?;
        sync_dir(dir)?;
    }
    fs::rename(tmp, &final_dir).with_context(|| format!("moving {} into place", tmp.display()))?;
    sync_dir(dir)?;
    let latest_tmp = dir.join(format!(".latest.tmp-{}", std::process::id()));
    write_pointer(&latest_tmp, name)?;
    fs::rename(&latest_tmp, dir.join("latest")).context("updating checkpoints/latest")?;
    sync_dir(dir)?;
    if aside.exists() {
        fs::remove_dir_all(&aside).with_context(|| format!("removing {}", aside.display()))?;
    }
    prune(dir)?;
    Ok(final_dir)
}

/// Writes `tensors` as a safetensors file — the bytes tch's `write_safetensors` writes (the
/// same crate's serializer, no metadata) — through `std::fs`, so that a failure is a plain I/O
/// error naming the file ("No space left on device"), and fsyncs it.
pub(crate) fn write_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let owned: Vec<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let t = t.to_device(tch::Device::Cpu).contiguous();
            let kind = t.kind();
            let dtype = safetensors::Dtype::try_from(kind)
                .with_context(|| format!("{name}: tensors of kind {kind:?} cannot be saved"))?;
            let bytes = tensor_bytes(&t, kind)?;
            let shape = t.size().iter().map(|&d| d as usize).collect();
            Ok((*name, dtype, shape, bytes))
        })
        .collect::<Result<_>>()?;
    let views = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            Ok((
                *name,
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::tensor::serialize(views, &None)
        .with_context(|| format!("serialising {}", path.display()))?;
    write_synced(path, &bytes)
}

/// The raw little-endian bytes of a contiguous CPU tensor of `kind`.
pub(crate) fn tensor_bytes(t: &Tensor, kind: Kind) -> Result<Vec<u8>> {
    let n = t.numel() * kind.elt_size_in_bytes();
    let mut bytes = vec![0u8; n];
    t.f_copy_data_u8(&mut bytes, t.numel())?;
    Ok(bytes)
}

/// Creates the pointer `path` to the checkpoint folder `name` (a sibling): a relative symbolic
/// link on Unix, so `checkpoints/latest/model.safetensors` opens, else a text file holding
/// `name`. [`latest`] reads either (runs written before the link was introduced hold the file).
fn write_pointer(path: &Path, name: &str) -> Result<()> {
    let _ = fs::remove_file(path);
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(name, path)
            .with_context(|| format!("creating the link {} -> {name}", path.display()))
    }
    #[cfg(not(unix))]
    {
        write_synced(path, name.as_bytes())
    }
}

/// The checkpoint folder name the pointer `path` holds (link target or file contents), or
/// `None` if there is no pointer.
fn read_pointer(path: &Path) -> Result<Option<String>> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let name = if meta.file_type().is_symlink() {
        let target = fs::read_link(path).with_context(|| format!("reading {}", path.display()))?;
        target
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} links to {}", path.display(), target.display()))?
            .to_owned()
    } else {
        fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned()
    };
    if !name.starts_with("step-") || name.contains(['/', '\\']) {
        bail!(
            "{} names {name:?}, not a checkpoint folder (step-NNNNNNNN)",
            path.display()
        );
    }
    Ok(Some(name))
}

/// The run folder's latest checkpoint, as error messages name it (`none yet` before the first).
///
/// # Errors
/// An unreadable `latest` or `state.json`.
pub fn last_checkpoint(out: &Path) -> Result<String> {
    Ok(latest(out)?
        .map(|(p, s)| format!("{} (step {})", p.display(), s.step))
        .unwrap_or_else(|| "none yet".into()))
}

/// Writes `bytes` to `path` through a temporary file (fsynced) and a rename (with its folder
/// fsynced): after a crash `path` holds the old bytes or the new ones.
///
/// # Errors
/// I/O errors, naming the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_file(path, |tmp| write_synced(tmp, bytes))?;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    sync_dir(parent.unwrap_or(Path::new(".")))
}

/// Writes `path` whole or not at all: `write` fills a temporary sibling that keeps the
/// extension (`.<name>.tmp-<pid>.<ext>`, so writers that choose the format by extension still
/// do), which is then renamed over `path`. On any failure (a full disk, a quota, a file-size
/// limit) the temporary file is removed and `path` keeps what it held, or stays absent: no
/// half-written output is ever left under its name or beside it.
///
/// # Errors
/// `write`'s error, or the rename's, naming the file.
pub fn replace_file(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}{ext}", std::process::id()));
    let done = write(&tmp)
        .and_then(|()| {
            fs::rename(&tmp, path).with_context(|| format!("renaming {} into place", tmp.display()))
        })
        .with_context(|| format!("writing {}", path.display()));
    if done.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    done
}

/// Makes a folder's entries (files created or renamed in it) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing folder {}", dir.display()))
}

/// Creates `path` with `bytes` and fsyncs it.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn prune(dir: &Path) -> Result<()> {
    let mut steps: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    steps.sort();
    for old in steps.iter().rev().skip(KEEP) {
        fs::remove_dir_all(old).with_context(|| format!("removing old {}", old.display()))?;
    }
    Ok(())
}

/// The newest checkpoint folder of `run` older than `than` that holds its `state.json` (the one
/// kept beside the latest), if any.
pub fn earlier(run: &Path, than: &Path) -> Option<PathBuf> {
    let mut steps: Vec<PathBuf> = fs::read_dir(dir_of(run))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
                && p.join("state.json").is_file()
        })
        .collect();
    steps.sort();
    steps
        .into_iter()
        .rev()
        .find(|p| p.file_name() < than.file_name())
}

/// The newest complete checkpoint of a run, if any.
///
/// # Errors
/// An unreadable `latest` or `state.json`.
pub fn latest(run: &Path) -> Result<Option<(PathBuf, TrainState)>> {
    let dir = dir_of(run);
    let Some(name) = read_pointer(&dir.join("latest"))? else {
        return Ok(None);
    };
    let ckpt = dir.join(&name);
    if !ckpt.exists() {
        restore_aside(&dir, &name)?;
    }
    let state_file = ckpt.join("state.json");
    let state: TrainState = serde_json::from_slice(
        &fs::read(&state_file).with_context(|| format!("reading {}", state_file.display()))?,
    )
    .with_context(|| format!("parsing {}", state_file.display()))?;
    Ok(Some((ckpt, state)))
}

/// A crash between moving an earlier `name` aside and renaming its replacement in (see
/// [`save`]) leaves `latest` naming a missing folder and the complete earlier one at
/// `.<name>.old-<pid>`: move it back.
fn restore_aside(dir: &Path, name: &str) -> Result<()> {
    let prefix = format!(".{name}.old-");
    let aside = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
                && p.join("state.json").is_file()
        });
    let Some(aside) = aside else {
        bail!(
            "{}/latest names {name}, which is missing (and no earlier copy was left aside)",
            dir.display()
        );
    };
    fs::rename(&aside, dir.join(name))
        .with_context(|| format!("restoring {} as {name}", aside.display()))?;
    sync_dir(dir)
}

/// Loads a checkpoint folder into the parts' variables and optimisers (same names as
/// [`save`]).
///
/// # Errors
/// Missing files, or tensors that do not fit the model.
pub fn load(
    ckpt: &Path,
    parts: &mut [(&'static str, &mut nn::VarStore, &mut AdamW)],
) -> Result<()> {
    for (name, vs, opt) in parts.iter_mut() {
        let (weights, optim) = files(name);
        let file = ckpt.join(&weights);
        vs.load(&file)
            .with_context(|| format!("loading {}", file.display()))?;
        let file = ckpt.join(&optim);
        let state: HashMap<String, Tensor> = Tensor::read_safetensors(&file)
            .with_context(|| format!("reading {}", file.display()))?
            .into_iter()
            .collect();
        opt.load_state(state)
            .with_context(|| format!("loading optimizer state from {}", file.display()))?;
    }
    Ok(())
}

/// Loads only the model weights of a checkpoint (or of a bare `.safetensors` file).
///
/// # Errors
/// Missing files, or tensors that do not fit the model.
pub fn load_model(path: &Path, vs: &mut nn::VarStore) -> Result<()> {
    let file = if path.is_dir() {
        match latest(path)? {
            Some((ckpt, _)) => ckpt.join("model.safetensors"),
            None if path.join("model.safetensors").is_file() => path.join("model.safetensors"),
            None => bail!("{} holds no checkpoint", path.display()),
        }
    } else {
        path.to_path_buf()
    };
    vs.load(&file)
        .with_context(|| format!("loading model weights from {}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn run_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vq-ckpt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn save_step(run: &Path, vs: &nn::VarStore, step: usize) -> PathBuf {
        let opt = AdamW::new(vs, (0.9, 0.99), 0.0);
        let parts = [Part {
            name: "model",
            vs,
            opt: &opt,
        }];
        let state = TrainState {
            step,
            run: serde_json::json!({"x": 1}),
            train_seconds: 0.0,
        };
        save(run, &parts, &state).unwrap()
    }

    #[test]
    fn a_step_saved_again_replaces_its_folder_and_a_crash_in_between_is_recovered() {
        let run = run_dir("again");
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[3], nn::Init::Const(1.0));
        save_step(&run, &vs, 5);
        let _ = tch::no_grad(|| w.shallow_clone().fill_(2.0));
        let ckpt = save_step(&run, &vs, 5);
        let names: Vec<String> = fs::read_dir(dir_of(&run))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}"); // step-00000005 and latest, nothing aside
        #[cfg(unix)]
        assert!(dir_of(&run).join("latest/model.safetensors").is_file());
        let read = Tensor::read_safetensors(ckpt.join("model.safetensors")).unwrap();
        assert_eq!(read[0].1.sum(Kind::Float).double_value(&[]), 6.0);
        // A crash after the earlier folder was moved aside, before the new one was renamed in.
        let aside = dir_of(&run).join(".step-00000005.old-4242");
        fs::rename(&ckpt, &aside).unwrap();
        let (found, state) = latest(&run).unwrap().unwrap();
        assert_eq!((found, state.step), (ckpt.clone(), 5));
        assert!(ckpt.join("state.json").is_file() && !aside.exists());
        // Nothing to restore: a clear error naming the missing folder.
        fs::remove_dir_all(&ckpt).unwrap();
        let err = format!("{:#}", latest(&run).unwrap_err());
        assert!(err.contains("step-00000005, which is missing"), "{err}");
        fs::remove_dir_all(&run).unwrap();
    }

    #[test]
    fn the_latest_pointer_is_read_as_a_link_or_as_a_text_file_and_bad_ones_are_named() {
        let run = run_dir("pointer");
        let vs = nn::VarStore::new(Device::Cpu);
        let _w = vs.root().var("w", &[2], nn::Init::Const(1.0));
        let ckpt = save_step(&run, &vs, 3);
        let pointer = dir_of(&run).join("latest");
        // A run written before the link: a text file with the folder name (and a newline).
        fs::remove_file(&pointer).unwrap();
        fs::write(&pointer, "step-00000003\n").unwrap();
        assert_eq!(latest(&run).unwrap().unwrap().0, ckpt);
        for bad in ["../../elsewhere", "", "model.safetensors"] {
            fs::write(&pointer, bad).unwrap();
            let err = format!("{:#}", latest(&run).unwrap_err());
            assert!(
                err.contains("not a checkpoint folder") && err.contains("latest"),
                "{err}"
            );
        }
        fs::remove_file(&pointer).unwrap();
        assert!(latest(&run).unwrap().is_none());
        fs::remove_dir_all(&run).unwrap();
    }
}
