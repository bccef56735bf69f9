// Host-side helpers shared by the CPU and CUDA entry points (per-channel parameter tensors,
// output allocation). Kernels themselves only see raw pointers and math.h.
#pragma once

#include <ATen/ATen.h>

#include "fused_mbconv/checks.h"

namespace fused_mbconv {

// A per-channel vector in the accumulation dtype, or `fill` when absent (BN without affine).
inline Tensor channel_param(const c10::optional<Tensor>& t, const Tensor& x, double fill) {
  const auto acc = accumulate_type(x.scalar_type());
  if (t.has_value() && t->defined()) return t->to(acc).contiguous();
  return at::full({x.size(1)}, fill, x.options().dtype(acc));
}

inline at::MemoryFormat memory_format_of(const Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline Tensor empty_like_input(const Tensor& x, at::IntArrayRef shape) {
  return at::empty(shape, x.options().memory_format(memory_format_of(x)));
}

}  // namespace fused_mbconv
