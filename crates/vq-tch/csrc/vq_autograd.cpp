// The VQ layer's gradient estimators as one libtorch autograd node.
//
// Forward: the value of every estimator is q (returned as a fresh tensor). Backward: dL/de from
// g = dL/dq~; nothing flows to q (the codebook). For f32 CPU tensors the backward calls back into
// vq-core (vq_core::Estimator::backward_into, through a function pointer handed over by the Rust
// side), so the CPU maths is vq-core's own. On CUDA the backward is one fused kernel compiled at
// run time (csrc/vq_fused.cpp) unless the caller asks for the composition or the kernel is
// unavailable; elsewhere (and then) the same formulas run as ATen ops with per-row geometry in
// float64 (see crates/vq-core/src/estimator.rs for the formulas and the degenerate cases). The
// result has g's dtype.
//
// Estimator codes: 0 straight-through, 1 rotation, 2 rotation without rescale, 3 reflection.
// The thresholds of the degenerate cases (vq_core::NORM_EPS on norms, vq_core::DIRECTION_EPS on
// squared norms of e^ +- q^) are handed over by the Rust side with every call, so that they are
// written once, in vq-core.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <exception>
#include <string>

#include "vq_estimator.h"

namespace vq_fused {
std::string unavailable(int device);
std::string compiles_for(int major, int minor);
std::string backward(const at::Tensor& e, const at::Tensor& q, const at::Tensor& g, int64_t est, double norm_eps,
                     double direction_eps, at::Tensor& out);
}  // namespace vq_fused

namespace {

thread_local std::string last_error;

// The degenerate-case thresholds of vq-core.
struct Eps {
  double norm;
  double direction;
};

at::Tensor rowdot(const at::Tensor& a, const at::Tensor& b) { return (a * b).sum(1, true); }

// Householder reflection of the rows of t across w⊥: t − 2w(w·t).
at::Tensor householder(const at::Tensor& t, const at::Tensor& w) { return t - 2.0 * w * rowdot(w, t); }

// Rust callback: out = dL/de for contiguous f32 (n, d) arrays; returns 0 on success, 3 with
// vq-core's message in msg (NUL-terminated, at most cap bytes) for an error of its own.
using CpuBackward = int32_t (*)(const float* e, const float* q, const float* g, float* out, int64_t n, int64_t d,
                                int64_t est, char* msg, int64_t cap);

// Device paths: 0 the fused kernel where it is available (else the composition), 1 the ATen
// composition always.
constexpr int64_t kFused = 0;

at::Tensor estimator_backward(const at::Tensor& e_in, const at::Tensor& q_in, const at::Tensor& g_in, int64_t est,
                              CpuBackward cpu, Eps eps, int64_t path) {
  if (est == VQ_EST_STRAIGHT_THROUGH) return g_in;  // the gradient passes unchanged
  if (path == kFused && g_in.is_cuda()) {
    at::Tensor out;
    if (vq_fused::backward(e_in, q_in, g_in, est, eps.norm, eps.direction, out).empty()) return out;
  }
  if (cpu != nullptr && e_in.device().is_cpu() && e_in.scalar_type() == at::kFloat && q_in.scalar_type() == at::kFloat &&
      g_in.scalar_type() == at::kFloat) {
    const auto e = e_in.contiguous();
    const auto q = q_in.contiguous();
    const auto g = g_in.contiguous();
    auto out = at::empty_like(g);
    char msg[512] = {0};
    const int32_t rc = cpu(e.data_ptr<float>(), q.data_ptr<float>(), g.data_ptr<float>(), out.data_ptr<float>(),
                           e.size(0), e.size(1), est, msg, sizeof msg);
    TORCH_CHECK(rc != 3, "vq-core estimator backward: ", msg);
    TORCH_CHECK(rc == 0, "vq-core estimator backward failed (code ", rc, ")");
    return out;
  }
  const auto e = e_in.to(at::kDouble);
  const auto q = q_in.to(at::kDouble);
  const auto g = g_in.to(at::kDouble);
  const auto ne = e.norm(2, {1}, true);
  const auto nq = q.norm(2, {1}, true);
  const auto scale = est == VQ_EST_ROTATION_NO_RESCALE ? at::ones_like(ne) : nq / ne.clamp_min(eps.norm);
  const auto degenerate = (ne < eps.norm).logical_or(nq < eps.norm);
  const auto eh = e / ne.clamp_min(eps.norm);
  const auto qh = q / nq.clamp_min(eps.norm);
  at::Tensor out;
  at::Tensor identity = degenerate;
  if (est == VQ_EST_REFLECTION) {
    const auto r = eh - qh;
    const auto nr2 = rowdot(r, r);
    identity = identity.logical_or(nr2 < eps.direction);
    out = householder(g, r / nr2.sqrt().clamp_min(1e-300));
  } else {
    const auto s = eh + qh;
    const auto ns2 = rowdot(s, s);
    auto w = s / ns2.sqrt().clamp_min(1e-300);
    const auto antipodal = ns2 < eps.direction;
    if (e.size(1) >= 2) {
      // Rotation by pi in the plane of e^ and the coordinate axis least aligned with it.
      const auto axis = eh.abs().argmin(1, true);
      const auto onehot = at::zeros_like(eh).scatter_(1, axis, 1.0);
      const auto ea = eh.gather(1, axis);
      const auto p = onehot - ea * eh;
      w = at::where(antipodal, p / p.norm(2, {1}, true).clamp_min(1e-300), w);
    } else {
      // D = 1: no rotation maps +1 to -1; only H_q (the sign flip).
      w = at::where(antipodal, at::zeros_like(w), w);
    }
    out = householder(householder(g, qh), w);
  }
  out = at::where(identity, g, out) * scale;
  return out.to(g_in.scalar_type());
}

struct VqEstimatorFn : public torch::autograd::Function<VqEstimatorFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& e, const at::Tensor& q, int64_t est,
                            int64_t cpu_backward, double norm_eps, double direction_eps, int64_t path) {
    ctx->save_for_backward({e, q});
    ctx->saved_data["path"] = path;
    ctx->saved_data["estimator"] = est;
    ctx->saved_data["cpu_backward"] = cpu_backward;
    ctx->saved_data["norm_eps"] = norm_eps;
    ctx->saved_data["direction_eps"] = direction_eps;
    return q.detach().clone();
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto est = ctx->saved_data["estimator"].toInt();
    const auto cpu = reinterpret_cast<CpuBackward>(ctx->saved_data["cpu_backward"].toInt());
    const Eps eps{ctx->saved_data["norm_eps"].toDouble(), ctx->saved_data["direction_eps"].toDouble()};
    const auto path = ctx->saved_data["path"].toInt();
    return {estimator_backward(saved[0], saved[1], grads[0], est, cpu, eps, path),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

extern "C" {

// Returns a new tensor (owned by the caller, as tch's C API does) or nullptr with the message
// available from vq_tch_last_error().
// cpu_backward: the Rust callback for f32 CPU tensors, or null to always use the ATen path.
// norm_eps, direction_eps: vq-core's thresholds of the degenerate cases.
// path: on CUDA, 0 the fused kernel (the composition where it is unavailable), 1 the composition.
at::Tensor* vq_tch_estimator_apply(at::Tensor* e, at::Tensor* q, int64_t estimator, CpuBackward cpu_backward,
                                   double norm_eps, double direction_eps, int64_t path) {
  try {
    return new at::Tensor(VqEstimatorFn::apply(*e, *q, estimator, reinterpret_cast<int64_t>(cpu_backward), norm_eps,
                                               direction_eps, path));
  } catch (const std::exception& ex) {
    last_error = ex.what();
    return nullptr;
  }
}

const char* vq_tch_last_error() { return last_error.c_str(); }

// Compiles the fused kernel for compute capability major.minor (no GPU needed): "" on success,
// else why not. Valid until the next call on this thread.
const char* vq_tch_fused_compiles_for(int64_t major, int64_t minor) {
  try {
    last_error = vq_fused::compiles_for(static_cast<int>(major), static_cast<int>(minor));
  } catch (const std::exception& ex) {
    last_error = ex.what();
  }
  return last_error.c_str();
}

// Why the fused kernel cannot run on CUDA device `device` (compiling it on first call); an empty
// string when it can. The returned pointer stays valid until the next call on this thread.
const char* vq_tch_fused_unavailable(int64_t device) {
  try {
    last_error = vq_fused::unavailable(static_cast<int>(device));
  } catch (const std::exception& ex) {
    last_error = ex.what();
  }
  return last_error.c_str();
}

}  // extern "C"
