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

/// The largest data an IDX file may announce (16 GiB; MNIST's training images are 47 MB).
pub const MAX_IDX_BYTES: u64 = 16 << 30;

/// Reads an IDX file of `magic` (gzipped or raw): the header first, then exactly the data it
/// announces — never more, whatever the file decompresses to — so memory is bounded by the
/// header's promise (itself at most [`MAX_IDX_BYTES`]). A file holding more than it announces
/// is refused.
fn read_checked(path: &Path, magic: u32, what: &'static str) -> Result<(Vec<usize>, Vec<u8>)> {
    let io = |source| DataError::Io {
        path: path.to_owned(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    let mut head = [0u8; 2];
    let n = reader.read(&mut head).map_err(io)?;
    let chained = head[..n].chain(reader);
    let mut stream: Box<dyn Read> = match n == 2 && head == [0x1f, 0x8b] {
        true => Box::new(GzDecoder::new(chained)),
        false => Box::new(chained),
    };
    let ndim = (magic & 0xff) as usize;
    let mut header = vec![0u8; 4 + 4 * ndim];
    let got = read_up_to(&mut stream, &mut header).map_err(io)?;
    let truncated = |offset: u64, expected: u64| DataError::Truncated {
        path: path.to_owned(),
        offset,
        expected,
    };
    let word =
        |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    if got >= 4 && word(0) != magic {
        return Err(DataError::BadMagic {
            path: path.to_owned(),
            what,
            expected: magic,
            found: word(0),
        });
    }
    if got < header.len() {
        return Err(truncated(got as u64, header.len() as u64));
    }
    let dims: Vec<usize> = (0..ndim).map(|d| word(4 + 4 * d) as usize).collect();
    let len = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .unwrap_or(u64::MAX);
    if len > MAX_IDX_BYTES {
        return Err(DataError::Invalid {
            path: path.to_owned(),
            why: format!(
                "its header announces {dims:?} = {len} bytes of data, more than the {MAX_IDX_BYTES} \
                 accepted"
            ),
        });
    }
    let mut data = Vec::new();
    (&mut stream).take(len).read_to_end(&mut data).map_err(io)?;
    if (data.len() as u64) < len {
        return Err(truncated(
            header.len() as u64 + data.len() as u64,
            header.len() as u64 + len,
        ));
    }
    let mut extra = [0u8; 1];
    if read_up_to(&mut stream, &mut extra).map_err(io)? > 0 {
        return Err(DataError::Invalid {
            path: path.to_owned(),
            why: format!(
                "it holds more data than its header announces ({dims:?} = {len} bytes): not a \
                 {what} file as written"
            ),
        });
    }
    Ok((dims, data))
}

/// Fills `buf` as far as the stream goes; returns the bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(k) => filled += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads an IDX image file into an (N, rows, cols) array.
///
/// # Errors
/// [`DataError::Io`], [`DataError::BadMagic`] (not an image file), [`DataError::Truncated`].
pub fn read_images(path: &Path) -> Result<Array3<u8>> {
    let (dims, data) = read_checked(path, IMAGES_MAGIC, "IDX u8 images, 3 dimensions")?;
    Ok(Array3::from_shape_vec((dims[0], dims[1], dims[2]), data)
        .expect("length checked by read_checked"))
}

/// Reads an IDX label file.
///
/// # Errors
/// [`DataError::Io`], [`DataError::BadMagic`] (not a label file), [`DataError::Truncated`].
pub fn read_labels(path: &Path) -> Result<Array1<u8>> {
    let (_, data) = read_checked(path, LABELS_MAGIC, "IDX u8 labels, 1 dimension")?;
    Ok(Array1::from(data))
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
        // A gzip stream that inflates far past its header's promise (two 2×2 images, then 64 MB
        // of zeros, 64 KB compressed) is refused after reading what the header announced, and a
        // header announcing more than the cap is refused before any data is read.
        let mut body = Vec::new();
        body.write_all(&IMAGES_MAGIC.to_be_bytes()).unwrap();
        for d in [2u32, 2, 2] {
            body.write_all(&d.to_be_bytes()).unwrap();
        }
        body.extend([7u8; 8]);
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&body).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            enc.write_all(&zeros).unwrap();
        }
        let bomb = temp("bomb.gz", &enc.finish().unwrap());
        let err = read_images(&bomb).unwrap_err().to_string();
        assert!(
            err.contains("more data than its header announces") && err.contains("bomb.gz"),
            "{err}"
        );
        let exact = temp("exact", &body);
        assert_eq!(
            read_images(&exact)
                .unwrap()
                .iter()
                .copied()
                .collect::<Vec<_>>(),
            [7u8; 8]
        );
        let mut huge = Vec::new();
        huge.write_all(&IMAGES_MAGIC.to_be_bytes()).unwrap();
        for d in [100_000u32, 1000, 1000] {
            huge.write_all(&d.to_be_bytes()).unwrap();
        }
        let err = read_images(&temp("huge", &huge)).unwrap_err().to_string();
        assert!(err.contains("more than the"), "{err}");
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
