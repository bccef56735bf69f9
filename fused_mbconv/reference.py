"""The "torch" backend: the kernel interface written with aten ops.

Every backend module (this one, ``fused_mbconv.kernels`` for Triton, ``fused_mbconv.extension``
for csrc/) implements these functions with the same arguments and results; the custom ops in
``fused_mbconv.ops`` call whichever the chosen backend provides. This module is also the
readable specification of each kernel's math. Statistics and math run in
``accumulate_dtype(input dtype)``: float32, or float64 for float64 inputs.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .tensors import accumulate_dtype, like_input

Tensor = torch.Tensor


def _channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _affine(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor]
            ) -> Tuple[Tensor, Tensor]:
    acc = accumulate_dtype(x.dtype)
    ones = torch.ones(x.shape[1], dtype=acc, device=x.device)
    gamma = bn_weight.to(acc) if bn_weight is not None else ones
    beta = bn_bias.to(acc) if bn_bias is not None else torch.zeros_like(ones)
    return gamma, beta


def dwconv_bn_silu_forward(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor],
                           bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                           running_var: Optional[Tensor], stride: int, training: bool,
                           eps: float, need_conv_out: bool
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """SiLU(BN(depthwise_conv(x))) with padding k//2.

    Returns (out, conv_out, mean, var): conv_out is the depthwise output, kept for backward
    (empty when ``need_conv_out`` is False); mean and biased var are the statistics used to
    normalize (the batch's in training, copies of the running ones in eval)."""
    acc = accumulate_dtype(x.dtype)
    k = weight.shape[-1]
    d = F.conv2d(x, weight, None, stride, k // 2, 1, x.shape[1])
    if training:
        var, mean = torch.var_mean(d.to(acc), dim=(0, 2, 3), correction=0)
    else:
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    gamma, beta = _affine(x, bn_weight, bn_bias)
    scale = gamma * torch.rsqrt(var + eps)
    out = F.silu(d.to(acc) * _channel(scale) + _channel(beta - mean * scale)).to(x.dtype)
    conv_out = like_input(d, x) if need_conv_out else d.new_empty(0)
    return like_input(out, x), conv_out, mean, var


def dwconv_bn_silu_backward(grad_out: Tensor, x: Tensor, weight: Tensor, conv_out: Tensor,
                            bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                            mean: Tensor, var: Tensor, stride: int, training: bool, eps: float,
                            output_mask: List[bool]
                            ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor],
                                       Optional[Tensor]]:
    """Gradients (input, conv weight, bn weight, bn bias); None where output_mask is False.

    The BN output and the SiLU input are recomputed from conv_out and the statistics."""
    acc = accumulate_dtype(x.dtype)
    channels, k = x.shape[1], weight.shape[-1]
    gamma, beta = _affine(x, bn_weight, bn_bias)
    invstd = torch.rsqrt(var + eps)
    x_hat = (conv_out.to(acc) - _channel(mean)) * _channel(invstd)
    y = x_hat * _channel(gamma) + _channel(beta)
    sig = torch.sigmoid(y)
    g = grad_out.to(acc) * sig * (1 + y * (1 - sig))  # d silu(y) / dy
    grad_beta = g.sum((0, 2, 3))
    grad_gamma = (g * x_hat).sum((0, 2, 3))
    if training:
        count = g.numel() // channels
        g = g - _channel(grad_beta / count) - x_hat * _channel(grad_gamma / count)
    grad_conv = (g * _channel(gamma * invstd)).to(x.dtype)
    grad_x, grad_w = None, None
    if output_mask[0] or output_mask[1]:
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_conv, x, weight, None, [stride, stride], [k // 2, k // 2], [1, 1], False,
            [0, 0], channels, [output_mask[0], output_mask[1], False])
        if grad_x is not None:
            grad_x = like_input(grad_x, x)
    return (grad_x, grad_w,
            grad_gamma if output_mask[2] else None,
            grad_beta if output_mask[3] else None)
