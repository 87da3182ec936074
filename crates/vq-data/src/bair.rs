//! BAIR robot pushing (Ebert et al. 2017): TFRecord files of `tf.train.Example` trajectories, 30
//! frames each, feature `"{t}/image_aux1/encoded"` = raw 64×64×3 RGB bytes (row-major HWC, not
//! PNG), the camera every video-tokenizer paper uses.

use std::path::Path;

use ndarray::Array4;

use crate::error::{DataError, Result};
use crate::tfrecord::{Example, Records};

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
    let dir = match split {
        BairSplit::Train => "/train/",
        BairSplit::Test => "/test/",
    };
    let mut n = 0;
    for entry in tar.entries().map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.path().map_err(io)?.to_string_lossy().into_owned();
        if !(name.contains(dir) && name.ends_with(".tfrecords")) {
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
}
