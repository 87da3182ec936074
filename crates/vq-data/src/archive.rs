//! Random access into uncompressed tar archives, including tars inside tars (ImageNet's train
//! archive holds one tar per class): the archive is indexed once by reading only its headers
//! (data is skipped with seeks), then any member is read with one seek and one read.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{DataError, Result};

/// Where a sample's bytes are: a file, or a byte range of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A whole file.
    File(PathBuf),
    /// `len` bytes at `offset` of `archive` (the data of the member `name`).
    Member {
        /// The outermost archive on disk.
        archive: Arc<PathBuf>,
        /// The member's path, nested members joined with `:`.
        name: String,
        /// Byte offset of the data in `archive`.
        offset: u64,
        /// Data length.
        len: u64,
    },
}

impl Location {
    /// Reads the bytes.
    ///
    /// # Errors
    /// [`DataError::Io`] naming the file (or `archive:member`).
    pub fn read(&self) -> Result<Vec<u8>> {
        self.read_checked(u64::MAX, 0, |_| Ok(()))
    }

    /// Reads the bytes, at most `max` of them: the first `head` bytes (fewer in a shorter file)
    /// are given to `check` before anything else is read, so a file that is not what it should
    /// be costs a few bytes, and a file or member longer than `max` is refused before it is
    /// read (and, should it grow while read, once `max` is passed).
    ///
    /// # Errors
    /// [`DataError::Io`] naming the file (or `archive:member`); what `check` returns;
    /// [`DataError::Decode`] for more than `max` bytes.
    pub fn read_checked(
        &self,
        max: u64,
        head: usize,
        check: impl FnOnce(&[u8]) -> Result<()>,
    ) -> Result<Vec<u8>> {
        let path = self.path();
        let io = |source| DataError::Io {
            path: path.clone(),
            source,
        };
        let (file, len) = match self {
            Self::File(p) => {
                let f = File::open(p).map_err(io)?;
                let len = f.metadata().map_err(io)?.len();
                (f, len)
            }
            Self::Member {
                archive,
                offset,
                len,
                ..
            } => {
                let mut f = File::open(archive.as_path()).map_err(io)?;
                f.seek(SeekFrom::Start(*offset)).map_err(io)?;
                (f, *len)
            }
        };
        // A member ends at its length; a file is read one byte past `max` to see it is longer.
        let mut r = file.take(if matches!(self, Self::File(_)) {
            max.saturating_add(1)
        } else {
            len
        });
        let mut buf = Vec::with_capacity(head.min(len as usize));
        (&mut r)
            .take(head as u64)
            .read_to_end(&mut buf)
            .map_err(io)?;
        check(&buf)?;
        let too_long = |n: u64| DataError::Decode {
            path: path.clone(),
            why: format!(
                "{n} bytes, more than the {max} bytes ({} MiB) a sample file may have",
                max >> 20
            ),
        };
        if len > max {
            return Err(too_long(len));
        }
        buf.reserve(len as usize - buf.len().min(len as usize));
        r.read_to_end(&mut buf).map_err(io)?;
        if buf.len() as u64 > max {
            return Err(too_long(buf.len() as u64));
        }
        if matches!(self, Self::Member { .. }) && (buf.len() as u64) < len {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the archive ends {} bytes into a {len}-byte member",
                    buf.len()
                ),
            )));
        }
        Ok(buf)
    }

    /// A path naming the sample in messages: the file, or `archive:member`.
    pub fn path(&self) -> PathBuf {
        match self {
            Self::File(p) => p.clone(),
            Self::Member { archive, name, .. } => {
                PathBuf::from(format!("{}:{name}", archive.display()))
            }
        }
    }

    /// The file or member name without folders.
    pub fn file_name(&self) -> &str {
        let full = match self {
            Self::File(p) => p.to_str().unwrap_or_default(),
            Self::Member { name, .. } => name.as_str(),
        };
        full.rsplit(['/', ':']).next().unwrap_or(full)
    }
}

/// One regular file inside a tar archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarMember {
    /// Path inside the archive (nested members joined with `:`).
    pub name: String,
    /// Byte offset of the data within the outermost archive.
    pub offset: u64,
    /// Data length.
    pub len: u64,
}

/// A window of a seekable reader, itself seekable (a member of a tar, read as a tar).
#[derive(Debug)]
struct Window<R> {
    inner: R,
    start: u64,
    len: u64,
    pos: u64,
}

impl<R: Read + Seek> Read for Window<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.inner.seek(SeekFrom::Start(self.start + self.pos))?;
        let got = self.inner.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl<R: Read + Seek> Seek for Window<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
            SeekFrom::End(d) => self.len as i128 + d as i128,
        };
        if target < 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start of a tar member",
            ));
        }
        self.pos = target as u64;
        Ok(self.pos)
    }
}

/// Lists the regular files of an uncompressed tar with their data offsets, reading only
/// headers. Members named `*.tar` whose `expand(name)` is true are listed recursively (their
/// members' names become `outer.tar:inner`).
///
/// # Errors
/// [`DataError::Io`] for an unreadable or malformed archive (e.g. a compressed one).
pub fn index_tar(path: &Path, expand: impl Fn(&str) -> bool) -> Result<Vec<TarMember>> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let window = Window {
        inner: BufReader::new(file),
        start: 0,
        len,
        pos: 0,
    };
    let mut out = Vec::new();
    list(path, window, "", 0, &expand, &mut out)?;
    Ok(out)
}

fn list<R: Read + Seek>(
    path: &Path,
    reader: Window<R>,
    prefix: &str,
    base: u64,
    expand: &impl Fn(&str) -> bool,
    out: &mut Vec<TarMember>,
) -> Result<()> {
    let io = |what: &str, source: std::io::Error| DataError::Io {
        path: PathBuf::from(format!("{}{what}", path.display())),
        source,
    };
    let limit = reader.len;
    let mut archive = tar::Archive::new(reader);
    let mut nested = Vec::new();
    let entries = archive.entries_with_seek().map_err(|e| io(prefix, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io(prefix, e))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        // A damaged header's size is checked here, before any read allocates it.
        let end = entry.raw_file_position().checked_add(entry.size());
        if end.is_none_or(|end| end > limit) {
            return Err(DataError::BadRecord {
                path: path.to_path_buf(),
                offset: base + entry.raw_file_position(),
                why: format!(
                    "tar member {prefix}{name} claims {} bytes, past the end of its archive \
                     ({limit} bytes): a damaged or truncated tar",
                    entry.size()
                ),
            });
        }
        let member = TarMember {
            name: format!("{prefix}{name}"),
            offset: base + entry.raw_file_position(),
            len: entry.size(),
        };
        if name.ends_with(".tar") && expand(&name) {
            nested.push(member);
        } else {
            out.push(member);
        }
    }
    drop(archive);
    for m in nested {
        let file = File::open(path).map_err(|e| io("", e))?;
        let window = Window {
            inner: BufReader::new(file),
            start: m.offset,
            len: m.len,
            pos: 0,
        };
        list(path, window, &format!("{}:", m.name), m.offset, expand, out)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tar (in memory) of `(name, data)` files.
    pub(crate) fn tar_bytes(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn a_member_size_past_the_end_is_an_error_naming_file_and_member() {
        let mut t = tar_bytes(&[("x.JPEG", b"12345"), ("y.JPEG", b"67890")]);
        // The first header's size field (octal, bytes 124..136) claims 8 GiB.
        t[124..136].copy_from_slice(b"77777777777\0");
        let sum: u32 = t[..512]
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(b)
                }
            })
            .sum();
        t[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let path = std::env::temp_dir().join(format!("huge-{}.tar", std::process::id()));
        std::fs::write(&path, &t).unwrap();
        let err = index_tar(&path, |_| true).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            err.contains("x.JPEG") && err.contains("past the end"),
            "{err}"
        );
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn nested_members_are_found_and_read_back() {
        let inner_a = tar_bytes(&[("a_1.JPEG", b"first"), ("a_2.JPEG", b"second!")]);
        let inner_b = tar_bytes(&[("b_1.JPEG", &[7u8; 1500])]);
        let outer = tar_bytes(&[
            ("n01.tar", &inner_a),
            ("README", b"not a tar"),
            ("n02.tar", &inner_b),
        ]);
        let path = std::env::temp_dir().join(format!("nested-{}.tar", std::process::id()));
        std::fs::write(&path, &outer).unwrap();
        let members = index_tar(&path, |_| true).unwrap();
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "README",
                "n01.tar:a_1.JPEG",
                "n01.tar:a_2.JPEG",
                "n02.tar:b_1.JPEG"
            ]
        );
        let archive = Arc::new(path.clone());
        let read = |m: &TarMember| {
            Location::Member {
                archive: archive.clone(),
                name: m.name.clone(),
                offset: m.offset,
                len: m.len,
            }
            .read()
            .unwrap()
        };
        assert_eq!(read(&members[2]), b"second!");
        assert_eq!(read(&members[3]), vec![7u8; 1500]);
        let loc = Location::Member {
            archive,
            name: members[1].name.clone(),
            offset: 0,
            len: 1,
        };
        assert_eq!(loc.file_name(), "a_1.JPEG");
        assert!(
            loc.path()
                .to_string_lossy()
                .ends_with(".tar:n01.tar:a_1.JPEG")
        );
        // Not expanded: the inner tar is one member.
        assert_eq!(index_tar(&path, |_| false).unwrap().len(), 3);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_tar_is_an_error_naming_it() {
        let path = std::env::temp_dir().join(format!("not-a-tar-{}.tar", std::process::id()));
        std::fs::write(&path, vec![0x1f; 2000]).unwrap();
        let err = index_tar(&path, |_| true).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
