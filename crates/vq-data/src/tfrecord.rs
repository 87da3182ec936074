//! TFRecord files and `tf.train.Example` records (the BAIR robot-pushing format).
//!
//! A record is `u64 length (LE) · u32 masked CRC-32C of the length bytes · payload · u32 masked
//! CRC-32C of the payload`, with `mask(c) = ((c >> 15) | (c << 17)) + 0xa282ead8`. Both checksums
//! are verified; errors name the file and the record's byte offset.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::error::{DataError, Result};

/// The masked CRC-32C TFRecord stores.
///
/// ```
/// assert_eq!(vq_data::tfrecord::masked_crc(b""), 0xa282_ead8);
/// ```
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Appends one record with `payload` to `w`.
///
/// # Errors
/// Write errors.
pub fn write_record(w: &mut impl Write, payload: &[u8]) -> std::io::Result<()> {
    let len = (payload.len() as u64).to_le_bytes();
    w.write_all(&len)?;
    w.write_all(&masked_crc(&len).to_le_bytes())?;
    w.write_all(payload)?;
    w.write_all(&masked_crc(payload).to_le_bytes())
}

/// The records of a TFRecord stream, in order, as `(byte offset, payload)`.
#[derive(Debug)]
pub struct Records<R> {
    path: PathBuf,
    reader: R,
    offset: u64,
    done: bool,
}

/// The longest record accepted (256 MiB; a BAIR trajectory is about 1 MB).
pub const MAX_RECORD_BYTES: u64 = 256 << 20;

impl Records<BufReader<std::fs::File>> {
    /// Opens a TFRecord file.
    ///
    /// # Errors
    /// [`DataError::Io`] if the file cannot be opened.
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::new(path, BufReader::new(f)))
    }
}

impl<R: Read> Records<R> {
    /// Records read from `reader`; `path` names the source in errors (e.g. `archive.tar:member`).
    pub fn new(path: &Path, reader: R) -> Self {
        Self {
            path: path.to_path_buf(),
            reader,
            offset: 0,
            done: false,
        }
    }

    /// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end of stream before the first byte.
    fn fill(&mut self, buf: &mut [u8], start: u64, at_record_start: bool) -> Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.reader.read(&mut buf[got..]) {
                Ok(0) if got == 0 && at_record_start => return Ok(false),
                Ok(0) => {
                    return Err(DataError::Truncated {
                        path: self.path.clone(),
                        offset: start + got as u64,
                        expected: start + buf.len() as u64,
                    });
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(DataError::Io {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        }
        Ok(true)
    }

    fn next_record(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        let start = self.offset;
        let mut head = [0u8; 12];
        if !self.fill(&mut head, start, true)? {
            return Ok(None);
        }
        let (len_bytes, crc) = head.split_at(8);
        let crc_of = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        if masked_crc(len_bytes) != crc_of(crc) {
            return Err(DataError::Checksum {
                path: self.path.clone(),
                what: "length",
                offset: start,
            });
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        // A record is at most a few MB here; and the buffer grows with the bytes that arrive,
        // not with the length the header claims, so a damaged length field costs at most what
        // the file still holds.
        if len > MAX_RECORD_BYTES {
            return Err(DataError::BadRecord {
                path: self.path.clone(),
                offset: start,
                why: format!("record length {len} exceeds the {MAX_RECORD_BYTES} bytes accepted"),
            });
        }
        let mut payload = Vec::new();
        (&mut self.reader)
            .take(len + 4)
            .read_to_end(&mut payload)
            .map_err(|source| DataError::Io {
                path: self.path.clone(),
                source,
            })?;
        if (payload.len() as u64) < len + 4 {
            return Err(DataError::Truncated {
                path: self.path.clone(),
                offset: start + 12 + payload.len() as u64,
                expected: start + 16 + len,
            });
        }
        let crc = payload.split_off(len as usize);
        if masked_crc(&payload) != crc_of(&crc) {
            return Err(DataError::Checksum {
                path: self.path.clone(),
                what: "payload",
                offset: start,
            });
        }
        self.offset = start + 16 + len;
        Ok(Some((start, payload)))
    }
}

impl<R: Read> Iterator for Records<R> {
    type Item = Result<(u64, Vec<u8>)>;

    /// The next record; after an error the iterator ends (the stream position is lost).
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.next_record().transpose();
        if !matches!(r, Some(Ok(_))) {
            self.done = true;
        }
        r
    }
}

/// `tf.train.Example` (feature.proto / example.proto), as far as the readers need it.
#[derive(Clone, PartialEq, Message)]
pub struct Example {
    /// The features.
    #[prost(message, optional, tag = "1")]
    pub features: Option<Features>,
}

/// `tf.train.Features`: named features.
#[derive(Clone, PartialEq, Message)]
pub struct Features {
    /// Feature by name.
    #[prost(map = "string, message", tag = "1")]
    pub feature: HashMap<String, Feature>,
}

/// `tf.train.Feature`: one of three lists.
#[derive(Clone, PartialEq, Message)]
pub struct Feature {
    /// The list.
    #[prost(oneof = "Kind", tags = "1, 2, 3")]
    pub kind: Option<Kind>,
}

/// The list kinds of a [`Feature`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    /// Byte strings.
    #[prost(message, tag = "1")]
    BytesList(BytesList),
    /// Floats.
    #[prost(message, tag = "2")]
    FloatList(FloatList),
    /// Integers.
    #[prost(message, tag = "3")]
    Int64List(Int64List),
}

/// `tf.train.BytesList`.
#[derive(Clone, PartialEq, Message)]
pub struct BytesList {
    /// Values.
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub value: Vec<Vec<u8>>,
}

/// `tf.train.FloatList` (packed or not).
#[derive(Clone, PartialEq, Message)]
pub struct FloatList {
    /// Values.
    #[prost(float, repeated, tag = "1")]
    pub value: Vec<f32>,
}

/// `tf.train.Int64List` (packed or not).
#[derive(Clone, PartialEq, Message)]
pub struct Int64List {
    /// Values.
    #[prost(int64, repeated, tag = "1")]
    pub value: Vec<i64>,
}

impl Example {
    /// Decodes a record payload.
    ///
    /// # Errors
    /// The protobuf decoder's message for malformed bytes.
    pub fn decode_payload(payload: &[u8]) -> std::result::Result<Self, String> {
        Example::decode(payload).map_err(|e| e.to_string())
    }

    /// The protobuf encoding (a record payload).
    pub fn encode_payload(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// The single byte string of feature `key`, if it is a one-element bytes list.
    pub fn bytes(&self, key: &str) -> Option<&[u8]> {
        match self.features.as_ref()?.feature.get(key)?.kind.as_ref()? {
            Kind::BytesList(b) if b.value.len() == 1 => Some(&b.value[0]),
            _ => None,
        }
    }

    /// An example with the given single-byte-string features (for writing fixtures and files).
    pub fn from_bytes_features<'a>(items: impl IntoIterator<Item = (String, &'a [u8])>) -> Self {
        let feature = items
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    Feature {
                        kind: Some(Kind::BytesList(BytesList {
                            value: vec![v.to_vec()],
                        })),
                    },
                )
            })
            .collect();
        Example {
            features: Some(Features { feature }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record whose (checksummed) length field claims far more than the stream holds ends in
    /// a truncation error after reading what is there; one past the cap is refused unread.
    #[test]
    fn a_length_field_is_not_trusted_beyond_the_bytes_that_exist() {
        let record = |len: u64, body: &[u8]| {
            let mut v = len.to_le_bytes().to_vec();
            v.extend(masked_crc(&len.to_le_bytes()).to_le_bytes());
            v.extend(body);
            v
        };
        let mut ok = Vec::new();
        write_record(&mut ok, b"fine").unwrap();
        let mut bytes = ok.clone();
        bytes.extend(record(1 << 27, &[1, 2, 3]));
        let mut recs = Records::new(Path::new("x.tfrecords"), bytes.as_slice());
        assert_eq!(recs.next().unwrap().unwrap().1, b"fine");
        match recs.next().unwrap() {
            Err(DataError::Truncated {
                offset, expected, ..
            }) => assert_eq!(
                (offset, expected),
                (ok.len() as u64 + 15, ok.len() as u64 + 16 + (1 << 27))
            ),
            other => panic!("{other:?}"),
        }
        let bytes = record(MAX_RECORD_BYTES + 1, &[0; 8]);
        let err = Records::new(Path::new("x.tfrecords"), bytes.as_slice())
            .next()
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
    }
}
