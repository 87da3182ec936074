fn main() {
    // ATen calls tch does not bind as needed: multi-tensor optimiser ops (AdamW on CUDA),
    // pinning host memory.
    vq_build::compile_cpp_against_libtorch(&["csrc/vq_ops.cpp"], "vq_train_ops");
    vq_build::link_libtorch();
}
