//! `compare`: the same run with several estimators (same seed, weights, data order), evaluated
//! and tabulated the way the paper's tables are.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tch::{Device, nn};
use vq_data::Split;
use vq_models::VqAutoencoder;
use vq_tch::Estimator;

use crate::data::{DataSource, ImageSet};
use crate::eval::{EvalMetrics, EvalNets, Perceptual, evaluate};
use crate::train::{RunConfig, StepMetrics, TrainOptions, train, write_atomic};
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

/// Trains (or resumes / reuses) one run per estimator under `out/<estimator>/`, evaluates each
/// on both splits, writes `compare.md`, `compare.json` and `curves.png` into `out`, and returns
/// the rows.
///
/// # Errors
/// As [`train`] and [`evaluate`].
pub fn compare(base: &TrainOptions, estimators: &[Estimator]) -> Result<Vec<CompareRow>> {
    let mut rows = Vec::new();
    for (i, &est) in estimators.iter().enumerate() {
        let mut config = base.config.clone();
        config.model.quantizer.estimator = est;
        let out = base.out.join(est.name());
        let latest = checkpoint::latest(&out)?;
        if let (true, Some((ckpt, state))) = (base.resume, &latest) {
            // The trainer says the note, if any, when it resumes.
            crate::train::may_resume(ckpt, &state.run, &config.resume_key()?, state.step)?;
        }
        let finished = base.resume
            && latest
                .as_ref()
                .is_some_and(|(_, s)| s.step >= config.training.steps);
        eprintln!(
            "== {} ({} of {}, {})",
            est.name(),
            i + 1,
            estimators.len(),
            out.display()
        );
        let mut model = if finished {
            eprintln!("   already trained; evaluating the last checkpoint");
            let mut vs = nn::VarStore::new(base.device);
            let model = VqAutoencoder::new(&vs.root(), &config.model)?;
            checkpoint::load_model(&out, &mut vs)?;
            model
        } else {
            let resume = base.resume && latest.is_some();
            let opts = TrainOptions {
                config: config.clone(),
                out: out.clone(),
                resume,
                ..base.clone()
            };
            train(&opts)?.model
        };
        let row = evaluate_run(&mut model, &config, &out, base.device)?;
        eprintln!(
            "   val rec {:.5}, usage {:.1}%, QE {:.3e}",
            row.val.rec_mse,
            100.0 * row.val.usage,
            row.val.quantization_error
        );
        rows.push(row);
    }
    let md = markdown(&base.config, &rows);
    write_atomic(&base.out.join("compare.md"), md.as_bytes())?;
    write_atomic(
        &base.out.join("compare.json"),
        &serde_json::to_vec_pretty(&serde_json::json!({ "run": base.config, "rows": rows }))?,
    )?;
    let histories: Vec<Vec<StepMetrics>> = estimators
        .iter()
        .map(|e| read_metrics(&base.out.join(e.name()).join("metrics.jsonl")))
        .collect::<Result<_>>()?;
    plot::curves(&base.out.join("curves.png"), &curve_panels(&histories))?;
    Ok(rows)
}

/// Three panels, one series per run: log₁₀ reconstruction MSE, fraction of codes used per
/// batch, log₁₀ quantization error.
pub(crate) fn curve_panels(histories: &[Vec<StepMetrics>]) -> Vec<Vec<Vec<(f64, f64)>>> {
    let panel = |f: fn(&StepMetrics) -> f64| -> Vec<Vec<(f64, f64)>> {
        histories
            .iter()
            .map(|h| h.iter().map(|m| (m.step as f64, f(m))).collect())
            .collect()
    };
    vec![
        panel(|m| m.rec.max(1e-12).log10()),
        panel(|m| m.usage),
        panel(|m| m.quantization_error.max(1e-12).log10()),
    ]
}

/// Evaluates a trained run on both splits and writes `eval.json`, `reconstructions.png` (16
/// held-out images over their reconstructions) and `curves.png` (from `metrics.jsonl`) into its
/// folder, and the metrics and the grid into its TensorBoard event file. The row's training
/// time and the events' step are the run's latest checkpoint's (0 without one).
///
/// # Errors
/// Data, model and I/O errors.
pub fn evaluate_run(
    model: &mut VqAutoencoder,
    config: &RunConfig,
    out: &Path,
    device: Device,
) -> Result<CompareRow> {
    let (step, seconds) =
        checkpoint::latest(out)?.map_or((0, 0.0), |(_, s)| (s.step, s.train_seconds));
    let a = &config.model.autoencoder;
    let source = DataSource::parse(&config.data)?;
    let pipeline = config.preprocessing;
    let train_set = ImageSet::load(
        &source,
        Split::Train,
        a.in_channels(),
        a.resolution(),
        a.frames(),
        pipeline,
    )?;
    let val_set = ImageSet::load(
        &source,
        Split::Test,
        a.in_channels(),
        a.resolution(),
        a.frames(),
        pipeline,
    )?;
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
    plot::reconstruction_grid(
        &out.join("reconstructions.png"),
        &crate::data::frames_as_images(&x),
        &crate::data::frames_as_images(&rec),
        3,
    )?;
    let history = read_metrics(&out.join("metrics.jsonl"))?;
    plot::curves(&out.join("curves.png"), &curve_panels(&[history]))?;
    let row = CompareRow {
        estimator: config.model.quantizer.estimator.name().to_owned(),
        train,
        val,
        train_seconds: seconds,
    };
    write_atomic(&out.join("eval.json"), &serde_json::to_vec_pretty(&row)?)?;
    write_eval_events(out, step, &row)?;
    Ok(row)
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
    let path = out.join("reconstructions.png");
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
        let lpips = r.val.lpips.map_or_else(
            || "needs weights (--lpips)".to_owned(),
            |v| format!("{v:.4}"),
        );
        s.push_str(&format!(
            "| {} | {:.1}% | {:.5} | {:.5} | {:.3e} | {:.1}% | {:.1} | {:.1}% | {lpips} | {} | {} |\n",
            r.estimator,
            100.0 * r.val.usage,
            r.train.rec_mse,
            r.val.rec_mse,
            r.val.quantization_error,
            100.0 * r.val.relative_quantization_error,
            r.val.perplexity,
            100.0 * r.val.usage_total,
            r.val.rfid.map_or_else(
                || "needs weights (--inception)".to_owned(),
                |v| format!("{v:.2}")
            ),
            r.val.ris.map_or_else(
                || "needs weights (--inception)".to_owned(),
                |v| format!("{v:.2}")
            ),
        ));
    }
    s
}

/// Default run folder for a comparison.
pub fn default_out(preset: &str) -> PathBuf {
    PathBuf::from("runs").join(format!("compare-{preset}"))
}
