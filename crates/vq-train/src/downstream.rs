//! The downstream comparison: per method × seed, tokenizer → codes → prior → held-out
//! likelihood, with reconstruction and generation side by side and the paired statistics of
//! `compare --seeds`. Every stage is kept when it is already complete, so an interrupted
//! comparison continues where it stopped (`--resume`).
//!
//! Layout under the comparison's folder: `<method>/seed<s>/` the tokenizer run (as `compare`
//! writes it), in it `codes-train.safetensors`, `codes-val.safetensors` and `prior/` (the prior
//! run, with `eval.json`); `downstream.md` and `downstream.json` beside the methods.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use tch::Device;
use vq_data::Split;

use crate::codes::{LoadedRun, encode};
use crate::config::TrainOptions;
use crate::domain::DomainMetrics;
use crate::generation::{GenerationMetrics, InceptionMetrics, Judge, SAMPLES_PER_CLASS};
use crate::layout::RunDir;
use crate::method::Method;
use crate::prior::{Likelihood, PriorOptions, PriorRunConfig, PriorTraining, train_prior};
use crate::stats::{self, Paired, Summary};
use crate::sweep::{Sweep, SweepRow, run_folder};

/// How each prior of the comparison trains.
#[derive(Debug, Clone)]
pub struct PriorPlan {
    /// Prior preset ([`vq_prior::PRESETS`]).
    pub preset: String,
    /// Optimiser steps.
    pub steps: usize,
    /// Grids per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Device of the priors.
    pub device: Device,
}

impl PriorPlan {
    /// Checks the plan before any tokenizer trains: a known preset and sound optimiser settings.
    ///
    /// # Errors
    /// An unknown preset or a bad setting, named.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            vq_prior::PRESETS.contains(&self.preset.as_str()),
            "--prior-preset {:?}: unknown; known: {}",
            self.preset,
            vq_prior::PRESETS.join(", ")
        );
        PriorTraining::llamagen(self.steps, self.batch_size, self.learning_rate)
            .validate()
            .context("--prior-steps / --prior-batch-size / --prior-lr")
    }
}

/// One method × seed of the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct DownstreamRow {
    /// Method.
    pub method: String,
    /// Seed (of the tokenizer and its prior).
    pub seed: u64,
    /// Held-out reconstruction MSE of the tokenizer.
    pub val_rec_mse: f64,
    /// Held-out codebook usage of the tokenizer.
    pub val_usage: f64,
    /// Held-out perplexity of the tokenizer's codes.
    pub val_perplexity: f64,
    /// The prior's held-out likelihood.
    pub prior: Likelihood,
    /// Its samples' quality (data with labels or Inception weights only).
    pub generation: Option<GenerationMetrics>,
}

/// A metric of the downstream table.
struct Column {
    key: &'static str,
    title: &'static str,
    get: fn(&DownstreamRow) -> Option<f64>,
    show: fn(f64) -> String,
}

const COLUMNS: [Column; 12] = [
    Column {
        key: "val_rec_mse",
        title: "Val rec. MSE",
        get: |r| Some(r.val_rec_mse),
        show: |v| format!("{v:.5}"),
    },
    Column {
        key: "val_usage",
        title: "Codebook usage (val)",
        get: |r| Some(r.val_usage),
        show: percent,
    },
    Column {
        key: "val_perplexity",
        title: "Code perplexity (val)",
        get: |r| Some(r.val_perplexity),
        show: |v| format!("{v:.1}"),
    },
    Column {
        key: "prior_bits_per_token",
        title: "Prior NLL (val, bits/code)",
        get: |r| Some(r.prior.bits_per_token),
        show: |v| format!("{v:.4}"),
    },
    Column {
        key: "domain_fd",
        title: "Samples' domain FD (vs val)",
        get: |r| domain(r).map(|d| d.fd),
        show: |v| format!("{v:.3}"),
    },
    Column {
        key: "domain_precision",
        title: "Domain precision",
        get: |r| domain(r).map(|d| d.precision),
        show: percent,
    },
    Column {
        key: "domain_recall",
        title: "Domain recall",
        get: |r| domain(r).map(|d| d.recall),
        show: percent,
    },
    Column {
        key: "class_accuracy",
        title: "Samples' class accuracy",
        get: |r| domain(r).and_then(|d| d.class_accuracy),
        show: percent,
    },
    Column {
        key: "fid",
        title: "Samples' FID (Inception, vs val)",
        get: |r| inception(r).map(|m| m.fid),
        show: |v| format!("{v:.2}"),
    },
    Column {
        key: "inception_score",
        title: "Samples' IS",
        get: |r| inception(r).map(|m| m.is_mean),
        show: |v| format!("{v:.3}"),
    },
    Column {
        key: "precision",
        title: "Precision (Inception)",
        get: |r| inception(r).map(|m| m.precision),
        show: percent,
    },
    Column {
        key: "recall",
        title: "Recall (Inception)",
        get: |r| inception(r).map(|m| m.recall),
        show: percent,
    },
];

fn percent(v: f64) -> String {
    format!("{:.1}%", 100.0 * v)
}

fn domain(r: &DownstreamRow) -> Option<&DomainMetrics> {
    r.generation.as_ref().and_then(|g| g.domain.as_ref())
}

fn inception(r: &DownstreamRow) -> Option<&InceptionMetrics> {
    r.generation.as_ref().and_then(|g| g.inception.as_ref())
}

/// Per method: each metric's summary and the paired comparison with the first method.
#[derive(Debug, Clone, Serialize)]
pub struct DownstreamStats {
    /// Method.
    pub method: String,
    /// Per metric key: summary over seeds and paired comparison (not for the first method).
    pub metrics: Vec<(String, Summary, Option<Paired>)>,
}

/// Trains (or reuses) the tokenizers of `sweep` (methods × seeds) under `base.out`, encodes
/// both splits with each, trains `plan`'s prior on each training split and measures it on the
/// held-out codes; writes `downstream.md` and `downstream.json`.
///
/// # Errors
/// A sweep with a grid axis (methods × seeds only); errors of training, encoding, priors.
pub fn downstream(
    base: &TrainOptions,
    sweep: &Sweep,
    plan: &PriorPlan,
) -> Result<(Vec<DownstreamRow>, Vec<DownstreamStats>)> {
    ensure!(
        sweep.families.is_empty() && sweep.codebook_sizes.is_empty() && sweep.ema_decays.is_empty(),
        "the downstream comparison runs methods × seeds (no --grid)"
    );
    plan.validate()?;
    let (rows, _) = crate::sweep::sweep(base, sweep)?;
    let judge = Judge::new(base)?;
    let mut out = Vec::new();
    for r in &rows {
        let method = Method::from_name(&r.method)?;
        let seed = (!sweep.seeds.is_empty()).then_some(r.seed);
        let tok = run_folder(&base.out, None, method, seed);
        eprintln!("== prior on {} ({})", r.method, tok.display());
        let prior = prior_of(&tok, r.seed, plan)?;
        let generation = match &judge {
            Some(j) => Some(j.generation_of(&tok, r.seed, plan.device)?),
            None => None,
        };
        out.push(row(r, prior, generation));
    }
    let stats = statistics(&out);
    let md = markdown(base, plan, &out, &stats);
    let dir = RunDir::new(&base.out);
    crate::checkpoint::write_atomic(&dir.path().join("downstream.md"), md.as_bytes())?;
    let json = serde_json::json!({ "rows": out, "stats": stats });
    crate::checkpoint::write_atomic(
        &dir.path().join("downstream.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    Ok((out, stats))
}

fn row(r: &SweepRow, prior: Likelihood, generation: Option<GenerationMetrics>) -> DownstreamRow {
    DownstreamRow {
        method: r.method.clone(),
        seed: r.seed,
        val_rec_mse: r.row.val.rec_mse,
        val_usage: r.row.val.usage,
        val_perplexity: r.row.val.perplexity,
        prior,
        generation,
    }
}

/// The codes of tokenizer run `tok` (kept when complete), its prior (resumed or reused) and
/// the prior's held-out likelihood.
fn prior_of(tok: &Path, seed: u64, plan: &PriorPlan) -> Result<Likelihood> {
    let mut run = LoadedRun::load(tok, plan.device)?;
    let batch = run.config.micro_batch;
    let mut codes = |split: Split, name: &str| -> Result<PathBuf> {
        let path = tok.join(name);
        encode(&mut run, None, split, &path, 50_000, batch, false)?;
        Ok(path)
    };
    let (train, val) = (
        codes(Split::Train, "codes-train.safetensors")?,
        codes(Split::Test, "codes-val.safetensors")?,
    );
    drop(run);
    let out = tok.join("prior");
    let eval = RunDir::new(&out).eval();
    if let Ok(text) = std::fs::read_to_string(&eval) {
        let done: Likelihood = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a prior's eval.json", eval.display()))?;
        return Ok(done);
    }
    let set = crate::codeset::CodeSet::open(std::slice::from_ref(&train))?;
    let training = PriorTraining::llamagen(plan.steps, plan.batch_size, plan.learning_rate);
    let config = PriorRunConfig::for_codes(
        &plan.preset,
        &set,
        (vec![train], vec![val]),
        Some(tok.to_path_buf()),
        training,
        seed,
    )?;
    let opts = PriorOptions {
        config,
        resume: out.exists(),
        out,
        device: plan.device,
        log_every: 50,
        checkpoint_every: 200,
        progress: false,
        stop_after: None,
    };
    train_prior(opts, set, None)?
        .eval
        .context("the prior run measured no held-out likelihood")
}

/// Summaries per method and paired comparisons (by seed) with the first method.
fn statistics(rows: &[DownstreamRow]) -> Vec<DownstreamStats> {
    let mut methods: Vec<&str> = Vec::new();
    for r in rows {
        if !methods.contains(&r.method.as_str()) {
            methods.push(&r.method);
        }
    }
    let of = |m: &str| -> Vec<&DownstreamRow> { rows.iter().filter(|r| r.method == m).collect() };
    methods
        .iter()
        .map(|&m| {
            let mine = of(m);
            let first = (methods[0] != m).then(|| of(methods[0]));
            let metrics = COLUMNS
                .iter()
                .map(|c| {
                    let values: Vec<f64> = mine.iter().filter_map(|r| (c.get)(r)).collect();
                    let paired = first.as_ref().map(|theirs| {
                        let (mut a, mut b) = (Vec::new(), Vec::new());
                        for r in &mine {
                            let t = theirs.iter().find(|t| t.seed == r.seed);
                            if let (Some(x), Some(y)) = (t.and_then(|t| (c.get)(t)), (c.get)(r)) {
                                a.push(x);
                                b.push(y);
                            }
                        }
                        stats::paired(&a, &b)
                    });
                    (c.key.to_owned(), stats::summary(&values), paired)
                })
                .collect();
            DownstreamStats {
                method: m.to_owned(),
                metrics,
            }
        })
        .collect()
}

/// The comparison as markdown: what ran, the summary, the paired differences, every run.
/// Columns no run measured (Inception metrics without its weights) are left out.
fn markdown(
    base: &TrainOptions,
    plan: &PriorPlan,
    rows: &[DownstreamRow],
    stats: &[DownstreamStats],
) -> String {
    let shown: Vec<usize> = (0..COLUMNS.len())
        .filter(|&i| rows.iter().any(|r| (COLUMNS[i].get)(r).is_some()))
        .collect();
    let head: Vec<&str> = shown.iter().map(|&i| COLUMNS[i].title).collect();
    let header = |first: &str| {
        format!(
            "| {first} | {} |\n|---|{}\n",
            head.join(" | "),
            "---|".repeat(head.len() + first.matches('|').count())
        )
    };
    let mut s = preamble(base, plan, rows);
    s += &header("Method");
    for st in stats {
        let v: Vec<String> = shown
            .iter()
            .map(|&i| {
                let (c, (_, sum, _)) = (&COLUMNS[i], &st.metrics[i]);
                match sum.n {
                    0 => "—".to_owned(),
                    1 => (c.show)(sum.mean),
                    _ => format!("{} ± {}", (c.show)(sum.mean), (c.show)(sum.sd)),
                }
            })
            .collect();
        let _ = writeln!(s, "| {} | {} |", st.method, v.join(" | "));
    }
    let first = stats.first().map_or("", |f| f.method.as_str());
    let _ = writeln!(s, "\nPaired differences (method − {first}):\n");
    s += &header("Method");
    for st in stats.iter().skip(1) {
        let v: Vec<String> = shown
            .iter()
            .map(|&i| paired_cell(&st.metrics[i].2))
            .collect();
        let _ = writeln!(s, "| {} | {} |", st.method, v.join(" | "));
    }
    let _ = writeln!(s, "\nEvery run:\n");
    s += &header("Method | Seed | Prior NLL (bits/image)");
    for r in rows {
        let v: Vec<String> = shown
            .iter()
            .map(|&i| (COLUMNS[i].get)(r).map_or_else(|| "—".to_owned(), COLUMNS[i].show))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {} |",
            r.method,
            r.seed,
            r.prior.bits_per_image,
            v.join(" | ")
        );
    }
    s
}

/// A paired difference with its p-value and verdict.
fn paired_cell(p: &Option<Paired>) -> String {
    match p {
        Some(p) if p.n > 0 => format!(
            "{:+.4} ({}, {})",
            p.mean_diff,
            p.p.map_or_else(|| "p —".to_owned(), |v| format!("p = {v:.3}")),
            p.verdict.word()
        ),
        _ => "—".into(),
    }
}

/// What ran and what each kind of number means.
fn preamble(base: &TrainOptions, plan: &PriorPlan, rows: &[DownstreamRow]) -> String {
    let c = &base.config;
    let mut s = format!(
        "Tokenizers: preset `{}` on {}, {} steps of batch {}. Priors: `{}`, {} steps of batch {} \
         at lr {}, on each tokenizer's training codes; NLL on its held-out codes.\n\n",
        c.preset,
        c.data,
        c.training.steps,
        c.training.batch_size,
        plan.preset,
        plan.steps,
        plan.batch_size,
        plan.learning_rate
    );
    let _ = writeln!(
        s,
        "Mean ± sample standard deviation over the seeds; paired differences against the first \
         method (clear only when the paired t-test gives p < {} and every seed agrees in sign, \
         at least {} seeds). A prior's NLL compares tokenizers of the same codebook size: fewer \
         bits per code mean codes that are easier to model, not better images by themselves.\n",
        stats::ALPHA,
        stats::MIN_SEEDS
    );
    let Some(g) = rows.iter().find_map(|r| r.generation.as_ref()) else {
        return s;
    };
    let _ = write!(
        s,
        "Samples: {SAMPLES_PER_CLASS} grids per class (temperature 1, no top-k / top-p, no \
         guidance), decoded by their tokenizer, against the {} held-out images. Precision / \
         recall: Kynkäänniemi et al.'s improved metrics (k = {}): the share of samples inside the \
         held-out images' feature manifold, and of held-out images inside the samples'.",
        g.reference,
        crate::domain::PRC_NEIGHBOURS
    );
    if let Some(d) = &g.domain {
        let _ = write!(
            s,
            " Domain FD, precision, recall: on the features of a small classifier trained on the \
             data's labels ({:.1}% held-out accuracy) — FID's recipe with another network, not \
             comparable with Inception FID. Class accuracy: the fraction of samples that \
             classifier assigns to the class they were drawn for.",
            100.0 * d.classifier_accuracy
        );
    }
    if g.inception.is_some() {
        let _ = write!(
            s,
            " FID, IS, precision, recall (Inception): on pytorch-fid's Inception pool features \
             and logits (IS over 10 splits)."
        );
    }
    s += "\n\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prior settings are checked before the first tokenizer trains.
    #[test]
    fn a_bad_prior_plan_is_named_before_any_work() {
        let plan = |preset: &str, steps, lr| PriorPlan {
            preset: preset.into(),
            steps,
            batch_size: 8,
            learning_rate: lr,
            device: Device::Cpu,
        };
        assert!(plan("demo", 10, 1e-3).validate().is_ok());
        for (bad, said) in [
            (plan("gpt9", 10, 1e-3), "unknown"),
            (plan("demo", 0, 1e-3), "steps must be > 0"),
            (plan("demo", 10, f64::NAN), "learning_rate"),
        ] {
            let err = format!("{:#}", bad.validate().unwrap_err());
            assert!(err.contains(said), "{err}");
        }
    }
}
