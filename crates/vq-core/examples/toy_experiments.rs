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
use vq_plot::{Figure, Mark, Panel, Scale, Series};

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
        "Frames of seed 0: {}/himmelblau_step{{000,033,066,100}}.png.\n",
        out.display()
    );
    Ok(())
}

/// Two panels (STE left, rotation right), axes and legend: initial points grey, current
/// points blue, codewords orange, Himmelblau's four minima green.
fn plot_himmelblau(
    path: &Path,
    init: &HimmelblauFrame,
    ste: &HimmelblauFrame,
    rot: &HimmelblauFrame,
) -> Fallible<()> {
    vq_plot::register_font()?;
    let root = BitMapBackend::new(path, (1200, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "Himmelblau simulation (paper App. A.2), seed 0, after {} updates",
        ste.step
    );
    let root = root
        .margin(8, 0, 0, 0)
        .titled(&title, vq_plot::text(22.0))?;
    let minima = [
        (3.0, 2.0),
        (-2.805118, 3.131312),
        (-3.77931, -3.283186),
        (3.584428, -1.848126),
    ];
    let grey = RGBColor(190, 190, 190);
    let (blue, orange, green) = (
        vq_plot::PALETTE[0],
        vq_plot::PALETTE[1],
        vq_plot::PALETTE[2],
    );
    for (area, (name, frame)) in root
        .split_evenly((1, 2))
        .iter()
        .zip([("STE", ste), ("rotation trick", rot)])
    {
        let mut chart = ChartBuilder::on(area)
            .caption(name, vq_plot::text(18.0))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(40)
            .build_cartesian_2d(-7f32..7f32, -7f32..7f32)?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(240, 240, 240))
            .x_desc("x")
            .y_desc("y")
            .axis_desc_style(vq_plot::text(15.0))
            .label_style(vq_plot::text(13.0))
            .x_label_formatter(&|v| vq_plot::tick_label(f64::from(*v)))
            .y_label_formatter(&|v| vq_plot::tick_label(f64::from(*v)))
            .draw()?;
        let pts = |p: &ndarray::Array2<f32>| {
            p.rows()
                .into_iter()
                .map(|r| (r[0], r[1]))
                .collect::<Vec<_>>()
        };
        let points = [
            (pts(&init.points), 1, grey, "initial points"),
            (pts(&frame.points), 2, blue, "points now"),
        ];
        for (p, radius, colour, label) in points {
            chart
                .draw_series(
                    p.into_iter()
                        .map(|c| Circle::new(c, radius, colour.filled())),
                )?
                .label(label)
                .legend(move |c| Circle::new(c, 3, colour.filled()));
        }
        chart
            .draw_series(
                minima
                    .iter()
                    .map(|&c| Cross::new(c, 7, green.stroke_width(3))),
            )?
            .label("minima of f")
            .legend(move |c| Cross::new(c, 5, green.stroke_width(2)));
        // Codewords last, on top of everything.
        chart
            .draw_series(
                pts(&frame.codebook)
                    .into_iter()
                    .map(|c| Circle::new(c, 6, orange.filled())),
            )?
            .label("codewords")
            .legend(move |c| Circle::new(c, 5, orange.filled()));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(170, 170, 170))
            .label_font(vq_plot::text(13.0))
            .draw()?;
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
    let mut curves = [Vec::new(), Vec::new(), Vec::new()];
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
        for (c, v) in curves.iter_mut().zip([rot, rot_far, ste]) {
            c.push((phi.to_degrees(), v));
        }
    }
    let [rot, rot_far, ste] = curves;
    let path = out.join("voronoi_spread_vs_phi.png");
    let panel = Panel::new(
        format!(
            "Spread after / before {} steps against the update's angle φ",
            near.steps
        ),
        "φ (degrees)",
        "ratio",
        Scale::Linear,
    )
    .with(Series::line("rotation trick, near the origin", rot).marked(Mark::LinePoints))
    .with(Series::line("rotation trick, translated +10", rot_far).marked(Mark::LinePoints))
    .with(Series::line("STE", ste));
    let figure = Figure::new("Voronoi push/pull (paper §4.3)")
        .panel_size(900, 520)
        .panel(panel);
    vq_plot::line_panels(&path, &figure)?;
    println!("\nSpread against φ: {}.", path.display());
    let mut panel = Panel::new(
        "Change of the distance to the codeword, rotation trick minus STE",
        "θ (degrees)",
        "Δ dist.",
        Scale::Linear,
    );
    for phi_deg in [0.0f64, 90.0, 180.0] {
        let phi = phi_deg.to_radians();
        let o = voronoi_push_pull(&near, Estimator::Rotation, phi)?;
        let s = voronoi_push_pull(&near, Estimator::StraightThrough, phi)?;
        let pts: Vec<(f64, f64)> = o
            .by_angle
            .iter()
            .zip(&s.by_angle)
            .map(|(r, s)| (r.0.to_degrees(), r.1 - s.1))
            .collect();
        panel = panel.with(Series::line(format!("φ = {phi_deg}°"), pts).marked(Mark::LinePoints));
    }
    let path = out.join("voronoi_distance_vs_theta.png");
    let zero = vec![(-40.0, 0.0), (40.0, 0.0)];
    let figure = Figure::new("Voronoi push/pull (paper §4.3)")
        .panel_size(900, 520)
        .panel(panel.with(Series::line("0 (no change)", zero).marked(Mark::Reference)));
    vq_plot::line_panels(&path, &figure)?;
    println!(
        "Change of distance to the codeword, rotation minus STE, against θ: {}.\n",
        path.display()
    );
    Ok(())
}
