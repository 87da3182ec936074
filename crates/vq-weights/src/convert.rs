//! From the public PyTorch files to the safetensors layouts of `vq_models::Lpips` and
//! `vq_models::FidInception`.
//!
//! The sources are read by `pytorch-reader` (PyTorch's zip format and the legacy pickle stream of
//! PyTorch ≤ 1.5, tensors only: no code in the file is run). Every entry of a source must be one
//! the real file has — an entry that is kept (renamed where the layouts differ) or one that is
//! known and dropped — and every kept tensor must be float32; anything else is an error naming
//! the file and the entries, and nothing is written. The output is written beside its final
//! name and renamed into place when complete.
//!
//! | source | entry | converted |
//! |---|---|---|
//! | torchvision `vgg16-397923af.pth` | `features.{i}.weight`, `features.{i}.bias` (13 convolutions) | same name |
//! | | `classifier.*` (the ImageNet classifier) | dropped |
//! | LPIPS v0.1 `vgg.pth` | `lin{k}.model.1.weight` (k = 0…4, shape (1, C, 1, 1)) | `lin{k}.weight` |
//! | pytorch-fid `pt_inception-2015-12-05-6726825d.pth` | `Conv2d_*`, `Mixed_*`, `fc.*` | same name |
//! | | `*.num_batches_tracked` (BatchNorm's update counter) | dropped |

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use pytorch_reader::{DType, PytorchReader};
use safetensors::tensor::{Dtype, TensorView};

use crate::error::{Result, WeightsError};
use crate::network::Network;

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    /// The file written.
    pub file: PathBuf,
    /// Tensors in it.
    pub tensors: usize,
    /// Their elements.
    pub elements: usize,
    /// Entries of the sources that were dropped.
    pub dropped: usize,
}

/// Where an entry of a source goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// Into the output under this name.
    Keep(String),
    /// Known and not needed.
    Drop,
}

/// One source file and the entries it must have.
struct Source<'a> {
    file: &'a Path,
    what: &'static str,
    /// The route of an entry; `None` for an entry the real file does not have.
    route: fn(&str) -> Option<Route>,
    /// Entries kept from it.
    keep: usize,
}

/// LPIPS: torchvision's VGG16 ImageNet weights (`vgg`) and the LPIPS v0.1 heads (`heads`) into
/// `out`, the layout of `vq_models::Lpips`.
///
/// # Errors
/// [`WeightsError`] naming the file: unreadable, an entry the real file does not have, missing
/// tensors, a tensor that is not float32, or the output not writable.
pub fn lpips(vgg: &Path, heads: &Path, out: &Path) -> Result<Converted> {
    convert(
        &[
            Source {
                file: vgg,
                what: "torchvision's VGG16 state dict",
                route: vgg_route,
                keep: 26,
            },
            Source {
                file: heads,
                what: "the LPIPS VGG heads (lpips/weights/v0.1/vgg.pth)",
                route: head_route,
                keep: 5,
            },
        ],
        out,
        Network::Lpips,
    )
}

/// The FID Inception: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (`src`) into `out`,
/// the layout of `vq_models::FidInception`.
///
/// # Errors
/// As [`lpips`].
pub fn inception(src: &Path, out: &Path) -> Result<Converted> {
    convert(
        &[Source {
            file: src,
            what: "pytorch-fid's FID Inception state dict",
            route: inception_route,
            keep: Network::Inception.tensors(),
        }],
        out,
        Network::Inception,
    )
}

fn vgg_route(key: &str) -> Option<Route> {
    let (part, rest) = key.split_once('.')?;
    let (layer, param) = rest.split_once('.')?;
    if layer.parse::<usize>().is_err() || !matches!(param, "weight" | "bias") {
        return None;
    }
    match part {
        "features" => Some(Route::Keep(key.to_owned())),
        "classifier" => Some(Route::Drop),
        _ => None,
    }
}

fn head_route(key: &str) -> Option<Route> {
    let k = key.strip_prefix("lin")?.strip_suffix(".model.1.weight")?;
    matches!(k, "0" | "1" | "2" | "3" | "4").then(|| Route::Keep(format!("lin{k}.weight")))
}

/// The blocks of torchvision's Inception3 without the auxiliary classifier.
const INCEPTION_BLOCKS: [&str; 17] = [
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
    "fc",
];

fn inception_route(key: &str) -> Option<Route> {
    let (block, _) = key.split_once('.')?;
    if !INCEPTION_BLOCKS.contains(&block) {
        return None;
    }
    Some(if key.ends_with(".num_batches_tracked") {
        Route::Drop
    } else {
        Route::Keep(key.to_owned())
    })
}

/// A kept tensor: shape and little-endian float32 bytes.
type Kept = (Vec<usize>, Vec<u8>);

fn convert(sources: &[Source], out: &Path, network: Network) -> Result<Converted> {
    let mut kept: HashMap<String, Kept> = HashMap::new();
    let mut dropped = 0;
    for s in sources {
        dropped += take(s, &mut kept)?;
    }
    debug_assert_eq!(kept.len(), network.tensors());
    write(&kept, sources, out).map(|elements| Converted {
        file: out.to_path_buf(),
        tensors: kept.len(),
        elements,
        dropped,
    })
}

/// Reads the kept tensors of `s` into `kept`; returns the number of dropped entries.
fn take(s: &Source, kept: &mut HashMap<String, Kept>) -> Result<usize> {
    let file = s.file.display().to_string();
    let read_err = |why: String| WeightsError::Read {
        file: file.clone(),
        why,
    };
    let reader = PytorchReader::new(s.file)
        .map_err(|e| read_err(format!("not a PyTorch file this reader accepts: {e}")))?;
    let mut keys = reader.keys();
    keys.sort();
    let (mut keep, mut dropped, mut unknown) = (Vec::new(), 0, Vec::new());
    for key in &keys {
        match (s.route)(key) {
            Some(Route::Keep(name)) => keep.push((key, name)),
            Some(Route::Drop) => dropped += 1,
            None => unknown.push(key.as_str()),
        }
    }
    if !unknown.is_empty() {
        return Err(WeightsError::Unexpected {
            file,
            what: s.what,
            keys: summary(&unknown),
        });
    }
    if keep.len() != s.keep {
        return Err(WeightsError::Count {
            file,
            what: s.what,
            want: s.keep,
            got: keep.len(),
        });
    }
    for (key, name) in keep {
        let t = reader.get(key).expect("a listed key");
        if t.dtype() != DType::F32 {
            return Err(WeightsError::DType {
                file,
                key: key.clone(),
                dtype: format!("{:?}", t.dtype()).to_lowercase(),
            });
        }
        let mut bytes = t.read().map_err(|e| read_err(e.to_string()))?;
        if cfg!(target_endian = "big") {
            bytes.chunks_exact_mut(4).for_each(|c| {
                c.copy_from_slice(&f32::from_ne_bytes([c[0], c[1], c[2], c[3]]).to_le_bytes())
            });
        }
        kept.insert(name, (t.shape().to_vec(), bytes));
    }
    Ok(dropped)
}

/// The first few of `keys` and how many there are.
fn summary(keys: &[&str]) -> String {
    const SHOWN: usize = 6;
    let mut s = keys[..keys.len().min(SHOWN)].join(", ");
    if keys.len() > SHOWN {
        s += &format!(" and {} more", keys.len() - SHOWN);
    }
    s
}

/// Writes `kept` to `out` through `<out>.part`; returns the number of elements.
fn write(kept: &HashMap<String, Kept>, sources: &[Source], out: &Path) -> Result<usize> {
    let werr = |why: String| WeightsError::Write {
        file: out.display().to_string(),
        why,
    };
    let mut views = Vec::with_capacity(kept.len());
    let mut elements = 0;
    for (name, (shape, bytes)) in kept {
        elements += shape.iter().product::<usize>();
        let view = TensorView::new(Dtype::F32, shape.clone(), bytes)
            .map_err(|e| werr(format!("{name}: {}", crate::safetensors_problem(&e))))?;
        views.push((name.as_str(), view));
    }
    let names: Vec<String> = sources
        .iter()
        .map(|s| {
            s.file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    let metadata = HashMap::from([
        ("format".to_owned(), "pt".to_owned()),
        ("converted_from".to_owned(), names.join(", ")),
    ]);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| werr(e.to_string()))?;
    }
    let mut part = out.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let written = safetensors::tensor::serialize(views, &Some(metadata))
        .map_err(|e| werr(crate::safetensors_problem(&e)))
        .and_then(|bytes| fs::write(&part, bytes).map_err(|e| werr(e.to_string())))
        .and_then(|()| fs::rename(&part, out).map_err(|e| werr(e.to_string())));
    if written.is_err() {
        let _ = fs::remove_file(&part);
    }
    written.map(|()| elements)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_keep_rename_drop_and_refuse() {
        let keep = |s: &str| Some(Route::Keep(s.to_owned()));
        assert_eq!(vgg_route("features.28.bias"), keep("features.28.bias"));
        assert_eq!(vgg_route("features.x.bias"), None);
        assert_eq!(vgg_route("classifier.6.bias"), Some(Route::Drop));
        assert_eq!(vgg_route("classifier.6.running_mean"), None);
        assert_eq!(vgg_route("lin0.model.1.weight"), None);
        assert_eq!(head_route("lin3.model.1.weight"), keep("lin3.weight"));
        assert_eq!(head_route("lin5.model.1.weight"), None);
        assert_eq!(head_route("lin3.weight"), None);
        assert_eq!(
            inception_route("Mixed_7c.branch_pool.bn.running_var"),
            keep("Mixed_7c.branch_pool.bn.running_var")
        );
        assert_eq!(
            inception_route("Conv2d_1a_3x3.bn.num_batches_tracked"),
            Some(Route::Drop)
        );
        assert_eq!(inception_route("AuxLogits.fc.weight"), None);
        assert_eq!(inception_route("fc"), None);
    }

    /// The real LPIPS heads (legacy pickle, storages on `cuda:0`): values as `torch.load` gives
    /// them (first two elements and the f64 sum of each head).
    #[test]
    fn the_real_lpips_heads_are_read_and_renamed() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lpips-v0.1-vgg.pth");
        let mut kept = HashMap::new();
        let source = Source {
            file: &file,
            what: "heads",
            route: head_route,
            keep: 5,
        };
        assert_eq!(take(&source, &mut kept).unwrap(), 0);
        let torch = [
            (64, [0.050_111_66, 0.039_312_32], 6.925_991_700_962_186),
            (128, [0.039_409_373, 0.475_680_23], 8.858_334_008_604_288),
            (256, [0.057_933_863, 0.065_741_16], 17.515_006_046_742_2),
            (512, [0.057_808_01, 0.065_471_33], 51.521_323_032_677_174),
            (512, [0.042_680_405, 0.118_454_9], 47.034_853_758_290_41),
        ];
        for (k, (c, first, sum)) in torch.into_iter().enumerate() {
            let (shape, bytes) = &kept[&format!("lin{k}.weight")];
            assert_eq!(shape, &[1, c, 1, 1]);
            let v: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(v[..2], first, "lin{k}");
            let s: f64 = v.iter().map(|&x| f64::from(x)).sum();
            assert!((s - sum).abs() < 1e-9 * sum, "lin{k}: sum {s} vs {sum}");
        }
        // The heads are not a VGG16 file.
        let e = take(
            &Source {
                route: vgg_route,
                ..source
            },
            &mut HashMap::new(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("unexpected entries lin0.model.1.weight"),
            "{e}"
        );
    }

    #[test]
    fn a_file_that_is_not_a_pytorch_file_is_refused_by_name_and_nothing_is_written() {
        let dir = std::env::temp_dir().join(format!("vq-weights-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("vgg16.pth");
        fs::write(&bad, b"<html>not found</html>").unwrap();
        let out = dir.join("out.safetensors");
        let e = inception(&bad, &out).unwrap_err();
        assert!(matches!(e, WeightsError::Read { .. }), "{e}");
        assert!(e.to_string().contains("vgg16.pth"), "{e}");
        assert!(!out.exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn summaries_name_the_first_entries_and_count_the_rest() {
        let keys: Vec<String> = (0..9).map(|i| format!("k{i}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        assert_eq!(summary(&refs[..2]), "k0, k1");
        assert_eq!(summary(&refs), "k0, k1, k2, k3, k4, k5 and 3 more");
    }
}
