//! Generation metrics of a prior: samples drawn per class, decoded by their tokenizer and
//! measured against the held-out images — by the domain classifier ([`crate::domain`]; data
//! with labels, no download) and, when the FID Inception's weights are given, by Inception FID,
//! Inception score and improved precision / recall on Inception's pool features.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};
use vq_data::Split;
use vq_models::{FidInception, frechet_distance, inception_score, precision_recall};

use crate::codes::LoadedRun;
use crate::config::TrainOptions;
use crate::data::DataSource;
use crate::domain::{DomainMetrics, DomainNet, PRC_NEIGHBOURS, domain_metrics};
use crate::labels::split_labels;

/// Grids sampled per class (or in all, unconditional) for the generation metrics.
pub const SAMPLES_PER_CLASS: usize = 50;

/// Images per Inception batch.
const INCEPTION_BATCH: i64 = 50;

/// Sample quality by the FID Inception (pytorch-fid's network).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InceptionMetrics {
    /// Fréchet distance of the pool features, samples vs held-out images (FID).
    pub fid: f64,
    /// Inception score of the samples (10 splits): mean.
    pub is_mean: f64,
    /// Inception score: standard deviation over the splits.
    pub is_std: f64,
    /// Improved precision on the pool features (k = 3).
    pub precision: f64,
    /// Improved recall on the pool features (k = 3).
    pub recall: f64,
}

/// What the samples of one prior measured (kept as `generation.json` in its run folder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationMetrics {
    /// Generated images measured.
    pub samples: usize,
    /// Held-out images they are compared with.
    pub reference: usize,
    /// By the domain classifier (data with labels).
    pub domain: Option<DomainMetrics>,
    /// By the FID Inception (when its weights were given).
    pub inception: Option<InceptionMetrics>,
}

/// The networks that judge samples and the held-out images' features they are compared with.
#[derive(Debug)]
pub struct Judge {
    domain: Option<(DomainNet, Tensor)>,
    inception: Option<(FidInception, Tensor)>,
    reference: usize,
}

impl Judge {
    /// `None` when nothing can judge: data without labels and no Inception weights. The domain
    /// classifier is trained once and kept in `<out>/domain/`.
    ///
    /// # Errors
    /// Unreadable data or weights; training or saving the classifier.
    pub fn new(base: &TrainOptions) -> Result<Option<Self>> {
        let c = &base.config;
        let source = DataSource::parse(&c.data)?;
        let val = c.load_split(&source, Split::Test)?;
        let idx: Vec<i64> = (0..val.len() as i64).collect();
        let images = val.batch(&idx, base.device)?;
        let domain = match (
            split_labels(&source, Split::Train, c.preprocessing)?,
            split_labels(&source, Split::Test, c.preprocessing)?,
        ) {
            (Some(train_labels), Some(val_labels)) => {
                let train = c.load_split(&source, Split::Train)?;
                let net = DomainNet::trained(
                    &base.out.join("domain"),
                    (&train, &train_labels.values),
                    (&val, &val_labels.values),
                    train_labels.classes.len(),
                    base.device,
                )?;
                eprintln!(
                    "domain classifier: {:.1}% held-out accuracy",
                    100.0 * net.accuracy
                );
                let feats = net.features_of(&images);
                Some((net, feats))
            }
            _ => None,
        };
        let inception = match &c.inception_weights {
            Some(path) => {
                let net = FidInception::load(path, base.device)
                    .with_context(|| format!("loading the FID Inception {}", path.display()))?;
                eprintln!("Inception features of the {} held-out images", val.len());
                let (feats, _) = inception_outputs(&net, &images);
                Some((net, feats))
            }
            None => None,
        };
        Ok((domain.is_some() || inception.is_some()).then_some(Self {
            domain,
            inception,
            reference: val.len(),
        }))
    }

    /// Whether `m` holds every measure this judge makes (a record made before the Inception
    /// weights were given lacks the Inception metrics).
    fn complete(&self, m: &GenerationMetrics) -> bool {
        m.domain.is_some() == self.domain.is_some()
            && (self.inception.is_none() || m.inception.is_some())
            && m.reference == self.reference
    }

    /// The generation metrics of the prior in `tok/prior` (kept in its `generation.json`, and
    /// reused when it holds every measure of this judge): [`SAMPLES_PER_CLASS`] grids per class
    /// drawn from seed `1_000_000 + seed` with the default sampling (temperature 1, no filter,
    /// no guidance), decoded by the tokenizer.
    ///
    /// # Errors
    /// Loading the prior or the tokenizer; sampling; writing the record.
    pub fn generation_of(
        &self,
        tok: &Path,
        seed: u64,
        device: Device,
    ) -> Result<GenerationMetrics> {
        let dir = tok.join("prior");
        let path = dir.join("generation.json");
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(kept) = serde_json::from_str::<GenerationMetrics>(&text)
            && self.complete(&kept)
        {
            return Ok(kept);
        }
        let (_, prior, _vs) = crate::prior::load_prior(&dir, device)?;
        let run = LoadedRun::load(tok, device)?;
        let classes = prior.config().conditioning.classes() as i64;
        let labels: Option<Vec<i64>> = (classes > 0).then(|| {
            (0..classes)
                .flat_map(|c| std::iter::repeat_n(c, SAMPLES_PER_CLASS))
                .collect()
        });
        let n = labels.as_ref().map_or(SAMPLES_PER_CLASS, Vec::len);
        let codes = prior.sample(
            labels.as_deref(),
            n,
            1_000_000 + seed,
            &vq_prior::Sampling::default(),
            vq_prior::Cache::Kv,
        )?;
        let images: Vec<Tensor> = (0..n as i64)
            .step_by(100)
            .map(|s| {
                let part = codes.narrow(0, s, 100.min(n as i64 - s));
                Ok(tch::no_grad(|| run.model.decode_codes(&part))?.clamp(-1.0, 1.0))
            })
            .collect::<Result<_>>()?;
        let metrics = self.measure(&Tensor::cat(&images, 0), labels.as_deref());
        crate::checkpoint::write_atomic(&path, serde_json::to_string_pretty(&metrics)?.as_bytes())?;
        Ok(metrics)
    }

    /// Every measure of this judge on `samples` (N, C, H, W) in [−1, 1] drawn for `labels`.
    pub fn measure(&self, samples: &Tensor, labels: Option<&[i64]>) -> GenerationMetrics {
        GenerationMetrics {
            samples: samples.size()[0] as usize,
            reference: self.reference,
            domain: self
                .domain
                .as_ref()
                .map(|(net, reference)| domain_metrics(net, samples, labels, reference)),
            inception: self
                .inception
                .as_ref()
                .map(|(net, reference)| inception_metrics(net, samples, reference)),
        }
    }
}

/// Pool features and logits of images in [−1, 1], [`INCEPTION_BATCH`] at a time, on the CPU.
fn inception_outputs(net: &FidInception, images: &Tensor) -> (Tensor, Tensor) {
    let n = images.size()[0];
    let (feats, logits): (Vec<Tensor>, Vec<Tensor>) = (0..n)
        .step_by(INCEPTION_BATCH as usize)
        .map(|s| {
            let part = images
                .narrow(0, s, INCEPTION_BATCH.min(n - s))
                .to_device(net.device());
            let (f, l) = tch::no_grad(|| net.forward(&part));
            (f.to_device(Device::Cpu), l.to_device(Device::Cpu))
        })
        .unzip();
    (Tensor::cat(&feats, 0), Tensor::cat(&logits, 0))
}

/// [`InceptionMetrics`] of `samples` against the held-out images' pool features `reference`.
pub fn inception_metrics(
    net: &FidInception,
    samples: &Tensor,
    reference: &Tensor,
) -> InceptionMetrics {
    let (feats, logits) = inception_outputs(net, samples);
    let (is_mean, is_std) = inception_score(&logits, 10);
    let (precision, recall) = precision_recall(&feats, reference, PRC_NEIGHBOURS);
    InceptionMetrics {
        fid: frechet_distance(&feats, reference),
        is_mean,
        is_std,
        precision,
        recall,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, nn};

    /// On a randomly initialised Inception (the metrics' wiring, not its weights): samples
    /// equal to the reference images have FID ≈ 0, precision and recall 1; other images do not.
    #[test]
    fn inception_metrics_of_the_reference_itself_and_of_others() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = FidInception::new(&vs.root());
        let x = Tensor::rand([12, 1, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let (reference, _) = inception_outputs(&net, &x);
        let same = inception_metrics(&net, &x, &reference);
        assert!(same.fid.abs() < 1e-3, "{}", same.fid);
        assert_eq!((same.precision, same.recall), (1.0, 1.0));
        assert!(same.is_mean >= 1.0 && same.is_mean.is_finite());
        let other = Tensor::rand([12, 1, 16, 16], (Kind::Float, Device::Cpu)).square() - 0.9;
        let m = inception_metrics(&net, &other, &reference);
        assert!(m.fid > 1e3 * same.fid.abs(), "{} vs {}", m.fid, same.fid);
        assert!(m.precision < 1.0 || m.recall < 1.0, "{m:?}");
    }
}
