//! `cargo xtask download-data`: resumable, verified, atomic downloads of the datasets described
//! by the manifests in `datasets/`, and safe archive extraction.
//!
//! A file is fetched into `<dest>.part`; after an interruption (a dropped connection, a killed
//! process) the next attempt asks for the rest with an HTTP `Range` request and appends, and
//! starts over if the server ignores the range. The complete file is checked against the
//! manifest's size and sha256 / md5; only then is it renamed to its final name. A mismatch
//! deletes the partial file and says which checksum failed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use md5::Digest as _;

/// One file of a manifest.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct FileEntry {
    /// File name.
    pub name: String,
    /// Where it comes from.
    pub url: String,
    /// Size in bytes.
    pub bytes: Option<u64>,
    /// Lower-case hex sha256.
    pub sha256: Option<String>,
    /// Lower-case hex md5.
    pub md5: Option<String>,
    /// `"unverified-chain"` for a host whose TLS certificate chain is broken (UCF's): the
    /// connection is accepted without checking the chain, which is safe only because the file
    /// is pinned by its sha256 or md5 (required for such entries).
    #[serde(default)]
    pub tls: Option<String>,
}

/// The parts of a `datasets/<name>.json` manifest this command uses.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Manifest {
    /// `none`, or what access the user needs.
    pub auth: String,
    /// The files.
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// Reads `datasets/<name>.json` under `root`.
    ///
    /// # Errors
    /// Unknown dataset or malformed manifest, naming the file.
    pub fn load(root: &Path, name: &str) -> Result<Self> {
        let path = root.join("datasets").join(format!("{name}.json"));
        let text = fs::read_to_string(&path).with_context(|| {
            format!(
                "no manifest {} (datasets with manifests: {})",
                path.display(),
                known(root).join(", ")
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

fn known(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(root.join("datasets"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.strip_suffix(".json").map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// What to fetch and how to check it.
#[derive(Debug, Clone)]
pub struct Target {
    /// URL (http or https).
    pub url: String,
    /// Final path.
    pub dest: PathBuf,
    /// Expected size.
    pub bytes: Option<u64>,
    /// Expected sha256 (hex).
    pub sha256: Option<String>,
    /// Expected md5 (hex).
    pub md5: Option<String>,
    /// Accept the server's certificate chain unchecked (the content is pinned by hash).
    pub unverified_tls: bool,
}

impl Target {
    /// The target of a manifest entry inside `dir`.
    pub fn of(entry: &FileEntry, dir: &Path) -> Self {
        Self {
            url: entry.url.clone(),
            dest: dir.join(&entry.name),
            bytes: entry.bytes,
            sha256: entry.sha256.clone(),
            md5: entry.md5.clone(),
            unverified_tls: entry.tls.as_deref() == Some("unverified-chain"),
        }
    }

    fn part(&self) -> PathBuf {
        let mut name = self.dest.file_name().unwrap_or_default().to_os_string();
        name.push(".part");
        self.dest.with_file_name(name)
    }
}

/// Connection attempts per file before giving up.
const ATTEMPTS: usize = 8;

/// Downloads `t` (resuming a previous `.part`), verifies it and moves it into place. A final
/// file that is already present and verifies is left alone.
///
/// # Errors
/// HTTP errors (status and URL), repeated connection failures, a size or checksum mismatch
/// (the partial file is then deleted), file-system errors.
pub fn fetch(t: &Target, progress: bool) -> Result<()> {
    if t.dest.is_file() {
        if verify(&t.dest, t).is_ok() {
            eprintln!("{}: present and verified", t.dest.display());
            return Ok(());
        }
        bail!(
            "{} exists but does not match the manifest; delete it to download again",
            t.dest.display()
        );
    }
    if let Some(parent) = t.dest.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let part = t.part();
    let bar = bar(progress, t.bytes);
    let mut agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .tls_config(trusted_tls());
    if t.unverified_tls {
        if t.sha256.is_none() && t.md5.is_none() {
            bail!(
                "{}: refusing an unchecked TLS connection for a file without a checksum",
                t.url
            );
        }
        eprintln!(
            "{}: the host's certificate chain is known to be broken; connecting without checking \
             it (the file is verified by its checksum afterwards)",
            t.url
        );
        agent = agent.tls_config(pinned_by_hash_tls());
    }
    let agent = agent.build();
    let mut failures = 0;
    loop {
        let have = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if t.bytes.is_some_and(|n| have >= n) {
            break;
        }
        let mut req = agent.get(&t.url);
        if have > 0 {
            req = req.set("Range", &format!("bytes={have}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            // The server says the range starts at or after the end: the file is complete.
            Err(ureq::Error::Status(416, _)) if have > 0 => break,
            Err(ureq::Error::Status(code, _)) => bail!("HTTP {code} for {}", t.url),
            Err(e) => {
                failures += 1;
                if failures >= ATTEMPTS {
                    return Err(e).with_context(|| format!("downloading {}", t.url));
                }
                eprintln!("{}: {e}; retrying", t.url);
                std::thread::sleep(Duration::from_millis(200 * failures as u64));
                continue;
            }
        };
        let append = resp.status() == 206 && have > 0;
        let mut out = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&part)
            .with_context(|| format!("opening {}", part.display()))?;
        let start = if append { have } else { 0 };
        bar.set_position(start);
        match io::copy(&mut bar.wrap_read(resp.into_reader()), &mut out) {
            Ok(_) => {
                out.sync_all()
                    .with_context(|| format!("writing {}", part.display()))?;
                let now = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
                if t.bytes.is_none_or(|n| now >= n) {
                    break;
                }
                // A connection closed early without an error: resume.
                failures += 1;
            }
            Err(e) => {
                failures += 1;
                eprintln!("{}: connection lost ({e}); resuming", t.url);
            }
        }
        if failures >= ATTEMPTS {
            bail!(
                "{}: gave up after {ATTEMPTS} failed attempts; the partial file {} is kept, run again to resume",
                t.url,
                part.display()
            );
        }
    }
    bar.finish_and_clear();
    if let Err(e) = verify(&part, t) {
        fs::remove_file(&part).ok();
        return Err(e.context(format!(
            "{} failed verification; the partial download was deleted, run again to download it anew",
            t.url
        )));
    }
    fs::rename(&part, &t.dest).with_context(|| format!("moving {} into place", part.display()))?;
    eprintln!("{}: downloaded and verified", t.dest.display());
    Ok(())
}

fn bar(show: bool, len: Option<u64>) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len.unwrap_or(0));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bytes}/{total_bytes} [{bar:30}] {bytes_per_sec}, eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

/// Checks size, sha256 and md5 (those the target names) of `path`.
///
/// # Errors
/// The first mismatch, with expected and found values.
pub fn verify(path: &Path, t: &Target) -> Result<()> {
    let len = fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if let Some(n) = t.bytes
        && len != n
    {
        bail!("{}: size {len} bytes, expected {n}", path.display());
    }
    if t.sha256.is_none() && t.md5.is_none() {
        return Ok(());
    }
    let mut f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let (mut sha, mut md5) = (sha2::Sha256::new(), md5::Md5::new());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        if t.sha256.is_some() {
            sha.update(&buf[..n]);
        }
        if t.md5.is_some() {
            md5.update(&buf[..n]);
        }
    }
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    if let Some(want) = &t.sha256 {
        let got = hex(&sha.finalize());
        if !got.eq_ignore_ascii_case(want) {
            bail!("{}: sha256 {got}, expected {want}", path.display());
        }
    }
    if let Some(want) = &t.md5 {
        let got = hex(&md5.finalize());
        if !got.eq_ignore_ascii_case(want) {
            bail!("{}: md5 {got}, expected {want}", path.display());
        }
    }
    Ok(())
}

/// The TLS client of every download: it trusts Mozilla's roots (webpki-roots, what ureq ships)
/// and the system's store (rustls-native-certs, also honouring `SSL_CERT_FILE`), so that a
/// minimal container without a CA bundle works, and so does a network whose TLS-inspecting
/// proxy's authority the system trusts.
fn trusted_tls() -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Ok(native) = rustls_native_certs::load_native_certs() {
        roots.add_parsable_certificates(native);
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    std::sync::Arc::new(config)
}

/// A TLS client that accepts any certificate chain (signatures in the handshake are still
/// checked). Only for manifest entries marked `"tls": "unverified-chain"`, whose content is
/// pinned by hash.
fn pinned_by_hash_tls() -> std::sync::Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct AnyChain(std::sync::Arc<rustls::crypto::CryptoProvider>);
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    impl ServerCertVerifier for AnyChain {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyChain(provider)))
        .with_no_client_auth();
    std::sync::Arc::new(config)
}

/// Extracts a `.zip` archive into `dir`, refusing entries that would land outside it.
///
/// # Errors
/// Unreadable archive, an unsafe entry (named), file-system errors.
pub fn extract_zip(archive: &Path, dir: &Path) -> Result<usize> {
    let f = File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let mut zip = zip::ZipArchive::new(io::BufReader::new(f))
        .with_context(|| format!("reading {} as a zip archive", archive.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut n = 0;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .with_context(|| format!("reading entry {i} of {}", archive.display()))?;
        let Some(rel) = entry.enclosed_name() else {
            bail!(
                "{}: refusing the entry {} (it would be written outside {})",
                archive.display(),
                entry.name(),
                dir.display()
            );
        };
        if entry.is_symlink() {
            bail!(
                "{}: refusing the link entry {}",
                archive.display(),
                entry.name()
            );
        }
        let path = dir.join(rel);
        if entry.is_dir() {
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
            continue;
        }
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        // Written beside and renamed, so an interrupted extraction leaves no truncated file.
        let tmp = path.with_extension("extracting");
        let mut out = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        io::copy(&mut entry, &mut out)
            .with_context(|| format!("extracting {} from {}", entry.name(), archive.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        n += 1;
    }
    Ok(n)
}

/// Extracts a `.rar` archive (UCF-101's official one) with the first of `unrar`, `7z` or
/// `bsdtar` found on the PATH (no pure-Rust RAR decoder exists); each of them refuses paths
/// outside the target folder.
///
/// # Errors
/// No extractor installed (the message says which to install), or the extractor failing.
pub fn extract_rar(archive: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tools: [(&str, Vec<std::ffi::OsString>); 3] = [
        (
            "unrar",
            vec![
                "x".into(),
                "-o+".into(),
                "-idq".into(),
                archive.into(),
                format!("{}/", dir.display()).into(),
            ],
        ),
        (
            "7z",
            vec![
                "x".into(),
                "-y".into(),
                format!("-o{}", dir.display()).into(),
                archive.into(),
            ],
        ),
        (
            "bsdtar",
            vec![
                "-x".into(),
                "-f".into(),
                archive.into(),
                "-C".into(),
                dir.into(),
            ],
        ),
    ];
    for (tool, args) in tools {
        match std::process::Command::new(tool).args(&args).status() {
            Ok(s) if s.success() => return Ok(()),
            Ok(s) => bail!("{tool} failed ({s}) extracting {}", archive.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("running {tool}")),
        }
    }
    bail!(
        "{} is a RAR archive and none of unrar, 7z, bsdtar is installed: install one (e.g. \
         `apt-get install libarchive-tools` for bsdtar) and run again, or download the zip mirror \
         instead: `cargo xtask download-data ucf101` (the default)",
        archive.display()
    )
}

/// Extracts a `.tar` or `.tar.gz`/`.tgz` archive into `dir`, refusing entries that would land
/// outside it (absolute paths, `..`) and links.
///
/// # Errors
/// Unreadable archive, an unsafe entry (named), file-system errors.
pub fn extract(archive: &Path, dir: &Path) -> Result<usize> {
    let f = File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let name = archive.to_string_lossy();
    let reader: Box<dyn Read> = if name.ends_with(".gz") || name.ends_with(".tgz") {
        Box::new(flate2::read::GzDecoder::new(io::BufReader::new(f)))
    } else {
        Box::new(io::BufReader::new(f))
    };
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tar = tar::Archive::new(reader);
    let mut n = 0;
    for entry in tar
        .entries()
        .with_context(|| format!("reading {}", archive.display()))?
    {
        let mut entry = entry.with_context(|| format!("reading {}", archive.display()))?;
        let path = entry.path()?.into_owned();
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            bail!(
                "{}: refusing the link entry {}",
                archive.display(),
                path.display()
            );
        }
        let safe = path.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        });
        if !safe || !entry.unpack_in(dir)? {
            bail!(
                "{}: refusing the entry {} (it would be written outside {})",
                archive.display(),
                path.display(),
                dir.display()
            );
        }
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// How the test server behaves.
    #[derive(Clone, Copy)]
    pub(crate) enum Mode {
        /// Serve the body, honouring Range headers.
        Whole,
        /// Answer 404.
        NotFound,
        /// Close the connection after this many body bytes on the first request.
        DropAfter(usize),
        /// Serve the body with one byte flipped.
        Corrupt,
        /// Ignore Range headers (answer 200 with the whole body), after dropping once.
        IgnoreRangeAfterDrop(usize),
    }

    /// Serves `body` on 127.0.0.1; returns the URL and the Range headers it received.
    pub(crate) fn serve(body: Vec<u8>, mode: Mode) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/data.bin", listener.local_addr().unwrap());
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let seen = ranges.clone();
        std::thread::spawn(move || {
            for (i, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut range = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        range = Some(v.trim().trim_end_matches('-').to_owned());
                    }
                }
                seen.lock().unwrap().push(range.clone());
                if matches!(mode, Mode::NotFound) {
                    let _ =
                        stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                    continue;
                }
                let mut data = body.clone();
                if matches!(mode, Mode::Corrupt) {
                    data[body.len() / 2] ^= 0x40;
                }
                let honour = !matches!(mode, Mode::IgnoreRangeAfterDrop(_));
                let from: usize = match (&range, honour) {
                    (Some(r), true) => r.parse().unwrap(),
                    _ => 0,
                };
                let status = if from > 0 {
                    "206 Partial Content"
                } else {
                    "200 OK"
                };
                let rest = &data[from..];
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    rest.len()
                );
                stream.write_all(head.as_bytes()).unwrap();
                let cut = match mode {
                    Mode::DropAfter(n) | Mode::IgnoreRangeAfterDrop(n) if i == 0 => n,
                    _ => rest.len(),
                };
                let _ = stream.write_all(&rest[..cut.min(rest.len())]);
                let _ = stream.flush();
                drop(stream);
            }
        });
        (url, ranges)
    }

    fn body() -> Vec<u8> {
        (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn target(url: &str, dir: &Path, data: &[u8]) -> Target {
        let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        Target {
            url: url.to_owned(),
            dest: dir.join("data.bin"),
            bytes: Some(data.len() as u64),
            sha256: Some(hex(&sha2::Sha256::digest(data))),
            md5: Some(hex(&md5::Md5::digest(data))),
            unverified_tls: false,
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-dl-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_dropped_connection_is_resumed_with_a_range_request() {
        let data = body();
        let (url, ranges) = serve(data.clone(), Mode::DropAfter(70_000));
        let dir = tmp("resume");
        let t = target(&url, &dir, &data);
        fetch(&t, false).unwrap();
        assert_eq!(fs::read(&t.dest).unwrap(), data);
        assert!(!t.part().exists());
        let r = ranges.lock().unwrap().clone();
        assert_eq!(r[0], None);
        assert_eq!(
            r[1].as_deref(),
            Some("70000"),
            "resumed where it stopped: {r:?}"
        );
        // Present and verified: nothing is fetched again.
        fetch(&t, false).unwrap();
        assert_eq!(ranges.lock().unwrap().len(), 2);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_server_ignoring_the_range_restarts_the_file() {
        let data = body();
        let (url, _) = serve(data.clone(), Mode::IgnoreRangeAfterDrop(50_000));
        let dir = tmp("norange");
        let t = target(&url, &dir, &data);
        fetch(&t, false).unwrap();
        assert_eq!(fs::read(&t.dest).unwrap(), data);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_corrupted_byte_is_rejected_and_nothing_is_kept() {
        let data = body();
        let (url, _) = serve(data.clone(), Mode::Corrupt);
        let dir = tmp("corrupt");
        let t = target(&url, &dir, &data);
        let err = format!("{:#}", fetch(&t, false).unwrap_err());
        assert!(err.contains("sha256") && err.contains("expected"), "{err}");
        assert!(!t.dest.exists() && !t.part().exists());
        // md5 alone catches it too.
        let t = Target { sha256: None, ..t };
        let err = format!("{:#}", fetch(&t, false).unwrap_err());
        assert!(err.contains("md5"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn extraction_refuses_paths_outside_the_folder() {
        let dir = tmp("extract");
        fs::create_dir_all(&dir).unwrap();
        // A well-formed archive extracts.
        let good = dir.join("good.tar.gz");
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            File::create(&good).unwrap(),
            flate2::Compression::fast(),
        ));
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "imagenette2/train/a.txt", &b"abc"[..])
            .unwrap();
        b.into_inner().unwrap().finish().unwrap();
        assert_eq!(extract(&good, &dir.join("out")).unwrap(), 1);
        assert_eq!(
            fs::read(dir.join("out/imagenette2/train/a.txt")).unwrap(),
            b"abc"
        );
        // One whose entry climbs out is refused (the header is written by hand: the builder
        // itself refuses such names).
        let evil = dir.join("evil.tar");
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..12].copy_from_slice(b"../../escape");
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(&[b'x'; 512]);
        bytes.extend_from_slice(&[0u8; 1024]);
        fs::write(&evil, bytes).unwrap();
        let err = extract(&evil, &dir.join("out2")).unwrap_err().to_string();
        assert!(err.contains("refusing"), "{err}");
        assert!(!dir.join("escape").exists() && !dir.parent().unwrap().join("escape").exists());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn zip_extraction_writes_files_and_refuses_escapes() {
        let dir = tmp("zip");
        fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, entries: &[(&str, &[u8])]| {
            let path = dir.join(name);
            let mut z = zip::ZipWriter::new(File::create(&path).unwrap());
            for (n, data) in entries {
                z.start_file(*n, zip::write::SimpleFileOptions::default())
                    .unwrap();
                z.write_all(data).unwrap();
            }
            z.finish().unwrap();
            path
        };
        let good = write(
            "splits.zip",
            &[
                ("ucfTrainTestlist/classInd.txt", b"1 ApplyEyeMakeup\n"),
                (
                    "ucfTrainTestlist/trainlist01.txt",
                    b"ApplyEyeMakeup/v_x.avi 1\n",
                ),
            ],
        );
        assert_eq!(extract_zip(&good, &dir.join("out")).unwrap(), 2);
        assert_eq!(
            fs::read(dir.join("out/ucfTrainTestlist/classInd.txt")).unwrap(),
            b"1 ApplyEyeMakeup\n"
        );
        let evil = write("evil.zip", &[("../../escape.txt", b"x")]);
        let err = extract_zip(&evil, &dir.join("out2"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refusing") && err.contains("escape.txt"),
            "{err}"
        );
        assert!(!dir.join("escape.txt").exists());
        let err = format!(
            "{:#}",
            extract_zip(&dir.join("splits.zip.missing"), &dir).unwrap_err()
        );
        assert!(err.contains("splits.zip.missing"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_unverified_tls_entry_needs_a_checksum() {
        let dir = tmp("tls");
        let t = Target {
            unverified_tls: true,
            sha256: None,
            md5: None,
            ..target("https://127.0.0.1:9/x", &dir, b"x")
        };
        let err = fetch(&t, false).unwrap_err().to_string();
        assert!(err.contains("without a checksum"), "{err}");
        // The TLS configuration builds.
        let _ = pinned_by_hash_tls();
        let _ = fs::remove_dir_all(dir);
    }
}
