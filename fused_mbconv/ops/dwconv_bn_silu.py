"""``fused_mbconv::dwconv_bn_silu``: SiLU(BatchNorm(depthwise conv(x))), and its backward.

Saved for backward: the input, the conv weight, the depthwise output and the per-channel
statistics (plus the BN affine parameters). The BN output and the SiLU input are recomputed.
Running statistics are not touched here: the op is functional, and
``fused_mbconv.functional`` updates them from the statistics it returns.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..backends import kernels_for
from ..tensors import accumulate_dtype, empty_like_input, memory_format_of


def conv_output_size(size: int, kernel_size: int, stride: int) -> int:
    return (size + 2 * (kernel_size // 2) - kernel_size) // stride + 1


@torch.library.custom_op("fused_mbconv::dwconv_bn_silu", mutates_args=())
def dwconv_bn_silu(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor],
                   bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], stride: int, training: bool, eps: float,
                   need_conv_out: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels_for(x.device).dwconv_bn_silu_forward(
        x, weight, bn_weight, bn_bias, running_mean, running_var, stride, training, eps,
        need_conv_out)


@dwconv_bn_silu.register_fake
def _(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, training, eps,
      need_conv_out):
    n, c, h, w = x.shape
    k = weight.shape[-1]
    shape = (n, c, conv_output_size(h, k, stride), conv_output_size(w, k, stride))
    out = empty_like_input(x, shape)
    conv_out = empty_like_input(x, shape) if need_conv_out else x.new_empty(0)
    stats = x.new_empty(c, dtype=accumulate_dtype(x.dtype))
    return out, conv_out, stats, torch.empty_like(stats)


@torch.library.custom_op("fused_mbconv::dwconv_bn_silu_backward", mutates_args=())
def dwconv_bn_silu_backward(grad_out: Tensor, x: Tensor, weight: Tensor, conv_out: Tensor,
                            bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                            mean: Tensor, var: Tensor, stride: int, training: bool, eps: float,
                            output_mask: List[bool]
                            ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = kernels_for(x.device).dwconv_bn_silu_backward(
        grad_out.contiguous(memory_format=memory_format_of(x)), x, weight, conv_out, bn_weight,
        bn_bias, mean, var, stride, training, eps, output_mask)
    # Custom ops return tensors, not None: a masked-off gradient comes back empty.
    return tuple(g if g is not None else e for g, e in zip(grads, _empty_grads(x)))


def _empty_grads(x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    stats = x.new_empty(0, dtype=accumulate_dtype(x.dtype))
    return x.new_empty(0), x.new_empty(0), stats, stats.clone()


@dwconv_bn_silu_backward.register_fake
def _(grad_out, x, weight, conv_out, bn_weight, bn_bias, mean, var, stride, training, eps,
      output_mask):
    c = x.shape[1]
    full = (empty_like_input(x, x.shape), torch.empty_like(weight),
            x.new_empty(c, dtype=accumulate_dtype(x.dtype)),
            x.new_empty(c, dtype=accumulate_dtype(x.dtype)))
    return tuple(f if m else e for f, e, m in zip(full, _empty_grads(x), output_mask))


def _setup_context(ctx, inputs, output):
    x, weight, bn_weight, bn_bias, _, _, stride, training, eps, _ = inputs
    _, conv_out, mean, var = output
    ctx.save_for_backward(x, weight, conv_out, bn_weight, bn_bias, mean, var)
    ctx.stride, ctx.training, ctx.eps = stride, training, eps
    ctx.mark_non_differentiable(conv_out, mean, var)


def _backward(ctx, grad_out, _grad_conv_out, _grad_mean, _grad_var):
    x, weight, conv_out, bn_weight, bn_bias, mean, var = ctx.saved_tensors
    if conv_out.numel() == 0:
        raise RuntimeError("dwconv_bn_silu: backward needs the depthwise output, which the "
                           "forward did not keep (need_conv_out=False)")
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            bn_weight is not None and ctx.needs_input_grad[2],
            bn_bias is not None and ctx.needs_input_grad[3]]
    grads = torch.ops.fused_mbconv.dwconv_bn_silu_backward(
        grad_out, x, weight, conv_out, bn_weight, bn_bias, mean, var, ctx.stride,
        ctx.training, ctx.eps, mask)
    params = (x, weight, bn_weight, bn_bias)
    grads = [g.to(p.dtype) if m else None for g, p, m in zip(grads, params, mask)]
    return (*grads, None, None, None, None, None, None)


dwconv_bn_silu.register_autograd(_backward, setup_context=_setup_context)
