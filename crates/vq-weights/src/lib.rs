//! The pretrained networks of the evaluation metrics — LPIPS (torchvision's VGG16 ImageNet
//! features + the LPIPS v0.1 linear heads) and the FID Inception (pytorch-fid's port of the
//! TensorFlow 2015-12-05 Inception) — as files: where they live by default, and the conversion of
//! the public PyTorch files (`torch.save` pickles, legacy or zip) to the safetensors layouts that
//! `vq_models::Lpips` and `vq_models::FidInception` load. Pure Rust, no Python and no tch.
//!
//! `cargo xtask download-weights lpips|inception|all` fetches the public files (pinned by size
//! and sha256 in `weights/*.json`) and converts them with [`convert`] into [`default_dir`];
//! `vq-train` then finds them there ([`locate`]) when `--lpips` / `--inception` are not given.
//!
//! ```
//! use vq_weights::Network;
//! assert_eq!(Network::from_name("inception")?, Network::Inception);
//! assert_eq!(Network::Lpips.file_name(), "lpips-vgg16-v0.1.safetensors");
//! assert!(Network::from_name("alexnet").is_err());
//! # Ok::<(), vq_weights::WeightsError>(())
//! ```

pub mod convert;
mod error;
mod network;

use std::path::PathBuf;

pub use convert::Converted;
pub use error::{Result, WeightsError};
pub use network::Network;

/// What a `safetensors` error means, in words: the crate (0.3) prints its errors as their Rust
/// names (`MetadataIncompleteBuffer`, `IoError(Os { .. })`).
///
/// ```
/// use safetensors::SafeTensorError;
/// let said = vq_weights::safetensors_problem(&SafeTensorError::MetadataIncompleteBuffer);
/// assert!(said.contains("cut short"), "{said}");
/// ```
pub fn safetensors_problem(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "too short to be a safetensors file (under 8 bytes)".into(),
        E::InvalidHeaderLength => {
            "the header length in its first 8 bytes runs past the file's end: the file is cut \
             short, or not a safetensors file"
                .into()
        }
        E::HeaderTooLarge => "its header claims more than 100 MB: not a safetensors file".into(),
        E::InvalidHeader | E::InvalidHeaderStart => {
            "its header is not JSON text: not a safetensors file".into()
        }
        E::InvalidHeaderDeserialization => {
            "its header is not the JSON of a safetensors file".into()
        }
        E::JsonError(j) => format!("its header is not valid JSON ({j})"),
        E::MetadataIncompleteBuffer => {
            "its data is not the size its header declares: the file is cut short or has bytes \
             appended"
                .into()
        }
        E::TensorInvalidInfo | E::ValidationOverflow => {
            "a tensor's shape and type do not fit its declared bytes".into()
        }
        E::InvalidOffset(name) => format!("tensor {name}'s declared bytes are out of place"),
        E::TensorNotFound(name) => format!("it holds no tensor {name}"),
        E::InvalidTensorView(dtype, shape, len) => {
            format!("a {dtype:?} tensor of shape {shape:?} cannot be {len} bytes")
        }
        E::IoError(io) => io.to_string(),
    }
}

/// The environment variable naming the folder of the converted weights; set and empty, there
/// is no default place (only `--lpips` / `--inception` files are used).
pub const DIR_ENV: &str = "VQ_WEIGHTS";

/// The folder of the converted weights: `$VQ_WEIGHTS`, else `$XDG_CACHE_HOME/vq/weights`, else
/// `~/.cache/vq/weights`; `None` when `VQ_WEIGHTS` is set but empty, or no home is known.
pub fn default_dir() -> Option<PathBuf> {
    dir_from(|k| std::env::var_os(k))
}

fn dir_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let non_empty = |k: &str| var(k).filter(|v| !v.is_empty());
    match var(DIR_ENV) {
        Some(v) if v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => non_empty("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| non_empty("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("vq").join("weights")),
    }
}

/// The converted file of `network` in [`default_dir`], if it is there.
pub fn locate(network: Network) -> Option<PathBuf> {
    default_dir()
        .map(|d| d.join(network.file_name()))
        .filter(|f| f.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cut, lengthened or foreign bytes are said in words, never as the crate's Rust names.
    #[test]
    fn damaged_safetensors_files_are_said_in_words() {
        use safetensors::tensor::{Dtype, TensorView, serialize};
        let data = [0u8; 16];
        let view = TensorView::new(Dtype::F32, vec![4], &data).unwrap();
        let good = serialize([("w", view)], &None).unwrap();
        let cut = &good[..good.len() - 3];
        let longer = [good.as_slice(), b"tail"].concat();
        for (what, bytes) in [
            ("cut", cut),
            ("appended", longer.as_slice()),
            ("foreign", b"GIF89a, a picture".as_slice()),
            ("tiny", b"abc".as_slice()),
        ] {
            let e = safetensors::SafeTensors::deserialize(bytes).err().unwrap();
            let said = safetensors_problem(&e);
            let rust_name = said.chars().next().is_some_and(char::is_uppercase)
                || ["Metadata", "Header", "IoError", "Os {"]
                    .iter()
                    .any(|n| said.contains(n));
            assert!(!rust_name, "{what}: {said}");
        }
    }
    use std::ffi::OsString;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, OsString)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn the_default_folder_follows_the_environment() {
        let home = [("HOME", "/h")];
        assert_eq!(
            dir_from(env(&home)),
            Some(PathBuf::from("/h/.cache/vq/weights"))
        );
        let xdg = [("HOME", "/h"), ("XDG_CACHE_HOME", "/c")];
        assert_eq!(dir_from(env(&xdg)), Some(PathBuf::from("/c/vq/weights")));
        let set = [("HOME", "/h"), (DIR_ENV, "/w")];
        assert_eq!(dir_from(env(&set)), Some(PathBuf::from("/w")));
        let off = [("HOME", "/h"), (DIR_ENV, "")];
        assert_eq!(dir_from(env(&off)), None);
        assert_eq!(dir_from(env(&[("XDG_CACHE_HOME", "")])), None);
    }

    #[test]
    fn names_round_trip() {
        for n in Network::ALL {
            assert_eq!(Network::from_name(n.name()).unwrap(), n);
        }
        let e = Network::from_name("vgg").unwrap_err().to_string();
        assert!(
            e.contains("\"vgg\"") && e.contains("lpips, inception"),
            "{e}"
        );
    }
}
