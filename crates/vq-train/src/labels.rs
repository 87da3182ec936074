//! The class label of every sample of a split, where the source has classes: Fashion-MNIST's
//! IDX label files (10 classes), an image folder's class sub-folders and ImageNet's classes
//! (class index = position in the sorted class list, as every PyTorch code base numbers them).
//! Synthetic data and the video sets have none.

use anyhow::{Context, Result};
use vq_data::Split;
use vq_data::images::{ImageDataset, ImageNetSplit};

use crate::data::{DataSource, Pipeline};

/// The labels of a split: one class index per sample, in the split's sample order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    /// Class index per sample.
    pub values: Vec<u32>,
    /// The class names, by index.
    pub classes: Vec<String>,
}

/// Fashion-MNIST's class names, by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// The labels of `split` of `source` (`None` for a source without classes).
///
/// # Errors
/// Unreadable label files or listings.
pub fn split_labels(
    source: &DataSource,
    split: Split,
    pipeline: Pipeline,
) -> Result<Option<Labels>> {
    let fashion = |y: ndarray::Array1<u8>| Labels {
        values: y.iter().map(|&v| u32::from(v)).collect(),
        classes: FASHION_MNIST_CLASSES
            .iter()
            .map(|&c| c.to_owned())
            .collect(),
    };
    let listed = |ds: ImageDataset| Labels {
        values: ds.entries().iter().map(|e| e.label).collect(),
        classes: ds.classes().to_vec(),
    };
    // Labels do not depend on the preprocessing; any transform lists the same entries.
    let transform = pipeline.transform(1, split);
    Ok(Some(match source {
        DataSource::FashionMnistDemo => fashion(
            vq_data::fashion_mnist_demo(split)
                .context("reading the embedded Fashion-MNIST demo labels")?
                .1,
        ),
        DataSource::FashionMnist(dir) => fashion(crate::data::read_fashion_mnist(dir, split)?.1),
        DataSource::ImageFolder(dir) => {
            let sub = match split {
                Split::Train => "train",
                Split::Test => "val",
            };
            listed(ImageDataset::folder_split(dir, sub, transform)?)
        }
        DataSource::ImageNet(path) => {
            let s = match split {
                Split::Train => ImageNetSplit::Train,
                Split::Test => ImageNetSplit::Val,
            };
            listed(ImageDataset::imagenet(path, s, None, transform)?)
        }
        DataSource::Synthetic { .. } | DataSource::Bair(_) | DataSource::Ucf101(_) => {
            return Ok(None);
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image folder whose held-out split lacks a class: the classes after it keep their
    /// training indices there (a class-conditional prior is trained on one split's labels and
    /// judged on the other's).
    #[test]
    fn an_image_folders_splits_share_one_class_numbering() {
        let root = std::env::temp_dir().join(format!("vq-labels-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let image = image::RgbImage::from_pixel(8, 8, image::Rgb([10, 20, 30]));
        for (split, classes) in [
            ("train", ["cat", "cow", "dog"].as_slice()),
            ("val", &["cat", "dog"]),
        ] {
            for c in classes {
                let dir = root.join(split).join(c);
                std::fs::create_dir_all(&dir).unwrap();
                image.save(dir.join("0.png")).unwrap();
            }
        }
        let source = DataSource::ImageFolder(root.clone());
        let get = |split| {
            split_labels(&source, split, Pipeline::CenterCrop)
                .unwrap()
                .unwrap()
        };
        let (train, val) = (get(Split::Train), get(Split::Test));
        assert_eq!(train.classes, ["cat", "cow", "dog"]);
        assert_eq!(val.classes, train.classes);
        assert_eq!(train.values, [0, 1, 2]);
        assert_eq!(val.values, [0, 2]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
