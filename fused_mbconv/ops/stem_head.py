"""A network's stem and head as custom ops, and their backward.

``fused_mbconv::conv_bn_act``: act(BatchNorm(conv(x))) for a dense k x k conv (the stem:
3x3 stride 2 at full resolution; timm's head: 1x1). ``fused_mbconv::pointwise_bn_act_pool``:
mean over (H, W) of act(BatchNorm(conv1x1(x))), the pooled head, (N, Cout).

Saved for backward: only what cannot be recomputed: the input (which the graph holds anyway:
the image for the stem, the last block's output for the head), the weights and the
per-channel statistics. The conv output (the stem's 32 x 112^2 map, the head's 1280-channel
map) and everything after it are recomputed in backward. Running statistics are not touched
here: ``fused_mbconv.functional.conv_bn_act`` updates them from the statistics returned.

Kernels: ``conv_bn_act`` runs ``STEM_KERNELS``; the pooled head the block's K1 expand GEMM
with BN statistics, K3 (BN + act + spatial mean) and B1 (BN backward + dgrad, wgrad) from
every backend, and ``act_pool_backward``. A backend lacking one of these runs the
reference's, explicitly (``backends.kernels_with_reference``; ``kernel_sources`` says which).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor

from ..backends import kernels_with_reference
from ..tensors import NormArgs, accumulate_dtype, empty_like_input, memory_format_of
from .dwconv_bn_silu import conv_output_size
from .mbconv import kernel_input
from .signature import (Arg, backward_args, grad_names, input_grads, needs_grad, schema,
                        tensors, values_type)

STEM_KERNELS = ("conv_bn_act_forward", "conv_bn_act_backward")
HEAD_KERNELS = ("mbconv_expand_forward", "mbconv_squeeze_forward", "act_pool_backward",
                "mbconv_expand_backward")

_BN_INPUTS = (Arg("bn_weight", "Tensor?", grad=True), Arg("bn_bias", "Tensor?", grad=True),
              Arg("running_mean", "Tensor?"), Arg("running_var", "Tensor?"))
# fused_mbconv::conv_bn_act's inputs, in schema order (the kernel interface's too).
CONV_INPUTS = (Arg("x", "Tensor", grad=True), Arg("weight", "Tensor", grad=True), *_BN_INPUTS,
               Arg("stride", "SymInt"), Arg("training", "bool"), Arg("eps", "float"),
               Arg("activation", "str"))
# fused_mbconv::pointwise_bn_act_pool's: weight is the (Cout, Cin, 1, 1) conv weight.
HEAD_INPUTS = (Arg("x", "Tensor", grad=True), Arg("weight", "Tensor", grad=True), *_BN_INPUTS,
               Arg("training", "bool"), Arg("eps", "float"), Arg("activation", "str"))
OUTPUTS = ("out", "mean", "var")
SAVED = ("x", "weight", "bn_weight", "bn_bias", "mean", "var")
CONV_OPTIONS = ("stride", "training", "eps", "activation")
HEAD_OPTIONS = ("training", "eps", "activation")
GRAD_INPUTS = grad_names(CONV_INPUTS)
assert GRAD_INPUTS == grad_names(HEAD_INPUTS)
CONV_BACKWARD_INPUTS = backward_args(CONV_INPUTS, SAVED, CONV_OPTIONS)
HEAD_BACKWARD_INPUTS = backward_args(HEAD_INPUTS, SAVED, HEAD_OPTIONS)
ConvInputs = values_type("ConvInputs", CONV_INPUTS)
HeadInputs = values_type("HeadInputs", HEAD_INPUTS)
Outputs = values_type("Outputs", [Arg(n, "Tensor") for n in OUTPUTS])
ConvBackwardInputs = values_type("ConvBackwardInputs", CONV_BACKWARD_INPUTS)
HeadBackwardInputs = values_type("HeadBackwardInputs", HEAD_BACKWARD_INPUTS)


def kernel_sources(device: torch.device) -> Dict[str, Tuple[str, List[str]]]:
    """Per op, (the backend that runs tensors on ``device`` now, the functions it takes from
    the reference): what ``convert_report`` states for the stem and the head."""
    return {op: kernels_with_reference(device, functions)[1:]
            for op, functions in (("conv_bn_act", STEM_KERNELS),
                                  ("pointwise_bn_act_pool", HEAD_KERNELS))}


def _stats_or_running(training: bool, mean: Tensor, var: Tensor, running_mean, running_var,
                      acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    if training:
        return mean, var
    return running_mean.to(acc, copy=True), running_var.to(acc, copy=True)


def _empty_grads(x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    stats = x.new_empty(0, dtype=accumulate_dtype(x.dtype))
    return x.new_empty(0), x.new_empty(0), stats, stats.clone()


def _full_grads(x: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    c = weight.shape[0]
    acc = accumulate_dtype(x.dtype)
    return (empty_like_input(x, x.shape), torch.empty_like(weight), x.new_empty(c, dtype=acc),
            x.new_empty(c, dtype=acc))


def _returned(grads, x: Tensor, weight: Tensor, mask: List[bool]) -> Tuple[Tensor, ...]:
    """The op's gradients: each as its input is laid out; empty where masked off (custom ops
    return tensors, not None)."""
    shaped = []
    for g, like, empty, wanted in zip(grads, (x, weight, None, None), _empty_grads(x), mask):
        if not wanted or g is None:
            shaped.append(empty)
        elif like is None:
            shaped.append(g.contiguous())
        else:
            shaped.append(g.reshape(like.shape).to(like.dtype).contiguous(
                memory_format=memory_format_of(like)))
    return tuple(shaped)


def _fake_stats(x: Tensor, channels: int) -> Tuple[Tensor, Tensor]:
    stats = x.new_empty(channels, dtype=accumulate_dtype(x.dtype))
    return stats, torch.empty_like(stats)


# ---- fused_mbconv::conv_bn_act --------------------------------------------------------------

@torch.library.custom_op("fused_mbconv::conv_bn_act", mutates_args=(),
                         schema=schema(CONV_INPUTS, tensors(len(OUTPUTS))))
def conv_bn_act(*inputs) -> Tuple[Tensor, ...]:
    """CONV_INPUTS in order; returns (out, mean, var)."""
    a = ConvInputs(*inputs)
    k = kernels_with_reference(a.x.device, STEM_KERNELS)[0]
    return k.conv_bn_act_forward(a.x, a.weight, a.stride, a.bn_weight, a.bn_bias,
                                 a.running_mean, a.running_var, a.training, a.eps, a.activation)


@conv_bn_act.register_fake
def _(*inputs):
    a = ConvInputs(*inputs)
    n, _, h, w = a.x.shape
    k = a.weight.shape[-1]
    shape = (n, a.weight.shape[0], conv_output_size(h, k, a.stride),
             conv_output_size(w, k, a.stride))
    return (empty_like_input(a.x, shape), *_fake_stats(a.x, a.weight.shape[0]))


@torch.library.custom_op("fused_mbconv::conv_bn_act_backward", mutates_args=(),
                         schema=schema(CONV_BACKWARD_INPUTS, tensors(len(GRAD_INPUTS))))
def conv_bn_act_backward(*inputs) -> Tuple[Tensor, ...]:
    """CONV_BACKWARD_INPUTS in order; returns the gradients of GRAD_INPUTS."""
    a = ConvBackwardInputs(*inputs)
    k = kernels_with_reference(a.x.device, STEM_KERNELS)[0]
    grad_out = a.grad_out.contiguous(memory_format=memory_format_of(a.x))
    grads = k.conv_bn_act_backward(grad_out, a.x, a.weight, a.bn_weight, a.bn_bias, a.mean,
                                   a.var, a.stride, a.training, a.eps, a.activation,
                                   a.output_mask)
    return _returned(grads, a.x, a.weight, a.output_mask)


@conv_bn_act_backward.register_fake
def _(*inputs):
    a = ConvBackwardInputs(*inputs)
    return tuple(f if m else e for f, e, m in zip(_full_grads(a.x, a.weight), _empty_grads(a.x),
                                                  a.output_mask))


# ---- fused_mbconv::pointwise_bn_act_pool ----------------------------------------------------

def _matrix(weight: Tensor) -> Tensor:
    return weight.view(weight.shape[0], weight.shape[1])


@torch.library.custom_op("fused_mbconv::pointwise_bn_act_pool", mutates_args=(),
                         schema=schema(HEAD_INPUTS, tensors(len(OUTPUTS))))
def pointwise_bn_act_pool(*inputs) -> Tuple[Tensor, ...]:
    """HEAD_INPUTS in order; returns (pooled (N, Cout) in x's dtype, mean, var)."""
    a = HeadInputs(*inputs)
    k = kernels_with_reference(a.x.device, HEAD_KERNELS)[0]
    e, mean, var = k.mbconv_expand_forward(kernel_input(a.x), _matrix(a.weight), a.training)
    mean, var = _stats_or_running(a.training, mean, var, a.running_mean, a.running_var,
                                  accumulate_dtype(a.x.dtype))
    pooled = k.mbconv_squeeze_forward(e, NormArgs(mean, var, a.bn_weight, a.bn_bias, a.eps),
                                      a.activation)
    return pooled.to(a.x.dtype), mean, var


@pointwise_bn_act_pool.register_fake
def _(*inputs):
    a = HeadInputs(*inputs)
    cout = a.weight.shape[0]
    return (a.x.new_empty((a.x.shape[0], cout)), *_fake_stats(a.x, cout))


@torch.library.custom_op("fused_mbconv::pointwise_bn_act_pool_backward", mutates_args=(),
                         schema=schema(HEAD_BACKWARD_INPUTS, tensors(len(GRAD_INPUTS))))
def pointwise_bn_act_pool_backward(*inputs) -> Tuple[Tensor, ...]:
    """HEAD_BACKWARD_INPUTS in order; returns the gradients of GRAD_INPUTS. The 1x1 conv output
    is recomputed (K1); the BN and activation outputs in the kernels that read it."""
    a = HeadBackwardInputs(*inputs)
    k = kernels_with_reference(a.x.device, HEAD_KERNELS)[0]
    x, weight = kernel_input(a.x), _matrix(a.weight)
    bn = NormArgs(a.mean, a.var, a.bn_weight, a.bn_bias, a.eps)
    e = k.mbconv_expand_forward(x, weight, False)[0]
    dy, sum_dy, sum_dy_xhat = k.act_pool_backward(
        a.grad_out.to(accumulate_dtype(x.dtype)).contiguous(), e, bn, a.activation)
    grad_x = grad_w = None
    if a.output_mask[0] or a.output_mask[1]:
        grad_x, grad_w = k.mbconv_expand_backward(dy, e, x, weight, bn, sum_dy, sum_dy_xhat,
                                                  a.training, None, list(a.output_mask[:2]))
    return _returned((grad_x, grad_w, sum_dy_xhat, sum_dy), a.x, a.weight, a.output_mask)


@pointwise_bn_act_pool_backward.register_fake
def _(*inputs):
    a = HeadBackwardInputs(*inputs)
    return tuple(f if m else e for f, e, m in zip(_full_grads(a.x, a.weight), _empty_grads(a.x),
                                                  a.output_mask))


# ---- autograd, shared ----------------------------------------------------------------------

def _register_autograd(op, forward_inputs, forward_values, options, backward_op) -> None:
    """``op``'s autograd: it saves SAVED and calls ``backward_op`` (the op's backward custom
    op, through torch.ops, so compile and export see it) with the gradients wanted."""
    def setup_context(ctx, inputs, output):
        values = {**forward_values(*inputs)._asdict(), **Outputs(*output)._asdict()}
        ctx.save_for_backward(*(values[n] for n in SAVED))
        ctx.options = tuple(values[n] for n in options)
        ctx.present = [values[n] is not None for n in GRAD_INPUTS]
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # the statistics' gradients are never used

    def backward(ctx, grad_out, *_unused):
        if grad_out is None:
            return input_grads(forward_inputs, {})
        tensors = ctx.saved_tensors  # once: checkpointing unpacks each saved tensor once
        saved = dict(zip(SAVED, tensors))
        needs = needs_grad(forward_inputs, ctx.needs_input_grad)
        mask = [present and needs[n] for present, n in zip(ctx.present, GRAD_INPUTS)]
        grads = backward_op(grad_out, *tensors, *ctx.options, mask)
        return input_grads(forward_inputs, {n: g.to(saved[n].dtype)
                                            for n, g, m in zip(GRAD_INPUTS, grads, mask) if m})

    op.register_autograd(backward, setup_context=setup_context)


_register_autograd(conv_bn_act, CONV_INPUTS, ConvInputs, CONV_OPTIONS,
                   lambda *a: torch.ops.fused_mbconv.conv_bn_act_backward(*a))
_register_autograd(pointwise_bn_act_pool, HEAD_INPUTS, HeadInputs, HEAD_OPTIONS,
                   lambda *a: torch.ops.fused_mbconv.pointwise_bn_act_pool_backward(*a))
