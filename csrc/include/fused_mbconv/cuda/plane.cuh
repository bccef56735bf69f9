// How the CUDA kernels address an activation in place, NCHW or channels_last.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "fused_mbconv/checks.h"
#include "fused_mbconv/math.h"

namespace fused_mbconv {
namespace cuda {

// An activation (N, C, H, W) addressed by (image n, channel c, position p = h * W + w), NCHW
// or channels_last. A tensor contiguous in both formats (C == 1 or H * W == 1) has the same
// addresses under both, so a tensor's own layout is always a valid reading of it, and tensors
// of one shape that the entry checks found in the same format share memory offsets. Indices
// within an image are 32-bit (64-bit integer division is a called subroutine on the GPU, and
// its calls spill registers); offsets are 64-bit.
struct Plane {
  int N, C, P;
  bool channels_last;

  FM_HOST_DEVICE int64_t at(int n, int c, int p) const {
    return channels_last ? (int64_t(n) * P + p) * C + c : (int64_t(n) * C + c) * P + p;
  }
};

inline Plane plane_of(const Tensor& t) {
  const int64_t N = t.size(0), C = t.size(1), P = t.size(2) * t.size(3);
  TORCH_CHECK_VALUE(C * P <= 0x7fffffff && N <= 65535, "fused_mbconv: an activation of shape ",
                    t.sizes(), " exceeds the CUDA kernels' 32-bit per-image indexing");
  return {static_cast<int>(N), static_cast<int>(C), static_cast<int>(P), is_channels_last(t)};
}

}  // namespace cuda
}  // namespace fused_mbconv
