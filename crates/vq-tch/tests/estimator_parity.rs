//! The libtorch autograd node gives the forward value `q` and the gradient `Mᵀw` of the paper's
//! map `M` for every estimator, on random, quantized, antipodal and zero rows; the codebook gets
//! nothing. The reference is a dense f64 matrix built in this file from the paper's formulas
//! (no vq-core code), so the f32 CPU leg — which runs vq-core's kernel — is checked against
//! something it does not share. Only inside the documented fallback zones (‖ê ± q̂‖ ≈ 0, where
//! the paper's formula divides by zero) the node is compared with vq-core's documented choice.

use ndarray::Array2;
use tch::{Device, Kind, Tensor};
use vq_core::{Estimator, Metric};

/// Devices the test bodies run on: CPU, plus CUDA with the `cuda-tests` feature (which then
/// requires a usable GPU).
fn devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    if cfg!(feature = "cuda-tests") {
        assert!(
            tch::Cuda::is_available(),
            "feature cuda-tests needs a CUDA device"
        );
        d.push(Device::Cuda(0));
    }
    d
}

fn to_tensor(a: &Array2<f32>) -> Tensor {
    let (n, d) = a.dim();
    Tensor::from_slice(a.as_slice().unwrap()).view([n as i64, d as i64])
}

fn to_array(t: &Tensor) -> Array2<f32> {
    let s = t.size();
    let v = Vec::<f32>::try_from(
        t.to_kind(Kind::Float)
            .to_device(Device::Cpu)
            .contiguous()
            .view([-1]),
    )
    .unwrap();
    Array2::from_shape_vec((s[0] as usize, s[1] as usize), v).unwrap()
}

fn randn(n: usize, d: usize, seed: i64) -> Array2<f32> {
    tch::manual_seed(seed);
    to_array(&Tensor::randn(
        [n as i64, d as i64],
        (Kind::Float, Device::Cpu),
    ))
}

/// Runs the node with tensors of `kind` (f32 on CPU: vq-core's kernel through the callback; f64:
/// the ATen formulas that CUDA uses): returns (forward value, ∂⟨w, q̃⟩/∂e, whether q received
/// a gradient).
fn run_kind(
    e: &Array2<f32>,
    q: &Array2<f32>,
    w: &Array2<f32>,
    est: Estimator,
    kind: Kind,
    device: Device,
) -> (Array2<f32>, Array2<f32>, bool) {
    let et = to_tensor(e)
        .to_kind(kind)
        .to_device(device)
        .set_requires_grad(true);
    let qt = to_tensor(q)
        .to_kind(kind)
        .to_device(device)
        .set_requires_grad(true);
    let y = vq_tch::apply_estimator(&et, &qt, est).unwrap();
    (&y * to_tensor(w).to_kind(kind).to_device(device))
        .sum(kind)
        .backward();
    let q_grad =
        qt.grad().defined() && f64::try_from(qt.grad().abs().sum(Kind::Double)).unwrap() != 0.0;
    (to_array(&y), to_array(&et.grad()), q_grad)
}

fn run(
    e: &Array2<f32>,
    q: &Array2<f32>,
    w: &Array2<f32>,
    est: Estimator,
) -> (Array2<f32>, Array2<f32>, bool) {
    run_kind(e, q, w, est, Kind::Float, Device::Cpu)
}

fn assert_close(a: &Array2<f32>, b: &Array2<f32>, what: &str) {
    for ((i, &x), &y) in a.indexed_iter().zip(b.iter()) {
        assert!(
            (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
            "{what}: at {i:?} libtorch {x} vs reference {y}"
        );
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// vq-core's documented floor on ‖e‖ (the only constant the reference takes from it).
const NORM_EPS: f64 = vq_core::NORM_EPS;

/// The paper's map `M` of one row as a dense f64 matrix (§4 and appendix A.8/A.9):
/// straight-through `I`; rotation `λ(I − 2rrᵀ + 2q̂êᵀ)` with `r = (ê + q̂)/‖ê + q̂‖`,
/// `λ = ‖q‖/‖e‖`; no-rescale the same with `λ = 1`; reflection `λ(I − 2vvᵀ)` with
/// `v = (ê − q̂)/‖ê − q̂‖`. A zero `e` or `q` gives `λI` (`‖e‖` floored at `NORM_EPS`).
/// `None` inside the fallback zone (`‖ê ± q̂‖² < 1e-7`), where the formula divides by zero.
fn paper_map(est: Estimator, e: &[f32], q: &[f32]) -> Option<Array2<f64>> {
    let d = e.len();
    let e: Vec<f64> = e.iter().map(|&v| f64::from(v)).collect();
    let q: Vec<f64> = q.iter().map(|&v| f64::from(v)).collect();
    let (ne, nq) = (dot(&e, &e).sqrt(), dot(&q, &q).sqrt());
    let lambda = match est {
        Estimator::Rotation | Estimator::Reflection => nq / ne.max(NORM_EPS),
        _ => 1.0,
    };
    let eye = Array2::<f64>::eye(d);
    if est == Estimator::StraightThrough || ne < NORM_EPS || nq < NORM_EPS {
        return Some(eye * lambda);
    }
    let eh: Vec<f64> = e.iter().map(|v| v / ne).collect();
    let qh: Vec<f64> = q.iter().map(|v| v / nq).collect();
    let sign = if est == Estimator::Reflection {
        -1.0
    } else {
        1.0
    };
    let r: Vec<f64> = eh.iter().zip(&qh).map(|(a, b)| a + sign * b).collect();
    let nr2 = dot(&r, &r);
    if nr2 < 1e-7 {
        return None;
    }
    let r: Vec<f64> = r.iter().map(|v| v / nr2.sqrt()).collect();
    let rotation = est != Estimator::Reflection;
    Some(Array2::from_shape_fn((d, d), |(i, j)| {
        let turn = if rotation { 2.0 * qh[i] * eh[j] } else { 0.0 };
        lambda * (eye[[i, j]] - 2.0 * r[i] * r[j] + turn)
    }))
}

/// The expected `∂⟨w, q̃⟩/∂e = Mᵀw` per row, and which rows lie in a fallback zone (there
/// the expectation is vq-core's, and the test also checks `‖Mᵀw‖ = λ‖w‖` by itself).
fn expected_gradient(
    est: Estimator,
    e: &Array2<f32>,
    q: &Array2<f32>,
    w: &Array2<f32>,
) -> Array2<f32> {
    let core = est.backward(e.view(), q.view(), w.view()).unwrap();
    let mut out = Array2::zeros(e.dim());
    for i in 0..e.nrows() {
        let (er, qr, wr) = (e.row(i), q.row(i), w.row(i));
        let w64: Vec<f64> = wr.iter().map(|&v| f64::from(v)).collect();
        match paper_map(est, er.as_slice().unwrap(), qr.as_slice().unwrap()) {
            Some(m) => {
                let mtw = m.t().dot(&ndarray::Array1::from(w64));
                out.row_mut(i).assign(&mtw.mapv(|v| v as f32));
            }
            None => {
                let norm = |v: &[f64]| dot(v, v).sqrt();
                let e64: Vec<f64> = er.iter().map(|&v| f64::from(v)).collect();
                let q64: Vec<f64> = qr.iter().map(|&v| f64::from(v)).collect();
                let lambda = match est {
                    Estimator::Rotation | Estimator::Reflection => {
                        norm(&q64) / norm(&e64).max(NORM_EPS)
                    }
                    _ => 1.0,
                };
                let c64: Vec<f64> = core.row(i).iter().map(|&v| f64::from(v)).collect();
                let want = lambda * norm(&w64);
                assert!(
                    (norm(&c64) - want).abs() <= 1e-5 * (1.0 + want),
                    "{est:?} fallback row {i}: ‖Mᵀw‖ = {} ≠ λ‖w‖ = {want}",
                    norm(&c64)
                );
                out.row_mut(i).assign(&core.row(i));
            }
        }
    }
    out
}

#[test]
fn gradients_match_the_paper_formulas_for_every_estimator_and_lookup() {
    for (n, d, k) in [(257, 8, 32), (64, 33, 100), (10, 1, 3)] {
        let e = randn(n, d, 1);
        let cb = randn(k, d, 2);
        let w = randn(n, d, 3);
        for metric in [Metric::Euclidean, Metric::Cosine] {
            let (_, q) = vq_core::quantize(e.view(), cb.view(), metric).unwrap();
            for est in Estimator::ALL {
                let (y, ge, q_grad) = run(&e, &q, &w, est);
                assert_eq!(y, q, "{est:?}: the forward value is q exactly");
                assert!(!q_grad, "{est:?}: no gradient may reach the codebook");
                let expect = expected_gradient(est, &e, &q, &w);
                assert_close(&ge, &expect, &format!("{est:?} {metric:?} N={n} D={d}"));
                // f64 takes the ATen formulas (the path CUDA uses); with cuda-tests, both
                // dtypes run on the GPU as well.
                for device in devices() {
                    for kind in [Kind::Float, Kind::Double] {
                        let (y, ge, q_grad) = run_kind(&e, &q, &w, est, kind, device);
                        assert_eq!(y, q);
                        assert!(!q_grad);
                        let what = format!("{device:?} {kind:?}: {est:?} {metric:?} N={n} D={d}");
                        assert_close(&ge, &expect, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn degenerate_rows_are_finite_and_match_the_reference() {
    let e = ndarray::array![
        [1.0f32, 2.0, -0.5],
        [3.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0],
        [2.0, 2.0, 2.0]
    ];
    let q = ndarray::array![
        [-2.0f32, -4.0, 1.0],
        [-1.0, 0.0, 0.0],
        [1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0]
    ];
    let w = randn(5, 3, 4);
    for est in Estimator::ALL {
        let expect = expected_gradient(est, &e, &q, &w);
        for (kind, device) in devices()
            .into_iter()
            .flat_map(|d| [(Kind::Float, d), (Kind::Double, d)])
        {
            let (_, ge, _) = run_kind(&e, &q, &w, est, kind, device);
            assert!(ge.iter().all(|v| v.is_finite()), "{est:?} {kind:?}: {ge:?}");
            assert_close(&ge, &expect, &format!("{est:?} {kind:?} degenerate"));
        }
    }
}

#[test]
fn bad_inputs_give_typed_errors() {
    let a = Tensor::zeros([4, 3], (Kind::Float, Device::Cpu));
    let b = Tensor::zeros([4, 2], (Kind::Float, Device::Cpu));
    assert!(matches!(
        vq_tch::apply_estimator(&a, &b, Estimator::Rotation),
        Err(vq_tch::VqTchError::Shape { .. })
    ));
    let i = Tensor::zeros([4, 3], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        vq_tch::apply_estimator(&a, &i, Estimator::Rotation),
        Err(vq_tch::VqTchError::Kind(Kind::Int64))
    ));
}

/// vq-core's typed errors reach the caller of `backward` with their message (the exact
/// gradient of row 1 is 1e40, beyond f32).
#[test]
fn an_overflowing_gradient_is_an_error_naming_the_row() {
    let e = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 0.0])
        .view([2, 2])
        .set_requires_grad(true);
    let q = Tensor::from_slice(&[0.0f32, 2.0, 0.0, 1e30]).view([2, 2]);
    let y = vq_tch::apply_estimator(&e, &q, Estimator::Rotation).unwrap();
    let w = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 1e10]).view([2, 2]);
    let err = (&y * w)
        .sum(Kind::Float)
        .f_backward()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("estimator gradient at row 1 exceeds f32's range"),
        "{err}"
    );
}

#[test]
fn half_precision_inputs_get_gradients_in_their_dtype() {
    let e = randn(16, 8, 5);
    let q = randn(16, 8, 6);
    let et = to_tensor(&e)
        .to_kind(Kind::BFloat16)
        .set_requires_grad(true);
    let qt = to_tensor(&q).to_kind(Kind::BFloat16);
    let y = vq_tch::apply_estimator(&et, &qt, Estimator::Rotation).unwrap();
    y.to_kind(Kind::Float).sum(Kind::Float).backward();
    assert_eq!(et.grad().kind(), Kind::BFloat16);
    assert!(to_array(&et.grad()).iter().all(|v| v.is_finite()));
}

#[test]
fn search_on_tensors_matches_vq_core_without_copying_contiguous_f32() {
    for (n, k, d) in [(300, 50, 8), (130, 1100, 40), (1, 1, 1)] {
        let x = randn(n, d, 7);
        let cb = randn(k, d, 8);
        for metric in [Metric::Euclidean, Metric::Cosine] {
            let expect: Vec<i64> = vq_core::nearest_codes(x.view(), cb.view(), metric)
                .unwrap()
                .iter()
                .map(|&i| i64::from(i))
                .collect();
            let got = Vec::<i64>::try_from(
                vq_tch::nearest_codes(&to_tensor(&x), &to_tensor(&cb), metric).unwrap(),
            )
            .unwrap();
            assert_eq!(got, expect, "{metric:?} {n}×{k}×{d}");
            for device in devices().into_iter().skip(1) {
                // The device path does not re-rank near ties; random data have none.
                let idx = vq_tch::nearest_codes(
                    &to_tensor(&x).to_device(device),
                    &to_tensor(&cb).to_device(device),
                    metric,
                )
                .unwrap();
                assert_eq!(
                    Vec::<i64>::try_from(idx.to_device(Device::Cpu)).unwrap(),
                    expect,
                    "{device:?} {metric:?}"
                );
            }
            // Strided and f64 inputs take the converting path and agree too.
            let strided = to_tensor(&x).transpose(0, 1).contiguous().transpose(0, 1);
            let got = Vec::<i64>::try_from(
                vq_tch::nearest_codes(&strided.to_kind(Kind::Double), &to_tensor(&cb), metric)
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(got, expect);
        }
    }
    let bad = to_tensor(&randn(4, 3, 9));
    let _ = bad.get(2).get(1).fill_(f64::NAN);
    let err =
        vq_tch::nearest_codes(&bad, &to_tensor(&randn(5, 3, 1)), Metric::Euclidean).unwrap_err();
    assert!(
        matches!(
            err,
            vq_tch::VqTchError::Core(vq_core::VqError::NonFinite { row: 2, .. })
        ),
        "{err}"
    );
}

/// Gradcheck of q̃ = sg(λR)e through libtorch: the node's gradient of ⟨w, q̃⟩ equals central
/// finite differences of the frozen map M (the dense [`paper_map`] at e, applied in f64 to
/// e ± hδ), on every device, in f32 (vq-core kernel on CPU) and f64 (ATen). The exactly
/// antipodal row 0 has no paper formula; there M is vq-core's documented π-rotation.
#[test]
fn gradient_equals_finite_differences_of_the_frozen_map() {
    let (n, d) = (6, 5);
    let e = randn(n, d, 21);
    let mut q = randn(n, d, 22);
    q.row_mut(0).assign(&(&e.row(0) * -0.5)); // antipodal row
    let w = randn(n, d, 23);
    let h = 1e-3;
    for est in Estimator::ALL {
        let mut fd = Array2::<f64>::zeros((n, d));
        for r in 0..n {
            let (er, qr) = (e.row(r), q.row(r));
            let dense = paper_map(est, er.as_slice().unwrap(), qr.as_slice().unwrap());
            assert!(
                dense.is_some() || r == 0,
                "{est:?}: row {r} in a fallback zone"
            );
            let core = vq_core::RowMap::new(est, er, qr);
            let phi = |v: &ndarray::Array1<f32>| {
                let out = match &dense {
                    Some(m) => m.dot(&v.mapv(f64::from)).to_vec(),
                    None => {
                        let mut out = vec![0f64; d];
                        core.apply(er, qr, v.view(), &mut out);
                        out
                    }
                };
                out.iter()
                    .zip(w.row(r))
                    .map(|(a, &b)| a * f64::from(b))
                    .sum::<f64>()
            };
            for j in 0..d {
                let (mut up, mut down) = (er.to_owned(), er.to_owned());
                up[j] += h as f32;
                down[j] -= h as f32;
                let step = f64::from(up[j]) - f64::from(down[j]);
                fd[[r, j]] = (phi(&up) - phi(&down)) / step;
            }
        }
        for (kind, device) in devices()
            .into_iter()
            .flat_map(|d| [(Kind::Float, d), (Kind::Double, d)])
        {
            let (_, ge, _) = run_kind(&e, &q, &w, est, kind, device);
            for ((i, &g), &f) in ge.indexed_iter().zip(fd.iter()) {
                assert!(
                    (f64::from(g) - f).abs() <= 1e-3 * (1.0 + f.abs()),
                    "{est:?} {kind:?} {device:?} at {i:?}: autograd {g} vs finite difference {f}"
                );
            }
        }
    }
}

/// The fused CUDA kernel's source compiles with the NVRTC of a CUDA build of libtorch for the
/// data-centre architectures (Ampere, Hopper), with no GPU needed; a CPU-only libtorch has no
/// NVRTC, and says so.
#[test]
fn the_fused_kernel_compiles_with_nvrtc() {
    for (major, minor) in [(8, 0), (9, 0)] {
        let got = vq_tch::fused_kernel_compiles_for(major, minor);
        if env!("VQ_TCH_LIBTORCH_CUDA") == "1" {
            assert_eq!(got, Ok(()), "sm_{major}{minor}");
        } else {
            let why = got.unwrap_err();
            assert!(why.contains("NVRTC"), "{why}");
        }
    }
    // Not a CUDA device: the reason names it.
    let why = vq_tch::fused_kernel_status(Device::Cpu).unwrap_err();
    assert!(why.contains("not a CUDA device"), "{why}");
}

/// Rows of the kinds where a backward goes wrong: ordinary, near-antipodal and near-equal
/// directions with ‖ê ± q̂‖ from 1e-1 down past the 1e-4 threshold, exactly antipodal, zero rows,
/// and norms from 1e-20 to 1e20; D = 1, 2, 3, 33, 512 and a row count that is no multiple of the
/// kernel's 8 rows per block.
#[cfg(feature = "cuda-tests")]
fn adversarial_rows(d: usize, seed: i64) -> (Array2<f32>, Array2<f32>, Array2<f32>) {
    let n = 203;
    let e = randn(n, d, seed);
    let u = randn(n, d, seed + 1);
    let w = randn(n, d, seed + 2);
    let mut q = randn(n, d, seed + 3);
    for i in 0..n {
        let ne = e.row(i).iter().map(|v| v * v).sum::<f32>().sqrt();
        let magnitude = 10f32.powi((i % 9) as i32 * 5 - 20);
        let sign = if i % 2 == 0 { -1.0 } else { 1.0 };
        let s = 10f32.powf(-((i % 11) as f32) * 0.5);
        match i % 5 {
            0 => {}
            1 | 2 => {
                for j in 0..d {
                    q[[i, j]] = (sign * e[[i, j]] / ne + s * u[[i, j]]) * magnitude;
                }
            }
            3 => {
                for j in 0..d {
                    q[[i, j]] = sign * e[[i, j]] * magnitude;
                }
            }
            _ => q.row_mut(i).fill(if i % 10 == 4 { 0.0 } else { 1.0 }),
        }
    }
    (e, q, w)
}

#[cfg(feature = "cuda-tests")]
#[test]
fn cuda_fused_kernel_matches_the_composition_and_the_reference() {
    let device = Device::Cuda(0);
    assert_eq!(vq_tch::fused_kernel_status(device), Ok(()));
    let grad = |e: &Array2<f32>, q: &Array2<f32>, w: &Array2<f32>, est, kind, path| {
        let et = to_tensor(e)
            .to_kind(kind)
            .to_device(device)
            .set_requires_grad(true);
        let qt = to_tensor(q).to_kind(kind).to_device(device);
        let y = vq_tch::apply_estimator_with(&et, &qt, est, path).unwrap();
        (&y * to_tensor(w).to_kind(kind).to_device(device))
            .sum(kind)
            .backward();
        et.grad().to_kind(Kind::Double).to_device(Device::Cpu)
    };
    for d in [1, 2, 3, 33, 512] {
        let (e, q, w) = adversarial_rows(d, 40 + d as i64);
        for est in Estimator::ALL {
            let composed = grad(&e, &q, &w, est, Kind::Double, vq_tch::DevicePath::Composed);
            // λ‖w‖ per row: the scale the errors are measured against.
            let lambda_w: Vec<f64> = (0..e.nrows())
                .map(|i| {
                    let n = |a: &Array2<f32>| {
                        a.row(i)
                            .iter()
                            .map(|&v| f64::from(v).powi(2))
                            .sum::<f64>()
                            .sqrt()
                    };
                    let lambda = match est {
                        Estimator::Rotation | Estimator::Reflection => n(&q) / n(&e).max(NORM_EPS),
                        _ => 1.0,
                    };
                    lambda * n(&w)
                })
                .collect();
            for (kind, tol) in [(Kind::Double, 1e-9), (Kind::Float, 1e-6)] {
                let fused = grad(&e, &q, &w, est, kind, vq_tch::DevicePath::Fused);
                let diff = Vec::<f64>::try_from((&fused - &composed).abs().view([-1])).unwrap();
                for (k, v) in diff.iter().enumerate() {
                    let row = k / d;
                    assert!(
                        *v <= tol * lambda_w[row].max(f64::MIN_POSITIVE),
                        "{est:?} {kind:?} D={d} row {row}: fused and composed differ by {v:e} \
                         (λ‖w‖ = {:e})",
                        lambda_w[row]
                    );
                }
            }
        }
    }
}
