//! BAIR robot pushing (Ebert et al. 2017): TFRecord files of `tf.train.Example` trajectories, 30
//! frames each, feature `"{t}/image_aux1/encoded"` = raw 64×64×3 RGB bytes (row-major HWC, not
//! PNG), the camera every video-tokenizer paper uses.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::Array4;
use rand::Rng;
use rand::rngs::StdRng;

use crate::archive::{Location, TarMember, index_tar};
use crate::error::{DataError, LeftOut, Result};
use crate::loader::Dataset;
use crate::tfrecord::{Example, Records, masked_crc};

/// Frames per BAIR trajectory.
pub const FRAMES: usize = 30;
/// Frame side length.
pub const SIZE: usize = 64;

/// One trajectory's `image_aux1` frames from a record payload: (T = 30, H = 64, W = 64, C = 3).
///
/// # Errors
/// [`DataError::BadRecord`] (naming `path` and `offset`) for a payload that is not an Example or
/// lacks a frame or has a frame of the wrong size.
pub fn decode_trajectory(path: &Path, offset: u64, payload: &[u8]) -> Result<Array4<u8>> {
    let bad = |why: String| DataError::BadRecord {
        path: path.to_path_buf(),
        offset,
        why,
    };
    let ex = Example::decode_payload(payload)
        .map_err(|e| bad(format!("not a tf.train.Example: {e}")))?;
    let frame = SIZE * SIZE * 3;
    let mut out = Vec::with_capacity(FRAMES * frame);
    for t in 0..FRAMES {
        let key = format!("{t}/image_aux1/encoded");
        let bytes = ex
            .bytes(&key)
            .ok_or_else(|| bad(format!("no single bytes feature {key:?}")))?;
        if bytes.len() != frame {
            return Err(bad(format!(
                "{key:?} has {} bytes, expected {frame} (64×64×3 raw RGB)",
                bytes.len()
            )));
        }
        out.extend_from_slice(bytes);
    }
    Ok(Array4::from_shape_vec((FRAMES, SIZE, SIZE, 3), out).expect("sizes checked"))
}

/// All trajectories of one BAIR `.tfrecords` file, in order.
///
/// ```no_run
/// let videos = vq_data::bair::read_file(std::path::Path::new("softmotion30_44k/test/traj_0_to_255.tfrecords"))?;
/// assert_eq!(videos[0].dim(), (30, 64, 64, 3));
/// # Ok::<(), vq_data::DataError>(())
/// ```
///
/// # Errors
/// As [`Records`] and [`decode_trajectory`].
pub fn read_file(path: &Path) -> Result<Vec<Array4<u8>>> {
    Records::open(path)?
        .map(|r| r.and_then(|(offset, payload)| decode_trajectory(path, offset, &payload)))
        .collect()
}

/// Which part of the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BairSplit {
    /// `softmotion30_44k/train/` (43,264 trajectories).
    Train,
    /// `softmotion30_44k/test/` (256 trajectories).
    Test,
}

/// Streams the trajectories of one split straight from the official archive
/// (`bair_robot_pushing_dataset_v0.tar`, uncompressed tar of `.tfrecords` files) without
/// extracting it, calling `f` with each trajectory in archive order; stops at the first error
/// (of the archive or of `f`). Returns the number of trajectories.
///
/// # Errors
/// [`DataError::Io`] for an unreadable archive, the record and trajectory errors of
/// [`read_file`] (naming `archive.tar:member`), and `f`'s errors.
pub fn for_each_in_tar(
    archive: &Path,
    split: BairSplit,
    mut f: impl FnMut(Array4<u8>) -> Result<()>,
) -> Result<usize> {
    let io = |source| DataError::Io {
        path: archive.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(archive).map_err(io)?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    let mut n = 0;
    for entry in tar.entries().map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.path().map_err(io)?.to_string_lossy().into_owned();
        if !(member_in(&name, split.dir()) && name.ends_with(".tfrecords")) {
            continue;
        }
        let member = std::path::PathBuf::from(format!("{}:{name}", archive.display()));
        for rec in Records::new(&member, entry) {
            let (offset, payload) = rec?;
            f(decode_trajectory(&member, offset, &payload)?)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Which frames of a trajectory make a clip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipWindow {
    /// A uniformly random start in `0 ..= 30 − frames` (training). VideoGPT draws
    /// `randint(0, 30 − frames)`, whose upper bound is exclusive, so it never takes the last
    /// window; here every window is possible.
    Random,
    /// Always the same start frame (evaluation).
    Fixed(usize),
}

/// One record of an index: where its payload and payload checksum are.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RecordRef {
    location: Location,
    /// Offset of the record's first byte in its `.tfrecords` file (for messages).
    record_offset: u64,
}

/// BAIR trajectories with random access: the records of every `.tfrecords` file of a split are
/// indexed once (length fields only, each checked against its CRC), then a sample reads one
/// record, checks the payload CRC and returns a `(3, frames, 64, 64)` clip (channel first,
/// `u8`).
///
/// A `.tfrecords` file whose index is damaged (a length field that fails its CRC, a record that
/// overruns the file) is left out whole and listed by [`BairDataset::left_out`]; the other
/// files are used.
#[derive(Debug, Clone)]
pub struct BairDataset {
    records: Vec<RecordRef>,
    frames: usize,
    window: ClipWindow,
    left_out: Vec<LeftOut>,
}

impl BairSplit {
    /// The split's folder name in `softmotion30_44k/`.
    pub fn dir(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Test => "test",
        }
    }

    fn other(self) -> Self {
        match self {
            Self::Train => Self::Test,
            Self::Test => Self::Train,
        }
    }
}

/// The folder of `split`'s `.tfrecords` files for a user's `path`: `path/softmotion30_44k/<split>`,
/// `path/<split>`, or, when `path` is itself one split's folder (named `train` or `test`), the
/// sibling folder of the other split. `None` when there is none.
fn split_folder(path: &Path, split: BairSplit) -> Option<PathBuf> {
    let dir = split.dir();
    let name = path.file_name().and_then(|n| n.to_str());
    let candidates = match name {
        Some(n) if n == dir => vec![path.to_path_buf()],
        Some(n) if n == split.other().dir() => {
            vec![path.parent().unwrap_or(Path::new(".")).join(dir)]
        }
        _ => vec![path.join("softmotion30_44k").join(dir), path.join(dir)],
    };
    candidates.into_iter().find(|p| p.is_dir())
}

/// Whether the tar member `name` lies in a folder named `dir` (a path component, not a
/// substring: `my_train_set/…` is not `train/`).
fn member_in(name: &str, dir: &str) -> bool {
    let mut parts: Vec<&str> = name.split('/').collect();
    parts.pop();
    parts.contains(&dir)
}

fn scan_records(
    name: &Path,
    reader: &mut (impl Read + Seek),
    base: u64,
    len: u64,
    location: impl Fn(u64, u64) -> Location,
    out: &mut Vec<RecordRef>,
) -> Result<()> {
    let io = |source| DataError::Io {
        path: name.to_path_buf(),
        source,
    };
    let mut at = 0u64;
    while at < len {
        if len - at < 12 {
            return Err(DataError::Truncated {
                path: name.to_path_buf(),
                offset: len,
                expected: at + 12,
            });
        }
        reader.seek(SeekFrom::Start(base + at)).map_err(io)?;
        let mut head = [0u8; 12];
        reader.read_exact(&mut head).map_err(io)?;
        let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        if masked_crc(&head[..8]) != u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) {
            return Err(DataError::Checksum {
                path: name.to_path_buf(),
                what: "length",
                offset: at,
            });
        }
        let end = at.saturating_add(16).saturating_add(n);
        if end > len {
            return Err(DataError::Truncated {
                path: name.to_path_buf(),
                offset: len,
                expected: end,
            });
        }
        out.push(RecordRef {
            location: location(base + at + 12, n + 4),
            record_offset: at,
        });
        at = end;
    }
    Ok(())
}

impl BairDataset {
    /// Indexes one split from the official archive `bair_robot_pushing_dataset_v0.tar`
    /// (read in place), from the extracted `softmotion30_44k/` folder (or the folder holding
    /// it), or from one split's folder of `.tfrecords` files (`…/train` or `…/test`; the other
    /// split is then its sibling). Files are taken in sorted name order; a file whose index is
    /// damaged is left out ([`BairDataset::left_out`]).
    ///
    /// # Errors
    /// An unreadable archive or folder, no folder for `split` (named in the message), train
    /// and test resolving to the same folder, every file damaged, no records, or `frames`
    /// outside `1..=30`.
    pub fn open(path: &Path, split: BairSplit, frames: usize, window: ClipWindow) -> Result<Self> {
        if frames == 0 || frames > FRAMES {
            return Err(DataError::Config(format!(
                "BAIR clips have 1 to {FRAMES} frames, not {frames}"
            )));
        }
        if let ClipWindow::Fixed(start) = window
            && start + frames > FRAMES
        {
            return Err(DataError::Config(format!(
                "a {frames}-frame BAIR clip cannot start at frame {start}"
            )));
        }
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| DataError::Io { path: p, source }
        };
        let mut records = Vec::new();
        let mut left_out = Vec::new();
        // A damaged file is left out whole: its records are dropped, the error remembered.
        let mut scan = |name: &Path, result: Result<()>, from: usize, records: &mut Vec<_>| {
            if let Err(e) = result {
                records.truncate(from);
                left_out.push(LeftOut::new(name, &e));
            }
        };
        if path.is_file() {
            let archive = Arc::new(path.to_path_buf());
            let mut members: Vec<TarMember> = index_tar(path, |_| false)?
                .into_iter()
                .filter(|m| member_in(&m.name, split.dir()) && m.name.ends_with(".tfrecords"))
                .collect();
            members.sort_by(|a, b| a.name.cmp(&b.name));
            let mut f = BufReader::new(File::open(path).map_err(io(path))?);
            for m in members {
                let name = PathBuf::from(format!("{}:{}", path.display(), m.name));
                let (archive, member) = (archive.clone(), m.name.clone());
                let from = records.len();
                let result = scan_records(
                    &name,
                    &mut f,
                    m.offset,
                    m.len,
                    |offset, len| Location::Member {
                        archive: archive.clone(),
                        name: member.clone(),
                        offset,
                        len,
                    },
                    &mut records,
                );
                scan(&name, result, from, &mut records);
            }
        } else {
            let folder = Self::folder(path, split)?;
            let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
                .map_err(io(&folder))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "tfrecords"))
                .collect();
            files.sort();
            for file in files {
                let from = records.len();
                let result = File::open(&file).map_err(io(&file)).and_then(|f| {
                    let mut f = BufReader::new(f);
                    let len = f.get_ref().metadata().map_err(io(&file))?.len();
                    let archive = Arc::new(file.clone());
                    scan_records(
                        &file,
                        &mut f,
                        0,
                        len,
                        |offset, len| Location::Member {
                            archive: archive.clone(),
                            name: String::new(),
                            offset,
                            len,
                        },
                        &mut records,
                    )
                });
                scan(&file, result, from, &mut records);
            }
        }
        if records.is_empty() {
            return Err(match left_out.first() {
                Some(first) => DataError::Invalid {
                    path: path.to_path_buf(),
                    why: format!(
                        "all {} .tfrecords files of the BAIR {} split are damaged; the first: {first}",
                        left_out.len(),
                        split.dir()
                    ),
                },
                None => DataError::Empty {
                    path: path.to_path_buf(),
                    what: "BAIR .tfrecords records for this split",
                },
            });
        }
        Ok(Self {
            records,
            frames,
            window,
            left_out,
        })
    }

    /// The folder of `split`'s files for `path` (see [`BairDataset::open`]), checked to be a
    /// different folder from the other split's.
    fn folder(path: &Path, split: BairSplit) -> Result<PathBuf> {
        let folder = split_folder(path, split).ok_or_else(|| DataError::Invalid {
            path: path.to_path_buf(),
            why: format!(
                "no BAIR {dir} split: looked for softmotion30_44k/{dir}/ and {dir}/ in it, or, \
                 if it is the {other}/ folder, {dir}/ beside it (a folder of .tfrecords files \
                 must be named train or test, so that the two splits are never the same files)",
                dir = split.dir(),
                other = split.other().dir(),
            ),
        })?;
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if let Some(other) = split_folder(path, split.other())
            && same(&folder, &other)
        {
            return Err(DataError::Invalid {
                path: folder,
                why: format!(
                    "is both the BAIR train and test split (a link?): the held-out clips would be \
                     training clips; give {}/ its own files",
                    split.dir()
                ),
            });
        }
        Ok(folder)
    }

    /// Files left out when indexing (a damaged index), each with its error.
    pub fn left_out(&self) -> &[LeftOut] {
        &self.left_out
    }

    /// Frames per clip.
    pub fn frames(&self) -> usize {
        self.frames
    }

    fn file_of(&self, index: usize) -> PathBuf {
        match &self.records[index].location {
            Location::Member { archive, name, .. } if name.is_empty() => archive.to_path_buf(),
            l => l.path(),
        }
    }

    /// The whole trajectory `index` as (T = 30, H, W, C).
    ///
    /// # Errors
    /// As [`decode_trajectory`], [`DataError::Checksum`] for a payload that fails its CRC.
    pub fn trajectory(&self, index: usize) -> Result<Array4<u8>> {
        let r = &self.records[index];
        let file = self.file_of(index);
        let bytes = r.location.read().map_err(|e| match e {
            DataError::Io { source, .. } => DataError::Io {
                path: file.clone(),
                source,
            },
            e => e,
        })?;
        let (payload, crc) = bytes.split_at(bytes.len() - 4);
        if masked_crc(payload) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(DataError::Checksum {
                path: file,
                what: "payload",
                offset: r.record_offset,
            });
        }
        decode_trajectory(&file, r.record_offset, payload)
    }
}

impl Dataset for BairDataset {
    type Sample = Array4<u8>;

    fn len(&self) -> usize {
        self.records.len()
    }

    /// `(3, frames, 64, 64)`.
    fn get(&self, index: usize, rng: &mut StdRng) -> Result<Array4<u8>> {
        let t = self.trajectory(index)?;
        let start = match self.window {
            ClipWindow::Random => rng.gen_range(0..=FRAMES - self.frames),
            ClipWindow::Fixed(s) => s,
        };
        Ok(
            t.slice_move(ndarray::s![start..start + self.frames, .., .., ..])
                .permuted_axes([3, 0, 1, 2])
                .as_standard_layout()
                .into_owned(),
        )
    }

    fn name(&self, index: usize) -> String {
        format!(
            "{} (record at byte {})",
            self.file_of(index).display(),
            self.records[index].record_offset
        )
    }

    fn left_out(&self) -> &[LeftOut] {
        &self.left_out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tfrecord::write_record;
    use prost::Message;

    /// A trajectory whose pixel (t, y, x, c) is (t + y + x + c) mod 256, plus the other BAIR keys.
    fn trajectory_payload(shift: u8) -> Vec<u8> {
        let frames: Vec<Vec<u8>> = (0..FRAMES)
            .map(|t| {
                (0..SIZE * SIZE * 3)
                    .map(|i| {
                        let (y, x, c) = (i / (SIZE * 3), (i / 3) % SIZE, i % 3);
                        ((t + y + x + c) as u8).wrapping_add(shift)
                    })
                    .collect()
            })
            .collect();
        let mut items: Vec<(String, &[u8])> = frames
            .iter()
            .enumerate()
            .map(|(t, f)| (format!("{t}/image_aux1/encoded"), f.as_slice()))
            .collect();
        items.push(("0/image_main/encoded".into(), frames[0].as_slice()));
        Example::from_bytes_features(items).encode_to_vec()
    }

    fn file_with(records: &[Vec<u8>], name: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("bair-{}-{name}.tfrecords", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        for r in records {
            write_record(&mut f, r).unwrap();
        }
        path
    }

    #[test]
    fn reads_trajectories_in_order() {
        let path = file_with(&[trajectory_payload(0), trajectory_payload(7)], "ok");
        let v = read_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].dim(), (30, 64, 64, 3));
        assert_eq!(v[0][[2, 3, 4, 1]], 10);
        assert_eq!(v[1][[2, 3, 4, 1]], 17);
    }

    #[test]
    fn damaged_files_give_typed_errors_with_offsets() {
        let one = trajectory_payload(0);
        let record_len = 16 + one.len() as u64;
        // A flipped payload byte in the second record.
        let path = file_with(&[one.clone(), one.clone()], "crc");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(record_len + 100) as usize] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = read_file(&path).unwrap_err();
        assert!(
            matches!(err, DataError::Checksum { what: "payload", offset, .. } if offset == record_len),
            "{err}"
        );
        // A flipped length byte.
        bytes[(record_len + 100) as usize] ^= 1;
        bytes[record_len as usize] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = read_file(&path).unwrap_err();
        assert!(
            matches!(err, DataError::Checksum { what: "length", .. }),
            "{err}"
        );
        // Truncated inside the second record.
        bytes[record_len as usize] ^= 1;
        std::fs::write(&path, &bytes[..(record_len + 50) as usize]).unwrap();
        let err = read_file(&path).unwrap_err();
        assert!(matches!(err, DataError::Truncated { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn streams_one_split_from_the_archive_without_extracting() {
        let mut train = Vec::new();
        for s in [1u8, 2, 3] {
            write_record(&mut train, &trajectory_payload(s)).unwrap();
        }
        let mut test = Vec::new();
        write_record(&mut test, &trajectory_payload(9)).unwrap();
        let path = std::env::temp_dir().join(format!("bair-{}.tar", std::process::id()));
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (name, data) in [
            ("softmotion30_44k/train/traj_0_to_255.tfrecords", &train),
            ("softmotion30_44k/test/traj_0_to_255.tfrecords", &test),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data.as_slice()).unwrap();
        }
        b.finish().unwrap();
        drop(b);
        let mut seen = Vec::new();
        let n = for_each_in_tar(&path, BairSplit::Train, |v| {
            seen.push(v[[0, 0, 0, 0]]);
            Ok(())
        })
        .unwrap();
        assert_eq!((n, seen), (3, vec![1, 2, 3]));
        let n = for_each_in_tar(&path, BairSplit::Test, |v| {
            assert_eq!(v[[0, 0, 0, 0]], 9);
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 1);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn records_that_are_not_bair_trajectories_are_refused() {
        let short =
            Example::from_bytes_features([("0/image_aux1/encoded".to_owned(), &[1u8, 2][..])])
                .encode_to_vec();
        let path = file_with(&[short, b"\xff\xff not protobuf".to_vec()], "bad");
        let mut it = Records::open(&path).unwrap();
        let (off, p) = it.next().unwrap().unwrap();
        let err = decode_trajectory(&path, off, &p).unwrap_err().to_string();
        assert!(
            err.contains("0/image_aux1/encoded") && err.contains("offset 0"),
            "{err}"
        );
        let (off, p) = it.next().unwrap().unwrap();
        let err = decode_trajectory(&path, off, &p).unwrap_err().to_string();
        assert!(err.contains("not a tf.train.Example"), "{err}");
        assert!(it.next().is_none());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn train_and_test_are_never_the_same_files() {
        let dir = std::env::temp_dir().join(format!("bair-splits-{}", std::process::id()));
        let root = dir.join("softmotion30_44k");
        for (split, shift) in [("train", 1u8), ("test", 9)] {
            std::fs::create_dir_all(root.join(split)).unwrap();
            let mut f = Vec::new();
            write_record(&mut f, &trajectory_payload(shift)).unwrap();
            std::fs::write(root.join(split).join("traj_0_to_255.tfrecords"), &f).unwrap();
        }
        let first = |path: &Path, split| {
            BairDataset::open(path, split, 4, ClipWindow::Fixed(0))
                .map(|d| d.trajectory(0).unwrap()[[0, 0, 0, 0]])
        };
        // The folder holding softmotion30_44k/, softmotion30_44k/ itself, or either split's
        // folder: always the right files for each split.
        for path in [
            dir.clone(),
            root.clone(),
            root.join("train"),
            root.join("test"),
        ] {
            assert_eq!(first(&path, BairSplit::Train).unwrap(), 1, "{path:?}");
            assert_eq!(first(&path, BairSplit::Test).unwrap(), 9, "{path:?}");
        }
        // A missing split is named.
        std::fs::remove_dir_all(root.join("test")).unwrap();
        for path in [dir.clone(), root.join("train")] {
            let err = first(&path, BairSplit::Test).unwrap_err().to_string();
            assert!(err.contains("no BAIR test split"), "{err}");
            assert_eq!(first(&path, BairSplit::Train).unwrap(), 1);
        }
        // A folder named neither train nor test could be either split: refused.
        let flat = dir.join("clips");
        std::fs::create_dir_all(&flat).unwrap();
        std::fs::copy(
            root.join("train/traj_0_to_255.tfrecords"),
            flat.join("a.tfrecords"),
        )
        .unwrap();
        assert!(first(&flat, BairSplit::Train).is_err());
        // test/ as a link to train/.
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(root.join("train"), root.join("test")).unwrap();
            let err = first(&dir, BairSplit::Test).unwrap_err().to_string();
            assert!(err.contains("both the BAIR train and test split"), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_indexed_dataset_reads_clips_from_files_and_from_the_archive() {
        use rand::SeedableRng;
        let dir = std::env::temp_dir().join(format!("bair-ds-{}", std::process::id()));
        let split = dir.join("softmotion30_44k/train");
        std::fs::create_dir_all(&split).unwrap();
        let mut a = Vec::new();
        for s in [1u8, 2] {
            write_record(&mut a, &trajectory_payload(s)).unwrap();
        }
        let mut b = Vec::new();
        write_record(&mut b, &trajectory_payload(3)).unwrap();
        std::fs::write(split.join("traj_256_to_511.tfrecords"), &b).unwrap();
        std::fs::write(split.join("traj_0_to_255.tfrecords"), &a).unwrap();
        let tar_path = dir.join("bair.tar");
        let mut t = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
        t.append_dir_all("softmotion30_44k", dir.join("softmotion30_44k"))
            .unwrap();
        t.finish().unwrap();
        drop(t);
        for path in [dir.clone(), tar_path.clone()] {
            let ds = BairDataset::open(&path, BairSplit::Train, 16, ClipWindow::Fixed(2)).unwrap();
            assert_eq!(ds.len(), 3);
            let mut rng = StdRng::seed_from_u64(0);
            let clip = ds.get(2, &mut rng).unwrap();
            assert_eq!(clip.dim(), (3, 16, 64, 64));
            // Channel c, frame k (= trajectory frame 2 + k), pixel (y, x): (t + y + x + c) + shift 3.
            assert_eq!(clip[[1, 4, 5, 6]], (6 + 5 + 6 + 1 + 3) as u8);
            let random =
                BairDataset::open(&path, BairSplit::Train, 16, ClipWindow::Random).unwrap();
            let starts: std::collections::HashSet<u8> = (0..200)
                .map(|s| random.get(0, &mut StdRng::seed_from_u64(s)).unwrap()[[0, 0, 0, 0]] - 1)
                .collect();
            assert_eq!(starts.len(), 15, "every start 0..=14 is drawn");
            assert!(BairDataset::open(&path, BairSplit::Test, 16, ClipWindow::Random).is_err());
        }
        // A flipped payload byte: found when the sample is read, naming the file and record.
        let file = split.join("traj_0_to_255.tfrecords");
        let mut bytes = std::fs::read(&file).unwrap();
        let second = 16 + trajectory_payload(1).len();
        bytes[second + 500] ^= 4;
        std::fs::write(&file, &bytes).unwrap();
        let ds = BairDataset::open(&dir, BairSplit::Train, 16, ClipWindow::Random).unwrap();
        let err = ds.get(1, &mut StdRng::seed_from_u64(0)).unwrap_err();
        assert!(
            matches!(err, DataError::Checksum { what: "payload", offset, .. } if offset == second as u64),
            "{err}"
        );
        assert!(err.to_string().contains("traj_0_to_255.tfrecords"), "{err}");
        // A truncated file is left out whole at indexing, named with its error; the other file
        // is used.
        std::fs::write(&file, &bytes[..second + 100]).unwrap();
        let ds = BairDataset::open(&dir, BairSplit::Train, 16, ClipWindow::Random).unwrap();
        assert_eq!(ds.len(), 1);
        assert_eq!(ds.trajectory(0).unwrap()[[0, 0, 0, 0]], 3);
        assert_eq!(ds.left_out().len(), 1);
        assert_eq!(ds.left_out()[0].path, file);
        assert!(
            ds.left_out()[0].why.contains("truncated"),
            "{}",
            ds.left_out()[0]
        );
        // A length field that fails its CRC too; with every file damaged the split is an error.
        let other = split.join("traj_256_to_511.tfrecords");
        let mut b = std::fs::read(&other).unwrap();
        b[3] ^= 1;
        std::fs::write(&other, &b).unwrap();
        let err = BairDataset::open(&dir, BairSplit::Train, 16, ClipWindow::Random).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("all 2 .tfrecords files") && msg.contains("train"),
            "{msg}"
        );
        assert!(BairDataset::open(&dir, BairSplit::Train, 31, ClipWindow::Random).is_err());
        assert!(BairDataset::open(&dir, BairSplit::Train, 16, ClipWindow::Fixed(15)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
