// The identity of each gradient estimator, defined once for the three places that name it:
// the Rust side (build.rs reads this file and generates `code`, an exhaustive match over
// vq_core::Estimator, so a variant without an entry here, or an entry without a variant, does
// not compile), the C++ autograd node (vq_autograd.cpp) and the CUDA kernel (vq_fused.cpp puts
// VQ_ESTIMATOR_DEFINES in front of the kernel's source).
//
// One line per estimator: `#define VQ_EST_<NAME> <code>`, NAME the vq_core::Estimator variant
// in upper snake case.
#pragma once

#define VQ_EST_STRAIGHT_THROUGH 0
#define VQ_EST_ROTATION 1
#define VQ_EST_ROTATION_NO_RESCALE 2
#define VQ_EST_REFLECTION 3

#define VQ_EST_STR2(x) #x
#define VQ_EST_STR(x) VQ_EST_STR2(x)
#define VQ_EST_DEFINE_LINE(name) "#define " #name " " VQ_EST_STR(name) "\n"
// The definitions as source text, for code compiled at run time (NVRTC).
#define VQ_ESTIMATOR_DEFINES                                                          \
  VQ_EST_DEFINE_LINE(VQ_EST_STRAIGHT_THROUGH) VQ_EST_DEFINE_LINE(VQ_EST_ROTATION)     \
  VQ_EST_DEFINE_LINE(VQ_EST_ROTATION_NO_RESCALE) VQ_EST_DEFINE_LINE(VQ_EST_REFLECTION)
