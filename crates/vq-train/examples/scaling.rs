//! Data-parallel scaling on paper: per preset, the bytes each rank all-reduces per optimiser step
//! (f32 gradients of the autoencoder and of the discriminator, the EMA codebook statistics of
//! every forward, the step's metrics) and what a ring all-reduce of them costs at a given bus
//! bandwidth, for 8 and 64 GPUs.
//!
//! `cargo run --release -p vq-train --example scaling -- [intra-node GB/s] [inter-node GB/s]`
//! (defaults 360 and 45: assumed NCCL bus bandwidths of NVLink-4 within a node and of one
//! 400 Gb/s InfiniBand NIC per GPU across nodes). A ring all-reduce of S bytes over n ranks moves
//! 2(n−1)/n · S through each rank's link: t = 2(n−1)/n · S / bus bandwidth (nccl-tests' busbw).

use tch::{Device, nn};
use vq_models::{Discriminator, Preset, VqAutoencoder};
use vq_tch::CodebookLearning;

fn trainable(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

fn ring_ms(bytes: f64, n: f64, gbps: f64) -> f64 {
    2.0 * (n - 1.0) / n * bytes / (gbps * 1e9) * 1e3
}

fn main() -> anyhow::Result<()> {
    let args: Vec<f64> = std::env::args()
        .skip(1)
        .map(|a| a.parse::<f64>())
        .collect::<Result<_, _>>()?;
    let intra = args.first().copied().unwrap_or(360.0);
    let inter = args.get(1).copied().unwrap_or(45.0);
    println!(
        "| preset | trainable params (AE + D) | gradient MB / step | EMA stats KB / forward | ring all-reduce, 8 GPUs @ {intra} GB/s | 64 GPUs @ {inter} GB/s |"
    );
    println!("|---|---|---|---|---|---|");
    for preset in Preset::ALL {
        let cfg = preset.config();
        let vs = nn::VarStore::new(Device::Cpu);
        let _ae = VqAutoencoder::new(&vs.root(), &cfg)?;
        let ae = trainable(&vs);
        let d = match preset.gan() {
            Some(g) => {
                let dvs = nn::VarStore::new(Device::Cpu);
                let _d = Discriminator::new(&dvs.root(), &g)?;
                trainable(&dvs)
            }
            None => 0,
        };
        let q = &cfg.quantizer;
        // counts (K) + sums (K×D), f32, two all-reduces per forward; learned codebooks: none.
        let ema = match q.learning {
            CodebookLearning::Ema { .. } => {
                (q.codebook_size * (q.codebook_dim + 1) * 4) as f64 / 1e3
            }
            CodebookLearning::Gradient { .. } => 0.0,
        };
        let bytes = ((ae + d) * 4) as f64;
        println!(
            "| {} | {:.1} M + {:.1} M | {:.0} | {} | {:.2} ms | {:.1} ms |",
            preset.name(),
            ae as f64 / 1e6,
            d as f64 / 1e6,
            bytes / 1e6,
            if ema > 0.0 {
                format!("{ema:.0}")
            } else {
                "—".into()
            },
            ring_ms(bytes, 8.0, intra),
            ring_ms(bytes, 64.0, inter),
        );
    }
    Ok(())
}
