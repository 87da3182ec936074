//! Codes files as a dataset: the training data of a prior. [`CodeSet::open`] reads the files
//! `vq-train encode` wrote (one file, the numbered shards of one, or a folder of them), checks
//! that they belong together — the same tokenizer (its codebook, bit for bit), grid, codebook
//! size and classes, and every shard of a set present — and keeps the samples that decoded.
//! Anything else is an error naming the file: nothing is mixed silently.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use tch::{Device, Kind, Tensor};

use crate::codes::{READ_FORMATS, view_tensor};

/// The codes of one or more codes files, in memory (narrow integer type, CPU).
#[derive(Debug)]
pub struct CodeSet {
    /// Codes (N, h, w) of the samples that decoded, in file order.
    pub codes: Tensor,
    /// Class index per sample (i64), when every file has labels.
    pub labels: Option<Tensor>,
    /// Class names (empty without labels).
    pub classes: Vec<String>,
    /// Codes K of the tokenizer.
    pub codebook_size: usize,
    /// The tokenizer's codebook as the files hold it.
    pub codebook: Tensor,
    /// The tokenizer run's configuration (run.json) as the files record it.
    pub run_config: String,
    /// The files read.
    pub files: Vec<PathBuf>,
}

/// One file's part.
struct FilePart {
    codes: Tensor,
    labels: Option<Tensor>,
    classes: Vec<String>,
    codebook_size: usize,
    codebook: Tensor,
    run_config: String,
}

impl CodeSet {
    /// Reads `paths`: codes files, folders of them (every `*.safetensors` inside, sorted), or the
    /// output path given to `encode` when it wrote numbered shards.
    ///
    /// # Errors
    /// No files; a file that is not a codes file; a missing shard; files of different
    /// tokenizers, grids, codebook sizes or classes; residual / multi-head or video codes (the
    /// priors model one code per grid cell of an image); no sample that decoded.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let files = expand(paths)?;
        ensure!(!files.is_empty(), "no codes files given");
        let mut parts: Vec<FilePart> = Vec::new();
        for f in &files {
            let part = read_part(f)?;
            if let Some(first) = parts.first() {
                agree(first, &part, &files[0], f)?;
            }
            parts.push(part);
        }
        let first = &parts[0];
        let (codebook_size, codebook) = (first.codebook_size, first.codebook.shallow_clone());
        let (run_config, classes) = (first.run_config.clone(), first.classes.clone());
        let with_labels = parts.iter().all(|p| p.labels.is_some());
        let codes = Tensor::cat(&parts.iter().map(|p| &p.codes).collect::<Vec<_>>(), 0);
        let labels = with_labels.then(|| {
            let l: Vec<&Tensor> = parts.iter().filter_map(|p| p.labels.as_ref()).collect();
            Tensor::cat(&l, 0)
        });
        ensure!(
            codes.size()[0] > 0,
            "no sample of {} decoded when it was encoded",
            files[0].display()
        );
        Ok(Self {
            codes,
            labels,
            classes: if with_labels { classes } else { Vec::new() },
            codebook_size,
            codebook,
            run_config,
            files,
        })
    }

    /// Samples.
    pub fn len(&self) -> usize {
        self.codes.size()[0] as usize
    }

    /// Whether there is no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The code grid (h, w).
    pub fn grid(&self) -> (usize, usize) {
        let s = self.codes.size();
        (s[1] as usize, s[2] as usize)
    }

    /// Samples `idx` as codes (B, h, w) i64 and labels (B) i64 on `device`.
    pub fn batch(&self, idx: &[i64], device: Device) -> (Tensor, Option<Tensor>) {
        let i = Tensor::from_slice(idx);
        let codes = self.codes.index_select(0, &i).to_kind(Kind::Int64);
        let labels = self
            .labels
            .as_ref()
            .map(|l| l.index_select(0, &i).to_device(device));
        (codes.to_device(device), labels)
    }
}

/// The files named by `paths` (folders and shard sets expanded), in order.
fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("listing {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "safetensors") && f.is_file())
                .collect();
            inside.sort();
            ensure!(
                !inside.is_empty(),
                "{} holds no .safetensors file",
                p.display()
            );
            files.extend(inside);
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            let shards = shard_set(p)?;
            ensure!(
                !shards.is_empty(),
                "{} does not exist (nor numbered shards of it)",
                p.display()
            );
            files.extend(shards);
        }
    }
    Ok(files)
}

/// The numbered shards `<stem>-00000-of-0000n.safetensors` of output path `out`, all of them
/// (a missing one is an error naming it); empty when there is none.
fn shard_set(out: &Path) -> Result<Vec<PathBuf>> {
    let stem = out
        .file_stem()
        .map_or("codes".into(), |s| s.to_string_lossy());
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let prefix = format!("{stem}-00000-of-");
    let Some(n) = std::fs::read_dir(dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|name| {
            let rest = name.strip_prefix(&prefix)?.strip_suffix(".safetensors")?;
            rest.parse::<usize>().ok()
        })
    else {
        return Ok(Vec::new());
    };
    (0..n)
        .map(|i| {
            let f = dir.join(format!("{stem}-{i:05}-of-{n:05}.safetensors"));
            ensure!(
                f.is_file(),
                "shard {} of {n} is missing: {}",
                i + 1,
                f.display()
            );
            Ok(f)
        })
        .collect()
}

fn read_part(f: &Path) -> Result<FilePart> {
    let bytes = crate::codes::read_codes_file(f)?;
    let (file, meta) = crate::safetensors_file::parse(f, &bytes)?;
    let get = |key: &str| {
        meta.get(key)
            .cloned()
            .with_context(|| format!("{}: no '{key}' in the metadata", f.display()))
    };
    let format = get("format")?;
    ensure!(
        READ_FORMATS.contains(&format.as_str()),
        "{} is not a codes file of `vq-train encode` (format {format:?})",
        f.display()
    );
    let codebook_size: usize = get("codebook_size")?
        .parse()
        .with_context(|| format!("{}: codebook_size is not a number", f.display()))?;
    let codes = view_tensor(&file, f, "codes")?;
    if codes.dim() != 3 {
        bail!(
            "{}: codes of shape {:?}: the priors model one code per cell of an image's grid \
             (N, h, w), not residual / multi-head code groups or video",
            f.display(),
            codes.size()
        );
    }
    let decoded = view_tensor(&file, f, "decoded")?;
    ensure!(
        decoded.size() == [codes.size()[0]],
        "{}: 'decoded' and 'codes' differ in length",
        f.display()
    );
    let keep = decoded.ne(0).nonzero().view([-1]);
    let labels = match file.tensor("labels") {
        Ok(_) => Some(view_tensor(&file, f, "labels")?.to_kind(Kind::Int64)),
        Err(_) => None,
    };
    let classes: Vec<String> = match meta.get("classes") {
        Some(c) => serde_json::from_str(c)
            .with_context(|| format!("{}: 'classes' is not a JSON list", f.display()))?,
        None => Vec::new(),
    };
    if let Some(l) = &labels {
        ensure!(
            l.size() == [codes.size()[0]],
            "{}: 'labels' and 'codes' differ in length",
            f.display()
        );
        let bad = l.numel() > 0
            && (i64::try_from(l.min())? < 0 || i64::try_from(l.max())? >= classes.len() as i64);
        ensure!(
            !bad,
            "{}: a label is outside its {} classes",
            f.display(),
            classes.len()
        );
    }
    let codes = codes.index_select(0, &keep);
    if codes.numel() > 0 {
        let hi = i64::try_from(codes.max().to_kind(Kind::Int64))?;
        let lo = i64::try_from(codes.min().to_kind(Kind::Int64))?;
        ensure!(
            lo >= 0 && hi < codebook_size as i64,
            "{}: code {} is outside the codebook's {codebook_size} codes",
            f.display(),
            if lo < 0 { lo } else { hi }
        );
    }
    Ok(FilePart {
        codes,
        labels: labels.map(|l| l.index_select(0, &keep)),
        classes,
        codebook_size,
        codebook: view_tensor(&file, f, "codebook")?,
        run_config: get("run_config")?,
    })
}

/// An error naming both files when `b` does not belong with `a`.
fn agree(a: &FilePart, b: &FilePart, fa: &Path, fb: &Path) -> Result<()> {
    let both = || format!("{} and {}", fa.display(), fb.display());
    ensure!(
        a.codes.size()[1..] == b.codes.size()[1..],
        "{}: code grids {:?} and {:?} differ",
        both(),
        &a.codes.size()[1..],
        &b.codes.size()[1..]
    );
    ensure!(
        a.codebook_size == b.codebook_size
            && a.codebook.size() == b.codebook.size()
            && a.codebook.equal(&b.codebook),
        "{}: the codes come from different tokenizers (their codebooks differ)",
        both()
    );
    ensure!(
        a.labels.is_some() == b.labels.is_some() && a.classes == b.classes,
        "{}: the files' class labels differ (one has none, or other classes)",
        both()
    );
    Ok(())
}
