// Argument checks and flag parsing of the MBConv block entry points (mbconv_*), shared by the
// CPU and CUDA implementations. Every problem is reported by name before any kernel runs.
#pragma once

#include <array>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include <c10/util/string_view.h>

#include "fused_mbconv/activations.h"
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

// ---- activation names: activations.h's list --------------------------------------------------

struct ActivationName {
  Act kind;
  const char* name;
  ActRole role;
};

#define FM_ACTIVATION_NAME(kind, name, role) {Act::kind, name, ActRole::role},
inline constexpr ActivationName kActivationNames[] = {
    FUSED_MBCONV_FOR_EACH_ACTIVATION(FM_ACTIVATION_NAME)};
#undef FM_ACTIVATION_NAME

// The names `role` takes, in the list's order: "silu, relu, ...".
inline std::string activation_names(ActRole role) {
  std::string names;
  for (const ActivationName& a : kActivationNames) {
    if (a.role != role) continue;
    if (!names.empty()) names += ", ";
    names += a.name;
  }
  return names;
}

// The kind of activation `name`, passed as `argument` of `op`, which takes `role`'s names.
inline Act parse_activation(const char* op, const char* argument, ActRole role,
                            c10::string_view name) {
  const ActivationName* found = nullptr;
  for (const ActivationName& a : kActivationNames) {
    if (a.role == role && name == a.name) found = &a;
  }
  TORCH_CHECK_VALUE(found, op, ": ", argument, " must be one of ", activation_names(role),
                    ", got '", std::string(name), "'");
  return found->kind;
}

inline Act activation_of(const char* op, c10::string_view name) {
  return parse_activation(op, "activation", ActRole::Block, name);
}

inline bool given(const c10::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// ---- the checks of each entry point, in argument order: CPU and CUDA run the same ones ------

inline void check_expand_forward(const Tensor& x, const Tensor& weight, c10::DeviceType device) {
  const char* op = "mbconv_expand_forward";
  check_block_input(op, "x", x, device);
  check_matrix(op, "weight", weight, x, -1, x.size(1));
}

inline void check_in_bn(const char* op, const Tensor& h, const OptTensor& mean,
                        const OptTensor& var, const OptTensor& w, const OptTensor& b, double eps) {
  TORCH_CHECK_VALUE(given(mean) == given(var), op,
                    ": in_bn mean and var must be given together (or neither: no expansion)");
  if (given(mean)) check_norm(op, "in_bn", *mean, *var, w, b, eps, h);
}

struct DwconvForwardArgs {
  const Tensor &h, &weight;
  int64_t stride;
  const OptTensor &in_mean, &in_var, &in_weight, &in_bias;
  double in_eps;
  c10::string_view activation;
  bool need_stats;
};

inline Act check_dwconv_forward(const DwconvForwardArgs& a, c10::DeviceType device) {
  const char* op = "mbconv_dwconv_forward";
  check_block_input(op, "h", a.h, device);
  check_dw_weight(op, a.weight, a.h, a.stride);
  check_in_bn(op, a.h, a.in_mean, a.in_var, a.in_weight, a.in_bias, a.in_eps);
  return activation_of(op, a.activation);
}

using DwconvForwardResult = std::tuple<Tensor, Tensor, Tensor>;

template <c10::DeviceType kDevice, DwconvForwardResult (*kImpl)(const DwconvForwardArgs&, Act)>
DwconvForwardResult dwconv_forward_entry(
    const Tensor& h, const Tensor& weight, int64_t stride, const OptTensor& in_mean,
    const OptTensor& in_var, const OptTensor& in_weight, const OptTensor& in_bias, double in_eps,
    c10::string_view activation, bool need_stats) {
  const DwconvForwardArgs a{h, weight, stride, in_mean, in_var, in_weight, in_bias, in_eps,
                            activation, need_stats};
  return kImpl(a, check_dwconv_forward(a, kDevice));
}

inline Act check_squeeze_forward(const Tensor& d, const Tensor& mean, const Tensor& var,
                                 const OptTensor& weight, const OptTensor& bias, double eps,
                                 c10::string_view activation, c10::DeviceType device) {
  const char* op = "mbconv_squeeze_forward";
  check_block_input(op, "d", d, device);
  check_norm(op, "bn2", mean, var, weight, bias, eps, d);
  return activation_of(op, activation);
}

inline void check_excite(const char* op, const Tensor& pooled, const Tensor& w1, const Tensor& b1,
                         const Tensor& w2, const Tensor& b2, c10::DeviceType device) {
  TORCH_CHECK_VALUE(pooled.dim() == 2, op, ": pooled must be 2-D (N, C), got shape ",
                    pooled.sizes());
  TORCH_CHECK_TYPE(pooled.scalar_type() == at::kFloat || pooled.scalar_type() == at::kDouble, op,
                   ": pooled must be float32 or float64 (the accumulate dtype), got ",
                   pooled.scalar_type());
  TORCH_CHECK_VALUE(pooled.device().type() == device, op, ": this ", device,
                    " kernel got pooled on ", pooled.device());
  const int64_t C = pooled.size(1);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(1) == C, op, ": fc1_weight must be (S, ", C,
                    "), got shape ", w1.sizes());
  const int64_t S = w1.size(0);
  check_float(op, "fc1_weight", w1);
  check_device(op, "fc1_weight", w1, pooled);
  check_vector(op, "fc1_bias", b1, pooled, {S});
  check_vector(op, "fc2_weight", w2, pooled, {C, S});
  check_vector(op, "fc2_bias", b2, pooled, {C});
}

// (SE activation, gate)
inline std::pair<Act, Act> check_excite_forward(const Tensor& pooled, const Tensor& w1,
                                                const Tensor& b1, const Tensor& w2,
                                                const Tensor& b2, c10::string_view se_activation,
                                                c10::string_view gate, c10::DeviceType device) {
  const char* op = "mbconv_excite_forward";
  check_excite(op, pooled, w1, b1, w2, b2, device);
  return {parse_activation(op, "se_activation", ActRole::Block, se_activation),
          parse_activation(op, "gate", ActRole::Gate, gate)};
}

inline std::pair<Act, Act> check_excite_backward(const Tensor& grad_gate, const Tensor& pooled,
                                                 const Tensor& w1, const Tensor& b1,
                                                 const Tensor& w2, const Tensor& b2,
                                                 c10::string_view se_activation,
                                                 c10::string_view gate, c10::DeviceType device) {
  const char* op = "mbconv_excite_backward";
  check_excite(op, pooled, w1, b1, w2, b2, device);
  check_vector(op, "grad_gate", grad_gate, pooled, pooled.sizes());
  return {parse_activation(op, "se_activation", ActRole::Block, se_activation),
          parse_activation(op, "gate", ActRole::Gate, gate)};
}

inline void check_gate_values(const char* op, const OptTensor& gate, const Tensor& d) {
  if (given(gate)) check_vector(op, "gate_values", *gate, d, {d.size(0), d.size(1)});
}

struct ProjectForwardArgs {
  const Tensor& d;
  const OptTensor& gate;
  const Tensor &weight, &mean2, &var2;
  const OptTensor &w2, &b2;
  double eps2;
  c10::string_view activation;
  bool need_stats;
};

inline Act check_project_forward(const ProjectForwardArgs& a, c10::DeviceType device) {
  const char* op = "mbconv_project_forward";
  check_block_input(op, "d", a.d, device);
  check_gate_values(op, a.gate, a.d);
  check_matrix(op, "weight", a.weight, a.d, -1, a.d.size(1));
  check_norm(op, "bn2", a.mean2, a.var2, a.w2, a.b2, a.eps2, a.d);
  return activation_of(op, a.activation);
}

using ProjectForwardResult = std::tuple<Tensor, Tensor, Tensor>;

template <c10::DeviceType kDevice, ProjectForwardResult (*kImpl)(const ProjectForwardArgs&, Act)>
ProjectForwardResult project_forward_entry(
    const Tensor& d, const OptTensor& gate, const Tensor& weight, const Tensor& mean2,
    const Tensor& var2, const OptTensor& w2, const OptTensor& b2, double eps2,
    c10::string_view activation, bool need_stats) {
  const ProjectForwardArgs a{d, gate, weight, mean2, var2, w2, b2, eps2, activation, need_stats};
  return kImpl(a, check_project_forward(a, kDevice));
}

inline void check_sample_scale(const char* op, const OptTensor& s, const Tensor& x) {
  if (given(s)) check_vector(op, "sample_scale", *s, x, {x.size(0)});
}

inline void check_output_forward(const Tensor& q, const Tensor& mean3, const Tensor& var3,
                                 const OptTensor& w3, const OptTensor& b3, double eps3,
                                 const OptTensor& sample_scale, const OptTensor& residual,
                                 c10::DeviceType device) {
  const char* op = "mbconv_output_forward";
  check_block_input(op, "q", q, device);
  check_norm(op, "bn3", mean3, var3, w3, b3, eps3, q);
  check_sample_scale(op, sample_scale, q);
  if (given(residual)) check_activation(op, "residual", *residual, q, q.sizes());
}

inline void check_output_backward_stats(const Tensor& grad_out, const Tensor& q,
                                        const Tensor& mean3, const Tensor& var3,
                                        const OptTensor& w3, const OptTensor& b3, double eps3,
                                        const OptTensor& sample_scale, c10::DeviceType device) {
  const char* op = "mbconv_output_backward_stats";
  check_block_input(op, "q", q, device);
  check_activation(op, "grad_out", grad_out, q, q.sizes());
  check_norm(op, "bn3", mean3, var3, w3, b3, eps3, q);
  check_sample_scale(op, sample_scale, q);
}

// The arguments of the long backward entry points, in schema order (csrc/ops.cpp), declared
// once for both backends: each implements `impl(const Args&, Act)`, and registers
// `<op>_entry<device, impl>`, which packs the arguments, checks them and calls it.
struct ProjectBackwardArgs {
  const Tensor &grad_out, &q, &d;
  const OptTensor& gate;
  const Tensor &weight, &mean2, &var2;
  const OptTensor &w2, &b2;
  double eps2;
  c10::string_view activation;
  const Tensor &mean3, &var3;
  const OptTensor &w3, &b3;
  double eps3;
  const Tensor &sum_dy3, &sum_dy3_xhat3;
  const OptTensor& sample_scale;
  bool training;
  std::array<bool, 2> output_mask;
};

inline Act check_project_backward(const ProjectBackwardArgs& a, c10::DeviceType device) {
  const char* op = "mbconv_project_backward";
  check_block_input(op, "d", a.d, device);
  check_gate_values(op, a.gate, a.d);
  check_matrix(op, "weight", a.weight, a.d, -1, a.d.size(1));
  check_activation(op, "q", a.q, a.d, {a.d.size(0), a.weight.size(0), a.d.size(2), a.d.size(3)});
  check_activation(op, "grad_out", a.grad_out, a.d, a.q.sizes());
  check_norm(op, "bn2", a.mean2, a.var2, a.w2, a.b2, a.eps2, a.d);
  check_norm(op, "bn3", a.mean3, a.var3, a.w3, a.b3, a.eps3, a.q);
  check_channel_vector(op, "sum_dy3", a.sum_dy3, a.q);
  check_channel_vector(op, "sum_dy3_xhat3", a.sum_dy3_xhat3, a.q);
  check_sample_scale(op, a.sample_scale, a.d);
  return activation_of(op, a.activation);
}

using ProjectBackwardResult = std::tuple<Tensor, Tensor, Tensor>;

template <c10::DeviceType kDevice, ProjectBackwardResult (*kImpl)(const ProjectBackwardArgs&, Act)>
ProjectBackwardResult project_backward_entry(
    const Tensor& grad_out, const Tensor& q, const Tensor& d, const OptTensor& gate,
    const Tensor& weight, const Tensor& mean2, const Tensor& var2, const OptTensor& w2,
    const OptTensor& b2, double eps2, c10::string_view activation, const Tensor& mean3,
    const Tensor& var3, const OptTensor& w3, const OptTensor& b3, double eps3,
    const Tensor& sum_dy3, const Tensor& sum_dy3_xhat3, const OptTensor& sample_scale,
    bool training, std::array<bool, 2> output_mask) {
  const ProjectBackwardArgs a{grad_out, q, d, gate, weight, mean2, var2, w2, b2, eps2, activation,
                              mean3, var3, w3, b3, eps3, sum_dy3, sum_dy3_xhat3, sample_scale,
                              training, output_mask};
  return kImpl(a, check_project_backward(a, kDevice));
}

inline void check_grad_a2(const char* op, const Tensor& grad_a2, const OptTensor& grad_pooled,
                          const Tensor& d) {
  check_activation(op, "grad_a2", grad_a2, d, d.sizes());
  if (given(grad_pooled)) check_vector(op, "grad_pooled", *grad_pooled, d, {d.size(0), d.size(1)});
}

inline Act check_dwconv_backward_stats(const Tensor& grad_a2, const OptTensor& grad_pooled,
                                       const Tensor& d, const Tensor& mean2, const Tensor& var2,
                                       const OptTensor& w2, const OptTensor& b2, double eps2,
                                       c10::string_view activation, c10::DeviceType device) {
  const char* op = "mbconv_dwconv_backward_stats";
  check_block_input(op, "d", d, device);
  check_grad_a2(op, grad_a2, grad_pooled, d);
  check_norm(op, "bn2", mean2, var2, w2, b2, eps2, d);
  return activation_of(op, activation);
}

struct DwconvBackwardArgs {
  const Tensor& grad_a2;
  const OptTensor& grad_pooled;
  const Tensor &d, &h, &weight;
  int64_t stride;
  const Tensor &mean2, &var2;
  const OptTensor &w2, &b2;
  double eps2;
  c10::string_view activation;
  const Tensor &sum_dy2, &sum_dy2_xhat2;
  const OptTensor &in_mean, &in_var, &in_weight, &in_bias;
  double in_eps;
  bool training;
  std::array<bool, 2> output_mask;
};

inline Act check_dwconv_backward(const DwconvBackwardArgs& a, c10::DeviceType device) {
  const char* op = "mbconv_dwconv_backward";
  check_block_input(op, "h", a.h, device);
  check_dw_weight(op, a.weight, a.h, a.stride);
  check_in_bn(op, a.h, a.in_mean, a.in_var, a.in_weight, a.in_bias, a.in_eps);
  const Act act = activation_of(op, a.activation);
  const int k = static_cast<int>(a.weight.size(2)), s = static_cast<int>(a.stride);
  check_block_input(op, "d", a.d, device);
  check_activation(op, "d", a.d, a.h, {a.h.size(0), a.h.size(1), conv_out_size(a.h.size(2), k, s),
                                       conv_out_size(a.h.size(3), k, s)});
  check_grad_a2(op, a.grad_a2, a.grad_pooled, a.d);
  check_norm(op, "bn2", a.mean2, a.var2, a.w2, a.b2, a.eps2, a.d);
  check_channel_vector(op, "sum_dy2", a.sum_dy2, a.d);
  check_channel_vector(op, "sum_dy2_xhat2", a.sum_dy2_xhat2, a.d);
  return act;
}

using DwconvBackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor>;

template <c10::DeviceType kDevice, DwconvBackwardResult (*kImpl)(const DwconvBackwardArgs&, Act)>
DwconvBackwardResult dwconv_backward_entry(
    const Tensor& grad_a2, const OptTensor& grad_pooled, const Tensor& d, const Tensor& h,
    const Tensor& weight, int64_t stride, const Tensor& mean2, const Tensor& var2,
    const OptTensor& w2, const OptTensor& b2, double eps2, c10::string_view activation,
    const Tensor& sum_dy2, const Tensor& sum_dy2_xhat2, const OptTensor& in_mean,
    const OptTensor& in_var, const OptTensor& in_weight, const OptTensor& in_bias, double in_eps,
    bool training, std::array<bool, 2> output_mask) {
  const DwconvBackwardArgs a{grad_a2, grad_pooled, d, h, weight, stride, mean2, var2, w2, b2, eps2,
                             activation, sum_dy2, sum_dy2_xhat2, in_mean, in_var, in_weight,
                             in_bias, in_eps, training, output_mask};
  return kImpl(a, check_dwconv_backward(a, kDevice));
}

struct ExpandBackwardArgs {
  const Tensor &grad_y1, &e, &x, &weight, &mean1, &var1;
  const OptTensor &w1, &b1;
  double eps1;
  const Tensor &sum_dy1, &sum_dy1_xhat1;
  bool training;
  const OptTensor& grad_residual;
  std::array<bool, 2> output_mask;
};

inline void check_expand_backward(const ExpandBackwardArgs& a, c10::DeviceType device) {
  const char* op = "mbconv_expand_backward";
  check_block_input(op, "x", a.x, device);
  check_matrix(op, "weight", a.weight, a.x, -1, a.x.size(1));
  check_activation(op, "e", a.e, a.x, {a.x.size(0), a.weight.size(0), a.x.size(2), a.x.size(3)});
  check_activation(op, "grad_y1", a.grad_y1, a.x, a.e.sizes());
  check_norm(op, "bn1", a.mean1, a.var1, a.w1, a.b1, a.eps1, a.e);
  check_channel_vector(op, "sum_dy1", a.sum_dy1, a.e);
  check_channel_vector(op, "sum_dy1_xhat1", a.sum_dy1_xhat1, a.e);
  if (given(a.grad_residual)) {
    check_activation(op, "grad_residual", *a.grad_residual, a.x, a.x.sizes());
  }
}

using ExpandBackwardResult = std::tuple<Tensor, Tensor>;

template <c10::DeviceType kDevice, ExpandBackwardResult (*kImpl)(const ExpandBackwardArgs&)>
ExpandBackwardResult expand_backward_entry(
    const Tensor& grad_y1, const Tensor& e, const Tensor& x, const Tensor& weight,
    const Tensor& mean1, const Tensor& var1, const OptTensor& w1, const OptTensor& b1, double eps1,
    const Tensor& sum_dy1, const Tensor& sum_dy1_xhat1, bool training,
    const OptTensor& grad_residual, std::array<bool, 2> output_mask) {
  const ExpandBackwardArgs a{grad_y1, e, x, weight, mean1, var1, w1, b1, eps1, sum_dy1,
                             sum_dy1_xhat1, training, grad_residual, output_mask};
  check_expand_backward(a, kDevice);
  return kImpl(a);
}

// f(std::integral_constant<Act, A>{}) for the kind `a` of `kRole`: a case per kind of the list,
// instantiated for that role's kinds only (an argument takes a block activation or a gate).
template <ActRole kRole, typename F>
void dispatch_role(Act a, F&& f) {
#define FM_DISPATCH_CASE(kind, name, role)                                    \
  if constexpr (ActRole::role == kRole) {                                     \
    if (a == Act::kind) return f(std::integral_constant<Act, Act::kind>{}); \
  }
  FUSED_MBCONV_FOR_EACH_ACTIVATION(FM_DISPATCH_CASE)
#undef FM_DISPATCH_CASE
  TORCH_INTERNAL_ASSERT(false, "fused_mbconv: activation kind ", static_cast<int>(a),
                        " is not one of ", activation_names(kRole));
}

template <typename F>
void dispatch_activation(Act a, F&& f) {
  dispatch_role<ActRole::Block>(a, std::forward<F>(f));
}

template <typename F>
void dispatch_gate(Act a, F&& f) {
  dispatch_role<ActRole::Gate>(a, std::forward<F>(f));
}

}  // namespace fused_mbconv
