//! The error type of `vq-data`.

use std::path::PathBuf;

/// Errors reading datasets. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file does not start with the expected magic number.
    #[error(
        "{path}: bad magic number 0x{found:08x} at offset 0 (expected 0x{expected:08x}: {what})"
    )]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// What the file should have been.
        what: &'static str,
        /// The expected magic.
        expected: u32,
        /// The magic found.
        found: u32,
    },
    /// The file ends before the data its header announces.
    #[error(
        "{path}: truncated at byte offset {offset} (the header announces {expected} bytes in all)"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes actually present (after decompression).
        offset: u64,
        /// Bytes the header implies.
        expected: u64,
    },
    /// A TFRecord checksum does not match its bytes.
    #[error("{path}: TFRecord {what} checksum mismatch in the record at byte offset {offset}")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Which checksum: the length field's or the payload's.
        what: &'static str,
        /// Offset of the record's first byte.
        offset: u64,
    },
    /// A record's payload is not the expected message or lacks a field.
    #[error("{path}: record at byte offset {offset}: {why}")]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// Offset of the record's first byte.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// A line of a text file (a list, a labels file, a cache) that does not parse.
    #[error("{path}: line {line}: {why}")]
    BadLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// A file or folder that does not fit the dataset (an unknown class, a missing label, two
    /// splits that are the same files).
    #[error("{path}: {why}")]
    Invalid {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Two files that must describe the same examples disagree.
    #[error("{path}: {what}: expected {expected}, found {found}")]
    Mismatch {
        /// The second file.
        path: PathBuf,
        /// What disagrees.
        what: &'static str,
        /// Value implied by the first file.
        expected: u64,
        /// Value in this file.
        found: u64,
    },
    /// Bytes that should be an image (or a video) but do not decode.
    #[error("{path}: cannot decode: {why}")]
    Decode {
        /// The file (or `archive:member`).
        path: PathBuf,
        /// The decoder's message.
        why: String,
    },
    /// A folder or list that should name samples names none.
    #[error("{path}: no {what}")]
    Empty {
        /// The folder or file.
        path: PathBuf,
        /// What was looked for.
        what: &'static str,
    },
    /// An external program failed or is missing.
    #[error("{program}: {why}")]
    Tool {
        /// The program.
        program: PathBuf,
        /// What happened, with the remedy where there is one.
        why: String,
    },
    /// Every sample of an epoch (of this process's shard) failed to decode.
    #[error("none of the {samples} samples of the epoch decodes; the first failure: {first}")]
    NothingDecodes {
        /// Samples in the epoch.
        samples: u64,
        /// The first error, naming its file.
        first: String,
    },
    /// An invalid configuration value.
    #[error("invalid data configuration: {0}")]
    Config(String),
}

/// A file left out of a dataset when it was indexed (a damaged `.tfrecords` file, a video
/// whose frames cannot be counted): the rest of the dataset is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOut {
    /// The file.
    pub path: PathBuf,
    /// Why, naming the file.
    pub why: String,
}

impl LeftOut {
    /// The file and its error.
    pub fn new(path: &std::path::Path, error: &DataError) -> Self {
        Self {
            path: path.to_path_buf(),
            why: error.to_string(),
        }
    }
}

impl std::fmt::Display for LeftOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// Files an index passed over because their names are not those of samples (a `README.txt`,
/// `.DS_Store`, an unsupported format), counted by extension, for a one-line report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ignored {
    by_extension: std::collections::BTreeMap<String, usize>,
    first: Option<PathBuf>,
    /// Entries passed over for another reason than their name, by reason: count and first.
    by_reason: std::collections::BTreeMap<&'static str, (usize, PathBuf)>,
}

impl Ignored {
    /// Counts `path`.
    pub fn add(&mut self, path: &std::path::Path) {
        let ext = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit_once('.'))
            .filter(|(stem, _)| !stem.is_empty())
            .map_or_else(String::new, |(_, e)| e.to_ascii_lowercase());
        *self.by_extension.entry(ext).or_default() += 1;
        self.first.get_or_insert_with(|| path.to_path_buf());
    }

    /// Counts `path`, passed over for `reason` ("outside any class folder", …).
    pub fn add_because(&mut self, reason: &'static str, path: &std::path::Path) {
        self.by_reason
            .entry(reason)
            .or_insert_with(|| (0, path.to_path_buf()))
            .0 += 1;
    }

    /// How many entries were passed over.
    pub fn count(&self) -> usize {
        self.by_extension.values().sum::<usize>()
            + self.by_reason.values().map(|r| r.0).sum::<usize>()
    }
}

impl std::fmt::Display for Ignored {
    /// `3 files that are not samples by name (2 .txt, 1 without extension); the first: x/a.txt`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kinds: Vec<String> = self
            .by_extension
            .iter()
            .map(|(e, n)| match e.as_str() {
                "" => format!("{n} without extension"),
                e => format!("{n} .{e}"),
            })
            .collect();
        let named: usize = self.by_extension.values().sum();
        let mut parts = Vec::new();
        if named > 0 {
            let mut s = format!(
                "{named} file{} that are not samples by name ({})",
                if named == 1 { "" } else { "s" },
                kinds.join(", ")
            );
            if let Some(p) = &self.first {
                s += &format!("; the first: {}", p.display());
            }
            parts.push(s);
        }
        for (reason, (n, first)) in &self.by_reason {
            parts.push(format!("{n} {reason} (the first: {})", first.display()));
        }
        f.write_str(&parts.join("; "))
    }
}

/// `Result` with [`DataError`].
pub type Result<T, E = DataError> = std::result::Result<T, E>;
