fn main() {
    vq_build::compile_cpp_against_libtorch(
        &["csrc/vq_autograd.cpp", "csrc/vq_autocast.cpp"],
        "vq_tch_autograd",
    );
    vq_build::link_libtorch();
}
