fn main() {
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
