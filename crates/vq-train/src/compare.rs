//! `compare`: the same run with several estimators (same seed, weights, data order), evaluated
//! and tabulated the way the paper's tables are.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tch::{Device, Tensor};
use vq_data::Split;
use vq_models::VqAutoencoder;

use crate::checkpoint::write_atomic;
use crate::config::{RunConfig, TrainOptions};
use crate::data::DataSource;
use crate::eval::{EvalMetrics, EvalNets, Perceptual, evaluate};
use crate::layout::RunDir;
use crate::method::Method;
use crate::metrics::StepMetrics;
use crate::train::train;
use crate::{checkpoint, plot};

/// One row of the comparison.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CompareRow {
    /// Estimator name.
    pub estimator: String,
    /// Metrics on the training split.
    pub train: EvalMetrics,
    /// Metrics on the held-out split.
    pub val: EvalMetrics,
    /// Seconds spent training the run, summed over the invocations that trained it (from its
    /// last checkpoint, so a run reused by `--resume` reports its own time, not 0).
    pub train_seconds: f64,
}

/// Trains (or resumes / reuses) one run per estimator or baseline ([`Method`]) under
/// `out/<name>/`, evaluates each
/// on both splits, writes `compare.md`, `compare.json` and `curves.png` into `out`, and returns
/// the rows.
///
/// # Errors
/// As [`train`] and [`evaluate`].
pub fn compare<M: Into<Method> + Copy>(
    base: &TrainOptions,
    methods: &[M],
) -> Result<Vec<CompareRow>> {
    let estimators: Vec<Method> = methods.iter().map(|&m| m.into()).collect();
    // A method the configuration cannot run is refused before any run trains.
    for m in &estimators {
        m.apply(&mut base.config.clone())?;
    }
    let mut rows = Vec::new();
    let mut grid_rows: Vec<(String, Tensor)> = Vec::new();
    let mut steps = Vec::new();
    for (i, &est) in estimators.iter().enumerate() {
        let mut config = base.config.clone();
        est.apply(&mut config)?;
        let out = base.out.join(est.name());
        eprintln!(
            "== {} ({} of {}, {})",
            est.name(),
            i + 1,
            estimators.len(),
            out.display()
        );
        let mut model = train_or_reuse(base, &config, &out)?;
        let Evaluated { row, shown, step } = evaluate_run(&mut model, &config, &out, base.device)?;
        steps.push(step.to_string());
        if grid_rows.is_empty() {
            grid_rows.push(("original".to_owned(), shown.originals));
        }
        grid_rows.push((est.label().to_owned(), shown.reconstructions));
        eprintln!(
            "   val rec {:.5}, usage {:.1}%, QE {:.3e}",
            row.val.rec_mse,
            100.0 * row.val.usage,
            row.val.quantization_error
        );
        rows.push(row);
    }
    let md = markdown(&base.config, &rows);
    write_atomic(&RunDir::new(&base.out).compare_md(), md.as_bytes())?;
    write_atomic(
        &RunDir::new(&base.out).compare_json(),
        &serde_json::to_vec_pretty(&serde_json::json!({ "run": base.config, "rows": rows }))?,
    )?;
    let histories: Vec<Vec<StepMetrics>> = estimators
        .iter()
        .map(|e| read_metrics(&RunDir::new(&base.out.join(e.name())).metrics()))
        .collect::<Result<_>>()?;
    let runs: Vec<(&str, &[StepMetrics])> = estimators
        .iter()
        .zip(&histories)
        .map(|(e, h)| (e.label(), h.as_slice()))
        .collect();
    let cfg = &base.config;
    plot::curves(
        &RunDir::new(&base.out).curves(),
        &format!("{}: training curves by estimator", run_title(cfg)),
        &cfg.reconstruction_loss_name(),
        &runs,
    )?;
    let grid: Vec<(&str, &Tensor)> = grid_rows.iter().map(|(l, t)| (l.as_str(), t)).collect();
    steps.dedup();
    let at = match steps.as_slice() {
        [one] => format!("step {one}"),
        many => format!("steps {}", many.join(" / ")),
    };
    let zoom = grid_rows.first().map_or(1, |(_, t)| plot::zoom_for(t));
    plot::reconstruction_grid(
        &RunDir::new(&base.out).reconstructions(),
        &format!("{}: held-out images, {at}", run_title(cfg)),
        &grid,
        zoom,
    )?;
    Ok(rows)
}

/// The trained model of the run `config` in `out`: trained from scratch, or with
/// `base.resume` continued from its latest checkpoint, or loaded when that checkpoint is
/// already at the last step.
///
/// # Errors
/// A checkpoint of another configuration; the errors of [`train`].
pub(crate) fn train_or_reuse(
    base: &TrainOptions,
    config: &RunConfig,
    out: &Path,
) -> Result<VqAutoencoder> {
    let latest = checkpoint::latest(out)?;
    if let (true, Some((ckpt, state))) = (base.resume, &latest) {
        // The trainer says the note, if any, when it resumes.
        crate::config::may_resume(ckpt, &state.run, &config.resume_key()?, state.step)?;
    }
    let finished = base.resume
        && latest
            .as_ref()
            .is_some_and(|(_, s)| s.step >= config.training.steps);
    if finished {
        eprintln!("   already trained; evaluating the last checkpoint");
        return Ok(crate::autoencoder::load_model(out, config, base.device)?.0);
    }
    let opts = TrainOptions {
        config: config.clone(),
        out: out.to_path_buf(),
        resume: base.resume && latest.is_some(),
        ..base.clone()
    };
    Ok(train(&opts)?.model)
}

/// "preset on data", the start of every figure's title.
pub(crate) fn run_title(config: &RunConfig) -> String {
    format!("{} on {}", config.preset, config.data)
}

/// The images an evaluation shows: held-out originals and the model's reconstructions, as
/// images (video: the frames of the clips).
#[derive(Debug)]
pub struct Shown {
    /// Originals, (B, C, H, W) in [−1, 1].
    pub originals: Tensor,
    /// Reconstructions of the originals, same shape.
    pub reconstructions: Tensor,
}

/// What [`evaluate_run`] returns: the metrics row and the images it drew.
#[derive(Debug)]
pub struct Evaluated {
    /// The metrics.
    pub row: CompareRow,
    /// The images of `reconstructions.png`.
    pub shown: Shown,
    /// The step of the checkpoint evaluated (0 without one).
    pub step: usize,
}

/// Evaluates a trained run on both splits and writes `eval.json`, `reconstructions.png` (16
/// held-out images over their reconstructions, rows labelled, the step in the title) and
/// `curves.png` (from `metrics.jsonl`) into its folder, and the metrics and the grid into its
/// TensorBoard event file. The row's training time and the events' step are the run's latest
/// checkpoint's (0 without one).
///
/// # Errors
/// Data, model and I/O errors.
pub fn evaluate_run(
    model: &mut VqAutoencoder,
    config: &RunConfig,
    out: &Path,
    device: Device,
) -> Result<Evaluated> {
    let (step, seconds) =
        checkpoint::latest(out)?.map_or((0, 0.0), |(_, s)| (s.step, s.train_seconds));
    let a = &config.model.autoencoder;
    let source = DataSource::parse(&config.data)?;
    let train_set = config.load_split(&source, Split::Train)?;
    let val_set = config.load_split(&source, Split::Test)?;
    let batch = config.micro_batch;
    let nets = EvalNets::load(
        config.lpips_weights.as_deref(),
        config.inception_weights.as_deref(),
        device,
    )?;
    // r-FID / r-IS are the held-out set's (as in the paper).
    let train = evaluate(
        model,
        &train_set,
        Some(crate::eval::MAX_TRAIN_EVAL_IMAGES),
        batch,
        device,
        &nets,
        Perceptual::LpipsOnly,
    )?;
    // Held-out sets are evaluated whole, except video sets (UCF-101's test split has ~600 k
    // clips): at most MAX_TRAIN_EVAL_IMAGES evenly spaced clips.
    let val_limit = a.frames().map(|_| crate::eval::MAX_TRAIN_EVAL_IMAGES);
    let val = evaluate(
        model,
        &val_set,
        val_limit,
        batch,
        device,
        &nets,
        Perceptual::All,
    )?;
    for (split, m) in [("training", &train), ("held-out", &val)] {
        report_skipped(split, m);
    }
    // 16 images, or the frames of 2 clips.
    let show_n = if a.frames().is_some() { 2 } else { 16 };
    let x = val_set.first_decodable(show_n, device)?;
    let rec = tch::no_grad(|| model.forward(&x, vq_tch::Mode::Eval))?.reconstruction;
    let shown = Shown {
        originals: crate::data::frames_as_images(&x),
        reconstructions: crate::data::frames_as_images(&rec),
    };
    let estimator = Method::of(config).label();
    plot::reconstruction_grid(
        &RunDir::new(out).reconstructions(),
        &format!(
            "{}, {estimator}: held-out images, step {step}",
            run_title(config)
        ),
        &[
            ("original", &shown.originals),
            (estimator, &shown.reconstructions),
        ],
        plot::zoom_for(&shown.originals),
    )?;
    write_curves(out, config, &read_metrics(&RunDir::new(out).metrics())?)?;
    let row = CompareRow {
        estimator: Method::of(config).name().to_owned(),
        train,
        val,
        train_seconds: seconds,
    };
    write_atomic(&RunDir::new(out).eval(), &serde_json::to_vec_pretty(&row)?)?;
    write_eval_events(out, step, &row)?;
    Ok(Evaluated { row, shown, step })
}

/// Draws one run's `curves.png` from its metrics (written beside and renamed into place, so
/// a viewer never sees half a file).
///
/// # Errors
/// Plotting and I/O errors.
pub fn write_curves(out: &Path, config: &RunConfig, history: &[StepMetrics]) -> Result<()> {
    let estimator = Method::of(config).label();
    // `plot::curves` writes through a temporary file of this process's own (`watch` and the
    // training process may draw at once).
    plot::curves(
        &RunDir::new(out).curves(),
        &format!("{}, {estimator}: training curves", run_title(config)),
        &config.reconstruction_loss_name(),
        &[(estimator, history)],
    )
}

/// The evaluation in the run's TensorBoard file at `step`: `val/*` and `train_eval/*` scalars
/// and the reconstruction grid; an earlier evaluation's are replaced.
fn write_eval_events(out: &Path, step: usize, row: &CompareRow) -> Result<()> {
    use crate::tensorboard::{EventWriter, What, eval_scalars, is_eval_tag};
    let mut w = EventWriter::open_keeping(out, |e| match &e.what {
        Some(What::Summary(s)) => !s.value.iter().any(|v| is_eval_tag(&v.tag)),
        _ => true,
    })?;
    let mut values = eval_scalars("val", &row.val);
    values.extend(eval_scalars("train_eval", &row.train));
    let values: Vec<(&str, f64)> = values.iter().map(|(t, v)| (t.as_str(), *v)).collect();
    w.scalars(step, &values)?;
    let path = RunDir::new(out).reconstructions();
    let png = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let img =
        image::load_from_memory(&png).with_context(|| format!("decoding {}", path.display()))?;
    let dims = (img.height(), img.width(), img.color().channel_count());
    w.image(step, "reconstructions", png, dims)
}

/// Prints what an evaluation left out (the full lists are in `eval.json`).
fn report_skipped(split: &str, m: &crate::eval::EvalMetrics) {
    for l in &m.left_out {
        eprintln!("eval ({split} split): a file left out when the set was indexed: {l}");
    }
    if m.skipped.is_empty() {
        return;
    }
    eprintln!(
        "eval ({split} split): left out {} sample(s) that failed to decode (listed in eval.json), \
         evaluated the other {}:",
        m.skipped.len(),
        m.images
    );
    for b in m.skipped.iter().take(5) {
        eprintln!("  {}", b.error);
    }
    if m.skipped.len() > 5 {
        eprintln!("  … and {} more", m.skipped.len() - 5);
    }
}

/// Reads a run's metrics lines.
///
/// # Errors
/// Unreadable file or a malformed line (named by number).
pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{} line {}", path.display(), i + 1))
        })
        .collect()
}

/// The comparison as a markdown table (paper-style columns).
pub fn markdown(config: &RunConfig, rows: &[CompareRow]) -> String {
    let q = &config.model.quantizer;
    let a = &config.model.autoencoder;
    let lr = a.latent_resolution();
    let mut s = format!(
        "Preset `{}` on {}: latents {lr}×{lr}×{}, {} codes, {:?} lookup, {}; {} steps of batch {}, seed {}.\n\n",
        config.preset,
        config.data,
        q.codebook_dim,
        q.codebook_size,
        q.metric,
        match q.learning {
            vq_tch::CodebookLearning::Ema { decay, .. } => format!("EMA codebook (decay {decay})"),
            vq_tch::CodebookLearning::Gradient { .. } => "codebook learned by gradient".into(),
        },
        config.training.steps,
        config.training.batch_size,
        config.seed,
    );
    s.push_str("| Estimator | Codebook usage (val, per 256 images) | Train rec. MSE | Val rec. MSE | Quantization error (val) | QE / mean(e²) (val) | Perplexity (val) | Codes used (all val) | LPIPS (val) | r-FID | r-IS |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let lpips = r
            .val
            .lpips
            .map_or_else(|| "—".to_owned(), |v| format!("{v:.4}"));
        // A Gumbel quantizer has no encoder vector to compare with its code (the paper's "—").
        let (qe, relative) = match r.estimator == Method::Gumbel.name() {
            true => ("—".to_owned(), "—".to_owned()),
            false => (
                format!("{:.3e}", r.val.quantization_error),
                format!("{:.1}%", 100.0 * r.val.relative_quantization_error),
            ),
        };
        s.push_str(&format!(
            "| {} | {:.1}% | {:.5} | {:.5} | {qe} | {relative} | {:.1} | {:.1}% | {lpips} | {} | {} |\n",
            r.estimator,
            100.0 * r.val.usage,
            r.train.rec_mse,
            r.val.rec_mse,
            r.val.perplexity,
            100.0 * r.val.usage_total,
            r.val.rfid.map_or_else(|| "—".to_owned(), |v| format!("{v:.2}")),
            r.val.ris.map_or_else(|| "—".to_owned(), |v| format!("{v:.2}")),
        ));
    }
    s.push_str(&missing_weights(rows));
    s
}

/// Once per table, what the empty perceptual columns need.
fn missing_weights(rows: &[CompareRow]) -> String {
    let mut notes = Vec::new();
    if rows.iter().any(|r| r.val.lpips.is_none()) {
        notes.push("LPIPS needs weights (--lpips; cargo xtask download-weights lpips)");
    }
    if rows
        .iter()
        .any(|r| r.val.rfid.is_none() || r.val.ris.is_none())
    {
        notes.push(
            "r-FID and r-IS need weights (--inception; cargo xtask download-weights inception)",
        );
    }
    match notes.is_empty() {
        true => String::new(),
        false => format!("\n—: {}.\n", notes.join("; ")),
    }
}

/// Default run folder for a comparison.
pub fn default_out(preset: &str) -> PathBuf {
    PathBuf::from("runs").join(format!("compare-{preset}"))
}
