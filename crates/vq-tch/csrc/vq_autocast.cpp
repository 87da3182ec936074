// Autocast (automatic mixed precision) regions for one device type, as `torch.autocast` opens
// them: enter saves the device type's enabled flag and lower-precision dtype, sets them and
// raises the nesting count; exit lowers it, clears the cast-weight cache when the outermost
// region closes, and restores what enter saved. Device types are c10::DeviceType codes (0 CPU,
// 1 CUDA); dtypes are c10::ScalarType codes (5 Half, 15 BFloat16).

#include <ATen/autocast_mode.h>

#include <cstdint>

extern "C" {

// Whether libtorch has an autocast implementation for the device type.
int32_t vq_tch_autocast_available(int32_t device_type) {
  return at::autocast::is_autocast_available(static_cast<c10::DeviceType>(device_type)) ? 1 : 0;
}

// Opens a region; `*prev_enabled` and `*prev_dtype` receive what vq_tch_autocast_exit restores.
void vq_tch_autocast_enter(int32_t device_type, int32_t enabled, int32_t dtype, int32_t* prev_enabled,
                           int32_t* prev_dtype) {
  const auto dev = static_cast<c10::DeviceType>(device_type);
  *prev_enabled = at::autocast::is_autocast_enabled(dev) ? 1 : 0;
  *prev_dtype = static_cast<int32_t>(at::autocast::get_autocast_dtype(dev));
  at::autocast::set_autocast_enabled(dev, enabled != 0);
  if (enabled != 0) at::autocast::set_autocast_dtype(dev, static_cast<c10::ScalarType>(dtype));
  at::autocast::increment_nesting();
}

void vq_tch_autocast_exit(int32_t device_type, int32_t prev_enabled, int32_t prev_dtype) {
  const auto dev = static_cast<c10::DeviceType>(device_type);
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(dev, prev_enabled != 0);
  at::autocast::set_autocast_dtype(dev, static_cast<c10::ScalarType>(prev_dtype));
}

}  // extern "C"
