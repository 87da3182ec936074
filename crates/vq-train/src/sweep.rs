//! `compare --seeds` and `compare --grid`: every method × setting × seed, with statistics
//! over the seeds ([`crate::stats`]: mean ± standard deviation, and the paired rule that calls
//! a difference clear).
//!
//! A setting is one point of the grid's axes (quantizer family, codebook size, EMA decay). Runs
//! live in `out/<setting>/<method>/seed<s>/` (a part is left out when its axis is not swept), so
//! a sweep run again with `--resume` evaluates the finished runs, continues the others, and
//! trains only what is missing. Within a setting and a seed, the runs start from the same
//! weights and codebook and see the same data order; only the method differs. The first method
//! is the one the others are compared with.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use vq_tch::{CodebookLearning, Family};

use crate::checkpoint::write_atomic;
use crate::compare::{CompareRow, evaluate_run, run_title, train_or_reuse};
use crate::config::{RunConfig, TrainOptions};
use crate::layout::RunDir;
use crate::method::Method;
use crate::stats::{self, Paired, Summary};

/// One point of a grid: the axes that are swept, each `None` when it is not.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Setting {
    /// Quantizer family.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "family_name"
    )]
    pub family: Option<Family>,
    /// Codebook size K.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codebook_size: Option<usize>,
    /// EMA decay of the codebook.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ema_decay: Option<f32>,
}

fn family_name<S: serde::Serializer>(f: &Option<Family>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&f.map(|f| f.name()).unwrap_or_default())
}

impl Setting {
    /// `residual4 K=256 decay=0.8` (the swept axes only; empty when none is).
    pub fn label(&self) -> String {
        let mut parts = Vec::new();
        parts.extend(self.family.map(|f| f.name()));
        parts.extend(self.codebook_size.map(|k| format!("K={k}")));
        parts.extend(self.ema_decay.map(|d| format!("decay={d}")));
        parts.join(" ")
    }

    /// The folder name: the label with `-` between parts and no `=`.
    pub fn folder(&self) -> String {
        self.label()
            .replace("K=", "k")
            .replace('=', "")
            .replace(' ', "-")
    }

    /// Sets the swept axes of `config`: codebook size, then the family (which may fix K), then
    /// the EMA decay.
    ///
    /// # Errors
    /// A decay for a codebook learned by gradient, a size the family fixes otherwise (FSQ), or
    /// the family's rules.
    pub fn apply(&self, config: &mut RunConfig) -> Result<()> {
        if let Some(k) = self.codebook_size {
            config.model.quantizer.codebook_size = k;
        }
        if let Some(family) = self.family {
            config.set_family(family)?;
        }
        if let Some(d) = self.ema_decay {
            let CodebookLearning::Ema { decay, .. } = &mut config.model.quantizer.learning else {
                bail!(
                    "setting {}: an EMA decay needs an EMA codebook, but this quantizer learns \
                     its codebook by gradient",
                    self.label()
                );
            };
            *decay = d;
        }
        if let Some(k) = self.codebook_size
            && config.model.quantizer.codebook_size != k
        {
            bail!(
                "setting {}: the family fixes the codebook size at {} (sweep K with another family)",
                self.label(),
                config.model.quantizer.codebook_size
            );
        }
        config
            .validate()
            .with_context(|| format!("setting {}", self.label()))
    }
}

/// The axes of a sweep. Empty axes are not swept (the configuration's value is used).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sweep {
    /// Methods compared in every setting; the first is the reference of the paired tests.
    pub methods: Vec<Method>,
    /// Quantizer families.
    pub families: Vec<Family>,
    /// Codebook sizes.
    pub codebook_sizes: Vec<usize>,
    /// EMA decays.
    pub ema_decays: Vec<f32>,
    /// Seeds (each sets the run's seed and the quantizer's).
    pub seeds: Vec<u64>,
}

impl Sweep {
    /// Adds the values of one `--grid AXIS=V1,V2,...` argument (axes `family`,
    /// `codebook-size`, `ema-decay`).
    ///
    /// ```
    /// let mut s = vq_train::sweep::Sweep::default();
    /// s.add_axis("family=nearest,residual4").unwrap();
    /// s.add_axis("codebook-size=64,256").unwrap();
    /// assert_eq!(s.settings().len(), 4);
    /// assert!(s.add_axis("temperature=1").is_err());
    /// ```
    ///
    /// # Errors
    /// An unknown axis, an unparsable value, or an axis given twice.
    pub fn add_axis(&mut self, arg: &str) -> Result<()> {
        let (axis, values) = arg.split_once('=').with_context(|| {
            format!(
                "--grid {arg:?}: expected AXIS=V1,V2,... (axes: family, codebook-size, ema-decay)"
            )
        })?;
        let values: Vec<&str> = values
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        ensure!(!values.is_empty(), "--grid {arg:?}: no values");
        let twice = |empty: bool| match empty {
            true => Ok(()),
            false => Err(anyhow::anyhow!("--grid {axis} is given twice")),
        };
        match axis {
            "family" => {
                twice(self.families.is_empty())?;
                self.families = values
                    .iter()
                    .map(|v| Family::from_name(v))
                    .collect::<vq_tch::Result<_>>()?;
            }
            "codebook-size" => {
                twice(self.codebook_sizes.is_empty())?;
                self.codebook_sizes = values
                    .iter()
                    .map(|v| v.parse().ok().filter(|&k: &usize| k > 0))
                    .collect::<Option<_>>()
                    .with_context(|| format!("--grid {arg:?}: codebook sizes are integers > 0"))?;
            }
            "ema-decay" => {
                twice(self.ema_decays.is_empty())?;
                self.ema_decays = values
                    .iter()
                    .map(|v| v.parse().ok().filter(|d: &f32| (0.0..1.0).contains(d)))
                    .collect::<Option<_>>()
                    .with_context(|| format!("--grid {arg:?}: EMA decays are numbers in [0, 1)"))?;
            }
            other => bail!(
                "--grid: unknown axis {other:?} (axes: family, codebook-size, ema-decay; methods go in --estimators, seeds in --seeds)"
            ),
        }
        Ok(())
    }

    /// Every point of the grid, family-major; one empty setting when no axis is swept.
    pub fn settings(&self) -> Vec<Setting> {
        fn axis<T: Copy>(v: &[T]) -> Vec<Option<T>> {
            match v.is_empty() {
                true => vec![None],
                false => v.iter().copied().map(Some).collect(),
            }
        }
        let mut out = Vec::new();
        for family in axis(&self.families) {
            for codebook_size in axis(&self.codebook_sizes) {
                for ema_decay in axis(&self.ema_decays) {
                    out.push(Setting {
                        family,
                        codebook_size,
                        ema_decay,
                    });
                }
            }
        }
        out
    }

    /// Whether only methods vary (the one-seed comparison of [`crate::compare::compare`]).
    pub fn is_methods_only(&self) -> bool {
        self.families.is_empty()
            && self.codebook_sizes.is_empty()
            && self.ema_decays.is_empty()
            && self.seeds.is_empty()
    }
}

/// The methods of `--estimators`, each once.
///
/// # Errors
/// An unknown name, or a method given twice (under any of its names).
pub fn parse_methods(names: &[String]) -> Result<Vec<Method>> {
    let mut methods: Vec<Method> = Vec::with_capacity(names.len());
    for name in names {
        let m = Method::from_name(name)?;
        ensure!(
            !methods.contains(&m),
            "--estimators names {} twice",
            m.name()
        );
        methods.push(m);
    }
    Ok(methods)
}

/// Parses `--seeds`: `A..B` (B excluded), `A..=B`, or a comma list.
///
/// ```
/// use vq_train::sweep::parse_seeds;
/// assert_eq!(parse_seeds("0..5").unwrap(), vec![0, 1, 2, 3, 4]);
/// assert_eq!(parse_seeds("0..=4").unwrap(), vec![0, 1, 2, 3, 4]);
/// assert_eq!(parse_seeds("3,1,7").unwrap(), vec![3, 1, 7]);
/// assert!(parse_seeds("4..4").is_err());
/// assert!(parse_seeds("1,1").is_err());
/// ```
///
/// # Errors
/// An empty or unparsable list, or a seed given twice.
pub fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    let bad =
        || format!("--seeds {s:?}: expected A..B, A..=B or a comma-separated list of integers");
    let seeds: Vec<u64> = if let Some((a, b)) = s.split_once("..") {
        let (b, inclusive) = match b.strip_prefix('=') {
            Some(b) => (b, true),
            None => (b, false),
        };
        let (a, b): (u64, u64) = (
            a.trim().parse().with_context(bad)?,
            b.trim().parse().with_context(bad)?,
        );
        match inclusive {
            true => (a..=b).collect(),
            false => (a..b).collect(),
        }
    } else {
        s.split(',')
            .map(|v| v.trim().parse().with_context(bad))
            .collect::<Result<_>>()?
    };
    ensure!(!seeds.is_empty(), "--seeds {s:?} holds no seed");
    let mut sorted = seeds.clone();
    sorted.sort_unstable();
    sorted.dedup();
    ensure!(
        sorted.len() == seeds.len(),
        "--seeds {s:?} names a seed twice"
    );
    Ok(seeds)
}

/// One trained and evaluated run of a sweep.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SweepRow {
    /// The setting's label (empty when no axis is swept).
    pub setting: String,
    /// The method's name.
    pub method: String,
    /// The seed.
    pub seed: u64,
    /// Its metrics.
    #[serde(flatten)]
    pub row: CompareRow,
}

/// A metric the statistics are reported for.
#[derive(Clone, Copy)]
struct Column {
    key: &'static str,
    title: &'static str,
    get: fn(&CompareRow) -> Option<f64>,
    show: fn(f64) -> String,
    /// The unit of a difference (`pp` for percentages).
    diff: fn(f64) -> String,
}

const COLUMNS: [Column; 4] = [
    Column {
        key: "usage",
        title: "Codebook usage (val, per 256 images)",
        get: |r| Some(r.val.usage),
        show: |v| format!("{:.1}%", 100.0 * v),
        diff: |v| format!("{:+.1} pp", 100.0 * v),
    },
    Column {
        key: "val-mse",
        title: "Val rec. MSE",
        get: |r| Some(r.val.rec_mse),
        show: |v| format!("{v:.5}"),
        diff: |v| format!("{v:+.5}"),
    },
    Column {
        key: "quantization-error",
        title: "Quantization error (val)",
        // A Gumbel quantizer has no encoder vector to compare with its code (the paper's "—").
        get: |r| (r.estimator != Method::Gumbel.name()).then_some(r.val.quantization_error),
        show: |v| format!("{v:.3e}"),
        diff: |v| format!("{v:+.2e}"),
    },
    Column {
        key: "perplexity",
        title: "Perplexity (val)",
        get: |r| Some(r.val.perplexity),
        show: |v| format!("{v:.1}"),
        diff: |v| format!("{v:+.1}"),
    },
];

/// The statistics of one method in one setting.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CellStats {
    /// The setting's label.
    pub setting: String,
    /// The method.
    pub method: String,
    /// Seeds of this cell, in order.
    pub seeds: Vec<u64>,
    /// Per metric key: the summary over seeds and, except for the first method, the paired
    /// comparison with the first method of the setting.
    pub metrics: Vec<(String, Summary, Option<Paired>)>,
}

/// The folder of one run of a sweep under `out`: `[<setting>/]<method>[/seed<s>]`.
pub fn run_folder(
    out: &Path,
    setting: Option<&Setting>,
    method: Method,
    seed: Option<u64>,
) -> PathBuf {
    let mut out = out.to_path_buf();
    if let Some(setting) = setting {
        out.push(setting.folder());
    }
    out.push(method.name());
    if let Some(s) = seed {
        out.push(format!("seed{s}"));
    }
    out
}

/// Trains, evaluates and summarises every method × setting × seed of `sweep` under
/// `base.out` (module docs), writing `compare.md`, `compare.json` and one
/// `compare-<metric>.png` per metric (means with ± one standard deviation bars) there.
///
/// # Errors
/// A combination the configuration cannot run (refused before any run trains), and the errors
/// of training and evaluation.
pub fn sweep(base: &TrainOptions, sweep: &Sweep) -> Result<(Vec<SweepRow>, Vec<CellStats>)> {
    ensure!(!sweep.methods.is_empty(), "no method to compare");
    let settings = sweep.settings();
    let seeds: Vec<Option<u64>> = match sweep.seeds.is_empty() {
        true => vec![None],
        false => sweep.seeds.iter().copied().map(Some).collect(),
    };
    let swept = settings.iter().any(|s| *s != Setting::default());
    // Every run's configuration first: a combination that cannot run stops the sweep here.
    let mut cells = Vec::new();
    for setting in &settings {
        for &method in &sweep.methods {
            for &seed in &seeds {
                let mut config = base.config.clone();
                setting.apply(&mut config)?;
                if let Some(s) = seed {
                    config.seed = s;
                    config.model.quantizer.seed = s;
                }
                method.apply(&mut config).with_context(|| {
                    format!("setting {:?}, method {}", setting.label(), method.name())
                })?;
                let out = run_folder(&base.out, swept.then_some(setting), method, seed);
                cells.push((*setting, method, config, out));
            }
        }
    }
    let mut rows = Vec::new();
    for (i, (setting, method, config, out)) in cells.iter().enumerate() {
        eprintln!(
            "== {} {} seed {} ({} of {}, {})",
            setting.label(),
            method.name(),
            config.seed,
            i + 1,
            cells.len(),
            out.display()
        );
        let mut model = train_or_reuse(base, config, out)?;
        let row = evaluate_run(&mut model, config, out, base.device)?.row;
        eprintln!(
            "   val rec {:.5}, usage {:.1}%, QE {:.3e}",
            row.val.rec_mse,
            100.0 * row.val.usage,
            row.val.quantization_error
        );
        rows.push(SweepRow {
            setting: setting.label(),
            method: method.name().to_owned(),
            seed: config.seed,
            row,
        });
    }
    let stats = statistics(&rows);
    write_outputs(base, sweep, &rows, &stats)?;
    Ok((rows, stats))
}

/// Per setting and method: summaries, and paired comparisons with the setting's first method.
fn statistics(rows: &[SweepRow]) -> Vec<CellStats> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in rows {
        let key = (r.setting.clone(), r.method.clone());
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let cell = |s: &str, m: &str| -> Vec<&SweepRow> {
        rows.iter()
            .filter(|r| r.setting == s && r.method == m)
            .collect()
    };
    keys.iter()
        .map(|(setting, method)| {
            let mine = cell(setting, method);
            let first = keys
                .iter()
                .find(|(s, _)| s == setting)
                .map(|(_, m)| m.as_str());
            let reference = first.filter(|m| *m != method).map(|m| cell(setting, m));
            let metrics = COLUMNS
                .iter()
                .map(|c| {
                    let values: Vec<f64> = mine.iter().filter_map(|r| (c.get)(&r.row)).collect();
                    let paired = reference.as_ref().and_then(|theirs| {
                        // Paired by seed: only seeds both cells have.
                        let (mut a, mut b) = (Vec::new(), Vec::new());
                        for r in &mine {
                            let other = theirs.iter().find(|t| t.seed == r.seed)?;
                            a.push((c.get)(&other.row)?);
                            b.push((c.get)(&r.row)?);
                        }
                        Some(stats::paired(&a, &b))
                    });
                    (c.key.to_owned(), stats::summary(&values), paired)
                })
                .collect();
            CellStats {
                setting: setting.clone(),
                method: method.clone(),
                seeds: mine.iter().map(|r| r.seed).collect(),
                metrics,
            }
        })
        .collect()
}

/// The sweep as markdown: the summary table, the paired comparisons, the per-seed numbers.
pub fn markdown(
    config: &RunConfig,
    sweep: &Sweep,
    rows: &[SweepRow],
    stats: &[CellStats],
) -> String {
    let mut s = String::new();
    preamble(&mut s, config, sweep);
    let head: Vec<&str> = COLUMNS.iter().map(|c| c.title).collect();
    let _ = writeln!(s, "| Setting | Method | {} |", head.join(" | "));
    let _ = writeln!(s, "|---|---|{}", "---|".repeat(COLUMNS.len()));
    for cell in stats {
        let values: Vec<String> = COLUMNS
            .iter()
            .zip(&cell.metrics)
            .map(|(c, (_, sum, _))| match sum.n {
                0 => "—".to_owned(),
                1 => (c.show)(sum.mean),
                _ => format!("{} ± {}", (c.show)(sum.mean), (c.show)(sum.sd)),
            })
            .collect();
        cell_row(&mut s, cell, &values);
    }
    paired_table(&mut s, stats, &head);
    every_run(&mut s, rows, &head);
    s
}

/// What was run and the rule of the verdicts.
fn preamble(s: &mut String, config: &RunConfig, sweep: &Sweep) {
    let seeds: Vec<String> = sweep.seeds.iter().map(u64::to_string).collect();
    let _ = writeln!(
        s,
        "Preset `{}` on {}: {} steps of batch {}; seeds {} (n = {}).\n",
        config.preset,
        config.data,
        config.training.steps,
        config.training.batch_size,
        match seeds.is_empty() {
            true => config.seed.to_string(),
            false => seeds.join(", "),
        },
        sweep.seeds.len().max(1),
    );
    let _ = writeln!(
        s,
        "Mean ± sample standard deviation over the seeds. A difference from the first method of \
         its setting is **clear** only when the two-sided paired t-test over the seeds gives \
         p < {} and every seed's difference has the same sign (at least {} seeds).\n",
        stats::ALPHA,
        stats::MIN_SEEDS
    );
}

/// The paired differences against each setting's first method, where there are any.
fn paired_table(s: &mut String, stats: &[CellStats], head: &[&str]) {
    let compared: Vec<&CellStats> = stats
        .iter()
        .filter(|c| c.metrics.iter().any(|m| m.2.is_some()))
        .collect();
    if compared.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nPaired differences (method − the setting's first method; p of the paired t-test):\n"
    );
    let _ = writeln!(s, "| Setting | Method | {} |", head.join(" | "));
    let _ = writeln!(s, "|---|---|{}", "---|".repeat(COLUMNS.len()));
    for cell in compared {
        let values: Vec<String> = COLUMNS
            .iter()
            .zip(&cell.metrics)
            .map(|(c, (_, _, p))| match p {
                None => "—".to_owned(),
                Some(p) => {
                    let pv =
                        p.p.map_or_else(|| "p —".to_owned(), |v| format!("p = {v:.3}"));
                    let word = p.verdict.word();
                    let word = match p.verdict {
                        stats::Verdict::ClearlyHigher | stats::Verdict::ClearlyLower => {
                            format!("**{word}**")
                        }
                        _ => word.to_owned(),
                    };
                    format!("{} ({pv}, {word})", (c.diff)(p.mean_diff))
                }
            })
            .collect();
        cell_row(s, cell, &values);
    }
}

/// Every run's numbers.
fn every_run(s: &mut String, rows: &[SweepRow], head: &[&str]) {
    let _ = writeln!(s, "\nEvery run:\n");
    let _ = writeln!(
        s,
        "| Setting | Method | Seed | {} | Train s |",
        head.join(" | ")
    );
    let _ = writeln!(s, "|---|---|---|{}---|", "---|".repeat(COLUMNS.len()));
    for r in rows {
        let values: Vec<String> = COLUMNS
            .iter()
            .map(|c| (c.get)(&r.row).map_or_else(|| "—".to_owned(), c.show))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.0} |",
            r.setting,
            r.method,
            r.seed,
            values.join(" | "),
            r.row.train_seconds
        );
    }
}

/// One table row of a cell: its setting, its method, then `values`.
fn cell_row(s: &mut String, cell: &CellStats, values: &[String]) {
    let _ = writeln!(
        s,
        "| {} | {} | {} |",
        cell.setting,
        cell.method,
        values.join(" | ")
    );
}

fn write_outputs(
    base: &TrainOptions,
    sweep: &Sweep,
    rows: &[SweepRow],
    stats: &[CellStats],
) -> Result<()> {
    let md = markdown(&base.config, sweep, rows, stats);
    write_atomic(&RunDir::new(&base.out).compare_md(), md.as_bytes())?;
    let json = serde_json::json!({
        "run": base.config,
        "axes": {
            "methods": sweep.methods.iter().map(|m| m.name()).collect::<Vec<_>>(),
            "families": sweep.families.iter().map(|f| f.name()).collect::<Vec<_>>(),
            "codebook_sizes": sweep.codebook_sizes,
            "ema_decays": sweep.ema_decays,
            "seeds": sweep.seeds,
        },
        "rule": format!(
            "clear: two-sided paired t-test over seeds p < {}, the same sign in every seed, at least {} seeds",
            stats::ALPHA, stats::MIN_SEEDS
        ),
        "rows": rows,
        "statistics": stats,
    });
    write_atomic(
        &RunDir::new(&base.out).compare_json(),
        &serde_json::to_vec_pretty(&json)?,
    )?;
    for (i, c) in COLUMNS.iter().enumerate() {
        plot_column(base, stats, i, c)?;
    }
    Ok(())
}

/// `compare-<metric>.png`: the settings on the x axis (or the methods, for one setting), one
/// series per method, mean with a bar of ± one standard deviation.
fn plot_column(base: &TrainOptions, stats: &[CellStats], i: usize, c: &Column) -> Result<()> {
    use vq_plot::{Figure, Panel, Scale, Series};
    let mut settings: Vec<&str> = Vec::new();
    let mut methods: Vec<&str> = Vec::new();
    for cell in stats {
        if !settings.contains(&cell.setting.as_str()) {
            settings.push(&cell.setting);
        }
        if !methods.contains(&cell.method.as_str()) {
            methods.push(&cell.method);
        }
    }
    let by_method = settings.len() == 1;
    let categories: Vec<String> = match by_method {
        true => methods.iter().map(|m| m.to_string()).collect(),
        false => settings.iter().map(|s| s.to_string()).collect(),
    };
    let mut panel = Panel::new(
        format!("{}: mean ± sd over seeds", c.title),
        if by_method { "method" } else { "setting" },
        c.key,
        Scale::Linear,
    )
    .categorical(categories);
    let width = 0.5 / methods.len() as f64;
    for (m, method) in methods.iter().enumerate() {
        let offset = match by_method {
            true => 0.0,
            false => (m as f64 - (methods.len() - 1) as f64 / 2.0) * width,
        };
        let (mut points, mut spread) = (Vec::new(), Vec::new());
        for cell in stats.iter().filter(|s| s.method == *method) {
            let x = match by_method {
                true => m as f64,
                false => settings
                    .iter()
                    .position(|s| *s == cell.setting)
                    .unwrap_or(0) as f64,
            } + offset;
            let (_, sum, _) = &cell.metrics[i];
            if sum.n > 0 {
                points.push((x, sum.mean));
                spread.push(sum.sd);
            }
        }
        panel = panel.with(Series::error_bars(*method, points, spread));
    }
    let title = format!("{}: {}", run_title(&base.config), c.title);
    let path: PathBuf = base.out.join(format!("compare-{}.png", c.key));
    let figure = Figure::new(title).panel(panel);
    crate::checkpoint::replace_file(&path, |tmp| {
        vq_plot::line_panels(tmp, &figure).with_context(|| format!("drawing {}", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A method named twice — under one name or two — would train and count its runs twice.
    #[test]
    fn a_method_named_twice_is_refused() {
        let names = |s: &str| s.split(',').map(str::to_owned).collect::<Vec<_>>();
        let ok = parse_methods(&names("ste,rotation,diveq")).unwrap();
        assert_eq!(ok.len(), 3);
        for twice in ["ste,rotation,ste", "ste,straight-through"] {
            let err = parse_methods(&names(twice)).unwrap_err().to_string();
            assert!(err.contains("names ste twice"), "{twice}: {err}");
        }
        assert!(parse_methods(&names("ste,nope")).is_err());
    }
}
