fn main() {
    estimator_codes();
    vq_build::compile_cpp_against_libtorch(
        &[
            "csrc/vq_autograd.cpp",
            "csrc/vq_autocast.cpp",
            "csrc/vq_fused.cpp",
        ],
        "vq_tch_autograd",
    );
    // Whether the linked libtorch is a CUDA build (it then ships NVRTC, which the fused kernel's
    // compile test requires).
    let cuda = std::env::var_os("DEP_TCH_LIBTORCH_LIB")
        .is_some_and(|lib| std::path::Path::new(&lib).join("libtorch_cuda.so").exists());
    println!("cargo:rustc-env=VQ_TCH_LIBTORCH_CUDA={}", u8::from(cuda));
    // dlopen / dladdr of the fused kernel's driver and NVRTC loader (in libc itself from glibc 2.34).
    println!("cargo:rustc-link-lib=dl");
    vq_build::link_libtorch();
}

/// `$OUT_DIR/estimator_codes.rs` from `csrc/vq_estimator.h`, the one definition of each
/// estimator's integer code: `code`, an exhaustive match over `vq_core::Estimator` (a variant
/// without a line in the header, or a line without a variant, does not compile), and `CODES`.
fn estimator_codes() {
    let header = "csrc/vq_estimator.h";
    println!("cargo:rerun-if-changed={header}");
    let text = std::fs::read_to_string(header).expect("csrc/vq_estimator.h is readable");
    let mut arms = String::new();
    let mut table = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some("#define"), Some(name), Some(code), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        let Some(upper) = name.strip_prefix("VQ_EST_") else {
            continue;
        };
        let Ok(code) = code.parse::<i64>() else {
            continue;
        };
        let variant: String = upper
            .split('_')
            .map(|w| {
                let mut c = w.chars();
                c.next().map_or(String::new(), |f| {
                    f.to_ascii_uppercase().to_string() + &c.as_str().to_ascii_lowercase()
                })
            })
            .collect();
        arms.push_str(&format!("        Estimator::{variant} => {code},\n"));
        table.push(format!("(Estimator::{variant}, {code})"));
    }
    assert!(!table.is_empty(), "{header} defines no VQ_EST_ code");
    let code = format!(
        "/// The integer code of `estimator` in the C++ node and the CUDA kernel (generated from \
         `csrc/vq_estimator.h`).\n\
         pub(crate) const fn code(estimator: Estimator) -> i64 {{\n    match estimator {{\n{arms}    }}\n}}\n\n\
         /// Every estimator with its code, as `csrc/vq_estimator.h` lists them.\n\
         pub(crate) const CODES: [(Estimator, i64); {}] = [{}];\n",
        table.len(),
        table.join(", ")
    );
    let out = std::path::Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR"))
        .join("estimator_codes.rs");
    std::fs::write(out, code).expect("writing estimator_codes.rs");
}
