//! TensorBoard event files: each run folder gets one `events.out.tfevents.<time>.<host>`, so that
//! `tensorboard --logdir runs/` shows a run (or a `compare`'s estimators side by side).
//!
//! The file is a TFRecord stream (vq-data's writer: length, masked CRC-32C, payload, CRC) of
//! `tensorflow.Event` protos (event.proto / summary.proto, the fields TensorBoard reads): first
//! `file_version = "brain.Event:2"`, then one event per metric window with every scalar under a
//! stable tag (`train/rec`, `train/usage`, `lr`, `gan/d_loss`, ...), the run configuration as a
//! text summary (`config`, step 0), and after training the held-out metrics (`val/...`) and
//! the reconstruction grid as a PNG image summary at the last step.
//!
//! Resume: the file is rewritten without the events past the checkpoint's step (their steps are
//! trained again), as `metrics.jsonl` drops its lines; a fresh start keeps only step 0's.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    /// Seconds since the epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// Global step.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// What the event holds.
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

/// The payload of an [`Event`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// `file_version` (the first event of a file).
    #[prost(string, tag = "3")]
    FileVersion(String),
    /// A summary.
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    /// Tagged values.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

/// `tensorflow.Summary.Value`.
#[derive(Clone, PartialEq, Message)]
pub struct Value {
    /// The series' tag.
    #[prost(string, tag = "1")]
    pub tag: String,
    /// Plugin metadata (the text plugin's marker).
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
    /// The value.
    #[prost(oneof = "Kind", tags = "2, 4, 8")]
    pub kind: Option<Kind>,
}

/// The kinds of [`Value`] written here.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    /// `simple_value`: a scalar.
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    /// `image`: an encoded image.
    #[prost(message, tag = "4")]
    Image(Image),
    /// `tensor`: here a string tensor (text summaries).
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

/// `tensorflow.Summary.Image`.
#[derive(Clone, PartialEq, Message)]
pub struct Image {
    /// Height in pixels.
    #[prost(int32, tag = "1")]
    pub height: i32,
    /// Width in pixels.
    #[prost(int32, tag = "2")]
    pub width: i32,
    /// 1 grey, 3 RGB, 4 RGBA.
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    /// The PNG file.
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

/// `tensorflow.SummaryMetadata`.
#[derive(Clone, PartialEq, Message)]
pub struct SummaryMetadata {
    /// Which plugin shows the value.
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

/// `tensorflow.SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, Message)]
pub struct PluginData {
    /// `text` for text summaries.
    #[prost(string, tag = "1")]
    pub plugin_name: String,
}

/// `tensorflow.TensorProto`, as far as a string scalar needs it.
#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    /// `DT_STRING` = 7.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    /// Shape (empty: a scalar).
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShapeProto>,
    /// The strings.
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// `tensorflow.TensorShapeProto` (no dimensions: a scalar).
#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {}

/// Appends events to a run's event file.
#[derive(Debug)]
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

/// The run's event file, if it has one (the first by name).
///
/// # Errors
/// An unreadable run folder.
pub fn event_file(run: &Path) -> Result<Option<PathBuf>> {
    if !run.is_dir() {
        return Ok(None);
    }
    let mut files: Vec<PathBuf> = fs::read_dir(run)
        .with_context(|| format!("reading {}", run.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("events.out.tfevents."))
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// Every event of an event file, its records' CRCs checked.
///
/// # Errors
/// Unreadable files, bad records (named with their offset), undecodable events.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let (events, bad) = read_good_events(path)?;
    match bad {
        Some(e) => Err(e),
        None => Ok(events),
    }
}

/// The events before the first bad record, and the error of that record if there is one (a
/// process killed while writing leaves a truncated last record).
fn read_good_events(path: &Path) -> Result<(Vec<Event>, Option<anyhow::Error>)> {
    let mut events = Vec::new();
    for record in vq_data::tfrecord::Records::open(path)? {
        let (offset, payload) = match record {
            Ok(r) => r,
            Err(e) => return Ok((events, Some(e.into()))),
        };
        match Event::decode(payload.as_slice()) {
            Ok(e) => events.push(e),
            Err(e) => {
                let why = format!(
                    "{}: the record at byte {offset} is not an Event: {e}",
                    path.display()
                );
                return Ok((events, Some(anyhow::anyhow!(why))));
            }
        }
    }
    Ok((events, None))
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn host() -> String {
    let name = fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    let name: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

impl EventWriter {
    /// Opens the run's event file for a run continuing after step `keep` (0 for a fresh start):
    /// events of later steps are removed first (the file is rewritten, then renamed into place),
    /// so that no step appears twice. A damaged or truncated record (a process killed while
    /// writing) ends what is kept, with a note. A run without a file gets a new one.
    ///
    /// # Errors
    /// File-system errors; an existing file that cannot be read back.
    pub fn open(run: &Path, keep: usize) -> Result<Self> {
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        Self::open_keeping(run, |e| e.step <= keep)
    }

    /// As [`open`](Self::open), keeping the existing events for which `keep` holds.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub fn open_keeping(run: &Path, keep: impl Fn(&Event) -> bool) -> Result<Self> {
        let path = match event_file(run)? {
            Some(path) => {
                let (events, bad) = read_good_events(&path)?;
                if let Some(e) = &bad {
                    // Rewritten from the good records: what followed the damage is lost from
                    // TensorBoard only (metrics.jsonl and the checkpoints are apart).
                    eprintln!("note: {e:#}; keeping the {} events before it", events.len());
                }
                if bad.is_none() && events.iter().all(&keep) {
                    return Self::append(path);
                }
                let kept: Vec<Event> = events.into_iter().filter(|e| keep(e)).collect();
                // No "tfevents" in the name: neither this reader nor TensorBoard (which reads
                // every file whose name holds it) may take a leftover of a crash for the log.
                let tmp = path.with_file_name(".vq-event-log.rewrite");
                let rewrite = || -> Result<()> {
                    let mut w = BufWriter::new(
                        File::create(&tmp)
                            .with_context(|| format!("creating {}", tmp.display()))?,
                    );
                    for e in &kept {
                        vq_data::tfrecord::write_record(&mut w, &e.encode_to_vec())?;
                    }
                    w.flush()?;
                    w.get_ref().sync_all()?;
                    fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))
                };
                if let Err(e) = rewrite() {
                    // The log keeps its damaged form; nothing half-written stays beside it.
                    let _ = fs::remove_file(&tmp);
                    return Err(e.context(format!("rewriting {}", path.display())));
                }
                path
            }
            None => {
                let secs = now() as u64;
                let path = run.join(format!("events.out.tfevents.{secs}.{}", host()));
                let mut w = BufWriter::new(
                    File::create(&path).with_context(|| format!("creating {}", path.display()))?,
                );
                let version = Event {
                    wall_time: now(),
                    step: 0,
                    what: Some(What::FileVersion("brain.Event:2".into())),
                };
                vq_data::tfrecord::write_record(&mut w, &version.encode_to_vec())?;
                w.flush()?;
                path
            }
        };
        Self::append(path)
    }

    fn append(path: PathBuf) -> Result<Self> {
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            file: BufWriter::new(file),
            path,
        })
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, step: usize, value: Vec<Value>) -> Result<()> {
        let event = Event {
            wall_time: now(),
            step: i64::try_from(step).unwrap_or(i64::MAX),
            what: Some(What::Summary(Summary { value })),
        };
        vq_data::tfrecord::write_record(&mut self.file, &event.encode_to_vec())
            .and_then(|()| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// One event holding every `(tag, value)` at `step` (non-finite values are kept: TensorBoard
    /// shows them as such).
    ///
    /// # Errors
    /// Write errors.
    pub fn scalars(&mut self, step: usize, values: &[(&str, f64)]) -> Result<()> {
        let value = values
            .iter()
            .map(|&(tag, v)| Value {
                tag: tag.into(),
                metadata: None,
                kind: Some(Kind::SimpleValue(v as f32)),
            })
            .collect();
        self.write(step, value)
    }

    /// A PNG image (`height × width`, `channels` 1, 3 or 4) under `tag`.
    ///
    /// # Errors
    /// Write errors.
    pub fn image(
        &mut self,
        step: usize,
        tag: &str,
        png: Vec<u8>,
        (height, width, channels): (u32, u32, u8),
    ) -> Result<()> {
        let image = Image {
            height: i32::try_from(height).unwrap_or(i32::MAX),
            width: i32::try_from(width).unwrap_or(i32::MAX),
            colorspace: i32::from(channels),
            encoded_image_string: png,
        };
        self.write(
            step,
            vec![Value {
                tag: tag.into(),
                metadata: None,
                kind: Some(Kind::Image(image)),
            }],
        )
    }

    /// A text summary (markdown, shown by TensorBoard's text plugin) under `tag`.
    ///
    /// # Errors
    /// Write errors.
    pub fn text(&mut self, step: usize, tag: &str, text: &str) -> Result<()> {
        let tensor = TensorProto {
            dtype: 7,
            tensor_shape: Some(TensorShapeProto {}),
            string_val: vec![text.as_bytes().to_vec()],
        };
        self.write(
            step,
            vec![Value {
                tag: tag.into(),
                metadata: Some(SummaryMetadata {
                    plugin_data: Some(PluginData {
                        plugin_name: "text".into(),
                    }),
                }),
                kind: Some(Kind::Tensor(tensor)),
            }],
        )
    }
}

/// The evaluation's scalars of one split under `prefix` (`val` or `train_eval`); the
/// perceptual metrics only when their weights were given.
pub fn eval_scalars(prefix: &str, m: &crate::eval::EvalMetrics) -> Vec<(String, f64)> {
    let mut v = vec![
        ("rec_mse", m.rec_mse),
        ("rec_l1", m.rec_l1),
        ("usage", m.usage),
        ("usage_total", m.usage_total),
        ("perplexity", m.perplexity),
        ("qe", m.quantization_error),
        ("relative_qe", m.relative_quantization_error),
    ];
    for (name, x) in [("lpips", m.lpips), ("rfid", m.rfid), ("ris", m.ris)] {
        if let Some(x) = x {
            v.push((name, x));
        }
    }
    v.into_iter()
        .map(|(n, x)| (format!("{prefix}/{n}"), x))
        .collect()
}

/// The tags an evaluation writes (so that evaluating again replaces them).
pub fn is_eval_tag(tag: &str) -> bool {
    tag.starts_with("val/") || tag.starts_with("train_eval/") || tag == "reconstructions"
}

/// The scalar values of an event, by tag (tests and tools).
pub fn scalars_of(event: &Event) -> Vec<(String, f32)> {
    match &event.what {
        Some(What::Summary(s)) => s
            .value
            .iter()
            .filter_map(|v| match v.kind {
                Some(Kind::SimpleValue(x)) => Some((v.tag.clone(), x)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vq-tb-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn events_round_trip_and_a_resume_drops_the_steps_past_the_checkpoint() {
        let run = scratch("resume");
        let mut w = EventWriter::open(&run, 0).unwrap();
        let name = w.path().file_name().unwrap().to_str().unwrap().to_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        w.text(0, "config", "{\"seed\": 1}").unwrap();
        for step in [2, 4, 6] {
            w.scalars(step, &[("train/rec", step as f64 / 10.0), ("lr", 1e-3)])
                .unwrap();
        }
        w.image(6, "reconstructions", vec![1, 2, 3], (2, 3, 3))
            .unwrap();
        drop(w);
        let events = read_events(&event_file(&run).unwrap().unwrap()).unwrap();
        assert_eq!(events.len(), 6);
        assert_eq!(
            events[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
        assert_eq!(
            scalars_of(&events[2]),
            vec![("train/rec".to_owned(), 0.2), ("lr".to_owned(), 1e-3)]
        );
        // Resumed from step 4's checkpoint: steps 5.. go, and come again.
        let mut w = EventWriter::open(&run, 4).unwrap();
        w.scalars(6, &[("train/rec", 0.5)]).unwrap();
        drop(w);
        let events = read_events(&event_file(&run).unwrap().unwrap()).unwrap();
        let steps: Vec<i64> = events.iter().map(|e| e.step).collect();
        assert_eq!(steps, [0, 0, 2, 4, 6]);
        assert_eq!(scalars_of(&events[4]), vec![("train/rec".to_owned(), 0.5)]);
        // A damaged record is an error naming the file.
        let path = event_file(&run).unwrap().unwrap();
        let bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        let mut damaged = bytes.clone();
        damaged[n - 6] ^= 0xff;
        fs::write(&path, &damaged).unwrap();
        let err = format!("{:#}", read_events(&path).unwrap_err());
        assert!(err.contains("events.out.tfevents."), "{err}");
        // Killed while writing (the last record cut short): a resume keeps the good records.
        fs::write(&path, &bytes[..n - 9]).unwrap();
        let mut w = EventWriter::open(&run, 4).unwrap();
        w.scalars(5, &[("train/rec", 0.4)]).unwrap();
        drop(w);
        let steps: Vec<i64> = read_events(&path).unwrap().iter().map(|e| e.step).collect();
        assert_eq!(steps, [0, 0, 2, 4, 5]);
        fs::remove_dir_all(run).unwrap();
    }
}
