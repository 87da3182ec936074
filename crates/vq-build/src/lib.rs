//! Build-script helper for the crates of this workspace that use `tch`.
//!
//! Link arguments printed by a library's build script reach only that package's own binaries,
//! tests, examples and benches; they do not propagate to dependents. So every package that builds
//! an executable against libtorch calls [`link_libtorch`] from its own `build.rs`, and lists
//! `torch-sys` as a direct dependency so that cargo hands its build script the variable
//! `DEP_TCH_LIBTORCH_LIB` (torch-sys declares `links = "tch"` and prints `libtorch_lib`).
//!
//! ```text
//! // build.rs of a package that depends on `tch` and `torch-sys`
//! fn main() {
//!     vq_build::link_libtorch();
//! }
//! ```

use std::path::PathBuf;

/// Libraries of a CUDA build of libtorch that must stay in `DT_NEEDED` even though no symbol of
/// theirs is referenced directly: they register the CUDA backend from static initialisers.
const CUDA_LIBS: &[&str] = &["torch_cuda"];

/// Prints the `cargo:` instructions that make every executable of the calling package
///
/// * find libtorch at run time without `LD_LIBRARY_PATH` (an rpath to the libtorch `lib` folder),
/// * keep `libtorch_cuda.so` (when libtorch has one) as a dependency even though the linker's
///   default `--as-needed` would drop it, so that `tch::Cuda::is_available()` is true on a GPU
///   machine.
///
/// Does nothing on targets other than Linux.
///
/// # Panics
/// Panics (failing the build with the message) when `DEP_TCH_LIBTORCH_LIB` is missing, i.e. the
/// calling package does not depend on `torch-sys` directly.
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let lib = PathBuf::from(std::env::var_os("DEP_TCH_LIBTORCH_LIB").expect(
        "DEP_TCH_LIBTORCH_LIB is not set: add `torch-sys` to this package's [dependencies]",
    ));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    for name in CUDA_LIBS {
        if lib.join(format!("lib{name}.so")).exists() {
            println!("cargo:rustc-link-arg=-l{name}");
        }
    }
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}

/// Compiles C++ `files` (paths relative to the calling package) against the headers of the
/// libtorch that torch-sys links, the way torch-sys compiles its own C++ (C++17, the CXX11 ABI
/// of the PyPI and current libtorch builds), into a static library `name` linked into the
/// calling package.
///
/// # Panics
/// Panics (failing the build with the message) when `DEP_TCH_LIBTORCH_LIB` is missing or the
/// C++ does not compile.
pub fn compile_cpp_against_libtorch(files: &[&str], name: &str) {
    compile_cpp_against_libtorch_with(files, name, &[], &[]);
}

/// [`compile_cpp_against_libtorch`] with preprocessor `defines` (`NAME` or `NAME=VALUE`) and extra
/// include folders (e.g. [`CudaHeaders`]).
///
/// # Panics
/// As [`compile_cpp_against_libtorch`].
pub fn compile_cpp_against_libtorch_with(
    files: &[&str],
    name: &str,
    defines: &[&str],
    includes: &[PathBuf],
) {
    let root = libtorch_root();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .includes(includes)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT");
    for d in defines {
        match d.split_once('=') {
            Some((k, v)) => build.define(k, v),
            None => build.define(d, None),
        };
    }
    build.files(files).compile(name);
}

/// The folder holding libtorch's `include/` and `lib/` (symlinks resolved).
fn libtorch_root() -> PathBuf {
    let lib = PathBuf::from(std::env::var_os("DEP_TCH_LIBTORCH_LIB").expect(
        "DEP_TCH_LIBTORCH_LIB is not set: add `torch-sys` to this package's [dependencies]",
    ));
    let lib = lib.canonicalize().unwrap_or(lib);
    lib.parent()
        .expect("the libtorch lib folder has a parent")
        .to_path_buf()
}

/// Where the CUDA runtime and NCCL headers of the linked libtorch are, when it is a CUDA build:
/// the PyPI wheel's `nvidia/*/include` beside `torch/` and the header-only CUDA wheels that
/// `cargo xtask setup` puts in `.libtorch/cuda-headers` (`crt/`, CCCL), else
/// `$CUDA_HOME/include` (default `/usr/local/cuda`) and `$NCCL_INCLUDE_DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaHeaders {
    /// Folders to add to the include path (holding `cuda_runtime_api.h` and `nccl.h`).
    pub includes: Vec<PathBuf>,
}

impl CudaHeaders {
    /// The headers, or `None` when libtorch has no `libtorch_cuda.so` or a header is missing.
    pub fn find() -> Option<Self> {
        println!("cargo:rerun-if-env-changed=CUDA_HOME");
        println!("cargo:rerun-if-env-changed=NCCL_INCLUDE_DIR");
        let root = libtorch_root();
        if !root.join("lib/libtorch_cuda.so").exists() {
            return None;
        }
        let mut candidates = Vec::new();
        // `<site>/nvidia/*/include` (the wheels torch depends on) and, beside `<site>`,
        // `cuda-headers/nvidia/*/include` (the header-only wheels `cargo xtask setup` adds).
        let mut roots = Vec::new();
        if let Some(site) = root.parent() {
            roots.push(site.join("nvidia"));
            if let Some(base) = site.parent() {
                roots.push(base.join("cuda-headers/nvidia"));
                println!(
                    "cargo:rerun-if-changed={}",
                    base.join("cuda-headers").display()
                );
            }
        }
        for nvidia in roots {
            if let Ok(entries) = std::fs::read_dir(&nvidia) {
                let mut dirs: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path().join("include")))
                    .collect();
                dirs.sort();
                for d in dirs {
                    candidates.push(d.join("cccl"));
                    candidates.push(d);
                }
            }
        }
        let cuda_home = std::env::var_os("CUDA_HOME")
            .map_or_else(|| PathBuf::from("/usr/local/cuda"), PathBuf::from);
        candidates.push(cuda_home.join("include"));
        if let Some(d) = std::env::var_os("NCCL_INCLUDE_DIR") {
            candidates.push(PathBuf::from(d));
        }
        let has = |file: &str| candidates.iter().any(|d| d.join(file).is_file());
        if !(has("cuda_runtime_api.h")
            && has("crt/host_config.h")
            && has("nv/target")
            && has("nccl.h"))
        {
            return None;
        }
        Some(Self {
            includes: candidates.into_iter().filter(|d| d.is_dir()).collect(),
        })
    }
}
