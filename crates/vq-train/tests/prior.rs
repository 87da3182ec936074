//! The prior kind end to end: `encode` records the classes, `train-prior` trains on the codes
//! through the run loop and resumes bit for bit, `sample` decodes through the tokenizer; codes
//! files that do not belong together are refused, naming the files.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::vq_train_ok as vq_train;
use safetensors::SafeTensors;
use vq_train::codeset::CodeSet;

/// A demo tokenizer trained for 2 steps (seed `seed`) in `dir`, and its codes of the embedded
/// Fashion-MNIST demo's val split.
fn tokenizer_and_codes(dir: &Path, seed: &str) -> (PathBuf, PathBuf) {
    let run = dir.join(format!("tok-{seed}"));
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    vq_train(&[
        "train",
        "--steps",
        "2",
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
        &s(&run),
    ]);
    let codes = dir.join(format!("codes-{seed}.safetensors"));
    vq_train(&[
        "encode",
        "--run",
        &s(&run),
        "--data",
        "fashion-mnist-demo",
        "--split",
        "val",
        "--out",
        &s(&codes),
        "--quiet",
        "--batch",
        "250",
    ]);
    (run, codes)
}

fn prior_args<'a>(codes: &'a str, tok: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train-prior",
        "--codes",
        codes,
        "--val-codes",
        codes,
        "--tokenizer",
        tok,
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--log-every",
        "2",
        "--checkpoint-every",
        "3",
        "--quiet",
        "--out",
        out,
    ]
}

#[test]
fn a_prior_trains_on_encoded_codes_resumes_bit_for_bit_and_samples() {
    let dir = std::env::temp_dir().join(format!("vq-train-prior-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (tok, codes) = tokenizer_and_codes(&dir, "1");
    let (tok_s, codes_s) = (tok.to_str().unwrap(), codes.to_str().unwrap());

    // The codes carry the demo's labels and class names.
    let set = CodeSet::open(std::slice::from_ref(&codes)).unwrap();
    let (_, expect) = vq_data::fashion_mnist_demo(vq_data::Split::Test).unwrap();
    let labels = Vec::<i64>::try_from(set.labels.as_ref().unwrap()).unwrap();
    assert_eq!(
        labels,
        expect.iter().map(|&v| i64::from(v)).collect::<Vec<_>>()
    );
    assert_eq!(set.classes.len(), 10);
    assert_eq!(set.grid(), (8, 8));

    // Straight, and stopped after 3 steps then resumed: the same weights, bit for bit.
    let straight = dir.join("prior-a");
    let text = vq_train(&prior_args(codes_s, tok_s, straight.to_str().unwrap()));
    assert!(text.contains("held-out NLL over 1000 grids"), "{text}");
    let split = dir.join("prior-b");
    let mut first = prior_args(codes_s, tok_s, split.to_str().unwrap());
    first.extend(["--stop-after", "3"]);
    vq_train(&first);
    let mut second = prior_args(codes_s, tok_s, split.to_str().unwrap());
    second.push("--resume");
    vq_train(&second);
    let weights = |run: &Path| {
        std::fs::read(run.join("checkpoints/step-00000006/model.safetensors")).unwrap()
    };
    assert!(
        weights(&straight) == weights(&split),
        "a resumed prior run differs"
    );

    // bf16 autocast: recorded, trained, and apart from f32 by rounding only.
    let bf16 = dir.join("prior-bf16");
    let mut args = prior_args(codes_s, tok_s, bf16.to_str().unwrap());
    args.extend(["--precision", "bf16"]);
    vq_train(&args);
    let run_json = std::fs::read_to_string(bf16.join("run.json")).unwrap();
    assert!(run_json.contains("\"precision\": \"bf16\""), "{run_json}");
    let last = |run: &Path| run.join("checkpoints/step-00000006/model.safetensors");
    let d = max_difference(&last(&straight), &last(&bf16));
    assert!(d > 0.0 && d < 0.05, "bf16 and f32 weights differ by {d}");

    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join("eval.json")).unwrap())
            .unwrap();
    let bits = eval["bits_per_token"].as_f64().unwrap();
    assert!(
        bits > 0.0 && bits < 9.0,
        "{bits} bits per code for 256 codes"
    );

    // Two classes, two grids each, decoded through the tokenizer.
    let out = dir.join("samples");
    vq_train(&[
        "sample",
        "--prior",
        straight.to_str().unwrap(),
        "--count",
        "2",
        "--classes",
        "3,7",
        "--top-k",
        "20",
        "--out",
        out.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(out.join("codes.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let labels: Vec<i32> = file
        .tensor("labels")
        .unwrap()
        .data()
        .chunks(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(labels, [3, 3, 7, 7]);
    assert_eq!(std::fs::read_dir(out.join("images")).unwrap().count(), 4);
    let grid = image::open(out.join("samples.png")).unwrap();
    assert!(grid.height() > 2 * 32, "two labelled rows of samples");
    // Settings that would sample nothing, twice or outside the classes are refused up front.
    for (bad, said) in [
        (["--count", "0"], "--count must be at least 1"),
        (["--batch", "0"], "--batch must be at least 1"),
        (["--classes", "3,3"], "names class 3 twice"),
        (["--classes", "10"], "class index 10 is outside 0..10"),
    ] {
        let mut args = vec!["sample", "--prior", straight.to_str().unwrap()];
        args.extend(bad);
        args.extend(["--out", out.to_str().unwrap()]);
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_vq-train"))
            .args(&args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(
            !run.status.success() && err.contains(said),
            "{bad:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{bad:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The largest absolute difference between two safetensors files' tensors.
fn max_difference(a: &Path, b: &Path) -> f64 {
    let load = |p: &Path| tch::Tensor::read_safetensors(p).unwrap();
    let (ta, tb) = (load(a), load(b));
    assert_eq!(ta.len(), tb.len());
    ta.iter()
        .map(|(name, t)| {
            let u = &tb.iter().find(|(n, _)| n == name).unwrap().1;
            f64::try_from((t - u).abs().max()).unwrap()
        })
        .fold(0.0, f64::max)
}

#[test]
fn two_ranks_train_a_prior_as_one_process_with_the_whole_batch() {
    let dir = std::env::temp_dir().join(format!("vq-train-prior-dp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (tok, codes) = tokenizer_and_codes(&dir, "3");
    let (tok_s, codes_s) = (tok.to_str().unwrap(), codes.to_str().unwrap());
    let one = dir.join("one");
    vq_train(&prior_args(codes_s, tok_s, one.to_str().unwrap()));
    let two = dir.join("two");
    let port = vq_dist::launch::free_local_port().unwrap().to_string();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_vq-train"))
                .args(prior_args(codes_s, tok_s, two.to_str().unwrap()))
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("RUST_BACKTRACE", "0")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = ranks
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for (rank, o) in outputs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {rank}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let file = "checkpoints/step-00000006/model.safetensors";
    let d = max_difference(&one.join(file), &two.join(file));
    eprintln!("prior, 1 vs 2 ranks: largest weight difference {d:.2e}");
    assert!(d < 1e-5, "weights differ by {d:.2e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn codes_that_do_not_belong_together_are_refused() {
    let dir = std::env::temp_dir().join(format!("vq-train-codeset-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (_, a) = tokenizer_and_codes(&dir, "1");
    let (_, b) = tokenizer_and_codes(&dir, "2");
    let err = CodeSet::open(&[a.clone(), b.clone()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("different tokenizers") && err.contains("codes-2"),
        "{err}"
    );
    // Not a codes file.
    let text = dir.join("notes.safetensors");
    std::fs::write(&text, b"not safetensors").unwrap();
    let err = format!("{:#}", CodeSet::open(&[text]).unwrap_err());
    assert!(err.contains("notes.safetensors"), "{err}");
    // A shard set with a shard missing.
    std::fs::copy(&a, dir.join("set-00000-of-00002.safetensors")).unwrap();
    let err = CodeSet::open(&[dir.join("set.safetensors")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("shard 2 of 2 is missing"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
