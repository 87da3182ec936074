//! Code grids in and out of a trained run: `vq-train encode` writes the code indices of every
//! sample of a split, `vq-train decode` turns such a file back into images through the run's
//! decoder.
//!
//! A codes file is safetensors (PyTorch: `safetensors.torch.load_file`) holding
//! * `codes`: (n, h, w), or (n, t, h, w) for video, with a last axis of G for the G stages or
//!   heads of a residual or multi-head quantizer, in the narrowest integer type that holds the
//!   codebook size K (U8 up to 256 codes, I16 up to 32 768, else I32),
//! * `decoded`: (n) U8, 1 where the sample decoded and 0 where it was skipped (its codes are 0),
//! * `codebook`: (K, D) F32, the codes the indices select (`VectorQuantizer::codes_table`:
//!   SimVQ's mapped codebook, FSQ's grid; (G, K, D/G) for separate codebooks per stage / head,
//!   (1, K, D/H) for heads sharing one),
//! * `labels`: (n) I32, each sample's class index, where the data has classes (IDX label files,
//!   class folders, ImageNet's classes; [`crate::labels`]), with their names as the `classes`
//!   metadata (a JSON list),
//!
//! and as metadata the run's configuration (`run_config`, as run.json), the checkpoint `step`,
//! the `split`, the shard's `first` dataset index and `count`, the split's `total`, the shard
//! number `shard` of `shards`, and `format` = [`FORMAT`]. A split of more than `shard_size`
//! samples is written as numbered shards (`<stem>-00000-of-00012.safetensors`, ...) beside the
//! output path, each written to a temporary file and renamed when complete; an encode that is
//! run again keeps the shards that are already there and complete, so an interrupted encode of
//! ImageNet resumes, and memory holds one shard's codes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use tch::{Device, Kind, Tensor, nn};
use vq_data::Split;
use vq_models::VqAutoencoder;
use vq_tch::Mode;

use crate::checkpoint;
use crate::config::RunConfig;
use crate::data::{DataSource, ImageSet, frames_as_images};

/// The `format` metadata of a codes file.
pub const FORMAT: &str = "vq-train codes 2";

/// The formats this version reads: 2 adds `labels` and `classes` to 1.
pub const READ_FORMATS: [&str; 2] = ["vq-train codes 1", FORMAT];

/// A trained run, loaded for encoding or decoding.
#[derive(Debug)]
pub struct LoadedRun {
    /// Its configuration (run.json).
    pub config: RunConfig,
    /// The model with the latest checkpoint's weights.
    pub model: VqAutoencoder,
    /// That checkpoint's step.
    pub step: usize,
    _vs: nn::VarStore,
}

impl LoadedRun {
    /// The run in folder `run` with its latest checkpoint, on `device`.
    ///
    /// # Errors
    /// No run.json, no checkpoint, or weights that do not fit the configuration.
    pub fn load(run: &Path, device: Device) -> Result<Self> {
        let config = RunConfig::from_run_file(&crate::layout::RunDir::new(run).run())?;
        let (_, state) = checkpoint::latest(run)?
            .with_context(|| format!("{} has no checkpoint to take codes from", run.display()))?;
        let (model, vs) = crate::autoencoder::load_model(run, &config, device)?;
        Ok(Self {
            config,
            model,
            step: state.step,
            _vs: vs,
        })
    }
}

/// What `encode` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The files, in order.
    pub files: Vec<PathBuf>,
    /// Shards found complete and kept.
    pub kept: usize,
    /// Samples of the split.
    pub samples: usize,
    /// Samples that did not decode (listed with their errors on stderr).
    pub skipped: usize,
}

/// The integer type of codes for a codebook of `k` codes.
fn code_dtype(k: usize) -> (Dtype, Kind) {
    match k {
        0..=256 => (Dtype::U8, Kind::Uint8),
        257..=32_768 => (Dtype::I16, Kind::Int16),
        _ => (Dtype::I32, Kind::Int),
    }
}

/// The path of shard `i` of `n` for output `out` (`out` itself when there is one shard).
fn shard_path(out: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map_or("codes".into(), |s| s.to_string_lossy());
    out.with_file_name(format!("{stem}-{i:05}-of-{n:05}.safetensors"))
}

/// Writes the codes of every sample of `split` of the run's data (or `data`, a `--data`
/// source) to `out`, `shard_size` samples per file, `batch` samples per forward pass.
///
/// # Errors
/// Unreadable data, samples of another shape than the model takes, unwritable files.
pub fn encode(
    run: &mut LoadedRun,
    data: Option<&str>,
    split: Split,
    out: &Path,
    shard_size: usize,
    batch: usize,
    progress: bool,
) -> Result<Encoded> {
    ensure!(
        shard_size > 0 && batch > 0,
        "--shard-size and --batch must be at least 1"
    );
    let cfg = &run.config;
    let source = DataSource::parse(data.unwrap_or(&cfg.data))?;
    let set = cfg.load_split(&source, split)?;
    let total = set.len();
    ensure!(
        total > 0,
        "the {split:?} split of {} is empty",
        source.describe()
    );
    let shards = total.div_ceil(shard_size);
    // The token count (K − 1 segments for SF-DiVeQ): what a prior's vocabulary must hold.
    let k = cfg.model.quantizer.tokens();
    let codebook = run.model.quantizer().codes_table().to_device(Device::Cpu);
    let labels = crate::labels::split_labels(&source, split, cfg.preprocessing)?;
    if let Some(l) = &labels {
        ensure!(
            l.values.len() == total,
            "{} lists {} labels for {total} samples",
            source.describe(),
            l.values.len()
        );
    }
    let mut meta_common = HashMap::from([
        ("format".to_owned(), FORMAT.to_owned()),
        ("run_config".to_owned(), serde_json::to_string(cfg)?),
        ("step".to_owned(), run.step.to_string()),
        ("split".to_owned(), split_name(split).to_owned()),
        ("total".to_owned(), total.to_string()),
        ("shards".to_owned(), shards.to_string()),
        ("codebook_size".to_owned(), k.to_string()),
    ]);
    if let Some(l) = &labels {
        meta_common.insert("classes".into(), serde_json::to_string(&l.classes)?);
    }
    let bar = crate::run::progress_bar(progress, 0, total);
    let mut done = Encoded {
        files: Vec::new(),
        kept: 0,
        samples: total,
        skipped: 0,
    };
    for shard in 0..shards {
        let first = shard * shard_size;
        let count = shard_size.min(total - first);
        let path = shard_path(out, shard, shards);
        let mut meta = meta_common.clone();
        meta.insert("shard".into(), shard.to_string());
        meta.insert("first".into(), first.to_string());
        meta.insert("count".into(), count.to_string());
        if is_complete(&path, &meta) {
            done.kept += 1;
            bar.inc(count as u64);
            done.files.push(path);
            continue;
        }
        let (codes, decoded) = encode_range(run, &set, first, count, batch, &bar)?;
        done.skipped += decoded.iter().filter(|&&d| d == 0).count();
        let shard_labels = labels.as_ref().map(|l| {
            l.values[first..first + count]
                .iter()
                .map(|&v| v as i32)
                .collect::<Vec<_>>()
        });
        let tensors = ShardTensors {
            codes: &codes,
            decoded: &decoded,
            codebook: &codebook,
            labels: shard_labels.as_deref(),
        };
        write_shard(&path, &tensors, k, meta)?;
        done.files.push(path);
    }
    bar.finish_and_clear();
    Ok(done)
}

fn split_name(split: Split) -> &'static str {
    match split {
        Split::Train => "train",
        Split::Test => "val",
    }
}

/// The codes (count, ...) as i64 and the decoded flags of samples `first..first + count`.
fn encode_range(
    run: &mut LoadedRun,
    set: &ImageSet,
    first: usize,
    count: usize,
    batch: usize,
    bar: &indicatif::ProgressBar,
) -> Result<(Tensor, Vec<u8>)> {
    let device = run.model.quantizer().codebook().device();
    let mut parts: Vec<(Vec<usize>, Tensor)> = Vec::new();
    let mut decoded = vec![1u8; count];
    let mut grid: Option<Vec<i64>> = None;
    for start in (first..first + count).step_by(batch) {
        let idx: Vec<i64> = (start..(start + batch).min(first + count))
            .map(|i| i as i64)
            .collect();
        let (x, bad) = set.decodable_batch(&idx, device)?;
        for b in &bad {
            eprintln!("skipped sample {} ({}): {}", b.index, b.name, b.error);
            decoded[b.index - first] = 0;
        }
        if let Some(x) = x {
            let codes = tch::no_grad(|| run.model.encode(&x, Mode::Eval))?
                .indices
                .to_device(Device::Cpu);
            grid.get_or_insert_with(|| codes.size()[1..].to_vec());
            let rows = idx
                .iter()
                .map(|&i| i as usize - first)
                .filter(|&r| decoded[r] == 1)
                .collect();
            parts.push((rows, codes));
        }
        bar.inc(idx.len() as u64);
    }
    let grid = grid.context("no sample of this shard decodes")?;
    let mut shape = vec![count as i64];
    shape.extend(&grid);
    let all = Tensor::zeros(&shape[..], (Kind::Int64, Device::Cpu));
    for (rows, codes) in parts {
        let rows = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>());
        let mut target = all.shallow_clone();
        let _ = target.index_copy_(0, &rows, &codes);
    }
    Ok((all, decoded))
}

/// The largest codes file read (one shard is read whole): 16 GiB, 60 times a default shard of
/// ImageNet's 32×32 codes.
pub(crate) const MAX_CODES_FILE_BYTES: u64 = 16 << 30;

/// The bytes of a codes file, its header checked first and its size at most
/// [`MAX_CODES_FILE_BYTES`].
///
/// # Errors
/// As [`crate::safetensors_file::read_whole`].
pub(crate) fn read_codes_file(path: &Path) -> Result<Vec<u8>> {
    crate::safetensors_file::read_whole(
        path,
        MAX_CODES_FILE_BYTES,
        "encode the split again with a smaller --shard-size (shards are read one at a time)",
    )
}

/// Whether `path` is a complete shard with exactly the metadata `meta`.
fn is_complete(path: &Path, meta: &HashMap<String, String>) -> bool {
    let Ok(bytes) = read_codes_file(path) else {
        return false;
    };
    crate::safetensors_file::parse(path, &bytes).is_ok_and(|(_, m)| m == *meta)
}

/// Writes a codes file of generated grids (`sample`): `codes` (n, h, w), all decoded, with
/// `labels` and their `classes` when the grids are class-conditional, the tokenizer's
/// `codebook` and `meta` (the tokenizer's `run_config` among it); `format` is added.
///
/// # Errors
/// An unwritable file.
pub fn write_codes_file(
    path: &Path,
    codes: &Tensor,
    labels: Option<(&[i32], &[String])>,
    codebook: &Tensor,
    mut meta: HashMap<String, String>,
) -> Result<()> {
    let k = codebook.size()[codebook.dim() - 2] as usize;
    let n = codes.size()[0] as usize;
    meta.insert("format".into(), FORMAT.into());
    meta.insert("codebook_size".into(), k.to_string());
    meta.insert("first".into(), "0".into());
    meta.insert("count".into(), n.to_string());
    meta.insert("total".into(), n.to_string());
    meta.insert("shard".into(), "0".into());
    meta.insert("shards".into(), "1".into());
    if let Some((_, classes)) = labels {
        meta.insert("classes".into(), serde_json::to_string(classes)?);
    }
    let decoded = vec![1u8; n];
    let tensors = ShardTensors {
        codes,
        decoded: &decoded,
        codebook,
        labels: labels.map(|(l, _)| l),
    };
    write_shard(path, &tensors, k, meta)
}

/// What one shard file holds.
struct ShardTensors<'a> {
    codes: &'a Tensor,
    decoded: &'a [u8],
    codebook: &'a Tensor,
    labels: Option<&'a [i32]>,
}

fn write_shard(
    path: &Path,
    t: &ShardTensors<'_>,
    k: usize,
    meta: HashMap<String, String>,
) -> Result<()> {
    let (dtype, kind) = code_dtype(k);
    let codes = t.codes.to_kind(kind).contiguous();
    let code_bytes = crate::checkpoint::tensor_bytes(&codes, kind)?;
    let codebook = t.codebook.to_kind(Kind::Float).contiguous();
    let book_bytes = crate::checkpoint::tensor_bytes(&codebook, Kind::Float)?;
    let label_bytes: Option<Vec<u8>> = t
        .labels
        .map(|l| l.iter().flat_map(|v| v.to_le_bytes()).collect());
    let dims = |t: &Tensor| t.size().iter().map(|&d| d as usize).collect::<Vec<_>>();
    let mut views = vec![
        ("codes", TensorView::new(dtype, dims(&codes), &code_bytes)?),
        (
            "decoded",
            TensorView::new(Dtype::U8, vec![t.decoded.len()], t.decoded)?,
        ),
        (
            "codebook",
            TensorView::new(Dtype::F32, dims(&codebook), &book_bytes)?,
        ),
    ];
    if let Some(bytes) = &label_bytes {
        views.push((
            "labels",
            TensorView::new(Dtype::I32, vec![bytes.len() / 4], bytes)?,
        ));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Serialised in memory and written through `std::fs`, so that a failed write is a plain
    // I/O error naming the file ("No space left on device").
    let bytes = safetensors::tensor::serialize(views, &Some(meta))
        .with_context(|| format!("serialising {}", path.display()))?;
    crate::checkpoint::replace_file(path, |tmp| crate::checkpoint::write_synced(tmp, &bytes))
}

/// Decodes every sample of the codes file `codes` with the run's decoder and writes
/// `<out>/<index>.png` (the split's dataset index, six digits; video: `<index>-<frame>.png`),
/// `batch` samples per pass. Samples that were skipped when encoding are left out. Returns the
/// number of samples written.
///
/// # Errors
/// A file that is not a codes file, codes of another codebook than the run's (another run or
/// checkpoint), an unwritable folder.
pub fn decode(run: &LoadedRun, codes: &Path, out: &Path, batch: usize) -> Result<usize> {
    ensure!(batch > 0, "--batch must be at least 1");
    let bytes = read_codes_file(codes)?;
    let (file, meta) = crate::safetensors_file::parse(codes, &bytes)?;
    if !meta
        .get("format")
        .is_some_and(|f| READ_FORMATS.contains(&f.as_str()))
    {
        bail!(
            "{} is not a codes file of `vq-train encode` (no format \"{FORMAT}\" in its metadata)",
            codes.display()
        );
    }
    let first: usize = meta
        .get("first")
        .context("no 'first' in the metadata")?
        .parse()?;
    let device = run.model.quantizer().codebook().device();
    let theirs = view_tensor(&file, codes, "codebook")?;
    let ours = run.model.quantizer().codes_table().to_device(Device::Cpu);
    if !(theirs.size() == ours.size() && theirs.equal(&ours.to_kind(Kind::Float))) {
        bail!(
            "the codebook in {} is not the run's (step {}): the codes were made by another run \
             or checkpoint",
            codes.display(),
            run.step
        );
    }
    let all = view_tensor(&file, codes, "codes")?.to_kind(Kind::Int64);
    let decoded = Vec::<u8>::try_from(view_tensor(&file, codes, "decoded")?)?;
    ensure!(
        decoded.len() as i64 == all.size()[0],
        "{}: 'decoded' and 'codes' differ in length",
        codes.display()
    );
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let keep: Vec<i64> = (0..decoded.len() as i64)
        .filter(|&i| decoded[i as usize] == 1)
        .collect();
    let grouped = run.config.model.quantizer.family.group_axis().is_some();
    let video = all.dim() - usize::from(grouped) == 4;
    for rows in keep.chunks(batch) {
        let idx = Tensor::from_slice(rows);
        let x = tch::no_grad(|| {
            run.model
                .decode_codes(&all.index_select(0, &idx).to_device(device))
        })?;
        let frames = x.size().get(2).copied().filter(|_| video).unwrap_or(1) as usize;
        for (k, img) in crate::plot::rgb_images(&frames_as_images(&x))?
            .into_iter()
            .enumerate()
        {
            let index = first + rows[k / frames] as usize;
            let name = match video {
                true => format!("{index:06}-{:03}.png", k % frames),
                false => format!("{index:06}.png"),
            };
            let path = out.join(name);
            // Encoded in memory and written by `std::fs` (`image`'s `save` loses the error of
            // its last write); not fsynced one by one, as a dataset's worth of files would be.
            let mut png = std::io::Cursor::new(Vec::new());
            img.write_to(&mut png, image::ImageFormat::Png)
                .with_context(|| format!("encoding {}", path.display()))?;
            crate::checkpoint::replace_file(&path, |tmp| {
                std::fs::write(tmp, png.get_ref())
                    .with_context(|| format!("writing {}", tmp.display()))
            })?;
        }
    }
    Ok(keep.len())
}

/// Tensor `name` of a safetensors file as a CPU tensor.
pub(crate) fn view_tensor(file: &SafeTensors, path: &Path, name: &str) -> Result<Tensor> {
    let v = file
        .tensor(name)
        .with_context(|| format!("{} has no tensor '{name}'", path.display()))?;
    let kind = match v.dtype() {
        Dtype::U8 => Kind::Uint8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F32 => Kind::Float,
        other => bail!("{}: tensor '{name}' has type {other:?}", path.display()),
    };
    let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(v.data(), &shape, kind)?)
}
