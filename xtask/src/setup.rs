//! `cargo xtask setup`: provide libtorch 2.13.0 (the version tch 0.26 is built for) in
//! `.libtorch/torch`, which `.cargo/config.toml` names as `LIBTORCH` for every cargo command.
//!
//! Sources, in order:
//! 1. `LIBTORCH=/path/to/libtorch cargo xtask setup`: adopt an existing libtorch (a libtorch zip
//!    extraction or the `torch` folder of a Python installation); `.libtorch/torch` becomes a link.
//! 2. Otherwise `python3 -m pip install --target .libtorch/site torch==2.13.0` (the PyPI wheel,
//!    a CUDA build; about 4.7 GB with its CUDA libraries), installed into a staging folder and
//!    renamed into place only once complete, so an interrupted install is never mistaken for one.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The libtorch version tch 0.26 / torch-sys 0.26 require.
pub const TORCH_VERSION: &str = "2.13.0";
/// Marker written into a pip installation once it is complete.
const MARKER: &str = ".vq-setup-complete";

/// A usable libtorch.
#[derive(Debug)]
pub struct Libtorch {
    /// Folder to put on `PYTHONPATH` to import this `torch` from Python, when it came from pip.
    pub python_site: Option<PathBuf>,
}

/// Makes sure `.libtorch/torch` is a complete libtorch of the right version; installs it if not.
pub fn run(root: &Path, force: bool) -> Result<Libtorch> {
    let base = root.join(".libtorch");
    let link = base.join("torch");
    let site = base.join("site");
    match std::env::var_os("LIBTORCH").map(PathBuf::from) {
        Some(external) if external != link => adopt_existing(&base, &link, &external),
        _ => {
            if !force && site.join(MARKER).exists() && link.join("lib").is_dir() {
                eprintln!("libtorch {TORCH_VERSION}: ready in {}", link.display());
                return Ok(Libtorch {
                    python_site: Some(site),
                });
            }
            install_from_pip(&base, &site, &link)?;
            Ok(Libtorch {
                python_site: Some(site),
            })
        }
    }
}

fn adopt_existing(base: &Path, link: &Path, external: &Path) -> Result<Libtorch> {
    let lib = external.join("lib");
    if !lib.join("libtorch_cpu.so").exists() && !lib.join("libtorch_cpu.dylib").exists() {
        bail!(
            "LIBTORCH={} does not look like libtorch: {} has no libtorch_cpu library",
            external.display(),
            lib.display()
        );
    }
    match detect_version(external) {
        Some(v) if v == TORCH_VERSION => {}
        Some(v) => bail!(
            "LIBTORCH={} is libtorch {v}, but tch 0.26 needs exactly {TORCH_VERSION}",
            external.display()
        ),
        None => eprintln!(
            "warning: cannot read the version of {} (no build-version or version.py); \
             torch-sys will fail to link if it is not {TORCH_VERSION}",
            external.display()
        ),
    }
    fs::create_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
    replace_symlink(external, link)?;
    eprintln!(
        "libtorch: using {} (linked from {}). If you switched libtorch, run `cargo clean -p torch-sys`.",
        external.display(),
        link.display()
    );
    Ok(Libtorch { python_site: None })
}

/// Reads the version from libtorch's `build-version` (libtorch zips) or `version.py` (Python
/// installations), without any local suffix such as `+cu130`.
fn detect_version(dir: &Path) -> Option<String> {
    let raw = fs::read_to_string(dir.join("build-version"))
        .ok()
        .or_else(|| {
            let py = fs::read_to_string(dir.join("version.py")).ok()?;
            let line = py.lines().find(|l| l.starts_with("__version__"))?;
            Some(
                line.split('\'')
                    .nth(1)
                    .or_else(|| line.split('"').nth(1))?
                    .to_owned(),
            )
        })?;
    let v = raw.trim();
    Some(v.split_once('+').map_or(v, |(v, _)| v).to_owned())
}

fn python() -> Result<String> {
    for candidate in ["python3", "python"] {
        let found = Command::new(candidate).arg("--version").output();
        if found.is_ok_and(|out| out.status.success()) {
            return Ok(candidate.to_owned());
        }
    }
    bail!(
        "python3 was not found on PATH. It is needed once, to download libtorch {TORCH_VERSION} \
         from PyPI (`pip install torch=={TORCH_VERSION}`). Install Python 3.10+ with pip \
         (e.g. `apt-get install python3 python3-pip`), or point LIBTORCH at an existing \
         libtorch {TORCH_VERSION}: `LIBTORCH=/path/to/libtorch cargo xtask setup`."
    )
}

fn install_from_pip(base: &Path, site: &Path, link: &Path) -> Result<()> {
    let py = python()?;
    let pip_ok = Command::new(&py)
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !pip_ok {
        bail!(
            "`{py} -m pip` is not available. Install pip (e.g. `apt-get install python3-pip` or \
             `{py} -m ensurepip`), or set LIBTORCH to an existing libtorch {TORCH_VERSION}."
        );
    }
    fs::create_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
    let staging = base.join(format!("staging-{}", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    eprintln!(
        "libtorch: installing torch=={TORCH_VERSION} from PyPI into {} (about 4.7 GB, a few minutes)",
        site.display()
    );
    let status = pip_install(&py, &staging, &[&format!("torch=={TORCH_VERSION}")], &[])?;
    if !status.success() {
        let _ = fs::remove_dir_all(&staging);
        bail!("`pip install torch=={TORCH_VERSION}` failed ({status}); see pip's output above");
    }
    let torch = staging.join("torch");
    match detect_version(&torch) {
        Some(v) if v == TORCH_VERSION => {}
        other => bail!(
            "pip installed torch {other:?} into {}, expected {TORCH_VERSION}",
            staging.display()
        ),
    }
    fs::write(staging.join(MARKER), TORCH_VERSION).context("writing the setup marker")?;
    // Swap the finished installation into place; only now does the old one go.
    if site.exists() {
        let old = base.join(format!("old-{}", std::process::id()));
        fs::rename(site, &old).with_context(|| format!("moving aside {}", site.display()))?;
        fs::rename(&staging, site).with_context(|| format!("renaming into {}", site.display()))?;
        fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        fs::rename(&staging, site).with_context(|| format!("renaming into {}", site.display()))?;
    }
    // A relative link keeps the clone relocatable.
    replace_symlink(Path::new("site/torch"), link)?;
    eprintln!("libtorch {TORCH_VERSION}: installed in {}", link.display());
    Ok(())
}

/// `py -m pip install --target <target> <specs>` without the user's site packages or pip's
/// cache.
fn pip_install(
    py: &str,
    target: &Path,
    specs: &[&str],
    extra: &[&str],
) -> Result<std::process::ExitStatus> {
    Command::new(py)
        .args([
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            "--no-cache-dir",
        ])
        .args(extra)
        .arg("--target")
        .arg(target)
        .args(specs)
        .env("PYTHONNOUSERSITE", "1")
        .status()
        .with_context(|| format!("running {py} -m pip"))
}

/// The CUDA header wheels that the CUDA build of torch 2.13.0 leaves out but its `c10d` NCCL
/// header needs (`crt/host_config.h`, CCCL's `nv/target`): the versions of torch's own
/// `cuda-toolkit==13.0.3` pin. Headers only (3 MB); vq-dist compiles its NCCL shim against them.
const CUDA_HEADER_WHEELS: &[&str] = &["nvidia-cuda-crt==13.0.88", "nvidia-cuda-cccl==13.0.85"];

/// Installs [`CUDA_HEADER_WHEELS`] into `.libtorch/cuda-headers` when the libtorch is a CUDA
/// build from pip (where `vq_build::CudaHeaders` looks for them). Without them vq-dist builds
/// with Gloo only, so failures here are warnings.
pub fn cuda_headers(root: &Path) {
    if let Err(e) = ensure_cuda_headers(root) {
        eprintln!(
            "warning: no CUDA headers for NCCL ({e:#}); vq-dist will build with Gloo only (CPU)."
        );
    }
}

fn ensure_cuda_headers(root: &Path) -> Result<()> {
    let base = root.join(".libtorch");
    if !base.join("torch/lib/libtorch_cuda.so").exists() || !base.join("site").is_dir() {
        return Ok(());
    }
    let dest = base.join("cuda-headers");
    let marker = dest.join(MARKER);
    let want = CUDA_HEADER_WHEELS.join(" ");
    if fs::read_to_string(&marker).is_ok_and(|m| m == want) {
        eprintln!("CUDA headers: ready in {}", dest.display());
        return Ok(());
    }
    let py = python()?;
    let staging = base.join(format!("cuda-headers-staging-{}", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    eprintln!(
        "CUDA headers: installing {want} from PyPI into {}",
        dest.display()
    );
    let status = pip_install(&py, &staging, CUDA_HEADER_WHEELS, &["--no-deps"])?;
    if !status.success() {
        let _ = fs::remove_dir_all(&staging);
        bail!("`pip install {want}` failed ({status})");
    }
    fs::write(staging.join(MARKER), &want).context("writing the CUDA header marker")?;
    if dest.exists() {
        fs::remove_dir_all(&dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    fs::rename(&staging, &dest).with_context(|| format!("renaming into {}", dest.display()))?;
    eprintln!("CUDA headers: installed in {}", dest.display());
    Ok(())
}

/// The imageio-ffmpeg wheel that provides a static ffmpeg when the system has none.
const IMAGEIO_FFMPEG: &str = "imageio-ffmpeg==0.8.1";

/// Makes `.tools/bin/ffmpeg` (what `.cargo/config.toml` names as `VQ_FFMPEG_DEFAULT`) a link to a
/// working ffmpeg: the system's when one is on the PATH, else the static build in PyPI's
/// `imageio-ffmpeg` wheel installed into `.tools/imageio-ffmpeg` (68 MB). Needed for UCF-101;
/// everything else works without it, so failures here are warnings.
pub fn ffmpeg(root: &Path) {
    if let Err(e) = ensure_ffmpeg(root) {
        eprintln!(
            "warning: no ffmpeg ({e:#}). Only UCF-101 needs it: install it (e.g. `apt-get install \
             ffmpeg`) and run `cargo xtask setup` again."
        );
    }
}

fn runs(program: &Path) -> bool {
    Command::new(program)
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ensure_ffmpeg(root: &Path) -> Result<()> {
    let tools = root.join(".tools");
    let link = tools.join("bin/ffmpeg");
    if runs(&link) {
        eprintln!("ffmpeg: ready in {}", link.display());
        return Ok(());
    }
    fs::create_dir_all(tools.join("bin")).context("creating .tools/bin")?;
    // The system's, if any.
    let system = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("ffmpeg"))
            .find(|p| p.is_file() && runs(p))
    });
    if let Some(found) = system {
        replace_symlink(&found, &link)?;
        eprintln!("ffmpeg: using {}", found.display());
        return Ok(());
    }
    let site = tools.join("imageio-ffmpeg");
    let staging = tools.join(format!("staging-{}", std::process::id()));
    let py = python()?;
    eprintln!(
        "ffmpeg: none on the PATH; installing {IMAGEIO_FFMPEG} from PyPI into {}",
        site.display()
    );
    let status = pip_install(&py, &staging, &[IMAGEIO_FFMPEG], &["--no-deps"])?;
    if !status.success() {
        let _ = fs::remove_dir_all(&staging);
        bail!("`pip install {IMAGEIO_FFMPEG}` failed ({status})");
    }
    if site.exists() {
        fs::remove_dir_all(&site).with_context(|| format!("removing {}", site.display()))?;
    }
    fs::rename(&staging, &site).with_context(|| format!("renaming into {}", site.display()))?;
    let bin_dir = site.join("imageio_ffmpeg/binaries");
    let binary = fs::read_dir(&bin_dir)
        .with_context(|| format!("listing {}", bin_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("ffmpeg-"))
        })
        .with_context(|| format!("no ffmpeg binary in {}", bin_dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&binary, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", binary.display()))?;
    let rel = Path::new("../imageio-ffmpeg/imageio_ffmpeg/binaries")
        .join(binary.file_name().expect("a file"));
    replace_symlink(&rel, &link)?;
    if !runs(&link) {
        bail!("{} does not run", link.display());
    }
    eprintln!("ffmpeg: installed {}", link.display());
    Ok(())
}

/// Points `link` at `target`, replacing whatever link was there, atomically (link + rename).
fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    let tmp = link.with_extension("tmp-link");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .with_context(|| format!("creating link {} -> {}", tmp.display(), target.display()))?;
    if link.is_dir() && !link.is_symlink() {
        bail!(
            "{} is a folder, not a link; remove it and run setup again",
            link.display()
        );
    }
    fs::rename(&tmp, link).with_context(|| format!("replacing {}", link.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_from_python_layout_drops_local_suffix() {
        let dir = std::env::temp_dir().join(format!("xtask-ver-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("version.py"),
            "x = 1\n__version__ = '2.13.0+cu130'\n",
        )
        .unwrap();
        assert_eq!(detect_version(&dir).as_deref(), Some("2.13.0"));
        fs::write(dir.join("build-version"), "2.12.1+cpu\n").unwrap();
        assert_eq!(detect_version(&dir).as_deref(), Some("2.12.1"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
