// The fused_mbconv_ext operator schemas, declared once. Implementations are registered per
// dispatch key by csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA). These are the kernel
// interface of fused_mbconv/reference.py, not public ops: fused_mbconv.extension wraps them.
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
}
