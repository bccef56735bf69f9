"""The stem and head ops, shaped like the modules they replace (``fused_mbconv.functional``
exports them).

As for the block: inputs are checked before any kernel runs, so a bad call names the problem
and changes no running statistics; in training they are updated after the op succeeds, as
``nn.BatchNorm2d`` does (``momentum=None`` as the cumulative average, num_batches_tracked).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import functional as _f
from .activations import ACTIVATIONS, check_name
from .functional import BatchNormParams
from .ops.dwconv_bn_silu import conv_output_size


def check_conv_bn_act_args(x: Tensor, conv_weight: Tensor, bn: BatchNormParams, stride: int,
                           training: bool, activation: str, pointwise: bool = False) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"input must be a 4-D (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    _f._check_float("input", x)
    if min(x.shape) == 0:
        raise ValueError(f"input has an empty dimension: shape {tuple(x.shape)}")
    cin = x.shape[1]
    kernel = (1, 1) if pointwise else (None, None)
    _f._check_conv_weight("conv_weight", conv_weight, (None, cin, *kernel), x,
                          f"a {'1x1' if pointwise else 'dense'} conv from the input's {cin} "
                          f"channels")
    k = conv_weight.shape[-1]
    if conv_weight.shape[2] != k or k % 2 == 0:
        raise ValueError(f"conv_weight must have a square odd kernel (padding k//2 keeps "
                         f"'same' alignment), got kernel {tuple(conv_weight.shape[2:])}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    _f._check_bn("bn", bn, conv_weight.shape[0], x, training)
    check_name(activation, ACTIVATIONS, "activation")
    _f._check_values_per_channel(x, k, stride, training)


def _run(op, input: Tensor, conv_weight: Tensor, bn: BatchNormParams, stride: int,
         training: bool, activation: str, pointwise: bool) -> Tensor:
    amp = _f._autocast_dtype(input)
    input, conv_weight = _f._cast_for_conv(input, amp), _f._cast_for_conv(conv_weight, amp)
    check_conv_bn_act_args(input, conv_weight, bn, stride, training, activation, pointwise)
    x = input if input.is_contiguous(memory_format=torch.channels_last) else input.contiguous()
    options = (training, bn.eps, activation) if pointwise else (stride, training, bn.eps,
                                                                activation)
    with _f._autocast_off(x):
        out, mean, var = op(x, conv_weight.contiguous(), bn.weight, bn.bias, bn.running_mean,
                            bn.running_var, *options)
    if training:
        k = conv_weight.shape[-1]
        count = x.shape[0] * conv_output_size(x.shape[2], k, stride) * \
            conv_output_size(x.shape[3], k, stride)
        _f._update_bn(bn, mean, var, count)
        if out.requires_grad and not torch.compiler.is_compiling():
            _f._RecomputeMarker.apply(out)  # keeps the update inside checkpoint's recompute
    return out


def conv_bn_act(input: Tensor, conv_weight: Tensor, bn: BatchNormParams, *, stride: int = 1,
                training: bool = False, activation: str = "silu") -> Tensor:
    """act(BatchNorm2d(Conv2d(Cin, Cout, k, stride, padding=k//2, bias=False)(input))): a
    network's stem (or a 1x1 head conv) as one op that keeps only the input and per-channel
    statistics for backward. ``training`` selects batch statistics. The output keeps the
    input's memory format; under ``torch.autocast`` the conv runs in the autocast dtype."""
    return _run(torch.ops.fused_mbconv.conv_bn_act, input, conv_weight, bn, stride, training,
                activation, pointwise=False)


def pointwise_bn_act_pool(input: Tensor, conv_weight: Tensor, bn: BatchNormParams, *,
                          training: bool = False, activation: str = "silu") -> Tensor:
    """mean over (H, W) of act(BatchNorm2d(Conv2d(Cin, Cout, 1, bias=False)(input))), (N, Cout):
    the head and its global average pool as one op; the Cout-channel map is never kept."""
    return _run(torch.ops.fused_mbconv.pointwise_bn_act_pool, input, conv_weight, bn, 1,
                training, activation, pointwise=True)
