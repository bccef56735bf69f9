// Argument checks and flag parsing of the MBConv block entry points (mbconv_*), shared by the
// CPU and CUDA implementations. Every problem is reported by name before any kernel runs.
#pragma once

#include <string>
#include <type_traits>

#include "fused_mbconv/checks.h"

namespace fused_mbconv {

// The main activation of a block entry point: 4-D, float, on `device_type`, non-empty,
// contiguous NCHW or channels_last. Every other activation is checked against it.
inline void check_block_input(const char* op, const char* name, const Tensor& x,
                              c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": ", name, " must be a 4-D (N, C, H, W) tensor, got shape ",
                    x.sizes());
  check_float(op, name, x);
  TORCH_CHECK_VALUE(x.device().type() == device_type, op, ": this ", device_type, " kernel got ",
                    name, " on ", x.device());
  TORCH_CHECK_VALUE(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
                    ": ", name, " must be contiguous in NCHW or channels_last memory format, got "
                    "strides ", x.strides(), " for shape ", x.sizes());
  TORCH_CHECK_VALUE(x.numel() > 0, op, ": ", name, " has an empty dimension: shape ", x.sizes());
}

// A 2-D weight (rows, cols) in x's dtype and device.
inline void check_matrix(const char* op, const char* name, const Tensor& w, const Tensor& x,
                         int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(w.dim() == 2 && (rows < 0 || w.size(0) == rows) && w.size(1) == cols, op,
                    ": ", name, " must be a 2-D (", rows < 0 ? "out" : std::to_string(rows), ", ",
                    cols, ") matrix, got shape ", w.sizes());
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ",
                   w.scalar_type(), " does not match input dtype ", x.scalar_type());
  check_device(op, name, w, x);
}

// A float vector of `size` elements on x's device (any float dtype: converted on use).
inline void check_vector(const char* op, const char* name, const Tensor& t, const Tensor& x,
                         at::IntArrayRef shape) {
  check_float(op, name, t);
  check_device(op, name, t, x);
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
                    t.sizes());
}

// One BatchNorm's arguments (tensors.NormArgs) for a BN applied to x's channels.
inline void check_norm(const char* op, const char* bn, const Tensor& mean, const Tensor& var,
                       const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                       double eps, const Tensor& x) {
  const std::string p(bn);
  check_channel_vector(op, (p + " mean").c_str(), mean, x);
  check_channel_vector(op, (p + " var").c_str(), var, x);
  check_optional_vector(op, (p + " weight").c_str(), weight, x);
  check_optional_vector(op, (p + " bias").c_str(), bias, x);
  TORCH_CHECK_VALUE(eps > 0, op, ": ", bn, " eps must be > 0, got ", eps);
}

inline void check_dw_weight(const char* op, const Tensor& weight, const Tensor& h,
                            int64_t stride) {
  const int64_t C = h.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 &&
                        weight.size(2) == weight.size(3),
                    op, ": depthwise weight must have shape (C, 1, k, k) with C=", C,
                    " (the input's channels), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(2) % 2 == 1, op, ": kernel size must be odd, got ",
                    weight.size(2));
  TORCH_CHECK_TYPE(weight.scalar_type() == h.scalar_type(), op, ": depthwise weight dtype ",
                   weight.scalar_type(), " does not match input dtype ", h.scalar_type());
  check_device(op, "depthwise weight", weight, h);
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
}

inline Act activation_of(const char* op, const std::string& name) {
  if (name == "silu") return Act::kSilu;
  if (name == "relu") return Act::kRelu;
  if (name == "relu6") return Act::kRelu6;
  TORCH_CHECK_VALUE(name == "hardswish", op,
                    ": activation must be one of silu, relu, relu6, hardswish, got '", name, "'");
  return Act::kHardswish;
}

inline Act gate_of(const char* op, const std::string& name) {
  if (name == "sigmoid") return Act::kSigmoid;
  TORCH_CHECK_VALUE(name == "hardsigmoid", op, ": gate must be sigmoid or hardsigmoid, got '",
                    name, "'");
  return Act::kHardsigmoid;
}

// Calls f(std::integral_constant<Act, A>{}) for a block activation.
template <typename F>
void dispatch_activation(Act a, F&& f) {
  switch (a) {
    case Act::kSilu: return f(std::integral_constant<Act, Act::kSilu>{});
    case Act::kRelu: return f(std::integral_constant<Act, Act::kRelu>{});
    case Act::kRelu6: return f(std::integral_constant<Act, Act::kRelu6>{});
    default: return f(std::integral_constant<Act, Act::kHardswish>{});
  }
}

template <typename F>
void dispatch_gate(Act a, F&& f) {
  if (a == Act::kSigmoid) return f(std::integral_constant<Act, Act::kSigmoid>{});
  return f(std::integral_constant<Act, Act::kHardsigmoid>{});
}

}  // namespace fused_mbconv
