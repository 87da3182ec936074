//! The paper's 2-D experiments with numbers and pictures (see [`vq_core::toy`]):
//!
//! 1. the Himmelblau simulation (App. A.2, Fig. 8), STE vs rotation trick from the same
//!    initialisation, over several seeds; PNG frames of seed 0 at steps 0/33/66/100;
//! 2. the Voronoi push/pull experiment (§4.3, Figs. 4, 5, 10): intra-cell spread as a function
//!    of φ, near the origin and translated by +10; distance change as a function of θ.
//!
//! `cargo run --release -p vq-core --example toy_experiments [-- --seeds 8 --out runs/toy]`

use std::f64::consts::PI;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use vq_core::Estimator;
use vq_core::toy::{HimmelblauFrame, HimmelblauSetup, VoronoiSetup, himmelblau, voronoi_push_pull};

type Fallible<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Fallible<()> {
    let mut args = std::env::args().skip(1);
    let (mut seeds, mut out) = (8u64, PathBuf::from("runs/toy"));
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--seeds", Some(v)) => seeds = v.parse()?,
            ("--out", Some(v)) => out = PathBuf::from(v),
            _ => return Err("usage: toy_experiments [--seeds N] [--out DIR]".into()),
        }
    }
    std::fs::create_dir_all(&out)?;
    run_himmelblau(seeds, &out)?;
    run_voronoi(&out)?;
    Ok(())
}

fn run_himmelblau(seeds: u64, out: &Path) -> Fallible<()> {
    let p = HimmelblauSetup::paper(0);
    println!(
        "## Himmelblau simulation (paper A.2)\n\n{} points ~ U[-{e},{e}]², {} codes = random points, EMA decay {}, lr {}, {} steps\n",
        p.points,
        p.codes,
        p.decay,
        p.lr,
        p.steps,
        e = p.extent
    );
    println!(
        "| seed | step | STE distortion | rotation distortion | STE objective | rotation objective | STE codes used | rotation codes used |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let record = [0, 33, 66, 100];
    let (mut sd, mut rd, mut so, mut ro, mut wins) = (0.0, 0.0, 0.0, 0.0, 0);
    for seed in 0..seeds {
        let setup = HimmelblauSetup::paper(seed);
        let ste = himmelblau(&setup, Estimator::StraightThrough, &record)?;
        let rot = himmelblau(&setup, Estimator::Rotation, &record)?;
        for (s, r) in ste.iter().zip(&rot) {
            println!(
                "| {seed} | {} | {:.4} | {:.4} | {:.3} | {:.3} | {} | {} |",
                s.step,
                s.distortion,
                r.distortion,
                s.objective,
                r.objective,
                s.codes_used,
                r.codes_used
            );
            if seed == 0 {
                let path = out.join(format!("himmelblau_step{:03}.png", s.step));
                plot_himmelblau(&path, &ste[0], s, r)?;
            }
        }
        let (s, r) = (ste.last().ok_or("no frame")?, rot.last().ok_or("no frame")?);
        sd += s.distortion;
        rd += r.distortion;
        so += s.objective;
        ro += r.objective;
        wins += usize::from(r.distortion < s.distortion);
    }
    let n = seeds as f64;
    println!(
        "\nAfter {} steps, mean over {seeds} seeds: distortion STE {:.4}, rotation {:.4} (ratio {:.3}; rotation lower in {wins}/{seeds} seeds); objective f(q) STE {:.3}, rotation {:.3}.",
        p.steps,
        sd / n,
        rd / n,
        rd / sd,
        so / n,
        ro / n
    );
    println!(
        "Frames of seed 0: {}/himmelblau_step{{000,033,066,100}}.png (left STE, right rotation; grey: initial points, blue: points, orange: codewords, green: minima).\n",
        out.display()
    );
    Ok(())
}

/// Two panels (STE left, rotation right): initial points grey, current points blue, codewords
/// orange, Himmelblau's four minima green.
fn plot_himmelblau(
    path: &Path,
    init: &HimmelblauFrame,
    ste: &HimmelblauFrame,
    rot: &HimmelblauFrame,
) -> Fallible<()> {
    let root = BitMapBackend::new(path, (1200, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let minima = [
        (3.0, 2.0),
        (-2.805118, 3.131312),
        (-3.77931, -3.283186),
        (3.584428, -1.848126),
    ];
    for (area, frame) in root.split_evenly((1, 2)).iter().zip([ste, rot]) {
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .build_cartesian_2d(-7f32..7f32, -7f32..7f32)?;
        let axis = RGBColor(200, 200, 200);
        chart.draw_series(LineSeries::new([(-7.0, 0.0), (7.0, 0.0)], axis))?;
        chart.draw_series(LineSeries::new([(0.0, -7.0), (0.0, 7.0)], axis))?;
        let pts = |p: &ndarray::Array2<f32>| {
            p.rows()
                .into_iter()
                .map(|r| (r[0], r[1]))
                .collect::<Vec<_>>()
        };
        chart.draw_series(
            pts(&init.points)
                .into_iter()
                .map(|c| Circle::new(c, 1, RGBColor(190, 190, 190).filled())),
        )?;
        chart.draw_series(
            pts(&frame.points)
                .into_iter()
                .map(|c| Circle::new(c, 2, BLUE.filled())),
        )?;
        chart.draw_series(
            minima
                .iter()
                .map(|&c| Cross::new(c, 7, GREEN.stroke_width(3))),
        )?;
        chart.draw_series(
            pts(&frame.codebook)
                .into_iter()
                .map(|c| Circle::new(c, 6, RGBColor(255, 140, 0).filled())),
        )?;
    }
    root.present()?;
    Ok(())
}

fn run_voronoi(out: &Path) -> Fallible<()> {
    let near = VoronoiSetup::paper();
    let far = VoronoiSetup {
        offset: 10.0,
        ..near
    };
    println!(
        "## Voronoi push/pull (paper §4.3, Figs. 4, 5, 10)\n\nCodeword (1, 1) fixed; {} points on its circle up to {} rad away; {} steps of lr {} along the estimator's image of one constant update at angle φ to the codeword. Spread = mean pairwise distance after / before.\n",
        near.points, near.max_angle, near.steps, near.lr
    );
    println!("| φ (deg) | STE spread | rotation spread | rotation spread, translated +10 |");
    println!("|---|---|---|---|");
    let mut curves = [Vec::new(), Vec::new()];
    for i in 0..=24 {
        let phi = -PI + 2.0 * PI * f64::from(i) / 24.0;
        let ste = voronoi_push_pull(&near, Estimator::StraightThrough, phi)?.spread_ratio;
        let rot = voronoi_push_pull(&near, Estimator::Rotation, phi)?.spread_ratio;
        let rot_far = voronoi_push_pull(&far, Estimator::Rotation, phi)?.spread_ratio;
        if i % 3 == 0 {
            println!(
                "| {:.0} | {ste:.4} | {rot:.4} | {rot_far:.4} |",
                phi.to_degrees()
            );
        }
        curves[0].push((phi.to_degrees() as f32, rot as f32));
        curves[1].push((phi.to_degrees() as f32, rot_far as f32));
    }
    let path = out.join("voronoi_spread_vs_phi.png");
    draw_curves(&path, &curves, (-180.0, 180.0), &[RED, BLUE], 1.0)?;
    println!(
        "\nSpread against φ: {} (red: near the origin, blue: translated +10; the grey line is STE = 1).",
        path.display()
    );
    let mut by_theta = Vec::new();
    for (phi, colour) in [(0.0, RED), (PI / 2.0, BLACK), (PI, BLUE)] {
        let o = voronoi_push_pull(&near, Estimator::Rotation, phi)?;
        let s = voronoi_push_pull(&near, Estimator::StraightThrough, phi)?;
        let pts: Vec<(f32, f32)> = o
            .by_angle
            .iter()
            .zip(&s.by_angle)
            .map(|(r, s)| (r.0.to_degrees() as f32, (r.1 - s.1) as f32))
            .collect();
        by_theta.push((pts, colour));
    }
    let path = out.join("voronoi_distance_vs_theta.png");
    let (curves, colours): (Vec<_>, Vec<_>) = by_theta.into_iter().unzip();
    draw_curves(&path, &curves, (-40.0, 40.0), &colours, 0.0)?;
    println!(
        "Change of distance to the codeword, rotation minus STE, against θ: {} (red φ = 0°, black 90°, blue 180°; grey line 0).\n",
        path.display()
    );
    Ok(())
}

/// Line plot of several curves with a grey reference line at `y = reference`.
fn draw_curves(
    path: &Path,
    curves: &[Vec<(f32, f32)>],
    x: (f32, f32),
    colours: &[RGBColor],
    reference: f32,
) -> Fallible<()> {
    let ys = curves.iter().flatten().map(|p| p.1).chain([reference]);
    let (lo, hi) = ys.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let pad = (hi - lo).max(1e-6) * 0.05;
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .margin(15)
        .build_cartesian_2d(x.0..x.1, lo - pad..hi + pad)?;
    chart.draw_series(LineSeries::new(
        [(x.0, reference), (x.1, reference)],
        RGBColor(170, 170, 170),
    ))?;
    chart.draw_series(LineSeries::new(
        [(0.0, lo - pad), (0.0, hi + pad)],
        RGBColor(220, 220, 220),
    ))?;
    for (c, &colour) in curves.iter().zip(colours) {
        chart.draw_series(LineSeries::new(c.iter().copied(), colour.stroke_width(2)))?;
        chart.draw_series(c.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
    }
    root.present()?;
    Ok(())
}
