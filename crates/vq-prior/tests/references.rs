//! The prior against the reference implementations themselves: LlamaGen's GPT and
//! taming-transformers' minGPT, run by `tests/reference/make_fixtures.py` (LlamaGen at ce98ec4,
//! taming-transformers-rom1504 0.0.6, torch 2.13.0) on small models with random weights. Their
//! state dicts load into [`Prior`] under the same names, and the teacher-forced logits agree;
//! the presets have the parameter counts of the full-size references as built there. No Python
//! runs here.

use std::path::PathBuf;

use tch::{Device, Kind, Tensor, nn};
use vq_prior::{BlockStyle, Conditioning, Prior, PriorConfig, PriorKind};

fn fixture() -> Vec<(String, Tensor)> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/references.safetensors");
    Tensor::read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn get(f: &[(String, Tensor)], name: &str) -> Tensor {
    f.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("fixture tensor {name} missing"))
        .1
        .shallow_clone()
}

/// Copies the fixture's `<prefix>.<name>` tensors into `vs`: every variable of the prior has
/// one of the same shape, and every tensor of the reference's state dict is used.
fn load(vs: &nn::VarStore, f: &[(String, Tensor)], prefix: &str) {
    let vars = vs.variables();
    let theirs: Vec<&(String, Tensor)> = f
        .iter()
        .filter(|(n, _)| n.starts_with(&format!("{prefix}.")))
        .collect();
    assert_eq!(
        theirs.len(),
        vars.len(),
        "{prefix}: the reference has {} tensors, the prior {} variables",
        theirs.len(),
        vars.len()
    );
    for (name, t) in theirs {
        let ours = &vars[&name[prefix.len() + 1..]];
        assert_eq!(ours.size(), t.size(), "{name}");
        tch::no_grad(|| ours.shallow_clone().copy_(t));
    }
}

/// The fixtures' small models: K 48 on a 4×4 grid, 2 layers of width 32, 4 heads, no dropout.
fn small(style: BlockStyle, block_size: usize, conditioning: Conditioning) -> PriorConfig {
    PriorConfig {
        kind: PriorKind::Autoregressive,
        style,
        codebook_size: 48,
        grid_h: 4,
        grid_w: 4,
        width: 32,
        layers: 2,
        heads: 4,
        block_size,
        conditioning,
        dropout: 0.0,
        pkeep: 1.0,
        seed: 0,
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).unwrap()
}

#[test]
fn the_llama_style_prior_gives_llamagen_gpt_logits() {
    let f = fixture();
    let classes = Conditioning::Classes {
        classes: 5,
        dropout: 0.1,
    };
    let cfg = small(BlockStyle::Llama, 0, classes);
    let vs = nn::VarStore::new(Device::Cpu);
    let prior = Prior::new(&vs.root(), cfg).unwrap();
    load(&vs, &f, "llamagen");
    // Labels 0 and 4, and 5: the null class guidance uses (LlamaGen's extra table row).
    let codes = get(&f, "llamagen:codes");
    let want = get(&f, "llamagen:logits");
    let labels = get(&f, "llamagen:labels");
    let (first_labels, first_codes) = (labels.narrow(0, 0, 2), codes.narrow(0, 0, 2));
    let got = prior
        .logits(&first_codes, Some(&first_labels), false)
        .unwrap();
    let err = max_abs(&got, &want.narrow(0, 0, 2));
    // The null class is not a label a caller passes; guidance reaches it through the sampler.
    let uncond = tch::no_grad(|| {
        prior
            .guided_logits(
                &codes.narrow(0, 2, 1).narrow(1, 0, 7),
                &labels.narrow(0, 0, 1),
                0.0,
            )
            .unwrap()
    });
    let err_null = max_abs(&uncond, &want.get(2).get(7).unsqueeze(0));
    eprintln!("max |logit difference| {err:.2e}, null class {err_null:.2e}");
    assert!(err < 1e-5 && err_null < 1e-5, "{err} {err_null}");
    assert!(want.abs().max().double_value(&[]) > 0.1, "trivial fixture");
}

#[test]
fn the_mingpt_style_prior_gives_taming_transformer_logits() {
    let f = fixture();
    let cfg = small(BlockStyle::MinGpt, 16, Conditioning::StartCode { code: 3 });
    let vs = nn::VarStore::new(Device::Cpu);
    let prior = Prior::new(&vs.root(), cfg).unwrap();
    load(&vs, &f, "taming");
    let got = prior.logits(&get(&f, "taming:codes"), None, false).unwrap();
    let err = max_abs(&got, &get(&f, "taming:logits"));
    eprintln!("max |logit difference| {err:.2e}");
    assert!(err < 1e-5, "{err}");
}

#[test]
fn presets_have_the_parameter_counts_of_the_built_references() {
    let f = fixture();
    let count = |preset: &str, k: usize, grid: usize, classes: usize| {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = PriorConfig::preset(preset, k, grid, grid, classes).unwrap();
        Prior::new(&vs.root(), cfg).unwrap();
        vs.trainable_variables()
            .iter()
            .map(Tensor::numel)
            .sum::<usize>() as i64
    };
    for (preset, k, grid, classes) in [
        ("llamagen-gpt-b", 16384, 16, 1000),
        ("taming-16x16", 1024, 16, 0),
    ] {
        let want = get(&f, &format!("count:{preset}")).to_kind(Kind::Int64);
        assert_eq!(
            count(preset, k, grid, classes),
            i64::try_from(want).unwrap(),
            "{preset}"
        );
    }
}
