"""``fused_mbconv::dwconv_bn_silu``: SiLU(BatchNorm(depthwise conv(x))), and its backward.

Saved for backward: the input, the conv weight, the depthwise output and the per-channel
statistics (plus the BN affine parameters). The BN output and the SiLU input are recomputed.
Running statistics are not touched here: the op is functional, and
``fused_mbconv.functional`` updates them from the statistics it returns.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..backends import kernels_for
from ..tensors import accumulate_dtype, empty_like_input, memory_format_of
from .signature import (Arg, backward_args, grad_names, input_grads, needs_grad, schema,
                        tensors, values_type)

# fused_mbconv::dwconv_bn_silu's inputs, in schema order: the one list of them. The kernel
# interface's dwconv_bn_silu_forward takes them in this order too.
INPUTS = (
    Arg("x", "Tensor", grad=True), Arg("weight", "Tensor", grad=True),
    Arg("bn_weight", "Tensor?", grad=True), Arg("bn_bias", "Tensor?", grad=True),
    Arg("running_mean", "Tensor?"), Arg("running_var", "Tensor?"),
    Arg("stride", "SymInt"), Arg("training", "bool"), Arg("eps", "float"),
    Arg("need_conv_out", "bool"),
)
DwconvInputs = values_type("DwconvInputs", INPUTS)
# fused_mbconv::dwconv_bn_silu_backward returns one gradient per name, in this order.
GRAD_INPUTS = grad_names(INPUTS)
OUTPUTS = ("out", "conv_out", "mean", "var")
DwconvOutputs = values_type("DwconvOutputs", [Arg(n, "Tensor") for n in OUTPUTS])
# Inputs and outputs saved for backward, in fused_mbconv::dwconv_bn_silu_backward's order.
SAVED = ("x", "weight", "conv_out", "bn_weight", "bn_bias", "mean", "var")
OPTIONS = ("stride", "training", "eps")
# fused_mbconv::dwconv_bn_silu_backward's inputs, which its kernel takes in this order too.
BACKWARD_INPUTS = backward_args(INPUTS, SAVED, OPTIONS)
DwconvBackwardInputs = values_type("DwconvBackwardInputs", BACKWARD_INPUTS)


def conv_output_size(size: int, kernel_size: int, stride: int) -> int:
    return (size + 2 * (kernel_size // 2) - kernel_size) // stride + 1


@torch.library.custom_op("fused_mbconv::dwconv_bn_silu", mutates_args=(),
                         schema=schema(INPUTS, tensors(len(OUTPUTS))))
def dwconv_bn_silu(*inputs) -> Tuple[Tensor, ...]:
    """INPUTS in order; returns OUTPUTS."""
    return kernels_for(inputs[0].device).dwconv_bn_silu_forward(*inputs)


@dwconv_bn_silu.register_fake
def _(*inputs):
    a = DwconvInputs(*inputs)
    n, c, h, w = a.x.shape
    k = a.weight.shape[-1]
    shape = (n, c, conv_output_size(h, k, a.stride), conv_output_size(w, k, a.stride))
    out = empty_like_input(a.x, shape)
    conv_out = empty_like_input(a.x, shape) if a.need_conv_out else a.x.new_empty(0)
    stats = a.x.new_empty(c, dtype=accumulate_dtype(a.x.dtype))
    return out, conv_out, stats, torch.empty_like(stats)


@torch.library.custom_op("fused_mbconv::dwconv_bn_silu_backward", mutates_args=(),
                         schema=schema(BACKWARD_INPUTS, tensors(len(GRAD_INPUTS))))
def dwconv_bn_silu_backward(*inputs) -> Tuple[Tensor, ...]:
    """BACKWARD_INPUTS in order; returns the gradients of GRAD_INPUTS."""
    a = DwconvBackwardInputs(*inputs)
    grad_out = a.grad_out.contiguous(memory_format=memory_format_of(a.x))
    grads = kernels_for(a.x.device).dwconv_bn_silu_backward(grad_out, *inputs[1:])
    # Custom ops return tensors, not None: a masked-off gradient comes back empty.
    return tuple(g if g is not None else e for g, e in zip(grads, _empty_grads(a.x)))


def _empty_grads(x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    stats = x.new_empty(0, dtype=accumulate_dtype(x.dtype))
    return x.new_empty(0), x.new_empty(0), stats, stats.clone()


@dwconv_bn_silu_backward.register_fake
def _(*inputs):
    a = DwconvBackwardInputs(*inputs)
    c = a.x.shape[1]
    full = (empty_like_input(a.x, a.x.shape), torch.empty_like(a.weight),
            a.x.new_empty(c, dtype=accumulate_dtype(a.x.dtype)),
            a.x.new_empty(c, dtype=accumulate_dtype(a.x.dtype)))
    return tuple(f if m else e for f, e, m in zip(full, _empty_grads(a.x), a.output_mask))


def _setup_context(ctx, inputs, output):
    values = {**DwconvInputs(*inputs)._asdict(), **DwconvOutputs(*output)._asdict()}
    ctx.save_for_backward(*(values[n] for n in SAVED))
    ctx.options = tuple(values[n] for n in OPTIONS)
    ctx.present = [values[n] is not None for n in GRAD_INPUTS]
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_out, _grad_conv_out, _grad_mean, _grad_var):
    saved = dict(zip(SAVED, ctx.saved_tensors))
    if saved["conv_out"].numel() == 0:
        raise RuntimeError("dwconv_bn_silu: backward needs the depthwise output, which the "
                           "forward did not keep (need_conv_out=False)")
    needs = needs_grad(INPUTS, ctx.needs_input_grad)
    mask = [present and needs[n] for present, n in zip(ctx.present, GRAD_INPUTS)]
    grads = torch.ops.fused_mbconv.dwconv_bn_silu_backward(
        grad_out, *ctx.saved_tensors, *ctx.options, mask)
    return input_grads(INPUTS, {n: g.to(saved[n].dtype)
                                for n, g, m in zip(GRAD_INPUTS, grads, mask) if m})


dwconv_bn_silu.register_autograd(_backward, setup_context=_setup_context)
