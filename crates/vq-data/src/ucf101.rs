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

use crate::error::{DataError, Result};
use crate::loader::Dataset;
use crate::transform::{Filter, resample_u8};

/// The `ffmpeg` program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ffmpeg {
    program: PathBuf,
}

impl Ffmpeg {
    /// The program named by the environment variable `VQ_FFMPEG` if it exists (cargo sets it to
    /// the one `cargo xtask setup` links into `.tools/bin/`), else `ffmpeg` on the `PATH`;
    /// checked by running `ffmpeg -version`.
    ///
    /// # Errors
    /// [`DataError::Tool`] saying how to install it.
    pub fn locate() -> Result<Self> {
        let candidate = std::env::var_os("VQ_FFMPEG")
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("ffmpeg"));
        Self::at(&candidate)
    }

    /// A specific binary.
    ///
    /// # Errors
    /// [`DataError::Tool`] if it does not run.
    pub fn at(program: &Path) -> Result<Self> {
        let ok = Command::new(program)
            .arg("-version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(DataError::Tool {
                program: program.to_path_buf(),
                why: "does not run. UCF-101 needs the ffmpeg program (5.1 or newer): install it \
                      (e.g. `apt-get install ffmpeg`), run `cargo xtask setup` (which installs a \
                      static build from PyPI's imageio-ffmpeg into .tools/ when none is found), \
                      or set VQ_FFMPEG to its path"
                    .into(),
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
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl Ucf101 {
    /// Indexes split `fold` (1–3) of the videos under `root` (the extracted `UCF-101/` with a
    /// folder per class, or the flat folder of the zip mirror; file names are matched without
    /// regard to case, which absorbs the `HandstandPushups`/`HandStandPushups` spelling), with
    /// the lists in `lists` (`classInd.txt`, `trainlist0N.txt`, `testlist0N.txt`).
    /// Frame counts are read from `cache` (a `path<TAB>frames` file, default
    /// `root/vq-frame-counts.tsv`) and the missing ones counted (in parallel) and added to it.
    ///
    /// # Errors
    /// Missing list files or videos (named), unreadable videos, invalid `spec`, or no clips.
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
                .ok_or_else(|| DataError::BadRecord {
                    path: class_file.clone(),
                    offset: i as u64 + 1,
                    why: format!("line {}: expected `<index> <class>`", i + 1),
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
            let bad = |why: String| DataError::BadRecord {
                path: list.clone(),
                offset: i as u64 + 1,
                why: format!("line {}: {why}", i + 1),
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
        let cache = cache.map_or_else(|| root.join("vq-frame-counts.tsv"), Path::to_path_buf);
        let counts = frame_counts(&ffmpeg, root, &cache, wanted.iter().map(|w| w.0.as_path()))?;
        let videos: Vec<Video> = wanted
            .into_iter()
            .map(|(path, label)| {
                let frames = counts[&path];
                Video {
                    path,
                    label,
                    frames,
                }
            })
            .collect();
        let span = (spec.frames - 1) * spec.stride + 1;
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
        })
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

/// Frame counts of `videos`, from `cache` where known; the others are counted (in parallel)
/// and the cache rewritten atomically.
fn frame_counts<'a>(
    ffmpeg: &Ffmpeg,
    root: &Path,
    cache: &Path,
    videos: impl Iterator<Item = &'a Path>,
) -> Result<HashMap<PathBuf, usize>> {
    let mut known: HashMap<PathBuf, usize> = HashMap::new();
    if cache.is_file() {
        for line in read_text(cache)?.lines() {
            if let Some((p, n)) = line.split_once('\t')
                && let Ok(n) = n.trim().parse()
            {
                known.insert(root.join(p), n);
            }
        }
    }
    let missing: Vec<&Path> = videos.filter(|v| !known.contains_key(*v)).collect();
    if missing.is_empty() {
        return Ok(known);
    }
    use rayon::prelude::*;
    let counted: Vec<(PathBuf, usize)> = missing
        .par_iter()
        .map(|v| ffmpeg.count_frames(v).map(|n| (v.to_path_buf(), n)))
        .collect::<Result<_>>()?;
    known.extend(counted);
    let mut lines: Vec<String> = known
        .iter()
        .map(|(p, n)| format!("{}\t{n}", p.strip_prefix(root).unwrap_or(p).display()))
        .collect();
    lines.sort();
    let tmp = cache.with_extension("tsv.tmp");
    let io = |source| DataError::Io {
        path: cache.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, lines.join("\n") + "\n").map_err(io)?;
    std::fs::rename(&tmp, cache).map_err(io)?;
    Ok(known)
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
        for (class, file, n) in [
            ("ApplyEyeMakeup", "v_ApplyEyeMakeup_g01_c01.avi", 20),
            ("HandstandPushups", "v_HandstandPushups_g01_c01.avi", 18),
            ("HandstandPushups", "v_HandstandPushups_g08_c01.avi", 12),
        ] {
            std::fs::create_dir_all(root.join(class)).unwrap();
            let status = Command::new(ff.program())
                .args([
                    "-v",
                    "error",
                    "-f",
                    "lavfi",
                    "-i",
                    "testsrc=size=80x60:rate=25",
                    "-frames:v",
                ])
                .arg(n.to_string())
                .args(["-c:v", "mpeg4", "-vtag", "XVID", "-y"])
                .arg(root.join(class).join(file))
                .status()
                .unwrap();
            assert!(status.success());
        }
        let lists = dir.join("ucfTrainTestlist");
        std::fs::create_dir_all(&lists).unwrap();
        std::fs::write(
            lists.join("classInd.txt"),
            "1 ApplyEyeMakeup\r\n2 HandstandPushups\r\n",
        )
        .unwrap();
        std::fs::write(
            lists.join("trainlist01.txt"),
            "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\r\nHandStandPushups/v_HandStandPushups_g01_c01.avi 2\r\n",
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
        // Span 7: starts 0, 3, …, 13 in 20 frames (5 clips) and 0, 3, …, 9 in 18 (4 clips).
        assert_eq!(ds.len(), 9);
        assert_eq!(ds.clip(6), (1, 3));
        // The counts were cached: indexing again runs no ffmpeg (a broken one would fail).
        let cached = std::fs::read_to_string(root.join("vq-frame-counts.tsv")).unwrap();
        assert!(
            cached.contains("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\t20"),
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
