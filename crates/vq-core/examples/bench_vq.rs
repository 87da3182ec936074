//! Times one VQ layer step (nearest-code search + gather + estimator + commitment/codebook
//! losses, forward and backward) at the shapes of `torch_vq_ref.py`, and, when given the script
//! and a Python path holding torch, runs PyTorch on the same shapes and threads in the same run
//! and prints the ratios. Run through `cargo xtask bench`.
//!
//! Like PyTorch's caching allocator, the benchmark uses a caching allocator (mimalloc): with
//! glibc's default, every large output of a step is a fresh mapping that page-faults on first
//! write, which costs more than the arithmetic of the non-search parts.
//!
//! The loss matches the PyTorch reference: `mean(q̃²) + 0.25·mean((e − sg q)²) + mean((q − sg e)²)`.

use std::process::Command;
use std::time::Instant;

use ndarray::Array2;
use ndarray_rand::RandomExt;
use rand::SeedableRng;
use rand_distr::StandardNormal;
use vq_core::{BetaPlacement, CodebookTerm, Estimator, LossWeights, Metric, Quantizer};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    threads: usize,
    quick: bool,
    reps: usize,
    torch_script: Option<String>,
    torch_pythonpath: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        threads: 2,
        quick: false,
        reps: 10,
        torch_script: None,
        torch_pythonpath: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--threads" => a.threads = value().parse().expect("--threads: integer"),
            "--reps" => a.reps = value().parse().expect("--reps: integer"),
            "--quick" => a.quick = true,
            "--torch-script" => a.torch_script = Some(value()),
            "--torch-pythonpath" => a.torch_pythonpath = Some(value()).filter(|s| !s.is_empty()),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn median_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn step(vq: &Quantizer, e: &Array2<f32>, cb: &Array2<f32>) -> f32 {
    let fwd = vq.forward(e.view(), cb.view()).expect("forward");
    let n = fwd.quantized.len() as f32;
    // ∂ mean(q̃²)/∂q̃ = 2q̃/n.
    let grad_out = ndarray::Zip::from(&fwd.quantized).par_map_collect(|&v| 2.0 * v / n);
    let bwd = vq
        .backward(e.view(), cb.view(), &fwd, grad_out.view())
        .expect("backward");
    bwd.grad_e[[0, 0]] + bwd.grad_codebook.map_or(0.0, |g| g[[0, 0]])
}

/// Runs the PyTorch reference and returns (ste ms, rot ms, quantize-only ms).
fn torch_times(
    script: &str,
    pythonpath: Option<&str>,
    (n, k, d): (usize, usize, usize),
    threads: usize,
) -> Option<(f64, f64, f64)> {
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .args([n, k, d, threads].map(|v| v.to_string()));
    if let Some(p) = pythonpath {
        cmd.env("PYTHONPATH", p);
    }
    let out = match cmd.output() {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            eprintln!(
                "torch reference failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return None;
        }
        Err(e) => {
            eprintln!("cannot run python3: {e}");
            return None;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let ms = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some((ms("torch ste")?, ms("torch rot")?, ms("torch quantize")?))
}

fn main() {
    let args = parse_args();
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .expect("thread pool");
    let shapes: &[(usize, usize, usize)] = if args.quick {
        &[(8192, 1024, 256)]
    } else {
        &[(8192, 1024, 256), (65536, 8192, 8), (16384, 16384, 4)]
    };
    let loss =
        LossWeights::new(0.25, BetaPlacement::Commitment, CodebookTerm::Include).expect("weights");
    println!(
        "threads: {} (vq-core rayon pool and torch.set_num_threads)",
        args.threads
    );
    println!(
        "| N×K×D | vq-core search ms | vq-core STE step ms | vq-core rotation step ms | rotation/STE | estimator bwd STE / rotation ms | rotation extra / STE step | torch search ms | torch STE step ms | torch rotation step ms | vq-core/torch (STE) | vq-core/torch (rotation) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &(n, k, d) in shapes {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let e = Array2::<f32>::random_using((n, d), StandardNormal, &mut rng);
        let cb = Array2::<f32>::random_using((k, d), StandardNormal, &mut rng);
        let search = median_ms(args.reps, || {
            std::hint::black_box(
                vq_core::nearest_codes(e.view(), cb.view(), Metric::Euclidean).expect("search"),
            );
        });
        // STE and rotation steps interleaved rep by rep, so that machine noise hits both alike.
        let vqs = [Estimator::StraightThrough, Estimator::Rotation].map(|estimator| Quantizer {
            metric: Metric::Euclidean,
            estimator,
            loss,
        });
        let mut samples = [Vec::new(), Vec::new()];
        for rep in 0..=args.reps {
            for (vq, s) in vqs.iter().zip(&mut samples) {
                let t = Instant::now();
                std::hint::black_box(step(vq, &e, &cb));
                if rep > 0 {
                    s.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let times = samples.map(|mut s| {
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        });
        // The only part that differs between the two steps, timed alone (interleaved, into a
        // preallocated output): a precise view of the rotation's extra cost, below the noise of
        // whole-step timings on a shared machine.
        let q = vq_core::quantize(e.view(), cb.view(), Metric::Euclidean)
            .expect("quantize")
            .1;
        let g = q.mapv(|v| 2.0 * v / q.len() as f32);
        let mut out = Array2::<f32>::zeros(e.raw_dim());
        let mut bwd = [Vec::new(), Vec::new()];
        for rep in 0..=args.reps * 4 {
            for (est, s) in [Estimator::StraightThrough, Estimator::Rotation]
                .into_iter()
                .zip(&mut bwd)
            {
                let t = Instant::now();
                est.backward_with_commitment_into(
                    e.view(),
                    q.view(),
                    g.view(),
                    0.1,
                    out.view_mut(),
                )
                .expect("backward");
                if rep > 0 {
                    s.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let bwd = bwd.map(|mut s| {
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        });
        let torch = args.torch_script.as_deref().and_then(|s| {
            torch_times(s, args.torch_pythonpath.as_deref(), (n, k, d), args.threads)
        });
        let fmt = |v: f64, p: usize| format!("{v:.p$}");
        let cols = match torch {
            Some((ste, rot, q)) => [
                fmt(q, 1),
                fmt(ste, 1),
                fmt(rot, 1),
                fmt(times[0] / ste, 3),
                fmt(times[1] / rot, 3),
            ],
            None => std::array::from_fn(|_| "n/a".to_owned()),
        };
        println!(
            "| {n}×{k}×{d} | {search:.1} | {:.1} | {:.1} | {:.3} | {:.2} / {:.2} | {:+.3} | {} |",
            times[0],
            times[1],
            times[1] / times[0],
            bwd[0],
            bwd[1],
            (bwd[1] - bwd[0]) / times[0],
            cols.join(" | ")
        );
    }
}
