//! `vq-train encode` / `decode`: the codes of a split in safetensors shards, resumable, decoded
//! back to exactly the model's own reconstructions.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::vq_train_ok as vq_train;
use safetensors::tensor::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};
use vq_tch::Mode;
use vq_train::codes::{self, LoadedRun};
use vq_train::data::DataSource;

fn vq_train_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vq-train"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "vq-train {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A demo run trained for `steps` steps on 32 synthetic images in `dir`.
fn trained_run(dir: &Path, steps: &str, seed: &str) -> PathBuf {
    let run = dir.join(format!("run-{seed}"));
    vq_train(&[
        "train",
        "--steps",
        steps,
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--quiet",
        "--data",
        "synthetic:32",
        "--seed",
        seed,
        "--out",
        run.to_str().unwrap(),
    ]);
    run
}

fn shard(
    path: &Path,
) -> (
    Vec<u8>,
    Tensor,
    Vec<u8>,
    std::collections::HashMap<String, String>,
) {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let c = file.tensor("codes").unwrap();
    assert_eq!(c.dtype(), Dtype::U8, "256 codes fit in u8");
    let shape: Vec<i64> = c.shape().iter().map(|&d| d as i64).collect();
    let codes = Tensor::from_data_size(c.data(), &shape, Kind::Uint8);
    let decoded = file.tensor("decoded").unwrap().data().to_vec();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    (bytes, codes, decoded, meta)
}

#[test]
fn encode_writes_resumable_shards_that_decode_to_the_models_reconstructions() {
    let dir = std::env::temp_dir().join(format!("vq-train-codes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = trained_run(&dir, "2", "0");
    let out = dir.join("codes.safetensors");
    // The val split in shards of 20, forward passes of 12.
    let encode = || {
        vq_train(&[
            "encode",
            "--run",
            run.to_str().unwrap(),
            "--split",
            "val",
            "--out",
            out.to_str().unwrap(),
            "--shard-size",
            "20",
            "--batch",
            "12",
            "--quiet",
        ])
    };
    let text = encode();
    // synthetic:32 holds 32 held-out images: shards of 20 and 12.
    assert!(
        text.contains("32 samples (0 skipped) at step 2 in 2 file(s)"),
        "{text}"
    );
    let first = dir.join("codes-00000-of-00002.safetensors");
    let second = dir.join("codes-00001-of-00002.safetensors");
    let (bytes0, codes0, decoded0, meta0) = shard(&first);
    let (_, codes1, _, meta1) = shard(&second);
    assert_eq!(codes0.size(), [20, 8, 8]);
    assert_eq!(codes1.size(), [12, 8, 8]);
    assert_eq!(decoded0, vec![1; 20]);
    assert_eq!(meta0["format"], codes::FORMAT);
    assert_eq!(
        (meta0["first"].as_str(), meta1["first"].as_str()),
        ("0", "20")
    );
    assert_eq!(
        (meta0["total"].as_str(), meta0["split"].as_str()),
        ("32", "val")
    );
    assert_eq!(meta0["step"], "2");
    assert!(meta0["run_config"].contains("demo-fashion-mnist"));

    // The codes are the model's, and decode to its reconstructions bit for bit (the same
    // batches: 12 samples, as the shard was encoded).
    let mut loaded = LoadedRun::load(&run, Device::Cpu).unwrap();
    let cfg = &loaded.config;
    let set = cfg
        .load_split(&DataSource::parse(&cfg.data).unwrap(), vq_data::Split::Test)
        .unwrap();
    let x = set
        .batch(&(20..32).collect::<Vec<i64>>(), Device::Cpu)
        .unwrap();
    let own = tch::no_grad(|| loaded.model.forward(&x, Mode::Eval)).unwrap();
    assert!(own.vq.indices.to_kind(Kind::Uint8).equal(&codes1));
    let again = tch::no_grad(|| loaded.model.decode_codes(&codes1)).unwrap();
    assert!(again.equal(&own.reconstruction), "decoded ≠ reconstruction");
    let png = dir.join("png");
    let text = vq_train(&[
        "decode",
        "--run",
        run.to_str().unwrap(),
        "--codes",
        second.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
        "--batch",
        "12",
    ]);
    assert!(text.contains("12 samples of 1 file(s) decoded"), "{text}");
    let want = vq_train::plot::rgb_images(&own.reconstruction).unwrap();
    for (k, img) in want.iter().enumerate() {
        let got = image::open(png.join(format!("{:06}.png", 20 + k)))
            .unwrap()
            .to_rgb8();
        assert!(got == *img, "image {}", 20 + k);
    }

    // Both shards in one call: every sample of the split.
    let all = dir.join("all");
    let text = vq_train(&[
        "decode",
        "--run",
        run.to_str().unwrap(),
        "--codes",
        first.to_str().unwrap(),
        second.to_str().unwrap(),
        "--out",
        all.to_str().unwrap(),
    ]);
    assert!(text.contains("32 samples of 2 file(s) decoded"), "{text}");
    assert_eq!(std::fs::read_dir(&all).unwrap().count(), 32);

    // Run again: complete shards are kept untouched; a missing one is written again with the
    // same contents (the metadata's key order may differ: it is a map).
    std::fs::remove_file(&second).unwrap();
    let text = encode();
    assert!(text.contains("(1 kept from before)"), "{text}");
    assert!(
        std::fs::read(&first).unwrap() == bytes0,
        "a complete shard was rewritten"
    );
    let (_, again1, decoded1, meta1_again) = shard(&second);
    assert!(again1.equal(&codes1) && decoded1 == vec![1; 12] && meta1_again == meta1);

    // Codes of another run (another codebook) and files that are not codes are refused.
    let other = trained_run(&dir, "1", "7");
    let err = vq_train_fails(&[
        "decode",
        "--run",
        other.to_str().unwrap(),
        "--codes",
        first.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(err.contains("is not the run's"), "{err}");
    let model = run.join("checkpoints/latest/model.safetensors");
    let err = vq_train_fails(&[
        "decode",
        "--run",
        run.to_str().unwrap(),
        "--codes",
        model.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(err.contains("is not a codes file"), "{err}");
    let err = vq_train_fails(&[
        "encode",
        "--run",
        run.to_str().unwrap(),
        "--split",
        "test",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("expected train or val"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn residual_codes_carry_their_stage_axis_and_decode_to_the_reconstructions() {
    let dir = std::env::temp_dir().join(format!("vq-train-codes-rq-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = dir.join("run");
    vq_train(&[
        "train",
        "--steps",
        "1",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--quiet",
        "--data",
        "synthetic:32",
        "--family",
        "residual2",
        "--out",
        run.to_str().unwrap(),
    ]);
    let out = dir.join("codes.safetensors");
    vq_train(&[
        "encode",
        "--run",
        run.to_str().unwrap(),
        "--split",
        "val",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    let (bytes, codes, _, _) = shard(&out);
    assert_eq!(codes.size(), [32, 8, 8, 2]);
    let file = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(file.tensor("codebook").unwrap().shape(), [2, 256, 32]);
    let mut loaded = LoadedRun::load(&run, Device::Cpu).unwrap();
    let cfg = &loaded.config;
    let set = cfg
        .load_split(&DataSource::parse(&cfg.data).unwrap(), vq_data::Split::Test)
        .unwrap();
    let x = set
        .batch(&(0..32).collect::<Vec<i64>>(), Device::Cpu)
        .unwrap();
    let own = tch::no_grad(|| loaded.model.forward(&x, Mode::Eval)).unwrap();
    assert!(own.vq.indices.to_kind(Kind::Uint8).equal(&codes));
    let again = tch::no_grad(|| loaded.model.decode_codes(&codes)).unwrap();
    // The forward pass adds the stages' outputs, whose values are their codes, in stage order,
    // as the decoder's embedding does: bit for bit.
    assert!(again.equal(&own.reconstruction), "decoded ≠ reconstruction");
    let png = dir.join("png");
    let text = vq_train(&[
        "decode",
        "--run",
        run.to_str().unwrap(),
        "--codes",
        out.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(text.contains("32 samples of 1 file(s) decoded"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `encode` and `decode` cut short by a full disk (here the file-size limit of `ulimit -f`,
/// which fails a write as a full disk does): a plain error naming the file, and no file left
/// half-written — under its own name or as a temporary one beside it.
#[cfg(unix)]
#[test]
fn a_failed_encode_or_decode_leaves_no_half_written_file() {
    let dir = std::env::temp_dir().join(format!("vq-codes-full-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = trained_run(&dir, "1", "0");
    // No byte may be written to a file (pipes are not limited).
    let no_space = |args: &[&str]| {
        let out = Command::new("sh")
            .arg("-c")
            .arg("trap '' XFSZ; ulimit -f 0; exec \"$0\" \"$@\"")
            .arg(env!("CARGO_BIN_EXE_vq-train"))
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let listing = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .map(|r| {
                r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let (codes_dir, codes) = (dir.join("codes"), dir.join("codes/val.safetensors"));
    let run_s = run.to_str().unwrap();
    let encode = [
        "encode",
        "--run",
        run_s,
        "--data",
        "synthetic:32",
        "--quiet",
        "--out",
    ];
    let err = no_space(&[&encode[..], &[codes.to_str().unwrap()]].concat());
    assert!(
        err.contains("val.safetensors") && err.contains("File too large") && !err.contains("Os {"),
        "{err}"
    );
    assert_eq!(listing(&codes_dir), Vec::<String>::new());
    vq_train(&[&encode[..], &[codes.to_str().unwrap()]].concat());
    let pngs = dir.join("png");
    let decode = [
        "decode",
        "--run",
        run_s,
        "--codes",
        codes.to_str().unwrap(),
        "--out",
    ];
    let err = no_space(&[&decode[..], &[pngs.to_str().unwrap()]].concat());
    assert!(
        err.contains("writing")
            && err.contains("000000.png")
            && err.contains("File too large")
            && !err.contains("Os {"),
        "{err}"
    );
    // Nothing half-written: whatever is there is a whole PNG.
    for name in listing(&pngs) {
        assert!(!name.starts_with('.'), "a temporary file is left: {name}");
        image::open(pngs.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
