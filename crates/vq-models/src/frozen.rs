//! Loading a frozen pretrained network from safetensors: the file must hold exactly the
//! network's variables, with their shapes, as float32 — a missing, extra, mis-shaped or
//! differently typed tensor is an error naming it (tch's own `VarStore::load` would ignore extra
//! tensors, broadcast a mis-shaped one and adopt the file's precision).

use std::collections::HashMap;
use std::path::Path;

use tch::{Kind, Tensor, nn};

use crate::error::{ModelError, Result};

/// Loads `file` into every variable of `vs`, checked as the module docs say, then freezes `vs`.
pub(crate) fn load(vs: &mut nn::VarStore, file: &Path) -> Result<()> {
    let err = |why: String| ModelError::Weights {
        file: file.display().to_string(),
        why,
    };
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(file)
        .map_err(|e| err(e.to_string()))?
        .into_iter()
        .collect();
    let vars = vs.variables();
    let mut missing: Vec<&str> = vars
        .keys()
        .filter(|k| !tensors.contains_key(*k))
        .map(String::as_str)
        .collect();
    let mut extra: Vec<&str> = tensors
        .keys()
        .filter(|k| !vars.contains_key(*k))
        .map(String::as_str)
        .collect();
    missing.sort_unstable();
    extra.sort_unstable();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(err(format!(
            "not this network's weights: missing {}; unexpected {}",
            list(&missing),
            list(&extra)
        )));
    }
    let _guard = tch::no_grad_guard();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_unstable();
    for name in names {
        let (src, mut dst) = (&tensors[name], vars[name].shallow_clone());
        if src.size() != dst.size() {
            return Err(err(format!(
                "tensor {name} has shape {:?}, the network's is {:?}",
                src.size(),
                dst.size()
            )));
        }
        if src.kind() != Kind::Float {
            return Err(err(format!(
                "tensor {name} holds {:?} values; float32 expected",
                src.kind()
            )));
        }
        dst.copy_(src);
    }
    vs.freeze();
    Ok(())
}

fn list(names: &[&str]) -> String {
    const SHOWN: usize = 6;
    match names.len() {
        0 => "none".into(),
        n if n <= SHOWN => names.join(", "),
        n => format!("{} and {} more", names[..SHOWN].join(", "), n - SHOWN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn store() -> nn::VarStore {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = nn::linear(vs.root() / "fc", 3, 2, Default::default());
        vs
    }

    #[test]
    fn only_the_exact_float32_layout_loads() {
        let dir = std::env::temp_dir().join(format!("vq-models-frozen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("w.safetensors");
        let w = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]);
        let b = Tensor::from_slice(&[7.0f32, 8.0]);
        let cases: Vec<(Vec<(&str, Tensor)>, &str)> = vec![
            (vec![("fc.weight", w.shallow_clone())], "missing fc.bias"),
            (
                vec![
                    ("fc.weight", w.shallow_clone()),
                    ("fc.bias", b.shallow_clone()),
                    ("fc.extra", b.shallow_clone()),
                ],
                "unexpected fc.extra",
            ),
            (
                vec![
                    ("fc.weight", w.view([3, 2])),
                    ("fc.bias", b.shallow_clone()),
                ],
                "fc.weight has shape [3, 2]",
            ),
            (
                vec![
                    ("fc.weight", w.shallow_clone()),
                    ("fc.bias", b.to_kind(Kind::Double)),
                ],
                "fc.bias holds Double",
            ),
        ];
        for (tensors, want) in cases {
            Tensor::write_safetensors(&tensors, &file).unwrap();
            let e = load(&mut store(), &file).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("w.safetensors"), "{e}");
        }
        Tensor::write_safetensors(&[("fc.weight", &w), ("fc.bias", &b)], &file).unwrap();
        let mut vs = store();
        load(&mut vs, &file).unwrap();
        let v = vs.variables();
        assert_eq!(v["fc.weight"], w);
        assert_eq!(v["fc.bias"], b);
        assert!(!v["fc.bias"].requires_grad());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
