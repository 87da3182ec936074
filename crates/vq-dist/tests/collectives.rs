//! Two ranks over Gloo on 127.0.0.1, one thread each (c10d groups do not care whether their
//! peers are threads or processes): the collectives against their definitions, and the errors
//! of a bad start.

use std::net::TcpListener;
use std::time::Duration;

use tch::{Device, Kind, Tensor};
use vq_dist::{DistError, GroupConfig, ProcessGroup};

fn free_port() -> u16 {
    vq_dist::launch::free_local_port().unwrap()
}

fn config(rank: usize, world: usize, port: u16) -> GroupConfig {
    GroupConfig {
        rank,
        world,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        device: Device::Cpu,
        timeout: Duration::from_secs(20),
        host_store: true,
        prefix: "test".into(),
    }
}

/// Runs `body(rank, group)` on `world` threads joined into one group; returns their results in
/// rank order.
fn on_ranks<T: Send + 'static>(
    world: usize,
    body: impl Fn(usize, ProcessGroup) -> T + Send + Sync + Copy + 'static,
) -> Vec<T> {
    let port = free_port();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            std::thread::spawn(move || {
                let pg = ProcessGroup::join(&config(rank, world, port)).unwrap();
                body(rank, pg)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

#[test]
fn collectives_match_their_definitions() {
    let out = on_ranks(2, |rank, pg| {
        assert_eq!((pg.rank(), pg.world(), pg.is_main()), (rank, 2, rank == 0));
        let r = rank as f32;
        // all-reduce: 0 + 1 and 10 + 11 …
        let t = Tensor::from_slice(&[r, 10.0 + r]);
        pg.all_reduce_sum(&t).unwrap();
        assert_eq!(values(&t), [1.0, 21.0]);
        // broadcast from rank 1.
        let b = Tensor::from_slice(&[r; 3]);
        pg.broadcast(&b, 1).unwrap();
        assert_eq!(values(&b), [1.0; 3]);
        // all-gather in rank order.
        let g = pg
            .all_gather(&Tensor::from_slice(&[r, -r]).view([1, 2]))
            .unwrap();
        assert_eq!(g.size(), [2, 1, 2]);
        assert_eq!(values(&g), [0.0, -0.0, 1.0, -1.0]);
        // Bucketed mean over several tensors and two dtypes, buckets smaller than the tensors.
        let ts = vec![
            Tensor::full([5], f64::from(r) * 2.0, (Kind::Float, Device::Cpu)),
            Tensor::full([2, 2], 4.0 * f64::from(r), (Kind::Double, Device::Cpu)),
            Tensor::full([3], 1.0 + f64::from(r), (Kind::Float, Device::Cpu)),
        ];
        pg.all_reduce_mean(&ts, 8).unwrap();
        assert_eq!(values(&ts[0]), [1.0; 5]);
        assert_eq!(values(&ts[1]), [2.0; 4]);
        assert_eq!(values(&ts[2]), [1.5; 3]);
        let ps = vec![Tensor::full(
            [4],
            f64::from(r) + 7.0,
            (Kind::Float, Device::Cpu),
        )];
        pg.broadcast_all(&ps, 0, 1 << 20).unwrap();
        assert_eq!(values(&ps[0]), [7.0; 4]);
        // Differentiable all-reduce: d/dx_r of (Σ_r x_r)·w_r summed over ranks = Σ_r w_r.
        let x = Tensor::from_slice(&[1.0f32 + r]).set_requires_grad(true);
        let s = pg.all_reduce_sum_autograd(&x).unwrap();
        assert_eq!(values(&s), [3.0]);
        (&s * (2.0 + f64::from(r))).sum(Kind::Float).backward();
        assert_eq!(values(&x.grad()), [5.0]);
        // Consistency checks.
        pg.check_same("config", b"same").unwrap();
        let e = pg
            .check_same("config", if rank == 0 { b"a" } else { b"b" })
            .unwrap_err();
        match &e {
            DistError::Mismatch { ranks, .. } => assert_eq!(ranks, &[1]),
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("config differs"), "{e}");
        pg.finish().unwrap();
        rank
    });
    assert_eq!(out, [0, 1]);
}

#[test]
fn a_port_in_use_is_named() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let err = ProcessGroup::join(&config(0, 2, port)).unwrap_err();
    assert!(matches!(err, DistError::PortInUse { .. }), "{err}");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}

#[test]
fn disagreeing_world_sizes_fail_at_start() {
    let port = free_port();
    let r0 = std::thread::spawn(move || ProcessGroup::join(&config(0, 2, port)).map(|_| ()));
    let mut c1 = config(1, 3, port);
    c1.timeout = Duration::from_secs(3);
    let r1 = std::thread::spawn(move || ProcessGroup::join(&c1).map(|_| ()));
    let e0 = r0.join().unwrap().unwrap_err().to_string();
    let e1 = r1.join().unwrap().unwrap_err().to_string();
    assert!(e0.contains("WORLD_SIZE=3") && e0.contains("rank 1"), "{e0}");
    assert!(e1.contains("WORLD_SIZE"), "{e1}");
}

#[test]
fn a_duplicate_rank_fails_at_start() {
    let port = free_port();
    let handles: Vec<_> = [0usize, 1, 1]
        .into_iter()
        .map(|rank| {
            std::thread::spawn(move || {
                let mut c = config(rank, 2, port);
                c.timeout = Duration::from_secs(5);
                ProcessGroup::join(&c).map(std::mem::forget)
            })
        })
        .collect();
    let errors: Vec<String> = handles
        .into_iter()
        .filter_map(|h| h.join().unwrap().err().map(|e| e.to_string()))
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("two processes were started as rank 1")),
        "{errors:?}"
    );
}

#[test]
fn a_rank_that_reports_its_failure_is_named_by_the_others() {
    let port = free_port();
    let r1 = std::thread::spawn(move || {
        let mut c = config(1, 2, port);
        c.timeout = Duration::from_secs(3);
        let pg = ProcessGroup::join(&c).unwrap();
        pg.report_failure("data/x.jpg: not a JPEG");
        // Gone without a word: the peer's next collective times out.
        std::mem::forget(pg);
    });
    let mut c = config(0, 2, port);
    c.timeout = Duration::from_secs(3);
    let pg = ProcessGroup::join(&c).unwrap();
    r1.join().unwrap();
    let err = pg
        .all_reduce_sum(&Tensor::from_slice(&[1.0f32]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rank 1 failed: data/x.jpg: not a JPEG"),
        "{err}"
    );
    // The group is poisoned: later calls fail at once.
    let again = pg.barrier().unwrap_err().to_string();
    assert!(again.contains("already failed"), "{again}");
}

/// CUDA tensors get NCCL, chosen by the same code as Gloo; on a machine without a usable GPU
/// joining says so, naming the backend and the device.
#[test]
fn cuda_devices_get_nccl_and_without_a_gpu_joining_says_so() {
    let mut cfg = config(0, 1, free_port());
    cfg.device = Device::Cuda(0);
    assert_eq!(cfg.backend(), vq_dist::Backend::Nccl);
    assert!(vq_dist::Backend::Nccl.compiled() || !tch::Cuda::is_available());
    if tch::Cuda::is_available() {
        // The collectives themselves: `nccl_collectives_run_on_cuda` (feature cuda-tests).
        return;
    }
    let err = ProcessGroup::join(&cfg).unwrap_err().to_string();
    assert!(err.contains("nccl") && err.contains("cuda:0"), "{err}");
}

/// A world of one runs the NCCL collectives on cuda:0. Compiled only with `cuda-tests`, so
/// that a CPU machine's test list does not claim it ran.
#[cfg(feature = "cuda-tests")]
#[test]
fn nccl_collectives_run_on_cuda() {
    assert!(
        tch::Cuda::is_available(),
        "feature cuda-tests needs a CUDA device"
    );
    let mut cfg = config(0, 1, free_port());
    cfg.device = Device::Cuda(0);
    let pg = ProcessGroup::join(&cfg).unwrap();
    let t = Tensor::from_slice(&[2.0f32, 3.0]).to_device(Device::Cuda(0));
    pg.all_reduce_sum(&t).unwrap();
    assert_eq!(values(&t.to_device(Device::Cpu)), [2.0, 3.0]);
    let g = pg.all_gather(&t).unwrap();
    assert_eq!(g.size(), [1, 2]);
    pg.finish().unwrap();
}
