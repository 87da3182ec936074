fn main() {
    // ATen's multi-tensor optimiser ops (AdamW on CUDA), which tch does not bind.
    vq_build::compile_cpp_against_libtorch(&["csrc/vq_optim.cpp"], "vq_train_optim");
    vq_build::link_libtorch();
}
