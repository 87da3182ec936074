//! Safetensors files read header first. The `safetensors` crate parses a file held whole in
//! memory; reading a file whole before its header is checked would let a damaged or foreign
//! file (a header that promises 40 GB, a sparse file) take all memory. Here the header is read
//! alone and checked as the crate checks a whole file — each tensor's bytes fit its shape and
//! type, the bytes tile the data, and they end where the file ends — before any data is read.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;

use anyhow::{Context, Result};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{SafeTensorError, SafeTensors};

/// The checked header of a safetensors file.
pub(crate) struct Header {
    /// Where the data starts in the file (8 + the header's length).
    pub data_start: u64,
    /// Each tensor's entry (type, shape, offsets into the data).
    pub tensors: HashMap<String, TensorInfo>,
}

/// The crate's largest header (100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

fn problem(file: &Path, e: &SafeTensorError) -> anyhow::Error {
    anyhow::anyhow!(
        "{} cannot be read as safetensors: {}",
        file.display(),
        vq_weights::safetensors_problem(e)
    )
}

/// Reads and checks the header of `file` (not its data).
///
/// # Errors
/// An unreadable file; a header the crate would refuse, in words.
pub(crate) fn read_header(file: &Path) -> Result<Header> {
    let mut f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len < 8 {
        return Err(problem(file, &SafeTensorError::HeaderTooSmall));
    }
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .with_context(|| format!("reading {}", file.display()))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES {
        return Err(problem(file, &SafeTensorError::HeaderTooLarge));
    }
    if 8 + n > len {
        return Err(problem(file, &SafeTensorError::InvalidHeaderLength));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("reading {}", file.display()))?;
    let meta: Metadata = serde_json::from_slice(&header)
        .map_err(|_| problem(file, &SafeTensorError::InvalidHeaderDeserialization))?;
    let tensors: HashMap<String, TensorInfo> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.clone()))
        .collect();
    // The data as the crate requires it: consecutive, each the size of its shape and type.
    let mut spans: Vec<(u64, u64, &TensorInfo)> = tensors
        .values()
        .map(|i| (i.data_offsets.0 as u64, i.data_offsets.1 as u64, i))
        .collect();
    spans.sort_by_key(|s| (s.0, s.1));
    let mut end = 0u64;
    for (a, b, info) in spans {
        let bytes = info
            .shape
            .iter()
            .try_fold(info.dtype.size() as u64, |acc, &d| {
                acc.checked_mul(d as u64)
            });
        if a != end || b < a || bytes != Some(b - a) {
            return Err(problem(file, &SafeTensorError::TensorInvalidInfo));
        }
        end = b;
    }
    if 8 + n + end != len {
        return Err(problem(file, &SafeTensorError::MetadataIncompleteBuffer));
    }
    Ok(Header {
        data_start: 8 + n,
        tensors,
    })
}

/// The tensors and the metadata of `bytes`, the whole of `file`.
///
/// # Errors
/// Bytes the crate refuses, in words.
pub(crate) fn parse<'a>(
    file: &Path,
    bytes: &'a [u8],
) -> Result<(SafeTensors<'a>, HashMap<String, String>)> {
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| problem(file, &e))?;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| problem(file, &e))?;
    Ok((tensors, meta.metadata().clone().unwrap_or_default()))
}

/// `len` bytes of `file` from `at`.
///
/// # Errors
/// An unreadable or shorter file, named.
pub(crate) fn read_at(file: &Path, at: u64, len: usize) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    f.seek(std::io::SeekFrom::Start(at))
        .with_context(|| format!("reading {}", file.display()))?;
    let mut bytes = vec![0u8; len];
    f.read_exact(&mut bytes)
        .with_context(|| format!("reading {}", file.display()))?;
    Ok(bytes)
}

/// The whole of `file`, read once its header is checked and its size is within `cap` bytes.
///
/// # Errors
/// As [`read_header`]; a file over `cap`, named with what to do (`what_to_do`).
pub(crate) fn read_whole(file: &Path, cap: u64, what_to_do: &str) -> Result<Vec<u8>> {
    let header = read_header(file)?;
    let len = header.data_start
        + header
            .tensors
            .values()
            .map(|i| i.data_offsets.1 as u64)
            .max()
            .unwrap_or(0);
    anyhow::ensure!(
        len <= cap,
        "{} holds {len} bytes, more than the {cap} read at once: {what_to_do}",
        file.display()
    );
    read_at(file, 0, len as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView, serialize};

    /// Headers that promise other data than the file holds are refused from the header alone,
    /// in words; a good file reads back whole, and one over the cap is refused naming it.
    #[test]
    fn a_header_is_checked_before_any_data_is_read() {
        let dir = std::env::temp_dir().join(format!("vq-stfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = [7u8; 24];
        let views = [
            (
                "a",
                TensorView::new(Dtype::F32, vec![2], &data[..8]).unwrap(),
            ),
            (
                "b",
                TensorView::new(Dtype::U8, vec![4, 4], &data[8..]).unwrap(),
            ),
        ];
        let good = serialize(views, &None).unwrap();
        let at = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let file = at("good.safetensors", &good);
        let h = read_header(&file).unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(read_whole(&file, 1 << 20, "").unwrap(), good);
        let err = read_whole(&file, 16, "write smaller shards")
            .unwrap_err()
            .to_string();
        assert!(err.contains("write smaller shards"), "{err}");
        // A header promising 40 GB of data the file does not hold.
        let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let text = String::from_utf8(good[8..8 + n].to_vec()).unwrap();
        let big = text.replacen("[2]", "[10000000000]", 1);
        let mut lying = (big.len() as u64).to_le_bytes().to_vec();
        lying.extend(big.as_bytes());
        lying.extend(&good[8 + n..]);
        for (name, bytes) in [
            ("lying", lying.as_slice()),
            ("cut", &good[..good.len() - 1]),
            ("tiny", b"abc".as_slice()),
            ("foreign", b"\x10\0\0\0\0\0\0\0not json at all!".as_slice()),
        ] {
            let err = read_header(&at(name, bytes)).err().unwrap().to_string();
            assert!(
                err.contains("cannot be read as safetensors: "),
                "{name}: {err}"
            );
            assert!(
                !err.contains("Metadata") && !err.contains("Header"),
                "{name}: {err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
