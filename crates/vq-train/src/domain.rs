//! A sample-quality measure that needs no downloaded network: a small classifier trained on the
//! data's own labels (its held-out accuracy is reported with it), whose features give a
//! Fréchet distance between generated and held-out images — the **domain FD**, the FID recipe
//! with this classifier in place of Inception (numbers are not comparable with Inception FID) —
//! and improved precision / recall on the same features, and whose predictions give the
//! **class accuracy** of class-conditional samples (the
//! fraction the classifier assigns to the class they were drawn for).
//!
//! The classifier: three 3×3 convolutions (32, 64, 128 channels, strides 1, 2, 2, ReLU), global
//! average pooling to 128 features, a linear layer to the classes; Adam (lr 1e-3) for
//! [`DOMAIN_STEPS`] steps of 128 images drawn from `StdRng::seed_from_u64(0)`. It is trained once
//! per data source and kept (`domain-net.safetensors` with its accuracy in
//! `domain-net.json`).

use std::path::Path;

use anyhow::{Context, Result, ensure};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::data::ImageSet;

/// Training steps of the domain classifier.
pub const DOMAIN_STEPS: usize = 600;

/// The classifier.
#[derive(Debug)]
pub struct DomainNet {
    vs: nn::VarStore,
    convs: Vec<nn::Conv2D>,
    head: nn::Linear,
    /// Held-out accuracy.
    pub accuracy: f64,
}

#[derive(Serialize, Deserialize)]
struct Record {
    classes: usize,
    channels: usize,
    accuracy: f64,
    steps: usize,
}

impl DomainNet {
    fn build(channels: usize, classes: usize, device: Device) -> Self {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(device);
        let p = vs.root();
        let conv = |i: usize, o: usize, stride: i64, name: &str| {
            let cfg = nn::ConvConfig {
                stride,
                padding: 1,
                ..Default::default()
            };
            nn::conv2d(&p / name, i as i64, o as i64, 3, cfg)
        };
        let convs = vec![
            conv(channels, 32, 1, "conv0"),
            conv(32, 64, 2, "conv1"),
            conv(64, 128, 2, "conv2"),
        ];
        let head = nn::linear(&p / "head", 128, classes as i64, Default::default());
        Self {
            vs,
            convs,
            head,
            accuracy: f64::NAN,
        }
    }

    /// The 128 pooled features of images (N, C, H, W) in [−1, 1].
    pub fn features(&self, x: &Tensor) -> Tensor {
        let mut h = x.to_kind(Kind::Float);
        for c in &self.convs {
            h = c.forward(&h).relu();
        }
        h.mean_dim([2i64, 3].as_slice(), false, Kind::Float)
    }

    /// [`Self::features`] of many images, 256 at a time, without gradients, on the CPU.
    pub fn features_of(&self, x: &Tensor) -> Tensor {
        let parts: Vec<Tensor> = (0..x.size()[0])
            .step_by(256)
            .map(|s| {
                let n = 256.min(x.size()[0] - s);
                tch::no_grad(|| self.features(&x.narrow(0, s, n))).to_device(Device::Cpu)
            })
            .collect();
        Tensor::cat(&parts, 0)
    }

    /// Class logits of images.
    pub fn logits(&self, x: &Tensor) -> Tensor {
        self.head.forward(&self.features(x))
    }

    /// The classifier of `dir` (trained on `train` with `labels`, measured on `val` with
    /// `val_labels`, and saved there when not yet present).
    ///
    /// # Errors
    /// Unreadable or unwritable files; a kept classifier of other classes.
    pub fn trained(
        dir: &Path,
        train: (&ImageSet, &[u32]),
        val: (&ImageSet, &[u32]),
        classes: usize,
        device: Device,
    ) -> Result<Self> {
        let (weights, record) = (
            dir.join("domain-net.safetensors"),
            dir.join("domain-net.json"),
        );
        let channels = train.0.batch(&[0], Device::Cpu)?.size()[1] as usize;
        let mut net = Self::build(channels, classes, device);
        if let (Ok(text), true) = (std::fs::read_to_string(&record), weights.is_file()) {
            let r: Record = serde_json::from_str(&text).with_context(|| {
                format!("{} is not a domain classifier's record", record.display())
            })?;
            ensure!(
                r.classes == classes && r.channels == channels && r.steps == DOMAIN_STEPS,
                "{} holds a classifier of {} classes / {} channels / {} steps, not {classes} / {channels} / {DOMAIN_STEPS}",
                record.display(),
                r.classes,
                r.channels,
                r.steps
            );
            net.vs
                .load(&weights)
                .with_context(|| format!("loading {}", weights.display()))?;
            net.accuracy = r.accuracy;
            return Ok(net);
        }
        net.fit(train, device)?;
        net.accuracy = net.accuracy_on(val.0, val.1, device)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let vars = net.vs.variables();
        let mut named: Vec<(&str, &Tensor)> = vars.iter().map(|(k, t)| (k.as_str(), t)).collect();
        named.sort_by_key(|(k, _)| *k);
        crate::checkpoint::replace_file(&weights, |tmp| {
            crate::checkpoint::write_tensors(tmp, &named)
        })?;
        let r = Record {
            classes,
            channels,
            accuracy: net.accuracy,
            steps: DOMAIN_STEPS,
        };
        crate::checkpoint::write_atomic(&record, serde_json::to_string_pretty(&r)?.as_bytes())?;
        Ok(net)
    }

    fn fit(&mut self, (set, labels): (&ImageSet, &[u32]), device: Device) -> Result<()> {
        let mut opt = nn::Adam::default().build(&self.vs, 1e-3)?;
        let mut rng = StdRng::seed_from_u64(0);
        let mut order: Vec<i64> = (0..set.len() as i64).collect();
        let mut at = order.len();
        for _ in 0..DOMAIN_STEPS {
            let mut idx = Vec::with_capacity(128);
            while idx.len() < 128.min(order.len()) {
                if at == order.len() {
                    order.shuffle(&mut rng);
                    at = 0;
                }
                idx.push(order[at]);
                at += 1;
            }
            let x = set.batch(&idx, device)?;
            let y: Vec<i64> = idx.iter().map(|&i| i64::from(labels[i as usize])).collect();
            let y = Tensor::from_slice(&y).to_device(device);
            let loss = self.logits(&x).cross_entropy_for_logits(&y);
            opt.backward_step(&loss);
        }
        Ok(())
    }

    /// Accuracy on `set` with `labels`.
    ///
    /// # Errors
    /// Unreadable samples.
    pub fn accuracy_on(&self, set: &ImageSet, labels: &[u32], device: Device) -> Result<f64> {
        let mut right = 0i64;
        for start in (0..set.len()).step_by(256) {
            let idx: Vec<i64> = (start..(start + 256).min(set.len()))
                .map(|i| i as i64)
                .collect();
            let x = set.batch(&idx, device)?;
            let y: Vec<i64> = idx.iter().map(|&i| i64::from(labels[i as usize])).collect();
            let pred = tch::no_grad(|| self.logits(&x))
                .argmax(1, false)
                .to_device(Device::Cpu);
            right += i64::try_from(pred.eq_tensor(&Tensor::from_slice(&y)).sum(Kind::Int64))?;
        }
        Ok(right as f64 / set.len() as f64)
    }
}

/// Sample quality of generated images against held-out ones, by the domain classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainMetrics {
    /// Fréchet distance of the domain classifier's features (not Inception FID).
    pub fd: f64,
    /// Improved precision of the samples on those features (k = 3; Kynkäänniemi et al.).
    pub precision: f64,
    /// Improved recall of the samples on those features (k = 3).
    pub recall: f64,
    /// The fraction of class-conditional samples classified as their class.
    pub class_accuracy: Option<f64>,
    /// The domain classifier's own held-out accuracy.
    pub classifier_accuracy: f64,
}

/// Nearest neighbours of the precision / recall manifolds (the paper's k).
pub const PRC_NEIGHBOURS: usize = 3;

/// [`DomainMetrics`] of `samples` (N, C, H, W) in [−1, 1] drawn for `labels` against the
/// held-out images whose features are `reference` ([`DomainNet::features_of`]).
pub fn domain_metrics(
    net: &DomainNet,
    samples: &Tensor,
    labels: Option<&[i64]>,
    reference: &Tensor,
) -> DomainMetrics {
    // The samples' features once: for the distances and, through the head, the classes.
    let feats = net.features_of(samples);
    let class_accuracy = labels.map(|y| {
        let pred = tch::no_grad(|| net.head.forward(&feats.to_device(net.vs.device())))
            .argmax(1, false)
            .to_device(Device::Cpu);
        let hit = pred.eq_tensor(&Tensor::from_slice(y)).sum(Kind::Int64);
        i64::try_from(hit).unwrap_or(0) as f64 / y.len().max(1) as f64
    });
    let (precision, recall) = vq_models::precision_recall(&feats, reference, PRC_NEIGHBOURS);
    DomainMetrics {
        fd: vq_models::frechet_distance(&feats, reference),
        precision,
        recall,
        class_accuracy,
        classifier_accuracy: net.accuracy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples equal to the reference are at distance 0 with precision and recall 1, and the
    /// class accuracy of labelled images is the classifier's accuracy on them.
    #[test]
    fn metrics_of_the_reference_itself() {
        let net = DomainNet::build(1, 3, Device::Cpu);
        let x = Tensor::rand([40, 1, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let pred = Vec::<i64>::try_from(net.logits(&x).argmax(1, false)).unwrap();
        let labels: Vec<i64> = pred
            .iter()
            .enumerate()
            .map(|(i, &p)| if i % 4 == 0 { (p + 1) % 3 } else { p })
            .collect();
        let reference = net.features_of(&x);
        let m = domain_metrics(&net, &x, Some(&labels), &reference);
        assert!(m.fd.abs() < 1e-6, "{}", m.fd);
        assert_eq!((m.precision, m.recall), (1.0, 1.0));
        assert_eq!(m.class_accuracy, Some(0.75));
        let shifted = domain_metrics(&net, &(&x * 0.5), None, &reference);
        assert!(shifted.fd > 1e-4 && shifted.class_accuracy.is_none());
    }
}
