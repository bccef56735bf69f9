// The fused_mbconv_ext operator schemas, declared once. Implementations are registered per
// dispatch key by csrc/cpu/dispatch.cpp (CPU: csrc/cpu/kernels/ as compiled for one CPU
// capability) and csrc/cuda/*.cu (CUDA). These are the kernel interface of
// fused_mbconv/reference.py, not public ops: fused_mbconv.extension wraps them. (The CPU
// library's capability queries are defined beside their implementation, in dispatch.cpp.)
#include <torch/library.h>

TORCH_LIBRARY(fused_mbconv_ext, m) {
  // Returns (out, conv_out, mean, var); conv_out is empty unless need_conv_out.
  m.def("dwconv_bn_silu_forward(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, "
        "Tensor? running_mean, Tensor? running_var, int stride, bool training, float eps, "
        "bool need_conv_out) -> (Tensor, Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bn_weight, grad_bn_bias); empty where output_mask is False.
  m.def("dwconv_bn_silu_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor conv_out, "
        "Tensor? bn_weight, Tensor? bn_bias, Tensor mean, Tensor var, int stride, bool training, "
        "float eps, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // MBConv block (fused_mbconv/reference.py, K1..K6 and B6..B1). A BatchNorm is passed as
  // (mean, var, weight?, bias?, eps); the depthwise input's BN1 (in_bn) is optional as a whole.
  m.def("mbconv_expand_forward(Tensor x, Tensor weight, bool need_stats) -> (Tensor, Tensor, Tensor)");
  m.def("mbconv_dwconv_forward(Tensor h, Tensor weight, int stride, Tensor? in_mean, "
        "Tensor? in_var, Tensor? in_weight, Tensor? in_bias, float in_eps, str activation, "
        "bool need_stats) -> (Tensor, Tensor, Tensor)");
  m.def("mbconv_squeeze_forward(Tensor d, Tensor mean2, Tensor var2, Tensor? weight2, "
        "Tensor? bias2, float eps2, str activation) -> Tensor");
  m.def("mbconv_excite_forward(Tensor pooled, Tensor fc1_weight, Tensor fc1_bias, "
        "Tensor fc2_weight, Tensor fc2_bias, str se_activation, str gate) -> Tensor");
  m.def("mbconv_project_forward(Tensor d, Tensor? gate_values, Tensor weight, Tensor mean2, "
        "Tensor var2, Tensor? weight2, Tensor? bias2, float eps2, str activation, "
        "bool need_stats) -> (Tensor, Tensor, Tensor)");
  m.def("mbconv_output_forward(Tensor q, Tensor mean3, Tensor var3, Tensor? weight3, "
        "Tensor? bias3, float eps3, Tensor? sample_scale, Tensor? residual) -> Tensor");
  m.def("mbconv_output_backward_stats(Tensor grad_out, Tensor q, Tensor mean3, Tensor var3, "
        "Tensor? weight3, Tensor? bias3, float eps3, Tensor? sample_scale) -> (Tensor, Tensor)");
  m.def("mbconv_project_backward(Tensor grad_out, Tensor q, Tensor d, Tensor? gate_values, "
        "Tensor weight, Tensor mean2, Tensor var2, Tensor? weight2, Tensor? bias2, float eps2, "
        "str activation, Tensor mean3, Tensor var3, Tensor? weight3, Tensor? bias3, float eps3, "
        "Tensor sum_dy3, Tensor sum_dy3_xhat3, Tensor? sample_scale, bool training, "
        "bool[2] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("mbconv_excite_backward(Tensor grad_gate, Tensor pooled, Tensor fc1_weight, "
        "Tensor fc1_bias, Tensor fc2_weight, Tensor fc2_bias, str se_activation, str gate) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("mbconv_dwconv_backward_stats(Tensor grad_a2, Tensor? grad_pooled, Tensor d, "
        "Tensor mean2, Tensor var2, Tensor? weight2, Tensor? bias2, float eps2, str activation) "
        "-> (Tensor, Tensor)");
  m.def("mbconv_dwconv_backward(Tensor grad_a2, Tensor? grad_pooled, Tensor d, Tensor h, "
        "Tensor weight, int stride, Tensor mean2, Tensor var2, Tensor? weight2, Tensor? bias2, "
        "float eps2, str activation, Tensor sum_dy2, Tensor sum_dy2_xhat2, Tensor? in_mean, "
        "Tensor? in_var, Tensor? in_weight, Tensor? in_bias, float in_eps, bool training, "
        "bool[2] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("mbconv_expand_backward(Tensor grad_y1, Tensor e, Tensor x, Tensor weight, "
        "Tensor mean1, Tensor var1, Tensor? weight1, Tensor? bias1, float eps1, Tensor sum_dy1, "
        "Tensor sum_dy1_xhat1, bool training, Tensor? grad_residual, bool[2] output_mask) "
        "-> (Tensor, Tensor)");
}
