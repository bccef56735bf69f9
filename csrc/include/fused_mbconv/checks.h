// Argument checks of the fused_mbconv_ext entry points, shared by the CPU and CUDA
// implementations: every problem is reported by name before any kernel runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>
#include <vector>

#include "fused_mbconv/math.h"

namespace fused_mbconv {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

inline bool is_channels_last(const Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_float(const char* op, const char* name, const Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   op, ": ", name, " must be float16, bfloat16, float32 or float64, got ", dt);
}

inline void check_device(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
                    " but input is on ", x.device());
}

inline void check_channel_vector(const char* op, const char* name, const Tensor& t,
                                 const Tensor& x) {
  check_float(op, name, t);
  check_device(op, name, t, x);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name, " must have shape (",
                    x.size(1), ",) to match the input's channels, got ", t.sizes());
}

inline void check_optional_vector(const char* op, const char* name,
                                  const c10::optional<Tensor>& t, const Tensor& x) {
  if (t.has_value() && t->defined()) check_channel_vector(op, name, *t, x);
}

// An activation-sized tensor: 4-D, x's dtype and device, contiguous in x's memory format.
inline void check_activation(const char* op, const char* name, const Tensor& t, const Tensor& x,
                             at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
                   " does not match input dtype ", x.scalar_type());
  check_device(op, name, t, x);
  const auto format = is_channels_last(x) ? at::MemoryFormat::ChannelsLast
                                          : at::MemoryFormat::Contiguous;
  TORCH_CHECK_VALUE(t.is_contiguous(format), op, ": ", name,
                    " must be contiguous in the input's memory format (",
                    is_channels_last(x) ? "channels_last" : "NCHW", "), got strides ",
                    t.strides());
}

// x, the depthwise weight, stride and eps: common to forward and backward.
inline void check_conv(const char* op, const Tensor& x, const Tensor& weight, int64_t stride,
                       double eps, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": input must be a 4-D (N, C, H, W) tensor, got shape ",
                    x.sizes());
  check_float(op, "input", x);
  TORCH_CHECK_VALUE(x.device().type() == device_type, op, ": this ", device_type,
                    " kernel got an input on ", x.device());
  TORCH_CHECK_VALUE(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
                    ": input must be contiguous in NCHW or channels_last memory format, got "
                    "strides ", x.strides(), " for shape ", x.sizes());
  TORCH_CHECK_VALUE(x.numel() > 0, op, ": input has an empty dimension: shape ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 &&
                        weight.size(2) == weight.size(3),
                    op, ": conv weight must have shape (C, 1, k, k) with C=", C,
                    " (the input's channels), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(2) % 2 == 1, op, ": kernel size must be odd, got ",
                    weight.size(2));
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": conv weight dtype ",
                   weight.scalar_type(), " does not match input dtype ", x.scalar_type());
  check_device(op, "conv weight", weight, x);
  TORCH_CHECK_VALUE(weight.is_contiguous(), op, ": conv weight must be contiguous");
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0, got ", eps);
}

struct DwconvBnSiluForwardArgs {
  const Tensor &x, &weight;
  const OptTensor &bn_weight, &bn_bias, &running_mean, &running_var;
  int64_t stride;
  bool training;
  double eps;
  bool need_conv_out;
};

inline void check_forward(const DwconvBnSiluForwardArgs& a, c10::DeviceType device) {
  const char* op = "dwconv_bn_silu_forward";
  check_conv(op, a.x, a.weight, a.stride, a.eps, device);
  check_optional_vector(op, "bn_weight", a.bn_weight, a.x);
  check_optional_vector(op, "bn_bias", a.bn_bias, a.x);
  check_optional_vector(op, "running_mean", a.running_mean, a.x);
  check_optional_vector(op, "running_var", a.running_var, a.x);
  const bool has_mean = a.running_mean.has_value() && a.running_mean->defined();
  const bool has_var = a.running_var.has_value() && a.running_var->defined();
  TORCH_CHECK_VALUE(has_mean == has_var, op, ": running_mean and running_var must be given together");
  TORCH_CHECK_VALUE(a.training || has_mean, op,
                    ": running_mean and running_var are required when training=False");
  if (a.training) {
    const int k = static_cast<int>(a.weight.size(2));
    const int64_t values = a.x.size(0) * conv_out_size(a.x.size(2), k, static_cast<int>(a.stride)) *
                           conv_out_size(a.x.size(3), k, static_cast<int>(a.stride));
    TORCH_CHECK_VALUE(values > 1, op, ": expected more than 1 value per channel when training, "
                      "got input size ", a.x.sizes());
  }
}

using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor>;

template <c10::DeviceType kDevice, ForwardResult (*kImpl)(const DwconvBnSiluForwardArgs&)>
ForwardResult forward_entry(
    const Tensor& x, const Tensor& weight, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const OptTensor& running_mean, const OptTensor& running_var, int64_t stride, bool training,
    double eps, bool need_conv_out) {
  const DwconvBnSiluForwardArgs a{x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
                                  training, eps, need_conv_out};
  check_forward(a, kDevice);
  return kImpl(a);
}

// dwconv_bn_silu_backward's arguments, in schema order, declared once for both backends (see
// block_checks.h's ProjectBackwardArgs): each registers backward_entry<device, its impl>.
struct DwconvBnSiluBackwardArgs {
  const Tensor &grad_out, &x, &weight, &conv_out;
  const OptTensor &bn_weight, &bn_bias;
  const Tensor &mean, &var;
  int64_t stride;
  bool training;
  double eps;
  std::array<bool, 4> output_mask;
};

inline void check_backward(const DwconvBnSiluBackwardArgs& a, c10::DeviceType device_type) {
  const char* op = "dwconv_bn_silu_backward";
  check_conv(op, a.x, a.weight, a.stride, a.eps, device_type);
  const int k = static_cast<int>(a.weight.size(2));
  const int s = static_cast<int>(a.stride);
  const std::vector<int64_t> out_shape{a.x.size(0), a.x.size(1), conv_out_size(a.x.size(2), k, s),
                                       conv_out_size(a.x.size(3), k, s)};
  check_activation(op, "grad_out", a.grad_out, a.x, out_shape);
  check_activation(op, "conv_out", a.conv_out, a.x, out_shape);
  check_optional_vector(op, "bn_weight", a.bn_weight, a.x);
  check_optional_vector(op, "bn_bias", a.bn_bias, a.x);
  check_channel_vector(op, "mean", a.mean, a.x);
  check_channel_vector(op, "var", a.var, a.x);
}

using BackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor>;

template <c10::DeviceType kDevice, BackwardResult (*kImpl)(const DwconvBnSiluBackwardArgs&)>
BackwardResult backward_entry(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                              const Tensor& conv_out, const OptTensor& bn_weight,
                              const OptTensor& bn_bias, const Tensor& mean, const Tensor& var,
                              int64_t stride, bool training, double eps,
                              std::array<bool, 4> output_mask) {
  const DwconvBnSiluBackwardArgs a{grad_out, x, weight, conv_out, bn_weight, bn_bias, mean, var,
                                   stride, training, eps, output_mask};
  check_backward(a, kDevice);
  return kImpl(a);
}

}  // namespace fused_mbconv
