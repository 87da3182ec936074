//! `vq-train downstream` end to end on the embedded demo data, tiny: per estimator × seed a
//! tokenizer, its codes, a prior, the likelihood and the samples' quality, in one table with the
//! paired statistics; a second invocation with `--resume` reuses every stage and writes the same
//! results.

mod common;

use common::vq_train_ok as vq_train;
use serde_json::Value;

#[test]
fn the_downstream_comparison_runs_every_stage_and_resumes() {
    let dir = std::env::temp_dir().join(format!("vq-train-downstream-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("cmp");
    let args = [
        "downstream",
        "--preset",
        "demo-fashion-mnist",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--seeds",
        "0,1",
        "--prior-steps",
        "2",
        "--prior-batch-size",
        "8",
        "--threads",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--resume",
    ];
    let text = vq_train(&args);
    assert!(text.contains("Domain precision"), "{text}");
    // No Inception weights: no Inception column.
    assert!(!text.contains("(Inception"), "{text}");
    let read = || std::fs::read_to_string(out.join("downstream.json")).unwrap();
    let first = read();
    let json: Value = serde_json::from_str(&first).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "2 estimators × 2 seeds");
    for r in rows {
        let bits = r["prior"]["bits_per_token"].as_f64().unwrap();
        assert!(bits > 0.0 && bits.is_finite(), "{r}");
        let d = &r["generation"]["domain"];
        for key in ["precision", "recall", "class_accuracy"] {
            let v = d[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} {v}");
        }
        assert!(d["fd"].as_f64().unwrap().is_finite(), "{r}");
        assert_eq!(r["generation"]["samples"], 500, "50 grids per class");
        assert!(r["generation"]["inception"].is_null());
    }
    // Each estimator's row per seed is its own tokenizer's: the two seeds differ.
    assert_ne!(rows[0]["val_rec_mse"], rows[1]["val_rec_mse"]);
    let prior_weights = out.join("ste/seed0/prior/checkpoints/step-00000002/model.safetensors");
    let before = std::fs::metadata(&prior_weights)
        .unwrap()
        .modified()
        .unwrap();

    // Again: nothing retrains, the same numbers come out.
    vq_train(&args);
    assert_eq!(read(), first);
    let after = std::fs::metadata(&prior_weights)
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "the finished prior was trained again");
    let _ = std::fs::remove_dir_all(&dir);
}
