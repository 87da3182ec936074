// ATen calls tch cannot make as vq-train needs them: the multi-tensor optimiser kernels for its
// AdamW on CUDA (tch has no bindings for ATen's list-taking `_foreach_*` / `_fused_*` ops): one
// launch per group of tensors instead of one per tensor and elementary op, as
// torch.optim.AdamW(fused=True) and torch.nn.utils.clip_grad_norm_(foreach=True) do; and
// pinning a host tensor without naming a device (tch's binding passes one, which libtorch
// deprecates with a warning per call).
//
// Every function takes arrays of n tensor pointers (tch's C_tensor is an at::Tensor*), returns 0
// on success or 1 with the message available from vq_train_ops_last_error(); no exception
// crosses into Rust.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <exception>
#include <string>
#include <vector>

namespace {

thread_local std::string last_error;

std::vector<at::Tensor> list(at::Tensor* const* t, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out.push_back(*t[i]);
  return out;
}

template <typename F>
int32_t guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& ex) {
    last_error = ex.what_without_backtrace();
    return 1;
  } catch (const std::exception& ex) {
    last_error = ex.what();
    return 1;
  }
}

}  // namespace

extern "C" {

// t_i ← 0 for every tensor.
int32_t vq_train_foreach_zero(at::Tensor* const* t, int64_t n) {
  return guarded([&] {
    if (n > 0) at::_foreach_zero_(list(t, n));
  });
}

// t_i ← factor·t_i for every tensor.
int32_t vq_train_foreach_mul(at::Tensor* const* t, int64_t n, double factor) {
  return guarded([&] {
    if (n > 0) at::_foreach_mul_(list(t, n), factor);
  });
}

// The global l2 norm √(Σ_i ‖t_i‖²) of the tensors as a 0-dim f64 tensor on their device, from
// their per-tensor norms (no read back to the host); *out is a new tensor owned by the caller.
int32_t vq_train_global_norm_tensor(at::Tensor* const* t, int64_t n, at::Tensor** out) {
  return guarded([&] {
    if (n == 0) {
      *out = new at::Tensor(at::zeros({}, at::kDouble));
      return;
    }
    const auto norms = at::_foreach_norm(list(t, n), 2);
    *out = new at::Tensor(at::stack(norms).to(at::kDouble).norm());
  });
}

// The same norm read back to the host.
int32_t vq_train_global_norm(at::Tensor* const* t, int64_t n, double* out) {
  return guarded([&] {
    *out = 0.0;
    if (n == 0) return;
    const auto norms = at::_foreach_norm(list(t, n), 2);
    *out = at::stack(norms).to(at::kDouble).norm().item<double>();
  });
}

// t_i ← factor·t_i for every tensor, with factor a 0-dim tensor on their device (read there).
int32_t vq_train_foreach_mul_tensor(at::Tensor* const* t, int64_t n, const at::Tensor* factor) {
  return guarded([&] {
    if (n > 0) at::_foreach_mul_(list(t, n), *factor);
  });
}

// One AdamW step (decoupled weight decay) of parameters p with gradients g and moments m, v at
// step `step` (counted from 1, after this update), ATen's fused kernel:
// p ← p(1 − lr·wd); m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
// p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε).
// With `skip` (a 0-dim f32 tensor on the parameters' device, or null) the kernel leaves
// parameters and moments unchanged where it holds 1 (what GradScaler passes as found_inf).
int32_t vq_train_fused_adamw(at::Tensor* const* p, at::Tensor* const* g, at::Tensor* const* m, at::Tensor* const* v,
                             int64_t n, double step, double lr, double beta1, double beta2, double weight_decay,
                             double eps, const at::Tensor* skip) {
  return guarded([&] {
    if (n == 0) return;
    const auto params = list(p, n);
    // The kernel reads the step from a tensor per parameter (on the parameters' device).
    const auto t = at::full({}, step, params[0].options().dtype(at::kFloat));
    const std::vector<at::Tensor> steps(static_cast<size_t>(n), t);
    std::optional<at::Tensor> found_inf;
    if (skip != nullptr) found_inf = *skip;
    at::_fused_adamw_(params, list(g, n), list(m, n), list(v, n), {}, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, /*grad_scale=*/std::nullopt, found_inf);
  });
}

// A page-locked copy of the host tensor t in *out (a new tensor owned by the caller, as tch's C
// API returns them).
int32_t vq_train_pin_memory(const at::Tensor* t, at::Tensor** out) {
  return guarded([&] { *out = new at::Tensor(t->pin_memory()); });
}

// Starts libtorch's Kineto profiler (what torch.profiler drives) for host-side ops and, with
// `cuda`, the GPU's kernels and copies.
int32_t vq_train_profile_start(int32_t cuda) {
  return guarded([&] {
    namespace prof = torch::autograd::profiler;
    using torch::profiler::impl::ActivityType;
    const prof::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda != 0) activities.insert(ActivityType::CUDA);
    prof::prepareProfiler(config, activities);
    prof::enableProfiler(config, activities);
  });
}

// Stops the profiler and writes its events as a Chrome trace (JSON) to `path`.
int32_t vq_train_profile_stop(const char* path) {
  return guarded([&] {
    auto result = torch::autograd::profiler::disableProfiler();
    if (!result) throw std::runtime_error("the profiler returned no result");
    result->save(path);
  });
}

const char* vq_train_ops_last_error() { return last_error.c_str(); }

}  // extern "C"
