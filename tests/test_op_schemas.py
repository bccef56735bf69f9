"""The custom ops' schemas are a contract (saved programs, torch.export, other callers): their
names, argument names, types and order stay exactly these. An argument is only ever added
last, with a default that keeps every older call's meaning (mbconv's keep_expand_output)."""

import pytest
import torch

import fused_mbconv  # noqa: F401  (registers the ops)

SCHEMAS = {
    "mbconv": "fused_mbconv::mbconv(Tensor x, Tensor? expand_weight, Tensor? bn1_weight, "
    "Tensor? bn1_bias, Tensor? bn1_running_mean, Tensor? bn1_running_var, Tensor dw_weight, "
    "Tensor? bn2_weight, Tensor? bn2_bias, Tensor? bn2_running_mean, Tensor? bn2_running_var, "
    "Tensor? fc1_weight, Tensor? fc1_bias, Tensor? fc2_weight, Tensor? fc2_bias, "
    "Tensor project_weight, Tensor? bn3_weight, Tensor? bn3_bias, Tensor? bn3_running_mean, "
    "Tensor? bn3_running_var, Tensor? sample_scale, SymInt stride, bool training, float[] eps, "
    "str activation, str se_activation, str gate, bool residual, bool keep_dwconv_output, "
    "bool keep_expand_output=True) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "mbconv_backward": "fused_mbconv::mbconv_backward(Tensor grad_out, Tensor x, Tensor e, "
    "Tensor d, Tensor? expand_weight, Tensor? bn1_weight, Tensor? bn1_bias, Tensor mean1, "
    "Tensor var1, Tensor dw_weight, Tensor? bn2_weight, Tensor? bn2_bias, Tensor mean2, "
    "Tensor var2, Tensor? fc1_weight, Tensor? fc1_bias, Tensor? fc2_weight, Tensor? fc2_bias, "
    "Tensor pooled, Tensor gate_values, Tensor project_weight, Tensor? bn3_weight, "
    "Tensor? bn3_bias, Tensor mean3, Tensor var3, Tensor? sample_scale, SymInt stride, "
    "bool training, float[] eps, str activation, str se_activation, str gate, bool residual, "
    "bool[] output_mask) -> Tensor[]",
    "dwconv_bn_silu": "fused_mbconv::dwconv_bn_silu(Tensor x, Tensor weight, Tensor? bn_weight, "
    "Tensor? bn_bias, Tensor? running_mean, Tensor? running_var, SymInt stride, bool training, "
    "float eps, bool need_conv_out) -> (Tensor, Tensor, Tensor, Tensor)",
    "dwconv_bn_silu_backward": "fused_mbconv::dwconv_bn_silu_backward(Tensor grad_out, "
    "Tensor x, Tensor weight, Tensor conv_out, Tensor? bn_weight, Tensor? bn_bias, Tensor mean, "
    "Tensor var, SymInt stride, bool training, float eps, bool[] output_mask) -> "
    "(Tensor, Tensor, Tensor, Tensor)",
    # the stem and head ops
    "conv_bn_act": "fused_mbconv::conv_bn_act(Tensor x, Tensor weight, Tensor? bn_weight, "
    "Tensor? bn_bias, Tensor? running_mean, Tensor? running_var, SymInt stride, bool training, "
    "float eps, str activation) -> (Tensor, Tensor, Tensor)",
    "conv_bn_act_backward": "fused_mbconv::conv_bn_act_backward(Tensor grad_out, Tensor x, "
    "Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor mean, Tensor var, SymInt stride, "
    "bool training, float eps, str activation, bool[] output_mask) -> "
    "(Tensor, Tensor, Tensor, Tensor)",
    "pointwise_bn_act_pool": "fused_mbconv::pointwise_bn_act_pool(Tensor x, Tensor weight, "
    "Tensor? bn_weight, Tensor? bn_bias, Tensor? running_mean, Tensor? running_var, "
    "bool training, float eps, str activation) -> (Tensor, Tensor, Tensor)",
    "pointwise_bn_act_pool_backward": "fused_mbconv::pointwise_bn_act_pool_backward("
    "Tensor grad_out, Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor mean, "
    "Tensor var, bool training, float eps, str activation, bool[] output_mask) -> "
    "(Tensor, Tensor, Tensor, Tensor)",
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_is_unchanged(name):
    assert str(getattr(torch.ops.fused_mbconv, name).default._schema) == SCHEMAS[name]
