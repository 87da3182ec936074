//! LPIPS, the FID Inception network, the Fréchet distance, the Inception score, improved
//! precision / recall and the TimeSformer encoder against the reference packages' own outputs:
//! fixtures written by `tests/reference/make_fixtures.py` with `lpips` 0.1.4, `pytorch-fid`
//! 0.3.0 (scipy's `sqrtm`), `torch-fidelity` 0.4.0,
//! `transformers` 4.46.3, torchvision 0.28.0 and torch 2.13.0 (see that script and
//! `requirements.txt`). The networks get the script's deterministic weights
//! (the pretrained ones cannot be shipped), built here by the same formula. No Python runs here.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{fill, fixture, get, relative};
use tch::{Device, nn};
use vq_models::timesformer::{TimeSformerConfig, TimeSformerEncoder};
use vq_models::{FidInception, Lpips, frechet_distance, inception_score, precision_recall};

#[test]
fn lpips_equals_the_lpips_package() {
    let f = fixture("lpips");
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Lpips::new(&vs.root());
    fill(&vs);
    let _guard = tch::no_grad_guard();
    let (x, y) = (get(&f, "x"), get(&f, "y"));
    let d = net.forward(&x, &y);
    let want = get(&f, "distance");
    let err = relative(&d, &want);
    eprintln!("LPIPS vs lpips 0.1.4: relative error {err:.2e} (distances {want:?})");
    assert!(
        err < 1e-5,
        "LPIPS {d:?} vs lpips {want:?}: relative error {err:.2e}"
    );
    assert_eq!(f64::try_from(net.forward(&x, &x).abs().max()).unwrap(), 0.0);
}

#[test]
fn fid_inception_features_and_logits_equal_pytorch_fid() {
    let f = fixture("fid_inception");
    let vs = nn::VarStore::new(Device::Cpu);
    let net = FidInception::new(&vs.root());
    fill(&vs);
    let _guard = tch::no_grad_guard();
    let (pool, logits) = net.forward(&get(&f, "x"));
    let (ep, el) = (
        relative(&pool, &get(&f, "pool")),
        relative(&logits, &get(&f, "logits")),
    );
    eprintln!("FID Inception vs pytorch-fid 0.3.0: pool {ep:.2e}, logits {el:.2e}");
    assert!(ep < 1e-5 && el < 1e-5, "pool {ep:.2e}, logits {el:.2e}");
}

#[test]
fn frechet_distance_and_inception_score_equal_the_references() {
    let f = fixture("frechet");
    let fid = frechet_distance(&get(&f, "a"), &get(&f, "b"));
    let want = f64::try_from(get(&f, "fid")).unwrap();
    eprintln!("Fréchet distance {fid} vs pytorch-fid/scipy {want}");
    assert!((fid - want).abs() <= 1e-9 * want, "{fid} vs {want}");
    let (mean, std) = inception_score(&get(&f, "logits"), 2);
    let want = Vec::<f64>::try_from(get(&f, "is_mean_std")).unwrap();
    assert!(
        (mean - want[0]).abs() <= 1e-9 * want[0],
        "IS {mean} vs {}",
        want[0]
    );
    assert!(
        (std - want[1]).abs() <= 1e-9 * want[1],
        "IS std {std} vs {}",
        want[1]
    );
}

/// The same counts: torch-fidelity's fractions are float32 means, so they agree to 1e-6, while
/// one point more or less inside a manifold moves a fraction by 1/230 or more. The fixture's sets
/// include duplicates (some neighbour radii are 0).
#[test]
fn precision_recall_equals_torch_fidelity() {
    let f = fixture("prc");
    let (fake, real) = (get(&f, "fake"), get(&f, "real"));
    for k in [3usize, 5] {
        let got = precision_recall(&fake, &real, k);
        let want = Vec::<f64>::try_from(get(&f, &format!("precision_recall_k{k}"))).unwrap();
        eprintln!("k {k}: precision, recall {got:?} vs torch-fidelity {want:?}");
        assert!(
            (got.0 - want[0]).abs() < 1e-6 && (got.1 - want[1]).abs() < 1e-6,
            "k {k}: {got:?} vs {want:?}"
        );
    }
    // The roles are not symmetric: swapping the sets swaps precision and recall.
    let (p, r) = precision_recall(&real, &fake, 3);
    assert_eq!((r, p), precision_recall(&fake, &real, 3));
}

/// The encoder's tokens (B, hidden, T, g, g) are `TimesformerModel`'s `last_hidden_state`
/// without the CLS token, in its patch-major, frame-minor order (token n·T + t).
#[test]
fn timesformer_encoder_equals_transformers() {
    let f = fixture("timesformer");
    let c = Vec::<i64>::try_from(get(&f, "config")).unwrap();
    let c: Vec<usize> = c.iter().map(|&v| v as usize).collect();
    let config = TimeSformerConfig {
        frames: c[0],
        image_size: c[1],
        patch_size: c[2],
        channels: c[3],
        hidden: c[4],
        layers: c[5],
        heads: c[6],
        intermediate: c[7],
        layer_norm_eps: 1e-6,
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let net = TimeSformerEncoder::new(&vs.root(), &config).unwrap();
    fill(&vs);
    let _guard = tch::no_grad_guard();
    let out = nn::Module::forward(&net, &get(&f, "x"));
    let (b, d) = (out.size()[0], config.hidden as i64);
    let tokens = out.permute([0, 3, 4, 2, 1]).reshape([b, -1, d]);
    let want = get(&f, "last_hidden_state");
    let want = want.narrow(1, 1, want.size()[1] - 1);
    let err = relative(&tokens, &want);
    eprintln!("TimeSformer encoder vs transformers 4.46.3: relative error {err:.2e}");
    assert!(err < 1e-5, "relative error {err:.2e}");
}

/// Variable name → shape, and the count of trainable parameters.
type Layout = (BTreeMap<String, Vec<i64>>, i64);

/// The layout of the variables of `vs` under `prefix` (stripped).
fn layout(vs: &nn::VarStore, prefix: &str) -> Layout {
    let trainable: std::collections::HashSet<String> = vs
        .trainable_variables()
        .iter()
        .map(|t| format!("{:p}", t.data_ptr()))
        .collect();
    let mut count = 0;
    let mut map = BTreeMap::new();
    for (name, t) in vs.variables() {
        if let Some(rest) = name.strip_prefix(prefix) {
            if trainable.contains(&format!("{:p}", t.data_ptr())) {
                count += t.numel() as i64;
            }
            map.insert(rest.to_owned(), t.size());
        }
    }
    (map, count)
}

/// Every variable of the presets' encoders, decoders and discriminators has the name and shape
/// of the reference module's state-dict entry, and no entry is missing or extra (layouts.json,
/// from taming-transformers, latent-diffusion's copy of it and transformers).
#[test]
fn presets_have_the_reference_modules_layouts() {
    use vq_models::{PatchDiscriminator, Preset, VqAutoencoder};
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/layouts.json");
    let layouts: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let reference = |key: &str| {
        let m = &layouts[key];
        let map: BTreeMap<String, Vec<i64>> =
            serde_json::from_value(m["state_dict"].clone()).unwrap();
        (map, m["parameters"].as_i64().unwrap())
    };
    let check = |what: String, ours: Layout, key: &str| {
        let (want, count) = reference(key);
        let missing: Vec<_> = want.keys().filter(|k| !ours.0.contains_key(*k)).collect();
        let extra: Vec<_> = ours.0.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{what} vs {key}: missing {missing:?}, extra {extra:?}"
        );
        for (name, shape) in &want {
            assert_eq!(&ours.0[name], shape, "{what} vs {key}: {name}");
        }
        assert_eq!(ours.1, count, "{what} vs {key}: trainable parameters");
    };
    for (preset, enc, dec) in [
        (
            Preset::VqVaeF16Euclidean,
            "taming_f16_encoder",
            Some("taming_f16_decoder"),
        ),
        (
            Preset::VqVaeF4Cosine,
            "taming_f4_encoder",
            Some("taming_f4_decoder"),
        ),
        (
            Preset::VqganF16Imagenet,
            "taming_f16_encoder",
            Some("taming_f16_decoder"),
        ),
        (
            Preset::LdmF4,
            "taming_f4_encoder",
            Some("taming_f4_decoder"),
        ),
        (Preset::LdmF8, "ldm_f8_encoder", Some("ldm_f8_decoder")),
        (Preset::TimeSformerBair, "timesformer_bair", None),
        (Preset::TimeSformerUcf101, "timesformer_ucf101", None),
    ] {
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = VqAutoencoder::new(&vs.root(), &preset.config()).unwrap();
        check(
            format!("{} encoder", preset.name()),
            layout(&vs, "encoder."),
            enc,
        );
        if let Some(dec) = dec {
            check(
                format!("{} decoder", preset.name()),
                layout(&vs, "decoder."),
                dec,
            );
        }
    }
    for (preset, key) in [
        (Preset::VqganF16Imagenet, "nlayer_discriminator_3"),
        (Preset::LdmF8, "nlayer_discriminator_2"),
    ] {
        let vs = nn::VarStore::new(Device::Cpu);
        let _d = PatchDiscriminator::new(&vs.root(), &preset.gan().unwrap()).unwrap();
        check(
            format!("{} discriminator", preset.name()),
            layout(&vs, ""),
            key,
        );
    }
}

/// A small taming Encoder and Decoder (ResNet blocks, attention, down- and upsampling) give
/// taming-transformers' outputs for the same weights.
#[test]
fn taming_encoder_and_decoder_equal_taming_transformers() {
    use vq_models::taming::{Decoder, Encoder, TamingConfig};
    let f = fixture("taming");
    let cfg = TamingConfig {
        ch: 32,
        ch_mult: vec![1, 2],
        num_res_blocks: 1,
        attn_resolutions: vec![8],
        in_channels: 3,
        out_channels: 3,
        resolution: 16,
        z_channels: 4,
        norm_groups: 32,
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let enc = Encoder::new(&(vs.root() / "encoder"), &cfg).unwrap();
    let dec = Decoder::new(&(vs.root() / "decoder"), &cfg).unwrap();
    fill(&vs);
    let _guard = tch::no_grad_guard();
    let latents = nn::Module::forward(&enc, &get(&f, "x"));
    let e = relative(&latents, &get(&f, "latents"));
    let out = nn::Module::forward(&dec, &get(&f, "latents"));
    let d = relative(&out, &get(&f, "reconstruction"));
    eprintln!("taming Encoder / Decoder vs taming-transformers: {e:.2e} / {d:.2e}");
    assert!(e < 1e-5 && d < 1e-5, "encoder {e:.2e}, decoder {d:.2e}");
}
