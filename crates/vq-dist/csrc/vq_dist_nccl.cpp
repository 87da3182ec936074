// The NCCL process group, compiled only when the linked libtorch has CUDA and nccl.h is found
// (build.rs defines VQ_DIST_NCCL and USE_C10D_NCCL). Kept apart from vq_dist.cpp because its
// headers pull in the CUDA runtime's.

#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

// The group of this rank's GPU `device`. NCCL creates its communicators lazily on the device of
// the first collective's tensors (the trainer keeps them on cuda:LOCAL_RANK); barriers name the
// device explicitly (vq_dist_barrier).
c10::intrusive_ptr<c10d::Backend> vq_dist_make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world,
                                                    std::chrono::milliseconds timeout, int device) {
  (void)device;
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
}
