//! The IDX format of MNIST and Fashion-MNIST, gzipped (detected by its magic bytes) or raw.
//!
//! Layout: a big-endian u32 magic `0x0000_08NN` (`08` = unsigned bytes, `NN` = number of
//! dimensions), one big-endian u32 per dimension, then the data in row-major order.
//! Images: magic `0x0000_0803` (N, rows, cols). Labels: magic `0x0000_0801` (N).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use flate2::read::GzDecoder;
use ndarray::{Array1, Array3};

use crate::error::{DataError, Result};

/// Magic of an IDX file of u8 images (3 dimensions).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic of an IDX file of u8 labels (1 dimension).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Reads the whole (decompressed) file.
fn read_all(path: &Path) -> Result<Vec<u8>> {
    let io = |source| DataError::Io {
        path: path.to_owned(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    let mut head = [0u8; 2];
    let mut bytes = Vec::new();
    let n = reader.read(&mut head).map_err(io)?;
    let gz = n == 2 && head == [0x1f, 0x8b];
    let chained = head[..n].chain(reader);
    if gz {
        GzDecoder::new(chained)
            .read_to_end(&mut bytes)
            .map_err(io)?;
    } else {
        let mut r = chained;
        r.read_to_end(&mut bytes).map_err(io)?;
    }
    Ok(bytes)
}

/// Parses the header; returns the dimensions and the data slice (exactly as long as announced).
fn parse<'a>(
    path: &Path,
    bytes: &'a [u8],
    magic: u32,
    what: &'static str,
) -> Result<(Vec<usize>, &'a [u8])> {
    let ndim = (magic & 0xff) as usize;
    let header = 4 + 4 * ndim;
    let truncated = |expected: u64| DataError::Truncated {
        path: path.to_owned(),
        offset: bytes.len() as u64,
        expected,
    };
    if bytes.len() < 4 {
        return Err(truncated(header as u64));
    }
    let word = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let found = word(0);
    if found != magic {
        return Err(DataError::BadMagic {
            path: path.to_owned(),
            what,
            expected: magic,
            found,
        });
    }
    if bytes.len() < header {
        return Err(truncated(header as u64));
    }
    let dims: Vec<usize> = (0..ndim).map(|d| word(4 + 4 * d) as usize).collect();
    let len = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .unwrap_or(u64::MAX);
    let total = (header as u64).saturating_add(len);
    if (bytes.len() as u64) < total {
        return Err(truncated(total));
    }
    Ok((dims, &bytes[header..header + len as usize]))
}

/// Reads an IDX image file into an (N, rows, cols) array.
///
/// # Errors
/// [`DataError::Io`], [`DataError::BadMagic`] (not an image file), [`DataError::Truncated`].
pub fn read_images(path: &Path) -> Result<Array3<u8>> {
    let bytes = read_all(path)?;
    let (dims, data) = parse(path, &bytes, IMAGES_MAGIC, "IDX u8 images, 3 dimensions")?;
    Ok(
        Array3::from_shape_vec((dims[0], dims[1], dims[2]), data.to_vec())
            .expect("length checked by parse"),
    )
}

/// Reads an IDX label file.
///
/// # Errors
/// [`DataError::Io`], [`DataError::BadMagic`] (not a label file), [`DataError::Truncated`].
pub fn read_labels(path: &Path) -> Result<Array1<u8>> {
    let bytes = read_all(path)?;
    let (_, data) = parse(path, &bytes, LABELS_MAGIC, "IDX u8 labels, 1 dimension")?;
    Ok(Array1::from(data.to_vec()))
}

/// Reads matching image and label files.
///
/// # Errors
/// As [`read_images`] and [`read_labels`], plus [`DataError::Mismatch`] if the counts differ.
pub fn read_pair(images: &Path, labels: &Path) -> Result<(Array3<u8>, Array1<u8>)> {
    let x = read_images(images)?;
    let y = read_labels(labels)?;
    if x.shape()[0] != y.len() {
        return Err(DataError::Mismatch {
            path: labels.to_owned(),
            what: "number of labels vs number of images",
            expected: x.shape()[0] as u64,
            found: y.len() as u64,
        });
    }
    Ok((x, y))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Split, fashion_mnist_demo, fashion_mnist_demo_dir};
    use std::io::Write;

    fn temp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("vq-data-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn raw(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        GzDecoder::new(File::open(fashion_mnist_demo_dir().join(name)).unwrap())
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn embedded_demo_matches_its_manifest() {
        let (x, y) = fashion_mnist_demo(Split::Train).unwrap();
        assert_eq!(x.dim(), (4000, 28, 28));
        let mut counts = [0usize; 10];
        y.iter().for_each(|&c| counts[c as usize] += 1);
        // Class counts from datasets/fashion-mnist-demo.json.
        assert_eq!(counts, [373, 440, 404, 409, 395, 391, 400, 413, 380, 395]);
        let (x, y) = fashion_mnist_demo(Split::Test).unwrap();
        assert_eq!((x.dim(), y.len()), ((1000, 28, 28), 1000));
        assert!(
            x.iter().any(|&v| v > 200) && x.iter().any(|&v| v == 0),
            "real images have ink and background"
        );
    }

    #[test]
    fn raw_and_gzipped_files_read_the_same() {
        let bytes = raw("t10k-labels-idx1-ubyte.gz");
        let p = temp("labels-raw", &bytes);
        let gz = read_labels(&fashion_mnist_demo_dir().join("t10k-labels-idx1-ubyte.gz")).unwrap();
        assert_eq!(read_labels(&p).unwrap(), gz);
    }

    #[test]
    fn corrupt_files_give_typed_errors_naming_the_file() {
        let images = raw("t10k-images-idx3-ubyte.gz");
        // Wrong magic: a label file read as images.
        let labels = raw("t10k-labels-idx1-ubyte.gz");
        let p = temp("labels-as-images", &labels);
        match read_images(&p) {
            Err(DataError::BadMagic {
                path,
                found: LABELS_MAGIC,
                expected: IMAGES_MAGIC,
                ..
            }) => assert_eq!(path, p),
            other => panic!("{other:?}"),
        }
        // Truncated payload: the offset is where the data stop.
        let cut = &images[..images.len() - 100];
        let p = temp("truncated", cut);
        match read_images(&p) {
            Err(DataError::Truncated {
                offset, expected, ..
            }) => {
                assert_eq!((offset, expected), (cut.len() as u64, images.len() as u64));
            }
            other => panic!("{other:?}"),
        }
        // Truncated header, empty file, corrupt gzip stream, missing file.
        assert!(matches!(
            read_images(&temp("short", &images[..10])),
            Err(DataError::Truncated { offset: 10, .. })
        ));
        assert!(matches!(
            read_labels(&temp("empty", &[])),
            Err(DataError::Truncated { offset: 0, .. })
        ));
        let mut gz =
            std::fs::read(fashion_mnist_demo_dir().join("t10k-labels-idx1-ubyte.gz")).unwrap();
        let mid = gz.len() / 2;
        gz[mid] ^= 0xff;
        let p = temp("corrupt.gz", &gz);
        assert!(matches!(
            read_labels(&p),
            Err(DataError::Io { .. }) | Err(DataError::Truncated { .. })
        ));
        let missing = std::env::temp_dir().join("vq-data-no-such-file.idx");
        let err = read_labels(&missing).unwrap_err();
        assert!(
            err.to_string().contains("vq-data-no-such-file.idx"),
            "{err}"
        );
        // Count mismatch between images and labels.
        let mut few = Vec::new();
        few.write_all(&LABELS_MAGIC.to_be_bytes()).unwrap();
        few.write_all(&3u32.to_be_bytes()).unwrap();
        few.write_all(&[1, 2, 3]).unwrap();
        let p_lab = temp("few-labels", &few);
        let p_img = temp("images", &images);
        assert!(matches!(
            read_pair(&p_img, &p_lab),
            Err(DataError::Mismatch {
                expected: 1000,
                found: 3,
                ..
            })
        ));
    }
}
