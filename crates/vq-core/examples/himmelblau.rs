//! The paper's Himmelblau simulation (App. A.2), STE vs rotation trick from the same
//! initialisation, over several seeds; see [`vq_core::toy`].
//!
//! `cargo run --release -p vq-core --example himmelblau [-- --seeds 8]`

use vq_core::Estimator;
use vq_core::toy::{HimmelblauSetup, himmelblau};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut seeds = 8u64;
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--seeds", Some(v)) => seeds = v,
            _ => panic!("usage: himmelblau [--seeds N]"),
        }
    }
    let p = HimmelblauSetup::paper(0);
    println!(
        "Himmelblau simulation (paper A.2): {} points ~ U[-{e},{e}]², {} codes = random points, EMA decay {}, lr {}, {} steps",
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
    let (mut ste_sum, mut rot_sum, mut wins) = (0.0, 0.0, 0);
    let (mut ste_obj, mut rot_obj) = (0.0, 0.0);
    for seed in 0..seeds {
        let setup = HimmelblauSetup::paper(seed);
        let ste = himmelblau(&setup, Estimator::StraightThrough, &record).expect("valid setup");
        let rot = himmelblau(&setup, Estimator::Rotation, &record).expect("valid setup");
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
        }
        let (s, r) = (ste.last().expect("recorded"), rot.last().expect("recorded"));
        ste_sum += s.distortion;
        rot_sum += r.distortion;
        wins += usize::from(r.distortion < s.distortion);
        ste_obj += s.objective;
        rot_obj += r.objective;
    }
    let n = seeds as f64;
    println!(
        "after {} steps, mean distortion over {seeds} seeds: STE {:.4}, rotation {:.4} (ratio {:.3}); rotation lower in {wins}/{seeds} seeds",
        p.steps,
        ste_sum / n,
        rot_sum / n,
        rot_sum / ste_sum
    );
    println!(
        "mean objective f(q) after {} steps: STE {:.3}, rotation {:.3}",
        p.steps,
        ste_obj / n,
        rot_obj / n
    );
}
