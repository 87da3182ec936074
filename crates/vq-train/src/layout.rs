//! The layout of a run folder: every file name the tools write or read in it, in one place.
//! A leaf of the crate (paths only; nothing is read or written here).
//!
//! ```text
//! run.json            the run's configuration (RunConfig, or a prior's)
//! metrics.jsonl       one line per logging window
//! skipped.jsonl       samples that failed to decode, each file once
//! events.out.tfevents.*  TensorBoard (crate::tensorboard names it)
//! checkpoints/        step-N/ folders and `latest` (crate::checkpoint)
//! profile/            traces of --profile-steps
//! eval.json, curves.png, reconstructions.png   written after training / by `eval`
//! compare.md, compare.json                     a `compare` folder's tables
//! ```

use std::path::{Path, PathBuf};

/// A run folder.
#[derive(Debug, Clone, Copy)]
pub struct RunDir<'a>(&'a Path);

impl<'a> RunDir<'a> {
    /// The run's configuration.
    pub const RUN: &'static str = "run.json";
    /// The metric windows.
    pub const METRICS: &'static str = "metrics.jsonl";
    /// The samples that failed to decode.
    pub const SKIPPED: &'static str = "skipped.jsonl";
    /// The checkpoints' folder.
    pub const CHECKPOINTS: &'static str = "checkpoints";
    /// The profiles' folder.
    pub const PROFILE: &'static str = "profile";
    /// The evaluation's numbers.
    pub const EVAL: &'static str = "eval.json";
    /// The training curves.
    pub const CURVES: &'static str = "curves.png";
    /// The reconstructions of held-out images.
    pub const RECONSTRUCTIONS: &'static str = "reconstructions.png";
    /// A comparison's table (Markdown).
    pub const COMPARE_MD: &'static str = "compare.md";
    /// A comparison's rows (JSON).
    pub const COMPARE_JSON: &'static str = "compare.json";

    /// The folder `path`.
    #[must_use]
    pub fn new(path: &'a Path) -> Self {
        Self(path)
    }

    /// The folder itself.
    #[must_use]
    pub fn path(self) -> &'a Path {
        self.0
    }

    /// `run.json`.
    #[must_use]
    pub fn run(self) -> PathBuf {
        self.0.join(Self::RUN)
    }

    /// `metrics.jsonl`.
    #[must_use]
    pub fn metrics(self) -> PathBuf {
        self.0.join(Self::METRICS)
    }

    /// `skipped.jsonl`.
    #[must_use]
    pub fn skipped(self) -> PathBuf {
        self.0.join(Self::SKIPPED)
    }

    /// `checkpoints/`.
    #[must_use]
    pub fn checkpoints(self) -> PathBuf {
        self.0.join(Self::CHECKPOINTS)
    }

    /// `profile/`.
    #[must_use]
    pub fn profile(self) -> PathBuf {
        self.0.join(Self::PROFILE)
    }

    /// `eval.json`.
    #[must_use]
    pub fn eval(self) -> PathBuf {
        self.0.join(Self::EVAL)
    }

    /// `curves.png`.
    #[must_use]
    pub fn curves(self) -> PathBuf {
        self.0.join(Self::CURVES)
    }

    /// `reconstructions.png`.
    #[must_use]
    pub fn reconstructions(self) -> PathBuf {
        self.0.join(Self::RECONSTRUCTIONS)
    }

    /// `compare.md`.
    #[must_use]
    pub fn compare_md(self) -> PathBuf {
        self.0.join(Self::COMPARE_MD)
    }

    /// `compare.json`.
    #[must_use]
    pub fn compare_json(self) -> PathBuf {
        self.0.join(Self::COMPARE_JSON)
    }
}
