fn main() {
    vq_build::link_libtorch();
}
