//! Image datasets: a folder of class sub-folders (Imagenette, an extracted ImageNet), the
//! official ImageNet archives read in place (the train tar of per-class tars, the flat val tar),
//! decoded to RGB and preprocessed by a [`Transform`].
//!
//! Class indices follow the order every PyTorch code base uses: the position of the class
//! folder (the WordNet id for ImageNet) in sorted order. For ImageNet the list of all 1000
//! WNIDs shipped in `datasets/imagenet/wnids.txt` is used, so a partial copy keeps the
//! canonical indices.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::Array3;
use rand::rngs::StdRng;

use crate::archive::{Location, index_tar};
use crate::error::{DataError, Ignored, Result};
use crate::loader::Dataset;
use crate::transform::{Transform, hwc_to_chw};

/// File name extensions taken as images (case-insensitive): torchvision's `IMG_EXTENSIONS`
/// (`.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp`), GIF and the other Netpbm names.
pub const IMAGE_EXTENSIONS: [&str; 12] = [
    "jpeg", "jpg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pbm", "pnm",
];

/// Decodes a JPEG, PNG, WebP, BMP, TIFF, GIF (first frame) or Netpbm (PPM/PGM/PBM) — format
/// sniffed from the bytes, not the name: ImageNet has a PNG named `.JPEG` — into RGB
/// `(H, W, 3)`; grayscale, CMYK, alpha and 16-bit images are converted. A truncated JPEG is an error, not a grey-filled image.
///
/// # Errors
/// [`DataError::Decode`] naming `path` for bytes that are not a decodable image.
pub fn decode_rgb(path: &Path, bytes: &[u8]) -> Result<Array3<u8>> {
    let failed = |why: String| DataError::Decode {
        path: path.to_path_buf(),
        why,
    };
    if is_truncated_jpeg(bytes) {
        // The decoder would fill the missing rows with grey; refuse as Pillow does by default.
        return Err(failed(
            "truncated JPEG: the file ends before its end-of-image marker".into(),
        ));
    }
    let format = image::guess_format(bytes).map_err(|_| failed(NOT_AN_IMAGE.into()))?;
    let reader = || image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let (w, h) = reader()
        .into_dimensions()
        .map_err(|e| failed(e.to_string()))?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels > MAX_IMAGE_PIXELS {
        return Err(failed(format!(
            "image too large: {w}×{h} = {pixels} pixels, more than the {MAX_IMAGE_PIXELS} \
             accepted (a decompression bomb?)"
        )));
    }
    let mut reader = reader();
    let mut limits = image::Limits::default();
    // The largest accepted image as 16-bit RGBA, its decoded form at most.
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => failed(format!(
            "image too large: {w}×{h} needs more memory to decode than the {} MiB allowed ({l})",
            (MAX_IMAGE_PIXELS * 8) >> 20
        )),
        e => failed(e.to_string()),
    })?;
    let rgb = img.into_rgb8();
    let (w, h) = rgb.dimensions();
    Ok(
        Array3::from_shape_vec((h as usize, w as usize, 3), rgb.into_raw())
            .expect("RgbImage holds h·w·3 bytes"),
    )
}

/// Images with more pixels are refused before they are decoded: Pillow's limit
/// (`2 × Image.MAX_IMAGE_PIXELS`, past which it raises `DecompressionBombError`), 13,377² —
/// ImageNet's largest image has 0.03 of that.
pub const MAX_IMAGE_PIXELS: u64 = 178_956_970;

/// Image files larger than this are refused before they are read: ImageNet's largest JPEG is
/// about 15 MB; several loader threads reading a multi-GB file named `.jpg` at once would not
/// fit in memory.
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;

/// Bytes read to recognise an image format from its signature (WebP's is the longest, 12).
const SIGNATURE_BYTES: usize = 32;

const NOT_AN_IMAGE: &str =
    "not an image: its first bytes match none of JPEG, PNG, WebP, BMP, TIFF, GIF, PPM/PGM/PBM";

/// A JPEG (starts with SOI, `FF D8`) that ends before its end-of-image marker `FF D9`: the
/// file was cut. The image's own structure is followed from the start — each marker segment by
/// its length, each scan's entropy-coded data up to the next marker (a data byte `FF` is stuffed
/// as `FF 00`; `FF D0`–`FF D7` are restart markers inside it) — to the first end-of-image
/// marker; what follows it (a camera's trailer, a motion photo's video, an appended thumbnail)
/// is not the image's and is not looked at. A cut file runs out of bytes before that marker.
fn is_truncated_jpeg(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let n = bytes.len();
    let mut i = 2;
    loop {
        // The next marker: bytes that are not one are skipped, as decoders do.
        while i < n && bytes[i] != 0xFF {
            i += 1;
        }
        // Fill bytes: any number of FF before the marker code.
        while i < n && bytes[i] == 0xFF {
            i += 1;
        }
        let Some(&m) = bytes.get(i) else {
            return true;
        };
        i += 1;
        match m {
            0xD9 => return false,
            // Markers without a segment.
            0x00 | 0x01 | 0xD0..=0xD8 => {}
            _ => {
                let Some(len) = bytes.get(i..i + 2) else {
                    return true;
                };
                i += usize::from(u16::from_be_bytes([len[0], len[1]]));
                if m == 0xDA {
                    i = end_of_scan(bytes, i);
                }
            }
        }
    }
}

/// Where the entropy-coded data that starts at `i` ends: at the first `FF` that begins a marker
/// other than a stuffed `FF 00` or a restart marker (or at the end of the bytes).
fn end_of_scan(bytes: &[u8], mut i: usize) -> usize {
    while i + 1 < bytes.len() {
        if bytes[i] == 0xFF {
            match bytes[i + 1] {
                0x00 | 0xD0..=0xD7 => i += 2,
                0xFF => i += 1,
                _ => return i,
            }
        } else {
            i += 1;
        }
    }
    bytes.len()
}

/// One image of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    /// Where its bytes are.
    pub location: Location,
    /// Class index.
    pub label: u32,
}

/// A decoded, preprocessed image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSample {
    /// `(3, size, size)` RGB, channel first.
    pub pixels: Array3<u8>,
    /// Class index.
    pub label: u32,
}

/// A list of images with labels and a preprocessing [`Transform`]; random access by index.
#[derive(Debug, Clone)]
pub struct ImageDataset {
    entries: Vec<ImageEntry>,
    classes: Vec<String>,
    transform: Transform,
    ignored: Ignored,
}

/// Which ImageNet split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageNetSplit {
    /// 1,281,167 training images.
    Train,
    /// 50,000 validation images.
    Val,
}

fn is_image(name: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(_, ext)| IMAGE_EXTENSIONS.iter().any(|e| ext.eq_ignore_ascii_case(e)))
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut v = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(io)?;
    v.sort();
    Ok(v)
}

/// The names of `dirs` (their last path components).
fn folder_names(dirs: &[PathBuf]) -> Vec<String> {
    dirs.iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// The sub-folders of `dir` in sorted order, with their names.
fn subfolders(dir: &Path) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let dirs: Vec<PathBuf> = read_dir_sorted(dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    let names = folder_names(&dirs);
    Ok((dirs, names))
}

/// The 1000 ImageNet WordNet ids in sorted order (class index = position), shipped with the
/// project (from TensorFlow Datasets' `imagenet2012/labels.txt`, Apache-2.0).
pub fn imagenet_wnids() -> Result<Vec<String>> {
    let path = imagenet_meta_dir().join("wnids.txt");
    let text = std::fs::read_to_string(&path).map_err(|source| DataError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(text.lines().map(str::to_owned).collect())
}

/// Folder of the shipped ImageNet label files in this source tree.
pub fn imagenet_meta_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../datasets/imagenet"
    ))
}

/// The WNID of each validation image in file-name order (`ILSVRC2012_val_00000001.JPEG` first)
/// from a labels file: one WNID per line (TensorFlow Datasets' `validation_labels.txt`, shipped
/// gzipped as `datasets/imagenet/validation_labels.txt.gz`, the default) or lines
/// `<file name> <wnid>` (taming-transformers' `validation_synset.txt`).
///
/// # Errors
/// [`DataError::Io`] / [`DataError::BadLine`] naming the file and line.
pub fn imagenet_val_labels(
    path: Option<&Path>,
) -> Result<std::collections::HashMap<String, String>> {
    let default = imagenet_meta_dir().join("validation_labels.txt.gz");
    let path = path.unwrap_or(&default);
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    let mut text = String::new();
    if raw.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_string(&mut text)
            .map_err(io)?;
    } else {
        text = String::from_utf8(raw).map_err(|e| io(std::io::Error::other(e)))?;
    }
    let mut map = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (file, wnid) = match line.split_once(char::is_whitespace) {
            Some((f, w)) => (f.to_owned(), w.trim().to_owned()),
            None => (format!("ILSVRC2012_val_{:08}.JPEG", i + 1), line.to_owned()),
        };
        if !(wnid.starts_with('n') && wnid.len() == 9) {
            return Err(DataError::BadLine {
                path: path.to_path_buf(),
                line: i + 1,
                why: format!("{wnid:?} is not a WordNet id"),
            });
        }
        map.insert(file, wnid);
    }
    Ok(map)
}

impl ImageDataset {
    /// Images under `root/<class>/…` (any depth below the class folder), classes in sorted
    /// order of the folder names, images in sorted path order (torchvision's `ImageFolder`).
    ///
    /// # Errors
    /// [`DataError::Io`] for unreadable folders, [`DataError::Empty`] if no image is found.
    pub fn folder(root: &Path, transform: Transform) -> Result<Self> {
        let (classes, names) = subfolders(root)?;
        Self::from_class_dirs(root, &classes, &names, &names, transform)
    }

    /// One split of a dataset root that holds `train/` and `val/`, each a [`Self::folder`]: the
    /// images of `root/<split>`, with class indices counted over the class folders of both
    /// splits (sorted names, each once), so that a class folder missing from one split does not
    /// shift the indices of the classes after it there (torchvision's `ImageFolder`, which lists
    /// each split alone, would label the same class differently in the two splits).
    ///
    /// # Errors
    /// As [`Self::folder`] for `root/<split>`; [`DataError::Io`] for an unreadable other split.
    pub fn folder_split(root: &Path, split: &str, transform: Transform) -> Result<Self> {
        let dir = root.join(split);
        let (dirs, names) = subfolders(&dir)?;
        let mut classes = names.clone();
        for other in ["train", "val"].into_iter().filter(|o| *o != split) {
            let other = root.join(other);
            if other.is_dir() {
                classes.extend(subfolders(&other)?.1);
            }
        }
        classes.sort();
        classes.dedup();
        Self::from_class_dirs(&dir, &dirs, &names, &classes, transform)
    }

    fn from_class_dirs(
        root: &Path,
        dirs: &[PathBuf],
        dir_names: &[String],
        classes: &[String],
        transform: Transform,
    ) -> Result<Self> {
        let (mut entries, mut ignored) = (Vec::new(), Ignored::default());
        let canonical = |d: &Path| d.canonicalize().unwrap_or_else(|_| d.to_path_buf());
        let class_dirs: std::collections::HashSet<PathBuf> =
            dirs.iter().map(|d| canonical(d)).collect();
        // The root itself counts as walked: a link back to it is a loop.
        let mut seen: std::collections::HashSet<PathBuf> = [canonical(root)].into();
        // Every image found: (class, path, canonical path, reached through a link).
        let mut found: Vec<(usize, PathBuf, PathBuf, bool)> = Vec::new();
        for p in read_dir_sorted(root)? {
            if !p.is_dir() && is_image(&p.to_string_lossy()) {
                ignored.add_because("images outside any class folder", &p);
            }
        }
        for (dir, name) in dirs.iter().zip(dir_names) {
            let label = classes
                .iter()
                .position(|c| c == name)
                .ok_or_else(|| DataError::Empty {
                    path: dir.clone(),
                    what: "a known class (the folder name is not in the class list)",
                })?;
            // Links are followed, but no folder is walked twice in the whole tree: a link to a
            // parent, to the root or to another class's folder would list images again (under
            // this class's label). Only regular files are samples (a FIFO would block a read).
            let mut stack = vec![dir.clone()];
            while let Some(d) = stack.pop() {
                let at = canonical(&d);
                let another_class = d != *dir && class_dirs.contains(&at);
                if another_class || !seen.insert(at) {
                    ignored.add_because("links to folders listed elsewhere in the tree", &d);
                    continue;
                }
                for p in read_dir_sorted(&d)? {
                    if p.is_dir() {
                        stack.push(p);
                    } else if !is_image(&p.to_string_lossy()) {
                        ignored.add(&p);
                    } else if !p.is_file() {
                        ignored
                            .add_because("entries named as images that are not regular files", &p);
                    } else {
                        let link = p
                            .symlink_metadata()
                            .is_ok_and(|m| m.file_type().is_symlink());
                        found.push((label, p.clone(), canonical(&p), link));
                    }
                }
            }
        }
        // Each image once: where one is reached both directly and through a link, the direct
        // path (and its class) wins; otherwise the first found.
        let mut owner: std::collections::HashMap<&Path, usize> = std::collections::HashMap::new();
        for (i, f) in found.iter().enumerate() {
            match owner.get(f.2.as_path()) {
                // Kept unless the kept one came through a link and this one did not.
                Some(&j) if !found[j].3 || f.3 => {}
                _ => {
                    owner.insert(&f.2, i);
                }
            }
        }
        let kept: std::collections::HashSet<usize> = owner.into_values().collect();
        let mut per_class: Vec<Vec<PathBuf>> = vec![Vec::new(); classes.len()];
        for (i, (label, path, _, _)) in found.iter().enumerate() {
            match kept.contains(&i) {
                true => per_class[*label].push(path.clone()),
                false => ignored.add_because("links to images listed elsewhere in the tree", path),
            }
        }
        for (dir, name) in dirs.iter().zip(dir_names) {
            let label = classes.iter().position(|c| c == name);
            if label.is_some_and(|l| per_class[l].is_empty()) {
                ignored.add_because("class folders without images", dir);
            }
        }
        for (label, mut files) in per_class.into_iter().enumerate() {
            files.sort();
            entries.extend(files.into_iter().map(|p| ImageEntry {
                location: Location::File(p),
                label: label as u32,
            }));
        }
        if entries.is_empty() {
            return Err(DataError::Empty {
                path: root.to_path_buf(),
                what: "images in class sub-folders",
            });
        }
        Ok(Self {
            entries,
            classes: classes.to_vec(),
            transform,
            ignored,
        })
    }

    /// ImageNet from the official archives or an extracted copy:
    /// - `ILSVRC2012_img_train.tar` (a tar of per-class tars) or `ILSVRC2012_img_val.tar`,
    ///   read in place (indexed once by their headers, ~1 s per 10⁴ members);
    /// - a folder `train/<wnid>/…` / `val/<wnid>/…` (torchvision's layout), or a flat `val/`
    ///   folder of `ILSVRC2012_val_*.JPEG` files;
    /// - the folder holding either of those.
    ///
    /// Validation labels come from `val_labels` ([`imagenet_val_labels`]; the shipped file by
    /// default), never from archive order.
    ///
    /// # Errors
    /// Unreadable files, unknown WNIDs, validation images missing from the labels file, or no
    /// images at all.
    pub fn imagenet(
        path: &Path,
        split: ImageNetSplit,
        val_labels: Option<&Path>,
        transform: Transform,
    ) -> Result<Self> {
        let wnids = imagenet_wnids()?;
        let label_of = |wnid: &str, at: &Path| -> Result<u32> {
            wnids
                .binary_search_by(|w| w.as_str().cmp(wnid))
                .map(|i| i as u32)
                .map_err(|_| DataError::Invalid {
                    path: at.to_path_buf(),
                    why: format!("{wnid:?} is not one of the 1000 ImageNet WordNet ids"),
                })
        };
        let (tar_name, dir_name) = match split {
            ImageNetSplit::Train => ("ILSVRC2012_img_train.tar", "train"),
            ImageNetSplit::Val => ("ILSVRC2012_img_val.tar", "val"),
        };
        let path = if path.is_dir() && path.join(tar_name).is_file() {
            path.join(tar_name)
        } else if path.is_dir() && path.join(dir_name).is_dir() {
            path.join(dir_name)
        } else {
            path.to_path_buf()
        };
        let (mut entries, mut ignored) = (Vec::new(), Ignored::default());
        if path.is_file() {
            let archive = Arc::new(path.clone());
            let members = index_tar(&path, |_| split == ImageNetSplit::Train)?;
            let labels = match split {
                ImageNetSplit::Val => Some(imagenet_val_labels(val_labels)?),
                ImageNetSplit::Train => None,
            };
            for m in members {
                if !is_image(&m.name) {
                    ignored.add(&PathBuf::from(format!("{}:{}", path.display(), m.name)));
                    continue;
                }
                let file = m
                    .name
                    .rsplit([':', '/'])
                    .next()
                    .unwrap_or(&m.name)
                    .to_owned();
                let wnid = match &labels {
                    Some(l) => l.get(&file).cloned().ok_or_else(|| DataError::BadRecord {
                        path: path.clone(),
                        offset: m.offset,
                        why: format!("{file} is not in the validation labels file"),
                    })?,
                    // `n01440764.tar:n01440764_10026.JPEG`: the class is the inner tar's name.
                    None => m
                        .name
                        .split_once(".tar:")
                        .map(|(w, _)| w.rsplit('/').next().unwrap_or(w).to_owned())
                        .unwrap_or_else(|| file.split('_').next().unwrap_or("").to_owned()),
                };
                entries.push(ImageEntry {
                    label: label_of(&wnid, &path)?,
                    location: Location::Member {
                        archive: archive.clone(),
                        name: m.name,
                        offset: m.offset,
                        len: m.len,
                    },
                });
            }
        } else {
            let (subdirs, names) = subfolders(&path)?;
            if subdirs.is_empty() && split == ImageNetSplit::Val {
                let labels = imagenet_val_labels(val_labels)?;
                for p in read_dir_sorted(&path)? {
                    let file = p
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned();
                    if !is_image(&file) {
                        ignored.add(&p);
                        continue;
                    }
                    if !p.is_file() {
                        ignored
                            .add_because("entries named as images that are not regular files", &p);
                        continue;
                    }
                    let wnid = labels.get(&file).ok_or_else(|| DataError::Invalid {
                        path: p.clone(),
                        why: format!("{file} is not in the validation labels file"),
                    })?;
                    entries.push(ImageEntry {
                        label: label_of(wnid, &p)?,
                        location: Location::File(p),
                    });
                }
            } else {
                for n in &names {
                    label_of(n, &path)?;
                }
                return Self::from_class_dirs(&path, &subdirs, &names, &wnids, transform);
            }
        }
        if entries.is_empty() {
            return Err(DataError::Empty {
                path,
                what: "ImageNet images",
            });
        }
        Ok(Self {
            entries,
            classes: wnids,
            transform,
            ignored,
        })
    }

    /// The images.
    pub fn entries(&self) -> &[ImageEntry] {
        &self.entries
    }

    /// Class names; a label indexes this list.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The preprocessing.
    pub fn transform(&self) -> Transform {
        self.transform
    }

    /// The same images with another preprocessing.
    pub fn with_transform(mut self, transform: Transform) -> Self {
        self.transform = transform;
        self
    }
}

impl Dataset for ImageDataset {
    type Sample = ImageSample;

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&self, index: usize, rng: &mut StdRng) -> Result<ImageSample> {
        let e = &self.entries[index];
        let path = e.location.path();
        let bytes = e
            .location
            .read_checked(MAX_IMAGE_FILE_BYTES, SIGNATURE_BYTES, |head| {
                image::guess_format(head)
                    .map(drop)
                    .map_err(|_| DataError::Decode {
                        path: path.clone(),
                        why: NOT_AN_IMAGE.into(),
                    })
            })?;
        let rgb = decode_rgb(&path, &bytes)?;
        Ok(ImageSample {
            pixels: hwc_to_chw(self.transform.apply(rgb.view(), rng)),
            label: e.label,
        })
    }

    fn name(&self, index: usize) -> String {
        self.entries[index].location.path().display().to_string()
    }

    fn ignored(&self) -> &Ignored {
        &self.ignored
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::tests::tar_bytes;
    use rand::SeedableRng;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/images")
            .join(name)
    }

    /// The fixtures are 40×30 gradients whose pixel (10, 20) is RGB (120, 80, 90) and (29, 39)
    /// is (234, 232, 204) (Pillow's reading; see tests/fixtures/README.md).
    #[test]
    fn decodes_rgb_cmyk_gray_and_a_png_named_jpeg() {
        for (name, gray) in [
            ("rgb.JPEG", false),
            ("cmyk.JPEG", false),
            ("png_named.JPEG", false),
            ("gray.JPEG", true),
        ] {
            let p = fixture(name);
            let img = decode_rgb(&p, &std::fs::read(&p).unwrap()).unwrap();
            assert_eq!(img.dim(), (30, 40, 3), "{name}");
            let px = |y, x| [img[[y, x, 0]], img[[y, x, 1]], img[[y, x, 2]]];
            let close = |a: [u8; 3], b: [u8; 3]| a.iter().zip(b).all(|(a, b)| a.abs_diff(b) <= 6);
            if gray {
                let [r, g, b] = px(10, 20);
                assert!(
                    r == g && g == b && r.abs_diff(93) <= 3,
                    "{name}: {:?}",
                    px(10, 20)
                );
            } else {
                assert!(close(px(10, 20), [120, 80, 90]), "{name}: {:?}", px(10, 20));
                assert!(
                    close(px(29, 39), [234, 232, 204]),
                    "{name}: {:?}",
                    px(29, 39)
                );
            }
        }
    }

    #[test]
    fn a_jpeg_cut_in_half_is_refused_and_other_formats_decode() {
        let p = fixture("rgb.JPEG");
        let bytes = std::fs::read(&p).unwrap();
        let err = decode_rgb(Path::new("x/half.JPEG"), &bytes[..bytes.len() / 2]).unwrap_err();
        assert!(err.to_string().contains("truncated JPEG"), "{err}");
        // Bytes after the end-of-image marker are not the image's, whatever they hold: a
        // trailer, bytes that look like a scan, an appended image cut short (Pillow decodes all).
        for trailer in [
            b"camera trailer".to_vec(),
            vec![0xFF, 0xDA, 0x00, 0x08, 1, 2, 3, 4, 5, 6],
            bytes[..bytes.len() / 2].to_vec(),
        ] {
            let mut padded = bytes.clone();
            padded.extend(&trailer);
            assert!(
                decode_rgb(&p, &padded).is_ok(),
                "trailer {:?}",
                &trailer[..4]
            );
        }
        // Several scans (progressive), whole and cut: only the cut one is refused.
        let prog = std::fs::read(fixture("progressive.JPEG")).unwrap();
        assert!(decode_rgb(&p, &prog).is_ok());
        for cut in [prog.len() / 3, prog.len() / 2, prog.len() - 2] {
            let err = decode_rgb(&p, &prog[..cut]).unwrap_err();
            assert!(
                err.to_string().contains("truncated JPEG"),
                "cut at {cut}: {err}"
            );
        }
        // The other formats the folder reader lists, written by the `image` crate.
        let img =
            image::RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 7]));
        for format in [
            image::ImageFormat::Bmp,
            image::ImageFormat::Tiff,
            image::ImageFormat::Gif,
            image::ImageFormat::WebP,
            image::ImageFormat::Pnm,
        ] {
            let mut buf = std::io::Cursor::new(Vec::new());
            image::DynamicImage::ImageRgb8(img.clone())
                .write_to(&mut buf, format)
                .unwrap();
            let got = decode_rgb(Path::new("x"), buf.get_ref())
                .unwrap_or_else(|e| panic!("{format:?}: {e}"));
            assert_eq!(got.dim(), (4, 5, 3), "{format:?}");
            if format != image::ImageFormat::Gif {
                assert_eq!(got[[3, 4, 0]], 160, "{format:?}");
            }
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_link_loop_lists_each_image_once_and_other_files_are_counted() {
        let root = std::env::temp_dir().join(format!("vq-data-loop-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let class = root.join("a/sub");
        std::fs::create_dir_all(&class).unwrap();
        std::fs::copy(fixture("rgb.JPEG"), root.join("a/one.JPEG")).unwrap();
        std::fs::copy(fixture("rgb.JPEG"), class.join("two.JPEG")).unwrap();
        std::os::unix::fs::symlink("..", class.join("loop")).unwrap();
        std::fs::write(class.join("notes.txt"), "").unwrap();
        std::fs::write(root.join("a/.DS_Store"), "").unwrap();
        std::fs::write(root.join("a/scan.pcx"), "").unwrap();
        let ds = ImageDataset::folder(&root, Transform::taming(16, false)).unwrap();
        assert_eq!(ds.entries().len(), 2);
        // What was passed over is said, by kind.
        assert_eq!(ds.ignored().count(), 4);
        let said = ds.ignored().to_string();
        assert!(
            said.starts_with("3 files that are not samples by name (")
                && said.contains("1 without extension")
                && said.contains("1 .pcx")
                && said.contains("1 .txt")
                && said.contains("the first: ")
                && said.contains("1 links to folders listed elsewhere in the tree"),
            "{said}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Links to the root, to another class's folder and to an image listed elsewhere add
    /// nothing (each image once, under its own class); images loose at the top and entries named
    /// as images that are not regular files (a FIFO would block its reader) are passed over and
    /// said.
    #[cfg(unix)]
    #[test]
    fn the_whole_tree_is_walked_once_and_only_regular_files_are_samples() {
        let root = std::env::temp_dir().join(format!("vq-data-tree-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for c in ["a", "b"] {
            std::fs::create_dir_all(root.join(c)).unwrap();
            std::fs::copy(fixture("rgb.JPEG"), root.join(c).join("x.JPEG")).unwrap();
        }
        let link =
            |target: &str, at: &str| std::os::unix::fs::symlink(target, root.join(at)).unwrap();
        link("..", "a/to-root");
        link("../b", "a/to-b");
        link("../b/x.JPEG", "a/b-image.JPEG");
        std::fs::copy(fixture("rgb.JPEG"), root.join("loose.JPEG")).unwrap();
        let fifo = root.join("b/pipe.JPEG");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .is_ok_and(|s| s.success());
        let ds = ImageDataset::folder(&root, Transform::taming(16, false)).unwrap();
        let labels: Vec<u32> = ds.entries().iter().map(|e| e.label).collect();
        assert_eq!(labels, [0, 1], "one image per class");
        let said = ds.ignored().to_string();
        for what in [
            "2 links to folders listed elsewhere in the tree",
            "1 links to images listed elsewhere in the tree",
            "1 images outside any class folder",
        ] {
            assert!(said.contains(what), "{what}: {said}");
        }
        if made {
            assert!(
                said.contains("1 entries named as images that are not regular files"),
                "{said}"
            );
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A class folder missing from one split keeps the other classes' indices there; a class
    /// folder without images is said, not passed over in silence.
    #[test]
    fn both_splits_number_the_classes_alike_and_empty_class_folders_are_said() {
        let root = std::env::temp_dir().join(format!("vq-data-splits-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (split, classes) in [("train", ["a", "b", "c"].as_slice()), ("val", &["a", "c"])] {
            for c in classes {
                std::fs::create_dir_all(root.join(split).join(c)).unwrap();
                std::fs::copy(fixture("rgb.JPEG"), root.join(split).join(c).join("x.JPEG"))
                    .unwrap();
            }
        }
        std::fs::create_dir_all(root.join("val/d")).unwrap();
        let tf = || Transform::taming(16, false);
        let train = ImageDataset::folder_split(&root, "train", tf()).unwrap();
        let val = ImageDataset::folder_split(&root, "val", tf()).unwrap();
        assert_eq!(train.classes(), ["a", "b", "c", "d"]);
        assert_eq!(val.classes(), train.classes());
        let labels = |d: &ImageDataset| d.entries().iter().map(|e| e.label).collect::<Vec<_>>();
        assert_eq!(labels(&train), [0, 1, 2]);
        assert_eq!(labels(&val), [0, 2], "class c is 2 in both splits");
        let said = val.ignored().to_string();
        assert!(said.contains("1 class folders without images"), "{said}");
        assert!(said.contains("val/d"), "{said}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A PNG with no pixel data, claiming `w × h` gray pixels.
    fn png_header(w: u32, h: u32) -> Vec<u8> {
        let crc = |bytes: &[u8]| {
            !bytes.iter().fold(!0u32, |c, &b| {
                (0..8).fold(c ^ u32::from(b), |c, _| {
                    if c & 1 == 1 {
                        (c >> 1) ^ 0xEDB8_8320
                    } else {
                        c >> 1
                    }
                })
            })
        };
        let chunk = |kind: &[u8], data: &[u8]| {
            let body = [kind, data].concat();
            [
                &(data.len() as u32).to_be_bytes()[..],
                &body,
                &crc(&body).to_be_bytes(),
            ]
            .concat()
        };
        let ihdr = [&w.to_be_bytes()[..], &h.to_be_bytes(), &[8, 0, 0, 0, 0]].concat();
        [
            &b"\x89PNG\r\n\x1a\n"[..],
            &chunk(b"IHDR", &ihdr),
            // An empty zlib stream: too few pixels, whatever the header claims.
            &chunk(b"IDAT", &[0x78, 0x9C, 0x03, 0x00, 0, 0, 0, 1]),
            &chunk(b"IEND", &[]),
        ]
        .concat()
    }

    #[test]
    fn oversized_files_and_bombs_are_refused_before_they_are_read() {
        let root = std::env::temp_dir().join(format!("vq-data-big-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let class = root.join("a");
        std::fs::create_dir_all(&class).unwrap();
        // Sparse files: their length is what matters, they occupy no disk.
        let sparse = |name: &str, start: &[u8], len: u64| {
            let f = std::fs::File::create(class.join(name)).unwrap();
            std::io::Write::write_all(&mut &f, start).unwrap();
            f.set_len(len).unwrap();
        };
        sparse("huge.jpg", b"this is a log file, not a photo", 3 << 30);
        sparse(
            "big.JPEG",
            &[0xFF, 0xD8, 0xFF, 0xE0, 0, 16, b'J', b'F'],
            300 << 20,
        );
        std::fs::write(class.join("bomb.png"), png_header(20_000, 10_000)).unwrap();
        std::fs::write(class.join("fine.png"), png_header(3, 2)).unwrap();
        let ds = ImageDataset::folder(&root, Transform::taming(16, false)).unwrap();
        let err_of = |name: &str| {
            let i = (0..ds.len()).find(|&i| ds.name(i).ends_with(name)).unwrap();
            let err = ds.get(i, &mut StdRng::seed_from_u64(0)).unwrap_err();
            assert!(matches!(err, DataError::Decode { .. }), "{err}");
            assert!(err.to_string().contains(name), "{err}");
            err.to_string()
        };
        assert!(err_of("huge.jpg").contains("not an image"));
        assert!(err_of("big.JPEG").contains("more than the 268435456 bytes"));
        let bomb = err_of("bomb.png");
        assert!(bomb.contains("image too large: 20000×10000"), "{bomb}");
        // Within the limits, the header-only PNG fails as a broken image, not as a large one.
        let fine = err_of("fine.png");
        assert!(
            !fine.contains("too large") && !fine.contains("not an image"),
            "{fine}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn corrupt_images_are_typed_errors_naming_the_file() {
        let p = fixture("rgb.JPEG");
        let bytes = std::fs::read(&p).unwrap();
        for bad in [
            &bytes[..bytes.len() / 3],
            b"GIF89a not really".as_slice(),
            &[],
        ] {
            let err = decode_rgb(Path::new("x/broken.JPEG"), bad).unwrap_err();
            assert!(matches!(err, DataError::Decode { .. }), "{err}");
            assert!(err.to_string().contains("x/broken.JPEG"), "{err}");
        }
    }

    fn write_folder(root: &Path, layout: &[(&str, &str)]) {
        for (dir, file) in layout {
            let d = root.join(dir);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::copy(fixture(file), d.join(file)).unwrap();
        }
    }

    #[test]
    fn image_folder_orders_classes_and_files_like_torchvision() {
        let root = std::env::temp_dir().join(format!("imgfolder-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        write_folder(
            &root,
            &[
                ("zebra", "rgb.JPEG"),
                ("ant", "gray.JPEG"),
                ("ant/nested", "cmyk.JPEG"),
                ("ant", "png_named.JPEG"),
            ],
        );
        std::fs::write(root.join("ant/notes.txt"), "x").unwrap();
        let ds = ImageDataset::folder(&root, Transform::taming(16, false)).unwrap();
        assert_eq!(ds.classes(), ["ant", "zebra"]);
        let names: Vec<(&str, u32)> = ds
            .entries()
            .iter()
            .map(|e| (e.location.file_name(), e.label))
            .collect();
        assert_eq!(
            names,
            [
                ("gray.JPEG", 0),
                ("cmyk.JPEG", 0),
                ("png_named.JPEG", 0),
                ("rgb.JPEG", 1)
            ]
        );
        let s = ds.get(3, &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!((s.pixels.dim(), s.label), ((3, 16, 16), 1));
        // A corrupt file is an error naming it.
        std::fs::write(root.join("zebra/rgb.JPEG"), b"\xff\xd8\xff garbage").unwrap();
        let err = ds
            .get(3, &mut StdRng::seed_from_u64(0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("zebra/rgb.JPEG"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
        assert!(matches!(
            ImageDataset::folder(&root, Transform::taming(16, false)),
            Err(DataError::Io { .. })
        ));
    }

    #[test]
    fn imagenet_train_tar_of_tars_val_tar_and_folders_agree() {
        let dir = std::env::temp_dir().join(format!("imagenet-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let img = |n: &str| std::fs::read(fixture(n)).unwrap();
        let (rgb, cmyk, png) = (img("rgb.JPEG"), img("cmyk.JPEG"), img("png_named.JPEG"));
        // Classes n01440764 (index 0) and n15075141 (index 999), in reverse archive order.
        let last = tar_bytes(&[("n15075141_1.JPEG", &rgb)]);
        let first = tar_bytes(&[("n01440764_7.JPEG", &cmyk), ("n01440764_2.JPEG", &png)]);
        std::fs::write(
            dir.join("ILSVRC2012_img_train.tar"),
            tar_bytes(&[("n15075141.tar", &last), ("n01440764.tar", &first)]),
        )
        .unwrap();
        // Validation images 1 and 3 (labels n01751748 and n02105855 in the shipped file), out of order.
        std::fs::write(
            dir.join("ILSVRC2012_img_val.tar"),
            tar_bytes(&[
                ("ILSVRC2012_val_00000003.JPEG", &rgb),
                ("ILSVRC2012_val_00000001.JPEG", &png),
            ]),
        )
        .unwrap();
        let t = Transform::taming(8, false);
        let train = ImageDataset::imagenet(&dir, ImageNetSplit::Train, None, t).unwrap();
        let labels: Vec<(String, u32)> = train
            .entries()
            .iter()
            .map(|e| (e.location.file_name().to_owned(), e.label))
            .collect();
        assert_eq!(
            labels,
            [
                ("n15075141_1.JPEG".into(), 999),
                ("n01440764_7.JPEG".into(), 0),
                ("n01440764_2.JPEG".into(), 0)
            ]
        );
        let wnids = imagenet_wnids().unwrap();
        assert_eq!(train.classes().len(), 1000);
        let val = ImageDataset::imagenet(
            &dir.join("ILSVRC2012_img_val.tar"),
            ImageNetSplit::Val,
            None,
            t,
        )
        .unwrap();
        let got: Vec<&str> = val
            .entries()
            .iter()
            .map(|e| wnids[e.label as usize].as_str())
            .collect();
        assert_eq!(got, ["n02105855", "n01751748"]);
        let mut rng = StdRng::seed_from_u64(0);
        // The same images from an extracted tree give the same pixels.
        std::fs::create_dir_all(dir.join("x/train/n01440764")).unwrap();
        std::fs::write(dir.join("x/train/n01440764/n01440764_2.JPEG"), &png).unwrap();
        let folder = ImageDataset::imagenet(&dir.join("x"), ImageNetSplit::Train, None, t).unwrap();
        assert_eq!(folder.entries()[0].label, 0);
        assert_eq!(
            folder.get(0, &mut rng).unwrap(),
            train.get(2, &mut rng).unwrap()
        );
        std::fs::create_dir_all(dir.join("x/val")).unwrap();
        std::fs::write(dir.join("x/val/ILSVRC2012_val_00000001.JPEG"), &png).unwrap();
        let flat = ImageDataset::imagenet(&dir.join("x"), ImageNetSplit::Val, None, t).unwrap();
        assert_eq!(
            flat.get(0, &mut rng).unwrap(),
            val.get(1, &mut rng).unwrap()
        );
        // A class folder that is not a WNID, and a val image missing from the labels.
        std::fs::create_dir_all(dir.join("x/train/cats")).unwrap();
        let err = ImageDataset::imagenet(&dir.join("x"), ImageNetSplit::Train, None, t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"cats\""), "{err}");
        std::fs::write(dir.join("x/val/ILSVRC2012_val_99999999.JPEG"), &png).unwrap();
        let err = ImageDataset::imagenet(&dir.join("x"), ImageNetSplit::Val, None, t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ILSVRC2012_val_99999999.JPEG"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn val_labels_accept_both_file_formats() {
        let shipped = imagenet_val_labels(None).unwrap();
        assert_eq!(shipped.len(), 50_000);
        assert_eq!(shipped["ILSVRC2012_val_00000002.JPEG"], "n09193705");
        let p = std::env::temp_dir().join(format!("synset-{}.txt", std::process::id()));
        std::fs::write(
            &p,
            "ILSVRC2012_val_00000001.JPEG n01751748\nILSVRC2012_val_00000002.JPEG n09193705\n",
        )
        .unwrap();
        let two = imagenet_val_labels(Some(&p)).unwrap();
        assert_eq!(two["ILSVRC2012_val_00000002.JPEG"], "n09193705");
        std::fs::write(&p, "n01751748\ncat\n").unwrap();
        let err = imagenet_val_labels(Some(&p)).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains(&p.display().to_string()),
            "{err}"
        );
        std::fs::remove_file(&p).unwrap();
    }
}
