//! Streaming batches from any random-access [`Dataset`] with background decode workers.
//!
//! The sample order is a pure function of the configuration, so runs are reproducible and
//! resumable: the stream is the endless sequence of positions `0, 1, 2, …`; position `p` is
//! sample `k = p mod m` of epoch `e = p div m` (`m` = samples per epoch of this shard), i.e. the
//! dataset index `perm_e[k · world + rank]`, where `perm_e` is the permutation of epoch `e`
//! (seeded by `(seed, e)`; the identity for [`Order::Sequential`]). Each shard takes every
//! `world`-th slot of the same permutation, so shards are disjoint within an epoch; the last
//! `n mod world` slots of each permutation are dropped so that all shards have the same length.
//! Batch `b` holds positions `start + b·B … start + (b+1)·B − 1`. Random augmentation of a
//! sample draws from a generator seeded by `(seed, epoch, index)`, so it does not depend on the
//! number of workers or on where a run was resumed.
//!
//! Memory stays flat: each of the `W` workers decodes the batches `b ≡ w (mod W)` into its own
//! bounded queue of `prefetch` batches, and the consumer takes them in order.
//!
//! A sample that fails to decode ([`OnError`]) ends the stream, is left out of its batch, or is
//! replaced by the sample of the next position of the same epoch and shard that decodes (the
//! positions after it, wrapping round to the epoch's first), so a training batch keeps its size
//! and the stream stays a pure function of the configuration. Failures are remembered, so a
//! broken file is read once per loader, not once per epoch.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::error::{DataError, Result};

/// A dataset with random access: sample `index` is decoded on demand.
pub trait Dataset: Send + Sync + 'static {
    /// What one sample decodes to.
    type Sample: Send + 'static;

    /// Number of samples.
    fn len(&self) -> usize;

    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decodes sample `index`, drawing any random augmentation from `rng`.
    ///
    /// # Errors
    /// Unreadable or corrupt data, named by file (and offset).
    fn get(&self, index: usize, rng: &mut StdRng) -> Result<Self::Sample>;

    /// A name for sample `index` in reports (its file or archive member).
    fn name(&self, index: usize) -> String;

    /// Files left out when the dataset was indexed (damaged, unreadable), for reports.
    fn left_out(&self) -> &[crate::LeftOut] {
        &[]
    }

    /// Files passed over when the dataset was indexed because their names are not samples'.
    fn ignored(&self) -> &crate::Ignored {
        static NONE: std::sync::LazyLock<crate::Ignored> =
            std::sync::LazyLock::new(crate::Ignored::default);
        &NONE
    }
}

/// The order samples are visited in within an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// A fresh permutation per epoch, seeded by `(seed, epoch)`.
    Shuffled,
    /// Index order (evaluation).
    Sequential,
}

/// What a sample that fails to decode does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// The stream yields the error (naming the file and offset) and ends.
    Fail,
    /// The sample is left out of its batch (which is then smaller; evaluation) and listed in
    /// [`Batch::skipped`]; the epoch's count is reported by [`Batches::finished_epochs`].
    Skip,
    /// The sample is replaced by the one at the next position of its epoch (in this shard) that
    /// decodes, so the batch keeps its size (training); listed in [`Batch::skipped`] with its
    /// replacement. The stream fails only when no sample of the epoch decodes.
    Replace,
}

/// This process's part of a data-parallel run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This process's rank, `0 ≤ rank < world`.
    pub rank: usize,
    /// Number of processes.
    pub world: usize,
}

impl Shard {
    /// The whole dataset (one process).
    pub const ALL: Self = Self { rank: 0, world: 1 };
}

/// How a [`Loader`] streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Shuffled or sequential.
    pub order: Order,
    /// Seed of the permutations and of the per-sample augmentation.
    pub seed: u64,
    /// Data-parallel shard.
    pub shard: Shard,
    /// Decode threads.
    pub workers: usize,
    /// Batches each worker may hold ready.
    pub prefetch: usize,
    /// First position of the stream (resume: the number of samples already consumed).
    pub start: u64,
    /// Positions to stream in all (`None`: endless).
    pub limit: Option<u64>,
    /// Failing samples stop the stream or are skipped.
    pub on_error: OnError,
}

impl LoaderConfig {
    /// Shuffled, endless, one process, 2 workers with 2 batches each, failing on errors.
    pub fn train(batch_size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            order: Order::Shuffled,
            seed,
            shard: Shard::ALL,
            workers: 2,
            prefetch: 2,
            start: 0,
            limit: None,
            on_error: OnError::Fail,
        }
    }

    /// One sequential pass over the first `n` samples (evaluation).
    pub fn eval(batch_size: usize, n: usize) -> Self {
        Self {
            order: Order::Sequential,
            limit: Some(n as u64),
            ..Self::train(batch_size, 0)
        }
    }
}

/// A sample left out of its batch under [`OnError::Skip`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Dataset index.
    pub index: usize,
    /// Stream position.
    pub position: u64,
    /// The error, naming the file.
    pub error: String,
    /// The dataset index that took its place ([`OnError::Replace`]).
    pub replacement: Option<usize>,
}

/// One batch, in stream order.
#[derive(Debug)]
pub struct Batch<S> {
    /// Stream position of the batch's first slot.
    pub position: u64,
    /// The decoded samples.
    pub samples: Vec<S>,
    /// Their dataset indices.
    pub indices: Vec<usize>,
    /// Samples that failed ([`OnError::Skip`]: left out; [`OnError::Replace`]: replaced).
    pub skipped: Vec<Skipped>,
}

/// What an epoch of the stream skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochSummary {
    /// Epoch number.
    pub epoch: u64,
    /// Samples the epoch had in this shard.
    pub samples: u64,
    /// Samples left out.
    pub skipped: Vec<Skipped>,
}

impl std::fmt::Display for EpochSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "epoch {}: {} of {} samples {}",
            self.epoch,
            self.skipped.len(),
            self.samples,
            match self.skipped.iter().any(|s| s.replacement.is_some()) {
                true => "failed to decode and were replaced",
                false => "skipped",
            }
        )?;
        for s in self.skipped.iter().take(10) {
            write!(f, "\n  {}", s.error)?;
        }
        if self.skipped.len() > 10 {
            write!(f, "\n  … and {} more", self.skipped.len() - 10)?;
        }
        Ok(())
    }
}

/// Stacks equally shaped samples into one array with a leading batch axis: `(C, H, W)` images
/// into NCHW, `(C, T, H, W)` clips into NCTHW.
///
/// ```
/// use ndarray::Array3;
/// let images = vec![Array3::<u8>::zeros((3, 8, 8)); 5];
/// assert_eq!(vq_data::loader::stack(&images).unwrap().dim(), (5, 3, 8, 8));
/// ```
///
/// # Errors
/// [`DataError::Config`] if the shapes differ or there are no samples.
pub fn stack<A: Clone, D: ndarray::Dimension>(
    samples: &[ndarray::Array<A, D>],
) -> Result<ndarray::Array<A, D::Larger>> {
    let views: Vec<_> = samples.iter().map(|s| s.view()).collect();
    ndarray::stack(ndarray::Axis(0), &views)
        .map_err(|e| DataError::Config(format!("cannot stack {} samples: {e}", samples.len())))
}

/// The position → index map of a configuration (see the module docs).
#[derive(Debug, Clone)]
struct Schedule {
    n: usize,
    per_epoch: u64,
    cfg: LoaderConfig,
    cached: Option<(u64, Vec<u32>)>,
}

fn mix(a: u64, b: u64) -> u64 {
    // SplitMix64 finaliser of a combined word: decorrelates nearby (seed, epoch) pairs.
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Schedule {
    fn index(&mut self, position: u64) -> (u64, usize) {
        let (epoch, k) = (position / self.per_epoch, position % self.per_epoch);
        let slot = k as usize * self.cfg.shard.world + self.cfg.shard.rank;
        let index = match self.cfg.order {
            Order::Sequential => slot,
            Order::Shuffled => {
                if self.cached.as_ref().map(|c| c.0) != Some(epoch) {
                    let mut perm: Vec<u32> = (0..self.n as u32).collect();
                    perm.shuffle(&mut StdRng::seed_from_u64(mix(self.cfg.seed, epoch)));
                    self.cached = Some((epoch, perm));
                }
                self.cached.as_ref().expect("just filled").1[slot] as usize
            }
        };
        (epoch, index)
    }
}

/// Streams batches of a [`Dataset`]; see the module docs for the order.
///
/// ```
/// use vq_data::loader::{Dataset, Loader, LoaderConfig};
/// #[derive(Debug)]
/// struct Squares;
/// impl Dataset for Squares {
///     type Sample = usize;
///     fn len(&self) -> usize { 10 }
///     fn get(&self, i: usize, _: &mut rand::rngs::StdRng) -> vq_data::Result<usize> { Ok(i * i) }
///     fn name(&self, i: usize) -> String { i.to_string() }
/// }
/// let loader = Loader::new(Squares, LoaderConfig::eval(4, 10)).unwrap();
/// let sizes: Vec<usize> = loader.batches().map(|b| b.unwrap().samples.len()).collect();
/// assert_eq!(sizes, [4, 4, 2]);
/// ```
#[derive(Debug)]
pub struct Loader<D> {
    dataset: Arc<D>,
    cfg: LoaderConfig,
    per_epoch: u64,
    failures: Failures,
}

/// The samples that failed to decode so far, by dataset index, with their errors (shared by
/// the workers of a loader; a failure is a property of the file, so remembering it does not
/// change the stream).
type Failures = Arc<Mutex<HashMap<usize, String>>>;

impl<D: Dataset> Loader<D> {
    /// A loader over `dataset`.
    ///
    /// # Errors
    /// [`DataError::Config`] for a zero batch size, worker or prefetch count, a rank outside
    /// the world, or fewer samples than processes.
    pub fn new(dataset: D, cfg: LoaderConfig) -> Result<Self> {
        let bad = |what: String| Err(DataError::Config(what));
        if cfg.batch_size == 0 || cfg.workers == 0 || cfg.prefetch == 0 {
            return bad(format!(
                "batch size, workers and prefetch must be positive (got {}, {}, {})",
                cfg.batch_size, cfg.workers, cfg.prefetch
            ));
        }
        if cfg.shard.world == 0 || cfg.shard.rank >= cfg.shard.world {
            return bad(format!(
                "shard rank {} outside world size {}",
                cfg.shard.rank, cfg.shard.world
            ));
        }
        let per_epoch = (dataset.len() / cfg.shard.world) as u64;
        if per_epoch == 0 {
            return bad(format!(
                "{} samples cannot be split over {} processes",
                dataset.len(),
                cfg.shard.world
            ));
        }
        Ok(Self {
            dataset: Arc::new(dataset),
            cfg,
            per_epoch,
            failures: Failures::default(),
        })
    }

    /// Samples per epoch in this shard.
    pub fn epoch_len(&self) -> u64 {
        self.per_epoch
    }

    /// The dataset.
    pub fn dataset(&self) -> &D {
        &self.dataset
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// The dataset index at stream position `position`.
    pub fn index_at(&self, position: u64) -> usize {
        self.schedule().index(position).1
    }

    fn schedule(&self) -> Schedule {
        Schedule {
            n: self.dataset.len(),
            per_epoch: self.per_epoch,
            cfg: self.cfg,
            cached: None,
        }
    }

    /// Starts the workers and returns the batch iterator. Dropping it stops them.
    pub fn batches(&self) -> Batches<D::Sample> {
        let w = self.cfg.workers;
        let mut receivers = Vec::with_capacity(w);
        let mut handles = Vec::with_capacity(w);
        for worker in 0..w {
            let (tx, rx) = sync_channel(self.cfg.prefetch);
            let dataset = Arc::clone(&self.dataset);
            let schedule = self.schedule();
            let failures = Arc::clone(&self.failures);
            handles.push(
                std::thread::Builder::new()
                    .name(format!("vq-data-{worker}"))
                    .spawn(move || {
                        let mut decoder = Decoder {
                            dataset: &*dataset,
                            schedule,
                            failures,
                        };
                        decoder.work(worker, w, &tx);
                    })
                    .expect("spawning a loader thread"),
            );
            receivers.push(rx);
        }
        Batches {
            receivers,
            handles,
            next: 0,
            done: false,
            per_epoch: self.per_epoch,
            closed: self.cfg.start / self.per_epoch,
            open: Vec::new(),
            finished: Vec::new(),
        }
    }
}

/// A sample that did not decode: now, or at an earlier visit (its message).
enum Failure {
    New(DataError),
    Again(String),
}

/// One worker's view of the stream: the dataset, the position → index map and the shared
/// failure memory.
struct Decoder<'a, D> {
    dataset: &'a D,
    schedule: Schedule,
    failures: Failures,
}

impl<D: Dataset> Decoder<'_, D> {
    /// Decodes the batches `worker, worker + workers, …` into `tx` until the stream ends, the
    /// consumer hangs up, or a failure ends the stream.
    fn work(&mut self, worker: usize, workers: usize, tx: &SyncSender<Result<Batch<D::Sample>>>) {
        let cfg = self.schedule.cfg;
        let b = cfg.batch_size as u64;
        let mut batch = worker as u64;
        loop {
            let first = cfg.start + batch * b;
            let end = match cfg.limit {
                Some(l) => (cfg.start + l).min(first + b),
                None => first + b,
            };
            if first >= end {
                return;
            }
            let out = self.batch(first, end);
            let stop = out.is_err();
            if tx.send(out).is_err() || stop {
                return;
            }
            batch += workers as u64;
        }
    }

    /// Positions `first..end` as one batch.
    fn batch(&mut self, first: u64, end: u64) -> Result<Batch<D::Sample>> {
        let on_error = self.schedule.cfg.on_error;
        let mut out = Batch {
            position: first,
            samples: Vec::with_capacity((end - first) as usize),
            indices: Vec::with_capacity((end - first) as usize),
            skipped: Vec::new(),
        };
        for p in first..end {
            let (epoch, index) = self.schedule.index(p);
            let error = match self.decode(epoch, index) {
                Ok(s) => {
                    out.samples.push(s);
                    out.indices.push(index);
                    continue;
                }
                Err(Failure::New(e)) if on_error == OnError::Fail => return Err(e),
                Err(Failure::New(e)) => e.to_string(),
                Err(Failure::Again(message)) => message,
            };
            let replacement = match on_error {
                OnError::Replace => {
                    let (r, s) = self.replacement(p, epoch, &error)?;
                    out.samples.push(s);
                    out.indices.push(r);
                    Some(r)
                }
                _ => None,
            };
            out.skipped.push(Skipped {
                index,
                position: p,
                error,
                replacement,
            });
        }
        Ok(out)
    }

    /// Sample `index` of `epoch`, augmented from the generator seeded by `(seed, epoch, index)`.
    /// Unless failures end the stream, a failure is remembered and its message returned again
    /// without reading the file a second time.
    fn decode(&self, epoch: u64, index: usize) -> Result<D::Sample, Failure> {
        let remember = self.schedule.cfg.on_error != OnError::Fail;
        if remember && let Some(why) = self.failures.lock().expect("no panics").get(&index) {
            return Err(Failure::Again(why.clone()));
        }
        let seed = mix(mix(self.schedule.cfg.seed, epoch), index as u64 + 1);
        self.dataset
            .get(index, &mut StdRng::seed_from_u64(seed))
            .map_err(|e| {
                if remember {
                    let mut failures = self.failures.lock().expect("no panics");
                    failures.entry(index).or_insert_with(|| e.to_string());
                }
                Failure::New(e)
            })
    }

    /// The first sample after position `p` (wrapping round within its epoch) that decodes.
    fn replacement(&mut self, p: u64, epoch: u64, error: &str) -> Result<(usize, D::Sample)> {
        let per = self.schedule.per_epoch;
        let (base, k) = (p - p % per, p % per);
        for j in 1..per {
            let (_, index) = self.schedule.index(base + (k + j) % per);
            if let Ok(s) = self.decode(epoch, index) {
                return Ok((index, s));
            }
        }
        Err(DataError::NothingDecodes {
            samples: per,
            first: error.to_string(),
        })
    }
}

/// The batch iterator of a [`Loader`].
#[derive(Debug)]
pub struct Batches<S> {
    receivers: Vec<Receiver<Result<Batch<S>>>>,
    handles: Vec<JoinHandle<()>>,
    next: u64,
    done: bool,
    per_epoch: u64,
    /// Epochs before this one have been summarised.
    closed: u64,
    open: Vec<Skipped>,
    finished: Vec<EpochSummary>,
}

impl<S> Batches<S> {
    /// Summaries of the epochs completed so far that have not been taken yet (only epochs
    /// that skipped something under [`OnError::Skip`]).
    pub fn finished_epochs(&mut self) -> Vec<EpochSummary> {
        std::mem::take(&mut self.finished)
    }

    fn account(&mut self, batch: &Batch<S>) {
        let left_out = batch.skipped.iter().filter(|s| s.replacement.is_none());
        let n = (batch.samples.len() + left_out.count()) as u64;
        self.open.extend(batch.skipped.iter().cloned());
        // Close every epoch that ends within this batch (several when a batch spans epochs).
        let done = (batch.position + n) / self.per_epoch;
        while self.closed < done {
            let epoch = self.closed;
            let (mine, later): (Vec<Skipped>, Vec<Skipped>) = std::mem::take(&mut self.open)
                .into_iter()
                .partition(|s| s.position / self.per_epoch <= epoch);
            self.open = later;
            if !mine.is_empty() {
                self.finished.push(EpochSummary {
                    epoch,
                    samples: self.per_epoch,
                    skipped: mine,
                });
            }
            self.closed += 1;
        }
    }
}

impl<S> Iterator for Batches<S> {
    type Item = Result<Batch<S>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let w = self.receivers.len();
        let which = (self.next % w as u64) as usize;
        match self.receivers[which].recv() {
            Ok(Ok(batch)) => {
                self.next += 1;
                self.account(&batch);
                Some(Ok(batch))
            }
            Ok(Err(e)) => {
                self.done = true;
                Some(Err(e))
            }
            Err(_) => {
                // The worker ended: either the stream is complete or the worker panicked.
                self.done = true;
                let handle = self.handles.remove(which);
                if let Err(panic) = handle.join() {
                    std::panic::resume_unwind(panic);
                }
                None
            }
        }
    }
}

impl<S> Drop for Batches<S> {
    fn drop(&mut self) {
        // Disconnect the queues first so that blocked workers return, then wait for them.
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Sample = (index, a random draw); indices in `bad` fail.
    #[derive(Debug)]
    struct Probe {
        n: usize,
        bad: Vec<usize>,
        live: Arc<AtomicUsize>,
        /// Reads of bad samples.
        failed_reads: Arc<AtomicUsize>,
    }

    impl Dataset for Probe {
        type Sample = (usize, u64, Arc<AtomicUsize>);
        fn len(&self) -> usize {
            self.n
        }
        fn get(&self, index: usize, rng: &mut StdRng) -> Result<Self::Sample> {
            if self.bad.contains(&index) {
                self.failed_reads.fetch_add(1, Ordering::SeqCst);
                return Err(DataError::Decode {
                    path: format!("img{index}.JPEG").into(),
                    why: "broken".into(),
                });
            }
            self.live.fetch_add(1, Ordering::SeqCst);
            use rand::Rng;
            Ok((index, rng.r#gen(), self.live.clone()))
        }
        fn name(&self, index: usize) -> String {
            format!("img{index}.JPEG")
        }
    }

    fn probe(n: usize, bad: &[usize]) -> Probe {
        Probe {
            n,
            bad: bad.to_vec(),
            live: Arc::new(AtomicUsize::new(0)),
            failed_reads: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn collect(n: usize, cfg: LoaderConfig, batches: usize) -> Vec<(usize, u64)> {
        Loader::new(probe(n, &[]), cfg)
            .unwrap()
            .batches()
            .take(batches)
            .flat_map(|b| b.unwrap().samples)
            .map(|(i, r, _)| (i, r))
            .collect()
    }

    #[test]
    fn each_epoch_is_a_permutation_and_workers_do_not_change_the_stream() {
        let cfg = LoaderConfig::train(7, 42);
        let one = collect(50, LoaderConfig { workers: 1, ..cfg }, 15);
        let three = collect(
            50,
            LoaderConfig {
                workers: 3,
                prefetch: 1,
                ..cfg
            },
            15,
        );
        assert_eq!(one, three);
        for epoch in one.chunks(50).take(2) {
            let set: HashSet<usize> = epoch.iter().map(|s| s.0).collect();
            assert_eq!(set.len(), 50);
        }
        let e0: Vec<usize> = one[..50].iter().map(|s| s.0).collect();
        let e1: Vec<usize> = one[50..100].iter().map(|s| s.0).collect();
        assert_ne!(e0, e1);
        assert_ne!(e0, (0..50).collect::<Vec<_>>());
        // Another seed, another order.
        assert_ne!(collect(50, LoaderConfig::train(7, 43), 1)[..7], one[..7]);
    }

    #[test]
    fn resuming_at_a_sample_offset_continues_the_same_stream() {
        let cfg = LoaderConfig::train(8, 5);
        let full = collect(30, cfg, 10);
        let resumed = collect(30, LoaderConfig { start: 24, ..cfg }, 7);
        assert_eq!(resumed, full[24..80]);
    }

    #[test]
    fn shards_are_disjoint_and_equal_sized() {
        let n = 23;
        let mut seen = Vec::new();
        for rank in 0..3 {
            let cfg = LoaderConfig {
                shard: Shard { rank, world: 3 },
                limit: Some(7),
                ..LoaderConfig::train(4, 1)
            };
            let loader = Loader::new(probe(n, &[]), cfg).unwrap();
            assert_eq!(loader.epoch_len(), 7);
            seen.extend(collect(n, cfg, 10).into_iter().map(|s| s.0));
        }
        let set: HashSet<usize> = seen.iter().copied().collect();
        assert_eq!((seen.len(), set.len()), (21, 21));
    }

    #[test]
    fn sequential_eval_is_one_ordered_pass() {
        let got: Vec<usize> = collect(10, LoaderConfig::eval(3, 10), 100)
            .into_iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn errors_fail_the_stream_or_are_skipped_and_summarised() {
        let bad = [5, 11];
        let cfg = LoaderConfig::eval(4, 12);
        let mut it = Loader::new(probe(12, &bad), cfg).unwrap().batches();
        assert!(it.next().unwrap().is_ok());
        let err = it.next().unwrap().unwrap_err().to_string();
        assert!(err.contains("img5.JPEG"), "{err}");
        assert!(it.next().is_none());

        let cfg = LoaderConfig {
            on_error: OnError::Skip,
            limit: Some(24),
            ..cfg
        };
        let loader = Loader::new(probe(12, &bad), cfg).unwrap();
        let mut it = loader.batches();
        let sizes: Vec<usize> = it.by_ref().map(|b| b.unwrap().samples.len()).collect();
        assert_eq!(sizes, [4, 3, 3, 4, 3, 3]);
        let summaries = it.finished_epochs();
        assert_eq!(summaries.len(), 2);
        assert_eq!(summaries[1].epoch, 1);
        assert!(summaries.iter().all(|s| s.skipped.len() == 2));
        let text = summaries[0].to_string();
        assert!(
            text.contains("2 of 12 samples skipped") && text.contains("img11.JPEG"),
            "{text}"
        );
    }

    #[test]
    fn skips_are_reported_in_the_epoch_they_belong_to() {
        // Epochs of 5 samples, batches of 4: batch 1 holds positions 4..8 (epochs 0 and 1).
        let cfg = LoaderConfig {
            on_error: OnError::Skip,
            limit: Some(10),
            ..LoaderConfig::eval(4, 10)
        };
        let mut it = Loader::new(probe(5, &[4, 0]), cfg).unwrap().batches();
        let _: Vec<_> = it.by_ref().collect();
        let s = it.finished_epochs();
        let positions: Vec<Vec<u64>> = s
            .iter()
            .map(|e| e.skipped.iter().map(|k| k.position).collect())
            .collect();
        assert_eq!(positions, [vec![0, 4], vec![5, 9]]);
        assert_eq!((s[0].epoch, s[1].epoch), (0, 1));
    }

    #[test]
    fn replaced_samples_keep_batches_full_and_the_stream_a_function_of_the_config() {
        let bad = [3, 7, 8];
        let cfg = LoaderConfig {
            on_error: OnError::Replace,
            limit: Some(40),
            ..LoaderConfig::train(4, 9)
        };
        let run = |workers: usize| {
            let p = probe(10, &bad);
            let reads = p.failed_reads.clone();
            let loader = Loader::new(p, LoaderConfig { workers, ..cfg }).unwrap();
            let mut it = loader.batches();
            let batches: Vec<Batch<_>> = it.by_ref().map(|b| b.unwrap()).collect();
            (batches, it.finished_epochs(), reads.load(Ordering::SeqCst))
        };
        let (one, epochs, reads) = run(1);
        assert!(one.iter().all(|b| b.samples.len() == 4));
        // Each bad file is read once, although each of the 4 epochs visits it.
        assert_eq!(reads, 3);
        assert_eq!(epochs.len(), 4);
        assert!(epochs.iter().all(|e| e.skipped.len() == 3), "{epochs:?}");
        for b in &one {
            for s in &b.skipped {
                let r = s.replacement.unwrap();
                assert!(!bad.contains(&r));
                assert!(b.indices.contains(&r));
                assert!(
                    s.error.contains(&format!("img{}.JPEG", s.index)),
                    "{}",
                    s.error
                );
            }
            assert!(b.indices.iter().all(|i| !bad.contains(i)));
        }
        // The replacement is the next good position of the same epoch (wrapping round).
        let order: Vec<usize> = (0..10)
            .map(|p| Loader::new(probe(10, &[]), cfg).unwrap().index_at(p))
            .collect();
        for s in one
            .iter()
            .flat_map(|b| &b.skipped)
            .filter(|s| s.position < 10)
        {
            let k = s.position as usize;
            let next = (1..10)
                .map(|j| order[(k + j) % 10])
                .find(|i| !bad.contains(i));
            assert_eq!(s.replacement, next, "{s:?}");
        }
        let (three, _, reads3) = run(3);
        let key = |b: &Vec<Batch<(usize, u64, Arc<AtomicUsize>)>>| -> Vec<(usize, u64)> {
            b.iter()
                .flat_map(|b| b.samples.iter().map(|s| (s.0, s.1)))
                .collect()
        };
        assert_eq!(key(&one), key(&three));
        assert!(reads3 <= 3 * 3, "{reads3}");

        // Nothing decodes: an error that says so, naming a file.
        let cfg = LoaderConfig { workers: 1, ..cfg };
        let mut it = Loader::new(probe(3, &[0, 1, 2]), cfg).unwrap().batches();
        let err = it.next().unwrap().unwrap_err();
        assert!(
            matches!(err, DataError::NothingDecodes { samples: 3, .. }),
            "{err}"
        );
        assert!(err.to_string().contains(".JPEG"), "{err}");
    }

    #[test]
    fn memory_is_bounded_by_the_queues() {
        let p = probe(100_000, &[]);
        let live = p.live.clone();
        let cfg = LoaderConfig {
            workers: 2,
            prefetch: 2,
            ..LoaderConfig::train(10, 0)
        };
        let loader = Loader::new(p, cfg).unwrap();
        let mut it = loader.batches();
        let first = it.next().unwrap().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        // Decoded so far: the batch held here, 2 queued per worker, 1 in hand per worker.
        let decoded = live.load(Ordering::SeqCst);
        assert!(
            decoded <= 10 * (1 + 2 * 2 + 2),
            "{decoded} samples decoded ahead"
        );
        drop(first);
        drop(it);
    }

    #[test]
    fn bad_configurations_are_refused() {
        for cfg in [
            LoaderConfig {
                batch_size: 0,
                ..LoaderConfig::train(1, 0)
            },
            LoaderConfig {
                shard: Shard { rank: 2, world: 2 },
                ..LoaderConfig::train(1, 0)
            },
            LoaderConfig {
                shard: Shard { rank: 0, world: 20 },
                ..LoaderConfig::train(1, 0)
            },
        ] {
            assert!(matches!(
                Loader::new(probe(10, &[]), cfg),
                Err(DataError::Config(_))
            ));
        }
    }
}
