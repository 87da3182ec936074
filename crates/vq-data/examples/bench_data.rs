//! Data-pipeline throughput: ImageNet-style JPEG decode + preprocessing, BAIR clips, and
//! (where the ffmpeg program is available) UCF-101-style clips, single-threaded and through
//! the background [`Loader`], against the `image` crate's single-threaded decode as baseline.
//!
//! ```text
//! cargo run --release -p vq-data --example bench_data -- [--images N] [--workers W]
//! ```
//!
//! The JPEGs are generated: 500×375 (ImageNet's most common size), quality 90, content = a few
//! smooth colour waves plus pixel noise (±12), which decodes at a speed close to photographs.

use std::path::Path;
use std::time::Instant;

use image::ImageEncoder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vq_data::bair::{BairDataset, BairSplit, ClipWindow};
use vq_data::images::{ImageDataset, decode_rgb};
use vq_data::loader::{Dataset, Loader, LoaderConfig};
use vq_data::tfrecord::{Example, write_record};
use vq_data::transform::Transform;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn jpeg(rng: &mut StdRng, w: u32, h: u32) -> Vec<u8> {
    let waves: Vec<(f32, f32, f32)> = (0..9)
        .map(|_| {
            (
                rng.gen_range(0.005..0.05),
                rng.gen_range(0.005..0.05),
                rng.gen_range(0.0..6.3),
            )
        })
        .collect();
    let mut px = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let (fx, fy, p) = waves[c * 3 + (x as usize * 7 / w as usize) % 3];
                let v = 128.0 + 90.0 * (fx * x as f32 + fy * y as f32 + p).sin();
                px.push((v + rng.gen_range(-12.0..12.0)).clamp(0.0, 255.0) as u8);
            }
        }
    }
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .write_image(&px, w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

fn rate(n: usize, t: Instant) -> f64 {
    n as f64 / t.elapsed().as_secs_f64()
}

fn drain<D: Dataset>(loader: &Loader<D>) -> usize {
    loader.batches().map(|b| b.unwrap().samples.len()).sum()
}

fn main() {
    let n = arg("--images", 400);
    let workers = arg(
        "--workers",
        std::thread::available_parallelism().map_or(2, |n| n.get()),
    );
    let dir = std::env::temp_dir().join(format!("vq-bench-data-{}", std::process::id()));
    let class = dir.join("images/n01440764");
    std::fs::create_dir_all(&class).unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let files: Vec<Vec<u8>> = (0..n).map(|_| jpeg(&mut rng, 500, 375)).collect();
    for (i, f) in files.iter().enumerate() {
        std::fs::write(class.join(format!("n01440764_{i}.JPEG")), f).unwrap();
    }
    let mean_kb = files.iter().map(Vec::len).sum::<usize>() as f64 / n as f64 / 1024.0;
    println!("{n} JPEGs 500×375 q90 ({mean_kb:.0} kB each); {workers} loader workers\n");
    println!("| pipeline | threads | images/s | vs baseline |");
    println!("|---|---|---|---|");

    let t = Instant::now();
    for f in &files {
        std::hint::black_box(image::load_from_memory(f).unwrap().into_rgb8());
    }
    let base = rate(n, t);
    println!("| `image` decode only (baseline) | 1 | {base:.1} | 1.00× |");

    let row = |name: &str, threads: usize, r: f64| {
        println!("| {name} | {threads} | {r:.1} | {:.2}× |", r / base);
    };
    for (name, tf) in [
        (
            "decode + taming train (resize 256 + random crop)",
            Transform::taming(256, true),
        ),
        (
            "decode + ViT-VQGAN train (random-resized crop + flip, antialias)",
            Transform::vit_vqgan(256, true),
        ),
        (
            "decode + centre crop 256 (no resize)",
            Transform::CenterCropNoResize { size: 256 },
        ),
    ] {
        let t = Instant::now();
        for f in &files {
            let img = decode_rgb(Path::new("x"), f).unwrap();
            std::hint::black_box(tf.apply(img.view(), &mut rng));
        }
        row(name, 1, rate(n, t));
        let ds = ImageDataset::folder(&dir.join("images"), tf).unwrap();
        let cfg = LoaderConfig {
            workers,
            ..LoaderConfig::eval(32, n)
        };
        let loader = Loader::new(ds, cfg).unwrap();
        let t = Instant::now();
        let got = drain(&loader);
        row(&format!("{name}, files → Loader"), workers, rate(got, t));
    }

    // BAIR: 256 trajectories in one .tfrecords file (the size of the official test file).
    let trajectories = 256;
    let bair = dir.join("bair/softmotion30_44k/test");
    std::fs::create_dir_all(&bair).unwrap();
    let mut buf = Vec::new();
    for s in 0..trajectories {
        let frames: Vec<Vec<u8>> = (0..30)
            .map(|t| {
                (0..64 * 64 * 3)
                    .map(|i| ((i + t + s) % 251) as u8)
                    .collect()
            })
            .collect();
        let items = frames
            .iter()
            .enumerate()
            .map(|(t, f)| (format!("{t}/image_aux1/encoded"), f.as_slice()));
        write_record(
            &mut buf,
            &prost::Message::encode_to_vec(&Example::from_bytes_features(items)),
        )
        .unwrap();
    }
    std::fs::write(bair.join("traj_0_to_255.tfrecords"), &buf).unwrap();
    println!("\n| BAIR pipeline | threads | clips/s |");
    println!("|---|---|---|");
    let ds = BairDataset::open(&dir.join("bair"), BairSplit::Test, 16, ClipWindow::Random).unwrap();
    let t = Instant::now();
    for i in 0..ds.len() {
        std::hint::black_box(ds.get(i, &mut rng).unwrap());
    }
    println!(
        "| read + CRC + decode + random 16-frame window | 1 | {:.1} |",
        rate(ds.len(), t)
    );
    let loader = Loader::new(
        ds,
        LoaderConfig {
            workers,
            ..LoaderConfig::eval(24, trajectories)
        },
    )
    .unwrap();
    let t = Instant::now();
    let got = drain(&loader);
    println!(
        "| the same through the Loader | {workers} | {:.1} |",
        rate(got, t)
    );

    // UCF-101-style clips, when an ffmpeg is available.
    match vq_data::ucf101::Ffmpeg::locate() {
        Err(e) => println!("\nUCF-101 clips skipped: {e}"),
        Ok(ff) => {
            let root = dir.join("ucf/UCF-101/Bench");
            std::fs::create_dir_all(&root).unwrap();
            for v in 0..4 {
                let status = std::process::Command::new(ff.program())
                    .args([
                        "-v",
                        "error",
                        "-f",
                        "lavfi",
                        "-i",
                        "testsrc2=size=320x240:rate=25",
                        "-frames:v",
                        "100",
                        "-c:v",
                        "mpeg4",
                        "-vtag",
                        "XVID",
                        "-q:v",
                        "4",
                        "-y",
                    ])
                    .arg(root.join(format!("v_Bench_g01_c0{v}.avi")))
                    .status()
                    .unwrap();
                assert!(status.success());
            }
            let lists = dir.join("ucf/lists");
            std::fs::create_dir_all(&lists).unwrap();
            std::fs::write(lists.join("classInd.txt"), "1 Bench\n").unwrap();
            let list: String = (0..4)
                .map(|v| format!("Bench/v_Bench_g01_c0{v}.avi 1\n"))
                .collect();
            std::fs::write(lists.join("trainlist01.txt"), list).unwrap();
            let t = Instant::now();
            let spec = vq_data::ucf101::ClipSpec {
                step: 12,
                ..vq_data::ucf101::ClipSpec::PAPER
            };
            let ds = vq_data::ucf101::Ucf101::open(
                &dir.join("ucf/UCF-101"),
                &lists,
                1,
                vq_data::ucf101::UcfSplit::Train,
                spec,
                None,
                ff,
            )
            .unwrap();
            println!(
                "\nUCF-style: indexed 4 videos × 100 frames in {:.2} s ({} clips)",
                t.elapsed().as_secs_f64(),
                ds.len()
            );
            let n = ds.len();
            let loader = Loader::new(
                ds,
                LoaderConfig {
                    workers,
                    ..LoaderConfig::eval(4, n)
                },
            )
            .unwrap();
            let t = Instant::now();
            let got = drain(&loader);
            println!(
                "| UCF-style 320×240 XVID → 16×128×128 clips (ffmpeg + resize + crop) | {workers} | {:.1} clips/s |",
                rate(got, t)
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
