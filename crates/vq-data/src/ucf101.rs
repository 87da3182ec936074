//! UCF-101 (Soomro et al. 2012): 13,320 AVI clips of 101 actions, read as fixed-length
//! clips the way VideoGPT (whose loaders the paper reuses) reads them: every window of
//! `frames` consecutive frames (optionally every `stride`-th frame) of every video of a split
//! list, each frame resized so its shorter side is `size` (bilinear, half-pixel, no antialias;
//! the longer side rounded up) and centre-cropped to `size × size`.
//!
//! Videos are decoded by the `ffmpeg` program (a system dependency; `cargo xtask setup`
//! provides one when none is installed). Indexing decodes each video once to count its frames
//! and caches the counts in a file, so a video is never decoded twice to index it; a sample then
//! decodes only up to the end of its window.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ndarray::{Array3, Array4, Axis};
use rand::rngs::StdRng;

use crate::error::{DataError, LeftOut, Result};
use crate::loader::Dataset;
use crate::transform::{Filter, resample_u8};

/// The `ffmpeg` program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ffmpeg {
    program: PathBuf,
}

impl Ffmpeg {
    /// The program named by the environment variable `VQ_FFMPEG` when the user sets it (then
    /// that one or an error: a path that does not work never falls back to another program);
    /// else the one `cargo xtask setup` links into `.tools/bin/` (cargo passes its path as
    /// `VQ_FFMPEG_DEFAULT`) when it exists; else `ffmpeg` on the `PATH`. Checked as
    /// [`Ffmpeg::at`] checks it.
    ///
    /// # Errors
    /// [`DataError::Tool`] naming the program and saying how to install one.
    pub fn locate() -> Result<Self> {
        let var = |k| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Self::locate_from(var("VQ_FFMPEG"), var("VQ_FFMPEG_DEFAULT"))
    }

    /// [`Ffmpeg::locate`] with the two variables' values given.
    fn locate_from(user: Option<PathBuf>, default: Option<PathBuf>) -> Result<Self> {
        if let Some(user) = user {
            return Self::at(&user).map_err(|e| match e {
                DataError::Tool { program, why } => DataError::Tool {
                    program,
                    why: format!("set by VQ_FFMPEG, {why}"),
                },
                other => other,
            });
        }
        let candidate = default
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("ffmpeg"));
        Self::at(&candidate)
    }

    /// A specific binary, checked by decoding one generated frame (`-f lavfi -i testsrc`, raw
    /// RGB): a program that does not run, is not ffmpeg, or produces no frames (say
    /// `/bin/true`) is refused here, not blamed on the videos later.
    ///
    /// # Errors
    /// [`DataError::Tool`] naming the program, what went wrong and how to install one.
    pub fn at(program: &Path) -> Result<Self> {
        const SIDE: usize = 8;
        let out = Command::new(program)
            .args(["-nostdin", "-v", "error", "-f", "lavfi", "-i"])
            .arg(format!("testsrc=size={SIDE}x{SIDE}:rate=1"))
            .args(["-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
            .stdin(Stdio::null())
            .output();
        let problem = match out {
            Err(e) => Some(format!("does not run ({e})")),
            Ok(o) if !o.status.success() => Some(format!(
                "fails to decode a test frame ({}: {})",
                o.status,
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("no message")
            )),
            Ok(o) if o.stdout.len() != SIDE * SIDE * 3 => Some(format!(
                "is not a working ffmpeg: asked for one {SIDE}×{SIDE} RGB test frame \
                 ({} bytes), it wrote {} bytes",
                SIDE * SIDE * 3,
                o.stdout.len()
            )),
            Ok(_) => None,
        };
        if let Some(problem) = problem {
            return Err(DataError::Tool {
                program: program.to_path_buf(),
                why: format!(
                    "{problem}. UCF-101 needs the ffmpeg program (5.1 or newer): install it \
                     (e.g. `apt-get install ffmpeg`), run `cargo xtask setup` (which installs a \
                     static build from PyPI's imageio-ffmpeg into .tools/ when none is found), \
                     or set VQ_FFMPEG to its path"
                ),
            });
        }
        Ok(Self {
            program: program.to_path_buf(),
        })
    }

    /// The program's path.
    pub fn program(&self) -> &Path {
        &self.program
    }

    fn run(&self, video: &Path, args: &[&str]) -> Result<Vec<u8>> {
        if !video.is_file() {
            return Err(DataError::Io {
                path: video.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such video file"),
            });
        }
        let mut child = Command::new(&self.program)
            .args(["-nostdin", "-v", "error", "-i"])
            .arg(video)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| DataError::Tool {
                program: self.program.clone(),
                why: e.to_string(),
            })?;
        let mut out = Vec::new();
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let err_thread = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let read = stdout.read_to_end(&mut out);
        let status = child.wait();
        let err = err_thread.join().unwrap_or_default();
        let failed = |why: String| DataError::Decode {
            path: video.to_path_buf(),
            why,
        };
        read.map_err(|e| failed(format!("reading ffmpeg's output: {e}")))?;
        match status {
            Ok(s) if s.success() => Ok(out),
            Ok(s) => Err(failed(format!(
                "ffmpeg exited with {s}: {}",
                err.lines().last().unwrap_or("no message")
            ))),
            Err(e) => Err(failed(format!("waiting for ffmpeg: {e}"))),
        }
    }

    /// Number of video frames, decoding the first video stream once.
    ///
    /// # Errors
    /// [`DataError::Decode`] for a file ffmpeg cannot read or that has no video frames.
    pub fn count_frames(&self, video: &Path) -> Result<usize> {
        let out = self.run(
            video,
            &[
                "-map",
                "0:v:0",
                "-f",
                "null",
                "-progress",
                "pipe:1",
                "-nostats",
                "-",
            ],
        )?;
        let text = String::from_utf8_lossy(&out);
        let n = text
            .lines()
            .filter_map(|l| l.strip_prefix("frame="))
            .filter_map(|v| v.trim().parse::<usize>().ok())
            .next_back()
            .unwrap_or(0);
        if n == 0 {
            return Err(DataError::Decode {
                path: video.to_path_buf(),
                why: "no video frames".into(),
            });
        }
        Ok(n)
    }

    /// Frames `first, first + stride, …` (`count` of them) as RGB `(count, H, W, 3)` at the
    /// video's own size; decoding stops after the last one.
    ///
    /// # Errors
    /// [`DataError::Decode`] if ffmpeg fails or returns fewer frames.
    pub fn decode(
        &self,
        video: &Path,
        first: usize,
        count: usize,
        stride: usize,
    ) -> Result<Array4<u8>> {
        let last = first + (count - 1) * stride;
        let select = format!("select=between(n\\,{first}\\,{last})*not(mod(n-{first}\\,{stride}))");
        let out = self.run(
            video,
            &[
                "-map",
                "0:v:0",
                "-vf",
                &select,
                "-fps_mode",
                "passthrough",
                "-frames:v",
                &count.to_string(),
                "-f",
                "image2pipe",
                "-c:v",
                "ppm",
                "-",
            ],
        )?;
        let bad = |why: String| DataError::Decode {
            path: video.to_path_buf(),
            why,
        };
        let mut frames = Vec::with_capacity(count);
        let mut rest = out.as_slice();
        while !rest.is_empty() {
            let (frame, tail) = parse_ppm(rest).map_err(|w| bad(format!("ffmpeg output: {w}")))?;
            frames.push(frame);
            rest = tail;
        }
        if frames.len() != count {
            return Err(bad(format!(
                "asked for {count} frames from frame {first} (stride {stride}), ffmpeg gave {}",
                frames.len()
            )));
        }
        let views: Vec<_> = frames.iter().map(|f| f.view()).collect();
        ndarray::stack(Axis(0), &views).map_err(|e| bad(format!("frames of different sizes: {e}")))
    }
}

/// One binary PPM (`P6 W H 255\n` + W·H·3 bytes) from the front of `bytes`.
fn parse_ppm(bytes: &[u8]) -> std::result::Result<(Array3<u8>, &[u8]), String> {
    let mut fields = Vec::with_capacity(4);
    let mut at = 0;
    while fields.len() < 4 {
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        let start = at;
        while at < bytes.len() && !bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        if start == at {
            return Err("truncated PPM header".into());
        }
        fields.push(String::from_utf8_lossy(&bytes[start..at]).into_owned());
    }
    at += 1; // the single whitespace after the maximum value
    let num = |s: &str| {
        s.parse::<usize>()
            .map_err(|_| format!("bad PPM header field {s:?}"))
    };
    if fields[0] != "P6" || num(&fields[3])? != 255 {
        return Err(format!("not an 8-bit binary PPM: {fields:?}"));
    }
    let (w, h) = (num(&fields[1])?, num(&fields[2])?);
    let n = w * h * 3;
    if bytes.len() < at + n {
        return Err(format!("truncated {w}×{h} frame"));
    }
    let frame =
        Array3::from_shape_vec((h, w, 3), bytes[at..at + n].to_vec()).map_err(|e| e.to_string())?;
    Ok((frame, &bytes[at + n..]))
}

/// Which split list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UcfSplit {
    /// `trainlist0{fold}.txt`.
    Train,
    /// `testlist0{fold}.txt`.
    Test,
}

/// How clips are cut from videos.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClipSpec {
    /// Frames per clip (16 in the paper).
    pub frames: usize,
    /// Take every `stride`-th frame inside a clip (TATS' `sample_every_n_frames`; 1 in the paper).
    pub stride: usize,
    /// Frames between the starts of consecutive clips (torchvision's `frames_between_clips`;
    /// 1 in VideoGPT, so every window is a clip).
    pub step: usize,
    /// Output side (128 in the paper).
    pub size: usize,
}

impl ClipSpec {
    /// The paper's UCF-101 clips: 16 consecutive frames at 128 × 128, every window.
    pub const PAPER: Self = Self {
        frames: 16,
        stride: 1,
        step: 1,
        size: 128,
    };
}

/// One video of the split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Video {
    /// The file.
    pub path: PathBuf,
    /// Class index (0-based, `classInd.txt` order).
    pub label: u32,
    /// Decoded frame count.
    pub frames: usize,
}

/// UCF-101 clips with random access (one clip per sample).
#[derive(Debug, Clone)]
pub struct Ucf101 {
    videos: Vec<Video>,
    classes: Vec<String>,
    /// `(video, first frame)` of each clip.
    clips: Vec<(u32, u32)>,
    spec: ClipSpec,
    ffmpeg: Ffmpeg,
    left_out: Vec<LeftOut>,
}

/// A text file without its UTF-8 byte-order mark.
fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(t) => t.to_owned(),
        None => text,
    })
}

impl Ucf101 {
    /// Indexes split `fold` (1–3) of the videos under `root` (the extracted `UCF-101/` with a
    /// folder per class, or the flat folder of the zip mirror; file names are matched without
    /// regard to case, which absorbs the `HandstandPushups`/`HandStandPushups` spelling), with
    /// the lists in `lists` (`classInd.txt`, `trainlist0N.txt`, `testlist0N.txt`).
    /// Frame counts are read from `cache` (lines `path<TAB>frames<TAB>size<TAB>mtime_ns`; by
    /// default `root/vq-frame-counts.tsv`, or, when `root` is read-only,
    /// `vq/ucf101-frame-counts-<hash>.tsv` in `$XDG_CACHE_HOME` or `~/.cache`); videos not in it,
    /// or changed since (size or time), are counted in parallel and the cache saved as they
    /// are. A video that cannot be read is left out ([`Ucf101::left_out`]).
    ///
    /// # Errors
    /// Missing list files or videos (named), a malformed list line (named by number), a broken
    /// `ffmpeg`, no readable video, a cache that cannot be written, invalid `spec`, or no
    /// clips.
    pub fn open(
        root: &Path,
        lists: &Path,
        fold: usize,
        split: UcfSplit,
        spec: ClipSpec,
        cache: Option<&Path>,
        ffmpeg: Ffmpeg,
    ) -> Result<Self> {
        if !(1..=3).contains(&fold) {
            return Err(DataError::Config(format!(
                "UCF-101 has folds 1–3, not {fold}"
            )));
        }
        if spec.frames == 0 || spec.stride == 0 || spec.step == 0 || spec.size == 0 {
            return Err(DataError::Config(format!(
                "clip spec with a zero: {spec:?}"
            )));
        }
        let class_file = lists.join("classInd.txt");
        let mut classes = Vec::new();
        for (i, line) in read_text(&class_file)?.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let name = line
                .split_whitespace()
                .nth(1)
                .ok_or_else(|| DataError::BadLine {
                    path: class_file.clone(),
                    line: i + 1,
                    why: "expected `<index> <class>`".into(),
                })?;
            classes.push(name.to_owned());
        }
        let list = lists.join(match split {
            UcfSplit::Train => format!("trainlist0{fold}.txt"),
            UcfSplit::Test => format!("testlist0{fold}.txt"),
        });
        // Every video under root by lower-case file name.
        let mut files = HashMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            let entries = std::fs::read_dir(&d).map_err(|source| DataError::Io {
                path: d.clone(),
                source,
            })?;
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Some(n) = p.file_name() {
                    files.insert(n.to_string_lossy().to_lowercase(), p);
                }
            }
        }
        let mut wanted = Vec::new();
        for (i, line) in read_text(&list)?.lines().enumerate() {
            let entry = line.split_whitespace().next().unwrap_or("");
            if entry.is_empty() {
                continue;
            }
            let bad = |why: String| DataError::BadLine {
                path: list.clone(),
                line: i + 1,
                why,
            };
            let (class, file) = entry
                .rsplit_once('/')
                .ok_or_else(|| bad(format!("{entry:?} is not <Class>/<file>")))?;
            let label = classes
                .iter()
                .position(|c| c.eq_ignore_ascii_case(class))
                .ok_or_else(|| bad(format!("class {class:?} is not in classInd.txt")))?;
            let path = files
                .get(&file.to_lowercase())
                .ok_or_else(|| bad(format!("{file} not found under {}", root.display())))?;
            wanted.push((path.clone(), label as u32));
        }
        if wanted.is_empty() {
            return Err(DataError::Empty {
                path: list,
                what: "videos in the split list",
            });
        }
        let mut cache = CountCache::open(root, cache)?;
        let (counts, left_out) =
            frame_counts(&ffmpeg, &mut cache, wanted.iter().map(|w| w.0.as_path()))?;
        if counts.is_empty()
            && let Some(first) = left_out.first()
        {
            return Err(DataError::Invalid {
                path: list,
                why: format!(
                    "none of the {} videos of the list can be read; the first: {first}",
                    left_out.len()
                ),
            });
        }
        // A video shorter than one clip gives no sample: left out and said, not dropped.
        let span = (spec.frames - 1) * spec.stride + 1;
        let mut left_out = left_out;
        let videos: Vec<Video> = wanted
            .into_iter()
            .filter_map(|(path, label)| {
                let frames = *counts.get(&path)?;
                if frames < span {
                    left_out.push(LeftOut {
                        why: format!(
                            "{}: {frames} frames, fewer than one clip ({} frames {} apart span {span})",
                            path.display(),
                            spec.frames,
                            spec.stride
                        ),
                        path,
                    });
                    return None;
                }
                Some(Video {
                    path,
                    label,
                    frames,
                })
            })
            .collect();
        let mut clips = Vec::new();
        for (v, video) in videos.iter().enumerate() {
            let mut start = 0;
            while start + span <= video.frames {
                clips.push((v as u32, start as u32));
                start += spec.step;
            }
        }
        if clips.is_empty() {
            return Err(DataError::Empty {
                path: root.to_path_buf(),
                what: "video long enough for one clip",
            });
        }
        Ok(Self {
            videos,
            classes,
            clips,
            spec,
            ffmpeg,
            left_out,
        })
    }

    /// Videos of the list left out because they could not be read or their frames counted,
    /// each with its error.
    pub fn left_out(&self) -> &[LeftOut] {
        &self.left_out
    }

    /// The videos of the split, in list order.
    pub fn videos(&self) -> &[Video] {
        &self.videos
    }

    /// Class names in `classInd.txt` order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// `(video index, first frame)` of clip `index`.
    pub fn clip(&self, index: usize) -> (usize, usize) {
        let (v, s) = self.clips[index];
        (v as usize, s as usize)
    }
}

/// A file's size and modification time: a cached frame count is used only while both match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: u128,
}

impl Stamp {
    fn of(path: &Path) -> Result<Self> {
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        let mtime_ns = meta
            .modified()
            .map_err(io)?
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ok(Self {
            size: meta.len(),
            mtime_ns,
        })
    }
}

/// The frame-count cache: lines `path<TAB>frames<TAB>size<TAB>mtime_ns`, paths relative to the
/// dataset root. A line whose file has since changed size or time (a replaced video), or a line
/// of another form (an older two-column cache), is counted again.
#[derive(Debug)]
struct CountCache {
    root: PathBuf,
    /// Where it is written: the first that accepts the file (the dataset folder may be
    /// read-only).
    targets: Vec<PathBuf>,
    entries: HashMap<String, (usize, Stamp)>,
}

/// Videos counted between two saves of the cache, per thread: an interrupted indexing keeps
/// what it counted.
const COUNTS_PER_SAVE: usize = 16;

impl CountCache {
    /// `explicit`, or `root/vq-frame-counts.tsv` then the user cache folder
    /// (`$XDG_CACHE_HOME` or `~/.cache`, `vq/ucf101-frame-counts-<hash of root>.tsv`); every
    /// one of them that exists is read.
    fn open(root: &Path, explicit: Option<&Path>) -> Result<Self> {
        Self::open_in(root, explicit, user_cache_dir())
    }

    /// [`CountCache::open`] with the user cache folder given.
    fn open_in(root: &Path, explicit: Option<&Path>, user_cache: Option<PathBuf>) -> Result<Self> {
        let targets = match explicit {
            Some(p) => vec![p.to_path_buf()],
            None => {
                let mut t = vec![root.join("vq-frame-counts.tsv")];
                t.extend(user_cache.map(|d| {
                    let key = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
                    d.join("vq").join(format!(
                        "ucf101-frame-counts-{:016x}.tsv",
                        fnv1a(key.to_string_lossy().as_bytes())
                    ))
                }));
                t
            }
        };
        let mut entries = HashMap::new();
        for path in targets.iter().rev().filter(|p| p.is_file()) {
            for line in read_text(path)?.lines() {
                let f: Vec<&str> = line.split('\t').collect();
                if let [p, n, size, mtime] = f[..]
                    && let (Ok(n), Ok(size), Ok(mtime_ns)) =
                        (n.parse(), size.parse(), mtime.parse())
                {
                    entries.insert(p.to_owned(), (n, Stamp { size, mtime_ns }));
                }
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            targets,
            entries,
        })
    }

    fn key(&self, video: &Path) -> String {
        video
            .strip_prefix(&self.root)
            .unwrap_or(video)
            .to_string_lossy()
            .into_owned()
    }

    fn get(&self, video: &Path, stamp: Stamp) -> Option<usize> {
        self.entries
            .get(&self.key(video))
            .filter(|(_, s)| *s == stamp)
            .map(|(n, _)| *n)
    }

    fn insert(&mut self, video: &Path, frames: usize, stamp: Stamp) {
        self.entries.insert(self.key(video), (frames, stamp));
    }

    /// Rewrites the cache atomically (a temporary file renamed over it) at the first target
    /// that accepts it.
    fn save(&mut self) -> Result<()> {
        let mut lines: Vec<String> = self
            .entries
            .iter()
            .filter(|(p, _)| !p.contains(['\t', '\n']))
            .map(|(p, (n, s))| format!("{p}\t{n}\t{}\t{}", s.size, s.mtime_ns))
            .collect();
        lines.sort();
        let text = lines.join("\n") + "\n";
        let mut last = None;
        while let Some(target) = self.targets.first().cloned() {
            let tmp = target.with_extension(format!("tsv.{}.tmp", std::process::id()));
            let written = target
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&tmp, &text))
                .and_then(|()| std::fs::rename(&tmp, &target));
            match written {
                Ok(()) => return Ok(()),
                Err(source) => {
                    let _ = std::fs::remove_file(&tmp);
                    last = Some(DataError::Io {
                        path: target,
                        source,
                    });
                    if self.targets.len() == 1 {
                        break;
                    }
                    self.targets.remove(0);
                }
            }
        }
        Err(last.expect("at least one target"))
    }
}

/// The user's cache folder: `$XDG_CACHE_HOME`, else `~/.cache`.
fn user_cache_dir() -> Option<PathBuf> {
    let var = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache")))
}

/// 64-bit FNV-1a: a name for a folder's cache file that does not change between builds.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Frame counts of `videos`, from the cache where it is current; the others are counted (in
/// parallel) and the cache saved after every few. A video that cannot be read or counted is
/// left out (returned with its error); a broken `ffmpeg` program is an error.
fn frame_counts<'a>(
    ffmpeg: &Ffmpeg,
    cache: &mut CountCache,
    videos: impl Iterator<Item = &'a Path>,
) -> Result<(HashMap<PathBuf, usize>, Vec<LeftOut>)> {
    use rayon::prelude::*;
    let (mut counts, mut left_out, mut todo) = (HashMap::new(), Vec::new(), Vec::new());
    let mut seen = std::collections::HashSet::new();
    for v in videos.filter(|v| seen.insert(*v)) {
        match Stamp::of(v) {
            Err(e) => left_out.push(LeftOut::new(v, &e)),
            Ok(stamp) => match cache.get(v, stamp) {
                Some(n) => drop(counts.insert(v.to_path_buf(), n)),
                None => todo.push((v, stamp)),
            },
        }
    }
    let per_save = COUNTS_PER_SAVE * rayon::current_num_threads();
    for chunk in todo.chunks(per_save) {
        let counted: Vec<Result<usize>> = chunk
            .par_iter()
            .map(|(v, _)| ffmpeg.count_frames(v))
            .collect();
        for (&(v, stamp), n) in chunk.iter().zip(counted) {
            match n {
                Ok(n) => {
                    cache.insert(v, n, stamp);
                    counts.insert(v.to_path_buf(), n);
                }
                Err(e @ DataError::Tool { .. }) => return Err(e),
                Err(e) => left_out.push(LeftOut::new(v, &e)),
            }
        }
        cache.save()?;
    }
    Ok((counts, left_out))
}

/// VideoGPT's frame preprocessing: shorter side to `size` (longer side `⌈·⌉`), bilinear without
/// antialias, centre crop `⌊(L − size)/2⌋`. `frames` is `(T, H, W, 3)`; returns `(3, T, size, size)`.
pub fn resize_center_crop(frames: &Array4<u8>, size: usize) -> Array4<u8> {
    let (t, h, w, _) = frames.dim();
    let scale = size as f64 / h.min(w) as f64;
    let (nh, nw) = if h < w {
        (size, ((w as f64 * scale).ceil() as usize).max(size))
    } else {
        (((h as f64 * scale).ceil() as usize).max(size), size)
    };
    let (top, left) = ((nh - size) / 2, (nw - size) / 2);
    let mut out = Array4::<u8>::zeros((3, t, size, size));
    for (k, frame) in frames.axis_iter(Axis(0)).enumerate() {
        let r = resample_u8(
            frame,
            (0, 0, h, w),
            (nh, nw),
            (top, left, size, size),
            Filter::Bilinear,
        );
        for c in 0..3 {
            out.index_axis_mut(Axis(0), c)
                .index_axis_mut(Axis(0), k)
                .assign(&r.index_axis(Axis(2), c));
        }
    }
    out
}

impl Dataset for Ucf101 {
    /// `((3, frames, size, size), label)`.
    type Sample = (Array4<u8>, u32);

    fn len(&self) -> usize {
        self.clips.len()
    }

    fn get(&self, index: usize, _rng: &mut StdRng) -> Result<Self::Sample> {
        let (v, start) = self.clip(index);
        let video = &self.videos[v];
        let raw = self
            .ffmpeg
            .decode(&video.path, start, self.spec.frames, self.spec.stride)?;
        Ok((resize_center_crop(&raw, self.spec.size), video.label))
    }

    fn name(&self, index: usize) -> String {
        let (v, start) = self.clip(index);
        format!("{} (frame {start})", self.videos[v].path.display())
    }

    fn left_out(&self) -> &[LeftOut] {
        &self.left_out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::resample;
    use rand::SeedableRng;

    #[test]
    fn ppm_frames_parse_and_truncation_is_caught() {
        let mut bytes = b"P6\n2 1\n255\n".to_vec();
        bytes.extend([1, 2, 3, 4, 5, 6]);
        bytes.extend(b"P6 1 1 255\n\x07\x08\x09");
        let (a, rest) = parse_ppm(&bytes).unwrap();
        assert_eq!(a.dim(), (1, 2, 3));
        assert_eq!(a[[0, 1, 2]], 6);
        let (b, rest) = parse_ppm(rest).unwrap();
        assert_eq!((b[[0, 0, 0]], rest.len()), (7, 0));
        assert!(parse_ppm(&bytes[..12]).is_err());
        assert!(parse_ppm(b"P5 1 1 255\n\x00").is_err());
    }

    #[test]
    fn frames_resize_like_videogpt() {
        // 240×320 → 128×171, crop x from 21.
        let frames = Array4::from_shape_fn((2, 240, 320, 3), |(t, y, x, c)| {
            ((x + y + t + c) % 256) as u8
        });
        let out = resize_center_crop(&frames, 128);
        assert_eq!(out.dim(), (3, 2, 128, 128));
        let f = frames.index_axis(Axis(0), 1).mapv(f32::from);
        let full = resample(
            f.view(),
            (0, 0, 240, 320),
            (128, 171),
            (0, 0, 128, 171),
            Filter::Bilinear,
        );
        assert_eq!(out[[2, 1, 5, 0]], full[[5, 21, 2]].round() as u8);
    }

    /// Videos made by ffmpeg itself (skipped with a message where no ffmpeg is installed).
    #[test]
    fn clips_are_indexed_once_and_decoded_exactly() {
        let Ok(ff) = Ffmpeg::locate() else {
            eprintln!("skipping: no ffmpeg (run `cargo xtask setup`)");
            return;
        };
        let dir = std::env::temp_dir().join(format!("ucf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("UCF-101");
        let make = |folder: &Path, file: &str, n: usize| {
            std::fs::create_dir_all(folder).unwrap();
            let status = Command::new(ff.program())
                .args([
                    "-v",
                    "error",
                    "-f",
                    "lavfi",
                    "-i",
                    "testsrc=size=80x60:rate=25",
                ])
                .args([
                    "-frames:v",
                    &n.to_string(),
                    "-c:v",
                    "mpeg4",
                    "-vtag",
                    "XVID",
                    "-y",
                ])
                .arg(folder.join(file))
                .status()
                .unwrap();
            assert!(status.success());
        };
        let (class_a, file_a) = ("ApplyEyeMakeup", "v_ApplyEyeMakeup_g01_c01.avi");
        make(&root.join(class_a), file_a, 20);
        make(
            &root.join("HandstandPushups"),
            "v_HandstandPushups_g01_c01.avi",
            18,
        );
        make(
            &root.join("HandstandPushups"),
            "v_HandstandPushups_g08_c01.avi",
            12,
        );
        let lists = dir.join("ucfTrainTestlist");
        std::fs::create_dir_all(&lists).unwrap();
        std::fs::write(
            lists.join("classInd.txt"),
            "\u{feff}1 ApplyEyeMakeup\r\n2 HandstandPushups\r\n",
        )
        .unwrap();
        // Shorter than one clip (span 7 below): left out and said.
        make(&root.join(class_a), "v_ApplyEyeMakeup_g02_c01.avi", 5);
        std::fs::write(
            lists.join("trainlist01.txt"),
            "\u{feff}ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\r\nHandStandPushups/v_HandStandPushups_g01_c01.avi 2\r\nApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi 1\r\n",
        )
        .unwrap();
        std::fs::write(
            lists.join("testlist01.txt"),
            "HandstandPushups/v_HandstandPushups_g08_c01.avi\n",
        )
        .unwrap();
        let spec = ClipSpec {
            frames: 4,
            stride: 2,
            step: 3,
            size: 32,
        };
        let ds = Ucf101::open(&root, &lists, 1, UcfSplit::Train, spec, None, ff.clone()).unwrap();
        assert_eq!(
            ds.videos()
                .iter()
                .map(|v| (v.frames, v.label))
                .collect::<Vec<_>>(),
            [(20, 0), (18, 1)]
        );
        assert_eq!(ds.left_out().len(), 1);
        assert!(
            ds.left_out()[0]
                .why
                .contains("v_ApplyEyeMakeup_g02_c01.avi: 5 frames, fewer than one clip"),
            "{}",
            ds.left_out()[0].why
        );
        // Span 7: starts 0, 3, …, 13 in 20 frames (5 clips) and 0, 3, …, 9 in 18 (4 clips).
        assert_eq!(ds.len(), 9);
        assert_eq!(ds.clip(6), (1, 3));
        // The counts were cached: indexing again runs no ffmpeg (a broken one would fail).
        let cached = std::fs::read_to_string(root.join("vq-frame-counts.tsv")).unwrap();
        assert!(
            cached.contains("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\t20\t"),
            "{cached}"
        );
        let bogus = Ffmpeg {
            program: "/nonexistent/ffmpeg".into(),
        };
        assert_eq!(
            Ucf101::open(&root, &lists, 1, UcfSplit::Train, spec, None, bogus)
                .unwrap()
                .len(),
            9
        );
        // A clip equals the same frames cut from a full decode.
        let (clip, label) = ds.get(6, &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!((clip.dim(), label), ((3, 4, 32, 32), 1));
        let all = ff.decode(&ds.videos()[1].path, 0, 18, 1).unwrap();
        let picked =
            ndarray::stack(Axis(0), &[3, 5, 7, 9].map(|t| all.index_axis(Axis(0), t))).unwrap();
        assert_eq!(clip, resize_center_crop(&picked, 32));
        let test = Ucf101::open(&root, &lists, 1, UcfSplit::Test, spec, None, ff.clone()).unwrap();
        assert_eq!((test.len(), test.videos()[0].label), (2, 1));
        // An unreadable video: a typed error naming it.
        let broken = root.join("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi");
        std::fs::write(&broken, b"RIFF....AVI garbage").unwrap();
        let err = ds.get(0, &mut StdRng::seed_from_u64(0)).unwrap_err();
        assert!(
            matches!(err, DataError::Decode { .. })
                && err.to_string().contains("v_ApplyEyeMakeup_g01_c01.avi"),
            "{err}"
        );
        let err = ff.count_frames(&broken).unwrap_err().to_string();
        assert!(err.contains("v_ApplyEyeMakeup_g01_c01.avi"), "{err}");
        // Indexing again: the changed file is recounted (not its stale count), fails, and is
        // left out; the other video still loads.
        let ds = Ucf101::open(&root, &lists, 1, UcfSplit::Train, spec, None, ff.clone()).unwrap();
        assert_eq!((ds.videos().len(), ds.len()), (1, 4));
        // The broken one and the one shorter than a clip.
        assert_eq!(ds.left_out().len(), 2);
        assert!(
            ds.left_out()
                .iter()
                .any(|l| l.to_string().contains("v_ApplyEyeMakeup_g01_c01.avi"))
        );
        // Replaced by a shorter video: recounted from its new size and time.
        make(&root.join(class_a), file_a, 10);
        let ds = Ucf101::open(&root, &lists, 1, UcfSplit::Train, spec, None, ff.clone()).unwrap();
        assert_eq!(ds.videos()[0].frames, 10);
        // Only the video shorter than a clip is left out now.
        assert_eq!(ds.left_out().len(), 1);
        assert!(ds.left_out()[0].why.contains("fewer than one clip"));
        // A cache elsewhere (a read-only dataset folder): written there, read back there.
        let elsewhere = dir.join("cache/counts.tsv");
        let ds = Ucf101::open(
            &root,
            &lists,
            1,
            UcfSplit::Train,
            spec,
            Some(&elsewhere),
            ff.clone(),
        )
        .unwrap();
        assert_eq!(ds.videos()[0].frames, 10);
        assert!(
            std::fs::read_to_string(&elsewhere)
                .unwrap()
                .contains("\t10\t")
        );
        // No readable video at all: an error naming the first.
        for v in ds.videos() {
            std::fs::write(&v.path, b"garbage").unwrap();
        }
        std::fs::write(
            root.join(class_a).join("v_ApplyEyeMakeup_g02_c01.avi"),
            b"garbage",
        )
        .unwrap();
        let err = Ucf101::open(&root, &lists, 1, UcfSplit::Train, spec, None, ff.clone())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("none of the 3 videos") && err.contains(".avi"),
            "{err}"
        );
        // Missing list file, missing video.
        let err = Ucf101::open(&root, &lists, 2, UcfSplit::Train, spec, None, ff.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains("trainlist02.txt"), "{err}");
        std::fs::write(
            lists.join("testlist01.txt"),
            "ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01.avi\n",
        )
        .unwrap();
        let err = Ucf101::open(&root, &lists, 1, UcfSplit::Test, spec, None, ff)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("v_ApplyEyeMakeup_g09_c01.avi not found") && err.contains("line 1"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn counts_go_to_the_user_cache_when_the_dataset_folder_refuses_them() {
        let dir = std::env::temp_dir().join(format!("ucf-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (root, user) = (dir.join("UCF-101"), dir.join("user-cache"));
        // A folder where the cache file should be: renaming onto it fails, as in a
        // read-only dataset folder (tests may run as root, who writes through permissions).
        std::fs::create_dir_all(root.join("vq-frame-counts.tsv")).unwrap();
        let video = root.join("A/v_A_g01_c01.avi");
        let stamp = Stamp {
            size: 1234,
            mtime_ns: 5678,
        };
        let mut cache = CountCache::open_in(&root, None, Some(user.clone())).unwrap();
        cache.insert(&video, 42, stamp);
        cache.save().unwrap();
        let written: Vec<_> = std::fs::read_dir(user.join("vq")).unwrap().collect();
        assert_eq!(written.len(), 1);
        let again = CountCache::open_in(&root, None, Some(user.clone())).unwrap();
        assert_eq!(again.get(&video, stamp), Some(42));
        // A changed file is not taken from the cache.
        assert_eq!(
            again.get(
                &video,
                Stamp {
                    size: 1235,
                    ..stamp
                }
            ),
            None
        );
        // Nowhere to write: the error names the last place tried.
        let err = CountCache::open_in(&root, None, None)
            .unwrap()
            .save()
            .unwrap_err()
            .to_string();
        assert!(err.contains("vq-frame-counts.tsv"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_program_that_is_not_ffmpeg_is_refused_at_start() {
        // Runs and exits 0 but writes no frames.
        let err = Ffmpeg::at(Path::new("/bin/true")).unwrap_err().to_string();
        assert!(
            err.contains("/bin/true") && err.contains("wrote 0 bytes"),
            "{err}"
        );
    }

    #[test]
    fn a_user_set_program_never_falls_back_to_another() {
        let err = Ffmpeg::locate_from(Some("/nonexistent/ffmpeg".into()), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/ffmpeg") && err.contains("set by VQ_FFMPEG"),
            "{err}"
        );
        // The default is only a default: when its file is missing the PATH is searched.
        let from_path = Ffmpeg::locate_from(None, Some("/nonexistent/ffmpeg".into()));
        if let Ok(ff) = from_path {
            assert_eq!(ff.program(), Path::new("ffmpeg"));
        }
    }

    #[test]
    fn a_missing_program_says_how_to_get_one() {
        let err = Ffmpeg::at(Path::new("/nonexistent/ffmpeg"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cargo xtask setup") && err.contains("/nonexistent/ffmpeg"),
            "{err}"
        );
    }
}
