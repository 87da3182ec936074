fn main() {
    let mut files = vec!["csrc/vq_dist.cpp"];
    let mut defines = vec!["USE_C10D_GLOO"];
    let mut includes = Vec::new();
    println!("cargo:rustc-check-cfg=cfg(vq_dist_nccl)");
    match vq_build::CudaHeaders::find() {
        Some(cuda) => {
            files.push("csrc/vq_dist_nccl.cpp");
            defines.extend(["USE_C10D_NCCL", "VQ_DIST_NCCL"]);
            includes = cuda.includes;
            println!("cargo:rustc-cfg=vq_dist_nccl");
        }
        None => println!(
            "cargo:warning=vq-dist: libtorch has no CUDA or nccl.h was not found; building without NCCL (Gloo only)"
        ),
    }
    // Last on the include path: used only where libtorch lacks Gloo's headers (csrc/gloo_decls/gloo/README.md).
    includes.push(std::path::PathBuf::from("csrc/gloo_decls"));
    println!("cargo:rerun-if-changed=csrc/gloo_decls");
    vq_build::compile_cpp_against_libtorch_with(&files, "vq_dist_c10d", &defines, &includes);
    vq_build::link_libtorch();
}
