// See README.md: held through std::shared_ptr by ProcessGroupGloo; the one member its inline
// setTimeout names is declared (vq-dist never calls it).
#pragma once
#include <chrono>
namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
}  // namespace gloo
