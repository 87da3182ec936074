//! The binary end to end: train → eval → refusal to overwrite → resume of a finished run.

use std::process::Command;

fn vq_train(args: &[&str]) -> (bool, String) {
    let (status, text) = code(args);
    (status == Some(0), text)
}

#[test]
fn train_then_eval_writes_the_run_folder() {
    let dir = std::env::temp_dir().join(format!("vq-train-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let common = [
        "train",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--log-every",
        "1",
        "--threads",
        "1",
        "--quiet",
        "--data",
        "synthetic:32",
        "--out",
        d,
    ];
    let (ok, text) = vq_train(&common);
    assert!(ok, "{text}");
    assert!(text.contains("trained to step 2"), "{text}");
    for f in [
        "run.json",
        "metrics.jsonl",
        "eval.json",
        "reconstructions.png",
        "curves.png",
        "checkpoints/latest/model.safetensors",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing: {text}");
    }
    let (ok, text) = vq_train(&["eval", "--run", d]);
    assert!(ok && text.contains("val: 32 images"), "{text}");
    assert!(
        text.contains("LPIPS needs weights (--lpips; cargo xtask download-weights)"),
        "{text}"
    );
    // LPIPS weights in the default place (random, in the network's layout): the column fills
    // without flags, and says where the file came from.
    let weights = dir.join("weights");
    std::fs::create_dir_all(&weights).unwrap();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    vq_models::Lpips::new(&vs.root());
    // Non-negative heads, as LPIPS's are: the distance is then >= 0.
    for (name, mut t) in vs.variables() {
        if name.starts_with("lin") {
            let _ = tch::no_grad(|| t.fill_(0.01));
        }
    }
    vs.save(weights.join(vq_weights::Network::Lpips.file_name()))
        .unwrap();
    let (status, text) = code_with(&["eval", "--run", d], weights.to_str().unwrap());
    assert_eq!(status, Some(0), "{text}");
    assert!(
        text.contains("lpips weights: ") && text.contains("(the default place"),
        "{text}"
    );
    assert!(
        !text.contains("LPIPS needs weights") && text.contains("LPIPS 0."),
        "{text}"
    );
    std::fs::remove_dir_all(&weights).unwrap();
    // watch: a finished run's last window, "finished", curves.png redrawn in place.
    std::fs::remove_file(dir.join("curves.png")).unwrap();
    let (ok, text) = vq_train(&["watch", "--run", d, "--every", "1"]);
    assert!(
        ok && text.contains("step 2/2 (100.0%), finished | loss"),
        "{text}"
    );
    let partial = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("curves.partial")
        });
    assert!(dir.join("curves.png").is_file() && !partial);
    let (ok, text) = vq_train(&["watch", "--run", "/nonexistent/run", "--once"]);
    assert!(
        !ok && text.contains("/nonexistent/run is not a run folder"),
        "{text}"
    );
    let (ok, text) = vq_train(&common);
    assert!(!ok && text.contains("--resume"), "{text}");
    let (ok, text) = vq_train(&["train", "--preset", "no-such-preset", "--out", d]);
    assert!(
        !ok && text.contains("demo-fashion-mnist"),
        "lists the known presets: {text}"
    );
    let (ok, text) = vq_train(&["compare", "--estimator", "ste", "--out", d]);
    assert!(!ok && text.contains("--estimators ste"), "{text}");
    let (ok, text) = vq_train(&["train", "--help"]);
    assert!(
        ok && text.contains("ucf101:<dir>") && text.contains("image-folder:<dir>"),
        "{text}"
    );
    let (ok, text) = vq_train(&["train", "--data", "imagenet", "--out", d]);
    assert!(!ok && text.contains("unknown data source"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `vq-train args`; returns (exit code, output). No default place for pretrained weights
/// (a machine's own downloads would change the runs).
fn code(args: &[&str]) -> (Option<i32>, String) {
    code_with(args, "")
}

/// Runs `vq-train args` with `VQ_WEIGHTS=weights`.
fn code_with(args: &[&str], weights: &str) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vq-train"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env(vq_weights::DIR_ENV, weights)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn empty_data_and_bad_thread_counts_are_errors_not_panics() {
    let dir = std::env::temp_dir().join(format!("vq-train-cli-empty-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("run");
    let out = out.to_str().unwrap();
    // IDX files with valid headers and no images.
    let mut images = vec![0u8, 0, 8, 3];
    for v in [0u32, 28, 28] {
        images.extend(v.to_be_bytes());
    }
    let mut labels = vec![0u8, 0, 8, 1];
    labels.extend(0u32.to_be_bytes());
    for split in ["train", "t10k"] {
        std::fs::write(dir.join(format!("{split}-images-idx3-ubyte")), &images).unwrap();
        std::fs::write(dir.join(format!("{split}-labels-idx1-ubyte")), &labels).unwrap();
    }
    let idx = format!("fashion-mnist:{}", dir.display());
    for (args, expected) in [
        (vec!["--data", "synthetic:0"], "at least 1"),
        (vec!["--data", idx.as_str()], "no images"),
        (vec!["--threads", "0"], "at least 1 thread"),
        (vec!["--threads=-3"], "at least 1 thread"),
        (vec!["--threads", "-3"], "at least 1 thread"),
        (vec!["--lr", "-0.001"], "learning rate must be > 0"),
        (
            vec!["--stop-after", "0"],
            "--stop-after 0 would stop before the first step",
        ),
        (vec!["--log-every", "0"], "give at least 1 (got 0 and 250)"),
        (
            vec!["--checkpoint-every", "0"],
            "give at least 1 (got 25 and 0)",
        ),
        (
            vec!["--lpips", "/nonexistent/lpips.safetensors"],
            "no such file",
        ),
    ] {
        let mut all = vec!["train", "--quiet", "--steps", "1", "--out", out];
        all.extend(&args);
        let (status, text) = code(&all);
        assert_eq!(status, Some(1), "{args:?}: {text}");
        assert!(text.contains(expected), "{args:?}: {text}");
        assert!(!dir.join("run").exists(), "{args:?} left a run folder");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A save that fails part-way (the file-size limit of `ulimit -f` cuts the model file, as a full
/// disk would): the error is plain and names the way back, no half-written folder stays, the
/// last checkpoint is intact, and rerunning with --resume continues from it to the end.
#[cfg(unix)]
#[test]
fn a_failed_save_loses_nothing_and_says_the_way_back() {
    let dir = std::env::temp_dir().join(format!("vq-failed-save-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = dir.join("r");
    let bin = env!("CARGO_BIN_EXE_vq-train");
    let args = format!(
        "train --preset demo-fashion-mnist --steps 4 --batch-size 8 --checkpoint-every 2 \
         --quiet --threads 1 --out {}",
        run.display()
    );
    let sh = |limit: &str, extra: &str| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("trap '' XFSZ; {limit} exec {bin} {args} {extra}"))
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    let first = sh("", "--stop-after 2");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    // 150 KiB: enough for the logs, not for the 1.1 MB model file.
    let failed = sh("ulimit -f 300;", "--resume");
    let err = String::from_utf8_lossy(&failed.stderr).into_owned();
    assert!(!failed.status.success(), "{err}");
    assert!(
        err.contains("step-00000002, step 2) is intact") && err.contains("--resume"),
        "{err}"
    );
    assert!(
        err.contains("File too large") && !err.contains("Os {"),
        "{err}"
    );
    let mut left: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["latest", "step-00000002"]);
    let again = sh("", "--resume");
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(
        run.join("checkpoints/step-00000004/model.safetensors")
            .is_file()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A damaged latest checkpoint on --resume: the error names it, the intact earlier checkpoint
/// kept beside it, and the command that points `latest` back at it; following it continues.
#[cfg(unix)]
#[test]
fn a_damaged_checkpoint_names_the_intact_one_beside_it() {
    let dir = std::env::temp_dir().join(format!("vq-damaged-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = dir.join("r");
    let train = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vq-train"))
            .args(["train", "--preset", "demo-fashion-mnist", "--steps", "6"])
            .args(["--batch-size", "8", "--checkpoint-every", "2", "--quiet"])
            .args(["--threads", "1", "--out"])
            .arg(&run)
            .args(extra)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    assert!(train(&["--stop-after", "4"]).status.success());
    let model = run.join("checkpoints/step-00000004/model.safetensors");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap();
    f.set_len(100).unwrap();
    let out = train(&["--resume"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("step-00000004 cannot be read"), "{err}");
    assert!(err.contains("ln -sfn step-00000002"), "{err}");
    std::os::unix::fs::symlink("step-00000002", run.join("checkpoints/latest.new")).unwrap();
    std::fs::rename(
        run.join("checkpoints/latest.new"),
        run.join("checkpoints/latest"),
    )
    .unwrap();
    let again = train(&["--resume"]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(
        run.join("checkpoints/step-00000006/model.safetensors")
            .is_file()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
