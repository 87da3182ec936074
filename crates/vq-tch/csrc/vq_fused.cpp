// The estimator backward on CUDA as one fused kernel, compiled at run time with NVRTC.
//
// One warp per row: pass 1 sums ‖e‖², ‖q‖²; pass 2 forms ê = e/‖e‖, q̂ = ±q/‖q‖ per element and
// sums ‖ê ± q̂‖², (ê ± q̂)·g, q̂·g, ê·g, ê·q̂ and the coordinate least aligned with e (all in f64,
// from the f32 or f64 inputs); pass 3 writes the result. The formulas, thresholds and degenerate
// cases are vq-core's (crates/vq-core/src/estimator.rs), in the forms
//
//   rotation (‖ê + q̂‖² ≥ direction_eps):  λ(g + 2(q̂·g)ê − 2((s·g)/‖s‖²)s),  s = ê + q̂
//                                          (= λ H_w H_q̂ g with w = s/‖s‖, expanded: w·q̂ = ‖s‖/2)
//   rotation, antipodal, D ≥ 2:            λ H_p H_q̂ g,  p = (δ_a − ê_a ê)/√(1 − ê_a²),
//                                          a = the first index of the smallest |e_i|
//   rotation, antipodal, D = 1:            λ H_q̂ g
//   reflection (‖ê − q̂‖² ≥ direction_eps): λ(g − 2((r·g)/‖r‖²)r),  r = ê − q̂
//   ‖e‖ or ‖q‖ < norm_eps, or reflection with ‖ê − q̂‖² < direction_eps: λg
//
// with λ = ‖q‖ / max(‖e‖, norm_eps) (1 without rescale). ‖ê ± q̂‖² is a sum of squares of the
// per-element differences, so it keeps its relative accuracy down to the threshold.
//
// Nothing here needs the CUDA headers or a CUDA build of libtorch at compile time: the driver
// (libcuda.so.1) and NVRTC are opened with dlopen on first use, and every failure (no NVRTC, an
// architecture NVRTC does not know, a failed launch) is reported as a reason, upon which the
// caller takes the ATen composition instead.

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <dirent.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "vq_estimator.h"

namespace vq_fused {
namespace {

// The few driver / NVRTC types used (opaque handles and int results, as in cuda.h / nvrtc.h).
using CUresult = int;
using CUdevice = int;
using CUcontext = void*;
using CUmodule = void*;
using CUfunction = void*;
using CUstream = void*;
using nvrtcResult = int;
using nvrtcProgram = void*;
constexpr int kAttrMajor = 75;  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
constexpr int kAttrMinor = 76;  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR

const char* kSource = R"CUDA(
// Sum over the warp's 32 lanes. Every lane ends with the same bits: each step adds the same
// two partial sums in either order, and floating-point addition is commutative.
__device__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

extern "C" __global__ void vq_estimator_backward(const T* __restrict__ e, const T* __restrict__ q,
                                                 const T* __restrict__ g, T* __restrict__ out,
                                                 long long n, long long d, int est, double norm_eps,
                                                 double dir_eps) {
  const int lane = threadIdx.x & 31;
  const long long warps = blockDim.x >> 5;
  for (long long row = (long long)blockIdx.x * warps + (threadIdx.x >> 5); row < n;
       row += (long long)gridDim.x * warps) {
    const T* er = e + row * d;
    const T* qr = q + row * d;
    const T* gr = g + row * d;
    T* orow = out + row * d;
    double ee = 0.0, qq = 0.0;
    for (long long i = lane; i < d; i += 32) {
      const double a = (double)er[i], b = (double)qr[i];
      ee += a * a;
      qq += b * b;
    }
    ee = warp_sum(ee);
    qq = warp_sum(qq);
    const double ne = sqrt(ee), nq = sqrt(qq);
    const double scale = est == VQ_EST_ROTATION_NO_RESCALE ? 1.0 : nq / fmax(ne, norm_eps);
    // kind: 0 identity, 1 rotation / reflection in span(e, q), 2 antipodal rotation (D >= 2),
    // 3 antipodal rotation (D = 1: H_q^ alone).
    int kind = 0;
    double ie = 0.0, iq = 0.0, ss = 0.0, sg = 0.0, qg = 0.0, eg = 0.0, eq = 0.0;
    long long axis = 0;
    if (ne >= norm_eps && nq >= norm_eps) {
      const double sign = est == VQ_EST_REFLECTION ? -1.0 : 1.0;
      ie = 1.0 / ne;
      iq = sign / nq;
      // The first index of the smallest |e_i| (index 0 when none is below +inf, as vq-core).
      double amin = __longlong_as_double(0x7ff0000000000000LL);  // +inf
      long long aidx = 0;
      for (long long i = lane; i < d; i += 32) {
        const double a = (double)er[i] * ie, b = (double)qr[i] * iq, c = (double)gr[i];
        const double s = a + b;
        ss += s * s;
        sg += s * c;
        qg += b * c;
        eg += a * c;
        eq += a * b;
        const double m = fabs((double)er[i]);
        if (m < amin) {
          amin = m;
          aidx = i;
        }
      }
      ss = warp_sum(ss);
      sg = warp_sum(sg);
      qg = warp_sum(qg);
      eg = warp_sum(eg);
      eq = warp_sum(eq);
      for (int o = 16; o > 0; o >>= 1) {
        const double m = __shfl_xor_sync(0xffffffffu, amin, o);
        const long long k = __shfl_xor_sync(0xffffffffu, aidx, o);
        if (m < amin || (m == amin && k < aidx)) {
          amin = m;
          aidx = k;
        }
      }
      axis = aidx;
      if (ss >= dir_eps) kind = 1;
      else if (est == VQ_EST_REFLECTION) kind = 0;
      else kind = d >= 2 ? 2 : 3;
    }
    if (kind == 0) {
      for (long long i = lane; i < d; i += 32) orow[i] = (T)(scale * (double)gr[i]);
    } else if (kind == 1) {
      // Reflection: g − 2(r·g)/‖r‖² r. Rotation: g + 2(q̂·g)ê − 2(s·g)/‖s‖² s.
      const double k = 2.0 * sg / ss;
      const double kq = est == VQ_EST_REFLECTION ? 0.0 : 2.0 * qg;
      for (long long i = lane; i < d; i += 32) {
        const double a = (double)er[i] * ie, b = (double)qr[i] * iq;
        orow[i] = (T)(scale * ((double)gr[i] + kq * a - k * (a + b)));
      }
    } else {
      // h = H_q̂ g = g − 2(q̂·g)q̂; antipodal with D >= 2: out = h − 2(p·h)p,
      // p = (δ_a − ê_a ê)/pn, p·g = (g_a − ê_a(ê·g))/pn, p·q̂ = (q̂_a − ê_a(ê·q̂))/pn.
      double ph = 0.0, ea = 0.0, pn = 1.0;
      if (kind == 2) {
        ea = (double)er[axis] * ie;
        pn = sqrt(fmax(1.0 - ea * ea, 0.0));
        pn = pn > 0.0 ? pn : 1.0;
        const double pg = ((double)gr[axis] - ea * eg) / pn;
        const double pq = ((double)qr[axis] * iq - ea * eq) / pn;
        ph = pg - 2.0 * pq * qg;
      }
      for (long long i = lane; i < d; i += 32) {
        const double a = (double)er[i] * ie, b = (double)qr[i] * iq;
        double h = (double)gr[i] - 2.0 * qg * b;
        if (kind == 2) h -= 2.0 * ph * (((i == axis) ? 1.0 : 0.0) - ea * a) / pn;
        orow[i] = (T)(scale * h);
      }
    }
  }
}
)CUDA";

// NVRTC's entry points, or why they are missing.
struct Nvrtc {
  nvrtcResult (*create)(nvrtcProgram*, const char*, const char*, int, const char* const*, const char* const*) =
      nullptr;
  nvrtcResult (*compile)(nvrtcProgram, int, const char* const*) = nullptr;
  nvrtcResult (*log_size)(nvrtcProgram, size_t*) = nullptr;
  nvrtcResult (*log)(nvrtcProgram, char*) = nullptr;
  nvrtcResult (*cubin_size)(nvrtcProgram, size_t*) = nullptr;
  nvrtcResult (*cubin)(nvrtcProgram, char*) = nullptr;
  nvrtcResult (*destroy)(nvrtcProgram*) = nullptr;
  const char* (*error)(nvrtcResult) = nullptr;
  std::string why;  // empty once loaded
};

// The CUDA driver's entry points, or why they are missing.
struct Driver {
  CUresult (*init)(unsigned) = nullptr;
  CUresult (*device_get)(CUdevice*, int) = nullptr;
  CUresult (*device_attribute)(int*, int, CUdevice) = nullptr;
  CUresult (*primary_retain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*ctx_push)(CUcontext) = nullptr;
  CUresult (*ctx_pop)(CUcontext*) = nullptr;
  CUresult (*module_load)(CUmodule*, const void*) = nullptr;
  CUresult (*module_function)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*launch)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                     void**, void**) = nullptr;
  CUresult (*error_string)(CUresult, const char**) = nullptr;
  std::string why;  // empty once loaded
};

template <typename F>
bool bind(void* lib, const char* name, F& f, std::string& why) {
  f = reinterpret_cast<F>(dlsym(lib, name));
  if (f == nullptr) why = std::string("symbol ") + name + " not found";
  return f != nullptr;
}

// The folder (with its trailing '/') of the shared library holding `address`, or "".
std::string folder_of(void* address) {
  Dl_info info;
  if (dladdr(address, &info) == 0 || info.dli_fname == nullptr) return "";
  const std::string path(info.dli_fname);
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? "" : path.substr(0, slash + 1);
}

// NVRTC: the versioned and plain names (found if the process or the loader's path has them), then
// the PyPI layout beside libtorch's lib folder (site-packages/nvidia/...), then torch's own stub
// library there (libcaffe2_nvrtc.so, whose run path names the NVRTC torch was built with; it also
// needs the CUDA driver).
void* open_nvrtc() {
  for (const char* name : {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"}) {
    if (void* h = dlopen(name, RTLD_NOW | RTLD_LOCAL)) return h;
  }
  const std::string dir = folder_of(reinterpret_cast<void*>(&c10::GetCPUAllocator));
  if (dir.empty()) return nullptr;
  for (const char* rel : {"../../nvidia/cu13/lib/libnvrtc.so.13", "../../nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
                          "libcaffe2_nvrtc.so"}) {
    if (void* h = dlopen((dir + rel).c_str(), RTLD_NOW | RTLD_LOCAL)) return h;
  }
  return nullptr;
}

// NVRTC opens its builtins library (libnvrtc-builtins.so.<version>) by name at its first compile;
// the PyPI layout keeps it beside libnvrtc, outside the loader's search path. Loading it from there
// first (globally) lets NVRTC's own dlopen find it.
void preload_builtins(void* create_program) {
  const std::string dir = folder_of(create_program);
  if (dir.empty()) return;
  DIR* folder = opendir(dir.c_str());
  if (folder == nullptr) return;
  while (const dirent* entry = readdir(folder)) {
    const std::string name = entry->d_name;
    if (name.rfind("libnvrtc-builtins.so", 0) == 0) dlopen((dir + name).c_str(), RTLD_NOW | RTLD_GLOBAL);
  }
  closedir(folder);
}

Nvrtc load_nvrtc() {
  Nvrtc n;
  void* lib = open_nvrtc();
  if (lib == nullptr) {
    n.why = "NVRTC (libnvrtc.so) cannot be opened";
    return n;
  }
  std::string& w = n.why;
  const bool ok = bind(lib, "nvrtcCreateProgram", n.create, w) && bind(lib, "nvrtcCompileProgram", n.compile, w) &&
                  bind(lib, "nvrtcGetProgramLogSize", n.log_size, w) && bind(lib, "nvrtcGetProgramLog", n.log, w) &&
                  bind(lib, "nvrtcGetCUBINSize", n.cubin_size, w) && bind(lib, "nvrtcGetCUBIN", n.cubin, w) &&
                  bind(lib, "nvrtcDestroyProgram", n.destroy, w) && bind(lib, "nvrtcGetErrorString", n.error, w);
  if (ok) preload_builtins(reinterpret_cast<void*>(n.create));
  return n;
}

Driver load_driver() {
  Driver d;
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    d.why = "the CUDA driver (libcuda.so.1) cannot be opened";
    return d;
  }
  std::string& w = d.why;
  const bool ok = bind(lib, "cuInit", d.init, w) && bind(lib, "cuDeviceGet", d.device_get, w) &&
                  bind(lib, "cuDeviceGetAttribute", d.device_attribute, w) &&
                  bind(lib, "cuDevicePrimaryCtxRetain", d.primary_retain, w) &&
                  bind(lib, "cuCtxPushCurrent_v2", d.ctx_push, w) && bind(lib, "cuCtxPopCurrent_v2", d.ctx_pop, w) &&
                  bind(lib, "cuModuleLoadData", d.module_load, w) &&
                  bind(lib, "cuModuleGetFunction", d.module_function, w) &&
                  bind(lib, "cuLaunchKernel", d.launch, w) && bind(lib, "cuGetErrorString", d.error_string, w);
  if (ok && d.init(0) != 0) w = "cuInit failed";
  return d;
}

const Nvrtc& nvrtc() {
  static const Nvrtc n = load_nvrtc();
  return n;
}

const Driver& driver() {
  static const Driver d = load_driver();
  return d;
}

std::string cu_error(const Driver& d, CUresult r, const char* what) {
  const char* s = nullptr;
  d.error_string(r, &s);
  return std::string(what) + ": " + (s != nullptr ? s : "CUDA error " + std::to_string(r));
}

// Compiles the kernel for compute capability major.minor with element type float or double into
// `image` (a cubin); returns "" or why it failed (with NVRTC's log).
std::string compile(int major, int minor, bool is_double, std::vector<char>& image) {
  const Nvrtc& n = nvrtc();
  if (!n.why.empty()) return n.why;
  const std::string src =
      std::string(VQ_ESTIMATOR_DEFINES) + "typedef " + (is_double ? "double" : "float") + " T;\n" + kSource;
  nvrtcProgram prog = nullptr;
  if (n.create(&prog, src.c_str(), "vq_estimator_backward.cu", 0, nullptr, nullptr) != 0) {
    return "nvrtcCreateProgram failed";
  }
  const std::string arch = "--gpu-architecture=sm_" + std::to_string(major) + std::to_string(minor);
  const char* opts[] = {arch.c_str(), "--std=c++17"};
  const nvrtcResult r = n.compile(prog, 2, opts);
  std::string why;
  size_t size = 0;
  if (r == 0 && n.cubin_size(prog, &size) == 0) {
    image.resize(size);
    if (n.cubin(prog, image.data()) != 0) why = "nvrtcGetCUBIN failed";
  } else {
    n.log_size(prog, &size);
    std::string log(size, '\0');
    n.log(prog, log.data());
    why = std::string("NVRTC could not compile the kernel for ") + arch + " (" + n.error(r) + "): " + log;
  }
  n.destroy(&prog);
  return why;
}

// A compiled kernel for one device and element type, or the reason there is none.
struct Kernel {
  CUcontext ctx = nullptr;
  CUfunction fn = nullptr;
  std::string why;
};

Kernel build(int device, bool is_double) {
  Kernel k;
  const Driver& d = driver();
  if (!d.why.empty()) {
    k.why = d.why;
    return k;
  }
  CUdevice dev = 0;
  int major = 0, minor = 0;
  CUresult r = d.device_get(&dev, device);
  if (r == 0) r = d.device_attribute(&major, kAttrMajor, dev);
  if (r == 0) r = d.device_attribute(&minor, kAttrMinor, dev);
  if (r == 0) r = d.primary_retain(&k.ctx, dev);
  if (r != 0) {
    k.why = cu_error(d, r, "CUDA device query");
    return k;
  }
  std::vector<char> image;
  k.why = compile(major, minor, is_double, image);
  if (!k.why.empty()) return k;
  d.ctx_push(k.ctx);
  CUmodule module = nullptr;
  r = d.module_load(&module, image.data());
  if (r == 0) r = d.module_function(&k.fn, module, "vq_estimator_backward");
  CUcontext popped = nullptr;
  d.ctx_pop(&popped);
  if (r != 0) {
    k.fn = nullptr;
    k.why = cu_error(d, r, "loading the compiled kernel");
  }
  return k;
}

const Kernel& kernel(int device, bool is_double) {
  static std::mutex mutex;
  static std::map<std::pair<int, bool>, Kernel> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, is_double);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, build(device, is_double)).first;
  return it->second;
}

}  // namespace

// Why the fused kernel is unavailable for CUDA device `device`, or "" when it is ready (compiles
// it on first call).
std::string unavailable(int device) { return kernel(device, false).why; }

// Compiles the kernel (float and double) for compute capability major.minor without a GPU;
// returns "" or why it failed. The kernel's source is checked this way on machines without one.
std::string compiles_for(int major, int minor) {
  std::vector<char> image;
  std::string why = compile(major, minor, false, image);
  if (why.empty() && image.empty()) why = "empty cubin";
  if (why.empty()) why = compile(major, minor, true, image);
  return why;
}

// ∂L/∂e for CUDA tensors e, q, g (N, D) of any floating dtype (computed from f32 or f64 copies,
// returned in g's dtype). On success `out` holds the result and "" is returned; otherwise the
// reason, and `out` is untouched.
std::string backward(const at::Tensor& e_in, const at::Tensor& q_in, const at::Tensor& g_in, int64_t est,
                     double norm_eps, double direction_eps, at::Tensor& out) {
  if (!g_in.is_cuda()) return "not a CUDA tensor";
  const bool is_double = e_in.scalar_type() == at::kDouble || q_in.scalar_type() == at::kDouble ||
                         g_in.scalar_type() == at::kDouble;
  const auto kind = is_double ? at::kDouble : at::kFloat;
  const int device = g_in.device().index();
  const Kernel& k = kernel(device, is_double);
  if (k.fn == nullptr) return k.why;
  const auto e = e_in.to(kind).contiguous();
  const auto q = q_in.to(kind).contiguous();
  const auto g = g_in.to(kind).contiguous();
  auto result = at::empty_like(g);
  long long n = e.size(0), d = e.size(1);
  if (n > 0 && d > 0) {
    const Driver& drv = driver();
    const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
    auto stream = static_cast<CUstream>(impl.getStream(g.device()).native_handle());
    const void* pe = e.data_ptr();
    const void* pq = q.data_ptr();
    const void* pg = g.data_ptr();
    void* po = result.data_ptr();
    int estimator = static_cast<int>(est);
    void* args[] = {&pe, &pq, &pg, &po, &n, &d, &estimator, &norm_eps, &direction_eps};
    constexpr unsigned kWarps = 8;
    const long long blocks = std::min<long long>((n + kWarps - 1) / kWarps, 1LL << 20);
    drv.ctx_push(k.ctx);
    const CUresult r = drv.launch(k.fn, static_cast<unsigned>(blocks), 1, 1, 32 * kWarps, 1, 1, 0, stream, args,
                                  nullptr);
    CUcontext popped = nullptr;
    drv.ctx_pop(&popped);
    if (r != 0) return cu_error(drv, r, "launching the fused estimator kernel");
  }
  out = result.to(g_in.scalar_type());
  return "";
}

}  // namespace vq_fused
