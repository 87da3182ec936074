//! Proves that libtorch is linked and usable from a test binary: a forward and backward pass on
//! CPU, with the gradient checked against the closed form, and (on Linux) that the CUDA backend
//! library is loaded whenever the linked libtorch ships one.

use tch::{Kind, Tensor};

#[test]
fn forward_backward_on_cpu() {
    // Straight-through composition: y = e + sg(q - e); loss = sum(w * y).
    let e = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0]).set_requires_grad(true);
    let q = Tensor::from_slice(&[0.0f32, -1.0, 1.0, 2.0]);
    let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]);
    let y = &e + (&q - &e).detach();
    let loss = (&y * &w).sum(Kind::Float);
    loss.backward();
    // Forward value is q, gradient reaching e is w.
    assert_eq!(Vec::<f32>::try_from(&y).unwrap(), vec![0.0, -1.0, 1.0, 2.0]);
    assert_eq!(f32::try_from(&loss).unwrap(), 0.0 - 2.0 + 3.0 + 8.0);
    assert_eq!(
        Vec::<f32>::try_from(e.grad()).unwrap(),
        vec![1.0, 2.0, 3.0, 4.0]
    );
}

#[test]
fn matmul_backward_matches_closed_form() {
    tch::manual_seed(0);
    let a = Tensor::randn([5, 3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let b = Tensor::randn([3, 4], (Kind::Float, tch::Device::Cpu));
    a.matmul(&b).sum(Kind::Float).backward();
    // d/dA sum(A B) = 1 Bᵀ: every row equals the row sums of B.
    let expected = b
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
        .unsqueeze(0)
        .expand([5, 3], false);
    let diff = f64::try_from((a.grad() - expected).abs().max()).unwrap();
    assert!(diff < 1e-5, "max |grad - closed form| = {diff}");
}

#[cfg(target_os = "linux")]
#[test]
fn cuda_backend_library_is_loaded_when_present() {
    // Touch libtorch so that its libraries are certainly mapped.
    let _ = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let torch_cpu = maps
        .lines()
        .find_map(|l| {
            l.split_whitespace()
                .last()
                .filter(|p| p.ends_with("/libtorch_cpu.so"))
        })
        .expect("libtorch_cpu.so is not mapped into the test process");
    let lib_dir = std::path::Path::new(torch_cpu).parent().unwrap();
    if lib_dir.join("libtorch_cuda.so").exists() {
        assert!(
            maps.contains("/libtorch_cuda.so"),
            "{} has libtorch_cuda.so but the test binary does not load it: \
             the --no-as-needed link argument was dropped",
            lib_dir.display()
        );
    }
}
