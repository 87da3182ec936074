//! `cargo xtask download-weights lpips|inception|all`: the public files of the metric networks
//! (manifests `weights/<name>.json`), fetched and verified like `download-data`, then converted
//! by `vq_weights::convert` into the folder where `vq-train` looks for them.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::Digest as _;
use vq_weights::Network;

use crate::download::{self, FileEntry, Target};

/// A file inside a downloaded zip archive (the LPIPS heads inside the lpips wheel).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Member {
    /// Path inside the archive.
    pub member: String,
    /// Name it is written under.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Lower-case hex sha256.
    pub sha256: String,
}

/// One file of a weights manifest.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct WeightsFile {
    /// The download.
    #[serde(flatten)]
    pub file: FileEntry,
    /// Other URLs of the same bytes, tried in turn when one fails.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// The member to take out of it, when it is an archive.
    #[serde(default)]
    pub extract: Option<Member>,
}

/// The parts of a `weights/<name>.json` manifest this command uses.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct WeightsManifest {
    /// The network's name (`lpips`, `inception`).
    pub name: String,
    /// The files.
    pub files: Vec<WeightsFile>,
    /// The inputs of the conversion, in order (file names, or extracted members' names).
    pub convert: Vec<String>,
}

impl WeightsManifest {
    /// Reads `weights/<network>.json` under `root`.
    ///
    /// # Errors
    /// Missing or malformed manifest, naming the file.
    pub fn load(root: &Path, network: Network) -> Result<Self> {
        let path = root
            .join("weights")
            .join(format!("{}.json", network.name()));
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let m: Self =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if m.name != network.name() {
            bail!(
                "{}: names network {:?}, expected {:?}",
                path.display(),
                m.name,
                network.name()
            );
        }
        Ok(m)
    }
}

/// Fetches, verifies and converts `network`'s files into `dir` (sources under `dir/sources/`);
/// returns the converted file. Present, verified files are not fetched again.
///
/// # Errors
/// Download or verification failures (naming the URL and the checksum), an archive without its
/// member, conversion errors (naming the file and the tensors).
pub fn download(
    m: &WeightsManifest,
    network: Network,
    dir: &Path,
    progress: bool,
) -> Result<PathBuf> {
    let sources = dir.join("sources");
    for f in &m.files {
        if let Some(x) = &f.extract {
            let dest = sources.join(&x.name);
            let present = dest.is_file()
                && verify_member(
                    &fs::read(&dest).with_context(|| format!("reading {}", dest.display()))?,
                    x,
                )
                .is_ok();
            if present {
                eprintln!("{}: present and verified", dest.display());
                continue;
            }
        }
        fetch_any(f, &sources, progress)?;
        if let Some(x) = &f.extract {
            extract_member(&sources.join(&f.file.name), x, &sources)?;
        }
    }
    let input = |name: &String| sources.join(name);
    let out = dir.join(network.file_name());
    let converted = match (network, m.convert.as_slice()) {
        (Network::Lpips, [vgg, heads]) => {
            vq_weights::convert::lpips(&input(vgg), &input(heads), &out)
        }
        (Network::Inception, [src]) => vq_weights::convert::inception(&input(src), &out),
        _ => bail!(
            "weights/{}.json: \"convert\" lists {} inputs, which {} does not take",
            m.name,
            m.convert.len(),
            network.name()
        ),
    }?;
    eprintln!(
        "{}: {} tensors, {} parameters and statistics ({} entries of the sources dropped)",
        out.display(),
        converted.tensors,
        converted.elements,
        converted.dropped
    );
    Ok(out)
}

/// `f` from its URL, else from each mirror in turn (the partial file carries over: the bytes
/// are the same, pinned by the checksum).
fn fetch_any(f: &WeightsFile, dir: &Path, progress: bool) -> Result<()> {
    let mut last = None;
    for url in std::iter::once(&f.file.url).chain(&f.mirrors) {
        let t = Target {
            url: url.clone(),
            ..Target::of(&f.file, dir)
        };
        match download::fetch(&t, progress) {
            Ok(()) => return Ok(()),
            Err(e) => {
                if f.mirrors.is_empty() {
                    return Err(e);
                }
                eprintln!("{url}: {e:#}");
                last = Some(e);
            }
        }
    }
    Err(last
        .expect("at least one URL")
        .context(format!("{}: every URL failed", f.file.name)))
}

fn verify_member(bytes: &[u8], x: &Member) -> Result<()> {
    if bytes.len() as u64 != x.bytes {
        bail!("size {} bytes, expected {}", bytes.len(), x.bytes);
    }
    let got: String = sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if !got.eq_ignore_ascii_case(&x.sha256) {
        bail!("sha256 {got}, expected {}", x.sha256);
    }
    Ok(())
}

/// Writes member `x` of the zip `archive` into `dir`, verified, through a `.part` file.
fn extract_member(archive: &Path, x: &Member, dir: &Path) -> Result<()> {
    let file = fs::File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a zip archive", archive.display()))?;
    let mut entry = zip
        .by_name(&x.member)
        .with_context(|| format!("{} has no member {}", archive.display(), x.member))?;
    let mut bytes = Vec::new();
    entry
        .by_ref()
        .take(x.bytes + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {} from {}", x.member, archive.display()))?;
    verify_member(&bytes, x).with_context(|| format!("{} in {}", x.member, archive.display()))?;
    let dest = dir.join(&x.name);
    let part = dir.join(format!("{}.part", x.name));
    fs::write(&part, &bytes).with_context(|| format!("writing {}", part.display()))?;
    fs::rename(&part, &dest).with_context(|| format!("moving {} into place", dest.display()))?;
    eprintln!("{}: extracted and verified", dest.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::download::tests::{Mode, serve};
    use std::io::Write;

    fn hex(d: &[u8]) -> String {
        sha2::Sha256::digest(d)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn heads() -> Vec<u8> {
        let f = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../crates/vq-weights/tests/fixtures/lpips-v0.1-vgg.pth");
        fs::read(f).unwrap()
    }

    /// A wheel-like zip holding `member`.
    fn wheel(member: &str, body: &[u8]) -> Vec<u8> {
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        z.start_file(
            "lpips/__init__.py",
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        z.write_all(b"").unwrap();
        z.start_file(member, zip::write::SimpleFileOptions::default())
            .unwrap();
        z.write_all(body).unwrap();
        z.finish().unwrap().into_inner()
    }

    fn entry(name: &str, url: &str, body: &[u8]) -> FileEntry {
        FileEntry {
            name: name.into(),
            url: url.into(),
            bytes: Some(body.len() as u64),
            sha256: Some(hex(body)),
            md5: None,
            tls: None,
        }
    }

    /// A VGG16 state dict written by `torch.save` (legacy format, small tensors under the real
    /// names: the conversion checks names, counts and types; vq-models' tests check shapes).
    fn vgg_pth(dir: &Path) -> Option<Vec<u8>> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let site = root.join(".libtorch/site");
        if !site.join("torch").is_dir() {
            return None;
        }
        let mut entries = Vec::new();
        let convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28];
        let keys = convs
            .iter()
            .map(|i| format!("features.{i}"))
            .chain([0, 3, 6].iter().map(|i| format!("classifier.{i}")));
        for (n, layer) in keys.enumerate() {
            for (j, p) in ["weight", "bias"].into_iter().enumerate() {
                let offset = 4 * n + 2 * j;
                entries.push(
                    serde_json::json!({"key": format!("{layer}.{p}"), "shape": [2],
                    "values": "blob", "offset": offset}),
                );
            }
        }
        let blob: Vec<u8> = (0..64)
            .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
            .collect();
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("blob"), blob).unwrap();
        let spec = serde_json::json!({"blob": dir.join("blob"), "files": [
            {"path": dir.join("vgg.pth"), "format": "legacy", "entries": entries}]});
        fs::write(dir.join("spec.json"), spec.to_string()).unwrap();
        let status = std::process::Command::new("python3")
            .arg(root.join("crates/vq-models/tests/reference/write_pth.py"))
            .arg(dir.join("spec.json"))
            .env("PYTHONPATH", site)
            .status()
            .unwrap();
        assert!(status.success());
        Some(fs::read(dir.join("vgg.pth")).unwrap())
    }

    /// The tensor names of a safetensors file.
    fn names(file: &Path) -> Vec<String> {
        let b = fs::read(file).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let h: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&b[8..8 + n]).unwrap();
        let mut v: Vec<String> = h.into_iter().map(|(k, _)| k).collect();
        v.retain(|k| k != "__metadata__");
        v.sort();
        v
    }

    #[test]
    fn lpips_files_served_locally_are_fetched_verified_and_converted_once() {
        let dir = std::env::temp_dir().join(format!("xtask-weights-e2e-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let Some(vgg) = vgg_pth(&dir.join("src")) else {
            eprintln!("skipped: no Python torch in .libtorch/site");
            return;
        };
        let body = heads();
        let whl = wheel("lpips/weights/v0.1/vgg.pth", &body);
        let manifest = |vgg_url: &str, whl_url: &str| WeightsManifest {
            name: "lpips".into(),
            files: vec![
                WeightsFile {
                    file: entry("vgg16.pth", vgg_url, &vgg),
                    mirrors: vec![],
                    extract: None,
                },
                WeightsFile {
                    file: entry("lpips.whl", whl_url, &whl),
                    mirrors: vec![],
                    extract: Some(Member {
                        member: "lpips/weights/v0.1/vgg.pth".into(),
                        name: "heads.pth".into(),
                        bytes: body.len() as u64,
                        sha256: hex(&body),
                    }),
                },
            ],
            convert: vec!["vgg16.pth".into(), "heads.pth".into()],
        };
        let ((vgg_url, _), (whl_url, _)) = (
            serve(vgg.clone(), Mode::Whole),
            serve(whl.clone(), Mode::Whole),
        );
        let out = download(&manifest(&vgg_url, &whl_url), Network::Lpips, &dir, false).unwrap();
        assert_eq!(out, dir.join("lpips-vgg16-v0.1.safetensors"));
        let got = names(&out);
        assert_eq!(got.len(), 31);
        assert!(
            got.contains(&"lin4.weight".to_owned()) && got.contains(&"features.28.bias".to_owned())
        );
        // Again with every URL answering 404: nothing is fetched, the output is rebuilt.
        fs::remove_file(&out).unwrap();
        let (gone, _) = serve(Vec::new(), Mode::NotFound);
        download(&manifest(&gone, &gone), Network::Lpips, &dir, false).unwrap();
        assert_eq!(names(&out), got);
        // A source that does not match its pin is not converted.
        fs::write(dir.join("sources/vgg16.pth"), b"truncated").unwrap();
        let e = download(&manifest(&gone, &gone), Network::Lpips, &dir, false).unwrap_err();
        assert!(
            format!("{e:#}").contains("does not match the manifest"),
            "{e:#}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_manifests_parse_and_name_their_networks() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for n in Network::ALL {
            let m = WeightsManifest::load(&root, n).unwrap();
            assert!(
                m.files
                    .iter()
                    .all(|f| f.file.sha256.is_some() && f.file.bytes.is_some())
            );
        }
    }

    /// The member is taken out of an archive served from 127.0.0.1 (the first URL failing, a
    /// mirror serving it), verified, and a corrupt member is refused with nothing left behind.
    #[test]
    fn members_come_out_of_archives_verified_and_mirrors_are_tried() {
        let dir = std::env::temp_dir().join(format!("xtask-weights-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let body = heads();
        let whl = wheel("lpips/weights/v0.1/vgg.pth", &body);
        let (url, _) = serve(whl.clone(), Mode::Whole);
        let member = Member {
            member: "lpips/weights/v0.1/vgg.pth".into(),
            name: "lpips-v0.1-vgg.pth".into(),
            bytes: body.len() as u64,
            sha256: hex(&body),
        };
        let (missing, _) = serve(Vec::new(), Mode::NotFound);
        let f = WeightsFile {
            file: entry("lpips.whl", &missing, &whl),
            mirrors: vec![url],
            extract: Some(member.clone()),
        };
        fetch_any(&f, &dir, false).unwrap();
        extract_member(&dir.join("lpips.whl"), &member, &dir).unwrap();
        assert_eq!(fs::read(dir.join("lpips-v0.1-vgg.pth")).unwrap(), body);

        let wrong = Member {
            sha256: "0".repeat(64),
            name: "other.pth".into(),
            ..member
        };
        let e = format!(
            "{:#}",
            extract_member(&dir.join("lpips.whl"), &wrong, &dir).unwrap_err()
        );
        assert!(
            e.contains("lpips/weights/v0.1/vgg.pth") && e.contains("sha256"),
            "{e}"
        );
        assert!(!dir.join("other.pth").exists() && !dir.join("other.pth.part").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
