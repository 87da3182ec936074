// libtorch's c10d for Rust: a TCPStore rendezvous, one process group (Gloo for CPU tensors, NCCL
// for CUDA tensors when libtorch was built with it) and the collectives training needs, behind a C
// ABI. Errors never cross into Rust as exceptions: every function returns a status (0 = success)
// or nullptr, with the message in vq_dist_last_error().
//
// A heartbeat thread writes "vq/alive/<rank>" = a counter into the store every interval, so that
// after a failed collective the survivors can tell which rank stopped (dead or hung).

#include <ATen/ATen.h>
#include <c10/util/Logging.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#ifdef VQ_DIST_NCCL
c10::intrusive_ptr<c10d::Backend> vq_dist_make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world,
                                                    std::chrono::milliseconds timeout, int device);
#endif

namespace {

thread_local std::string last_error;

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  int rank = 0;
  int world = 1;
  int cuda_device = -1;  // NCCL: this rank's GPU
  std::chrono::milliseconds timeout{0};
  std::thread heartbeat;
  std::mutex mutex;
  std::condition_variable cv;
  bool stop = false;
};

void wait(const c10::intrusive_ptr<c10d::Work>& work) { work->wait(); }

template <typename F>
int32_t guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& ex) {
    last_error = ex.what();
    return 1;
  }
}

void start_heartbeat(Group* g, int64_t interval_ms) {
  // A separate client connection, so that a collective blocked in the main thread never delays
  // the heartbeat (and the other way round).
  auto store = g->store->clone();
  const std::string key = "vq/alive/" + std::to_string(g->rank);
  g->heartbeat = std::thread([g, store, key, interval_ms] {
    std::unique_lock<std::mutex> lock(g->mutex);
    while (!g->stop) {
      lock.unlock();
      try {
        store->add(key, 1);
      } catch (const std::exception&) {
        // The store host is gone; the main thread reports it when its next collective fails.
      }
      lock.lock();
      g->cv.wait_for(lock, std::chrono::milliseconds(interval_ms), [g] { return g->stop; });
    }
  });
}

// Differentiable all-reduce (sum): forward sums over ranks, backward sums the gradients over
// ranks (as torch.distributed.nn.functional.all_reduce). Used for synchronised batch statistics.
struct AllReduceSumFn : public torch::autograd::Function<AllReduceSumFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t group) {
    ctx->saved_data["group"] = group;
    auto out = x.detach().clone().contiguous();
    std::vector<at::Tensor> ts{out};
    wait(reinterpret_cast<Group*>(group)->backend->allreduce(ts));
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto group = ctx->saved_data["group"].toInt();
    return {AllReduceSumFn::apply(grads[0].contiguous(), group), at::Tensor()};
  }
};

}  // namespace

extern "C" {

const char* vq_dist_last_error() { return last_error.c_str(); }

// Connects to the rendezvous: the TCPStore on `port` of `host`, hosted by this process when
// `is_server` (rank 0, unless a launcher's agent already hosts it), every key under `prefix` (one
// per launch attempt, so that a restarted group never sees the keys of the one before). The store,
// the backend's connections and every collective use `timeout_ms`. Returns nullptr on failure
// (message in vq_dist_last_error()).
void* vq_dist_store_connect(const char* host, int32_t port, int32_t is_server, const char* prefix, int32_t rank,
                            int32_t world, int64_t timeout_ms) {
  try {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = is_server != 0;
    opts.numWorkers = world;
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto g = new Group();
    try {
      auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
      g->store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    } catch (...) {
      delete g;
      throw;
    }
    g->rank = rank;
    g->world = world;
    g->timeout = std::chrono::milliseconds(timeout_ms);
    return g;
  } catch (const std::exception& ex) {
    last_error = ex.what();
    return nullptr;
  }
}

int32_t vq_dist_store_set(void* group, const char* key, const uint8_t* value, int64_t len) {
  auto g = static_cast<Group*>(group);
  return guarded([&] { g->store->set(key, std::vector<uint8_t>(value, value + len)); });
}

// Copies the value of `key` (waiting up to the store's timeout for it to be set) into a buffer the
// caller frees with vq_dist_free_bytes.
int32_t vq_dist_store_get(void* group, const char* key, uint8_t** value, int64_t* len) {
  auto g = static_cast<Group*>(group);
  return guarded([&] {
    const auto v = g->store->get(key);
    *len = static_cast<int64_t>(v.size());
    *value = static_cast<uint8_t*>(std::malloc(v.size() > 0 ? v.size() : 1));
    if (!v.empty()) std::memcpy(*value, v.data(), v.size());
  });
}

void vq_dist_free_bytes(uint8_t* p) { std::free(p); }

// After a failure: c10's warnings (every failed store request of the diagnosis logs one with a
// C++ stack trace) are left out; errors are still printed. The process is about to stop.
void vq_dist_quiet_warnings() { FLAGS_caffe2_log_level = std::max(FLAGS_caffe2_log_level, 2); }

// Stops the heartbeat (before the final barrier, so that no rank talks to the store afterwards).
void vq_dist_stop_heartbeat(void* group) {
  auto g = static_cast<Group*>(group);
  {
    std::lock_guard<std::mutex> lock(g->mutex);
    g->stop = true;
  }
  g->cv.notify_all();
  if (g->heartbeat.joinable()) g->heartbeat.join();
}

// *found = whether `key` is set (does not wait).
int32_t vq_dist_store_check(void* group, const char* key, int32_t* found) {
  auto g = static_cast<Group*>(group);
  return guarded([&] { *found = g->store->check({std::string(key)}) ? 1 : 0; });
}

// Atomically adds `delta` to the integer at `key`; *value = the result.
int32_t vq_dist_store_add(void* group, const char* key, int64_t delta, int64_t* value) {
  auto g = static_cast<Group*>(group);
  return guarded([&] { *value = g->store->add(key, delta); });
}

// Creates the process group on the joined store and starts the heartbeat. backend: 0 Gloo, 1 NCCL
// on CUDA device `cuda_device`.
int32_t vq_dist_init_backend(void* group, int32_t backend, int32_t cuda_device, int64_t heartbeat_ms) {
  auto g = static_cast<Group*>(group);
  return guarded([&] {
    if (backend == 0) {
      auto opts = c10d::ProcessGroupGloo::Options::create(g->timeout);
      // As torch.distributed: the interface named by GLOO_SOCKET_IFNAME, else the address the
      // host name resolves to.
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      if (ifname != nullptr && *ifname != '\0') {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(std::string(ifname)));
      } else {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(g->store, g->rank, g->world, opts);
    } else {
#ifdef VQ_DIST_NCCL
      g->cuda_device = cuda_device;
      g->backend = vq_dist_make_nccl(g->store, g->rank, g->world, g->timeout, cuda_device);
#else
      TORCH_CHECK(false, "this build of vq-dist has no NCCL (libtorch without CUDA, or nccl.h not found)");
#endif
    }
    start_heartbeat(g, heartbeat_ms);
  });
}

int32_t vq_dist_allreduce_sum(void* group, at::Tensor* t) {
  auto g = static_cast<Group*>(group);
  return guarded([&] {
    std::vector<at::Tensor> ts{*t};
    wait(g->backend->allreduce(ts));
  });
}

int32_t vq_dist_broadcast(void* group, at::Tensor* t, int32_t root) {
  auto g = static_cast<Group*>(group);
  return guarded([&] {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    wait(g->backend->broadcast(ts, opts));
  });
}

// out: a contiguous tensor of world × t's elements, filled with every rank's t in rank order.
int32_t vq_dist_allgather(void* group, at::Tensor* out, at::Tensor* t) {
  auto g = static_cast<Group*>(group);
  return guarded([&] {
    std::vector<at::Tensor> outs;
    for (int r = 0; r < g->world; ++r) outs.push_back(at::empty_like(*t));
    std::vector<std::vector<at::Tensor>> outputs{outs};
    std::vector<at::Tensor> inputs{*t};
    wait(g->backend->allgather(outputs, inputs));
    out->copy_(at::stack(outputs[0], 0).view(out->sizes()));
  });
}

int32_t vq_dist_barrier(void* group) {
  auto g = static_cast<Group*>(group);
  return guarded([&] {
    c10d::BarrierOptions opts;
    if (g->cuda_device >= 0) opts.device_ids = {g->cuda_device};
    wait(g->backend->barrier(opts));
  });
}

// Differentiable all-reduce; returns a new tensor or nullptr.
at::Tensor* vq_dist_allreduce_sum_autograd(void* group, at::Tensor* t) {
  try {
    return new at::Tensor(AllReduceSumFn::apply(*t, reinterpret_cast<int64_t>(group)));
  } catch (const std::exception& ex) {
    last_error = ex.what();
    return nullptr;
  }
}

// Stops the heartbeat and frees the group. `graceful` = 0 after a failure: the backend and the
// store are leaked instead of destroyed, since their destructors may wait for peers that are gone.
void vq_dist_destroy(void* group, int32_t graceful) {
  auto g = static_cast<Group*>(group);
  {
    std::lock_guard<std::mutex> lock(g->mutex);
    g->stop = true;
  }
  g->cv.notify_all();
  if (g->heartbeat.joinable()) {
    if (graceful) {
      g->heartbeat.join();
    } else {
      g->heartbeat.detach();
      return;  // the thread still uses g
    }
  }
  if (!graceful) return;
  delete g;
}

}  // extern "C"
