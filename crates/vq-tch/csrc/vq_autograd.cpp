// The VQ layer's gradient estimators as one libtorch autograd node.
//
// Forward: the value of every estimator is q (returned as a fresh tensor). Backward: dL/de from
// g = dL/dq~, the same maths as vq_core::Estimator (see crates/vq-core/src/estimator.rs for the
// formulas and the degenerate cases); nothing flows to q (the codebook). Per-row geometry in
// float64, on whatever device the tensors live on; the result has g's dtype.
//
// Estimator codes: 0 straight-through, 1 rotation, 2 rotation without rescale, 3 reflection.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <exception>
#include <string>

namespace {

thread_local std::string last_error;

constexpr double kNormEps = 1e-6;
constexpr double kDirectionEps = 1e-8;

at::Tensor rowdot(const at::Tensor& a, const at::Tensor& b) { return (a * b).sum(1, true); }

// Householder reflection of the rows of t across w⊥: t − 2w(w·t).
at::Tensor householder(const at::Tensor& t, const at::Tensor& w) { return t - 2.0 * w * rowdot(w, t); }

at::Tensor estimator_backward(const at::Tensor& e_in, const at::Tensor& q_in, const at::Tensor& g_in, int64_t est) {
  if (est == 0) return g_in.clone();
  const auto e = e_in.to(at::kDouble);
  const auto q = q_in.to(at::kDouble);
  const auto g = g_in.to(at::kDouble);
  const auto ne = e.norm(2, {1}, true);
  const auto nq = q.norm(2, {1}, true);
  const auto scale = est == 2 ? at::ones_like(ne) : nq / ne.clamp_min(kNormEps);
  const auto degenerate = (ne < kNormEps).logical_or(nq < kNormEps);
  const auto eh = e / ne.clamp_min(kNormEps);
  const auto qh = q / nq.clamp_min(kNormEps);
  at::Tensor out;
  at::Tensor identity = degenerate;
  if (est == 3) {
    const auto r = eh - qh;
    const auto nr2 = rowdot(r, r);
    identity = identity.logical_or(nr2 < kDirectionEps);
    out = householder(g, r / nr2.sqrt().clamp_min(1e-300));
  } else {
    const auto s = eh + qh;
    const auto ns2 = rowdot(s, s);
    auto w = s / ns2.sqrt().clamp_min(1e-300);
    const auto antipodal = ns2 < kDirectionEps;
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
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& e, const at::Tensor& q, int64_t est) {
    ctx->save_for_backward({e, q});
    ctx->saved_data["estimator"] = est;
    return q.detach().clone();
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto est = ctx->saved_data["estimator"].toInt();
    return {estimator_backward(saved[0], saved[1], grads[0], est), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// Returns a new tensor (owned by the caller, as tch's C API does) or nullptr with the message
// available from vq_tch_last_error().
at::Tensor* vq_tch_estimator_apply(at::Tensor* e, at::Tensor* q, int64_t estimator) {
  try {
    return new at::Tensor(VqEstimatorFn::apply(*e, *q, estimator));
  } catch (const std::exception& ex) {
    last_error = ex.what();
    return nullptr;
  }
}

const char* vq_tch_last_error() { return last_error.c_str(); }

}  // extern "C"
